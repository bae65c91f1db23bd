"""Float checkpoints: fp32, bf16, fp16. Nothing is quantized; every tensor at the dtype's width."""

from __future__ import annotations

from planner.model.quant.types import FLOAT_BYTES, QuantSpec

NAMES = ("fp32", "bf16", "fp16")
ENGINES = ("vllm", "transformers")  # engine: auto takes the first installed
CHECKPOINT_METHODS = ()


def resolve(name: str, **_) -> QuantSpec:
    return QuantSpec(name, bits=FLOAT_BYTES[name] * 8, label=name)


def quantizes(t, q: QuantSpec) -> bool:
    return False


def tensor_bytes(t, q, e: int, out_f: int, in_f: int):  # pragma: no cover - nothing is quantized
    raise AssertionError(q.scheme)
