"""How fast a replica runs: the time of one decode step and of one prefill, from what the memory model already knows.

A decode step of ``B`` sequences at context ``C`` reads every weight once (a MoE model: the experts its tokens touch)
and ``B x C`` tokens of KV cache, and does ``2 x active params`` multiply-adds per sequence plus attention over its
context. On a device of bandwidth ``BW`` and dense compute ``F`` it takes

    t_step = step_s + layers x layer_s + max(bytes / (BW x bandwidth_eff), flops / (F x compute_eff))

where ``step_s`` (scheduler, sampling, launches) and ``layer_s`` (per-layer launches, Python) are the engine's fixed
cost per step, and ``bandwidth_eff`` / ``compute_eff`` the shares of the datasheet figures its kernels reach. A prefill
of ``N`` tokens is one step whose work is ``N`` tokens' matmuls and causal attention over them. The engine numbers
are fitted per engine and kernel (each engine module's ``SPEED``; ``python -m benchmarks.speed_fit`` fits them and
prints every residual); the device numbers are datasheet figures (planner/catalog/gpus.json). docs/speed-model.md
says where each constant comes from and how far each prediction was from its measurement.

Pure: no I/O; values with ``to_json()``; an unknown term is an InputError that names what to add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.errors import InputError
from planner.model.estimate import kv_cache_bytes
from planner.model.quant import FLOAT_BYTES, QuantSpec, tensor_bytes
from planner.model.spec import ModelSpec


@dataclass(frozen=True)
class DeviceSpeed:
    """What a device can move and compute: datasheet memory bandwidth and dense TFLOPs per compute dtype."""

    name: str
    bandwidth_bytes_per_s: float
    dense_tflops: dict  # compute dtype ("bf16", "fp16", "fp8", "int8") -> dense TFLOPs (no sparsity)
    source: str = ""
    kind: str = "gpu"  # "gpu" | "cpu": which of an engine's speed tables applies

    def flops_per_s(self, dtype: str) -> float:
        tf = self.dense_tflops.get(dtype)
        if not tf:
            have = ", ".join(sorted(self.dense_tflops)) or "none"
            where = "planner/catalog/cpus.json" if self.kind == "cpu" else "planner/catalog/gpus.json"
            raise InputError(f"{self.kind.upper()} {self.name}: no dense TFLOPs for {dtype} in its catalog entry (it "
                             f"has: {have}); add dense_tflops.{dtype} to its entry in {where} (the datasheet's "
                             f"figure without sparsity, or the measured one for a CPU), or plan a dtype it has "
                             f"(--dtype / dtype: {have})")
        return float(tf) * 1e12

    def to_json(self) -> dict:
        return {"name": self.name, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
                "dense_tflops": dict(self.dense_tflops), "source": self.source}


@dataclass(frozen=True)
class KernelSpeed:
    """One engine's numbers for one kernel family (its bf16 path, its GPTQ-int4 kernels, ...)."""

    step_s: float  # fixed cost of a decode step
    layer_s: float  # fixed cost per layer per step
    bandwidth_eff: float  # share of the datasheet bandwidth its decode reaches
    source: str  # what it was fitted on
    seq_s: float = 0.0  # cost per sequence per step (scheduling, sampling, detokenizing); 0 where not measured
    # a request's latency before its first token outside the engine's steps (the API, the ingress, the hand-off to the
    # replica's engine): added to TTFT, it takes no engine time; 0 where not measured
    request_s: float = 0.0


@dataclass(frozen=True)
class EngineSpeed:
    """An engine's speed numbers: per kernel, and the share of dense compute its prefill reaches."""

    engine: str
    kernels: dict  # kernel name (kernel_of) -> KernelSpeed
    compute_eff: float
    source: str
    # the kernel whose numbers stand in for one without its own (with a note saying so)
    fallback: str = "float"
    caveat: str | None = None  # what the numbers do not cover, said with every estimate made from them

    def kernel(self, name: str) -> tuple[KernelSpeed, str | None]:
        if name in self.kernels:
            return self.kernels[name], None
        if self.fallback not in self.kernels:
            raise InputError(f"engine {self.engine}: no speed numbers for kernel {name}; fit them "
                             "(python -m benchmarks.speed_fit) and add them to its module's SPEED")
        return self.kernels[self.fallback], (
            f"{self.engine} has no measured speed for {name} kernels; its {self.fallback} numbers are used on "
            f"{name}'s bytes (an assumption, not a measurement)")


def kernel_of(q: QuantSpec) -> str:
    """The kernel family a quantization runs on: float, gptq-int8, gptq-int4, awq, bnb-int8, bnb-4bit, fp8, mxfp4,
    gguf."""
    if q.scheme in FLOAT_BYTES:
        return "float"
    if q.scheme == "gptq":
        return f"gptq-int{q.bits}"
    if q.scheme == "int8":
        return "bnb-int8"
    if q.scheme in ("nf4", "fp4", "int4"):
        return "bnb-4bit"
    return q.scheme


@dataclass(frozen=True)
class Work:
    """What one token costs a replica of one model at one quantization, independent of the device."""

    layers: int
    weight_bytes: int  # read by every decode step (dense part: attention, MLP, norms, lm_head)
    expert_bytes: int  # MoE experts' bytes, all of them; a step reads the share its tokens touch
    experts: int
    experts_per_token: int
    kv_bytes_full: int  # KV bytes per context token, summed over full-attention layers
    kv_bytes_sliding: int  # the same over sliding-window layers (read up to the window)
    sliding_window: int | None
    matmul_flops: int  # per token: 2 x the parameters its matmuls use (active experts only)
    attn_flops_full: int  # per token per context token, over full layers (QK^T and PV: 4 x heads x head_dim each)
    attn_flops_sliding: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def work_of(spec: ModelSpec, q: QuantSpec, dtype: str, kv_bytes: int, *, mla_latent: bool = False) -> Work:
    """Bytes and operations per token of ``spec`` at ``q`` (unquantized tensors at ``dtype``, KV at ``kv_bytes``)."""
    d = spec.dims
    dense = experts = 0
    mm_params = expert_params = 0
    for t in spec.tensors:
        if t.role in ("buffer",):
            continue
        if t.role == "embedding" and not spec.tied_embeddings:
            continue  # a lookup reads one row per token; tied, the same matrix is the lm_head's and read whole
        tb = tensor_bytes(t, q, dtype)
        b = tb.data + tb.state
        if t.role == "experts":
            experts += b
            expert_params += t.numel
        else:
            dense += b
            if t.role in ("linear", "lm_head", "router", "embedding"):  # an embedding here is the tied lm_head
                mm_params += t.numel
    active = expert_params * d.experts_per_token / d.num_experts if d.num_experts else 0
    _, kv = kv_cache_bytes(spec, max_model_len=1, max_num_seqs=1, kv_bytes=kv_bytes, mla_latent=mla_latent)
    per_layer = kv["per_token_per_layer"]
    if d.attention == "mla":
        attn = 2 * d.num_heads * ((d.qk_nope_head_dim or 0) + (d.qk_rope_head_dim or 0) + (d.v_head_dim or 0))
    else:
        attn = 4 * d.num_heads * d.head_dim
    full, sliding = kv["full_layers"], kv["sliding_layers"]
    return Work(layers=d.num_layers, weight_bytes=dense, expert_bytes=experts, experts=d.num_experts,
                experts_per_token=d.experts_per_token, kv_bytes_full=per_layer * full,
                kv_bytes_sliding=per_layer * sliding, sliding_window=d.sliding_window if sliding else None,
                matmul_flops=int(2 * (mm_params + active)), attn_flops_full=attn * full,
                attn_flops_sliding=attn * sliding)


def _ctx(work: Work, context: float) -> tuple[float, float]:
    """(KV bytes, attention flops) per sequence at ``context`` tokens."""
    slide = min(context, work.sliding_window) if work.sliding_window else context
    return (work.kv_bytes_full * context + work.kv_bytes_sliding * slide,
            work.attn_flops_full * context + work.attn_flops_sliding * slide)


def experts_touched(work: Work, tokens: int) -> float:
    """Expected share of a layer's experts that ``tokens`` tokens route to (each picks ``experts_per_token`` of
    ``experts``, spread uniformly): 1 - (1 - k/E)^tokens."""
    if not work.experts:
        return 0.0
    return 1.0 - (1.0 - work.experts_per_token / work.experts) ** tokens


@dataclass(frozen=True)
class StepTime:
    seconds: float
    fixed_s: float  # the engine's fixed cost (step_s + layers x layer_s)
    memory_s: float  # bytes over the bandwidth it reaches
    compute_s: float  # flops over the compute it reaches
    bytes: float
    flops: float

    @property
    def bound(self) -> str:
        """What sets the step's time: memory, compute or overhead (the engine's fixed cost is the largest term)."""
        if self.fixed_s >= max(self.memory_s, self.compute_s):
            return "overhead"
        return "memory" if self.memory_s >= self.compute_s else "compute"


def decode_step(work: Work, dev: DeviceSpeed, ks: KernelSpeed, compute_eff: float, compute_dtype: str, *,
                batch: int, context: float) -> StepTime:
    """One decode step of ``batch`` sequences at ``context`` tokens each."""
    kv_b, attn_f = _ctx(work, context)
    nbytes = work.weight_bytes + work.expert_bytes * experts_touched(work, batch) + batch * kv_b
    flops = batch * (work.matmul_flops + attn_f)
    return _step(work, dev, ks, compute_eff, compute_dtype, nbytes, flops, batch)


def prefill(work: Work, dev: DeviceSpeed, ks: KernelSpeed, compute_eff: float, compute_dtype: str, *,
            tokens: int) -> StepTime:
    """A prefill of ``tokens`` tokens of one sequence (causal attention: token i attends to i tokens)."""
    _, attn_f = _ctx(work, tokens / 2)
    nbytes = work.weight_bytes + work.expert_bytes * experts_touched(work, tokens)
    flops = tokens * (work.matmul_flops + attn_f)
    return _step(work, dev, ks, compute_eff, compute_dtype, nbytes, flops, 1)


def _step(work, dev, ks, compute_eff, compute_dtype, nbytes, flops, seqs) -> StepTime:
    fixed = ks.step_s + work.layers * ks.layer_s + seqs * ks.seq_s
    mem = nbytes / (dev.bandwidth_bytes_per_s * ks.bandwidth_eff)
    comp = flops / (dev.flops_per_s(compute_dtype) * compute_eff)
    return StepTime(fixed + max(mem, comp), fixed, mem, comp, nbytes, flops)


def compute_dtype_of(q: QuantSpec, dtype: str, dev: DeviceSpeed) -> str:
    """The dtype the matmuls run in: fp8 where the scheme is fp8 and the device has fp8 units, else the compute
    dtype (weight-only schemes dequantize to it)."""
    if q.scheme == "fp8" and dev.dense_tflops.get("fp8"):
        return "fp8"
    if dev.kind == "cpu" and dtype not in dev.dense_tflops:
        return "fp32"  # a CPU without fast half-precision units computes in fp32 (llama.cpp's f16 too)
    return dtype


@dataclass(frozen=True)
class SpeedEstimate:
    """A replica's speed for one request shape: ``batch`` sequences of ``input_tokens`` in and ``output_tokens``
    out, decoded together."""

    engine: str
    kernel: str
    device: str
    input_tokens: int
    output_tokens: int
    batch: int
    ttft_s: float  # the serving path's latency and the prefill of one request's input (its first token)
    tpot_s: float  # one decode step at the batch, at the mean context of the output
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # one sequence's
    tokens_per_s: float  # the replica's output tokens per second, all sequences, prefills included
    bound: str  # what sets the decode step: memory, compute or overhead
    terms: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"engine": self.engine, "kernel": self.kernel, "device": self.device,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "batch": self.batch,
                "ttft_ms": round(self.ttft_s * 1e3, 3), "tpot_ms": round(self.tpot_s * 1e3, 3),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
                "tokens_per_s": round(self.tokens_per_s, 1), "bound": self.bound, "terms": self.terms,
                "notes": list(self.notes)}


def estimate_speed(spec: ModelSpec, q: QuantSpec, dtype: str, kv_bytes: int, speed: EngineSpeed, dev: DeviceSpeed,
                   *, input_tokens: int, output_tokens: int, batch: int = 1, mla_latent: bool = False) -> SpeedEstimate:
    """TTFT, TPOT and tokens/s of a replica of ``spec`` at ``q`` on engine ``speed`` and device ``dev``."""
    for name, v in (("input tokens", input_tokens), ("output tokens", output_tokens), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    kernel = kernel_of(q)
    ks, note = speed.kernel(kernel)
    work = work_of(spec, q, dtype, kv_bytes, mla_latent=mla_latent)
    cd = compute_dtype_of(q, dtype, dev)
    pre = prefill(work, dev, ks, speed.compute_eff, cd, tokens=input_tokens)
    step = decode_step(work, dev, ks, speed.compute_eff, cd, batch=batch,
                       context=input_tokens + (output_tokens - 1) / 2)
    # a replica decoding `batch` sequences spends one prefill per request and output_tokens steps per batch
    busy = batch * pre.seconds + output_tokens * step.seconds
    terms = {"work": work.to_json(), "compute_dtype": cd,
             "decode_step": {"seconds": step.seconds, "fixed_s": step.fixed_s, "memory_s": step.memory_s,
                             "compute_s": step.compute_s, "bytes": int(step.bytes), "flops": int(step.flops)},
             "prefill": {"seconds": pre.seconds, "fixed_s": pre.fixed_s, "memory_s": pre.memory_s,
                         "compute_s": pre.compute_s, "flops": int(pre.flops)},
             "engine": {"step_s": ks.step_s, "layer_s": ks.layer_s, "seq_s": ks.seq_s, "request_s": ks.request_s,
                        "bandwidth_eff": ks.bandwidth_eff,
                        "compute_eff": speed.compute_eff, "source": ks.source},
             "device": dev.to_json()}
    return SpeedEstimate(engine=speed.engine, kernel=kernel, device=dev.name, input_tokens=input_tokens,
                         output_tokens=output_tokens, batch=batch, ttft_s=ks.request_s + pre.seconds, tpot_s=step.seconds,
                         prefill_tokens_per_s=input_tokens / pre.seconds, decode_tokens_per_s=1.0 / step.seconds,
                         tokens_per_s=batch * output_tokens / busy if busy > 0 else math.inf, bound=step.bound,
                         terms=terms, notes=tuple(n for n in (note, speed.caveat) if n))
