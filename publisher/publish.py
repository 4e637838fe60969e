"""Pipelined publishing to JetStream: many messages in flight, every PubAck awaited."""

import asyncio
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import Header, PubAck
from nats.js.client import JetStreamContext

from publisher.messages import Message


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
    js: JetStreamContext,
    subject: str,
    messages: Iterable[Message],
    *,
    rate: float | None = None,
    on_ack: Callable[[Message], None] | None = None,
    ack_timeout: float = 10.0,
) -> PublishStats:
    """Publish ``messages`` to ``subject`` and wait until JetStream has acknowledged all of them.

    Messages go out through ``js.publish_async``, so they are pipelined up to the context's
    ``publish_async_max_pending`` instead of costing one round trip each. ``rate`` caps the
    messages per second (``None``: as fast as the server acknowledges). ``on_ack`` is called
    for each acknowledged message, in acknowledgement order.

    Raises ``PublishError`` when JetStream rejects a message, when no acknowledgement
    arrives for ``ack_timeout`` seconds, or when the connection fails.
    """
    in_flight = _InFlight(on_ack)
    start = time.monotonic()
    try:
        for index, message in enumerate(messages):
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
            # asyncio.timeout rather than publish_async's wait_stall: wait_stall goes through
            # asyncio.wait_for, whose extra task yields to the loop on every call, so the
            # connection would flush (one syscall) per message instead of per batch.
            async with asyncio.timeout(ack_timeout):
                future = await js.publish_async(
                    subject,
                    message.data,
                    headers={Header.MSG_ID.value: msg_id} if msg_id else None,
                )
            in_flight.track(message, future)
        await in_flight.drain(ack_timeout)
    except nats.js.errors.TooManyStalledMsgsError:
        # What the timeout above turns into when it cancels publish_async while it waits
        # for a free slot: nats-py converts the cancellation.
        raise in_flight.abandon(
            f"no acknowledgement from JetStream for {ack_timeout:g} s"
            f" with {len(in_flight.pending)} messages in flight"
        ) from None
    except TimeoutError:
        raise in_flight.abandon(
            f"{len(in_flight.pending)} messages still unacknowledged after {ack_timeout:g} s"
        ) from None
    except nats.errors.Error as error:
        raise in_flight.abandon(f"publishing failed: {error}") from error
    finally:
        in_flight.stats.elapsed = time.monotonic() - start

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

    def __init__(self, on_ack: Callable[[Message], None] | None) -> None:
        self.pending: set[asyncio.Future[PubAck]] = set()
        self.failures: list[BaseException] = []
        self.stats = PublishStats()
        self._on_ack = on_ack

    def track(self, message: Message, future: asyncio.Future[PubAck]) -> None:
        self.pending.add(future)
        future.add_done_callback(functools.partial(self._settle, message))

    def _settle(self, message: Message, future: asyncio.Future[PubAck]) -> None:
        self.pending.discard(future)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.failures.append(error)
            return
        stats = self.stats
        stats.published += 1
        if message.kind == "duplicate":
            stats.duplicates += 1
        elif message.kind == "invalid":
            stats.invalid += 1
        if future.result().duplicate:
            stats.dropped_by_jetstream += 1
        if self._on_ack is not None:
            self._on_ack(message)

    async def drain(self, idle_limit: float) -> None:
        # The limit bounds the time without any progress, not the whole wait, so a large
        # backlog that drains steadily is never cut short.
        while self.pending:
            done, _ = await asyncio.wait(set(self.pending), timeout=idle_limit)
            if not done:
                raise TimeoutError

    def abandon(self, reason: str) -> PublishError:
        # Cancelling releases the publish_async slots these futures hold; nats-py ignores
        # acks that arrive for futures already done.
        for future in list(self.pending):
            future.cancel()
        return PublishError(reason, self.stats)
