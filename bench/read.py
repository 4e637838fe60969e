"""Reads: GET /orders/{uid} on random existing uids with wrk (1 thread, 64 connections), the
worker pinned to core 0 and wrk to core 1, beside the same load on a bare aiohttp + uvloop
server (also on core 0) that returns the same bytes from a dict; then a fixed rate with hey
against the worker (hey takes one URL: one existing uid, the middle one of the log)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench import dataset
from bench.context import Context
from bench.servers import (
    ROOT,
    fresh_database,
    load_average,
    ready,
    running_worker,
    scratch_dir,
)
from tests.harness import Route, end_process, free_port

SERVER_CPU: Final = "0"
CLIENT_CPU: Final = "1"
LUA: Final = Path(__file__).resolve().parent / "read.lua"
WARM_UP_S: Final = 1


def wrk_command(
    base: str, seconds: int, connections: int, uid_file: Path, script: Path = LUA
) -> list[str]:
    return [
        "taskset",
        "-c",
        CLIENT_CPU,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        base + "/",
        "--",
        str(uid_file),
    ]


async def wrk(command: list[str]) -> dict[str, Any]:
    """Run wrk and return its JSON summary (from read.lua), with req/s and ms added."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode()}")
    for line in out.decode().splitlines():
        if line.startswith("WRKJSON "):
            summary: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
            break
    else:
        raise RuntimeError(f"no summary from wrk:\n{out.decode()}\n{err.decode()}")
    if summary["requests"] == 0:
        raise RuntimeError(f"wrk made no request:\n{out.decode()}")
    errors = sum(
        summary[key]
        for key in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return {
        "requests": summary["requests"],
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "p50_ms": summary["p50_us"] / 1000,
        "p90_ms": summary["p90_us"] / 1000,
        "p99_ms": summary["p99_us"] / 1000,
        "max_ms": summary["max_us"] / 1000,
        "errors": errors,
        "non_2xx": summary["status_errors"],
    }


def hey_command(url: str, seconds: int, per_worker: int, workers: int) -> list[str]:
    return [
        "taskset",
        "-c",
        CLIENT_CPU,
        "hey",
        "-z",
        f"{seconds}s",
        "-q",
        str(per_worker),
        "-c",
        str(workers),
        url,
    ]


_HEY_LINE: Final = re.compile(r"^\s*(Total|Slowest|Fastest|Average|Requests/sec):\s*([\d.]+)")
_HEY_PERCENTILE: Final = re.compile(r"^\s*(\d+)% in ([\d.]+) secs")
_HEY_STATUS: Final = re.compile(r"^\s*\[(\d+)\]\s+(\d+) responses")
_HEY_ERROR: Final = re.compile(r"^\s*\[(\d+)\]\s+(.*)$")


def parse_hey(text: str) -> dict[str, Any]:
    """The figures of hey's text summary."""
    fields: dict[str, float] = {}
    percentiles: dict[int, float] = {}
    statuses: dict[str, int] = {}
    errors: list[str] = []
    error_count = 0
    section = ""
    for line in text.splitlines():
        if line.strip().endswith(":") and not line.startswith("  "):
            section = line.strip()
            continue
        if match := _HEY_LINE.match(line):
            fields[match[1]] = float(match[2])
        elif match := _HEY_PERCENTILE.match(line):
            percentiles[int(match[1])] = float(match[2])
        elif section.startswith("Status code") and (match := _HEY_STATUS.match(line)):
            statuses[match[1]] = int(match[2])
        elif section.startswith("Error") and (match := _HEY_ERROR.match(line)):
            error_count += int(match[1])
            errors.append(match[2][:200])
    responses = sum(statuses.values())
    total = responses + error_count
    if total == 0:
        raise RuntimeError(f"hey made no request:\n{text}")
    return {
        "requests": total,
        "rps": total / fields["Total"] if fields.get("Total") else 0.0,
        "ok_share": statuses.get("200", 0) / total,
        "statuses": statuses,
        "errors": error_count,
        "error_samples": errors[:3],
        "p50_ms": 1000 * percentiles.get(50, float("nan")),
        "p90_ms": 1000 * percentiles.get(90, float("nan")),
        "p99_ms": 1000 * percentiles.get(99, float("nan")),
        "max_ms": 1000 * fields.get("Slowest", float("nan")),
    }


async def hey(command: list[str]) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"hey failed ({process.returncode}): {err.decode()}")
    return parse_hey(out.decode())


def _spawn_bare_server(
    dsn: str, port: int, log_path: Path, uid_file: Path | None
) -> subprocess.Popen[bytes]:
    command = [
        "taskset",
        "-c",
        SERVER_CPU,
        sys.executable,
        "-m",
        "bench.bare_read_server",
        "--database-url",
        dsn,
        "--port",
        str(port),
        *(("--uids", str(uid_file)) if uid_file is not None else ()),
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


@contextlib.asynccontextmanager
async def bare_server(dsn: str, log_path: Path, uid_file: Path | None = None) -> AsyncIterator[str]:
    """The ceiling's server on core 0 (holding only the orders of ``uid_file`` if given);
    yields its base URL once it serves."""
    port = free_port()
    process = _spawn_bare_server(dsn, port, log_path, uid_file)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        async with aiohttp.ClientSession() as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the bare server exited: {_tail(log_path)}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/readyz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare server did not start within 900 s")
                await asyncio.sleep(0.05)
        yield base
    finally:
        end_process(process)


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.read()


async def run(ctx: Context) -> dict[str, Any]:
    sizes = ctx.sizes
    count = sizes.read_orders
    scratch = scratch_dir("read")
    route = Route(ctx.servers.nats_url)
    wrk_runs: list[dict[str, Any]] = []
    hey_runs: list[dict[str, Any]] = []
    try:
        with fresh_database(ctx.servers.admin_url) as dsn:
            ctx.say(f"read: loading {count} orders")
            dataset.load_events(dsn, count, salt="read")
            uids = dataset.uids(dsn)
            uid_file = scratch / "uids.txt"
            uid_file.write_text("\n".join(uids) + "\n")
            env = {**route.env(dsn), **ctx.worker_env}
            async with running_worker(scratch / "worker", env, cpus=SERVER_CPU) as worker:
                readyz = await ready(worker)
                if readyz["orders"] != count:
                    raise RuntimeError(f"the worker's view holds {readyz['orders']} orders")
                async with bare_server(dsn, scratch / "bare.log") as bare:
                    for uid in (uids[0], uids[-1]):
                        served = await get(f"{worker.base}/orders/{uid}")
                        bare_served = await get(f"{bare}/orders/{uid}")
                        if served != bare_served or served[0] != 200:
                            raise RuntimeError(f"the worker and the bare server differ on {uid}")
                    for base in (worker.base, bare):
                        await wrk(wrk_command(base, WARM_UP_S, sizes.read_connections, uid_file))
                    for index in range(ctx.runs):
                        load_before = load_average()
                        meter = ctx.servers.cpu_meter()
                        ctx.profiler.start(worker.pid, f"read-{index + 1}")
                        try:
                            service = await wrk(
                                wrk_command(
                                    worker.base,
                                    sizes.read_seconds,
                                    sizes.read_connections,
                                    uid_file,
                                )
                            )
                        finally:
                            ctx.profiler.stop()
                        ceiling = await wrk(
                            wrk_command(bare, sizes.read_seconds, sizes.read_connections, uid_file)
                        )
                        ctx.say(
                            f"read run {index + 1}: service {service['rps']:,.0f} req/s,"
                            f" ceiling {ceiling['rps']:,.0f} req/s"
                        )
                        wrk_runs.append(
                            {
                                **service,
                                "ceiling": ceiling,
                                "ceiling_rps": ceiling["rps"],
                                "ratio": service["rps"] / ceiling["rps"],
                                "load_before": load_before,
                                "load_after": load_average(),
                                "foreign_cpu": meter.foreign_share(),
                            }
                        )
                one_uid = uids[len(uids) // 2]
                url = f"{worker.base}/orders/{one_uid}"
                per_worker = sizes.fixed_rate // sizes.fixed_workers
                for index in range(ctx.runs):
                    load_before = load_average()
                    meter = ctx.servers.cpu_meter()
                    command = hey_command(url, sizes.fixed_seconds, per_worker, sizes.fixed_workers)
                    measured = await hey(command)
                    ctx.say(
                        f"read at a fixed rate, run {index + 1}: {measured['rps']:,.0f} req/s,"
                        f" {100 * measured['ok_share']:.2f} % 200s, p99 {measured['p99_ms']:.1f} ms"
                    )
                    hey_runs.append(
                        {
                            **measured,
                            "load_before": load_before,
                            "load_after": load_average(),
                            "foreign_cpu": meter.foreign_share(),
                        }
                    )
    finally:
        await route.delete()
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "read": {
            "params": {
                "orders": count,
                "seconds": sizes.read_seconds,
                "connections": sizes.read_connections,
                "threads": 1,
                "server_cpu": SERVER_CPU,
                "client_cpu": CLIENT_CPU,
                "command": " ".join(
                    wrk_command(
                        "http://127.0.0.1:PORT",
                        sizes.read_seconds,
                        sizes.read_connections,
                        Path("uids.txt"),
                        LUA.relative_to(ROOT),
                    )
                ),
                "warm_up_s": WARM_UP_S,
            },
            "runs": wrk_runs,
        },
        "read_fixed": {
            "params": {
                "rate": sizes.fixed_rate,
                "workers": sizes.fixed_workers,
                "per_worker": sizes.fixed_rate // sizes.fixed_workers,
                "seconds": sizes.fixed_seconds,
                "command": " ".join(
                    hey_command(
                        "http://127.0.0.1:PORT/orders/UID",
                        sizes.fixed_seconds,
                        sizes.fixed_rate // sizes.fixed_workers,
                        sizes.fixed_workers,
                    )
                ),
            },
            "runs": hey_runs,
        },
    }
