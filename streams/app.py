"""The Kafka-free Faust app: ``faust -A streams.app worker`` is the service.

Nothing here talks to Kafka. The boot strategy turns off Kafka's consumer, producer, conductor
and tables; orders reach the agent through an in-memory channel fed by the NATS bridge.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterable

import faust
import uvloop
from faust.app.base import BootStrategy
from mode import ServiceT

from bridge.consumer import NatsBridge
from bridge.embedded_nats import EmbeddedNatsError, server_binary
from streams import embedded_postgres, fast_web, web_driver
from streams.commands import install_commands
from streams.config import ConfigError, Settings
from streams.envelope import Envelope
from streams.logs import (
    logging_config,
    quiet_http_parser_refusals,
    quiet_statement_timeout_reports,
)
from streams.metrics import Metrics
from streams.monitor import LeanMonitor
from streams.runtime import Runtime
from views.view import OrdersView
from views.web import install_routes

log = logging.getLogger(__name__)


class KafkaFreeBoot(BootStrategy):
    """Start the web server, sensors and agents; never a Kafka client or table."""

    enable_kafka = False
    enable_kafka_consumer = False
    enable_kafka_producer = False


class OrdersApp(faust.App):
    """The orders service: channel, agent, view, web views and the runtime that wires them."""

    BootStrategy = KafkaFreeBoot

    def __init__(self, settings: Settings) -> None:
        metrics = Metrics()
        super().__init__(
            "orders",
            monitor=LeanMonitor(metrics.http if settings.http_metrics else None),
            web_host=settings.web_host,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            datadir=str(settings.data_dir / "faust"),
            web_cors_options=None,
            logging_config=logging_config(settings.log_format),
        )
        self.settings = settings
        self.metrics = metrics
        self.view = OrdersView()
        metrics.watch_view(self.view.__len__, lambda: self.view.last_seq)
        self.orders_channel: faust.ChannelT[Envelope] = self.channel()
        self.runtime = Runtime(settings, self.view, metrics, self.flow_control.resume)

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

    async def submit(self, envelope: Envelope) -> None:
        """Hand one message to the agent (the bridge's and the tests' way in)."""
        await self.orders_channel.send(value=envelope)


# Each envelope holds one fetch (up to ORDERS_BATCH_SIZE messages); the agent commits the
# envelopes that queued up while it was busy together, a few at most.
_ENVELOPES_PER_BATCH = 4


def create_app(settings: Settings) -> OrdersApp:
    """Build the app with its agent, web views and commands."""
    app = OrdersApp(settings)
    quiet_http_parser_refusals()
    quiet_statement_timeout_reports()
    within = settings.batch_max_wait_ms / 1000

    @app.agent(app.orders_channel, name="orders-ingest")
    async def ingest(stream: faust.StreamT[Envelope]) -> None:
        # Messages only arrive once the runtime has restored the view and started the bridge.
        async for batch in stream.take(_ENVELOPES_PER_BATCH, within=within):
            processor = app.runtime.processor
            assert processor is not None, "the inflow starts only after the processor exists"
            await processor.submit(batch)

    bridge = NatsBridge(settings, app.submit, app.metrics)
    app.runtime.add_inflow(bridge.start, bridge.stop, lambda: bridge.problem)
    install_routes(
        app,
        app.view,
        app.runtime.readiness,
        app.metrics.registry,
        app.metrics.http if settings.http_metrics else None,
    )
    install_commands(app)
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


def _app_from_environment() -> OrdersApp:
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


app = _app_from_environment()
