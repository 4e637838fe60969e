"""JetStream objects the service did not create: a durable consumer or a stream that someone
else made, with settings under which orders would be skipped or lost. The service refuses them
clearly (it does not consume, and /readyz says why) instead of binding and saying it is ready."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    ReplayPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

import bridge.nats_bridge
from bridge.jetstream import DUPLICATE_WINDOW_S, check_stream, ensure_stream, stream_config
from bridge.nats_bridge import NatsBridge
from publisher.stream import ensure_stream as publisher_stream
from streams.config import Settings
from streams.envelope import Envelope, Outcome
from streams.metrics import Metrics
from tests.database import InspectedStore
from tests.flow import event_uids, wait_for_orders
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker, eventually


async def refusal(worker: Worker) -> dict[str, object]:
    """The body of /readyz once it answers 503 because the service refuses a NATS object."""
    body: dict[str, object] = {}

    async def refused() -> bool:
        nonlocal body
        status, raw, _ = await worker.get("/readyz")
        body = orjson.loads(raw) if raw else {}
        return status == 503 and body.get("status") == "refused"

    await eventually(refused, "/readyz 503 refused", timeout=60, context=worker.log_tail)
    return body


async def foreign_consumer(
    client: Client, route: Route, count: int, seed: int, **config: object
) -> Settings:
    """The service's stream holding ``count`` orders, and a durable consumer of the service's
    name made with ``config`` by someone else; the settings of a worker on ``route``."""
    settings = route_settings(route)
    js = client.jetstream()
    await ensure_stream(js, settings.nats_stream, [settings.nats_subject])
    await route.send(orders(count, seed=seed))
    await js.add_consumer(
        settings.nats_stream,
        ConsumerConfig(
            durable_name=settings.nats_durable,
            filter_subject=settings.nats_subject,
            **config,  # type: ignore[arg-type]
        ),
    )
    return settings


async def test_a_consumer_with_another_deliver_policy_keeps_the_worker_unready(
    tmp_path: Path, database_url: str, route: Route, client: Client, store: InspectedStore
) -> None:
    """Promise: every published order reaches the log. A durable consumer of the service's
    name that delivers only new messages would skip the backlog, and cannot be changed in
    place: the worker does not consume from it, /readyz answers 503 with what differs and what
    to do, and once the operator deletes it the worker creates its own and takes everything."""
    await foreign_consumer(client, route, 3, seed=31, deliver_policy=DeliverPolicy.NEW)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_alive()
        body = await refusal(worker)
        reason = str(body["problem"])
        assert "deliver policy" in reason
        assert f"nats consumer rm {route.stream} {route.durable}" in reason
        assert "ORDERS_NATS_DURABLE" in reason
        assert await event_uids(store) == []
        await client.jetstream().delete_consumer(route.stream, route.durable)
        await wait_for_orders(worker, 3)
        assert worker.log().count("deliver policy") == 1, "logged once, not at every retry"


async def test_a_memory_stream_that_drops_old_messages_is_refused(
    tmp_path: Path, database_url: str, route: Route, client: Client, store: InspectedStore
) -> None:
    """Promise: every published order reaches the log. A stream kept in memory, limited to
    three messages with the oldest discarded, had already lost two of five orders: the worker
    says so on /readyz (503) and does not create its consumer on it, rather than serve as if
    nothing were missing."""
    js = client.jetstream()
    await js.add_stream(
        StreamConfig(
            name=route.stream,
            subjects=[f"t{route.name}.>"],
            storage=StorageType.MEMORY,
            max_msgs=3,
        )
    )
    await route.send(orders(5, seed=32))
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_alive()
        reason = str((await refusal(worker))["problem"])
        assert "memory storage" in reason
        assert "max_msgs 3" in reason
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(route.stream, route.durable)
    assert await event_uids(store) == []


def route_settings(route: Route, **changes: object) -> Settings:
    """The NATS settings a worker on ``route`` has (tests.worker.worker_env)."""
    return dataclasses.replace(
        Settings(),
        nats_url=route.nats_url,
        nats_stream=route.stream,
        nats_subject=f"t{route.name}.>",
        nats_durable=route.durable,
        **changes,  # type: ignore[arg-type]
    )


class Received:
    """The agent's side of a bridge: takes every message as stored at once."""

    def __init__(self) -> None:
        self.raws: list[bytes] = []

    async def submit(self, envelope: Envelope) -> None:
        self.raws.extend(envelope.raws)
        envelope.settle([Outcome.STORED] * len(envelope.raws))

    async def wait_for(self, count: int) -> None:
        async def all_there() -> bool:
            return len(self.raws) == count

        await eventually(all_there, f"{count} messages received")


@asynccontextmanager
async def running(settings: Settings, received: Received) -> AsyncIterator[NatsBridge]:
    nats_bridge = NatsBridge(settings, received.submit, Metrics())
    await nats_bridge.start()
    try:
        yield nats_bridge
    finally:
        await nats_bridge.stop()


async def problem_of(nats_bridge: NatsBridge) -> str:
    async def refused() -> bool:
        return nats_bridge.problem is not None

    await eventually(refused, "the bridge refuses", timeout=60)
    assert nats_bridge.problem is not None
    return nats_bridge.problem


@pytest.mark.parametrize(
    ("foreign", "fragment"),
    [
        ({"deliver_policy": DeliverPolicy.NEW}, "deliver policy new, where the service needs all"),
        ({"deliver_policy": DeliverPolicy.LAST}, "deliver policy last"),
        ({"ack_policy": AckPolicy.NONE}, "ack policy none, where the service needs explicit"),
        ({"ack_policy": AckPolicy.ALL}, "ack policy all"),
        ({"replay_policy": ReplayPolicy.ORIGINAL}, "replay policy original"),
        ({"deliver_subject": "elsewhere.push"}, "it is a push consumer"),
    ],
)
async def test_a_consumer_that_cannot_be_changed_in_place_is_refused(
    route: Route,
    client: Client,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    foreign: dict[str, object],
    fragment: str,
) -> None:
    """Promise: every published order reaches the log, acked only after its commit. A durable
    consumer of the service's name with settings the server cannot change in place is not
    consumed from: the reason names what differs and what to do, it is logged once however
    often the bridge looks again, nothing is fetched or acked, and once the operator deletes
    it the bridge makes its own and takes every message."""
    monkeypatch.setattr(bridge.nats_bridge, "_REFUSED_RETRY_S", 0.05)
    settings = await foreign_consumer(client, route, 3, seed=41, **foreign)
    js = client.jetstream()
    received = Received()
    caplog.set_level(logging.DEBUG, logger="bridge.nats_bridge")
    async with running(settings, received) as nats_bridge:
        reason = await problem_of(nats_bridge)
        assert fragment in reason
        assert f"nats consumer rm {settings.nats_stream} {settings.nats_durable}" in reason

        async def looked_again() -> bool:
            return sum("still refused" in r.getMessage() for r in caplog.records) >= 3

        await eventually(looked_again, "the bridge checks again")
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage().count(fragment) for r in errors] == [1], "logged once"
        assert received.raws == []
        info = await js.consumer_info(settings.nats_stream, settings.nats_durable)
        assert info.delivered is not None and info.delivered.consumer_seq == 0, "none fetched"

        await js.delete_consumer(settings.nats_stream, settings.nats_durable)

        await received.wait_for(3)
        assert nats_bridge.problem is None
        assert any("accepted now" in r.getMessage() for r in caplog.records)


async def test_consumer_settings_that_can_change_in_place_are_updated(
    route: Route, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Promise: a message is never dropped after some redeliveries, nor redelivered while
    its batch commits. A durable consumer with a short ack wait, a small max_ack_pending and
    a redelivery limit is updated to the service's settings, which is said once, and
    consumed from."""
    settings = await foreign_consumer(
        client, route, 2, seed=42, ack_wait=5, max_ack_pending=7, max_deliver=3
    )
    js = client.jetstream()
    received = Received()
    async with running(settings, received) as nats_bridge:
        await received.wait_for(2)
        assert nats_bridge.problem is None
    config = (await js.consumer_info(settings.nats_stream, settings.nats_durable)).config
    assert (config.ack_wait, config.max_ack_pending, config.max_deliver) == (
        settings.nats_ack_wait_s,
        settings.nats_max_ack_pending,
        -1,
    )
    (updated,) = [r.getMessage() for r in caplog.records if "updated" in r.getMessage()]
    assert "ack wait 5 s -> 30 s" in updated and "max deliver 3 -> unlimited" in updated


# What a stream made elsewhere may differ in, and how the service judges it: refused when
# orders can be lost before the service has them, warned when merely unusual.
STREAMS: list[tuple[dict[str, object], str, str]] = [
    ({"storage": StorageType.MEMORY}, "refused", "memory storage"),
    ({"max_msgs": 3}, "refused", "max_msgs 3 with discard old"),
    ({"max_bytes": 1 << 20}, "refused", "max_bytes 1048576 with discard old"),
    ({"max_msgs": 3, "discard": DiscardPolicy.NEW}, "warned", "max_msgs 3 with discard new"),
    ({"max_msgs_per_subject": 3}, "refused", "max_msgs_per_subject 3"),
    (
        {"max_msgs_per_subject": 3, "discard": DiscardPolicy.NEW},
        "refused",
        "max_msgs_per_subject 3",
    ),
    (
        {"max_msgs_per_subject": 3, "discard": DiscardPolicy.NEW, "discard_new_per_subject": True},
        "warned",
        "max_msgs_per_subject 3 with discard new per subject",
    ),
    ({"max_age": 3600.0}, "refused", "max_age 3600 s"),
    ({"max_age": 3600.0, "discard": DiscardPolicy.NEW}, "refused", "max_age 3600 s"),
    ({"subjects": ["{other}.>"]}, "refused", "do not cover ORDERS_NATS_SUBJECT"),
    ({"retention": RetentionPolicy.INTEREST}, "warned", "interest retention"),
    ({"duplicate_window": 1.0}, "warned", "duplicate window 1 s"),
    ({"retention": RetentionPolicy.WORK_QUEUE}, "accepted", ""),
]


@pytest.mark.parametrize(("changes", "verdict", "fragment"), STREAMS)
async def test_a_stream_made_elsewhere_is_judged_by_what_it_can_lose(
    route: Route,
    client: Client,
    changes: dict[str, object],
    verdict: str,
    fragment: str,
) -> None:
    """Promise: every published order reaches the log. The settings of an existing stream
    under which the server deletes orders the service has not consumed are refused; those
    that only make publishers see errors, or are unusual, are warnings."""
    settings = route_settings(route)
    js = client.jetstream()
    made = stream_config(settings.nats_stream, [settings.nats_subject])
    if "subjects" in changes:  # the test's own, as a server may be shared by several runs
        changes = {**changes, "subjects": [f"other{route.name}.>"]}
    await js.add_stream(dataclasses.replace(made, **changes))  # type: ignore[arg-type]
    check = check_stream((await js.stream_info(settings.nats_stream)).config, settings)
    found = {"refused": check.refusals, "warned": check.warnings}
    if verdict == "accepted":
        assert check.refusals == check.warnings == ()
    else:
        assert any(fragment in text for text in found[verdict]), found
        other = "warned" if verdict == "refused" else "refused"
        assert found[other] == ()


async def test_a_stream_with_fewer_replicas_than_configured_is_a_warning(
    route: Route, client: Client
) -> None:
    """Promise: the operator learns when the stream is less durable than asked for; an R1
    stream under ORDERS_NATS_REPLICAS=3 is used, with a warning that says how to raise it."""
    settings = route_settings(route, nats_replicas=3)
    js = client.jetstream()
    await js.add_stream(stream_config(settings.nats_stream, [settings.nats_subject]))
    check = check_stream((await js.stream_info(settings.nats_stream)).config, settings)
    assert check.refusals == ()
    (warning,) = check.warnings
    assert "1 replica(s), fewer than ORDERS_NATS_REPLICAS=3" in warning
    assert f"nats stream edit {settings.nats_stream} --replicas 3" in warning


async def test_replicas_the_server_cannot_give_are_a_refusal_not_a_loop(
    route: Route, client: Client
) -> None:
    """Promise: a setting the server cannot honour is said clearly. ORDERS_NATS_REPLICAS=3
    reaches the stream the bridge creates; a single server refuses it, and the bridge reports
    why rather than retrying in silence."""
    settings = route_settings(route, nats_replicas=3)
    async with running(settings, Received()) as nats_bridge:
        reason = await problem_of(nats_bridge)
    assert f"refuses to create stream {settings.nats_stream}" in reason
    assert "ORDERS_NATS_REPLICAS=3 needs a JetStream cluster" in reason
    with pytest.raises(nats.js.errors.NotFoundError):
        await client.jetstream().stream_info(settings.nats_stream)


@pytest.mark.parametrize("maker", ["tests", "publisher"])
async def test_the_streams_the_tests_and_the_publisher_make_are_the_services(
    route: Route, client: Client, maker: str
) -> None:
    """Promise: the tests run on the stream production runs on, and a stream the publisher
    creates first is one the service accepts: both are the service's definition, with
    nothing to refuse or warn about. (The server's default duplicate window is the service's
    120 s, so streams made without one were alike so far; this keeps them so.)"""
    settings = route_settings(route)
    js = client.jetstream()
    if maker == "tests":
        await route.send([])
    else:
        assert (
            await publisher_stream(js, route.stream, route.subject, settings.nats_subject) is None
        )
    config = (await js.stream_info(route.stream)).config
    assert (config.duplicate_window, config.storage) == (DUPLICATE_WINDOW_S, StorageType.FILE)
    assert config.subjects == [settings.nats_subject]
    check = check_stream(config, settings)
    assert check.refusals == check.warnings == ()
