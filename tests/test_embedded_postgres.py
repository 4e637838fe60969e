"""The embedded PostgreSQL a new user gets with ``make run``: its data and socket in folders
only its users can enter, no folder around them widened, and no connection without the
password. Each test starts the server the way the service does, in a process of its own
whose exit stops it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg2
import pytest

START = """
import sys
import tempfile
from pathlib import Path
from streams.embedded_postgres import start_embedded_postgres
print(start_embedded_postgres(Path(sys.argv[1])), flush=True)
sys.stdin.read()
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def embedded(data_dir: Path) -> Iterator[str]:
    """The service's embedded PostgreSQL in ``data_dir``; yields its URL; stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, "-c", START, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        url = process.stdout.readline().decode().strip()
        if not url:
            raise AssertionError(process.communicate(timeout=60)[1].decode()[-3000:])
        yield url
    finally:
        process.stdin.close()
        process.wait(60)


def _socket_dir(url: str) -> Path:
    (host,) = parse_qs(urlsplit(url).query)["host"]
    return Path(host)


def _connect_without_the_password(url: str, password: str | None = None) -> None:
    """The same socket, user and database, with no password file (and ``password``, if any)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    psycopg2.connect(
        host=query["host"][0],
        port=query.get("port", ["5432"])[0],
        user=parts.username or "postgres",
        dbname=parts.path.lstrip("/"),
        password=password,
        passfile="/nonexistent",
        connect_timeout=5,
    ).close()


@pytest.fixture
def parent() -> Iterator[Path]:
    """A folder others may traverse but not list (0711), as a home folder often is."""
    # Not below pytest's own folder, which is 0700: as root, the server's user could not enter.
    folder = Path(tempfile.mkdtemp(prefix="orders-embedded-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_data_and_socket_are_private_and_no_folder_is_widened(parent: Path) -> None:
    """Promise: the embedded server's data and socket folders are 0700, the service's data dir
    gives others no right, and the folders above keep the modes their owner chose."""
    data = parent / "data"
    with embedded(data) as url:
        socket_dir = _socket_dir(url)
        assert _mode(parent) == 0o711, f"{parent} widened to {oct(_mode(parent))}"
        assert _mode(data) & 0o077 in (0, 0o010), oct(_mode(data))
        assert _mode(data / "postgres") == 0o700
        assert _mode(socket_dir) == 0o700, f"socket folder {socket_dir} is {oct(_mode(socket_dir))}"
        for path in data.iterdir():
            if path.is_file():
                assert _mode(path) == 0o600, f"{path} is {oct(_mode(path))}"


def test_a_socket_path_too_long_goes_to_a_private_folder(parent: Path) -> None:
    """Promise: when the data dir's path is too long for a Unix socket, the socket moves to a
    folder of its own, 0700, not to a shared one where any local user could connect."""
    data = parent / ("d" * 60) / ("e" * 40)
    with embedded(data) as url:
        socket_dir = _socket_dir(url)
        assert not str(socket_dir).startswith(str(data))
        assert _mode(socket_dir) == 0o700, f"socket folder {socket_dir} is {oct(_mode(socket_dir))}"
        for folder in socket_dir.parents:
            if folder.parent == folder:
                break
            mode = _mode(folder)
            assert mode & stat.S_ISVTX or not mode & 0o002, f"{folder} is {oct(mode)}"
        assert _mode(parent) == 0o711


def test_no_connection_without_the_password(parent: Path) -> None:
    """Promise: the server does not trust anyone: no TCP listener, and every rule of its
    pg_hba.conf asks for the password, which only the service's user can read."""
    with embedded(parent / "data") as url:
        with pytest.raises(psycopg2.OperationalError, match="password"):
            _connect_without_the_password(url)
        with pytest.raises(psycopg2.OperationalError, match="password"):
            _connect_without_the_password(url, "wrong")
        conn = psycopg2.connect(url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW listen_addresses")
                assert cur.fetchone() == ("",)
                cur.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules")
                assert cur.fetchall() == [("scram-sha-256",)]
        finally:
            conn.close()
        assert urlsplit(url).password is None, "the URL, which the service logs, holds the password"


def test_a_closed_folder_above_is_left_closed(parent: Path) -> None:
    """Promise: a folder above the data dir that only its owner may enter (0700) stays so. As
    root, where PostgreSQL runs as a user of its own that cannot enter it, the start is refused
    with an error naming the folder; as any other user the server starts."""
    closed = parent / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    result = subprocess.run(
        [sys.executable, "-c", START, str(closed / "data")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    if os.geteuid() == 0:
        assert result.returncode != 0, result.stdout
        assert str(closed) in result.stderr.decode(), result.stderr.decode()[-2000:]
    else:
        assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert _mode(closed) == 0o700, f"{closed} widened to {oct(_mode(closed))}"


def _refuses_without_the_password_and_serves_with_it(url: str) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password"):
        _connect_without_the_password(url)
    psycopg2.connect(url, connect_timeout=5).close()


def test_a_restart_keeps_the_password(parent: Path) -> None:
    """Promise: the second start finds the cluster and the password of the first."""
    data = parent / "data"
    with embedded(data) as first:
        _refuses_without_the_password_and_serves_with_it(first)
    with embedded(data) as second:
        assert second == first
        _refuses_without_the_password_and_serves_with_it(second)


def test_a_cluster_that_trusted_everyone_gets_a_password(parent: Path) -> None:
    """Promise: a data dir made by an earlier version (pgserver's own start, which trusts every
    connection) asks for the password from its next start on."""
    data = parent / "data"
    data.mkdir()
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pgserver.postgres_server import get_server;"
            " get_server(sys.argv[1], cleanup_mode='stop')",
            str(data / "postgres"),
        ],
        capture_output=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr.decode()[-2000:]
    with embedded(data) as url:
        _refuses_without_the_password_and_serves_with_it(url)
