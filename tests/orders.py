"""Orders for tests and benchmarks: the reference model with a uid of the test's choosing, and
fresh ones from the publisher's factory, as it publishes them."""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import orjson

from publisher.generate import OrderFactory
from publisher.messages import Message

MODEL: dict[str, Any] = orjson.loads(
    (Path(__file__).resolve().parent.parent / "publisher" / "model.json").read_bytes()
)


def new_uid(prefix: str = "t") -> str:
    """A uid no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:20]}"


def order_dict(uid: str | None = None, **changes: Any) -> dict[str, Any]:
    """The model order with ``order_uid`` (and its transaction) set, plus top-level changes."""
    order = copy.deepcopy(MODEL)
    order["order_uid"] = order["payment"]["transaction"] = uid or new_uid()
    order.update(changes)
    return order


def order_bytes(uid: str | None = None, **changes: Any) -> bytes:
    """:func:`order_dict` serialised."""
    return orjson.dumps(order_dict(uid, **changes))


def orders(count: int, seed: int) -> list[Message]:
    """``count`` fresh, valid orders as the publisher makes them (unique uids), the same for
    the same ``seed``."""
    factory = OrderFactory(seed=seed)
    made = [factory.order() for _ in range(count)]
    return [Message(orjson.dumps(order), "order", str(order["order_uid"])) for order in made]
