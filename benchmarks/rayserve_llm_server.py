"""The peer: Ray Serve LLM (ray.serve.llm, vLLM inside) serving the shipped tiny model, as its docs set it up on a
machine without GPUs. Run with vLLM's venv (it needs vllm, ray[serve] and pyarrow):

    .venv-vllm/bin/python benchmarks/rayserve_llm_server.py --port 8020 --kv-cache-memory-bytes 4194304

Blocks until SIGTERM/SIGINT, then shuts Serve and its local Ray down. benchmarks/compare_servers.py starts it.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--served-model-name", default="tiny")
    ap.add_argument("--port", type=int, default=8020)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--kv-cache-memory-bytes", type=int, required=True)
    ap.add_argument("--block-size", type=int, default=128)
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    # its ingress waits for a CPU of Ray's ledger: give Ray more than the 2 real cores (MACHINE.md)
    ray.init(num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    cfg = LLMConfig(
        model_loading_config={"model_id": a.served_model_name, "model_source": a.model},
        placement_group_config={"bundles": [{"CPU": 1}]},
        engine_kwargs={"max_model_len": a.max_model_len, "max_num_seqs": a.max_num_seqs, "dtype": "bfloat16",
                       "max_num_batched_tokens": a.max_num_batched_tokens,
                       "kv_cache_memory_bytes": a.kv_cache_memory_bytes, "block_size": a.block_size,
                       "enforce_eager": True},
    )
    serve.run(build_openai_app({"llm_configs": [cfg]}), blocking=False)
    print("ray serve llm: ready", flush=True)
    done = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: done.set())
    done.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
