"""The transformers engine (serve/engines/transformers.py runs it): what one replica allocates and what it is given.

transformers + accelerate + bitsandbytes, with gpuplan's continuous batching: the KV cache grows per sequence
(transformers' DynamicCache) and is merged one layer at a time, so the allocator fragments; bitsandbytes int8 loads
its kernels outside torch's allocator; a CPU replica is one Python process. GGUF files are dequantized on load (to
the compute dtype). It runs every scheme (planner/model/quant/).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from planner.model.estimate import (CPU_PROCESS_BYTES, CUDA_CONTEXT_BYTES, LIBRARY_WORKSPACE_BYTES, DeploymentTarget,
                                    ReplicaEstimate, ReplicaRequest, activation_bytes, kv_cache_bytes,
                                    largest_layer_kv, replica_estimate, weight_bytes)
from planner.model.speed import EngineSpeed, KernelSpeed
from planner.model.quant import FLOAT_BYTES
from planner.units import MiB

NAME = "transformers"
LABEL = "transformers"
# how pick_engine speaks of it: always installed (the replicas' own venv), so no install hint
INSTALL_HINT = None


def auto_takes(scheme: str) -> str | None:
    """Why ``engine: auto`` took it: None, pick_engine then says which installed engines do not run the scheme."""
    return None


def cannot_run(scheme: str) -> str:  # pragma: no cover - it runs every scheme
    return f"engine transformers cannot run quantization {scheme}"


# NOTE: transformers' speed (planner/model/speed.py), fitted on the published Qwen2.5 table (transformers 4.46
# `generate`, Flash Attention 2, A100 80GB): a decode step is bound by its fixed cost per layer (Python and kernel
# launches, 0.56-0.80 ms per layer), so the bandwidth share is poorly determined (it reaches the bound of 1.0) and
# the prefill's share of compute (0.054) also absorbs the long-context slowdown the table shows for 3B and 7B. Median
# error 4.8% over 64 rows, max 19.5%; 11.5% median on Qwen2.5-3B when fitted without it (docs/speed-model.md). Not
# measured: bitsandbytes, fp8, mxfp4 kernels (they take the float numbers, with a note); this repo's batching loop.
_FIT = "Qwen2.5 speed benchmark (A100 80GB, batch 1, 2,048 tokens after 1-30,720 input tokens), fitted by benchmarks/speed_fit.py; residuals in docs/speed-model.md"
SPEED = EngineSpeed(NAME, {
    "float": KernelSpeed(step_s=5.475e-03, layer_s=5.724e-04, bandwidth_eff=1.0, source=_FIT),
    "gptq-int8": KernelSpeed(step_s=7.491e-03, layer_s=7.742e-04, bandwidth_eff=1.0, source=_FIT),
    "gptq-int4": KernelSpeed(step_s=5.354e-03, layer_s=5.593e-04, bandwidth_eff=0.494, source=_FIT),
    "awq": KernelSpeed(step_s=6.124e-03, layer_s=8.038e-04, bandwidth_eff=1.0, source=_FIT),
}, compute_eff=0.054, source=_FIT)


# NOTE: transformers on this machine's CPU (planner/catalog/cpus.json), fitted on TPOT at 1 and 16 streams of the tiny
# model through the API (this repo's batching loop; benchmarks/cpu_speed.py): a fixed cost per step and per sequence;
# 8 streams, held out, within 4-8% (docs/speed-model.md). The fit subtracts the model's own memory term (the
# weights over the measured bandwidth); the bandwidth and compute shares are not determined by a model this small:
# 1.0 of the measured host rates.
_CPU_FIT = "the shipped tiny model (4 layers) through gpuplan's API on this project's 2-core CI machine, 1 and 16 streams; benchmarks/cpu_speed.py, run in benchmarks/data/cpu_speed-2026-12-06.json"
SPEED_CPU = EngineSpeed(NAME, {
    "float": KernelSpeed(step_s=4.106e-03, layer_s=0.0, bandwidth_eff=1.0, seq_s=6.506e-04,
                          request_s=1.505e-02, source=_CPU_FIT),
    "bnb-int8": KernelSpeed(step_s=8.309e-03, layer_s=0.0, bandwidth_eff=1.0, seq_s=1.065e-03,
                          request_s=1.682e-02, source=_CPU_FIT),
    "bnb-4bit": KernelSpeed(step_s=3.885e-03, layer_s=0.0, bandwidth_eff=1.0, seq_s=6.674e-04,
                          request_s=1.676e-02, source=_CPU_FIT),
}, compute_eff=1.0, source=_CPU_FIT,
    caveat="CPU numbers fitted on the 4-layer tiny model only (a fixed cost per step and per sequence): how a larger model's layers, bytes and flops add on a CPU is not measured")

# NOTE: bitsandbytes LLM.int8 loads its cuBLASLt int8 kernels outside torch's allocator: the same measurement as
# CUDA_CONTEXT_BYTES gave 750-752 MiB for int8 replicas against 688 MiB for bf16/4-bit ones; we take 64 MiB.
BNB_INT8_KERNELS_BYTES = 64 * MiB
# NOTE: torch's caching allocator keeps freed blocks that the next, larger request cannot reuse: transformers'
# DynamicCache grows every layer's K and V by concatenation at each step, so blocks of ever larger sizes are left
# behind. Measured (reserved - allocated peak) / (KV cache + activations): 3-27% over 9 cases (1B-8B, bf16, int8,
# nf4, 4 x 4096 tokens; docs/gpu-validation.md). We take 20%.
FRAGMENTATION_FRACTION = 0.20


@dataclass(frozen=True)
class TransformersSettings:
    """What a transformers replica is started with: the load (scheme, dtype) and the batch bounds. Where it loads
    (GPU, GPU + CPU offload, CPU) is decided when it starts, from the GPU it finds (planner.decisions.decide_load)."""

    quantization: str
    dtype: str | None  # the deploy file's dtype; None: the loader's default (bf16)
    max_model_len: int
    max_num_seqs: int

    def to_json(self) -> dict:
        return asdict(self)


def estimate(req: ReplicaRequest) -> ReplicaEstimate:
    spec, q, dtype = req.spec, req.quant, req.dtype
    notes = list(req.notes)
    w = weight_bytes(spec, q, dtype)
    if spec.source == "gguf":
        stored = sum(t.stored_bytes or 0 for t in spec.tensors)
        notes.append(f"{NAME} dequantizes a GGUF file on load: its weights are planned at {dtype}, "
                     f"{w.total / max(stored, 1):.1f}x the file's tensors; engine llamacpp runs it as stored")
    act, act_detail = activation_bytes(spec, q, tokens=req.prefill_tokens, max_num_seqs=req.max_num_seqs,
                                       act_bytes=FLOAT_BYTES[dtype], compute_dtype=dtype)
    kv, kv_detail = kv_cache_bytes(spec, max_model_len=req.max_model_len, max_num_seqs=req.max_num_seqs,
                                   kv_bytes=req.kv_bytes, mla_latent=req.mla_latent_cache)
    # the engine grows and merges the running batch's cache one layer at a time (serve/engines/batching.py): one
    # layer's K (or V) of the whole batch is copied while the old one lives. It peaks apart from a prefill, so the
    # activation term is the larger of the two.
    concat = largest_layer_kv(kv_detail, max_model_len=req.max_model_len, max_num_seqs=req.max_num_seqs) // 2
    act_detail = {**act_detail, "prefill_peak": act, "kv_concat_transient": concat}
    act = max(act, concat)
    if req.device == "cuda":
        frag = int(FRAGMENTATION_FRACTION * (kv + act))
        kernels = BNB_INT8_KERNELS_BYTES if q.scheme == "int8" else 0
        overhead = CUDA_CONTEXT_BYTES + kernels + LIBRARY_WORKSPACE_BYTES + frag
        over_detail = {"cuda_context": CUDA_CONTEXT_BYTES, "library_workspaces": LIBRARY_WORKSPACE_BYTES,
                       "allocator_fragmentation": frag}
        if kernels:
            over_detail["bitsandbytes_int8_kernels"] = kernels
    else:
        overhead = CPU_PROCESS_BYTES
        over_detail = {"python_torch_process": CPU_PROCESS_BYTES}
    return replica_estimate(req, w, kv=kv, act=act, overhead=overhead, notes=notes, engine=NAME,
                            detail={"kv_cache": kv_detail, "activations": act_detail, "runtime_overhead": over_detail})


def settings(est: ReplicaEstimate, target: DeploymentTarget) -> TransformersSettings:
    return TransformersSettings(quantization=est.quantization, dtype=target.dtype, max_model_len=est.max_model_len,
                                max_num_seqs=est.max_num_seqs)


def describe(est: ReplicaEstimate) -> str:
    """What a replica is given, in a few words (``gpuplan plan``'s engines section); nothing beyond the plan."""
    return ""
