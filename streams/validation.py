"""Which messages are orders: the order's shape declared once, and readable reasons for the rest.

The shape follows ``publisher/model.json``. msgspec checks it while decoding, so a message is
parsed once and never re-serialised: the agent hands the bytes as received to the store, which
keeps their JSON value (a ``jsonb`` column: the same value, PostgreSQL's own spacing and key
order), and to the view of the worker that stored them. Fields the shape does not name are
allowed and kept, as the value is stored whole.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Annotated, Final

import msgspec

MAX_MESSAGE_BYTES: Final = 1024 * 1024
# \A and \Z, not ^ and $: "$" also matches before a final newline, and "abc\n" is no uid.
UID_PATTERN: Final = r"\A[A-Za-z0-9_-]{1,64}\Z"

_UID: Final = re.compile(UID_PATTERN)

Uid = Annotated[str, msgspec.Meta(pattern=UID_PATTERN)]
Amount = Annotated[int, msgspec.Meta(ge=0)]


# gc=False: a decoded order is a tree of fresh objects, dropped at once and never in a cycle;
# tracked by the cyclic GC, every order's structs would count toward its next collection.
class Delivery(msgspec.Struct, gc=False):
    name: str
    phone: str
    zip: str
    city: str
    address: str
    region: str
    email: str


class Payment(msgspec.Struct, gc=False):
    transaction: str
    request_id: str
    currency: str
    provider: str
    amount: Amount
    payment_dt: int
    bank: str
    delivery_cost: Amount
    goods_total: Amount
    custom_fee: Amount


class Item(msgspec.Struct, gc=False):
    chrt_id: int
    track_number: str
    price: Amount
    rid: str
    name: str
    sale: Annotated[int, msgspec.Meta(ge=0, le=100)]
    size: str
    total_price: Amount
    nm_id: int
    brand: str
    status: int


class Order(msgspec.Struct, gc=False):
    order_uid: Uid
    track_number: str
    entry: str
    delivery: Delivery
    payment: Payment
    items: Annotated[list[Item], msgspec.Meta(min_length=1)]
    locale: str
    internal_signature: str
    customer_id: str
    delivery_service: str
    shardkey: str
    sm_id: int
    date_created: datetime
    oof_shard: str


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """A valid order: its idempotency key and the payload exactly as received."""

    order_uid: str
    payload: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Rejected:
    """An invalid message and the reason, written for the person who reads the dead letters."""

    reason: str


_decoder: Final = msgspec.json.Decoder(Order)

# PostgreSQL's jsonb cannot hold U+0000; an escaped backslash before "u0000" is plain text.
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

_TYPE_NAMES: Final = {
    "int": "integer",
    "str": "string",
    "float": "number",
    "bool": "boolean",
    "array": "array",
    "object": "object",
    "null": "null",
}
_EXPECTED_GOT: Final = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`$")
_QUOTED: Final = re.compile(r"`([^`]+)`")


def validate(raw: bytes) -> Accepted | Rejected:
    """Decide whether ``raw`` is an order; never raises for any input."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return Rejected(f"message is {len(raw)} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
    try:
        # msgspec checks UTF-8 only in the strings it decodes, not in fields the shape does
        # not name; the store needs the whole payload as text.
        if not raw.isascii():
            raw.decode("utf-8")
        order = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return Rejected(_explain(str(exc)))
    except msgspec.DecodeError as exc:
        return Rejected(f"not valid JSON: {exc}")
    except UnicodeDecodeError as exc:
        return Rejected(f"not valid UTF-8: {exc.reason}")
    except RecursionError:
        return Rejected("not valid JSON: nested more deeply than Python can follow")
    # A backslash is one byte to look for (memchr), where "\u0000" is a substring search;
    # most orders have none.
    if b"\\" in raw and b"\\u0000" in raw and _NUL_ESCAPE.search(raw):
        return Rejected("contains the character U+0000, which PostgreSQL cannot store")
    return Accepted(order.order_uid, raw)


def _explain(message: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.a.b`" as "a.b: expected integer, got string"."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        text, where = message, ""
    path = where.rstrip("`").removeprefix("$").removeprefix(".") or "order"
    if text.startswith("Object missing required field `"):
        field = text.split("`")[1]
        return f"{field if path == 'order' else path + '.' + field}: required field is missing"
    matched = _EXPECTED_GOT.match(text)
    if matched:
        expected, got = (_TYPE_NAMES.get(name, name) for name in matched.groups())
        return f"{path}: expected {expected}, got {got}"
    if "matching regex" in text and path == "order_uid":
        return "order_uid: expected 1 to 64 characters, each a letter, digit, '_' or '-'"
    if text.startswith("Expected `array` of length >= 1"):
        return f"{path}: expected at least one entry"
    readable = _QUOTED.sub(lambda name: _TYPE_NAMES.get(name[1], name[1]), text)
    return f"{path}: {readable[:1].lower()}{readable[1:]}"


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` may be an order_uid at all (the HTTP route answers 400 when not)."""
    return _UID.match(uid) is not None
