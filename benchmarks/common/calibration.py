"""Random-weight models for calibrating the planner against real loads (tests/calibration, benchmarks).

Every family is built by transformers itself from a tiny config (all Linear widths divisible by 64, which
bitsandbytes 4-bit needs on CPU), saved as bf16 safetensors, then loaded with the loader's own quantization
configs. Nothing here is downloaded."""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from serve.engines.loader import bnb_config
from serve.engines.memory_probe import resident_bytes

BASE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "llama_tied_bias": {"_type": "llama", "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
    "mistral": {"sliding_window": 64},
    "qwen2": {},
    "qwen3": {"head_dim": 64},
    "gemma2": {"head_dim": 64},
    "phi3": {},
    "gpt_neox": {"num_key_value_heads": None, "rotary_pct": 0.5},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 64, "num_experts_per_tok": 2},
    "deepseek_v3": {"n_routed_experts": 4, "moe_intermediate_size": 64, "q_lora_rank": 64, "kv_lora_rank": 64,
                    "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64, "first_k_dense_replace": 1,
                    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "gpt_oss": {"num_local_experts": 4, "head_dim": 64, "num_experts_per_tok": 2},
}


def save_random_model(family: str, out_dir: str, **overrides) -> tuple[str, str]:
    """Save a random bf16 model of ``family``; returns (model_dir, a config.json-only copy)."""
    extra = FAMILIES[family]
    kw = dict(BASE)
    kw.update({k: v for k, v in extra.items() if k != "_type"})
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not None}
    cfg = AutoConfig.for_model(extra.get("_type", family), **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model_dir = os.path.join(out_dir, family)
    model.save_pretrained(model_dir)
    cfg_dir = os.path.join(out_dir, family + "-config-only")
    os.makedirs(cfg_dir, exist_ok=True)
    shutil.copy(os.path.join(model_dir, "config.json"), os.path.join(cfg_dir, "config.json"))
    return model_dir, os.path.join(cfg_dir, "config.json")


def load_and_measure(model_dir: str, scheme: str) -> dict:
    """Load ``model_dir`` on CPU the way a replica would and measure its resident tensor bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                     quantization_config=bnb_config(scheme), device_map="cpu")
    return resident_bytes(model)
