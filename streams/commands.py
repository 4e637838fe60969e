"""Operators' commands of the app: ``faust -A streams.app replay [--verify]``."""

from __future__ import annotations

import sys

import faust
from faust.cli import AppCommand, option
from tqdm import tqdm  # type: ignore[import-untyped]

from streams.runtime import Runtime
from streams.validation import Rejected, validate

_INVALID_SHOWN = 50


def install_commands(app: faust.App, runtime: Runtime) -> None:
    """Register the app's commands; they run on the parts ``runtime`` holds."""

    @app.command(
        option(
            "--verify", is_flag=True, default=False, help="Also re-validate every stored order."
        ),
    )
    async def replay(self: AppCommand, verify: bool) -> None:
        """Rebuild the view from orders_events and report count, time and rate."""
        # A running count on a terminal only; the summary line below is the record.
        with tqdm(
            desc="replaying", unit=" events", disable=not sys.stderr.isatty(), leave=False
        ) as progress:
            stats = await runtime.replay(progress.update)
        view = runtime.view
        self.say(
            f"replayed {stats.events} events into {len(view)} orders "
            f"(last seq {stats.last_seq}) in {stats.seconds:.2f} s "
            f"({stats.rate:,.0f} events/s)"
        )
        if verify:
            failures = [
                (uid, verdict.reason)
                for uid, payload in view.items()
                if isinstance(verdict := validate(payload), Rejected)
            ]
            for uid, reason in failures[:_INVALID_SHOWN]:
                self.say(f"invalid stored order {uid}: {reason}")
            self.say(f"verified {len(view)} stored orders: {len(failures)} invalid")
            if failures:
                raise SystemExit(1)
