"""The agent's batch work against a real PostgreSQL: commit, then project, then settle."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from streams.agent import BatchProcessor
from streams.envelope import Envelope, Outcome
from streams.follower import ViewFollower
from streams.store import PostgresEventStore
from tests.database import DatabaseSwitch
from tests.orders import new_uid, order_bytes
from views.view import OrdersView


def envelopes(*raws: bytes) -> list[Envelope]:
    """The messages in envelopes of two (as from fetches of two), message i named test:i."""

    def sourced(start: int) -> Envelope:
        return Envelope(raws[start : start + 2], lambda index: f"test:{start + index}")

    return [sourced(start) for start in range(0, len(raws), 2)]


async def settled(batch: list[Envelope]) -> list[Outcome]:
    """Wait until every message of ``batch`` is settled; their outcomes in order."""
    return [
        outcome
        for outcomes in await asyncio.gather(*(e.settled for e in batch))
        for outcome in outcomes
    ]


async def process(processor: BatchProcessor, batch: list[Envelope]) -> list[Outcome]:
    """Start the batch's commit and wait until it is settled, as the bridge does."""
    await processor.start_commit(batch)
    return await settled(batch)


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
    await process(processor, envelopes(order_bytes(known)))

    batch = envelopes(
        order_bytes(fresh),
        b"{oops",
        order_bytes(known),  # already in the log
        order_bytes(fresh),  # twice in this batch
        orjson.dumps({"order_uid": "x"}),
    )
    await process(processor, batch)

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
    await process(processor, batch)
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
    await process(processor, batch)
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
    await process(processor, envelopes(order_bytes(new_uid())))  # the pool holds a live connection
    database_switch.refuse()
    batch = envelopes(order_bytes(new_uid()), order_bytes(new_uid()), b"{oops")
    task = asyncio.create_task(process(processor, batch))
    await asyncio.sleep(1.5)
    assert not task.done()
    assert outcomes(batch) == [None, None, None], "nothing settled while the database is away"
    database_switch.allow()
    await asyncio.wait_for(task, timeout=30)
    assert outcomes(batch) == [Outcome.STORED, Outcome.STORED, Outcome.REJECTED]
    assert len(await store.read_events(0, 10)) == 3
    assert len(processor.view) == 3


async def test_two_batches_commit_at_once_and_settle_in_order(
    store: PostgresEventStore, database_switch: DatabaseSwitch
) -> None:
    """submit() starts a commit and returns; two commits may be in flight, a third batch
    waits for room. Nothing is settled before its commit, batches settle in the order
    submitted, and the view ends equal to the log."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await process(processor, envelopes(order_bytes(new_uid())))  # the pool holds a live connection
    uids = [[new_uid(), new_uid()] for _ in range(3)]
    batches = [envelopes(*(order_bytes(uid) for uid in pair)) for pair in uids]
    settle_order: list[int] = []

    def note(number: int) -> Callable[[object], None]:
        return lambda _: settle_order.append(number)

    for number, batch in enumerate(batches):
        for envelope in batch:
            envelope.settled.add_done_callback(note(number))
    database_switch.refuse()
    await asyncio.wait_for(processor.start_commit(batches[0]), timeout=5)
    await asyncio.wait_for(processor.start_commit(batches[1]), timeout=5)
    third = asyncio.create_task(processor.start_commit(batches[2]))
    await asyncio.sleep(1.0)
    assert not third.done(), "a third commit waits until one of two is settled"
    assert [outcomes(batch) for batch in batches] == [[None, None]] * 3
    database_switch.allow()
    await asyncio.wait_for(third, timeout=30)
    await asyncio.wait_for(settled(batches[2]), timeout=30)
    assert [outcomes(batch) for batch in batches] == [[Outcome.STORED] * 2] * 3
    assert settle_order == [0, 1, 2]
    log = {event.order_uid: event.seq for event in await store.read_events(0, 10)}
    assert set(log) >= {uid for pair in uids for uid in pair}
    assert set(processor.view) == set(log)
    assert processor.view.last_seq == max(log.values())


async def test_a_submit_cancelled_while_waiting_fails_its_batch_only(
    store: PostgresEventStore, database_switch: DatabaseSwitch
) -> None:
    """A stop that cancels the agent while its batch waits for room: that batch is failed
    (NATS redelivers it), and the commits already under way still complete."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    await process(processor, envelopes(order_bytes(new_uid())))
    first, second, third = (envelopes(order_bytes(new_uid())) for _ in range(3))
    database_switch.refuse()
    await processor.start_commit(first)
    await processor.start_commit(second)
    submitting = asyncio.create_task(processor.start_commit(third))
    await asyncio.sleep(0.5)
    submitting.cancel()
    await asyncio.gather(submitting, return_exceptions=True)
    assert outcomes(third) == [Outcome.FAILED]
    database_switch.allow()
    await asyncio.wait_for(settled(second), timeout=30)
    assert outcomes(first) == outcomes(second) == [Outcome.STORED]
    assert len(await store.read_events(0, 10)) == 3
