"""Faults against real PostgreSQL and real NATS, each ending with the full audit
(tests/chaos_servers.py: ``audit``): every published valid order once in the log, the views equal
to the log, every invalid message dead-lettered with its reason.

Bounded sizes inside ``make test``; ``make chaos`` (``ORDERS_CHAOS=full``) runs the full ones.
The figures each test measures are printed as ``[chaos] test: key=value ...`` lines.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import nats
import orjson
import psycopg2
import pytest

from bridge.embedded_nats import EmbeddedNats
from publisher.publish import publish
from tests.chaos_servers import (
    Figures,
    OwnPostgres,
    Published,
    audit,
    chaos,
    chaos_messages,
    consumer_state,
    first_metric,
    orders_served,
    own_postgres,
    publish_steadily,
    rss_mib,
    sized,
    wait_settled,
)
from tests.database import DatabaseSwitch, InspectedStore
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker, eventually, view_size

pytestmark = chaos

ROOT = Path(__file__).resolve().parent.parent

FINDINGS: Final = {
    "F8": "SIGTERM sometimes never stopped the worker: the follower's task swallowed its"
    " cancellation (asyncio.wait_for on Python 3.11 loses a cancel that comes as a"
    " notification arrives) and Runtime.on_stop waited for it forever",
}
# As in test_fuzz.py; F8 was intermittent, so while open its test was a non-strict expected
# failure.
OPEN_FINDINGS: Final[frozenset[str]] = frozenset()

# JetStream redelivers what a killed worker held after ack_wait. The service's default is 30 s;
# the runs that kill or disconnect use 5 s so that each redelivery comes within the run. The
# outcome is the same with 30 s, only later.
ACK_WAIT_S = "5"


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments


async def test_sigkill_at_random_moments_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, figures: Figures
) -> None:
    """A run of orders (2 % malformed, 2 % repeated uids) during which the worker is SIGKILLed
    at a random moment after it became ready, started again at once, and killed again."""
    count, kills = sized(3_000, 20_000), sized(3, 10)
    rng = random.Random(20_000 + kills)
    messages = chaos_messages(count, seed=101)
    # Publishing spans the kills: about 2.5 s of each worker's life, start included.
    rate = count / (kills * 2.5)
    worker = Worker(tmp_path, **route.env(database_url), ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S)
    moments: list[float] = []
    in_view: list[int] = []
    restarts: list[float] = []
    started = time.monotonic()
    with worker:
        await worker.wait_ready()
        publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
        for _ in range(kills):
            moment = rng.uniform(0.2, 2.5)
            await asyncio.sleep(moment)
            worker.check_alive()
            in_view.append(await orders_served(worker))
            moments.append(moment)
            worker.kill()
            begun = time.monotonic()
            worker.start()
            await worker.wait_ready()
            restarts.append(time.monotonic() - begun)
        published = await publishing
        state = await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
        restored = worker.log().count("view restored:")
    assert restored == kills + 1
    figures.record(
        orders=count,
        messages=published.messages,
        valid_uids=len(published.valid),
        invalid=len(published.invalid),
        kills=kills,
        kill_moments_s=[round(m, 2) for m in moments],
        orders_in_view_at_kill=in_view,
        restart_to_ready_s_max=max(restarts),
        redeliveries=state.redeliveries,
        seconds=time.monotonic() - started,
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# 2. PostgreSQL stopped and started again; connections killed from the server side


@pytest.fixture(scope="module")
def stoppable_postgres() -> Iterator[OwnPostgres]:
    """A PostgreSQL of this module's own, to be stopped and started."""
    with own_postgres() as server:
        yield server


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_stopped_mid_run_then_started_again(
    tmp_path: Path,
    stoppable_postgres: OwnPostgres,
    nats_url: str,
    mode: str,
    figures: Figures,
) -> None:
    """PostgreSQL goes away for a while in the middle of a run (``pg_ctl stop -m fast``, or
    ``-m immediate``: no shutdown checkpoint, crash recovery at restart) and comes back on the
    same data directory. Nothing is acked while it is away; reads are served from memory."""
    outage = sized(3.0, 10.0)
    rate = 400.0
    count = int(rate * (outage + 4))
    url = stoppable_postgres.create_database(f"chaos_{uuid.uuid4().hex[:10]}")
    route = Route(nats_url)
    messages = chaos_messages(count, seed=202)
    worker = Worker(tmp_path, **route.env(url), ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S)
    with worker:
        await worker.wait_ready()
        publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))

        async def some_stored() -> bool:
            return await orders_served(worker) >= 200

        await eventually(some_stored, "200 orders stored", context=worker.log_tail)
        known = str(messages[0].uid)
        await asyncio.to_thread(stoppable_postgres.stop, mode)
        stopped = time.monotonic()
        await asyncio.sleep(min(1.0, outage / 3))
        floor_early = (await consumer_state(route)).ack_floor
        reads = 0
        while time.monotonic() - stopped < outage:
            status, _, _ = await worker.get(f"/orders/{known}")
            assert status == 200, "reads are served from memory while the database is away"
            reads += 1
            await asyncio.sleep(0.05)
        during = await consumer_state(route)
        assert during.ack_floor == floor_early, "nothing is acked while the database is away"
        worker.check_alive()
        await asyncio.to_thread(stoppable_postgres.start)
        back = time.monotonic()
        published = await publishing
        store = await InspectedStore.open(url)
        try:
            await wait_settled(store, route, published, [worker])
            recovered = time.monotonic() - back
            report = await audit(store, published, [worker])
        finally:
            await store.close()
        retries = (await worker.metrics())["orders_database_retries_total"]
    assert retries > 0
    figures.record(
        mode=mode,
        outage_s=outage,
        messages=published.messages,
        unacked_during_outage=during.ack_pending,
        reads_served_during_outage=reads,
        database_retries=retries,
        recovered_after_restart_s=recovered,
        **report.figures(),
    )


async def test_connections_killed_from_the_server_side(
    tmp_path: Path,
    database_url: str,
    database_switch: DatabaseSwitch,
    route: Route,
    store: InspectedStore,
    figures: Figures,
) -> None:
    """``pg_terminate_backend`` on every connection of the worker, again and again mid-run
    (the pool, the LISTEN connection): the worker reconnects and the audit holds."""
    rounds = sized(6, 20)
    rate = 500.0
    count = int(rate * rounds * 0.6)
    messages = chaos_messages(count, seed=303)
    worker = Worker(tmp_path, **route.env(database_url), ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S)
    terminated = 0
    with worker:
        await worker.wait_ready()
        publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
        for _ in range(rounds):
            await asyncio.sleep(0.5)
            terminated += await asyncio.to_thread(database_switch.terminate, "")
            worker.check_alive()
        published = await publishing
        await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
        values = await worker.metrics()
    figures.record(
        rounds=rounds,
        backends_terminated=terminated,
        messages=published.messages,
        database_retries=first_metric(values, "orders_database_retries_total"),
        **report.figures(),
    )


class _KillerBeforeCommit:
    """Ends, again and again, every backend of one database caught between a transaction's
    statements and its COMMIT (state 'idle in transaction'): the instant at which a lost
    COMMIT could pass for a confirmed one."""

    def __init__(self, admin_url: str, database: str, kills: int) -> None:
        self._admin_url = admin_url
        self._database = database
        self._kills = kills
        self.killed = 0
        self._stop = False

    def stop(self) -> None:
        self._stop = True

    def run(self) -> None:
        admin = psycopg2.connect(self._admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                while not self._stop and self.killed < self._kills:
                    cur.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = %s AND state = 'idle in transaction'"
                        " AND pid <> pg_backend_pid()",
                        (self._database,),
                    )
                    (count,) = cur.fetchone()
                    self.killed += count
                    time.sleep(0.002 if not count else 0.2)
        finally:
            admin.close()


async def test_connections_killed_between_the_last_statement_and_commit(
    tmp_path: Path,
    postgres_server_url: str,
    database_url: str,
    route: Route,
    store: InspectedStore,
    figures: Figures,
) -> None:
    """Promise 1 at its worst instant: backends are ended while their transaction waits for
    its COMMIT, many times in a run. Nothing may be acked that is not in the log: the audit
    (every published order once in the log, the consumer drained, views equal to the log)."""
    kills = sized(15, 60)
    rate = 500.0
    messages = chaos_messages(sized(3_000, 12_000), seed=313)
    worker = Worker(tmp_path, **route.env(database_url), ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S)
    database = urlsplit(database_url).path.lstrip("/")
    killer = _KillerBeforeCommit(postgres_server_url, database, kills)
    with worker:
        await worker.wait_ready()
        killing = asyncio.create_task(asyncio.to_thread(killer.run))
        try:
            published = await publish_steadily(route, messages, rate=rate)
        finally:
            killer.stop()
            await killing
        assert killer.killed > 0, "the fault struck"
        worker.check_alive()
        await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
        values = await worker.metrics()
    figures.record(
        backends_ended_before_commit=killer.killed,
        messages=published.messages,
        database_retries=first_metric(values, "orders_database_retries_total"),
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# 3. NATS stopped and started again, its JetStream store kept


async def test_nats_stopped_mid_run_then_started_again(
    tmp_path: Path,
    database_url: str,
    own_nats: EmbeddedNats,
    store: InspectedStore,
    figures: Figures,
) -> None:
    """nats-server stops (SIGTERM) in the middle of a run and starts again on the same port and
    JetStream store; the publisher retries what was not acknowledged (same Nats-Msg-Id)."""
    outage = sized(2.0, 10.0)
    rate = 500.0
    count = int(rate * (outage + 5))
    assert own_nats.url is not None
    route = Route(own_nats.url)
    messages = chaos_messages(count, seed=404)
    worker = Worker(
        tmp_path / "worker", **route.env(database_url), ORDERS_NATS_ACK_WAIT_S=ACK_WAIT_S
    )
    with worker:
        await worker.wait_ready()
        publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
        await asyncio.sleep(2.0)
        before = await orders_served(worker)
        await asyncio.to_thread(own_nats.stop)
        await asyncio.sleep(outage)
        worker.check_alive()
        await asyncio.to_thread(own_nats.start)
        back = time.monotonic()

        async def consuming_again() -> bool:
            return await orders_served(worker) > before + 50

        await eventually(consuming_again, "consumption resumed", 60, worker.log_tail)
        resumed = time.monotonic() - back
        published = await publishing
        state = await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
        values = await worker.metrics()
    assert "reconnected to NATS" in worker.log()
    figures.record(
        outage_s=outage,
        messages=published.messages,
        publisher_retries=published.retries,
        consumption_resumed_after_s=resumed,
        nats_reconnects=first_metric(values, "orders_nats_reconnects_total"),
        redeliveries=state.redeliveries,
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# 4. A slow database: orders_events locked for longer than ack_wait


async def test_table_locked_longer_than_ack_wait_keeps_work_bounded(
    tmp_path: Path,
    database_url: str,
    route: Route,
    store: InspectedStore,
    figures: Figures,
) -> None:
    """Another connection holds ``LOCK TABLE orders_events IN ACCESS EXCLUSIVE MODE`` for several
    times ack_wait (2 s); a burst of orders arrives as the lock is taken, and more keep coming.
    Nothing is stored twice, the unacked messages stay within ORDERS_NATS_MAX_ACK_PENDING (set
    to one batch, below the four batches the bridge may hold) and the worker's memory stays
    flat."""
    held = sized(6.0, 20.0)
    max_ack_pending = 1_000
    rate = 500.0
    burst = chaos_messages(sized(5_000, 20_000), seed=505)
    steady = chaos_messages(int(rate * held), seed=506)
    first = orders(1, seed=504)
    worker = Worker(
        tmp_path,
        **route.env(database_url),
        ORDERS_NATS_ACK_WAIT_S="2",
        ORDERS_NATS_MAX_ACK_PENDING=str(max_ack_pending),
    )

    async def feed() -> Published:
        published = await publish_steadily(route, burst)
        published.extend(await publish_steadily(route, steady, rate=rate))
        return published

    with worker:
        await worker.wait_ready()
        await route.send(first)  # the stream exists, the worker is consuming
        await eventually(lambda: _orders_served_at_least(worker, 1), "a first order stored")
        rss_start = rss_mib(worker)
        locker = psycopg2.connect(database_url)
        rss: list[float] = []
        ack_pending: list[int] = []
        backlog: list[int] = []
        reported_ack_pending: list[float] = []
        read_ms: list[float] = []
        try:
            with locker.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("LOCK TABLE orders_events IN ACCESS EXCLUSIVE MODE")
            locked = time.monotonic()
            publishing = asyncio.create_task(feed())
            while time.monotonic() - locked < held:
                worker.check_alive()
                rss.append(rss_mib(worker))
                state = await consumer_state(route)
                ack_pending.append(state.ack_pending)
                backlog.append(state.pending)
                reported_ack_pending.append(
                    (await worker.metrics())["orders_nats_consumer_ack_pending"]
                )
                begun = time.perf_counter()
                status, _, _ = await worker.get(f"/orders/{burst[0].uid}")
                read_ms.append((time.perf_counter() - begun) * 1000)
                assert status in (200, 404)  # served from memory: never waits for the lock
                await asyncio.sleep(0.5)
        finally:
            locker.rollback()
            locker.close()
        released = time.monotonic()
        published = await publishing
        published.extend(Published(valid={str(m.uid): [m.data] for m in first}))
        state = await wait_settled(store, route, published, [worker])
        drained_s = time.monotonic() - released
        report = await audit(store, published, [worker])
        values = await worker.metrics()
        rss_end = rss_mib(worker)
    assert max(ack_pending) <= max_ack_pending
    assert max(reported_ack_pending) <= max_ack_pending
    # Bounded in-flight work: at most a few batches of 1,000 small messages; 100 MiB is ample.
    assert max(rss) - rss_start < 100, (rss_start, max(rss))
    figures.record(
        lock_held_s=held,
        ack_wait_s=2,
        max_ack_pending=max_ack_pending,
        messages=published.messages,
        ack_pending_max_seen=max(ack_pending),
        metrics_ack_pending_max=max(reported_ack_pending),
        backlog_max_during_lock=max(backlog),
        rss_mib_start=rss_start,
        rss_mib_max_during_lock=max(rss),
        rss_mib_end=rss_end,
        read_ms_max_during_lock=max(read_ms),
        drained_after_release_s=drained_s,
        worker_redeliveries_metric=first_metric(
            values, "orders_nats_redeliveries_total", "orders_nats_consumer_redelivered"
        ),
        consumer_redeliveries=state.redeliveries,
        duplicates_metric=first_metric(values, "orders_duplicates_total"),
        **report.figures(),
    )


async def _orders_served_at_least(worker: Worker, count: int) -> bool:
    return await orders_served(worker) >= count


# ---------------------------------------------------------------------------------------------
# 5. Two workers on one durable consumer: a deploy overlap


async def test_deploy_overlap_two_workers_then_the_old_one_stops(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, figures: Figures
) -> None:
    """Worker A consumes; B starts on the same durable consumer; both consume; A is stopped
    gracefully (SIGTERM) mid-run; B carries on. Still exactly once in the log."""
    rate = 800.0
    count = sized(6_000, 24_000)
    messages = chaos_messages(count, seed=606)
    old = Worker(tmp_path / "a", **route.env(database_url))
    new = Worker(tmp_path / "b", **route.env(database_url))
    with old:
        await old.wait_ready()
        publishing = asyncio.create_task(publish_steadily(route, messages, rate=rate))
        await asyncio.sleep(count / rate / 4)
        with new:  # starts B while A runs
            await new.wait_ready()
            await asyncio.sleep(count / rate / 4)
            stopping = time.monotonic()
            try:
                code: int | None = await asyncio.to_thread(old.stop)
            except AssertionError:  # not stopped within 30 s, then SIGKILLed
                if "F8" not in OPEN_FINDINGS:
                    raise
                code = None  # F8: counted below; the audit must hold all the same
            stop_s = time.monotonic() - stopping
            assert code in (0, None), old.log_tail()
            published = await publishing
            state = await wait_settled(store, route, published, [new])
            report = await audit(store, published, [new])
            values = await new.metrics()
    consumed = [
        "batch committed" in w.log() or "batches in the last" in w.log() for w in (old, new)
    ]
    assert all(consumed), "both workers took part"
    figures.record(
        messages=published.messages,
        graceful_stop_s=stop_s,
        stop_hung_f8=code is None,
        redeliveries=state.redeliveries,
        duplicates_seen_by_b=first_metric(values, "orders_duplicates_total"),
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# Sustained mixed load


async def test_sustained_ingest_and_reads_at_fixed_rates(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, figures: Figures
) -> None:
    """Orders published at a fixed rate while another process reads existing orders at a
    fixed rate: no error, every order stored, memory steady."""
    seconds = sized(10, 60)
    ingest_rate, read_rate = 1_000.0, 2_000.0
    existing = orders(sized(5_000, 20_000), seed=707)
    fresh = orders(int(ingest_rate * seconds), seed=708)
    uid_file = tmp_path / "uids.txt"
    uid_file.write_text("\n".join(str(m.uid) for m in existing))
    worker = Worker(tmp_path / "worker", **route.env(database_url))
    with worker:
        await worker.wait_ready()
        await route.send(existing)

        async def loaded() -> bool:
            return await view_size(worker) == len(existing)

        await eventually(loaded, "the existing orders loaded", context=worker.log_tail)
        rss_start = rss_mib(worker)
        load_start = os.getloadavg()[0]
        reader = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.chaos_load",
            worker.base,
            str(uid_file),
            str(read_rate),
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        nc = await nats.connect(route.nats_url)
        try:
            stats = await publish(nc, route.subject, fresh, rate=ingest_rate)
        finally:
            await nc.close()
        out, err = await reader.communicate()
        load_end = os.getloadavg()[0]
        assert reader.returncode == 0, err.decode()
        reads = orjson.loads(out)
        assert isinstance(reads, dict)
        reads["load_average_1m"] = [round(load_start, 2), round(load_end, 2)]

        async def all_stored() -> bool:
            return await view_size(worker) == len(existing) + len(fresh)

        await eventually(all_stored, "every order stored", context=worker.log_tail)
        rss_end = rss_mib(worker)
        published = Published()
        for message in [*existing, *fresh]:
            published.add(message, 0)
        report = await audit(store, published, [worker], serve_all=False)
    assert reads["errors"] == 0, reads
    assert stats.published == len(fresh)
    figures.record(
        seconds=seconds,
        ingest_target_per_s=ingest_rate,
        ingest_achieved_per_s=stats.rate,
        read_target_per_s=read_rate,
        read_achieved_per_s=reads["rate"],
        reads=reads["requests"],
        read_errors=reads["errors"],
        read_p50_ms=reads["p50_ms"],
        read_p99_ms=reads["p99_ms"],
        read_max_ms=reads["max_ms"],
        reader_behind_s_max=reads["client_behind_s_max"],
        load_average_1m=reads["load_average_1m"],
        rss_mib_start=rss_start,
        rss_mib_end=rss_end,
        **report.figures(),
    )


# ---------------------------------------------------------------------------------------------
# F5 (closed): orders served byte for byte by the worker that consumed them


async def test_the_consuming_worker_serves_every_order_byte_for_byte(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, figures: Figures
) -> None:
    """The README's promise: a just-consumed order is served byte for byte as published. It
    used to hold only when the agent projected its batch before the follower read the same
    rows back from the log (jsonb's form) on the commit's NOTIFY."""
    messages = chaos_messages(sized(3_000, 20_000), seed=808)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        published = await publish_steadily(route, messages)
        await wait_settled(store, route, published, [worker])
        report = await audit(store, published, [worker])
    figures.record(**report.figures())
    assert report.served_byte_for_byte == report.served_checked


# ---------------------------------------------------------------------------------------------
# F8 (closed): SIGTERM while consuming


@pytest.mark.xfail("F8" in OPEN_FINDINGS, strict=False, reason="F8: " + FINDINGS["F8"])
async def test_finding_sigterm_while_consuming_stops_the_worker_promptly(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
) -> None:
    """Three times: a worker consuming a steady flow gets SIGTERM and must exit 0 within 10 s
    (it commits and acks the batch in hand; 30 s is the bridge's own grace for that)."""
    messages = chaos_messages(6_000, seed=818)
    publishing = asyncio.create_task(publish_steadily(route, messages, rate=1_000))
    try:
        for attempt in range(3):
            worker = Worker(tmp_path / f"w{attempt}", **route.env(database_url))
            with worker:
                await worker.wait_ready()
                await asyncio.sleep(1.5)
                begun = time.monotonic()
                code = await asyncio.to_thread(worker.stop, 10.0)
                assert code == 0 and time.monotonic() - begun < 10
    finally:
        await publishing
