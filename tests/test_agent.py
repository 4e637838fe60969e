"""The agent's batch work: commit, then project, then settle. Against a real PostgreSQL, and,
for the paths a fault on demand reaches faster, against the in-memory store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import orjson

from streams.agent import BatchProcessor
from streams.envelope import Envelope, Outcome
from streams.follower import ViewFollower
from streams.memory_store import InMemoryEventStore
from streams.store import AccessDenied, StatementTimedOut, StoreUnavailable
from streams.validation import Accepted
from tests.database import DatabaseSwitch, InspectedStore, logged_events
from tests.orders import new_uid, order_bytes
from tests.worker import eventually
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


async def dead_letters(store: InspectedStore) -> list[tuple[str, str]]:
    rows = await store.fetch("SELECT source, reason FROM orders_dead_letters ORDER BY id")
    return [(str(source), str(reason)) for source, reason in rows]


async def test_mixed_batch_settles_each_message_by_what_happened(store: InspectedStore) -> None:
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


async def test_view_holds_only_what_the_log_holds(store: InspectedStore) -> None:
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))
    batch = envelopes(*(order_bytes(new_uid()) for _ in range(50)), b"[]", b"null")
    await process(processor, batch)
    log = {event.order_uid: event.seq for event in await logged_events(store)}
    assert set(processor.view) == set(log)
    assert processor.view.last_seq == max(log.values())


async def test_payload_the_database_refuses_is_dead_lettered_alone(
    store: InspectedStore,
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
    store: InspectedStore,
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
    assert len(await logged_events(store)) == 3
    assert len(processor.view) == 3


async def test_two_batches_commit_at_once_and_settle_in_order(
    store: InspectedStore, database_switch: DatabaseSwitch
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
    log = {event.order_uid: event.seq for event in await logged_events(store)}
    assert set(log) >= {uid for pair in uids for uid in pair}
    assert set(processor.view) == set(log)
    assert processor.view.last_seq == max(log.values())


async def test_a_submit_cancelled_while_waiting_fails_its_batch_only(
    store: InspectedStore, database_switch: DatabaseSwitch
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
    assert len(await logged_events(store)) == 3


def in_memory() -> tuple[InMemoryEventStore, BatchProcessor]:
    """An in-memory store and a processor on it, with a view of its own."""
    store = InMemoryEventStore()
    return store, BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))


async def log_uids(store: InMemoryEventStore) -> list[str]:
    return [event.order_uid for event in await logged_events(store)]


async def test_a_slow_order_is_split_off_and_the_batch_behind_it_settles_after_it() -> None:
    """An insert past the statement timeout: the batch is split until the slow order is alone,
    the rest of it and the next batch are committed meanwhile, and nothing settles before the
    slow order does, which is retried until it passes and lands last in the log."""
    store, processor = in_memory()
    slow, *fast = [new_uid() for _ in range(4)]

    def holds_the_slow_order(orders: Sequence[Accepted], _: object) -> bool:
        return any(order.order_uid == slow for order in orders)

    timeout = StatementTimedOut("PostgreSQL: canceling statement due to statement timeout")
    store.fail_writes(timeout, times=None, when=holds_the_slow_order)
    first = envelopes(*(order_bytes(uid) for uid in (fast[0], slow, *fast[1:])))
    later = new_uid()
    second = envelopes(order_bytes(later))
    await processor.start_commit(first)
    await processor.start_commit(second)

    async def the_rest_committed() -> bool:
        return {*fast, later} <= set(await log_uids(store))

    await eventually(the_rest_committed, "every order but the slow one committed", timeout=10)
    assert [slow] in store.writes, "the slow order was tried alone"
    assert outcomes(first) == [None] * 4 and outcomes(second) == [None]
    assert processor.problem is not None and "timeout" in processor.problem
    store.clear_faults()
    await asyncio.wait_for(settled(second), timeout=30)
    assert outcomes(first) == [Outcome.STORED] * 4 and outcomes(second) == [Outcome.STORED]
    assert (await log_uids(store))[-1] == slow
    assert processor.problem is None
    assert set(processor.view) == {slow, later, *fast}


async def test_a_commit_whose_reply_was_lost_settles_as_committed_on_the_retry() -> None:
    """The connection drops while COMMIT is under way and the batch is in after all: the retry
    finds its orders in the log (duplicates, the view reads them from there), its reject is
    known by its source and kept once, and every message is settled as committed."""
    store, processor = in_memory()
    uids = [new_uid(), new_uid()]
    lost = StoreUnavailable("PostgreSQL: COMMIT not confirmed (no answer)")
    store.fail_writes(lost, after_commit=True)
    batch = envelopes(*(order_bytes(uid) for uid in uids), b"{oops")
    await asyncio.wait_for(process(processor, batch), timeout=30)
    assert outcomes(batch) == [Outcome.DUPLICATE, Outcome.DUPLICATE, Outcome.REJECTED]
    assert len(store.writes) == 2
    assert set(processor.view) == set(uids) == set(await log_uids(store))
    assert [letter.source for letter in store.log.dead_letters] == ["test:2"]
    assert processor.problem is None


async def test_a_denied_privilege_stalls_the_agent_until_granted() -> None:
    """While the role may not insert, nothing is settled and the processor's problem (what
    /readyz reports) says why; once granted, the batch commits and the problem clears."""
    store, processor = in_memory()
    denied = AccessDenied("PostgreSQL: permission denied for table orders_events")
    store.fail_writes(denied, times=None)
    batch = envelopes(order_bytes(new_uid()))
    processing = asyncio.create_task(process(processor, batch))

    async def stalled() -> bool:
        return processor.problem is not None

    await eventually(stalled, "the processor reports the refusal", timeout=10)
    assert processor.problem == "PostgreSQL refuses the service's role: permission denied"
    assert outcomes(batch) == [None]
    store.clear_faults()
    await asyncio.wait_for(processing, timeout=30)
    assert outcomes(batch) == [Outcome.STORED]
    assert processor.problem is None


async def test_a_failure_that_is_no_outage_fails_its_batch_and_the_next_goes_on() -> None:
    """An error the store does not name (a bug) is not retried: the batch is failed, so that
    NATS delivers it again, and the agent takes the next batch."""
    store, processor = in_memory()
    store.fail_writes(RuntimeError("a bug"))
    failed = envelopes(order_bytes(new_uid()))
    await process(processor, failed)
    assert outcomes(failed) == [Outcome.FAILED]
    assert await log_uids(store) == []
    redelivered = envelopes(*failed[0].raws)
    await process(processor, redelivered)
    assert outcomes(redelivered) == [Outcome.STORED]
