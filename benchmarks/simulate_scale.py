"""`gpuplan simulate` at scale: an hour of the shipped trace (19,366 requests) replayed by every model of a plan of
100 A100-80GB GPUs (25 nodes x 4) and 20 models with traffic and SLOs, the whole command timed (planning included).

    python -m benchmarks.simulate_scale [--trace FILE] [--hours H]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT / "examples" / "traces" / "azure-llm-2023-conv.csv"
MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-8B",
          "mistralai/Mistral-7B-Instruct-v0.3", "google/gemma-2-9b-it", "meta-llama/Llama-3.2-3B-Instruct",
          "meta-llama/Llama-3.2-1B-Instruct", "microsoft/Phi-3-mini-4k-instruct",
          "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "meta-llama/Llama-3.1-8B"]


def deploy(path: Path) -> None:
    models = []
    for i in range(20):
        src = MODELS[i % len(MODELS)]
        models.append({"name": f"m{i:02d}", "source": src, "engine": "vllm", "quantization": "bf16",
                       "max_model_len": 4096, "max_num_seqs": 32, "replicas": {"max": 8},
                       "traffic": {"requests_per_s": 2.0 + (i % 5) * 2.0, "prompt_tokens": 1000,
                                   "output_tokens": 200},
                       "slo": {"ttft_p95_ms": 1500, "tpot_p95_ms": 80}})
    cluster = {"nodes": [{"name": "a100", "replicas": 25, "gpus": [{"name": "A100-80GB", "count": 4}]}]}
    path.write_text(json.dumps({"applications": [{"name": "llm", "import_path": "serve.app:build_app",
                                                  "args": {"cluster": cluster, "models": models}}]}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "deploy.yaml"
        deploy(cfg)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "planner", "simulate", str(cfg), "--trace", a.trace, "--engines",
                            "vllm", "--json"], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return p.returncode
    out = json.loads(p.stdout)
    print(machine_line())
    reqs = sum(m["requests"] for m in out["models"])
    print(f"\n100 A100-80GB, 20 models: {out['duration_s']:.0f} s of traffic, {reqs} requests, {out['events']} events;"
          f" gpuplan simulate took {wall:.2f} s (the simulation {out['wall_s']:.2f} s of it, planning included)\n")
    print("| model | requests | TTFT p50 / p95 ms | TPOT p50 / p95 ms | within SLO | replicas | replica-s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for m in out["models"]:
        print(f"| {m['model']} | {m['requests']} | {m['ttft_p50_ms']} / {m['ttft_p95_ms']} | {m['tpot_p50_ms']} / "
              f"{m['tpot_p95_ms']} | {m['within_slo']:.1%} | {m['replicas_min']}..{m['replicas_max_seen']} | "
              f"{m['replica_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
