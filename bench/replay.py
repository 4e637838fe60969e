"""Boot replay and memory: events loaded straight into ``orders_events`` with SQL, then a worker
timed from process start until /readyz answers 200, beside a bare aiopg script that reads the
same rows in keyset pages of the service's size (with the store's own ``READ_SQL`` statement).
Each run starts cold (the snapshot pages dropped: the view from the log alone), waits for the
pages that worker writes, then times a second worker, which starts from them.
Memory: the worker's RSS with every order in the view minus its RSS on an empty database,
beside the total size of the payloads as text."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from typing import Any, Final

import aiopg

from bench import dataset
from bench.context import Context
from bench.servers import (
    fresh_database,
    load_average,
    ready,
    running_worker,
    scratch_dir,
)
from streams.config import Settings
from streams.store import READ_SQL
from tests.harness import Route

PAGE_SIZE: Final = Settings().replay_page_size
SETTLE_S: Final = 2.0
_RESTORED: Final = re.compile(r"view restored: (\d+) orders from orders_events in ([\d.]+) s")


async def ceiling(dsn: str, page_size: int = PAGE_SIZE, *, keep: bool = False) -> tuple[float, int]:
    """Seconds a bare aiopg loop takes to read every event in keyset pages, and the count.

    With ``keep`` it also holds every order in a dict (uid -> payload bytes), as the view
    does: what keeping a million orders in memory costs on top of reading them.
    """
    kept: dict[str, bytes] = {}
    conn = await aiopg.connect(dsn, enable_json=False, enable_hstore=False, enable_uuid=False)
    try:
        cur = await conn.cursor()
        started = time.perf_counter()
        last, rows = 0, 0
        while True:
            await cur.execute(READ_SQL, (last, page_size))
            page = await cur.fetchall()
            if not page:
                break
            rows += len(page)
            last = page[-1][0]
            if keep:
                kept.update({uid: text.encode() for _, uid, text in page})
            if len(page) < page_size:
                break
        elapsed = time.perf_counter() - started
        cur.close()
    finally:
        await conn.close()
    return elapsed, rows


async def boot(
    ctx: Context, dsn: str, name: str, expected: int, *, pages: int = 0
) -> dict[str, Any]:
    """Start a worker on ``dsn``, wait until it is ready (and has written ``pages`` snapshot
    pages), let it settle and measure it."""
    route = Route(ctx.servers.nats_url)
    data_dir = scratch_dir(name)
    env = {**route.env(dsn), **ctx.worker_env}
    try:
        async with running_worker(data_dir, env) as worker:
            if expected:
                ctx.profiler.start(worker.pid, name)
            try:
                readyz = await ready(worker, timeout=600.0)
            finally:
                ctx.profiler.stop()
            if readyz["orders"] != expected:
                raise RuntimeError(f"the view holds {readyz['orders']} orders, not {expected}")
            if pages:
                await dataset.wait_for_pages(dsn, pages, timeout_s=600.0)
            await asyncio.sleep(SETTLE_S)
            restored = _RESTORED.search(worker.log())
            status = worker.memory()
            measured = {
                "ready_s": worker.ready_at - worker.started_at,
                "web_up_s": worker.answered_at - worker.started_at,
                "restore_s": float(restored[2]) if restored else float("nan"),
                "rss": status["VmRSS"],
                "rss_peak": status["VmHWM"],
            }
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    return measured


async def run(ctx: Context) -> dict[str, Any]:
    count = ctx.sizes.replay_events
    pages = count // Settings().snapshot_page_orders
    replay_runs: list[dict[str, Any]] = []
    memory_runs: list[dict[str, Any]] = []
    with (
        fresh_database(ctx.servers.admin_url) as full,
        fresh_database(ctx.servers.admin_url) as empty,
    ):
        ctx.say(f"replay: loading {count} events with SQL")
        load_s, payload_bytes = dataset.load_events(full, count, salt="replay")
        ctx.say(f"replay: loaded in {load_s:.1f} s, payloads {payload_bytes / 2**20:.1f} MiB")
        for index in range(ctx.runs):
            load_before = load_average()
            meter = ctx.servers.cpu_meter()
            ceiling_s, rows = await ceiling(full)
            if rows != count:
                raise RuntimeError(f"the ceiling read {rows} rows, not {count}")
            keeping_s, _ = await ceiling(full, keep=True)
            await asyncio.to_thread(dataset.drop_pages, full)
            loaded = await boot(ctx, full, f"replay-{index + 1}", count, pages=pages)
            warm = await boot(ctx, full, f"pages-{index + 1}", count)
            bare = await boot(ctx, empty, f"empty-{index + 1}", 0)
            ctx.say(
                f"replay run {index + 1}: ready in {loaded['ready_s']:.2f} s"
                f" (restore {loaded['restore_s']:.2f} s), from pages {warm['ready_s']:.2f} s,"
                f" ceiling {ceiling_s:.2f} s;"
                f" RSS {loaded['rss'] / 2**20:.0f} MiB vs {bare['rss'] / 2**20:.0f} MiB empty"
            )
            load_after = load_average()
            foreign = meter.foreign_share()
            replay_runs.append(
                {
                    **loaded,
                    "events_per_s": count / loaded["ready_s"],
                    "ceiling_s": ceiling_s,
                    "ceiling_events_per_s": count / ceiling_s,
                    "ratio": ceiling_s / loaded["ready_s"],
                    "keeping_s": keeping_s,
                    "restore_ratio": ceiling_s / loaded["restore_s"],
                    "pages_ready_s": warm["ready_s"],
                    "pages_ratio": ceiling_s / warm["ready_s"],
                    "load_before": load_before,
                    "load_after": load_after,
                    "foreign_cpu": foreign,
                }
            )
            delta = loaded["rss"] - bare["rss"]
            memory_runs.append(
                {
                    "rss_full": loaded["rss"],
                    "rss_empty": bare["rss"],
                    "rss_peak_full": loaded["rss_peak"],
                    "delta": delta,
                    "payload_bytes": payload_bytes,
                    "ratio": delta / payload_bytes,
                    "bytes_per_order": delta / count,
                    "load_before": load_before,
                    "load_after": load_after,
                    "foreign_cpu": foreign,
                }
            )
    return {
        "replay": {
            "params": {
                "events": count,
                "page_size": PAGE_SIZE,
                "load_seconds": load_s,
                "payload_bytes": payload_bytes,
                "mean_payload_bytes": round(payload_bytes / count),
            },
            "runs": replay_runs,
        },
        "memory": {
            "params": {"events": count, "payload_bytes": payload_bytes, "settle_s": SETTLE_S},
            "runs": memory_runs,
        },
    }
