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
from streams.metrics import Metrics
from streams.store import PostgresEventStore, StoreUnavailable
from views.follower import ViewFollower
from views.view import OrdersView

log = logging.getLogger(__name__)

_RETRY_MAX_S: Final = 5.0
_STOP_FOLLOWING_S: Final = 5.0

Inflow = Callable[[], Awaitable[None]]


async def resolve_database_url(settings: Settings) -> str:
    """The configured URL, or the URL of the embedded server started for ``settings.data_dir``."""
    if settings.database_url is not None:
        log.info("database: %s", redact(settings.database_url))
        return settings.database_url
    url = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
    log.info("database: embedded PostgreSQL in %s (%s)", settings.data_dir / "postgres", url)
    return url


async def open_store(
    url: str, should_stop: Callable[[], bool], *, apply_schema: bool = True
) -> PostgresEventStore | None:
    """Open the store, waiting for the database as long as it takes; ``None`` if stopped first."""
    delay = 0.5
    while not should_stop():
        try:
            return await PostgresEventStore.open(url, apply_schema=apply_schema)
        except StoreUnavailable as exc:
            log.warning("database not reachable, retrying in %.1f s: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_S)
    return None


class Runtime(Service):
    """Starts after the web server and the agent, and stops before them.

    Start: resume the app's flow control (once: it also clears the channel queues), open the
    store, replay the log into the view, mark the service ready, follow the log, then start
    the inflow (unless ``consume`` is off: a read replica). Stop: the inflow first, so the
    batch in hand is committed and acked before the store closes.
    """

    def __init__(
        self,
        settings: Settings,
        view: OrdersView,
        metrics: Metrics,
        resume_flow: Callable[[], None],
    ) -> None:
        super().__init__()
        self.settings = settings
        self.view = view
        self.metrics = metrics
        self._resume_flow = resume_flow
        self.store: PostgresEventStore | None = None
        self.processor: BatchProcessor | None = None
        self.follower: ViewFollower | None = None
        self.restored = asyncio.Event()
        self._inflows: list[tuple[Inflow, Inflow]] = []
        self._following: asyncio.Task[None] | None = None

    def add_inflow(self, start: Inflow, stop: Inflow) -> None:
        """Something that feeds the agent, started once the view is restored."""
        self._inflows.append((start, stop))

    async def on_start(self) -> None:
        self._resume_flow()
        url = await resolve_database_url(self.settings)
        self.store = await open_store(
            url, lambda: self.should_stop, apply_schema=self.settings.apply_schema
        )
        if self.store is None:
            return
        self.follower = ViewFollower(self.view, self.store, self.settings.replay_page_size)
        self.processor = BatchProcessor(
            self.store,
            self.follower,
            log_uids_max=self.settings.log_uids_max,
            metrics=self.metrics,
        )
        stats = await self.follower.catch_up()
        self.metrics.restore_seconds.set(stats.seconds)
        self.metrics.restore_rate.set(stats.rate)
        log.info(
            "view restored: %d orders from orders_events in %.2f s",
            len(self.view),
            stats.seconds,
            extra={"count": len(self.view), "seq": stats.last_seq, "seconds": stats.seconds},
        )
        self.restored.set()
        self._following = asyncio.create_task(
            self.follower.follow(self.settings.follow_poll_s), name="follow-orders-events"
        )
        if not self.settings.consume:
            log.info("consumption off (ORDERS_CONSUME=false): following the log and serving reads")
            return
        for start, _ in self._inflows:
            await start()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether to take traffic, and the figures that say why: 503 until restored, and
        while the view is more than ``ready_max_lag`` events behind the log."""
        lag = self.follower.lag if self.follower is not None else 0
        detail: dict[str, object] = {
            "orders": len(self.view),
            "last_seq": self.view.last_seq,
            "lag": lag,
        }
        if not self.restored.is_set():
            return False, {"status": "restoring", **detail}
        if lag > self.settings.ready_max_lag:
            return False, {"status": "lagging", **detail}
        return True, {"status": "ready", **detail}

    async def on_stop(self) -> None:
        if self.settings.consume:
            for _, stop in reversed(self._inflows):
                await stop()
        if self._following is not None:
            self._following.cancel()
            _, pending = await asyncio.wait([self._following], timeout=_STOP_FOLLOWING_S)
            if pending:
                log.warning("the log follower did not stop within %.0f s", _STOP_FOLLOWING_S)
        if self.store is not None:
            await self.store.close()
            self.store = None
