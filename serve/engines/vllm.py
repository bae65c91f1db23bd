"""The vLLM engine: vLLM's AsyncLLM inside the Serve replica (its EngineCore runs as a child process), given exactly
the memory the plan gave the replica (planner/model/engines/vllm.py vllm_settings: ``kv_cache_memory_bytes``,
``gpu_memory_utilization``, ``max_num_seqs``, ``max_model_len``, ``max_num_batched_tokens``, ``block_size``).

Replicas planned onto one GPU start one after another: vLLM measures the device's free memory while it starts, and
engines that start at the same moment count each other's allocations (vllm#55827). A file lock per (node, GPU) is
held from before the engine starts until it has allocated its KV cache; the lock goes with the process if it dies.
This module imports vllm only inside functions: the driver's venv has no vLLM."""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import tempfile
import time
import uuid
from typing import AsyncIterator

from serve.types import GenerationChunk, SamplingParams

_TPS_WINDOW_S = 10.0


def start_lock_path(gpu_key: str) -> str:
    d = os.path.join(tempfile.gettempdir(), f"gpuplan-{os.getuid()}", "locks")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, f"vllm-start-{gpu_key}.lock")


def _scheduler_counts(box: dict):
    """A vLLM stat logger (the StatLoggerBase interface) that keeps the scheduler's latest running and waiting counts
    in ``box``: vLLM's own counts, so the replica's queue metric and /plan show what waits inside the engine. With
    ``disable_log_stats`` vLLM then runs this logger alone (no periodic log lines)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerCounts(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                box["running"] = int(scheduler_stats.num_running_reqs)
                box["waiting"] = int(scheduler_stats.num_waiting_reqs) + int(
                    getattr(scheduler_stats, "num_skipped_waiting_reqs", 0) or 0)
                usage = getattr(scheduler_stats, "kv_cache_usage", None)
                if usage is not None:
                    box["kv_cache_usage"] = float(usage)

        def log_engine_initialized(self):
            pass

    return SchedulerCounts


class VllmEngine:
    name = "vllm"

    def __init__(self, source: str, settings: dict, *, gpu_key: str | None = None, tokenizer: str | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.settings = dict(settings)
        kwargs = {k: v for k, v in self.settings.items() if k != "kv_cache_tokens"}
        if kwargs.get("quantization") is None:
            kwargs.pop("quantization", None)
        self.args = AsyncEngineArgs(model=source, tokenizer=tokenizer or source, disable_log_stats=True, **kwargs)
        self.lock_wait_s = 0.0
        self.started_at = self.ready_at = None
        lock = open(start_lock_path(gpu_key), "w") if gpu_key else None
        t0 = time.time()
        try:
            if lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one vLLM start per GPU at a time
            self.started_at = time.time()
            self.lock_wait_s = round(self.started_at - t0, 3)
            self._sched: dict = {}
            self.llm = AsyncLLM.from_engine_args(self.args, stat_loggers=[_scheduler_counts(self._sched)])
            self.ready_at = time.time()
        finally:
            if lock:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()
        cc = self.llm.vllm_config.cache_config
        self.reported = {
            "kv_cache_tokens": getattr(cc, "kv_cache_size_tokens", None),
            "num_blocks": cc.num_gpu_blocks,
            "block_size": cc.block_size,
            "kv_cache_memory_bytes": cc.kv_cache_memory_bytes,
            "gpu_memory_utilization": cc.gpu_memory_utilization,
            "max_num_seqs": self.llm.vllm_config.scheduler_config.max_num_seqs,
            "max_model_len": self.llm.vllm_config.model_config.max_model_len,
            "start_s": round(self.ready_at - self.started_at, 2),
        }
        self.inflight = 0
        self.completed = self.cancelled = self.errors = self.generated_tokens = 0
        self._tps: collections.deque = collections.deque()
        self._t0 = time.monotonic()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        sp = VllmSampling(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                          stop=list(params.stop) or None, seed=params.seed,
                          ignore_eos=params.ignore_eos, output_kind=RequestOutputKind.DELTA)
        rid = uuid.uuid4().hex
        n, finished = 0, False
        self.inflight += 1
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(prompt_ids)}, sp, rid):
                c = out.outputs[0]
                n += len(c.token_ids)
                if c.token_ids:
                    self._tps.append((time.monotonic(), len(c.token_ids)))
                    self.generated_tokens += len(c.token_ids)
                reason = c.finish_reason
                if reason == "abort":
                    raise RuntimeError("vLLM aborted the request")
                finished = reason is not None
                yield GenerationChunk(text=c.text, token_ids=tuple(c.token_ids), finish_reason=reason,
                                      prompt_tokens=len(prompt_ids), completion_tokens=n)
                if finished:
                    self.completed += 1
                    return
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled += 1
            raise
        except Exception:
            self.errors += 1
            raise
        finally:
            self.inflight -= 1
            if not finished:
                try:
                    await self.llm.abort(rid)
                except Exception:
                    pass

    def stats(self) -> dict:
        now = time.monotonic()
        while self._tps and self._tps[0][0] < now - _TPS_WINDOW_S:
            self._tps.popleft()
        span = max(1e-3, min(_TPS_WINDOW_S, now - self._t0))
        # vLLM's scheduler counts as of its last step, bounded by what is in flight here (they go stale when idle)
        # (before vLLM's first report: as its scheduler would, max_num_seqs run and the rest wait)
        cap = int(self.settings.get("max_num_seqs") or self.inflight)
        running = min(self._sched.get("running", min(self.inflight, cap)), self.inflight)
        waiting = min(self._sched.get("waiting", self.inflight - running), self.inflight - running)
        out = {"waiting": waiting, "running": running, "completed": self.completed, "cancelled": self.cancelled,
               "errors": self.errors, "generated_tokens": self.generated_tokens,
               "tokens_per_s": round(sum(k for _, k in self._tps) / span, 1)}
        if "kv_cache_usage" in self._sched:  # vLLM's scheduler's share of KV blocks in use, as of its last step
            out["kv_cache_usage"] = self._sched["kv_cache_usage"] if self.inflight else 0.0
        return out

    def check_health(self) -> None:
        """Raise when vLLM's engine core is dead (Serve's health check then replaces the replica)."""
        if self.llm.errored or not self.llm.is_running:
            raise RuntimeError(f"vLLM's engine is dead: {self.llm.dead_error}")

    def report(self) -> dict:
        return {"engine": "vllm", "given": self.settings, "reported": self.reported,
                "start": {"lock_wait_s": self.lock_wait_s, "started_at": self.started_at,
                          "ready_at": self.ready_at}}

    async def close(self) -> None:
        try:
            self.llm.shutdown()
        except Exception:
            pass


# ------------------------------------------------------------------------------------------------ start-up

def start(cfg, host):
    """vLLM's AsyncLLM with the settings the plan gave this replica (planner.model.engines.vllm.settings). On a GPU
    whose free memory is below the replica's share vLLM would refuse to start: say so with the numbers."""
    import logging

    from planner.decisions import classify_load_failure
    from serve.engines.base import Started

    settings = cfg.settings.to_json()
    cuda, idx, total, free, why = host.cuda_state()
    if cuda and total and free is not None:
        need = int(settings["gpu_memory_utilization"] * total)
        if free < need:
            msg = (f"the GPU has {free / 2**30:.2f} GiB free, below the {need / 2**30:.2f} GiB "
                   f"(gpu_memory_utilization {settings['gpu_memory_utilization']}) this vLLM replica was planned")
            host.report_failure("gpu", "gpu_memory", msg, gave_up=True)
            host.give_up("gpu", "gpu_memory", msg)
    try:
        engine = VllmEngine(cfg.source, settings, gpu_key=host.gpu_key)
    except Exception as exc:
        kind = classify_load_failure(type(exc).__name__, str(exc))
        msg = f"{type(exc).__name__}: {str(exc)[:300]}"
        host.report_failure("gpu" if cuda else "cpu", kind, msg, gave_up=True)
        host.give_up("gpu" if cuda else "cpu", kind, msg)
    rep = engine.report()["reported"]
    logging.getLogger("gpuplan").info(
        "gpuplan replica %s: vLLM started in %.1f s (waited %.1f s for the GPU's start lock): KV cache %s tokens "
        "(planned %s)", cfg.name, rep["start_s"], engine.lock_wait_s, rep["kv_cache_tokens"],
        settings["kv_cache_tokens"])
    return Started(engine, None, {"total": 0})
