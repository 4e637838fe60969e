"""What every event store shares: the log's entries, what a committed batch did, the failures
its callers tell apart, and the protocols the agent, the follower and the replay rely on.

Two stores implement them: :class:`streams.store.PostgresEventStore`, the service's, and
:class:`streams.memory_store.InMemoryEventStore`, for tests of the logic above the store.
``tests/store_contract.py`` holds the behaviours both must show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import Protocol

from streams.validation import Accepted


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One entry of the log: its place in the replay order, its order_uid and the order as JSON."""

    seq: int
    order_uid: str
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused message as received, why it was refused, and where it came from if known."""

    raw: bytes
    reason: str
    source: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BatchResult:
    """What one committed batch did: new events in seq order, the uids that were not new, and
    the messages dead-lettered. ``previous_seq`` is the log's last seq just before the new
    events (0 when nothing was stored): a view at that seq can take them as they are."""

    stored: list[Event]
    duplicates: list[str]
    conflicts: list[str]
    dead_lettered: list[DeadLetter]
    previous_seq: int = 0


class StoreUnavailable(Exception):
    """The database could not be reached or lost the connection: the batch may be retried."""


class StatementTimedOut(StoreUnavailable):
    """PostgreSQL ended a statement that ran past the timeout (and with it the transaction and
    its append lock): a smaller batch may pass, the same one again may not."""


class AccessDenied(StoreUnavailable):
    """PostgreSQL refuses this role a privilege it needs: retried, since an operator may grant
    it, but nothing passes until then."""


class RefusedByDatabase(Exception):
    """The database refused the data itself: retrying the same batch would fail again."""


class Listener(Protocol):
    """Wake-ups when another writer commits new events to the log.

    A wake-up says only that something may have changed: the follower takes the head from the
    log, never from the wake-up.
    """

    @property
    def backlog(self) -> int:
        """Announcements received and not yet read."""
        ...

    async def wait(self, timeout: float) -> bool:
        """Whether another writer's commit was announced within ``timeout``. Everything
        announced so far is read at once; commits of the store that opened this listener are
        left out (its agent projects them).

        Raises StoreUnavailable when the listener has lost its source.
        """
        ...

    async def close(self) -> None:
        """Stop listening and let go of what the listener holds."""
        ...


class EventStore(Protocol):
    """What the agent, the follower, the view and the replay command need from a store.

    The promises every store keeps (``tests/store_contract.py`` checks them):

    - A batch commits whole or not at all. Its new events take seqs above every seq committed
      before, in the order of the batch; seqs only grow, and may leave gaps.
    - The order_uid is the idempotency key: the first write wins. Every order that was not new
      (in the log already, or earlier in the batch) is named in ``duplicates``, once per order;
      ``conflicts`` names, once each, those whose payload is another JSON value than the one
      stored (other whitespace is the same value).
    - A dead letter is kept once per (source, raw bytes) when its source is known, and each
      time when it is not; ``dead_lettered`` is the rejects as given.
    - ``previous_seq`` is the head of the log just before the batch's new events, 0 when none
      are new.
    - A payload that is not JSON is refused (RefusedByDatabase), and nothing of its batch is
      committed.
    - Events read back carry the JSON value written, not necessarily the same bytes.
    """

    async def write_batch(
        self, orders: Sequence[Accepted], rejects: Sequence[DeadLetter]
    ) -> BatchResult:
        """Append the orders and dead-letter the rejects in one commit.

        Raises StoreUnavailable (the commit's outcome may be unknown: a retry may find the
        orders already in), StatementTimedOut (nothing committed; a smaller batch may pass) or
        RefusedByDatabase (nothing committed; the same batch would be refused again).
        """
        ...

    def read_pages(self, after: int, page_size: int) -> AsyncGenerator[list[Event], None]:
        """Every event with ``seq > after`` to the end of the log, in seq order, in non-empty
        pages of up to ``page_size``. Raises StoreUnavailable."""
        ...

    async def head(self) -> int:
        """The last seq in the log (0 when it is empty). Raises StoreUnavailable."""
        ...

    async def listen(self) -> Listener:
        """A listener woken by other writers' commits. Raises StoreUnavailable."""
        ...

    async def close(self) -> None:
        """Let go of every connection; the store is not used afterwards."""
        ...
