"""Every worker's view follows the log, whoever wrote to it: on a real PostgreSQL, and, for
the paths a fault on demand reaches faster, on the in-memory store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from streams.follower import ViewFollower
from streams.memory_store import InMemoryEventStore
from streams.store import (
    BatchResult,
    EventStore,
    Listener,
    PostgresEventStore,
    StoreUnavailable,
)
from streams.validation import Accepted
from tests.database import DatabaseSwitch, logged_events
from tests.orders import new_uid, order_bytes
from tests.worker import eventually
from views.view import OrdersView


async def commit(follower: ViewFollower, store: EventStore, count: int) -> BatchResult:
    """Write ``count`` new orders and apply them, as the agent does."""
    result = await store.write_batch(accepted(count), [])
    await follower.apply(result)
    return result


def accepted(count: int) -> list[Accepted]:
    uids = [new_uid() for _ in range(count)]
    return [Accepted(uid, order_bytes(uid)) for uid in uids]


@pytest.fixture
async def other_writer(database_url: str) -> AsyncIterator[PostgresEventStore]:
    """A second store on the same database: another worker's writes."""
    store = await PostgresEventStore.open(database_url)
    try:
        yield store
    finally:
        await store.close()


async def log_uids(store: PostgresEventStore) -> list[str]:
    return [event.order_uid for event in await logged_events(store)]


async def test_own_commit_after_another_writer_brings_both_in_log_order(
    store: PostgresEventStore, other_writer: PostgresEventStore
) -> None:
    """The other writer's events sit between the view and our batch: they are read from the
    log first, so the view never jumps over them."""
    follower = ViewFollower(OrdersView(), store, page_size=3)
    await commit(follower, store, 2)
    theirs = await other_writer.write_batch(accepted(5), [])
    ours = await commit(follower, store, 2)
    assert ours.previous_seq == theirs.stored[-1].seq
    assert list(follower.view) == await log_uids(store)
    assert follower.lag == 0


async def test_single_writer_projects_its_batches_without_reading_them_back(
    store: PostgresEventStore,
) -> None:
    follower = ViewFollower(OrdersView(), store, page_size=10)
    for _ in range(3):
        before = follower.view.last_seq
        result = await commit(follower, store, 4)
        assert result.previous_seq == before, "nothing came in between: no read back"
    assert list(follower.view) == await log_uids(store)


async def test_notification_brings_another_writers_events_without_waiting_for_the_poll(
    store: PostgresEventStore, other_writer: PostgresEventStore
) -> None:
    follower = ViewFollower(OrdersView(), store, page_size=100)
    following = asyncio.create_task(follower.follow(poll_s=60))
    try:
        await asyncio.sleep(0.5)  # LISTEN in place
        await other_writer.write_batch(accepted(7), [])

        async def caught_up() -> bool:
            return len(follower.view) == 7

        await eventually(caught_up, "7 orders followed through NOTIFY", timeout=10)
    finally:
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following


async def test_dropped_listen_connection_is_replaced_and_the_view_catches_up(
    database_switch: DatabaseSwitch,
    store: PostgresEventStore,
    other_writer: PostgresEventStore,
) -> None:
    """The LISTEN connection killed from the server side (pg_terminate_backend): the follower
    connects again and reads what it missed."""
    follower = ViewFollower(OrdersView(), store, page_size=100)
    following = asyncio.create_task(follower.follow(poll_s=60))
    try:
        await asyncio.sleep(0.5)
        assert database_switch.terminate("LISTEN orders_events") == 1
        await other_writer.write_batch(accepted(3), [])

        async def caught_up() -> bool:
            return len(follower.view) == 3

        await eventually(caught_up, "the view caught up after the LISTEN connection died", 20)
    finally:
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following


async def test_lag_is_measured_against_the_log_head(
    store: PostgresEventStore, other_writer: PostgresEventStore
) -> None:
    follower = ViewFollower(OrdersView(), store, page_size=100)
    await other_writer.write_batch(accepted(4), [])
    follower.head = await store.head()
    assert follower.lag == follower.head > 0
    await follower.catch_up()
    assert follower.lag == 0


async def test_projection_that_cannot_read_the_log_leaves_the_view_behind_not_broken(
    store: PostgresEventStore, other_writer: PostgresEventStore, database_switch: DatabaseSwitch
) -> None:
    """Committed, but the database goes away before the gap to another writer's events is
    read: apply() does not raise (the batch is still settled and acked), the view stays
    behind with the lag visible, and the next catch-up brings everything in order."""
    follower = ViewFollower(OrdersView(), store, page_size=100)
    await other_writer.write_batch(accepted(2), [])
    ours = await store.write_batch(accepted(3), [])
    database_switch.refuse()
    await follower.apply(ours)
    assert len(follower.view) == 0
    assert follower.lag == ours.stored[-1].seq
    database_switch.allow()
    await follower.catch_up()
    assert list(follower.view) == await log_uids(store)
    assert follower.lag == 0


async def test_own_notifications_are_left_to_the_agent(
    store: PostgresEventStore, other_writer: PostgresEventStore
) -> None:
    """The listener of a store skips the notifications of that store's own commits (its
    agent projects them as they are) and passes on other writers'."""
    listener = await store.listen()
    try:
        await store.write_batch(accepted(2), [])
        assert await listener.wait(0.5) is False
        await other_writer.write_batch(accepted(1), [])
        assert await listener.wait(5) is True
    finally:
        await listener.close()


class _HotStandbyStore(PostgresEventStore):
    """A store on a server that refuses LISTEN, as a hot standby does."""

    async def listen(self) -> Listener:
        raise StoreUnavailable("cannot execute LISTEN during recovery")


async def test_without_listen_the_poll_keeps_the_view_following(
    database_url: str, other_writer: PostgresEventStore
) -> None:
    standby = await _HotStandbyStore.open(database_url)
    follower = ViewFollower(OrdersView(), standby, page_size=100)
    following = asyncio.create_task(follower.follow(poll_s=0.2))
    try:
        await other_writer.write_batch(accepted(3), [])

        async def caught_up() -> bool:
            return len(follower.view) == 3

        await eventually(caught_up, "the poll brought the orders without LISTEN", timeout=10)
    finally:
        following.cancel()
        with pytest.raises(asyncio.CancelledError):
            await following
        await standby.close()


async def test_own_events_read_back_first_are_served_as_published(
    store: PostgresEventStore,
) -> None:
    """A catch-up may read the worker's own commit from the log (jsonb text) before the agent
    projects it; the agent's projection then gives the view the bytes as published."""
    follower = ViewFollower(OrdersView(), store, page_size=100)
    orders = [Accepted(uid, order_bytes(uid).replace(b",", b", ")) for uid in (new_uid(),)]
    result = await store.write_batch(orders, [])
    await follower.catch_up()
    (uid,) = [order.order_uid for order in orders]
    assert follower.view[uid] != orders[0].payload, "read back as PostgreSQL gives it"
    await follower.apply(result)
    assert follower.view[uid] == orders[0].payload


@contextlib.asynccontextmanager
async def following(follower: ViewFollower, poll_s: float) -> AsyncIterator[None]:
    """The follower's follow() running for the block, cancelled after it."""
    task = asyncio.create_task(follower.follow(poll_s))
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def view_holds(follower: ViewFollower, store: InMemoryEventStore, what: str) -> None:
    """Wait until the follower's view holds the whole log, in log order (looked at in the log
    itself, past the store's faults)."""

    async def caught_up() -> bool:
        return list(follower.view) == [event.order_uid for event in store.log.events]

    await eventually(caught_up, what, timeout=10)


async def test_a_view_behind_reads_the_gap_before_its_own_batch_in_memory() -> None:
    """Other writers' commits between the view and our batch are read from the log, across
    pages, before our batch goes in: the view never jumps over them."""
    store = InMemoryEventStore()
    other = store.another_writer()
    follower = ViewFollower(OrdersView(), store, page_size=2)
    await commit(follower, store, 1)
    theirs = [await other.write_batch(accepted(2), []) for _ in range(3)]
    ours = await commit(follower, store, 2)
    assert ours.previous_seq == theirs[-1].stored[-1].seq
    assert list(follower.view) == [e.order_uid for e in await logged_events(store)]
    assert follower.head == ours.stored[-1].seq and follower.lag == 0


async def test_a_gap_that_cannot_be_read_is_caught_up_by_the_next_poll() -> None:
    """apply() cannot read the gap (the database away): it leaves the view behind with the
    lag visible, and follow()'s poll, seeing the lag, catches up once reads pass again."""
    store = InMemoryEventStore()
    other = store.another_writer()
    follower = ViewFollower(OrdersView(), store, page_size=100)
    await other.write_batch(accepted(2), [])
    ours = await store.write_batch(accepted(3), [])
    store.fail_reads(StoreUnavailable("PostgreSQL: the connection was lost"), times=3)
    await follower.apply(ours)
    assert len(follower.view) == 0
    assert follower.lag == ours.stored[-1].seq
    async with following(follower, poll_s=0.05):
        await view_holds(follower, store, "the poll caught the view up")


async def test_a_lost_listener_is_replaced_and_what_it_missed_is_read() -> None:
    """The listener is lost (its connection ended): the follower listens again at once and
    reads the commits made meanwhile, long before its next poll."""
    store = InMemoryEventStore()
    other = store.another_writer()
    follower = ViewFollower(OrdersView(), store, page_size=100)
    async with following(follower, poll_s=60):
        await other.write_batch(accepted(2), [])
        await view_holds(follower, store, "another writer's commit followed")
        store.drop_listeners()
        await other.write_batch(accepted(3), [])
        await view_holds(follower, store, "the commit made while the listener was lost")
    assert len(follower.view) == 5
