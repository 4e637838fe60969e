"""What a run sends: generated orders mixed with duplicates and invalid ones, or a file."""

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

from publisher.generate import OrderFactory

Kind = Literal["order", "duplicate", "invalid"]

# Duplicates are drawn from the most recent orders only: enough variety to exercise the
# service, without keeping every payload of a million-order run in memory.
_DUPLICATE_POOL = 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One payload to publish.

    ``uid`` is the order uid when the payload has one. Only ``"order"`` messages, the first
    publication of their uid, are deduplicated by JetStream via ``Nats-Msg-Id``.
    """

    data: bytes
    kind: Kind
    uid: str | None = None


def generated_messages(
    factory: OrderFactory,
    count: int,
    duplicates: float = 0.0,
    invalid: float = 0.0,
) -> Iterator[Message]:
    """Yield ``count`` messages: fresh orders, and about the given shares of duplicates and invalid.

    A duplicate repeats an already-yielded order, half the time byte for byte and half the
    time as a different valid order under the same uid. Before any order exists a duplicate
    cannot be made, so that draw yields a fresh order instead.
    """
    if not 0.0 <= duplicates <= 1.0 or not 0.0 <= invalid <= 1.0 or duplicates + invalid > 1.0:
        raise ValueError(
            f"shares must lie in [0, 1] and add up to at most 1, got {duplicates} and {invalid}"
        )
    rng = factory.rng
    sent: deque[tuple[str, bytes]] = deque(maxlen=_DUPLICATE_POOL)
    for _ in range(count):
        draw = rng.random()
        if draw < duplicates and sent:
            uid, data = rng.choice(sent)
            if rng.random() < 0.5:
                data = orjson.dumps(factory.order(uid=uid))
            yield Message(data, "duplicate", uid)
        elif duplicates <= draw < duplicates + invalid:
            yield Message(factory.invalid_message()[1], "invalid")
        else:
            order = factory.order()
            uid = str(order["order_uid"])
            data = orjson.dumps(order)
            sent.append((uid, data))
            yield Message(data, "order", uid)


def file_messages(path: Path) -> list[Message]:
    """Read the messages held in a JSON file.

    A JSON array gives one message per element, each serialised once; anything else is sent
    as the file's exact bytes, malformed or not, so broken input can be replayed on purpose.
    Payloads that are not JSON objects with a non-empty string ``order_uid`` count as invalid;
    a uid seen earlier in the file counts as a duplicate.
    """
    raw = path.read_bytes()
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return [Message(raw, "invalid")]
    if isinstance(parsed, list):
        payloads = [(orjson.dumps(element), element) for element in parsed]
    else:
        payloads = [(raw, parsed)]

    seen: set[str] = set()
    messages: list[Message] = []
    for data, value in payloads:
        uid = value.get("order_uid") if isinstance(value, dict) else None
        if not isinstance(uid, str) or not uid:
            messages.append(Message(data, "invalid"))
        elif uid in seen:
            messages.append(Message(data, "duplicate", uid))
        else:
            seen.add(uid)
            messages.append(Message(data, "order", uid))
    return messages
