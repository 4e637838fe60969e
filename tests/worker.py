"""A real worker process (``faust -A streams.app worker``) for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import aiohttp

FAUST = str(Path(sys.executable).parent / "faust")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float = 120.0,
    context: Callable[[], str] | None = None,
) -> None:
    """Poll ``check`` until it holds; fail saying ``what`` did not happen, with ``context()``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            detail = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"not within {timeout} s: {what}{detail}")
        await asyncio.sleep(0.05)


async def view_size(worker: Worker) -> int:
    """How many orders the worker's view holds (waits for it to be ready)."""
    size = (await worker.wait_ready())["orders"]
    assert isinstance(size, int)
    return size


def worker_env(database_url: str, nats_url: str, name: str | None = None) -> dict[str, str]:
    """A worker on the test's own database and its own stream, consumer and subjects
    (``t<name>.>``; publish to ``t<name>.new``)."""
    name = name or uuid.uuid4().hex[:10]
    return {
        "ORDERS_DATABASE_URL": database_url,
        "ORDERS_NATS_URL": nats_url,
        "ORDERS_NATS_STREAM": f"T{name}",
        "ORDERS_NATS_SUBJECT": f"t{name}.>",
        "ORDERS_NATS_DURABLE": f"w{name}",
    }


class Worker:
    """Runs the service with the given environment; its log goes to ``data_dir/worker.log``."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ,
            "ORDERS_DATA_DIR": str(data_dir),
            "ORDERS_WEB_PORT": str(self.port),
            "ORDERS_WEB_HOST": "127.0.0.1",
            **env,
        }
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [FAUST, "-A", "streams.app", "worker", "-l", "info"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    async def wait_alive(self, timeout: float = 60.0) -> None:
        """Poll /healthz until the web server answers."""
        await self._wait_for("/healthz", timeout)

    async def wait_ready(self, timeout: float = 60.0) -> dict[str, object]:
        """Poll /readyz until it answers 200; fail with the worker's log otherwise."""
        return await self._wait_for("/readyz", timeout)

    async def _wait_for(self, path: str, timeout: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, self.log_tail()
                try:
                    async with http.get(self.base + path) as response:
                        if response.status == 200:
                            body: dict[str, object] = await response.json()
                            return body
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"worker not ready within {timeout} s:\n{self.log_tail()}")

    async def get(self, path: str) -> tuple[int, bytes, str]:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            return response.status, await response.read(), response.content_type

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an operator or an orchestrator stops it; returns the exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: no chance to finish anything."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"worker did not stop within {timeout} s:\n{self.log_tail()}"
            ) from None

    def log(self) -> str:
        """Everything the worker wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"

    def log_tail(self) -> str:
        """The end of the log, for failure messages."""
        return self.log()[-6000:]

    def __enter__(self) -> Worker:
        return self if self.process is not None else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            self.kill()
