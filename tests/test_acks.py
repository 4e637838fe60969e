"""Acks written a fetch at a time (bridge/acks.py): the bytes JetStream receives, and promise 1
("a message is acked only after its event, or its rejection, is committed") at the instants
where a batched write could break it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Iterable

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

import bridge.nats_bridge
from bridge.acks import ACK, PROGRESS, nak, reply_all
from bridge.nats_bridge import NatsBridge
from streams.agent import BatchProcessor
from streams.config import Settings
from streams.envelope import Envelope, Outcome
from streams.follower import ViewFollower
from streams.metrics import Metrics
from tests.database import InspectedStore
from tests.flow import event_uids
from tests.harness import Route
from tests.orders import orders
from tests.worker import eventually
from views.view import OrdersView

# JetStream redelivers what is not acked within this time: short, so that a test sees it.
ACK_WAIT_S = 2.0


def bridge_settings(route: Route, nats_url: str, batch_size: int = 1000) -> Settings:
    return dataclasses.replace(
        Settings(),
        nats_url=nats_url,
        nats_stream=route.stream,
        nats_subject=route.subjects,
        nats_durable=route.durable,
        nats_ack_wait_s=ACK_WAIT_S,
        batch_size=batch_size,
    )


async def test_one_write_carries_what_msg_ack_nak_and_in_progress_publish(
    client: Client,
) -> None:
    """Each message's reply subject gets the payload nats-py's own Msg methods would send."""
    inbox = client.new_inbox()
    received: list[tuple[str, bytes]] = []
    subscription = await client.subscribe(f"{inbox}.>", cb=_into(received))
    ours = [Msg(client, subject="s", reply=f"{inbox}.ours.{n}") for n in range(3)]
    theirs = [Msg(client, subject="s", reply=f"{inbox}.theirs.{n}") for n in range(3)]
    await reply_all(client, [(ours[0], ACK), (ours[1], nak(2.0)), (ours[2], PROGRESS)])
    await theirs[0].ack()
    await theirs[1].nak(delay=2.0)
    await theirs[2].in_progress()
    # A message without a reply subject is left out, not sent as a malformed frame.
    await reply_all(client, [(Msg(client, subject="s", reply=""), ACK)])
    await client.flush()

    async def all_arrived() -> bool:
        return len(received) >= 6

    await eventually(all_arrived, "six replies")
    await subscription.unsubscribe()
    sent = {subject.split(".", 2)[2]: data for subject, data in received}
    assert [sent[f"ours.{n}"] for n in range(3)] == [sent[f"theirs.{n}"] for n in range(3)]
    assert len(received) == 6
    assert client.is_connected


async def test_a_closed_connection_refuses_the_write_as_publish_does(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    msg = Msg(nc, subject="s", reply="r.1")
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await reply_all(nc, [(msg, ACK)])


async def test_a_worker_gone_between_commit_and_ack_write_leaves_every_message_pending(
    nats_url: str, route: Route, store: InspectedStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst instant of a batched ack: every order of the fetch is committed, and the
    worker goes before its ack frames are written. JetStream must hold every message unacked
    (ack floor 0) and redeliver them; the next worker stores none twice and acks them all."""
    published = orders(50, seed=71)
    await route.send(published)
    settings = bridge_settings(route, nats_url)
    written: list[list[tuple[Msg, bytes]]] = []

    async def gone_before_the_write(nc: Client, replies: Iterable[tuple[Msg, bytes]]) -> None:
        written.append(list(replies))  # built after the commit, never sent

    monkeypatch.setattr(bridge.nats_bridge, "reply_all", gone_before_the_write)
    first = _bridge(settings, store)
    await first.start()
    try:
        await eventually(_settled(written, 50), "the fetch settled")
        assert sorted(await event_uids(store)) == sorted(str(m.uid) for m in published)
        assert [payload for _, payload in written[0]] == [ACK] * 50
        assert await route.ack_floor_and_pending() == (0, 50), "nothing acked"
    finally:
        await first.stop()
    monkeypatch.undo()

    second = _bridge(settings, store)
    await second.start()
    try:

        async def all_acked() -> bool:
            return await route.ack_floor_and_pending() == (50, 0)

        await eventually(all_acked, "every redelivered message acked", timeout=30)
    finally:
        await second.stop()
    uids = await event_uids(store)
    assert sorted(uids) == sorted(str(m.uid) for m in published), "each order once"


async def test_a_failed_fetch_is_nakked_and_redelivered_while_a_later_one_is_acked(
    nats_url: str, route: Route
) -> None:
    """Two fetches settle together: the first FAILED (its commit did not happen), the second
    committed. The second's acks must not ack the first: the floor stays below it, its
    messages stay pending and come back, and only their later commit acks them."""
    await route.send([b"m%d" % n for n in range(10)])
    settings = bridge_settings(route, nats_url, batch_size=5)
    deliveries: list[list[bytes]] = []
    first_fetch: list[Envelope] = []
    release = asyncio.Event()

    async def agent(envelope: Envelope) -> None:
        deliveries.append(list(envelope.raws))
        if len(deliveries) == 1:
            first_fetch.append(envelope)
            return
        if len(deliveries) == 2:
            # The second fetch commits after the first failed: both settle at one moment.
            first_fetch[0].fail()
            envelope.settle([Outcome.STORED] * len(envelope.raws))
            release.set()
            return
        envelope.settle([Outcome.STORED] * len(envelope.raws))

    under_test = NatsBridge(settings, agent, Metrics())
    await under_test.start()
    try:
        await asyncio.wait_for(release.wait(), 30)

        async def second_acked() -> bool:
            return (await route.ack_floor_and_pending())[1] == 5

        await eventually(second_acked, "the second fetch acked")
        floor, _ = await route.ack_floor_and_pending()
        assert floor == 0, "the nakked messages below the acked ones are not acked"

        async def all_acked() -> bool:
            return await route.ack_floor_and_pending() == (10, 0)

        await eventually(all_acked, "the redelivered messages acked", timeout=30)
    finally:
        await under_test.stop()
    assert deliveries[0] == [b"m%d" % n for n in range(5)]
    assert deliveries[1] == [b"m%d" % n for n in range(5, 10)]
    redelivered = [raw for batch in deliveries[2:] for raw in batch]
    assert sorted(redelivered) == deliveries[0], "the failed fetch came back, and only it"


def _bridge(settings: Settings, store: InspectedStore) -> NatsBridge:
    """The bridge feeding the service's own agent, without Faust's channel in between."""
    processor = BatchProcessor(store, ViewFollower(OrdersView(), store, page_size=100))

    async def send_to_agent(envelope: Envelope) -> None:
        await processor.start_commit([envelope])

    return NatsBridge(settings, send_to_agent, Metrics())


def _settled(written: list[list[tuple[Msg, bytes]]], count: int) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return sum(len(replies) for replies in written) >= count

    return done


def _into(received: list[tuple[str, bytes]]) -> Callable[[Msg], Awaitable[None]]:
    async def on_message(msg: Msg) -> None:
        received.append((msg.subject, msg.data))

    return on_message
