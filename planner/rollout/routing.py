"""Routing a request to one of a model's deployments."""

from __future__ import annotations

from typing import Callable, Sequence


def pick_deployment(cands: Sequence[tuple[str, int, int]], rand: Callable[[], float]) -> str | None:
    """Power of two choices over ``(deployment, running replicas, requests in flight)``: two distinct deployments
    with running replicas drawn at random, the one with fewer requests in flight per running replica wins (ties:
    the first drawn). None when no deployment has a running replica."""
    live = [c for c in cands if c[1] > 0]
    if not live:
        return None
    if len(live) == 1:
        return live[0][0]
    i = min(int(rand() * len(live)), len(live) - 1)
    j = min(int(rand() * (len(live) - 1)), len(live) - 2)
    if j >= i:
        j += 1
    score = lambda c: (c[2] + 1) / c[1]  # noqa: E731
    return live[j][0] if score(live[j]) < score(live[i]) else live[i][0]
