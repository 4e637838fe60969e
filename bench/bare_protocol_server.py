"""The read figure's protocol ceiling: an asyncio.Protocol on uvloop with httptools' parser,
answering from a dict, ``order_uid -> payload::text`` of every row of ``orders_events``, the
least Python can do per request (no routing, no views, no limits, no metrics).

    python -m bench.bare_protocol_server --database-url URL --port PORT

``GET /orders/{uid}`` answers 200 with the payload (application/json) or 404; ``GET /readyz``
answers 200 once the dict is loaded and the server listens.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from email.utils import formatdate

import httptools
import orjson
import uvloop

from bench.bare_read_server import load

_PREFIX = b"/orders/"
_NOT_FOUND = b'{"error":"not found"}'


class _Clock:
    """The Date field, refreshed once a second."""

    def __init__(self) -> None:
        self.date = b""
        self.tick()

    def tick(self) -> None:
        self.date = formatdate(time.time(), usegmt=True).encode()
        asyncio.get_running_loop().call_later(1.0, self.tick)


class BareProtocol(asyncio.Protocol):
    def __init__(self, orders: dict[bytes, bytes], clock: _Clock) -> None:
        self.orders = orders
        self.clock = clock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        url = self.url
        body = self.orders.get(url[len(_PREFIX) :]) if url.startswith(_PREFIX) else None
        status = b"200 OK"
        if body is None:
            status, body = b"404 Not Found", _NOT_FOUND
            if url == b"/readyz":
                status, body = b"200 OK", orjson.dumps({"status": "ready"})
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Date: %s\r\n\r\n%s" % (status, len(body), self.clock.date, body)
        )
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(orders: dict[bytes, bytes], host: str, port: int) -> None:
    clock = _Clock()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: BareProtocol(orders, clock), host, port)
    async with server:
        await server.serve_forever()  # until SIGTERM ends the process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_protocol_server")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    orders = {uid.encode(): payload for uid, payload in load(args.database_url).items()}
    uvloop.run(serve(orders, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
