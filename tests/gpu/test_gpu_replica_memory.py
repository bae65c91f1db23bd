"""On a CUDA GPU: a replica of the shipped model loads where decide_load says, its resident bytes equal the
estimate, and its torch peak over a full-length prefill stays within the planned weights, KV cache, activations and
library workspaces. Skipped without CUDA."""

import os

import pytest

pytestmark = pytest.mark.gpu
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models",
                    "tiny-chat")


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_tiny_replica_on_gpu(scheme):
    import torch

    from planner.decisions import decide_load
    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec
    from serve.engines.loader import load_model
    from serve.engines.memory_probe import resident_bytes

    est = estimate_replica(load_spec(TINY), quant=scheme, max_model_len=256, max_num_seqs=8, device="cuda")
    free, total = torch.cuda.mem_get_info(0)
    d = decide_load(model="tiny", planned_bytes=est.total, weights_bytes=est.weights, cuda_available=True,
                    gpu_index=0, gpu_total_bytes=total, gpu_free_bytes=free)
    assert d.mode == "gpu"
    torch.cuda.reset_peak_memory_stats()
    model, tok = load_model(TINY, quantization=scheme, device="cuda", gpu_index=0)
    assert resident_bytes(model, device="cuda")["total"] == est.weights
    with torch.inference_mode():
        ids = torch.randint(0, model.config.vocab_size, (8, 255), device="cuda")
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    # cuBLAS's workspace (32 MiB on an H200) comes out of torch's allocator too
    workspaces = est.detail["runtime_overhead"]["library_workspaces"]
    assert torch.cuda.max_memory_allocated() <= est.weights + est.kv_cache + est.activations + workspaces
