"""The servers a benchmark runs against, a database and a stream of its own, and worker processes.

By default, as in the tests, an embedded PostgreSQL (pgserver, in a ``mkdtemp`` folder) and an
embedded nats-server with JetStream (on a free port); ``--database-url`` / ``--nats-url`` name
real ones instead. Every benchmark gets a fresh database and a stream of its own, and removes
them, and the processes it started, when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import nats
import nats.js.errors
import psycopg2
from psycopg2 import sql

from bridge.embedded_nats import EmbeddedNats
from bridge.jetstream import ensure_stream
from streams.config import redact
from streams.store import schema_sql

FAUST = Path(sys.executable).parent / "faust"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def with_database(url: str, name: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    """Every row of one query, on a connection of its own."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def memory_status(pid: int) -> dict[str, int]:
    """The Vm* lines of /proc/PID/status (VmRSS, VmHWM, ...) in bytes."""
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields = value.split()
        if name.startswith("Vm") and len(fields) == 2 and fields[1] == "kB":
            status[name] = int(fields[0]) * 1024
    return status


def _processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, CPU ticks of it and of its reaped children)."""
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        # After the command: state, ppid, ...; utime, stime, cutime, cstime are 12th to 15th.
        ticks = sum(int(value) for value in fields[11:15])
        found[int(entry.name)] = (int(fields[1]), ticks)
    return found


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent busy (/proc/stat: all but idle and iowait)."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq + steal


class CpuMeter:
    """How much of the machine's CPU processes outside the benchmark used since it was made.

    The benchmark's own processes are the roots (this process, the embedded servers) and all
    their descendants; a process that ended counts in its parent's reaped-children time.
    """

    def __init__(self, roots: list[int]) -> None:
        self._roots = roots
        self._started = time.monotonic()
        self._busy = _busy_ticks()
        self._own = self._own_ticks()

    def _own_ticks(self) -> int:
        processes = _processes()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in processes.items():
            children.setdefault(parent, []).append(pid)
        total, stack, seen = 0, [pid for pid in self._roots if pid in processes], set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += processes[pid][1]
            stack.extend(children.get(pid, []))
        return total

    def foreign_share(self) -> float:
        """The share of all cores' time used by other processes (0 = a quiet machine)."""
        elapsed = time.monotonic() - self._started
        capacity = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        foreign = (_busy_ticks() - self._busy) - (self._own_ticks() - self._own)
        return max(0.0, foreign / capacity) if capacity > 0 else 0.0


class Servers:
    """PostgreSQL and NATS for the whole run: embedded unless URLs are given."""

    def __init__(self, database_url: str | None, nats_url: str | None) -> None:
        self._database_url = database_url
        self._nats_url = nats_url
        self._pg_dir: Path | None = None
        self._pg: Any = None
        self._nats_dir: Path | None = None
        self._nats: EmbeddedNats | None = None
        self.admin_url = ""
        self.nats_url = ""

    def start(self) -> Servers:
        if self._database_url:
            self.admin_url = self._database_url
        else:
            from pgserver.postgres_server import get_server

            self._pg_dir = Path(tempfile.mkdtemp(prefix="orders-bench-pg-"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._pg = get_server(self._pg_dir, cleanup_mode="delete")
            self.admin_url = str(self._pg.get_uri("postgres"))
        if self._nats_url:
            self.nats_url = self._nats_url
        else:
            self._nats_dir = Path(tempfile.mkdtemp(prefix="orders-bench-nats-"))
            self._nats = EmbeddedNats(self._nats_dir, port=free_port())
            self.nats_url = self._nats.start()
        return self

    def stop(self) -> None:
        if self._nats is not None:
            self._nats.stop()
            self._nats = None
        if self._nats_dir is not None:
            shutil.rmtree(self._nats_dir, ignore_errors=True)
            self._nats_dir = None
        if self._pg is not None:
            self._pg.cleanup()
            self._pg = None
        if self._pg_dir is not None:
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None

    def __enter__(self) -> Servers:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def own_pids(self) -> list[int]:
        """This process and the embedded servers' main processes (their roots)."""
        pids = [os.getpid()]
        if self._pg is not None:
            with contextlib.suppress(Exception):
                pids.append(int(self._pg.get_pid()))
        if self._nats is not None and self._nats._process is not None:
            pids.append(self._nats._process.pid)
        return pids

    def cpu_meter(self) -> CpuMeter:
        """A meter of the CPU others use from now on."""
        return CpuMeter(self.own_pids())

    def describe(self) -> dict[str, str]:
        """Which servers these are, for the report (passwords hidden)."""
        postgres = (
            f"given: {redact(self.admin_url)}"
            if self._database_url
            else "embedded (pgserver), Unix socket, in a mkdtemp folder"
        )
        nats_server = (
            f"given: {redact(self.nats_url)}"
            if self._nats_url
            else "embedded nats-server with JetStream (file store, mkdtemp) at"
            f" {redact(self.nats_url)}"
        )
        return {"postgres": postgres, "nats": nats_server}

    def postgres_version(self) -> str:
        ((version,),) = query(self.admin_url, "SHOW server_version")
        return str(version)

    async def nats_version(self) -> str:
        nc = await nats.connect(self.nats_url)
        try:
            version = nc.connected_server_version
            return f"{version.major}.{version.minor}.{version.patch}"
        finally:
            await nc.close()


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new database with the service's schema applied; dropped afterwards.

    A CHECKPOINT first (best effort: it needs a privileged role), so that a timed phase does
    not pay for writing out the dirty pages of the phase before it: without it the ingest
    ceiling of the same 200,000 orders varied between 20,000 and 28,000 orders/s.
    """
    name = f"orders_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = with_database(admin_url, name)
        conn = psycopg2.connect(url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(schema_sql())
        finally:
            conn.close()
        with admin.cursor() as cur, contextlib.suppress(psycopg2.Error):
            cur.execute("CHECKPOINT")
        yield url
        with admin.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


class Route:
    """One benchmark's own stream, subjects and durable consumer on the NATS server."""

    def __init__(self, nats_url: str) -> None:
        name = uuid.uuid4().hex[:10]
        self.nats_url = nats_url
        self.stream = f"BENCH{name}"
        self.subjects = f"bench{name}.>"
        self.subject = f"bench{name}.new"
        self.durable = f"w{name}"

    def env(self) -> dict[str, str]:
        """The worker's settings that point it at this route."""
        return {
            "ORDERS_NATS_URL": self.nats_url,
            "ORDERS_NATS_STREAM": self.stream,
            "ORDERS_NATS_SUBJECT": self.subjects,
            "ORDERS_NATS_DURABLE": self.durable,
        }

    async def create(self) -> None:
        """The stream as the service creates it (the same function)."""
        nc = await nats.connect(self.nats_url)
        try:
            await ensure_stream(nc.jetstream(), self.stream, [self.subjects])
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


class WorkerProcess:
    """``faust -A streams.app worker`` with the given settings, optionally pinned with taskset.

    Its log goes to ``data_dir/worker.log``. ``started_at`` is ``time.perf_counter()`` just
    before the process is spawned.
    """

    def __init__(self, data_dir: Path, env: Mapping[str, str], *, cpus: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ORDERS_")}
        self.env = {
            **inherited,
            "ORDERS_DATA_DIR": str(data_dir),
            "ORDERS_WEB_HOST": "127.0.0.1",
            "ORDERS_WEB_PORT": str(self.port),
            **env,
        }
        pin = ["taskset", "-c", cpus] if cpus else []
        self.command = [*pin, str(FAUST), "-A", "streams.app", "worker", "-l", "info"]
        self.log_path = data_dir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.answered_at = 0.0
        self.stop_seconds = 0.0
        self.killed = False
        self.pid_seen = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.data_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid_seen = self.process.pid
        return self

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{self.log_tail()}")

    async def wait_ready(self, timeout: float = 300.0, every: float = 0.02) -> dict[str, Any]:
        """Poll /readyz until it answers 200; return its body. ``ready_at`` is when it did,
        ``answered_at`` when the web server first answered at all."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.base + "/readyz") as response:
                        if not self.answered_at:
                            self.answered_at = time.perf_counter()
                        if response.status == 200:
                            self.ready_at = time.perf_counter()
                            body: dict[str, Any] = await response.json()
                            return body
                await asyncio.sleep(every)
        raise RuntimeError(f"the worker was not ready within {timeout} s:\n{self.log_tail()}")

    async def wait_logged(self, text: str, timeout: float = 60.0) -> None:
        """Until the worker's log holds ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"not logged within {timeout} s: {text}\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    def status(self) -> dict[str, int]:
        """Its memory figures from /proc (VmRSS, VmHWM, ...), in bytes."""
        return memory_status(self.pid)

    async def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples, by name with labels."""
        async with aiohttp.ClientSession() as http, http.get(self.base + "/metrics") as response:
            text = await response.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
        return values

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self) -> str:
        return self.log()[-4000:]

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM, as an operator stops it; SIGKILL if it does not end in time."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            self.killed = True
        self.stop_seconds = time.perf_counter() - started


@contextlib.asynccontextmanager
async def running_worker(
    data_dir: Path, env: Mapping[str, str], *, cpus: str | None = None
) -> AsyncIterator[WorkerProcess]:
    """A started worker, stopped on the way out whatever happens."""
    worker = WorkerProcess(data_dir, env, cpus=cpus).start()
    try:
        yield worker
    finally:
        await asyncio.to_thread(worker.stop)
        if worker.killed:
            kept = Path(tempfile.gettempdir()) / f"orders-bench-killed-{worker.pid_seen}.log"
            shutil.copyfile(worker.log_path, kept)
            print(
                f"warning: the worker did not stop on SIGTERM within 40 s and was killed;"
                f" its log is kept in {kept}",
                file=sys.stderr,
            )


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"orders-bench-{prefix}-"))
