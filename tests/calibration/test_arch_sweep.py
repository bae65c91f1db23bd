"""A fixed sample of benchmarks/arch_sweep.py (every decoder-only ``*ForCausalLM`` of the installed transformers):
architectures the planner does not derive from config.json, built tiny by transformers, loaded with bf16, int8, nf4,
fp4 and nf4 + double quant; the estimate from the safetensors headers must equal the resident bytes. The whole sweep
and its table: `python -m benchmarks.arch_sweep`, docs/estimate-accuracy.md."""

from __future__ import annotations


import pytest

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from benchmarks.arch_sweep import SCHEMES, causal_lm_architectures, sweep_one  # noqa: E402

# learned position tables (opt, biogpt, electra), ALiBi (bloom), a sin/cos buffer (gptj), a causal-mask buffer
# (gpt_bigcode), partial rotary (phi, stablelm), config spellings (bloom's n_layer/n_head), rotary buffers of
# families not derived from config.json (cohere, olmo, starcoder2, bitnet), Linear subclasses bitsandbytes leaves
# alone (falcon, planner/catalog/not_linear.json), an embedding named `embeddings` (xlstm), a Linear under the
# `lm_head.` prefix that transformers does quantize (roberta's lm_head.dense)
SAMPLE = ("opt", "biogpt", "bloom", "gptj", "gpt_bigcode", "phi", "stablelm", "cohere", "olmo", "starcoder2",
          "bitnet", "electra", "falcon", "xlstm", "roberta")


def test_the_sample_is_in_the_installed_transformers():
    have = {mt for mt, _ in causal_lm_architectures()}
    assert set(SAMPLE) <= have, set(SAMPLE) - have


@pytest.mark.parametrize("arch", SAMPLE)
def test_headers_estimate_is_byte_exact(arch, tmp_path):
    cls = dict(causal_lm_architectures())[arch]
    row = sweep_one(arch, cls, str(tmp_path), per_arch_s=120)
    assert row["built"], row.get("error")
    assert set(row["schemes"]) == set(SCHEMES)
    for scheme, cell in row["schemes"].items():
        assert cell.get("headers") == 0, (arch, scheme, cell)
