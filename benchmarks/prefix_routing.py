"""Prefix-aware routing against routing by load, on vLLM replicas with prefix caching (issue 29).

    .venv/bin/python -m benchmarks.prefix_routing [--tenants 8] [--system-tokens 1500] [--rounds 6] [--json out.json]

Two vLLM replicas of one model (``replicas: {min: 2, max: 2}``, vLLM's automatic prefix caching on, as it is by
default) serve chats from ``--tenants`` tenants, each with its own system prompt of about ``--system-tokens``
tokens and a short question, one request at a time, tenants in a shuffled order each round, one output token (the
time to first token is the prefill). Each replica's KV cache holds ``max_model_len x max_num_seqs`` = 8,192 tokens
(planned): about half the tenants' system prompts. Routed by prefix, each tenant keeps to one replica, so each
replica sees half the tenants and keeps their prefixes; routed by load, every replica sees every tenant and evicts.
The server is started twice, ``routing.prefix: true`` then ``false``, the same requests in the same order; round 1
(every prefix cold) is reported apart.

The model is built here (random weights, saved once under ``--model-dir``): the shipped tiny model's tokenizer on
a Llama of hidden 512, 8 layers, 4,096 positions, so that a system prompt's prefill takes long enough on a CPU to
see (the shipped tiny model has 256 positions and prefills in a few milliseconds).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common.machine import machine_line  # noqa: E402
from benchmarks.common.server import start_gpuplan, stop_gpuplan, wait_ready  # noqa: E402
from benchmarks.common.stats import percentile  # noqa: E402

TINY = ROOT / "models" / "tiny-chat"
SERVED = "prefix-bench"
MAX_MODEL_LEN, MAX_NUM_SEQS = 4096, 2


def make_model(out: Path) -> Path:
    """A Llama with the tiny model's tokenizer (vocab 4,096), hidden 512, 8 layers of 8 heads, 4,096 positions,
    random weights in bf16 (about 30M parameters): built once, reused."""
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((TINY / "config.json").read_text())
    cfg.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=8, head_dim=64, max_position_embeddings=MAX_MODEL_LEN)
    for k in ("architectures", "model_type", "transformers_version", "dtype"):
        cfg.pop(k, None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (TINY / f).exists():
            shutil.copy(TINY / f, out / f)
    return out


def system_prompts(model_dir: Path, tenants: int, tokens: int, seed: int = 0) -> list[str]:
    """``tenants`` system prompts of about ``tokens`` tokens each: random words of the tokenizer's vocabulary."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 2]
    rng = random.Random(seed)
    out = []
    for t in range(tenants):
        words: list[str] = [f"You are assistant number {t}."]
        while len(tok.encode(" ".join(words)).ids) < tokens:
            words.extend(rng.choice(vocab) for _ in range(50))
        out.append(" ".join(words))
    return out


def deploy_file(path: Path, model_dir: Path, port: int, prefix: bool) -> None:
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port + 1},
           "applications": [{"name": "llm", "route_prefix": "/", "import_path": "serve.app:build_app", "args": {
               "http": {"host": "127.0.0.1", "port": port, "replicas": 1}, "cluster": "auto",
               "models": [{"name": SERVED, "source": str(model_dir), "quantization": "bf16", "engine": "vllm",
                           "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS,
                           "replicas": {"min": 2, "max": 2}, "routing": {"prefix": prefix},
                           "request_timeout_s": 600}]}}]}
    path.write_text(yaml.safe_dump(cfg))


def ttft(client: httpx.Client, url: str, system: str, question: str) -> float:
    """Seconds to the first streamed content of one chat (max_tokens 1)."""
    body = {"model": SERVED, "stream": True, "max_tokens": 1, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                return time.perf_counter() - t0
    raise RuntimeError("the stream ended without a chunk")


def run(mode_prefix: bool, model_dir: Path, prompts: list[str], order: list[list[int]], port: int, logdir: Path) -> dict:
    cfg = logdir / f"prefix_{'on' if mode_prefix else 'off'}.yaml"
    deploy_file(cfg, model_dir, port, mode_prefix)
    proc = start_gpuplan(cfg, cfg.with_suffix(".log"))
    url = f"http://127.0.0.1:{port}"
    try:
        up = wait_ready(url, "/readyz", proc, 900)
        if up is None:
            raise SystemExit(f"prefix_routing: the server did not come up; see {cfg.with_suffix('.log')}")
        rows = []
        with httpx.Client(timeout=600) as client:
            for rnd, tenants in enumerate(order):
                for t in tenants:
                    rows.append({"round": rnd, "tenant": t,
                                 "ttft_s": ttft(client, url, prompts[t], f"Question {rnd} for tenant {t}?")})
        return {"prefix": mode_prefix, "ready_s": round(up, 1), "rows": rows}
    finally:
        stop_gpuplan(proc)


def summary(res: dict) -> dict:
    warm = [r["ttft_s"] for r in res["rows"] if r["round"] > 0]
    cold = [r["ttft_s"] for r in res["rows"] if r["round"] == 0]
    return {"routing": "prefix" if res["prefix"] else "load", "n_warm": len(warm),
            "warm_p50_ms": round(1e3 * percentile(warm, 50), 1), "warm_p95_ms": round(1e3 * percentile(warm, 95), 1),
            "warm_mean_ms": round(1e3 * statistics.mean(warm), 1), "cold_p50_ms": round(1e3 * percentile(cold, 50), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--port", type=int, default=8370)
    ap.add_argument("--model-dir", default="/tmp/gpuplan-prefix-model")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    model_dir = make_model(Path(a.model_dir))
    prompts = system_prompts(model_dir, a.tenants, a.system_tokens)
    rng = random.Random(1)
    order = []
    for _ in range(a.rounds):
        o = list(range(a.tenants))
        rng.shuffle(o)
        order.append(o)
    logdir = Path("/tmp")
    results = [run(p, model_dir, prompts, order, a.port, logdir) for p in (True, False)]
    print(machine_line())
    print(f"{a.tenants} tenants x {a.system_tokens}-token system prompts, {a.rounds} rounds, 1 client, max_tokens 1; "
          f"2 vLLM replicas, KV {MAX_MODEL_LEN * MAX_NUM_SEQS} tokens each (prefix caching on)")
    print(f"{'routing':<8} {'TTFT p50 ms':>12} {'p95 ms':>8} {'mean ms':>8} {'round 1 p50 ms':>15}")
    rows = [summary(r) for r in results]
    for s in rows:
        print(f"{s['routing']:<8} {s['warm_p50_ms']:>12} {s['warm_p95_ms']:>8} {s['warm_mean_ms']:>8} "
              f"{s['cold_p50_ms']:>15}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": rows, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
