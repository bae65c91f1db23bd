"""engine: sim, the simulated engine: planned as vLLM (bytes, schemes), timed by the speed model of the device its
deployment landed on, and the serve-side engine keeping that time (tokens/s as given, the KV budget enforced,
request semantics)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from planner.demand import speed_fns
from planner.errors import InputError
from planner.model.engines import DeploymentTarget, deployment_settings, estimate_replica, pick_engine
from planner.model.quant import resolve_quant
from planner.model.spec import load_spec
from planner.placement.capacity import device_speed
from serve.engines.sim import SimEngine
from serve.types import SamplingParams

QWEN = "Qwen/Qwen2.5-7B-Instruct"


def _sim_and_vllm(device: str = "A100-80GB"):
    spec = load_spec(QWEN)
    sim = estimate_replica(spec, quant="bf16", engine="sim", max_model_len=4096, max_num_seqs=16)
    vllm = estimate_replica(spec, quant="bf16", engine="vllm", max_model_len=4096, max_num_seqs=16)
    target = DeploymentTarget(model="q", spec=spec, planned_bytes=sim.total, device="cuda",
                              device_total_bytes=80 * 2**30, device_name=device, device_speed=device_speed(device))
    return spec, sim, vllm, target


def test_sim_is_planned_with_vllms_bytes_and_runs_what_vllm_runs():
    _, sim, vllm, _ = _sim_and_vllm()
    assert sim.engine == "sim" and sim.total == vllm.total and sim.kv_cache == vllm.kv_cache
    assert any("simulated" in n for n in sim.notes)
    assert pick_engine("sim", "awq", frozenset())[0] == "sim"
    with pytest.raises(InputError, match="engine sim imitates vLLM, which does not run quantization nf4"):
        pick_engine("sim", "nf4", frozenset())
    # auto never picks it
    assert pick_engine("auto", "bf16", frozenset({"transformers", "vllm"}))[0] == "vllm"


def test_sim_settings_time_steps_as_the_speed_model_does():
    spec, sim, _, target = _sim_and_vllm("H100-80GB")
    st = deployment_settings(sim, target)
    step, pre, _ = speed_fns(spec, resolve_quant(spec, "bf16"), sim, "H100-80GB")
    for b, c in ((1, 100), (8, 1000), (16, 3000)):
        assert st.step_s(b, c) == step(b, c)
    assert st.prefill_s(2048) == pre(2048)
    assert st.kv_tokens == sim.detail["kv_cache"]["tokens"] and st.device == "H100-80GB"
    # a 7B model in bf16 reads ~15 GB a step: on an H100 (3.35 TB/s) some milliseconds, not seconds
    assert 0.003 < st.step_s(1, 100) < 0.02
    assert st.to_json()["kernel"] == "float"


def test_sim_settings_without_device_speed_say_what_to_add():
    _, sim, _, target = _sim_and_vllm()
    with pytest.raises(InputError, match="memory_bandwidth_gb_per_s"):
        deployment_settings(sim, dataclasses.replace(target, device_name="MI300X", device_speed=None))


def _run(coro):
    return asyncio.run(coro)


async def _one(eng, seed=1, n=50, prompt=20, **kw):
    t0 = time.monotonic()
    first, text, last = None, "", None
    async for ch in eng.generate(list(range(prompt)), SamplingParams(max_tokens=n, seed=seed, **kw)):
        if first is None:
            first = time.monotonic() - t0
        text += ch.text
        last = ch
    return time.monotonic() - t0, first, last, text


def test_the_engine_keeps_the_speed_model_time():
    """One stream: TTFT = the prefill, then one step per token; eight streams: steps at batch 8."""
    step = lambda b, c: 0.004 + 0.001 * b  # noqa: E731
    pre = lambda n: 0.0002 * n  # noqa: E731

    async def go():
        eng = SimEngine(step_s=step, prefill_s=pre, max_num_seqs=8, max_model_len=512, kv_tokens=8192, emit_s=0.05)
        solo = await _one(eng, n=60, prompt=50)
        t0 = time.monotonic()
        many = await asyncio.gather(*[_one(eng, seed=i, n=60, prompt=50) for i in range(8)])
        return solo, time.monotonic() - t0, many, eng.stats()

    solo, wall8, many, stats = _run(go())
    assert solo[1] == pytest.approx(0.010, abs=0.006)  # the prefill of 50 tokens
    assert solo[0] == pytest.approx(0.010 + 59 * 0.005, rel=0.1)
    assert solo[2].completion_tokens == 60 and solo[2].finish_reason == "length"
    assert wall8 == pytest.approx(8 * 50 * 0.0002 + 59 * 0.012, rel=0.1)
    assert all(m[2].completion_tokens == 60 for m in many)
    assert stats["max_running_seen"] == 8 and stats["generated_tokens"] == 9 * 60 and stats["simulated"]


def test_the_kv_budget_holds_sequences_back():
    """KV for two requests (prompt + max_tokens each): four requests run two at a time, in two waves."""
    async def go():
        eng = SimEngine(step_s=lambda b, c: 0.005, prefill_s=lambda n: 0.0, max_num_seqs=8, max_model_len=512,
                        kv_tokens=2 * (20 + 40), emit_s=0.05)
        t0 = time.monotonic()
        await asyncio.gather(*[_one(eng, seed=i, n=40) for i in range(4)])
        return time.monotonic() - t0, eng.stats()

    wall, stats = _run(go())
    assert stats["max_running_seen"] == 2
    assert wall == pytest.approx(2 * 39 * 0.005, rel=0.15)
    assert stats["kv_cache_usage"] == 0


def test_request_semantics():
    async def go():
        eng = SimEngine(step_s=lambda b, c: 0.001, prefill_s=lambda n: 0.0, max_num_seqs=4, max_model_len=128,
                        kv_tokens=1024, emit_s=0.01)
        a = await _one(eng, seed=7, n=12)
        b = await _one(eng, seed=7, n=12)
        greedy = await _one(eng, n=24, temperature=0)
        stop = greedy[3].split()[3]
        cut = await _one(eng, n=24, temperature=0, stop=(stop,))
        with pytest.raises(ValueError, match="exceeds max_model_len"):
            eng.generate(list(range(100)), SamplingParams(max_tokens=40))
        # a consumer that stops early frees its slot
        gen = eng.generate(list(range(10)), SamplingParams(max_tokens=100))
        async for _ in gen:
            break
        await gen.aclose()
        await asyncio.sleep(0.05)
        return a, b, greedy, stop, cut, eng.stats()

    a, b, greedy, stop, cut, stats = _run(go())
    assert a[3] == b[3] and len(a[3].split()) == 12  # same seed, same text; one word per token
    assert cut[2].finish_reason == "stop" and cut[3] == greedy[3][:greedy[3].index(stop)]
    assert cut[2].completion_tokens < 24
    assert stats["running"] == 0 and stats["kv_cache_usage"] == 0 and stats["cancelled"] == 1
