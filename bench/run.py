"""Run the benchmarks, write the results as JSON and the report as Markdown.

    python -m bench               # every figure, 3 runs: bench/results.json, docs/benchmarks.md
    python -m bench --smoke       # tiny sizes, 1 run: into a temporary folder
    python -m bench --only read   # one figure, merged into the existing results
    python -m bench --database-url postgresql://postgres@127.0.0.1:5432/postgres \\
                    --nats-url nats://127.0.0.1:4222

A figure that breaks makes the exit code 1; a missed target never does (targets are reported).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from bench import ingest, latency, read, replay, report
from bench.context import Context, Sizes
from bench.profile import Profiler
from bench.servers import ROOT, Servers, load_average

Figure = Callable[[Context], Awaitable[dict[str, Any]]]

FIGURES: Final[dict[str, Figure]] = {
    "ingest": ingest.run,
    "latency": latency.run,
    "read": read.run,
    "replay": replay.run,
}
PACKAGES: Final = (
    "faust-streaming",
    "aiopg",
    "aiohttp",
    "uvloop",
    "psycopg2-binary",
    "nats-py",
    "orjson",
    "msgspec",
)
SERVICE_PATHS: Final = ("streams", "bridge", "views", "publisher", "setup.cfg")


def _command_output(command: list[str], *, strip: bool = True) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    output = done.stdout or done.stderr
    return output.strip() if strip else output


def machine() -> dict[str, Any]:
    model = "?"
    for line in _command_output(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    mem_total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_bytes": mem_total,
        "kernel": platform.release(),
    }


async def versions(servers: Servers) -> dict[str, str]:
    found = {
        "Python": platform.python_version(),
        "PostgreSQL server": await asyncio.to_thread(servers.postgres_version),
        "nats-server": await servers.nats_version(),
    }
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["wrk"] = _command_output(["wrk", "-v"]).splitlines()[0].split(" [")[0]
    found["hey"] = _command_output(["dpkg-query", "-W", "-f", "${Version}", "hey"])
    return found


def service_state() -> dict[str, Any]:
    """Which service code was measured: the commit, and the service files changed since."""
    commit = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    changed = _command_output(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", *SERVICE_PATHS], strip=False
    )
    return {"commit": commit, "uncommitted": [line[3:] for line in changed.splitlines() if line]}


def _sizes(sizes: Sizes, overrides: list[str]) -> Sizes:
    names = {field.name for field in dataclasses.fields(Sizes)}
    changes: dict[str, int] = {}
    for override in overrides:
        name, equals, value = override.partition("=")
        if not equals or name not in names or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--size expects one of {', '.join(sorted(names))} = N >= 1")
        changes[name] = int(value)
    return dataclasses.replace(sizes, **changes)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.startswith("ORDERS_"):
            raise SystemExit(f"--worker-env expects ORDERS_NAME=VALUE, got {pair!r}")
        env[key] = value
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 run each")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; smoke: 1)")
    parser.add_argument(
        "--only", action="append", choices=sorted(FIGURES), help="run this figure (repeatable)"
    )
    parser.add_argument("--database-url", help="a PostgreSQL server URL (default: embedded)")
    parser.add_argument("--nats-url", help="a NATS server with JetStream (default: embedded)")
    parser.add_argument("--results", type=Path, help="the JSON results file")
    parser.add_argument("--doc", type=Path, help="the Markdown report")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="ORDERS_NAME=VALUE",
        help="an extra setting for every worker (an experiment; recorded in the results)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="py-spy the worker while measuring, into DIR"
    )
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="NAME=N",
        help="override one size of bench.context.Sizes, e.g. latency_every=100 (an experiment)",
    )
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.smoke else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.smoke:
        scratch = Path(tempfile.gettempdir()) / "orders-bench-smoke"
        args.results = args.results or scratch / "results.json"
        args.doc = args.doc or scratch / "benchmarks.md"
    else:
        args.results = args.results or ROOT / "bench" / "results.json"
        args.doc = args.doc or ROOT / "docs" / "benchmarks.md"
    return args


async def _main(args: argparse.Namespace, argv: list[str]) -> int:
    mode = "smoke" if args.smoke else "full"
    sizes = _sizes(Sizes.smoke() if args.smoke else Sizes.full(), args.size)
    names = args.only or list(FIGURES)
    previous: dict[str, Any] = {}
    if args.only and args.results.exists():
        previous = json.loads(args.results.read_text())
        if previous.get("mode") != mode:
            previous = {}
    command = shlex.join(["python", "-m", "bench", *argv])
    results: dict[str, Any] = {
        "mode": mode,
        "machine": machine(),
        "service": service_state(),
        "figures": previous.get("figures", {}),
        "invocations": [*previous.get("invocations", []), command],
    }
    failed: list[str] = []
    with Servers(args.database_url, args.nats_url) as servers:
        results["servers"] = servers.describe()
        results["versions"] = await versions(servers)
        ctx = Context(
            servers=servers,
            sizes=sizes,
            runs=args.runs,
            smoke=args.smoke,
            worker_env=_parse_env(args.worker_env),
            profiler=Profiler(args.profile),
        )
        ctx.say(f"{mode} run of {', '.join(names)}; {args.runs} run(s) each")
        for name in names:
            started = datetime.datetime.now(datetime.UTC)
            load_before = load_average()
            state_before = service_state()
            try:
                figures = await FIGURES[name](ctx)
            except Exception:
                traceback.print_exc()
                ctx.say(f"{name}: FAILED")
                failed.append(name)
                continue
            changed = service_state() != state_before
            if changed:
                ctx.say(f"{name}: the service's code changed while it was measured")
            for key, figure in figures.items():
                figure["measured_at"] = started.isoformat(timespec="seconds")
                figure["load_before"] = load_before
                figure["load_after"] = load_average()
                figure["command"] = command
                figure["worker_env"] = ctx.worker_env
                figure["service"] = state_before
                figure["service_changed"] = changed
                figure["sizes"] = dataclasses.asdict(sizes)
                results["figures"][key] = figure
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    report.write(args.doc, report.render(results))
    print(f"results: {args.results}\nreport: {args.doc}", file=sys.stderr)
    print(report.summary_table(results))
    if failed:
        print(f"broken: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # SIGTERM as Ctrl-C: asyncio.run then cancels the run, and every worker, wrk, hey and
    # embedded server is stopped on the way out instead of being left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return asyncio.run(_main(args, argv))
