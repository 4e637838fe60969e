"""Retrying and telling of it: the waits between tries, and a failure logged once per episode.

Every loop that waits out a database or a NATS server that is away uses these two, so that
each backs off the same way and an operator reads one line when a failure starts, a reminder
now and then while it lasts, and one line when it is over, never a line per try.
"""

from __future__ import annotations

import logging
import time
from typing import Final

REMIND_EVERY_S: Final = 60.0


class Backoff:
    """Waits that double from ``first`` up to ``last`` seconds; :meth:`reset` after a success."""

    def __init__(self, first: float = 0.5, last: float = 5.0) -> None:
        self.first = first
        self.last = last
        self._next = first

    def next(self) -> float:
        """The wait before the next try; each call doubles the one after, up to ``last``."""
        wait = self._next
        self._next = min(wait * 2, self.last)
        return wait

    def reset(self) -> None:
        self._next = self.first


class Episode:
    """A failure that repeats, logged once when it starts (or changes), then at most every
    ``remind_s`` with how often it happened since, and once when :meth:`over` is called."""

    def __init__(self, logger: logging.Logger, remind_s: float = REMIND_EVERY_S) -> None:
        self._log = logger
        self._remind_s = remind_s
        self.problem: str | None = None
        self.since = 0.0
        self.failures = 0
        self._told_at = 0.0
        self._untold = 0

    def failed(self, problem: str, message: str, *args: object) -> None:
        """One more failure; ``message % args`` is logged when the episode starts, when the
        problem changes, and as a reminder."""
        now = time.monotonic()
        self.failures += 1
        if problem != self.problem:
            self.since = self.since or now
        elif now - self._told_at < self._remind_s:
            self._untold += 1
            return
        else:
            message = f"{message} (%d more since the last report; failing for %.0f s)"
            args = (*args, self._untold, now - self.since)
        self.problem = problem
        self._told_at, self._untold = now, 0
        self._log.warning(message, *args)

    def over(self, message: str, *args: object) -> None:
        """The failures have stopped: ``message % args`` is logged (if any failure was)."""
        if self.problem is None:
            return
        self._log.info(message, *args)
        self.problem = None
        self.since = 0.0
        self.failures = 0
        self._untold = 0
