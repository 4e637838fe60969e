"""Volume curves: how ready time, memory and the read rate grow with the log, from 100,000 to
10,000,000 orders (``make bench-scale``).

For each size: the orders loaded with SQL (bench/dataset.py), after a check that the disk has
room for them; a first ("cold") worker restores from the log alone and writes the snapshot
pages; a second ("warm") worker is timed from spawn to /readyz 200, its RSS taken beside that
of a worker on an empty database, its answers compared with the log, and its reads measured with
wrk beside a bare aiohttp server serving the same uncompressed bytes (bench/bare_read_server.py,
holding only the orders wrk asks for, so that it fits beside the worker). Every database is
dropped at the end of its size. Writes bench/volume-results.json, docs/volume.png and the
section of docs/benchmarks.md between the volume markers.

    python -m bench.volume                  # 100k, 1M, 3M, 10M; 2 read rounds each
    python -m bench.volume --smoke          # tiny sizes: the script still works
    python -m bench.volume --sizes 100000,1000000
    python -m bench.volume --redraw         # the curves and the section from the last results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import orjson
import psycopg2

from bench import dataset
from bench.read import CLIENT_CPU, SERVER_CPU, bare_server, get, wrk, wrk_command
from bench.report import VOLUME_BEGIN, VOLUME_END
from bench.servers import (
    ROOT,
    Servers,
    fresh_database,
    load_average,
    query,
    ready,
    running_worker,
    scratch_dir,
)
from bench.stats import spread
from streams.config import Settings
from tests.harness import Route

SIZES: Final = (100_000, 1_000_000, 3_000_000, 10_000_000)
SMOKE_SIZES: Final = (1_500, 4_000)
SALT: Final = "volume"
# What an order takes on disk while loading: the row and its two indexes (about 1.5 KB at
# 10M), the snapshot pages (about 0.1 KB) and WAL not yet recycled; and room to spare.
DISK_PER_ORDER: Final = 2_200
DISK_SPARE: Final = 4 * 2**30
READ_UIDS: Final = 1_000_000  # uids wrk draws from (and the bare server holds)
CONNECTIONS: Final = 64
VALUE_CHECKS: Final = 200
SETTLE_S: Final = 2.0
TIMEOUT_S: Final = 1_800.0
_PAGES_LINE: Final = re.compile(r"view: (\d+) orders from (\d+) snapshot pages in ([\d.]+) s")
PLOT: Final = ROOT / "docs" / "volume.png"
DOC: Final = ROOT / "docs" / "benchmarks.md"


def uid_of(index: int) -> str:
    """The uid bench/dataset.py gives the order of ``generate_series`` value ``index``."""
    return hashlib.md5(f"{SALT}{index}".encode()).hexdigest()[:24] + "test"


def free_disk(admin_url: str) -> tuple[int, str]:
    """Free bytes where PostgreSQL keeps its data (the temporary folder if it may not say)."""
    try:
        ((path,),) = query(admin_url, "SHOW data_directory")
    except psycopg2.Error:
        path = tempfile.gettempdir()
    return shutil.disk_usage(path).free, str(path)


async def _values_match(dsn: str, base: str, count: int) -> int:
    """GET orders drawn at random; each must be the log's JSON value. How many were checked."""
    seqs = random.sample(range(1, count + 1), min(VALUE_CHECKS, count))
    rows = await asyncio.to_thread(
        query,
        dsn,
        "SELECT order_uid, payload::text FROM orders_events"
        f" WHERE seq IN ({','.join(map(str, seqs))})",
    )
    for uid, text in rows:
        status, body = await get(f"{base}/orders/{uid}")
        if status != 200 or orjson.loads(body) != orjson.loads(text):
            raise RuntimeError(f"GET /orders/{uid} is not the log's order ({status})")
    return len(rows)


async def empty_rss(servers: Servers) -> int:
    """RSS of a ready worker on an empty database: what the loaded view is measured against."""
    route = Route(servers.nats_url)
    data_dir = scratch_dir("volume-empty")
    try:
        with fresh_database(servers.admin_url) as dsn:
            async with running_worker(data_dir, route.env(dsn), cpus=SERVER_CPU) as worker:
                await ready(worker)
                await asyncio.sleep(SETTLE_S)
                return worker.memory()["VmRSS"]
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)


async def measure(
    servers: Servers,
    count: int,
    rounds: int,
    seconds: int,
    env_extra: dict[str, str],
    starts: int = 1,
) -> dict[str, Any]:
    """Every figure of one size (see the module's docstring)."""
    needed = count * DISK_PER_ORDER + DISK_SPARE
    free, where = free_disk(servers.admin_url)
    if free < needed:
        message = (
            f"{count:,} orders need about {needed / 2**30:.1f} GiB in {where};"
            f" {free / 2**30:.1f} GiB free: skipped"
        )
        print(message, flush=True)
        return {"orders": count, "skipped": message}
    page_orders = int(env_extra.get("ORDERS_SNAPSHOT_PAGE_ORDERS", Settings().snapshot_page_orders))
    route = Route(servers.nats_url)
    data_dir = scratch_dir("volume")
    result: dict[str, Any] = {"orders": count, "load_before": load_average()}
    try:
        with fresh_database(servers.admin_url) as dsn:
            load_s, payload_bytes = await asyncio.to_thread(
                dataset.load_events, dsn, count, salt=SALT
            )
            result |= {"load_s": load_s, "payload_bytes": payload_bytes}
            print(f"{count:,}: loaded in {load_s:.0f} s", flush=True)
            env = {**route.env(dsn), **env_extra}
            async with running_worker(data_dir / "cold", env, cpus=SERVER_CPU) as cold:
                await ready(cold, timeout=TIMEOUT_S)
                result["cold_ready_s"] = cold.ready_at - cold.started_at
                result["pages_written_s"] = await dataset.wait_for_pages(
                    dsn, count // page_orders, TIMEOUT_S
                )
                result["cold_rss"] = cold.memory()["VmRSS"]
            print(f"{count:,}: cold start {result['cold_ready_s']:.1f} s", flush=True)
            ((pages_bytes, log_bytes),) = query(
                dsn,
                "SELECT pg_total_relation_size('orders_view_pages'),"
                " pg_total_relation_size('orders_events')",
            )
            result |= {"pages_bytes": int(pages_bytes), "log_bytes": int(log_bytes)}
            result["load_before_warm"] = load_average()
            async with running_worker(data_dir / "warm", env, cpus=SERVER_CPU) as warm:
                readyz = await ready(warm, timeout=TIMEOUT_S)
                if readyz["orders"] != count:
                    raise RuntimeError(f"the view holds {readyz['orders']} orders, not {count}")
                result["ready_s"] = warm.ready_at - warm.started_at
                from_pages = _PAGES_LINE.search(warm.log())
                result["from_pages_s"] = float(from_pages[3]) if from_pages else None
                result["pages"] = int(from_pages[2]) if from_pages else 0
                await asyncio.sleep(SETTLE_S)
                memory = warm.memory()
                result |= {"rss": memory["VmRSS"], "rss_peak": memory["VmHWM"]}
                result["values_checked"] = await _values_match(dsn, warm.base, count)
                result["reads"] = await _reads(dsn, warm.base, count, rounds, seconds, data_dir)
            print(f"{count:,}: warm start {result['ready_s']:.1f} s", flush=True)
            result["warm_starts"] = [
                {"ready_s": result["ready_s"], "load_before": result["load_before_warm"]}
            ]
            for index in range(starts - 1):
                before = load_average()
                async with running_worker(data_dir / f"again-{index}", env, cpus=SERVER_CPU) as w:
                    await ready(w, timeout=TIMEOUT_S)
                    result["warm_starts"].append(
                        {"ready_s": w.ready_at - w.started_at, "load_before": before}
                    )
                print(f"{count:,}: warm start {result['warm_starts'][-1]['ready_s']:.1f} s")
    finally:
        await route.delete()
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


async def _reads(
    dsn: str, base: str, count: int, rounds: int, seconds: int, data_dir: Path
) -> list[dict[str, Any]]:
    """Rounds of wrk against the worker and the bare server in turn, on the same uids."""
    uid_file = data_dir / "uids.txt"
    chosen = random.sample(range(1, count + 1), min(READ_UIDS, count))
    uid_file.write_text("\n".join(uid_of(index) for index in chosen) + "\n")
    runs: list[dict[str, Any]] = []
    async with bare_server(dsn, data_dir / "bare.log", uid_file) as bare:
        for target in (base, bare):
            await wrk(wrk_command(target, 1, CONNECTIONS, uid_file))  # warm-up
        for _ in range(rounds):
            before = load_average()
            service = await wrk(wrk_command(base, seconds, CONNECTIONS, uid_file))
            ceiling = await wrk(wrk_command(bare, seconds, CONNECTIONS, uid_file))
            if service["errors"] or ceiling["errors"]:
                raise RuntimeError(f"read errors: {service['errors']}, {ceiling['errors']}")
            runs.append(
                {
                    "rps": service["rps"],
                    "p99_ms": service["p99_ms"],
                    "ceiling_rps": ceiling["rps"],
                    "ratio": service["rps"] / ceiling["rps"],
                    "load_before": before,
                }
            )
    return runs


def derived(result: dict[str, Any], rss_empty: int) -> dict[str, Any]:
    """The figures of the table from one size's measurements."""
    ratios = [run["ratio"] for run in result["reads"]]
    return {
        "view_rss": result["rss"] - rss_empty,
        "rss_ratio": (result["rss"] - rss_empty) / result["payload_bytes"],
        "read_rps": spread([run["rps"] for run in result["reads"]])[1],
        "ceiling_rps": spread([run["ceiling_rps"] for run in result["reads"]])[1],
        "read_ratio": spread(ratios)[1],
        "read_ratio_range": (min(ratios), max(ratios)),
    }


def table(results: list[dict[str, Any]], rss_empty: int) -> str:
    lines = [
        "| orders | spawn → /readyz 200 (from pages) | cold start (log only) | view RSS"
        " | ÷ payload | reads (req/s) | bare (req/s) | ratio (min – max) | values |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        if "skipped" in result:
            lines.append(f"| {result['orders']:,} | {result['skipped']} | | | | | | | |")
            continue
        d = derived(result, rss_empty)
        low, high = d["read_ratio_range"]
        starts = [start["ready_s"] for start in result.get("warm_starts", [result])]
        ready_s = f"{spread(starts)[1]:.1f} s" + (
            f" ({min(starts):.1f} – {max(starts):.1f})" if len(starts) > 1 else ""
        )
        lines.append(
            f"| {result['orders']:,} | {ready_s} | {result['cold_ready_s']:.1f} s"
            f" | {d['view_rss'] / 2**20:,.0f} MiB | {d['rss_ratio']:.3f}"
            f" | {d['read_rps']:,.0f} | {d['ceiling_rps']:,.0f}"
            f" | {d['read_ratio']:.2f} ({low:.2f} – {high:.2f})"
            f" | {result['values_checked']} equal |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], rss_empty: int, path: Path) -> None:
    """Three curves against the number of orders: ready time, RSS, read rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [result for result in results if "skipped" not in result]
    counts = [result["orders"] for result in done]
    figure, (times, memory, reads) = plt.subplots(1, 3, figsize=(14, 4.2))
    times.plot(
        counts,
        [spread([w["ready_s"] for w in r.get("warm_starts", [r])])[1] for r in done],
        "o-",
        label="from snapshot pages (median)",
    )
    times.plot(counts, [r["cold_ready_s"] for r in done], "s--", label="cold (log only)")
    times.axhline(20, color="grey", linestyle=":", label="target at 10M: 20 s")
    times.set_title("spawn → /readyz 200 (s)")
    memory.plot(
        counts, [derived(r, rss_empty)["view_rss"] / 2**30 for r in done], "o-", label="view RSS"
    )
    memory.plot(
        counts, [r["payload_bytes"] / 2**30 for r in done], "s--", label="payload bytes (text)"
    )
    memory.plot(
        counts,
        [0.5 * r["payload_bytes"] / 2**30 for r in done],
        ":",
        color="grey",
        label="target: 0.5 × payload",
    )
    memory.set_title("memory (GiB)")
    reads.plot(counts, [derived(r, rss_empty)["read_rps"] for r in done], "o-", label="service")
    reads.plot(
        counts, [derived(r, rss_empty)["ceiling_rps"] for r in done], "s--", label="bare aiohttp"
    )
    reads.set_title(f"GET /orders/{{uid}}, wrk {CONNECTIONS} connections (req/s)")
    reads.set_ylim(bottom=0)
    for axes in (times, memory, reads):
        axes.set_xscale("log")
        axes.set_xlabel("orders in the log")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_section(doc: Path, section: str) -> None:
    """Put ``section`` between the volume markers of ``doc`` (at its end the first time)."""
    text = doc.read_text()
    block = f"{VOLUME_BEGIN}\n{section}\n{VOLUME_END}"
    if VOLUME_BEGIN in text and VOLUME_END in text:
        head, _, rest = text.partition(VOLUME_BEGIN)
        text = head + block + rest.partition(VOLUME_END)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


# What the section says besides the figures: the choices behind them.
NOTES: Final = """\
How the view holds ten million orders (views/view.py, streams/snapshots.py):

- **Compressed orders.** Each order is one zstd frame (level 3, no dictionary id, no checksum)
  made with a 16 KB dictionary trained on the log's own first orders (5,000, or the first
  snapshot page if smaller). The bench's orders (about 1,155 bytes of jsonb text) become frames
  of about 65 bytes; the publisher's generated orders (about 1,050 bytes, more varied) about
  150. Decompressing one of the latter takes about 0.6 µs, on every GET: the read rate
  below includes it.
- **Per-order overhead.** What remains per order is Python's: the uid `str` (73 bytes), the
  frame's `bytes` header (33 bytes), the dict slot (about 42 bytes) and 8 bytes of a packed
  seq array. An arena (one buffer per page, a dict uid → int offset) was weighed and left: an
  `int` above 256 is an object of 28–32 bytes, as large as the `bytes` header it replaces, so
  it saves nothing until the keys are packed too, which needs a hash table outside Python's
  dict on the read path.
- **No pass-through of compressed bytes.** Frames decode only with the view's private
  dictionary, so a client sending `Accept-Encoding: zstd` could not read them (browsers send
  zstd only over HTTPS anyway, and wrk sends no Accept-Encoding). Every answer is the
  decompressed JSON, byte for byte what the view was given.
- **Starting from snapshot pages.** A writer stores its view in pages of 100,000 orders
  (`ORDERS_SNAPSHOT_PAGE_ORDERS`; about 110 bytes an order: seqs, frame lengths, uids, frames)
  in `orders_view_pages`, with the dictionary in `orders_view_dictionary`. A start reads the
  chain of pages (the next one asked for on a second connection while one is checked and
  taken in), then the log after the last. Each page is checked before it goes in: its digest,
  its dictionary, its shape, the log's count of events in its range (an index-only count on the
  primary key) and 16 orders drawn at random compared with the log's (uid and JSON value). A
  page that fails is dropped with those after it and its orders are read from the log, with
  one warning line. Any UPDATE, DELETE or TRUNCATE of the log drops every page (a trigger).
  tests/test_snapshots.py strikes each case: rows deleted with and without triggers, a
  truncated body with and without a matching digest, another dictionary, a range that does not
  match, a page forged with right digests and counts, two writers with dictionaries of their
  own writing at once, a page write cut short, a worker SIGKILLed while writing pages.
- **The cold start** (no pages yet: the first start on an existing log, or after the log was
  changed) reads the whole log and compresses every order on the way in (about 2 µs an
  order); the pages it then writes serve every later start.
- **Reads.** The default web driver (streams/fast_web.py) answers a GET of an order the view
  holds without a request or response object (about 3 µs of Python a request, measured in
  process, of which the dict look-up and decompressing take 0.9 µs); at every size it serves
  more than three times what the bare aiohttp server does with the same uncompressed bytes.
  The rate falls a few per cent from 100,000 to 10,000,000 orders, likely as the dict outgrows
  the CPU's caches. On Faust's aiohttp driver (`ORDERS_WEB_DRIVER=aiohttp`) the same figure
  was 0.76–0.85 of bare aiohttp in an earlier run of this bench (at load 1.2–4.4).
- **What the checks cannot catch**: a page whose digests and counts agree with the log and
  whose wrong orders all escape the 16 spot checks. `replay --verify` never reads pages.
"""


def targets(results: list[dict[str, Any]], rss_empty: int) -> list[str]:
    """Whether the largest size measured meets the targets set for 10,000,000 orders."""
    done = [result for result in results if "skipped" not in result]
    if not done:
        return []
    largest = done[-1]
    d = derived(largest, rss_empty)
    ready_s = spread([start["ready_s"] for start in largest.get("warm_starts", [largest])])[1]
    checks = [
        (
            "RSS of the loaded view ÷ payload bytes ≤ 0.5",
            f"{d['rss_ratio']:.3f}",
            d["rss_ratio"] <= 0.5,
        ),
        ("spawn → /readyz 200 ≤ 20 s", f"{ready_s:.1f} s", ready_s <= 20),
        ("reads ≥ 0.9 of bare aiohttp", f"{d['read_ratio']:.2f}", d["read_ratio"] >= 0.9),
        (
            "GET returns the stored JSON value",
            f"{largest['values_checked']} of {largest['values_checked']}",
            True,
        ),
    ]
    lines = [
        f"Targets at {largest['orders']:,} orders:",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in checks]
    return [*lines, ""]


def section(results: list[dict[str, Any]], rss_empty: int, command: str, image: str) -> str:
    loads = [result.get("load_before") for result in results]
    return "\n".join(
        [
            "## Volume: 100,000 to 10,000,000 orders",
            "",
            NOTES,
            f"`{command}` (`make bench-scale`); worker and bare server on core {SERVER_CPU},"
            f" wrk on core {CLIENT_CPU}; RSS of a worker on an empty database:"
            f" {rss_empty / 2**20:,.0f} MiB; load average (1, 5, 15 min) before each size:"
            f" {loads}.",
            "",
            table(results, rss_empty),
            "",
            *targets(results, rss_empty),
            f"![ready time, memory and read rate against the number of orders]({image})",
        ]
    )


async def main(
    sizes: list[int], rounds: int, seconds: int, smoke: bool, output: Path, starts: int
) -> None:
    env_extra = {"ORDERS_SNAPSHOT_PAGE_ORDERS": "500"} if smoke else {}
    results: list[dict[str, Any]] = []
    with Servers(None, None) as servers:
        rss_empty = await empty_rss(servers)
        for count in sizes:
            results.append(await measure(servers, count, rounds, seconds, env_extra, starts))
            await asyncio.to_thread(
                output.write_text,
                json.dumps({"rss_empty": rss_empty, "sizes": results}, indent=2),
            )
    print(table(results, rss_empty))
    if smoke:
        with contextlib.suppress(ImportError):  # matplotlib is the bench extra's
            plot(results, rss_empty, output.with_suffix(".png"))
        return
    draw(results, rss_empty)


def draw(results: list[dict[str, Any]], rss_empty: int) -> None:
    """docs/volume.png and the volume section of docs/benchmarks.md."""
    plot(results, rss_empty, PLOT)
    sizes = ",".join(str(result["orders"]) for result in results)
    command = f"python -m bench.volume --sizes {sizes}"
    write_section(DOC, section(results, rss_empty, command, PLOT.name))


def redraw(output: Path) -> None:
    """The curves and the section again from a results file of an earlier run."""
    saved = json.loads(output.read_text())
    draw(saved["sizes"], saved["rss_empty"])
    print(table(saved["sizes"], saved["rss_empty"]))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one short round")
    parser.add_argument("--sizes", help="orders per size, comma-separated")
    parser.add_argument("--rounds", type=int, default=None, help="read rounds (default 2)")
    parser.add_argument("--starts", type=int, default=None, help="warm starts (default 2)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "volume-results.json")
    parser.add_argument(
        "--redraw", action="store_true", help="only the curves and the section, from --output"
    )
    options = parser.parse_args()
    if options.redraw:
        redraw(options.output)
        return
    sizes = (
        [int(size) for size in options.sizes.split(",")]
        if options.sizes
        else list(SMOKE_SIZES if options.smoke else SIZES)
    )
    rounds = options.rounds or (1 if options.smoke else 2)
    starts = options.starts or (1 if options.smoke else 2)
    seconds = 1 if options.smoke else 10
    asyncio.run(main(sizes, rounds, seconds, options.smoke, options.output, starts))


if __name__ == "__main__":
    cli()
