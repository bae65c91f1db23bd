"""Decisions a replica or the app makes at run time, as pure functions of injected numbers.

- ``decide_load``: at replica start, given the real free memory of its GPU, load on the GPU (and cap itself at its
  planned share), spill weights to CPU (accelerate ``device_map="auto"`` + ``max_memory``), or load on the CPU.
- ``num_gpus_for``: the fractional GPU request that turns Ray's accounting into a memory ledger.
- ``classify_load_failure`` / ``next_load_decision`` / ``backoff_s``: when a load fails, what ran out, where to try
  next (GPU → GPU + CPU offload → CPU, as deploy.yaml allows), and how long to wait before giving up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from planner.errors import InfeasiblePlanError
from planner.units import MiB, format_bytes

# NOTE: slack kept on the GPU when offloading, for allocator rounding and buffers created while quantizing
# (transformers' bnb quantizers shrink max_memory by 10% for the same reason: "need more space for buffers that are
# created during quantization"); we keep max(10% of the weights on the GPU, 256 MiB).
OFFLOAD_SLACK_FRACTION = 0.10
OFFLOAD_SLACK_MIN = 256 * MiB


@dataclass(frozen=True)
class LoadDecision:
    mode: str  # "gpu" | "offload" | "cpu"
    reason: str
    gpu_index: int | None = None
    memory_fraction: float | None = None  # torch.cuda.set_per_process_memory_fraction(...) on gpu_index
    max_memory: dict | None = None  # accelerate max_memory: {gpu_index: bytes, "cpu": bytes}
    gpu_weight_bytes: int | None = None
    cpu_weight_bytes: int | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.max_memory is not None:
            d["max_memory"] = {str(k): v for k, v in self.max_memory.items()}
        return d


def num_gpus_for(replica_bytes: int, gpu_total_bytes: int) -> float:
    """``replica_bytes / gpu_total_bytes`` rounded UP to 1e-4 (Ray's fractional GPU granularity), capped at 1."""
    if gpu_total_bytes <= 0:
        raise ValueError("gpu_total_bytes must be positive")
    return min(1.0, math.ceil(replica_bytes * 10_000 / gpu_total_bytes) / 10_000)


def decide_load(
    *,
    model: str,
    planned_bytes: int,
    weights_bytes: int,
    cuda_available: bool,
    gpu_index: int | None = None,
    gpu_total_bytes: int | None = None,
    gpu_free_bytes: int | None = None,
    offload_cpu_bytes: int = 0,
    why_no_cuda: str = "no CUDA device is visible to this replica",
) -> LoadDecision:
    """Where a replica loads its weights, from the memory it actually finds.

    ``planned_bytes`` is the replica's planned total (weights + KV + activations + runtime); the non-weight part must
    stay on the GPU whatever happens, so only weights can spill to the CPU.
    """
    if not cuda_available or gpu_index is None or not gpu_total_bytes:
        return LoadDecision("cpu", f"{why_no_cuda}: loading {model} on the CPU")
    free = gpu_free_bytes if gpu_free_bytes is not None else gpu_total_bytes
    if free >= planned_bytes:
        frac = num_gpus_for(planned_bytes, gpu_total_bytes)
        return LoadDecision(
            "gpu",
            f"GPU {gpu_index} has {format_bytes(free)} free >= the planned {format_bytes(planned_bytes)}: loading "
            f"{model} on the GPU, capped at {frac:.4f} of its {format_bytes(gpu_total_bytes)}",
            gpu_index=gpu_index,
            memory_fraction=frac,
            gpu_weight_bytes=weights_bytes,
            cpu_weight_bytes=0,
        )
    shortfall = planned_bytes - free
    fix = (f"free {format_bytes(shortfall)} on GPU {gpu_index}, lower max_model_len/max_num_seqs, use a lower-bit "
           "quantization, or set offload.cpu_memory")
    if offload_cpu_bytes <= 0:
        raise InfeasiblePlanError(
            f"{model}: GPU {gpu_index} has {format_bytes(free)} free but the plan gives this replica "
            f"{format_bytes(planned_bytes)} ({format_bytes(shortfall)} short) and offload is off: {fix}"
        )
    non_weights = planned_bytes - weights_bytes
    room = free - non_weights
    slack = max(int(OFFLOAD_SLACK_FRACTION * max(room, 0)), OFFLOAD_SLACK_MIN)
    gpu_weights = max(0, room - slack)
    cpu_weights = weights_bytes - gpu_weights
    if cpu_weights > offload_cpu_bytes:
        raise InfeasiblePlanError(
            f"{model}: GPU {gpu_index} has {format_bytes(free)} free, {format_bytes(gpu_weights)} of its "
            f"{format_bytes(weights_bytes)} of weights fit there, and the other {format_bytes(cpu_weights)} exceed "
            f"offload.cpu_memory {format_bytes(offload_cpu_bytes)}: raise offload.cpu_memory to at least "
            f"{format_bytes(cpu_weights)} or {fix.split(', set offload')[0]}"
        )
    if gpu_weights == 0:
        return LoadDecision(
            "cpu",
            f"GPU {gpu_index} has {format_bytes(free)} free, less than the {format_bytes(non_weights)} this replica "
            f"needs besides weights: loading {model} on the CPU ({format_bytes(weights_bytes)} of weights in RAM)",
            cpu_weight_bytes=weights_bytes,
        )
    frac = num_gpus_for(free, gpu_total_bytes)
    return LoadDecision(
        "offload",
        f"GPU {gpu_index} has {format_bytes(free)} free < the planned {format_bytes(planned_bytes)}: {model} keeps "
        f"{format_bytes(gpu_weights)} of weights on the GPU and offloads {format_bytes(cpu_weights)} to the CPU",
        gpu_index=gpu_index,
        memory_fraction=frac,
        max_memory={gpu_index: gpu_weights, "cpu": offload_cpu_bytes},
        gpu_weight_bytes=gpu_weights,
        cpu_weight_bytes=cpu_weights,
    )


# ----------------------------------------------------------------------------------------------------------------
# When a load fails


LOAD_MODES = ("gpu", "offload", "cpu")
# NOTE: a replica that gives up waits before it fails, so that Serve's restarts of a model that cannot load back
# off (5, 10, 20, 40 s, then a minute) instead of loading and failing in a tight loop.
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 60.0


def classify_load_failure(exc_type: str, message: str) -> str:
    """What a failed load ran out of: "gpu_memory", "host_memory", "files" (missing or corrupt; no other placement
    helps) or "other"."""
    t, m = exc_type.lower(), message.lower()
    if "outofmemory" in t or "cuda out of memory" in m or "cudaerrormemoryallocation" in m or \
            ("cuda" in m and "out of memory" in m):
        return "gpu_memory"
    if t == "memoryerror" or "cannot allocate memory" in m or "bad_alloc" in m or "out of memory" in m:
        return "host_memory"
    if t in ("filenotfounderror", "isadirectoryerror", "notadirectoryerror", "safetensorerror", "jsondecodeerror",
             "headertoolarge", "unpicklingerror") or "no such file" in m or "does not appear to have" in m or \
            "safetensor" in m or "corrupt" in m or "invalid header" in m or "incomplete metadata" in m:
        return "files"
    return "other"


def next_load_decision(*, failed: list[str], failure: str, model: str, planned_bytes: int, weights_bytes: int,
                       cuda_available: bool, gpu_index: int | None, gpu_total_bytes: int | None,
                       gpu_free_bytes: int | None, offload_cpu_bytes: int) -> LoadDecision | None:
    """After loads in the modes ``failed`` failed for ``failure``: the next placement to try, stepping down GPU →
    GPU + CPU offload → CPU as far as deploy.yaml allows (offload needs ``offload.cpu_memory``; the CPU needs it to
    hold every weight), or None (give up: missing or corrupt files, or nothing left). ``gpu_free_bytes`` is the free
    memory measured after the failure."""
    if failure == "files" or not failed:
        return None
    start = max(LOAD_MODES.index(m) for m in failed) + 1
    for mode in LOAD_MODES[start:]:
        if mode == "offload":
            if not cuda_available or offload_cpu_bytes <= 0 or gpu_index is None or not gpu_total_bytes:
                continue
            # the GPU did not hold the planned bytes: at most what it has free now, and less than the plan
            free = min(gpu_free_bytes if gpu_free_bytes is not None else gpu_total_bytes, planned_bytes - 1)
            try:
                d = decide_load(model=model, planned_bytes=planned_bytes, weights_bytes=weights_bytes,
                                cuda_available=True, gpu_index=gpu_index, gpu_total_bytes=gpu_total_bytes,
                                gpu_free_bytes=free, offload_cpu_bytes=offload_cpu_bytes)
            except InfeasiblePlanError:
                continue
            if d.mode == "offload":
                return replace(d, reason=f"after {failure.replace('_', ' ')} in mode {failed[-1]}: {d.reason}")
        elif mode == "cpu":
            if failure == "host_memory":
                continue  # the host RAM ran out already
            if cuda_available and offload_cpu_bytes < weights_bytes:
                continue  # deploy.yaml gives this model no RAM for all its weights
            return LoadDecision("cpu", f"after {failure.replace('_', ' ')} in mode {failed[-1]}: loading {model} on "
                                       f"the CPU ({format_bytes(weights_bytes)} of weights in RAM)",
                                cpu_weight_bytes=weights_bytes)
    return None


def backoff_s(recent_failures: int) -> float:
    """How long a replica that gave up waits before it fails (``recent_failures`` of its deployment, this one
    counted): 5 s, 10 s, 20 s, 40 s, then 60 s."""
    if recent_failures <= 0:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (recent_failures - 1))
