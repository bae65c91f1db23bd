"""The transformers engine's speed on a GPU, beside what the speed model predicts for it: TTFT, TPOT and tokens/s of
serve.engines.transformers.GenerationEngine (what a replica runs) at 1, 8 and 32 concurrent sequences, per model and
scheme, on random weights with the real shapes (no download: config.json from the catalog, as gpu_validate.py).

The transformers engine's GPU speed numbers (``SPEED`` in planner/model/engines/transformers.py) are fitted on a
published A100 table of transformers' own ``generate()`` at batch 1 (docs/speed-model.md); this measures the engine
gpuplan runs, at the batches it runs, on the GPU at hand, and prints each prediction
(planner.model.engines.replica_speed for the same model, scheme, shape and GPU) beside the measurement. The predicted
TTFT includes the fixed per-request cost the model was fitted with; the measured one is the engine's alone.

    python -m benchmarks.gpu_speed --models meta-llama/Llama-3.2-1B-Instruct meta-llama/Llama-3.1-8B \\
        --schemes bf16 int8 int4 --batches 1 8 32 --jsonl rows.jsonl --out gpu-speed.md
    python -m benchmarks.gpu_speed --tiny --device cpu      # smoke run of the script (tiny random llama)

Each request: ``--input-tokens`` random prompt ids, ``--output-tokens`` new tokens (ignore_eos, greedy), all of a
batch submitted at once after one warm-up request. TTFT: submit to the first token (at a batch, the prefills queue
behind each other, as in a replica); TPOT: (last token - first token) / (tokens - 1) per request, the median over the
batch; tokens/s: every output token of the batch over the wall time from submit to the last token. Each (model, scheme)
runs in its own subprocess (CUDA state does not leak between cases); each row is printed and appended to ``--jsonl``
as it finishes, so a run stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from benchmarks.common.cases import each_case
from benchmarks.common.machine import machine_line
from benchmarks.gpu_validate import _IdsOnlyTokenizer, random_model_dir


class _CharPerIdTokenizer(_IdsOnlyTokenizer):
    """One character of text per token id: the engine streams text as it is decoded (ids whose text is not known
    yet wait for it), so with no text at all every token would arrive with the last and TPOT could not be timed."""

    @staticmethod
    def decode(ids, **_kw) -> str:
        return "x" * len(ids)


def _measure(eng, prompts: list[list[int]], output_tokens: int) -> dict:
    """One batch through the engine: every request's submit, first and last token times and tokens made."""
    import asyncio

    from serve.types import SamplingParams

    async def one(p):
        t0 = time.perf_counter()
        first = last = None
        n_first = n = 0
        async for c in eng.generate(p, SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)):
            if c.completion_tokens > n:
                now = time.perf_counter()
                if first is None:
                    first, n_first = now, c.completion_tokens
                last, n = now, c.completion_tokens
        return t0, first, last, n_first, n

    async def all_():
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(all_())
    start, end = min(g[0] for g in got), max(g[2] for g in got)
    ttft = [g[1] - g[0] for g in got]
    tpot = [(g[2] - g[1]) / (g[4] - g[3]) for g in got if g[4] > g[3]]
    made = sum(g[4] for g in got)
    return {"ttft_ms": round(1e3 * statistics.median(ttft), 2), "ttft_max_ms": round(1e3 * max(ttft), 2),
            "tpot_ms": round(1e3 * statistics.median(tpot), 3) if tpot else None, "tokens": made,
            "tokens_per_s": round(made / (end - start), 1)}


def predicted(source_dir: str, scheme: str, device: str, gpu: str | None, input_tokens: int, output_tokens: int,
              batches: list[int]) -> dict:
    """The speed model's TTFT / TPOT / tokens/s for each batch (planner.model.engines.replica_speed), or why not."""
    from planner.errors import GpuplanError
    from planner.model.engines import estimate_replica, replica_speed
    from planner.model.quant import resolve_quant
    from planner.model.spec import load_spec
    from planner.placement.capacity import device_speed

    try:
        spec = load_spec(source_dir)
        quant = resolve_quant(spec, scheme)
        est = estimate_replica(spec, quant=quant, dtype="bf16", max_model_len=input_tokens + output_tokens,
                               max_num_seqs=max(batches), device=device, engine="transformers")
        dev = device_speed("cpu" if device == "cpu" else gpu)
        out = {}
        for b in batches:
            s = replica_speed(spec, quant, est, dev, input_tokens=input_tokens, output_tokens=output_tokens, batch=b)
            out[str(b)] = {"ttft_ms": round(s.ttft_s * 1e3, 2), "tpot_ms": round(s.tpot_s * 1e3, 3),
                           "tokens_per_s": round(s.tokens_per_s, 1), "bound": s.bound, "device": s.device}
        return out
    except GpuplanError as exc:
        return {"error": str(exc)}


def run_case(source: str, scheme: str, device: str, workdir: str, input_tokens: int, output_tokens: int,
             batches: list[int]) -> dict:
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from planner.model.spec import load_spec
    from serve.engines.loader import bnb_config
    from serve.engines.transformers import GenerationEngine

    model_dir = random_model_dir(source, workdir, device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=bnb_config(scheme),
        device_map={"": 0} if device == "cuda" else {"": "cpu"})
    vocab = model.config.vocab_size
    rng = random.Random(0)
    row = {"model": load_spec(model_dir).name, "scheme": scheme, "device": device, "gpu": gpu,
           "input_tokens": input_tokens, "output_tokens": output_tokens, "measured": {},
           "predicted": predicted(model_dir, scheme, device, gpu, input_tokens, output_tokens, batches)}
    eng = GenerationEngine(model, _CharPerIdTokenizer(), max_num_seqs=max(batches),
                           max_model_len=input_tokens + output_tokens)
    try:
        _measure(eng, [[rng.randrange(10, max(11, vocab // 2)) for _ in range(input_tokens)]], 4)  # warm-up
        for b in batches:
            prompts = [[rng.randrange(10, max(11, vocab // 2)) for _ in range(input_tokens)] for _ in range(b)]
            row["measured"][str(b)] = _measure(eng, prompts, output_tokens)
    finally:
        eng.shutdown(timeout=30)
    return row


def table(rows: list[dict]) -> str:
    """One line per (model, scheme, batch): measured and predicted TTFT, TPOT, tokens/s, and predicted / measured."""
    lines = ["| model | scheme | batch | TTFT ms (predicted) | TPOT ms (predicted) | predicted / measured TPOT | "
             "tok/s (predicted) | bound |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        for b, m in r["measured"].items():
            p = r["predicted"].get(b) or {}
            ratio = f"{p['tpot_ms'] / m['tpot_ms']:.2f}" if p.get("tpot_ms") and m.get("tpot_ms") else "-"
            lines.append(f"| {r['model']} | {r['scheme']} | {b} | {m['ttft_ms']:.1f} ({p.get('ttft_ms', '-')}) | "
                         f"{m['tpot_ms'] if m['tpot_ms'] is not None else '-'} ({p.get('tpot_ms', '-')}) | {ratio} | "
                         f"{m['tokens_per_s']:.0f} ({p.get('tokens_per_s', '-')}) | {p.get('bound', '-')} |")
        if "error" in r["predicted"]:
            lines.append(f"| {r['model']} | {r['scheme']} | - | no prediction: {r['predicted']['error']} | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B"])
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--input-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a random tiny llama (smoke test of this script)")
    ap.add_argument("--jsonl", default=None, help="append each case's row here as it finishes")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        source, scheme = a.case.split("|")
        print("ROW " + json.dumps(run_case(source, scheme, a.device, a.workdir, a.input_tokens, a.output_tokens,
                                           a.batches)))
        return 0
    workdir = tempfile.mkdtemp(prefix="gpuplan-speed-")
    models = a.models
    if a.tiny:
        from benchmarks.common.calibration import save_random_model

        models = [save_random_model("llama", workdir)[0]]
    rows = []
    args = ["--device", a.device, "--workdir", workdir, "--input-tokens", str(a.input_tokens), "--output-tokens",
            str(a.output_tokens), "--batches", *map(str, a.batches)]
    for row in each_case("benchmarks.gpu_speed", models, a.schemes, args, a.jsonl,
                       scratch=os.path.join(workdir, "random")):
        rows.append(row)
        print("\n".join(table(rows[-1:]).splitlines()[2:]), flush=True)
    text = machine_line(device=a.device, input_tokens=a.input_tokens, output_tokens=a.output_tokens) + "\n\n" + \
        table(rows) + "\n"
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write("# The transformers engine's speed, measured and predicted\n\n" + text)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
