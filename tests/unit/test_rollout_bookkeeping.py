"""decide_scale keeps the replicas asked for per model and the models below their minimum incrementally (bump)
instead of recounting them at every node gate. Driven over random plans of benchmarks/rollout_sim.py through the
simulated Ray (late, reordered requests, random stops, ghosts) and through realize(), the incremental values equal a
full recount at every gate, so every decision is the one the recounting code made."""

import random
import sys
from pathlib import Path

import pytest

import planner.placement.rollout as R
from planner.errors import InfeasiblePlanError
from planner.placement.packing import plan
from planner.placement.rollout import ModelRule, ScaleMemory, realize

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from fake_ray import FakeRay, drive  # noqa: E402
from rollout_sim import case  # noqa: E402


@pytest.mark.parametrize("seed", range(5000, 5012))
def test_incremental_bookkeeping_equals_a_recount_at_every_gate(seed, monkeypatch):
    monkeypatch.setattr(R, "VERIFY_BOOKKEEPING", True)
    gates = []
    real = R.node_gate
    monkeypatch.setattr(R, "node_gate", lambda *a, **k: gates.append(1) or real(*a, **k))
    rng = random.Random(seed)
    try:
        c, ds = case(rng)
        p = plan(ds, c, headroom=0.1, gpu_reserve_bytes=0, fraction_basis="usable")
    except (InfeasiblePlanError, ValueError):
        pytest.skip("this draw is infeasible")
    rules = {m.name: ModelRule(m.name, m.min_replicas, m.placed_replicas, 1.0, 2.0, 3.0) for m in p.models}
    ro = realize(p, rules)  # raises AssertionError on any drift
    fr, mem, now = FakeRay(ro, rng), ScaleMemory(), 0.0
    busy = {r.name: 1000.0 for r in ro.models}
    for loads, ticks in (({}, 15), (busy, 25), ({}, 15)):
        mem, now, _ = drive(fr, mem, loads, ticks, now)
    assert gates  # the check ran
