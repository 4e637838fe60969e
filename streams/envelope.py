"""What the bridge hands the agent: the messages of one fetch, and a handle that says how
each of them ended."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence


class Outcome(enum.Enum):
    """How the agent settled a message. Every outcome but FAILED is committed in PostgreSQL."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FAILED = "failed"


def _unknown_source(index: int) -> None:
    return None


class Envelope:
    """Messages on their way through the agent, as one Faust event.

    One event per fetch rather than per message: Faust's channel costs tens of microseconds
    an event, more than validating an order. ``settled`` completes, with one outcome per
    message, only after each message's event or rejection is committed; the bridge acks on
    that and never before. ``source(i)`` names where message ``i`` came from, for the dead
    letters; it is asked for rejected messages only.
    """

    __slots__ = ("raws", "settled", "source")

    def __init__(
        self, raws: Sequence[bytes], source: Callable[[int], str | None] = _unknown_source
    ) -> None:
        self.raws = raws
        self.source = source
        self.settled: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()

    def settle(self, outcomes: list[Outcome]) -> None:
        """Complete the handle once, with an outcome per message; later calls are ignored."""
        if not self.settled.done():
            self.settled.set_result(outcomes)

    def fail(self) -> None:
        """Settle every message as FAILED: none is acked, all are delivered again."""
        self.settle([Outcome.FAILED] * len(self.raws))
