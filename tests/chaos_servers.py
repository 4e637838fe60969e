"""What the fault-injection suite needs beside tests/harness.py and tests/worker.py: sizes, servers
of a test's own that can be stopped and started, a publisher that outlives a NATS outage, the
audit every fault ends with, and a place for the figures.

Sizes are bounded (the run inside ``make test``) unless ``ORDERS_CHAOS=full`` (``make chaos``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

import aiohttp
import nats
import nats.errors
import nats.js.errors
import orjson
import psycopg2
import pytest
from nats.js.api import Header
from pgserver._commands import POSTGRES_BIN_PATH

from bridge.jetstream import ensure_stream
from publisher.generate import OrderFactory
from publisher.messages import Message, generated_messages
from tests.database import InspectedStore
from tests.harness import EmbeddedPostgres, Route, create_database
from tests.worker import Worker, eventually

T = TypeVar("T")

FULL: Final = os.environ.get("ORDERS_CHAOS", "").strip().lower() == "full"
REPORT: Final = os.environ.get("ORDERS_CHAOS_REPORT", "").strip()

chaos = pytest.mark.chaos


def sized(bounded: T, full: T) -> T:
    """The bounded figure inside ``make test``, the full one under ``ORDERS_CHAOS=full``."""
    return full if FULL else bounded


# ---------------------------------------------------------------------------------------------
# Figures


class Figures:
    """Prints one line of figures per measurement, past pytest's capture, and appends it as JSON
    to ``ORDERS_CHAOS_REPORT`` when that is set (``make chaos`` sets it)."""

    def __init__(self, test: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.test = test
        self._capsys = capsys

    def record(self, **figures: object) -> None:
        line = " ".join(f"{key}={_show(value)}" for key, value in figures.items())
        with self._capsys.disabled():
            print(f"\n[chaos] {self.test}: {line}", flush=True)
        if REPORT:
            path = Path(REPORT)
            path.parent.mkdir(parents=True, exist_ok=True)
            entry = {
                "test": self.test,
                "mode": "full" if FULL else "bounded",
                "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "machine": machine(),
                **figures,
            }
            with path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry, default=str) + "\n")


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {system}"


# ---------------------------------------------------------------------------------------------
# Messages and publishing


@dataclasses.dataclass
class Published:
    """What a run got JetStream to store: valid orders by uid (every payload sent for it, in
    order), the invalid messages, and each message's stream sequence."""

    valid: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    invalid: list[bytes] = dataclasses.field(default_factory=list)
    sequences: list[int] = dataclasses.field(default_factory=list)
    retries: int = 0
    seconds: float = 0.0

    @property
    def messages(self) -> int:
        return len(self.sequences)

    def extend(self, other: Published) -> None:
        """Add what another run published on the same stream."""
        for uid, payloads in other.valid.items():
            self.valid.setdefault(uid, []).extend(payloads)
        self.invalid += other.invalid
        self.sequences += other.sequences
        self.retries += other.retries
        self.seconds += other.seconds

    def add(self, message: Message, sequence: int) -> None:
        self.sequences.append(sequence)
        if message.kind == "invalid":
            self.invalid.append(message.data)
        else:
            assert message.uid is not None
            self.valid.setdefault(message.uid, []).append(message.data)


def chaos_messages(
    count: int, seed: int, *, invalid: float = 0.02, duplicates: float = 0.02
) -> list[Message]:
    """Fresh orders with a share of malformed messages and of repeated uids (half of them with
    another payload), as the publisher's ``--invalid`` and ``--duplicates`` make them."""
    factory = OrderFactory(seed=seed)
    return list(generated_messages(factory, count, duplicates=duplicates, invalid=invalid))


def message_id(message: Message, index: int, run: str) -> str:
    """A Nats-Msg-Id for every message, so that a publish retried after an outage is stored
    once by JetStream: the uid for a first publication, the run and position for the others."""
    if message.kind == "order" and message.uid is not None:
        return message.uid
    return f"{message.kind}-{run}-{index}"


async def publish_steadily(
    route: Route,
    messages: Sequence[Message],
    *,
    rate: float | None = None,
    deadline_s: float = 180.0,
) -> Published:
    """Publish every message at ``rate`` per second (``None``: as fast as acked), each with a
    Nats-Msg-Id, retrying what is not acknowledged (a NATS outage) until JetStream stores it.

    Returns what was stored, with the stream sequence of each message, in publishing order.
    """
    published = Published()
    run = uuid.uuid4().hex[:12]
    nc = await nats.connect(
        route.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2
    )
    started = time.monotonic()
    try:
        js = nc.jetstream()
        await _retrying(lambda: ensure_stream(js, route.stream, [f"t{route.name}.>"]))
        chunk = 200 if rate is None else max(1, int(rate / 20))
        sent = 0
        while sent < len(messages):
            if rate is not None:
                due = int((time.monotonic() - started) * rate) + 1
                if due <= sent:
                    await asyncio.sleep(min(0.05, (sent + 1 - due) / rate + 0.001))
                    continue
                upto = min(len(messages), due, sent + chunk)
            else:
                upto = min(len(messages), sent + chunk)
            batch = [(index, messages[index]) for index in range(sent, upto)]
            acked = await _publish_until_acked(
                js, route.subject, batch, run, started + deadline_s, published
            )
            for index, message in batch:
                published.add(message, acked[index])
            sent = upto
    finally:
        published.seconds = time.monotonic() - started
        with contextlib.suppress(nats.errors.Error, OSError):
            await nc.close()
    return published


async def _publish_until_acked(
    js: nats.js.JetStreamContext,
    subject: str,
    batch: list[tuple[int, Message]],
    run: str,
    deadline: float,
    published: Published,
) -> dict[int, int]:
    acked: dict[int, int] = {}
    while True:
        todo = [(index, message) for index, message in batch if index not in acked]
        results = await asyncio.gather(
            *(
                js.publish(
                    subject,
                    message.data,
                    timeout=2.0,
                    headers={Header.MSG_ID.value: message_id(message, index, run)},
                )
                for index, message in todo
            ),
            return_exceptions=True,
        )
        failed = 0
        for (index, _), result in zip(todo, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, nats.errors.Error | nats.js.errors.Error | OSError):
                    raise result
                failed += 1
            else:
                acked[index] = result.seq
        if not failed:
            return acked
        published.retries += failed
        if time.monotonic() > deadline:
            raise AssertionError(f"{failed} messages still not stored by JetStream")
        await asyncio.sleep(0.2)


async def _retrying(make: Callable[[], Awaitable[object]], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            await make()
            return
        except (nats.errors.Error, nats.js.errors.Error, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Observing a worker and the consumer


@dataclasses.dataclass(frozen=True)
class ConsumerState:
    last_seq: int  # the stream's last sequence
    ack_floor: int
    ack_pending: int
    pending: int
    deliveries: int  # every delivery, redeliveries included (the consumer sequence)

    @property
    def redeliveries(self) -> int:
        return max(0, self.deliveries - self.last_seq)

    @property
    def drained(self) -> bool:
        return self.ack_floor == self.last_seq and self.ack_pending == 0 and self.pending == 0


async def consumer_state(route: Route) -> ConsumerState:
    """The durable consumer of the route as JetStream reports it."""
    nc = await nats.connect(route.nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        info = await js.consumer_info(route.stream, route.durable)
        stream_info = await js.stream_info(route.stream)
    finally:
        await nc.close()
    return ConsumerState(
        last_seq=stream_info.state.last_seq,
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0,
        ack_pending=info.num_ack_pending or 0,
        pending=info.num_pending or 0,
        deliveries=info.delivered.consumer_seq if info.delivered else 0,
    )


def first_metric(values: dict[str, float], *names: str) -> float | None:
    """The first of ``names`` the worker exports (for figures that are reported, not
    asserted: a renamed metric must not fail a fault test)."""
    for name in names:
        if name in values:
            return values[name]
    return None


def rss_mib(worker: Worker) -> float:
    """The worker's resident set size, from /proc."""
    return worker.memory()["VmRSS"] / 2**20


async def orders_served(worker: Worker) -> int:
    """How many orders the worker's /readyz counts, -1 while it is not ready."""
    status, body, _ = await worker.get("/readyz")
    detail = orjson.loads(body)
    assert isinstance(detail, dict)
    return int(detail["orders"]) if status == 200 else -1


# ---------------------------------------------------------------------------------------------
# The audit


async def wait_settled(
    store: InspectedStore,
    route: Route,
    published: Published,
    workers: Sequence[Worker] = (),
    timeout: float = 180.0,
) -> ConsumerState:
    """Until every message is acked, the log holds every valid uid and the dead letters every
    invalid message (whatever the audit then finds in them)."""
    state: ConsumerState | None = None

    async def done() -> bool:
        nonlocal state
        for worker in workers:
            worker.check_alive()
        state = await consumer_state(route)
        if not state.drained or state.last_seq < max(published.sequences, default=0):
            return False
        ((events, letters),) = await store.fetch(
            "SELECT (SELECT count(*) FROM orders_events),"
            " (SELECT count(*) FROM orders_dead_letters)"
        )
        return events == len(published.valid) and letters == len(published.invalid)

    def context() -> str:
        logs = "\n".join(worker.log_tail()[-3000:] for worker in workers)
        return f"consumer: {state}\n{logs}"

    await eventually(done, "every message acked and committed", timeout, context)
    assert state is not None
    return state


@dataclasses.dataclass(frozen=True)
class AuditReport:
    events: int
    dead_letters: int
    served_checked: int
    served_byte_for_byte: int

    def figures(self) -> dict[str, int]:
        return dataclasses.asdict(self)


async def audit(
    store: InspectedStore,
    published: Published,
    workers: Sequence[Worker],
    *,
    serve_all: bool = True,
) -> AuditReport:
    """The promise, checked in full: every published valid order_uid is in ``orders_events``
    exactly once with one of the payloads published for it, nothing else is; every invalid
    message is in ``orders_dead_letters`` once with a reason; and each worker's view is the log
    (``/readyz`` count and head, and ``GET /orders/{uid}`` for every uid, or a sample)."""
    rows = await store.fetch("SELECT seq, order_uid, payload::text FROM orders_events")
    uids = [str(uid) for _, uid, _ in rows]
    assert len(uids) == len(set(uids)), "an order_uid is in the log more than once"
    missing = set(published.valid) - set(uids)
    extra = set(uids) - set(published.valid)
    assert not missing, (
        f"{len(missing)} published orders are not in the log, e.g. {sorted(missing)[:3]}"
    )
    assert not extra, f"{len(extra)} orders in the log were never published: {sorted(extra)[:3]}"
    log: dict[str, object] = {}
    for _, uid, text in rows:
        stored = orjson.loads(str(text))
        sent = [orjson.loads(payload) for payload in published.valid[str(uid)]]
        assert stored in sent, f"{uid}: the stored payload is none of those published"
        log[str(uid)] = stored

    letters = await store.fetch("SELECT raw, reason, source FROM orders_dead_letters")
    assert len(letters) == len(published.invalid), (
        f"{len(letters)} dead letters for {len(published.invalid)} invalid messages"
    )
    assert sorted(bytes(raw) for raw, _, _ in letters) == sorted(published.invalid)  # type: ignore[call-overload]
    assert all(isinstance(reason, str) and reason.strip() for _, reason, _ in letters)
    sources = [source for _, _, source in letters]
    assert len(set(sources)) == len(sources), "a message is dead-lettered twice"

    head = max((int(seq) for seq, _, _ in rows), default=0)  # type: ignore[call-overload]
    served = byte_for_byte = 0
    for worker in workers:

        async def caught_up(worker: Worker = worker) -> bool:
            detail = await worker.wait_ready()
            return detail["orders"] == len(rows) and detail["last_seq"] == head

        await eventually(caught_up, f"{worker.base} serves the whole log", 60, worker.log_tail)
        wanted = sorted(log) if serve_all else sorted(log)[:: max(1, len(log) // 500)]
        checked, identical = await _check_served(worker, wanted, log, published)
        served += checked
        byte_for_byte += identical
    return AuditReport(
        events=len(rows),
        dead_letters=len(letters),
        served_checked=served,
        served_byte_for_byte=byte_for_byte,
    )


async def _check_served(
    worker: Worker, uids: list[str], log: dict[str, object], published: Published
) -> tuple[int, int]:
    """GET each uid: the same JSON value as the log. Returns how many were checked and how
    many of them came back byte for byte as published (the rest as jsonb gives them back)."""
    connector = aiohttp.TCPConnector(limit=16)
    identical = 0
    async with aiohttp.ClientSession(connector=connector) as http:
        queue = list(uids)

        async def reader() -> None:
            nonlocal identical
            while queue:
                uid = queue.pop()
                async with http.get(f"{worker.base}/orders/{uid}") as response:
                    body = await response.read()
                    assert response.status == 200, (uid, response.status, body[:200])
                    assert orjson.loads(body) == log[uid], f"{uid}: view and log differ"
                    identical += body in published.valid[uid]

        await asyncio.gather(*(reader() for _ in range(16)))
    return len(uids), identical


# ---------------------------------------------------------------------------------------------
# Servers of a test's own


class OwnPostgres(EmbeddedPostgres):
    """A PostgreSQL server of the tests' own, which they may stop and start again (pg_ctl runs
    as the server's system user); the URL stays the same across restarts."""

    def __init__(self) -> None:
        super().__init__("orders-chaos")

    def create_database(self, name: str) -> str:
        return create_database(self.admin_url, name)

    def stop(self, mode: str) -> None:
        """``pg_ctl stop -m fast`` (clients disconnected, a clean shutdown) or ``-m immediate``
        (no shutdown checkpoint: crash recovery at the next start)."""
        self._pg_ctl(["-w", "-m", mode, "stop"])

    def start(self) -> None:
        self.server.ensure_postgres_running()
        assert self.server.get_uri("postgres") == self.admin_url

    def answers(self) -> bool:
        try:
            psycopg2.connect(self.admin_url, connect_timeout=1).close()
        except psycopg2.OperationalError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            if not self.answers():
                self.start()
        super().close()

    def _pg_ctl(self, args: list[str]) -> None:
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.server.pgdata), *args],
            check=True,
            capture_output=True,
            timeout=60,
            user=self.server.system_user,
        )


@contextlib.contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        yield server
    finally:
        server.close()
