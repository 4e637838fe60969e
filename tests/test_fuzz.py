"""Hostile messages: property-based mutations of the model order (tests/fuzz_messages.py).

For every input ``streams.validation.validate`` must return, never raise; an Accepted one must
be storable (``PostgresEventStore.write_batch`` commits it and the log's payload names the same
order_uid), a Rejected one must carry a reason and be storable as a dead letter. Then a few
hundred such messages go through a real worker over NATS, and each must end stored or
dead-lettered, with the worker up and the consumer drained.

What the suite found in the service is pinned by the ``test_finding_*`` tests below. While a
finding is open (``OPEN_FINDINGS``) its test is an expected failure (strict: the fix makes the
suite fail until the finding is closed there), and the property tests count its inputs apart
(the worker run leaves out the inputs that would stall it) instead of failing on them again.
Once closed, the finding's test and the property tests guard against its return.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import random
import re
import time
from pathlib import Path
from typing import Final
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from publisher.messages import Message
from streams.metrics import reason_class
from streams.store import DeadLetter, RefusedByDatabase
from streams.validation import Accepted, Rejected, validate
from tests import fuzz_messages
from tests.chaos_servers import (
    FULL,
    Figures,
    chaos,
    consumer_state,
    publish_steadily,
    sized,
)
from tests.database import InspectedStore
from tests.harness import Route
from tests.orders import order_bytes, order_dict, orders
from tests.worker import Worker, eventually

pytestmark = chaos

UID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # README: 1-64 of A-Z a-z 0-9 _ -
NATS_MAX_PAYLOAD: Final = 1_000_000  # nats-server's default max_payload is 1 MiB, headers included


# ---------------------------------------------------------------------------------------------
# Reproducers of the findings


def with_unnamed_field(raw_value: bytes, uid: str = "finding") -> bytes:
    """The model order with a field the order's shape does not name, holding ``raw_value``."""
    return order_bytes(uid)[:-1] + b',"zz":' + raw_value + b"}"


DEEP: Final = with_unnamed_field(b"[" * 5_000 + b"]" * 5_000, "findingdeep")
NOT_UTF8: Final = with_unnamed_field(b'"\xff\xfe"', "findingutf8")
NEWLINE_UID: Final = order_bytes("findingnewline\n")
HUGE_NUMBER: Final = with_unnamed_field(b"1e1000000", "findingnumber")


FINDINGS: Final = {
    "F1": "validate() raised RecursionError on deeply nested JSON; in the worker the agent"
    " crashed and consumption stopped for good",
    "F2": "invalid UTF-8 in a field the shape does not name was Accepted; write_batch then"
    " raised UnicodeDecodeError and the batch was NAKed and redelivered forever",
    "F3": "an order_uid with a trailing newline was Accepted ('$' matches before a final newline)",
    "F4": "an Accepted payload PostgreSQL refuses (numbers beyond numeric's range in a field"
    " the shape does not name); the agent dead-letters it as 'refused by PostgreSQL'",
}
# The findings not fixed yet. Their tests below are expected to fail (strictly: a fix makes
# them pass, and the suite fails until the finding is taken out of this set), and the property
# tests count their inputs apart instead of failing on them. Once a finding is out of this set,
# its test and the property tests guard against its return.
OPEN_FINDINGS: Final = frozenset({"F4"})


def pinned(finding: str) -> pytest.MarkDecorator:
    """Marks the test of ``finding``: an expected failure while the finding is open."""
    return pytest.mark.xfail(
        finding in OPEN_FINDINGS, strict=True, reason=f"{finding}: {FINDINGS[finding]}"
    )


# ---------------------------------------------------------------------------------------------
# The property


@dataclasses.dataclass(frozen=True)
class Judgement:
    outcome: str  # "accepted", "duplicate", or "rejected:<reason class>"
    violation: str | None = None
    finding: str | None = None


async def judge(store: InspectedStore, raw: bytes, source: str) -> Judgement:
    """What validate and the store make of one input, and whether that breaks the promise."""
    try:
        verdict = validate(raw)
    except RecursionError as exc:
        return Judgement("raised", f"validate raised {exc!r}", "F1")
    except Exception as exc:
        return Judgement("raised", f"validate raised {exc!r}")
    if isinstance(verdict, Rejected):
        if not verdict.reason.strip():
            return Judgement("rejected:?", "Rejected without a reason")
        try:
            await store.write_batch([], [DeadLetter(raw, verdict.reason, source)])
        except Exception as exc:
            return Judgement("rejected", f"the dead letter could not be written: {exc!r}")
        return Judgement(f"rejected:{reason_class(verdict.reason)}")
    uid = verdict.order_uid
    if not UID.fullmatch(uid):
        finding = "F3" if UID.fullmatch(uid.removesuffix("\n")) else None
        return Judgement("accepted", f"Accepted with order_uid {uid!r}", finding)
    try:
        result = await store.write_batch([verdict], [])
    except UnicodeDecodeError as exc:
        return Judgement("accepted", f"write_batch raised {exc!r}", "F2")
    except RefusedByDatabase as exc:
        finding = "F4" if "overflows numeric" in str(exc) else None
        return Judgement("accepted", f"PostgreSQL refused an Accepted payload: {exc}", finding)
    except Exception as exc:
        return Judgement("accepted", f"write_batch raised {exc!r}")
    if uid in result.duplicates:
        return Judgement("duplicate")
    rows = await store.fetch(
        "SELECT payload->>'order_uid' FROM orders_events WHERE order_uid = %s", [uid]
    )
    if rows != [(uid,)]:
        return Judgement("accepted", f"log row {rows!r} for order_uid {uid!r}")
    return Judgement("accepted")


def test_hostile_messages_are_stored_or_rejected_with_a_reason(
    database_url: str, figures: Figures
) -> None:
    """Hypothesis drives the mutations; the same inputs every run inside ``make test``
    (derandomized), new ones at each ``make chaos``."""
    examples = sized(2_000, 20_000)
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(InspectedStore.open(database_url))
    active = OPEN_FINDINGS
    tally: collections.Counter[str] = collections.Counter()
    known: collections.Counter[str] = collections.Counter()
    numbers = itertools.count()
    started = time.monotonic()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not FULL,
        suppress_health_check=list(HealthCheck),
    )
    @given(rng=st.randoms(use_true_random=True))
    def check(rng: random.Random) -> None:
        number = next(numbers)
        raw = fuzz_messages.message(rng, f"fz{number}")
        judgement = loop.run_until_complete(judge(store, raw, f"fuzz:{number}"))
        tally[judgement.outcome] += 1
        if judgement.violation is None:
            return
        if judgement.finding in active:
            known[judgement.finding] += 1
            return
        raise AssertionError(f"{judgement.violation}\ninput ({len(raw)} bytes): {raw[:300]!r}")

    try:
        check()
    finally:
        loop.run_until_complete(store.close())
        loop.close()
    tried = next(numbers)
    figures.record(
        inputs_tried=tried,
        max_examples=examples,
        seconds=time.monotonic() - started,
        outcomes=dict(tally.most_common()),
        known_findings_hit=dict(known),
        open_findings=sorted(active),
    )


# ---------------------------------------------------------------------------------------------
# Through a real worker


async def test_fuzzed_messages_through_a_worker_end_stored_or_dead_lettered(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, figures: Figures
) -> None:
    """A few hundred hostile messages among valid orders, over NATS: the worker neither falls
    over nor stalls, and each message ends in the log or in the dead letters."""
    count = sized(300, 2_000)
    seed = random.randrange(2**32) if FULL else 909
    rng = random.Random(seed)
    active = OPEN_FINDINGS
    left_out: collections.Counter[str] = collections.Counter()
    messages: list[Message] = []
    verdicts: list[Accepted | Rejected] = []
    hostile = 0
    good = iter(orders(count, seed=910))
    for number in range(count):
        raw = fuzz_messages.message(rng, f"fz{number}")
        if len(raw) > NATS_MAX_PAYLOAD:
            left_out["larger than NATS's max_payload"] += 1
            continue
        stalls = _stalls_the_worker(raw, active)
        if stalls is not None:
            left_out[stalls] += 1
            continue
        verdict = validate(raw)
        messages.append(Message(raw, "invalid"))
        verdicts.append(verdict)
        hostile += 1
        if number % 3 == 0:  # valid orders in between
            plain = next(good)
            messages.append(plain)
            verdicts.append(validate(plain.data))
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        published = await publish_steadily(route, messages)

        async def drained() -> bool:
            worker.check_alive()
            state = await consumer_state(route)
            return state.drained and state.last_seq >= max(published.sequences)

        await eventually(drained, "every message acked", 120, worker.log_tail)
        events = {
            str(uid): str(text)
            for uid, text in await store.fetch("SELECT order_uid, payload::text FROM orders_events")
        }
        letters = {
            str(source): str(reason)
            for source, reason in await store.fetch(
                "SELECT source, reason FROM orders_dead_letters"
            )
        }
        accepted_raw: dict[str, list[bytes]] = collections.defaultdict(list)
        refused = 0
        for message, verdict, seq in zip(messages, verdicts, published.sequences, strict=True):
            source = f"nats:{route.stream}:{seq}"
            if isinstance(verdict, Rejected):
                assert letters.get(source) == verdict.reason, (source, message.data[:200])
            elif verdict.order_uid in events:
                accepted_raw[verdict.order_uid].append(message.data)
            else:
                assert letters.get(source, "").startswith("refused by PostgreSQL"), source
                refused += 1
        assert set(events) == set(accepted_raw), "the log holds exactly the Accepted uids"
        rejected = sum(isinstance(verdict, Rejected) for verdict in verdicts)
        assert len(letters) == rejected + refused
        ready = await worker.wait_ready()
        assert ready["orders"] == len(events)
        identical = 0
        for uid, raws in accepted_raw.items():
            status, body, _ = await worker.get(f"/orders/{quote(uid, safe='')}")
            # As published, or as the log's jsonb gives it back (see the README).
            assert status == 200 and (body in raws or body == events[uid].encode()), uid
            identical += body in raws
    figures.record(
        seed=seed,
        messages=len(messages),
        hostile=hostile,
        stored=len(events),
        served_byte_for_byte=identical,
        dead_lettered=len(letters),
        refused_by_postgres=refused,
        left_out=dict(left_out),
    )


def _stalls_the_worker(raw: bytes, active: frozenset[str]) -> str | None:
    """The name of an open finding that ``raw`` would set off in the worker, if any."""
    # The worker's stack is deeper than the test's: leave out all deep nesting while F1 is open.
    if "F1" in active and fuzz_messages.nesting_depth(raw) >= 400:
        return "F1"
    try:
        verdict = validate(raw)
    except RecursionError:
        return "F1" if "F1" in active else None
    if "F2" in active and isinstance(verdict, Accepted):
        try:
            raw.decode()
        except UnicodeDecodeError:
            return "F2"
    return None


# ---------------------------------------------------------------------------------------------
# The findings, one test each


@pinned("F1")
def test_finding_deep_nesting_is_rejected_rather_than_raised() -> None:
    verdict = validate(DEEP)
    assert isinstance(verdict, Rejected) and verdict.reason


@pinned("F2")
async def test_finding_invalid_utf8_anywhere_is_rejected(store: InspectedStore) -> None:
    verdict = validate(NOT_UTF8)
    if isinstance(verdict, Accepted):
        await store.write_batch([verdict], [])  # raises UnicodeDecodeError today
    else:
        assert "UTF-8" in verdict.reason


@pinned("F3")
def test_finding_order_uid_with_a_trailing_newline_is_rejected() -> None:
    assert isinstance(validate(NEWLINE_UID), Rejected)


@pinned("F4")
async def test_finding_what_validate_accepts_postgres_stores(store: InspectedStore) -> None:
    verdict = validate(HUGE_NUMBER)
    if isinstance(verdict, Accepted):
        await store.write_batch([verdict], [])  # RefusedByDatabase today
    else:
        assert verdict.reason


async def _one_poison_message(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore, poison: bytes
) -> None:
    """The poison message between valid orders: within 8 s every valid order is stored and
    the poison dead-lettered, and the worker is still consuming."""
    before, after = orders(3, seed=921), orders(3, seed=922)
    with Worker(tmp_path, **route.env(database_url), ORDERS_NATS_ACK_WAIT_S="2") as worker:
        await worker.wait_ready()
        await route.send(before)
        await route.send([poison])
        await route.send(after)

        async def all_settled() -> bool:
            ((events, letters),) = await store.fetch(
                "SELECT (SELECT count(*) FROM orders_events),"
                " (SELECT count(*) FROM orders_dead_letters)"
            )
            return (events, letters) == (6, 1)

        await eventually(all_settled, "the valid orders stored, the poison dead-lettered", 8)
        more = orders(3, seed=923)
        await route.send(more)

        async def still_consuming() -> bool:
            ((events,),) = await store.fetch("SELECT count(*) FROM orders_events")
            return events == 9

        await eventually(still_consuming, "the worker still consumes", 8)


@pinned("F1")
async def test_finding_deeply_nested_message_does_not_stop_consumption(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
) -> None:
    deep = order_bytes()[:-1] + b',"zz":' + b"[" * 1_000 + b"]" * 1_000 + b"}"
    await _one_poison_message(tmp_path, database_url, route, store, deep)


@pinned("F2")
async def test_finding_invalid_utf8_in_an_unnamed_field_does_not_hold_up_its_batch(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
) -> None:
    raw = orjson.dumps({**order_dict(), "zz": "__bad__"}).replace(b"__bad__", b"\xff\xfe")
    await _one_poison_message(tmp_path, database_url, route, store, raw)
