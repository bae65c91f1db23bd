"""planner/model/engines/llamacpp.py: the llama.cpp replica's terms, pure (no llama_cpp import). The compute-buffer formula is
checked against llama.cpp's own reports measured here (tests/unit/data/llamacpp-compute-cpu-2026-12-04.json); the
other terms against live llama.cpp in tests/serve/test_llamacpp.py."""

from __future__ import annotations

import json
import os

import pytest

from planner.errors import InputError
from planner.model.engines.llamacpp import (compute_buffer_bytes, gpu_weight_bytes, kv_buffer_bytes, llamacpp_settings,
                              n_ctx_seq, output_buffer_bytes)
from planner.model.engines import estimate_replica
from planner.model.estimate import CPU_PROCESS_BYTES, CUDA_CONTEXT_BYTES
from planner.model.spec import ArchDims, ModelSpec, TensorSpec, load_spec

DATA = os.path.join(os.path.dirname(__file__), "data", "llamacpp-compute-cpu-2026-12-04.json")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spec_of(hidden_size, intermediate_size, num_heads, num_kv_heads, vocab_size, num_layers, tied=True) -> ModelSpec:
    dims = ArchDims(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    head_dim=hidden_size // num_heads, intermediate_size=intermediate_size, vocab_size=vocab_size)
    def t(name, shape, dtype, nbytes):
        return TensorSpec(name, shape, "other", stored_dtype=dtype, stored_bytes=nbytes)

    tensors = [t("token_embd.weight", (vocab_size, hidden_size), "Q8_0", 1000),
               t("output_norm.weight", (hidden_size,), "F32", 4 * hidden_size)]
    if not tied:
        tensors.append(t("output.weight", (vocab_size, hidden_size), "Q8_0", 1000))
    tensors += [t(f"blk.{i}.ffn_up.weight", (intermediate_size, hidden_size), "Q8_0", 500) for i in range(num_layers)]
    return ModelSpec(name="m", model_type="llama", architecture="llama", source="gguf", dims=dims,
                     tensors=tuple(tensors), config_dtype="fp16", tied_embeddings=tied, checkpoint_quant=None)


def test_context_is_one_padded_stream_per_sequence():
    assert [n_ctx_seq(x) for x in (1, 256, 257, 1000, 4096)] == [256, 256, 512, 1024, 4096]
    st = llamacpp_settings(max_model_len=1000, max_num_seqs=3, prefill_tokens=1000, n_gpu_layers=0)
    assert (st.n_ctx_seq, st.n_ctx, st.n_seq_max, st.n_outputs_max) == (1024, 3072, 3, 3)
    assert (st.n_batch, st.n_ubatch) == (1000, 512)  # the longest prompt in one logical batch; llama.cpp's 512
    small = llamacpp_settings(max_model_len=128, max_num_seqs=16, prefill_tokens=128, n_gpu_layers=5)
    assert (small.n_batch, small.n_ubatch, small.n_gpu_layers) == (128, 128, 5)
    with pytest.raises(InputError, match="max_num_seqs must be a positive integer"):
        llamacpp_settings(max_model_len=128, max_num_seqs=0, prefill_tokens=128, n_gpu_layers=0)


def test_kv_and_output_buffers():
    s = spec_of(128, 384, 2, 2, 4096, 4)
    # llama.cpp reported "CPU KV buffer size = 2.00 MiB" and "CPU output buffer size = 0.06 MiB" for n_ctx 1024,
    # 4 sequences of the shipped model (4 layers, 2 kv heads x 64, f16)
    assert kv_buffer_bytes(s, 1024) == 2 * 2**20
    assert output_buffer_bytes(s, 4) == 65536


def test_compute_buffer_within_2_percent_of_llama_cpp_reports():
    data = json.load(open(DATA))
    worst = 0.0
    for row in data["rows"]:
        spec = spec_of(**data["models"][row["model"]])
        est = compute_buffer_bytes(spec, n_ubatch=row["n_ubatch"], n_ctx_seq=row["n_ctx_seq"],
                                   n_outputs_max=row["n_seq_max"])
        reported = row["compute_mib"] * 2**20
        err = abs(est - reported) / reported
        worst = max(worst, err)
        assert err <= 0.02 or abs(est - reported) <= 5243, (row, est)  # logged with two decimals of MiB
    assert worst < 0.01


def test_gpu_weights_leave_the_input_embeddings_on_the_cpu():
    tied, untied = spec_of(128, 384, 2, 2, 4096, 2, tied=True), spec_of(128, 384, 2, 2, 4096, 2, tied=False)
    # all layers offloaded: token_embd stays on the CPU; a tied output is loaded again for the GPU
    assert gpu_weight_bytes(tied) == 512 + 2 * 500 + 1000
    assert gpu_weight_bytes(untied) == 512 + 2 * 500 + 1000


def test_estimate_is_the_sum_of_the_buffers():
    spec = load_spec(os.path.join(ROOT, "models", "tiny-chat", "tiny-chat-Q8_0.gguf"))
    cpu = estimate_replica(spec, max_model_len=256, max_num_seqs=8, device="cpu", engine="llamacpp")
    b = cpu.detail["llamacpp_buffers"]
    assert cpu.engine == "llamacpp" and cpu.weights == b["model"] == os.path.getsize(
        os.path.join(ROOT, "models", "tiny-chat", "tiny-chat-Q8_0.gguf")) - 129888  # the file less its header
    assert cpu.total == b["model"] + b["kv"] + b["compute"] + b["output"] + CPU_PROCESS_BYTES
    assert cpu.detail["llamacpp"]["n_gpu_layers"] == 0
    gpu = estimate_replica(spec, max_model_len=256, max_num_seqs=8, device="cuda", engine="llamacpp")
    assert gpu.detail["llamacpp"]["n_gpu_layers"] == 5  # 4 blocks + the output layer
    assert gpu.total == gpu_weight_bytes(spec) + b["kv"] + b["compute"] + CUDA_CONTEXT_BYTES
    assert gpu.detail["host_memory"]["output_buffer"] == b["output"]


def test_llamacpp_runs_gguf_only():
    spec = load_spec(os.path.join(ROOT, "models", "tiny-chat"))
    with pytest.raises(InputError, match="engine llamacpp runs GGUF files"):
        estimate_replica(spec, quant="bf16", max_model_len=256, engine="llamacpp")


def test_a_gpu_share_below_the_model_gives_a_partial_n_gpu_layers():
    from planner.errors import InfeasiblePlanError
    from planner.model.engines.llamacpp import buffers, decide_gpu_layers, layer_bytes

    spec = load_spec(os.path.join(ROOT, "models", "tiny-chat", "tiny-chat-Q8_0.gguf"))
    st = llamacpp_settings(max_model_len=256, max_num_seqs=8, prefill_tokens=256, n_gpu_layers=5)
    full = estimate_replica(spec, max_model_len=256, max_num_seqs=8, device="cuda", engine="llamacpp")
    ctx = CUDA_CONTEXT_BYTES
    d = decide_gpu_layers(spec, st, model="m", budget_bytes=full.total, fixed_gpu_bytes=ctx)
    assert (d.mode, d.n_gpu_layers, d.max_n_gpu_layers) == ("gpu", 5, 5) and d.gpu_bytes == full.total
    blocks, output, embd = layer_bytes(spec)
    assert len(blocks) == 4 and sum(blocks) + output + embd - embd == gpu_weight_bytes(spec)  # tied: embd twice
    kv_layer = buffers(spec, st).kv // 4
    fixed = buffers(spec, st).compute + ctx
    # room for the output layer and the last two blocks (llama.cpp offloads the output layer first), not three
    budget = fixed + output + blocks[3] + blocks[2] + 2 * kv_layer + blocks[1] // 2
    d = decide_gpu_layers(spec, st, model="m", budget_bytes=budget, fixed_gpu_bytes=ctx, offload_cpu_bytes=2**30)
    assert (d.mode, d.n_gpu_layers) == ("offload", 3) and "3 of the 5 layers" in d.reason
    assert d.cpu_bytes == embd + blocks[0] + blocks[1] + 2 * kv_layer
    with pytest.raises(InfeasiblePlanError, match=r"hold 3 of its 5 llama.cpp layers.*set offload.cpu_memory to at "
                                                  r"least"):
        decide_gpu_layers(spec, st, model="m", budget_bytes=budget, fixed_gpu_bytes=ctx, offload_cpu_bytes=0)
    none = decide_gpu_layers(spec, st, model="m", budget_bytes=None, why_no_cuda="Ray assigned no GPU")
    assert (none.mode, none.n_gpu_layers) == ("cpu", 0) and "Ray assigned no GPU" in none.reason
