"""Traffic and SLO in the deploy file (planner/demand.py): the replicas and the quantization a model's traffic needs,
in `gpuplan plan` and `--fit-gpus`, and the errors a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.config import parse_deploy_args
from planner.errors import InputError
from planner.planning import cluster_from_decl, make_plan
from planner.traffic import read_trace, traffic_of_trace

CLUSTER = {"nodes": [{"name": "a100", "gpus": [{"name": "A100-80GB", "count": 2}]}]}


def _model(**kw):
    m = {"name": "qwen7b", "source": "Qwen/Qwen2.5-7B-Instruct", "engine": "vllm", "max_model_len": 8192,
         "max_num_seqs": 32, "replicas": {"max": 8},
         "traffic": {"requests_per_s": 12, "prompt_tokens": 1000, "output_tokens": 200},
         "slo": {"ttft_p95_ms": 500, "tpot_p95_ms": 60}}
    m.update(kw)
    return m


def _plan(models, cluster=CLUSTER):
    args = parse_deploy_args({"cluster": cluster, "models": models})
    return make_plan(args, cluster_from_decl(args.cluster), frozenset({"transformers", "vllm"}), strict=False)


def test_the_traffic_sets_the_minimum_and_the_plan_meets_the_slo():
    r = _plan([_model(quantization=["bf16"])])
    mt = r.traffic["qwen7b"]
    need = mt.replicas_needed
    assert need >= 2  # 12 req/s is more than one replica holds within 500 ms TTFT
    pm = r.plan.model("qwen7b")
    assert r.rollout.models[0].min_replicas == need and pm.placed_replicas >= need
    p = mt.predicted("bf16", need)
    assert p["ttft_p95_ms"] <= 500 and p["tpot_p95_ms"] <= 60
    fewer = mt.predicted("bf16", need - 1)  # one replica fewer breaks a target (that is why it is the minimum)
    assert fewer["saturated"] or fewer["ttft_p95_ms"] > 500 or fewer["tpot_p95_ms"] > 60
    assert "req/s within TTFT p95 500 ms, TPOT p95 60 ms" in mt.line("bf16", need)


def test_more_traffic_needs_more_replicas():
    base = _plan([_model(quantization=["awq"])]).traffic["qwen7b"].replicas_needed
    double = _plan([_model(quantization=["awq"], traffic={"requests_per_s": 12, "prompt_tokens": 1000,
                                                          "output_tokens": 200, "scale": 2})])
    assert double.traffic["qwen7b"].replicas_needed > base


def test_the_quantization_that_serves_on_fewest_bytes_is_chosen():
    mt = _plan([_model(quantization=["bf16", "awq"])]).traffic["qwen7b"]
    o = mt.options
    assert mt.chosen == min(o, key=lambda q: (o[q].replicas * o[q].replica_bytes, list(o).index(q)))
    n = mt.replicas_needed  # vLLM's AWQ decodes faster: a lower TPOT at the same load
    assert mt.predicted("awq", n)["tpot_p95_ms"] < mt.predicted("bf16", n)["tpot_p95_ms"]


def test_max_below_the_need_is_an_error_with_the_fix():
    with pytest.raises(InputError, match=r"replicas.max 1 is below the \d+ replicas its traffic needs.*raise "
                                         r"replicas.max to \d+"):
        _plan([_model(replicas={"max": 1})])


def test_unreachable_ttft_is_refused():
    with pytest.raises(InputError, match="below one prefill of 6000 prompt tokens"):
        _plan([_model(quantization=["bf16"], traffic={"requests_per_s": 1, "prompt_tokens": 6000,
                                                      "output_tokens": 100}, slo={"ttft_p95_ms": 5})])


def test_a_cpu_cluster_plans_on_the_cpu_device():
    """Without GPUs the replicas' device is the CPU catalog's (planner/catalog/cpus.json), timed by each engine's
    SPEED_CPU, and the estimate says what those numbers do not cover."""
    r = _plan([_model(name="tiny", source="./models/tiny-chat", quantization=["int4"], engine="transformers",
                      max_model_len=256, max_num_seqs=8, replicas={"max": 2},
                      traffic={"requests_per_s": 4, "prompt_tokens": 60, "output_tokens": 40},
                      slo={"ttft_p95_ms": 500, "tpot_p95_ms": 50})],
              cluster={"nodes": [{"name": "cpu", "cpu_memory": "16GiB"}]})
    mt = r.traffic["tiny"]
    assert mt.options["int4"].gpu_type == "cpu" and mt.replicas_needed >= 1
    assert any("4-layer tiny model only" in n for n in mt.notes)


def test_traffic_needs_an_slo_and_room():
    with pytest.raises(InputError, match="traffic needs an slo"):
        parse_deploy_args({"models": [_model(slo=None)]})
    with pytest.raises(InputError, match="does not fit max_model_len 1024"):
        _plan([_model(max_model_len=1024)])


def test_trace_means(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,100,10\n"
                 "2023-11-16 18:15:47.0,300,30\n2023-11-16 18:15:48.5,200,20\n")
    rows = read_trace(str(f))
    assert rows[0][0] == 0.0 and rows[-1][0] == pytest.approx(2.0)
    t = traffic_of_trace(rows)
    assert t.requests_per_s == pytest.approx(1.0) and t.prompt_tokens == 200 and t.output_tokens == 20
    r = _plan([_model(traffic={"trace": str(f)})])
    assert r.traffic["qwen7b"].traffic.requests_per_s == pytest.approx(1.0)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="needs the columns TIMESTAMP"):
        read_trace(str(bad))


def test_cli_plan_json_and_fit(tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(json.dumps({"applications": [{"name": "llm", "import_path": "serve.app:build_app", "args": {
        "cluster": CLUSTER, "models": [_model(quantization=["bf16", "awq"])]}}]}))
    p = subprocess.run([sys.executable, "-m", "planner", "plan", str(deploy), "--engines", "vllm", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    t = json.loads(p.stdout)["models"][0]["traffic"]
    assert t["replicas_needed"] >= 1 and t["per_replica_requests_per_s"] > 0
    assert t["predicted"]["ttft_p95_ms"] <= 500 and t["predicted"]["tpot_p95_ms"] <= 60
    f = subprocess.run([sys.executable, "-m", "planner", "plan", str(deploy), "--engines", "vllm", "--fit-gpus",
                        "L4,H100", "--json"], capture_output=True, text=True)
    assert f.returncode == 0, f.stderr
    out = json.loads(f.stdout)
    # an L4 holds far less within 500 ms TTFT (a prefill there takes most of it): H100s alone are the smaller cluster
    assert out["counts"].get("L4", 0) == 0 and "traffic" in out


def _bursty_trace(path, n=1500, seed=3):
    """Requests in bursts: 10 of every 40 a twentieth of a second apart, the rest 1 s apart; prompts 200-2,000."""
    import random

    rng = random.Random(seed)
    lines, t = ["TIMESTAMP,ContextTokens,GeneratedTokens"], 0.0
    for i in range(n):
        t += 0.05 if i % 40 < 10 else 1.0
        s = 1_700_000_000 + t
        stamp = f"2023-11-16 18:{int(s // 60) % 60:02d}:{int(s) % 60:02d}.{int((s % 1) * 1e6):06d}"
        hour = 18 + int(t // 3600)
        lines.append(f"2023-11-16 {hour}:{stamp[14:]},{rng.randint(200, 2000)},{rng.randint(50, 400)}")
    path.write_text("\n".join(lines) + "\n")


def test_a_trace_is_sized_by_simulation(tmp_path):
    f = tmp_path / "bursty.csv"
    _bursty_trace(f)
    r = _plan([_model(quantization=["awq"], traffic={"trace": str(f), "requests_per_s": 6, "prompt_tokens": 1000,
                                                     "output_tokens": 200})])
    o = r.traffic["qwen7b"].options["awq"]
    assert o.simulated is not None and o.simulated["meets_slo"]
    assert o.replicas > o.closed_form  # the bursts need more than steady arrivals of the same mean
    assert o.simulated["ttft_p95_ms"] <= 500 and o.simulated["tpot_p95_ms"] <= 60
    assert r.rollout.rule("qwen7b").min_replicas == o.replicas
    assert "the trace's bursts need" in r.traffic["qwen7b"].line("awq", o.replicas)


def test_a_target_the_trace_cannot_meet_is_said(tmp_path):
    f = tmp_path / "bursty.csv"
    _bursty_trace(f)
    # 180 ms: one prefill of the mean prompt fits, the longer prompts' alone do not
    r = _plan([_model(quantization=["awq"], traffic={"trace": str(f), "requests_per_s": 2, "prompt_tokens": 1000,
                                                     "output_tokens": 200}, slo={"ttft_p95_ms": 180})])
    o = r.traffic["qwen7b"].options["awq"]
    assert not o.simulated["meets_slo"] and o.replicas == o.closed_form
    assert "misses the SLO even with" in o.simulated["why"]


def test_a_gpu_without_speed_numbers_plans_for_memory_and_says_why():
    """A GPU the catalog has no bandwidth for (a custom NAME:MEMORY here, an unknown card under `cluster: auto`):
    the model keeps its declared replicas, and the plan names the field to add."""
    cluster = {"nodes": [{"name": "n", "gpus": [{"name": "MyGPU", "memory": "80GiB", "count": 2}]}]}
    r = _plan([_model(quantization=["bf16"], replicas={"min": 1, "max": 2})], cluster=cluster)
    mt = r.traffic["qwen7b"]
    assert mt.to_json()["sized"] is False and "memory_bandwidth_gb_per_s" in mt.why
    assert r.rollout.rule("qwen7b").min_replicas == 1
