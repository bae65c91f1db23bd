"""KV-cache arithmetic against published figures (HF blog "Llama 3.1", KV cache in FP16, see
published-figures.md section 5). The blog's rows work out with "1k" = 1,024 tokens but "16k" = 16,000 and
"128k" = 128,000 tokens, and GB = GiB."""

import pytest

from planner.model.engines import estimate_replica
from planner.model.estimate import kv_cache_bytes
from planner.model.spec import load_spec

GiB = 1024**3


@pytest.mark.parametrize(
    "name,tokens,gib",
    [
        ("meta-llama/Llama-3.1-8B", 1024, 0.125),
        ("meta-llama/Llama-3.1-8B", 16_000, 1.95),
        ("meta-llama/Llama-3.1-8B", 128_000, 15.62),
        ("meta-llama/Llama-3.1-70B", 1024, 0.313),
        ("meta-llama/Llama-3.1-70B", 16_000, 4.88),
        ("meta-llama/Llama-3.1-70B", 128_000, 39.06),
    ],
)
def test_llama31_kv_cache_matches_blog(name, tokens, gib):
    kv, _ = kv_cache_bytes(load_spec(name), max_model_len=tokens, max_num_seqs=1, kv_bytes=2)
    assert abs(kv / GiB - gib) <= 0.006


def test_kv_scales_with_sequences_and_dtype():
    spec = load_spec("meta-llama/Llama-3.1-8B")
    one = estimate_replica(spec, max_model_len=2048, max_num_seqs=1).kv_cache
    assert estimate_replica(spec, max_model_len=2048, max_num_seqs=8).kv_cache == 8 * one
    assert estimate_replica(spec, max_model_len=2048, max_num_seqs=1, kv_dtype="fp8").kv_cache == one // 2


def test_sliding_window_layers_cap_tokens():
    # gemma-2-9b-it: 42 layers alternate sliding (window 4096) and full; 16 kv x 256... 8 kv heads x head_dim 256
    spec = load_spec("google/gemma-2-9b-it")
    kv, d = kv_cache_bytes(spec, max_model_len=8192, max_num_seqs=1, kv_bytes=2)
    per = 2 * 8 * 256 * 2
    assert d["sliding_layers"] == 21 and d["full_layers"] == 21
    assert kv == per * (21 * 8192 + 21 * 4096)


def test_gpt_oss_layer_types_from_config():
    spec = load_spec("openai/gpt-oss-20b")
    kv, d = kv_cache_bytes(spec, max_model_len=4096, max_num_seqs=1, kv_bytes=2)
    assert d["sliding_layers"] == 12 and d["sliding_window_tokens"] == 128
    assert kv == 2 * 8 * 64 * 2 * (12 * 4096 + 12 * 128)


def test_mla_full_vs_latent():
    spec = load_spec("deepseek-ai/DeepSeek-V3")
    full, _ = kv_cache_bytes(spec, max_model_len=1, max_num_seqs=1, kv_bytes=2)
    latent, _ = kv_cache_bytes(spec, max_model_len=1, max_num_seqs=1, kv_bytes=2, mla_latent=True)
    # transformers caches K = 128 heads x (128 + 64), V = 128 heads x 128; vLLM caches 512 + 64 per token
    assert full == 61 * 128 * (192 + 128) * 2
    assert latent == 61 * (512 + 64) * 2
