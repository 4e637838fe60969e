"""Pipelined publishing to JetStream: many messages in flight, every PubAck awaited.

JetStream answers a message published with a reply subject with its PubAck, so publishing is
a core NATS publish with a reply subject of this run's own inbox (``<inbox>.<index>``), and
the PubAcks land in one callback subscription. nats-py's ``publish_async`` does the same with a
future, a random token and a lock per message: about 40 µs of the publisher's CPU a message
against 10 µs here, and the publisher shares its machine with the service in a benchmark.
"""

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import Header, StatusCode

from publisher.messages import Message

# nats-py's default for publish_async; more in flight only adds memory on one connection.
MAX_IN_FLIGHT = 4000


@dataclass
class PublishStats:
    """Counts of acknowledged messages, by kind, and how long publishing took."""

    published: int = 0
    duplicates: int = 0
    invalid: int = 0
    # Messages JetStream acknowledged but did not store because their Nats-Msg-Id was
    # already in the stream's duplicate window (typically a rerun with the same --seed).
    dropped_by_jetstream: int = 0
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.published / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self, subject: str) -> str:
        return (
            f"published {self.published} orders"
            f" ({self.duplicates} duplicates, {self.invalid} invalid)"
            f" to {subject} in {self.elapsed:.2f} s ({self.rate:.0f}/s)"
        )


class PublishError(Exception):
    """Publishing stopped; ``stats`` counts what JetStream had acknowledged by then."""

    def __init__(self, message: str, stats: PublishStats) -> None:
        super().__init__(message)
        self.stats = stats


async def publish(
    nc: Client,
    subject: str,
    messages: Iterable[Message],
    *,
    rate: float | None = None,
    on_ack: Callable[[Message], None] | None = None,
    on_send: Callable[[Message], None] | None = None,
    ack_timeout: float = 10.0,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> PublishStats:
    """Publish ``messages`` to ``subject`` and wait until JetStream has acknowledged all of them.

    Up to ``max_in_flight`` messages are out without their PubAck at any time. ``rate`` caps
    the messages per second (``None``: as fast as the server acknowledges). ``on_send`` is
    called just before each message goes out; ``on_ack`` for each acknowledged message, in
    acknowledgement order.

    Raises ``PublishError`` when JetStream rejects a message, when no acknowledgement
    arrives for ``ack_timeout`` seconds, or when the connection fails.
    """
    in_flight = _InFlight(nc.new_inbox(), on_ack)
    start = time.monotonic()
    subscription = None
    try:
        subscription = await nc.subscribe(in_flight.inbox + ".*", cb=in_flight.settle)
        for index, message in enumerate(messages):
            while len(in_flight.pending) >= max_in_flight and not in_flight.failures:
                await in_flight.progress(ack_timeout)
            if in_flight.failures:
                break
            if rate is not None:
                # Each message has a fixed slot measured from the start, so a late wake-up
                # is made up by the next messages instead of accumulating into drift.
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            # Only the first publication of a uid may carry it as Nats-Msg-Id: JetStream
            # would drop a deliberate duplicate with the same id before the service saw it.
            msg_id = message.uid if message.kind == "order" else None
            in_flight.pending[index] = message
            if on_send is not None:
                on_send(message)
            await nc.publish(
                subject,
                message.data,
                reply=f"{in_flight.inbox}.{index}",
                headers={_MSG_ID: msg_id} if msg_id else None,
            )
        while in_flight.pending and not in_flight.failures:
            await in_flight.progress(ack_timeout)
    except TimeoutError:
        raise in_flight.abandon(
            f"no acknowledgement from JetStream for {ack_timeout:g} s"
            f" with {len(in_flight.pending)} messages in flight"
        ) from None
    except nats.errors.Error as error:
        raise in_flight.abandon(f"publishing failed: {error}") from error
    finally:
        in_flight.stats.elapsed = time.monotonic() - start
        if subscription is not None and not nc.is_closed:
            await subscription.unsubscribe()

    if in_flight.failures:
        first = describe_failure(in_flight.failures[0], subject)
        raise PublishError(
            f"{len(in_flight.failures)} messages rejected, first: {first}", in_flight.stats
        )
    return in_flight.stats


def describe_failure(error: BaseException, subject: str) -> str:
    """One line saying why JetStream refused a message."""
    if isinstance(error, nats.js.errors.NoStreamResponseError):
        return f"no JetStream stream stores subject {subject!r}"
    if isinstance(error, nats.js.errors.APIError) and error.description:
        return f"JetStream error {error.err_code}: {error.description}"
    return str(error) or type(error).__name__


class _InFlight:
    """The published messages still waiting for their PubAck, and the tally of settled ones."""

    def __init__(self, inbox: str, on_ack: Callable[[Message], None] | None) -> None:
        self.inbox = inbox
        self.pending: dict[int, Message] = {}
        self.failures: list[BaseException] = []
        self.stats = PublishStats()
        self._on_ack = on_ack
        self._index_from = len(inbox) + 1
        self._settled = asyncio.Event()

    async def settle(self, reply: Msg) -> None:
        """Count one PubAck, or the error JetStream answered instead."""
        message = self.pending.pop(int(reply.subject[self._index_from :]), None)
        if message is None:
            return  # the answer to a message given up on
        self._settled.set()
        error = _refusal(reply)
        if error is not None:
            self.failures.append(error)
            return
        stats = self.stats
        stats.published += 1
        if message.kind == "duplicate":
            stats.duplicates += 1
        elif message.kind == "invalid":
            stats.invalid += 1
        if b'"duplicate"' in reply.data and orjson.loads(reply.data).get("duplicate"):
            stats.dropped_by_jetstream += 1
        if self._on_ack is not None:
            self._on_ack(message)

    async def progress(self, idle_limit: float) -> None:
        """Wait for the next PubAck; ``TimeoutError`` when none comes within ``idle_limit``.
        The limit bounds a time without progress, so a large backlog that drains steadily is
        never cut short."""
        self._settled.clear()
        await asyncio.wait_for(self._settled.wait(), idle_limit)

    def abandon(self, reason: str) -> PublishError:
        # PubAcks that still arrive find nothing pending and are ignored.
        self.pending.clear()
        return PublishError(reason, self.stats)


def _refusal(reply: Msg) -> BaseException | None:
    if reply.headers and reply.headers.get(Header.STATUS) == StatusCode.SERVICE_UNAVAILABLE:
        return nats.js.errors.NoStreamResponseError()
    if b'"error"' not in reply.data:
        return None
    error = orjson.loads(reply.data).get("error")
    if not isinstance(error, dict):
        return None
    return nats.js.errors.APIError(
        code=error.get("code"),
        err_code=error.get("err_code"),
        description=error.get("description"),
    )


_MSG_ID = Header.MSG_ID.value
