"""The shipped default model, models/tiny-chat: files, size, format, loading, chat template, generation.

Fast (a few seconds: one bf16 load of a 1.4M-parameter model).  The bitsandbytes
int8/nf4 loads are marked slow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny-chat"
MAX_BYTES = 20 * 1024 * 1024
CODE_PROMPT = "def is_prime(n):"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What does json.dumps do?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map="cpu")
    return m.eval()


def test_shipped_files_present():
    names = {p.name for p in MODEL_DIR.iterdir()}
    for required in ("config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"):
        assert required in names, f"{required} missing from {MODEL_DIR}"
    has_template = "chat_template.jinja" in names or \
        "chat_template" in json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert has_template, "no chat template shipped"
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names), "only safetensors weights"


def test_size_within_budget():
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{total / 1e6:.1f} MB > 20 MiB"


def test_config_shape_and_dtype():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (128, 384, 4)
    assert cfg["num_attention_heads"] == 2 and cfg.get("head_dim", 64) == 64
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 4096
    # bitsandbytes 4-bit wants every Linear width divisible by 64.
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    widths = [cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
              cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim]
    assert all(w % 64 == 0 for w in widths), widths


def test_weights_are_bf16_safetensors():
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert keys and "lm_head.weight" not in keys  # tied to embed_tokens
        for k in keys:
            assert f.get_slice(k).get_dtype() in ("BF16", "bfloat16"), k


def test_tokenizer_special_tokens(tokenizer):
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert len(tokenizer) == 4096
    assert tokenizer.bos_token and tokenizer.eos_token and tokenizer.pad_token
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id or tokenizer.pad_token == tokenizer.eos_token
    ids = tokenizer(CODE_PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == CODE_PROMPT  # byte-level: lossless


def test_chat_template_renders_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == ("<|bos|><|system|>\nYou are a helpful assistant.<|eos|>\n"
                    "<|user|>\nWhat does json.dumps do?<|eos|>\n<|assistant|>\n")
    assert text.endswith("<|assistant|>\n")
    no_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    full = tokenizer.apply_chat_template(CHAT + [{"role": "assistant", "content": "Serialize obj."}],
                                         tokenize=False)
    assert full.endswith("<|assistant|>\nSerialize obj.<|eos|>\n")
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_loads_bf16_and_generates(model, tokenizer):
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    enc = tokenizer(CODE_PROMPT, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "greedy code continuation was empty"


def test_chat_generation_returns_text(model, tokenizer):
    enc = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=32, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    assert len(new) > 0
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def _bnb_generate(quant_config):
    pytest.importorskip("bitsandbytes")
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)  # int8 warns every forward; restored after, other tests read this logger
    try:
        tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
        m = transformers.AutoModelForCausalLM.from_pretrained(
            MODEL_DIR, quantization_config=quant_config, device_map={"": "cpu"})
        enc = tok(CODE_PROMPT, return_tensors="pt")
        out = m.generate(**enc, max_new_tokens=16, do_sample=False)
    finally:
        bnb_log.setLevel(level)
    return m, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_bnb_int8_cpu():
    import bitsandbytes as bnb

    m, text = _bnb_generate(transformers.BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(m.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert text.strip()


@pytest.mark.slow
def test_bnb_nf4_cpu():
    import bitsandbytes as bnb

    m, text = _bnb_generate(transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16))
    assert isinstance(m.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert text.strip()
