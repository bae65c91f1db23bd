"""MXFP4 (gpt-oss): MoE experts as fp4 values two a byte, one e8m0 scale per 32; everything else as stored."""

from __future__ import annotations

import math

from planner.model.quant.types import QuantSpec, TensorBytes

NAMES = ("mxfp4",)
ENGINES = ("vllm", "transformers")  # engine: auto takes the first installed
CHECKPOINT_METHODS = ("mxfp4",)


def resolve(name: str, **_) -> QuantSpec:
    return QuantSpec("mxfp4", bits=4, label="mxfp4 (experts only)")


def from_checkpoint(method: str, qc: dict) -> QuantSpec:
    skip = qc.get("modules_to_not_convert")
    return QuantSpec("mxfp4", bits=4, skip_modules=tuple(skip) if skip else None, from_checkpoint=True,
                     label="mxfp4 (checkpoint)")


def quantizes(t, q: QuantSpec) -> bool:
    return t.role == "experts"


def tensor_bytes(t, q: QuantSpec, e: int, out_f: int, in_f: int) -> TensorBytes:
    # NOTE: gpt-oss *_blocks U8 [.., n/32, 16] (two fp4 values a byte) + *_scales U8 [.., n/32] (e8m0)
    n = t.numel
    return TensorBytes(n // 2, math.ceil(n / 32), True, n)
