"""The event store against a real PostgreSQL: idempotency, conflicts, replay order, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import quote

import orjson
import psycopg2
import psycopg2.extensions
import pytest

from streams.config import Settings
from streams.store import DeadLetter, PostgresEventStore
from streams.validation import Accepted
from tests.harness import free_port
from tests.orders import new_uid, order_bytes


def accepted(uid: str, **changes: object) -> Accepted:
    return Accepted(uid, order_bytes(uid, **changes))


async def count(store: PostgresEventStore, table: str) -> int:
    rows = await store.fetch(f"SELECT count(*) FROM {table}")
    (value,) = rows[0]
    assert isinstance(value, int)
    return value


async def test_same_uid_twice_in_one_batch_keeps_the_first(store: PostgresEventStore) -> None:
    uid = new_uid()
    first, second = accepted(uid), accepted(uid, locale="ru")
    result = await store.write_batch([first, second], [])
    assert [event.order_uid for event in result.stored] == [uid]
    assert result.stored[0].payload == first.payload
    assert result.duplicates == [uid]
    assert result.conflicts == [uid], "a different payload under a known uid is a conflict"
    (event,) = await store.read_events(0, 10)
    assert event.order_uid == uid
    assert b'"locale": "en"' in event.payload, "the log holds the first payload"


async def test_same_uid_across_batches_is_stored_once(store: PostgresEventStore) -> None:
    uid = new_uid()
    order = accepted(uid)
    first = await store.write_batch([order], [])
    again = await store.write_batch([order], [])
    assert len(first.stored) == 1
    assert again.stored == [] and again.duplicates == [uid]
    assert again.conflicts == [], "the same payload again is a plain duplicate"
    assert await count(store, "orders_events") == 1


async def test_conflicting_duplicate_leaves_the_first_payload(store: PostgresEventStore) -> None:
    uid = new_uid()
    await store.write_batch([accepted(uid, locale="en")], [])
    result = await store.write_batch([accepted(uid, locale="ru")], [])
    assert result.conflicts == [uid]
    (event,) = await store.read_events(0, 10)
    assert b'"locale": "en"' in event.payload


async def test_payload_with_other_whitespace_is_no_conflict(store: PostgresEventStore) -> None:
    uid = new_uid()
    compact = accepted(uid)
    spaced = Accepted(uid, compact.payload.replace(b",", b", "))
    await store.write_batch([compact], [])
    result = await store.write_batch([spaced], [])
    assert result.duplicates == [uid] and result.conflicts == []


async def test_replay_reads_in_seq_order_across_page_boundaries(store: PostgresEventStore) -> None:
    uids = [new_uid() for _ in range(25)]
    for start in range(0, 25, 7):
        await store.write_batch([accepted(uid) for uid in uids[start : start + 7]], [])
    seen: list[str] = []
    seqs: list[int] = []
    after = 0
    while page := await store.read_events(after, 4):
        assert len(page) <= 4
        seen += [event.order_uid for event in page]
        seqs += [event.seq for event in page]
        after = page[-1].seq
    assert seen == uids
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_read_pages_returns_the_rest_of_the_log_in_pages(store: PostgresEventStore) -> None:
    """read_pages (the replay's reader, which asks for a page before handing over the one
    before it) gives every event after the seq it starts from, once, in seq order, in pages
    no larger than asked, with the payloads as the bytes stored."""
    uids = [new_uid() for _ in range(11)]
    await store.write_batch([accepted(uid) for uid in uids], [])
    first = (await store.read_events(0, 1))[0].seq
    pages = [page async for page in store.read_pages(first + 1, 4)]
    assert [len(page) for page in pages] == [4, 4, 1]
    events = [event for page in pages for event in page]
    assert [event.order_uid for event in events] == uids[2:]
    assert [event.seq for event in events] == list(range(first + 2, first + 11))
    assert all(orjson.loads(event.payload)["order_uid"] == event.order_uid for event in events)


async def test_a_replay_stopped_early_returns_its_connections(store: PostgresEventStore) -> None:
    """Leaving read_pages after its first page, while it has asked for the next, hands the
    connections back to the pool in a usable state."""
    await store.write_batch([accepted(new_uid()) for _ in range(6)], [])
    for _ in range(6):  # more times than the pool has connections
        async with contextlib.aclosing(store.read_pages(0, 2)) as pages:
            async for page in pages:
                assert len(page) == 2
                break
    assert len(await store.read_events(0, 100)) == 6


async def test_concurrent_appenders_never_let_a_reader_skip_a_row(database_url: str) -> None:
    """Two writers with overlapping uids and a reader tailing seq > last at the same time: the
    reader ends with every row exactly once, and the log holds each uid once."""
    writers = [await PostgresEventStore.open(database_url) for _ in range(2)]
    reader = await PostgresEventStore.open(database_url)
    uids = [new_uid() for _ in range(600)]
    done = asyncio.Event()
    read: list[int] = []

    async def write(store: PostgresEventStore, offset: int) -> None:
        # Overlapping halves: uids 0..399 and 200..599, in batches of 20.
        mine = uids[offset : offset + 400]
        for start in range(0, len(mine), 20):
            await store.write_batch([accepted(uid) for uid in mine[start : start + 20]], [])

    async def tail() -> None:
        after = 0
        while True:
            finished = done.is_set()
            page = await reader.read_events(after, 50)
            read.extend(event.seq for event in page)
            if page:
                after = page[-1].seq
            elif finished:
                return
            else:
                await asyncio.sleep(0)

    try:
        tailing = asyncio.create_task(tail())
        await asyncio.gather(write(writers[0], 0), write(writers[1], 200))
        done.set()
        await tailing
        all_seqs = [
            row[0] for row in await reader.fetch("SELECT seq FROM orders_events ORDER BY seq")
        ]
        assert len(all_seqs) == 600
        assert read == all_seqs, "the tailing reader saw every committed row, in order, once"
    finally:
        for store in (*writers, reader):
            await store.close()


async def test_rejects_are_dead_lettered_once_per_source(store: PostgresEventStore) -> None:
    letters = [
        DeadLetter(b"{oops", "not valid JSON", "nats:ORDERS:7"),
        DeadLetter(b"\xff", "bad", None),
    ]
    await store.write_batch([], letters)
    await store.write_batch([], letters)  # a redelivery of the same messages
    rows = await store.fetch("SELECT raw, reason, source FROM orders_dead_letters ORDER BY id")
    assert [(bytes(raw), reason, source) for raw, reason, source in rows] == [  # type: ignore[call-overload]
        (b"{oops", "not valid JSON", "nats:ORDERS:7"),
        (b"\xff", "bad", None),
        (b"\xff", "bad", None),
    ], "a known source is kept once; an unknown one cannot be told apart and is kept each time"


async def test_orders_and_rejects_commit_together(store: PostgresEventStore) -> None:
    result = await store.write_batch([accepted(new_uid())], [DeadLetter(b"x", "why", "s:1")])
    assert len(result.stored) == 1 and len(result.dead_lettered) == 1
    assert await count(store, "orders_events") == 1
    assert await count(store, "orders_dead_letters") == 1


async def test_schema_is_applied_idempotently(store: PostgresEventStore) -> None:
    await store.write_batch([accepted(new_uid())], [])
    await store.apply_schema()
    await store.apply_schema()
    assert await count(store, "orders_events") == 1


async def test_seq_is_assigned_by_the_database_only(
    database_url: str, store: PostgresEventStore
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
    check = await PostgresEventStore.open(database_url)
    try:
        assert await count(check, "orders_events") == 1
    finally:
        await check.close()
