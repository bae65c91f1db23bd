"""Scaling policies side by side on a served plan: a trace replayed against simulated replicas of four models on a
declared 16-GPU cluster, under gpuplan's policy, Ray Serve's request rule and a fixed fleet sized for the peak; and
what `gpuplan simulate` predicted for the same requests.

    python -m benchmarks.policy_replay [--duration 300] [--warmup 60] [--policies gpuplan requests fixed] [--json FILE]

The cluster is Ray's (ray.cluster_utils: one head and four nodes of four fake L4s each, labelled as the declared
nodes), on this machine; the models run `engine: sim` (serve/engines/sim.py: no model, tokens on the speed model's
time for an L4), so dozens of replicas fit on a laptop's cores. Each model replays the shipped trace
(examples/traces/) at its own rate, phase-shifted (planner.simulate.arrivals_from_trace, as `gpuplan simulate`
does), prompts of the trace's length scaled to the model's mean (the sim models have no tokenizer: one word is one
token; each prompt differs from its first word on) and answers forced to theirs (ignore_eos). Per policy the app
is deployed afresh on the same cluster and the replay runs for --warmup then --duration seconds; what arrives in the
warm-up is served and left out, RUNNING replicas are counted every second after it (replica-seconds), and the same
arrivals go through planner.simulate with the same policy and warm-up. Prints one table: per policy and model,
TTFT and TPOT p50/p95 at the client, the share of requests within the SLO, errors, replica-seconds, and simulate's
p95s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.common.machine import machine_line
from benchmarks.common.stats import percentile
from benchmarks.trace_replay import one
from serve.api.front import pick_port

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "examples" / "traces" / "azure-llm-2023-conv.csv"
GPU, RAY_TYPE = "L4", "L4"
NODES = [f"l4-{i}" for i in range(1, 5)]
# (name, source, quantization, requests/s, prompt tokens, output tokens): the catalog's configs, no weights needed.
# Sized for this machine's 2 cores (7.5 requests/s in all: the client, the front and the replicas' processes share
# them) on a GPU slow enough that the traffic needs 1-3 replicas of each (the plan's capacity per L4: 1.5-2.7 req/s)
MODELS = [("qwen-7b", "Qwen/Qwen2.5-7B-Instruct", "awq", 1.5, 400, 120),
          ("llama-8b", "meta-llama/Llama-3.1-8B-Instruct", "awq", 1.0, 500, 150),
          ("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "awq", 2.0, 300, 100),
          ("llama-3b", "meta-llama/Llama-3.2-3B-Instruct", "bf16", 3.0, 300, 100)]
SLO = {"ttft_p95_ms": 1500, "tpot_p95_ms": 80}
MAX_MODEL_LEN = 2048
AUTOSCALING = {"upscale_delay_s": 5, "downscale_delay_s": 30, "look_back_period_s": 10, "metrics_interval_s": 2}


def deploy_args(policy: str, port: int, max_replicas: int, n_models: int = len(MODELS), rate_scale: float = 1.0
                ) -> dict:
    models = []
    for name, src, q, rate, p, o in MODELS[:n_models]:
        rate *= rate_scale
        models.append({
            "name": name, "source": src, "engine": "sim", "quantization": q, "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": 8, "replicas": {"min": 1, "max": max_replicas}, "max_ongoing_requests": 8,
            # a chunk a second: the client's TPOT is (last - first) / (tokens - 1) either way, and 2 cores carry
            # fewer messages
            "stream_interval_s": 1.0,
            "max_queued_requests": -1, "traffic": {"requests_per_s": rate, "prompt_tokens": p, "output_tokens": o},
            "slo": SLO, "autoscaling": {**AUTOSCALING, "policy": "requests" if policy == "requests" else "gpuplan"}})
    return {"headroom": 0.1, "http": {"host": "127.0.0.1", "port": port, "replicas": 1},
            "cluster": {"nodes": [{"name": n, "cpu_memory": "64GiB", "gpus": [{"name": GPU, "count": 4}]}
                                  for n in NODES]},
            "models": models}


def fixed(args: dict, result) -> dict:
    """A fleet sized for the peak: every placed replica runs from the start."""
    out = json.loads(json.dumps(args))
    for m in out["models"]:
        n = result.plan.model(m["name"]).placed_replicas
        m["replicas"] = {"min": n, "max": n}
    return out


def count_running(app: str, stop: threading.Event, out: dict, from_wall: float = 0.0) -> None:
    """Every second from ``from_wall`` (the end of the warm-up): RUNNING replicas per model, integrated into
    replica-seconds."""
    from ray import serve

    while time.time() < from_wall and not stop.is_set():
        time.sleep(0.2)
    last = time.time()
    while not stop.is_set():
        time.sleep(1.0)
        now = time.time()
        try:
            st = serve.status().applications.get(app)
        except Exception:
            continue
        if st is None:
            continue
        for name, d in st.deployments.items():
            if "@" in name:
                model = name.split("@")[0]
                out[model] = out.get(model, 0.0) + (d.replica_states or {}).get("RUNNING", 0) * (now - last)
        last = now


async def replay(url: str, arrivals: dict, tag: str | None = None) -> dict:
    """Every arrival as a streamed completion; ``tag``: send request ids ``tag/model/i`` (the timeline's keys)."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600.0, connect=30.0)) as c:
        t0 = time.perf_counter() + 1.0
        # each prompt's first word its own: the trace says nothing of shared prefixes, and identical prompts would
        # all go to the replica that prefix routing saw first
        jobs = {m: [one(c, t, t0, p, o, model=m, text=" ".join([f"{m}-{i}"] + ["w"] * (p - 1)),
                        request_id=f"{tag}/{m}/{i}" if tag else None) for i, (t, p, o) in enumerate(rows)]
                for m, rows in arrivals.items()}
        flat = await asyncio.gather(*(j for js in jobs.values() for j in js))
    out, i = {}, 0
    for m, js in jobs.items():
        out[m] = flat[i:i + len(js)]
        i += len(js)
    return out


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    ttft = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    tpot = [r["tpot_ms"] for r in ok if r.get("tpot_ms") is not None]
    within = sum(1 for r in ok if (r.get("ttft_ms") or 0) <= SLO["ttft_p95_ms"]
                 and (r.get("tpot_ms") or 0) <= SLO["tpot_p95_ms"])
    p = lambda xs, q: round(percentile(xs, q), 1) if xs else None  # noqa: E731
    return {"requests": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "ttft_p50_ms": p(ttft, 50),
            "ttft_p95_ms": p(ttft, 95), "tpot_p50_ms": p(tpot, 50), "tpot_p95_ms": p(tpot, 95),
            "within_slo": round(within / len(ok), 4) if ok else None}


SEGMENTS = (("in", "sent", "replica.enter"), ("engine", "replica.enter", "replica.first"),
            ("out", "replica.first", "first"))


def timeline(path: Path, got: dict) -> dict:
    """Where each model's TTFT went, from the server's timeline (serve/trace.py) and the client's wall-clock stamps:
    client -> replica (HTTP, the front, routing, Serve's queue, the Ray call), the engine (its queue, the prefill,
    the first token), replica -> client; p50 and p95 of each, milliseconds."""
    marks: dict = {}
    pids: dict = {}  # request id -> the process of the replica that served it
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:  # a line cut by the kill of a process
                continue
            if e.get("id"):
                marks.setdefault(e["id"], {}).setdefault(e["event"], e["t"])
                if e["event"] == "replica.enter":
                    pids[e["id"]] = e.get("pid")
    out = {}
    for model, rows in got.items():
        segs = {name: [] for name, _, _ in SEGMENTS}
        for r in rows:
            ev = {**marks.get(r.get("id"), {}), "sent": r.get("sent_wall"), "first": r.get("first_wall")}
            if all(ev.get(k) is not None for _, a, b in SEGMENTS for k in (a, b)):
                for name, a, b in SEGMENTS:
                    segs[name].append((ev[b] - ev[a]) * 1e3)
                    r[f"{name}_ms"] = round(segs[name][-1], 2)  # kept with the request's row (--json)
                r["replica_pid"] = pids.get(r.get("id"))
        out[model] = {"requests": len(segs["in"]),
                      **{f"{k}_p{q}_ms": round(percentile(v, q), 1) if v else None
                         for k, v in segs.items() for q in (50, 95)}}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of traffic per policy")
    ap.add_argument("--start-at", type=float, default=0.0, help="where in the (rate-scaled) trace to start")
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of the trace replayed first and left out of every figure, in the replay and in "
                         "simulate: the policies start from replicas.min, and a cold start into the trace's first "
                         "burst (new replicas starting on the same cores as the client) is not a running service")
    ap.add_argument("--policies", nargs="+", default=["gpuplan", "requests", "fixed"],
                    choices=["gpuplan", "requests", "fixed"])
    ap.add_argument("--max-replicas", type=int, default=6, help="each model's replicas.max")
    ap.add_argument("--models", type=int, default=len(MODELS), help="the first N of the four models (a quick run)")
    ap.add_argument("--rate-scale", type=float, default=1.0, help="every model's requests/s times this")
    ap.add_argument("--start-s", type=float, default=3.0,
                    help="what simulate assumes a new replica takes to serve (a sim replica here starts in ~2-4 s)")
    ap.add_argument("--timeline", action="store_true",
                    help="stamp each request's path (serve/trace.py) and print where TTFT went: client -> replica, "
                         "the engine, replica -> client")
    ap.add_argument("--json", help="write the table's rows here")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    marks_file = None
    if a.timeline:  # before Ray starts: its workers inherit it
        marks_file = Path(tempfile.mkdtemp(prefix="gpuplan-timeline-")) / "events.jsonl"
        os.environ["GPUPLAN_TRACE"] = str(marks_file)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from planner.config import parse_deploy_args
    from planner.demand import sim_models, traffic_of
    from planner.planning import cluster_from_decl, make_plan
    from planner.simulate import arrivals_from_trace, simulate
    from planner.traffic import read_trace
    from planner.cli.plan import with_policy
    from serve.app.build import build_app

    port = pick_port()
    base_args = deploy_args("gpuplan", port, a.max_replicas, a.models, a.rate_scale)
    parsed = parse_deploy_args(base_args, base_dir=str(ROOT))
    result = make_plan(parsed, cluster_from_decl(parsed.cluster), frozenset({"transformers"}))
    rows = read_trace(str(TRACE))
    entries = {m.name: m for m in result.args.models}
    shapes = [(m.name, traffic_of(entries[m.name])) for m in sim_models(result)]
    arr = arrivals_from_trace(rows, shapes, duration_s=a.start_at + a.warmup + a.duration)
    arr = {m: [(t - a.start_at, min(p, MAX_MODEL_LEN - o - 8), o) for t, p, o in xs if t >= a.start_at]
           for m, xs in arr.items()}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 0})
    for n in NODES:
        cluster.add_node(num_cpus=32, num_gpus=4, resources={f"accelerator_type:{RAY_TYPE}": 1},
                         labels={"gpuplan.io/node": n})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": pick_port()})
    url = f"http://127.0.0.1:{port}"
    table, raw, where = [], {}, {}
    try:
        for policy in a.policies:
            args = fixed(base_args, result) if policy == "fixed" else deploy_args(policy, port, a.max_replicas,
                                                                                   a.models, a.rate_scale)
            serve.run(build_app(args), name="llm", route_prefix="/", blocking=False)
            deadline = time.time() + 600
            while True:
                try:
                    if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"{policy}: not ready after 600 s")
                time.sleep(2)
            time.sleep(5)  # the minimums settle
            stop, rs = threading.Event(), {}
            counter = threading.Thread(target=count_running, args=("llm", stop, rs, time.time() + 1.0 + a.warmup),
                                       daemon=True)
            counter.start()
            got = asyncio.run(replay(url, arr, tag=policy if a.timeline else None))
            got = {m: [r for r in rows if r["at"] >= a.warmup] for m, rows in got.items()}  # the warm-up left out
            raw[policy] = got
            if marks_file is not None:
                where[policy] = timeline(marks_file, got)
            stop.set()
            counter.join(5)
            sims = {m.name: m for m in sim_models(make_plan(parse_deploy_args(args, base_dir=str(ROOT)),
                                                            cluster_from_decl(parsed.cluster),
                                                            frozenset({"transformers"})))}
            pred = simulate([with_policy(m, policy) if policy != "fixed" else m for m in sims.values()], arr,
                            start_s=a.start_s, measure_from_s=a.warmup)
            for mr in pred.models:
                s = summarize(got[mr.model])
                table.append({"policy": policy, "model": mr.model, **s,
                              "replica_seconds": round(rs.get(mr.model, 0.0), 1),
                              "sim_ttft_p50_ms": mr.ttft_p50_ms, "sim_ttft_p95_ms": mr.ttft_p95_ms, "sim_tpot_p95_ms": mr.tpot_p95_ms,
                              "sim_within_slo": mr.within_slo, "sim_replica_seconds": mr.replica_seconds})
            serve.delete("llm")
            time.sleep(10)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if marks_file is not None:
            shutil.rmtree(marks_file.parent, ignore_errors=True)

    print(machine_line())
    print(f"trace {TRACE.name}, {a.duration:.0f} s from {a.start_at + a.warmup:.0f} s after {a.warmup:.0f} s of "
          f"warm-up, rates x {a.rate_scale:g}; {a.models} "
          f"models on engine: sim, 16 x {GPU} on 4 nodes (Ray's fake GPUs); SLO TTFT p95 {SLO['ttft_p95_ms']} ms, TPOT p95 {SLO['tpot_p95_ms']} ms; "
          f"autoscaling {AUTOSCALING}\n")
    print("| policy | model | requests | errors | TTFT p50 / p95 ms | TPOT p50 / p95 ms | within SLO | replica-s | "
          "simulate: TTFT p95 / TPOT p95 ms, within SLO, replica-s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in table:
        print(f"| {r['policy']} | {r['model']} | {r['requests']} | {r['errors']} | {r['ttft_p50_ms']} / "
              f"{r['ttft_p95_ms']} | {r['tpot_p50_ms']} / {r['tpot_p95_ms']} | {r['within_slo']} | "
              f"{r['replica_seconds']} | {r['sim_ttft_p95_ms']} / {r['sim_tpot_p95_ms']}, {r['sim_within_slo']}, "
              f"{r['sim_replica_seconds']} |")
    totals = {}
    for r in table:
        t = totals.setdefault(r["policy"], [0, 0, 0.0])
        t[0] += r["ok"]
        t[1] += round((r["within_slo"] or 0) * r["ok"])
        t[2] += r["replica_seconds"]
    print()
    for pol, (ok, within, rsec) in totals.items():
        print(f"- {pol}: {within}/{ok} requests within the SLO ({within / max(1, ok):.1%}), {rsec:.0f} replica-s")
    if where:
        print("\nWhere TTFT went (ms, p50 / p95): client -> replica (HTTP, the front, routing, Serve's queue, the Ray "
              "call), the engine (its queue, prefill, first token), replica -> client; simulate's TTFT\n")
        print("| policy | model | requests | client -> replica | engine | replica -> client | client TTFT | "
              "simulate TTFT |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for r in table:
            w = where[r["policy"]][r["model"]]
            print(f"| {r['policy']} | {r['model']} | {w['requests']} | {w['in_p50_ms']} / {w['in_p95_ms']} | "
                  f"{w['engine_p50_ms']} / {w['engine_p95_ms']} | {w['out_p50_ms']} / {w['out_p95_ms']} | "
                  f"{r['ttft_p50_ms']} / {r['ttft_p95_ms']} | {r['sim_ttft_p50_ms']} / {r['sim_ttft_p95_ms']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"table": table, "timeline": where, "requests": raw}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
