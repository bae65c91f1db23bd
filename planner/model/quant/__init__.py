"""Quantization schemes as units: one registry (this file), one module per family of schemes.

Each family module (float.py, bnb.py, gptq_awq.py, fp8.py, mxfp4.py, gguf.py) owns:

- ``NAMES``: its schemes' names in deploy files, ``--quant`` and plans;
- ``ENGINES``: the engines that run them (planner/model/engines/), in the order ``engine: auto`` prefers them
  (it takes the first one installed; transformers runs every scheme, so one always is);
- ``CHECKPOINT_METHODS``: the ``quantization_config.quant_method`` values of checkpoints quantized that way;
- ``resolve(name, bits=, group_size=, fp8_block=)`` and ``from_checkpoint(method, qc)`` -> QuantSpec;
- ``quantizes(tensor, q)``: which tensors it replaces (after the rules every scheme shares: embeddings, lm_head
  and the skipped modules stay unquantized), and ``tensor_bytes(tensor, q, experts, out, in)``: their resident
  bytes, as the loaders store them.

Every formula is documented, with its source, in docs/memory-model.md ("Weights"), and in its family's module.
The deploy file's schema (planner/config.py), the loader (serve/engines/transformers_load.py) and the engines take
the names from ``SCHEMES`` here; adding a scheme is a family module (or a name in one) and a line in ``FAMILIES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from planner.errors import InputError, ModelSpecError, QuantConflictError
from planner.model.quant import bnb, float as float_, fp8, gguf, gptq_awq, mxfp4
from planner.model.quant.types import FLOAT_BYTES, STORED_BYTES, QuantSpec, TensorBytes, matrix
from planner.model.spec import ModelSpec, TensorSpec

FAMILIES = (float_, bnb, gptq_awq, fp8, mxfp4, gguf)


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: its name, the family module that sizes it, the engines that run it."""

    name: str
    family: object  # the module (float_, bnb, ...)
    engines: tuple[str, ...]


# the registry, in the order schemes are listed in messages and help
SCHEMES: dict[str, Scheme] = {n: Scheme(n, f, f.ENGINES) for f in FAMILIES for n in f.NAMES}
SCHEME_NAMES = tuple(SCHEMES)
BNB_SCHEMES = bnb.NAMES
_BY_METHOD = {m: f for f in FAMILIES for m in f.CHECKPOINT_METHODS}


def scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise InputError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEME_NAMES)}") from None


def schemes_run_by(engine: str) -> frozenset[str]:
    """The schemes engine ``engine`` runs."""
    return frozenset(n for n, s in SCHEMES.items() if engine in s.engines)


def _checkpoint_quant(qc: dict) -> QuantSpec:
    """QuantSpec of a pre-quantized checkpoint from its config.json ``quantization_config``."""
    method = str(qc.get("quant_method", "")).lower()
    family = _BY_METHOD.get(method)
    q = family.from_checkpoint(method, qc) if family is not None else None
    if q is None:
        raise ModelSpecError(
            f"quantization_config.quant_method {method!r} is not one gpuplan can size (known: bitsandbytes, gptq, "
            "awq, fp8, mxfp4); remove quantization_config to size the unquantized model"
        )
    return q


def resolve_quant(spec: ModelSpec, requested: str | None, *, bits: int | None = None, group_size: int | None = None,
                  fp8_block: tuple[int, int] | None = (128, 128)) -> QuantSpec:
    """The quantization to estimate: the checkpoint's own, or the requested one (a float dtype or a scheme).

    ``--quant awq|gptq|fp8`` on an unquantized config estimates the checkpoint you would get (4-bit, group 128 by
    default; fp8 with 128x128 blocks). A request that contradicts a pre-quantized checkpoint is an error.
    """
    if requested is not None:
        requested = requested.lower()
        scheme(requested)  # an unknown name says which are known
    qc = spec.checkpoint_quant
    if spec.source == "gguf":
        if requested not in (None, "gguf"):
            reason = f"{spec.name} is a GGUF file with per-tensor types fixed in the file"
            raise QuantConflictError(
                f"{reason}; --quant {requested} cannot apply: drop --quant, or convert the original checkpoint instead",
                model=spec.name, requested=requested, reason=reason, allowed=("gguf",),
                fix="(the file's own types), or point the source at the original checkpoint")
        return gguf.resolve("gguf")
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
    if requested != "gguf":
        return SCHEMES[requested].family.resolve(requested, bits=bits, group_size=group_size, fp8_block=fp8_block)
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
    family = SCHEMES[q.scheme].family
    if family in (float_, gguf):
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
    return family.quantizes(t, q)


# ------------------------------------------------------------------------------------------------ bytes

def tensor_bytes(t: TensorSpec, q: QuantSpec, dtype: str) -> TensorBytes:
    """Resident bytes of one tensor when the model is loaded with quantization q and load dtype ``dtype``."""
    n = t.numel
    if t.role == "buffer" or not is_quantized(t, q):
        if t.stored_dtype and t.stored_dtype not in ("F32", "F16", "BF16", "F64") and t.role != "buffer":
            # integer/fp8 tensors of a checkpoint are kept as stored
            return TensorBytes(t.stored_bytes or n * STORED_BYTES.get(t.stored_dtype, 1), 0, False, n)
        width = STORED_BYTES[t.fixed_dtype] if t.fixed_dtype else FLOAT_BYTES[dtype]
        return TensorBytes(n * width, 0, False, 0 if t.role == "buffer" else n)
    e, out_f, in_f = matrix(t)
    return SCHEMES[q.scheme].family.tensor_bytes(t, q, e, out_f, in_f)


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
