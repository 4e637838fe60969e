"""Faust's aiohttp web driver, without aiohttp_cors when no CORS options are configured.

Faust sets aiohttp_cors up at start whatever the options, and its response hook then runs on
every response. This service configures no CORS (the page is served from the same origin),
so the driver skips that setup and installs CORS only when options are given.
"""

from __future__ import annotations

from faust.web.drivers import aiohttp as aiohttp_driver


class Web(aiohttp_driver.Web):
    """The aiohttp driver; CORS machinery only when CORS options exist."""

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
