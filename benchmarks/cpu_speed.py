"""The shipped model on every engine here, through gpuplan's API, at 1, 8 and 16 concurrent streams: TTFT, TPOT and
tokens/s measured, for the speed model's CPU numbers (SPEED_CPU in planner/model/engines/) and its check.

One server (`python -m serve.run`) with five deployments of the tiny model: transformers bf16, int8 and int4
(bitsandbytes), llama.cpp (the shipped Q8_0 GGUF) and vLLM bf16 (when .venv-vllm exists); each is measured alone, the
others idle. Every answer is forced to --max-tokens tokens (ignore_eos); TPOT of a request is (last token - first
token) / (tokens - 1), from the client's clock.

    python -m benchmarks.cpu_speed [--json FILE] [--rounds N]
    python -m benchmarks.cpu_speed --fit FILE      # fit SPEED_CPU on a saved run; 8 streams held out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import serve_load
from benchmarks.common.machine import machine_line
from benchmarks.common.server import ROOT, start_gpuplan, stop_gpuplan, wait_ready
from serve.api.front import pick_port

MODEL = str(ROOT / "models" / "tiny-chat")
GGUF = str(ROOT / "models" / "tiny-chat" / "tiny-chat-Q8_0.gguf")
# (deployment name, engine, source, quantization, speed-model kernel)
CASES = [("tf-bf16", "transformers", MODEL, "bf16", "float"), ("tf-int8", "transformers", MODEL, "int8", "bnb-int8"),
         ("tf-int4", "transformers", MODEL, "int4", "bnb-4bit"), ("llamacpp", "llamacpp", GGUF, None, "gguf"),
         ("vllm-bf16", "vllm", MODEL, "bf16", "float")]
LEVELS = (1, 8, 16)
PROMPT = "Tell me a short story about a robot who learns to paint."


def config(path: Path, port: int, cases) -> None:
    models = []
    for name, engine, src, q, _ in cases:
        m = {"name": name, "source": src, "engine": engine, "max_model_len": 256, "max_num_seqs": 16,
             "replicas": {"min": 1, "max": 1}, "max_ongoing_requests": 64, "max_queued_requests": -1}
        if q:
            m["quantization"] = q
        models.append(m)
    path.write_text(yaml.safe_dump({"proxy_location": "HeadOnly",
                                    "http_options": {"host": "127.0.0.1", "port": pick_port()},
                                    "applications": [{"name": "llm", "route_prefix": "/",
                                                      "import_path": "serve.app:build_app",
                                                      "args": {"http": {"host": "127.0.0.1", "port": port},
                                                               "cluster": "auto", "models": models}}]}))


def measure(url: str, model: str, clients: int, max_tokens: int, rounds: int) -> dict:
    ns = argparse.Namespace(url=url, model=model, requests=max(16, 4 * clients), max_tokens=max_tokens,
                            prompt=PROMPT, temperature=0.8, seed=-1, timeout=300.0, ignore_eos=True)
    asyncio.run(serve_load.run_level(argparse.Namespace(**{**vars(ns), "requests": 2}), 1))  # warm
    tps, ttft, tpot = [], [], []
    for _ in range(rounds):
        lv = asyncio.run(serve_load.run_level(ns, clients))
        ok = lv.of("ok")
        tps.append(lv.tokens_per_s)
        ttft += [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot += [(r.latency_s - r.ttft_s) / (r.tokens - 1) for r in ok
                 if r.ttft_s is not None and r.latency_s is not None and r.tokens > 1]
    return {"clients": clients, "tokens_per_s": statistics.median(tps), "ttft_ms": statistics.median(ttft) * 1e3,
            "tpot_ms": statistics.median(tpot) * 1e3, "requests": len(tpot)}


def run(a) -> dict:
    import os

    cases = [c for c in CASES if c[1] != "vllm" or (ROOT / ".venv-vllm" / "bin" / "python").exists()
             or os.environ.get("GPUPLAN_VLLM_PYTHON")]
    out = {"machine": machine_line(), "max_tokens": a.max_tokens, "cases": []}
    # at most three CPU replicas per server: each asks Ray for half a CPU, and the ingress replicas need some too
    for group in (cases[:3], cases[3:]):
        if group:
            out["cases"] += _run_group(a, group)
    return out


def _run_group(a, cases) -> list[dict]:
    port = pick_port()
    url = f"http://127.0.0.1:{port}"
    done = []
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "deploy.yaml"
        config(cfg, port, cases)
        log = Path(tempfile.gettempdir()) / "cpu_speed_server.log"
        proc = start_gpuplan(cfg, log)
        try:
            if wait_ready(url, "/readyz", proc, a.ready_timeout) is None:
                raise SystemExit(f"server not ready; see {log}")
            for name, engine, _, q, kernel in cases:
                levels = [measure(url, name, c, a.max_tokens, a.rounds) for c in LEVELS]
                done.append({"name": name, "engine": engine, "quantization": q, "kernel": kernel, "levels": levels})
                print(name, [(lv["clients"], round(lv["tpot_ms"], 2), round(lv["tokens_per_s"])) for lv in levels],
                      flush=True)
        finally:
            stop_gpuplan(proc)
    return done


PROMPT_TOKENS = 30  # the chat prompt above with the tiny model's template, about (only the KV term depends on it)


def _model(case: dict):
    """(work, device, compute dtype) of the case as the speed model sees it on the CPU device."""
    from planner.model.estimate import KV_DTYPES
    from planner.model.quant import FLOAT_BYTES, resolve_quant
    from planner.model.spec import load_spec
    from planner.model.speed import compute_dtype_of, work_of
    from planner.placement.capacity import device_speed

    spec = load_spec(GGUF if case["engine"] == "llamacpp" else MODEL)
    q = resolve_quant(spec, case["quantization"])
    dev = device_speed("cpu")
    dtype = "bf16" if q.scheme != "gguf" else "fp16"
    return work_of(spec, q, dtype, KV_DTYPES["auto"] or FLOAT_BYTES[dtype]), dev, compute_dtype_of(q, dtype, dev)


def roofline(case: dict, batch: int, max_tokens: int) -> float:
    """The speed model's memory-or-compute term of one decode step of the case on the CPU device (the tiny model's
    bytes over the measured bandwidth; small next to the fixed costs, but part of what the model predicts)."""
    from planner.model.estimate import KV_DTYPES
    from planner.model.quant import FLOAT_BYTES, resolve_quant
    from planner.model.spec import load_spec
    from planner.model.speed import KernelSpeed, compute_dtype_of, decode_step, work_of
    from planner.placement.capacity import device_speed

    src = GGUF if case["engine"] == "llamacpp" else MODEL
    spec = load_spec(src)
    q = resolve_quant(spec, case["quantization"])
    dev = device_speed("cpu")
    dtype = "bf16" if q.scheme != "gguf" else "fp16"
    work = work_of(spec, q, dtype, KV_DTYPES["auto"] or FLOAT_BYTES[dtype])
    st = decode_step(work, dev, KernelSpeed(0.0, 0.0, 1.0, ""), 1.0, compute_dtype_of(q, dtype, dev), batch=batch,
                     context=PROMPT_TOKENS + (max_tokens - 1) / 2)
    return st.seconds


def fit(run_json: dict) -> dict:
    """Per case: TPOT(B) = step_s + B x seq_s + the model's roofline term, through the 1- and 16-stream levels (the
    8-stream level is predicted); request_s = TTFT at 1 stream less the model's prefill of the prompt: the serving
    path's latency before the first token (the API, the ingress, the hand-off to the engine)."""
    from planner.model.speed import KernelSpeed, prefill

    out = {}
    n = run_json["max_tokens"]
    for c in run_json["cases"]:
        lv = {x["clients"]: x for x in c["levels"]}
        t1 = lv[1]["tpot_ms"] / 1e3 - roofline(c, 1, n)
        t16 = lv[16]["tpot_ms"] / 1e3 - roofline(c, 16, n)
        seq = max(0.0, (t16 - t1) / 15)
        step = max(0.0, t1 - seq)
        work, dev, cd = _model(c)
        pre = prefill(work, dev, KernelSpeed(step, 0.0, 1.0, "", seq_s=seq), 1.0, cd, tokens=PROMPT_TOKENS).seconds
        request = max(0.0, lv[1]["ttft_ms"] / 1e3 - pre)
        out[c["name"]] = {"engine": c["engine"], "kernel": c["kernel"], "step_s": step, "seq_s": seq,
                          "request_s": request}
    return out


def predicted_tpot(case: dict, f: dict, batch: int, max_tokens: int) -> float:
    return f["step_s"] + batch * f["seq_s"] + roofline(case, batch, max_tokens)


def table(run_json: dict, fitted: dict) -> str:
    lines = ["| deployment | engine | kernel | streams | TTFT ms | TPOT ms measured | TPOT ms model | error | "
             "tokens/s measured | tokens/s model | error |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    n = run_json["max_tokens"]
    for c in run_json["cases"]:
        f = fitted[c["name"]]
        for x in c["levels"]:
            b = x["clients"]
            tpot = predicted_tpot(c, f, b, n)
            # a stream's request: TTFT (measured at 1 stream: the path and the prefill) then n - 1 steps; b of them
            ttft1 = next(y for y in c["levels"] if y["clients"] == 1)["ttft_ms"] / 1e3
            tps = b * n / (ttft1 + (n - 1) * tpot)
            held = " (held out)" if b == 8 else ""
            lines.append(f"| {c['name']} | {c['engine']} | {c['kernel']} | {b}{held} | {x['ttft_ms']:.1f} | "
                         f"{x['tpot_ms']:.2f} | {tpot * 1e3:.2f} | {tpot * 1e3 / x['tpot_ms'] - 1:+.1%} | "
                         f"{x['tokens_per_s']:.0f} | {tps:.0f} | {tps / x['tokens_per_s'] - 1:+.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the run here")
    ap.add_argument("--fit", help="fit and print the table of a saved run instead of running")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    data = json.loads(Path(a.fit).read_text()) if a.fit else run(a)
    if a.json and not a.fit:
        Path(a.json).write_text(json.dumps(data, indent=1))
    fitted = fit(data)
    print(data["machine"])
    print(json.dumps(fitted, indent=1))
    print(table(data, fitted))
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"({time.time() - t0:.0f} s)", file=sys.stderr)
    sys.exit(rc)
