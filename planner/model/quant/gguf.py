"""GGUF files: per-tensor ggml types fixed in the file's header, bytes as stored. llama.cpp runs them as stored;
transformers dequantizes them on load (planned at the compute dtype: planner.model.estimate.weight_bytes)."""

from __future__ import annotations

from planner.model.quant.types import QuantSpec

NAMES = ("gguf",)
ENGINES = ("llamacpp", "transformers")  # engine: auto takes the first installed
CHECKPOINT_METHODS = ()


def resolve(name: str, **_) -> QuantSpec:
    return QuantSpec("gguf", bits=0, from_checkpoint=True, label="gguf (per-tensor types from the file)")


def quantizes(t, q: QuantSpec) -> bool:
    return False  # the file's tensors are counted as stored, not re-quantized


def tensor_bytes(t, q, e: int, out_f: int, in_f: int):  # pragma: no cover - nothing is re-quantized
    raise AssertionError(q.scheme)
