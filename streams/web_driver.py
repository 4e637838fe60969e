"""Faust's aiohttp web driver, without aiohttp_cors when no CORS options are configured, and
with a bound on how long a connection may stay open without a complete request.

Faust sets aiohttp_cors up at start whatever the options, and its response hook then runs on
every response. This service configures no CORS (the page is served from the same origin),
so the driver skips that setup and installs CORS only when options are given.

Faust's runner takes aiohttp's defaults, under which a connection that never finishes its
request head (a slowloris client) or idles between requests stays open for an hour.

aiohttp's own answers (404 for no route, 405 for no such method) get the headers the service
gives its refusals on either driver; a view's answer keeps the ones it set.
"""

from __future__ import annotations

from typing import Any

from aiohttp.web import AppRunner, Request, StreamResponse
from faust.types import AppT
from faust.web.drivers import aiohttp as aiohttp_driver

from streams.http_limits import (
    KEEPALIVE_TIMEOUT_S,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    REFUSAL_HEADERS,
)


class Web(aiohttp_driver.Web):
    """The aiohttp driver; CORS machinery only when CORS options exist; connections that
    carry no complete request for
    :data:`~streams.http_limits.KEEPALIVE_TIMEOUT_S` are closed."""

    def __init__(self, app: AppT, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        # Faust builds its runner with aiohttp's defaults; this one differs in the timeout only
        # (aiohttp arms it when a connection opens and again after each response, and closes
        # the connection if no complete request head has arrived when it fires). The sizes are
        # aiohttp's defaults, named so that the fast driver applies the same ones.
        self._runner = AppRunner(
            self.web_app,
            access_log=None,
            keepalive_timeout=KEEPALIVE_TIMEOUT_S,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
        )
        self.web_app.on_response_prepare.append(_with_refusal_headers)

    async def on_start(self) -> None:
        if self.cors_options:
            await super().on_start()
            return
        self.init_server()
        server = (
            aiohttp_driver.ServerThread if self.app.conf.web_in_thread else aiohttp_driver.Server
        )
        self._thread = server(self, loop=self.loop, beacon=self.beacon)
        self.add_dependency(self._thread)


async def _with_refusal_headers(request: Request, response: StreamResponse) -> None:
    # Every view of the service sets all three; aiohttp's own refusals set none.
    for name, value in REFUSAL_HEADERS.items():
        response.headers.setdefault(name, value)
