"""The fast driver's immediate answers (``HttpServer.answer_immediately``), on a real socket
without Faust: which requests take that way, and that every other one, and every request
queued behind an answer still under way, is answered the usual way, in order.

The promise: a read answered at once is the same answer, on the same connection semantics, as
the one ``respond`` would give, and it never overtakes an earlier request's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import pytest

from streams.http_message import Request, Response
from streams.http_protocol import HttpServer

ORDER: Final = b'{"order_uid":"abc"}'
HEAD: Final = Response(b"", content_type="application/json", headers={"X-Way": "immediate"})


@dataclass
class Calls:
    immediate: list[str] = field(default_factory=list)
    usual: list[str] = field(default_factory=list)
    slow: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Calls]]:
    calls = Calls()

    def body_at(segment: str) -> bytes | None:
        calls.immediate.append(segment)
        return ORDER if segment == "abc" else None

    def respond(request: Request) -> Response | Coroutine[Any, Any, Any]:
        calls.usual.append(request.path)
        if request.path == "/slow":
            return answer_later()
        if request.path == "/orders/abc":  # as the view's dispatch would answer it
            return Response(ORDER, content_type="application/json", headers={"X-Way": "usual"})
        return Response(f"usual {request.path}".encode(), content_type="text/plain")

    async def answer_later() -> Response:
        await calls.slow.wait()
        return Response(b"slow", content_type="text/plain")

    server = HttpServer(respond)
    server.answer_immediately("/orders/", HEAD, body_at)
    await server.listen_tcp("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], calls
    finally:
        await server.stop(grace=1.0)


async def exchange(port: int, data: bytes, answers: int, *, bodies: bool = True) -> list[bytes]:
    """Send ``data``, read ``answers`` whole answers (heads, and bodies by Content-Length
    unless they answer HEAD)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        received = []
        async with asyncio.timeout(5):
            for _ in range(answers):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                received.append(head + (await reader.readexactly(length) if bodies else b""))
        return received
    finally:
        writer.close()


def get(target: str, *fields: str, version: str = "1.1", method: str = "GET") -> bytes:
    return (
        "\r\n".join([f"{method} {target} HTTP/{version}", "Host: x", *fields]) + "\r\n\r\n"
    ).encode()


async def test_a_plain_get_is_answered_immediately(served: tuple[int, Calls]) -> None:
    port, calls = served
    (answer,) = await exchange(port, get("/orders/abc"), 1)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-Way: immediate\r\n" in answer and b"Content-Type: application/json\r\n" in answer
    assert b"Connection:" not in answer and b"\r\nDate: " in answer
    assert answer.endswith(b"\r\n\r\n" + ORDER)
    assert (calls.immediate, calls.usual) == (["abc"], [])


@pytest.mark.parametrize(
    ("request_bytes", "asked"),
    [
        (get("/orders/zzz"), ["zzz"]),  # no body for it: the usual way
        (get("/orders/a%62c"), []),  # escaped
        (get("/orders/abc?x=1"), []),  # a query
        (get("/orders/abc/more"), []),  # not the last segment
        (get("/orders/abc", method="HEAD"), []),
        (get("/orders/abc", "Content-Length: 2")[:-4] + b"\r\n\r\nxx", []),  # a body
    ],
    ids=["unknown", "escaped", "query", "deeper", "head", "body"],
)
async def test_everything_else_goes_the_usual_way(
    served: tuple[int, Calls], request_bytes: bytes, asked: list[str]
) -> None:
    port, calls = served
    (answer,) = await exchange(port, request_bytes, 1, bodies=not request_bytes.startswith(b"HEAD"))
    assert b"X-Way: immediate" not in answer
    assert calls.immediate == asked
    assert len(calls.usual) == 1


async def test_http10_keep_alive_is_echoed_and_http10_closes(served: tuple[int, Calls]) -> None:
    port, calls = served
    (kept,) = await exchange(port, get("/orders/abc", "Connection: keep-alive", version="1.0"), 1)
    assert b"\r\nConnection: keep-alive\r\n" in kept and kept.endswith(ORDER)
    (closed,) = await exchange(port, get("/orders/abc", version="1.0"), 1)
    assert b"\r\nConnection: close\r\n" in closed and closed.endswith(ORDER)
    (told,) = await exchange(port, get("/orders/abc", "Connection: close"), 1)
    assert b"\r\nConnection: close\r\n" in told
    assert calls.immediate == ["abc"] * 3 and calls.usual == []


@pytest.mark.parametrize("version", ["0.9", "2.0"])
async def test_other_versions_are_refused_the_usual_way(
    served: tuple[int, Calls], version: str
) -> None:
    port, calls = served
    (answer,) = await exchange(
        port, get("/orders/abc", "Connection: keep-alive", version=version), 1
    )
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert calls.immediate == []


async def test_an_immediate_answer_never_overtakes_one_under_way(
    served: tuple[int, Calls],
) -> None:
    port, calls = served
    pipelined = get("/slow") + get("/orders/abc") + get("/other") + get("/orders/abc")
    answering = asyncio.create_task(exchange(port, pipelined, 4))
    await asyncio.sleep(0.2)  # every request read; the first answer waits
    assert not answering.done()
    calls.slow.set()
    answers = await answering
    assert answers[0].endswith(b"slow")
    # Read while the first was under way: queued, and answered the usual way, in order.
    assert answers[1].endswith(ORDER) and b"X-Way: usual" in answers[1]
    assert answers[2].endswith(b"usual /other")
    assert answers[3].endswith(ORDER) and b"X-Way: usual" in answers[3]
    assert calls.immediate == []
