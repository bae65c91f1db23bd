"""Load one replica's model the way the plan says: transformers + bitsandbytes (or a pre-quantized checkpoint's own
quantization_config), on one GPU, on one GPU with CPU offload, or on the CPU.

``bnb_config`` is the single source of the BitsAndBytesConfig each planner scheme maps to
  (benchmarks/common/calibration.py and benchmarks/gpu_validate.py use it), so what the planner sizes is what the
  replica loads."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings

import torch

from planner.model.quant import SCHEME_NAMES
from planner.model.quant import bnb as quant_bnb
from planner.model.quant import fp8 as quant_fp8
from planner.model.quant import gguf as quant_gguf
from planner.model.quant import gptq_awq as quant_gptq_awq
from planner.model.quant import mxfp4 as quant_mxfp4

FLOAT_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}
# the scheme registry's families (planner/model/quant/): bitsandbytes quantizes at load; the checkpoint families are
# quantized in the checkpoint (transformers reads its config); GGUF files are dequantized on load
BNB_SCHEMES = quant_bnb.NAMES
CHECKPOINT_SCHEMES = quant_gptq_awq.NAMES + quant_fp8.NAMES + quant_mxfp4.NAMES
GGUF = quant_gguf.NAMES[0]

# bitsandbytes' int8 matmul logs this at WARNING on *every* forward when its inputs are not fp16 (our bf16 compute,
# on CPU and on CUDA alike): logger "bitsandbytes.autograd._functions", message
# "MatMul8bitLt: inputs will be cast from %s to float16 during quantization". It is a logging record, not a
# warnings.warn, so it is filtered at that logger; every other record of that logger still gets through.
BNB_INT8_LOGGER = "bitsandbytes.autograd._functions"
_BNB_INT8_CAST_MSG = "MatMul8bitLt: inputs will be cast from"


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_BNB_INT8_CAST_MSG))


_INT8_FILTER = _DropInt8CastWarning()


def silence_bnb_int8_cast_warning() -> None:
    """Drop bitsandbytes' per-forward int8 cast warning (idempotent)."""
    lg = logging.getLogger(BNB_INT8_LOGGER)
    if _INT8_FILTER not in lg.filters:
        lg.addFilter(_INT8_FILTER)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return FLOAT_DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32") from None


def bnb_config(scheme: str, compute_dtype: torch.dtype | str = torch.bfloat16, *,
               cpu_offload: bool = False):
    """The BitsAndBytesConfig for a planner scheme; None for float dtypes and for pre-quantized checkpoints.

    int8 -> load_in_8bit; nf4 / fp4 -> load_in_4bit with that quant_type; int4 -> nf4 with double quantization.
    ``cpu_offload`` sets llm_int8_enable_fp32_cpu_offload (needed when a device_map puts some modules on the CPU
    next to a GPU; the offloaded modules then stay unquantized)."""
    from transformers import BitsAndBytesConfig

    scheme = scheme.lower()
    compute_dtype = torch_dtype(compute_dtype)
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if scheme in BNB_SCHEMES:  # the 4-bit ones
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if scheme == "fp4" else "nf4",
                                  bnb_4bit_use_double_quant=scheme == "int4", bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_enable_fp32_cpu_offload=cpu_offload)
    if scheme in FLOAT_DTYPES or scheme in CHECKPOINT_SCHEMES or scheme == GGUF:
        return None
    raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(SCHEME_NAMES)}")


def _checkpoint_quant_method(source: str) -> str | None:
    """quantization_config.quant_method of a local checkpoint, or None (no config.json / not quantized)."""
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            qc = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return None
    if not isinstance(qc, dict):
        return None
    return str(qc.get("quant_method") or ("bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit")
                                          else "unknown")).lower()


def _require_awq_extra(method: str) -> None:
    missing = [m for m in ("gptqmodel",) + (("optimum",) if method == "gptq" else ())
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"loading a pre-quantized {method} checkpoint needs {' and '.join(missing)}, which gpuplan ships as an "
            f"optional extra: pip install -e .[awq]" + (" (gptq also needs: pip install optimum)"
                                                        if "optimum" in missing else ""))


def _dequantize_config(source: str, method: str, scheme: str, trust_remote_code: bool):
    """The checkpoint's own fp8 / mxfp4 config with dequantize=True (transformers then loads float weights)."""
    if method not in ("fp8", "mxfp4"):
        raise ValueError(f"{source} is a pre-quantized {method} checkpoint; only fp8 and mxfp4 checkpoints can be "
                         f"dequantized to {scheme} on load: use quantization={method!r} (or the unquantized model)")
    from transformers import AutoConfig, FineGrainedFP8Config, Mxfp4Config

    qc = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).quantization_config
    qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
    cfg = (FineGrainedFP8Config if method == "fp8" else Mxfp4Config).from_dict(qc)
    cfg.dequantize = True
    return cfg


def _device_map(device: str, gpu_index: int, max_memory: dict | None):
    if device == "cpu":
        return {"": "cpu"}, None
    if device != "cuda":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not max_memory:
        return {"": gpu_index}, None
    return "auto", dict(max_memory)


def load_model(source: str, *, quantization: str, dtype: str = "bf16", device: str = "cpu", gpu_index: int = 0,
               max_memory: dict | None = None, trust_remote_code: bool = False):
    """Load ``source`` (a local model directory, or a .gguf file) for one replica; returns (model, tokenizer).

    ``quantization`` is the planner scheme: fp32/bf16/fp16 load the weights in that dtype; int8/nf4/fp4/int4 quantize
    with bitsandbytes on load (compute in ``dtype``); awq/gptq/fp8/mxfp4 are pre-quantized checkpoints whose own
    quantization_config transformers reads; gguf dequantizes a .gguf file to ``dtype``.
    ``device="cuda"`` without ``max_memory`` puts everything on ``gpu_index``; with ``max_memory``
    (``{0: bytes, "cpu": bytes}``) accelerate spreads the model and offloads what does not fit to the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scheme = quantization.lower()
    if scheme in FLOAT_DTYPES:
        load_dtype = torch_dtype(scheme)
    else:
        load_dtype = torch_dtype(dtype)
    device_map, mm = _device_map(device, gpu_index, max_memory)
    offload = mm is not None and any(str(k) in ("cpu", "disk") for k in mm)

    model_kw: dict = dict(dtype=load_dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    tok_kw: dict = dict(trust_remote_code=trust_remote_code)
    if mm is not None:
        model_kw["max_memory"] = mm
    path = source
    if scheme == GGUF or source.lower().endswith(".gguf"):
        if not source.lower().endswith(".gguf") or not os.path.isfile(source):
            raise ValueError(f"quantization gguf needs the path of a .gguf file, got {source!r}")
        path = os.path.dirname(os.path.abspath(source))
        model_kw["gguf_file"] = tok_kw["gguf_file"] = os.path.basename(source)
    else:
        method = _checkpoint_quant_method(source)
        if scheme in CHECKPOINT_SCHEMES:
            if method is None:
                raise ValueError(f"quantization {scheme!r} needs a pre-quantized checkpoint, but {source} has no "
                                 "quantization_config in its config.json")
        if scheme in FLOAT_DTYPES and method is not None:
            # planner: a float dtype asked of an fp8 / mxfp4 checkpoint = dequantize it on load
            model_kw["quantization_config"] = _dequantize_config(source, method, scheme, trust_remote_code)
        if method in ("awq", "gptq"):
            _require_awq_extra(method)
        if scheme in BNB_SCHEMES:
            if method is None:
                model_kw["quantization_config"] = bnb_config(scheme, load_dtype, cpu_offload=offload)
            elif method != "bitsandbytes":
                raise ValueError(f"{source} is a pre-quantized {method} checkpoint; it cannot be re-quantized "
                                 f"to {scheme} with bitsandbytes")
            elif offload:  # pre-quantized bitsandbytes checkpoint: keep its config, allow the CPU part
                from transformers import AutoConfig

                qc = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).quantization_config
                qc = dict(qc) if isinstance(qc, dict) else qc.to_dict()
                qc["llm_int8_enable_fp32_cpu_offload"] = True
                from transformers import BitsAndBytesConfig

                model_kw["quantization_config"] = BitsAndBytesConfig.from_dict(qc)

    silence_bnb_int8_cast_warning()
    model = AutoModelForCausalLM.from_pretrained(path, **model_kw)
    model.eval()
    model.config.use_cache = True
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        gen_cfg.use_cache = True

    tokenizer = AutoTokenizer.from_pretrained(path, **tok_kw)
    fix_tokenizer(tokenizer, model)
    return model, tokenizer


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The Hugging Face tokenizer of ``source``: a model directory, or a .gguf file (its folder's tokenizer.json when
    there is one, as published GGUF repositories beside their original; else the vocabulary inside the file, which
    transformers converts)."""
    from transformers import AutoTokenizer

    if source.lower().endswith(".gguf"):
        folder = os.path.dirname(os.path.abspath(source))
        if os.path.exists(os.path.join(folder, "tokenizer.json")):
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(source),
                                             trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def fix_tokenizer(tokenizer, model=None):
    """Left padding, and a pad token (the EOS token) when the tokenizer has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif model is not None and getattr(model.config, "eos_token_id", None) is not None:
            eos = model.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(eos))
    tokenizer.padding_side = "left"
    return tokenizer
