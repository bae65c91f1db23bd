"""The one percentile every benchmark reports: linear interpolation between the closest ranks (numpy's default,
``numpy.percentile(..., method="linear")``), so a p95 in one table compares with a p95 in another."""

from __future__ import annotations

import math


def percentile(values, p: float) -> float | None:
    """The ``p``-th percentile (0-100) of ``values``; None when there are none."""
    v = sorted(values)
    if not v:
        return None
    k = (len(v) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
