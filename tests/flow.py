"""Getting orders to a running worker through NATS, and waiting for what it does with them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable

import nats
import orjson

from bridge.jetstream import ensure_stream
from publisher.generate import OrderFactory
from publisher.messages import Message
from publisher.publish import publish
from streams.store import PostgresEventStore
from tests.worker import Worker, eventually, view_size, worker_env


class Route:
    """One test's stream, consumer and subject, and a JetStream client to publish on it."""

    def __init__(self, nats_url: str) -> None:
        self.name = uuid.uuid4().hex[:10]
        self.nats_url = nats_url
        self.subject = f"t{self.name}.new"
        self.stream = f"T{self.name}"
        self.durable = f"w{self.name}"

    def env(self, database_url: str) -> dict[str, str]:
        return worker_env(database_url, self.nats_url, self.name)

    async def send(self, payloads: Iterable[bytes | Message]) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            # The service's own definition, so the tests run on the stream production runs on.
            await ensure_stream(nc.jetstream(), self.stream, [f"t{self.name}.>"])
            messages = [
                item if isinstance(item, Message) else Message(item, "invalid") for item in payloads
            ]
            await publish(nc, self.subject, messages)
        finally:
            await nc.close()

    async def ack_floor_and_pending(self) -> tuple[int, int]:
        nc = await nats.connect(self.nats_url)
        try:
            info = await nc.jetstream().consumer_info(self.stream, self.durable)
            assert info.ack_floor is not None and info.num_ack_pending is not None
            return info.ack_floor.stream_seq or 0, info.num_ack_pending
        finally:
            await nc.close()


async def wait_for_orders(worker: Worker, count: int) -> None:
    """Until the worker's view holds ``count`` orders."""

    async def holds_all() -> bool:
        return await view_size(worker) == count

    await eventually(holds_all, f"{count} orders in the view", context=worker.log_tail)


def logged(worker: Worker, text: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return text in worker.log()

    return check


async def event_uids(store: PostgresEventStore) -> list[str]:
    return [str(uid) for (uid,) in await store.fetch("SELECT order_uid FROM orders_events")]


def orders(count: int, seed: int) -> list[Message]:
    factory = OrderFactory(seed=seed)
    made = [factory.order() for _ in range(count)]
    return [Message(orjson.dumps(order), "order", str(order["order_uid"])) for order in made]
