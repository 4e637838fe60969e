"""Backing off and telling of failures: promise 5, errors logged once per episode."""

from __future__ import annotations

import logging

import pytest

from streams.retry import Backoff, Episode


def test_backoff_doubles_up_to_its_limit_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(first=0.5, last=3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next() == 0.5


def test_an_episode_is_told_once_then_reminded_then_closed(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr("streams.retry.time.monotonic", lambda: now[0])
    episode = Episode(logging.getLogger("test.episode"), remind_s=60.0)
    with caplog.at_level(logging.INFO, logger="test.episode"):
        for _ in range(50):
            episode.failed("database away", "database away: %s", "refused")
            now[0] += 1.0
        episode.failed("permission denied", "denied")  # another problem is told at once
        now[0] += 61.0
        episode.failed("permission denied", "denied")  # a reminder
        episode.over("back after %d failures", episode.failures)
        episode.over("not told: no episode")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "database away: refused",
        "denied",
        "denied (0 more since the last report; failing for 111 s)",
        "back after 52 failures",
    ]
    assert episode.problem is None
