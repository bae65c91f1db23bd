"""One model replica: measure the GPU it was given, decide where to load (planner.decisions.decide_load), cap itself
at its planned share, load with transformers + bitsandbytes, and serve batched, streamed generation. A replica of
``engine: vllm`` runs vLLM's AsyncLLM instead (serve/engines/vllm.py), in vLLM's own venv, with the memory settings
the plan gave it."""

from __future__ import annotations

import logging
import os
import socket
import time

import ray
from ray import serve

from planner.decisions import backoff_s, classify_load_failure, decide_load, next_load_decision
from planner.errors import InfeasiblePlanError
from planner.placement.rollout import GPUPLAN_NODE_LABEL

from . import trace
from .scale_board import GPU_METRIC
from .types import SamplingParams

log = logging.getLogger("gpuplan")


def _cuda_state(fake: dict | None = None) -> tuple[bool, int | None, int | None, int | None, str]:
    """(cuda usable, local index, total bytes, free bytes, why not) for the GPU Ray assigned to this replica.
    ``fake`` ({"total", "free"} bytes; the GPUPLAN_FAULTS test hook) stands in for a GPU that is not there."""
    if fake:
        return True, 0, int(fake["total"]), int(fake["free"]), ""
    ids = ray.get_gpu_ids()
    if not ids:
        return False, None, None, None, "Ray assigned this replica no GPU"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, None, None, None, (f"Ray assigned GPU {ids} but CUDA is not available in this process "
                                             "(fake GPUs, or no driver)")
        free, total = torch.cuda.mem_get_info(0)  # Ray sets CUDA_VISIBLE_DEVICES: the assigned GPU is device 0
        return True, 0, int(total), int(free), ""
    except Exception as exc:  # pragma: no cover - needs a broken CUDA
        return False, None, None, None, f"CUDA failed: {exc}"


class Replica:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.name = cfg["name"]
        t0 = time.time()
        self.decision = None
        self.resident = {"total": 0}
        self.load_s = None
        self.engine = None
        info = self._report(loading=True)  # where Ray put it, before the (slow) load
        if info and info.get("node_label") and cfg.get("node") and info["node_label"] != cfg["node"]:
            log.warning("gpuplan replica %s of %s: Ray put it on node %s (GPU %s); the plan put it on node %s",
                        info["replica_id"], self.name, info["node_label"], info["gpu_ids"], cfg["node"])
        faults = cfg.get("faults") or {}
        if cfg.get("engine") in ("vllm", "llamacpp"):
            (self._start_vllm if cfg["engine"] == "vllm" else self._start_llamacpp)(faults, info or {})
            self.load_s = round(time.time() - t0, 2)
            self.started = time.time()
            self._metrics()
            self._report()
            return
        cuda, idx, total, free, why = _cuda_state(faults.get("cuda"))
        try:
            self.decision = decide_load(
                model=self.name, planned_bytes=cfg["planned_bytes"], weights_bytes=cfg["weights_bytes"],
                cuda_available=cuda, gpu_index=idx, gpu_total_bytes=total, gpu_free_bytes=free,
                offload_cpu_bytes=cfg.get("offload_cpu_bytes", 0), why_no_cuda=why or "no CUDA",
            )
        except InfeasiblePlanError as exc:  # the GPU's free memory is below plan and offload is off
            self._report_failure("gpu", "gpu_memory", str(exc), gave_up=True)
            self._give_up("gpu", "gpu_memory", str(exc))
        tried: list[str] = []
        while True:
            log.info("gpuplan replica %s: %s", self.name, self.decision.reason)
            try:
                self._load(idx, faults)
                break
            except Exception as exc:  # a failed load: say why, step down if deploy.yaml allows, else back off
                kind = classify_load_failure(type(exc).__name__, str(exc))
                msg = f"{type(exc).__name__}: {str(exc)[:300]}"
                tried.append(self.decision.mode)
                log.error("gpuplan replica %s: loading in mode %s failed (%s): %s", self.name, self.decision.mode,
                          kind, msg)
                self._free_partial_load()
                cuda, idx, total, free, why = _cuda_state(faults.get("cuda"))
                nxt = next_load_decision(
                    failed=tried, failure=kind, model=self.name, planned_bytes=cfg["planned_bytes"],
                    weights_bytes=cfg["weights_bytes"], cuda_available=cuda, gpu_index=idx, gpu_total_bytes=total,
                    gpu_free_bytes=free, offload_cpu_bytes=cfg.get("offload_cpu_bytes", 0))
                self._report_failure(self.decision.mode, kind, msg, gave_up=nxt is None)
                if nxt is None:
                    self._give_up(self.decision.mode, kind, msg)
                self.decision = nxt
        from .engine import GenerationEngine

        self.engine = GenerationEngine(self.model, self.tokenizer, max_num_seqs=cfg["max_num_seqs"],
                                       max_model_len=cfg["max_model_len"])
        from .memory_probe import resident_bytes

        self.resident = resident_bytes(self.model)
        self.load_s = round(time.time() - t0, 2)
        self.started = time.time()
        self._metrics()
        self._report()

    def _start_llamacpp(self, faults: dict, info: dict) -> None:
        """llama.cpp with the context the plan gave this replica (planner.model.llamacpp.llamacpp_settings): one KV stream
        per sequence, every layer on the GPU when there is one (a CPU build runs everything on the CPU)."""
        from .engines.llamacpp import LlamaCppEngine
        from .loader import load_tokenizer

        from planner.model.gguf_spec import spec_from_gguf
        from planner.model.llamacpp import LlamaCppSettings, decide_gpu_layers
        from planner.model.memory import CUDA_CONTEXT_BYTES

        st = self.cfg["llamacpp"]
        cuda, idx, total, free, why = _cuda_state(faults.get("cuda"))
        budget = min(self.cfg["planned_bytes"], free if free is not None else total) if cuda else None
        try:
            layers = decide_gpu_layers(spec_from_gguf(self.cfg["source"]), LlamaCppSettings(**st), model=self.name,
                                       budget_bytes=budget, offload_cpu_bytes=self.cfg.get("offload_cpu_bytes", 0),
                                       fixed_gpu_bytes=CUDA_CONTEXT_BYTES, why_no_cuda=why or "no CUDA")
        except InfeasiblePlanError as exc:  # the GPU's free memory is below plan and the rest exceeds offload
            self._report_failure("gpu", "gpu_memory", str(exc), gave_up=True)
            self._give_up("gpu", "gpu_memory", str(exc))
        log.info("gpuplan replica %s: %s", self.name, layers.reason)
        self.decision = layers
        try:
            self.tokenizer = load_tokenizer(self.cfg["source"], self.cfg.get("trust_remote_code", False))
            self.engine = LlamaCppEngine(
                self.cfg["source"], self.tokenizer, max_num_seqs=self.cfg["max_num_seqs"],
                max_model_len=self.cfg["max_model_len"], n_gpu_layers=layers.n_gpu_layers,
                n_batch=st["n_batch"], n_ubatch=st["n_ubatch"], flash_attn=st["flash_attn"],
                n_threads=int(os.environ.get("GPUPLAN_CPU_THREADS", 0)) or max(1, int(self.cfg.get("num_cpus", 1) or 1)))
        except Exception as exc:
            kind = classify_load_failure(type(exc).__name__, str(exc))
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            self._report_failure("gpu" if cuda else "cpu", kind, msg, gave_up=True)
            self._give_up("gpu" if cuda else "cpu", kind, msg)
        rep = self.engine.report()
        self.resident = {"total": rep["reported"]["model_size"], "llamacpp_buffers": rep["reported"]["buffers"]}
        log.info("gpuplan replica %s: llama.cpp context of %s cells (%s sequences), buffers %s; %s", self.name,
                 rep["given"]["n_ctx"], rep["given"]["n_seq_max"], rep["reported"]["buffers"],
                 "GPU" if cuda else f"CPU ({why or 'no CUDA'})")

    def _start_vllm(self, faults: dict, info: dict) -> None:
        """vLLM's AsyncLLM with the settings the plan gave this replica (planner.model.engines.vllm_settings). On a GPU
        whose free memory is below the replica's share vLLM would refuse to start: say so with the numbers."""
        from .engines.vllm import VllmEngine

        settings = self.cfg["vllm"]
        cuda, idx, total, free, why = _cuda_state(faults.get("cuda"))
        if cuda and total and free is not None:
            need = int(settings["gpu_memory_utilization"] * total)
            if free < need:
                msg = (f"the GPU has {free / 2**30:.2f} GiB free, below the {need / 2**30:.2f} GiB "
                       f"(gpu_memory_utilization {settings['gpu_memory_utilization']}) this vLLM replica was planned")
                self._report_failure("gpu", "gpu_memory", msg, gave_up=True)
                self._give_up("gpu", "gpu_memory", msg)
        gpus = info.get("gpu_ids") or [str(g) for g in ray.get_gpu_ids()]
        node = info.get("node_id") or ray.get_runtime_context().get_node_id()
        key = f"{node[:16]}-gpu{gpus[0]}" if gpus else f"{node[:16]}-cpu"
        try:
            self.engine = VllmEngine(self.cfg["source"], settings, gpu_key=key)
        except Exception as exc:
            kind = classify_load_failure(type(exc).__name__, str(exc))
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            self._report_failure("gpu" if cuda else "cpu", kind, msg, gave_up=True)
            self._give_up("gpu" if cuda else "cpu", kind, msg)
        rep = self.engine.report()["reported"]
        log.info("gpuplan replica %s: vLLM started in %.1f s (waited %.1f s for the GPU's start lock): KV cache %s "
                 "tokens (planned %s)", self.name, rep["start_s"], self.engine.lock_wait_s, rep["kv_cache_tokens"],
                 settings["kv_cache_tokens"])

    def _load(self, idx: int | None, faults: dict) -> None:
        """Load the model as ``self.decision`` says (GPU, GPU + CPU offload, or CPU)."""
        import torch

        from .loader import load_model

        if self.decision.mode in faults.get("fail", ()):  # test hook (GPUPLAN_FAULTS): this mode fails
            raise MemoryError(f"injected failure of mode {self.decision.mode}") if self.decision.mode == "cpu" \
                else RuntimeError(f"CUDA out of memory (injected failure of mode {self.decision.mode})")
        cfg = self.cfg
        if self.decision.mode in ("gpu", "offload"):
            torch.cuda.set_per_process_memory_fraction(self.decision.memory_fraction, idx)
        device = "cpu" if self.decision.mode == "cpu" else "cuda"
        if device == "cpu":
            # One torch thread per whole CPU the replica asked Ray for (at least one). Measured with
            # benchmarks/serve_load.py on 2 cores: 2 threads made 1 client 20% slower and 8 clients no faster,
            # since the HTTP proxy and the ingress need the other core. GPUPLAN_CPU_THREADS overrides.
            torch.set_num_threads(int(os.environ.get("GPUPLAN_CPU_THREADS", 0))
                                  or max(1, int(cfg.get("num_cpus", 1) or 1)))
        self.model, self.tokenizer = load_model(
            cfg["source"], quantization=cfg["quantization"], dtype=cfg.get("dtype") or "bf16", device=device,
            gpu_index=idx or 0, max_memory=self.decision.max_memory, trust_remote_code=cfg.get("trust_remote_code", False),
        )

    def _free_partial_load(self) -> None:
        self.model = self.tokenizer = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def _registry(self):
        return ray.get_actor(self.cfg["registry"], namespace=self.cfg.get("registry_namespace"))

    def _report_failure(self, mode: str, kind: str, message: str, gave_up: bool) -> None:
        try:
            ctx = serve.get_replica_context()
            self._registry().load_failed.remote({
                "model": self.name, "deployment": self.cfg.get("deployment", ""), "app": ctx.app_name,
                "replica_id": getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)), "mode": mode,
                "kind": kind, "message": message, "gave_up": gave_up})
        except Exception:  # the registry is only for /readyz and /plan
            pass

    def _give_up(self, mode: str, kind: str, message: str):
        """No placement left: wait (so that Serve's restarts back off), then fail the constructor."""
        recent = 1
        try:
            recent = int(ray.get(self._registry().recent_failures.remote(self.cfg.get("deployment", "")),
                                 timeout=5))
        except Exception:
            pass
        wait = backoff_s(max(1, recent))
        fix = {"gpu_memory": "free GPU memory, lower max_model_len/max_num_seqs, use a lower-bit quantization, or "
                             "set offload.cpu_memory",
               "host_memory": "give the node more RAM or lower offload.cpu_memory's share",
               "files": "check the model files (a missing or corrupt config.json or *.safetensors)"}.get(
            kind, "see the error above")
        log.error("gpuplan replica %s: giving up after mode %s (%s): %s; %s. Failing in %.0f s (%d recent "
                  "failure(s) of %s), Serve will start another replica", self.name, mode, kind, message, fix, wait,
                  recent, self.cfg.get("deployment", ""))
        time.sleep(wait)
        raise RuntimeError(f"{self.name}: cannot load ({kind}) after mode {mode}: {message}; {fix}")

    def _metrics(self) -> None:
        from ray.serve import metrics

        self._m_tokens = metrics.Counter("gpuplan_generated_tokens", description="tokens generated",
                                         tag_keys=("model",))
        self._m_tokens.set_default_tags({"model": self.name})
        self._m_waiting = metrics.Gauge("gpuplan_queue_length", description="sequences waiting for a batch slot",
                                        tag_keys=("model",))
        self._m_waiting.set_default_tags({"model": self.name})
        self._m_tps = metrics.Gauge("gpuplan_tokens_per_second", description="generated tokens/s, last 10 s",
                                    tag_keys=("model",))
        self._m_tps.set_default_tags({"model": self.name})

    def info(self, loading: bool = False) -> dict:
        ctx = serve.get_replica_context()
        rc = ray.get_runtime_context()
        try:
            labels = rc.get_node_labels()
        except Exception:  # older Ray: no node labels
            labels = {}
        return {
            "model": self.name,
            "app": ctx.app_name,
            "deployment": self.cfg.get("deployment", ""),
            "replica_id": getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)),
            "state": "loading" if loading else "running",
            "node_id": rc.get_node_id(),
            "node_label": labels.get(GPUPLAN_NODE_LABEL),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "num_gpus": self.cfg.get("num_gpus", 0),
            "quantization": self.cfg["quantization"],
            "planned_bytes": self.cfg["planned_bytes"],
            "resident_weight_bytes": self.resident["total"],
            "estimated_weight_bytes": self.cfg["weights_bytes"],
            "load_decision": self.decision.to_json() if self.decision else None,
            "load_seconds": self.load_s,
            "pid": os.getpid(),
            "stats": self.engine.stats() if self.engine else {},
            "engine": getattr(self.engine, "name", self.cfg.get("engine", "transformers")),
            "engine_report": self.engine.report() if self.engine is not None and hasattr(self.engine, "report")
            else None,
        }

    def _report(self, loading: bool = False) -> dict | None:
        try:
            info = self.info(loading)
            reg = ray.get_actor(self.cfg["registry"], namespace=self.cfg.get("registry_namespace"))
            reg.put.remote(info)
            return info
        except Exception:  # the registry is only for /plan; serving does not depend on it
            return None

    def record_autoscaling_stats(self) -> dict:
        """Custom autoscaling metric: the GPU Ray gave this replica (-1: none), so that gpuplan's policy knows what
        each GPU holds (serve/scale_board.py)."""
        ids = ray.get_gpu_ids()
        return {GPU_METRIC: float(ids[0]) if ids else -1.0}

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        """Stream chunks; after the first, steps produced within ``stream_interval_s`` go out as one message
        (each message costs two Ray hops and an SSE event; vLLM's --stream-interval makes the same trade)."""
        from .engine import coalesce

        n, first = 0, True
        trace.mark("replica.enter")
        stream = self.engine.generate(prompt_ids, params)
        async for chunk in coalesce(stream, float(self.cfg.get("stream_interval_s", 0.0))):
            if first:
                trace.mark("replica.first")
                first = False
            if chunk.finish_reason:
                trace.mark("replica.last")
            if chunk.completion_tokens > n:
                self._m_tokens.inc(chunk.completion_tokens - n)
                n = chunk.completion_tokens
            yield chunk

    def check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()  # a dead engine fails the check: Serve replaces the replica
        s = self.engine.stats()
        self._m_waiting.set(s.get("waiting", 0))
        self._m_tps.set(s.get("tokens_per_s", 0.0))
        self._report()

    async def __del__(self):
        """Serve's graceful shutdown (scale-down, redeploy, shutdown): say so, so that /plan does not count it as a
        death, then stop the engine."""
        try:
            ctx = serve.get_replica_context()
            reg = ray.get_actor(self.cfg["registry"], namespace=self.cfg.get("registry_namespace"))
            reg.stopped.remote(getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)))
        except Exception:
            pass
        try:
            await self.engine.close()
        except Exception:
            pass


# The Serve deployment of the class. The class keeps its own module-level name (Replica), so that Serve's cloudpickle
# of it at every `.options()` and `.bind()` is a reference (serve.replica.Replica), not the whole class by value:
# pickled by value (its name then pointed at this Deployment) it cost 7 ms per deployment, 4.0 s of build_app's
# 4.25 s at 552 deployments (benchmarks/ray_ledger.py; README, "Scale"); 0.3 ms now.
ModelReplica = serve.deployment(Replica)
