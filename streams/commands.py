"""Operators' commands of the app: ``faust -A streams.app replay [--verify]``."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

from faust.cli import AppCommand, option

from streams.runtime import open_store, resolve_database_url
from streams.validation import Rejected, validate
from views.view import OrdersView, restore

if TYPE_CHECKING:
    from streams.app import OrdersApp


def install_commands(app: OrdersApp) -> None:
    """Register the app's commands."""

    @app.command(
        option(
            "--verify", is_flag=True, default=False, help="Also re-validate every stored order."
        ),
    )
    async def replay(self: AppCommand, verify: bool) -> None:
        """Rebuild the view from orders_events and report count, time and rate."""
        settings = app.settings
        url = await resolve_database_url(settings)
        # A command says at once that the schema is missing rather than wait for it.
        store = await asyncio.wait_for(
            open_store(url, lambda: False, writer=False, wait_for_schema=False), timeout=60
        )
        assert store is not None
        try:
            view = OrdersView()
            progress = _progress(enabled=sys.stderr.isatty())
            stats = await restore(view, store, settings.replay_page_size, progress)
            if progress is not None:
                progress(0)
                print(file=sys.stderr)
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
                for uid, reason in failures[:50]:
                    self.say(f"invalid stored order {uid}: {reason}")
                self.say(f"verified {len(view)} stored orders: {len(failures)} invalid")
                if failures:
                    raise SystemExit(1)
        finally:
            await store.close()


def _progress(*, enabled: bool) -> _Counter | None:
    return _Counter() if enabled else None


class _Counter:
    """A one-line running count on a terminal; the replay prints its summary after it."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, added: int) -> None:
        self.total += added
        print(f"\rreplaying… {self.total:,} events", end="", file=sys.stderr, flush=True)
