"""GPTQ and AWQ checkpoints: b-bit integer weights packed in int32, with zeros and fp16 scales per group of the input
dimension (GPTQ also an int32 g_idx per input column). Linear weights and experts.

| scheme | resident bytes per quantized weight of out x in |
|---|---|
| gptq | qweight ceil(in x b/32) x out x 4 + qzeros + fp16 scales per group + int32 g_idx x in |
| awq | qweight in x ceil(out x b/32) x 4 + qzeros + fp16 scales per group |
"""

from __future__ import annotations

import math

from planner.errors import InputError
from planner.model.quant.types import QuantSpec, TensorBytes

NAMES = ("awq", "gptq")
ENGINES = ("vllm", "transformers")  # engine: auto takes the first installed
CHECKPOINT_METHODS = ("gptq", "awq")


def resolve(name: str, *, bits: int | None = None, group_size: int | None = None, **_) -> QuantSpec:
    """The checkpoint you would get (4-bit, group 128 by default)."""
    b = bits or 4
    if b not in (2, 3, 4, 8):
        raise InputError(f"--bits {b} is not a {name} width; use 2, 3, 4 or 8")
    gs = 128 if group_size is None else (None if group_size in (-1, 0) else group_size)
    return QuantSpec(name, bits=b, group_size=gs, label=f"{name} {b}-bit, group {gs or 'none'} (estimated checkpoint)")


def from_checkpoint(method: str, qc: dict) -> QuantSpec:
    skip = qc.get("modules_to_not_convert")
    skip = tuple(skip) if skip else None
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    gs = qc.get("group_size", qc.get("q_group_size", 128))
    gs = None if gs in (None, -1, 0) else int(gs)
    return QuantSpec(method, bits=bits, group_size=gs, skip_modules=skip, desc_act=bool(qc.get("desc_act")),
                     from_checkpoint=True, label=f"{method} {bits}-bit, group {gs or 'none'} (checkpoint)")


def quantizes(t, q: QuantSpec) -> bool:
    return t.role in ("linear", "experts")


def tensor_bytes(t, q: QuantSpec, e: int, out_f: int, in_f: int) -> TensorBytes:
    b = q.bits
    g = q.group_size or in_f
    groups = math.ceil(in_f / g)
    if q.scheme == "gptq":
        # NOTE: GPTQ QuantLinear buffers: qweight int32 [in*b/32, out], qzeros int32 [groups, out*b/32],
        # scales fp16 [groups, out], g_idx int32 [in]
        qweight = math.ceil(in_f * b / 32) * out_f * 4
        qzeros = groups * math.ceil(out_f * b / 32) * 4
        state = qzeros + groups * out_f * 2 + in_f * 4
    else:
        # NOTE: AWQ GEMM buffers: qweight int32 [in, out*b/32], qzeros int32 [in/g, out*b/32], scales fp16 [in/g, out]
        qweight = in_f * math.ceil(out_f * b / 32) * 4
        state = groups * math.ceil(out_f * b / 32) * 4 + groups * out_f * 2
    return TensorBytes(e * qweight, e * state, True, t.numel)


def workspace_bytes(q: QuantSpec, quantized: list, *, tokens: int, hidden: int, act_bytes: int,
                    compute_dtype: str) -> int:
    """GPTQ (ExLlama kernels) keeps an fp16 scratch buffer for dequantizing the largest weight; AWQ's GEMM none."""
    if q.scheme != "gptq":
        return 0
    return max((t.numel for t in quantized if t.role == "linear"), default=0) * 2
