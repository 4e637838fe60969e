"""The embedded nats-server a new user gets with ``make run``: only a process that can read the
service's data dir can reach it, and the publisher finds its way in from that data dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import nats.errors
import orjson
import pytest

from bridge.embedded_nats import URL_FILE, EmbeddedNats
from tests.flow import wait_for_orders
from tests.harness import free_port
from tests.worker import Worker


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


async def test_a_client_without_the_credentials_is_refused(own_nats: EmbeddedNats) -> None:
    """Promise: a local process that cannot read the data dir cannot publish to the embedded
    server, nor delete its stream: the server asks for credentials generated at first start."""
    assert own_nats.url is not None
    for url in (
        _without_credentials(own_nats.url),
        own_nats.url.replace("@", "x@", 1),  # a wrong password
    ):
        with pytest.raises((nats.errors.Error, OSError)):
            await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    nc = await nats.connect(own_nats.url, allow_reconnect=False, connect_timeout=2)
    try:
        await nc.jetstream().account_info()
    finally:
        await nc.close()


async def test_the_secrets_are_private_and_survive_a_restart(tmp_path: Path) -> None:
    """Promise: the data dir is 0700 (an existing, wider one is narrowed), the files that hold
    the credentials are 0600, and a restart keeps them, so clients reconnect."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    server = EmbeddedNats(data, port=free_port())
    first = await asyncio.to_thread(server.start)
    try:
        assert _mode(data) == 0o700
        assert _mode(data / URL_FILE) == 0o600
        secrets = [path for path in data.iterdir() if path.is_file()]
        assert all(_mode(path) == 0o600 for path in secrets), {
            p.name: oct(_mode(p)) for p in secrets
        }
        assert _mode(data / "nats") & 0o077 == 0
        joined = EmbeddedNats(data)
        assert await asyncio.to_thread(joined.start) == first and not joined.owned
    finally:
        await asyncio.to_thread(server.stop)
    again = await asyncio.to_thread(server.start)
    try:
        assert again == first
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A data dir for a worker with both embedded servers. Not below pytest's folder, which is
    0700: as root, the embedded PostgreSQL's own user could not enter it."""
    parent = Path(tempfile.mkdtemp(prefix="orders-make-run-"))
    parent.chmod(0o755)
    try:
        yield parent / "data"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


async def test_make_run_defaults_publish_serve_and_log_no_password(service_dir: Path) -> None:
    """Promise: with both embedded servers (``make run``), ``python -m publisher`` needs no
    flags (it reads the URL, credentials included, from the service's data dir), the orders
    are served, and neither the service nor the publisher writes a password anywhere."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_URL")}
    worker = Worker(service_dir)
    worker.env = {key: value for key, value in worker.env.items() if not key.endswith("_URL")}
    with worker:
        await worker.wait_ready()
        published = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "publisher", "--count", "2", "--seed", "1401"],
            env={**env, "ORDERS_DATA_DIR": str(service_dir)},
            capture_output=True,
            timeout=60,
        )
        assert published.returncode == 0, published.stderr.decode()
        uids = published.stdout.decode().split()
        assert len(uids) == 2
        await wait_for_orders(worker, 2)
        status, body, _ = await worker.get(f"/orders/{uids[0]}")
        assert status == 200 and orjson.loads(body)["order_uid"] == uids[0]
        nats_password = urlsplit((service_dir / URL_FILE).read_text().strip()).password
        assert nats_password, "the embedded server's URL carries no credentials"
        postgres_password = (service_dir / "postgres.password").read_text().strip()
        output = published.stderr.decode() + published.stdout.decode()
        for password in (nats_password, postgres_password):
            assert password not in worker.log()
            assert password not in output
