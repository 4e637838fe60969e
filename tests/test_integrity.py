"""The log's promises, each struck at the instant a fault would hurt it most (real PostgreSQL).

1. A message is settled (and so acked) only after its event or rejection is committed, and the
   COMMIT was confirmed by PostgreSQL.
2. orders_events is append-only, order_uid is the idempotency key, the first write wins.
3. The view is a pure projection of the log in seq order; every view catches up under load.
4. Nothing outside the service is trusted: database defaults, sequences, notifications.

Each test names the promise it protects. Faults are real: backends ended with
``pg_terminate_backend``, foreign settings applied with ``ALTER``, forged ``NOTIFY`` sent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import orjson
import psycopg2
import pytest
import uvloop
from psycopg2 import sql

from streams.agent import BatchProcessor
from streams.app import create_app
from streams.config import Settings
from streams.envelope import Outcome
from streams.follower import ViewFollower
from streams.logs import quiet_statement_timeout_reports
from streams.store import (
    APPEND_LOCK_KEY,
    DeadLetter,
    Listener,
    PostgresEventStore,
    SchemaMissing,
    SchemaUnsafe,
    StoreUnavailable,
)
from streams.validation import Accepted
from tests.flow import wait_for_orders
from tests.harness import Route
from tests.orders import new_uid, order_bytes, orders
from tests.test_agent import envelopes, outcomes, process, settled
from tests.worker import Worker, eventually
from views.view import OrdersView


class Admin:
    """A superuser connection to the test's database, for faults and for looking at it."""

    def __init__(self, database_url: str) -> None:
        self.conn = psycopg2.connect(database_url)
        self.conn.autocommit = True
        self.database = urlsplit(database_url).path.lstrip("/")

    def run(self, statement: str | sql.Composable, args: tuple[object, ...] | None = None) -> None:
        with self.conn.cursor() as cur:
            cur.execute(statement, args)

    def rows(self, statement: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(statement, args)
            return list(cur.fetchall())

    def value(self, statement: str, args: tuple[object, ...] = ()) -> object:
        ((value,),) = self.rows(statement, args)
        return value

    def terminate(self, pid: int) -> None:
        """End one backend and wait until it is gone."""
        self.run("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(200):
            if not self.value("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)):
                return
            time.sleep(0.02)
        raise AssertionError(f"backend {pid} did not go away")

    def log_uids(self) -> list[str]:
        return [
            str(uid) for (uid,) in self.rows("SELECT order_uid FROM orders_events ORDER BY seq")
        ]

    def append_lock_holders(self) -> int:
        return int(
            str(
                self.value(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND objid = %s",
                    (APPEND_LOCK_KEY,),
                )
            )
        )


@pytest.fixture
def admin(database_url: str, store: PostgresEventStore) -> Iterator[Admin]:
    """The superuser connection, once the store has applied the schema."""
    connection = Admin(database_url)
    try:
        yield connection
    finally:
        connection.conn.close()


def accepted(uid: str | None = None) -> Accepted:
    uid = uid or new_uid()
    return Accepted(uid, order_bytes(uid))


class _DroppedBeforeCommit:
    """A transaction whose backend the server ends after the last statement and before COMMIT:
    the instant at which an unconfirmed commit could pass for a confirmed one."""

    def __init__(self, inner: object, admin: Admin) -> None:
        self._inner = inner
        self._admin = admin
        self._cur: object = None

    async def __aenter__(self) -> object:
        self._cur = await self._inner.__aenter__()  # type: ignore[attr-defined]
        return self._cur

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            pid = self._cur.connection.raw.get_backend_pid()  # type: ignore[attr-defined]
            await asyncio.to_thread(self._admin.terminate, pid)
            await asyncio.sleep(0.2)  # the server's FATAL reaches the driver before COMMIT goes
        await self._inner.__aexit__(kind, exc, tb)  # type: ignore[attr-defined]


def drop_before_commit(
    monkeypatch: pytest.MonkeyPatch, store: PostgresEventStore, admin: Admin, times: int
) -> None:
    """The next ``times`` transactions of ``store`` lose their connection just before COMMIT."""
    original = store._transaction
    left = [times]

    def transaction() -> object:
        cursor = original()
        if left[0] <= 0:
            return cursor
        left[0] -= 1
        return _DroppedBeforeCommit(cursor, admin)

    monkeypatch.setattr(store, "_transaction", transaction)


async def test_acked_only_after_confirmed_commit_connection_dropped_before_commit(
    store: PostgresEventStore, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise 1: a transaction whose connection broke before COMMIT is not reported stored."""
    drop_before_commit(monkeypatch, store, admin, times=1)
    order = accepted()
    with pytest.raises(StoreUnavailable):
        await store.write_batch([order], [DeadLetter(b"{oops", "not JSON", "S:1")])
    assert admin.log_uids() == []
    assert admin.value("SELECT count(*) FROM orders_dead_letters") == 0


async def test_settled_only_after_confirmed_commit_connection_dropped_before_commit(
    store: PostgresEventStore, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise 1 through the agent: every message settled STORED or REJECTED is in the
    database, and the view holds only what the log holds."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await process(processor, envelopes(order_bytes(new_uid())))  # a live pooled connection
    drop_before_commit(monkeypatch, store, admin, times=2)
    uid = new_uid()
    batch = envelopes(order_bytes(uid), b"{oops")
    await asyncio.wait_for(process(processor, batch), timeout=30)
    assert outcomes(batch) == [Outcome.STORED, Outcome.REJECTED]
    assert uid in admin.log_uids()
    assert admin.value("SELECT count(*) FROM orders_dead_letters") == 1
    assert set(processor.view) == set(admin.log_uids())


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
async def test_seq_order_holds_under_a_foreign_default_isolation_level(
    database_url: str, admin: Admin, level: str
) -> None:
    """Promise 3 against a server default of REPEATABLE READ / SERIALIZABLE: another writer
    commits while this one waits for the append lock; the view must not skip its row."""
    admin.run(
        sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
            sql.Identifier(admin.database), sql.Literal(level)
        )
    )
    store = await PostgresEventStore.open(database_url)
    other = Admin(database_url)
    try:
        follower = ViewFollower(OrdersView(), store, page_size=100)
        other.run("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_KEY,))

        async def commit_ours() -> None:
            await follower.apply(await store.write_batch([accepted()], []))

        ours = asyncio.create_task(commit_ours())

        async def waiting_for_the_lock() -> bool:
            return bool(
                admin.value(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND wait_event = 'advisory'",
                    (admin.database,),
                )
            )

        await eventually(waiting_for_the_lock, "our writer waits for the append lock", 10)
        theirs = new_uid()
        other.run(
            "INSERT INTO orders_events (order_uid, event_type, payload) VALUES (%s, %s, %s)",
            (theirs, "OrderPlaced", order_bytes(theirs).decode()),
        )
        other.run("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK_KEY,))
        await asyncio.wait_for(ours, timeout=10)
        assert list(follower.view) == admin.log_uids()
    finally:
        other.conn.close()
        await store.close()


@pytest.mark.parametrize("apply_schema", [True, False])
async def test_a_sequence_that_caches_seqs_is_refused_at_start(
    database_url: str, admin: Admin, apply_schema: bool
) -> None:
    """Promise 3: with CACHE > 1 each connection hands out seqs from its own range, out of
    commit order, and a view tailing the log would skip rows. The store refuses to open."""
    admin.run("ALTER TABLE orders_events ALTER COLUMN seq SET CACHE 20")
    with pytest.raises(SchemaUnsafe, match="CACHE 20"):
        await PostgresEventStore.open(database_url, apply_schema=apply_schema)


@pytest.mark.parametrize(
    "payload", ["999999999 x", "999999999", "", "garbage", "-5 y", "9" * 40 + " z"]
)
async def test_a_forged_notification_is_a_wake_up_only(
    store: PostgresEventStore, admin: Admin, database_url: str, payload: str
) -> None:
    """Promise 4: any role may NOTIFY the channel. The head comes from the log, so a forged
    announcement neither makes the view look behind for good nor stops it following."""
    other = await PostgresEventStore.open(database_url)
    follower = ViewFollower(OrdersView(), store, page_size=100)
    following = asyncio.create_task(follower.follow(poll_s=0.2))
    try:
        await asyncio.sleep(0.5)  # LISTEN in place
        admin.run("SELECT pg_notify('orders_events', %s)", (payload,))
        await asyncio.sleep(0.5)
        await other.write_batch([accepted(), accepted()], [])

        async def followed() -> bool:
            return len(follower.view) == 2 and follower.lag == 0

        await eventually(followed, "the view follows the log, lag 0", timeout=10)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await other.close()


async def test_a_new_message_under_a_reused_source_is_dead_lettered_not_dropped(
    store: PostgresEventStore, admin: Admin
) -> None:
    """Promise 1 for rejections: after a stream is recreated its sequences start again, so
    another message arrives under a source already seen. It is kept; a redelivery of the
    same message is not kept twice."""
    await store.write_batch([], [DeadLetter(b"first", "not JSON", "ORDERS:1")])
    result = await store.write_batch([], [DeadLetter(b"second", "not JSON", "ORDERS:1")])
    assert [letter.raw for letter in result.dead_lettered] == [b"second"]
    await store.write_batch([], [DeadLetter(b"second", "not JSON", "ORDERS:1")])
    raws = admin.rows("SELECT raw FROM orders_dead_letters ORDER BY id")
    assert [bytes(raw) for (raw,) in raws] == [b"first", b"second"]  # type: ignore[call-overload]


def _install_slow_inserts(admin: Admin, seconds: float) -> None:
    """Inserts of uids starting with 'slow' sleep ``seconds`` while slow_switch has a row."""
    admin.run("CREATE TABLE slow_switch (on_ boolean)")
    admin.run("INSERT INTO slow_switch VALUES (true)")
    admin.run(
        f"""
        CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.order_uid LIKE 'slow%' AND EXISTS (SELECT 1 FROM slow_switch) THEN
                PERFORM pg_sleep({seconds});
            END IF;
            RETURN NEW;
        END $$
        """
    )
    admin.run(
        "CREATE TRIGGER slow BEFORE INSERT ON orders_events"
        " FOR EACH ROW EXECUTE FUNCTION slow_insert()"
    )


async def test_a_statement_over_the_timeout_leaves_no_backend_holding_the_append_lock(
    database_url: str, admin: Admin
) -> None:
    """Promise 3 (the stream never stalls): a statement that runs past the timeout is ended
    by the server, so no abandoned backend keeps the append lock from the next writer."""
    _install_slow_inserts(admin, seconds=3)
    store = await PostgresEventStore.open(database_url, timeout=1.0)
    try:
        with pytest.raises(StoreUnavailable, match="timeout"):
            await store.write_batch([accepted(new_uid("slow"))], [])
        assert admin.append_lock_holders() == 0
        assert admin.log_uids() == []
    finally:
        await store.close()


async def test_a_batch_over_the_timeout_is_split_and_the_rest_goes_on(
    database_url: str, admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Promise 3: the one order whose insert is too slow is held back (and reported in the
    processor's problem, which /readyz shows); the rest of its batch is committed. The driver's
    own report of each cancelled statement is not logged (the episode is told once)."""
    quiet_statement_timeout_reports()
    caplog.set_level(logging.WARNING)
    _install_slow_inserts(admin, seconds=3)
    store = await PostgresEventStore.open(database_url, timeout=1.0)
    try:
        processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
        slow, *fast = [new_uid("slow"), new_uid(), new_uid(), new_uid()]
        batch = envelopes(*(order_bytes(uid) for uid in (slow, *fast)))
        await processor.start_commit(batch)

        async def fast_ones_stored() -> bool:
            return set(fast) <= set(admin.log_uids())

        await eventually(fast_ones_stored, "the three fast orders are committed", 30)
        assert slow not in admin.log_uids()
        assert outcomes(batch)[0] is None, "the slow order is not settled"
        assert processor.problem is not None and "timeout" in processor.problem
        admin.run("DELETE FROM slow_switch")
        await asyncio.wait_for(settled(batch), timeout=30)
        assert outcomes(batch) == [Outcome.STORED] * 4
        assert processor.problem is None
        assert set(processor.view) == set(admin.log_uids())
        assert not [record for record in caplog.records if record.name == "asyncio"]
        timeouts = [r for r in caplog.records if "statement timeout" in r.getMessage()]
        assert len(timeouts) == 1, [record.getMessage() for record in timeouts]
    finally:
        await store.close()


def role_of(url: str) -> str:
    """The role a URL logs in as."""
    role = urlsplit(url).username
    assert role is not None
    return role


async def test_each_privilege_a_writer_needs_is_checked_at_start(
    app_role_url: str, admin: Admin
) -> None:
    """Promise 4: a role that may SELECT but not INSERT must not pass the start check (then
    fail every batch); a reader needs SELECT only."""
    url, role = app_role_url, role_of(app_role_url)
    admin.run(sql.SQL("REVOKE INSERT ON orders_events FROM {}").format(sql.Identifier(role)))
    with pytest.raises(SchemaMissing, match="may not INSERT on table orders_events"):
        await PostgresEventStore.open(url, apply_schema=False)
    reader = await PostgresEventStore.open(url, writer=False)
    await reader.close()


async def test_permission_denied_is_reported_as_such_and_retried_until_granted(
    app_role_url: str, admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Promise 4: a grant taken away while the service runs is not "database unavailable":
    the processor says "permission denied" (for /readyz), logs it once for the episode,
    settles nothing, and goes on once the grant is back."""
    url, role = app_role_url, role_of(app_role_url)
    store = await PostgresEventStore.open(url, apply_schema=False)
    try:
        processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
        admin.run(sql.SQL("REVOKE INSERT ON orders_events FROM {}").format(sql.Identifier(role)))
        batch = envelopes(order_bytes(new_uid()))
        with caplog.at_level(logging.WARNING, logger="streams.agent"):
            await processor.start_commit(batch)

            async def reported() -> bool:
                return processor.problem is not None and "permission denied" in processor.problem

            await eventually(reported, "the processor reports permission denied", 10)
            await asyncio.sleep(1.0)  # more retries, no more log lines
            assert outcomes(batch) == [None]
            admin.run(sql.SQL("GRANT INSERT ON orders_events TO {}").format(sql.Identifier(role)))
            await asyncio.wait_for(settled(batch), timeout=30)
        assert outcomes(batch) == [Outcome.STORED]
        assert processor.problem is None
        denied = [r for r in caplog.records if "permission denied" in r.getMessage()]
        assert len(denied) == 1, [r.getMessage() for r in denied]
        assert "database unavailable" not in caplog.text
    finally:
        await store.close()


async def test_boot_replay_that_loses_its_connection_is_retried(
    tmp_path: Path,
    database_url: str,
    store: PostgresEventStore,
    admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Promise 3 at boot: the database answers the connect, then the connection drops in the
    middle of the replay (after its first page). The runtime tries the replay again and the
    view ends equal to the log."""
    for _ in range(5):
        await store.write_batch([accepted() for _ in range(4)], [])
    original = PostgresEventStore.read_pages
    calls = [0]

    async def dropped_after_first_page(
        self: PostgresEventStore, after: int, page_size: int
    ) -> AsyncIterator[list[object]]:
        calls[0] += 1
        pages = original(self, after, page_size)
        try:
            async for page in pages:
                yield page  # type: ignore[misc]
                if calls[0] == 1:
                    for (pid,) in admin.rows(
                        "SELECT pid FROM pg_stat_activity WHERE datname = %s"
                        " AND pid <> pg_backend_pid()",
                        (admin.database,),
                    ):
                        admin.terminate(int(str(pid)))
        finally:
            await pages.aclose()

    monkeypatch.setattr(PostgresEventStore, "read_pages", dropped_after_first_page)
    settings = Settings(
        database_url=database_url, data_dir=tmp_path, consume=False, replay_page_size=3
    )
    runtime = create_app(settings).runtime
    view = runtime.view
    try:
        await asyncio.wait_for(runtime.on_start(), timeout=60)
        assert calls[0] >= 2, "the replay was tried again"
        assert list(view) == admin.log_uids() and len(view) == 20
        assert runtime.readiness()[0]
    finally:
        await runtime.on_stop()


async def test_commit_confirmed_but_reply_lost_reaches_the_own_view_at_once(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise 3: the COMMIT went through but the client saw an error, so the retry finds the
    orders already there (duplicates). The writer's own view gets them on that retry, not at
    some later poll."""
    original = store.write_batch
    lost = [1]

    async def reply_lost(orders: list[Accepted], rejects: list[DeadLetter]) -> object:
        result = await original(orders, rejects)
        if lost[0]:
            lost[0] -= 1
            raise StoreUnavailable("PostgreSQL: server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(store, "write_batch", reply_lost)
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    uid = new_uid()
    batch = envelopes(order_bytes(uid))
    await asyncio.wait_for(process(processor, batch), timeout=30)
    assert outcomes(batch) == [Outcome.DUPLICATE]
    assert uid in processor.view


async def test_other_writers_reach_the_view_while_a_commit_of_its_own_is_in_flight(
    store: PostgresEventStore, admin: Admin, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise 3 under load: under sustained ingest the agent always has a commit in flight.
    Here one waits for the append lock (held by the test) for as long as the test likes;
    meanwhile other writers' orders, announced by NOTIFY, must reach this worker's view, and
    the notifications must be read, not pile up."""
    follower = ViewFollower(OrdersView(), store, page_size=100)
    processor = BatchProcessor(store, follower)
    await process(processor, envelopes(order_bytes(new_uid())))  # a live pooled connection
    listeners: list[Listener] = []
    listen = store.listen

    async def recorded_listen() -> Listener:
        listeners.append(await listen())
        return listeners[-1]

    monkeypatch.setattr(store, "listen", recorded_listen)
    following = asyncio.create_task(follower.follow(poll_s=0.5))
    other = Admin(database_url)
    try:
        await asyncio.sleep(0.5)  # LISTEN in place
        other.run("SELECT pg_advisory_lock(%s)", (APPEND_LOCK_KEY,))
        ours = envelopes(order_bytes(new_uid()))
        await processor.start_commit(ours)
        theirs = [new_uid() for _ in range(5)]
        for uid in theirs:
            other.run(
                "INSERT INTO orders_events (order_uid, event_type, payload) VALUES (%s, %s, %s)",
                (uid, "OrderPlaced", order_bytes(uid).decode()),
            )
        for _ in range(300):
            other.run("SELECT pg_notify('orders_events', 'another-writer')")

        async def followed() -> bool:
            return set(theirs) <= set(follower.view) and listeners[-1].backlog == 0

        await eventually(followed, "another writer's orders reach the view, NOTIFYs read", 10)
        assert outcomes(ours) == [None], "our commit is still in flight"
        other.run("SELECT pg_advisory_unlock(%s)", (APPEND_LOCK_KEY,))
        await asyncio.wait_for(settled(ours), timeout=30)
        assert outcomes(ours) == [Outcome.STORED]
        assert list(follower.view) == admin.log_uids()
    finally:
        other.conn.close()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)


def _run_on_uvloop(work: Callable[[], Awaitable[None]]) -> None:
    """Run ``work`` to the end on a uvloop event loop of its own, in a thread."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(work())  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the uvloop run did not end"
    if failure:
        raise failure[0]


def test_a_lost_connection_under_uvloop_is_store_unavailable_and_dropped_from_the_pool(
    database_url: str, admin: Admin
) -> None:
    """Promise 4 (no false alarms, no log flood): under uvloop a connection killed by the
    server is StoreUnavailable, not a RuntimeError taken for a bug; the pool forgets it and
    the next write, once the database is back, succeeds."""
    errors: list[BaseException] = []

    async def work() -> None:
        store = await PostgresEventStore.open(database_url, maxsize=2)
        try:
            await store.write_batch([accepted()], [])
            for (pid,) in admin.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (admin.database,),
            ):
                admin.terminate(int(str(pid)))
            await asyncio.sleep(0.2)
            for _ in range(3):
                try:
                    await store.write_batch([accepted()], [])
                except StoreUnavailable:
                    pass
                except BaseException as exc:
                    errors.append(exc)
            await store.write_batch([accepted()], [])
        finally:
            await store.close()

    _run_on_uvloop(work)
    assert errors == []
    assert len(admin.log_uids()) >= 2


async def test_a_worker_whose_writes_are_refused_is_not_ready_and_acks_nothing(
    tmp_path: Path, app_role_url: str, admin: Admin, route: Route
) -> None:
    """Promise 4 end to end: a worker that can no longer INSERT does nothing for ingest, so
    /readyz says 503 "stalled" with the reason (never 200), nothing is acked, unknown uids are
    still a plain 404 (the view is complete), and once the grant is back the order is stored,
    served and acked."""
    url, role = app_role_url, role_of(app_role_url)
    env = {**route.env(url), "ORDERS_APPLY_SCHEMA": "false"}
    with Worker(tmp_path, **env) as worker:
        await worker.wait_ready()
        admin.run(sql.SQL("REVOKE INSERT ON orders_events FROM {}").format(sql.Identifier(role)))
        (message,) = orders(1, seed=77)
        await route.send([message])

        async def stalled() -> bool:
            status, body, _ = await worker.get("/readyz")
            return status == 503 and orjson.loads(body).get("status") == "stalled"

        await eventually(stalled, "/readyz reports the stall", 30, worker.log_tail)
        _, body, _ = await worker.get("/readyz")
        assert "permission denied" in orjson.loads(body)["problem"]
        assert (await worker.get("/orders/nosuchorder"))[0] == 404
        assert await route.ack_floor_and_pending() == (0, 1), "nothing acked"
        admin.run(sql.SQL("GRANT INSERT ON orders_events TO {}").format(sql.Identifier(role)))
        await wait_for_orders(worker, 1)
        assert (await worker.get(f"/orders/{message.uid}"))[0] == 200
        await worker.wait_ready()

        async def acked() -> bool:
            return await route.ack_floor_and_pending() == (1, 0)

        await eventually(acked, "the order is acked once stored", 30)
    warned = [
        line for line in worker.log().splitlines() if "permission denied" in line and "WARN" in line
    ]
    assert len(warned) == 1, warned


async def test_a_read_replica_runs_on_a_read_only_database(
    tmp_path: Path, database_url: str, admin: Admin, store: PostgresEventStore
) -> None:
    """Promise 4 (hostile environment): a read replica (ORDERS_CONSUME=false) on a database
    that refuses every write, as a hot standby does, checks the schema instead of applying it,
    restores the view and follows the log."""
    await store.write_batch([accepted()], [])
    admin.run(
        sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
            sql.Identifier(admin.database)
        )
    )
    settings = Settings(database_url=database_url, data_dir=tmp_path, consume=False)
    runtime = create_app(settings).runtime
    view = runtime.view
    try:
        await asyncio.wait_for(runtime.on_start(), timeout=30)
        assert runtime.readiness()[0] and len(view) == 1
        writer = Admin(database_url)
        try:
            writer.run("SET default_transaction_read_only = off")
            uid = new_uid()
            writer.run(
                "INSERT INTO orders_events (order_uid, event_type, payload) VALUES (%s, %s, %s)",
                (uid, "OrderPlaced", order_bytes(uid).decode()),
            )
        finally:
            writer.conn.close()

        async def followed() -> bool:
            return uid in view

        await eventually(followed, "the replica follows the log", 20)
    finally:
        await runtime.on_stop()
