"""The read figure's ceiling: a bare aiohttp handler on uvloop that returns the same bytes from
a dict: ``order_uid -> payload::text`` of every row of ``orders_events``, loaded at start.

    python -m bench.bare_read_server --database-url URL --port PORT

``GET /orders/{uid}`` answers 200 with the payload (application/json) or 404; ``GET /readyz``
answers 200 once the dict is loaded and the server listens.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import psycopg2
import uvloop
from aiohttp import web


def load(dsn: str, uids: list[str] | None = None) -> dict[str, bytes]:
    """Every order of the log, or only those of ``uids`` (a log too large to hold twice)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            if uids is None:
                cur.execute("SELECT order_uid, payload::text FROM orders_events ORDER BY seq")
            else:
                cur.execute(
                    "SELECT order_uid, payload::text FROM orders_events"
                    " WHERE order_uid = ANY(%s) ORDER BY seq",
                    (uids,),
                )
            return {uid: text.encode() for uid, text in cur.fetchall()}
    finally:
        conn.close()


async def serve(orders: dict[str, bytes], host: str, port: int) -> None:
    async def order(request: web.Request) -> web.Response:
        payload = orders.get(request.match_info["uid"])
        if payload is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.Response(body=payload, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "orders": len(orders)})

    app = web.Application()
    app.router.add_get("/orders/{uid}", order)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    await asyncio.Event().wait()  # until SIGTERM ends the process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_read_server")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uids", type=Path, help="serve only the uids of this file (one a line)")
    args = parser.parse_args(argv)
    orders = load(args.database_url, args.uids.read_text().split() if args.uids else None)
    uvloop.run(serve(orders, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
