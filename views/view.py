"""The in-memory view: order_uid -> the order's JSON bytes, a pure projection of orders_events.

It knows the log only as :class:`Projected` entries handed to it in seq order; reading the log
is the follower's work (streams/follower.py).

Orders are kept compressed: the orders of one log are near-identical JSON, so a zstandard
dictionary trained on the log's own first orders shrinks each to a tenth or less, and one
decompresses in one or two microseconds on the way out. Each order is one ``bytes`` frame in a
dict keyed by its uid; the seqs of all orders sit in one packed array beside it, in the same
(seq) order, so that a run of orders can be handed out and taken back as a snapshot page.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, Protocol, TypeVar, overload

import zstandard

_T = TypeVar("_T")

# Orders kept as they are until this many are in, then a dictionary is trained on them: enough
# samples for zstd to find what the orders share, few enough that the first pages pay little.
TRAIN_AFTER: Final = 5_000
DICTIONARY_BYTES: Final = 16_384
# Level 3 (zstd's default): level 9 and above shrink these orders by another 5 % at several
# times the CPU, paid by every order the view takes in.
LEVEL: Final = 3


class Projected(Protocol):
    """What the view projects: one entry of the log, as the event store hands it over."""

    @property
    def seq(self) -> int: ...

    @property
    def order_uid(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class Codec:
    """A zstd dictionary and the (de)compressor made from it. Frames carry no dictionary id
    and no checksum (the dictionary is the view's, and snapshot pages carry a digest of their
    own), only the content size, so that decompressing needs no guess."""

    def __init__(self, dictionary: bytes) -> None:
        self.dictionary = dictionary
        self.digest = hashlib.sha256(dictionary).digest()
        data = zstandard.ZstdCompressionDict(dictionary)
        compress = zstandard.ZstdCompressor(
            level=LEVEL,
            dict_data=data,
            write_checksum=False,
            write_dict_id=False,
            write_content_size=True,
        ).compress

        def compress_compact(payload: bytes) -> bytes:
            # zstandard allocates the worst-case size (over 512 bytes: from malloc, not from
            # Python's small-object pools) and shrinks it in place; millions of such frames
            # pin the freed rest of every block. A copy of the frame lands in the pools: after
            # a start from the log, 360 bytes of RSS an order instead of 1,400.
            return bytes(memoryview(compress(payload)))

        self.compress: Callable[[bytes], bytes] = compress_compact
        self.decompress: Callable[[bytes], bytes] = zstandard.ZstdDecompressor(
            dict_data=data
        ).decompress

    @classmethod
    def train(cls, samples: Sequence[bytes]) -> Codec | None:
        """A dictionary trained on ``samples``, or None when zstd finds too little to train on."""
        chunks: list[bytes | bytearray | memoryview] = [*samples]
        try:
            trained = zstandard.train_dictionary(DICTIONARY_BYTES, chunks, level=LEVEL)
        except zstandard.ZstdError:
            return None
        return cls(trained.as_bytes())


def _as_is(frame: bytes) -> bytes:
    return frame


class OrdersView(Mapping[str, bytes]):
    """Every order in the log, ready to send.

    The only ways in are :meth:`project`, fed with events from the log in seq order by the
    follower (at boot, and afterwards with the events the agent has just committed), its
    variant :meth:`project_packed` for snapshot pages, and :meth:`refresh`, which changes an
    order's bytes, never its value.
    """

    def __init__(self, *, train_after: int = TRAIN_AFTER) -> None:
        self._orders: dict[str, bytes] = {}  # uid -> frame (the order itself before a codec)
        self._seqs = array("q")  # the seq of each order, in the dict's (= the log's) order
        self.last_seq = 0
        self._codec: Codec | None = None
        self._pack: Callable[[bytes], bytes] = _as_is
        self._unpack: Callable[[bytes], bytes] = _as_is
        self._train_after = train_after

    @property
    def codec(self) -> Codec | None:
        """The dictionary the orders are compressed with (None until one is trained)."""
        return self._codec

    def adopt(self, dictionary: bytes) -> None:
        """Compress with ``dictionary`` from now on; orders already in are recompressed."""
        if self._codec is not None and self._codec.dictionary == dictionary:
            return
        codec = Codec(dictionary)
        unpack = self._unpack
        self._orders = {uid: codec.compress(unpack(frame)) for uid, frame in self._orders.items()}
        self._codec, self._pack, self._unpack = codec, codec.compress, codec.decompress

    def project(self, events: Iterable[Projected]) -> int:
        """Apply events in seq order and return how many were new.

        Events at or below ``last_seq`` are already in and are skipped.
        """
        orders = self._orders
        seqs = self._seqs
        pack = self._pack
        last = self.last_seq
        added = 0
        for event in events:
            seq = event.seq
            if seq <= last:
                continue
            # The log holds one event per order_uid, so the first write is the only write.
            uid = event.order_uid
            if uid not in orders:
                orders[uid] = pack(event.payload)
                seqs.append(seq)
            last = seq
            added += 1
        self.last_seq = last
        if self._codec is None and len(orders) >= self._train_after:
            self._train()
        return added

    def project_packed(self, seqs: array[int], uids: list[str], frames: list[bytes]) -> None:
        """Take in a run of orders as :meth:`packed` handed them out, compressed with this
        view's codec: the next orders of the log, in seq order. The caller has checked them."""
        if seqs and seqs[0] <= self.last_seq:
            raise ValueError(f"orders from seq {seqs[0]} are not after {self.last_seq}")
        before = len(self._orders)
        self._orders.update(zip(uids, frames, strict=True))
        if len(self._orders) != before + len(uids):
            raise ValueError("a run of orders repeats an order_uid the view holds")
        self._seqs.extend(seqs)
        if seqs:
            self.last_seq = seqs[-1]

    def packed(self, start: int, stop: int) -> tuple[array[int], list[str], list[bytes]]:
        """The orders at positions ``start`` to ``stop`` (in seq order) as stored: their seqs,
        uids and frames, for a snapshot page."""
        run = list(itertools.islice(self._orders.items(), start, stop))
        return self._seqs[start:stop], [uid for uid, _ in run], [frame for _, frame in run]

    def refresh(self, events: Iterable[Projected]) -> None:
        """Give events already projected the bytes they were committed with.

        An event read back from the log is PostgreSQL's jsonb text: the same JSON value as the
        message, in other bytes. The writer that committed it hands the message's own bytes
        here, for events a catch-up brought in first; the value does not change.
        """
        orders = self._orders
        for event in events:
            if event.seq <= self.last_seq and event.order_uid in orders:
                orders[event.order_uid] = self._pack(event.payload)

    def _train(self) -> None:
        # Too few (or too alike) to learn from: try again on twice as many, at once if the
        # view holds them, otherwise when it does.
        while len(self._orders) >= self._train_after:
            first = itertools.islice(self._orders.values(), 0, self._train_after)
            codec = Codec.train([self._unpack(frame) for frame in first])
            if codec is not None:
                self.adopt(codec.dictionary)
                return
            self._train_after *= 2

    @overload
    def get(self, order_uid: str, /) -> bytes | None: ...

    @overload
    def get(self, order_uid: str, /, default: bytes | _T) -> bytes | _T: ...

    def get(self, order_uid: str, /, default: object = None) -> object:
        frame = self._orders.get(order_uid)
        return default if frame is None else self._unpack(frame)

    def __getitem__(self, order_uid: str) -> bytes:
        return self._unpack(self._orders[order_uid])

    def __contains__(self, order_uid: object) -> bool:
        return order_uid in self._orders

    def __len__(self) -> int:
        return len(self._orders)

    def __iter__(self) -> Iterator[str]:
        return iter(self._orders)
