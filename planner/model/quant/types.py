"""The values every scheme family shares: a resolved quantization (QuantSpec), one tensor's resident bytes
(TensorBytes), the float widths, and the (experts, out, in) view of a weight."""

from __future__ import annotations

from dataclasses import dataclass

from planner.model.spec import TensorSpec

FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
STORED_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8,
                "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class QuantSpec:
    """A resolved quantization: what the loader will hold in memory."""

    scheme: str  # a name of the registry (planner.model.quant.SCHEMES)
    bits: int = 16
    group_size: int | None = None  # awq/gptq; None = whole input dim
    fp8_block: tuple[int, int] | None = None  # fp8 block (out, in); None = per output channel
    double_quant: bool = False  # bnb 4-bit
    skip_modules: tuple[str, ...] | None = None  # None = the loader's defaults (lm_head)
    desc_act: bool = False
    from_checkpoint: bool = False  # a pre-quantized checkpoint, estimated from its own quantization_config
    label: str = ""  # what to call it in tables ("int4 (nf4 + double quant)")

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "bits": self.bits, "group_size": self.group_size,
                "fp8_block": list(self.fp8_block) if self.fp8_block else None, "double_quant": self.double_quant,
                "skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
                "from_checkpoint": self.from_checkpoint}


@dataclass(frozen=True)
class TensorBytes:
    data: int  # the weight itself (packed)
    state: int  # quantization state: scales, zeros, absmax, g_idx, lookup tables
    quantized: bool
    params: int  # logical parameters this tensor stands for


def matrix(t: TensorSpec) -> tuple[int, int, int]:
    """(experts, out, in) of a 2-D linear or a 3-D experts tensor (transformers 5 layouts)."""
    if len(t.shape) == 3:
        e, a, b = t.shape
        # gpt-oss stores experts as [E, in, out]; others [E, out, in]. Sizes only depend on which is the input dim
        # for group-wise schemes; take the last dim as input (the [E, out, in] convention), documented approximation.
        return e, a, b
    if len(t.shape) == 2:
        return 1, t.shape[0], t.shape[1]
    return 1, t.numel, 1
