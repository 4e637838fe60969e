"""The service that brings the worker up in order: database, schema, view, then the inflow."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

from mode import Service

from streams.agent import BatchProcessor
from streams.config import Settings, redact
from streams.embedded_postgres import start_embedded_postgres
from streams.follower import RestoreStats, ViewFollower
from streams.metrics import Metrics
from streams.retry import Backoff, Episode
from streams.store import PostgresEventStore, SchemaError, SchemaMissing, StoreUnavailable

log = logging.getLogger(__name__)

_STOP_FOLLOWING_S: Final = 5.0
_COMMAND_CONNECT_S: Final = 60.0

T = TypeVar("T")


async def resolve_database_url(settings: Settings) -> str:
    """The configured URL, or the URL of the embedded server started for ``settings.data_dir``."""
    if settings.database_url is not None:
        log.info("database: %s", redact(settings.database_url))
        return settings.database_url
    url = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
    log.info("database: embedded PostgreSQL in %s (%s)", settings.data_dir / "postgres", url)
    return url


async def until_done(
    step: Callable[[], Awaitable[T]],
    what: str,
    should_stop: Callable[[], bool],
    waits_out: tuple[type[Exception], ...] = (StoreUnavailable,),
) -> T | None:
    """Run ``step`` again after each exception of ``waits_out``, waiting longer each time,
    until it succeeds; ``None`` if stopped first. Told once when it starts failing, now and
    then while it goes on, and once when it succeeds after failures."""
    backoff = Backoff()
    episode = Episode(log)
    while not should_stop():
        try:
            result = await step()
        except waits_out as exc:
            reason = "database not reachable" if isinstance(exc, StoreUnavailable) else "waiting"
            episode.failed(reason, "%s: %s, retrying: %s", what, reason, exc)
            await asyncio.sleep(backoff.next())
            continue
        episode.over("%s: done after %d failed tries", what, episode.failures)
        return result
    return None


async def connect_store(
    store: PostgresEventStore,
    url: str,
    should_stop: Callable[[], bool],
    *,
    reader: bool = False,
    wait_for_schema: bool = True,
) -> bool:
    """Connect the store, waiting for the database, and (with ``wait_for_schema``) for the
    schema when the service does not apply it (its owner or the first writer may be about
    to), as long as it takes; ``False`` if stopped first. A schema that is there but unsafe is
    not waited out: it is raised."""

    async def connecting() -> bool:
        await store.connect(url, reader=reader)
        return True

    waits_out = (StoreUnavailable, SchemaMissing) if wait_for_schema else (StoreUnavailable,)
    try:
        connected = await until_done(connecting, "opening the event store", should_stop, waits_out)
    except SchemaError as exc:
        log.error("cannot run on this database: %s", exc)
        raise
    return connected is not None


class Inflow(Protocol):
    """Something that feeds the agent (the NATS bridge), started once the view is restored."""

    @property
    def problem(self) -> str | None:
        """Why it cannot feed the agent right now, if it cannot (readiness reports it)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Runtime(Service):
    """Opens, sequences and closes what :func:`streams.app.create_app` built. Starts after the
    web server and the agent, and stops before them.

    Start: resume the app's flow control (once: it also clears the channel queues), connect
    the store, replay the log into the view, mark the service ready, follow the log, then
    start the inflow (unless ``consume`` is off: a read replica). Stop: the inflow first, so
    the batch in hand is committed and acked before the store closes.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: PostgresEventStore,
        follower: ViewFollower,
        processor: BatchProcessor,
        inflow: Inflow,
        metrics: Metrics,
        resume_flow: Callable[[], None],
    ) -> None:
        super().__init__()
        self.settings = settings
        self.store = store
        self.follower = follower
        self.processor = processor
        self.inflow = inflow
        self.view = follower.view
        self.metrics = metrics
        self._resume_flow = resume_flow
        self.restored = asyncio.Event()
        self._following: asyncio.Task[None] | None = None

    async def on_start(self) -> None:
        self._resume_flow()
        url = await resolve_database_url(self.settings)

        def stopping() -> bool:
            return self.should_stop

        if not await connect_store(self.store, url, stopping):
            return
        stats = await until_done(self.follower.boot, "restoring the view", stopping)
        if stats is None:
            return
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
        await self.inflow.start()

    async def replay(self, on_page: Callable[[int], None] | None = None) -> RestoreStats:
        """The ``replay`` command: connect as a reader, rebuild the view from the log once,
        close. A missing schema is reported at once rather than waited for."""
        url = await resolve_database_url(self.settings)
        connecting = connect_store(
            self.store, url, lambda: False, reader=True, wait_for_schema=False
        )
        await asyncio.wait_for(connecting, timeout=_COMMAND_CONNECT_S)
        try:
            return await self.follower.catch_up(on_page)
        finally:
            await self.store.close()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether to take traffic, and the figures that say why: 503 until restored, while
        the inflow refuses its source (the problem given), while the view is more than
        ``ready_max_lag`` events behind the log, and while the agent's writes fail (it
        consumes nothing then, whatever the view still serves)."""
        lag = self.follower.lag
        detail: dict[str, object] = {
            "orders": len(self.view),
            "last_seq": self.view.last_seq,
            "lag": lag,
        }
        if not self.restored.is_set():
            return False, {"status": "restoring", **detail}
        refused = self.inflow.problem if self.settings.consume else None
        if refused is not None:
            return False, {"status": "refused", "problem": refused, **detail}
        if lag > self.settings.ready_max_lag:
            return False, {"status": "lagging", **detail}
        problem = self.processor.problem
        if problem is not None:
            return False, {"status": "stalled", "problem": problem, **detail}
        return True, {"status": "ready", **detail}

    async def on_stop(self) -> None:
        if self.settings.consume:
            await self.inflow.stop()
        if self._following is not None:
            self._following.cancel()
            _, pending = await asyncio.wait([self._following], timeout=_STOP_FOLLOWING_S)
            if pending:
                log.warning("the log follower did not stop within %.0f s", _STOP_FOLLOWING_S)
        await self.store.close()
