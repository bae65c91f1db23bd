"""One model replica (a Serve deployment's class): start its engine with what the plan gave it (serve.engines.start:
the engine measures the GPU it was given and decides where to load), report where it runs and what it holds to the
registry (/plan, /readyz), and serve streamed generation. A replica of ``engine: vllm`` runs in vLLM's own venv."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import ray
from ray import serve

from planner.decisions import backoff_s
from planner.rollout import GPUPLAN_NODE_LABEL, GRACEFUL_SHUTDOWN_S
from planner.rollout.policy import SIGNAL_WINDOW_S, LatencyWindow

from serve import engines, trace
from serve.app.direct import DirectServer
from serve.app.scale_board import DIRECT_METRIC, GPU_METRIC
from serve.engines.base import ReplicaConfig
from serve.engines.batching import coalesce
from serve.types import SamplingParams

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


class _Host:
    """What the replica tells its engine's start-up (serve.engines.base.Host)."""

    def __init__(self, replica: "Replica", info: dict):
        self.replica = replica
        gpus = info.get("gpu_ids") or [str(g) for g in ray.get_gpu_ids()]
        node = info.get("node_id") or ray.get_runtime_context().get_node_id()
        self.gpu_key = f"{node[:16]}-gpu{gpus[0]}" if gpus else f"{node[:16]}-cpu"

    def cuda_state(self):
        return _cuda_state(self.replica.cfg.faults.get("cuda"))

    def report_failure(self, mode: str, kind: str, message: str, gave_up: bool) -> None:
        self.replica._report_failure(mode, kind, message, gave_up)

    def give_up(self, mode: str, kind: str, message: str):
        self.replica._give_up(mode, kind, message)


class Replica:
    def __init__(self, cfg: ReplicaConfig):
        self.cfg = cfg
        self.name = cfg.name
        t0 = time.time()
        self.decision = None
        self.resident = {"total": 0}
        self.load_s = None
        self.engine = None
        info = self._report(loading=True)  # where Ray put it, before the (slow) load
        if info and info.get("node_label") and cfg.node and info["node_label"] != cfg.node:
            log.warning("gpuplan replica %s of %s: Ray put it on node %s (GPU %s); the plan put it on node %s",
                        info["replica_id"], self.name, info["node_label"], info["gpu_ids"], cfg.node)
        started = engines.start(cfg, _Host(self, info or {}))
        self.engine, self.decision, self.resident = started.engine, started.decision, started.resident
        self.load_s = round(time.time() - t0, 2)
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.serve_inflight = 0  # requests through Serve's handle (the direct stream's are its own count)
        self.latency = LatencyWindow(SIGNAL_WINDOW_S)
        self.direct = self._start_direct()
        self._metrics()
        self._report()

    def _start_direct(self) -> DirectServer | None:
        """The direct stream's server (serve/app/direct.py) on this replica's event loop, where Serve runs its
        requests and the engine streams: the constructor runs on that loop. None when off or when it cannot start."""
        if not self.cfg.direct_secret:
            return None
        try:
            loop = asyncio.get_running_loop()
            srv = DirectServer(self._generate, self.cfg.direct_secret, max_ongoing=self.cfg.max_ongoing_requests,
                               busy=lambda: self.serve_inflight, host=ray.util.get_node_ip_address())
            loop.create_task(srv.start())
            return srv
        except Exception as exc:  # the Serve path still serves every request
            log.warning("gpuplan replica %s: no direct stream (%s: %s); requests go through Serve", self.name,
                        type(exc).__name__, exc)
            return None

    def _registry(self):
        return ray.get_actor(self.cfg.registry, namespace=self.cfg.registry_namespace)

    def _report_failure(self, mode: str, kind: str, message: str, gave_up: bool) -> None:
        try:
            ctx = serve.get_replica_context()
            self._registry().load_failed.remote({
                "model": self.name, "deployment": self.cfg.deployment, "app": ctx.app_name,
                "replica_id": getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)), "mode": mode,
                "kind": kind, "message": message, "gave_up": gave_up})
        except Exception:  # the registry is only for /readyz and /plan
            pass

    def _give_up(self, mode: str, kind: str, message: str):
        """No placement left: wait (so that Serve's restarts back off), then fail the constructor."""
        recent = 1
        try:
            recent = int(ray.get(self._registry().recent_failures.remote(self.cfg.deployment),
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
                  recent, self.cfg.deployment)
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
            "deployment": self.cfg.deployment,
            "replica_id": getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)),
            "state": "loading" if loading else "running",
            "node_id": rc.get_node_id(),
            "node_label": labels.get(GPUPLAN_NODE_LABEL),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "num_gpus": self.cfg.num_gpus,
            "quantization": self.cfg.quantization,
            "planned_bytes": self.cfg.planned_bytes,
            "resident_weight_bytes": self.resident["total"],
            "estimated_weight_bytes": self.cfg.weights_bytes,
            "load_decision": self.decision.to_json() if self.decision else None,
            "load_seconds": self.load_s,
            "pid": os.getpid(),
            "stats": self.engine.stats() if self.engine else {},
            "engine": getattr(self.engine, "name", self.cfg.engine),
            "engine_report": self.engine.report() if self.engine is not None and hasattr(self.engine, "report")
            else None,
            "direct": list(self.direct.address) if getattr(self, "direct", None) is not None else None,
            "direct_served": self.direct.served if getattr(self, "direct", None) is not None else 0,
        }

    def _report(self, loading: bool = False) -> dict | None:
        try:
            info = self.info(loading)
            self._registry().put.remote(info)
            return info
        except Exception:  # the registry is only for /plan; serving does not depend on it
            return None

    def record_autoscaling_stats(self) -> dict:
        """Custom autoscaling metrics (Serve averages each over its look-back window): the GPU Ray gave this replica
        (-1: none), so that gpuplan's policy knows what each GPU holds (serve/app/scale_board.py); the requests it
        holds through the direct stream (Serve counts only its own); and the policy's signals: sequences waiting in
        the engine, its KV cache use, TTFT/TPOT p95 of the requests finished and requests started per second over the
        last 30 s."""
        ids = ray.get_gpu_ids()
        s = self.engine.stats()
        lat = self.latency.summary(time.monotonic(), self.started_mono)
        return {GPU_METRIC: float(ids[0]) if ids else -1.0,
                DIRECT_METRIC: float(self.direct.inflight) if self.direct is not None else 0.0,
                # gpuplan's policy (planner/rollout/policy.py signal_want): saturation and latency; no request
                # finished in the window reads 0 (Serve averages the samples: a -1 would drag a real p95 down)
                "gpuplan_waiting": float(s.get("waiting", 0)), "gpuplan_kv_usage": float(s.get("kv_cache_usage", 0.0)),
                "gpuplan_ttft_p95_s": max(0.0, lat["ttft_p95_s"]), "gpuplan_tpot_p95_s": max(0.0, lat["tpot_p95_s"]),
                "gpuplan_requests_per_s": lat["requests_per_s"]}

    async def generate(self, prompt_ids: list[int], params: SamplingParams):
        """Serve's way in (the direct stream's is ``_generate``, on the same event loop)."""
        self.serve_inflight += 1
        try:
            async for chunk in self._generate(prompt_ids, params):
                yield chunk
        finally:
            self.serve_inflight -= 1

    async def _generate(self, prompt_ids: list[int], params: SamplingParams):
        """Stream chunks; after the first, steps produced within ``stream_interval_s`` go out as one message
        (each message costs two Ray hops and an SSE event; vLLM's --stream-interval makes the same trade)."""
        n, first = 0, True
        t0, t_first, n_first = time.monotonic(), None, 0
        self.latency.start(t0)
        trace.mark("replica.enter", params.trace_id)
        stream = self.engine.generate(prompt_ids, params)
        async for chunk in coalesce(stream, float(self.cfg.stream_interval_s)):
            if first:
                trace.mark("replica.first", params.trace_id)
                first = False
            if chunk.completion_tokens > n:
                if t_first is None:
                    t_first, n_first = time.monotonic(), chunk.completion_tokens
                self._m_tokens.inc(chunk.completion_tokens - n)
                n = chunk.completion_tokens
            if chunk.finish_reason:
                trace.mark("replica.last", params.trace_id)
                now = time.monotonic()
                if t_first is not None:  # the policy's latency signals (record_autoscaling_stats)
                    self.latency.add(now, t_first - t0, (now - t_first) / (n - n_first) if n > n_first else None)
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
            self._registry().stopped.remote(getattr(ctx.replica_id, "unique_id", str(ctx.replica_id)))
        except Exception:
            pass
        if getattr(self, "direct", None) is not None:  # Serve waited for its own requests, not for these
            left = await self.direct.stop(GRACEFUL_SHUTDOWN_S * 0.8)
            if left:
                log.warning("gpuplan replica %s: stopping with %d direct request(s) still running", self.name, left)
        try:
            await self.engine.close()
        except Exception:
            pass


# The Serve deployment of the class. The class keeps its own module-level name (Replica), so that Serve's cloudpickle
# of it at every `.options()` and `.bind()` is a reference (serve.app.replica.Replica), not the whole class by value:
# pickled by value (its name then pointed at this Deployment) it cost 7 ms per deployment, 4.0 s of build_app's
# 4.25 s at 552 deployments (benchmarks/ray_ledger.py; docs/benchmarks.md, "Planning"); 0.3 ms now.
ModelReplica = serve.deployment(Replica)
