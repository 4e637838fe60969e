"""The HTTP face of the view: Faust web views over aiohttp. They only read; nothing here writes."""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Callable
from typing import Final

import faust
from faust.web import Request, Response, View

from streams.validation import UID_PATTERN
from views.view import OrdersView

_UID: Final = re.compile(UID_PATTERN)
_JSON: Final = "application/json"
_PAGE_HEADERS: Final = {
    # The page inserts order data as text only; the policy makes any slip inert as well.
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes:
    return importlib.resources.files("views").joinpath("static", name).read_bytes()


def install_routes(app: faust.App, view: OrdersView, is_ready: Callable[[], bool]) -> None:
    """Register ``/``, ``/app.js``, ``/orders/{uid}``, ``/healthz`` and ``/readyz`` on ``app``."""
    index_html = _static("index.html").decode("utf-8")
    app_js = _static("app.js")

    @app.page("/orders/{uid}", name="order")
    async def order(self: View, request: Request, uid: str) -> Response:
        if not _UID.match(uid):
            return _error(
                self, 400, "malformed order_uid: expected 1 to 64 letters, digits, '_' or '-'"
            )
        payload = view.get(uid)
        if payload is None:
            return _error(self, 404, f"order {uid} not found")
        return self.bytes(payload, content_type=_JSON)

    @app.page("/", name="index")
    async def index(self: View, request: Request) -> Response:
        return self.html(index_html, headers=dict(_PAGE_HEADERS))

    @app.page("/app.js", name="script")
    async def script(self: View, request: Request) -> Response:
        return self.bytes(
            app_js,
            content_type="text/javascript",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    @app.page("/healthz", name="healthz")
    async def healthz(self: View, request: Request) -> Response:
        return self.json({"status": "alive"})

    @app.page("/readyz", name="readyz")
    async def readyz(self: View, request: Request) -> Response:
        if not is_ready():
            return self.json({"status": "restoring", "orders": len(view)}, status=503)
        return self.json({"status": "ready", "orders": len(view), "last_seq": view.last_seq})


def _error(page: View, status: int, message: str) -> Response:
    return page.json({"error": message, "status": status}, status=status)
