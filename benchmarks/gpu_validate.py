"""Validate the whole-replica estimate on a real GPU: load random-weight models with real shapes at bf16, int8 and
int4, run one prefill of max_model_len tokens and a batch of decode steps, and compare what the GPU held with
the planner's terms.

Measured per case:
- weights: resident bytes of the loaded model (serve/engines/memory_probe.py) vs ``bytes.weights``;
- torch peak: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after prefill + decode vs
  weights + kv_cache + activations;
- process: NVML used memory of this process (CUDA context, workspaces, allocator slack included) vs ``bytes.total``.

Usage (GPU box; writes docs/gpu-validation.md):
    python -m benchmarks.gpu_validate --models meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B-Instruct \
        --schemes bf16 int8 int4 --max-model-len 4096 --max-num-seqs 4 --out docs/gpu-validation.md
Smoke run on a CPU (tiny random model, checks the script itself):
    python -m benchmarks.gpu_validate --tiny --device cpu
Each case runs in its own subprocess so that CUDA peaks and contexts do not leak between cases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.common.cases import each_case  # noqa: E402
from benchmarks.common.machine import machine_line  # noqa: E402
GiB = 1024**3


def _nvml_process_used(index: int) -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid()
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid:
                return int(p.usedGpuMemory or 0)
        return None
    except Exception:
        return None


class _IdsOnlyTokenizer:
    """The engine needs a pad/eos id and a decode for its text deltas; random-weight checkpoints ship no tokenizer,
    and this benchmark reads token ids only."""

    pad_token_id = None
    eos_token_id = None

    @staticmethod
    def decode(ids, **_kw) -> str:
        return ""


def _drive_engine(model, vocab: int, max_model_len: int, max_num_seqs: int) -> dict:
    """What a replica does at its planned limits: max_num_seqs requests of max_model_len - 16 prompt tokens and 16
    new tokens each, sent together, through serve.engines.transformers.GenerationEngine (prefill passes of at most
    max_num_batched_tokens = max_model_len, caches merged into one running batch, batched decode)."""
    import asyncio
    import random

    from serve.engines.transformers import GenerationEngine
    from serve.types import SamplingParams

    eng = GenerationEngine(model, _IdsOnlyTokenizer(), max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    rng = random.Random(0)
    # ids below the specials; greedy. A random model may still emit an EOS id early; the row records the tokens made.
    prompts = [[rng.randrange(10, max(11, vocab // 2)) for _ in range(max_model_len - 16)] for _ in range(max_num_seqs)]

    async def one(p):
        n = 0
        async for c in eng.generate(p, SamplingParams(max_tokens=16, temperature=0.0)):
            n = c.completion_tokens
        return n

    async def all_():
        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        made = asyncio.run(all_())
        st = eng.stats()
    finally:
        eng.shutdown(timeout=30)
    return {"completion_tokens": int(sum(made)), "prefill_passes": st.get("prefill_passes"),
            "max_running_seen": st.get("max_running_seen")}


def random_model_dir(source: str, workdir: str, device: str) -> str:
    """A checkpoint of ``source`` to load: the directory itself when it holds weights, else random bf16 weights with
    the real shapes (config.json from the catalog or the given path, initialised on the device), saved once under
    ``workdir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.model.spec import _catalog_path, load_spec

    model_dir = source if os.path.isdir(source) else os.path.join(workdir, "random",
                                                                   load_spec(source).name.replace("/", "--"))
    if not os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")) and \
            not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        os.makedirs(model_dir, exist_ok=True)
        cfg_src = source if source.endswith(".json") else os.path.join(source, "config.json") \
            if os.path.isdir(source) else _catalog_path(source)
        shutil.copy(cfg_src, os.path.join(model_dir, "config.json"))
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("cuda" if device == "cuda" else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return model_dir


def run_case(source: str, scheme: str, device: str, max_model_len: int, max_num_seqs: int, workdir: str,
             workload: str = "engine") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec
    from serve.engines.loader import bnb_config
    from serve.engines.memory_probe import resident_bytes

    spec = load_spec(source)
    model_dir = random_model_dir(source, workdir, device)
    est = estimate_replica(load_spec(model_dir), quant=scheme, dtype="bf16", max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=bnb_config(scheme),
                                                 device_map={"": 0} if device == "cuda" else {"": "cpu"})
    load_s = time.perf_counter() - t0
    weights = resident_bytes(model, device=device)["total"]
    vocab = model.config.vocab_size
    t0 = time.perf_counter()
    if workload == "engine":
        served = _drive_engine(model, vocab, max_model_len, max_num_seqs)
    else:
        with torch.inference_mode():
            batch = torch.randint(0, vocab, (max_num_seqs, max_model_len - 16), device=device)
            gen = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False)
            served = {"completion_tokens": int(gen.shape[0] * (gen.shape[1] - batch.shape[1]))}
            del gen
    row = {"model": spec.name, "scheme": scheme, "device": device, "max_model_len": max_model_len,
           "max_num_seqs": max_num_seqs, "workload": workload, "load_s": round(load_s, 1),
           "run_s": round(time.perf_counter() - t0, 1), "est": est.to_json()["bytes"],
           "est_detail": est.to_json().get("detail", {}), "measured_weights": weights, **served}
    if device == "cuda":
        torch.cuda.synchronize()
        row["max_allocated"] = torch.cuda.max_memory_allocated()
        row["max_reserved"] = torch.cuda.max_memory_reserved()
        row["nvml_process_used"] = _nvml_process_used(0)
        free, total = torch.cuda.mem_get_info(0)
        row["device_used"] = total - free  # the whole device: this process + the driver's own reservation
    return row


def table(rows: list[dict]) -> str:
    """One row per case, MiB unless marked. peak - w - kv: torch's allocation peak less the planned weights and KV
    cache (what the activation term has to cover, cuBLAS workspaces included); non-torch: NVML's used memory of the
    process less torch's reserved peak (CUDA context, library kernels and handles)."""
    M = 2**20
    lines = ["| model | scheme | weights est - measured (bytes) | kv est | act est | peak - w - kv | "
             "frag est | reserved - allocated | context + workspaces est | non-torch | est total | NVML used | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["est"]
        over = (r.get("est_detail") or {}).get("runtime_overhead", {})
        frag = over.get("allocator_fragmentation", 0)
        ctx = e["runtime_overhead"] - frag
        used = r.get("nvml_process_used") or r.get("device_used")
        alloc, res = r.get("max_allocated", 0), r.get("max_reserved", 0)
        err = f"{100 * (e['total'] - used) / used:+.1f}%" if used else "n/a"
        lines.append(
            f"| {r['model']} | {r['scheme']} | {e['weights'] - r['measured_weights']:+,} | {e['kv_cache'] / M:,.0f} | "
            f"{e['activations'] / M:,.0f} | {(alloc - e['weights'] - e['kv_cache']) / M:,.0f} | {frag / M:,.0f} | "
            f"{(res - alloc) / M:,.0f} | {ctx / M:,.0f} | {((used or 0) - res) / M:,.0f} | {e['total'] / M:,.0f} | "
            f"{(used or 0) / M:,.0f} | {err} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B-Instruct"])
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="use a random tiny llama (smoke test of this script)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--workload", default="engine", choices=["engine", "generate"],
                    help="engine: serve.engines.transformers at max_num_seqs x max_model_len (what a replica does); generate: "
                         "transformers' generate() prefilling all sequences in one pass")
    ap.add_argument("--jsonl", default=None, help="append each case's raw row here as it finishes")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        source, scheme = a.case.split("|")
        print("ROW " + json.dumps(run_case(source, scheme, a.device, a.max_model_len, a.max_num_seqs, a.workdir,
                                           a.workload)))
        return 0
    workdir = tempfile.mkdtemp(prefix="gpuplan-validate-")
    models = a.models
    if a.tiny:
        from benchmarks.common.calibration import save_random_model

        models = [save_random_model("llama", workdir)[0]]
        a.max_model_len, a.max_num_seqs = min(a.max_model_len, 128), min(a.max_num_seqs, 2)
    rows = []
    args = ["--device", a.device, "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
            "--workdir", workdir, "--workload", a.workload]
    for row in each_case("benchmarks.gpu_validate", models, a.schemes, args, a.jsonl,
                       scratch=os.path.join(workdir, "random")):
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    header = machine_line(device=a.device, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                          workload=a.workload) + "\n\n"
    text = header + table(rows) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# GPU validation of the replica estimate\n\n" + text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
