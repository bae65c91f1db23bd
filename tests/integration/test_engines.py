"""Every engine behind the same API (the shared Ray cluster with fake GPUs): a transformers model, a vLLM model
(vLLM's CPU build in its own venv, `make vllm`, run by the replicas through Ray's runtime_env py_executable) and a
GGUF model on llama.cpp (llama-cpp-python, `make venv`) on one declared L4, and the simulated engine (engine: sim).

- request semantics, checked once for every engine: max_tokens, a seed per request (same seed, same text, streamed
  or not), stop strings (cut before the stop, finish_reason "stop"), streaming ending in a finish reason and [DONE];
- the vLLM replicas got the plan's memory settings (kv_cache_memory_bytes, max_num_seqs, ...), and vLLM's own KV
  capacity in tokens equals the plan's;
- two vLLM replicas planned onto one GPU started one after the other.
"""

from __future__ import annotations

import json
import os

import pytest
import requests
from ray_helpers import wait_ready

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from planner.config import parse_deploy_args  # noqa: E402
from planner.planning import cluster_from_decl, make_plan  # noqa: E402
from planner.cluster.installed import vllm_python  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models", "tiny-chat")
APP = "engines"
ARGS = {
    "headroom": 0.10,
    "gpu_reserve": 0,
    "cluster": {"nodes": [{"name": "l4-1", "cpu_memory": "8GiB", "gpus": [{"name": "L4", "memory": "16GiB"}]}]},
    "models": [
        {"name": "t", "source": TINY, "quantization": "bf16", "engine": "transformers", "max_model_len": 256,
         "max_num_seqs": 4, "replicas": {"min": 1, "max": 1}, "stream_interval_s": 0},
        {"name": "v", "source": TINY, "quantization": "bf16", "engine": "vllm", "max_model_len": 256,
         "max_num_seqs": 4, "replicas": {"min": 2, "max": 2}, "stream_interval_s": 0},
        {"name": "g", "source": os.path.join(TINY, "tiny-chat-Q8_0.gguf"), "quantization": "gguf",
         "engine": "llamacpp", "max_model_len": 256, "max_num_seqs": 4, "replicas": {"min": 1, "max": 1},
         "stream_interval_s": 0},
        {"name": "s", "source": TINY, "quantization": "bf16", "engine": "sim", "max_model_len": 256,
         "max_num_seqs": 4, "replicas": {"min": 1, "max": 1}, "stream_interval_s": 0},
    ],
}


@pytest.fixture(scope="module")
def app(ray_cluster):
    if vllm_python() is None:
        pytest.fail("vLLM is not installed for the replicas: `make vllm` (make test does it)")
    from serve.app.build import build_app

    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/{APP}"
    assert wait_ready(base, 420), requests.get(f"{base}/readyz", timeout=5).text
    yield base
    serve.delete(APP)


def complete(base: str, model: str, stream: bool = False, **kw) -> tuple[str, str, dict]:
    body = {"model": model, "prompt": "def parse(", "max_tokens": 12, "temperature": 0.9, "seed": 11, **kw}
    if not stream:
        r = requests.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        c = r.json()
        return c["choices"][0]["text"], c["choices"][0]["finish_reason"], c["usage"]
    body.update(stream=True, stream_options={"include_usage": True})
    text, reason, usage, lines = "", None, {}, []
    with requests.post(f"{base}/v1/completions", json=body, timeout=120, stream=True) as r:
        assert r.status_code == 200, r.text
        lines = [ln.decode() for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        ev = json.loads(ln.removeprefix("data: "))
        assert "error" not in ev, ev
        for ch in ev.get("choices") or []:
            text += ch.get("text") or ""
            reason = ch.get("finish_reason") or reason
        usage = ev.get("usage") or usage
    return text, reason, usage


@pytest.mark.parametrize("model", ["t", "v", "g", "s"])
def test_request_semantics_are_the_same_on_every_engine(app, model):
    text, reason, usage = complete(app, model)
    assert 1 <= usage["completion_tokens"] <= 12 and reason in ("length", "stop")
    assert (reason == "length") == (usage["completion_tokens"] == 12)
    again, _, _ = complete(app, model)
    assert again == text  # the same seed gives the same text
    streamed, s_reason, s_usage = complete(app, model, stream=True)
    assert streamed == text and s_reason == reason and s_usage["completion_tokens"] == usage["completion_tokens"]
    other, _, _ = complete(app, model, seed=12345, max_tokens=24)
    assert other  # another seed: text (may or may not differ on a tiny model; must not break)
    greedy, _, _ = complete(app, model, temperature=0, max_tokens=24)
    stop = next((greedy[i:i + 2] for i in range(2, len(greedy) - 2) if greedy[i:i + 2].strip()), None)
    assert stop, f"no stop string to cut at in {greedy!r}"
    cut, c_reason, _ = complete(app, model, temperature=0, max_tokens=24, stop=[stop])
    assert c_reason == "stop" and cut == greedy[:greedy.index(stop)], (greedy, stop, cut)
    _, l_reason, l_usage = complete(app, model, max_tokens=40, ignore_eos=True)
    assert l_reason == "length" and l_usage["completion_tokens"] == 40  # EOS does not end it
    r = requests.post(f"{app}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "What does os.getcwd do?"}], "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_vllm_replicas_got_the_planned_memory_and_report_the_planned_kv(app):
    result = make_plan(parse_deploy_args(ARGS), cluster_from_decl(parse_deploy_args(ARGS).cluster),
                       frozenset({"transformers", "vllm", "llamacpp"}))
    est = result.estimates["v"]["bf16"]
    assert est.engine == "vllm"
    reps = [r for r in requests.get(f"{app}/plan", timeout=30).json()["replicas"] if r["model"] == "v"]
    assert len(reps) == 2 and all(r["engine"] == "vllm" for r in reps)
    for r in reps:
        given, reported = r["engine_report"]["given"], r["engine_report"]["reported"]
        assert given["kv_cache_memory_bytes"] == est.kv_cache == reported["kv_cache_memory_bytes"]
        assert reported["kv_cache_tokens"] == est.detail["kv_cache"]["tokens"] == given["kv_cache_tokens"]
        assert reported["max_num_seqs"] == 4 and reported["max_model_len"] == 256
        assert reported["block_size"] == est.detail["kv_cache"]["block_size"]
        assert 0 < given["gpu_memory_utilization"] < 1
    t = [r for r in requests.get(f"{app}/plan", timeout=30).json()["replicas"] if r["model"] == "t"]
    assert t and t[0]["engine"] == "transformers"


def test_two_vllm_replicas_on_one_gpu_started_one_after_the_other(app):
    reps = [r for r in requests.get(f"{app}/plan", timeout=30).json()["replicas"] if r["model"] == "v"]
    assert len(reps) == 2 and reps[0]["gpu_ids"] == reps[1]["gpu_ids"] and reps[0]["gpu_ids"]
    a, b = sorted((r["engine_report"]["start"] for r in reps), key=lambda s: s["started_at"])
    assert a["ready_at"] <= b["started_at"], (a, b)  # b's engine began only after a's had its KV cache


def test_llamacpp_replica_runs_the_planned_context_and_its_buffers_match_the_plan(app):
    result = make_plan(parse_deploy_args(ARGS), cluster_from_decl(parse_deploy_args(ARGS).cluster),
                       frozenset({"transformers", "vllm", "llamacpp"}))
    est = result.estimates["g"]["gguf"]
    assert est.engine == "llamacpp"
    planned = est.detail["llamacpp_buffers"]
    (rep,) = [r for r in requests.get(f"{app}/plan", timeout=30).json()["replicas"] if r["model"] == "g"]
    assert rep["engine"] == "llamacpp"
    given, reported = rep["engine_report"]["given"], rep["engine_report"]["reported"]
    assert given["n_ctx"] == est.detail["llamacpp"]["n_ctx"] == reported["n_ctx"] == 4 * 256
    assert given["n_seq_max"] == 4 and given["n_gpu_layers"] == 0  # Ray's fake GPU: no CUDA, all on the CPU
    for term, key in (("KV", "kv"), ("compute", "compute"), ("output", "output")):
        got = sum(reported["buffers"][term].values())
        assert abs(got - planned[key]) <= 0.02 * got + 5243, (term, got, planned[key])
    assert reported["model_size"] == planned["model"]
