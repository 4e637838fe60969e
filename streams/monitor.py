"""Faust's Monitor, made lean for this service.

Faust's default Monitor keeps per-event and per-request bookkeeping (timestamps, deques,
state dicts) that this service does not read and that costs on both hot paths. This subclass
drops the per-event work on the agent's stream and records HTTP requests into the service's
Prometheus counters instead; everything else is Faust's.
"""

from __future__ import annotations

import time
from typing import Any

from faust.sensors.monitor import Monitor
from faust.types import TP, AppT, EventT, StreamT
from faust.web import Request, Response, View

from streams.metrics import HttpMetrics

_NOTHING: dict[str, Any] = {}  # shared and never written: no allocation per request


class LeanMonitor(Monitor):
    """Monitor without per-event state, counting HTTP requests into :class:`HttpMetrics`
    (or not at all with ``http=None``)."""

    def __init__(self, http: HttpMetrics | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._http = http

    def on_stream_event_in(
        self, tp: TP, offset: int, stream: StreamT[Any], event: EventT[Any]
    ) -> dict[str, Any] | None:
        return None

    def on_stream_event_out(
        self,
        tp: TP,
        offset: int,
        stream: StreamT[Any],
        event: EventT[Any],
        state: dict[str, Any] | None = None,
    ) -> None:
        return None

    def on_web_request_start(
        self, app: AppT, request: Request, *, view: View | None = None
    ) -> dict[str, Any]:
        return {"started": time.perf_counter()} if self._http is not None else _NOTHING

    def on_web_request_end(
        self,
        app: AppT,
        request: Request,
        response: Response | None,
        state: dict[str, Any],
        *,
        view: View | None = None,
    ) -> None:
        if self._http is None:
            return
        route = view.view_name if view is not None else "unknown"
        status = response.status if response is not None else 500
        self._http.observe(route, status, time.perf_counter() - state["started"])
