"""The agent's batch work against a real PostgreSQL: commit, then project, then settle."""

from __future__ import annotations

import asyncio

import orjson

from streams.agent import BatchProcessor
from streams.envelope import Envelope, Outcome
from streams.store import PostgresEventStore
from tests.database import DatabaseSwitch
from tests.orders import new_uid, order_bytes
from views.follower import ViewFollower
from views.view import OrdersView


def envelopes(*raws: bytes) -> list[Envelope]:
    """The messages in envelopes of two (as from fetches of two), message i named test:i."""

    def sourced(start: int) -> Envelope:
        return Envelope(raws[start : start + 2], lambda index: f"test:{start + index}")

    return [sourced(start) for start in range(0, len(raws), 2)]


def outcomes(batch: list[Envelope]) -> list[Outcome | None]:
    """Each message's outcome in order, None for a message not settled yet."""
    return [
        outcome
        for envelope in batch
        for outcome in (
            envelope.settled.result() if envelope.settled.done() else [None] * len(envelope.raws)
        )
    ]


async def dead_letters(store: PostgresEventStore) -> list[tuple[str, str]]:
    rows = await store.fetch("SELECT source, reason FROM orders_dead_letters ORDER BY id")
    return [(str(source), str(reason)) for source, reason in rows]


async def test_mixed_batch_settles_each_message_by_what_happened(store: PostgresEventStore) -> None:
    known, fresh = new_uid(), new_uid()
    view = OrdersView()
    processor = BatchProcessor(store, ViewFollower(view, store, page_size=100))
    await processor.process(envelopes(order_bytes(known)))

    batch = envelopes(
        order_bytes(fresh),
        b"{oops",
        order_bytes(known),  # already in the log
        order_bytes(fresh),  # twice in this batch
        orjson.dumps({"order_uid": "x"}),
    )
    await processor.process(batch)

    assert outcomes(batch) == [
        Outcome.STORED,
        Outcome.REJECTED,
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
        Outcome.REJECTED,
    ]
    assert set(view) == {known, fresh}
    assert view[fresh] == order_bytes(fresh)
    letters = await dead_letters(store)
    assert [source for source, _ in letters] == ["test:1", "test:4"]
    assert "not valid JSON" in letters[0][1]
    assert "required field is missing" in letters[1][1]


async def test_view_holds_only_what_the_log_holds(store: PostgresEventStore) -> None:
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    batch = envelopes(*(order_bytes(new_uid()) for _ in range(50)), b"[]", b"null")
    await processor.process(batch)
    log = {event.order_uid: event.seq for event in await store.read_events(0, 1000)}
    assert set(processor.view) == set(log)
    assert processor.view.last_seq == max(log.values())


async def test_payload_the_database_refuses_is_dead_lettered_alone(
    store: PostgresEventStore,
) -> None:
    """A message that passes validation but that PostgreSQL cannot store (a number beyond
    numeric's range in an extra field) must not stall the stream: the rest of its batch is
    stored, it is dead-lettered with the database's reason."""
    good, poison = new_uid(), new_uid()
    bad = order_bytes(poison).replace(b'"locale"', b'"x":1e999999,"locale"')
    batch = envelopes(order_bytes(good), bad)
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await processor.process(batch)
    assert outcomes(batch) == [Outcome.STORED, Outcome.REJECTED]
    assert set(processor.view) == {good}
    ((source, reason),) = await dead_letters(store)
    assert source == "test:1" and reason.startswith("refused by PostgreSQL") and "numeric" in reason


async def test_database_outage_mid_run_acks_nothing_until_committed(
    store: PostgresEventStore,
    database_switch: DatabaseSwitch,
) -> None:
    """With the database gone, nothing is settled (so nothing is acked) and the agent keeps
    retrying; when it is back, the same batch commits and every message settles."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await processor.process(envelopes(order_bytes(new_uid())))  # the pool holds a live connection
    database_switch.refuse()
    batch = envelopes(order_bytes(new_uid()), order_bytes(new_uid()), b"{oops")
    task = asyncio.create_task(processor.process(batch))
    await asyncio.sleep(1.5)
    assert not task.done()
    assert outcomes(batch) == [None, None, None], "nothing settled while the database is away"
    database_switch.allow()
    await asyncio.wait_for(task, timeout=30)
    assert outcomes(batch) == [Outcome.STORED, Outcome.STORED, Outcome.REJECTED]
    assert len(await store.read_events(0, 10)) == 3
    assert len(processor.view) == 3


async def test_submitted_batches_commit_one_at_a_time_in_order(
    store: PostgresEventStore, database_switch: DatabaseSwitch
) -> None:
    """submit() validates a batch while the one before it commits, but starts a commit only
    once the one before is settled: the log holds the batches in the order submitted, and a
    batch is never settled before it is committed."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await processor.process(envelopes(order_bytes(new_uid())))  # the pool holds a live connection
    first_uids, second_uids = [new_uid(), new_uid()], [new_uid(), new_uid()]
    first = envelopes(*(order_bytes(uid) for uid in first_uids))
    second = envelopes(*(order_bytes(uid) for uid in second_uids))
    database_switch.refuse()
    await processor.submit(first)  # returns while the first commit waits for the database
    submitting = asyncio.create_task(processor.submit(second))
    await asyncio.sleep(1.0)
    assert not submitting.done(), "the second commit waits for the first"
    assert outcomes(first) == outcomes(second) == [None, None]
    database_switch.allow()
    await asyncio.wait_for(submitting, timeout=30)
    assert outcomes(first) == [Outcome.STORED, Outcome.STORED], "settled before the next began"
    await asyncio.wait_for(processor.drain(), timeout=30)
    assert outcomes(second) == [Outcome.STORED, Outcome.STORED]
    log = [event.order_uid for event in await store.read_events(0, 10)]
    assert log[1:] == first_uids + second_uids
    assert list(processor.view)[1:] == first_uids + second_uids


async def test_a_submit_cancelled_while_waiting_fails_its_batch_only(
    store: PostgresEventStore, database_switch: DatabaseSwitch
) -> None:
    """A stop that cancels the agent while its batch waits for the commit before it: that
    batch is failed (NATS redelivers it), and the commit already under way still completes."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await processor.process(envelopes(order_bytes(new_uid())))
    first = envelopes(order_bytes(new_uid()))
    second = envelopes(order_bytes(new_uid()))
    database_switch.refuse()
    await processor.submit(first)
    submitting = asyncio.create_task(processor.submit(second))
    await asyncio.sleep(0.5)
    submitting.cancel()
    await asyncio.gather(submitting, return_exceptions=True)
    assert outcomes(second) == [Outcome.FAILED]
    database_switch.allow()
    await asyncio.wait_for(processor.drain(), timeout=30)
    assert outcomes(first) == [Outcome.STORED]
    assert len(await store.read_events(0, 10)) == 2
