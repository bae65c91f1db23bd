"""Estimate vs measured, two tables.

1. Weights, per architecture and scheme: random-weight models built by transformers, loaded on this machine's CPU
   with bitsandbytes, resident bytes measured (serve/engines/memory_probe.py) against the planner's ``bytes.weights``.
2. Whole replicas against published GPU measurements (Qwen2.5 speed benchmark, A100 80GB, transformers,
   batch 1, input length 1, 2048 generated tokens, ``torch.cuda.max_memory_allocated``; see
   planner/catalog/published-figures.md). max_memory_allocated excludes the CUDA context, library workspaces and
   allocator slack, so the comparison is against weights + kv_cache + activations; the usual rule
   ``params x bytes x 1.2`` is shown next to it.

Run: .venv/bin/python -m benchmarks.estimate_accuracy
"""

from __future__ import annotations

import tempfile


from benchmarks.common.machine import machine_line  # noqa: E402
from planner.model.engines import estimate_replica  # noqa: E402
from planner.model.spec import load_spec  # noqa: E402

GiB = 1024**3

# (model, scheme for the estimate, checkpoint bits, measured GiB) — Qwen2.5 speed benchmark, input length 1
PUBLISHED = [
    ("Qwen/Qwen2.5-7B-Instruct", "bf16", 16, 14.38),
    ("Qwen/Qwen2.5-7B-Instruct", "gptq8", 8, 8.42),
    ("Qwen/Qwen2.5-7B-Instruct", "gptq", 4, 5.52),
    ("Qwen/Qwen2.5-7B-Instruct", "awq", 4, 5.39),
    ("Qwen/Qwen2.5-32B-Instruct", "bf16", 16, 61.58),
    ("Qwen/Qwen2.5-32B-Instruct", "gptq8", 8, 33.56),
    ("Qwen/Qwen2.5-32B-Instruct", "gptq", 4, 18.94),
    ("Qwen/Qwen2.5-32B-Instruct", "awq", 4, 18.67),
]


def weights_table() -> list[tuple]:
    from benchmarks.common.calibration import FAMILIES, load_and_measure, save_random_model

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for fam in FAMILIES:
            model_dir, _ = save_random_model(fam, root)
            spec = load_spec(model_dir)
            for scheme in ("bf16", "int8", "nf4", "fp4", "int4"):
                measured = load_and_measure(model_dir, scheme)["total"]
                est = estimate_replica(spec, quant=scheme, dtype="bf16", max_model_len=64, device="cpu").weights
                naive = int(spec.params_total * {"bf16": 2, "int8": 1}.get(scheme, 0.5))
                rows.append((fam, scheme, measured, est, naive))
    return rows


def published_table() -> list[tuple]:
    rows = []
    for name, scheme, bits, measured in PUBLISHED:
        spec = load_spec(name)
        q = "gptq" if scheme.startswith("gptq") else scheme
        est = estimate_replica(spec, quant=q, bits=bits if q in ("gptq", "awq") else None, max_model_len=2049,
                               max_num_batched_tokens=1)
        allocated = est.weights + est.kv_cache + est.activations
        rule = spec.params_total * bits / 8 * 1.2
        rows.append((name.split("/")[1], f"{q} {bits}-bit" if q != "bf16" else "bf16", measured, allocated / GiB,
                     est.total / GiB, rule / GiB))
    return rows


def main() -> None:
    print(machine_line())
    print("\n## Weights: estimate vs resident bytes of the loaded model (CPU, bitsandbytes)\n")
    print("| architecture | scheme | measured bytes | estimate | error | params x bytes/param | its error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for fam, scheme, m, e, naive in weights_table():
        print(f"| {fam} | {scheme} | {m:,} | {e:,} | {100 * (e - m) / m:+.3f}% | {naive:,} | {100 * (naive - m) / m:+.1f}% |")
    print("\n## Whole replica vs published GPU measurements (Qwen2.5 speed benchmark, A100 80GB, max_memory_allocated)\n")
    print("| model | scheme | measured GiB | estimate GiB (weights+kv+activations) | error | estimate incl. runtime | params x bytes x 1.2 | its error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, q, meas, alloc, total, rule in published_table():
        print(f"| {model} | {q} | {meas:.2f} | {alloc:.2f} | {100 * (alloc - meas) / meas:+.1f}% | {total:.2f} | "
              f"{rule:.2f} | {100 * (rule - meas) / meas:+.1f}% |")


if __name__ == "__main__":
    main()
