"""Ingest: N unique orders published as fast as JetStream takes them to a running worker, timed
from the first publish until the last order is committed and served; beside it, the ceiling of
the database write itself: the same payloads appended by a bare aiopg script in batches of
1,000, with the service's own statements (``APPEND_SQL``, then ``NOTIFY_SQL`` with the store's
``commit_notice``) in one transaction each; and the stricter ceiling of the service's own
shape, the same script with ``COMMITS_IN_FLIGHT`` transactions in flight on as many
connections.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, Final

import aiohttp
import aiopg
import nats
import orjson

from bench import dataset
from bench.context import Context
from bench.servers import (
    RoleCpu,
    fresh_database,
    load_average,
    ready,
    running_worker,
    scratch_dir,
)
from publisher.messages import Message
from publisher.publish import publish
from streams.config import COMMITS_IN_FLIGHT
from streams.store import APPEND_SQL, EVENT_TYPE, NOTIFY_CHANNEL, NOTIFY_SQL, commit_notice
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker

CEILING_BATCH: Final = 1_000
# Who the ceiling's notifications say committed (no store listens to them here).
CEILING_WRITER: Final = "ceiling"
SEED: Final = 1001
SAMPLE_EVERY: Final = 100
CORES: Final = os.cpu_count() or 1


async def ceiling(
    dsn: str, messages: list[Message], batch: int = CEILING_BATCH, in_flight: int = 1
) -> float:
    """Seconds a bare aiopg script takes to append ``messages`` as the service's store does,
    with ``in_flight`` transactions at once, each on its own connection taking the next batch
    when its last one commits: 1 is the ceiling as specified (batch after batch), 2 is the
    service's own shape (``COMMITS_IN_FLIGHT``), where the second append waits for the append
    lock inside PostgreSQL and goes on the moment the first commits."""
    conns = [
        await aiopg.connect(dsn, enable_json=False, enable_hstore=False, enable_uuid=False)
        for _ in range(in_flight)
    ]
    try:
        cursors = [await conn.cursor() for conn in conns]
        chunks = iter(range(0, len(messages), batch))
        started = time.perf_counter()
        await asyncio.gather(*(_append_chunks(cur, messages, batch, chunks) for cur in cursors))
        elapsed = time.perf_counter() - started
        for cur in cursors:
            cur.close()
    finally:
        for conn in conns:
            await conn.close()
    stored = dataset.count_events(dsn)
    if stored != len(messages):
        raise RuntimeError(f"the ceiling stored {stored} events, expected {len(messages)}")
    return elapsed


async def _append_chunks(
    cur: aiopg.Cursor, messages: list[Message], batch: int, chunks: Iterator[int]
) -> None:
    """One transaction per batch on ``cur``, for as long as ``chunks`` (shared by the
    connections of one ceiling) hands out the start of another batch."""
    for first in chunks:
        chunk = messages[first : first + batch]
        uids = [message.uid for message in chunk]
        texts = [message.data.decode() for message in chunk]
        await cur.execute("BEGIN")
        await cur.execute(APPEND_SQL, (EVENT_TYPE, uids, texts))
        rows = await cur.fetchall()
        notice = commit_notice(max(row[0] for row in rows), CEILING_WRITER)
        await cur.execute(NOTIFY_SQL, (NOTIFY_CHANNEL, notice))
        await cur.execute("COMMIT")


async def _view_holds(worker: Worker, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(worker.base + "/readyz") as response:
                body = await response.json()
            if body.get("orders") == count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{body.get('orders')} of {count} orders in the view after {timeout} s\n"
                    + worker.log_tail()
                )
            worker.check_alive()
            await asyncio.sleep(0.02)


async def service(ctx: Context, dsn: str, messages: list[Message], index: int) -> dict[str, Any]:
    """Publish every message to a ready worker; time until all are committed and served."""
    route = Route(ctx.servers.nats_url)
    data_dir = scratch_dir("ingest")
    try:
        env = {**route.env(dsn), **ctx.worker_env}
        async with running_worker(data_dir, env) as worker:
            await ready(worker)
            await worker.wait_logged("subscribed:")
            nc = await nats.connect(route.nats_url)
            try:
                ctx.profiler.start(worker.pid, f"ingest-{index}")
                # The bench process is the publisher (and the /readyz poll) for the window.
                cpu = RoleCpu({"worker": [worker.pid], **ctx.servers.server_pids()})
                started = time.perf_counter()
                publishing = asyncio.create_task(publish(nc, route.subject, messages))
                await _view_holds(worker, len(messages), timeout=600.0)
                last = messages[-1]
                status, body = await _get(worker.base + f"/orders/{last.uid}")
                elapsed = time.perf_counter() - started
                cpu_seconds = cpu.seconds()
                ctx.profiler.stop()
                stats = await publishing
            finally:
                await nc.close()
            if status != 200 or orjson.loads(body) != orjson.loads(last.data):
                raise RuntimeError(f"the last order is not served: {status} {body[:200]!r}")
            metrics = await worker.metrics()
            as_published = await _served_as_published(worker, messages[::SAMPLE_EVERY])
        stored = dataset.count_events(dsn)
        if stored != len(messages):
            raise RuntimeError(f"the worker stored {stored} events, expected {len(messages)}")
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    batches = metrics.get("orders_batches_committed_total", 0.0)
    # What the rest of the machine needs per order: with the worker's CPU taken as nothing,
    # the rate at which the others alone would keep every core busy.
    not_worker = sum(seconds for role, seconds in cpu_seconds.items() if role != "worker")
    return {
        "cpu_seconds": cpu_seconds,
        # cpu_us_worker, cpu_us_postgres, cpu_us_nats, cpu_us_bench, cpu_us_other
        **{
            f"cpu_us_{role.split('-')[0]}": 1e6 * seconds / len(messages)
            for role, seconds in cpu_seconds.items()
        },
        "bound_without_worker": len(messages) * CORES / not_worker if not_worker else None,
        "seconds": elapsed,
        "orders_per_s": len(messages) / elapsed,
        "publish_seconds": stats.elapsed,
        "publish_per_s": stats.rate,
        "as_published": as_published,
        "batches": batches,
        "mean_batch": metrics.get("orders_batch_size_sum", 0.0) / batches if batches else 0.0,
        "mean_batch_ms": 1000 * metrics.get("orders_batch_commit_seconds_sum", 0.0) / batches
        if batches
        else 0.0,
    }


async def drain(ctx: Context, dsn: str, messages: list[Message]) -> dict[str, Any]:
    """For the analysis: the same orders published first, with no worker running, then a worker
    started on them; timed from its /readyz 200 until every order is in its view. What the
    worker can consume when it does not share the machine with the publisher."""
    route = Route(ctx.servers.nats_url)
    data_dir = scratch_dir("drain")
    try:
        await route.send(messages)
        env = {**route.env(dsn), **ctx.worker_env}
        async with running_worker(data_dir, env) as worker:
            await ready(worker)
            await _view_holds(worker, len(messages), timeout=600.0)
            elapsed = time.perf_counter() - worker.ready_at
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"drain_seconds": elapsed, "drain_orders_per_s": len(messages) / elapsed}


async def _served_as_published(worker: Worker, sample: list[Message]) -> float:
    """The share of ``sample`` served byte for byte as published (the rest is served as
    PostgreSQL's jsonb text: the view read it back from the log instead of projecting it)."""
    same = 0
    async with aiohttp.ClientSession() as http:
        for message in sample:
            async with http.get(f"{worker.base}/orders/{message.uid}") as response:
                body = await response.read()
            if response.status != 200 or orjson.loads(body) != orjson.loads(message.data):
                raise RuntimeError(f"order {message.uid} is not served: {response.status}")
            same += body == message.data
    return same / len(sample)


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.read()


async def run(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.ingest_orders
    ctx.say(f"ingest: generating {count} orders")
    messages = orders(count, seed=SEED)
    mean_bytes = sum(len(message.data) for message in messages) / count
    runs = []
    for index in range(ctx.runs):
        load_before = load_average()
        meter = ctx.servers.cpu_meter()
        # The service between its two ceilings, so that a change of the machine's pace
        # during a run weighs on both ratios alike.
        with fresh_database(ctx.servers.admin_url) as dsn:
            ceiling_s = await ceiling(dsn, messages)
        ctx.say(f"ingest run {index + 1}: ceiling {count / ceiling_s:,.0f} orders/s")
        with fresh_database(ctx.servers.admin_url) as dsn:
            measured = await service(ctx, dsn, messages, index + 1)
        with fresh_database(ctx.servers.admin_url) as dsn:
            in_flight_s = await ceiling(dsn, messages, in_flight=COMMITS_IN_FLIGHT)
        with fresh_database(ctx.servers.admin_url) as dsn:
            drained = await drain(ctx, dsn, messages)
        ctx.say(
            f"ingest run {index + 1}: service {measured['orders_per_s']:,.0f} orders/s"
            f" (publish rate {measured['publish_per_s']:,.0f}/s);"
            f" ceiling with {COMMITS_IN_FLIGHT} transactions in flight"
            f" {count / in_flight_s:,.0f} orders/s;"
            f" draining a published backlog {drained['drain_orders_per_s']:,.0f} orders/s"
        )
        runs.append(
            {
                **measured,
                **drained,
                "ceiling_seconds": ceiling_s,
                "ceiling_orders_per_s": count / ceiling_s,
                "ratio": measured["orders_per_s"] / (count / ceiling_s),
                "ceiling_in_flight_seconds": in_flight_s,
                "ceiling_in_flight_orders_per_s": count / in_flight_s,
                "ratio_in_flight": measured["orders_per_s"] / (count / in_flight_s),
                "bound_ratio_in_flight": (
                    measured["bound_without_worker"] / (count / in_flight_s)
                    if measured["bound_without_worker"]
                    else None
                ),
                "load_before": load_before,
                "load_after": load_average(),
                "foreign_cpu": meter.foreign_share(),
            }
        )
    return {
        "ingest": {
            "params": {
                "orders": count,
                "mean_payload_bytes": round(mean_bytes),
                "ceiling_batch": CEILING_BATCH,
                "ceiling_in_flight": COMMITS_IN_FLIGHT,
                "cores": CORES,
            },
            "runs": runs,
        }
    }
