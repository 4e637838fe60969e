"""The Python a read costs, without the sockets: µs per ``GET /orders/{uid}`` of the service's
fast web driver (the real app, its routes and view, built by ``create_app`` and never started),
beside the read figure's bare protocol (bench/bare_protocol_server.py). Each is a connection
fed whole requests by hand, its transport keeping only the last answer, so what is timed is the
parser's callbacks, the routing, the view and the answer's bytes, and none of the kernel's work.

    python -m bench.request_cost                 # 20,000 orders, 200,000 requests, best of 3
    python -m bench.request_cost --requests 2000 --profile   # and cProfile's top functions

bench/findings.md quotes it; nothing here talks to PostgreSQL or NATS.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Final

import uvloop

from bench.bare_protocol_server import BareProtocol, _Clock
from streams.app import create_app
from streams.config import Settings
from streams.events import Event
from streams.fast_web import Web
from streams.http_protocol import HttpConnection
from tests.orders import orders

# Never dialled: create_app builds the store and the bridge unconnected.
_UNUSED_URLS = {
    "ORDERS_DATABASE_URL": "postgresql://bench@127.0.0.1:1/unused",
    "ORDERS_NATS_URL": "nats://127.0.0.1:1",
}


DISTINCT: Final = 2_000


class _KeepLast:
    """A transport that keeps the last answer written and does nothing else."""

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


Feed = tuple[Callable[[bytes], None], _KeepLast]


def _service(batch_orders: list[tuple[str, bytes]]) -> Feed:
    """The service's connection, its view holding the orders (compressed once there are
    enough to train the dictionary on, as in any view of more than 5,000)."""
    app = create_app(Settings.from_env(_UNUSED_URLS))
    web = app.web
    assert isinstance(web, Web), "the fast driver is the default"
    web.init_server()
    view = app.runtime.view
    view.project(Event(seq, uid, data) for seq, (uid, data) in enumerate(batch_orders, 1))
    connection = HttpConnection(web.server)
    transport = _KeepLast()
    connection.connection_made(transport)  # type: ignore[arg-type]
    return connection.data_received, transport


def _bare(batch_orders: list[tuple[str, bytes]]) -> Feed:
    protocol = BareProtocol({uid.encode(): data for uid, data in batch_orders}, _Clock())
    transport = _KeepLast()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol.data_received, transport


def _per_request(feed: Callable[[bytes], None], requests: list[bytes], count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        feed(requests[index % len(requests)])
    return (time.perf_counter() - started) / count


async def _measure(args: argparse.Namespace) -> dict[str, float]:
    batch = orders(args.orders, seed=5)
    pairs = [(str(message.uid), message.data) for message in batch]
    # Requests for the first 2,000 orders in turn (the whole view is held all the same).
    asked = pairs[:DISTINCT]
    requests = [
        f"GET /orders/{uid} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() for uid, _ in asked
    ]
    feeds = {"service": _service(pairs), "bare protocol": _bare(pairs)}
    best = {
        name: min(_per_request(feed, requests, args.requests) for _ in range(3))
        for name, (feed, _) in feeds.items()
    }
    # Timed on real answers: the last request's order, whole, from both.
    expected = asked[(args.requests - 1) % len(asked)][1]
    for name, (_, transport) in feeds.items():
        if not (transport.last.startswith(b"HTTP/1.1 200 ") and transport.last.endswith(expected)):
            raise RuntimeError(f"{name} did not answer the order: {transport.last[:200]!r}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(_per_request, feeds["service"][0], requests, args.requests)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.request_cost", description=__doc__)
    parser.add_argument("--orders", type=int, default=20_000, help="orders in the view")
    parser.add_argument("--requests", type=int, default=200_000, help="requests per timing")
    parser.add_argument("--profile", action="store_true", help="cProfile the service's path")
    args = parser.parse_args(argv)
    for name, seconds in uvloop.run(_measure(args)).items():
        print(f"{name}: {seconds * 1e6:.2f} µs a request (best of 3, {args.requests:,} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
