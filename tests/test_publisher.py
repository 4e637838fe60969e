"""The publisher against real JetStream: every message acknowledged, the window of messages in
flight kept, and each way JetStream can refuse said clearly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import nats.js.errors
import pytest
from nats.aio.client import Client

from bridge.jetstream import ensure_stream
from publisher.messages import Message
from publisher.publish import PublishError, publish
from tests.harness import Route, free_port
from tests.orders import new_uid, order_bytes


@pytest.fixture
async def stream(route: Route, client: Client) -> Route:
    await ensure_stream(client.jetstream(), route.stream, [route.subject])
    return route


def fresh_orders(count: int) -> list[Message]:
    messages = []
    for _ in range(count):
        uid = new_uid()
        messages.append(Message(order_bytes(uid), "order", uid))
    return messages


async def stored(client: Client, route: Route) -> int:
    info = await client.jetstream().stream_info(route.stream)
    return info.state.messages


async def test_every_message_is_acknowledged_and_stored(client: Client, stream: Route) -> None:
    """What publish counts as published is what the stream holds, and each message was
    acknowledged once."""
    messages = fresh_orders(300)
    acked: list[str | None] = []
    stats = await publish(
        client, stream.subject, messages, on_ack=lambda message: acked.append(message.uid)
    )
    assert (stats.published, stats.dropped_by_jetstream) == (300, 0)
    assert sorted(acked, key=str) == sorted((m.uid for m in messages), key=str)
    assert await stored(client, stream) == 300


async def test_a_rerun_of_the_same_orders_is_dropped_by_jetstream(
    client: Client, stream: Route
) -> None:
    """The first publication of a uid carries it as Nats-Msg-Id: publishing the same orders
    again within the duplicate window stores nothing, and the publisher says how many."""
    messages = fresh_orders(20)
    await publish(client, stream.subject, messages)
    again = await publish(client, stream.subject, messages)
    assert (again.published, again.dropped_by_jetstream) == (20, 20)
    assert await stored(client, stream) == 20


async def test_no_more_than_the_window_is_in_flight(client: Client, stream: Route) -> None:
    """The next message goes out only when fewer than max_in_flight wait for their PubAck."""
    sent = acked = most = 0

    def on_send(_: Message) -> None:
        nonlocal sent, most
        sent += 1
        most = max(most, sent - acked)

    def on_ack(_: Message) -> None:
        nonlocal acked
        acked += 1

    await publish(
        client, stream.subject, fresh_orders(200), on_send=on_send, on_ack=on_ack, max_in_flight=7
    )
    assert acked == 200
    assert 1 < most <= 7


async def test_a_subject_no_stream_stores_is_a_clear_error(client: Client, route: Route) -> None:
    """NATS answers 'no responders' when no stream captures the subject."""
    with pytest.raises(PublishError, match="no JetStream stream stores subject") as raised:
        await publish(client, f"{route.subject}.nowhere", fresh_orders(3))
    assert raised.value.stats.published == 0


async def test_silence_is_a_timeout_not_a_hang(client: Client, route: Route) -> None:
    """A subject something listens on but never answers (not a stream): publish gives up
    after ack_timeout without progress and says how many are unacknowledged."""
    await client.subscribe(route.subject, cb=_ignore)
    silence = r"no acknowledgement from JetStream for 0\.3 s with 5 messages in flight"
    with pytest.raises(PublishError, match=silence):
        await publish(client, route.subject, fresh_orders(5), ack_timeout=0.3)


async def run_publisher(
    url: str, route: Route, count: int, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m publisher --count N --url URL` on the route's subject and stream."""
    command = [sys.executable, "-m", "publisher", "--count", str(count), "--url", url]
    command += ["--subject", route.subject, "--stream", route.stream]
    return await asyncio.to_thread(
        subprocess.run,
        command,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_the_command_publishes_and_prints_every_uid(
    nats_url: str, client: Client, route: Route
) -> None:
    """`python -m publisher` creates the stream, publishes, and prints one uid per order."""
    result = await run_publisher(nats_url, route, 25)
    assert result.returncode == 0, result.stderr
    uids = result.stdout.split()
    assert len(set(uids)) == 25
    assert "published 25 orders" in result.stderr
    assert await stored(client, route) == 25


async def test_the_command_creates_the_stream_with_the_services_replicas(
    nats_url: str, client: Client, route: Route
) -> None:
    """Promise 4 (no lossy stream): a stream the publisher creates is the one the service
    would create, replicas included (ORDERS_NATS_REPLICAS). A single server cannot hold three
    replicas: the command says so instead of creating an unreplicated stream."""
    refused = await run_publisher(nats_url, route, 1, {"ORDERS_NATS_REPLICAS": "3"})
    assert refused.returncode != 0
    assert "replicas" in refused.stderr.lower(), refused.stderr
    with pytest.raises(nats.js.errors.NotFoundError):
        await client.jetstream().stream_info(route.stream)
    bad = await run_publisher(nats_url, route, 1, {"ORDERS_NATS_REPLICAS": "three"})
    assert bad.returncode == 2 and "ORDERS_NATS_REPLICAS" in bad.stderr, bad.stderr
    made = await run_publisher(nats_url, route, 1, {"ORDERS_NATS_REPLICAS": "1"})
    assert made.returncode == 0, made.stderr
    info = await client.jetstream().stream_info(route.stream)
    assert info.config.num_replicas == 1


async def test_the_command_fails_over_along_a_seed_list(
    nats_url: str, client: Client, route: Route
) -> None:
    """`--url` takes the NATS seed list: with the first server down (a closed port), the
    command connects to the next one and publishes."""
    result = await run_publisher(f"nats://127.0.0.1:{free_port()},{nats_url}", route, 3)
    assert result.returncode == 0, result.stderr
    assert await stored(client, route) == 3


async def _ignore(_: object) -> None:
    return None
