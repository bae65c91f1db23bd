"""A ModelSpec from safetensors headers: shapes and stored dtypes read, not derived; the config supplies what
checkpoints do not store (rotary buffers, the KV dims)."""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import replace

from planner.errors import ModelSpecError
from planner.model.spec.from_config import _aliased, _config_dtype, _need, _text_config
from planner.model.spec.types import ArchDims, ModelSpec, TensorSpec

_LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def role_from_name(name: str, ndim: int) -> str:
    """Classify a checkpoint tensor by its name (used when shapes come from safetensors headers)."""
    low = name.lower()
    if low.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")):
        return "embedding"
    if low.endswith(("lm_head.weight", "embed_out.weight")) or low == "output.weight":
        return "lm_head"
    if low.endswith(("predictions.decoder.weight", "lm_head.decoder.weight")):
        return "lm_head"  # BERT-style output embeddings: transformers keeps the output embedding unquantized
    module = low[:-len(".weight")].rsplit(".", 1)[-1] if low.endswith(".weight") else ""
    if (("embed" in module or module.endswith("emb") or module in ("wpe", "wte"))
            and not any(x in module for x in ("proj", "mapping", "linear", "fc", "dense"))):
        # nn.Embedding tables (tokens, learned positions, token types, segments): bitsandbytes converts exact
        # nn.Linear only, so they stay at the load dtype
        return "embedding"
    if "norm" in low or ".ln_" in low or low.startswith("ln_"):
        return "norm"
    if re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", low) and "proj" not in low:
        return "router"
    if re.search(r"\.experts\.", low) and not low.endswith("_bias"):
        # per-expert 2-D checkpoint tensors (experts.0.w1.weight) are fused into 3-D non-Linear modules on load
        return "experts"
    if low.endswith(".bias"):
        return "bias"
    if low.endswith(".weight") and ndim == 2:
        return "linear"
    return "other"


def _from_stored(cfg: dict, stored, *, name: str, path: str, derived: ModelSpec | None) -> ModelSpec:
    text = _text_config(cfg)
    tensors = []
    for s in stored:
        m = _LAYER.search(s.name)
        tensors.append(
            TensorSpec(
                name=s.name, shape=s.shape, role=role_from_name(s.name, len(s.shape)),
                layer=int(m.group(1)) if m else None, stored_dtype=s.dtype, stored_bytes=s.nbytes,
            )
        )
    # From the derived spec: buffers the loader creates that checkpoints do not store (rotary inv_freq, ...), and
    # dtypes the loader pins whatever the checkpoint stores (DeepSeek's fp32 router).
    if derived is not None:
        by_name = {t.name: t for t in derived.tensors}
        stored_names = {t.name for t in tensors}
        tensors = [replace(t, fixed_dtype=by_name[t.name].fixed_dtype, role=by_name[t.name].role)
                   if t.name in by_name and by_name[t.name].fixed_dtype else t for t in tensors]
        tensors += [t for t in derived.tensors if t.role == "buffer" and t.name not in stored_names]
        dims = derived.dims
    else:
        dims = _dims_from_tensors(text, tensors)
        tensors += _unstored_buffers(text, dims, tensors)
    tensors = _not_linear(cfg.get("model_type", text.get("model_type")), tensors)
    tied = not any(t.role == "lm_head" for t in tensors) and any(t.role == "embedding" for t in tensors)
    notes = ["shapes and dtypes read from safetensors headers"]
    if derived is not None:
        notes += list(derived.notes)
        dparams = derived.params_total
        sparams = sum(t.numel for t in tensors if t.role != "buffer")
        if dparams != sparams and not cfg.get("quantization_config"):
            notes.append(f"config.json implies {dparams:,} parameters, the checkpoint stores {sparams:,}; using the "
                         "checkpoint")
    return ModelSpec(
        name=name,
        model_type=cfg.get("model_type", text.get("model_type", "unknown")),
        architecture=(cfg.get("architectures") or [text.get("model_type", "unknown")])[0],
        source="safetensors",
        dims=dims,
        tensors=tuple(tensors),
        config_dtype=_config_dtype(cfg) or _config_dtype(text),
        tied_embeddings=tied,
        checkpoint_quant=cfg.get("quantization_config") or text.get("quantization_config"),
        path=path,
        notes=tuple(notes),
    )


@functools.lru_cache(maxsize=1)
def _not_linear_table() -> dict:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "catalog",
                        "not_linear.json")
    try:
        with open(path, encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    except (OSError, ValueError):
        return {}


def _not_linear(model_type: str | None, tensors: list[TensorSpec]) -> list[TensorSpec]:
    """Modules whose 2-D weights look like Linear layers by name but are not exact ``nn.Linear`` in transformers
    (FalconLinear, ...): bitsandbytes does not convert them (transformers replaces ``type(m) is nn.Linear`` and
    Conv1D only), so they keep the load dtype. The table (planner/catalog/not_linear.json) is written by
    ``benchmarks/arch_sweep.py --write-not-linear`` from the modules transformers builds."""
    patterns = _not_linear_table().get(model_type or "")
    if not patterns:
        return tensors
    rx = re.compile("|".join(re.escape(p).replace(r"\*", r"\d+") + r"\.weight$" for p in patterns))
    return [replace(t, role="other") if t.role == "linear" and rx.match(t.name) else t for t in tensors]


def _unstored_buffers(cfg: dict, dims: ArchDims, tensors: list[TensorSpec]) -> list[TensorSpec]:
    """Buffers transformers creates on load that checkpoints do not store, for a family the planner does not derive
    from config.json: the rotary embedding's ``inv_freq`` and ``original_inv_freq`` (float32, head_dim x the rotary
    fraction / 2 each, one module per model) when the config describes rotary positions, and BERT-style
    ``position_ids`` (int64, one per position) next to a learned position table."""
    names = {t.name for t in tensors}
    out: list[TensorSpec] = []
    rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    rotary = (rp or cfg.get("rope_theta") is not None or cfg.get("rotary_emb_base") is not None
              or cfg.get("position_embedding_type") == "rotary")
    if rotary and not any(n.endswith("inv_freq") for n in names):
        frac = cfg.get("partial_rotary_factor", cfg.get("rotary_pct", rp.get("partial_rotary_factor", 1.0)))
        rot = cfg.get("qk_rope_head_dim") or int(dims.head_dim * (frac or 1.0))
        for buf in ("inv_freq", "original_inv_freq"):
            out.append(TensorSpec(f"model.rotary_emb.{buf}", (rot // 2,), "buffer", fixed_dtype="F32"))
    mpe = dims.max_position_embeddings
    for n in names:
        for table, buf in (("position_embeddings.weight", "position_ids"), ("token_type_embeddings.weight",
                                                                            "token_type_ids")):
            if n.endswith("embeddings." + table) and mpe and n.replace(table, buf) not in names:
                out.append(TensorSpec(n.replace(table, buf), (1, mpe), "buffer", fixed_dtype="I64"))
    mt = cfg.get("model_type")
    if mt in ("gptj", "codegen") and mpe:  # a sin/cos table of every position, float32
        rot = cfg.get("rotary_dim") or dims.head_dim
        out.append(TensorSpec("transformer.rotary_emb.embed_positions", (mpe, rot), "buffer", fixed_dtype="F32"))
    if mt == "gpt_bigcode" and mpe:  # the causal mask of every position pair
        out.append(TensorSpec("transformer.bias", (mpe, mpe), "buffer", fixed_dtype="BOOL"))
    return out


def _dims_from_tensors(cfg: dict, tensors: list[TensorSpec]) -> ArchDims:
    """Dims for an architecture gpuplan cannot derive: the KV/activation terms need these config fields."""
    try:
        H, L, nh, V = _need(cfg, cfg.get("model_type", "unknown"), "hidden_size", "num_hidden_layers",
                            "num_attention_heads", "vocab_size")
    except ModelSpecError as exc:
        raise ModelSpecError(f"{exc} (weights were read, but the KV cache needs them)") from None
    nkv = _aliased(cfg, "num_key_value_heads") or nh
    if cfg.get("multi_query") is True and not cfg.get("new_decoder_architecture"):
        nkv = 1  # Falcon-7B style multi-query attention
    hd = cfg.get("head_dim") or H // nh
    mpe = _aliased(cfg, "max_position_embeddings")
    return ArchDims(num_layers=L, hidden_size=H, num_heads=nh, num_kv_heads=nkv, head_dim=hd,
                    intermediate_size=_aliased(cfg, "intermediate_size") or 4 * H, vocab_size=V,
                    max_position_embeddings=mpe if isinstance(mpe, int) else None, layer_types=("full",) * L)
