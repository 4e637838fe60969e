"""Hostile HTTP against a real worker: schemathesis from the app's own /openapi.json, then path
tricks, other methods, oversized requests and bytes that are not HTTP at all.

The worker is ready throughout, so no answer may be a 5xx (503 is for a service still loading
its view); a malformed uid is a 400, an unknown or unroutable path a 404 (405 for a method the
route does not take). The worker must be alive and answering afterwards, with no request
handler error in its log.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance
from yarl import URL

from tests.chaos_servers import FULL, Figures, chaos, sized
from tests.flow import wait_for_orders
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker

pytestmark = [chaos, pytest.mark.usefixtures("web_driver")]

OPENAPI: Final = Path(__file__).resolve().parent.parent / "views" / "static" / "openapi.json"
UID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# aiohttp logs each request its parser refuses (and answers 400) as an ERROR with a traceback
# ending in one of these; any other traceback is a request the app itself failed.
PARSER_REFUSALS: Final = re.compile(r"^aiohttp\.http_exceptions\.\w+: 400", re.MULTILINE)


FINDINGS: Final = {
    "F6": "each request aiohttp's parser refused (answered 400) was logged as an ERROR with a"
    " traceback",
    "F7": "/openapi.json did not say which uids are valid: the uid parameter was any string",
}
# As in test_fuzz.py: the open findings' tests are strict expected failures; a fix makes the
# suite fail until the finding is taken out of this set, and from then on its test guards it.
OPEN_FINDINGS: Final[frozenset[str]] = frozenset()


def pinned(finding: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(
        finding in OPEN_FINDINGS, strict=True, reason=f"{finding}: {FINDINGS[finding]}"
    )


def uid_parameter_schema() -> dict[str, object]:
    description = orjson.loads(OPENAPI.read_bytes())
    (parameter,) = description["paths"]["/orders/{uid}"]["get"]["parameters"]
    schema = parameter["schema"]
    assert isinstance(schema, dict)
    return schema


def _assert_unharmed(worker: Worker) -> int:
    """The worker is up, and every traceback in its log is a request aiohttp's parser refused;
    returns how many of those there were."""
    worker.check_alive()
    log = worker.log()
    tracebacks = log.count("Traceback (most recent call last)")
    refused = len(PARSER_REFUSALS.findall(log))
    assert tracebacks == refused, f"a request handler failed:\n{worker.log_tail()}"
    return refused


# ---------------------------------------------------------------------------------------------
# schemathesis


def _fuzz_with_schemathesis(base: str, uids: list[str], examples: int) -> dict[str, object]:
    """Every operation of /openapi.json, positive and negative cases, with the default checks
    (no server error, status codes, content types and bodies as the description says)."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10)
    statuses: collections.Counter[str] = collections.Counter()
    session = requests.Session()
    cases = 0
    tolerated = 0
    unsatisfiable: list[str] = []
    lenient = "F7" in OPEN_FINDINGS
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        path = operation.path
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and "{" not in path:
                continue  # nothing to break in an operation without parameters
            strategy: st.SearchStrategy[Case[Any]] = operation.as_strategy(generation_mode=mode)
            if "{uid}" in path and mode is GenerationMode.POSITIVE:
                strategy = st.one_of(strategy, _known_uid_cases(operation, uids))

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=not FULL,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def check(case: Case[Any]) -> None:
                nonlocal cases, tolerated
                cases += 1
                response = case.call(base_url=base, session=session, timeout=10)
                statuses[f"{case.operation.path} {response.status_code}"] += 1
                assert response.status_code < 500, (case.path_parameters, response.text[:200])
                uid = (case.path_parameters or {}).get("uid")
                if lenient and isinstance(uid, str) and not UID.fullmatch(uid):
                    # F7: the description admits this uid; the service rightly answers 400.
                    assert response.status_code == 400, (uid, response.status_code)
                    tolerated += 1
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                else:
                    case.validate_response(response)

            try:
                check()
            except Unsatisfiable:
                # A uid described as any string has no negative case; with the pattern (F7
                # fixed) there are, and the service must answer them 400.
                assert mode is GenerationMode.NEGATIVE
                unsatisfiable.append(f"{path} {mode.value}")
    session.close()
    return {
        "cases": cases,
        "statuses": dict(sorted(statuses.items())),
        "f7_tolerated": tolerated,
        "no_case_possible": unsatisfiable,
    }


def _known_uid_cases(
    operation: APIOperation[Any, Any, Any, Any], uids: list[str]
) -> st.SearchStrategy[Case[Any]]:
    """Cases for uids that are in the view, so that 200 answers are checked too."""

    def for_uid(uid: str) -> st.SearchStrategy[Case[Any]]:
        return operation.as_strategy(path_parameters={"uid": uid})

    return st.sampled_from(uids).flatmap(for_uid)


async def test_openapi_description_fuzzed_with_schemathesis(
    tmp_path: Path, database_url: str, route: Route, figures: Figures
) -> None:
    batch = orders(50, seed=1201)
    uids = [str(message.uid) for message in batch]
    examples = sized(300, 3_000)
    started = time.monotonic()
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, len(batch))
        found = await asyncio.to_thread(_fuzz_with_schemathesis, worker.base, uids, examples)
        refused = _assert_unharmed(worker)
        await worker.wait_ready(5)
    figures.record(
        examples_per_operation_and_mode=examples,
        parser_refusals_logged_as_errors=refused,
        seconds=time.monotonic() - started,
        **found,
    )


# ---------------------------------------------------------------------------------------------
# Path tricks and other abuse


def path_tricks(uid: str) -> list[tuple[str, set[int]]]:
    """Raw request targets (sent as written, nothing re-encoded) and the answers allowed."""
    not_found = {404}
    malformed = {400}
    either = {400, 404}
    return [
        ("/orders/..", either),
        ("/orders/../orders/" + uid, either | {200}),  # a client may normalise; the server may too
        ("/orders/%2E%2E", either),
        ("/orders/%2e%2e%2fetc%2fpasswd", either),
        ("/orders/..%2F..%2Fetc%2Fpasswd", either),
        ("/orders/a%2Fb", either),
        ("/orders/%2F", either),
        (f"/orders/{uid}%2F", either),
        ("/orders/%00", malformed),
        (f"/orders/{uid}%00", malformed),
        ("/orders/a%00b", malformed),
        ("/orders/" + "a" * 64, not_found),
        ("/orders/" + "a" * 65, malformed),
        ("/orders/" + "a" * 5_000, malformed),
        ("/orders/" + "a" * 7_900, malformed),
        ("/orders/%C3%BC", malformed),
        ("/orders/%F0%9F%98%80", malformed),
        ("/orders/%EF%BC%A1", malformed),  # a fullwidth letter
        ("/orders/%D9%A1", malformed),  # an Arabic-Indic digit
        ("/orders/%FF", malformed),
        ("/orders/%ED%A0%80", malformed),  # a surrogate, as UTF-8
        ("/orders/%", either),
        ("/orders/%zz", either),
        ("/orders/%25", malformed),
        ("/orders/%20" + uid, malformed),
        (f"/orders/{uid}%20", malformed),
        ("/orders/%0A", malformed),
        (f"/orders/%0A{uid}", malformed),
        (f"/orders/{uid}%0D%0A", malformed),
        ("/orders/*", malformed),
        ("/orders/;x", malformed),
        ("/orders/x;y", malformed),
        ("/orders/%5C", malformed),
        ("/orders/%3Cscript%3Ealert(1)%3C%2Fscript%3E", either),
        ("/orders/'%20OR%201=1--", malformed),
        ("/orders/$%7Bjndi:ldap:%2F%2Fx%7D", either),
        (f"//orders/{uid}", not_found | {200}),
        (f"/orders//{uid}", not_found),
        ("/orders//", not_found),
        ("/orders/", not_found),
        ("/orders", not_found),
        (f"/orders/{uid}/", not_found),
        (f"/orders/{uid}//", not_found),
        (f"/orders/{uid}/x", not_found),
        (f"/orders/{uid.upper()}", not_found),
        (f"/orders/{uid}?uid=../../x&x=%00", {200}),
        ("/orders/x?" + "a=1&" * 2_000, not_found),
        (f"/ORDERS/{uid}", not_found),
        ("/.env", not_found),
        ("/openapi.json/..", not_found),
        ("/static/../../etc/passwd", not_found),
    ]


async def _raw_request(
    base: str, method: str, target: str, headers: dict[str, str] | None = None
) -> int:
    """One request with the target sent exactly as written."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, URL(base + target, encoded=True), headers=headers) as response,
    ):
        await response.read()
        return response.status


GARBAGE: Final = (
    b"GARBAGE\r\n\r\n",
    b"GET /orders/x HTTP/9.9\r\n\r\n",
    b"GET /orders/\x00\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    b"GET /orders/x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /orders/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
)


async def _raw_bytes(port: int, data: bytes) -> bytes:
    """Send bytes that may not be HTTP at all; return what comes back before the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_path_tricks_methods_and_garbage_answer_4xx_never_5xx(
    tmp_path: Path, database_url: str, route: Route, figures: Figures
) -> None:
    batch = orders(3, seed=1202)
    uid = str(batch[0].uid)
    wrong: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, len(batch))
        tricks = path_tricks(uid)
        for target, allowed in tricks:
            status = await _raw_request(worker.base, "GET", target)
            statuses[status] += 1
            if status not in allowed:
                wrong.append(f"GET {target[:80]} -> {status} (expected {sorted(allowed)})")
        for method in ("POST", "PUT", "DELETE", "PATCH", "TRACE", "PROPFIND"):
            status = await _raw_request(worker.base, method, f"/orders/{uid}")
            statuses[status] += 1
            if status not in (400, 405):
                wrong.append(f"{method} /orders/{uid} -> {status}")
        for target, headers, allowed in (
            # 160 kB of headers in fields of 4 kB: aiohttp limits each field, not the total.
            (f"/orders/{uid}", {f"X-Fill-{n}": "x" * 4_000 for n in range(40)}, {200, 400, 431}),
            (f"/orders/{uid}", {"X-Long": "y" * 20_000}, {400, 431}),
            ("/orders/" + "a" * 20_000, {}, {400, 414}),
        ):
            status = await _raw_request(worker.base, "GET", target, headers)
            statuses[status] += 1
            if status not in allowed:
                wrong.append(f"GET {target[:40]}... with {len(headers)} big header(s) -> {status}")
        for garbage in GARBAGE:
            answer = await _raw_bytes(worker.port, garbage)
            first = answer.split(b"\r\n", 1)[0]
            if answer and not first.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")):
                wrong.append(f"{garbage[:30]!r} -> {first[:60]!r}")
        status, _, _ = await worker.get("/healthz")
        assert status == 200
        status, body, _ = await worker.get(f"/orders/{uid}")
        assert status == 200 and body == batch[0].data
        refused = _assert_unharmed(worker)
    figures.record(
        path_tricks=len(tricks),
        statuses=dict(sorted(statuses.items())),
        wrong=len(wrong),
        parser_refusals_logged_as_errors=refused,
    )
    assert not wrong, "\n".join(wrong)


@pinned("F7")
def test_finding_openapi_says_which_uids_are_valid() -> None:
    """The description carries the rule the service enforces, so that clients and fuzzers
    know a 400 in advance."""
    pattern = uid_parameter_schema().get("pattern")
    assert isinstance(pattern, str)
    rule = re.compile(pattern.removeprefix("^").removesuffix("$"))
    for uid in ("a", "A-z_09", "a" * 64):
        assert rule.fullmatch(uid)
    for uid in ("", "a" * 65, "a/b", "ü", "a b", "abc\n"):
        assert not rule.fullmatch(uid)


@pinned("F6")
async def test_finding_a_request_the_parser_refuses_is_not_logged_as_an_error(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    """Garbage on the HTTP port is answered 400 and is no ERROR of the service's."""
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        for garbage in GARBAGE:
            answer = await _raw_bytes(worker.port, garbage)
            assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), (garbage, answer)
        await worker.wait_ready(5)
        assert "[ERROR]" not in worker.log() and "Traceback" not in worker.log()
