"""A GGUF replica as llama.cpp allocates it (serve/engines/llamacpp.py runs it), and the settings that make it so.

llama.cpp logs one line per buffer when a context starts; each term here is one of them (docs/memory-model.md 5c):

- ``model buffer size``: the GGUF's tensors as stored (per-tensor ggml types). On the CPU they are mmap'd file pages.
  With layers on a GPU, ``token_embd`` stays on the CPU (the input layer always does) and a tied output (no
  ``output.weight``) is loaded a second time for the GPU (llamacpp_offload.py places the layers).
- ``KV buffer size``: ``n_ctx`` cells x layers x (K + V) of f16 (2 bytes) per cell, ``n_ctx = n_seq_max x
  n_ctx_seq``, ``n_ctx_seq`` = max_model_len rounded up to 256 (llama.cpp pads it; one KV stream per sequence,
  ``kv_unified`` off).
- ``output buffer size``: logits of ``n_outputs_max`` rows x n_vocab x 4 bytes. The engine sets ``n_outputs_max`` =
  ``n_seq_max`` (one row per running sequence is all it reads); llama.cpp's default, n_batch rows, would also put
  n_batch x n_vocab x 4 bytes into the compute buffer.
- ``compute buffer size``: ggml-alloc's peak over one ``n_ubatch``-token graph with flash attention (llama.cpp's
  ``auto`` picks it on CPU and current GPUs). Fitted to llama.cpp's own reports over 4 Llama shapes (hidden 128-512,
  FFN 384-1,408, vocab 4,096-16,384, n_ubatch 64-512, n_ctx_seq 256-2,048; tests/unit/test_llamacpp_plan.py holds
  them): the FFN step holds three n_ubatch x FFN and four n_ubatch x hidden f32 tensors, and the attention mask is
  n_ubatch x n_ctx_seq f16: ``4 x n_ubatch x (3 x FFN + 4 x hidden) + 2 x n_ubatch x n_ctx_seq``.

Pure arithmetic over a ModelSpec from a GGUF file (planner/model/spec/from_gguf.py); no file is read here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from planner.errors import InfeasiblePlanError, InputError
from planner.model.estimate import (CPU_PROCESS_BYTES, CUDA_CONTEXT_BYTES, DeploymentTarget, ReplicaEstimate,
                                    ReplicaRequest)
from planner.model.spec import ModelSpec
from planner.model.speed import EngineSpeed, KernelSpeed
from planner.units import format_bytes

NAME = "llamacpp"
LABEL = "llama.cpp"
# what pick_engine says when it is asked for but not installed for the replicas, and when auto passes it over
INSTALL_HINT = ("llama-cpp-python is not installed for the replicas; run `make venv` (it builds llama-cpp-python) or "
                "use engine: transformers, which dequantizes the file (3.5-7x its size)")
AUTO_MISSING = ("llama-cpp-python is not installed (`make venv` builds it); transformers dequantizes the GGUF "
                "(planned at that size)")


def auto_takes(scheme: str) -> str:
    """Why ``engine: auto`` took it."""
    return "a GGUF file runs on llama.cpp as stored"


def cannot_run(scheme: str) -> str:
    """Why it refuses a scheme, and the fix."""
    return (f"engine llamacpp runs GGUF files, not quantization {scheme}: point source at a .gguf file, or use "
            "engine: transformers or vllm")

KV_CELL_PAD = 256  # llama.cpp: n_ctx and n_ctx_seq are multiples of 256
DEFAULT_N_UBATCH = 512  # llama.cpp's default physical batch
F16_BYTES = 2
F32_BYTES = 4


# NOTE: no GPU speed numbers for llama.cpp yet (no published table fitted, no GPU run measured): the speed model
# refuses it on a GPU and says so (planner/model/engines/__init__.py speed_of).
SPEED = None

# NOTE: llama.cpp on this machine's CPU (planner/catalog/cpus.json), fitted on TPOT at 1 and 16 streams of the shipped
# Q8_0 file through the API (this repo's batched slots; benchmarks/cpu_speed.py). The 2.7 MB file stays in the CPU's
# cache, so its steps beat the DRAM bandwidth the model divides by: at 1 stream the model's memory term alone is
# 0.45 ms against 0.32 ms measured (+41%), at the held-out 8 streams +18% (docs/speed-model.md). No cache term yet.
_CPU_FIT = "the shipped tiny model (4 layers) through gpuplan's API on this project's 2-core CI machine, 1 and 16 streams; benchmarks/cpu_speed.py, run in benchmarks/data/cpu_speed-2026-12-06.json"
SPEED_CPU = EngineSpeed(NAME, {
    "gguf": KernelSpeed(step_s=0.000e+00, layer_s=0.0, bandwidth_eff=1.0, seq_s=2.632e-04,
                          request_s=9.879e-03, source=_CPU_FIT),
}, compute_eff=1.0, source=_CPU_FIT, fallback="gguf",
    caveat="CPU numbers fitted on the 4-layer tiny model only (a fixed cost per step and per sequence): how a larger model's layers, bytes and flops add on a CPU is not measured")


def n_ctx_seq(max_model_len: int) -> int:
    """KV cells of one sequence: max_model_len rounded up to 256."""
    return -(-int(max_model_len) // KV_CELL_PAD) * KV_CELL_PAD


@dataclass(frozen=True)
class LlamaCppSettings:
    """What a llama.cpp replica is started with (serve/engines/llamacpp.py)."""

    n_gpu_layers: int
    n_ctx: int
    n_ctx_seq: int
    n_seq_max: int
    n_batch: int
    n_ubatch: int
    n_outputs_max: int
    flash_attn: str

    def to_json(self) -> dict:
        return asdict(self)


def llamacpp_settings(*, max_model_len: int, max_num_seqs: int, prefill_tokens: int, n_gpu_layers: int
                      ) -> LlamaCppSettings:
    """The context of one replica: one KV stream per sequence, a logical batch that holds the longest prompt (the
    engine never splits one) or the planned prefill chunk, whichever is larger, physical batches of up to 512."""
    for name, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    cells = n_ctx_seq(max_model_len)
    n_batch = max(max_model_len, prefill_tokens, max_num_seqs)
    return LlamaCppSettings(n_gpu_layers=int(n_gpu_layers), n_ctx=cells * max_num_seqs, n_ctx_seq=cells,
                            n_seq_max=max_num_seqs, n_batch=n_batch, n_ubatch=min(DEFAULT_N_UBATCH, n_batch),
                            n_outputs_max=max_num_seqs, flash_attn="auto")


def kv_buffer_bytes(spec: ModelSpec, n_ctx: int) -> int:
    """llama.cpp's KV buffer: every layer keeps n_ctx cells of f16 K and V."""
    d = spec.dims
    per_cell_layer = d.num_kv_heads * d.head_dim * F16_BYTES * 2
    return d.num_layers * n_ctx * per_cell_layer


def output_buffer_bytes(spec: ModelSpec, n_outputs_max: int) -> int:
    return n_outputs_max * spec.dims.vocab_size * F32_BYTES


def compute_buffer_bytes(spec: ModelSpec, *, n_ubatch: int, n_ctx_seq: int, n_outputs_max: int) -> int:
    """ggml-alloc's peak for one n_ubatch graph with flash attention (see the module docstring): the FFN step, or the
    output step (n_outputs_max logits rows beside two n_ubatch x hidden tensors) when that is larger."""
    d = spec.dims
    ffn = F32_BYTES * n_ubatch * (3 * d.intermediate_size + 4 * d.hidden_size)
    out = F32_BYTES * (n_outputs_max * d.vocab_size + 2 * n_ubatch * d.hidden_size)
    return max(ffn, out) + F16_BYTES * n_ubatch * n_ctx_seq


def model_buffer_bytes(spec: ModelSpec) -> int:
    """Every tensor of the GGUF as stored."""
    return sum(t.stored_bytes or 0 for t in spec.tensors)


@dataclass(frozen=True)
class LlamaCppBuffers:
    """The four buffers llama.cpp reports, in bytes."""

    model: int
    kv: int
    output: int
    compute: int

    def to_json(self) -> dict:
        return asdict(self)


def buffers(spec: ModelSpec, settings: LlamaCppSettings) -> LlamaCppBuffers:
    return LlamaCppBuffers(
        model=model_buffer_bytes(spec), kv=kv_buffer_bytes(spec, settings.n_ctx),
        output=output_buffer_bytes(spec, settings.n_outputs_max),
        compute=compute_buffer_bytes(spec, n_ubatch=settings.n_ubatch, n_ctx_seq=settings.n_ctx_seq,
                                     n_outputs_max=settings.n_outputs_max))


def gpu_weight_bytes(spec: ModelSpec) -> int:
    """Model bytes on the GPU when every layer is offloaded: all tensors but ``token_embd`` (the input layer stays on
    the CPU), plus ``token_embd`` again as the output layer when the output is tied to it."""
    names = {t.name: (t.stored_bytes or 0) for t in spec.tensors}
    embd = names.get("token_embd.weight", 0)
    tied = "output.weight" not in names
    return model_buffer_bytes(spec) - embd + (embd if tied else 0)


# NOTE: a CPU llama.cpp replica's process besides its buffers: the Serve replica's Python with Ray, transformers (the
# tokenizer that detokenizes) and torch (serve/engines/batching.py, whose batching it shares) imported, plus the
# llama.cpp library: the transformers replica's baseline (planner.model.estimate.CPU_PROCESS_BYTES) is taken for it.


def estimate(req: ReplicaRequest) -> ReplicaEstimate:
    """One llama.cpp replica: its buffers as llama.cpp reports them. On ``cuda`` every layer is offloaded
    (``n_gpu_layers`` = blocks + 1) and the estimate is the GPU's share: model (less the input embeddings, plus a tied
    output's copy) + KV + compute + the CUDA context; the output buffer and ``token_embd`` stay in host memory (in
    ``detail``)."""
    spec, device, max_model_len, max_num_seqs = req.spec, req.device, req.max_model_len, req.max_num_seqs
    prefill_tokens, notes = req.prefill_tokens, list(req.notes)
    if spec.source != "gguf":
        raise InputError(f"engine llamacpp runs GGUF files; {spec.name} is a {spec.source} model: point source at a "
                         ".gguf file, or use engine: transformers or vllm")
    d = spec.dims
    n_layers_total = d.num_layers + 1
    st = llamacpp_settings(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           prefill_tokens=prefill_tokens,
                           n_gpu_layers=n_layers_total if device == "cuda" else 0)
    b = buffers(spec, st)
    if d.layer_types and "sliding" in d.layer_types:
        notes.append("sliding-window layers are sized as full-attention layers (an upper bound)")
    host = {"output_buffer": b.output}
    if device == "cuda":
        weights = gpu_weight_bytes(spec)
        host["token_embd"] = next((t.stored_bytes or 0 for t in spec.tensors if t.name == "token_embd.weight"), 0)
        overhead, over_detail = CUDA_CONTEXT_BYTES, {"cuda_context": CUDA_CONTEXT_BYTES}
        kv, act = b.kv, b.compute
    else:
        weights = b.model
        overhead, over_detail = CPU_PROCESS_BYTES, {"python_process": CPU_PROCESS_BYTES}
        kv, act = b.kv, b.compute + b.output
    n_params = sum(t.numel for t in spec.tensors)
    total = weights + kv + act + overhead
    return ReplicaEstimate(
        model=spec.name, quantization="gguf", quant_label="gguf (as stored)", dtype="fp16", device=device,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, prefill_tokens=st.n_ubatch,
        params_total=n_params, params_quantized=n_params, params_unquantized=0, weights=weights,
        weights_quant_state=0, kv_cache=kv, activations=act, runtime_overhead=overhead, total=total, source="gguf",
        detail={"weights": {"gguf tensors": weights}, "weights_quant_state": 0,
                "kv_cache": {"n_ctx": st.n_ctx, "n_ctx_seq": st.n_ctx_seq, "type": "f16"},
                "activations": {"compute_buffer": b.compute, **({} if device == "cuda" else
                                                                 {"output_buffer": b.output})},
                "runtime_overhead": over_detail, "llamacpp": st.to_json(), "llamacpp_buffers": b.to_json(),
                "host_memory": host},
        notes=tuple(notes), engine=NAME, engine_settings=st)



def layer_bytes(spec: ModelSpec) -> tuple[tuple[int, ...], int, int]:
    """(bytes of each block ``blk.N``, output layer bytes, input layer bytes) from the GGUF's tensors. The output
    layer is ``output_norm`` + ``output`` (``token_embd`` again when the output is tied to it); the input layer is
    ``token_embd``."""
    n = spec.dims.num_layers
    blocks = [0] * n
    by_name = {t.name: (t.stored_bytes or 0) for t in spec.tensors}
    for name, b in by_name.items():
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            if i < n:
                blocks[i] += b
    embd = by_name.get("token_embd.weight", 0)
    output = by_name.get("output_norm.weight", 0) + by_name.get("output.weight", embd)
    return tuple(blocks), output, embd


@dataclass(frozen=True)
class GpuLayersDecision:
    """How many layers a llama.cpp replica puts on its GPU, decided from the memory it has there."""

    mode: str  # "gpu" (every layer), "offload" (some layers; the rest run on the CPU) | "cpu"
    n_gpu_layers: int
    max_n_gpu_layers: int
    reason: str
    gpu_bytes: int = 0
    cpu_bytes: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def decide_gpu_layers(spec: ModelSpec, settings: LlamaCppSettings, *, model: str, budget_bytes: int | None,
                      offload_cpu_bytes: int = 0, fixed_gpu_bytes: int = 0,
                      why_no_cuda: str = "no CUDA device is visible to this replica") -> GpuLayersDecision:
    """The GGUF form of "offload to the CPU when the GPU is short": the largest ``n_gpu_layers`` whose blocks, their
    KV cache, the output layer, the compute buffer and ``fixed_gpu_bytes`` (the CUDA context) fit ``budget_bytes``
    (the replica's planned share, or less when the GPU has less free), placed as llama.cpp places them
    (llamacpp_offload.py). The layers left on the CPU (their weights and KV) must fit ``offload_cpu_bytes``.
    ``budget_bytes`` None: no GPU, everything on the CPU."""
    from planner.model.engines.llamacpp_offload import plan_layer_offload  # only when layers are placed

    top = spec.dims.num_layers + 1
    if budget_bytes is None:
        return GpuLayersDecision("cpu", 0, top, f"{why_no_cuda}: {model} runs every layer on the CPU")
    blocks, output, embd = layer_bytes(spec)
    kv_layer = kv_buffer_bytes(spec, settings.n_ctx) // max(spec.dims.num_layers, 1)
    b = buffers(spec, settings)
    p = plan_layer_offload(blocks, max(int(budget_bytes), 0), kv_bytes_per_layer=kv_layer, output_bytes=output,
                           input_bytes=embd, compute_reserve_bytes=b.compute + fixed_gpu_bytes)
    if p.full_offload:
        return GpuLayersDecision("gpu", top, top, f"{format_bytes(budget_bytes)} on the GPU hold all {top} layers "
                                 f"of {model} ({format_bytes(p.gpu_bytes)})", p.gpu_bytes, p.cpu_bytes)
    cpu_part = p.cpu_weight_bytes + p.cpu_kv_bytes - embd  # token_embd is on the CPU in every case
    if cpu_part > offload_cpu_bytes:
        need = p.cpu_weight_bytes + p.cpu_kv_bytes
        raise InfeasiblePlanError(
            f"{model}: {format_bytes(budget_bytes)} on the GPU hold {p.n_gpu_layers} of its {top} llama.cpp layers; "
            f"the other {format_bytes(cpu_part)} of weights and KV cache would run on the CPU, more than "
            f"offload.cpu_memory {format_bytes(offload_cpu_bytes)}: set offload.cpu_memory to at least "
            f"{format_bytes(need)}, give the model more GPU memory (replica_memory, or a GPU with more free), or "
            "lower max_model_len/max_num_seqs")
    mode = "offload" if p.n_gpu_layers else "cpu"
    return GpuLayersDecision(
        mode, p.n_gpu_layers, top,
        f"{format_bytes(budget_bytes)} on the GPU hold {p.n_gpu_layers} of the {top} layers of {model} "
        f"({format_bytes(p.gpu_bytes)}); the other {top - p.n_gpu_layers} run on the CPU "
        f"({format_bytes(p.cpu_weight_bytes + p.cpu_kv_bytes)} of weights and KV in RAM)", p.gpu_bytes, p.cpu_bytes)


def settings(est: ReplicaEstimate, target: DeploymentTarget) -> LlamaCppSettings:
    """The context of one deployment: every layer on the GPU, or, when the plan gives the replica less than the whole
    model (``replica_memory``), the largest ``n_gpu_layers`` that fits its share (the replica decides again from the
    GPU's free memory when it starts)."""
    st = est.engine_settings
    if est.device == "cuda" and target.planned_bytes < est.total:
        d = decide_gpu_layers(target.spec, st, model=target.model, budget_bytes=target.planned_bytes,
                              fixed_gpu_bytes=CUDA_CONTEXT_BYTES, offload_cpu_bytes=target.offload_cpu_bytes)
        st = replace(st, n_gpu_layers=d.n_gpu_layers)
    return st


def describe(est: ReplicaEstimate) -> str:
    """What a replica is given, in a few words (``gpuplan plan``'s engines section)."""
    st = est.engine_settings
    return (f"n_ctx {st.n_ctx} ({st.n_seq_max} x {st.n_ctx_seq}), n_ubatch {st.n_ubatch}, "
            f"n_gpu_layers {st.n_gpu_layers}")
