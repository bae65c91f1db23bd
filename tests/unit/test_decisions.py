"""Pure run-time decisions: where a replica loads, Ray's GPU fraction. (Autoscaling bounds: tests/unit/test_rollout.py.)"""

import pytest

from planner.decisions import OFFLOAD_SLACK_MIN, decide_load, num_gpus_for
from planner.errors import InfeasiblePlanError

GiB = 1024**3


def test_no_cuda_loads_on_cpu():
    d = decide_load(model="m", planned_bytes=4 * GiB, weights_bytes=3 * GiB, cuda_available=False,
                    why_no_cuda="fake GPU from ray.init(num_gpus=2)")
    assert d.mode == "cpu" and "fake GPU" in d.reason


def test_enough_free_loads_on_gpu_capped_at_share():
    d = decide_load(model="m", planned_bytes=6 * GiB, weights_bytes=4 * GiB, cuda_available=True, gpu_index=1,
                    gpu_total_bytes=24 * GiB, gpu_free_bytes=10 * GiB)
    assert d.mode == "gpu" and d.gpu_index == 1
    assert d.memory_fraction == 0.25  # 6/24 exactly
    assert d.memory_fraction * 24 * GiB >= 6 * GiB


def test_fraction_rounds_up():
    assert num_gpus_for(1, 3) == 0.3334
    assert num_gpus_for(6 * GiB, 24 * GiB) == 0.25
    assert num_gpus_for(30 * GiB, 24 * GiB) == 1.0


def test_low_free_offloads_weights_only():
    # planned 10 GiB: 8 GiB weights + 2 GiB KV/activations/runtime; only 7 GiB free
    d = decide_load(model="m", planned_bytes=10 * GiB, weights_bytes=8 * GiB, cuda_available=True, gpu_index=0,
                    gpu_total_bytes=24 * GiB, gpu_free_bytes=7 * GiB, offload_cpu_bytes=16 * GiB)
    assert d.mode == "offload"
    room = 5 * GiB
    slack = max(int(0.1 * room), OFFLOAD_SLACK_MIN)
    assert d.gpu_weight_bytes == room - slack
    assert d.cpu_weight_bytes == 8 * GiB - (room - slack)
    assert d.max_memory == {0: room - slack, "cpu": 16 * GiB}
    assert "offloads" in d.reason and "7.0 GiB free" in d.reason


def test_low_free_without_offload_fails_with_numbers():
    with pytest.raises(InfeasiblePlanError, match=r"3\.0 GiB free .* 10\.0 GiB .*7\.0 GiB short.*offload"):
        decide_load(model="m", planned_bytes=10 * GiB, weights_bytes=8 * GiB, cuda_available=True, gpu_index=0,
                    gpu_total_bytes=24 * GiB, gpu_free_bytes=3 * GiB)


def test_offload_budget_too_small():
    with pytest.raises(InfeasiblePlanError, match="raise offload.cpu_memory"):
        decide_load(model="m", planned_bytes=10 * GiB, weights_bytes=8 * GiB, cuda_available=True, gpu_index=0,
                    gpu_total_bytes=24 * GiB, gpu_free_bytes=4 * GiB, offload_cpu_bytes=1 * GiB)


def test_gpu_too_small_even_for_kv_goes_cpu():
    d = decide_load(model="m", planned_bytes=10 * GiB, weights_bytes=8 * GiB, cuda_available=True, gpu_index=0,
                    gpu_total_bytes=24 * GiB, gpu_free_bytes=1 * GiB, offload_cpu_bytes=16 * GiB)
    assert d.mode == "cpu" and d.cpu_weight_bytes == 8 * GiB


# ----------------------------------------------------------------------------------------------- failed loads

from planner.decisions import backoff_s, classify_load_failure, next_load_decision  # noqa: E402


@pytest.mark.parametrize("exc_type,message,kind", [
    ("OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.68 GiB total capacity)",
     "gpu_memory"),
    ("RuntimeError", "CUDA error: out of memory", "gpu_memory"),
    ("MemoryError", "", "host_memory"),
    ("RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3 bytes. Cannot allocate "
                     "memory", "host_memory"),
    ("OSError", "./m does not appear to have a file named config.json", "files"),
    ("SafetensorError", "Error while deserializing header: HeaderTooLarge", "files"),
    ("ValueError", "something else", "other"),
])
def test_failed_loads_are_told_apart(exc_type, message, kind):
    assert classify_load_failure(exc_type, message) == kind


def args(**kw):
    base = dict(model="m", planned_bytes=10 * GiB, weights_bytes=8 * GiB, cuda_available=True, gpu_index=0,
                gpu_total_bytes=24 * GiB, gpu_free_bytes=6 * GiB, offload_cpu_bytes=16 * GiB)
    base.update(kw)
    return base


def test_gpu_out_of_memory_steps_down_to_offload_then_cpu():
    d = next_load_decision(failed=["gpu"], failure="gpu_memory", **args())
    assert d.mode == "offload" and d.cpu_weight_bytes > 0 and d.gpu_weight_bytes < 8 * GiB
    assert "after gpu memory in mode gpu" in d.reason
    d = next_load_decision(failed=["gpu", "offload"], failure="gpu_memory", **args())
    assert d.mode == "cpu" and d.cpu_weight_bytes == 8 * GiB


def test_step_down_goes_only_as_far_as_deploy_yaml_allows():
    # no offload.cpu_memory: neither offload nor CPU for a GPU model
    assert next_load_decision(failed=["gpu"], failure="gpu_memory", **args(offload_cpu_bytes=0)) is None
    # offload allowed, but not enough RAM for every weight: offload only
    d = next_load_decision(failed=["gpu"], failure="gpu_memory", **args(offload_cpu_bytes=5 * GiB))
    assert d.mode == "offload"
    assert next_load_decision(failed=["gpu", "offload"], failure="gpu_memory",
                              **args(offload_cpu_bytes=5 * GiB)) is None
    # missing or corrupt files: no placement helps; a CPU replica that ran out of RAM has nowhere to go
    assert next_load_decision(failed=["gpu"], failure="files", **args()) is None
    assert next_load_decision(failed=["cpu"], failure="host_memory", **args(cuda_available=False)) is None


def test_a_model_that_cannot_load_backs_off():
    assert [backoff_s(n) for n in range(0, 7)] == [0.0, 5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
