"""The HTTP face of the view: Faust web views. They only read; nothing here writes.

Everything the routes need from the rest of the service is handed to :func:`install_routes`
(the view, readiness, the metrics registry, a request counter and the uid rule), so this package
imports nothing from streams/.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from time import perf_counter
from typing import Any, Final, Protocol

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from views.view import OrdersView

_JSON: Final = "application/json"
# Readiness states in which the view does not yet hold every order of the log, so an unknown
# uid may still come; while "stalled" (writes failing) the view is complete, and 404 is true.
_VIEW_INCOMPLETE: Final = ("restoring", "lagging")
# Every answer: no type sniffing, no referrer, never framed by another site (clickjacking).
_COMMON_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_PAGE_HEADERS: Final = {
    # The page inserts order data as text only; the policy makes any slip inert as well.
    "Content-Security-Policy": (
        "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    **_COMMON_HEADERS,
}
# JSON, scripts, styles and metrics: nothing in them is to run or be framed as a document.
# (aiohttp copies a response's headers, so these dicts are shared, never changed.)
_DATA_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    **_COMMON_HEADERS,
}


Readiness = Callable[[], tuple[bool, dict[str, object]]]


class RouteCounter(Protocol):
    """Where one route's answered requests are counted."""

    def observe(self, status: int, seconds: float) -> None: ...


class RequestCounter(Protocol):
    """Where answered requests are counted (the service's HTTP metrics)."""

    def meter(self, route: str) -> RouteCounter: ...


def _static(name: str) -> bytes:
    return importlib.resources.files("views").joinpath("static", name).read_bytes()


def install_routes(
    app: faust.App,
    view: OrdersView,
    *,
    readiness: Readiness,
    registry: CollectorRegistry,
    is_valid_uid: Callable[[str], bool],
    http: RequestCounter | None = None,
) -> None:
    """Register the routes: ``/orders/{uid}``, the page (``/``, ``/app.js``, ``/app.css``),
    ``/openapi.json``, ``/metrics`` (of ``registry``), ``/healthz`` and ``/readyz``.

    ``is_valid_uid`` tells a malformed uid (400) from an unknown one (404); ``http`` counts
    the requests of ``/orders/{uid}``, which bypasses the sensors (see :class:`OrderPage`)."""
    index_html = _static("index.html").decode("utf-8")
    counted = http.meter("order") if http is not None else None

    class OrderPage(View):
        """``GET /orders/{uid}``, the route that takes the load.

        Faust's ``View.dispatch`` hands every request to the sensors (a state dict per
        sensor, a start and an end call each) and looks the handler up by method; here
        ``dispatch`` answers itself and counts the request into the same HTTP metrics as
        the service's monitor does for the other routes (route ``order``). Everything else,
        registration and the response types included, is Faust's.

        ``immediate_response`` and ``immediate_body`` are the same answer for a driver that can
        answer without a request, a coroutine or a response object per request (the fast web
        driver does): the head of every 200 and the order, for orders the view holds; every
        other case goes to ``dispatch``.
        """

        async def get(self, request: Request, uid: str) -> Response:
            # Faust routes the methods a view defines; dispatch below answers them.
            return self.answer(uid)

        async def dispatch(self, request: Any) -> Any:
            started = perf_counter()
            response = self.answer(request.match_info["uid"])
            if counted is not None:
                counted.observe(response.status, perf_counter() - started)
            return response

        def immediate_response(self) -> Response:
            return self.order(b"")

        def immediate_body(self, uid: str) -> bytes | None:
            started = perf_counter()
            payload = view.get(uid)
            if payload is not None and counted is not None:
                counted.observe(200, perf_counter() - started)
            return payload

        def answer(self, uid: str) -> Response:
            payload = view.get(uid)
            if payload is not None:
                # Only uids that passed validation are in the view: no need to check first.
                return self.order(payload)
            if not is_valid_uid(uid):
                return _error(
                    self, 400, "malformed order_uid: expected 1 to 64 letters, digits, '_' or '-'"
                )
            ready, detail = readiness()
            if not ready and detail.get("status") in _VIEW_INCOMPLETE:
                # Not known yet is not the same as not there: ask the client to come back.
                return _error(self, 503, "the service is still loading orders; try again shortly")
            return _error(self, 404, f"order {uid} not found")

        def order(self, payload: bytes) -> Response:
            """The 200 answer carrying ``payload``."""
            return self.bytes(payload, content_type=_JSON, headers=_DATA_HEADERS)

    app.page("/orders/{uid}", name="order")(OrderPage)

    @app.page("/", name="index")
    async def index(self: View, request: Request) -> Response:
        return self.html(index_html, headers=_PAGE_HEADERS)

    _asset(app, "/app.js", _static("app.js"), "text/javascript")
    _asset(app, "/app.css", _static("app.css"), "text/css")
    _asset(app, "/openapi.json", _static("openapi.json"), "application/json")

    @app.page("/metrics", name="metrics")
    async def metrics(self: View, request: Request) -> Response:
        return self.bytes(
            generate_latest(registry),
            headers={**_DATA_HEADERS, "Content-Type": CONTENT_TYPE_LATEST},
        )

    @app.page("/healthz", name="healthz")
    async def healthz(self: View, request: Request) -> Response:
        return self.json({"status": "alive"}, headers=_DATA_HEADERS)

    @app.page("/readyz", name="readyz")
    async def readyz(self: View, request: Request) -> Response:
        ready, detail = readiness()
        # The detail is the status and counts only (no addresses, URLs or errors): the port may
        # be public, and an orchestrator needs no more.
        return self.json(detail, status=200 if ready else 503, headers=_DATA_HEADERS)


def _asset(app: faust.App, path: str, body: bytes, content_type: str) -> None:
    async def asset(self: View, request: Request) -> Response:
        return self.bytes(body, content_type=content_type, headers=_DATA_HEADERS)

    app.page(path, name=path.lstrip("/"))(asset)


def _error(page: View, status: int, message: str) -> Response:
    return page.json({"error": message, "status": status}, status=status, headers=_DATA_HEADERS)
