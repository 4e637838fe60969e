"""What the HTTP port gives a client it does not trust, against a real worker: slow or idle
connections are closed within a bound, every route's answers carry the browser-facing security
headers, and /readyz and /metrics disclose counts only, never the servers' addresses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest
from yarl import URL

from tests.flow import wait_for_orders
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker

pytestmark = pytest.mark.usefixtures("web_driver")

OPENAPI: Final = Path(__file__).resolve().parent.parent / "views" / "static" / "openapi.json"
SLOW_CLIENTS: Final = 50
# Generous: the bound is streams.http_limits.KEEPALIVE_TIMEOUT_S; aiohttp's default was an hour.
CLOSED_WITHIN_S: Final = 90.0
REQUEST: Final = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PARTIAL_HEAD: Final = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


async def _closed_by_server(
    port: int, opening: bytes, drip: bytes, deadline: float
) -> tuple[bool, bytes]:
    """Send ``opening``, then ``drip`` once a second (nothing, if empty) and read what comes.
    Returns whether the server closed the connection before ``deadline``, and what it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(opening)
        await writer.drain()
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 1.0)
                if chunk == b"":
                    return True, received  # EOF: the server closed it
                received += chunk
                continue
            except TimeoutError:
                pass
            try:
                writer.write(drip)
                await writer.drain()
            except ConnectionError:
                return True, received
        return False, received
    except ConnectionError:
        return True, received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slow_and_idle_connections_are_closed_while_others_are_served(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    """Promise: a client cannot hold the HTTP port's connections open by never finishing its
    request head (slowloris) or by idling on a kept-alive connection; the server closes them
    within its bound, and answers everyone else meanwhile."""
    batch = orders(1, seed=1301)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, 1)
        deadline = time.monotonic() + CLOSED_WITHIN_S
        # Slowloris: an unfinished request head, one more byte a second, never the blank line
        # that would end it.
        slow = [
            asyncio.create_task(_closed_by_server(worker.port, PARTIAL_HEAD, b"x", deadline))
            for _ in range(SLOW_CLIENTS)
        ]
        # One complete request, then silence on the kept-alive connection.
        idle = asyncio.create_task(_closed_by_server(worker.port, REQUEST, b"", deadline))
        # A connection that never sends a byte.
        silent = asyncio.create_task(_closed_by_server(worker.port, b"", b"", deadline))
        answered = 0
        async with aiohttp.ClientSession() as http:
            while not all(task.done() for task in [*slow, idle, silent]):
                async with http.get(f"{worker.base}/orders/{batch[0].uid}") as response:
                    assert response.status == 200
                    assert await response.read() == batch[0].data
                answered += 1
                await asyncio.sleep(0.2)
        closed = sum(task.result()[0] for task in slow)
        assert closed == SLOW_CLIENTS, (
            f"{SLOW_CLIENTS - closed} of {SLOW_CLIENTS} connections with an unfinished request"
            f" head were still open after {CLOSED_WITHIN_S} s"
        )
        idle_closed, answer = idle.result()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert idle_closed, f"an idle kept-alive connection was open after {CLOSED_WITHIN_S} s"
        assert silent.result() == (True, b""), (
            f"a silent connection was open after {CLOSED_WITHIN_S} s"
        )
        assert answered > 0
        status, _, _ = await worker.get("/healthz")
        assert status == 200


PAGE_CSP: Final = {
    "default-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
}
# Not HTML: nothing in them may run or be framed.
DATA_CSP: Final = {"default-src": "'none'", "frame-ancestors": "'none'"}


def _policy(header: str) -> dict[str, str]:
    directives = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {name: value for name, value in directives}


async def test_every_route_answers_with_the_security_headers(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    """Promise: every answer of every route (found, not found, malformed, ready or not) tells
    the browser not to sniff its type and not to let another site frame it; the page's policy
    allows its own scripts and styles only."""
    batch = orders(1, seed=1302)
    uid = str(batch[0].uid)
    described = set(orjson.loads(OPENAPI.read_bytes())["paths"])
    targets = {
        "/": ("/", PAGE_CSP),
        "/app.js": ("/app.js", DATA_CSP),
        "/app.css": ("/app.css", DATA_CSP),
        "/openapi.json": ("/openapi.json", DATA_CSP),
        "/metrics": ("/metrics", DATA_CSP),
        "/healthz": ("/healthz", DATA_CSP),
        "/readyz": ("/readyz", DATA_CSP),
        "/orders/{uid} 200": (f"/orders/{uid}", DATA_CSP),
        "/orders/{uid} 404": ("/orders/unknown-uid", DATA_CSP),
        "/orders/{uid} 400": ("/orders/not%20a%20uid", DATA_CSP),
    }
    assert described <= {key.split(" ")[0] for key in targets}, "a route is not checked"
    wrong: list[str] = []
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, 1)
        async with aiohttp.ClientSession() as http:
            for what, (path, csp) in targets.items():
                async with http.get(URL(worker.base + path, encoded=True)) as r:
                    await r.read()
                    expected_status = int(what.split(" ")[1]) if " " in what else 200
                    if r.status != expected_status:
                        wrong.append(f"{what}: status {r.status}")
                    if r.headers.get("X-Content-Type-Options") != "nosniff":
                        wrong.append(f"{what}: X-Content-Type-Options is not nosniff")
                    if r.headers.get("Referrer-Policy") != "no-referrer":
                        wrong.append(f"{what}: Referrer-Policy is not no-referrer")
                    policy = _policy(r.headers.get("Content-Security-Policy", ""))
                    if policy != csp:
                        wrong.append(f"{what}: Content-Security-Policy {policy} != {csp}")
    assert not wrong, "\n".join(wrong)


async def test_readyz_and_metrics_disclose_counts_not_addresses(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    """Promise: on a public port /readyz tells status and counts only, and /metrics has no
    label a client chose nor any server address, URL, data folder or order uid."""
    batch = orders(2, seed=1303)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(batch)
        await wait_for_orders(worker, 2)
        for probe in ("/no-such-route-abc", "/orders/probe-uid-xyz", "/orders/%00"):
            await worker.get(probe)
        status, body, _ = await worker.get("/readyz")
        assert status == 200
        ready = orjson.loads(body)
        assert set(ready) == {"status", "orders", "last_seq", "lag"}, ready
        assert ready["status"] == "ready"
        assert all(type(ready[key]) is int for key in ("orders", "last_seq", "lag")), ready
        status, metrics, _ = await worker.get("/metrics")
        assert status == 200
    text = metrics.decode()
    database = urlsplit(database_url)
    secrets = [
        database_url,
        database.path.lstrip("/"),
        *parse_qs(database.query).get("host", []),
        route.nats_url,
        urlsplit(route.nats_url).netloc,
        str(tmp_path),
        "no-such-route-abc",
        "probe-uid-xyz",
        *(str(message.uid) for message in batch),
    ]
    for secret in secrets:
        assert secret not in text, f"/metrics discloses {secret!r}"
        assert secret not in body.decode(), f"/readyz discloses {secret!r}"
