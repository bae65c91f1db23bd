"""Whole-replica estimates against published GPU measurements: Qwen2.5 speed benchmark (A100 80GB, transformers,
batch 1, input length 1, 2048 generated tokens, torch.cuda.max_memory_allocated in GiB; published-figures.md
section 4). max_memory_allocated has no CUDA context or allocator slack, so it is compared with
weights + kv_cache + activations. Target from the estimator issue: within 5%, never under by more than 2%."""

import pytest

from planner.model.engines import estimate_replica
from planner.model.spec import load_spec

GiB = 1024**3


@pytest.mark.parametrize(
    "name,quant,bits,measured",
    [
        ("Qwen/Qwen2.5-7B-Instruct", "bf16", None, 14.38),
        ("Qwen/Qwen2.5-7B-Instruct", "gptq", 8, 8.42),
        ("Qwen/Qwen2.5-7B-Instruct", "gptq", 4, 5.52),
        ("Qwen/Qwen2.5-7B-Instruct", "awq", 4, 5.39),
        ("Qwen/Qwen2.5-32B-Instruct", "bf16", None, 61.58),
        ("Qwen/Qwen2.5-32B-Instruct", "gptq", 8, 33.56),
        ("Qwen/Qwen2.5-32B-Instruct", "gptq", 4, 18.94),
        ("Qwen/Qwen2.5-32B-Instruct", "awq", 4, 18.67),
    ],
)
def test_allocated_bytes_match_qwen_benchmark(name, quant, bits, measured):
    est = estimate_replica(load_spec(name), quant=quant, bits=bits, max_model_len=2049, max_num_batched_tokens=1)
    allocated = (est.weights + est.kv_cache + est.activations) / GiB
    err = (allocated - measured) / measured
    assert -0.02 <= err <= 0.05, f"{allocated:.2f} GiB vs measured {measured} GiB ({100 * err:+.1f}%)"
