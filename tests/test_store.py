"""The event store on a real PostgreSQL: the contract every store keeps
(tests/store_contract.py), and what only PostgreSQL has to show: the schema, the seqs the
database alone assigns, the notifications, multi-host URLs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote

import psycopg2
import psycopg2.extensions
import pytest

from streams.config import Settings
from streams.store import NOTIFY_CHANNEL, DeadLetter, EventStore, PostgresEventStore
from tests.database import InspectedStore
from tests.harness import free_port
from tests.orders import new_uid
from tests.store_contract import EventStoreContract, accepted
from tests.worker import eventually


async def count(store: InspectedStore, table: str) -> int:
    rows = await store.fetch(f"SELECT count(*) FROM {table}")
    (value,) = rows[0]
    assert isinstance(value, int)
    return value


class TestPostgresEventStore(EventStoreContract):
    """The contract on PostgreSQL; ``store`` is conftest's, on the test's own database."""

    @pytest.fixture
    async def other_writer(self, database_url: str) -> AsyncIterator[PostgresEventStore]:
        """A second store on the same database, as another worker opens it."""
        opened = await PostgresEventStore.open(database_url)
        try:
            yield opened
        finally:
            await opened.close()

    async def dead_letters(self, store: EventStore) -> list[DeadLetter]:
        assert isinstance(store, InspectedStore)
        rows = await store.fetch("SELECT raw, reason, source FROM orders_dead_letters ORDER BY id")
        letters = []
        for raw, reason, source in rows:
            assert isinstance(raw, memoryview) and isinstance(reason, str)
            assert source is None or isinstance(source, str)
            letters.append(DeadLetter(bytes(raw), reason, source))
        return letters


async def test_schema_is_applied_idempotently(store: InspectedStore) -> None:
    await store.write_batch([accepted(new_uid())], [])
    await store.apply_schema()
    await store.apply_schema()
    assert await count(store, "orders_events") == 1


@pytest.mark.parametrize("table", ["orders_events", "orders_view_pages", "orders_dead_letters"])
async def test_a_worker_starting_waits_for_no_commit_of_a_running_one(
    database_url: str, store: InspectedStore, table: str
) -> None:
    """Promise 1 under a rolling start: a second worker applies the schema while the first is
    mid-transaction on a table (holding its row-exclusive lock, as a commit or a page write
    does). The schema already there, applying it again must take no lock that waits for that
    transaction: otherwise the two deadlock when the first then touches another table."""
    running = psycopg2.connect(database_url)
    try:
        with running.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
            starting = await asyncio.wait_for(PostgresEventStore.open(database_url), timeout=15)
            await starting.close()
    finally:
        running.rollback()
        running.close()


async def test_seq_is_assigned_by_the_database_only(
    database_url: str, store: InspectedStore
) -> None:
    """The replay order cannot be forged: an explicit seq is refused."""
    await store.write_batch([accepted(new_uid())], [])
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.GeneratedAlways):
            cur.execute(
                "INSERT INTO orders_events (seq, order_uid, event_type, payload)"
                " VALUES (1, 'x', 't', '{}')"
            )
    finally:
        conn.close()


def multi_host_url(database_url: str, down_port: int) -> str:
    """libpq's multi-host URI naming first a closed port on loopback, then the test database's
    own server (its TCP host or, percent-encoded, its socket directory), read-write only."""
    params = psycopg2.extensions.parse_dsn(database_url)
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW port")
            (port,) = cur.fetchone() or ("5432",)
    finally:
        conn.close()
    userinfo = quote(params.get("user", ""), safe="")
    if params.get("password"):
        userinfo += ":" + quote(params["password"], safe="")
    host = quote(params.get("host", "localhost"), safe="")
    database = quote(params.get("dbname", ""), safe="")
    return (
        f"postgresql://{userinfo}@127.0.0.1:{down_port},{host}:{port}/{database}"
        "?target_session_attrs=read-write"
    )


async def test_a_multi_host_url_reaches_the_first_server_that_answers(database_url: str) -> None:
    """ORDERS_DATABASE_URL takes libpq's multi-host URI as it is: with the first host down,
    the store opens on the next, writable one and commits a batch there."""
    url = multi_host_url(database_url, free_port())
    assert Settings.from_env({"ORDERS_DATABASE_URL": url}).database_url == url
    store = await PostgresEventStore.open(url)
    try:
        uid = new_uid()
        result = await store.write_batch([accepted(uid)], [])
        assert [event.order_uid for event in result.stored] == [uid]
    finally:
        await store.close()
    check = await InspectedStore.open(database_url)
    try:
        assert await count(check, "orders_events") == 1
    finally:
        await check.close()


async def test_a_commit_notifies_its_last_seq_and_its_writer(
    database_url: str, store: InspectedStore
) -> None:
    """The notification of a commit is "<seq> <writer>": the writer lets each store's listener
    leave its own commits out, the seq is for people reading the traffic. It comes on commit,
    once per batch that stored something."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    received: list[str] = []
    try:
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {NOTIFY_CHANNEL}")
        result = await store.write_batch([accepted(new_uid()) for _ in range(3)], [])
        await store.write_batch([accepted(result.stored[0].order_uid)], [])  # nothing new
        # Notifications arrive in commit order: once this one is in, the batches' are too.
        await store.fetch("SELECT pg_notify(%s, 'end')", (NOTIFY_CHANNEL,))

        async def ended() -> bool:
            conn.poll()
            received.extend(notice.payload for notice in conn.notifies)
            conn.notifies.clear()
            return "end" in received

        await eventually(ended, "the notifications came", timeout=10)
        assert received == [f"{result.stored[-1].seq} {store.writer_id}", "end"]
    finally:
        conn.close()
