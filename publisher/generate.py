"""Orders built from the model order in ``model.json``, valid ones and deliberately broken ones."""

import random
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import orjson

# Kept as bytes: parsing it again gives a fresh, independent copy of the whole tree, which
# is several times faster than copy.deepcopy for a document of this shape.
TEMPLATE_JSON: bytes = files("publisher").joinpath("model.json").read_bytes()

INVALID_KINDS: tuple[str, ...] = (
    "not_json",
    "not_object",
    "missing_uid",
    "empty_uid",
    "wrong_type",
    "no_items",
    "bad_utf8",
    "truncated",
)

# A handful of real-looking goods so that generated orders do not all look the same on the page.
_GOODS: tuple[tuple[str, str, str], ...] = (
    ("Mascaras", "Vivienne Sabo", "0"),
    ("Lipstick", "Maybelline", "0"),
    ("T-shirt", "Befree", "M"),
    ("Sneakers", "Demix", "42"),
    ("Backpack", "Xiaomi", "0"),
    ("Phone case", "Baseus", "0"),
    ("Hoodie", "Gloria Jeans", "L"),
)
_DELIVERY_COSTS: tuple[int, ...] = (0, 500, 1500)
_TRACK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Marker swapped for undecodable bytes after serialisation; orjson itself cannot emit them.
_BAD_UTF8_MARKER = "__bad_utf8__"


class OrderFactory:
    """Makes orders shaped exactly like the model order, each with fresh identifiers.

    Every random choice comes from ``self.rng``, so a seeded factory yields the same orders,
    uids included, apart from the timestamps, which follow ``clock``.
    """

    def __init__(
        self,
        seed: int | None = None,
        max_items: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.rng = random.Random(seed)
        self.max_items = max_items
        self._clock = clock

    def order(self, uid: str | None = None) -> dict[str, object]:
        """Return a new valid order.

        Its uid is ``uid`` if given (to build a same-uid, different-content duplicate), else
        one no earlier call returned, barring 2**-96 luck.
        """
        return self._order(uid)

    def invalid_message(self, kind: str | None = None) -> tuple[str, bytes]:
        """Return ``(kind, raw bytes)`` for a message the service must reject.

        ``kind`` is one of ``INVALID_KINDS``; ``None`` picks one at random. Apart from the
        defect its kind names, each message is a consistent order, so a validator that
        rejects it can only be rejecting it for that defect.
        """
        if kind is None:
            kind = self.rng.choice(INVALID_KINDS)
        if kind not in INVALID_KINDS:
            raise ValueError(
                f"unknown invalid kind {kind!r}; expected one of {', '.join(INVALID_KINDS)}"
            )
        if kind == "not_json":
            return kind, b'{oops, "order_uid": }'
        order = self._order()
        if kind == "not_object":
            return kind, orjson.dumps([order])
        if kind == "missing_uid":
            del order["order_uid"]
        elif kind == "empty_uid":
            order["order_uid"] = ""
            order["payment"]["transaction"] = ""
        elif kind == "wrong_type":
            order["payment"]["amount"] = str(order["payment"]["amount"])
        elif kind == "no_items":
            order["items"] = []
            order["payment"]["goods_total"] = 0
            order["payment"]["amount"] = order["payment"]["delivery_cost"]
        elif kind == "bad_utf8":
            order["delivery"]["name"] = _BAD_UTF8_MARKER
            raw = orjson.dumps(order)
            return kind, raw.replace(_BAD_UTF8_MARKER.encode(), b"Test \xff\xfe Testov", 1)
        elif kind == "truncated":
            raw = orjson.dumps(order)
            return kind, raw[: len(raw) // 2]
        return kind, orjson.dumps(order)

    def _uid(self) -> str:
        # 96 random bits also keep unseeded runs apart; the suffix mirrors the model's uid.
        return f"{self.rng.getrandbits(96):024x}test"

    # Typed as Any inside: the order is a JSON tree whose shape is the template's, and
    # spelling that shape out as TypedDicts here would duplicate the service's own schema.
    def _order(self, uid: str | None = None) -> dict[str, Any]:
        rng = self.rng
        order: dict[str, Any] = orjson.loads(TEMPLATE_JSON)
        if uid is None:
            uid = self._uid()
        track = "WBIL" + "".join(rng.choices(_TRACK_ALPHABET, k=10))
        item_template: dict[str, Any] = order["items"][0]

        items: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, self.max_items)):
            name, brand, size = rng.choice(_GOODS)
            price = rng.randint(50, 10_000)
            sale = rng.randint(0, 70)
            items.append(
                {
                    **item_template,
                    "chrt_id": rng.randint(1_000_000, 9_999_999),
                    "track_number": track,
                    "price": price,
                    "rid": f"{rng.getrandbits(80):020x}test",
                    "name": name,
                    "sale": sale,
                    "size": size,
                    "total_price": price * (100 - sale) // 100,
                    "nm_id": rng.randint(1_000_000, 9_999_999),
                    "brand": brand,
                }
            )

        now = self._clock()
        goods_total = sum(item["total_price"] for item in items)
        delivery_cost = rng.choice(_DELIVERY_COSTS)
        payment: dict[str, Any] = order["payment"]
        payment["transaction"] = uid
        payment["delivery_cost"] = delivery_cost
        payment["goods_total"] = goods_total
        payment["amount"] = goods_total + delivery_cost
        payment["payment_dt"] = int(now)

        order["order_uid"] = uid
        order["track_number"] = track
        order["items"] = items
        order["date_created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return order
