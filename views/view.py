"""The in-memory view: order_uid -> the order's JSON bytes, a pure projection of orders_events."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from streams.store import Event, EventStore


class OrdersView(Mapping[str, bytes]):
    """Every order in the log, ready to send as it is.

    The only way in is :meth:`project`, fed with events from the log in seq order: at boot by
    :func:`restore`, afterwards by the agent with the events it has just committed (and
    :meth:`refresh`, which changes an order's bytes, never its value).
    """

    def __init__(self) -> None:
        self._orders: dict[str, bytes] = {}
        self.last_seq = 0

    def project(self, events: Iterable[Event]) -> int:
        """Apply events in seq order and return how many were new.

        Events at or below ``last_seq`` are already in and are skipped.
        """
        orders = self._orders
        last = self.last_seq
        added = 0
        for event in events:
            if event.seq <= last:
                continue
            # The log holds one event per order_uid, so the first write is the only write.
            orders.setdefault(event.order_uid, event.payload)
            last = event.seq
            added += 1
        self.last_seq = last
        return added

    def refresh(self, events: Iterable[Event]) -> None:
        """Give events already projected the bytes they were committed with.

        An event read back from the log is PostgreSQL's jsonb text: the same JSON value as the
        message, in other bytes. The writer that committed it hands the message's own bytes
        here, for events a catch-up brought in first; the value does not change.
        """
        orders = self._orders
        for event in events:
            if event.seq <= self.last_seq and event.order_uid in orders:
                orders[event.order_uid] = event.payload

    def __getitem__(self, order_uid: str) -> bytes:
        return self._orders[order_uid]

    def __contains__(self, order_uid: object) -> bool:
        return order_uid in self._orders

    def __len__(self) -> int:
        return len(self._orders)

    def __iter__(self) -> Iterator[str]:
        return iter(self._orders)


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
    collecting = gc.isenabled()
    gc.disable()
    try:
        # aclosing: a replay that stops early hands its connections back at once.
        async with contextlib.aclosing(store.read_pages(view.last_seq, page_size)) as pages:
            async for page in pages:
                added = view.project(page)
                applied += added
                if on_page is not None:
                    on_page(added)
    finally:
        if collecting:
            gc.enable()
    return RestoreStats(applied, view.last_seq, time.perf_counter() - started)
