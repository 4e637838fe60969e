"""The in-memory event store: the contract every store keeps (tests/store_contract.py), the
seqs it hands out as PostgreSQL's identity does, and its faults on demand."""

from __future__ import annotations

import pytest

from streams.events import (
    DeadLetter,
    EventStore,
    RefusedByDatabase,
    StatementTimedOut,
    StoreUnavailable,
)
from streams.memory_store import InMemoryEventStore
from streams.validation import Accepted
from tests.orders import new_uid
from tests.store_contract import EventStoreContract, accepted, log_events


class TestInMemoryEventStore(EventStoreContract):
    """The contract in memory."""

    @pytest.fixture
    def store(self) -> InMemoryEventStore:
        """A store on a log of its own."""
        return InMemoryEventStore()

    @pytest.fixture
    def other_writer(self, store: InMemoryEventStore) -> InMemoryEventStore:
        """A second store on ``store``'s log."""
        return store.another_writer()

    async def dead_letters(self, store: EventStore) -> list[DeadLetter]:
        assert isinstance(store, InMemoryEventStore)
        return list(store.log.dead_letters)


def orders(count: int) -> list[Accepted]:
    return [accepted(new_uid()) for _ in range(count)]


async def test_every_order_proposed_takes_a_seq_as_postgresql_identity_does() -> None:
    """Under INSERT ... ON CONFLICT DO NOTHING PostgreSQL takes a seq for every row proposed,
    duplicates included: the in-memory log leaves the same gaps, so that code that took seqs
    for a count of events fails here too."""
    store = InMemoryEventStore()
    first = await store.write_batch(orders(2), [])
    known = accepted(first.stored[0].order_uid)
    second = await store.write_batch([known, *orders(1)], [])
    assert [event.seq for event in first.stored] == [1, 2]
    assert [event.seq for event in second.stored] == [4]
    assert await store.head() == 4


async def test_a_write_fault_raises_before_anything_is_committed_then_is_used_up() -> None:
    store = InMemoryEventStore()
    store.fail_writes(StatementTimedOut("slow"), times=2)
    batch = orders(2)
    for _ in range(2):
        with pytest.raises(StatementTimedOut):
            await store.write_batch(batch, [DeadLetter(b"x", "why", "s:1")])
    assert await log_events(store) == [] and store.log.dead_letters == []
    assert len((await store.write_batch(batch, [])).stored) == 2
    assert store.writes == [[order.order_uid for order in batch]] * 3, "every call, in order"


async def test_a_write_fault_picks_its_batches_and_lasts_until_cleared() -> None:
    store = InMemoryEventStore()
    slow = accepted(new_uid())
    store.fail_writes(StatementTimedOut("slow"), times=None, when=lambda batch, _: slow in batch)
    assert len((await store.write_batch(orders(3), [])).stored) == 3
    for _ in range(3):
        with pytest.raises(StatementTimedOut):
            await store.write_batch([slow], [])
    store.clear_faults()
    assert len((await store.write_batch([slow], [])).stored) == 1


async def test_a_fault_after_commit_leaves_the_batch_in_as_a_lost_commit_reply_does() -> None:
    store = InMemoryEventStore()
    store.fail_writes(StoreUnavailable("COMMIT not confirmed"), after_commit=True)
    batch = orders(2)
    with pytest.raises(StoreUnavailable):
        await store.write_batch(batch, [])
    again = await store.write_batch(batch, [])
    assert again.stored == [] and again.duplicates == [order.order_uid for order in batch]


async def test_a_refusal_can_be_made_for_what_only_postgresql_refuses() -> None:
    store = InMemoryEventStore()
    store.fail_writes(RefusedByDatabase("numeric field overflow"), times=None)
    with pytest.raises(RefusedByDatabase):
        await store.write_batch(orders(1), [])


async def test_read_faults_reach_head_and_each_page() -> None:
    store = InMemoryEventStore()
    await store.write_batch(orders(3), [])
    store.fail_reads(StoreUnavailable("gone"))
    with pytest.raises(StoreUnavailable):
        await store.head()
    pages = store.read_pages(0, 2)
    assert len(await anext(pages)) == 2
    store.fail_reads(StoreUnavailable("gone"))
    with pytest.raises(StoreUnavailable):
        await anext(pages)
    assert len(await log_events(store)) == 3


async def test_listen_faults_and_dropped_listeners() -> None:
    store = InMemoryEventStore()
    other = store.another_writer()
    store.fail_listen(StoreUnavailable("cannot execute LISTEN during recovery"))
    with pytest.raises(StoreUnavailable):
        await store.listen()
    listener = await store.listen()
    await other.write_batch(orders(1), [])
    assert listener.backlog == 1
    store.drop_listeners()
    with pytest.raises(StoreUnavailable):
        await listener.wait(5)
    await other.write_batch(orders(1), [])
    assert listener.backlog == 1, "a lost listener hears nothing more"
    await listener.close()


async def test_a_closed_store_refuses_every_call_and_closes_its_listeners() -> None:
    store = InMemoryEventStore()
    listener = await store.listen()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await listener.wait(5)
    with pytest.raises(StoreUnavailable):
        await store.write_batch(orders(1), [])
    with pytest.raises(StoreUnavailable):
        await store.head()
