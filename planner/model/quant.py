"""Bytes per tensor per quantization scheme, as the loaders actually store them.

Every formula here is documented, with its source, in docs/memory-model.md ("Weights"). Summary:

| scheme | what is quantized | resident bytes per quantized weight of n = out x in elements |
|---|---|---|
| fp32/bf16/fp16 | nothing | n x 4/2/2 |
| int8 (bitsandbytes LLM.int8) | exact nn.Linear weights, not lm_head | n (int8) + 4 x out (fp32 row scale SCB) |
| nf4/fp4 (bitsandbytes 4-bit) | same | ceil(n/2) packed + 4 x ceil(n/64) absmax (fp32) |
| int4 (nf4 + double quant) | same | ceil(n/2) + ceil(n/64) (uint8 absmax) + 4 x ceil(ceil(n/64)/256) + 4 (offset) |
| gptq | Linear weights (and experts) | qweight b/8 x n + qzeros + fp16 scales per group + int32 g_idx x in |
| awq | Linear weights (and experts) | qweight b/8 x n + qzeros + fp16 scales per group |
| fp8 | Linear weights and experts | n + 4 x ceil(out/bo) x ceil(in/bi) (block) or 4 x out (channel) |
| mxfp4 | MoE experts | n/2 (blocks) + n/32 (one e8m0 scale per 32) |
| gguf | per tensor, from the file header | as stored |
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from planner.errors import InputError, ModelSpecError, QuantConflictError
from planner.model.spec import ModelSpec, TensorSpec

FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BNB_SCHEMES = ("int8", "nf4", "fp4", "int4")
SCHEMES = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4", "int4", "awq", "gptq", "fp8", "mxfp4", "gguf")
# NOTE: bitsandbytes' Linear4bit blocksize; transformers' BitsAndBytesConfig does not expose it, so it is 64
# (bitsandbytes nn/modules.py Params4bit: `if blocksize is None: blocksize = 64`).
BNB_BLOCKSIZE = 64
# NOTE: bitsandbytes double quantization nests absmax in blocks of 256 (functional.py quantize_4bit,
# `quantize_blockwise(_absmax - offset, blocksize=256)`).
BNB_NESTED_BLOCKSIZE = 256
# NOTE: per-module lookup tables: 4-bit code (16 x fp32 = 64 B), nested 8-bit dynamic map (256 x fp32 = 1024 B).
BNB_4BIT_CODE_BYTES = 64
BNB_NESTED_CODE_BYTES = 1024

_STORED_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8,
                 "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class QuantSpec:
    """A resolved quantization: what the loader will hold in memory."""

    scheme: str  # one of SCHEMES
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


def _bnb(scheme: str, skip=None) -> QuantSpec:
    if scheme == "int8":
        return QuantSpec("int8", bits=8, skip_modules=skip, label="int8 (bitsandbytes LLM.int8)")
    if scheme == "int4":
        return QuantSpec("int4", bits=4, double_quant=True, skip_modules=skip, label="int4 (nf4 + double quant)")
    return QuantSpec(scheme, bits=4, skip_modules=skip, label=f"{scheme} (bitsandbytes 4-bit)")


def _checkpoint_quant(qc: dict) -> QuantSpec:
    """QuantSpec of a pre-quantized checkpoint from its config.json ``quantization_config``."""
    method = str(qc.get("quant_method", "")).lower()
    skip = qc.get("modules_to_not_convert")
    skip = tuple(skip) if skip else None
    if method == "bitsandbytes":
        skip = tuple(qc["llm_int8_skip_modules"]) if qc.get("llm_int8_skip_modules") else None
        if qc.get("load_in_8bit"):
            return replace(_bnb("int8", skip), from_checkpoint=True)
        qt = qc.get("bnb_4bit_quant_type", "fp4")
        dq = bool(qc.get("bnb_4bit_use_double_quant", False))
        scheme = "int4" if (qt == "nf4" and dq) else qt
        return replace(_bnb(scheme, skip), double_quant=dq, from_checkpoint=True)
    if method in ("gptq", "awq"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        gs = qc.get("group_size", qc.get("q_group_size", 128))
        gs = None if gs in (None, -1, 0) else int(gs)
        return QuantSpec(method, bits=bits, group_size=gs, skip_modules=skip, desc_act=bool(qc.get("desc_act")),
                         from_checkpoint=True, label=f"{method} {bits}-bit, group {gs or 'none'} (checkpoint)")
    if method in ("fp8", "fbgemm_fp8", "compressed-tensors") and (method != "compressed-tensors" or "fp8" in str(qc)):
        blk = qc.get("weight_block_size")
        return QuantSpec("fp8", bits=8, fp8_block=tuple(blk) if blk else None, skip_modules=skip, from_checkpoint=True,
                         label=f"fp8 {'block ' + 'x'.join(map(str, blk)) if blk else 'per-channel'} (checkpoint)")
    if method == "mxfp4":
        return QuantSpec("mxfp4", bits=4, skip_modules=skip, from_checkpoint=True, label="mxfp4 (checkpoint)")
    raise ModelSpecError(
        f"quantization_config.quant_method {method!r} is not one gpuplan can size (known: bitsandbytes, gptq, awq, "
        "fp8, mxfp4); remove quantization_config to size the unquantized model"
    )


def resolve_quant(spec: ModelSpec, requested: str | None, *, bits: int | None = None, group_size: int | None = None,
                  fp8_block: tuple[int, int] | None = (128, 128)) -> QuantSpec:
    """The quantization to estimate: the checkpoint's own, or the requested one (a float dtype or a scheme).

    ``--quant awq|gptq|fp8`` on an unquantized config estimates the checkpoint you would get (4-bit, group 128 by
    default; fp8 with 128x128 blocks). A request that contradicts a pre-quantized checkpoint is an error.
    """
    if requested is not None:
        requested = requested.lower()
        if requested not in SCHEMES:
            raise InputError(f"unknown quantization {requested!r}; choose one of {', '.join(SCHEMES)}")
    qc = spec.checkpoint_quant
    if spec.source == "gguf":
        if requested not in (None, "gguf"):
            reason = f"{spec.name} is a GGUF file with per-tensor types fixed in the file"
            raise QuantConflictError(
                f"{reason}; --quant {requested} cannot apply: drop --quant, or convert the original checkpoint instead",
                model=spec.name, requested=requested, reason=reason, allowed=("gguf",),
                fix="(the file's own types), or point the source at the original checkpoint")
        return QuantSpec("gguf", bits=0, from_checkpoint=True, label="gguf (per-tensor types from the file)")
    if qc:
        ck = _checkpoint_quant(qc)
        if requested is None or requested == ck.scheme or (requested in BNB_SCHEMES and ck.scheme in BNB_SCHEMES
                                                           and requested == ck.scheme):
            return ck
        if requested in FLOAT_BYTES and ck.scheme in ("fp8", "mxfp4"):
            # transformers can dequantize fp8/mxfp4 checkpoints on load (dequantize=True); estimate that.
            return QuantSpec(requested, bits=FLOAT_BYTES[requested] * 8, label=f"{requested} (dequantized checkpoint)")
        reason = (f"{spec.name} is a pre-quantized {ck.scheme} checkpoint (quantization_config.quant_method="
                  f"{qc.get('quant_method')!r})")
        dequantized = ("bf16", "fp16", "fp32") if ck.scheme in ("fp8", "mxfp4") else ()
        raise QuantConflictError(
            f"{reason}; --quant {requested} contradicts it: drop --quant to estimate the checkpoint as it is, or "
            f"point at the unquantized model to estimate {requested}",
            model=spec.name, requested=requested, reason=reason, allowed=(ck.scheme,) + dequantized,
            fix="(the checkpoint as it is)" + (f" or {'/'.join(dequantized[:2])} (dequantized on load)" if dequantized
                                               else "") + ", or point the source at the unquantized model")
    if requested is None:
        return QuantSpec(spec.config_dtype or "bf16", bits=16, label=spec.config_dtype or "bf16")
    if requested in FLOAT_BYTES:
        return QuantSpec(requested, bits=FLOAT_BYTES[requested] * 8, label=requested)
    if requested in BNB_SCHEMES:
        return _bnb(requested)
    if requested in ("awq", "gptq"):
        b = bits or 4
        if b not in (2, 3, 4, 8):
            raise InputError(f"--bits {b} is not a {requested} width; use 2, 3, 4 or 8")
        gs = 128 if group_size is None else (None if group_size in (-1, 0) else group_size)
        return QuantSpec(requested, bits=b, group_size=gs,
                         label=f"{requested} {b}-bit, group {gs or 'none'} (estimated checkpoint)")
    if requested == "fp8":
        return QuantSpec("fp8", bits=8, fp8_block=fp8_block,
                         label=f"fp8 {'block ' + 'x'.join(map(str, fp8_block)) if fp8_block else 'per-channel'}")
    if requested == "mxfp4":
        return QuantSpec("mxfp4", bits=4, label="mxfp4 (experts only)")
    reason = f"gguf needs a .gguf file as the model source, got {spec.name!r}"
    raise QuantConflictError(f"--quant {reason}", model=spec.name, requested="gguf", reason=reason,
                             allowed=(spec.config_dtype or "bf16", "int8", "int4"),
                             fix="(or int8, int4), or point the source at a .gguf file")


# ------------------------------------------------------------------------------------------------ matching

def _matches(module: str, patterns) -> bool:
    """transformers' should_convert_module rule: a pattern matches at a module boundary from the start, as a
    suffix, or as a regex at a boundary (``model.layers.*.self_attn``)."""
    for p in patterns:
        if module == p or module.startswith(p + ".") or module.endswith("." + p):
            return True
        try:
            if re.match(p + r"(\.|$)", module):
                return True
        except re.error:
            continue
    return False


def is_quantized(t: TensorSpec, q: QuantSpec) -> bool:
    """Does scheme q replace tensor t by a quantized representation?"""
    if q.scheme in FLOAT_BYTES or q.scheme == "gguf":
        return False
    if t.role in ("lm_head", "embedding"):
        return False
    if q.skip_modules is not None:
        if _matches(t.module, q.skip_modules):
            return False
    elif t.module == "lm_head":
        # NOTE: transformers' get_keys_to_not_convert skips the output embedding module itself, tied weights and the
        # last parameter's module, not every module under an ``lm_head`` prefix (RoBERTa's lm_head.dense is converted)
        return False
    if q.scheme in BNB_SCHEMES:
        # bitsandbytes replaces exact nn.Linear only; transformers 5 MoE experts/routers are not nn.Linear.
        return t.role == "linear"
    if q.scheme == "mxfp4":
        return t.role == "experts"
    return t.role in ("linear", "experts")


# ------------------------------------------------------------------------------------------------ bytes

@dataclass(frozen=True)
class TensorBytes:
    data: int  # the weight itself (packed)
    state: int  # quantization state: scales, zeros, absmax, g_idx, lookup tables
    quantized: bool
    params: int  # logical parameters this tensor stands for


def _matrix(t: TensorSpec) -> tuple[int, int, int]:
    """(experts, out, in) of a 2-D linear or a 3-D experts tensor (transformers 5 layouts)."""
    if len(t.shape) == 3:
        e, a, b = t.shape
        # gpt-oss stores experts as [E, in, out]; others [E, out, in]. Sizes only depend on which is the input dim
        # for group-wise schemes; take the last dim as input (the [E, out, in] convention), documented approximation.
        return e, a, b
    if len(t.shape) == 2:
        return 1, t.shape[0], t.shape[1]
    return 1, t.numel, 1


def tensor_bytes(t: TensorSpec, q: QuantSpec, dtype: str) -> TensorBytes:
    """Resident bytes of one tensor when the model is loaded with quantization q and load dtype ``dtype``."""
    n = t.numel
    if t.role == "buffer" or not is_quantized(t, q):
        if t.stored_dtype and t.stored_dtype not in ("F32", "F16", "BF16", "F64") and t.role != "buffer":
            # integer/fp8 tensors of a checkpoint are kept as stored
            return TensorBytes(t.stored_bytes or n * _STORED_BYTES.get(t.stored_dtype, 1), 0, False, n)
        width = _STORED_BYTES[t.fixed_dtype] if t.fixed_dtype else FLOAT_BYTES[dtype]
        return TensorBytes(n * width, 0, False, 0 if t.role == "buffer" else n)
    e, out_f, in_f = _matrix(t)
    per = out_f * in_f
    s = q.scheme
    if s == "int8":
        # NOTE: bitsandbytes Int8Params: CB int8 [out, in] + SCB fp32 [out] (bitsandbytes _ops.py int8_vectorwise_quant)
        return TensorBytes(n, 4 * out_f * e, True, n)
    if s in ("nf4", "fp4", "int4"):
        blocks = math.ceil(per / BNB_BLOCKSIZE)
        data = (per + 1) // 2
        if q.double_quant:
            state = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4 + BNB_4BIT_CODE_BYTES + BNB_NESTED_CODE_BYTES
        else:
            state = 4 * blocks + BNB_4BIT_CODE_BYTES
        return TensorBytes(e * data, e * state, True, n)
    if s in ("gptq", "awq"):
        b = q.bits
        g = q.group_size or in_f
        groups = math.ceil(in_f / g)
        if s == "gptq":
            # NOTE: GPTQ QuantLinear buffers: qweight int32 [in*b/32, out], qzeros int32 [groups, out*b/32],
            # scales fp16 [groups, out], g_idx int32 [in]
            qweight = math.ceil(in_f * b / 32) * out_f * 4
            qzeros = groups * math.ceil(out_f * b / 32) * 4
            state = qzeros + groups * out_f * 2 + in_f * 4
        else:
            # NOTE: AWQ GEMM buffers: qweight int32 [in, out*b/32], qzeros int32 [in/g, out*b/32], scales fp16 [in/g, out]
            qweight = in_f * math.ceil(out_f * b / 32) * 4
            state = groups * math.ceil(out_f * b / 32) * 4 + groups * out_f * 2
        return TensorBytes(e * qweight, e * state, True, n)
    if s == "fp8":
        if q.fp8_block:
            bo, bi = q.fp8_block
            scales = math.ceil(out_f / bo) * math.ceil(in_f / bi) * 4  # weight_scale_inv fp32
        else:
            scales = out_f * 4
        return TensorBytes(n, e * scales, True, n)
    if s == "mxfp4":
        # NOTE: gpt-oss *_blocks U8 [.., n/32, 16] (two fp4 values a byte) + *_scales U8 [.., n/32] (e8m0)
        return TensorBytes(n // 2, math.ceil(n / 32), True, n)
    raise AssertionError(s)


def stored_checkpoint_bytes(spec: ModelSpec, dtype: str) -> tuple[int, int, int, int] | None:
    """For a pre-quantized checkpoint read from safetensors: (data, state, quantized params, other params), counting
    quantized modules' tensors as stored and float tensors of other modules at ``dtype``. None if not applicable."""
    if spec.source != "safetensors" or not spec.checkpoint_quant:
        return None
    qmods = set()
    for t in spec.tensors:
        leaf = t.name.rsplit(".", 1)[-1]
        if leaf in ("qweight", "weight_scale_inv", "weight_scale", "SCB") or leaf.endswith(("_blocks",)) or \
                ".weight.absmax" in t.name or t.name.endswith(".weight.quant_map"):
            qmods.add(t.name.split(".weight.")[0] if ".weight." in t.name else t.module)
    bits = int(spec.checkpoint_quant.get("bits", 4) or 4)
    data = state = qparams = oparams = 0
    for t in spec.tensors:
        mod = t.name.split(".weight.")[0] if ".weight." in t.name else t.module
        leaf = t.name.rsplit(".", 1)[-1]
        if mod in qmods and t.role != "buffer":
            stored = t.stored_bytes if t.stored_bytes is not None else t.numel * 2
            if leaf == "qweight":
                data += stored
                qparams += t.numel * 32 // bits
            elif leaf.endswith("_blocks"):
                data += stored
                qparams += t.numel * 2
            elif leaf == "weight" and t.stored_dtype in ("F8_E4M3", "F8_E5M2", "I8", "U8"):
                data += stored
                packed_4bit = t.stored_dtype == "U8" and not spec.checkpoint_quant.get("load_in_8bit")
                qparams += t.numel * (2 if packed_4bit else 1)  # bnb 4-bit packs two weights a byte
            elif leaf == "bias":
                data += stored
                oparams += t.numel
            else:
                state += stored
        else:
            tb = tensor_bytes(replace(t, role=t.role if t.role == "buffer" else "other"), QuantSpec(dtype), dtype)
            data += tb.data
            oparams += tb.params
    return data, state, qparams, oparams
