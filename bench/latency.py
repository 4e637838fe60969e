"""Ingest latency: orders published at a fixed rate to a running worker; for every n-th order,
the time from its publish until GET /orders/{uid} answers 200, polled every ~1 ms from the
moment its PubAck arrives."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from typing import Any, Final

import aiohttp
import nats
from nats.js.client import JetStreamContext

from bench.context import Context
from bench.servers import (
    fresh_database,
    load_average,
    ready,
    running_worker,
    scratch_dir,
)
from bench.stats import percentile
from publisher.messages import Message
from publisher.publish import publish
from tests.harness import Route
from tests.orders import orders
from tests.worker import Worker

SEED: Final = 2002
POLL_EVERY_S: Final = 0.001
VISIBLE_WITHIN_S: Final = 60.0
BACKLOG_EVERY_S: Final = 0.1


async def measure(
    worker: Worker, route: Route, messages: list[Message], rate: int, every: int
) -> dict[str, Any]:
    sampled = {str(message.uid) for message in messages[::every]}
    sent: dict[str, float] = {}
    acked: list[float] = []
    visible: list[float] = []
    polls = 0
    watchers: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def watch(uid: str) -> None:
            nonlocal polls
            url = f"{worker.base}/orders/{uid}"
            deadline = time.perf_counter() + VISIBLE_WITHIN_S
            while True:
                polls += 1
                async with http.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        visible.append(time.perf_counter() - sent[uid])
                        return
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"order {uid} not served within {VISIBLE_WITHIN_S} s")
                await asyncio.sleep(POLL_EVERY_S)

        def on_send(message: Message) -> None:
            # Just before the publish: the start of the order's latency.
            uid = str(message.uid)
            if uid in sampled:
                sent[uid] = time.perf_counter()

        def on_ack(message: Message) -> None:
            uid = str(message.uid)
            if uid in sampled:
                acked.append(time.perf_counter() - sent[uid])
                task = loop.create_task(watch(uid))
                watchers.add(task)

        nc = await nats.connect(route.nats_url)
        backlog: list[tuple[int, int]] = []
        done = asyncio.Event()
        sampling = asyncio.create_task(_sample_backlog(nc.jetstream(), route, backlog, done))
        try:
            stats = await publish(
                nc, route.subject, messages, rate=rate, on_send=on_send, on_ack=on_ack
            )
            await asyncio.wait_for(asyncio.gather(*watchers), VISIBLE_WITHIN_S + 10)
        finally:
            # An event rather than cancel(): nats-py's request can swallow a cancellation, and
            # the sampler would then run on for ever.
            done.set()
            await asyncio.wait_for(asyncio.gather(sampling, return_exceptions=True), 15)
            await asyncio.wait_for(nc.close(), 15)
    metrics = await worker.metrics()
    batches = metrics.get("orders_batches_committed_total", 0.0)
    undelivered = [pending for pending, _ in backlog] or [0]
    unacked = [ack_pending for _, ack_pending in backlog] or [0]
    return {
        "samples": len(visible),
        "publish_per_s": stats.rate,
        "publish_seconds": stats.elapsed,
        "p50_ms": 1000 * percentile(visible, 0.50),
        "p90_ms": 1000 * percentile(visible, 0.90),
        "p99_ms": 1000 * percentile(visible, 0.99),
        "max_ms": 1000 * max(visible),
        "ack_p50_ms": 1000 * percentile(acked, 0.50),
        "ack_p99_ms": 1000 * percentile(acked, 0.99),
        "polls": polls,
        "polls_per_s": polls / stats.elapsed if stats.elapsed else 0.0,
        "mean_batch": metrics.get("orders_batch_size_sum", 0.0) / batches if batches else 0.0,
        "mean_batch_ms": 1000 * metrics.get("orders_batch_commit_seconds_sum", 0.0) / batches
        if batches
        else 0.0,
        "undelivered_mean": sum(undelivered) / len(undelivered),
        "undelivered_max": max(undelivered),
        "unacked_mean": sum(unacked) / len(unacked),
        "unacked_max": max(unacked),
    }


async def _sample_backlog(
    js: JetStreamContext, route: Route, into: list[tuple[int, int]], done: asyncio.Event
) -> None:
    """Every 100 ms until ``done``, the consumer's messages not yet delivered and delivered
    but not acked."""
    while not done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), BACKLOG_EVERY_S)
            return
        info = await js.consumer_info(route.stream, route.durable, timeout=5)
        into.append((info.num_pending or 0, info.num_ack_pending or 0))


async def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    count = sizes.latency_rate * sizes.latency_seconds
    ctx.say(f"latency: generating {count} orders")
    messages = orders(count, seed=SEED)
    runs = []
    for index in range(ctx.runs):
        load_before = load_average()
        meter = ctx.servers.cpu_meter()
        route = Route(ctx.servers.nats_url)
        data_dir = scratch_dir("latency")
        try:
            with fresh_database(ctx.servers.admin_url) as dsn:
                env = {**route.env(dsn), **ctx.worker_env}
                async with running_worker(data_dir, env) as worker:
                    await ready(worker)
                    await worker.wait_logged("subscribed:")
                    ctx.profiler.start(worker.pid, f"latency-{index + 1}")
                    try:
                        measured = await measure(
                            worker, route, messages, sizes.latency_rate, sizes.latency_every
                        )
                    finally:
                        ctx.profiler.stop()
        finally:
            await route.delete()
            shutil.rmtree(data_dir, ignore_errors=True)
        ctx.say(
            f"latency run {index + 1}: p50 {measured['p50_ms']:.1f} ms,"
            f" p99 {measured['p99_ms']:.1f} ms over {measured['samples']} samples"
        )
        runs.append(
            {
                **measured,
                "load_before": load_before,
                "load_after": load_average(),
                "foreign_cpu": meter.foreign_share(),
            }
        )
    return {
        "latency": {
            "params": {
                "rate": sizes.latency_rate,
                "seconds": sizes.latency_seconds,
                "orders": count,
                "sample_every": sizes.latency_every,
                "poll_every_ms": POLL_EVERY_S * 1000,
            },
            "runs": runs,
        }
    }
