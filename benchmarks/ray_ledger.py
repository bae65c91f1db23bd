"""Does Ray's ledger hold the plan? Before and after one deployment per (model, node).

    .venv/bin/python -m benchmarks.ray_ledger [--json out.json]

1. **Reserved but unplanned GPU memory** on mixed clusters: Ray fraction x the bytes it is a fraction of, minus the
   replica's planned bytes, summed over every planned replica. *Before*: one deployment per model whose num_gpus is
   the largest fraction any of its replicas needs (what serve/app/build.py did), so a replica planned on a big GPU
   reserves a small GPU's share of it. *After*: each replica asks its node's fraction (planner/rollout/). Also:
   how many planned replicas Ray would leave pending because their GPU's requests no longer add up to one GPU.
2. **Scale**: a plan of 64 nodes x 8 GPUs x 12 models: how many deployments it makes, and how long build_app's
   work takes (plan, rollout with its bring-up check, Serve options, binding the Serve application).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


from benchmarks.common.machine import machine_line  # noqa: E402
from planner.config import load_deploy_file, parse_deploy_args  # noqa: E402
from planner.planning import cluster_from_decl, make_plan  # noqa: E402
from planner.units import GiB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIXED = {  # the cluster of issue 9: 2 nodes x 4 L4 (24 GB) and 1 node x 8 H100 (80 GB)
    "l4x4x2+h100x8": {"nodes": [
        {"name": "l4", "replicas": 2, "cpu_memory": "160GiB", "gpus": [{"name": "L4", "count": 4}]},
        {"name": "h100", "cpu_memory": "900GiB", "gpus": [{"name": "H100", "count": 8}]}]},
    "a10g x4 + a100-80 x2 + l40s x2": {"nodes": [
        {"name": "a10g", "cpu_memory": "160GiB", "gpus": [{"name": "A10G", "count": 4}]},
        {"name": "a100", "cpu_memory": "400GiB", "gpus": [{"name": "A100-80GB", "count": 2}]},
        {"name": "l40s", "cpu_memory": "200GiB", "gpus": [{"name": "L40S", "count": 2}]}]},
}


def ledger(result) -> dict:
    """Reserved-but-unplanned bytes and over-committed GPUs, before (one num_gpus per model) and after."""
    plan = result.plan
    old = {m.name: max((r.num_gpus for g in plan.gpus for r in g.replicas if r.model == m.name), default=0.0)
           for m in plan.models}
    ro = result.rollout
    new = {(d.model, d.node): d.num_gpus for d in ro.deployments}
    out = {"replicas": 0, "before_unplanned": 0, "after_unplanned": 0, "before_pending": 0, "after_pending": 0}
    for g in plan.gpus:
        basis = g.ray_basis_bytes
        before = sorted((old[r.model] for r in g.replicas), reverse=True)
        after = [new[(r.model, g.node)] for r in g.replicas]
        for r, a in zip(g.replicas, after):
            out["replicas"] += 1
            out["before_unplanned"] += int(old[r.model] * basis) - r.bytes
            out["after_unplanned"] += int(a * basis) - r.bytes
        for key, fr in (("before", before), ("after", sorted(after, reverse=True))):
            used = 0.0
            for f in fr:  # what one GPU can admit of the requests the plan puts on it
                if used + f <= 1.0 + 1e-9:
                    used += f
                else:
                    out[f"{key}_pending"] += 1
    return out


def scale(repeat: int) -> dict:
    """64 nodes x 8 GPUs x 12 models (two GPU types): deployments, and build_app's work, timed."""
    from benchmarks.plan_scale import cluster_of, models  # the planner benchmark's generators

    from planner.config import DeployArgs
    from planner.placement.packing import plan as pack
    from planner.rollout import realize
    from planner.planning import model_rules

    c = cluster_of(64, 8, [("A100-80GB", 81920), ("L40S", 46068)])
    ds = models(12, 2, max_lo=20, max_hi=60)
    times = {"plan": [], "rollout": [], "serve_options": [], "bind": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = pack(ds, c, fraction_basis="usable")
        t1 = time.perf_counter()
        args = DeployArgs.model_validate({"models": [{"name": d.name, "source": "x", "replicas": {
            "min": d.min_replicas, "max": d.max_replicas}} for d in ds]})
        ro = realize(p, model_rules(args))
        t2 = time.perf_counter()
        from planner.rollout import deployment_options

        entries = {m.name: m for m in args.models}
        opts = [deployment_options(d, entries[d.model], {"gpuplan.io/node": d.node}, ro.plan_id)
                for d in ro.deployments]
        t3 = time.perf_counter()
        from serve.app.replica import ModelReplica

        bound = [ModelReplica.options(**o).bind({"name": o["name"]}) for o in opts]
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(v)
    per_model = sorted(len(ro.of_model(m.name)) for m in ro.models)
    return {"gpus": len(c.gpus), "nodes": len(c.nodes), "models": len(ds), "replicas": p.solver.placed,
            "deployments": len(ro.deployments), "bound": len(bound),
            "deployments_per_model": [per_model[0], per_model[-1]], "notes": len(ro.notes),
            "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    args, _ = load_deploy_file(str(ROOT / "k8s" / "deploy.yaml"))
    rows = []
    for name, decl in MIXED.items():
        d = parse_deploy_args({"cluster": decl, "models": [m.model_dump() for m in args.models]})
        r = make_plan(d, cluster_from_decl(d.cluster))
        rows.append(dict(cluster=name, **ledger(r)))
    print(machine_line())
    print("k8s/deploy.yaml (llama-3.1-8b int4, qwen2.5-7b int8), planned at every model's max:")
    hdr = (f"{'cluster':<32} {'replicas':>8} {'unplanned before':>17} {'after':>9} {'pending before':>15} "
           f"{'after':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['cluster']:<32} {r['replicas']:>8} {r['before_unplanned'] / GiB:>13.1f} GiB "
              f"{r['after_unplanned'] / GiB:>5.2f} GiB {r['before_pending']:>15} {r['after_pending']:>6}")
    s = scale(a.repeat)
    print(f"\nscale: {s['nodes']} nodes x 8 GPUs ({s['gpus']}) x {s['models']} models: {s['replicas']} replicas in "
          f"{s['deployments']} deployments ({s['deployments_per_model'][0]}-{s['deployments_per_model'][1]} per "
          f"model), {s['notes']} rollout notes")
    print("  build_app's work, median of {}: ".format(a.repeat)
          + ", ".join(f"{k} {v:.3f} s" for k, v in s["seconds"].items())
          + f" = {sum(s['seconds'].values()):.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"ledger": rows, "scale": s}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
