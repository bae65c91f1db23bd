"""gpuplan simulate (planner/simulate.py): exact timings where they can be worked out by hand, batching, refusals,
scaling, the queueing model's p95s on Poisson traffic, and the CLI on a planned deploy file."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from planner.rollout import ModelRule
from planner.simulate import SimModel, arrivals_from_trace, simulate
from planner.traffic import Slo, Traffic, load_point


def _model(n=1, *, step=lambda b, c: 0.010, pre=lambda t: 0.001 * t, seqs=8, kv=10**6, mml=4096, ongoing=64,
           queued=-1, lo=None, hi=None, slo=None, up=10.0, down=60.0, target=2.0, policy="requests", capacity=None,
           interval=10.0):
    rule = ModelRule("m", lo if lo is not None else n, hi if hi is not None else n, target, up, down, policy=policy,
                     max_num_seqs=seqs, slo_ttft_p95_s=slo.ttft_p95_ms / 1e3 if slo and slo.ttft_p95_ms else None,
                     slo_tpot_p95_s=slo.tpot_p95_ms / 1e3 if slo and slo.tpot_p95_ms else None, capacity_rps=capacity)
    return SimModel("m", tuple((f"m@node{i}", "X") for i in range(rule.max_replicas)), {"X": step}, {"X": pre}, seqs, kv, mml,
                    ongoing, queued, rule, interval, slo)


def test_one_request_alone_is_the_speed_model_exactly():
    step = lambda b, c: 0.010 + 1e-6 * c  # noqa: E731
    r = simulate([_model(step=step)], {"m": [(0.0, 500, 101)]}).models[0]
    assert r.completed == 1
    assert r.ttft_p50_ms == pytest.approx(500.0)  # prefill 1 ms per token
    assert r.tpot_p50_ms == pytest.approx(step(1, 500 + 100 / 2) * 1e3, rel=1e-9)


def test_the_serving_path_adds_to_ttft_only():
    import dataclasses

    m = dataclasses.replace(_model(), path_s=0.015)
    r = simulate([m], {"m": [(0.0, 500, 101)]}).models[0]
    assert r.ttft_p50_ms == pytest.approx(515.0) and r.tpot_p50_ms == pytest.approx(10.0)


def test_requests_together_share_the_steps():
    r = simulate([_model()], {"m": [(0.0, 100, 11), (0.0, 100, 11)]}).models[0]
    # both admitted at once: one prefill of 200 tokens (0.2 s), then 10 steps of 10 ms together
    assert r.ttft_p95_ms == pytest.approx(200.0) and r.tpot_p95_ms == pytest.approx(10.0)


def test_refusals():
    r = simulate([_model(mml=1000)], {"m": [(0.0, 900, 200)]}).models[0]
    assert r.refused_too_long == 1 and r.completed == 0
    arr = {"m": [(0.0, 100, 50)] * 5}
    r = simulate([_model(ongoing=1, queued=2)], arr).models[0]
    assert r.refused_queue_full == 2 and r.completed == 3 and r.max_router_queue == 2


def test_a_burst_scales_up_after_the_delay():
    # 1 replica, max 4; 200 requests in the first 20 s, each holding a replica ~2 s: in flight ~20 > target 2
    arr = {"m": [(i * 0.1, 200, 200) for i in range(200)]}
    r = simulate([_model(1, lo=1, hi=4, up=5.0, down=30.0)], arr, start_s=5.0).models[0]
    assert r.replicas_max_seen == 4 and r.scale_events >= 1 and r.completed == 200
    assert r.replica_seconds > r.replicas_min * 20  # more than one replica ran for a while


def test_the_policy_sees_the_load_averaged_over_the_look_back_window():
    """Serve averages the replicas' metrics over look_back_period_s: a 3-s burst of ~4 requests in flight (each holds
    the replica ~0.4 s, 10 arrive a second) makes the request rule (target 2) scale up when the policy sees the last
    second, not when it sees the mean of the last 10 s (4 x 3 / 10 = 1.2)."""
    import dataclasses

    arr = {"m": [(30.0 + i * 0.1, 10, 40) for i in range(30)]}
    base = _model(1, lo=1, hi=2, up=0.0, down=600.0, interval=1.0)
    short = simulate([dataclasses.replace(base, look_back_period_s=1.0)], arr, start_s=5.0).models[0]
    long = simulate([dataclasses.replace(base, look_back_period_s=10.0)], arr, start_s=5.0).models[0]
    assert (short.scale_events, short.replicas_max_seen) == (1, 2)
    assert (long.scale_events, long.replicas_max_seen) == (0, 1)


def test_a_warm_up_is_served_and_left_out_of_the_figures():
    # one request a second for 20 s; the first 10 s are a warm-up: a burst there, none after
    arr = {"m": [(0.0, 1000, 10)] * 5 + [(float(i), 100, 11) for i in range(1, 20)]}
    whole = simulate([_model()], arr).models[0]
    r = simulate([_model()], arr, measure_from_s=10.0).models[0]
    assert (whole.requests, r.requests) == (24, 10) and r.completed == 10
    assert whole.ttft_p95_ms > 3000 and r.ttft_p95_ms == pytest.approx(100.0)  # the burst's queue is not counted
    assert r.replica_seconds == pytest.approx(whole.replica_seconds - 10.0)


def test_the_queueing_model_agrees_with_the_simulation_on_poisson_traffic():
    step = lambda b, c: 0.008 + 0.0004 * b  # noqa: E731
    pre = lambda t: 0.00005 * t  # noqa: E731
    tr = Traffic(6.0, 800, 120)
    rng = random.Random(7)
    t, rows = 0.0, []
    while t < 3000:
        t += rng.expovariate(tr.requests_per_s)
        rows.append((t, tr.prompt_tokens, tr.output_tokens))
    sim = simulate([_model(step=step, pre=pre, seqs=32)], {"m": rows}).models[0]
    lp = load_point(tr.requests_per_s, tr, step, pre, 32)
    assert sim.ttft_p95_ms == pytest.approx(lp.ttft_p95_s * 1e3, rel=0.30)
    assert sim.tpot_p95_ms == pytest.approx(lp.tpot_p95_s * 1e3, rel=0.30)


def test_models_replay_one_trace_at_their_rates():
    rows = [(float(i), 100 + 100 * (i % 2), 10) for i in range(101)]  # 1 req/s for 100 s, prompts 100/200
    arr = arrivals_from_trace(rows, [("a", None), ("b", Traffic(4.0, 300, 20))], speedup=2.0)
    assert len(arr["a"]) == len(arr["b"]) == 101
    assert max(t for t, _, _ in arr["a"]) == pytest.approx(50.0, abs=0.6)  # 2x faster
    assert max(t for t, _, _ in arr["b"]) == pytest.approx(12.5, abs=0.2)  # 4 req/s, then 2x
    assert sum(p for _, p, _ in arr["a"]) / 101 == pytest.approx(149.5, abs=0.1)  # the trace's own tokens
    assert sum(p for _, p, _ in arr["b"]) / 101 == pytest.approx(300, rel=0.01)  # scaled to the traffic's means
    assert {p for _, p, _ in arr["b"]} == {201, 401} or len({p for _, p, _ in arr["b"]}) == 2  # spread kept
    assert all(o == 20 for _, _, o in arr["b"])


def test_gpuplan_policy_scales_on_the_signals_through_a_burst_and_back():
    """A burst (20 s at 10 req/s, ~5 req/s per replica at full batch), then a trickle for two minutes: gpuplan's
    policy (the plan's capacity per replica given) scales up for the burst, meets the SLO about as Ray Serve's rule
    does, and comes back down to one replica."""
    burst = [(i * 0.1, 200, 100) for i in range(200)]
    trickle = [(20.0 + i * 2.0, 200, 100) for i in range(60)]
    arr = {"m": burst + trickle}
    kw = dict(lo=1, hi=8, up=2.0, down=10.0, slo=Slo(2000, 100), step=lambda b, c: 0.008 + 0.001 * b,
              pre=lambda t: 1e-4 * t, ongoing=8, interval=1.0, capacity=4.5)
    req = simulate([_model(1, policy="requests", **kw)], arr, start_s=2.0).models[0]
    gp = simulate([_model(1, policy="gpuplan", **kw)], arr, start_s=2.0).models[0]
    assert req.completed == gp.completed == 260
    assert gp.replicas_max_seen >= 3 and gp.within_slo >= 0.95 and gp.within_slo >= req.within_slo - 0.02
    assert gp.replica_seconds < 0.4 * 8 * 140  # not 8 replicas for the whole run: it came back down


def test_cli_simulate(tmp_path):
    trace = tmp_path / "t.csv"
    rng = random.Random(1)
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(400):
        lines.append(f"2023-11-16 18:{15 + i // 60:02d}:{i % 60:02d}.5,{rng.randint(200, 1500)},{rng.randint(20, 300)}")
    trace.write_text("\n".join(lines) + "\n")
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(json.dumps({"applications": [{"name": "llm", "import_path": "serve.app:build_app", "args": {
        "cluster": {"nodes": [{"name": "n", "gpus": [{"name": "A100-80GB", "count": 1}]}]},
        "models": [{"name": "qwen", "source": "Qwen/Qwen2.5-7B-Instruct", "quantization": "awq", "engine": "vllm",
                    "max_model_len": 4096, "max_num_seqs": 16, "replicas": {"max": 2},
                    "traffic": {"requests_per_s": 3, "prompt_tokens": 800, "output_tokens": 150},
                    "slo": {"ttft_p95_ms": 800, "tpot_p95_ms": 60}}]}}]}))
    p = subprocess.run([sys.executable, "-m", "planner", "simulate", str(deploy), "--trace", str(trace), "--engines",
                        "vllm", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    m = out["models"][0]
    assert m["requests"] == 400 and m["completed"] == 400 and 0 < m["within_slo"] <= 1
    assert m["ttft_p95_ms"] > 0 and m["tpot_p95_ms"] > 0 and m["replica_seconds"] > 0
    # the same plan under each policy: a fixed fleet holds every planned replica the whole time
    runs = {}
    for policy in ("gpuplan", "requests", "fixed"):
        q = subprocess.run([sys.executable, "-m", "planner", "simulate", str(deploy), "--trace", str(trace),
                            "--engines", "vllm", "--policy", policy, "--json"], capture_output=True, text=True)
        assert q.returncode == 0, q.stderr
        runs[policy] = json.loads(q.stdout)["models"][0]
    assert runs["fixed"]["replicas_min"] == 2 and runs["fixed"]["replica_seconds"] >= max(
        r["replica_seconds"] for r in runs.values())
    bad = subprocess.run([sys.executable, "-m", "planner", "simulate", str(deploy), "--trace", str(tmp_path / "no"),
                          "--engines", "vllm"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # --warmup: the first 100 s are served and left out (3 requests a second: the 400 span 133 s, ~100 are left)
    w = subprocess.run([sys.executable, "-m", "planner", "simulate", str(deploy), "--trace", str(trace), "--engines",
                        "vllm", "--warmup", "100", "--json"], capture_output=True, text=True)
    assert w.returncode == 0, w.stderr
    assert 95 <= json.loads(w.stdout)["models"][0]["requests"] <= 105
    neg = subprocess.run([sys.executable, "-m", "planner", "simulate", str(deploy), "--trace", str(trace), "--engines",
                          "vllm", "--warmup", "-5"], capture_output=True, text=True)
    assert neg.returncode == 2 and "--warmup -5" in neg.stderr and "Traceback" not in neg.stderr
