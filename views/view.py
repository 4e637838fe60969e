"""The in-memory view: order_uid -> the order's JSON bytes, a pure projection of orders_events.

It knows the log only as :class:`Projected` entries handed to it in seq order; reading the log
is the follower's work (streams/follower.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol


class Projected(Protocol):
    """What the view projects: one entry of the log, as the event store hands it over."""

    @property
    def seq(self) -> int: ...

    @property
    def order_uid(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class OrdersView(Mapping[str, bytes]):
    """Every order in the log, ready to send as it is.

    The only way in is :meth:`project`, fed with events from the log in seq order by the
    follower: at boot, and afterwards with the events the agent has just committed (and
    :meth:`refresh`, which changes an order's bytes, never its value).
    """

    def __init__(self) -> None:
        self._orders: dict[str, bytes] = {}
        self.last_seq = 0

    def project(self, events: Iterable[Projected]) -> int:
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

    def refresh(self, events: Iterable[Projected]) -> None:
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
