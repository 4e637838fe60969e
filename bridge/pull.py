"""Pull requests to a JetStream consumer, sent by hand to an inbox with a callback.

nats-py's ``PullSubscription.fetch`` waits for every message of a batch with a task, a
``wait_for`` and a ``uuid4()`` of its own: about 28 µs a message on this service's orders,
against 12 µs for the same pull requests answered into a callback (bench/findings.md). An
``Inbox`` is one such subscription. It asks ``$JS.API.CONSUMER.MSG.NEXT`` for a batch, collects
what arrives, and reads the status messages that end a request (JetStream's pull protocol):
404 no messages, 408 request expired, 100 an idle heartbeat; anything else (409, 503) means
the request was refused, the reason in its description.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Final

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header, StatusCode

_REPLY_GRACE_S: Final = 0.5
_ENDS_REQUEST: Final = frozenset({StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT})


class PullRefused(Exception):
    """The server ended a pull request with an error status: 409 when the consumer was
    deleted, is not one this service can pull from, or refuses the request; 503 when there is
    no such consumer (servers before 2.10 do not answer at all). The message is the status and
    the server's reason."""


class Inbox:
    """One inbox of pull requests; at most one fetch uses it at a time.

    A message can arrive after its fetch gave up on the request (the wait ran out while the
    server was slow to answer); it waits here for the next fetch, and what is still here when
    the inbox closes is handed back with a nak.
    """

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._subject = nc.new_inbox()
        self._subscription: Subscription | None = None
        self._messages: list[Msg] = []
        self._owed = 0  # messages the open request may still deliver; 0 when none is open
        self._answered = False  # the open request has heard from the server
        self._refusal: str | None = None
        self._changed: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Subscribe the inbox; requests can be sent from then on."""
        self._subscription = await self._nc.subscribe(self._subject, cb=self._on_message)

    async def close(self) -> int:
        """Unsubscribe, and nak what arrived but was never fetched so that it is delivered
        again at once rather than after ack_wait. Returns how many were handed back."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None
        left, self._messages = self._messages, []
        for msg in left:
            with contextlib.suppress(Exception):
                await msg.nak()
        return len(left)

    def forget_requests(self) -> None:
        """The server lost its open requests (a reconnect): do not wait for them."""
        self._owed = 0
        self._wake()

    async def fetch(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` messages: those available now, or else the first to arrive within
        ``wait_s``; an empty list when none did.

        Raises ``PullRefused`` on an error status and ``TimeoutError`` when the server did not
        answer a request at all (no such stream or consumer, or a connection gone quiet).
        """
        if not self._messages:
            if self._owed == 0:
                # Ask for what is there now; the server answers 404 at once when nothing is.
                await self._request(batch, no_wait=True, wait_s=wait_s)
                await self._until(lambda: self._owed == 0, wait_s + _REPLY_GRACE_S)
            if not self._messages:
                # Nothing there: wait for one message. Asking for a whole batch here would
                # leave the request open after the first one, and the messages that follow
                # would queue in this inbox while its batch is committed, instead of going
                # to the next fetch, which asks for what is there again.
                if self._owed == 0:
                    await self._request(1, no_wait=False, wait_s=wait_s)
                await self._until(lambda: self._owed == 0, wait_s)
        taken, self._messages = self._messages[:batch], self._messages[batch:]
        return taken

    async def _request(self, batch: int, *, no_wait: bool, wait_s: float) -> None:
        body: dict[str, object] = {"batch": batch}
        if no_wait:
            body["no_wait"] = True
        else:
            # Expire a little before the local wait, so the server's 408 ends the request.
            body["expires"] = int(wait_s * 1e9) - 10_000_000
        self._owed, self._answered = batch, False
        await self._nc.publish(self._next_subject, orjson.dumps(body), reply=self._subject)

    async def _until(self, done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._refusal is not None:
                reason, self._refusal = self._refusal, None
                raise PullRefused(reason)
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                answered, self._owed = self._answered, 0
                if answered:
                    return
                raise TimeoutError("JetStream did not answer a pull request")
            self._changed = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed, remaining)
            self._changed = None

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(Header.STATUS) if headers else None
        if status is None:
            self._messages.append(msg)
            self._answered = True
            if self._owed > 0:
                self._owed -= 1
                if self._owed == 0:
                    self._wake()
            return
        if status == StatusCode.CONTROL_MESSAGE:
            self._answered = True
            return
        if status == StatusCode.SERVICE_UNAVAILABLE:
            # "No responders": its description is empty (nats-py shows the next header there).
            self._refusal = "503 no responders: no such consumer, or JetStream is not running"
        elif status not in _ENDS_REQUEST:
            assert headers is not None
            reason = (headers.get(Header.DESCRIPTION) or "").strip().splitlines()
            self._refusal = f"{status} {reason[0] if reason else ''}".strip()
        self._owed = 0
        self._answered = True
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
