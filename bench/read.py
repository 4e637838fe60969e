"""Reads: GET /orders/{uid} on random existing uids with wrk (1 thread, 64 connections), the
worker pinned to core 0 and wrk to core 1, beside the same load on the same worker run on
Faust's aiohttp driver and on three ceilings that return the same bytes from a dict, all on
core 0: bare aiohttp on uvloop, Go's net/http with GOMAXPROCS=1, and a bare asyncio.Protocol
with httptools on uvloop; the servers take turns within each round. Then a fixed rate with hey
against the worker (hey takes one URL: one existing uid, the middle one of the log)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
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
from bench.bare_read_server import load as load_orders
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
GO_CEILING: Final = Path(__file__).resolve().parent / "read_ceiling.go"
# The ceilings measured beside the service: Faust-free servers answering the same bytes from a
# dict, on the same core. aiohttp: bench/bare_read_server.py; go: net/http, GOMAXPROCS=1
# (bench/read_ceiling.go); protocol: an asyncio.Protocol with httptools on uvloop
# (bench/bare_protocol_server.py).
CEILINGS: Final = ("aiohttp", "go", "protocol")
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


def _python_ceiling(module: str, dsn: str, port: int) -> list[str]:
    return [sys.executable, "-m", module, "--database-url", dsn, "--port", str(port)]


def build_go_ceiling(scratch: Path) -> Path:
    """bench/read_ceiling.go built into ``scratch`` (Debian's golang-go: the standard library
    only, no module download)."""
    go = shutil.which("go")
    if go is None:
        raise RuntimeError("the Go ceiling needs a Go toolchain: apt-get install golang-go")
    binary = scratch / "read_ceiling"
    subprocess.run(
        [go, "build", "-o", str(binary), str(GO_CEILING)],
        cwd=scratch,
        check=True,
        capture_output=True,
    )
    return binary


def write_orders_file(dsn: str, path: Path) -> None:
    """``uid<TAB>payload`` lines for the Go ceiling: the bytes the other servers answer."""
    with open(path, "wb") as out:
        for uid, payload in load_orders(dsn).items():
            out.write(uid.encode() + b"\t" + payload + b"\n")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def _spawn(
    command: list[str], log_path: Path, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *command],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )


@contextlib.asynccontextmanager
async def ceiling_server(
    name: str, command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """A ceiling's server on the server's core; yields its base URL once it serves."""
    process = _spawn(command, log_path, env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        async with aiohttp.ClientSession() as http:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the {name} ceiling exited: {_tail(log_path)}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(base + "/readyz") as response:
                        if response.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {name} ceiling did not start within 900 s")
                await asyncio.sleep(0.05)
        yield base
    finally:
        end_process(process)


@contextlib.asynccontextmanager
async def bare_server(dsn: str, log_path: Path, uid_file: Path | None = None) -> AsyncIterator[str]:
    """The bare aiohttp ceiling on the server's core, holding only the orders of ``uid_file``
    if given (at ten million orders the whole log would not fit beside the worker)."""
    port = free_port()
    command = _python_ceiling("bench.bare_read_server", dsn, port)
    if uid_file is not None:
        command += ["--uids", str(uid_file)]
    async with ceiling_server("aiohttp", command, port, log_path) as base:
        yield base


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
            orders_file = scratch / "orders.tsv"
            write_orders_file(dsn, orders_file)
            go_binary = build_go_ceiling(scratch)
            env = {**route.env(dsn), **ctx.worker_env}
            ports = {name: free_port() for name in CEILINGS}
            commands = {
                "aiohttp": _python_ceiling("bench.bare_read_server", dsn, ports["aiohttp"]),
                "go": [
                    str(go_binary),
                    "-orders",
                    str(orders_file),
                    "-addr",
                    f"127.0.0.1:{ports['go']}",
                ],
                "protocol": _python_ceiling("bench.bare_protocol_server", dsn, ports["protocol"]),
            }
            async with contextlib.AsyncExitStack() as stack:
                worker = await stack.enter_async_context(
                    running_worker(scratch / "worker", env, cpus=SERVER_CPU)
                )
                # The same service on Faust's aiohttp driver, for the comparison (it idles on
                # the same core while the others are measured).
                aiohttp_worker = await stack.enter_async_context(
                    running_worker(
                        scratch / "worker-aiohttp",
                        {**env, "ORDERS_WEB_DRIVER": "aiohttp"},
                        cpus=SERVER_CPU,
                    )
                )
                for readyz in (await ready(worker), await ready(aiohttp_worker)):
                    if readyz["orders"] != count:
                        raise RuntimeError(f"a worker's view holds {readyz['orders']} orders")
                bases = {"service": worker.base, "service_aiohttp": aiohttp_worker.base}
                for name in CEILINGS:
                    bases[name] = await stack.enter_async_context(
                        ceiling_server(
                            name,
                            commands[name],
                            ports[name],
                            scratch / f"{name}.log",
                            {"GOMAXPROCS": "1"} if name == "go" else None,
                        )
                    )
                for uid in (uids[0], uids[-1]):
                    served = {
                        name: await get(f"{base}/orders/{uid}") for name, base in bases.items()
                    }
                    if (
                        len({answer for answer in served.values()}) != 1
                        or served["service"][0] != 200
                    ):
                        raise RuntimeError(f"the servers differ on {uid}")
                for base in bases.values():
                    await wrk(wrk_command(base, WARM_UP_S, sizes.read_connections, uid_file))
                for index in range(ctx.runs):
                    # One round: every server in turn, so that a change of the machine's load
                    # touches all of them alike.
                    load_before = load_average()
                    meter = ctx.servers.cpu_meter()
                    measured: dict[str, dict[str, Any]] = {}
                    for name, base in bases.items():
                        if name == "service":
                            ctx.profiler.start(worker.pid, f"read-{index + 1}")
                        try:
                            measured[name] = await wrk(
                                wrk_command(
                                    base, sizes.read_seconds, sizes.read_connections, uid_file
                                )
                            )
                        finally:
                            if name == "service":
                                ctx.profiler.stop()
                    service = measured.pop("service")
                    ctx.say(
                        f"read run {index + 1}: "
                        + ", ".join(
                            f"{name} {result['rps']:,.0f} req/s"
                            for name, result in {"service": service, **measured}.items()
                        )
                    )
                    wrk_runs.append(
                        {
                            **service,
                            # "ceiling" is the bare aiohttp server, as in earlier results.
                            "ceiling": measured["aiohttp"],
                            "ceiling_rps": measured["aiohttp"]["rps"],
                            "ratio": service["rps"] / measured["aiohttp"]["rps"],
                            "service_aiohttp": measured["service_aiohttp"],
                            "go": measured["go"],
                            "protocol": measured["protocol"],
                            "ratio_go": service["rps"] / measured["go"]["rps"],
                            "ratio_protocol": service["rps"] / measured["protocol"]["rps"],
                            "load_before": load_before,
                            "load_after": load_average(),
                            "foreign_cpu": meter.foreign_share(),
                        }
                    )
                one_uid = uids[len(uids) // 2]
                per_worker = sizes.fixed_rate // sizes.fixed_workers
                for index in range(ctx.runs):
                    load_before = load_average()
                    meter = ctx.servers.cpu_meter()
                    # The service, then the Go and protocol ceilings at the same rate: how much
                    # of the latency is hey's and the machine's rather than the server's.
                    fixed: dict[str, dict[str, Any]] = {}
                    for name in ("service", "go", "protocol"):
                        url = f"{bases[name]}/orders/{one_uid}"
                        fixed[name] = await hey(
                            hey_command(url, sizes.fixed_seconds, per_worker, sizes.fixed_workers)
                        )
                    service = fixed.pop("service")
                    ctx.say(
                        f"read at a fixed rate, run {index + 1}: {service['rps']:,.0f} req/s,"
                        f" {100 * service['ok_share']:.2f} % 200s, p99 {service['p99_ms']:.1f} ms"
                        f" (go p99 {fixed['go']['p99_ms']:.1f} ms,"
                        f" protocol p99 {fixed['protocol']['p99_ms']:.1f} ms)"
                    )
                    hey_runs.append(
                        {
                            **service,
                            **fixed,
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
                "web_driver": env.get("ORDERS_WEB_DRIVER", "fast"),
                "ceilings": list(CEILINGS),
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
