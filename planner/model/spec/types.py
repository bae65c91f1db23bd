"""The values: a tensor (TensorSpec), the dims the KV cache and activations need (ArchDims), a model (ModelSpec)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

ROLES = ("linear", "bias", "embedding", "lm_head", "norm", "router", "experts", "buffer", "other")
PARAM_ROLES = tuple(r for r in ROLES if r != "buffer")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    role: str
    layer: int | None = None
    # dtype the loader keeps whatever the load dtype ("F32" for rotary inv_freq, DeepSeek's router); None = load dtype
    fixed_dtype: str | None = None
    stored_dtype: str | None = None  # safetensors dtype string when read from a checkpoint
    stored_bytes: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """Owning module path: ``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name


@dataclass(frozen=True)
class ArchDims:
    """What the KV-cache and activation formulas need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int | None = None
    attention: str = "gqa"  # "gqa" (MHA/MQA included) | "mla"
    # per layer: "full" or "sliding"; the KV cache of a sliding layer holds at most sliding_window tokens
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # MLA (DeepSeek-V2/V3)
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # MoE
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_type: str
    architecture: str
    source: str  # "safetensors" | "config"
    dims: ArchDims
    tensors: tuple[TensorSpec, ...]
    config_dtype: str | None  # dtype named by config.json ("bf16"), None when absent
    tied_embeddings: bool
    checkpoint_quant: dict | None = None  # the config's quantization_config, if pre-quantized
    path: str | None = None
    notes: tuple[str, ...] = ()

    @cached_property
    def params_total(self) -> int:
        """Parameters (not buffers), tied tensors once. For a pre-quantized checkpoint read from safetensors this
        counts stored elements (packed), like the hub's ``safetensors.total``."""
        return sum(t.numel for t in self.tensors if t.role != "buffer")

    def by_role(self, role: str) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.role == role)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "source": self.source,
            "path": self.path,
            "config_dtype": self.config_dtype,
            "tied_embeddings": self.tied_embeddings,
            "checkpoint_quant": self.checkpoint_quant,
            "params_total": self.params_total,
            "dims": asdict(self.dims),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------- loading

