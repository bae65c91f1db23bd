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
