"""What every engine's replica estimate is made of: the ReplicaEstimate value and the terms engines share.

A replica is weights + KV cache + activation peak + runtime overhead, each a named term; the names follow vLLM's
memory profiler (weights, activation peak, non-torch / runtime, KV cache). How an engine allocates them is its own
module (planner/model/engines/); the terms here are what they have in common: the resident bytes of every tensor at
a quantization, the KV cache per token and layer, one prefill chunk's activation peak, and the process constants
measured on a GPU. Every formula and constant is in docs/memory-model.md with where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.model.quant import FLOAT_BYTES, SCHEMES, QuantSpec, is_quantized, stored_checkpoint_bytes, tensor_bytes
from planner.model.spec import ModelSpec
from planner.units import MiB

# NOTE: memory outside torch's allocator of one process with torch and a model on the GPU (CUDA context, lazily
# loaded kernels, library handles): NVML's used memory of the process less torch's reserved peak, measured 688 MiB
# in every bf16 and 4-bit case on an H200 (driver 580.159, torch 2.11+cu130; docs/gpu-validation.md). Earlier
# figures were 300-700 MiB across GPUs (pytorch/pytorch#107667, #28113); a newer GPU or CUDA is at the top of that.
CUDA_CONTEXT_BYTES = 688 * MiB
# NOTE: cuBLAS/cuBLASLt workspaces, allocated through torch's allocator: the first bf16 matmul took 32 MiB beyond its
# output on the H200 (c10/cuda CUDABlas getChosenWorkspaceSize on Hopper); we count two handles.
LIBRARY_WORKSPACE_BYTES = 64 * MiB
# NOTE: a CPU replica's baseline: resident set of a Python process with torch 2.13, transformers 5 and
# bitsandbytes imported, measured 360 MiB on the CI machine (psutil rss); we take 384 MiB.
CPU_PROCESS_BYTES = 384 * MiB

KV_DTYPES = {"auto": None, "bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


@dataclass(frozen=True)
class ReplicaEstimate:
    model: str
    quantization: str
    quant_label: str
    dtype: str  # dtype of unquantized tensors and compute
    device: str  # "cuda" | "cpu"
    max_model_len: int
    max_num_seqs: int
    prefill_tokens: int
    params_total: int
    params_quantized: int
    params_unquantized: int
    weights: int  # every resident tensor: params, buffers, quantization state; tied tensors once
    weights_quant_state: int  # part of weights: scales, zeros, absmax, lookup tables
    kv_cache: int
    activations: int
    runtime_overhead: int
    total: int
    source: str  # "safetensors" | "config" | "gguf"
    detail: dict = field(default_factory=dict)  # each term's parts, in bytes
    notes: tuple[str, ...] = ()
    engine: str = "transformers"  # the engine whose allocations these are (planner/model/engines/)
    # what the engine is started with as sized here (llama.cpp's context), for its settings(); not in the JSON
    engine_settings: object = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "quantization": self.quantization,
            "params": {"total": self.params_total, "quantized": self.params_quantized,
                       "unquantized": self.params_unquantized},
            "bytes": {"weights": self.weights, "kv_cache": self.kv_cache, "activations": self.activations,
                      "runtime_overhead": self.runtime_overhead, "total": self.total},
            "quant_label": self.quant_label,
            "dtype": self.dtype,
            "device": self.device,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "source": self.source,
            "engine": self.engine,
            "detail": self.detail,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class WeightBytes:
    total: int
    quant_state: int
    params_quantized: int
    params_unquantized: int
    by_role: dict


def weight_bytes(spec: ModelSpec, q: QuantSpec, dtype: str) -> WeightBytes:
    """Resident bytes of every tensor of ``spec`` loaded with ``q``; unquantized tensors at ``dtype``."""
    if spec.source == "gguf":
        # transformers (and vLLM) dequantize a GGUF on load: every tensor at the compute dtype. Stored as it is, the
        # file runs on llama.cpp (planner/model/engines/llamacpp.py).
        n = sum(t.numel for t in spec.tensors)
        total = n * FLOAT_BYTES[dtype]
        return WeightBytes(total, 0, 0, n, {f"gguf tensors dequantized to {dtype}": total})
    stored = stored_checkpoint_bytes(spec, dtype)
    if stored is not None:
        data, state, qp, op = stored
        return WeightBytes(data + state, state, qp, op, {"quantized modules + rest (as stored)": data + state})
    total = state = qp = up = 0
    by_role: dict[str, int] = {}
    for t in spec.tensors:
        tb = tensor_bytes(t, q, dtype)
        total += tb.data + tb.state
        state += tb.state
        if tb.quantized:
            qp += tb.params
        else:
            up += tb.params
        key = f"{t.role} ({'quantized' if tb.quantized else dtype if t.role != 'buffer' else 'buffers'})"
        by_role[key] = by_role.get(key, 0) + tb.data + tb.state
    return WeightBytes(total, state, qp, up, by_role)


def kv_cache_bytes(spec: ModelSpec, *, max_model_len: int, max_num_seqs: int, kv_bytes: int,
                   mla_latent: bool = False) -> tuple[int, dict]:
    """2 x layers x kv_heads x head_dim x kv_bytes x tokens x sequences, per layer: a sliding-window layer keeps at
    most ``sliding_window`` tokens. MLA (DeepSeek) caches the decompressed K (heads x (nope+rope)) and V
    (heads x v_head_dim) in transformers; ``mla_latent`` gives the compressed (kv_lora_rank + rope) cache vLLM keeps."""
    d = spec.dims
    per_token_layer: int
    if d.attention == "mla":
        if mla_latent:
            per_token_layer = (d.kv_lora_rank + d.qk_rope_head_dim) * kv_bytes
        else:
            per_token_layer = d.num_heads * (d.qk_nope_head_dim + d.qk_rope_head_dim + d.v_head_dim) * kv_bytes
    else:
        per_token_layer = 2 * d.num_kv_heads * d.head_dim * kv_bytes
    types = d.layer_types or ("full",) * d.num_layers
    full = sum(1 for t in types if t != "sliding")
    sliding = len(types) - full
    win_tokens = min(max_model_len, d.sliding_window or max_model_len)
    total = per_token_layer * max_num_seqs * (full * max_model_len + sliding * win_tokens)
    return total, {"per_token_per_layer": per_token_layer, "full_layers": full, "sliding_layers": sliding,
                   "sliding_window_tokens": win_tokens if sliding else None}


def largest_layer_kv(kv_detail: dict, *, max_model_len: int, max_num_seqs: int) -> int:
    """K + V of the largest single layer for the whole batch (a full-attention layer unless all slide), from
    :func:`kv_cache_bytes`'s detail."""
    tokens = max_model_len if kv_detail["full_layers"] else kv_detail["sliding_window_tokens"]
    return kv_detail["per_token_per_layer"] * max_num_seqs * tokens


def activation_bytes(spec: ModelSpec, q: QuantSpec, *, tokens: int, max_num_seqs: int, act_bytes: int,
                     compute_dtype: str = "bf16") -> tuple[int, dict]:
    """Peak of the transient tensors of one prefill chunk of ``tokens`` tokens, inside one decoder layer (the
    previous layer's temporaries are freed), plus the last-position logits of every sequence.

    residual stream (in + out) + max(attention projections, MLP intermediates) + rotary cos/sin + causal mask
    + 4-bit dequantization buffer (largest quantized weight in the compute dtype) + logits.
    """
    d = spec.dims
    T = tokens
    residual = 2 * T * d.hidden_size * act_bytes
    if d.attention == "mla":
        qk = d.qk_nope_head_dim + d.qk_rope_head_dim
        attn = T * d.num_heads * (2 * qk + 2 * d.v_head_dim) * act_bytes + T * (d.kv_lora_rank + d.qk_rope_head_dim) * act_bytes
    else:
        attn = T * (2 * d.num_heads + 2 * d.num_kv_heads) * d.head_dim * act_bytes
    if d.num_experts:
        mi = d.moe_intermediate_size or d.intermediate_size
        k = max(1, d.experts_per_token)
        # routed tokens: T x k rows through gate/up/act, plus router logits in fp32
        mlp = 3 * T * k * mi * act_bytes + T * d.num_experts * 4 + T * d.hidden_size * act_bytes * 2
        mlp = max(mlp, 3 * T * d.intermediate_size * act_bytes)  # dense layers of DeepSeek (first_k_dense)
    else:
        mlp = 3 * T * d.intermediate_size * act_bytes
    rotary = 2 * T * (d.qk_rope_head_dim or d.head_dim) * act_bytes
    mask = T * T  # bool [T, T] when a 4-D mask is materialised (padded batches)
    # the scheme's own scratch while a quantized matmul runs (bitsandbytes' dequantized weight, GPTQ's buffer)
    family = SCHEMES[q.scheme].family
    workspace = getattr(family, "workspace_bytes", None)
    dequant = 0 if workspace is None else workspace(
        q, [t for t in spec.tensors if is_quantized(t, q)], tokens=T, hidden=d.hidden_size, act_bytes=act_bytes,
        compute_dtype=compute_dtype)
    logits = 2 * max_num_seqs * d.vocab_size * 4  # fp32 logits of the last position + processed scores
    peak = residual + max(attn, mlp) + rotary + mask + dequant + logits
    return peak, {"prefill_tokens": T, "residual": residual, "attention": attn, "mlp": mlp, "rotary": rotary,
                  "mask": mask, "quant_workspace": dequant, "logits": logits}


@dataclass(frozen=True)
class ReplicaRequest:
    """What every engine's estimate is asked for, validated once (planner.model.engines.estimate_replica): the model,
    its resolved quantization, the compute dtype, the device, the KV element width and the sequence bounds."""

    spec: ModelSpec
    quant: QuantSpec
    dtype: str  # of unquantized tensors and compute
    device: str  # "cuda" | "cpu"
    kv_bytes: int  # bytes of one KV cache element
    max_model_len: int
    max_num_seqs: int
    prefill_tokens: int  # tokens of one prefill chunk
    mla_latent_cache: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeploymentTarget:
    """Where the plan puts one deployment of a model, as an engine's settings need it
    (planner.model.engines.<engine>.settings)."""

    model: str  # the deploy file's name of the model
    spec: ModelSpec
    planned_bytes: int  # the plan's bytes of one replica (replica_memory when the user gave it)
    device: str  # "cuda" | "cpu"
    device_total_bytes: int  # the GPU's total bytes (the node's smallest GPU), or the node's RAM for CPU replicas
    offload_cpu_bytes: int = 0  # offload.cpu_memory of the model
    dtype: str | None = None  # the deploy file's dtype of the model (None: the engine's default)
    device_name: str | None = None  # the GPU type the plan put the deployment on, or "cpu"
    device_speed: object = None  # its planner.model.speed.DeviceSpeed (None: the catalog has no speed for it)


def replica_estimate(req: ReplicaRequest, w: WeightBytes, *, kv: int, act: int, overhead: int, detail: dict,
                     notes, engine: str) -> ReplicaEstimate:
    """The ReplicaEstimate of an engine that sizes weights by :func:`weight_bytes` (transformers, vLLM): the shared
    fields from the request and the weights, the engine's own terms and detail."""
    q = req.quant
    return ReplicaEstimate(
        model=req.spec.name, quantization=q.scheme, quant_label=q.label or q.scheme, dtype=req.dtype,
        device=req.device, max_model_len=req.max_model_len, max_num_seqs=req.max_num_seqs,
        prefill_tokens=req.prefill_tokens, params_total=w.params_quantized + w.params_unquantized,
        params_quantized=w.params_quantized, params_unquantized=w.params_unquantized, weights=w.total,
        weights_quant_state=w.quant_state, kv_cache=kv, activations=act, runtime_overhead=overhead,
        total=w.total + kv + act + overhead, source=req.spec.source,
        detail={"weights": w.by_role, "weights_quant_state": w.quant_state, **detail}, notes=tuple(notes),
        engine=engine)
