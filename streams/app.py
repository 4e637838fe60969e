"""The Kafka-free Faust app: ``faust -A streams.app worker`` is the service.

Nothing here talks to Kafka. The boot strategy turns off Kafka's consumer, producer, conductor
and tables; orders reach the agent through an in-memory channel fed by the NATS bridge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Iterable

import faust
import uvloop
from faust.app.base import BootStrategy
from mode import ServiceT

from bridge.embedded_nats import EmbeddedNatsError, server_binary
from bridge.nats_bridge import NatsBridge
from streams import embedded_postgres, fast_web, web_driver
from streams.agent import BatchProcessor
from streams.commands import install_commands
from streams.config import ENVELOPES_PER_COMMIT, POOL_SIZE, ConfigError, Settings
from streams.envelope import Envelope
from streams.follower import ViewFollower
from streams.logs import (
    logging_config,
    quiet_http_parser_refusals,
    quiet_statement_timeout_reports,
)
from streams.metrics import Metrics
from streams.monitor import LeanMonitor
from streams.runtime import Runtime
from streams.store import PostgresEventStore
from streams.validation import is_valid_uid
from views.view import TRAIN_AFTER, OrdersView
from views.web import install_routes

log = logging.getLogger(__name__)


class KafkaFreeBoot(BootStrategy):
    """Start the web server, sensors and agents; never a Kafka client or table."""

    enable_kafka = False
    enable_kafka_consumer = False
    enable_kafka_producer = False


class OrdersApp(faust.App):
    """The orders service as a Faust app: the channel the bridge feeds and the agent reads.

    Built only by :func:`create_app`, which hands it the runtime that opens everything else.
    """

    BootStrategy = KafkaFreeBoot
    runtime: Runtime

    def __init__(self, settings: Settings, monitor: LeanMonitor) -> None:
        super().__init__(
            "orders",
            monitor=monitor,
            web_host=settings.web_host,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            datadir=str(settings.data_dir / "faust"),
            web_cors_options=None,
            logging_config=logging_config(settings.log_format),
        )
        self.settings = settings
        self.orders_channel: faust.ChannelT[Envelope] = self.channel()

    async def on_first_start(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()

    def _new_web(self) -> faust.web.Web:
        # Faust's factory for its web driver: the fast one, or Faust's aiohttp driver without
        # aiohttp_cors when no CORS is configured (ORDERS_WEB_DRIVER).
        if self.settings.web_driver == "fast":
            return fast_web.Web(self)
        return web_driver.Web(self)

    def on_init_dependencies(self) -> Iterable[ServiceT]:
        # The runtime goes last so it starts after the web server and the agent and stops first.
        return [*super().on_init_dependencies(), self.runtime]

    async def send_to_agent(self, envelope: Envelope) -> None:
        """Hand one fetch's messages to the agent (the bridge's and the tests' way in)."""
        await self.orders_channel.send(value=envelope)


def create_app(settings: Settings) -> OrdersApp:
    """Build the service: the one place where its objects are made and wired.

    Nothing here connects or starts anything; the runtime does, in order, when Faust starts
    the app. The store is built unconnected, with the pool size the limits in streams/config.py
    call for; a read replica's store is a reader.
    """
    quiet_http_parser_refusals()
    quiet_statement_timeout_reports()
    metrics = Metrics()
    http = metrics.http if settings.http_metrics else None
    app = OrdersApp(settings, LeanMonitor(http))
    # A snapshot page needs the dictionary: train it by the first page at the latest.
    view = OrdersView(train_after=min(TRAIN_AFTER, settings.snapshot_page_orders))
    metrics.watch_view(view.__len__, lambda: view.last_seq)
    store = PostgresEventStore(
        apply_schema=settings.apply_schema, writer=settings.consume, maxsize=POOL_SIZE
    )
    follower = ViewFollower(
        view,
        store,
        settings.replay_page_size,
        snapshots=store,
        snapshot_page_orders=settings.snapshot_page_orders,
    )
    processor = BatchProcessor(store, follower, log_uids_max=settings.log_uids_max, metrics=metrics)
    bridge = NatsBridge(settings, app.send_to_agent, metrics)
    app.runtime = Runtime(
        settings,
        store=store,
        follower=follower,
        processor=processor,
        inflow=bridge,
        metrics=metrics,
        resume_flow=app.flow_control.resume,
    )
    within = settings.batch_max_wait_ms / 1000

    @app.agent(app.orders_channel, name="orders-ingest")
    async def ingest(stream: faust.StreamT[Envelope]) -> None:
        # Messages only arrive once the runtime has restored the view and started the bridge.
        async for envelopes in stream.take(ENVELOPES_PER_COMMIT, within=within):
            await processor.start_commit(envelopes)

    install_routes(
        app,
        view,
        readiness=app.runtime.readiness,
        registry=metrics.registry,
        is_valid_uid=is_valid_uid,
        http=http,
    )
    install_commands(app, app.runtime)
    return app


def _require_embedded_servers(settings: Settings) -> None:
    """An unset URL stands for an embedded server, which needs the "embedded" extra: without
    it, one line at start says what to do, rather than a traceback once the worker runs."""
    if settings.database_url is None and not embedded_postgres.AVAILABLE:
        raise ConfigError(embedded_postgres.MISSING)
    if settings.nats_url is None:
        try:
            server_binary()
        except EmbeddedNatsError as exc:
            raise ConfigError(str(exc)) from None


def app_from_environment() -> OrdersApp:
    """The app as ``faust -A streams.app`` runs it: settings from the environment, a
    configuration error reported in one line (exit status 2), the event loop chosen."""
    try:
        settings = Settings.from_env()
        _require_embedded_servers(settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.event_loop == "uvloop":
        # Before the worker creates its loop. faust's own -L option is accepted but unused.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return create_app(settings)


@functools.cache
def _the_app() -> OrdersApp:
    return app_from_environment()


def __getattr__(name: str) -> OrdersApp:
    # ``faust -A streams.app`` reads the module's ``app``: it is built on that first read, so
    # importing this module (tests, tools, type checkers) reads no environment and builds
    # nothing that can fail.
    if name == "app":
        return _the_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
