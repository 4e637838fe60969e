"""Reads at a fixed rate, in a process of their own: ``python -m tests.chaos_load BASE UID_FILE
RATE SECONDS`` sends GET /orders/{uid} for uids drawn from UID_FILE, RATE per second for SECONDS,
whatever the answers take (an open loop), and prints the figures as JSON."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp

_TICK_S = 0.005


async def read_at_rate(base: str, uids: list[str], rate: float, seconds: float) -> dict[str, float]:
    rng = random.Random(0)
    latencies: list[float] = []
    errors = 0
    behind_s = 0.0
    total = int(rate * seconds)

    async def one(uid: str) -> None:
        nonlocal errors
        begun = time.perf_counter()
        try:
            async with http.get(f"{base}/orders/{uid}") as response:
                await response.read()
                if response.status != 200:
                    errors += 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
        latencies.append(time.perf_counter() - begun)

    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - started) * rate) + 1)
            if due - sent > rate * 0.1:
                behind_s = max(behind_s, (due - sent) / rate)
            for _ in range(due - sent):
                task = asyncio.create_task(one(rng.choice(uids)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(_TICK_S)
        if tasks:
            await asyncio.wait(tasks)
        elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(share: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(share * len(latencies)))]

    return {
        "requests": len(latencies),
        "errors": errors,
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "max_ms": 1000 * latencies[-1],
        "client_behind_s_max": behind_s,
    }


def main(argv: list[str]) -> None:
    base, uid_file, rate, seconds = argv
    uids = Path(uid_file).read_text().split()
    figures = asyncio.run(read_at_rate(base, uids, float(rate), float(seconds)))
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
