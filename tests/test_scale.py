"""Several workers on one durable consumer: exactly once in the log, every order in every view."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

import orjson

from tests.database import InspectedStore
from tests.flow import event_uids, wait_for_orders
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker, eventually, view_size

ORDERS = 20_000


async def test_three_workers_share_the_stream_and_each_serves_every_order(
    tmp_path: Path, database_url: str, route: Route, store: InspectedStore
) -> None:
    """20,000 orders over three workers on one durable consumer; one of them SIGKILLed
    mid-run and started again. Each order is once in the log and served by every worker."""
    batch = orders(ORDERS, seed=41)
    workers = [Worker(tmp_path / f"w{index}", **route.env(database_url)) for index in range(3)]
    with ExitStack() as running:
        for worker in workers:
            running.enter_context(worker)
        for worker in workers:
            await worker.wait_ready()
        sending = asyncio.create_task(route.send(batch))

        async def under_way() -> bool:
            return await view_size(workers[0]) >= ORDERS // 5

        await eventually(under_way, "a fifth of the orders consumed")
        workers[1].kill()
        await sending
        workers[1].start()
        for worker in workers:
            await wait_for_orders(worker, ORDERS)
        for message in batch[::1999]:
            for worker in workers:
                status, body, _ = await worker.get(f"/orders/{message.uid}")
                assert status == 200, worker.base
                assert orjson.loads(body) == orjson.loads(message.data)
        consumed = [
            "batch committed" in w.log() or "batches in the last" in w.log() for w in workers
        ]
        assert sum(consumed) >= 2, "the durable consumer spread the messages over the workers"
    stored = await event_uids(store)
    assert len(stored) == len(set(stored)) == ORDERS


async def test_read_only_workers_follow_the_log_before_and_after_the_run(
    tmp_path: Path, database_url: str, route: Route
) -> None:
    batch = orders(2_000, seed=43)
    writer = Worker(tmp_path / "writer", **route.env(database_url))
    early = Worker(tmp_path / "early", **route.env(database_url), ORDERS_CONSUME="false")
    late = Worker(tmp_path / "late", **route.env(database_url), ORDERS_CONSUME="false")
    with writer, early:
        await writer.wait_ready()
        await early.wait_ready()
        await route.send(batch)
        await wait_for_orders(writer, len(batch))
        await wait_for_orders(early, len(batch))
        assert "consumption off (ORDERS_CONSUME=false)" in early.log()
        assert "batch committed" not in early.log() and "batches in the last" not in early.log()
        with late:
            await wait_for_orders(late, len(batch))
            status, body, _ = await late.get(f"/orders/{batch[-1].uid}")
            assert status == 200 and orjson.loads(body) == orjson.loads(batch[-1].data)
        more = orders(500, seed=44)
        await route.send(more)
        await wait_for_orders(early, len(batch) + len(more))
