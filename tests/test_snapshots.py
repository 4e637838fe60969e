"""Snapshot pages: a start takes in only pages that agree with the log (invariant 3), and one
that disagrees, whatever made it so, is dropped and its orders read from the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import psycopg2
import pytest

from streams.follower import ViewFollower, restore
from streams.snapshots import PageWriter, SnapshotRestore, decode_page, encode_page
from streams.store import Event, PostgresEventStore
from streams.validation import Accepted
from tests.database import InspectedStore
from tests.flow import wait_for_orders
from tests.harness import Route
from tests.orders import new_uid, order_bytes, orders
from tests.worker import Worker, eventually
from views.view import Codec, OrdersView

PAGE: int = 10
TRAIN: int = 10


async def _append(store: PostgresEventStore, count: int) -> list[str]:
    uids = [new_uid() for _ in range(count)]
    for start in range(0, count, 7):
        chunk = uids[start : start + 7]
        await store.write_batch([Accepted(uid, order_bytes(uid)) for uid in chunk], [])
    return uids


def _follower(store: PostgresEventStore) -> ViewFollower:
    return ViewFollower(
        OrdersView(train_after=TRAIN), store, 16, snapshots=store, snapshot_page_orders=PAGE
    )


async def _write_pages(store: PostgresEventStore) -> ViewFollower:
    """A writer's view of the log, with every whole page of it written."""
    writer = _follower(store)
    await writer.boot()
    while await writer.write_snapshot_page():
        pass
    return writer


async def _log_view(store: PostgresEventStore) -> dict[str, object]:
    """What the log says the view must serve: uid -> JSON value."""
    view = OrdersView()
    await restore(view, store, 100)
    return {uid: orjson.loads(payload) for uid, payload in view.items()}


def _values(view: OrdersView) -> dict[str, object]:
    return {uid: orjson.loads(payload) for uid, payload in view.items()}


async def _pages(store: InspectedStore) -> list[tuple[int, int]]:
    rows = await store.fetch("SELECT after_seq, last_seq FROM orders_view_pages ORDER BY 1")
    return [(int(str(after)), int(str(last))) for after, last in rows]


def _admin(store: InspectedStore, url: str, *statements: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


async def test_a_start_takes_the_pages_then_the_tail_of_the_log(
    store: InspectedStore, caplog: pytest.LogCaptureFixture
) -> None:
    await _append(store, 45)
    await _write_pages(store)
    assert len(await _pages(store)) == 4
    tail = await _append(store, 3)
    booted = _follower(store)
    with caplog.at_level(logging.INFO, logger="streams.follower"):
        stats = await booted.boot()
    assert "view: 40 orders from 4 snapshot pages" in caplog.text
    assert stats.events == 48 and booted.view.last_seq == await store.head()
    assert _values(booted.view) == await _log_view(store)
    assert all(uid in booted.view for uid in tail)
    assert list(booted.view) == list((await _log_view(store)).keys())  # in seq order


async def test_the_replay_command_reads_the_log_not_the_pages(store: InspectedStore) -> None:
    await _append(store, 30)
    await _write_pages(store)
    replayed = _follower(store)
    stats = await replayed.catch_up()
    assert stats.events == 30


async def test_rows_deleted_from_the_log_drop_every_page(
    store: InspectedStore, database_url: str
) -> None:
    """The trigger: a DELETE of the log (by its owner; the service may not) drops the pages,
    and the next start rebuilds the view from the log alone."""
    uids = await _append(store, 30)
    await _write_pages(store)
    _admin(store, database_url, f"DELETE FROM orders_events WHERE order_uid = '{uids[4]}'")
    assert await _pages(store) == []
    booted = _follower(store)
    await booted.boot()
    assert uids[4] not in booted.view
    assert _values(booted.view) == await _log_view(store)


async def test_pages_covering_rows_deleted_with_triggers_off_are_refused(
    store: InspectedStore, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    uids = await _append(store, 30)
    await _write_pages(store)
    pages = await _pages(store)
    _admin(
        store,
        database_url,
        "SET session_replication_role = replica",
        f"DELETE FROM orders_events WHERE order_uid = '{uids[14]}'",
    )
    assert await _pages(store) == pages  # the trigger did not fire
    booted = _follower(store)
    with caplog.at_level(logging.WARNING, logger="streams.snapshots"):
        await booted.boot()
    assert "holds 10 orders where the log holds 9" in caplog.text
    assert f"rebuilt from the log from seq {pages[1][0] + 1}" in caplog.text
    assert uids[14] not in booted.view
    assert _values(booted.view) == await _log_view(store)
    assert await _pages(store) == pages[:1]  # the refused page and those after it are gone
    while await booted.write_snapshot_page():
        pass
    again = _follower(store)
    await again.boot()
    assert _values(again.view) == await _log_view(store)
    assert len(await _pages(store)) == 2


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("UPDATE orders_view_pages SET body = substring(body from 1 for 100)", "its digest"),
        (
            "UPDATE orders_view_pages SET body = substring(body from 1 for 100),"
            " body_sha256 = sha256(substring(body from 1 for 100))",
            "as long as its header",
        ),
        (
            "UPDATE orders_view_dictionary SET dictionary = substring(dictionary from 1 for 900),"
            " sha256 = sha256(substring(dictionary from 1 for 900))",
            "another dictionary",
        ),
        ("UPDATE orders_view_pages SET last_seq = last_seq + 1", "not those of its range"),
    ],
)
async def test_a_damaged_page_or_dictionary_is_refused(
    store: InspectedStore,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    damage: str,
    reason: str,
) -> None:
    await _append(store, 25)
    await _write_pages(store)
    _admin(store, database_url, damage)
    booted = _follower(store)
    with caplog.at_level(logging.WARNING, logger="streams.snapshots"):
        stats = await booted.boot()
    assert reason in caplog.text and "rebuilt from the log from seq 1" in caplog.text
    assert stats.events == 25
    assert _values(booted.view) == await _log_view(store)


async def test_a_page_of_another_writer_that_disagrees_with_the_log_is_refused(
    store: InspectedStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Whole, with the right digests and the right count, but one order is not the log's: a
    buggy or foreign writer. With pages of 10 and 16 spot checks every order is checked."""
    await _append(store, 20)
    writer = await _write_pages(store)
    codec = writer.view.codec
    assert codec is not None
    first = await anext(aiter(store.snapshot_pages()))
    seqs, uids, frames = decode_page(first)
    value = orjson.loads(codec.decompress(frames[3]))
    value["delivery"]["city"] = "Elsewhere"
    frames[3] = codec.compress(orjson.dumps(value))
    forged = encode_page(0, seqs, uids, frames, codec.dictionary)
    await store.drop_pages(0)
    assert await store.write_page(forged)
    booted = _follower(store)
    with caplog.at_level(logging.WARNING, logger="streams.snapshots"):
        await booted.boot()
    assert f"its order at seq {seqs[3]} differs from the log's" in caplog.text
    assert _values(booted.view) == await _log_view(store)


async def test_two_writers_writing_pages_at_once_leave_one_chain(store: InspectedStore) -> None:
    """Two writers that trained dictionaries of their own: the first to publish wins, the other
    recompresses its view with it, and the pages both write are one chain the next start takes."""
    await _append(store, 35)
    first, second = _follower(store), _follower(store)
    await first.boot()
    await second.boot()
    assert first.view.codec is not None and second.view.codec is not None

    async def write_all(follower: ViewFollower) -> None:
        while await follower.write_snapshot_page():
            pass  # each write awaits the database, so the two writers interleave

    await asyncio.gather(write_all(first), write_all(second))
    dictionary = await store.read_dictionary()
    assert first.view.codec.dictionary == second.view.codec.dictionary == dictionary
    assert len(await _pages(store)) == 3
    booted = _follower(store)
    stats = await booted.boot()
    assert stats.events == 35 and _values(booted.view) == await _log_view(store)
    assert _values(first.view) == _values(second.view) == _values(booted.view)


async def test_a_page_write_cut_short_leaves_no_page(store: InspectedStore) -> None:
    """A writer that dies while it sends a page (here: its task cancelled mid-statement)
    commits nothing: the next start finds the pages before it, then reads the log."""
    await _append(store, 30)
    writer = _follower(store)
    await writer.boot()
    assert await writer.write_snapshot_page()
    ((_, last),) = await _pages(store)
    pages = PageWriter(writer.view, store, PAGE)
    pages.taken_from_pages(SnapshotRestore(pages=1, orders=PAGE, last_seq=last))
    task = asyncio.ensure_future(pages.write_one())
    await asyncio.sleep(0.002)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    booted = _follower(store)
    await booted.boot()
    assert _values(booted.view) == await _log_view(store)
    assert (await _pages(store))[0] == (0, last)


async def test_a_worker_killed_while_writing_pages_boots_whole(
    tmp_path: Path, store: InspectedStore, database_url: str, route: Route
) -> None:
    """SIGKILL a worker as soon as two of its pages are in, most likely while it writes the
    others; the next worker serves every order of the log, from whatever pages were committed
    and the log, and keeps the pages that were."""
    batch = orders(300, seed=81)
    env = {**route.env(database_url), "ORDERS_SNAPSHOT_PAGE_ORDERS": "5"}
    with Worker(tmp_path / "a", **env) as first:
        await first.wait_ready()
        await route.send(batch)
        await wait_for_orders(first, 300)

        async def some_pages() -> bool:
            return len(await _pages(store)) >= 2

        await eventually(some_pages, "two snapshot pages written", 30, first.log_tail)
        first.kill()
    written = await _pages(store)  # some or, on a fast machine, all of its 60 pages
    with Worker(tmp_path / "b", **env) as second:
        ready = await second.wait_ready()
        assert ready["orders"] == 300
        for message in batch[::37]:
            status, body, _ = await second.get(f"/orders/{message.uid}")
            assert status == 200 and orjson.loads(body) == orjson.loads(message.data)
    after = await _pages(store)
    assert after[: len(written)] == written


def test_frames_round_trip_and_a_codec_needs_samples() -> None:
    samples = [order_bytes(new_uid()) for _ in range(TRAIN)]
    assert Codec.train(samples[:2]) is None
    view = OrdersView(train_after=TRAIN)
    view.project([Event(seq, uid_of(p), p) for seq, p in enumerate(samples, start=1)])
    assert view.codec is not None
    assert [view[uid_of(p)] for p in samples] == samples
    seqs, uids, frames = view.packed(0, TRAIN)
    assert sum(map(len, frames)) < sum(map(len, samples)) / 3
    page = encode_page(0, seqs, uids, frames, view.codec.dictionary)
    assert decode_page(page) == (seqs, uids, frames)
    with pytest.raises(ValueError, match="not after"):
        view.project_packed(seqs, uids, frames)


def uid_of(payload: bytes) -> str:
    return str(orjson.loads(payload)["order_uid"])


def test_a_view_too_small_to_train_on_trains_on_more_at_once() -> None:
    """Five orders are too few for a dictionary; a view fed many more in one batch trains on
    twice as many straight away rather than waiting for another batch."""
    view = OrdersView(train_after=5)
    payloads = [order_bytes(new_uid()) for _ in range(40)]
    view.project([Event(seq, uid_of(p), p) for seq, p in enumerate(payloads, start=1)])
    assert view.codec is not None
    assert [view[uid_of(p)] for p in payloads] == payloads
