"""Which engine runs a model and what the plan gives a vLLM replica (planner.model.engines, planner.model.engines.vllm).
Golden numbers: vLLM 0.32's own KV capacity for the shipped model (tests/integration/test_engines.py checks the
engine's report against these formulas) and its CPU backend's block size."""

import pytest

from planner.model.engines import pick_engine
from planner.model.engines.vllm import kv_tokens_vllm, vllm_block_size, vllm_quantization, vllm_settings
from planner.errors import InputError
from planner.model.engines import estimate_replica
from planner.model.spec import load_spec

BOTH = frozenset({"transformers", "vllm"})
ONLY_T = frozenset({"transformers"})


def test_auto_takes_vllm_where_it_runs_the_scheme_and_is_installed():
    assert pick_engine("auto", "bf16", BOTH)[0] == "vllm"
    assert pick_engine("auto", "fp8", BOTH)[0] == "vllm"
    eng, why = pick_engine("auto", "int4", BOTH)
    assert eng == "transformers" and "not a scheme vLLM runs" in why
    eng, why = pick_engine("auto", "bf16", ONLY_T)
    assert eng == "transformers" and "make vllm" in why
    eng, why = pick_engine("auto", "gguf", BOTH)
    assert eng == "transformers" and "llama-cpp-python is not installed" in why
    assert pick_engine("auto", "gguf", BOTH | {"llamacpp"})[0] == "llamacpp"
    assert pick_engine("auto", "bf16", BOTH | {"llamacpp"})[0] == "vllm"


def test_llamacpp_runs_gguf_only_and_says_how_to_install_it():
    with pytest.raises(InputError, match=r"models\[m\]\.engine llamacpp runs GGUF files, not quantization bf16"):
        pick_engine("llamacpp", "bf16", BOTH | {"llamacpp"}, "m")
    with pytest.raises(InputError, match="make venv"):
        pick_engine("llamacpp", "gguf", BOTH, "m")
    assert pick_engine("transformers", "gguf", BOTH | {"llamacpp"})[0] == "transformers"


def test_asking_vllm_for_bitsandbytes_or_without_vllm_says_why_and_the_fix():
    with pytest.raises(InputError, match=r"models\[m\]\.engine vllm cannot run quantization nf4.*engine: transformers"):
        pick_engine("vllm", "nf4", BOTH, "m")
    with pytest.raises(InputError, match="make vllm"):
        pick_engine("vllm", "bf16", ONLY_T, "m")
    with pytest.raises(InputError, match="use auto, transformers, vllm, llamacpp or sim"):
        pick_engine("tensorrt", "bf16", BOTH)


def test_vllm_kv_is_whole_blocks_of_every_sequence():
    # vLLM 0.32's CPU backend with kv_cache_memory_bytes = 8 MiB on the shipped model reported 4,096 tokens in
    # 32 blocks of 128: 2,048 bytes per token over its 4 layers (2 x 2 kv heads x 64 dims x 2 bytes x 4 layers)
    spec = load_spec("models/tiny-chat")
    est = estimate_replica(spec, quant="bf16", max_model_len=256, max_num_seqs=8, device="cpu", engine="vllm")
    assert est.detail["kv_cache"] == {"tokens": 2048, "block_size": 128, "per_token_all_layers": 2048, "blocks": 16}
    assert est.kv_cache == 2048 * 2048 and est.engine == "vllm"
    assert kv_tokens_vllm(200, 3, 32) == 3 * 224 and kv_tokens_vllm(256, 1, 128) == 256
    assert vllm_block_size("cpu") == 128 and vllm_block_size("cuda") == 32 and vllm_block_size("cpu", mla=True) == 16
    gpu = estimate_replica(spec, quant="bf16", max_model_len=200, max_num_seqs=3, device="cuda", engine="vllm")
    assert gpu.detail["kv_cache"]["tokens"] == 672 and gpu.kv_cache == 672 * 2048
    assert gpu.detail["runtime_overhead"]["cuda_graphs"] == 0 and any("enforce_eager" in n for n in gpu.notes)


def test_vllm_refuses_bitsandbytes_in_the_estimate():
    spec = load_spec("models/tiny-chat")
    with pytest.raises(InputError, match="removed bitsandbytes"):
        estimate_replica(spec, quant="int8", engine="vllm")


def test_vllm_settings_hold_the_replica_to_its_share():
    s = vllm_settings(planned_bytes=6 * 2**30, device_total_bytes=24 * 2**30, kv_cache_bytes=2**30, kv_tokens=8192,
                      block_size=32, max_model_len=4096, max_num_seqs=2, prefill_tokens=4096, dtype="bf16",
                      quantization=None)
    assert s.gpu_memory_utilization == 0.25 and s.kv_cache_memory_bytes == 2**30 and s.enforce_eager
    kw = s.engine_kwargs()
    assert kw["dtype"] == "bfloat16" and "quantization" not in kw and "kv_cache_tokens" not in kw
    assert kw["max_num_batched_tokens"] == 4096 and kw["block_size"] == 32
    with pytest.raises(InputError, match="cannot fit"):
        vllm_settings(planned_bytes=30 * 2**30, device_total_bytes=24 * 2**30, kv_cache_bytes=1, kv_tokens=1,
                      block_size=32, max_model_len=1, max_num_seqs=1, prefill_tokens=1, dtype="bf16", quantization=None)


def test_vllm_quantization_argument():
    assert vllm_quantization("bf16", None) is None
    assert vllm_quantization("fp8", None) == "fp8"  # a float checkpoint quantized at load
    assert vllm_quantization("awq", "awq") is None  # vLLM reads the checkpoint's own
    with pytest.raises(InputError, match="cannot quantize a float checkpoint to awq"):
        vllm_quantization("awq", None, "m")
