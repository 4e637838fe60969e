"""What every figure gets: the servers, the sizes, how many runs, and where to profile."""

from __future__ import annotations

import dataclasses
import sys
import time

from bench.profile import Profiler
from bench.servers import Servers


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each figure is: the issue's sizes, or tiny ones for the smoke run."""

    ingest_orders: int
    latency_rate: int
    latency_seconds: int
    latency_every: int
    read_orders: int
    read_seconds: int
    read_connections: int
    fixed_rate: int
    fixed_seconds: int
    fixed_workers: int
    replay_events: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            ingest_orders=200_000,
            latency_rate=2_000,
            latency_seconds=30,
            latency_every=10,
            read_orders=100_000,
            read_seconds=10,
            read_connections=64,
            fixed_rate=10_000,
            fixed_seconds=30,
            fixed_workers=50,
            replay_events=1_000_000,
        )

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            ingest_orders=2_000,
            latency_rate=200,
            latency_seconds=3,
            latency_every=10,
            read_orders=2_000,
            read_seconds=2,
            read_connections=64,
            fixed_rate=1_000,
            fixed_seconds=5,
            fixed_workers=10,
            replay_events=20_000,
        )


@dataclasses.dataclass
class Context:
    servers: Servers
    sizes: Sizes
    runs: int
    smoke: bool
    worker_env: dict[str, str]
    profiler: Profiler
    started: float = dataclasses.field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        """A progress line on stderr."""
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:7.1f} s] {text}", file=sys.stderr, flush=True)
