"""What the bridge hands the agent: a message's bytes and a handle that says how it ended."""

from __future__ import annotations

import asyncio
import enum


class Outcome(enum.Enum):
    """How the agent settled a message. Every outcome but FAILED is committed in PostgreSQL."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def committed(self) -> bool:
        """True when the message may be acknowledged to its source."""
        return self is not Outcome.FAILED


class Envelope:
    """One message on its way through the agent.

    ``settled`` completes only after the message's event, or its rejection, is committed;
    the bridge acks on that and never before.
    """

    __slots__ = ("raw", "settled", "source")

    def __init__(self, raw: bytes, source: str | None = None) -> None:
        self.raw = raw
        self.source = source
        self.settled: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def settle(self, outcome: Outcome) -> None:
        """Complete the handle once; later calls are ignored."""
        if not self.settled.done():
            self.settled.set_result(outcome)
