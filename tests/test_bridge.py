"""Orders through NATS JetStream into the running service, with the faults a deployment meets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import nats
import orjson
import psycopg2
import pytest
from nats.js import JetStreamContext

from bridge.embedded_nats import EmbeddedNats
from publisher.generate import OrderFactory
from publisher.messages import Message
from publisher.publish import publish
from streams.store import PostgresEventStore
from tests.orders import new_uid, order_bytes, order_dict
from tests.worker import Worker, eventually, free_port, view_size, worker_env


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
            js = nc.jetstream()
            await self._ensure_stream(js)
            messages = [
                item if isinstance(item, Message) else Message(item, "invalid") for item in payloads
            ]
            await publish(js, self.subject, messages)
        finally:
            await nc.close()

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(name=self.stream, subjects=[f"t{self.name}.>"])

    async def ack_floor_and_pending(self) -> tuple[int, int]:
        nc = await nats.connect(self.nats_url)
        try:
            info = await nc.jetstream().consumer_info(self.stream, self.durable)
            assert info.ack_floor is not None and info.num_ack_pending is not None
            return info.ack_floor.stream_seq or 0, info.num_ack_pending
        finally:
            await nc.close()


@pytest.fixture
def route(nats_url: str) -> Route:
    return Route(nats_url)


async def wait_for_orders(worker: Worker, count: int) -> None:
    """Until the worker's view holds ``count`` orders."""

    async def holds_all() -> bool:
        return await view_size(worker) == count

    await eventually(holds_all, f"{count} orders in the view\n{worker.log()}")


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


async def test_published_order_is_served_byte_for_byte(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    uid = new_uid()
    raw = order_bytes(uid)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send([Message(raw, "order", uid)])
        await wait_for_orders(worker, 1)
        status, body, content_type = await worker.get(f"/orders/{uid}")
        assert (status, content_type, body) == (200, "application/json", raw)
        assert worker.stop() == 0
        with worker.start():
            await wait_for_orders(worker, 1)
            status, body, _ = await worker.get(f"/orders/{uid}")
            assert status == 200 and orjson.loads(body) == orjson.loads(raw)


async def test_same_uid_published_twice_is_one_event_and_the_first_wins(
    tmp_path: Path, database_url: str, route: Route, store: PostgresEventStore
) -> None:
    uid = new_uid()
    first, changed = order_bytes(uid, locale="en"), order_bytes(uid, locale="ru")
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send([Message(first, "order", uid), first, changed])
        await wait_for_orders(worker, 1)
        conflict = "1 duplicate(s) with a payload different from the stored one, first kept"
        await eventually(logged(worker, conflict), "the conflict logged")
        status, body, _ = await worker.get(f"/orders/{uid}")
        assert (status, body) == (200, first)
    assert await event_uids(store) == [uid]
    floor, pending = await route.ack_floor_and_pending()
    assert (floor, pending) == (3, 0), "duplicates are acked too: nothing is left to redeliver"


async def test_malformed_messages_are_dead_lettered_and_the_rest_stored(
    tmp_path: Path, database_url: str, route: Route, store: PostgresEventStore
) -> None:
    good = orders(4, seed=1)
    malformed = [
        b"not json",
        b"[1, 2, 3]",
        orjson.dumps({"track_number": "x"}),
        orjson.dumps({**order_dict(), "order_uid": ""}),
        order_bytes(new_uid(), sm_id="99"),
        b'{"order_uid": "\xff\xfe"}',
        b"x" * (1024 * 1024 - 200),  # just under NATS's default 1 MiB payload limit
    ]
    mixed: list[bytes | Message] = []
    for index, message in enumerate(good):
        mixed += [message, *malformed[index * 2 : index * 2 + 2]]
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(mixed)
        await wait_for_orders(worker, len(good))

        async def all_dead_lettered() -> bool:
            count = await store.fetch("SELECT count(*) FROM orders_dead_letters")
            return count[0][0] == len(malformed)

        await eventually(all_dead_lettered, "every malformed message dead-lettered")
    rows = await store.fetch("SELECT raw, reason, source FROM orders_dead_letters")
    assert sorted(await event_uids(store)) == sorted(str(message.uid) for message in good)
    letters = {bytes(raw): str(reason) for raw, reason, _ in rows}  # type: ignore[call-overload]
    assert set(letters) == set(malformed), "every malformed message is kept as received"
    assert letters[b"not json"].startswith("not valid JSON")
    assert letters[b"[1, 2, 3]"] == "order: expected object, got array"
    assert "sm_id: expected integer, got string" in letters[malformed[4]]
    assert "not valid UTF-8" in letters[malformed[5]]
    assert all(str(source).startswith(f"nats:{route.stream}:") for _, _, source in rows)


async def test_sigkill_mid_run_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, database_url: str, route: Route, store: PostgresEventStore
) -> None:
    """10,000 orders; the worker is SIGKILLed while consuming them and started again."""
    batch = orders(10_000, seed=7)
    worker = Worker(tmp_path, **route.env(database_url))
    with worker:
        await worker.wait_ready()
        sending = asyncio.create_task(route.send(batch))

        async def well_under_way() -> bool:
            return await view_size(worker) >= 1_500

        await eventually(well_under_way, "1,500 orders consumed")
        worker.kill()
        await sending
        with worker.start():
            await wait_for_orders(worker, len(batch))
            for message in batch[::997]:
                status, body, _ = await worker.get(f"/orders/{message.uid}")
                assert status == 200
                assert orjson.loads(body) == orjson.loads(message.data)
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == len(batch)
    assert set(stored) == {message.uid for message in batch}


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A NATS server of the test's own, to be stopped and started again on the same port."""
    server = EmbeddedNats(tmp_path / "own-nats", port=free_port())
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_nats_restart_mid_run_resumes_consumption(
    tmp_path: Path, database_url: str, own_nats: EmbeddedNats, store: PostgresEventStore
) -> None:
    assert own_nats.url is not None
    route = Route(own_nats.url)
    first, second = orders(2_000, seed=11), orders(2_000, seed=12)
    with Worker(tmp_path / "worker", **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(first)
        await asyncio.to_thread(own_nats.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_nats.start)  # same port, same JetStream store
        await route.send(second)
        await wait_for_orders(worker, 4_000)
        assert "reconnected to NATS" in worker.log()
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == 4_000


async def test_database_outage_holds_acks_until_the_orders_are_committed(
    tmp_path: Path,
    database_url: str,
    postgres_server_url: str,
    route: Route,
    store: PostgresEventStore,
) -> None:
    """While PostgreSQL refuses the service, nothing is acked to NATS; afterwards all is stored."""
    name = urlsplit(database_url).path.lstrip("/")
    admin = psycopg2.connect(postgres_server_url)
    admin.autocommit = True
    before, during = orders(100, seed=21), orders(300, seed=22)
    try:
        with Worker(tmp_path, **route.env(database_url)) as worker:
            await worker.wait_ready()
            await route.send(before)
            await wait_for_orders(worker, 100)
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
            await route.send(during)
            await asyncio.sleep(3)
            floor, pending = await route.ack_floor_and_pending()
            assert floor == 100, "no message after the outage began was acked"
            assert pending > 0
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await wait_for_orders(worker, 400)

            async def all_acked() -> bool:
                return await route.ack_floor_and_pending() == (400, 0)

            await eventually(all_acked, "every message acked")
            assert "database unavailable, batch of" in worker.log()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == 400
