"""The service that brings the worker up in order: database, schema, view, then the inflow."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from mode import Service

from streams.agent import BatchProcessor
from streams.config import Settings, redact
from streams.embedded_postgres import start_embedded_postgres
from streams.store import PostgresEventStore, StoreUnavailable
from views.view import OrdersView, restore

log = logging.getLogger(__name__)

_RETRY_MAX_S: Final = 5.0

Inflow = Callable[[], Awaitable[None]]


async def resolve_database_url(settings: Settings) -> str:
    """The configured URL, or the URL of the embedded server started for ``settings.data_dir``."""
    if settings.database_url is not None:
        log.info("database: %s", redact(settings.database_url))
        return settings.database_url
    url = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
    log.info("database: embedded PostgreSQL in %s (%s)", settings.data_dir / "postgres", url)
    return url


async def open_store(url: str, should_stop: Callable[[], bool]) -> PostgresEventStore | None:
    """Open the store, waiting for the database as long as it takes; ``None`` if stopped first."""
    delay = 0.5
    while not should_stop():
        try:
            return await PostgresEventStore.open(url)
        except StoreUnavailable as exc:
            log.warning("database not reachable, retrying in %.1f s: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
    return None


class Runtime(Service):
    """Starts after the web server and the agent, and stops before them.

    Start: resume the app's flow control (once: it also clears the channel queues), open the
    store, replay the log into the view, mark the service ready, then start the inflow. Stop:
    the inflow first, so the batch in hand is committed and acked before the store closes.
    """

    def __init__(
        self, settings: Settings, view: OrdersView, resume_flow: Callable[[], None]
    ) -> None:
        super().__init__()
        self.settings = settings
        self.view = view
        self._resume_flow = resume_flow
        self.store: PostgresEventStore | None = None
        self.processor: BatchProcessor | None = None
        self.restored = asyncio.Event()
        self._inflows: list[tuple[Inflow, Inflow]] = []

    def add_inflow(self, start: Inflow, stop: Inflow) -> None:
        """Something that feeds the agent, started once the view is restored."""
        self._inflows.append((start, stop))

    async def on_start(self) -> None:
        self._resume_flow()
        url = await resolve_database_url(self.settings)
        self.store = await open_store(url, lambda: self.should_stop)
        if self.store is None:
            return
        self.processor = BatchProcessor(
            self.store, self.view, log_uids_max=self.settings.log_uids_max
        )
        stats = await restore(self.view, self.store, self.settings.replay_page_size)
        log.info(
            "view restored: %d orders from orders_events in %.2f s", len(self.view), stats.seconds
        )
        self.restored.set()
        for start, _ in self._inflows:
            await start()

    async def on_stop(self) -> None:
        for _, stop in reversed(self._inflows):
            await stop()
        if self.store is not None:
            await self.store.close()
            self.store = None
