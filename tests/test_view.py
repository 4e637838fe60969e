"""The view is a pure projection of the log: what replay builds is what the log holds."""

from __future__ import annotations

import orjson

from streams.follower import restore
from streams.store import Event, PostgresEventStore
from streams.validation import Accepted
from tests.database import logged_events
from tests.orders import new_uid, order_bytes
from views.view import OrdersView


async def test_restore_rebuilds_every_order_across_pages(store: PostgresEventStore) -> None:
    uids = [new_uid() for _ in range(23)]
    for start in range(0, 23, 5):
        await store.write_batch([Accepted(u, order_bytes(u)) for u in uids[start : start + 5]], [])
    view = OrdersView()
    pages: list[int] = []
    stats = await restore(view, store, page_size=4, on_page=pages.append)
    assert sorted(view) == sorted(uids)
    assert stats.events == 23 and sum(pages) == 23 and max(pages) == 4
    log = await logged_events(store)
    assert stats.last_seq == log[-1].seq == view.last_seq
    for event in log:
        assert view[event.order_uid] == event.payload
        assert orjson.loads(view[event.order_uid])["order_uid"] == event.order_uid


async def test_restore_continues_from_where_the_view_stands(store: PostgresEventStore) -> None:
    first, second = new_uid(), new_uid()
    await store.write_batch([Accepted(first, order_bytes(first))], [])
    view = OrdersView()
    await restore(view, store, page_size=10)
    await store.write_batch([Accepted(second, order_bytes(second))], [])
    stats = await restore(view, store, page_size=10)
    assert stats.events == 1
    assert set(view) == {first, second}


def test_projection_skips_events_it_already_has() -> None:
    view = OrdersView()
    assert view.project([Event(1, "a", b"1"), Event(2, "b", b"2")]) == 2
    assert view.project([Event(2, "b", b"changed"), Event(3, "c", b"3")]) == 1
    assert dict(view) == {"a": b"1", "b": b"2", "c": b"3"}
    assert view.last_seq == 3
    assert "a" in view and "z" not in view and view.get("z") is None and len(view) == 3


async def test_empty_log_restores_an_empty_view(store: PostgresEventStore) -> None:
    view = OrdersView()
    stats = await restore(view, store, page_size=10)
    assert len(view) == 0 and stats.events == 0 and view.last_seq == 0
