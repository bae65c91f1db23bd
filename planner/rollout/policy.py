"""The scaling rule: the replicas a model's load asks for, and when a model's goal moves to it (upscale and downscale
delays). Small pure functions, the way Ray Serve keeps ``calculate_desired_num_replicas`` apart from its deployment
state; decide_scale (scale.py) calls them. New signals (latency, queue, KV cache) land here."""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.rollout.deployments import ModelRule


def desired_replicas(rule: ModelRule, load: float) -> int:
    """Ray Serve's rule, summed over the model's deployments: ceil(ongoing requests / target_ongoing_requests),
    within [min_replicas, max_replicas]."""
    w = math.ceil(load / rule.target_ongoing_requests - 1e-9) if load > 0 else 0
    return max(rule.min_replicas, min(rule.max_replicas, w))


def move_goal(rule: ModelRule, want: int, now: float, goal: dict, up: dict, down: dict, current: int = 0) -> str:
    """Move the model's goal to ``want`` once it has wanted it for the delay (up and down timed apart); returns
    why, in words. ``goal``/``up``/``down`` are updated in place. A model without a goal yet (a fresh board, e.g.
    after Serve's controller restarted) starts from the ``current`` replicas Serve runs, so nothing drops at once."""
    m = rule.name
    g = max(goal.get(m, min(current, rule.max_replicas)), rule.min_replicas)
    why = "steady"
    if want == g:
        up.pop(m, None)
        down.pop(m, None)
    elif g == 0:  # scaled to zero and a request came: wake at once (the request waits for it, or was told to retry)
        up.pop(m, None)
        down.pop(m, None)
        g, why = want, f"wake: scale up from zero to {want}"
    else:
        rising = want > g
        since, other = (up, down) if rising else (down, up)
        delay, knob = (rule.upscale_delay_s, "upscale_delay_s") if rising else (rule.downscale_delay_s,
                                                                                 "downscale_delay_s")
        if want == 0 and rule.zero_after_s is not None:  # min 0: the last replica goes after zero_after_s idle
            delay, knob = rule.zero_after_s, "zero_after_s"
        other.pop(m, None)
        t0 = since.setdefault(m, now)
        if now - t0 >= delay - 1e-9:
            g, why = want, f"scale {'up' if rising else 'down'} to {want}"
            since.pop(m, None)
        else:
            why = f"wants {want}, waiting {delay - (now - t0):.1f}s more ({knob})"
    goal[m] = g
    return why


# NOTE: the thresholds of gpuplan's policy. A replica asked for now serves only after Serve's look-back window has
# seen the load (look_back_period_s), the upscale delay and the replica's start: 18-21 s with the settings of
# benchmarks/policy_replay.py, in which a burst of the shipped trace more than doubles a model's load. So the policy
# scales up when the batches are UP_FILL full, not when they overflow (at 100%, bursts queued requests for seconds
# before the new replica ran: `gpuplan simulate` of that benchmark's four models over 7 windows of the trace gave
# 0.8-2.1 points fewer requests within the SLO than Ray Serve's request rule; at 40%, 0-0.14 points fewer on
# 0.71-0.74x its replica-seconds), and down to the replicas that hold the load within DOWN_FILL of their batch slots
# (below UP_FILL, so that a steady load does not make the count flap). A p95 past UP_AT of its target while requests
# press scales up; the rate and the p95s must be within DOWN_BELOW of the capacity and the targets to scale down. A
# KV cache KV_FULL full is saturation.
UP_FILL = 0.4
DOWN_FILL = 0.35
UP_AT = 0.9
DOWN_BELOW = 0.7
KV_FULL = 0.95
SIGNAL_WINDOW_S = 30.0  # the window of a replica's TTFT/TPOT p95s and rate (Serve's look_back_period_s default)


@dataclass(frozen=True)
class ModelSignals:
    """What a model's replicas measured over the last window (their autoscaling metrics): summed over replicas, or the
    worst replica's where a sum means nothing (KV use, latency percentiles)."""

    replicas: int = 0  # replicas that reported
    load: float = 0.0  # requests in flight or queued (Serve's count and the direct stream's)
    waiting: float = 0.0  # sequences waiting inside the engines
    kv_usage: float = 0.0  # the fullest replica's share of its planned KV cache
    ttft_p95_s: float | None = None  # the worst replica's p95 over its window; None: no request finished
    tpot_p95_s: float | None = None
    requests_per_s: float = 0.0  # requests started per second


def signal_want(rule: ModelRule, sig: ModelSignals, current: int) -> tuple[int, str]:
    """gpuplan's rule: the replicas a model wants now, from ``current`` (the replicas it has been given), and why.

    Up when a p95 passes ``UP_AT`` of its target while requests press on the replicas (as many wait as there are
    replicas, or more are in flight than there are replicas: a slow window after a burst has drained adds nothing),
    when more requests are in flight than ``UP_FILL`` of the batches hold (``current x max_num_seqs``; at least one
    per replica, so that an engine of one slot scales when requests queue), when a KV cache is ``KV_FULL``, or when
    requests arrive faster than the replicas serve within the SLO (the plan's ``capacity_rps`` per replica): by one,
    or at once to the replicas the load or the rate needs. Down, when nothing says up, at once to the fewest replicas
    that keep the load within ``DOWN_FILL`` of their batch slots (DOWN_FILL / UP_FILL of the one-request floor) and
    the rate within ``DOWN_BELOW`` of their capacity, provided every p95 is within ``DOWN_BELOW`` of its target or
    nothing presses. Without an SLO, saturation alone. Always within [min_replicas, max_replicas]."""
    n = max(int(current), 0)
    lo, hi = rule.min_replicas, rule.max_replicas
    seqs = max(1, rule.max_num_seqs)

    def clamp(w: int) -> int:
        return max(lo, min(hi, w))

    if n == 0:
        return (clamp(1), "a request arrived for a model with no replica") if sig.load > 0 else (clamp(0), "idle")
    over = []
    pressed = sig.waiting >= n or sig.load > n
    for name, seen, target in (("TTFT", sig.ttft_p95_s, rule.slo_ttft_p95_s),
                               ("TPOT", sig.tpot_p95_s, rule.slo_tpot_p95_s)):
        if pressed and target and seen is not None and seen > UP_AT * target:
            over.append(f"{name} p95 {seen * 1e3:.0f} ms > {UP_AT:.0%} of its {target * 1e3:.0f} ms target")
    per = max(1.0, UP_FILL * seqs)  # what a replica holds before another is asked for (an engine of 1 slot: 1)
    fill = math.ceil(sig.load / per - 1e-9)
    if sig.load > n * per:
        over.append(f"{sig.load:.1f} requests > {n} x {per:.3g} ({UP_FILL:.0%} of max_num_seqs {seqs}, at least 1)")
    if sig.kv_usage >= KV_FULL:
        over.append(f"KV cache {sig.kv_usage:.0%} full")
    need = math.ceil(sig.requests_per_s / rule.capacity_rps - 1e-9) if rule.capacity_rps else 0
    if need > n:
        over.append(f"{sig.requests_per_s:.2f} req/s needs {need} replicas at {rule.capacity_rps:.2f} req/s each")
    if over:
        return clamp(max(n + 1, fill, need)), "up: " + "; ".join(over)
    low = per * DOWN_FILL / UP_FILL  # what a replica may hold when one fewer is enough
    keep = math.ceil(sig.load / low - 1e-9)
    room = f"{sig.load:.1f} requests within {{m}} x {low:.3g}"
    if rule.capacity_rps:
        by_rate = math.ceil(sig.requests_per_s / (DOWN_BELOW * rule.capacity_rps) - 1e-9)
        if by_rate >= keep:
            keep = by_rate
            room = f"{sig.requests_per_s:.2f} req/s within {DOWN_BELOW:.0%} of {{m}} x {rule.capacity_rps:.2f}"
    if lo == 0 and sig.load <= 0 and sig.requests_per_s <= 0 and sig.waiting <= 0:
        return 0, "idle (min 0: no request in flight or in the window)"
    m = clamp(max(1, keep))
    calm = not pressed or all(seen is None or not target or seen <= DOWN_BELOW * target
                              for seen, target in ((sig.ttft_p95_s, rule.slo_ttft_p95_s),
                                                   (sig.tpot_p95_s, rule.slo_tpot_p95_s)))
    if m < n and calm and sig.kv_usage < DOWN_BELOW:
        return m, "down: " + room.format(m=m)
    return clamp(n), "within target"


class LatencyWindow:
    """A replica's requests of the last ``window_s`` seconds: when each started, and the TTFT and TPOT of those that
    finished; their p95s and the arrival rate (the signals it reports with its autoscaling metrics). Clock injected."""

    def __init__(self, window_s: float = 30.0):
        from collections import deque

        self.window_s = float(window_s)
        self._rows = deque()  # (finished at, ttft_s, tpot_s or None)
        self._starts = deque()  # when requests started

    def start(self, now: float) -> None:
        self._starts.append(now)

    def add(self, now: float, ttft_s: float, tpot_s: float | None) -> None:
        self._rows.append((now, ttft_s, tpot_s))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._rows and self._rows[0][0] < now - self.window_s:
            self._rows.popleft()
        while self._starts and self._starts[0] < now - self.window_s:
            self._starts.popleft()

    def summary(self, now: float, started: float | None = None) -> dict:
        """p95 TTFT and TPOT in seconds (-1 when none finished), and requests started per second over the window (or
        since ``started`` when that is shorter)."""
        self._trim(now)
        ttft = sorted(r[1] for r in self._rows)
        tpot = sorted(r[2] for r in self._rows if r[2] is not None)
        span = self.window_s if started is None else max(1.0, min(self.window_s, now - started))
        return {"ttft_p95_s": _p95(ttft), "tpot_p95_s": _p95(tpot), "requests_per_s": len(self._starts) / span}


def _p95(xs: list) -> float:
    if not xs:
        return -1.0
    k = (len(xs) - 1) * 0.95
    i = int(k)
    j = min(i + 1, len(xs) - 1)
    return xs[i] + (xs[j] - xs[i]) * (k - i)
