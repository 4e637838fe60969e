"""Validation decides what is an order; every refusal carries a reason a person can act on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from streams.validation import MAX_MESSAGE_BYTES, Accepted, Rejected, validate
from tests.orders import MODEL, order_bytes, order_dict


def _mutated(change: Callable[[dict[str, Any]], object]) -> bytes:
    order = order_dict("mutated")
    change(order)
    return orjson.dumps(order)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty message", b"", "not valid JSON"),
    ("not JSON", b"{oops", "not valid JSON"),
    ("truncated", order_bytes("cut")[:120], "not valid JSON"),
    ("NaN literal", order_bytes("nan").replace(b'"sm_id":99', b'"sm_id":NaN'), "not valid JSON"),
    ("invalid UTF-8", order_bytes("utf").replace(b"Mascaras", b"Mas\xff\xfe"), "not valid UTF-8"),
    (
        "invalid UTF-8 in a field the shape does not name",
        order_bytes("utf2", note="x").replace(b'"note":"x"', b'"note":"\xc3("'),
        "not valid UTF-8",
    ),
    (
        "U+0000 escaped in a field the shape does not name",
        order_bytes("nul2", note="\x00"),
        "U+0000",
    ),
    ("a JSON array", b"[1, 2]", "order: expected object, got array"),
    ("a JSON string", b'"order"', "order: expected object, got string"),
    ("null", b"null", "order: expected object, got null"),
    (
        "missing order_uid",
        _mutated(lambda o: o.pop("order_uid")),
        "order_uid: required field is missing",
    ),
    ("empty order_uid", _mutated(lambda o: o.update(order_uid="")), "order_uid: expected 1 to 64"),
    (
        "order_uid with HTML",
        _mutated(lambda o: o.update(order_uid="<b>x</b>")),
        "order_uid: expected 1 to 64",
    ),
    (
        "order_uid too long",
        _mutated(lambda o: o.update(order_uid="a" * 65)),
        "order_uid: expected 1 to 64",
    ),
    (
        "order_uid a number",
        _mutated(lambda o: o.update(order_uid=42)),
        "order_uid: expected string, got integer",
    ),
    (
        "amount a string",
        _mutated(lambda o: o["payment"].update(amount="1817")),
        "payment.amount: expected integer, got string",
    ),
    (
        "amount negative",
        _mutated(lambda o: o["payment"].update(amount=-1)),
        "payment.amount: expected integer >= 0",
    ),
    (
        "amount a float",
        _mutated(lambda o: o["payment"].update(amount=18.17)),
        "payment.amount: expected integer, got number",
    ),
    (
        "sm_id a boolean",
        _mutated(lambda o: o.update(sm_id=True)),
        "sm_id: expected integer, got boolean",
    ),
    ("items empty", _mutated(lambda o: o.update(items=[])), "items: expected at least one entry"),
    (
        "items not a list",
        _mutated(lambda o: o.update(items={})),
        "items: expected array, got object",
    ),
    (
        "item price a string",
        _mutated(lambda o: o["items"][0].update(price="453")),
        "items[0].price: expected integer, got string",
    ),
    (
        "item missing rid",
        _mutated(lambda o: o["items"][0].pop("rid")),
        "items[0].rid: required field is missing",
    ),
    (
        "sale over 100",
        _mutated(lambda o: o["items"][0].update(sale=101)),
        "items[0].sale: expected integer <= 100",
    ),
    (
        "delivery null",
        _mutated(lambda o: o.update(delivery=None)),
        "delivery: expected object, got null",
    ),
    (
        "delivery without city",
        _mutated(lambda o: o["delivery"].pop("city")),
        "delivery.city: required field is missing",
    ),
    (
        "date not RFC 3339",
        _mutated(lambda o: o.update(date_created="yesterday")),
        "date_created: invalid RFC3339",
    ),
    ("U+0000 in a string", _mutated(lambda o: o.update(locale="e\x00n")), "U+0000"),
    ("over the size limit", b" " * (MAX_MESSAGE_BYTES + 1), "more than the 1048576 allowed"),
]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [(raw, reason) for _, raw, reason in MALFORMED],
    ids=[name for name, _, _ in MALFORMED],
)
def test_malformed_message_is_rejected_with_its_reason(raw: bytes, reason: str) -> None:
    verdict = validate(raw)
    assert isinstance(verdict, Rejected)
    assert reason in verdict.reason


def test_model_order_is_accepted_with_its_bytes_untouched(model_order: bytes) -> None:
    verdict = validate(model_order)
    assert verdict == Accepted(MODEL["order_uid"], model_order)


def test_unknown_fields_are_kept_in_the_payload() -> None:
    raw = order_bytes("extra", gift_wrap={"colour": "red"})
    verdict = validate(raw)
    assert isinstance(verdict, Accepted)
    assert orjson.loads(verdict.payload)["gift_wrap"] == {"colour": "red"}


def test_escaped_backslash_before_u0000_is_text_not_a_nul() -> None:
    raw = order_bytes("slash", locale="\\u0000")  # the six characters \u0000, not U+0000
    assert isinstance(validate(raw), Accepted)
