"""llama.cpp partial offload: how many layers of a GGUF model fit in a VRAM budget (``--n-gpu-layers``).

llama.cpp counts ``block_count + 1`` layers: the repeating blocks ``blk.0 .. blk.{n-1}`` and the *output layer*
(``output_norm`` + ``output``, the LM head). The input layer (``token_embd``) always stays on the CPU. Placement,
from ``llama_model::load_tensors`` in ``src/llama-model.cpp``::

    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)      # layer il is on the GPU iff il >= i_gpu_start
    dev_output  = get_layer_buft_list(n_layer)            # the output layer is slot n_layer

so since llama.cpp PR #18148 ("llama: offload output layer to GPU first", Dec 2025) ``-ngl k`` puts the output layer
on the GPU for any ``k >= 1`` plus the last ``k - 1`` blocks (``order="output_first"``, the default here). Before it,
``i_gpu_start = max(n_layer - n_gpu_layers, 0)``: the last ``k`` blocks, and the output layer only when
``k >= n_layer + 1`` (``order="output_last"``). In both, ``-ngl n_layer+1`` offloads everything, and llama.cpp logs
``offloaded k/(n_layer+1) layers to GPU``.

The KV cache of a block lives on that block's device (llama.cpp's default ``--kv-offload``); the compute buffer
is a fixed reserve on the GPU. Everything here is arithmetic over ints: no file or device is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from planner.errors import InputError, ModelSpecError
from planner.model.formats.gguf import GgufFile, GgufSummary, ggml_type_nbytes, summarize_gguf
from planner.units import MiB, format_bytes

# NOTE: reserve for llama.cpp's GPU compute buffer (the "CUDA0 compute buffer size = ... MiB" log line). It is the
# scratch memory of one forward pass of n_ubatch = 512 tokens and depends on n_ubatch, n_ctx, n_head, n_vocab and
# flash attention. Logs in llama.cpp's tracker for 7-14B models at n_ctx <= 8192 show about 100-700 MiB (105 MiB at
# n_ctx 512 in llamafile PR #552; 672 MiB at n_ctx 4096 with pipeline parallelism in llama.cpp PR #6122). Without
# flash attention the KQ scores alone are n_ctx * n_ubatch * n_head * 4 bytes (512 MiB for 32 heads at n_ctx 8192),
# so pass a measured value for long contexts. The CUDA context itself (a few hundred MiB) is not in this reserve.
DEFAULT_COMPUTE_RESERVE_BYTES = 512 * MiB
ORDERS = ("output_first", "output_last")


@dataclass(frozen=True)
class GgufOffloadPlan:
    """Where llama.cpp's layers go for one VRAM budget; all sizes in bytes.

    ``gpu_bytes = gpu_weight_bytes + gpu_kv_bytes + compute_reserve_bytes``; ``cpu_bytes = cpu_weight_bytes +
    cpu_kv_bytes`` (the CPU weights are mmap'd file pages unless ``--no-mmap``). ``gpu_blocks`` is the half-open
    range of ``blk.N`` indices on the GPU. ``rule_of_thumb_n_gpu_layers`` is ``floor(VRAM / file_size *
    (block_count - 4))`` clamped to ``0..block_count+1``, shown for comparison only.
    """

    n_gpu_layers: int
    max_n_gpu_layers: int  # block_count + 1: everything offloaded
    block_count: int
    full_offload: bool
    output_on_gpu: bool
    gpu_blocks: tuple[int, int]  # (first, stop) block indices on the GPU; (n, n) when none
    fits: bool  # gpu_bytes <= vram_bytes (False only when even n_gpu_layers=0 exceeds it)
    vram_bytes: int
    gpu_bytes: int
    cpu_bytes: int
    gpu_weight_bytes: int
    gpu_kv_bytes: int
    cpu_weight_bytes: int
    cpu_kv_bytes: int
    compute_reserve_bytes: int
    kv_bytes_per_layer: tuple[int, ...]
    n_ctx: int | None
    order: str
    file_size: int | None
    rule_of_thumb_n_gpu_layers: int | None
    llama_cpp_args: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """A few lines for people: the flag to pass, and where the bytes go."""
        on_gpu = self.gpu_blocks[1] - self.gpu_blocks[0]
        if self.full_offload:
            what = "all layers"
        elif self.output_on_gpu:
            what = f"output layer + {on_gpu} of {self.block_count} blocks"
        else:
            what = f"{on_gpu} of {self.block_count} blocks"
        ctx = f", context {self.n_ctx}" if self.n_ctx is not None else ""
        gpu = (
            f"  GPU {format_bytes(self.gpu_bytes)} of {format_bytes(self.vram_bytes)}: weights "
            f"{format_bytes(self.gpu_weight_bytes)} + KV {format_bytes(self.gpu_kv_bytes)} + compute reserve "
            f"{format_bytes(self.compute_reserve_bytes)}"
        )
        cpu = (
            f"  CPU {format_bytes(self.cpu_bytes)}: weights {format_bytes(self.cpu_weight_bytes)} + KV "
            f"{format_bytes(self.cpu_kv_bytes)}"
        )
        lines = [f"--n-gpu-layers {self.n_gpu_layers} (of {self.max_n_gpu_layers}): {what} on the GPU{ctx}", gpu, cpu]
        if self.rule_of_thumb_n_gpu_layers is not None:
            lines.append(
                f"  rule of thumb floor(VRAM / file size x (blocks - 4)) would say {self.rule_of_thumb_n_gpu_layers}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        out["human"] = {
            "vram": format_bytes(self.vram_bytes),
            "gpu": format_bytes(self.gpu_bytes),
            "cpu": format_bytes(self.cpu_bytes),
            "kv_total": format_bytes(sum(self.kv_bytes_per_layer)),
        }
        return out


def _check_int(value: object, field: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field} must be an int, got {value!r}; pass a whole number")
    if value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {value}; pass a value of at least {minimum}")
    return value


def _per_block(value: int | tuple[int, ...] | None, n: int, key: str, path: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ModelSpecError(
            f"{key} in {path} has {len(value)} entries for {n} blocks; the file is inconsistent, re-convert it"
        )
    return tuple(value)


def kv_cache_bytes_per_layer(
    model: GgufFile | GgufSummary, n_ctx: int, *, cache_type_k: str = "F16", cache_type_v: str = "F16"
) -> tuple[int, ...]:
    """KV cache bytes of each block for ``n_ctx`` tokens, as llama.cpp allocates it (one sequence, no SWA/MLA).

    Per block: ``n_ctx * n_head_kv * (key_length + value_length)`` elements, f16 by default (``--cache-type-k/-v``);
    with ``key_length = value_length = head_dim = embedding_length / head_count`` this is the usual
    ``2 * n_ctx * n_head_kv * head_dim * 2`` bytes. A block with 0 KV heads (recurrent/hybrid) holds none.
    """
    s = model if isinstance(model, GgufSummary) else summarize_gguf(model)
    _check_int(n_ctx, "n_ctx", minimum=1)
    arch = s.architecture or "<arch>"
    missing = [
        f"{arch}.{k}" for k, v in (("block_count", s.block_count), ("attention.head_count", s.head_count)) if v is None
    ]
    if (s.key_length is None or s.value_length is None) and s.embedding_length is None:
        missing.append(f"{arch}.embedding_length")
    if missing:
        raise ModelSpecError(
            f"{s.path} lacks {', '.join(missing)}, needed for the KV cache size; pass kv_bytes_per_layer to "
            f"plan_layer_offload instead"
        )
    n = s.block_count or 0
    heads = _per_block(s.head_count, n, f"{arch}.attention.head_count", s.path) or ()
    kv_heads = _per_block(s.head_count_kv, n, f"{arch}.attention.head_count_kv", s.path) or heads
    out = []
    for i in range(n):
        if kv_heads[i] == 0 or heads[i] == 0:
            out.append(0)
            continue
        dims = []
        for explicit, what in ((s.key_length, "key_length"), (s.value_length, "value_length")):
            if explicit is not None:
                dims.append(explicit)
                continue
            emb = s.embedding_length or 0
            if emb % heads[i]:
                raise ModelSpecError(
                    f"{s.path}: embedding_length {emb} is not divisible by head_count {heads[i]} (block {i}) and "
                    f"{arch}.attention.{what} is absent; pass kv_bytes_per_layer to plan_layer_offload instead"
                )
            dims.append(emb // heads[i])
        k_row, v_row = kv_heads[i] * dims[0], kv_heads[i] * dims[1]
        out.append(
            ggml_type_nbytes(cache_type_k, n_ctx * k_row, row_length=k_row)
            + ggml_type_nbytes(cache_type_v, n_ctx * v_row, row_length=v_row)
        )
    return tuple(out)


def _placement(k: int, n: int, order: str) -> tuple[int, bool]:
    """For ``-ngl k`` on ``n`` blocks: (index of the first block on the GPU, output layer on the GPU)."""
    if order == "output_first":
        return max(n + 1 - k, 0), k >= 1
    return max(n - k, 0), k >= n + 1


def plan_layer_offload(
    layer_bytes: Sequence[int],
    vram_bytes: int,
    *,
    kv_bytes_per_layer: Sequence[int] | int = 0,
    output_bytes: int = 0,
    input_bytes: int = 0,
    compute_reserve_bytes: int = DEFAULT_COMPUTE_RESERVE_BYTES,
    order: str = "output_first",
    file_size: int | None = None,
    n_ctx: int | None = None,
    notes: Sequence[str] = (),
) -> GgufOffloadPlan:
    """Largest ``--n-gpu-layers`` whose GPU share (offloaded blocks + their KV + output layer + reserve) fits
    ``vram_bytes``, from per-block weight bytes; ``kv_bytes_per_layer`` is one int for every block or one per block.
    """
    if order not in ORDERS:
        raise InputError(
            f"order must be one of {', '.join(ORDERS)}, got {order!r}; use output_first for llama.cpp "
            f"after Dec 2025 (PR #18148), output_last before"
        )
    _check_int(vram_bytes, "vram_bytes")
    _check_int(output_bytes, "output_bytes")
    _check_int(input_bytes, "input_bytes")
    _check_int(compute_reserve_bytes, "compute_reserve_bytes")
    layers = tuple(_check_int(b, f"layer_bytes[{i}]") for i, b in enumerate(layer_bytes))
    n = len(layers)
    if isinstance(kv_bytes_per_layer, int):  # a bool is rejected by _check_int
        kv = (_check_int(kv_bytes_per_layer, "kv_bytes_per_layer"),) * n
    else:
        kv = tuple(_check_int(b, f"kv_bytes_per_layer[{i}]") for i, b in enumerate(kv_bytes_per_layer))
        if len(kv) != n:
            raise InputError(
                f"kv_bytes_per_layer has {len(kv)} entries for {n} layers; pass one per layer or a single int"
            )
    if file_size is not None:
        _check_int(file_size, "file_size")

    def gpu_share(k: int) -> tuple[int, int, int, bool]:
        first, out_on = _placement(k, n, order)
        w = sum(layers[first:]) + (output_bytes if out_on else 0)
        c = sum(kv[first:])
        return w, c, first, out_on

    best = 0
    for k in range(1, n + 2):
        w, c, _, _ = gpu_share(k)
        if w + c + compute_reserve_bytes > vram_bytes:
            break
        best = k
    gw, gkv, first, out_on = gpu_share(best)
    cw = sum(layers[:first]) + (0 if out_on else output_bytes) + input_bytes
    ckv = sum(kv[:first])
    gpu_bytes = gw + gkv + compute_reserve_bytes

    rule = None
    if file_size:
        rule = min(max(vram_bytes * (n - 4) // file_size, 0), n + 1)

    all_notes = list(notes)
    if gpu_bytes > vram_bytes:
        all_notes.append(
            f"the compute reserve {format_bytes(compute_reserve_bytes)} alone exceeds the VRAM budget "
            f"{format_bytes(vram_bytes)}; run on the CPU (-ngl 0 with a CPU-only build or --device none)"
        )
    args = [f"--n-gpu-layers {best}"]
    if n_ctx is not None:
        args.append(f"--ctx-size {n_ctx}")
    return GgufOffloadPlan(
        n_gpu_layers=best,
        max_n_gpu_layers=n + 1,
        block_count=n,
        full_offload=best == n + 1,
        output_on_gpu=out_on,
        gpu_blocks=(first, n),
        fits=gpu_bytes <= vram_bytes,
        vram_bytes=vram_bytes,
        gpu_bytes=gpu_bytes,
        cpu_bytes=cw + ckv,
        gpu_weight_bytes=gw,
        gpu_kv_bytes=gkv,
        cpu_weight_bytes=cw,
        cpu_kv_bytes=ckv,
        compute_reserve_bytes=compute_reserve_bytes,
        kv_bytes_per_layer=kv,
        n_ctx=n_ctx,
        order=order,
        file_size=file_size,
        rule_of_thumb_n_gpu_layers=rule,
        llama_cpp_args=tuple(args),
        notes=tuple(all_notes),
    )


def plan_gguf_offload(
    model: GgufFile | GgufSummary,
    vram_bytes: int,
    *,
    n_ctx: int,
    compute_reserve_bytes: int = DEFAULT_COMPUTE_RESERVE_BYTES,
    cache_type_k: str = "F16",
    cache_type_v: str = "F16",
    order: str = "output_first",
) -> GgufOffloadPlan:
    """``--n-gpu-layers`` for a GGUF model (a ``GgufFile`` or its ``GgufSummary``) at context ``n_ctx`` in
    ``vram_bytes`` of VRAM, with the KV cache from the file's metadata and a fixed compute-buffer reserve."""
    _check_int(vram_bytes, "vram_bytes")
    s = model if isinstance(model, GgufSummary) else summarize_gguf(model)
    kv = kv_cache_bytes_per_layer(s, n_ctx, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    notes = []
    n = max(len(kv), len(s.layer_bytes))
    layers = s.layer_bytes + (0,) * (n - len(s.layer_bytes))
    if len(kv) < n:
        notes.append(
            f"tensors name {n} blocks but block_count is {len(kv)}; blocks {len(kv)}..{n - 1} are counted "
            f"without a KV cache"
        )
        kv = kv + (0,) * (n - len(kv))
    if s.tied_output:
        notes.append(
            "no output.weight (tied embeddings): llama.cpp loads token_embd a second time for the output layer, "
            "so it is counted on the CPU (input) and, when offloaded, on the GPU (output)"
        )
    return plan_layer_offload(
        layers,
        vram_bytes,
        kv_bytes_per_layer=kv,
        output_bytes=s.output_bytes,
        input_bytes=s.input_bytes,
        compute_reserve_bytes=compute_reserve_bytes,
        order=order,
        file_size=s.file_size,
        n_ctx=n_ctx,
        notes=notes,
    )


# The name planner/cli/__init__.py calls (``gpuplan gguf-layers``).
plan_gpu_layers = plan_gguf_offload
