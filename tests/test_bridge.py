"""Orders through NATS JetStream into the running service, with the faults a deployment meets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from bridge.embedded_nats import EmbeddedNats
from publisher.messages import Message
from streams.config import redact
from tests.database import DatabaseSwitch, InspectedStore
from tests.flow import event_uids, logged, wait_for_orders
from tests.harness import Route, free_port
from tests.orders import new_uid, order_bytes, order_dict, orders
from tests.worker import Worker, eventually, view_size


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


async def test_the_bridge_fails_over_along_a_seed_list(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    """ORDERS_NATS_URL takes the NATS seed list: with its first server down (a closed port,
    with credentials), the bridge consumes from the next one, and the log never shows the
    password."""
    env = route.env(database_url)
    env["ORDERS_NATS_URL"] = f"nats://orders:Zq7s3cret@127.0.0.1:{free_port()},{route.nats_url}"
    uid = new_uid()
    with Worker(tmp_path, **env) as worker:
        await worker.wait_ready()
        await route.send([Message(order_bytes(uid), "order", uid)])
        await wait_for_orders(worker, 1)
        status, _, _ = await worker.get(f"/orders/{uid}")
        assert status == 200
        log = worker.log()
        assert "Connection refused" in log, "the first server was tried first"
        assert f"connected to NATS at {redact(route.nats_url)}" in log
        assert "Zq7s3cret" not in log
        password = urlsplit(route.nats_url).password
        assert password is None or password not in log, "no password of the list is logged"


async def test_same_uid_published_twice_is_one_event_and_the_first_wins(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
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
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
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
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
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


async def test_nats_restart_mid_run_resumes_consumption(
    tmp_path: Path, database_url: str, own_nats: EmbeddedNats, store: InspectedStore
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
    database_switch: DatabaseSwitch,
    route: Route,
    store: InspectedStore,
) -> None:
    """While PostgreSQL refuses the service, nothing is acked to NATS; afterwards all is stored."""
    before, during = orders(100, seed=21), orders(300, seed=22)
    with Worker(tmp_path, **route.env(database_url)) as worker:
        await worker.wait_ready()
        await route.send(before)
        await wait_for_orders(worker, 100)
        database_switch.refuse()
        await route.send(during)
        await asyncio.sleep(3)
        floor, pending = await route.ack_floor_and_pending()
        assert floor == 100, "no message after the outage began was acked"
        assert pending > 0
        database_switch.allow()
        await wait_for_orders(worker, 400)

        async def all_acked() -> bool:
            return await route.ack_floor_and_pending() == (400, 0)

        await eventually(all_acked, "every message acked")
        assert "database unavailable; " in worker.log()
        assert "kept unacknowledged and retried" in worker.log()
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == 400


async def test_sigterm_mid_run_commits_and_acks_the_batches_in_hand(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
) -> None:
    """A graceful stop in the middle of a run: fetching stops, what was fetched is committed
    and acked, so nothing is left pending on the consumer; a restart takes the rest."""
    batch = orders(5_000, seed=61)
    worker = Worker(tmp_path, **route.env(database_url))
    with worker:
        await worker.wait_ready()
        sending = asyncio.create_task(route.send(batch))

        async def under_way() -> bool:
            return await view_size(worker) >= 500

        await eventually(under_way, "500 orders consumed")
        assert worker.stop() == 0
        await sending
        _, pending = await route.ack_floor_and_pending()
        assert pending == 0, "every message handed to the stopped worker was acked"
        assert "NATS bridge stopped" in worker.log()
        assert "not committed at shutdown" not in worker.log()
        with worker.start():
            await wait_for_orders(worker, len(batch))
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == len(batch)
