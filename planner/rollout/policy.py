"""The scaling rule: the replicas a model's load asks for, and when a model's goal moves to it (upscale and downscale
delays). Small pure functions, the way Ray Serve keeps ``calculate_desired_num_replicas`` apart from its deployment
state; decide_scale (scale.py) calls them. New signals (latency, queue, KV cache) land here."""

from __future__ import annotations

import math

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
    else:
        rising = want > g
        since, other = (up, down) if rising else (down, up)
        delay, word = (rule.upscale_delay_s, "up") if rising else (rule.downscale_delay_s, "down")
        other.pop(m, None)
        t0 = since.setdefault(m, now)
        if now - t0 >= delay - 1e-9:
            g, why = want, f"scale {word} to {want}"
            since.pop(m, None)
        else:
            why = f"wants {want}, waiting {delay - (now - t0):.1f}s more ({word}scale_delay_s)"
    goal[m] = g
    return why
