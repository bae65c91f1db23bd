"""How fast and how good is the placement planner?

    .venv/bin/python -m benchmarks.plan_scale [--repeat 3] [--json out.json]

Scenarios (deterministic, seeded):

* ``large``: 1,000 GPUs (125 nodes x 8, four GPU types) x 50 models with three quantization options each, some
  pinned to a GPU type, some needing host RAM. Target: planned in under 1 s (heuristic path; the exact search is
  skipped above ``EXACT_MAX_VARS`` model x GPU pairs).
* ``exact``: 64 GPUs (8 nodes x 8, two types) x 12 models whose maxima exceed the cluster, solved to a proven
  optimum of total replicas placed by the integer program (HiGHS via scipy.optimize.milp). Target: status optimal.
* ``tight``: 16 GPUs x 48 single-replica models, "triplets" filling every GPU's usable memory exactly: best-fit
  decreasing fails and the exact search (column generation) places the minimums.
* ``cpu``: 64 CPU-only nodes x 50 models: every replica a CPU replica.

Times are wall-clock seconds of ``plan()`` (median of ``--repeat`` runs after one warm-up run that pays for the lazy
numpy/scipy imports; the warm-up time is printed too).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common.machine import machine_line  # noqa: E402
from planner.cluster.inventory import Cluster, Gpu, Node  # noqa: E402
from planner.placement.packing import EXACT_MAX_VARS, ModelDemand, QuantOption, plan  # noqa: E402
from planner.units import GiB, MiB  # noqa: E402

# (type, NVML-like total MiB)
GPU_KINDS = [("A100-80GB", 81920), ("H100", 81559), ("L40S", 46068), ("A10G", 23028)]
PARAMS_B = [1.2, 3.2, 7.6, 8.0, 9.2, 13.0, 14.7, 32.5]  # billions of parameters


def cluster_of(n_nodes: int, gpus_per_node: int, kinds, ram=1024 * GiB) -> Cluster:
    nodes = []
    for n in range(n_nodes):
        t, mib = kinds[n % len(kinds)]
        gpus = tuple(
            Gpu(id=f"node-{n}/gpu-{i}", name=f"NVIDIA {t}", total_bytes=mib * MiB, node=f"node-{n}", index=i, gpu_type=t)
            for i in range(gpus_per_node)
        )
        nodes.append(Node(name=f"node-{n}", cpu_memory_bytes=ram, gpus=gpus))
    return Cluster(nodes=tuple(nodes))


def model_options(params_b: float, kv_gib: float) -> tuple[QuantOption, ...]:
    def size(bytes_per_param: float) -> int:
        return int((params_b * 1e9 * bytes_per_param + (kv_gib + 0.6) * GiB) // MiB * MiB)

    return (QuantOption("bf16", size(2.0)), QuantOption("int8", size(1.05)), QuantOption("int4", size(0.56)))


def models(n: int, seed: int, *, max_lo: int, max_hi: int, pin_types=(), pin_every=0, cpu_every=0) -> list[ModelDemand]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.choice(PARAMS_B)
        opts = model_options(p, kv_gib=rng.choice([1.0, 2.0, 4.0]))
        if cpu_every and i % cpu_every == 0:
            opts = tuple(QuantOption(o.quantization, o.replica_bytes, 2 * GiB) for o in opts)
        mn = rng.randint(1, 3)
        mx = mn + rng.randint(max_lo, max_hi)
        pin = pin_types[i % len(pin_types)] if pin_every and i % pin_every == 0 else None
        out.append(ModelDemand(f"m{i:02d}-{p:g}b", opts, mn, mx, gpu_type=pin))
    return out


def triplets(n_bins: int, total_bytes: int, seed: int) -> list[ModelDemand]:
    """Falkenauer-style "triplets": every GPU is filled exactly by three replicas each between 1/4 and 1/2 of its
    usable memory, one model per replica, shuffled. Best-fit decreasing almost never finds the packing."""
    rng = random.Random(seed)
    usable = (int(total_bytes * 0.9) - 512 * MiB) // MiB * MiB
    lo, hi = int(usable * 0.26) // MiB, int(usable * 0.47) // MiB
    sizes = []
    for _ in range(n_bins):
        while True:
            a, b = rng.randint(lo, hi) * MiB, rng.randint(lo, hi) * MiB
            c = usable - a - b
            if usable * 0.25 < c < usable * 0.5:
                break
        sizes += [a, b, c]
    rng.shuffle(sizes)
    return [ModelDemand(f"t{i:02d}", (QuantOption("bf16", s),), 1, 1) for i, s in enumerate(sizes)]


def check(p) -> None:
    """The plan never over-commits: bytes within usable, Ray units within one GPU, counts within [min, max]."""
    for g in p.gpus:
        assert sum(r.bytes for r in g.replicas) == g.used_bytes <= g.usable_bytes, g.id
        assert sum(round(r.num_gpus * 10_000) for r in g.replicas) <= 10_000, g.id
    for m in p.models:
        assert m.min_replicas <= m.placed_replicas <= m.max_replicas, m.name


def rollout_scenarios() -> list[dict]:
    """Plan and rollout together, one run each: 1,000 GPUs x 50 models with loose minimums, with maxima beyond the
    cluster (capacity-bound) and with minimums at half the maxima (tight); 504 GPUs x 40 models, tight."""
    from dataclasses import replace

    import planner.rollout as rollout
    from planner.rollout import gate

    cases = [("large", "1000 GPUs x 50 models, loose minimums", cluster_of(125, 8, GPU_KINDS),
              models(50, 1, max_lo=4, max_hi=60, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5))]
    cases.append(("capacity", "1000 GPUs x 50 models, maxima beyond it", cluster_of(125, 8, GPU_KINDS),
                  models(50, 1, max_lo=40, max_hi=160, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5)))
    big = models(50, 1, max_lo=4, max_hi=60, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5)
    cases.append(("tight-1000", "1000 GPUs x 50 models, min = max / 2", cluster_of(125, 8, GPU_KINDS),
                  [replace(m, min_replicas=max(m.min_replicas, m.max_replicas // 2)) for m in big]))
    tight = models(40, 1, max_lo=4, max_hi=60, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5)
    cases.append(("tight-min", "504 GPUs x 40 models, min = max / 2", cluster_of(63, 8, GPU_KINDS),
                  [replace(m, min_replicas=max(m.min_replicas, m.max_replicas // 2)) for m in tight]))
    out = []
    for key, what, cluster, ms in cases:
        gate._MEMO.clear()  # a cold search memo, as in a fresh process
        t0 = time.perf_counter()
        p = plan(ms, cluster)
        t1 = time.perf_counter()
        r = rollout.realize(p)
        t2 = time.perf_counter()
        out.append({"scenario": key, "what": what, "plan_s": round(t1 - t0, 3), "rollout_s": round(t2 - t1, 3),
                    "total_s": round(t2 - t0, 3), "replicas": sum(d.planned for d in r.deployments),
                    "packed": p.solver.placed})
    return out


CLI_SOURCES = ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct",
               "mistralai/Mistral-7B-Instruct-v0.3", "google/gemma-2-9b-it", "meta-llama/Llama-3.2-3B-Instruct",
               "meta-llama/Llama-3.2-1B-Instruct", "microsoft/Phi-3-mini-4k-instruct", "Qwen/Qwen3-32B",
               "Qwen/Qwen2.5-32B-Instruct", "openai/gpt-oss-20b", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B")


def cli_files(directory: Path, n_models: int = 40, seed: int = 1, max_range: tuple[int, int] = (4, 24)) -> tuple[Path, Path]:
    """A deploy file of ``n_models`` entries over the catalog's real configs (int4 or int8; gpt-oss at its mxfp4;
    max drawn from ``max_range`` replicas, min = max / 2) and a cluster declaration of 63 nodes x 8 GPUs of four
    types: what a user would hand `gpuplan plan` for a 504-GPU cluster. With maxima of 4-24 the minimums take a
    quarter of the cluster (loose); with 24-80 they take most of it and the maxima exceed it (tight)."""
    import yaml

    rng = random.Random(seed)
    entries = []
    for i in range(n_models):
        src = CLI_SOURCES[i % len(CLI_SOURCES)]
        mx = rng.randint(*max_range)
        entries.append({"name": f"m{i}", "source": src,
                        "quantization": ["mxfp4"] if src == "openai/gpt-oss-20b" else ["int4", "int8"],
                        "max_model_len": 4096, "max_num_seqs": 4, "replicas": {"min": mx // 2, "max": mx}})
    deploy = {"applications": [{"name": "llm", "route_prefix": "/", "import_path": "serve.app:build_app",
                                "args": {"headroom": 0.1, "cluster": "auto", "models": entries}}]}
    nodes = [{"name": k.lower(), "replicas": n, "cpu_memory": "512GiB", "num_cpus": 64,
              "gpus": [{"name": k, "count": 8}]} for k, n in (("A10G", 16), ("L4", 16), ("L40S", 16), ("A100-80GB", 15))]
    d, c = directory / "deploy.yaml", directory / "cluster.yaml"
    d.write_text(yaml.safe_dump(deploy, sort_keys=False))
    c.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
    return d, c


CLI_CASES = (("cli-504", "504 GPUs x 40 real models, max 4-24, min = max / 2", (4, 24)),
             ("cli-504-tight", "504 GPUs x 40 real models, max 24-80, min = max / 2", (24, 80)))


def cli_scenario(repeat: int) -> list[dict]:
    """`python -m planner plan deploy.yaml --cluster cluster.yaml --json` on :func:`cli_files` (loose and tight),
    whole processes (start-up, imports, reading the configs, plan, rollout, JSON), the median of ``repeat`` runs."""
    import subprocess
    import tempfile

    rows = []
    for key, what, max_range in CLI_CASES:
        with tempfile.TemporaryDirectory() as tmp:
            d, c = cli_files(Path(tmp), max_range=max_range)
            times, out = [], None
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "planner", "plan", str(d), "--cluster", str(c), "--json"],
                                   capture_output=True, text=True, cwd=ROOT)
                times.append(time.perf_counter() - t0)
                if p.returncode != 0:
                    raise SystemExit(f"plan_scale: gpuplan plan failed ({p.returncode}): {p.stderr.strip()}")
                out = json.loads(p.stdout)
        rows.append({"scenario": key, "what": f"gpuplan plan: {what}", "median_s": round(statistics.median(times), 3),
                     "runs": [round(t, 3) for t in times], "replicas": sum(m["placed_replicas"] for m in out["models"]),
                     "min_total": sum(m["min_replicas"] for m in out["models"]),
                     "planned": sum(d["planned"] for d in out["rollout"]["deployments"]),
                     "plan_id": out["rollout"].get("plan_id"), "gpus": len(out["gpus"]), "target_s": 2.0})
    return rows


def timed(fn, repeat: int):
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, first, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--no-rollout", action="store_true", help="skip the plan + rollout scenarios (seconds each)")
    args = ap.parse_args(argv)

    scenarios = []
    big = cluster_of(125, 8, GPU_KINDS)
    big_models = models(50, 1, max_lo=4, max_hi=60, pin_types=("L40S", "A10G"), pin_every=7, cpu_every=5)
    scenarios.append(("large", "1000 GPUs x 50 models", lambda: plan(big_models, big), 1.0))

    ex_cluster = cluster_of(8, 8, [("A100-80GB", 81920), ("L40S", 46068)])
    ex_models = models(12, 2, max_lo=20, max_hi=60)
    scenarios.append(("exact", "64 GPUs x 12 models", lambda: plan(ex_models, ex_cluster, exact=True, time_limit_s=60), None))

    tight_cluster = cluster_of(2, 8, [("A10G", 23028)])
    tight = triplets(16, 23028 * MiB, seed=3)
    scenarios.append(("tight", f"16 GPUs x {len(tight)} models, 100% full", lambda: plan(tight, tight_cluster), None))

    cpu_cluster = Cluster(nodes=tuple(Node(f"cpu-{i}", 512 * GiB) for i in range(64)))
    cpu_models = models(50, 4, max_lo=2, max_hi=10)
    scenarios.append(("cpu", "64 CPU nodes x 50 models", lambda: plan(cpu_models, cpu_cluster), None))

    rows = []
    for key, what, fn, target in scenarios:
        p, first, med = timed(fn, args.repeat)
        check(p)
        s = p.solver
        rows.append(
            {
                "scenario": key,
                "what": what,
                "first_s": round(first, 3),
                "median_s": round(med, 3),
                "target_s": target,
                "placed": s.placed,
                "min_total": sum(m.min_replicas for m in p.models),
                "max_total": sum(m.max_replicas for m in p.models),
                "quant": s.quantization_search,
                "mins": s.min_placement,
                "fill": s.fill,
                "optimal": s.optimal,
                "bound": s.bound,
                "status": s.status,
            }
        )

    import numpy
    import scipy

    print(machine_line(cpu=platform.processor() or platform.machine(), numpy=numpy.__version__,
                       scipy=scipy.__version__, EXACT_MAX_VARS=EXACT_MAX_VARS))
    hdr = f"{'scenario':<8} {'what':<34} {'first s':>8} {'median s':>9} {'placed':>7} {'min/max':>10} {'quant':>10} {'mins':>9} {'fill':>8} {'optimal':>8}"
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for r in rows:
        print(
            f"{r['scenario']:<8} {r['what']:<34} {r['first_s']:>8.3f} {r['median_s']:>9.3f} {r['placed']:>7} "
            f"{str(r['min_total']) + '/' + str(r['max_total']):>10} {r['quant']:>10} {r['mins']:>9} {r['fill']:>8} "
            f"{str(r['optimal']):>8}"
        )
        if r["target_s"] is not None and r["median_s"] > r["target_s"]:
            ok = False
    for r in rows:
        print(f"  {r['scenario']}: {r['status']}" + (f" (bound {r['bound']})" if r["bound"] is not None else ""))
    exact_row = next(r for r in rows if r["scenario"] == "exact")
    if not exact_row["optimal"]:
        ok = False
    print("targets: large < 1 s median, exact proven optimal ->", "MET" if ok else "NOT MET")
    rollout_rows = [] if args.no_rollout else rollout_scenarios()
    if rollout_rows:
        print(f"\nplan + rollout (planner.rollout.realize with a cold search memo, as build_app in a fresh process); "
              "target < 1 s each")
        print(f"{'scenario':<12} {'what':<40} {'plan s':>7} {'rollout s':>10} {'total s':>8} {'packed':>7} "
              f"{'planned':>8}")
        for r in rollout_rows:
            print(f"{r['scenario']:<12} {r['what']:<40} {r['plan_s']:>7.3f} {r['rollout_s']:>10.3f} "
                  f"{r['total_s']:>8.3f} {r['packed']:>7} {r['replicas']:>8}")
        met = all(r["total_s"] < 1.0 for r in rollout_rows)
        print("targets: plan + rollout < 1 s ->", "MET" if met else "NOT MET")
        ok = ok and met
    cli_rows = [] if args.no_rollout else cli_scenario(args.repeat)
    for r in cli_rows:
        print(f"\n{r['what']} (whole process, {len(r['runs'])} runs): median {r['median_s']:.3f} s {r['runs']}, "
              f"{r['replicas']} replicas placed (minimums {r['min_total']}), {r['planned']} planned by the rollout "
              f"{r['plan_id']}, {r['gpus']} GPUs; target < {r['target_s']:g} s: "
              + ("MET" if r["median_s"] < r["target_s"] else "NOT MET"))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "rollout": rollout_rows, "cli": cli_rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
