"""Small statistics for the figures: percentiles of samples, and the spread of runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in [0, 1]) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Min, median and max of the runs."""
    if not values:
        return math.nan, math.nan, math.nan
    return min(values), statistics.median(values), max(values)
