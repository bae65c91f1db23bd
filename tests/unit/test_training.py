"""Training memory: ZeRO model states (against the ZeRO paper's Figure 1) and Korthikanti et al. activations."""

from __future__ import annotations

import json

import pytest

from planner.errors import InputError
from planner.model.training import estimate_activation_memory, estimate_from_spec, estimate_training_memory, format_table

PSI = 7_500_000_000  # the ZeRO paper's example: Psi = 7.5B, K = 12, N_d = 64 (Figure 1; GB = 1e9)


@pytest.mark.parametrize(
    "stage,paper_gb,exact",
    [
        (0, 120.0, 16 * PSI),  # (2 + 2 + K) Psi
        (1, 31.4, 4 * PSI + 12 * PSI // 64),  # 2Psi + 2Psi + K Psi / N_d
        (2, 16.6, 2 * PSI + 14 * PSI // 64),  # 2Psi + (2 + K) Psi / N_d
        (3, 1.9, 16 * PSI // 64),  # (2 + 2 + K) Psi / N_d
    ],
)
def test_zero_paper_figure_1(stage, paper_gb, exact):
    m = estimate_training_memory(PSI, zero_stage=stage, n_gpus=64)
    assert m.total == exact
    assert round(m.total / 1e9, 1) == paper_gb
    assert m.k_bytes_per_param == 12
    # the K term is the fp32 master copy (4) + two Adam states (8)
    shard = PSI // 64
    assert m.master_weights == 4 * (shard if stage >= 1 else PSI)
    assert m.optimizer_states == 8 * (shard if stage >= 1 else PSI)
    assert m.gradients == 2 * (shard if stage >= 2 else PSI)
    assert m.weights == 2 * (shard if stage >= 3 else PSI)
    out = json.loads(json.dumps(m.to_json()))
    assert out["total"] == exact and out["zero_stage"] == stage


def test_optimizers_and_precision():
    # SGD with momentum: 2 + 2 + 4 (master) + 4 (momentum) bytes per param
    assert estimate_training_memory(1000, optimizer="sgd-momentum").total == 12_000
    assert estimate_training_memory(1000, optimizer="sgd").total == 8_000
    # bitsandbytes 8-bit AdamW: 2 one-byte states
    assert estimate_training_memory(1000, optimizer="adamw-8bit").optimizer_states == 2_000
    # fp32 training with AdamW: 4 + 4 + 8 = 16 bytes per param, no master copy
    fp32 = estimate_training_memory(1000, weight_dtype_bytes=4, mixed_precision=False)
    assert (fp32.weights, fp32.gradients, fp32.optimizer_states, fp32.master_weights) == (4000, 4000, 8000, 0)
    # Adafactor: factored second moments, ceil(2 * trainable / hidden) fp32 values
    ada = estimate_training_memory(4096 * 4096, optimizer="adafactor", hidden_size=4096)
    assert ada.optimizer_states == 2 * 4096 * 4
    assert estimate_training_memory(6400, optimizer="adafactor").optimizer_states == 6400 * 2 // 128 * 4
    # fp32 gradients with bf16 weights
    assert estimate_training_memory(1000, grad_dtype_bytes=4).gradients == 4000


def test_frozen_params_and_rounding():
    # LoRA-like: 1000 params, 10 trainable
    m = estimate_training_memory(1000, 10)
    assert (m.weights, m.gradients, m.optimizer_states, m.master_weights) == (2000, 20, 80, 40)
    # ZeRO-3 over 3 GPUs: shards are ceil(count / 3) elements
    z = estimate_training_memory(1000, 10, zero_stage=3, n_gpus=3)
    assert (z.weights, z.gradients, z.optimizer_states, z.master_weights) == (334 * 2, 4 * 2, 7 * 4, 4 * 4)
    assert estimate_training_memory(0).total == 0
    assert estimate_training_memory(100, activation_bytes=5).total == 1605


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3, got 4"),
        ({"zero_stage": True}, "zero_stage must be 0, 1, 2 or 3"),
        ({"n_gpus": 0}, "n_gpus must be >= 1, got 0"),
        ({"total_params": -1}, "total_params must be >= 0, got -1"),
        ({"trainable_params": -5}, "trainable_params must be >= 0, got -5"),
        ({"trainable_params": 2000}, "trainable_params 2000 exceeds total_params 1000"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'; use one of"),
        ({"weight_dtype_bytes": 4}, "set mixed_precision=False"),
        ({"weight_dtype_bytes": 0}, "weight_dtype_bytes must be >= 1"),
        ({"total_params": 1.5e9}, "total_params must be an int"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"total_params": 1000, **kwargs}
    with pytest.raises(InputError, match=match) as err:
        estimate_training_memory(args.pop("total_params"), **args)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_activations_gpt3_175b():
    # Korthikanti et al. 2022, GPT-3 175B: s=2048, h=12288, a=96, L=96, t=8, b=1.
    sbh = 2048 * 1 * 12288
    kw = {"seq_len": 2048, "micro_batch": 1, "hidden_size": 12288, "num_layers": 96, "num_heads": 96}
    kw["tensor_parallel"] = 8
    # sbh(10 + 24/t + 5as/(ht)) = sbh (10 + 3 + 10)
    none = estimate_activation_memory(**kw)
    assert none.per_layer == sbh * 23 == 578_813_952 and none.total == 96 * sbh * 23
    assert none.formula == "sbh(10 + 24/t + 5as/(ht))"
    # + sequence parallelism: sbh/t (34 + 5as/h) = sbh/8 * 114
    assert estimate_activation_memory(**kw, sequence_parallel=True).per_layer == sbh * 114 // 8
    # selective recomputation + sequence parallelism: 34 sbh / t
    assert estimate_activation_memory(**kw, sequence_parallel=True, recompute="selective").per_layer == 34 * sbh // 8
    assert estimate_activation_memory(**kw, recompute="selective").per_layer == sbh * 13
    # full recomputation keeps only the layer input: 2sbh
    assert estimate_activation_memory(**kw, recompute="full").per_layer == 2 * sbh
    json.dumps(none.to_json())


def test_activations_single_gpu():
    # sbh(34 + 5as/h) with s=4096, b=2, h=4096, a=32: 34 sbh + 5 a s^2 b
    m = estimate_activation_memory(4096, 2, 4096, 32, 32)
    assert m.per_layer == 34 * 4096 * 2 * 4096 + 5 * 32 * 4096 * 4096 * 2
    assert m.formula == "sbh(34 + 5as/h)" and m.total == 32 * m.per_layer
    with pytest.raises(InputError, match="recompute must be one of none, selective, full"):
        estimate_activation_memory(1, 1, 1, 1, 1, recompute="some")
    with pytest.raises(InputError, match="seq_len must be >= 1, got 0"):
        estimate_activation_memory(0, 1, 1, 1, 1)


def test_estimate_from_spec_and_table():
    class Dims:
        num_layers, hidden_size, num_heads = 2, 64, 4

    class Spec:
        name, params_total, dims = "tiny", 1_000_000, Dims()

    est = estimate_from_spec(Spec(), dtype="bf16", zero_stage=1, num_gpus=4, seq_len=128, micro_batch=2)
    act = estimate_activation_memory(128, 2, 64, 2, 4)
    assert est.activations == act and est.states.activations == act.total
    assert est.total == 2_000_000 + 2_000_000 + 12 * 250_000 + act.total
    assert "total per GPU" in format_table(est) and json.loads(json.dumps(est.to_json()))["total_bytes"] == est.total
    fp32 = estimate_from_spec(Spec(), dtype="fp32")
    assert fp32.states.master_weights == 0 and fp32.states.weights == 4_000_000
    with pytest.raises(InputError, match="training dtype must be one of bf16, fp16, fp32, got 'int4'"):
        estimate_from_spec(Spec(), dtype="int4")
