"""What every event store must do (``streams.events.EventStore``), written once and run
against each store: ``tests/test_store.py`` on PostgreSQL, ``tests/test_memory_store.py`` in
memory.

A store's test class subclasses :class:`EventStoreContract`, gives the fixtures ``store`` (a
store on an empty log) and ``other_writer`` (a second store on the same log: another worker),
and says how to see the dead letters kept.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from typing import Any

import orjson
import pytest

from streams.events import BatchResult, DeadLetter, Event, EventStore, RefusedByDatabase
from streams.validation import Accepted
from tests.orders import new_uid, order_bytes


def accepted(uid: str, **changes: Any) -> Accepted:
    """The model order under ``uid``, as validation accepts it."""
    return Accepted(uid, order_bytes(uid, **changes))


async def log_events(store: EventStore) -> list[Event]:
    """The whole log, in seq order."""
    return [event async for page in store.read_pages(0, 1000) for event in page]


def value(event: Event) -> Any:
    """An event's payload as a JSON value: stores keep the value, not always the bytes."""
    return orjson.loads(event.payload)


class EventStoreContract(abc.ABC):
    """The behaviours every event store shows."""

    @abc.abstractmethod
    async def dead_letters(self, store: EventStore) -> list[DeadLetter]:
        """Every dead letter ``store``'s log keeps, in the order kept."""

    async def test_same_uid_twice_in_one_batch_keeps_the_first(self, store: EventStore) -> None:
        uid = new_uid()
        first, second = accepted(uid), accepted(uid, locale="ru")
        result = await store.write_batch([first, second], [])
        assert [event.order_uid for event in result.stored] == [uid]
        assert result.stored[0].payload == first.payload, "as written, not as read back"
        assert result.duplicates == [uid]
        assert result.conflicts == [uid], "a different payload under a known uid is a conflict"
        (event,) = await log_events(store)
        assert event.order_uid == uid
        assert value(event)["locale"] == "en", "the log holds the first payload"

    async def test_same_uid_across_batches_is_stored_once(self, store: EventStore) -> None:
        uid = new_uid()
        order = accepted(uid)
        first = await store.write_batch([order], [])
        again = await store.write_batch([order, order], [])
        assert len(first.stored) == 1
        assert again.stored == [] and again.duplicates == [uid, uid], "once per order"
        assert again.conflicts == [], "the same payload again is a plain duplicate"
        assert [event.order_uid for event in await log_events(store)] == [uid]

    async def test_conflicting_duplicate_leaves_the_first_payload(self, store: EventStore) -> None:
        uid = new_uid()
        await store.write_batch([accepted(uid, locale="en")], [])
        result = await store.write_batch([accepted(uid, locale="ru"), accepted(uid, sm_id=9)], [])
        assert result.duplicates == [uid, uid]
        assert result.conflicts == [uid], "each conflicting uid named once"
        (event,) = await log_events(store)
        assert value(event)["locale"] == "en"

    async def test_the_same_json_value_in_other_bytes_is_no_conflict(
        self, store: EventStore
    ) -> None:
        uid = new_uid()
        compact = accepted(uid)
        spaced = Accepted(uid, compact.payload.replace(b",", b", "))
        fields = orjson.loads(compact.payload)
        reordered = Accepted(uid, orjson.dumps(dict(reversed(fields.items()))))
        await store.write_batch([compact], [])
        result = await store.write_batch([spaced, reordered], [])
        assert result.duplicates == [uid, uid] and result.conflicts == []

    async def test_numbers_are_compared_by_value_and_true_is_no_number(
        self, store: EventStore
    ) -> None:
        one, other = new_uid(), new_uid()
        await store.write_batch([accepted(one, extra=1), accepted(other, extra=1)], [])
        result = await store.write_batch(
            [accepted(one, extra=1.0), accepted(other, extra=True)], []
        )
        assert result.duplicates == [one, other]
        assert result.conflicts == [other], "1.0 is 1; true is not"

    async def test_an_empty_batch_changes_nothing(self, store: EventStore) -> None:
        assert await store.write_batch([], []) == BatchResult([], [], [], [], previous_seq=0)
        assert await store.head() == 0

    async def test_replay_reads_in_seq_order_across_batches_and_pages(
        self, store: EventStore
    ) -> None:
        uids = [new_uid() for _ in range(25)]
        for start in range(0, 25, 7):
            await store.write_batch([accepted(uid) for uid in uids[start : start + 7]], [])
        pages = [page async for page in store.read_pages(0, 4)]
        assert all(0 < len(page) <= 4 for page in pages)
        events = [event for page in pages for event in page]
        assert [event.order_uid for event in events] == uids
        seqs = [event.seq for event in events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    async def test_read_pages_returns_the_rest_of_the_log_in_pages(self, store: EventStore) -> None:
        """read_pages gives every event after the seq it starts from, once, in seq order, in
        pages no larger than asked; a batch's new events take consecutive seqs."""
        uids = [new_uid() for _ in range(11)]
        await store.write_batch([accepted(uid) for uid in uids], [])
        first = (await log_events(store))[0].seq
        pages = [page async for page in store.read_pages(first + 1, 4)]
        assert [len(page) for page in pages] == [4, 4, 1]
        events = [event for page in pages for event in page]
        assert [event.order_uid for event in events] == uids[2:]
        assert [event.seq for event in events] == list(range(first + 2, first + 11))
        assert all(value(event)["order_uid"] == event.order_uid for event in events)

    async def test_a_replay_stopped_early_leaves_the_store_usable(self, store: EventStore) -> None:
        """Leaving read_pages after its first page, while it may have asked for the next, lets
        go of what it held: more times than a pool has connections, and the store still
        reads and writes."""
        await store.write_batch([accepted(new_uid()) for _ in range(6)], [])
        for _ in range(6):
            async with contextlib.aclosing(store.read_pages(0, 2)) as pages:
                async for page in pages:
                    assert len(page) == 2
                    break
        await store.write_batch([accepted(new_uid())], [])
        assert len(await log_events(store)) == 7

    async def test_concurrent_appenders_never_let_a_reader_skip_a_row(
        self, store: EventStore, other_writer: EventStore
    ) -> None:
        """Two writers with overlapping uids and a reader tailing seq > last at the same time:
        the reader ends with every row exactly once, and the log holds each uid once."""
        uids = [new_uid() for _ in range(600)]
        done = asyncio.Event()
        read: list[int] = []

        async def write(writer: EventStore, offset: int) -> None:
            # Overlapping halves: uids 0..399 and 200..599, in batches of 20.
            mine = uids[offset : offset + 400]
            for start in range(0, len(mine), 20):
                await writer.write_batch([accepted(uid) for uid in mine[start : start + 20]], [])

        async def tail() -> None:
            after = 0
            while True:
                finished = done.is_set()
                pages = [page async for page in store.read_pages(after, 50)]
                read.extend(event.seq for page in pages for event in page)
                if pages:
                    after = pages[-1][-1].seq
                elif finished:
                    return
                else:
                    await asyncio.sleep(0)

        tailing = asyncio.create_task(tail())
        await asyncio.gather(write(store, 0), write(other_writer, 200))
        done.set()
        await tailing
        events = await log_events(store)
        assert sorted(event.order_uid for event in events) == sorted(uids)
        assert read == [event.seq for event in events], "every committed row, in order, once"

    async def test_rejects_are_dead_lettered_once_per_source(self, store: EventStore) -> None:
        letters = [
            DeadLetter(b"{oops", "not valid JSON", "nats:ORDERS:7"),
            DeadLetter(b"\xff", "bad", None),
            DeadLetter(b"{other", "not valid JSON", "nats:ORDERS:7"),
        ]
        first = await store.write_batch([], letters)
        again = await store.write_batch([], letters[:2])  # a redelivery of the same messages
        assert first.dead_lettered == letters and again.dead_lettered == letters[:2]
        assert first.stored == [] and first.previous_seq == 0
        assert await self.dead_letters(store) == [*letters, letters[1]], (
            "a known source is kept once per message under it; an unknown one cannot be told"
            " apart and is kept each time"
        )

    async def test_orders_and_rejects_commit_together(self, store: EventStore) -> None:
        letter = DeadLetter(b"x", "why", "s:1")
        result = await store.write_batch([accepted(new_uid())], [letter])
        assert len(result.stored) == 1 and result.dead_lettered == [letter]
        assert len(await log_events(store)) == 1
        assert await self.dead_letters(store) == [letter]

    async def test_a_payload_that_is_not_json_commits_nothing_of_its_batch(
        self, store: EventStore
    ) -> None:
        good = accepted(new_uid())
        with pytest.raises(RefusedByDatabase):
            await store.write_batch([good, Accepted(new_uid(), b"{oops")], [DeadLetter(b"x", "r")])
        assert await log_events(store) == []
        assert await self.dead_letters(store) == []
        assert len((await store.write_batch([good], [])).stored) == 1, "the store goes on"

    async def test_head_is_the_last_seq_committed(
        self, store: EventStore, other_writer: EventStore
    ) -> None:
        assert await store.head() == 0
        ours = await store.write_batch([accepted(new_uid()) for _ in range(3)], [])
        theirs = await other_writer.write_batch([accepted(new_uid())], [])
        assert await store.head() == theirs.stored[-1].seq > ours.stored[-1].seq
        head = await store.head()
        await store.write_batch([accepted(ours.stored[0].order_uid)], [])
        assert await store.head() == head, "a batch of duplicates adds nothing"

    async def test_previous_seq_is_the_head_just_before_the_new_events(
        self, store: EventStore, other_writer: EventStore
    ) -> None:
        first = await store.write_batch([accepted(new_uid())], [])
        assert first.previous_seq == 0, "the log was empty"
        theirs = await other_writer.write_batch([accepted(new_uid()) for _ in range(2)], [])
        assert theirs.previous_seq == first.stored[-1].seq
        ours = await store.write_batch([accepted(new_uid())], [])
        assert ours.previous_seq == theirs.stored[-1].seq, "another writer's commit between"
        again = await store.write_batch([accepted(ours.stored[0].order_uid)], [])
        assert again.previous_seq == 0, "nothing new: no previous seq"

    async def test_a_listener_hears_other_writers_commits_not_its_own(
        self, store: EventStore, other_writer: EventStore
    ) -> None:
        """A store's listener is woken by another writer's commit of new events, reads every
        announcement at once, and is not woken by its own store's commits nor by a commit
        that stored nothing."""
        listener = await store.listen()
        try:
            await store.write_batch([accepted(new_uid()) for _ in range(2)], [])
            theirs = await other_writer.write_batch([accepted(new_uid())], [])
            assert await listener.wait(5) is True
            assert listener.backlog == 0, "every announcement read at once"
            known = accepted(theirs.stored[0].order_uid)
            await other_writer.write_batch([known], [DeadLetter(b"x", "why", "s:1")])
            await store.write_batch([accepted(new_uid())], [])
            assert await listener.wait(0.5) is False
        finally:
            await listener.close()
