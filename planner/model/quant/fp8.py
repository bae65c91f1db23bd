"""FP8 weights (e4m3), one byte each, with fp32 scales per block (DeepSeek-style 128 x 128) or per output channel.
Linear weights and experts. vLLM quantizes a float checkpoint to fp8 at load; transformers reads fp8 checkpoints."""

from __future__ import annotations

import math

from planner.model.quant.types import QuantSpec, TensorBytes

NAMES = ("fp8",)
ENGINES = ("vllm", "transformers")  # engine: auto takes the first installed
CHECKPOINT_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")


def resolve(name: str, *, fp8_block: tuple[int, int] | None = (128, 128), **_) -> QuantSpec:
    return QuantSpec("fp8", bits=8, fp8_block=fp8_block,
                     label=f"fp8 {'block ' + 'x'.join(map(str, fp8_block)) if fp8_block else 'per-channel'}")


def from_checkpoint(method: str, qc: dict) -> QuantSpec | None:
    if method == "compressed-tensors" and "fp8" not in str(qc):
        return None  # compressed-tensors of another format
    skip = qc.get("modules_to_not_convert")
    skip = tuple(skip) if skip else None
    blk = qc.get("weight_block_size")
    return QuantSpec("fp8", bits=8, fp8_block=tuple(blk) if blk else None, skip_modules=skip, from_checkpoint=True,
                     label=f"fp8 {'block ' + 'x'.join(map(str, blk)) if blk else 'per-channel'} (checkpoint)")


def quantizes(t, q: QuantSpec) -> bool:
    return t.role in ("linear", "experts")


def tensor_bytes(t, q: QuantSpec, e: int, out_f: int, in_f: int) -> TensorBytes:
    if q.fp8_block:
        bo, bi = q.fp8_block
        scales = math.ceil(out_f / bo) * math.ceil(in_f / bi) * 4  # weight_scale_inv fp32
    else:
        scales = out_f * 4
    return TensorBytes(t.numel, e * scales, True, t.numel)
