"""The servers a benchmark runs against, a database and a stream of its own, worker processes,
and what the machine's other processes take from it meanwhile.

By default, as in the tests, an embedded PostgreSQL (pgserver) and an embedded nats-server with
JetStream (on a free port), from tests/harness.py; ``--database-url`` / ``--nats-url`` name
real ones instead. Every benchmark gets a fresh database and a stream of its own, and removes
them, and the processes it started, when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import nats
import psycopg2

from streams.config import redact
from streams.store import schema_sql
from tests import harness
from tests.worker import Worker, WorkerDidNotStop

ROOT = Path(__file__).resolve().parent.parent
# How long a worker may take to restore its view, and how finely its ready time is taken.
READY_TIMEOUT_S: Final = 300.0
READY_POLL_S: Final = 0.02
STOP_TIMEOUT_S: Final = 40.0


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


def _tree_ticks(processes: dict[int, tuple[int, int]], roots: list[int]) -> int:
    """CPU ticks of ``roots`` and all their descendants (reaped ones included)."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    total, stack, seen = 0, [pid for pid in roots if pid in processes], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += processes[pid][1]
        stack.extend(children.get(pid, []))
    return total


def _own_ticks() -> int:
    """CPU ticks of this process alone, without its children."""
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def child_named(name: str) -> int | None:
    """The pid of this process's child whose command is ``name``, if there is one."""
    me = os.getpid()
    for pid, (parent, _) in _processes().items():
        if parent == me:
            with contextlib.suppress(OSError):
                if (Path("/proc") / str(pid) / "comm").read_text().strip() == name:
                    return pid
    return None


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
        return _tree_ticks(_processes(), self._roots)

    def foreign_share(self) -> float:
        """The share of all cores' time used by other processes (0 = a quiet machine)."""
        elapsed = time.monotonic() - self._started
        capacity = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        foreign = (_busy_ticks() - self._busy) - (self._own_ticks() - self._own)
        return max(0.0, foreign / capacity) if capacity > 0 else 0.0


class RoleCpu:
    """CPU seconds each part of a figure used since this was made: each role is the process
    trees of its root pids; ``bench`` is this process alone (its children are roles of their
    own or ``other``); ``other`` is the rest of the machine's busy time."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self._roles = roles
        self._start = self._ticks()

    def _ticks(self) -> dict[str, int]:
        processes = _processes()
        ticks = {role: _tree_ticks(processes, roots) for role, roots in self._roles.items()}
        ticks["bench"] = _own_ticks()
        ticks["machine"] = _busy_ticks()
        return ticks

    def seconds(self) -> dict[str, float]:
        """CPU seconds by role (and ``other``) since this was made."""
        now = self._ticks()
        per_second = os.sysconf("SC_CLK_TCK")
        used = {role: (now[role] - self._start[role]) / per_second for role in now}
        machine = used.pop("machine")
        used["other"] = max(0.0, machine - sum(used.values()))
        return used


class Servers:
    """PostgreSQL and NATS for the whole run: embedded unless URLs are given."""

    def __init__(self, database_url: str | None, nats_url: str | None) -> None:
        self._database_url = database_url
        self._nats_url = nats_url
        self._pg: harness.EmbeddedPostgres | None = None
        self._nats: contextlib.ExitStack | None = None
        self.admin_url = ""
        self.nats_url = ""

    def start(self) -> Servers:
        if self._database_url:
            self.admin_url = self._database_url
        else:
            self._pg = harness.EmbeddedPostgres("orders-bench")
            self.admin_url = self._pg.admin_url
        if self._nats_url:
            self.nats_url = self._nats_url
        else:
            self._nats = contextlib.ExitStack()
            self.nats_url = self._nats.enter_context(harness.embedded_nats("orders-bench"))
        return self

    def stop(self) -> None:
        if self._nats is not None:
            self._nats.close()
            self._nats = None
        if self._pg is not None:
            self._pg.close()
            self._pg = None

    def __enter__(self) -> Servers:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def own_pids(self) -> list[int]:
        """The roots of the benchmark's own processes: this one (the embedded nats-server, the
        workers, wrk and hey are its children) and the embedded postmaster, which pg_ctl
        starts outside this process's tree."""
        pids = [os.getpid()]
        if self._pg is not None:
            with contextlib.suppress(Exception):
                postmaster = self._pg.pid()
                if postmaster is not None:
                    pids.append(postmaster)
        return pids

    def server_pids(self) -> dict[str, list[int]]:
        """The embedded servers' root pids by name (none for a server given by URL)."""
        pids: dict[str, list[int]] = {}
        if self._pg is not None:
            postmaster = self._pg.pid()
            if postmaster is not None:
                pids["postgres"] = [postmaster]
        if self._nats is not None:
            nats = child_named("nats-server")
            if nats is not None:
                pids["nats-server"] = [nats]
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
    with harness.fresh_database(admin_url, "orders_bench") as url:
        conn = psycopg2.connect(url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(schema_sql())
        finally:
            conn.close()
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cur, contextlib.suppress(psycopg2.Error):
                cur.execute("CHECKPOINT")
        finally:
            admin.close()
        yield url


async def ready(worker: Worker, timeout: float = READY_TIMEOUT_S) -> dict[str, object]:
    """Until the worker answers /readyz 200 (its body); ``worker.ready_at`` says when."""
    return await worker.wait_ready(timeout, every=READY_POLL_S)


@contextlib.asynccontextmanager
async def running_worker(
    data_dir: Path, env: Mapping[str, str], *, cpus: str | None = None
) -> AsyncIterator[Worker]:
    """A started worker, stopped on the way out whatever happens: SIGTERM, as an operator stops
    it, and SIGKILL if it does not end in time (its log is then kept, and said where)."""
    worker = Worker(data_dir, cpus=cpus, **env).start()
    pid = worker.pid
    try:
        yield worker
    finally:
        try:
            await asyncio.to_thread(worker.stop, STOP_TIMEOUT_S)
        except WorkerDidNotStop:
            kept = Path(tempfile.gettempdir()) / f"orders-bench-killed-{pid}.log"
            shutil.copyfile(worker.log_path, kept)
            print(
                f"warning: the worker did not stop on SIGTERM within {STOP_TIMEOUT_S:.0f} s"
                f" and was killed; its log is kept in {kept}",
                file=sys.stderr,
            )


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder (the caller removes it)."""
    return Path(tempfile.mkdtemp(prefix=f"orders-bench-{prefix}-"))
