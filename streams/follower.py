"""Keeping the view on the log: the one path by which committed events reach the view.

Boot replay, the agent's own commits and other workers' commits all go through here, under
one lock, so the view only ever moves forward through the log in seq order. :func:`restore`
is the replay itself, shared by the boot and the ``replay`` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Final

from streams.retry import Backoff, Episode
from streams.snapshots import PageWriter, SnapshotStore, restore_from_pages
from streams.store import BatchResult, EventStore, Listener, RefusedByDatabase, StoreUnavailable
from views.view import OrdersView

log = logging.getLogger(__name__)

# Without LISTEN (a hot standby, or the database away), how often to try it again: often
# enough to hear a promoted standby within a few polls, rarely enough not to knock every poll.
_LISTEN_AGAIN_S: Final = 10.0


class ViewFollower:
    """Moves the view along the log: at boot, after each local commit, and when told of others'.

    Other workers' commits arrive as PostgreSQL notifications, which only wake the follower:
    what to read, and how far the log goes, always come from the log. A poll every ``poll_s``
    covers notifications lost with a dropped LISTEN connection, and servers without LISTEN.

    The lock is held only while the view moves (a catch-up, or projecting one batch), never
    across a commit: under sustained ingest the agent always has a commit in flight, and
    other writers' orders must still reach this view.
    """

    def __init__(
        self,
        view: OrdersView,
        store: EventStore,
        page_size: int,
        *,
        snapshots: SnapshotStore | None = None,
        snapshot_page_orders: int = 100_000,
    ) -> None:
        self.view = view
        self.store = store
        self.page_size = page_size
        self.snapshots = snapshots
        self._pages = (
            None if snapshots is None else PageWriter(view, snapshots, snapshot_page_orders)
        )
        self.head = 0  # the last seq known to be in the log, as read from the log
        self._lock = asyncio.Lock()
        self._listener: Listener | None = None
        self._polling_said = False

    @property
    def lag(self) -> int:
        """How many seqs the view is behind the last known head of the log."""
        return max(0, self.head - self.view.last_seq)

    async def boot(self) -> RestoreStats:
        """Restore the view at start: the snapshot pages that agree with the log, then the
        log after them (all of it when there are none)."""
        started = time.perf_counter()
        with _collector_paused():
            async with self._lock:
                from_pages = await self._restore_from_pages()
                stats = await restore(self.view, self.store, self.page_size)
        self.head = max(self.head, stats.last_seq)
        return RestoreStats(
            from_pages + stats.events, stats.last_seq, time.perf_counter() - started
        )

    async def _restore_from_pages(self) -> int:
        if self.snapshots is None or self._pages is None:
            return 0
        if not self.snapshots.snapshot_reads:
            log.info(
                "snapshot pages off (orders_view_pages and orders_view_dictionary missing, or"
                " not readable by this role): the view is restored from the log alone"
            )
        outcome = await restore_from_pages(self.view, self.snapshots)
        self._pages.taken_from_pages(outcome)
        if outcome.pages:
            log.info(
                "view: %d orders from %d snapshot pages in %.2f s; the log after seq %d",
                outcome.orders,
                outcome.pages,
                outcome.seconds,
                self.view.last_seq,
                extra={"count": outcome.orders, "pages": outcome.pages},
            )
        return outcome.orders

    async def write_snapshot_page(self) -> bool:
        """Write the next snapshot page if one is due (a writer's view, a whole page of orders
        not in pages yet); whether one was. A failure is logged and tried again later: pages
        only speed up a start."""
        if self._pages is None:
            return False
        try:
            return await self._pages.write_one()
        except (StoreUnavailable, RefusedByDatabase) as exc:
            log.warning("snapshot page not written, trying again later: %s", exc)
            return False

    async def catch_up(self, on_page: Callable[[int], None] | None = None) -> RestoreStats:
        """Read the log from the view's position to its end into the view."""
        async with self._lock:
            stats = await restore(self.view, self.store, self.page_size, on_page)
        self.head = max(self.head, stats.last_seq)
        return stats

    async def apply(self, result: BatchResult) -> None:
        """Project a batch this worker just committed.

        When the log held nothing the view lacks just before the batch, its events go in as
        they are; otherwise what came before them is read from the log first. Orders the
        batch found already in the log but the view lacks (a commit whose reply was lost, so
        the retry saw duplicates) are read from the log too. If that read fails, the view
        waits for the next poll of :meth:`follow`, which sees the lag: the batch is committed
        all the same, and never held up by its projection.
        """
        view = self.view
        behind = (result.stored and view.last_seq < result.previous_seq) or any(
            uid not in view for uid in result.duplicates
        )
        if not (result.stored or behind):
            return
        async with self._lock:
            if result.stored:
                self.head = max(self.head, result.stored[-1].seq)
            if behind:
                try:
                    self.head = max(
                        self.head, (await restore(view, self.store, self.page_size)).last_seq
                    )
                except StoreUnavailable as exc:
                    log.warning("view behind the log until the database answers: %s", exc)
                    return
            if result.stored and view.last_seq >= result.stored[0].seq:
                # A catch-up read these events back from the log first: the view serves them
                # with the bytes as published all the same.
                view.refresh(result.stored)
            view.project(result.stored)

    async def follow(self, poll_s: float) -> None:
        """Until cancelled: catch up on every wake-up, and look at the log's head at least
        every ``poll_s``.

        Without a LISTEN connection (the database away, or a hot standby, where LISTEN is not
        allowed) it keeps polling, and tries to listen again now and then.
        """
        paused = Episode(log)
        backoff = Backoff(first=poll_s)
        listen_again_at = 0.0
        wait_s = poll_s  # 0 while snapshot pages are due: one page a round, rounds back to back
        this_task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            while True:
                # asyncio.wait_for on Python 3.11 can lose a cancellation that arrives with a
                # notification: the task still counts it as cancelling, so stop here.
                if this_task is not None and this_task.cancelling():
                    raise asyncio.CancelledError
                woken = False
                if self._listener is None and loop.time() >= listen_again_at:
                    # Once listening, look at the head at once: a commit made before LISTEN
                    # was in place sent its notification to nobody.
                    self._listener = await self._listen(poll_s)
                    if self._listener is None:
                        listen_again_at = loop.time() + _LISTEN_AGAIN_S
                        await asyncio.sleep(wait_s)
                elif self._listener is None:
                    await asyncio.sleep(wait_s)
                else:
                    try:
                        woken = await self._listener.wait(wait_s)
                    except StoreUnavailable as exc:
                        log.warning("LISTEN connection lost, polling meanwhile: %s", exc)
                        await self._listener.close()
                        self._listener = None
                try:
                    if not woken:
                        self.head = max(self.head, await self.store.head())
                    if woken or self.lag:
                        await self.catch_up()
                    # One page a round, so that following the log never waits for many.
                    wait_s = 0.0 if await self.write_snapshot_page() else poll_s
                    paused.over("following the log again")
                    backoff.reset()
                except StoreUnavailable as exc:
                    paused.failed("unavailable", "following the log paused: %s", exc)
                    await asyncio.sleep(backoff.next())
        finally:
            if self._listener is not None:
                await self._listener.close()
                self._listener = None

    async def _listen(self, poll_s: float) -> Listener | None:
        try:
            listener = await self.store.listen()
        except StoreUnavailable as exc:
            if not self._polling_said:
                log.info(
                    "following orders_events by polling every %.1f s (LISTEN not possible: %s)",
                    poll_s,
                    exc,
                )
                self._polling_said = True
            return None
        log.info("following orders_events: LISTEN, and a poll every %.1f s", poll_s)
        self._polling_said = False
        return listener


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreStats:
    """How a replay went: events applied, the last seq reached and the time it took."""

    events: int
    last_seq: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.events / self.seconds if self.seconds > 0 else float(self.events)


async def restore(
    view: OrdersView,
    store: EventStore,
    page_size: int,
    on_page: Callable[[int], None] | None = None,
) -> RestoreStats:
    """Replay the log from after ``view.last_seq`` to its end, page by page, into ``view``.

    The same function rebuilds the view at boot and in the ``replay`` command. ``on_page``
    hears how many events each page applied (for a progress display).

    The store asks for the next page before it hands over the current one, so PostgreSQL
    works on it while this one is projected; and the cyclic garbage collector, which would
    otherwise sweep again and again over the rows being created, is paused until the end.
    """
    started = time.perf_counter()
    applied = 0
    # aclosing: a replay that stops early hands its connections back at once.
    with _collector_paused():
        async with contextlib.aclosing(store.read_pages(view.last_seq, page_size)) as pages:
            async for page in pages:
                added = view.project(page)
                applied += added
                if on_page is not None:
                    on_page(added)
    return RestoreStats(applied, view.last_seq, time.perf_counter() - started)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off meanwhile: a replay makes millions of objects, none of
    them in cycles, and each collection would sweep over them all again. Nested uses leave it
    to the outermost."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
