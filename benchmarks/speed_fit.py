"""Fit the speed model's engine numbers (planner/model/speed.py) on published decode speeds, and print every residual.

Data: the Qwen2.5 speed benchmark (benchmarks/data/qwen2.5-a100-batch1.csv, a copy of
../shared/reference/speed/; source and versions in its README there and in docs/speed-model.md): Qwen2.5-0.5B/1.5B/3B/
7B-Instruct, one sequence generating 2,048 tokens after 1 / 6,144 / 14,336 / 30,720 input tokens, on one A100 80GB,
under transformers' ``generate`` and vLLM, in BF16, GPTQ-Int8, GPTQ-Int4 and AWQ. The models' architecture is read
from their config.json (benchmarks/data/qwen2.5/).

Per engine and kernel it fits ``step_s``, ``layer_s`` and ``bandwidth_eff``; per engine ``compute_eff`` (prefill);
least squares on log(tokens/s), bounded. A run's time is one prefill of the input plus 2,048 decode steps at the
mean context. Then two hold-outs: fit without the 30,720-token rows and predict them; fit without Qwen2.5-3B and
predict it.

    python -m benchmarks.speed_fit            # the tables (markdown) and the constants the engine modules hold
    python -m benchmarks.speed_fit --json F   # also every row as JSON
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks.common.machine import machine_line
from planner.model.quant import resolve_quant
from planner.model.spec import load_spec
from planner.model.speed import EngineSpeed, KernelSpeed, decode_step, kernel_of, prefill, work_of
from planner.placement.capacity import lookup_gpu

DATA = Path(__file__).resolve().parent / "data"
CSV = DATA / "qwen2.5-a100-batch1.csv"
OUTPUT_TOKENS = 2048
ENGINES = {"Transformer": "transformers", "vLLM": "vllm"}
QUANTS = {"BF16": ("bf16", None), "GPTQ-Int8": ("gptq", 8), "GPTQ-Int4": ("gptq", 4), "AWQ": ("awq", 4)}
SOURCE = "Qwen2.5 speed benchmark, A100 80GB, batch 1 (benchmarks/speed_fit.py)"


def load_rows(path: Path = CSV) -> list[dict]:
    """The published rows with what the model needs of each: the model's work per token at the row's quantization."""
    specs, rows = {}, []
    with open(path) as f:
        for r in csv.DictReader(f):
            name = r["model"]
            if name not in specs:
                specs[name] = load_spec(str(DATA / "qwen2.5" / f"Qwen--{name}.json"))
            spec = specs[name]
            scheme, bits = QUANTS[r["quant"]]
            q = resolve_quant(spec, scheme, bits=bits, group_size=128 if bits else None)
            rows.append({"engine": ENGINES[r["engine"]], "model": name, "quant": r["quant"], "kernel": kernel_of(q),
                         "input": int(r["input_len"]), "measured": float(r["tokens_per_s"]),
                         "work": work_of(spec, q, "bf16", 2)})
    return rows


def predict(row: dict, ks: KernelSpeed, compute_eff: float, dev) -> float:
    """Generated tokens per second of the row's run: 2,048 tokens over one prefill and 2,048 decode steps."""
    w = row["work"]
    pre = prefill(w, dev, ks, compute_eff, "bf16", tokens=row["input"]).seconds
    step = decode_step(w, dev, ks, compute_eff, "bf16", batch=1, context=row["input"] + (OUTPUT_TOKENS - 1) / 2)
    return OUTPUT_TOKENS / (pre + OUTPUT_TOKENS * step.seconds)


def fit(rows: list[dict], dev) -> dict[str, EngineSpeed]:
    """Per engine: least squares on log(tokens/s) over its rows; per kernel step_s, layer_s, bandwidth_eff, per
    engine compute_eff."""
    from scipy.optimize import least_squares

    out = {}
    for engine in sorted({r["engine"] for r in rows}):
        mine = [r for r in rows if r["engine"] == engine]
        kernels = sorted({r["kernel"] for r in mine})

        def unpack(x):
            ks = {k: KernelSpeed(x[3 * i] * 1e-3, x[3 * i + 1] * 1e-3, x[3 * i + 2], SOURCE)
                  for i, k in enumerate(kernels)}
            return ks, x[-1]

        def resid(x):
            ks, ce = unpack(x)
            return [math.log(predict(r, ks[r["kernel"]], ce, dev) / r["measured"]) for r in mine]

        x0 = [1.0, 0.05, 0.6] * len(kernels) + [0.5]
        lo = [0.0, 0.0, 0.05] * len(kernels) + [0.05]
        hi = [100.0, 5.0, 1.0] * len(kernels) + [1.0]
        res = least_squares(resid, x0, bounds=(lo, hi))
        ks, ce = unpack(res.x)
        out[engine] = EngineSpeed(engine, ks, ce, SOURCE)
    return out


def residuals(rows: list[dict], fitted: dict[str, EngineSpeed], dev) -> list[dict]:
    out = []
    for r in rows:
        sp = fitted[r["engine"]]
        p = predict(r, sp.kernels[r["kernel"]], sp.compute_eff, dev)
        out.append({k: r[k] for k in ("engine", "model", "quant", "input", "measured")} |
                   {"predicted": round(p, 2), "error": round(p / r["measured"] - 1, 4)})
    return out


def summary(res: list[dict]) -> str:
    errs = [abs(r["error"]) for r in res]
    return (f"{len(errs)} rows: median abs error {statistics.median(errs):.1%}, p90 "
            f"{sorted(errs)[int(0.9 * (len(errs) - 1))]:.1%}, max {max(errs):.1%}")


def constants(fitted: dict[str, EngineSpeed]) -> str:
    lines = []
    for e, sp in fitted.items():
        lines.append(f"# {e}: compute_eff={sp.compute_eff:.3f}")
        for k, ks in sp.kernels.items():
            lines.append(f'    "{k}": KernelSpeed(step_s={ks.step_s:.3e}, layer_s={ks.layer_s:.3e}, '
                         f'bandwidth_eff={ks.bandwidth_eff:.3f}, source=FIT),')
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write every row (fit and hold-outs) here")
    a = ap.parse_args(argv)
    dev = lookup_gpu("A100-80GB").speed()
    rows = load_rows()
    fitted = fit(rows, dev)
    print(machine_line())
    print("\n## Fitted constants\n")
    print(constants(fitted))
    res = residuals(rows, fitted, dev)
    print("\n## Every row (fitted on all)\n")
    print("| engine | model | quant | input | measured tok/s | predicted | error |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in res:
        print(f"| {r['engine']} | {r['model']} | {r['quant']} | {r['input']} | {r['measured']:.1f} | "
              f"{r['predicted']:.1f} | {r['error']:+.1%} |")
    for e in fitted:
        print(f"\n{e}: {summary([r for r in res if r['engine'] == e])}")
    held = {}
    for label, keep in (("30,720-token inputs", lambda r: r["input"] != 30720),
                        ("Qwen2.5-3B", lambda r: r["model"] != "Qwen2.5-3B-Instruct")):
        f2 = fit([r for r in rows if keep(r)], dev)
        out = residuals([r for r in rows if not keep(r)], f2, dev)
        held[label] = out
        print(f"\n## Held out: {label} (fitted without them)\n")
        for e in f2:
            print(f"{e}: {summary([r for r in out if r['engine'] == e])}")
    if a.json:
        Path(a.json).write_text(json.dumps({"fit": res, "held_out": held}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
