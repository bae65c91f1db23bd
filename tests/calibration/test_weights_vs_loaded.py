"""Calibration against reality: random-weight models of several architectures, saved as safetensors, loaded on CPU
by transformers with bitsandbytes int8 / nf4 / fp4 / nf4+double-quant and bf16. The planner's ``bytes.weights``
must equal the measured resident bytes (unique storages of parameters, buffers and quantization state) within 0.5%
(the aim, and today's result, is the exact byte count).

Both planner sources are checked: shapes read from the safetensors headers, and shapes derived from config.json
alone (the config path must agree with what transformers builds)."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from planner.memory import estimate_replica  # noqa: E402
from planner.spec import load_spec  # noqa: E402
from serve.memory_probe import resident_bytes  # noqa: E402

# All Linear widths divisible by 64 (bitsandbytes 4-bit on CPU needs it).
BASE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
FAMILIES = {
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
}
SCHEMES = {
    "bf16": None,
    "int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    out = {}
    warnings.filterwarnings("ignore")
    for fam, extra in FAMILIES.items():
        kw = dict(BASE)
        kw.update({k: v for k, v in extra.items() if k != "_type"})
        kw = {k: v for k, v in kw.items() if v is not None}
        cfg = AutoConfig.for_model(extra.get("_type", fam), **kw)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
        d = tmp_path_factory.mktemp(fam)
        model.save_pretrained(d)
        cfg_only = tmp_path_factory.mktemp(fam + "-config")
        shutil.copy(os.path.join(d, "config.json"), cfg_only / "config.json")
        out[fam] = (str(d), str(cfg_only / "config.json"))
    return out


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_match_loaded_model(saved_models, family, scheme):
    model_dir, config_json = saved_models[family]
    qc = SCHEMES[scheme]() if SCHEMES[scheme] else None
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=qc,
                                                  device_map="cpu")
    measured = resident_bytes(loaded)["total"]
    for source in (model_dir, config_json):
        est = estimate_replica(load_spec(source), quant=scheme, dtype="bf16", max_model_len=64, device="cpu")
        assert abs(est.weights - measured) <= 0.005 * measured, (source, est.weights, measured)
        # today the estimate is exact to the byte; keep it that way
        assert est.weights == measured, (source, est.detail["weights"], measured)


def test_config_spec_has_transformers_shapes(saved_models):
    """Config-derived tensors have the names and shapes transformers 5 builds (parameters and buffers)."""
    for fam, extra in FAMILIES.items():
        model_dir, config_json = saved_models[fam]
        cfg = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        built = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=True)}
        built.update({n: tuple(b.shape) for n, b in model.named_buffers()})
        spec = {t.name: t.shape for t in load_spec(config_json).tensors}
        assert spec == built, fam
