"""ModelSpec: every tensor a loaded model keeps, with its shape and role, from config.json or safetensors headers.

Two sources, in this order of trust:
1. ``safetensors`` headers in a local model directory: shapes and stored dtypes are read, not derived.
2. ``config.json`` alone (a local file/dir, or a catalog name): shapes are derived per architecture family, with
   the module names and shapes transformers 5 builds (checked against ``AutoModelForCausalLM.from_config`` on tiny
   configs in ``tests/unit/test_spec_vs_transformers.py``).

Roles decide how a quantization scheme treats a tensor (see ``quant.py``):
``linear`` (weight of an exact ``nn.Linear``: what bitsandbytes replaces), ``bias``, ``embedding``, ``lm_head``,
``norm``, ``router`` (MoE gate, not an nn.Linear in transformers 5), ``experts`` (fused 3-D expert weights, not
nn.Linear in transformers 5), ``buffer`` (non-parameter tensors such as rotary ``inv_freq``), ``other``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from functools import cached_property

from planner.errors import ModelSpecError

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

_DTYPE_NAMES = {
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
}

CATALOG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "catalog", "models")


def catalog_names() -> list[str]:
    """Hub-style names (``meta-llama/Llama-3.1-8B``) of the configs shipped in ``planner/catalog/models``."""
    return sorted(f[:-5].replace("--", "/", 1) for f in os.listdir(CATALOG_DIR) if f.endswith(".json"))


def _catalog_path(name: str) -> str | None:
    names = catalog_names()
    low = name.lower()
    for n in names:
        if n.lower() == low or n.split("/", 1)[1].lower() == low:
            return os.path.join(CATALOG_DIR, n.replace("/", "--", 1) + ".json")
    return None


def load_spec(source: str) -> ModelSpec:
    """A ModelSpec from a local model directory, a ``config.json`` path, or a catalog name."""
    if not isinstance(source, str) or not source.strip():
        raise ModelSpecError("model source is empty; give a model directory, a config.json or a catalog name")
    if os.path.isdir(source):
        return _from_dir(source)
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            from planner.model.gguf_spec import spec_from_gguf

            return spec_from_gguf(source)
        return _from_config(_read_config(source), name=_name_from_path(source), path=source)
    cat = _catalog_path(source)
    if cat:
        return _from_config(_read_config(cat), name=source if "/" in source else _hub_name(cat), path=None)
    close = [n for n in catalog_names() if source.lower().split("/")[-1][:6] in n.lower()]
    hint = f" Similar catalog names: {', '.join(close[:5])}." if close else ""
    raise ModelSpecError(
        f"model source {source!r} is neither a local directory, a file, nor a catalog name.{hint} "
        f"Run `gpuplan catalog` for the {len(catalog_names())} shipped configs, or point at a local model directory."
    )


def _hub_name(path: str) -> str:
    return os.path.basename(path)[:-5].replace("--", "/", 1)


def _name_from_path(path: str) -> str:
    p = os.path.abspath(path)
    return os.path.basename(os.path.dirname(p)) if os.path.basename(p) == "config.json" else os.path.basename(p)


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelSpecError(f"{path}: no such file; a model directory needs its config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{path}: config.json is not valid JSON ({exc}); re-download it") from None
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"{path}: config.json must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _from_dir(model_dir: str) -> ModelSpec:
    from planner.model.formats.safetensors import read_checkpoint

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        if ggufs:
            from planner.model.gguf_spec import spec_from_gguf

            return spec_from_gguf(os.path.join(model_dir, ggufs[0]))
        raise ModelSpecError(f"{model_dir}: no config.json in the model directory; download it with the weights")
    cfg = _read_config(cfg_path)
    name = os.path.basename(os.path.abspath(model_dir))
    # Shapes derived from config.json, when the family is known: they supply the buffers checkpoints don't store
    # and the KV dims. Without weights, a config that cannot be derived is the error to report.
    config_error: ModelSpecError | None = None
    try:
        from_config = _from_config(cfg, name=name, path=model_dir)
    except ModelSpecError as exc:
        from_config, config_error = None, exc
    stored = read_checkpoint(model_dir)
    if stored is None:
        if config_error is not None:
            raise config_error
        return from_config
    return _from_stored(cfg, stored, name=name, path=model_dir, derived=from_config)


# ------------------------------------------------------------------------------------------------ from config


def _text_config(cfg: dict) -> dict:
    for key in ("llm_config", "text_config"):
        if isinstance(cfg.get(key), dict) and cfg[key].get("hidden_size"):
            inner = dict(cfg[key])
            for k in ("torch_dtype", "dtype", "quantization_config", "tie_word_embeddings"):
                if k not in inner and k in cfg:
                    inner[k] = cfg[k]
            return inner
    return cfg


# Other spellings of the config fields the formulas read, as transformers' configs map them (attribute_map): GPT-2,
# BLOOM, Falcon, GPT-J, MPT, OPT, T5-style and others save their own names in config.json.
_ALIASES = {
    "hidden_size": ("n_embd", "d_model", "embed_dim", "dim", "model_dim", "hidden_dim"),
    "num_hidden_layers": ("n_layer", "num_layers", "n_layers", "num_decoder_layers"),
    "num_attention_heads": ("n_head", "num_heads", "n_heads", "decoder_attention_heads"),
    "intermediate_size": ("n_inner", "ffn_dim", "d_ff", "ffn_hidden_size", "inner_hidden_size"),
    "max_position_embeddings": ("n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length"),
    "num_key_value_heads": ("num_kv_heads", "n_head_kv", "multi_query_group_num"),
}


def _aliased(cfg: dict, key: str):
    v = cfg.get(key)
    if v in (None, ""):
        for alt in _ALIASES.get(key, ()):
            if cfg.get(alt) not in (None, ""):
                return cfg[alt]
    return v


def _need(cfg: dict, model_type: str, *keys: str) -> list:
    cfg = {**cfg, **{k: _aliased(cfg, k) for k in keys}}
    missing = [k for k in keys if cfg.get(k) in (None, "")]
    if missing:
        raise ModelSpecError(
            f"config.json of a {model_type!r} model lacks {', '.join(missing)}; these are needed to size it "
            "without weights: add them or put the *.safetensors files next to config.json"
        )
    vals = []
    for k in keys:
        v = cfg[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ModelSpecError(f"config.json: {k} must be a positive integer, got {v!r}")
        vals.append(v)
    return vals


def _config_dtype(cfg: dict) -> str | None:
    raw = cfg.get("dtype") or cfg.get("torch_dtype")
    if raw is None:
        return None
    return _DTYPE_NAMES.get(str(raw).replace("torch.", ""), None)


LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
              "deepseek_v3", "deepseek_v2", "gpt_oss", "gpt_neox", "olmo2", "granite"}
# NOTE: transformers' default for tie_word_embeddings is True in PretrainedConfig; these families' configs default
# it as listed (Gemma/Gemma2 tie; the others untie) when config.json omits the key.
_TIED_DEFAULT = {"gemma": True, "gemma2": True}


def supported_model_types() -> list[str]:
    return sorted(LLAMA_LIKE | {"internvl_chat"})


def _from_config(cfg: dict, *, name: str, path: str | None) -> ModelSpec:
    top = cfg
    text = _text_config(cfg)
    mt = text.get("model_type")
    if not mt:
        raise ModelSpecError(f"config.json of {name!r} has no model_type; cannot tell its architecture")
    if mt not in LLAMA_LIKE:
        raise ModelSpecError(
            f"architecture {mt!r} of {name!r} is not one gpuplan can size from config.json alone "
            f"(known: {', '.join(sorted(LLAMA_LIKE))}); put the *.safetensors files next to config.json so shapes are "
            "read from their headers"
        )
    tensors, dims, notes = _decoder(text, mt)
    tied = bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", _TIED_DEFAULT.get(mt, False))))
    if top.get("model_type") == "internvl_chat":
        vt, vnotes = _internvl_vision(top, dims.hidden_size)
        tensors = vt + tensors
        notes += vnotes
    if not tied:
        tensors = tensors + (TensorSpec("lm_head.weight", (dims.vocab_size, dims.hidden_size), "lm_head"),)
    arch = (top.get("architectures") or [mt])[0]
    return ModelSpec(
        name=name,
        model_type=top.get("model_type", mt),
        architecture=arch,
        source="config",
        dims=dims,
        tensors=tensors,
        config_dtype=_config_dtype(top) or _config_dtype(text),
        tied_embeddings=tied,
        checkpoint_quant=top.get("quantization_config") or text.get("quantization_config"),
        path=path,
        notes=notes,
    )


def _layer_types(cfg: dict, mt: str, n_layers: int) -> tuple[tuple[str, ...], int | None, list[str]]:
    window = cfg.get("sliding_window")
    notes: list[str] = []
    lt = cfg.get("layer_types")
    if isinstance(lt, list) and len(lt) == n_layers:
        types = tuple("sliding" if "sliding" in str(t) else "full" for t in lt)
        return types, window if "sliding" in types else None, notes
    if mt == "gemma2" and window:
        # NOTE: transformers' Gemma2Config: layer i is sliding when (i + 1) % 2 == 1, i.e. even layers slide.
        return tuple("sliding" if (i + 1) % 2 else "full" for i in range(n_layers)), window, notes
    if mt == "mistral" and window:
        return ("sliding",) * n_layers, window, notes
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and cfg.get("use_sliding_window") and window:
        mwl = cfg.get("max_window_layers", n_layers)
        return tuple("sliding" if i >= mwl else "full" for i in range(n_layers)), window, notes
    if window and mt == "phi3":
        notes.append(
            f"sliding_window={window} in config is not used to shrink the KV cache (transformers keeps full-length "
            "caches for phi3); the estimate is for full attention"
        )
    return ("full",) * n_layers, None, notes


def _decoder(cfg: dict, mt: str) -> tuple[tuple[TensorSpec, ...], ArchDims, tuple[str, ...]]:
    H, L, nh, V = _need(cfg, mt, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    I = cfg.get("intermediate_size") or (4 * H if mt == "gpt_neox" else None)
    if not I:
        _need(cfg, mt, "intermediate_size")
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    if mt != "deepseek_v3" and mt != "deepseek_v2" and H % nh and not cfg.get("head_dim"):
        raise ModelSpecError(f"hidden_size {H} is not divisible by num_attention_heads {nh}; set head_dim in config")
    layer_types, window, notes = _layer_types(cfg, mt, L)
    pre = "gpt_neox" if mt == "gpt_neox" else "model"
    T: list[TensorSpec] = []

    def add(name, shape, role, layer=None, fixed=None):
        T.append(TensorSpec(name, tuple(int(s) for s in shape), role, layer, fixed))

    def linear(name, out_f, in_f, layer, bias=False):
        add(f"{name}.weight", (out_f, in_f), "linear", layer)
        if bias:
            add(f"{name}.bias", (out_f,), "bias", layer)

    def norm(name, width, layer=None, bias=False):
        add(f"{name}.weight", (width,), "norm", layer)
        if bias:
            add(f"{name}.bias", (width,), "norm", layer)

    add(f"{pre}.embed_in.weight" if mt == "gpt_neox" else f"{pre}.embed_tokens.weight", (V, H), "embedding")
    if mt in ("gemma", "gemma2"):
        # NOTE: Gemma's scaled embedding registers the scalar sqrt(hidden_size) as a buffer (embed_scale).
        add(f"{pre}.embed_tokens.embed_scale", (), "buffer")

    attn_bias = bool(cfg.get("attention_bias", False)) or mt in ("qwen2", "qwen2_moe")
    mlp_bias = bool(cfg.get("mlp_bias", False))
    dims_extra: dict = {}
    n_experts = 0
    for i in range(L):
        p = f"{pre}.layers.{i}"
        a = f"{p}.attention" if mt == "gpt_neox" else f"{p}.self_attn"
        # ---- attention
        if mt in ("deepseek_v3", "deepseek_v2"):
            kvr, rope, nope, vhd = _need(cfg, mt, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
            qr = cfg.get("q_lora_rank")
            if qr:
                linear(f"{a}.q_a_proj", qr, H, i, attn_bias)
                norm(f"{a}.q_a_layernorm", qr, i)
                linear(f"{a}.q_b_proj", nh * (nope + rope), qr, i)
            else:
                linear(f"{a}.q_proj", nh * (nope + rope), H, i)
            linear(f"{a}.kv_a_proj_with_mqa", kvr + rope, H, i, attn_bias)
            norm(f"{a}.kv_a_layernorm", kvr, i)
            linear(f"{a}.kv_b_proj", nh * (nope + vhd), kvr, i)
            linear(f"{a}.o_proj", H, nh * vhd, i, attn_bias)
            dims_extra = dict(attention="mla", kv_lora_rank=kvr, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                              v_head_dim=vhd)
        elif mt == "gpt_neox":
            norm(f"{p}.input_layernorm", H, i, bias=True)
            norm(f"{p}.post_attention_layernorm", H, i, bias=True)
            linear(f"{a}.query_key_value", 3 * H, H, i, bias=True)
            linear(f"{a}.dense", H, H, i, bias=True)
        elif mt == "phi3":
            linear(f"{a}.o_proj", H, nh * hd, i, attn_bias)
            linear(f"{a}.qkv_proj", (nh + 2 * nkv) * hd, H, i, attn_bias)
        else:
            if mt == "gpt_oss":
                add(f"{a}.sinks", (nh,), "other", i)
            linear(f"{a}.q_proj", nh * hd, H, i, attn_bias)
            linear(f"{a}.k_proj", nkv * hd, H, i, attn_bias)
            linear(f"{a}.v_proj", nkv * hd, H, i, attn_bias)
            # NOTE: Qwen2 hard-codes bias on q/k/v only; elsewhere attention_bias covers o_proj too.
            linear(f"{a}.o_proj", H, nh * hd, i, bool(cfg.get("attention_bias")) and mt not in ("qwen2", "qwen2_moe"))
            if mt in ("qwen3", "qwen3_moe"):
                norm(f"{a}.q_norm", hd, i)
                norm(f"{a}.k_norm", hd, i)
        # ---- MLP / MoE
        m = f"{p}.mlp"
        if mt == "gpt_neox":
            linear(f"{m}.dense_h_to_4h", I, H, i, bias=True)
            linear(f"{m}.dense_4h_to_h", H, I, i, bias=True)
        elif mt == "phi3":
            linear(f"{m}.gate_up_proj", 2 * I, H, i, mlp_bias)
            linear(f"{m}.down_proj", H, I, i, mlp_bias)
        elif mt == "mixtral":
            (E,) = _need(cfg, mt, "num_local_experts")
            n_experts = E
            add(f"{m}.gate.weight", (E, H), "router", i)
            add(f"{m}.experts.gate_up_proj", (E, 2 * I, H), "experts", i)
            add(f"{m}.experts.down_proj", (E, H, I), "experts", i)
        elif mt in ("qwen2_moe", "qwen3_moe") and _is_moe_layer(cfg, i):
            # NOTE: hub Qwen MoE configs say num_experts; transformers 5's Qwen3MoeConfig says num_local_experts
            E = _n_experts(cfg)
            (MI,) = _need(cfg, mt, "moe_intermediate_size")
            n_experts = E
            add(f"{m}.gate.weight", (E, H), "router", i)
            add(f"{m}.experts.gate_up_proj", (E, 2 * MI, H), "experts", i)
            add(f"{m}.experts.down_proj", (E, H, MI), "experts", i)
            if mt == "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
                SI = cfg["shared_expert_intermediate_size"]
                linear(f"{m}.shared_expert.gate_proj", SI, H, i)
                linear(f"{m}.shared_expert.up_proj", SI, H, i)
                linear(f"{m}.shared_expert.down_proj", H, SI, i)
                linear(f"{m}.shared_expert_gate", 1, H, i)
        elif mt in ("deepseek_v3", "deepseek_v2") and i >= cfg.get("first_k_dense_replace", 0) and \
                i % max(1, cfg.get("moe_layer_freq", 1)) == 0 and cfg.get("n_routed_experts"):
            E, MI = _need(cfg, mt, "n_routed_experts", "moe_intermediate_size")
            n_experts = E
            # NOTE: transformers' DeepseekV3 keeps the router weight and e_score_correction_bias in fp32
            # (_keep_in_fp32_modules_strict).
            add(f"{m}.gate.weight", (E, H), "router", i, "F32")
            if mt == "deepseek_v3":
                add(f"{m}.gate.e_score_correction_bias", (E,), "buffer", i, "F32")
            add(f"{m}.experts.gate_up_proj", (E, 2 * MI, H), "experts", i)
            add(f"{m}.experts.down_proj", (E, H, MI), "experts", i)
            ns = cfg.get("n_shared_experts") or 0
            if ns:
                linear(f"{m}.shared_experts.gate_proj", MI * ns, H, i)
                linear(f"{m}.shared_experts.up_proj", MI * ns, H, i)
                linear(f"{m}.shared_experts.down_proj", H, MI * ns, i)
        elif mt == "gpt_oss":
            (E,) = _need(cfg, mt, "num_local_experts")
            n_experts = E
            add(f"{m}.router.weight", (E, H), "router", i)
            add(f"{m}.router.bias", (E,), "router", i)
            add(f"{m}.experts.gate_up_proj", (E, H, 2 * I), "experts", i)
            add(f"{m}.experts.gate_up_proj_bias", (E, 2 * I), "router", i)
            add(f"{m}.experts.down_proj", (E, I, H), "experts", i)
            add(f"{m}.experts.down_proj_bias", (E, H), "router", i)
        else:
            linear(f"{m}.gate_proj", I, H, i, mlp_bias)
            linear(f"{m}.up_proj", I, H, i, mlp_bias)
            linear(f"{m}.down_proj", H, I, i, mlp_bias)
        if mt != "gpt_neox":
            norm(f"{p}.input_layernorm", H, i)
            norm(f"{p}.post_attention_layernorm", H, i)
            if mt == "gemma2":
                norm(f"{p}.pre_feedforward_layernorm", H, i)
                norm(f"{p}.post_feedforward_layernorm", H, i)
    if mt == "gpt_neox":
        norm(f"{pre}.final_layer_norm", H, bias=True)
    else:
        norm(f"{pre}.norm", H)
    # rotary buffers: inv_freq and original_inv_freq, float32, one per model
    rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    frac = cfg.get("rotary_pct", cfg.get("partial_rotary_factor", rp.get("partial_rotary_factor", 1.0)))
    rot = dims_extra.get("qk_rope_head_dim") or int(hd * frac)
    add(f"{pre}.rotary_emb.inv_freq", (rot // 2,), "buffer", None, "F32")
    add(f"{pre}.rotary_emb.original_inv_freq", (rot // 2,), "buffer", None, "F32")
    if mt in ("deepseek_v3",) and cfg.get("num_nextn_predict_layers"):
        notes.append(
            f"the checkpoint also ships {cfg['num_nextn_predict_layers']} multi-token-prediction layer(s) that "
            "transformers does not load; they are not counted"
        )
    dims = ArchDims(
        num_layers=L, hidden_size=H, num_heads=nh, num_kv_heads=nkv, head_dim=hd, intermediate_size=I,
        vocab_size=V, max_position_embeddings=cfg.get("max_position_embeddings"), layer_types=layer_types,
        sliding_window=window, num_experts=n_experts,
        experts_per_token=cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0,
        moe_intermediate_size=cfg.get("moe_intermediate_size"), **dims_extra,
    )
    return tuple(T), dims, tuple(notes)


def _n_experts(cfg: dict) -> int:
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def _is_moe_layer(cfg: dict, i: int) -> bool:
    if i in (cfg.get("mlp_only_layers") or []):
        return False
    step = cfg.get("decoder_sparse_step", 1) or 1
    return _n_experts(cfg) > 0 and (i + 1) % step == 0


def _internvl_vision(cfg: dict, llm_hidden: int) -> tuple[tuple[TensorSpec, ...], tuple[str, ...]]:
    """InternViT (``intern_vit_6b`` type) + the ``mlp1`` projector of InternVL chat models."""
    vc = cfg.get("vision_config") or {}
    H, L, I, patch, img = _need(vc, "intern_vit_6b", "hidden_size", "num_hidden_layers", "intermediate_size",
                                "patch_size", "image_size")
    ch = vc.get("num_channels", 3)
    qkv_bias = vc.get("qkv_bias", True)
    T: list[TensorSpec] = [
        TensorSpec("vision_model.embeddings.class_embedding", (1, 1, H), "other"),
        TensorSpec("vision_model.embeddings.patch_embedding.weight", (H, ch, patch, patch), "other"),
        TensorSpec("vision_model.embeddings.patch_embedding.bias", (H,), "other"),
        TensorSpec("vision_model.embeddings.position_embedding", (1, (img // patch) ** 2 + 1, H), "other"),
    ]
    for i in range(L):
        p = f"vision_model.encoder.layers.{i}"
        T += [
            TensorSpec(f"{p}.attn.qkv.weight", (3 * H, H), "linear", None),
            *([TensorSpec(f"{p}.attn.qkv.bias", (3 * H,), "bias")] if qkv_bias else []),
            TensorSpec(f"{p}.attn.proj.weight", (H, H), "linear"),
            TensorSpec(f"{p}.attn.proj.bias", (H,), "bias"),
            TensorSpec(f"{p}.mlp.fc1.weight", (I, H), "linear"),
            TensorSpec(f"{p}.mlp.fc1.bias", (I,), "bias"),
            TensorSpec(f"{p}.mlp.fc2.weight", (H, I), "linear"),
            TensorSpec(f"{p}.mlp.fc2.bias", (H,), "bias"),
            TensorSpec(f"{p}.norm1.weight", (H,), "norm"), TensorSpec(f"{p}.norm1.bias", (H,), "norm"),
            TensorSpec(f"{p}.norm2.weight", (H,), "norm"), TensorSpec(f"{p}.norm2.bias", (H,), "norm"),
            TensorSpec(f"{p}.ls1", (H,), "other"), TensorSpec(f"{p}.ls2", (H,), "other"),
        ]
        if vc.get("qk_normalization"):
            T += [TensorSpec(f"{p}.attn.q_norm.weight", (H,), "norm"), TensorSpec(f"{p}.attn.k_norm.weight", (H,), "norm")]
    r = cfg.get("downsample_ratio", 0.5)
    pin = int(H * int(round(1 / r)) ** 2)
    T += [
        TensorSpec("mlp1.0.weight", (pin,), "norm"), TensorSpec("mlp1.0.bias", (pin,), "norm"),
        TensorSpec("mlp1.1.weight", (llm_hidden, pin), "linear"), TensorSpec("mlp1.1.bias", (llm_hidden,), "bias"),
        TensorSpec("mlp1.3.weight", (llm_hidden, llm_hidden), "linear"),
        TensorSpec("mlp1.3.bias", (llm_hidden,), "bias"),
    ]
    return tuple(T), ("vision tower (InternViT) and mlp1 projector counted from vision_config",)


# ------------------------------------------------------------------------------------------ from safetensors

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
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "catalog", "not_linear.json")
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
