"""Parameter counts and checkpoint sizes of real configs against published figures
(planner/catalog/published-figures.md: HF API safetensors totals, model cards, hub file sizes). Never our own output."""

import pytest

from planner.model.engines import estimate_replica
from planner.model.spec import load_spec

# HF API `safetensors.total` (exact element counts of the bf16 checkpoints)
EXACT = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,  # same architecture as Meta-Llama-3-8B / R1-Distill-Llama-8B
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": 8_030_261_248,
    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
    "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B": 32_763_876_352,
    "Qwen/Qwen2.5-32B-Instruct": 32_763_876_352,  # same architecture as the R1 distill (its base model)
}


@pytest.mark.parametrize("name,count", EXACT.items())
def test_exact_param_counts(name, count):
    assert load_spec(name).params_total == count


def test_internvl_total_size_bytes():
    # model.safetensors.index.json metadata total_size of OpenGVLab/InternVL3_5-8B (bf16 everywhere)
    est = estimate_replica(load_spec("OpenGVLab/InternVL3_5-8B"), quant="bf16", max_model_len=1)
    buffers = est.detail["weights"]["buffer (buffers)"]
    assert est.weights - buffers == 17_056_636_928


def test_gpt_oss_stored_elements():
    # HF API: BF16 1,804,459,584 elements; U8 19,707,494,400 (MXFP4 blocks counted 2 per byte + scales)
    spec = load_spec("openai/gpt-oss-20b")
    est = estimate_replica(spec, max_model_len=1)
    assert est.params_unquantized == 1_804_459_584
    # U8 figure = quantized weights + one e8m0 scale per 32 weights
    assert est.params_quantized + est.params_quantized // 32 == 19_707_494_400


@pytest.mark.parametrize(
    "name,billions,tol",
    [
        ("deepseek-ai/DeepSeek-V3", 671, 0.5),  # "671B of the Main Model weights" (MTP excluded)
        ("deepseek-ai/DeepSeek-R1", 671, 0.5),
        ("Qwen/Qwen3-8B", 8.2, 0.05),
        ("microsoft/Phi-3-mini-4k-instruct", 3.82, 0.005),  # shards 4.97 GB + 2.67 GB in bf16
    ],
)
def test_rounded_param_counts(name, billions, tol):
    assert abs(load_spec(name).params_total / 1e9 - billions) <= tol


def test_qwen25_7b_non_embedding():
    # model card: "Number of Parameters: 7.61B", "Non-Embedding: 6.53B"
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    emb = sum(t.numel for t in spec.tensors if t.role in ("embedding", "lm_head"))
    assert round((spec.params_total - emb) / 1e9, 2) == 6.53


@pytest.mark.parametrize(
    "name,quant,gb",
    [
        # Qwen/Qwen2.5-7B-Instruct-AWQ: shards 4 GB + 1.57 GB
        ("Qwen/Qwen2.5-7B-Instruct", "awq", 5.57),
        # hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4: shards 4.68 GB + 1.05 GB
        ("meta-llama/Llama-3.1-8B-Instruct", "awq", 5.73),
        # microsoft/Phi-3-mini-4k-instruct bf16: shards 4.97 GB + 2.67 GB
        ("microsoft/Phi-3-mini-4k-instruct", "bf16", 7.64),
    ],
)
def test_checkpoint_sizes(name, quant, gb):
    est = estimate_replica(load_spec(name), quant=quant, max_model_len=1)
    # hub sizes are rounded to 10 MB; allow the rounding plus 0.2%
    assert abs(est.weights / 1e9 - gb) <= 0.01 + 0.002 * gb
