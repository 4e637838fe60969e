"""The bridge: fetch batches from the durable pull consumer, hand each message to the agent,
and ack it only once the agent says it is committed.

Shaped after the way faststream runs a NATS pull subscriber: one loop that fetches, a bounded
number of batches in flight (one per inbox, bridge/pull.py), and everything bound again
whenever the connection comes back: a restarted server has forgotten the open pull requests,
and may have lost the consumer (the reason nats.py's own pull subscription needs rebinding,
its issue 504).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from bridge.acks import ACK, PROGRESS, nak, reply_all
from bridge.client import BridgeClient
from bridge.embedded_nats import EmbeddedNats
from bridge.jetstream import Refused, check_stream, ensure_consumer, ensure_stream
from bridge.pull import Inbox, PullRefused
from streams.config import FETCHES_IN_FLIGHT, Settings, redact
from streams.envelope import Envelope, Outcome
from streams.metrics import Metrics
from streams.retry import Backoff, Episode

log = logging.getLogger(__name__)

SendToAgent = Callable[[Envelope], Awaitable[None]]

_FETCH_WAIT_S: Final = 1.0
# A refused stream or consumer waits for an operator: look again now and then, not in a loop.
_REFUSED_RETRY_S: Final = 10.0
_NAK_DELAY_S: Final = 2.0
_NAK: Final = nak(_NAK_DELAY_S)
_REMIND_ERRORS_S: Final = 30.0
_STOP_GRACE_S: Final = 30.0
_POLL_CONSUMER_S: Final = 5.0
# A server that stops answering without closing its sockets (frozen, or cut off by the
# network) is taken for gone after this many seconds times (pings + 1), and the client moves
# to the next server of the seed list; nats-py's default, 120 s and 2 pings, held a worker on a
# frozen node of a healthy cluster for four minutes.
_PING_INTERVAL_S: Final = 3
_MAX_OUTSTANDING_PINGS: Final = 2

_NATS_ERRORS: Final = (nats.errors.Error, nats.js.errors.Error, OSError)
_BIND_ERRORS: Final = (*_NATS_ERRORS, PullRefused, TimeoutError)


class NatsBridge:
    """Moves messages from JetStream into the agent, and acks them after their commit.

    ``problem`` is why it does not consume while it refuses the stream or the consumer it
    found (``None`` otherwise): readiness reports it.
    """

    def __init__(self, settings: Settings, send_to_agent: SendToAgent, metrics: Metrics) -> None:
        self.settings = settings
        self._send_to_agent = send_to_agent
        self.metrics = metrics
        self._embedded: EmbeddedNats | None = None
        self._nc: Client | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._rebind = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self.servers: list[str] = []
        # While a server is down the client fails every half second: said once, then sparsely.
        self._errors = Episode(log, remind_s=_REMIND_ERRORS_S)
        self._answered = False  # a pull request was answered since the last bind
        self._inboxes: list[Inbox] = []
        self.problem: str | None = None
        self._warned: frozenset[str] = frozenset()

    async def start(self) -> None:
        """Resolve the server (starting the embedded one if needed) and start consuming."""
        if self.settings.nats_url is not None:
            self.servers = self.settings.nats_servers
            log.info("NATS: %s", redact(self.servers))
        else:
            self._embedded = EmbeddedNats(self.settings.data_dir)
            url = await asyncio.to_thread(self._embedded.start)
            self.servers = [url]
            how = "started" if self._embedded.owned else "joined"
            log.info(
                "NATS: embedded nats-server %s at %s (JetStream store in %s)",
                how,
                redact(url),
                self.settings.data_dir / "nats",
            )
        self._loop_task = asyncio.create_task(self._consume(), name="nats-bridge")
        self._poll_task = asyncio.create_task(self._poll_consumer(), name="nats-consumer-info")

    async def stop(self) -> None:
        """Stop fetching, let the batches in hand commit and be acked, then disconnect."""
        self._stopping.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
        if self._loop_task is not None:
            # The loop notices within one fetch timeout, unless it waits for a free inbox or for
            # room in the agent's channel: then there is nothing in hand to finish.
            _, pending = await asyncio.wait([self._loop_task], timeout=3 * _FETCH_WAIT_S)
            for task in pending:
                task.cancel()
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=_STOP_GRACE_S)
            if pending:
                log.warning(
                    "%d batches not committed at shutdown; JetStream redelivers them", len(pending)
                )
                for task in pending:
                    task.cancel()
        if self._nc is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.drain()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        log.info("NATS bridge stopped")

    async def _consume(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            self._answered = False
            try:
                nc = await self._connected()
                self._rebind.clear()
                await self._fetch_until_rebind(nc)
            except Refused as exc:
                self._refuse(str(exc))
                backoff.reset()
                await self._sleep(_REFUSED_RETRY_S)
            except _BIND_ERRORS as exc:
                # PullRefused: the consumer was deleted or changed under the service;
                # TimeoutError: a pull request got no answer at all (no such stream or
                # consumer on an older server, or a server gone quiet). Binding again checks
                # and creates both.
                if self._stopping.is_set():
                    break
                if self._answered:
                    backoff.reset()
                delay = backoff.next()
                log.warning(
                    "NATS consumer unavailable, binding again in %.1f s: %s", delay, _describe(exc)
                )
                await self._sleep(delay)

    async def _fetch_until_rebind(self, nc: Client) -> None:
        settings = self.settings
        inboxes = [
            Inbox(nc, settings.nats_stream, settings.nats_durable) for _ in range(FETCHES_IN_FLIGHT)
        ]
        self._inboxes = inboxes
        free: asyncio.Queue[Inbox] = asyncio.Queue()
        try:
            for inbox in inboxes:
                await inbox.open()
                free.put_nowait(inbox)
            log.info(
                "subscribed: stream %s, consumer %s, subjects %s",
                settings.nats_stream,
                settings.nats_durable,
                settings.nats_subject,
            )
            while not self._stopping.is_set() and not self._rebind.is_set():
                # An inbox is free again once the acks of its last batch are sent: at most
                # FETCHES_IN_FLIGHT batches are in the agent or waiting for their commit.
                inbox = await free.get()
                messages = await inbox.fetch(settings.batch_size, _FETCH_WAIT_S)
                self._answered = True
                if not messages:
                    free.put_nowait(inbox)
                    continue
                envelope = Envelope([msg.data for msg in messages], self._sources(messages))
                await self._send_to_agent(envelope)
                task = asyncio.create_task(self._ack_when_settled(nc, messages, envelope))
                task.add_done_callback(functools.partial(_put_back, free, inbox))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        finally:
            handed_back = 0
            for inbox in inboxes:
                handed_back += await inbox.close()
            if handed_back:
                log.info("%d messages received but not started handed back to NATS", handed_back)

    async def _ack_when_settled(self, nc: Client, messages: list[Msg], envelope: Envelope) -> None:
        # A batch held up by the database keeps its messages: tell JetStream we are still on
        # them, rather than let ack_wait expire and have them redelivered meanwhile.
        keep_alive = self.settings.nats_ack_wait_s / 2
        while True:
            try:
                outcomes = await asyncio.wait_for(asyncio.shield(envelope.settled), keep_alive)
                break
            except TimeoutError:
                with contextlib.suppress(*_NATS_ERRORS):
                    await reply_all(nc, [(msg, PROGRESS) for msg in messages])
        # The whole fetch in one write (bridge/acks.py), each message acked or nakked by
        # itself, and only now that its outcome is committed. An ack that cannot be sent is
        # not lost work: the message comes back, and its uid is already in the log.
        replies = [
            (msg, _NAK if outcome is Outcome.FAILED else ACK)
            for msg, outcome in zip(messages, outcomes, strict=True)
        ]
        with contextlib.suppress(*_NATS_ERRORS):
            await reply_all(nc, replies)

    async def _connected(self) -> Client:
        """The connection, opened if need be, with the stream and the consumer in place."""
        if self._nc is None or self._nc.is_closed:
            assert self.servers
            nc = BridgeClient()
            await nc.connect(
                servers=self.servers,
                # In the order given: the operator says which server to try first, and every
                # start and reconnect tries them the same way, which the log can then tell.
                dont_randomize=True,
                name="orders-service",
                max_reconnect_attempts=-1,
                # nats-py annotates an int but waits any number of seconds (asyncio.sleep).
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                ping_interval=_PING_INTERVAL_S,
                max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
                connect_timeout=5,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                error_cb=self._on_error,
            )
            self._nc = nc
            self.metrics.nats_connected.set(1)
            log.info("connected to NATS at %s", _url_of(self._nc))
        js = self._nc.jetstream()
        settings = self.settings
        info = await ensure_stream(
            js, settings.nats_stream, [settings.nats_subject], settings.nats_replicas
        )
        check = check_stream(info.config, settings)
        self._warn(check.warnings)
        if check.refusals:
            raise Refused(
                f"stream {settings.nats_stream} can lose orders: {'; '.join(check.refusals)}"
                f" (or set ORDERS_NATS_STREAM to another name)"
            )
        await ensure_consumer(js, settings)
        if self.problem is not None:
            log.info(
                "NATS: stream %s and consumer %s accepted now",
                settings.nats_stream,
                settings.nats_durable,
            )
            self.problem = None
        return self._nc

    def _refuse(self, reason: str) -> None:
        """Not consuming, for ``reason``: said once, however often the check is repeated."""
        if reason != self.problem:
            log.error(
                "NATS: not consuming, checking again every %.0f s: %s",
                _REFUSED_RETRY_S,
                reason,
                extra={"reason": reason},
            )
            self.problem = reason
        else:
            log.debug("NATS: still refused: %s", reason)

    def _warn(self, warnings: tuple[str, ...]) -> None:
        """Each warning about the stream once, not again at every bind while it holds."""
        for warning in warnings:
            if warning not in self._warned:
                log.warning("stream %s: %s", self.settings.nats_stream, warning)
        self._warned = frozenset(warnings)

    def _sources(self, messages: list[Msg]) -> Callable[[int], str]:
        """Names each message by its stream sequence, parsed only for the few that are
        dead-lettered (a source keeps a redelivered reject from being kept twice)."""
        prefix = f"nats:{self.settings.nats_stream}:"

        def source(index: int) -> str:
            return f"{prefix}{messages[index].metadata.sequence.stream}"

        return source

    async def _poll_consumer(self) -> None:
        """Keep the consumer's backlog gauges fresh; once per interval, never per message."""
        while not self._stopping.is_set():
            await self._sleep(_POLL_CONSUMER_S)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            try:
                info = await nc.jetstream().consumer_info(
                    self.settings.nats_stream, self.settings.nats_durable
                )
            except _NATS_ERRORS:
                continue
            self.metrics.consumer_pending.set(info.num_pending or 0)
            self.metrics.consumer_ack_pending.set(info.num_ack_pending or 0)
            self.metrics.consumer_redelivered.set(info.num_redelivered or 0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _on_disconnected(self) -> None:
        self.metrics.nats_connected.set(0)
        if not self._stopping.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_connected.set(1)
        self.metrics.nats_reconnects.inc()
        log.info("reconnected to NATS at %s; binding the consumer again", _url_of(self._nc))
        self._errors.over("NATS: no more errors after %d", self._errors.failures)
        self._rebind.set()
        # A fetch waiting on a request sent before the reconnect would wait its full time
        # and end as "JetStream did not answer": the server may have forgotten it.
        for inbox in self._inboxes:
            inbox.forget_requests()

    async def _on_error(self, exc: Exception) -> None:
        problem = _describe(exc)
        self._errors.failed(problem, "NATS: %s", problem)


def _put_back(free: asyncio.Queue[Inbox], inbox: Inbox, _: asyncio.Task[None]) -> None:
    free.put_nowait(inbox)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _url_of(nc: Client | None) -> str:
    url = nc.connected_url if nc is not None else None
    return redact(url.geturl()) if url is not None else "?"
