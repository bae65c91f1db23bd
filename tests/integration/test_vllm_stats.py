"""vLLM's own scheduler counts reach the replica's stats (serve/engines/vllm.py): with more requests than
max_num_seqs, some wait inside vLLM and `stats()["waiting"]` says so (it was always 0 before). Runs VllmEngine in
vLLM's venv (`make vllm`), no Ray."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from planner.cluster.installed import vllm_python

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
import asyncio, json, os, sys, time
sys.path.insert(0, ROOT)
if __name__ == "__main__":
    from planner.model.engines.vllm import vllm_settings
    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec
    from serve.engines.vllm import VllmEngine
    from serve.types import SamplingParams
    from transformers import AutoTokenizer

    tiny = os.path.join(ROOT, "models", "tiny-chat")
    est = estimate_replica(load_spec(tiny), quant="bf16", max_model_len=256, max_num_seqs=2, device="cpu",
                           engine="vllm")
    kv = est.detail["kv_cache"]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    st = vllm_settings(planned_bytes=est.total, device_total_bytes=ram, kv_cache_bytes=est.kv_cache,
                       kv_tokens=kv["tokens"], block_size=kv["block_size"], max_model_len=256, max_num_seqs=2,
                       prefill_tokens=est.prefill_tokens, dtype="bf16", quantization=None).to_json()
    eng = VllmEngine(tiny, st)
    ids = AutoTokenizer.from_pretrained(tiny)("def main():").input_ids
    seen = {"max_waiting": 0, "max_running": 0}

    async def one():
        return [c async for c in eng.generate(ids, SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))]

    async def main():
        tasks = [asyncio.create_task(one()) for _ in range(6)]
        while not all(t.done() for t in tasks):
            s = eng.stats()
            seen["max_waiting"] = max(seen["max_waiting"], s["waiting"])
            seen["max_running"] = max(seen["max_running"], s["running"])
            if eng._sched:  # vLLM has reported: the counts are its scheduler's
                seen["max_waiting_reported"] = max(seen.get("max_waiting_reported", 0), eng._sched["waiting"])
            await asyncio.sleep(0.005)
        outs = [t.result() for t in tasks]
        seen["tokens"] = [o[-1].completion_tokens for o in outs]
        seen["after"] = eng.stats()
        seen["vllm_reported"] = dict(eng._sched)

    asyncio.run(main())
    asyncio.run(eng.close())
    print("RESULT " + json.dumps(seen), flush=True)
'''


def test_requests_waiting_inside_vllm_are_counted(tmp_path):
    py = vllm_python()
    if py is None:
        pytest.fail("vLLM is not installed for the replicas: `make vllm` (make test does it)")
    script = tmp_path / "vllm_stats.py"
    script.write_text(f"ROOT = {ROOT!r}\n" + SCRIPT)
    p = subprocess.run([py, str(script)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(line[len("RESULT "):])
    assert r["tokens"] == [96] * 6
    assert r["max_running"] <= 2 and r["max_waiting"] >= 1, r  # 6 requests, 2 slots: some wait in vLLM's queue
    assert r.get("max_waiting_reported", 0) >= 1, r  # and vLLM's own scheduler said so
    assert r["after"]["waiting"] == 0 and r["after"]["running"] == 0
    # the counts came from vLLM's scheduler, and so does its KV cache use (GET /metrics: vllm:kv_cache_usage_perc)
    assert set(r["vllm_reported"]) == {"running", "waiting", "kv_cache_usage"}, r
    assert 0.0 <= r["vllm_reported"]["kv_cache_usage"] <= 1.0, r
