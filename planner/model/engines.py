"""Which engine runs a model, and the settings the plan gives it (pure: no engine is imported here).

- ``pick_engine``: ``engine: auto | transformers | vllm | llamacpp`` of a deploy.yaml entry and a quantization ->
  the engine, with the reason. ``auto`` takes llama.cpp for GGUF files, vLLM where it is installed (the caller says
  which engines are) and runs the scheme, transformers otherwise. vLLM moved bitsandbytes out of its tree in 0.28,
  so int8/nf4/fp4/int4 stay on transformers. GGUF forced onto transformers is planned at its dequantized size.
- ``vllm_settings``: the engine arguments that make a vLLM replica hold what the plan gave it and no more:
  ``kv_cache_memory_bytes`` = the planned KV cache (vLLM then skips its own KV sizing), ``gpu_memory_utilization``
  = the replica's planned bytes over the device's *total* bytes (vLLM refuses to start unless that share of the
  device is free), ``max_num_seqs``, ``max_model_len`` and ``max_num_batched_tokens`` as planned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from planner.errors import InputError

ENGINES = ("transformers", "vllm", "llamacpp")
# what vLLM (0.28+) runs of our schemes: float checkpoints, AWQ/GPTQ (Marlin), fp8, mxfp4; not bitsandbytes, not GGUF
VLLM_SCHEMES = frozenset({"fp32", "bf16", "fp16", "awq", "gptq", "fp8", "mxfp4"})
# NOTE: vLLM's KV block (tokens per page). The plan passes it to vLLM explicitly, so both count the same pages. CPU:
# 128, the CPU backend's default (vllm 0.32 platforms/cpu.py check_and_update_config); its attention kernel takes
# multiples of 32 ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), MLA only 16. CUDA: 32, not vLLM's
# default 16: the FlashAttention, FlashInfer and Triton backends all take 32 (multiples of 16), and so does the CPU
# build that runs a replica on a machine whose GPUs are Ray's fake ones (the integration tests).
VLLM_BLOCK_SIZE = {"cuda": 32, "cpu": 128}


def vllm_block_size(device: str, mla: bool = False) -> int:
    return 16 if mla else VLLM_BLOCK_SIZE[device]


def pick_engine(requested: str, scheme: str, available, model: str = "") -> tuple[str, str]:
    """(engine, why) for a model entry's ``engine`` at quantization ``scheme``; ``available``: engines installed."""
    where = f"models[{model}]." if model else ""
    if requested not in ("auto", *ENGINES):
        raise InputError(f"{where}engine {requested!r}: use auto, transformers, vllm or llamacpp")
    if requested == "llamacpp" or (requested == "auto" and scheme == "gguf"):
        if scheme != "gguf":
            raise InputError(f"{where}engine llamacpp runs GGUF files, not quantization {scheme}: point source at a "
                             ".gguf file, or use engine: transformers or vllm")
        if "llamacpp" not in available:
            if requested == "auto":
                return "transformers", ("auto: llama-cpp-python is not installed (`make venv` builds it); "
                                        "transformers dequantizes the GGUF (planned at that size)")
            raise InputError(f"{where}engine llamacpp: llama-cpp-python is not installed for the replicas; run "
                             "`make venv` (it builds llama-cpp-python) or use engine: transformers, which "
                             "dequantizes the file (3.5-7x its size)")
        return "llamacpp", ("deploy.yaml asks for llamacpp" if requested == "llamacpp"
                            else "auto: a GGUF file runs on llama.cpp as stored")
    if requested == "vllm":
        if scheme not in VLLM_SCHEMES:
            raise InputError(
                f"{where}engine vllm cannot run quantization {scheme}: vLLM removed bitsandbytes in 0.28 and runs "
                f"{', '.join(sorted(VLLM_SCHEMES))}; use engine: transformers for {scheme}, or a quantization vLLM "
                "runs (awq, gptq, fp8)")
        if "vllm" not in available:
            raise InputError(f"{where}engine vllm: vLLM is not installed for the replicas; run `make vllm` (its own "
                             "venv, .venv-vllm) or set GPUPLAN_VLLM_PYTHON to a Python that has vllm and this Ray")
        return "vllm", "deploy.yaml asks for vllm"
    if requested == "transformers":
        return "transformers", "deploy.yaml asks for transformers"
    if scheme in VLLM_SCHEMES and "vllm" in available:
        return "vllm", f"auto: vLLM is installed and runs {scheme}"
    if scheme not in VLLM_SCHEMES:
        return "transformers", f"auto: {scheme} is not a scheme vLLM runs"
    return "transformers", "auto: vLLM is not installed (`make vllm`)"


def kv_tokens_vllm(max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """Tokens of KV cache a vLLM replica needs to hold ``max_num_seqs`` whole sequences: whole blocks each."""
    return max_num_seqs * math.ceil(max_model_len / block_size) * block_size


@dataclass(frozen=True)
class VllmSettings:
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int
    kv_cache_tokens: int  # what vLLM will report as its KV capacity ("KV cache size: N tokens")
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enforce_eager: bool
    dtype: str
    quantization: str | None  # vLLM's name for the scheme, None for float checkpoints

    def to_json(self) -> dict:
        return asdict(self)

    def engine_kwargs(self) -> dict:
        """Keyword arguments of vLLM's EngineArgs."""
        d = self.to_json()
        d.pop("kv_cache_tokens")
        if d["quantization"] is None:
            d.pop("quantization")
        return d


def vllm_quantization(scheme: str, checkpoint_scheme: str | None, model: str = "") -> str | None:
    """vLLM's ``quantization`` argument: None where vLLM reads it from the checkpoint (or there is none), "fp8" for
    fp8 of a float checkpoint (quantized at load). AWQ/GPTQ/mxfp4 need a checkpoint made that way."""
    if checkpoint_scheme and checkpoint_scheme not in ("fp32", "bf16", "fp16"):
        return None
    if scheme in ("fp32", "bf16", "fp16"):
        return None
    if scheme == "fp8":
        return "fp8"
    raise InputError(f"models[{model}]: vLLM cannot quantize a float checkpoint to {scheme} at load; point source at "
                     f"a {scheme} checkpoint, or use fp8 (quantized at load) or engine: transformers")


def vllm_settings(*, planned_bytes: int, device_total_bytes: int, kv_cache_bytes: int, kv_tokens: int,
                  block_size: int, max_model_len: int, max_num_seqs: int, prefill_tokens: int, dtype: str,
                  quantization: str | None) -> VllmSettings:
    """The engine arguments of one vLLM replica from its plan. ``device_total_bytes``: the GPU's total memory (the
    CPU backend reads the share against the host's RAM)."""
    if device_total_bytes <= 0:
        raise InputError(f"device total bytes must be positive, got {device_total_bytes}")
    util = planned_bytes / device_total_bytes
    if util > 1:
        raise InputError(f"a vLLM replica planned at {planned_bytes} bytes cannot fit a device of "
                         f"{device_total_bytes} bytes (gpu_memory_utilization would be {util:.2f}); lower its "
                         "max_model_len or max_num_seqs, or use a smaller quantization")
    return VllmSettings(
        gpu_memory_utilization=round(max(util, 0.01), 4), kv_cache_memory_bytes=int(kv_cache_bytes),
        kv_cache_tokens=int(kv_tokens), max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(prefill_tokens, max_num_seqs), block_size=block_size,
        # NOTE: CUDA graphs off until a GPU session measures their pool; the plan has no term for it yet
        enforce_eager=True, dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype),
        quantization=quantization,
    )
