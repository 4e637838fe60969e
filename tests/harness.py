"""What the tests and the benchmarks both run on: free ports, embedded servers, a fresh database,
a stream of one's own, and the worker's metrics read as Prometheus reads them.

Embedded servers live in ``mkdtemp`` folders rather than pytest's temporary ones, which another
pytest run may prune while this one still uses them.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.js.errors
import psycopg2
from prometheus_client.parser import text_string_to_metric_families
from psycopg2 import sql

from bridge.embedded_nats import EmbeddedNats
from bridge.jetstream import ensure_stream
from publisher.messages import Message
from publisher.publish import publish

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def end_process(
    process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0
) -> int | None:
    """Send ``sig`` unless the process has ended, and wait up to ``timeout`` seconds for it;
    past that, SIGKILL. Returns its exit code, or None when it had to be killed."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def with_database(url: str, name: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database(admin_url: str, name: str) -> str:
    """A new, empty database on the server of ``admin_url``; returns its URL."""
    _run_autocommit(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(admin_url, name)


@contextlib.contextmanager
def fresh_database(admin_url: str, prefix: str = "orders_test") -> Iterator[str]:
    """A new, empty database of its own (``prefix_<random>``); dropped afterwards, whoever is
    still connected to it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = create_database(admin_url, name)
    try:
        yield url
    finally:
        drop = sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
        _run_autocommit(admin_url, drop)


def _run_autocommit(dsn: str, statement: sql.Composable) -> None:
    # CREATE and DROP DATABASE refuse to run inside a transaction.
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


class EmbeddedPostgres:
    """A PostgreSQL server (pgserver) in a ``mkdtemp`` folder, listening on a Unix socket there.

    As root, pgserver runs postgres as the system user ``pgserver``. ``close`` stops it and
    removes the folder; if nobody does, the end of the process stops it and removes its data.
    """

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}-pg-"))
        with warnings.catch_warnings():
            # pgserver warns, as it is imported, that XDG_RUNTIME_DIR is unset, which changes
            # nothing here. Imported here, so that a benchmark given the URLs of servers of its
            # own runs without the embedded extra.
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server

            self.server: PostgresServer = get_server(self.root / "pg", cleanup_mode="delete")
        self.admin_url: str = self.server.get_uri("postgres")

    def url(self, database: str) -> str:
        """The URL of one database on this server."""
        return with_database(self.admin_url, database)

    def pid(self) -> int | None:
        """The postmaster's pid (pg_ctl starts it outside this process's tree)."""
        pid: int | None = self.server.get_pid()
        return pid

    def close(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def embedded_nats(prefix: str) -> Iterator[str]:
    """A nats-server with JetStream on a free port, its store in a ``mkdtemp`` folder; yields
    its URL (credentials included), stops it and removes the folder afterwards.

    The server is a child of this process, so its CPU time counts as this process's tree."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-nats-"))
    server = EmbeddedNats(data_dir, port=free_port())
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


class Route:
    """A stream, subjects and durable consumer of one's own on a NATS server: a worker reads
    ``t<name>.>`` through ``w<name>`` on stream ``T<name>``; publish to ``t<name>.new``."""

    def __init__(self, nats_url: str, name: str | None = None) -> None:
        self.name = name or uuid.uuid4().hex[:10]
        self.nats_url = nats_url
        self.stream = f"T{self.name}"
        self.subjects = f"t{self.name}.>"
        self.subject = f"t{self.name}.new"
        self.durable = f"w{self.name}"

    def env(self, database_url: str) -> dict[str, str]:
        """A worker's settings for this route and the given database."""
        return {
            "ORDERS_DATABASE_URL": database_url,
            "ORDERS_NATS_URL": self.nats_url,
            "ORDERS_NATS_STREAM": self.stream,
            "ORDERS_NATS_SUBJECT": self.subjects,
            "ORDERS_NATS_DURABLE": self.durable,
        }

    async def create(self) -> None:
        """The stream as the service creates it (the same function), so that what runs here
        runs on the stream production runs on."""
        nc = await nats.connect(self.nats_url)
        try:
            await ensure_stream(nc.jetstream(), self.stream, [self.subjects])
        finally:
            await nc.close()

    async def send(self, payloads: Iterable[bytes | Message]) -> None:
        """Create the stream if need be and publish ``payloads`` (bytes as they are, under a
        kind of ``invalid``), each acknowledged by JetStream."""
        await self.create()
        messages = [
            item if isinstance(item, Message) else Message(item, "invalid") for item in payloads
        ]
        nc = await nats.connect(self.nats_url)
        try:
            await publish(nc, self.subject, messages)
        finally:
            await nc.close()

    async def ack_floor_and_pending(self) -> tuple[int, int]:
        """The consumer's ack floor (a stream sequence) and how many deliveries await an ack."""
        nc = await nats.connect(self.nats_url)
        try:
            info = await nc.jetstream().consumer_info(self.stream, self.durable)
            assert info.ack_floor is not None and info.num_ack_pending is not None
            return info.ack_floor.stream_seq or 0, info.num_ack_pending
        finally:
            await nc.close()

    async def delete(self) -> None:
        """Remove the stream and what it stored."""
        nc = await nats.connect(self.nats_url)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(self.stream)
        finally:
            await nc.close()


def worker_env(database_url: str, nats_url: str, name: str | None = None) -> dict[str, str]:
    """A worker's settings for a route of its own (see :class:`Route`) and the given database."""
    return Route(nats_url, name).env(database_url)


def metric_key(name: str, **labels: str) -> str:
    """How :func:`parse_metrics` names a sample: ``name`` or ``name{a=1,b=2}``, labels sorted."""
    listed = ",".join(f"{key}={value}" for key, value in sorted(labels.items()))
    return f"{name}{{{listed}}}" if listed else name


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus scrape, by :func:`metric_key`."""
    return {
        metric_key(sample.name, **sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
