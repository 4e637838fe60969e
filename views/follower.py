"""Keeping the view on the log: the one path by which committed events reach the view.

Boot replay, the agent's own commits and other workers' commits all go through here, under
one lock, so the view only ever moves forward through the log in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from streams.store import BatchResult, EventStore, Listener, StoreUnavailable
from views.view import OrdersView, RestoreStats, restore

log = logging.getLogger(__name__)

_RETRY_MAX_S: Final = 5.0


class ViewFollower:
    """Moves the view along the log: at boot, after each local commit, and when told of others'.

    Other workers' commits arrive as PostgreSQL notifications; a poll every ``poll_s`` covers
    notifications lost with a dropped LISTEN connection.
    """

    def __init__(self, view: OrdersView, store: EventStore, page_size: int) -> None:
        self.view = view
        self.store = store
        self.page_size = page_size
        self.head = 0  # the last seq known to be in the log
        self._lock = asyncio.Lock()

    @property
    def lag(self) -> int:
        """How many seqs the view is behind the last known head of the log."""
        return max(0, self.head - self.view.last_seq)

    async def catch_up(self, on_page: Callable[[int], None] | None = None) -> RestoreStats:
        """Read the log from the view's position to its end into the view."""
        async with self._lock:
            stats = await restore(self.view, self.store, self.page_size, on_page)
        self.head = max(self.head, stats.last_seq)
        return stats

    @contextlib.asynccontextmanager
    async def committing(self) -> AsyncIterator[None]:
        """Held by the agent from its write until it has applied the result: a catch-up
        cannot slip in between and project the agent's own rows from the log first."""
        await self.hold()
        try:
            yield
        finally:
            self.release()

    async def hold(self) -> None:
        """Keep catch-ups out until :meth:`release`, from any task: the agent holds the
        follower while any of its commits is not yet applied."""
        await self._lock.acquire()

    def release(self) -> None:
        """Let catch-ups run again."""
        self._lock.release()

    async def apply(self, result: BatchResult) -> None:
        """Project a batch this worker just committed, while it holds the follower.

        When the log held nothing the view lacks just before the batch, its events go in as
        they are; otherwise another writer's events come first, read from the log. If that
        read fails, the view waits for the next poll of :meth:`follow`, which sees the lag:
        the batch is committed all the same, and never held up by its projection.
        """
        if not result.stored:
            return
        assert self._lock.locked(), "apply() belongs between hold() and release()"
        self.head = max(self.head, result.stored[-1].seq)
        if self.view.last_seq < result.previous_seq:
            try:
                await restore(self.view, self.store, self.page_size)
            except StoreUnavailable as exc:
                log.warning("view behind the log until the database answers: %s", exc)
                return
        self.view.project(result.stored)

    async def follow(self, poll_s: float) -> None:
        """Until cancelled: catch up on every notification, and at least every ``poll_s``.

        Without a LISTEN connection (the database away, or a hot standby, where LISTEN is not
        allowed) it keeps polling, and tries to listen again at each round.
        """
        listener: Listener | None = None
        failures = 0
        this_task = asyncio.current_task()
        try:
            while True:
                # asyncio.wait_for on Python 3.11 can lose a cancellation that arrives with a
                # notification: the task still counts it as cancelling, so stop here.
                if this_task is not None and this_task.cancelling():
                    raise asyncio.CancelledError
                announced: int | None = None
                if listener is None:
                    listener = await self._listen(poll_s)
                    if listener is None:
                        await asyncio.sleep(poll_s)
                else:
                    try:
                        announced = await listener.next_head(poll_s)
                    except StoreUnavailable as exc:
                        log.warning("LISTEN connection lost, polling meanwhile: %s", exc)
                        await listener.close()
                        listener = None
                try:
                    if announced is None:
                        announced = await self.store.head()
                    self.head = max(self.head, announced)
                    if self.lag:
                        await self.catch_up()
                    failures = 0
                except StoreUnavailable as exc:
                    failures += 1
                    if failures == 1 or failures % 30 == 0:
                        log.warning("following the log paused (%d tries): %s", failures, exc)
                    await asyncio.sleep(min(poll_s * failures, _RETRY_MAX_S))
        finally:
            if listener is not None:
                await listener.close()

    async def _listen(self, poll_s: float) -> Listener | None:
        try:
            listener = await self.store.listen()
        except StoreUnavailable as exc:
            log.debug("cannot LISTEN, polling every %.1f s: %s", poll_s, exc)
            return None
        log.info("following orders_events: LISTEN, and a poll every %.1f s", poll_s)
        return listener
