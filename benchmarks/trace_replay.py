"""Replay a slice of a request trace against the real server, and the same requests through `gpuplan simulate`'s
engine model: TTFT and TPOT p50/p95 side by side.

The server (`python -m serve.run`) runs one deployment of the shipped tiny model on this machine's CPU (--engine). The
arrivals are `gpuplan simulate`'s (planner.simulate.arrivals_from_trace): the trace's clock scaled to --rate and its
token counts to the --prompt-tokens / --output-tokens means (the tiny model holds 256 tokens). Each request is a
streamed /v1/completions whose prompt is that many tokens (a repeated one-token word; the server's usage says how many
it counted) and whose answer is forced to its length (ignore_eos). Then the same rows, with the prompt lengths the
server counted, go through planner.simulate.simulate on the plan of the same deploy file (the speed model's CPU
numbers for the engine).

    python -m benchmarks.trace_replay [--engine llamacpp] [--rate 4] [--duration 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.common.machine import machine_line
from benchmarks.common.server import ROOT, start_gpuplan, stop_gpuplan, wait_ready
from benchmarks.common.stats import percentile
from serve.api.front import pick_port

TRACE = ROOT / "examples" / "traces" / "azure-llm-2023-conv.csv"
SOURCES = {"llamacpp": (str(ROOT / "models" / "tiny-chat" / "tiny-chat-Q8_0.gguf"), None),
           "transformers": (str(ROOT / "models" / "tiny-chat"), "int4"),
           "vllm": (str(ROOT / "models" / "tiny-chat"), "bf16")}


def deploy(path: Path, port: int, engine: str, seqs: int) -> dict:
    src, q = SOURCES[engine]
    m = {"name": "tiny", "source": src, "engine": engine, "max_model_len": 256, "max_num_seqs": seqs,
         "replicas": {"min": 1, "max": 1}, "max_ongoing_requests": 64, "max_queued_requests": -1}
    if q:
        m["quantization"] = q
    args = {"http": {"host": "127.0.0.1", "port": port}, "cluster": "auto", "models": [m]}
    path.write_text(yaml.safe_dump({"proxy_location": "HeadOnly",
                                    "http_options": {"host": "127.0.0.1", "port": pick_port()},
                                    "applications": [{"name": "llm", "route_prefix": "/",
                                                      "import_path": "serve.app:build_app", "args": args}]}))
    return args


async def one(client: httpx.AsyncClient, at: float, t0: float, prompt: int, output: int, model: str = "tiny",
              text: str | None = None, request_id: str | None = None) -> dict:
    """One streamed completion sent at ``t0 + at``: its status, tokens, TTFT and TPOT at the client. The prompt is
    ``text``, or prompt - 1 times "a" (one token of the tiny model's tokenizer; its BOS makes the prompt's length).
    ``request_id``: sent as x-request-id (the server's timeline events carry it, serve/trace.py); the send and the
    first token are then also stamped on the wall clock the timeline uses."""
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    headers = {"x-request-id": request_id} if request_id else None
    sent_wall = time.time()
    body = {"model": model, "prompt": text if text is not None else " ".join(["a"] * max(1, prompt - 1)),
            "max_tokens": output,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8}
    start = time.perf_counter()
    first = last = first_wall = None
    usage = {}
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                return {"at": at, "status": resp.status_code}
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                obj = json.loads(line[5:])
                if obj.get("usage"):
                    usage = obj["usage"]
                if any(c.get("text") for c in obj.get("choices") or []):
                    now = time.perf_counter()
                    if first is None:
                        first_wall = time.time()
                    first = first if first is not None else now
                    last = now
    except httpx.HTTPError as exc:
        return {"at": at, "status": type(exc).__name__}
    n = int(usage.get("completion_tokens") or 0)
    return {"at": at, "status": 200, "prompt_tokens": int(usage.get("prompt_tokens") or prompt), "tokens": n,
            "ttft_ms": (first - start) * 1e3 if first else None,
            "tpot_ms": (last - first) / (n - 1) * 1e3 if first and n > 1 else None,
            **({"id": request_id, "sent_wall": sent_wall, "first_wall": first_wall} if request_id else {})}


async def replay(url: str, rows) -> list[dict]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0, connect=30.0)) as c:
        t0 = time.perf_counter() + 0.5
        return await asyncio.gather(*(one(c, t, t0, p, o) for t, p, o in rows))


def summary(ttft: list[float], tpot: list[float]) -> dict:
    return {"ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p95_ms": round(percentile(ttft, 95), 1),
            "tpot_p50_ms": round(percentile(tpot, 50), 2), "tpot_p95_ms": round(percentile(tpot, 95), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=sorted(SOURCES), default="llamacpp")
    ap.add_argument("--rate", type=float, default=4.0, help="mean requests/s")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the trace to replay")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--json", help="write every request and both summaries here")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    from planner.config import parse_deploy_args
    from planner.demand import sim_models
    from planner.simulate import arrivals_from_trace, simulate
    from planner.traffic import Traffic, read_trace

    rows = arrivals_from_trace(read_trace(a.trace), [("tiny", Traffic(a.rate, a.prompt_tokens, a.output_tokens))],
                               duration_s=a.duration)["tiny"]
    rows = [(t, min(p, 256 - o - 8), o) for t, p, o in rows if o < 200]  # what the tiny model holds
    port = pick_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "deploy.yaml"
        args = deploy(cfg, port, a.engine, a.max_num_seqs)
        log = Path(tempfile.gettempdir()) / "trace_replay_server.log"
        proc = start_gpuplan(cfg, log)
        try:
            url = f"http://127.0.0.1:{port}"
            if wait_ready(url, "/readyz", proc, a.ready_timeout) is None:
                raise SystemExit(f"server not ready; see {log}")
            asyncio.run(replay(url, [(0.0, 20, 8), (0.0, 20, 8)]))  # warm
            got = asyncio.run(replay(url, rows))
        finally:
            stop_gpuplan(proc)
    ok = [g for g in got if g["status"] == 200 and g["ttft_ms"] is not None]
    real = summary([g["ttft_ms"] for g in ok], [g["tpot_ms"] for g in ok if g["tpot_ms"] is not None])
    print("real server:", real, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"requests": got, "real": real}, indent=1))
    # the same requests, with the prompt lengths the server counted, through the simulator on the plan
    from planner.cli.plan import _engines
    from planner.cluster.inventory import Cluster, Node
    from planner.planning import make_plan

    parsed = parse_deploy_args(args)
    cluster = Cluster(nodes=(Node(name="node-0", cpu_memory_bytes=16 * 2**30),), source="declared")
    result = make_plan(parsed, cluster, _engines(None), strict=False)
    sim_rows = [(g["at"], g.get("prompt_tokens", p), o) for g, (_, p, o) in zip(got, rows)]
    sim = simulate(sim_models(result), {"tiny": sim_rows}, start_s=0.0).models[0]
    simulated = {k: getattr(sim, k) for k in ("ttft_p50_ms", "ttft_p95_ms", "tpot_p50_ms", "tpot_p95_ms")}
    print(machine_line())
    print(f"\n{a.engine}, {len(rows)} requests over {a.duration:.0f} s (mean {a.rate} req/s, {a.prompt_tokens} prompt / "
          f"{a.output_tokens} output tokens, the trace's burstiness), max_num_seqs {a.max_num_seqs}; "
          f"{len(ok)} answered\n")
    print("| | TTFT p50 ms | TTFT p95 ms | TPOT p50 ms | TPOT p95 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, s in (("real server", real), ("gpuplan simulate", simulated)):
        print(f"| {name} | {s['ttft_p50_ms']} | {s['ttft_p95_ms']} | {s['tpot_p50_ms']} | {s['tpot_p95_ms']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"requests": got, "real": real, "simulated": simulated}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
