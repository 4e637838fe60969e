"""Snapshot pages of the view: runs of orders kept in PostgreSQL as the view holds them, so that
a start reads a few large values instead of every row of the log.

The log stays the source. A page is taken in only after checks against it, and any page that
fails one is dropped with the pages after it; their orders are read from the log:

- the page is whole: its digest (body_sha256) matches, and it parses to ``orders`` orders with
  strictly increasing seqs, all in its range, the last one ``last_seq``;
- it was compressed with the database's dictionary (dictionary_sha256 is its digest);
- the log agrees: it holds exactly ``orders`` events in the page's range (an index-only count on
  the primary key), and for :data:`SPOT_CHECKS` orders of the page, drawn at random at each start,
  the log's event at that seq has the same order_uid and the same JSON value.

Any UPDATE, DELETE or TRUNCATE of the log drops every page (a trigger, streams/schema.sql); the
checks catch what gets past it (triggers off, a page written by a foreign or buggy writer,
a truncated or altered body, another dictionary). What they cannot catch is a page whose every
order count and digest agree and whose wrong orders all escape the spot checks; the ``replay``
command never reads pages, and its ``--verify`` checks the log itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import struct
import sys
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from itertools import accumulate
from typing import Final, Protocol

import orjson

from views.view import OrdersView

log = logging.getLogger(__name__)

SPOT_CHECKS: Final = 16
_MAGIC: Final = b"OVP1"
_HEADER: Final = struct.Struct("<4sIII")  # magic, orders, uid bytes, frame bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotPage:
    """One row of orders_view_pages."""

    after_seq: int
    last_seq: int
    orders: int
    dictionary_sha256: bytes
    body: bytes
    body_sha256: bytes


class PageRefused(Exception):
    """A page that may not go into the view; the message says why."""


class SnapshotStore(Protocol):
    """What the snapshot pages need of the database (the PostgreSQL store)."""

    snapshot_reads: bool
    snapshot_writes: bool
    writer_id: str

    async def read_dictionary(self) -> bytes | None: ...

    async def publish_dictionary(self, dictionary: bytes) -> bytes: ...

    def snapshot_pages(self) -> AsyncIterator[SnapshotPage]: ...

    async def log_agreement(
        self, after_seq: int, last_seq: int, seqs: Sequence[int]
    ) -> tuple[int, dict[int, tuple[str, bytes]]]: ...

    async def write_page(self, page: SnapshotPage) -> bool: ...

    async def drop_pages(self, from_after_seq: int) -> int: ...


def encode_page(
    after_seq: int, seqs: array[int], uids: list[str], frames: list[bytes], dictionary: bytes
) -> SnapshotPage:
    """A page of the orders given (as :meth:`OrdersView.packed` hands them out)."""
    uid_bytes = "\n".join(uids).encode("ascii")
    lengths = array("I", map(len, frames))
    frame_bytes = b"".join(frames)
    packed_seqs = array("q", seqs)
    if sys.byteorder != "little":
        packed_seqs.byteswap()
        lengths.byteswap()
    body = b"".join(
        [
            _HEADER.pack(_MAGIC, len(uids), len(uid_bytes), len(frame_bytes)),
            packed_seqs.tobytes(),
            lengths.tobytes(),
            uid_bytes,
            frame_bytes,
        ]
    )
    return SnapshotPage(
        after_seq=after_seq,
        last_seq=seqs[-1],
        orders=len(uids),
        dictionary_sha256=hashlib.sha256(dictionary).digest(),
        body=body,
        body_sha256=hashlib.sha256(body).digest(),
    )


def decode_page(page: SnapshotPage) -> tuple[array[int], list[str], list[bytes]]:
    """The seqs, uids and frames of a page, after the checks that need no log."""
    body = page.body
    if hashlib.sha256(body).digest() != page.body_sha256:
        raise PageRefused("its body does not match its digest")
    if len(body) < _HEADER.size:
        raise PageRefused("its body is shorter than its header")
    magic, count, uid_size, frame_size = _HEADER.unpack_from(body)
    at = _HEADER.size
    if magic != _MAGIC or count != page.orders:
        raise PageRefused(f"its header is not that of a page of {page.orders} orders")
    if len(body) != at + 12 * count + uid_size + frame_size:
        raise PageRefused("its body is not as long as its header says")
    seqs = array("q", body[at : at + 8 * count])
    lengths = array("I", body[at + 8 * count : at + 12 * count])
    if sys.byteorder != "little":
        seqs.byteswap()
        lengths.byteswap()
    at += 12 * count
    uids = body[at : at + uid_size].decode("ascii").split("\n")
    frames_blob = body[at + uid_size :]
    if len(uids) != count or sum(lengths) != frame_size:
        raise PageRefused("its uids or frames do not add up to its orders")
    if seqs[0] <= page.after_seq or seqs[-1] != page.last_seq:
        raise PageRefused("its seqs are not those of its range")
    # Strictly increasing: in order (sorted() runs in C over a sorted run) and all distinct.
    in_order = sorted(seqs)
    if in_order != seqs.tolist() or len(set(in_order)) != count:
        raise PageRefused("its seqs do not increase")
    ends = list(accumulate(lengths))
    frames = [frames_blob[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    return seqs, uids, frames


@dataclasses.dataclass(slots=True)
class SnapshotRestore:
    """What a start took from the snapshot pages."""

    pages: int = 0
    orders: int = 0
    last_seq: int = 0  # the last seq of the last page taken in
    seconds: float = 0.0
    refused: str | None = None  # why the first refused page was refused


async def restore_from_pages(view: OrdersView, store: SnapshotStore) -> SnapshotRestore:
    """Take the checked pages into an empty ``view``, in seq order, up to the first page that
    fails a check (which, in a writer, is dropped with those after it); the caller reads the
    rest of the log after ``view.last_seq``."""
    outcome = SnapshotRestore()
    if view.last_seq or not store.snapshot_reads:
        return outcome
    started = time.perf_counter()
    dictionary = await store.read_dictionary()
    if dictionary is None:
        return outcome
    view.adopt(dictionary)
    digest = hashlib.sha256(dictionary).digest()
    async for page in store.snapshot_pages():
        if page.after_seq != view.last_seq:
            break  # the pages end here (or skip a range): the log from here on
        try:
            if page.dictionary_sha256 != digest:
                raise PageRefused("it was compressed with another dictionary")
            seqs, uids, frames = decode_page(page)
            await _check_against_log(view, store, page, seqs, uids, frames)
            view.project_packed(seqs, uids, frames)
        except (PageRefused, ValueError) as exc:
            outcome.refused = str(exc)
            await _refuse(store, page, str(exc))
            break
        outcome.pages += 1
        outcome.orders += page.orders
        outcome.last_seq = page.last_seq
    outcome.seconds = time.perf_counter() - started
    return outcome


async def _check_against_log(
    view: OrdersView,
    store: SnapshotStore,
    page: SnapshotPage,
    seqs: array[int],
    uids: list[str],
    frames: list[bytes],
) -> None:
    positions = random.sample(range(page.orders), min(SPOT_CHECKS, page.orders))
    count, logged = await store.log_agreement(
        page.after_seq, page.last_seq, [seqs[at] for at in positions]
    )
    if count != page.orders:
        raise PageRefused(f"it holds {page.orders} orders where the log holds {count}")
    codec = view.codec
    assert codec is not None  # adopted above
    for at in positions:
        found = logged.get(seqs[at])
        if found is None or found[0] != uids[at]:
            raise PageRefused(f"the log has another order at seq {seqs[at]}")
        try:
            value = orjson.loads(codec.decompress(frames[at]))
        except Exception as exc:  # zstd and orjson errors alike: the frame is not that order
            raise PageRefused(f"its order at seq {seqs[at]} does not decompress: {exc}") from exc
        if value != orjson.loads(found[1]):
            raise PageRefused(f"its order at seq {seqs[at]} differs from the log's")


async def _refuse(store: SnapshotStore, page: SnapshotPage, reason: str) -> None:
    if store.snapshot_writes:
        await store.drop_pages(page.after_seq)
        dropped = "dropped with the pages after it"
    else:
        dropped = "left for a writer to drop"
    log.warning(
        "snapshot page of seqs %d to %d disagrees with the log (%s): %s; the view is rebuilt"
        " from the log from seq %d",
        page.after_seq + 1,
        page.last_seq,
        reason,
        dropped,
        page.after_seq + 1,
        extra={"after_seq": page.after_seq, "last_seq": page.last_seq, "reason": reason},
    )


class PageWriter:
    """Writes the view's runs of ``page_orders`` orders as pages, after those already there.

    Only a writer whose view is compressed with the database's dictionary writes: the first
    writer publishes its own, and one that finds another there adopts it (recompressing its
    view once). Two writers may write the same page at once: pages are keyed by their range,
    both views are the same projection of the log, and the first insert wins.
    """

    def __init__(self, view: OrdersView, store: SnapshotStore, page_orders: int) -> None:
        self.view = view
        self.store = store
        self.page_orders = page_orders
        self.position = 0  # orders of the view already in pages
        self.after_seq = 0
        self._dictionary_shared = False

    def taken_from_pages(self, outcome: SnapshotRestore) -> None:
        """Start after the pages a start took in: they are in the database already."""
        self.position = outcome.orders
        self.after_seq = outcome.last_seq
        self._dictionary_shared = outcome.pages > 0

    @property
    def due(self) -> bool:
        """Whether a whole page of orders is waiting to be written."""
        return (
            self.store.snapshot_writes
            and self.view.codec is not None
            and len(self.view) - self.position >= self.page_orders
        )

    async def write_one(self) -> bool:
        """Write the next page if one is due; whether one was."""
        if not self.due:
            return False
        codec = self.view.codec
        assert codec is not None
        if not self._dictionary_shared:
            shared = await self.store.publish_dictionary(codec.dictionary)
            self.view.adopt(shared)
            self._dictionary_shared = True
            codec = self.view.codec
            assert codec is not None
        seqs, uids, frames = self.view.packed(self.position, self.position + self.page_orders)
        page = encode_page(self.after_seq, seqs, uids, frames, codec.dictionary)
        if await self.store.write_page(page):
            log.debug("snapshot page of seqs %d to %d written", page.after_seq + 1, page.last_seq)
        self.position += self.page_orders
        self.after_seq = page.last_seq
        return True
