"""The bridge's pull requests against a real JetStream consumer: what a fetch returns, and how
it ends when the server answers otherwise than with messages."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from nats.aio.client import Client

from bridge.jetstream import ensure_consumer, ensure_stream
from bridge.pull import Inbox, PullRefused
from streams.config import Settings
from tests.harness import Route

WAIT_S = 0.5


@pytest.fixture
async def settings(route: Route, client: Client) -> Settings:
    """The route's stream and durable consumer, created as the bridge creates them."""
    settings = dataclasses.replace(
        Settings(),
        nats_stream=route.stream,
        nats_subject=route.subject,
        nats_durable=route.durable,
    )
    js = client.jetstream()
    await ensure_stream(js, settings.nats_stream, [settings.nats_subject])
    await ensure_consumer(js, settings)
    return settings


async def publish(client: Client, settings: Settings, count: int, first: int = 0) -> None:
    js = client.jetstream()
    for number in range(first, first + count):
        await js.publish(settings.nats_subject, b"m%d" % number)


async def opened(client: Client, settings: Settings) -> Inbox:
    inbox = Inbox(client, settings.nats_stream, settings.nats_durable)
    await inbox.open()
    return inbox


async def test_fetch_takes_what_is_there_up_to_the_batch(
    client: Client, settings: Settings
) -> None:
    """A backlog comes in batches of the size asked for, in stream order, none twice."""
    await publish(client, settings, 25)
    inbox = await opened(client, settings)
    batches = [await inbox.fetch(10, WAIT_S) for _ in range(3)]
    assert [len(batch) for batch in batches] == [10, 10, 5]
    assert [msg.data for batch in batches for msg in batch] == [b"m%d" % n for n in range(25)]
    await inbox.close()


async def test_fetch_on_an_empty_stream_returns_nothing(client: Client, settings: Settings) -> None:
    """No messages is an empty list once the wait is over, not an error."""
    inbox = await opened(client, settings)
    assert await inbox.fetch(10, WAIT_S) == []
    assert await inbox.fetch(10, WAIT_S) == [], "the expired request left nothing behind"
    await inbox.close()


async def test_a_message_published_during_the_wait_ends_it(
    client: Client, settings: Settings
) -> None:
    """A fetch waiting on an empty stream returns the message published meanwhile, and the
    next fetch still gets the ones that followed it."""
    inbox = await opened(client, settings)
    waiting = asyncio.create_task(inbox.fetch(10, 30.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await publish(client, settings, 3)
    first = await asyncio.wait_for(waiting, 10.0)
    rest = await inbox.fetch(10, WAIT_S)
    assert [msg.data for msg in first + rest] == [b"m0", b"m1", b"m2"]
    await inbox.close()


async def test_acked_messages_are_not_fetched_again(client: Client, settings: Settings) -> None:
    """The messages are JetStream's own: acking one through its reply subject settles it."""
    await publish(client, settings, 2)
    inbox = await opened(client, settings)
    (first, second) = await inbox.fetch(10, WAIT_S)
    await first.ack()
    await second.nak()
    again = await inbox.fetch(10, WAIT_S)
    assert [msg.data for msg in again] == [b"m1"]
    assert again[0].metadata.num_delivered == 2
    await inbox.close()


async def test_a_missing_consumer_is_an_error_not_an_empty_stream(
    client: Client, settings: Settings
) -> None:
    """A pull request for a consumer the server does not have is answered 503 (nats-server
    2.10 and later) or not at all (earlier ones): either way the fetch raises instead of
    returning an empty list forever, so the bridge goes and creates the consumer."""
    inbox = Inbox(client, settings.nats_stream, "no-such-consumer")
    await inbox.open()
    with pytest.raises((PullRefused, TimeoutError), match=r"503|did not answer"):
        await inbox.fetch(10, WAIT_S)
    await inbox.close()


async def test_a_consumer_deleted_during_a_wait_is_a_conflict(
    client: Client, settings: Settings
) -> None:
    """The server ends a waiting request with 409 when its consumer goes; the fetch raises
    with the server's reason, so the bridge creates the consumer again."""
    inbox = await opened(client, settings)
    waiting = asyncio.create_task(inbox.fetch(10, 30.0))
    await asyncio.sleep(0.2)
    await client.jetstream().delete_consumer(settings.nats_stream, settings.nats_durable)
    with pytest.raises(PullRefused, match="Consumer Deleted"):
        await asyncio.wait_for(waiting, 10.0)
    await inbox.close()


async def test_messages_that_arrive_after_the_fetch_are_handed_back_on_close(
    client: Client, settings: Settings
) -> None:
    """A request forgotten by its fetch (as after a reconnect) can still deliver; close naks
    what it delivered, so another fetch gets it at once rather than after ack_wait."""
    inbox = await opened(client, settings)
    waiting = asyncio.create_task(inbox.fetch(10, 30.0))
    await asyncio.sleep(0.2)
    inbox.forget_requests()
    assert await asyncio.wait_for(waiting, 10.0) == []
    await publish(client, settings, 1)
    await asyncio.sleep(0.2)
    assert await inbox.close() == 1
    other = await opened(client, settings)
    (msg,) = await other.fetch(10, WAIT_S)
    assert (msg.data, msg.metadata.num_delivered) == (b"m0", 2)
    await other.close()
