"""A ModelSpec from config.json alone: shapes derived per architecture family, with the module names and shapes
transformers 5 builds."""

from __future__ import annotations


from planner.errors import ModelSpecError
from planner.model.spec.types import ArchDims, ModelSpec, TensorSpec

_DTYPE_NAMES = {
    "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
}


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

