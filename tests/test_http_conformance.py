"""HTTP/1.1 as RFC 9110 and 9112 have it, on both web drivers, against a real worker: raw
bytes in, and the answers read by h11 (a strict HTTP/1.1 parser of its own, so that a framing
mistake of the server's, such as a wrong Content-Length, fails the test).

Cases: persistent connections (HTTP/1.1 by default, ``Connection: close``; HTTP/1.0 closing by
default, ``Connection: keep-alive`` honoured), pipelined requests answered in order, ``HEAD``,
405 with ``Allow``, 400 for a malformed request, the size limits, ``Date`` and
``Content-Length`` on every answer, the security headers, the header-read and idle timeouts,
and a stop that finishes the answers under way. Where the aiohttp driver answers otherwise
than the fast one, ``AIOHTTP_ANSWERS`` says how, so that either driver's change shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import h11
import pytest

from streams.http_limits import KEEPALIVE_TIMEOUT_S, MAX_FIELD_SIZE, MAX_HEADERS, MAX_LINE_SIZE
from tests.flow import wait_for_orders
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker

pytestmark = pytest.mark.usefixtures("web_driver")

READ_S: Final = 10.0
# The refusals aiohttp's parser makes with another status than the fast driver: it answers
# 400 for every request it cannot read, whatever the reason.
AIOHTTP_ANSWERS: Final = {414: 400, 431: 400}
SECURITY_HEADERS: Final = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass
class Answer:
    status: int
    version: bytes
    headers: dict[str, str]
    body: bytes


@dataclass
class Served:
    worker: Worker
    uid: str
    order: bytes
    driver: str

    def expected(self, status: int) -> int:
        """The status this driver answers for a refusal the fast driver answers ``status``."""
        return AIOHTTP_ANSWERS.get(status, status) if self.driver == "aiohttp" else status


@pytest.fixture
async def served(
    tmp_path: Path, database_url: str, route: Route, web_driver: str
) -> AsyncIterator[Served]:
    """A ready worker with one order in its view."""
    batch = orders(1, seed=1401)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, 1)
        yield Served(worker, str(batch[0].uid), batch[0].data, web_driver)


def get(target: str, *fields: str, method: str = "GET", version: str = "1.1") -> bytes:
    head = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a test failure if it
    stays open for READ_S)."""
    received = b""
    async with asyncio.timeout(READ_S):
        while chunk := await reader.read(65536):
            received += chunk
    return received


async def read_answers(reader: asyncio.StreamReader, methods: Iterable[str]) -> list[Answer]:
    """One complete answer per request method, read off an open connection."""
    client = h11.Connection(h11.CLIENT)
    answers = []
    for method in methods:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        client.send(h11.Request(method=method, target="/", headers=[("Host", "127.0.0.1")]))
        client.send(h11.EndOfMessage())
        answers.append(await _next_answer(client, reader))
    return answers


async def _next_answer(client: h11.Connection, reader: asyncio.StreamReader) -> Answer:
    """The next answer on the connection (h11 refuses a close before or inside it)."""
    response: h11.Response | None = None
    body = b""
    async with asyncio.timeout(READ_S):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return _answer(response, body)
            else:
                raise AssertionError(f"expected an answer, got {event!r}")


async def whole_answers(data: bytes) -> list[Answer]:
    """Every answer to a GET in ``data``, which runs up to the server's close; an answer cut
    short fails."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    nothing_more = asyncio.StreamReader()
    nothing_more.feed_eof()
    answers = []
    while True:
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
        if client.their_state is not h11.IDLE or client.trailing_data == (b"", True):
            break  # the last answer said the connection closes, or the server closed it
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "127.0.0.1")]))
        client.send(h11.EndOfMessage())
        answers.append(await _next_answer(client, nothing_more))
    return answers


def _answer(response: h11.Response, body: bytes) -> Answer:
    headers: dict[str, str] = {}
    for name, value in response.headers:
        key = name.decode("latin-1")
        assert key not in headers, f"{key} sent twice"
        headers[key] = value.decode("latin-1")
    return Answer(response.status_code, response.http_version, headers, body)


def assert_framed(answer: Answer) -> None:
    """Date (an IMF-fixdate) and Content-Length (the body's length), on every answer."""
    date = answer.headers.get("date")
    assert date is not None, answer.headers
    assert date.endswith(" GMT") and email.utils.parsedate_to_datetime(date) is not None
    assert answer.headers.get("content-length") == str(len(answer.body)), answer.headers


async def test_http11_keeps_the_connection_open_until_connection_close(served: Served) -> None:
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}"))
        (first,) = await read_answers(reader, ["GET"])
        writer.write(get("/healthz") + get(f"/orders/{served.uid}", "Connection: close"))
        second, last = await read_answers(reader, ["GET", "GET"])
        assert await read_until_closed(reader) == b""
    assert (first.status, first.body) == (200, served.order)
    assert "connection" not in first.headers
    assert second.status == 200 and "connection" not in second.headers
    assert (last.status, last.body) == (200, served.order)
    assert last.headers["connection"] == "close"
    for answer in (first, second, last):
        assert_framed(answer)
        assert first.version == b"1.1"


async def test_http10_closes_by_default_and_keeps_alive_when_asked(served: Served) -> None:
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}", version="1.0"))
        closing = await read_until_closed(reader)
    (answer,) = await whole_answers(closing)
    assert (answer.status, answer.body) == (200, served.order)
    assert answer.headers.get("connection", "close").lower() == "close"
    assert_framed(answer)

    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}", "Connection: keep-alive", version="1.0"))
        (kept,) = await read_answers(reader, ["GET"])
        assert kept.headers["connection"].lower() == "keep-alive"
        # Still open: a second request on it is answered.
        writer.write(get("/healthz", "Connection: keep-alive", version="1.0"))
        (again,) = await read_answers(reader, ["GET"])
    assert (kept.status, kept.body) == (200, served.order)
    assert again.status == 200
    assert_framed(kept)


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    targets = [f"/orders/{served.uid}", "/healthz", "/orders/unknown-uid", "/orders/a%20b"] * 25
    async with connection(served.worker.port) as (reader, writer):
        writer.write(b"".join(get(target) for target in targets))
        answers = await read_answers(reader, ["GET"] * len(targets))
    statuses = [answer.status for answer in answers]
    assert statuses == [200, 200, 404, 400] * 25
    assert all(answer.body == served.order for answer in answers[::4])
    assert all(b'"alive"' in answer.body for answer in answers[1::4])
    for answer in answers:
        assert_framed(answer)


async def test_head_has_the_get_head_without_a_body(served: Served) -> None:
    targets = [f"/orders/{served.uid}", "/", "/app.js", "/orders/unknown-uid", "/healthz"]
    async with connection(served.worker.port) as (reader, writer):
        # Pipelined: a body sent after a HEAD answer would be read as the next answer's head.
        writer.write(b"".join(get(t, method="HEAD") + get(t) for t in targets))
        answers = await read_answers(reader, ["HEAD", "GET"] * len(targets))
    for target, head, full in zip(targets, answers[::2], answers[1::2], strict=True):
        assert head.status == full.status, target
        assert head.body == b"", target
        assert head.headers["content-length"] == str(len(full.body)), target
        assert head.headers["content-type"] == full.headers["content-type"], target
        assert "date" in head.headers


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_answered_405_with_allow(served: Served, method: str) -> None:
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}", "Content-Length: 0", method=method))
        writer.write(get("/healthz", "Content-Length: 2", method=method)[:-4] + b"\r\n\r\n{}")
        refused, again = await read_answers(reader, [method, method])
    for answer in (refused, again):
        assert answer.status == 405
        allowed = {part.strip() for part in answer.headers["allow"].split(",")}
        assert allowed == {"GET", "HEAD"}
        assert_framed(answer)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET /orders/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (get("/orders/" + "a" * MAX_LINE_SIZE), 414),
        (get("/healthz", "X-Long: " + "a" * (2 * MAX_FIELD_SIZE)), 431),
        (get("/healthz", *(f"X-Many-{n}: x" for n in range(MAX_HEADERS + 1))), 431),
    ],
    ids=[
        "garbage",
        "bad-length",
        "no-colon",
        "bad-chunk",
        "nul",
        "long-line",
        "long-field",
        "many",
    ],
)
async def test_unreadable_requests_are_refused_and_the_connection_closed(
    served: Served, request_bytes: bytes, status: int
) -> None:
    async with connection(served.worker.port) as (reader, writer):
        writer.write(request_bytes)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        received = await read_until_closed(reader)
    (answer,) = await whole_answers(received)
    assert answer.status == served.expected(status)
    assert answer.headers.get("connection", "close").lower() == "close"
    assert_framed(answer)


async def test_just_within_the_limits_is_served(served: Served) -> None:
    """The limits are where they say: a request at each of them is answered."""
    line_room = MAX_LINE_SIZE - len("GET  HTTP/1.1") - len("/orders/?x=")
    fields = [f"X-Many-{n}: x" for n in range(MAX_HEADERS - 1)]  # and Host
    field = "X-Long: " + "a" * (MAX_FIELD_SIZE - len("X-Long"))  # name and value: the limit
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}?x=" + "a" * (line_room - len(served.uid))))
        writer.write(get(f"/orders/{served.uid}", *fields))
        writer.write(get(f"/orders/{served.uid}", field))
        answers = await read_answers(reader, ["GET"] * 3)
    assert [(answer.status, answer.body) for answer in answers] == [(200, served.order)] * 3


async def test_every_answer_carries_the_security_headers(served: Served) -> None:
    targets = {
        f"/orders/{served.uid}": 200,
        "/orders/unknown-uid": 404,
        "/orders/a%20b": 400,
        "/": 200,
        "/app.css": 200,
        "/metrics": 200,
        "/readyz": 200,
    }
    async with connection(served.worker.port) as (reader, writer):
        writer.write(b"".join(get(target) for target in targets))
        answers = await read_answers(reader, ["GET"] * len(targets))
    for (target, status), answer in zip(targets.items(), answers, strict=True):
        assert answer.status == status, target
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get(name) == value, (target, name)
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], target


async def test_refusals_of_the_drivers_carry_the_security_headers(served: Served) -> None:
    """The drivers' own answers (no route, no such method, unreadable) are data too; aiohttp
    answers a request it cannot read before any hook of the service's runs, without them,
    which this test records."""
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get("/no-such-route") + get("/healthz", "Content-Length: 0", method="POST"))
        answers = await read_answers(reader, ["GET", "POST"])
    async with connection(served.worker.port) as (reader, writer):
        writer.write(b"GARBAGE\r\n\r\n")
        answers += await whole_answers(await read_until_closed(reader))
    assert [answer.status for answer in answers] == [404, 405, 400]
    for answer in answers:
        carried = all(answer.headers.get(k) == v for k, v in SECURITY_HEADERS.items())
        framed = "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "")
        expected = served.driver == "fast" or answer.status != 400
        assert carried is expected and framed is expected, (answer.status, answer.headers)


async def test_unfinished_heads_and_idle_connections_are_closed(served: Served) -> None:
    """A head that never ends and a kept-alive connection left idle are closed within the
    bound (the slowloris test in test_http_limits.py does it at scale)."""
    bound = KEEPALIVE_TIMEOUT_S + 5.0
    port = served.worker.port

    async def closed_after(opening: bytes) -> tuple[float, bytes]:
        async with connection(port) as (reader, writer):
            writer.write(opening)
            started = time.monotonic()
            received = b""
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(bound):
                    while chunk := await reader.read(65536):
                        received += chunk
            return time.monotonic() - started, received

    partial, idle, silent = await asyncio.gather(
        closed_after(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "),
        closed_after(get("/healthz")),
        closed_after(b""),
    )
    for what, (seconds, _) in {"partial": partial, "idle": idle, "silent": silent}.items():
        assert seconds < bound, f"a {what} connection was still open after {bound} s"
    assert idle[1].startswith(b"HTTP/1.1 200 ")
    (answer,) = await whole_answers(idle[1])
    assert answer.status == 200


async def test_a_stop_finishes_the_answers_under_way(served: Served) -> None:
    """SIGTERM while a client that has read one answer has megabytes more coming (the
    server's buffers full): every answer it then gets is whole, the connection ends between
    two answers, and the worker exits cleanly."""
    count = 5_000
    async with connection(served.worker.port) as (reader, writer):
        writer.write(b"".join(get(f"/orders/{served.uid}") for _ in range(count)))
        started = await reader.read(65536)  # the server is answering
        # The stop begins; the client reads on, as a client would.
        code, rest = await asyncio.gather(
            asyncio.to_thread(served.worker.stop, 60.0), read_until_closed(reader)
        )
    answers = await whole_answers(started + rest)
    assert all((answer.status, answer.body) == (200, served.order) for answer in answers)
    assert 1 <= len(answers) <= count
    assert code == 0, served.worker.log_tail()


async def test_an_order_is_answered_alike_however_its_target_is_written(served: Served) -> None:
    """The fast driver answers a plain ``GET /orders/{uid}`` without a request object
    (``HttpServer.answer_immediately``) and every other spelling of the same target through
    the view's dispatch: both must give the same answer, head and body."""
    escaped = "".join(f"%{byte:02X}" for byte in served.uid.encode())
    targets = [
        f"/orders/{served.uid}",
        f"/orders/{escaped}",
        f"/orders/{served.uid}?fields=all",
        f"/orders/{served.uid}#top",
    ]
    async with connection(served.worker.port) as (reader, writer):
        writer.write(b"".join(get(target) for target in targets))
        answers = await read_answers(reader, ["GET"] * len(targets))
    for answer in answers:
        assert_framed(answer)
        del answer.headers["date"]
    assert [(answer.status, answer.body) for answer in answers] == [(200, served.order)] * 4
    assert all(answer.headers == answers[0].headers for answer in answers), answers


@pytest.mark.parametrize("version", ["0.9", "2.0"])
async def test_http_versions_other_than_1x_are_refused(served: Served, version: str) -> None:
    """The fast driver speaks HTTP/1.0 and 1.1 only, on the immediate path too (llhttp parses
    0.9 and 2.0 request lines); aiohttp's answers, recorded here, differ."""
    async with connection(served.worker.port) as (reader, writer):
        writer.write(get(f"/orders/{served.uid}", version=version))
        received = await read_until_closed(reader)
    if served.driver == "fast":
        assert received.startswith(b"HTTP/1.1 400 "), received[:200]
        assert served.order not in received
    else:  # aiohttp answers the order, in a status line of the version asked for
        assert received.startswith(f"HTTP/{version} 200 ".encode()), received[:200]
