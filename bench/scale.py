"""Scale-out figures: read throughput with one and two worker processes, how long an
order committed by one worker takes to be served by another that only follows the log, and,
under sustained ingest with two writers and a read replica, how long until every view serves it.

    python -m bench.scale            # full sizes, 3 runs, the figures as JSON and a table
    python -m bench.scale --smoke    # tiny sizes, 1 run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
import nats

from bench import dataset
from bench.read import wrk
from bench.servers import (
    Servers,
    fresh_database,
    load_average,
    ready,
    running_worker,
    scratch_dir,
)
from bench.stats import percentile, spread
from publisher.messages import Message
from publisher.publish import publish
from tests.harness import Route
from tests.orders import orders

LUA: Final = Path(__file__).resolve().parent / "read.lua"
POLL_EVERY_S: Final = 0.001
# The bound on views under sustained ingest: at LOAD_RATE orders/s with two writers and a read
# replica, p99 of PubAck → served by every view.
LOAD_RATE: Final = 5_000
LOAD_GOAL_MS: Final = 1_000


def _wrk(cpu: str, base: str, seconds: int, connections: int, uid_file: Path) -> list[str]:
    return [
        *("taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"),
        *("--timeout", "5s", "-s", str(LUA), base + "/", "--", str(uid_file)),
    ]


async def read_scaling(servers: Servers, count: int, seconds: int) -> dict[str, Any]:
    """Requests per second with one worker (core 0, wrk on core 1), then with two workers on
    cores 0 and 1, each loaded by its own wrk on the same core as the other worker: the load
    generator takes CPU from the servers, which is what running it on the same machine costs."""
    data_dir = scratch_dir("scale-read")
    try:
        with fresh_database(servers.admin_url) as dsn:
            dataset.load_events(dsn, count)
            uid_file = data_dir / "uids.txt"
            uid_file.write_text("\n".join(dataset.uids(dsn)) + "\n")
            env = {"ORDERS_DATABASE_URL": dsn, "ORDERS_CONSUME": "false"}
            async with (
                running_worker(data_dir / "a", env, cpus="0") as first,
                running_worker(data_dir / "b", env, cpus="1") as second,
            ):
                await ready(first)
                await ready(second)
                await wrk(_wrk("1", first.base, 1, 64, uid_file))  # warm-up
                await wrk(_wrk("0", second.base, 1, 64, uid_file))
                one = await wrk(_wrk("1", first.base, seconds, 64, uid_file))
                both = await asyncio.gather(
                    wrk(_wrk("1", first.base, seconds, 32, uid_file)),
                    wrk(_wrk("0", second.base, seconds, 32, uid_file)),
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    two = sum(result["rps"] for result in both)
    return {
        "one_rps": one["rps"],
        "one_p99_ms": one["p99_ms"],
        "two_rps": two,
        "two_p99_ms": max(result["p99_ms"] for result in both),
        "errors": one["errors"] + sum(result["errors"] for result in both),
        "factor": two / one["rps"],
    }


async def follow_latency(servers: Servers, count: int, rate: int) -> dict[str, Any]:
    """Worker A consumes and commits; worker B only follows the log (ORDERS_CONSUME=false).
    For each order, the time from A serving it (A serves an order right after its commit) to
    B serving it, both polled every millisecond from the PubAck on."""
    route = Route(servers.nats_url)
    data_dir = scratch_dir("scale-follow")
    messages = orders(count, seed=71)
    lags: list[float] = []
    try:
        with fresh_database(servers.admin_url) as dsn:
            env = route.env(dsn)
            async with (
                running_worker(data_dir / "a", env) as writer,
                running_worker(data_dir / "b", {**env, "ORDERS_CONSUME": "false"}) as follower,
            ):
                await ready(writer)
                await ready(follower)
                await writer.wait_logged("subscribed:")
                lags = await _measure_views(
                    [writer.base, follower.base],
                    route,
                    messages,
                    rate,
                    sample_every=1,
                    from_first_view=True,
                    poll_s=POLL_EVERY_S,
                )
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "samples": len(lags),
        "p50_ms": 1000 * percentile(lags, 0.50),
        "p99_ms": 1000 * percentile(lags, 0.99),
        "max_ms": 1000 * max(lags),
    }


async def views_under_load(
    servers: Servers, rate: int, seconds: float, sample_every: int
) -> dict[str, Any]:
    """Two writers share the durable consumer (each commits about half the orders) and a read
    replica follows; orders are published at ``rate`` for ``seconds``. For one order in
    ``sample_every``, the time from its PubAck until all three views serve it: each writer must
    take in the other's orders while its own batches keep coming."""
    route = Route(servers.nats_url)
    data_dir = scratch_dir("scale-load")
    messages = orders(int(rate * seconds), seed=73)
    lags: list[float] = []
    try:
        with fresh_database(servers.admin_url) as dsn:
            env = route.env(dsn)
            async with (
                running_worker(data_dir / "a", env) as first,
                running_worker(data_dir / "b", env) as second,
                running_worker(data_dir / "r", {**env, "ORDERS_CONSUME": "false"}) as replica,
            ):
                for worker in (first, second, replica):
                    await ready(worker)
                await first.wait_logged("subscribed:")
                await second.wait_logged("subscribed:")
                bases = [first.base, second.base, replica.base]
                lags = await _measure_views(bases, route, messages, rate, sample_every)
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "rate": rate,
        "samples": len(lags),
        "p50_ms": 1000 * percentile(lags, 0.50),
        "p99_ms": 1000 * percentile(lags, 0.99),
        "max_ms": 1000 * max(lags),
    }


async def _measure_views(
    bases: list[str],
    route: Route,
    messages: list[Message],
    rate: int,
    sample_every: int,
    *,
    from_first_view: bool = False,
    poll_s: float = 10 * POLL_EVERY_S,
) -> list[float]:
    """Publish ``messages`` at ``rate``; for one in ``sample_every``, poll every view of
    ``bases`` from its PubAck on, and keep the time until the last view served it: counted
    from the PubAck, or with ``from_first_view`` from the moment the first of ``bases``
    served it."""
    lags: list[float] = []
    watchers: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    acked = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def served(base: str, uid: str) -> float:
            while True:
                async with http.get(f"{base}/orders/{uid}") as response:
                    await response.read()
                    if response.status == 200:
                        return time.perf_counter()
                await asyncio.sleep(poll_s)

        async def watch(uid: str, since: float) -> None:
            times = await asyncio.gather(*(served(base, uid) for base in bases))
            lags.append(max(0.0, max(times) - (times[0] if from_first_view else since)))

        def on_ack(message: Message) -> None:
            nonlocal acked
            acked += 1
            if acked % sample_every == 0:
                task = loop.create_task(watch(str(message.uid), time.perf_counter()))
                watchers.add(task)

        nc = await nats.connect(route.nats_url)
        try:
            await publish(nc, route.subject, messages, rate=rate, on_ack=on_ack)
            await asyncio.wait_for(asyncio.gather(*watchers), timeout=120)
        finally:
            await nc.close()
    return lags


async def main(smoke: bool, runs: int, output: Path) -> None:
    read_count, seconds, follow_count, follow_rate = (
        (2_000, 2, 200, 200) if smoke else (100_000, 10, 10_000, 1_000)
    )
    load_rate, load_seconds = (500, 2.0) if smoke else (LOAD_RATE, 20.0)
    results: dict[str, Any] = {"reads": [], "follow": [], "under_load": [], "load": []}
    with Servers(None, None) as servers:
        for _ in range(runs):
            results["load"].append(load_average()[0])
            results["reads"].append(await read_scaling(servers, read_count, seconds))
            results["follow"].append(await follow_latency(servers, follow_count, follow_rate))
            results["under_load"].append(
                await views_under_load(servers, load_rate, load_seconds, sample_every=50)
            )
    await asyncio.to_thread(output.write_text, json.dumps(results, indent=2))
    one = spread([run["one_rps"] for run in results["reads"]])
    two = spread([run["two_rps"] for run in results["reads"]])
    factor = spread([run["factor"] for run in results["reads"]])
    p50 = spread([run["p50_ms"] for run in results["follow"]])
    p99 = spread([run["p99_ms"] for run in results["follow"]])
    print("| figure | median (min – max) |\n|---|---|")
    print(f"| reads, 1 worker (req/s) | {one[1]:,.0f} ({one[0]:,.0f} – {one[2]:,.0f}) |")
    print(f"| reads, 2 workers (req/s) | {two[1]:,.0f} ({two[0]:,.0f} – {two[2]:,.0f}) |")
    print(f"| scaling factor | {factor[1]:.2f} ({factor[0]:.2f} – {factor[2]:.2f}) |")
    print(f"| follow latency p50 (ms) | {p50[1]:.1f} ({p50[0]:.1f} – {p50[2]:.1f}) |")
    print(f"| follow latency p99 (ms) | {p99[1]:.1f} ({p99[0]:.1f} – {p99[2]:.1f}) |")
    every = spread([run["p99_ms"] for run in results["under_load"]])
    print(
        f"| PubAck → served by 2 writers + 1 replica, p99 at {load_rate:,}/s (ms)"
        f" | {every[1]:.1f} ({every[0]:.1f} – {every[2]:.1f}); goal ≤ {LOAD_GOAL_MS:,} |"
    )
    errors = sum(run["errors"] for run in results["reads"])
    print(f"\nread errors: {errors}; load average before each run: {results['load']}")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 run")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; smoke: 1)")
    parser.add_argument("--output", type=Path, default=Path("bench/scale-results.json"))
    options = parser.parse_args()
    runs = options.runs or (1 if options.smoke else 3)
    asyncio.run(main(options.smoke, runs, options.output))


if __name__ == "__main__":
    cli()
