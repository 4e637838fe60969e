"""An event store in memory, for fast tests of what sits above the store (the agent, the
follower, the view): the promises of :class:`streams.events.EventStore`, kept as
:class:`streams.store.PostgresEventStore` keeps them, without a database, and with faults on
demand.

Stores on one :class:`MemoryLog` are writers on one database: each has a writer id of its
own, and its listeners hear the others' commits, never its own.

It refuses what is not JSON, as ``jsonb`` does. What PostgreSQL refuses beyond that (a number
past ``numeric``'s range, a ``\\u0000`` escape) it takes: :meth:`InMemoryEventStore.fail_writes`
stands in for those refusals.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import decimal
import json
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Literal

from streams.events import (
    BatchResult,
    DeadLetter,
    Event,
    Listener,
    RefusedByDatabase,
    StoreUnavailable,
)
from streams.validation import Accepted

# Which writes a fault is for: it sees the batch's orders and rejects.
WriteMatch = Callable[[Sequence[Accepted], Sequence[DeadLetter]], bool]
_Operation = Literal["write", "read", "listen"]


class MemoryLog:
    """The log and the dead letters, shared by the stores on them as a database is."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.dead_letters: list[DeadLetter] = []
        self._by_uid: dict[str, Event] = {}
        # The schema's unique index is on (source, sha256(raw)); the bytes themselves say the
        # same here. A letter without a source is never a redelivery (NULLs are all distinct).
        self._letters_seen: set[tuple[str, bytes]] = set()
        # The last seq handed out. As PostgreSQL's identity does under INSERT ... ON CONFLICT
        # DO NOTHING, every order proposed takes one, new or not, so seqs leave the same gaps.
        self._last_seq = 0
        self._listeners: set[InMemoryListener] = set()

    @property
    def head(self) -> int:
        """The last seq in the log (0 when it is empty)."""
        return self.events[-1].seq if self.events else 0

    def commit(
        self, orders: Sequence[Accepted], rejects: Sequence[DeadLetter], writer: str
    ) -> BatchResult:
        """Append and dead-letter in one step (nothing awaits in between, so nothing sees half
        of it), and announce new events to every listener."""
        values = [_json_value(order.payload) for order in orders]  # refused before any change
        previous_seq = self.head
        stored: list[Event] = []
        duplicates: list[tuple[Accepted, object]] = []
        for order, value in zip(orders, values, strict=True):
            self._last_seq += 1
            if order.order_uid in self._by_uid:
                duplicates.append((order, value))
                continue
            event = Event(self._last_seq, order.order_uid, order.payload)
            self._by_uid[order.order_uid] = event
            stored.append(event)
        self.events.extend(stored)
        conflicts = [
            order.order_uid
            for order, value in duplicates
            if not _same_json(_json_value(self._by_uid[order.order_uid].payload), value)
        ]
        for letter in rejects:
            if letter.source is not None:
                key = (letter.source, letter.raw)
                if key in self._letters_seen:
                    continue
                self._letters_seen.add(key)
            self.dead_letters.append(letter)
        if stored:
            for listener in self._listeners:
                listener.announce(writer)
        return BatchResult(
            stored=stored,
            duplicates=[order.order_uid for order, _ in duplicates],
            conflicts=list(dict.fromkeys(conflicts)),
            dead_lettered=list(rejects),
            previous_seq=previous_seq if stored else 0,
        )

    def after(self, seq: int, limit: int) -> list[Event]:
        """Up to ``limit`` events with a seq above ``seq``, in seq order."""
        start = bisect.bisect_right(self.events, seq, key=_seq_of)
        return self.events[start : start + max(limit, 0)]

    def subscribe(self, listener: InMemoryListener) -> None:
        self._listeners.add(listener)

    def unsubscribe(self, listener: InMemoryListener) -> None:
        self._listeners.discard(listener)


@dataclasses.dataclass(slots=True)
class _Fault:
    operation: _Operation
    error: Exception
    times: int | None  # None: every time, until cleared
    match: WriteMatch | None = None
    after_commit: bool = False


class InMemoryEventStore:
    """The event store in memory: one writer on a :class:`MemoryLog` (a new one by default).

    Every call yields to the event loop once, as a round trip to a database would, so other
    tasks run while a write or a read is under way; the commit itself is one step.
    """

    def __init__(self, log: MemoryLog | None = None) -> None:
        self.log = log if log is not None else MemoryLog()
        # Names this store's commits to the listeners, as PostgresEventStore's notifications do.
        self.writer_id = uuid.uuid4().hex[:12]
        # The order_uids of every write_batch call, committed or not, in call order.
        self.writes: list[list[str]] = []
        self._faults: list[_Fault] = []
        self._listeners: set[InMemoryListener] = set()
        self._closed = False

    def another_writer(self) -> InMemoryEventStore:
        """A store on the same log: another worker writing to the same database."""
        return InMemoryEventStore(self.log)

    def fail_writes(
        self,
        error: Exception,
        *,
        times: int | None = 1,
        when: WriteMatch | None = None,
        after_commit: bool = False,
    ) -> None:
        """Have the next ``times`` writes (every write with ``None``, until
        :meth:`clear_faults`) that ``when`` picks raise ``error``: before anything is
        committed, or with ``after_commit`` once the batch is in, as when the connection drops
        while COMMIT is under way."""
        self._faults.append(_Fault("write", error, times, when, after_commit))

    def fail_reads(self, error: StoreUnavailable, *, times: int | None = 1) -> None:
        """Have the next ``times`` reads raise ``error``: :meth:`head` and each page of
        :meth:`read_pages`."""
        self._faults.append(_Fault("read", error, times))

    def fail_listen(self, error: StoreUnavailable, *, times: int | None = 1) -> None:
        """Have the next ``times`` calls of :meth:`listen` raise ``error``, as a hot standby
        refuses LISTEN."""
        self._faults.append(_Fault("listen", error, times))

    def drop_listeners(self) -> None:
        """Lose every listener this store opened, as a LISTEN connection ended by the server:
        each raises StoreUnavailable from its next wait."""
        for listener in list(self._listeners):
            listener.lose(StoreUnavailable("the listening connection was lost"))

    def clear_faults(self) -> None:
        """Forget every fault not yet used up."""
        self._faults.clear()

    async def write_batch(
        self, orders: Sequence[Accepted], rejects: Sequence[DeadLetter]
    ) -> BatchResult:
        """Append the orders and dead-letter the rejects in one commit."""
        self.writes.append([order.order_uid for order in orders])
        await self._round_trip()
        fault = self._take("write", orders, rejects)
        if fault is not None and not fault.after_commit:
            raise fault.error.with_traceback(None)
        result = self.log.commit(orders, rejects, self.writer_id)
        if fault is not None:
            raise fault.error.with_traceback(None)
        return result

    async def _read_page(self, after: int, limit: int) -> list[Event]:
        await self._read()
        return self.log.after(after, limit)

    async def read_pages(self, after: int, page_size: int) -> AsyncGenerator[list[Event], None]:
        """Every event with ``seq > after`` to the end of the log, in seq order, in pages of
        up to ``page_size``; each page is read when the one before has been handed over, so
        events committed meanwhile are in the later pages."""
        while page := await self._read_page(after, page_size):
            yield page
            if len(page) < page_size:
                return
            after = page[-1].seq

    async def head(self) -> int:
        """The last seq in the log (0 when it is empty)."""
        await self._read()
        return self.log.head

    async def listen(self) -> Listener:
        """A listener that hears the commits of the other stores on this log."""
        await self._round_trip()
        fault = self._take("listen")
        if fault is not None:
            raise fault.error.with_traceback(None)
        listener = InMemoryListener(self.writer_id, self._forget)
        self._listeners.add(listener)
        self.log.subscribe(listener)
        return listener

    async def close(self) -> None:
        """Close this store's listeners; every later call raises StoreUnavailable."""
        self._closed = True
        for listener in list(self._listeners):
            await listener.close()

    async def _read(self) -> None:
        await self._round_trip()
        fault = self._take("read")
        if fault is not None:
            raise fault.error.with_traceback(None)

    async def _round_trip(self) -> None:
        if self._closed:
            raise StoreUnavailable("the store is closed")
        await asyncio.sleep(0)

    def _take(
        self,
        operation: _Operation,
        orders: Sequence[Accepted] = (),
        rejects: Sequence[DeadLetter] = (),
    ) -> _Fault | None:
        """The first fault for this call, used up by one if it counts its uses."""
        for fault in self._faults:
            if fault.operation != operation:
                continue
            if fault.match is not None and not fault.match(orders, rejects):
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
            return fault
        return None

    def _forget(self, listener: InMemoryListener) -> None:
        self._listeners.discard(listener)
        self.log.unsubscribe(listener)


class InMemoryListener:
    """Wake-ups when another store on the log commits new events."""

    def __init__(self, own_writer: str, on_close: Callable[[InMemoryListener], None]) -> None:
        self._own_writer = own_writer
        self._on_close = on_close
        self._announced: list[str] = []  # the writer of each commit heard and not yet read
        self._arrived = asyncio.Event()
        self._lost: StoreUnavailable | None = None

    @property
    def backlog(self) -> int:
        """Commits announced and not yet read."""
        return len(self._announced)

    def announce(self, writer: str) -> None:
        """A commit by ``writer`` (the log calls this)."""
        self._announced.append(writer)
        self._arrived.set()

    def lose(self, error: StoreUnavailable) -> None:
        """From now on, hear nothing and raise ``error`` from :meth:`wait`."""
        self._lost = error
        self._on_close(self)
        self._arrived.set()

    async def wait(self, timeout: float) -> bool:
        """Whether another writer's commit was announced within ``timeout``; every
        announcement so far is read at once, this store's own commits left out.

        Raises StoreUnavailable once the listener is lost or closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._lost is not None:
                raise StoreUnavailable(str(self._lost))
            announced, self._announced = self._announced, []
            self._arrived.clear()
            if any(writer != self._own_writer for writer in announced):
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # A timeout is looked at once more above, and then answered False.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def close(self) -> None:
        """Stop listening."""
        if self._lost is None:
            self.lose(StoreUnavailable("the listener is closed"))


def _seq_of(event: Event) -> int:
    return event.seq


def _json_value(payload: bytes) -> object:
    """The payload as a JSON value, numbers as decimals (``jsonb`` compares them as numeric:
    1.0 is 1); RefusedByDatabase for what ``jsonb`` would refuse as no JSON."""
    try:
        return json.loads(
            payload.decode("utf-8"),
            parse_float=decimal.Decimal,
            parse_int=decimal.Decimal,
            parse_constant=_no_constant,
        )
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError among them
        raise RefusedByDatabase(f"invalid input syntax for type json: {exc}") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _same_json(left: object, right: object) -> bool:
    """Whether two decoded JSON values are equal as ``jsonb`` values: Python alone would take
    ``true`` for ``1``."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same_json(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_same_json, left, right))
    return type(left) is type(right) and left == right
