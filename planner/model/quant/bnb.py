"""bitsandbytes, quantized at load by transformers: LLM.int8 (int8), 4-bit NF4/FP4 (nf4, fp4), and NF4 with double
quantization (int4). Only exact nn.Linear weights are replaced, not lm_head.

| scheme | resident bytes per quantized weight of n = out x in elements |
|---|---|
| int8 | n (int8) + 4 x out (fp32 row scale SCB) |
| nf4/fp4 | ceil(n/2) packed + 4 x ceil(n/64) absmax (fp32) + the 4-bit code |
| int4 | ceil(n/2) + ceil(n/64) (uint8 absmax) + 4 x ceil(ceil(n/64)/256) + 4 (offset) + both codes |
"""

from __future__ import annotations

import math
from dataclasses import replace

from planner.model.quant.types import QuantSpec, TensorBytes

NAMES = ("int8", "nf4", "fp4", "int4")
ENGINES = ("transformers",)  # vLLM moved bitsandbytes out of its tree in 0.28
CHECKPOINT_METHODS = ("bitsandbytes",)
# NOTE: bitsandbytes' Linear4bit blocksize; transformers' BitsAndBytesConfig does not expose it, so it is 64
# (bitsandbytes nn/modules.py Params4bit: `if blocksize is None: blocksize = 64`).
BNB_BLOCKSIZE = 64
# NOTE: bitsandbytes double quantization nests absmax in blocks of 256 (functional.py quantize_4bit,
# `quantize_blockwise(_absmax - offset, blocksize=256)`).
BNB_NESTED_BLOCKSIZE = 256
# NOTE: per-module lookup tables: 4-bit code (16 x fp32 = 64 B), nested 8-bit dynamic map (256 x fp32 = 1024 B).
BNB_4BIT_CODE_BYTES = 64
BNB_NESTED_CODE_BYTES = 1024


def resolve(name: str, skip=None, **_) -> QuantSpec:
    if name == "int8":
        return QuantSpec("int8", bits=8, skip_modules=skip, label="int8 (bitsandbytes LLM.int8)")
    if name == "int4":
        return QuantSpec("int4", bits=4, double_quant=True, skip_modules=skip, label="int4 (nf4 + double quant)")
    return QuantSpec(name, bits=4, skip_modules=skip, label=f"{name} (bitsandbytes 4-bit)")


def from_checkpoint(method: str, qc: dict) -> QuantSpec:
    skip = tuple(qc["llm_int8_skip_modules"]) if qc.get("llm_int8_skip_modules") else None
    if qc.get("load_in_8bit"):
        return replace(resolve("int8", skip), from_checkpoint=True)
    qt = qc.get("bnb_4bit_quant_type", "fp4")
    dq = bool(qc.get("bnb_4bit_use_double_quant", False))
    scheme = "int4" if (qt == "nf4" and dq) else qt
    return replace(resolve(scheme, skip), double_quant=dq, from_checkpoint=True)


def quantizes(t, q: QuantSpec) -> bool:
    # bitsandbytes replaces exact nn.Linear only; transformers 5 MoE experts/routers are not nn.Linear.
    return t.role == "linear"


def tensor_bytes(t, q: QuantSpec, e: int, out_f: int, in_f: int) -> TensorBytes:
    n, per = t.numel, out_f * in_f
    if q.scheme == "int8":
        # NOTE: bitsandbytes Int8Params: CB int8 [out, in] + SCB fp32 [out] (bitsandbytes _ops.py int8_vectorwise_quant)
        return TensorBytes(n, 4 * out_f * e, True, n)
    blocks = math.ceil(per / BNB_BLOCKSIZE)
    data = (per + 1) // 2
    if q.double_quant:
        state = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4 + BNB_4BIT_CODE_BYTES + BNB_NESTED_CODE_BYTES
    else:
        state = 4 * blocks + BNB_4BIT_CODE_BYTES
    return TensorBytes(e * data, e * state, True, n)


def workspace_bytes(q: QuantSpec, quantized: list, *, tokens: int, hidden: int, act_bytes: int,
                    compute_dtype: str) -> int:
    """Scratch of one quantized matmul in a prefill of ``tokens`` (``quantized``: the tensors this scheme replaced)."""
    if q.scheme == "int8":
        # LLM.int8 on CUDA (bitsandbytes 0.50 int8_scaled_mm): int8 copy of the activation, int32 accumulator of the
        # widest layer, and int8_mm_dequant's fp16 output, which is cast to a bf16 copy while both are alive
        widest = max((t.shape[0] for t in quantized if len(t.shape) == 2), default=0)
        return tokens * hidden + tokens * widest * 4 + (tokens * widest * 2 if compute_dtype != "fp16" else 0)
    # 4-bit prefill dequantizes the whole weight to the compute dtype, then matmuls
    return max((t.numel for t in quantized if t.role == "linear"), default=0) * act_bytes
