"""``docs/benchmarks.md`` from the results JSON (``python -m bench.report [RESULTS [DOC]]``).

The section "Where the time goes" is ``bench/findings.md``, written by hand from profiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from bench.stats import spread

ROOT: Final = Path(__file__).resolve().parent.parent
FINDINGS: Final = Path(__file__).resolve().parent / "findings.md"

Run = dict[str, Any]


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _ratio(value: float) -> str:
    return f"{value:.2f}"


def _spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    low, middle, high = spread(values)
    if math.isnan(middle):
        return "—"
    if len(values) == 1:
        return fmt(middle)
    return f"{fmt(middle)} ({fmt(low)} – {fmt(high)})"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table."""

    figure: str
    value: str
    ceiling: str
    ratio: str
    target: str
    met: bool | None
    note: str = ""


def _median(runs: list[Run], key: str) -> float:
    return spread([float(run[key]) for run in runs])[1]


def _values(runs: list[Run], key: str) -> list[float]:
    return [float(run[key]) for run in runs]


def _met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def rows(figures: dict[str, Any]) -> list[Row]:
    """The table's lines, for the figures present."""
    out: list[Row] = []
    if runs := figures.get("ingest", {}).get("runs"):
        params = figures["ingest"]["params"]
        # The specified ceiling, and (in results that have it) the service's own shape.
        ceilings = [("", "ceiling_orders_per_s", "ratio", "≥ 0.6 of the ceiling", 0.6)]
        if "ratio_in_flight" in runs[0]:
            ceilings.append(
                (
                    f", against {params['ceiling_in_flight']} transactions in flight",
                    "ceiling_in_flight_orders_per_s",
                    "ratio_in_flight",
                    "≥ 0.8 of that ceiling",
                    0.8,
                )
            )
        for against, ceiling_key, ratio_key, target, bound in ceilings:
            out.append(
                Row(
                    f"ingest, {params['orders']:,} orders{against} (orders/s)",
                    _spread(_values(runs, "orders_per_s"), _rate),
                    _spread(_values(runs, ceiling_key), _rate),
                    _spread(_values(runs, ratio_key), _ratio),
                    target,
                    _median(runs, ratio_key) >= bound,
                )
            )
    if runs := figures.get("latency", {}).get("runs"):
        params = figures["latency"]["params"]
        out.append(
            Row(
                f"ingest latency at {params['rate']:,}/s, p99 (p50)",
                f"{_spread(_values(runs, 'p99_ms'), _ms)} (p50 {_ms(_median(runs, 'p50_ms'))})",
                "—",
                "—",
                "p99 ≤ 50 ms",
                _median(runs, "p99_ms") <= 50,
            )
        )
    if runs := figures.get("read", {}).get("runs"):
        ceiling_p50 = spread([run["ceiling"]["p50_ms"] for run in runs])[1]
        ceiling_p99 = spread([run["ceiling"]["p99_ms"] for run in runs])[1]
        out.append(
            Row(
                "read, wrk 64 connections (req/s; p50, p99)",
                f"{_spread(_values(runs, 'rps'), _rate)};"
                f" {_ms(_median(runs, 'p50_ms'))}, {_ms(_median(runs, 'p99_ms'))}",
                f"{_spread(_values(runs, 'ceiling_rps'), _rate)};"
                f" {_ms(ceiling_p50)}, {_ms(ceiling_p99)}",
                _spread(_values(runs, "ratio"), _ratio),
                "≥ 0.8 of the ceiling",
                _median(runs, "ratio") >= 0.8,
            )
        )
    if runs := figures.get("read_fixed", {}).get("runs"):
        params = figures["read_fixed"]["params"]
        ok = min(_values(runs, "ok_share"))
        out.append(
            Row(
                f"read at {params['rate']:,} req/s, hey (achieved req/s; 200s; p99)",
                f"{_spread(_values(runs, 'rps'), _rate)}; {100 * ok:.2f} %;"
                f" {_spread(_values(runs, 'p99_ms'), _ms)}",
                "—",
                "—",
                "100 % 200s, p99 ≤ 10 ms",
                ok == 1.0 and _median(runs, "p99_ms") <= 10,
            )
        )
    if runs := figures.get("replay", {}).get("runs"):
        events = figures["replay"]["params"]["events"]
        ready = _median(runs, "ready_s")
        out.append(
            Row(
                f"boot replay, {events:,} events (start → /readyz 200)",
                _spread(_values(runs, "ready_s"), _seconds),
                _spread(_values(runs, "ceiling_s"), _seconds),
                _spread(_values(runs, "ratio"), _ratio),
                "≥ 0.7 of the ceiling; 1M ready ≤ 20 s",
                _median(runs, "ratio") >= 0.7 and (events != 1_000_000 or ready <= 20),
                f"ratio {_met(_median(runs, 'ratio') >= 0.7)}, ≤ 20 s {_met(ready <= 20)}",
            )
        )
        if all("pages_ready_s" in run for run in runs):
            out.append(
                Row(
                    f"boot from snapshot pages, {events:,} events (start → /readyz 200)",
                    _spread(_values(runs, "pages_ready_s"), _seconds),
                    _spread(_values(runs, "ceiling_s"), _seconds),
                    _spread(_values(runs, "pages_ratio"), _ratio),
                    "— (every start after the first; the row above is the first)",
                    None,
                )
            )
    if runs := figures.get("memory", {}).get("runs"):
        events = figures["memory"]["params"]["events"]
        out.append(
            Row(
                f"memory, {events:,} orders in the view (RSS delta)",
                _spread(_values(runs, "delta"), _mib),
                _mib(_median(runs, "payload_bytes")) + " of payloads",
                _spread(_values(runs, "ratio"), _ratio),
                "≤ 1.5 × the payload bytes",
                _median(runs, "ratio") <= 1.5,
            )
        )
    return out


def summary_table(results: dict[str, Any]) -> str:
    lines = [
        "| figure | value: median (min – max) | ceiling, same run | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows(results.get("figures", {})):
        lines.append(
            f"| {row.figure} | {row.value} | {row.ceiling} | {row.ratio} | {row.target}"
            f" | {_met(row.met)}{f' ({row.note})' if row.note else ''} |"
        )
    return "\n".join(lines)


def _runs_table(runs: list[Run], columns: list[tuple[str, str, Callable[[float], str]]]) -> str:
    head = (
        "| run | "
        + " | ".join(title for title, _, _ in columns)
        + " | load before → after | others' CPU |"
    )
    lines = [head, "|---" * (len(columns) + 3) + "|"]
    for index, run in enumerate(runs, 1):
        cells = [_cell(_lookup(run, key), fmt) for _, key, fmt in columns]
        load = f"{run['load_before'][0]:.2f} → {run['load_after'][0]:.2f}"
        foreign = run.get("foreign_cpu")
        others = "?" if foreign is None else f"{100 * foreign:.0f} %"
        lines.append(f"| {index} | " + " | ".join(cells) + f" | {load} | {others} |")
    return "\n".join(lines)


def _lookup(run: Run, key: str) -> float:
    value: Any = run
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return math.nan
        value = value[part]
    return float(value)


def _cell(value: float, fmt: Callable[[float], str]) -> str:
    return "—" if math.isnan(value) else fmt(value)


def _ingest_cpu_section(figure: dict[str, Any]) -> list[str]:
    """Where the machine's CPU went while the service ingested, and what that leaves."""
    cores = figure["params"].get("cores", 2)
    runs = figure["runs"]
    bounded = [run for run in runs if run.get("bound_ratio_in_flight")]
    return [
        "Where the CPU went during each run's service phase, in µs of CPU per order (from"
        " `/proc`: the worker's, PostgreSQL's and nats-server's process trees; the bench"
        " process alone is the publisher and the `/readyz` poll; other is the rest of the"
        f" machine's busy time), and the rate at which all but the worker would keep the"
        f" {cores} cores busy by themselves: what a worker costing no CPU at all could reach"
        " here beside the publisher and nats-server, as a share of the stricter ceiling"
        f" (median {_ratio(_median(bounded, 'bound_ratio_in_flight')) if bounded else '—'}).",
        "",
        _runs_table(
            runs,
            [
                ("worker", "cpu_us_worker", _us),
                ("PostgreSQL", "cpu_us_postgres", _us),
                ("nats-server", "cpu_us_nats", _us),
                ("publisher (bench)", "cpu_us_bench", _us),
                ("other", "cpu_us_other", _us),
                ("bound without the worker, orders/s", "bound_without_worker", _rate),
                ("bound ÷ ceiling in flight", "bound_ratio_in_flight", _ratio),
            ],
        ),
        "",
    ]


def _us(value: float) -> str:
    return f"{value:.1f} µs"


def _figure_sections(figures: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if figure := figures.get("ingest"):
        params = figure["params"]
        out += [
            "### Ingest",
            "",
            f"{params['orders']:,} unique orders (about {params['mean_payload_bytes']:,} bytes"
            " each, from `publisher.generate.OrderFactory`) published with"
            " `publisher.publish.publish` (pipelined, every PubAck awaited) to a worker that is"
            " ready and subscribed, on a fresh database and a stream of its own. Timed from the"
            " first publish until `/readyz` reports every order in the view (polled every 20 ms;"
            " the view only holds committed events) and a GET of the last order returns it (the"
            " same JSON); the database count is checked afterwards. The publisher, nats-server,"
            ' PostgreSQL and the worker share the machine\'s cores. "Served as published":'
            " the share of every 100th order that GET returns byte for byte as published (the"
            " rest comes back as jsonb text, read back from the log). Mean batch and"
            " take→commit come from the worker's `/metrics`. For the analysis only, \"draining"
            ' a backlog": the same orders published first with no worker running, then a'
            " worker started on them, timed from its `/readyz` 200 until all are in its view:"
            " the worker's pace when the publisher does not compete for the cores.",
            "",
            "Ceiling: a bare aiopg script appends the same payloads to the same (fresh) table in"
            f" batches of {params['ceiling_batch']:,}, one transaction each, with the store's own"
            " statements: `streams.store.APPEND_SQL` (imported, not copied) and `NOTIFY_SQL`."
            f' The stricter ceiling, "{params.get("ceiling_in_flight", 2)} in flight", is the'
            " service's own shape: the same script with that many transactions at once, each on"
            " a connection of its own taking the next batch when its last one commits (the"
            " second append waits for the append lock inside PostgreSQL). Each run measures"
            " the one-transaction ceiling, the service, then the stricter ceiling.",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("orders/s", "orders_per_s", _rate),
                    ("seconds", "seconds", _seconds),
                    ("publish rate, /s", "publish_per_s", _rate),
                    ("draining a backlog, /s", "drain_orders_per_s", _rate),
                    ("ceiling orders/s", "ceiling_orders_per_s", _rate),
                    ("ratio", "ratio", _ratio),
                    ("ceiling in flight, orders/s", "ceiling_in_flight_orders_per_s", _rate),
                    ("ratio in flight", "ratio_in_flight", _ratio),
                    ("served as published", "as_published", lambda v: f"{100 * v:.0f} %"),
                    ("batches", "batches", _rate),
                    ("mean batch", "mean_batch", _rate),
                    ("mean batch take→commit", "mean_batch_ms", _ms),
                ],
            ),
            "",
        ]
        if "bound_without_worker" in figure["runs"][0]:
            out += _ingest_cpu_section(figure)
    if figure := figures.get("latency"):
        params = figure["params"]
        out += [
            "### Ingest latency",
            "",
            f"{params['orders']:,} orders published at {params['rate']:,}/s for"
            f" {params['seconds']} s (`publish(..., rate=...)`). For every"
            f" {params['sample_every']}th order the moment just before its publish is noted;"
            f" from its PubAck on, `GET /orders/{{uid}}` is polled every"
            f" {params['poll_every_ms']:g} ms until it answers 200. Latency = that answer's"
            " arrival − the publish call. The polls are load on the worker too (column"
            " polls/s). Mean batch and take→commit come from the worker's `/metrics`"
            " (`orders_batch_size`, `orders_batch_commit_seconds`); undelivered / unacked are"
            " the durable consumer's `num_pending` / `num_ack_pending`, sampled every 100 ms.",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("samples", "samples", _rate),
                    ("p50", "p50_ms", _ms),
                    ("p90", "p90_ms", _ms),
                    ("p99", "p99_ms", _ms),
                    ("max", "max_ms", _ms),
                    ("PubAck p99", "ack_p99_ms", _ms),
                    ("published/s", "publish_per_s", _rate),
                    ("polls/s", "polls_per_s", _rate),
                    ("mean batch", "mean_batch", _rate),
                    ("mean batch take→commit", "mean_batch_ms", _ms),
                    ("undelivered max", "undelivered_max", _rate),
                    ("unacked max", "unacked_max", _rate),
                ],
            ),
            "",
        ]
    if figure := figures.get("read"):
        params = figure["params"]
        out += [
            "### Read",
            "",
            f"{params['orders']:,} orders loaded with SQL (as for the replay figure), a worker"
            f" started on them and pinned to core {params['server_cpu']} (`taskset -c"
            f" {params['server_cpu']} faust -A streams.app worker -l info`), and the ceiling,"
            f" `python -m bench.bare_read_server` (aiohttp on uvloop, one process, the same"
            f" bytes from a dict, also on core {params['server_cpu']}). wrk runs on core"
            f" {params['client_cpu']}, {params['threads']} thread, {params['connections']}"
            f" connections, {params['seconds']} s, each request a uid drawn at random from the"
            f" file of every uid (`bench/read.lua`); every server gets a {params['warm_up_s']} s"
            " warm-up first, and then the runs alternate service, ceiling (with the servers of"
            " the web driver figure below, when measured).",
            "",
            f"    {params['command']}",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("req/s", "rps", _rate),
                    ("p50", "p50_ms", _ms),
                    ("p99", "p99_ms", _ms),
                    ("errors", "errors", _rate),
                    ("ceiling req/s", "ceiling.rps", _rate),
                    ("ceiling p50", "ceiling.p50_ms", _ms),
                    ("ceiling p99", "ceiling.p99_ms", _ms),
                    ("ratio", "ratio", _ratio),
                ],
            ),
            "",
        ]
    out += _web_driver_section(figures)
    if figure := figures.get("read_fixed"):
        params = figure["params"]
        out += [
            "### Read at a fixed rate",
            "",
            f"hey against the same worker (core 0; hey on core 1): {params['workers']} workers"
            f" × {params['per_worker']} req/s each (hey's `-q` is per worker) ="
            f" {params['rate']:,} req/s for {params['seconds']} s. hey takes one URL, so every"
            " request asks for the same existing order (the middle uid of the log). hey's"
            " latencies have a resolution of 0.1 ms.",
            "",
            f"    {params['command']}",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("achieved req/s", "rps", _rate),
                    ("200s", "ok_share", lambda v: f"{100 * v:.3f} %"),
                    ("errors", "errors", _rate),
                    ("p50", "p50_ms", _ms),
                    ("p90", "p90_ms", _ms),
                    ("p99", "p99_ms", _ms),
                    ("max", "max_ms", _ms),
                ],
            ),
            "",
        ]
    if figure := figures.get("replay"):
        params = figure["params"]
        out += [
            "### Boot replay",
            "",
            f"{params['events']:,} events inserted with SQL alone in"
            f" {params['load_seconds']:.0f} s (`INSERT … SELECT` over `generate_series`, each"
            " payload the model order with two items made unique with `jsonb_set`, about"
            f" {params['mean_payload_bytes']:,} bytes as text), then `VACUUM (ANALYZE)` and"
            " `CHECKPOINT`. A"
            " worker is timed from the moment it is spawned until `/readyz` answers 200 (polled"
            " every 20 ms); `web up` is its first HTTP answer, `restore` what its log says"
            " (`view restored: … in X s`). Each run starts cold: the snapshot pages and their"
            " dictionary are dropped first, so the worker restores from the log alone, as on the"
            " first start on an existing log (every order compressed on the way in). Once it"
            ' has written its pages, a second worker is timed the same way ("from pages"): every'
            " later start.",
            "",
            "Ceiling: a bare aiopg script reads every row with the store's own keyset statement"
            f" (`streams.store.READ_SQL`: `seq, order_uid, payload::text`), {params['page_size']:,}"
            " rows a page (the service's `ORDERS_REPLAY_PAGE_SIZE` default), and keeps nothing."
            " Ratio = ceiling ÷ ready time (restore ratio: ceiling ÷ restore). For the analysis"
            ' only, "ceiling, keeping" is the same loop that also keeps every order in a dict'
            " (`uid → payload.encode()`), as the view does: the part of the gap that holding"
            " the orders in memory costs anyway.",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("ready", "ready_s", _seconds),
                    ("web up", "web_up_s", _seconds),
                    ("restore", "restore_s", _seconds),
                    ("events/s", "events_per_s", _rate),
                    ("ceiling", "ceiling_s", _seconds),
                    ("ceiling, keeping", "keeping_s", _seconds),
                    ("ratio", "ratio", _ratio),
                    ("restore ratio", "restore_ratio", _ratio),
                    ("from pages", "pages_ready_s", _seconds),
                    ("ratio from pages", "pages_ratio", _ratio),
                ],
            ),
            "",
        ]
    if figure := figures.get("memory"):
        params = figure["params"]
        out += [
            "### Memory",
            "",
            f"VmRSS (from `/proc/PID/status`) of the replay figure's worker, {params['settle_s']:g}"
            " s after it is ready, minus the same on an empty database; beside"
            f" `sum(octet_length(payload::text))` = {params['payload_bytes']:,} bytes. The peak"
            " (VmHWM) is the high-water mark during the replay.",
            "",
            _runs_table(
                figure["runs"],
                [
                    ("RSS loaded", "rss_full", _mib),
                    ("RSS empty", "rss_empty", _mib),
                    ("delta", "delta", _mib),
                    ("peak loaded", "rss_peak_full", _mib),
                    ("bytes/order", "bytes_per_order", _rate),
                    ("ratio", "ratio", _ratio),
                ],
            ),
            "",
        ]
    return out


# The servers of the web driver figure, as bench/read.py names them in a run.
_WEB_SERVERS: Final = (
    ("the service, fast driver (default)", ""),
    ("the service, `ORDERS_WEB_DRIVER=aiohttp`", "service_aiohttp."),
    ("bare aiohttp on uvloop (`bench/bare_read_server.py`)", "ceiling."),
    ("Go net/http, `GOMAXPROCS=1` (`bench/read_ceiling.go`)", "go."),
    ("bare asyncio.Protocol + httptools on uvloop (`bench/bare_protocol_server.py`)", "protocol."),
)


def _web_driver_section(figures: dict[str, Any]) -> list[str]:
    """The service's web driver beside Go's net/http and a bare protocol, same run."""
    runs = figures.get("read", {}).get("runs", [])
    if not runs or not all("go" in run for run in runs):
        return []
    params = figures["read"]["params"]
    lines = [
        "### Web driver",
        "",
        "`GET /orders/{uid}` in the read figure's rounds: each round runs every server below in"
        f" turn, all pinned to core {params['server_cpu']} with `taskset`, wrk on core"
        f" {params['client_cpu']} (`-t{params['threads']} -c{params['connections']}"
        f" -d{params['seconds']}s`, the read figure's command and uids). Medians of"
        f" {len(runs)} rounds, min – max in brackets. The machine has 2 cores and is shared: a"
        " load change during a round touches all servers of that round alike, not all rounds"
        " alike (see the load and others' CPU in the read table above).",
        "",
        "| server | req/s | p50 | p99 | the service's req/s ÷ this, per round |",
        "|---|---|---|---|---|",
    ]
    for title, prefix in _WEB_SERVERS:
        rates = _values_at(runs, prefix + "rps")
        # The median of each round's ratio, as for the targets below.
        per_round = [run["rps"] / rate for run, rate in zip(runs, rates, strict=True)]
        ratio = "—" if not prefix else _spread(per_round, _ratio)
        lines.append(
            f"| {title} | {_spread(rates, _rate)}"
            f" | {_ms(spread(_values_at(runs, prefix + 'p50_ms'))[1])}"
            f" | {_ms(spread(_values_at(runs, prefix + 'p99_ms'))[1])} | {ratio} |"
        )
    go = _median(runs, "ratio_go")
    protocol = _median(runs, "ratio_protocol")
    lines += [
        "",
        f"Targets: ≥ 1.0 × Go: {_ratio(go)}, {_met(go >= 1.0)}; ≥ 0.8 × the bare"
        f" protocol: {_ratio(protocol)}, {_met(protocol >= 0.8)}.",
    ]
    if fixed := figures.get("read_fixed", {}).get("runs"):
        p99 = _median(fixed, "p99_ms")
        rate = figures["read_fixed"]["params"]["rate"]
        lines[-1] += (
            f" p99 at a fixed {rate:,} req/s ≤ 2 ms (hey, next section):"
            f" {_ms(p99)}, {_met(p99 <= 2.0)}."
        )
        if all("go" in run for run in fixed):
            lines[-1] += (
                f" At the same rate, same rounds, hey measured a p99 of"
                f" {_ms(spread(_values_at(fixed, 'go.p99_ms'))[1])} from Go's net/http and"
                f" {_ms(spread(_values_at(fixed, 'protocol.p99_ms'))[1])} from the bare protocol."
            )
    return [*lines, ""]


def _values_at(runs: list[Run], key: str) -> list[float]:
    return [_lookup(run, key) for run in runs]


def render(results: dict[str, Any]) -> str:
    figures = results.get("figures", {})
    smoke = results.get("mode") == "smoke"
    machine = results["machine"]
    versions = results.get("versions", {})
    service = results.get("service", {})
    lines = [
        "# Benchmarks",
        "",
        "What the service does on one machine, against real NATS JetStream and PostgreSQL, each"
        " figure beside the ceiling of the same building block measured in the same run."
        " Targets are reported here, never asserted: no test or CI step fails on a timing.",
        "",
        "This file is written by `make bench` (`.venv/bin/python -m bench`) from"
        ' `bench/results.json`; the section "Where the time goes" is `bench/findings.md`.',
        "",
    ]
    if smoke:
        lines += [
            "> **Smoke run**: tiny sizes and one run each, to keep the scripts working. These"
            " figures say nothing about performance.",
            "",
        ]
    lines += [
        "## Results",
        "",
        f"Median of {_run_counts(figures)} (min – max); the ratio is taken per run, the service"
        ' against the ceiling measured in the same run. "met" judges the median.',
        "",
        summary_table(results),
        "",
        "## Machine, versions, servers",
        "",
        "| | |",
        "|---|---|",
        f"| CPU (`lscpu` model name) | {machine['cpu']} |",
        f"| cores | {machine['cores']} |",
        f"| RAM | {machine['ram_bytes'] / 2**30:.1f} GiB |",
        f"| kernel | {machine['kernel']} |",
    ]
    for name, version in versions.items():
        lines.append(f"| {name} | {version} |")
    servers = results.get("servers", {})
    lines += [
        f"| PostgreSQL used | {servers.get('postgres', '?')} |",
        f"| NATS used | {servers.get('nats', '?')} |",
        f"| service code | commit {service.get('commit', '?')}"
        + (
            "; uncommitted changes in: " + ", ".join(f"`{path}`" for path in service["uncommitted"])
            if service.get("uncommitted")
            else ""
        )
        + " |",
        "",
        "Other processes may run on the machine. Each run records the load average (1 min)"
        " before and after it and \"others' CPU\": the share of the machine's CPU time (both"
        " cores) that processes outside the benchmark used during the run (all busy time in"
        " `/proc/stat` minus that of this process's tree and of the embedded servers'; 0 % is a"
        " quiet machine, 50 % is one core taken). A disturbed figure is rerun with `--only`."
        " Per figure, load before → after, and others' CPU, the highest of its runs:",
        "",
    ]
    for key, figure in figures.items():
        env = figure.get("worker_env") or {}
        extra = f"; worker env {env}" if env else ""
        shares = [run["foreign_cpu"] for run in figure.get("runs", []) if "foreign_cpu" in run]
        others = f", others' CPU ≤ {100 * max(shares):.0f} %" if shares else ""
        state = figure.get("service", {})
        code = f"; commit {state['commit']}" if state else ""
        if state.get("uncommitted"):
            code += " + uncommitted " + ", ".join(f"`{path}`" for path in state["uncommitted"])
        if figure.get("service_changed"):
            code += ", **the service's files changed during the measurement**"
        lines.append(
            f"- {key}: load {figure['load_before'][0]:.2f} → {figure['load_after'][0]:.2f}"
            f"{others} (measured {figure['measured_at']}{code}{extra})"
        )
    lines += ["", "## The figures", ""]
    lines += _figure_sections(figures)
    lines += ["## Where the time goes", ""]
    if FINDINGS.exists():
        lines += [FINDINGS.read_text().strip(), ""]
    else:
        lines += ["(no profile findings written yet: `bench/findings.md`)", ""]
    lines += [
        "## Commands",
        "",
        "```sh",
        "make bench          # .venv/bin/python -m bench        (3 runs; ~10 minutes)",
        "make bench-smoke    # .venv/bin/python -m bench --smoke (1 run, tiny sizes; < 2 minutes)",
        "# one figure again, merged into bench/results.json and this file:",
        ".venv/bin/python -m bench --only read        # ingest | latency | read | replay",
        "# the machine's own servers instead of embedded ones:",
        ".venv/bin/python -m bench --database-url postgresql://postgres@127.0.0.1:5432/postgres \\",
        "    --nats-url nats://127.0.0.1:4222",
        "# profile the worker while it is measured (pip install py-spy into .venv first):",
        ".venv/bin/python -m bench --only ingest --runs 1 --profile /tmp/profiles",
        ".venv/bin/python -m bench.profile /tmp/profiles/ingest-1.txt",
        "```",
        "",
        "Invocations that produced the figures above:",
        "",
    ]
    for invocation in dict.fromkeys(results.get("invocations", [])):
        lines.append(f"- `{invocation}`")
    lines += [
        "",
        "Every worker is `faust -A streams.app worker -l info` with its settings in the"
        " environment: `ORDERS_DATABASE_URL` (a fresh database per figure),"
        " `ORDERS_NATS_URL`, `ORDERS_NATS_STREAM` / `ORDERS_NATS_SUBJECT` /"
        " `ORDERS_NATS_DURABLE` (a stream of its own, deleted afterwards), `ORDERS_WEB_PORT`"
        " (a free port) and `ORDERS_DATA_DIR` (a temporary folder); every other setting is the"
        " service's default.",
        "",
    ]
    return "\n".join(lines)


def _run_counts(figures: dict[str, Any]) -> str:
    counts = sorted({len(figure.get("runs", [])) for figure in figures.values()})
    return " or ".join(str(count) for count in counts) + " run(s)"


# The section of bench/volume.py (``make bench-scale``): kept as it is when the rest is written.
VOLUME_BEGIN: Final = "<!-- volume:begin (written by python -m bench.volume) -->"
VOLUME_END: Final = "<!-- volume:end -->"


def write(doc: Path, text: str) -> None:
    """Write the report into ``doc``, keeping the volume section already there."""
    old = doc.read_text() if doc.exists() else ""
    if VOLUME_BEGIN in old and VOLUME_END in old:
        kept = VOLUME_BEGIN + old.partition(VOLUME_BEGIN)[2].partition(VOLUME_END)[0] + VOLUME_END
        text = text.rstrip("\n") + "\n\n" + kept + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("results", nargs="?", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("doc", nargs="?", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    write(args.doc, render(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
