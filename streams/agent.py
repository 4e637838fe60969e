"""What the agent does with a batch: validate, commit, project into the view, then settle;
two batches commit at once, and are projected and settled in order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

from streams.config import COMMITS_IN_FLIGHT
from streams.envelope import Envelope, Outcome
from streams.follower import ViewFollower
from streams.metrics import Metrics, reason_class
from streams.retry import Backoff, Episode
from streams.store import (
    AccessDenied,
    BatchResult,
    DeadLetter,
    EventStore,
    RefusedByDatabase,
    StatementTimedOut,
    StoreUnavailable,
)
from streams.validation import Accepted, Rejected, validate

log = logging.getLogger(__name__)

_FIRST_RETRY_S: Final = 0.1
_SUMMARY_EVERY_S: Final = 5.0

# Where a message sits in a batch: (envelope, message) indexes.
_Position = tuple[int, int]
_Order = tuple[_Position, Accepted]
_Reject = tuple[_Position, DeadLetter]


class BatchProcessor:
    """Turns a batch of envelopes into committed events and dead letters.

    The order of work is the service's promise: commit first, then project into the view,
    then settle the envelopes so that the bridge may ack. A database that is away is retried
    with backoff for as long as it takes; the batch is never acked meanwhile. A batch whose
    statement runs past the timeout is split, so that one slow order keeps no other order of
    its batch out of the log (later batches still settle after it, in order).
    While writes fail, :attr:`problem` says why (for /readyz).
    """

    def __init__(
        self,
        store: EventStore,
        follower: ViewFollower,
        *,
        log_uids_max: int = 10,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.follower = follower
        self.view = follower.view
        self.metrics = metrics or Metrics()
        self._activity = _ActivityLog(log_uids_max)
        self._outage = _Outage()
        self._committing: asyncio.Task[None] | None = None
        self._room = asyncio.Semaphore(COMMITS_IN_FLIGHT)

    @property
    def problem(self) -> str | None:
        """Why writes are failing right now, or ``None`` while they succeed."""
        return self._outage.problem

    async def start_commit(self, batch: Sequence[Envelope]) -> None:
        """Validate ``batch``, start its commit, and return without waiting for it.

        ``COMMITS_IN_FLIGHT`` commits run at once, each on its own connection: PostgreSQL's
        append lock makes the second wait inside the database and go on the moment the first
        commits, instead of waiting for this process to come round to it; a further batch
        waits here for room. Batches are applied to the view and settled one at a time, in the
        order started, and each only after its commit: ``Envelope.settled`` says when. Never
        raises but for cancellation, and a batch cancelled while it waits for room is failed
        (NATS delivers it again).
        """
        started = time.perf_counter()
        orders, rejects = _validate(batch)
        try:
            await self._room.acquire()
        except asyncio.CancelledError:
            for envelope in batch:
                envelope.fail()
            raise
        self._committing = asyncio.create_task(
            self._commit_staged(batch, orders, rejects, started, self._committing),
            name="orders-commit",
        )

    async def _commit_staged(
        self,
        batch: Sequence[Envelope],
        orders: list[_Order],
        rejects: list[_Reject],
        started: float,
        before: asyncio.Task[None] | None,
    ) -> None:
        refused: set[_Position] = set()
        try:
            try:
                results = await self._commit(orders, rejects, refused, batch)
            except Exception:
                # A bug, not the data nor the database: keep the stream moving, redeliver.
                log.exception("batch of %d envelopes failed; they will be redelivered", len(batch))
                for envelope in batch:
                    envelope.fail()
                return
            finally:
                if before is not None:
                    # Applied and settled in order. Shielded: a cancelled commit must not
                    # cancel the one before it. It never raises: it is this method.
                    await asyncio.shield(before)
            try:
                for result in results:
                    await self.follower.apply(result)
            except Exception:
                # Committed is committed: settle (and ack) even if the view catches up later.
                log.exception("projecting a committed batch failed; the view catches up later")
        finally:
            self._room.release()
        self._settle(batch, orders, refused, results)
        seconds = time.perf_counter() - started
        self._activity.batch(results, seconds)
        self._count(sum(len(envelope.raws) for envelope in batch), results, seconds)

    @staticmethod
    def _settle(
        batch: Sequence[Envelope],
        orders: list[_Order],
        refused: set[_Position],
        results: list[BatchResult],
    ) -> None:
        outcomes = [[Outcome.REJECTED] * len(envelope.raws) for envelope in batch]
        stored_uids = {event.order_uid for result in results for event in result.stored}
        for (envelope_index, index), order in orders:
            if (envelope_index, index) in refused:
                continue
            if order.order_uid in stored_uids:
                # The first message with a new uid stored it; later ones in the batch repeat it.
                stored_uids.discard(order.order_uid)
                outcomes[envelope_index][index] = Outcome.STORED
            else:
                outcomes[envelope_index][index] = Outcome.DUPLICATE
        for envelope, envelope_outcomes in zip(batch, outcomes, strict=True):
            envelope.settle(envelope_outcomes)

    def _count(self, received: int, results: list[BatchResult], seconds: float) -> None:
        metrics = self.metrics
        metrics.messages.inc(received)
        metrics.batches.inc()
        metrics.batch_size.observe(received)
        metrics.commit_seconds.observe(seconds)
        reasons: dict[str, int] = {}
        for result in results:
            metrics.stored.inc(len(result.stored))
            metrics.duplicates.inc(len(result.duplicates))
            metrics.conflicts.inc(len(result.conflicts))
            for letter in result.dead_lettered:
                kind = reason_class(letter.reason)
                reasons[kind] = reasons.get(kind, 0) + 1
        for kind, count in reasons.items():
            metrics.dead_lettered.labels(kind).inc(count)

    async def _commit(
        self,
        orders: list[_Order],
        rejects: list[_Reject],
        refused: set[_Position],
        batch: Sequence[Envelope],
    ) -> list[BatchResult]:
        slow: list[_Order] = []
        results = await self._commit_splitting(orders, rejects, refused, batch, slow)
        # Orders too slow even alone wait until the rest of the batch is in, then are retried
        # for as long as it takes (or dead-lettered if PostgreSQL refuses them).
        for order in slow:
            results.extend(await self._commit([order], [], refused, batch))
        return results

    async def _commit_splitting(
        self,
        orders: list[_Order],
        rejects: list[_Reject],
        refused: set[_Position],
        batch: Sequence[Envelope],
        slow: list[_Order],
    ) -> list[BatchResult]:
        try:
            return [await self._write_retrying(orders, rejects)]
        except StatementTimedOut:
            pass  # raised only for what can be split: split below
        except RefusedByDatabase as refusal:
            if len(orders) == 1:
                position, order = orders[0]
                refused.add(position)
                source = batch[position[0]].source(position[1])
                letter = DeadLetter(order.payload, f"refused by PostgreSQL: {refusal}", source)
                return await self._commit([], [*rejects, (position, letter)], refused, batch)
            if not orders:
                raise
        # One payload the database will not take, or one too slow to insert, must not hold
        # up the others: the rejects go alone, and the orders in halves until the culprit is
        # alone.
        results = [await self._write_retrying([], rejects)] if rejects else []
        middle = len(orders) // 2
        for half in (orders[:middle], orders[middle:]):
            if len(half) == 1 and await self._too_slow(half[0], results):
                slow.append(half[0])
            elif half:
                results.extend(await self._commit_splitting(half, [], refused, batch, slow))
        return results

    async def _too_slow(self, order: _Order, results: list[BatchResult]) -> bool:
        """One try of a lone order: True (and the outage told) if it ran past the timeout,
        else its result is added to ``results`` (or it is left to the usual retries)."""
        try:
            result = await self.store.write_batch([order[1]], [])
        except StatementTimedOut as exc:
            self._outage.failed(order, exc, 1)
            return True
        except (StoreUnavailable, RefusedByDatabase):
            return False  # to _commit, which retries or dead-letters it as usual
        results.append(result)
        return False

    async def _write_retrying(self, orders: list[_Order], rejects: list[_Reject]) -> BatchResult:
        backoff = Backoff(first=_FIRST_RETRY_S)
        # What the outage knows this write by: the order itself when it is a lone one, so
        # that an order set aside as too slow stays the same failing write.
        write: object = orders[0] if len(orders) == 1 and not rejects else object()
        while True:
            try:
                result = await self.store.write_batch(
                    [order for _, order in orders], [reject for _, reject in rejects]
                )
            except StatementTimedOut as exc:
                if len(orders) + bool(rejects) > 1:
                    self._outage.succeeded(write)
                    raise  # to be split by _commit
                self._outage.failed(write, exc, len(orders) + len(rejects))
            except StoreUnavailable as exc:
                self._outage.failed(write, exc, len(orders) + len(rejects))
            else:
                self._outage.succeeded(write)
                return result
            self.metrics.database_retries.inc()
            await asyncio.sleep(backoff.next())


class _Outage:
    """Failing writes, told once per episode (:class:`Episode`): the first failure, a
    reminder now and then while it lasts, and a summary when no write is failing any more.
    An episode lasts while any write in flight (each known by a token) is failing."""

    def __init__(self) -> None:
        self._episode = Episode(log)
        self._failing: set[int] = set()

    @property
    def problem(self) -> str | None:
        return self._episode.problem

    def failed(self, write: object, exc: StoreUnavailable, messages: int) -> None:
        self._failing.add(id(write))
        problem = _describe(exc)
        self._episode.failed(
            problem, "%s; %d message(s) kept unacknowledged and retried: %s", problem, messages, exc
        )

    def succeeded(self, write: object) -> None:
        self._failing.discard(id(write))
        if self._failing:
            return
        episode = self._episode
        episode.over(
            "writes succeed again after %.1f s and %d retries (%s)",
            time.monotonic() - episode.since,
            episode.failures,
            episode.problem,
        )


def _describe(exc: StoreUnavailable) -> str:
    if isinstance(exc, AccessDenied):
        return "PostgreSQL refuses the service's role: permission denied"
    if isinstance(exc, StatementTimedOut):
        return "an order's insert runs past the statement timeout"
    return "database unavailable"


def _validate(batch: Sequence[Envelope]) -> tuple[list[_Order], list[_Reject]]:
    orders: list[_Order] = []
    rejects: list[_Reject] = []
    for envelope_index, envelope in enumerate(batch):
        for index, raw in enumerate(envelope.raws):
            try:
                verdict = validate(raw)
            except Exception as exc:
                # validate() is meant never to raise; if it does, that message alone is
                # refused, and the agent goes on.
                verdict = Rejected(f"could not be validated: {exc!r}"[:500])
            if isinstance(verdict, Accepted):
                orders.append(((envelope_index, index), verdict))
            else:
                letter = DeadLetter(raw, verdict.reason, envelope.source(index))
                rejects.append(((envelope_index, index), letter))
    return orders, rejects


class _ActivityLog:
    """One log line per small batch naming its orders; a periodic summary at high rate."""

    def __init__(self, uids_max: int) -> None:
        self._uids_max = uids_max
        self._pending = [0, 0, 0, 0, 0]  # batches, stored, duplicates, conflicts, rejected
        self._since = time.monotonic()
        self._last_reason = ""

    def batch(self, results: list[BatchResult], seconds: float) -> None:
        stored = [event.order_uid for result in results for event in result.stored]
        duplicates = sum(len(result.duplicates) for result in results)
        conflicts = [uid for result in results for uid in result.conflicts]
        rejected = [letter for result in results for letter in result.dead_lettered]
        if conflicts:
            log.warning(
                "%d duplicate(s) with a payload different from the stored one, first kept: %s",
                len(conflicts),
                ", ".join(conflicts[:10]),
                extra={"order_uids": conflicts[:10], "count": len(conflicts)},
            )
        if len(stored) + duplicates + len(rejected) <= self._uids_max:
            log.info(
                "batch committed in %.1f ms: stored %s; %d duplicate(s), %d dead-lettered",
                seconds * 1000,
                ", ".join(stored) or "none",
                duplicates,
                len(rejected),
                extra={
                    "order_uids": stored,
                    "stored": len(stored),
                    "duplicates": duplicates,
                    "dead_lettered": len(rejected),
                },
            )
            for letter in rejected:
                log.warning(
                    "dead-lettered %s: %s",
                    letter.source or "a message",
                    letter.reason,
                    extra={"source": letter.source, "reason": letter.reason},
                )
            return
        pending = self._pending
        if rejected:
            self._last_reason = rejected[-1].reason
        for index, count in enumerate((1, len(stored), duplicates, len(conflicts), len(rejected))):
            pending[index] += count
        now = time.monotonic()
        if now - self._since >= _SUMMARY_EVERY_S:
            log.info(
                "%d batches in the last %.0f s: stored %d, duplicates %d (%d conflicting), "
                "dead-lettered %d%s",
                *pending[:1],
                now - self._since,
                *pending[1:],
                f" (last reason: {self._last_reason})" if pending[4] else "",
                extra=dict(
                    zip(
                        ("batches", "stored", "duplicates", "conflicts", "dead_lettered"),
                        pending,
                        strict=True,
                    )
                ),
            )
            self._pending = [0, 0, 0, 0, 0]
            self._since = now
