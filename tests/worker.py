"""A real worker process (``faust -A streams.app worker``), for end-to-end tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import aiohttp

from tests.harness import end_process, free_port, parse_metrics

FAUST = str(Path(sys.executable).parent / "faust")


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


class WorkerDidNotStop(AssertionError):
    """The worker outlived its stop's timeout and was killed."""


class Worker:
    """Runs the service with the given settings, optionally pinned to ``cpus`` with taskset.

    It runs in ``data_dir`` and logs to ``data_dir/worker.log``. Of this process's environment
    it inherits all but the ``ORDERS_`` settings, so that a developer's shell does not change
    what a test or a benchmark runs; ``ORDERS_WEB_DRIVER`` alone is passed on, since the
    ``web_driver`` fixture chooses the driver that way for every worker of its test.
    ``started_at`` is ``time.perf_counter()`` just before the process is spawned;
    :meth:`wait_ready` sets ``answered_at`` (the web server's first answer) and ``ready_at``
    (the first 200).
    """

    def __init__(self, data_dir: Path, *, cpus: str | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ORDERS_") or k == "ORDERS_WEB_DRIVER"
        }
        self.env = {
            **inherited,
            "ORDERS_DATA_DIR": str(data_dir),
            "ORDERS_WEB_PORT": str(self.port),
            "ORDERS_WEB_HOST": "127.0.0.1",
            **env,
        }
        pin = ["taskset", "-c", cpus] if cpus else []
        self.command = [*pin, FAUST, "-A", "streams.app", "worker", "-l", "info"]
        self.cwd = data_dir
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.answered_at = 0.0
        self.ready_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None, "the worker is not running"
        return self.process.pid

    def start(self) -> Worker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def check_alive(self) -> None:
        """Fail, with the end of its log, unless the worker is running."""
        assert self.process is not None and self.process.poll() is None, (
            f"the worker exited:\n{self.log_tail()}"
        )

    async def wait_alive(self, timeout: float = 60.0) -> None:
        """Poll /healthz until the web server answers."""
        await self._wait_for("/healthz", timeout, 0.1)

    async def wait_ready(self, timeout: float = 60.0, every: float = 0.1) -> dict[str, object]:
        """Poll /readyz every ``every`` seconds until it answers 200; return its body. Fail
        with the worker's log if it is not ready in time."""
        return await self._wait_for("/readyz", timeout, every)

    async def _wait_for(self, path: str, timeout: float, every: float) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    async with http.get(self.base + path) as response:
                        if not self.answered_at:
                            self.answered_at = time.perf_counter()
                        if response.status == 200:
                            self.ready_at = time.perf_counter()
                            body: dict[str, object] = await response.json()
                            return body
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(every)
        raise AssertionError(f"worker not ready within {timeout} s:\n{self.log_tail()}")

    async def wait_logged(self, text: str, timeout: float = 60.0) -> None:
        """Until the worker's log holds ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"not logged within {timeout} s: {text}\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    async def get(self, path: str) -> tuple[int, bytes, str]:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            return response.status, await response.read(), response.content_type

    async def metrics(self) -> dict[str, float]:
        """The worker's /metrics, as :func:`tests.harness.parse_metrics` keys them."""
        status, body, _ = await self.get("/metrics")
        assert status == 200, body[:200]
        return parse_metrics(body.decode())

    def memory(self) -> dict[str, int]:
        """The Vm* lines of its /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
        status: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields = value.split()
            if name.startswith("Vm") and len(fields) == 2 and fields[1] == "kB":
                status[name] = int(fields[0]) * 1024
        return status

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as an operator or an orchestrator stops it; returns the exit code. Past
        ``timeout`` it is killed and :class:`WorkerDidNotStop` raised."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: no chance to finish anything."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> int:
        process, self.process = self.process, None
        if process is None:
            return 0
        code = end_process(process, sig, timeout)
        if code is None:
            raise WorkerDidNotStop(f"worker did not stop within {timeout} s:\n{self.log_tail()}")
        return code

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
