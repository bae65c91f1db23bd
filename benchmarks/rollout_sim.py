"""How well does gpuplan's rollout bring plans up and down through Ray's best-fit GPU choice?

    .venv/bin/python -m benchmarks.rollout_sim [--cases 60] [--seed 5000]

Random clusters (1-3 nodes of 4 or 8 GPUs of 24 or 80 GiB) and 2-6 models (3-40 GiB replicas, min 0-3, max 2-20),
planned by the packer to every model's max, realised (planner.rollout.realize), then driven through the simulated
Ray of benchmarks/common/fake_ray.py (requests reach the raylet late and in random order, Serve stops random replicas,
stopped replicas hold their share a few ticks): idle 40 ticks (minimums), busy 80 (every model wants its max), idle 40, busy 120 again (a tick is one
policy round, about a second of Serve time).
Prints how many cases reached every planned replica both times with nothing pending and came back to the minimums,
how many replicas realize() planned below the packer (search budget or best fit), and the time one decision takes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common import fake_ray  # noqa: E402
from benchmarks.common.fake_ray import FakeRay, drive  # noqa: E402
from benchmarks.common.machine import machine_line  # noqa: E402

import planner.rollout as R  # noqa: E402
from planner.errors import InfeasiblePlanError  # noqa: E402
from planner.cluster.inventory import Cluster, Gpu, Node  # noqa: E402
from planner.placement.packing import ModelDemand, QuantOption  # noqa: E402
from planner.planning import plan_realized  # noqa: E402
from planner.rollout import ModelRule, ScaleMemory  # noqa: E402
from planner.units import GiB  # noqa: E402


def case(rng: random.Random):
    nodes = []
    for n in range(rng.randint(1, 3)):
        k, size = rng.choice([4, 8]), rng.choice([24, 80])
        nodes.append(Node(f"n{n}", 2048 * GiB, tuple(Gpu(f"n{n}/gpu-{i}", "X", size * GiB, node=f"n{n}", index=i,
                                                         gpu_type=f"T{size}") for i in range(k))))
    demands = []
    for m in range(rng.randint(2, 6)):
        mn = rng.randint(0, 3)
        demands.append(ModelDemand(f"m{m}", (QuantOption("bf16", int(rng.uniform(3, 40) * GiB)),), mn,
                                   max(mn, rng.randint(2, 20))))
    return Cluster(tuple(nodes)), demands


def rules_of(p) -> dict:
    return {m.name: ModelRule(m.name, m.min_replicas, m.placed_replicas, 1.0, 2.0, 3.0) for m in p.models}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--verbose", action="store_true", help="print the cases that fall short")
    a = ap.parse_args(argv)
    decide = R.decide_scale
    times: list[float] = []

    def timed(*args, **kw):
        t0 = time.perf_counter()
        out = decide(*args, **kw)
        times.append(time.perf_counter() - t0)
        return out

    fake_ray.decide_scale = timed
    rows = []
    for i in range(a.cases):
        rng = random.Random(a.seed + i)
        try:
            c, ds = case(rng)
            t0 = time.perf_counter()
            p, ro = plan_realized(ds, c, rules_of, headroom=0.1, gpu_reserve_bytes=0, fraction_basis="usable")
            t_realize = time.perf_counter() - t0  # plan and realize, as make_plan runs them
        except (InfeasiblePlanError, ValueError):
            continue
        mx = {r.name: r.max_replicas for r in ro.models}
        mn = {r.name: r.min_replicas for r in ro.models}
        busy = {r.name: 1000.0 for r in ro.models}
        fr, mem, now = FakeRay(ro, rng), ScaleMemory(), 0.0
        ok, why = True, ""
        for phase, (loads, ticks, want) in enumerate((({}, 40, mn), (busy, 80, mx), ({}, 40, mn), (busy, 120, mx))):
            mem, now, _ = drive(fr, mem, loads, ticks, now)
            got = {m: fr.count(m) for m in mx}
            if ok and (got != want or fr.pending()):
                ok, why = False, f"phase {phase}: {got} want {want}, pending {fr.pending()}"
        if not ok and a.verbose:
            print(f"case {a.seed + i}: {why}")
        rows.append({"replicas": p.solver.placed, "kept": sum(mx.values()), "ok": ok, "realize_s": t_realize,
                     "gpus": len(c.gpus)})
    times.sort()
    print(machine_line())
    n = len(rows)
    lost = sum(r["replicas"] - r["kept"] for r in rows)
    print(f"cases planned: {n} (of {a.cases} drawn; the rest infeasible) | GPUs per case {min(r['gpus'] for r in rows)}"
          f"-{max(r['gpus'] for r in rows)} | replicas per case {min(r['replicas'] for r in rows)}-"
          f"{max(r['replicas'] for r in rows)}")
    print(f"every planned replica up twice, none pending, back to the minimums: {sum(r['ok'] for r in rows)} of {n}")
    print(f"replicas realize() planned below the packer: {lost} of {sum(r['replicas'] for r in rows)} "
          f"in {sum(r['replicas'] > r['kept'] for r in rows)} case(s)")
    print(f"plan + realize(): median {statistics.median(r['realize_s'] for r in rows):.3f} s, max "
          f"{max(r['realize_s'] for r in rows):.3f} s")
    print(f"decide_scale over {len(times)} calls: median {times[len(times) // 2] * 1e3:.2f} ms, p99 "
          f"{times[int(len(times) * 0.99)] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
