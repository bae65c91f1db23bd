"""Validate the whole-replica estimate on a real GPU: load random-weight models with real shapes at bf16, int8 and
int4, run one prefill of max_model_len tokens and a batch of decode steps, and compare what the GPU held with
the planner's terms.

Measured per case:
- weights: resident bytes of the loaded model (serve/memory_probe.py) vs ``bytes.weights``;
- torch peak: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after prefill + decode vs
  weights + kv_cache + activations;
- process: NVML used memory of this process (CUDA context, workspaces, allocator slack included) vs ``bytes.total``.

Usage (GPU box; writes docs/gpu-validation.md):
    python benchmarks/gpu_validate.py --models meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B-Instruct \
        --schemes bf16 int8 int4 --max-model-len 4096 --max-num-seqs 4 --out docs/gpu-validation.md
Smoke run on a CPU (tiny random model, checks the script itself):
    python benchmarks/gpu_validate.py --tiny --device cpu
Each case runs in its own subprocess so that CUDA peaks and contexts do not leak between cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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


def run_case(source: str, scheme: str, device: str, max_model_len: int, max_num_seqs: int, workdir: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from planner.memory import estimate_replica
    from planner.spec import _catalog_path, load_spec
    from serve.loader import bnb_config
    from serve.memory_probe import resident_bytes

    spec = load_spec(source)
    model_dir = source if os.path.isdir(source) else os.path.join(workdir, "random", spec.name.replace("/", "--"))
    if not os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")) and \
            not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        # random weights with the real shapes: config.json from the catalog / the given path, init on the device
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
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (1, max_model_len - 16), device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        del out
        batch = torch.randint(0, vocab, (max_num_seqs, max_model_len - 16), device=device)
        gen = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False)
        del gen
    row = {"model": spec.name, "scheme": scheme, "device": device, "max_model_len": max_model_len,
           "max_num_seqs": max_num_seqs, "load_s": round(load_s, 1), "est": est.to_json()["bytes"],
           "measured_weights": weights}
    if device == "cuda":
        torch.cuda.synchronize()
        row["max_allocated"] = torch.cuda.max_memory_allocated()
        row["max_reserved"] = torch.cuda.max_memory_reserved()
        row["nvml_process_used"] = _nvml_process_used(0)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | scheme | weights est / measured | est weights+kv+act | max_allocated | max_reserved | est total | NVML process used | total error vs NVML |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = r["est"]
        dyn = (e["weights"] + e["kv_cache"] + e["activations"]) / GiB
        used = r.get("nvml_process_used")
        err = f"{100 * (e['total'] - used) / used:+.1f}%" if used else "n/a"
        lines.append(
            f"| {r['model']} | {r['scheme']} | {e['weights'] / GiB:.3f} / {r['measured_weights'] / GiB:.3f} GiB | "
            f"{dyn:.2f} | {r.get('max_allocated', 0) / GiB:.2f} | {r.get('max_reserved', 0) / GiB:.2f} | "
            f"{e['total'] / GiB:.2f} | {used / GiB if used else 0:.2f} | {err} |")
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
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        source, scheme = a.case.split("|")
        print("ROW " + json.dumps(run_case(source, scheme, a.device, a.max_model_len, a.max_num_seqs, a.workdir)))
        return 0
    workdir = tempfile.mkdtemp(prefix="gpuplan-validate-")
    models = a.models
    if a.tiny:
        from serve.calibration import save_random_model

        models = [save_random_model("llama", workdir)[0]]
        a.max_model_len, a.max_num_seqs = min(a.max_model_len, 128), min(a.max_num_seqs, 2)
    rows = []
    for m in models:
        for s in a.schemes:
            p = subprocess.run([sys.executable, __file__, "--case", f"{m}|{s}", "--device", a.device,
                                "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
                                "--workdir", workdir], capture_output=True, text=True)
            got = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            if not got:
                print(f"{m} {s}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(got[0]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    header = (f"machine: {platform.platform()}, python {platform.python_version()}, device {a.device}, "
              f"max_model_len {a.max_model_len}, max_num_seqs {a.max_num_seqs}\n\n")
    text = header + table(rows) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# GPU validation of the replica estimate\n\n" + text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
