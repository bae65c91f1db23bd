"""decide_scale keeps the replicas asked for per model and the models below their minimum incrementally (bump)
instead of recounting them at every node gate. Driven over random plans of benchmarks/rollout_sim.py through the
simulated Ray (late, reordered requests, random stops, ghosts) and through realize(), the incremental values equal a
full recount at every gate, so every decision is the one the recounting code made."""

import random

import pytest

import planner.rollout.scale as R
from planner.errors import InfeasiblePlanError
from planner.placement.packing import plan
from planner.rollout import ModelRule, ScaleMemory, realize

from benchmarks.common.fake_ray import FakeRay, drive
from benchmarks.rollout_sim import case


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


def test_realize_is_the_same_whatever_the_process_searched_before():
    """The gate searches share a memo and a budget (a remembered answer costs none), so a bring-up's order, and the GPU
    layouts it records, once depended on what the process had planned before: realize() of this tight plan gave one
    rollout cold and another right after itself. The driver, `gpuplan plan` and the KubeRay render must agree."""
    import json
    from dataclasses import replace

    from benchmarks import plan_scale as ps

    tight = [replace(m, min_replicas=max(m.min_replicas, m.max_replicas // 2))
             for m in ps.models(40, 1, max_lo=4, max_hi=60, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5)]
    p = plan(tight, ps.cluster_of(63, 8, ps.GPU_KINDS))
    other = plan(ps.models(12, 2, max_lo=2, max_hi=9), ps.cluster_of(6, 4, ps.GPU_KINDS))
    first = json.dumps(realize(p).to_json(), sort_keys=True)
    realize(other)
    assert json.dumps(realize(p).to_json(), sort_keys=True) == first
    assert json.dumps(realize(p).to_json(), sort_keys=True) == first
