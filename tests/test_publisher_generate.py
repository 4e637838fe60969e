"""Unit tests of the order generator and the message mix: no NATS server needed."""

import re
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from publisher.generate import INVALID_KINDS, OrderFactory
from publisher.messages import Message, file_messages, generated_messages

TEMPLATE: dict[str, Any] = orjson.loads(
    (Path(__file__).parent.parent / "publisher" / "model.json").read_bytes()
)
UID_PATTERN = re.compile(r"[A-Za-z0-9_-]{19,64}")
FIXED_NOW = 1_700_000_000.5  # 2023-11-14T22:13:20Z


def fixed_clock() -> float:
    return FIXED_NOW


def as_dict(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value


def assert_same_types(template: object, value: object, path: str = "$") -> None:
    """Fail unless ``value`` has the template's keys, and the template's type at every path."""
    assert type(value) is type(template), (
        f"{path}: {type(value).__name__} != {type(template).__name__}"
    )
    if isinstance(template, dict):
        assert isinstance(value, dict)
        assert value.keys() == template.keys(), f"{path}: keys differ"
        for key, expected in template.items():
            assert_same_types(expected, value[key], f"{path}.{key}")
    elif isinstance(template, list):
        assert isinstance(value, list)
        assert value, f"{path}: empty list"
        for index, element in enumerate(value):
            assert_same_types(template[0], element, f"{path}[{index}]")


def test_ten_thousand_uids_are_unique_and_well_formed() -> None:
    factory = OrderFactory()
    uids = [as_dict(factory.order())["order_uid"] for _ in range(10_000)]

    assert len(set(uids)) == len(uids)
    for uid in uids:
        assert isinstance(uid, str)
        assert UID_PATTERN.fullmatch(uid), uid


def test_rids_are_unique_across_orders() -> None:
    factory = OrderFactory(seed=3)
    rids = [item["rid"] for _ in range(2_000) for item in as_dict(factory.order())["items"]]

    assert len(set(rids)) == len(rids)


@pytest.mark.parametrize("seed", range(20))
def test_order_is_internally_consistent(seed: int) -> None:
    order = as_dict(OrderFactory(seed=seed, max_items=5).order())
    payment = as_dict(order["payment"])
    items = order["items"]

    assert payment["transaction"] == order["order_uid"]
    assert order["order_uid"] != TEMPLATE["order_uid"]
    assert order["track_number"] != TEMPLATE["track_number"]
    assert 1 <= len(items) <= 5
    for item in items:
        assert item["track_number"] == order["track_number"]
        assert item["total_price"] == item["price"] * (100 - item["sale"]) // 100
        assert item["total_price"] >= 0
    assert payment["goods_total"] == sum(item["total_price"] for item in items)
    assert payment["amount"] == payment["goods_total"] + payment["delivery_cost"]


def test_items_per_order_cover_one_to_max() -> None:
    factory = OrderFactory(seed=1, max_items=4)
    counts = {len(as_dict(factory.order())["items"]) for _ in range(500)}

    assert counts == {1, 2, 3, 4}


def test_single_item_orders_when_max_is_one() -> None:
    factory = OrderFactory(seed=1, max_items=1)

    assert all(len(as_dict(factory.order())["items"]) == 1 for _ in range(100))


def test_max_items_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        OrderFactory(max_items=0)


@pytest.mark.parametrize("seed", range(20))
def test_types_match_the_template_field_by_field(seed: int) -> None:
    assert_same_types(TEMPLATE, OrderFactory(seed=seed).order())


def test_type_comparison_catches_a_changed_type() -> None:
    order = as_dict(OrderFactory(seed=0).order())
    as_dict(order["payment"])["amount"] = "1817"

    with pytest.raises(AssertionError, match=r"\$\.payment\.amount"):
        assert_same_types(TEMPLATE, order)


def test_timestamps_come_from_the_clock() -> None:
    order = as_dict(OrderFactory(seed=0, clock=fixed_clock).order())

    assert order["date_created"] == "2023-11-14T22:13:20Z"
    assert as_dict(order["payment"])["payment_dt"] == 1_700_000_000


def test_timestamps_default_to_now_in_utc() -> None:
    before = int(time.time())
    order = as_dict(OrderFactory().order())
    after = time.time()

    created = datetime.strptime(order["date_created"], "%Y-%m-%dT%H:%M:%SZ")
    created_ts = created.replace(tzinfo=UTC).timestamp()
    assert before <= created_ts <= after
    assert before <= as_dict(order["payment"])["payment_dt"] <= after


def test_order_serialises_to_json_that_reads_back_equal() -> None:
    order = OrderFactory(seed=5).order()

    assert orjson.loads(orjson.dumps(order)) == order


def test_given_uid_is_used_for_order_and_transaction() -> None:
    order = as_dict(OrderFactory(seed=5).order(uid="abc123test"))

    assert order["order_uid"] == "abc123test"
    assert as_dict(order["payment"])["transaction"] == "abc123test"


def test_same_seed_gives_same_orders() -> None:
    first = OrderFactory(seed=42, clock=fixed_clock)
    second = OrderFactory(seed=42, clock=fixed_clock)

    assert [first.order() for _ in range(50)] == [second.order() for _ in range(50)]
    assert [first.invalid_message() for _ in range(50)] == [
        second.invalid_message() for _ in range(50)
    ]


def test_different_seeds_give_different_orders() -> None:
    first = OrderFactory(seed=1, clock=fixed_clock).order()
    second = OrderFactory(seed=2, clock=fixed_clock).order()

    assert first["order_uid"] != second["order_uid"]


def test_orders_do_not_share_mutable_state() -> None:
    factory = OrderFactory(seed=9)
    first = as_dict(factory.order())
    second = as_dict(factory.order())
    as_dict(first["delivery"])["name"] = "changed"

    assert as_dict(second["delivery"])["name"] == TEMPLATE["delivery"]["name"]
    assert as_dict(factory.order()["delivery"])["name"] == TEMPLATE["delivery"]["name"]


def decode(raw: bytes) -> dict[str, Any]:
    value = orjson.loads(raw)
    assert isinstance(value, dict)
    return value


def test_not_json_is_not_parseable() -> None:
    kind, raw = OrderFactory(seed=0).invalid_message("not_json")

    assert kind == "not_json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


def test_not_object_is_a_json_list() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("not_object")

    assert isinstance(orjson.loads(raw), list)


def test_missing_uid_has_no_order_uid() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("missing_uid")
    order = decode(raw)

    assert "order_uid" not in order
    assert order.keys() == TEMPLATE.keys() - {"order_uid"}


def test_empty_uid_has_an_empty_order_uid() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("empty_uid")
    order = decode(raw)

    assert order["order_uid"] == ""
    assert order.keys() == TEMPLATE.keys()


def test_wrong_type_has_a_string_amount() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("wrong_type")
    payment = decode(raw)["payment"]

    assert isinstance(payment["amount"], str)
    assert int(payment["amount"]) == payment["goods_total"] + payment["delivery_cost"]


def test_no_items_has_an_empty_item_list() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("no_items")
    order = decode(raw)

    assert order["items"] == []
    assert order["order_uid"]


def test_bad_utf8_is_not_utf8_inside_a_json_string() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("bad_utf8")

    assert b"\xff\xfe" in raw
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    # Everything but the bad bytes is a well-formed order: the defect is the encoding alone.
    repaired = decode(raw.replace(b"\xff\xfe", b""))
    assert repaired["delivery"]["name"] == "Test  Testov"


def test_truncated_is_the_first_half_of_an_order() -> None:
    _, raw = OrderFactory(seed=0).invalid_message("truncated")

    assert raw.startswith(b'{"order_uid":"')
    assert len(raw) > 100
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)


def test_every_kind_is_rejected_by_a_strict_reading() -> None:
    factory = OrderFactory(seed=0)
    for kind in INVALID_KINDS:
        returned_kind, raw = factory.invalid_message(kind)
        assert returned_kind == kind
        assert not looks_valid(raw), kind


def test_random_kinds_cover_all_kinds() -> None:
    factory = OrderFactory(seed=0)
    seen = {factory.invalid_message()[0] for _ in range(500)}

    assert seen == set(INVALID_KINDS)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown invalid kind"):
        OrderFactory().invalid_message("nonsense")


def test_valid_orders_pass_the_strict_reading() -> None:
    factory = OrderFactory(seed=0)

    assert all(looks_valid(orjson.dumps(factory.order())) for _ in range(100))


def looks_valid(raw: bytes) -> bool:
    """A small stand-in for the service's validation, just enough to tell the kinds apart."""
    try:
        order = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(order, dict):
        return False
    uid = order.get("order_uid")
    payment = order.get("payment")
    items = order.get("items")
    return (
        isinstance(uid, str)
        and bool(uid)
        and isinstance(payment, dict)
        and isinstance(payment.get("amount"), int)
        and isinstance(items, list)
        and bool(items)
    )


def test_message_mix_follows_the_shares() -> None:
    messages = list(generated_messages(OrderFactory(seed=4), 10_000, duplicates=0.2, invalid=0.1))
    kinds = Counter(message.kind for message in messages)

    assert len(messages) == 10_000
    assert 1_800 <= kinds["duplicate"] <= 2_200
    assert 850 <= kinds["invalid"] <= 1_150


def test_duplicates_repeat_earlier_uids_and_orders_never_do() -> None:
    messages = list(generated_messages(OrderFactory(seed=4), 2_000, duplicates=0.3))
    order_uids: list[str] = []
    exact = changed = 0
    payloads: dict[str, bytes] = {}
    for message in messages:
        assert message.uid is not None
        if message.kind == "order":
            order_uids.append(message.uid)
            payloads[message.uid] = message.data
        else:
            assert message.kind == "duplicate"
            assert message.uid in payloads, "a duplicate must follow its original"
            assert decode(message.data)["order_uid"] == message.uid
            if message.data == payloads[message.uid]:
                exact += 1
            else:
                changed += 1
                assert_same_types(TEMPLATE, decode(message.data))

    assert len(set(order_uids)) == len(order_uids)
    assert exact > 100
    assert changed > 100


def test_file_array_elements_are_classified(tmp_path: Path) -> None:
    order = as_dict(OrderFactory(seed=8).order())
    path = tmp_path / "orders.json"
    path.write_bytes(orjson.dumps([order, order, {"order_uid": ""}, [1]]))

    kinds = [(message.kind, message.uid) for message in file_messages(path)]

    uid = order["order_uid"]
    assert kinds == [("order", uid), ("duplicate", uid), ("invalid", None), ("invalid", None)]


def test_file_single_document_is_sent_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "order.json"
    raw = b'{ "order_uid" : "abc",\n  "items": [] }\n'
    path.write_bytes(raw)

    (message,) = file_messages(path)

    assert message.data == raw
    assert (message.kind, message.uid) == ("order", "abc")


def test_file_with_broken_json_is_sent_as_invalid(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_bytes(b'{"order_uid": "abc"')

    assert file_messages(path) == [Message(b'{"order_uid": "abc"', "invalid")]
