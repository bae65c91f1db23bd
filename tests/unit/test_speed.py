"""The speed model (planner/model/speed.py): its arithmetic against hand-computed values, the engine modules' fitted
numbers against the published Qwen2.5 table they were fitted on (benchmarks/data/qwen2.5-a100-batch1.csv), and the
refusals where a term is unknown."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
import subprocess
import sys

import pytest

from benchmarks.speed_fit import fit, load_rows, predict
from planner.errors import InputError
from planner.model.engines import ENGINES, estimate_replica, replica_speed, speed_of
from planner.model.quant import resolve_quant
from planner.model.spec import load_spec
from planner.model.speed import (DeviceSpeed, KernelSpeed, Work, decode_step, experts_touched, kernel_of, prefill,
                                 work_of)
from planner.placement.capacity import lookup_gpu

A100 = lookup_gpu("A100-80GB").speed()


@pytest.fixture(scope="module")
def rows():
    return load_rows()


def _errors(rows, engine):
    sp = speed_of(engine)
    return [predict(r, sp.kernels[r["kernel"]], sp.compute_eff, A100) / r["measured"] - 1
            for r in rows if r["engine"] == engine]


@pytest.mark.parametrize("engine,median_max,max_max", [("vllm", 0.02, 0.16), ("transformers", 0.06, 0.20)])
def test_engine_numbers_reproduce_the_published_table(rows, engine, median_max, max_max):
    errs = [abs(e) for e in _errors(rows, engine)]
    assert len(errs) >= 64
    assert statistics.median(errs) <= median_max, statistics.median(errs)
    assert max(errs) <= max_max, max(errs)


def test_engine_modules_hold_what_the_fit_gives(rows):
    """The constants in the engine modules are the fit's (rounded): a refit predicts every row within 0.5% of them."""
    fitted = fit(rows, A100)
    for r in rows:
        mine, refit = speed_of(r["engine"]), fitted[r["engine"]]
        a = predict(r, mine.kernels[r["kernel"]], mine.compute_eff, A100)
        b = predict(r, refit.kernels[r["kernel"]], refit.compute_eff, A100)
        assert abs(a / b - 1) < 0.005, (r["engine"], r["model"], r["quant"], r["input"], a, b)


def test_decode_step_by_hand():
    work = Work(layers=10, weight_bytes=1_000_000_000, expert_bytes=0, experts=0, experts_per_token=0,
                kv_bytes_full=100_000, kv_bytes_sliding=0, sliding_window=None, matmul_flops=2_000_000_000,
                attn_flops_full=50_000, attn_flops_sliding=0)
    dev = DeviceSpeed("X", 1e12, {"bf16": 100.0})
    ks = KernelSpeed(step_s=0.001, layer_s=0.0001, bandwidth_eff=0.5, source="test")
    # batch 4 at context 1000: 1e9 + 4 x 1e3 x 1e5 = 1.4e9 bytes at 0.5e12 B/s = 2.8 ms; flops 4 x (2e9 + 5e7) =
    # 8.2e9 at 0.5 x 100e12 = 0.164 ms; fixed 1 + 10 x 0.1 = 2 ms
    st = decode_step(work, dev, ks, 0.5, "bf16", batch=4, context=1000)
    assert st.fixed_s == pytest.approx(0.002)
    assert st.memory_s == pytest.approx(0.0028)
    assert st.compute_s == pytest.approx(8.2e9 / 50e12)
    assert st.seconds == pytest.approx(0.0048)
    assert st.bound == "memory"
    # 4,096 sequences: flops 4096 x 2.00005e9 at 50e12 = 164 ms against 1.0004e9 bytes at 0.5e12 = 2 ms
    big = decode_step(work, dev, ks, 0.5, "bf16", batch=4096, context=1)
    assert big.compute_s > big.memory_s and big.bound == "compute"
    # a prefill of 2,000 tokens: flops 2000 x (2e9 + 5e4 x 1000) = 4.1e12 at 50e12 = 82 ms
    pf = prefill(work, dev, ks, 0.5, "bf16", tokens=2000)
    assert pf.compute_s == pytest.approx(2000 * (2e9 + 5e4 * 1000) / 50e12)
    assert pf.bound == "compute"


def test_sliding_layers_read_at_most_their_window():
    w = Work(layers=2, weight_bytes=0, expert_bytes=0, experts=0, experts_per_token=0, kv_bytes_full=10,
             kv_bytes_sliding=10, sliding_window=100, matmul_flops=0, attn_flops_full=0, attn_flops_sliding=0)
    dev = DeviceSpeed("X", 1.0, {"bf16": 1.0})
    ks = KernelSpeed(0.0, 0.0, 1.0, "test")
    assert decode_step(w, dev, ks, 1.0, "bf16", batch=1, context=1000).bytes == 10 * 1000 + 10 * 100


def test_experts_touched_closed_form():
    w = Work(1, 0, 0, 8, 2, 0, 0, None, 0, 0, 0)
    assert experts_touched(w, 1) == pytest.approx(2 / 8)
    assert experts_touched(w, 3) == pytest.approx(1 - (6 / 8) ** 3)
    assert experts_touched(Work(1, 0, 0, 0, 0, 0, 0, None, 0, 0, 0), 5) == 0.0


def test_work_of_a_real_config():
    """Qwen2.5-7B-Instruct (untied): a decode step reads every tensor but the input embedding; its KV per token is
    2 x 28 layers x 4 KV heads x 128 x 2 bytes; its matmuls use every parameter but the embedding's."""
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    q = resolve_quant(spec, "bf16")
    w = work_of(spec, q, "bf16", 2)
    emb = 152064 * 3584
    assert w.weight_bytes == 2 * (spec.params_total - emb)  # buffers are not read as weights
    assert w.kv_bytes_full == 2 * 28 * 4 * 128 * 2
    norms_biases = sum(t.numel for t in spec.tensors if t.role in ("norm", "bias"))
    assert w.matmul_flops == 2 * (spec.params_total - emb - norms_biases)
    tied = work_of(load_spec("meta-llama/Llama-3.2-1B-Instruct"), resolve_quant(
        load_spec("meta-llama/Llama-3.2-1B-Instruct"), "bf16"), "bf16", 2)
    assert tied.weight_bytes > 2 * 128256 * 2048  # the tied embedding is read as the lm_head


def test_kernel_names():
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    assert kernel_of(resolve_quant(spec, "bf16")) == "float"
    assert kernel_of(resolve_quant(spec, "gptq", bits=8, group_size=128)) == "gptq-int8"
    assert kernel_of(resolve_quant(spec, "nf4")) == "bnb-4bit"
    assert kernel_of(resolve_quant(spec, "awq")) == "awq"


def test_quantization_is_faster_on_vllm_slower_on_transformers_as_published():
    """The published table's point, which the model must keep: 7B AWQ decodes faster than bf16 on vLLM and slower on
    transformers (148 vs 84 tok/s; 32 vs 40)."""
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    out = {}
    for engine in ("vllm", "transformers"):
        for scheme in ("bf16", "awq"):
            q = resolve_quant(spec, scheme)
            est = estimate_replica(spec, quant=q, max_model_len=4096, engine=engine)
            out[engine, scheme] = replica_speed(spec, q, est, A100, input_tokens=1, output_tokens=2048,
                                                batch=1).decode_tokens_per_s
    assert out["vllm", "awq"] > 1.5 * out["vllm", "bf16"]
    assert out["transformers", "awq"] < out["transformers", "bf16"]


def _est(engine="vllm", **kw):
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    q = resolve_quant(spec, "bf16")
    return spec, q, estimate_replica(spec, quant=q, engine=engine, **kw)


def test_refusals_name_the_fix():
    spec, q, est = _est(max_model_len=4096, max_num_seqs=4)
    with pytest.raises(InputError, match="max_num_seqs 4.*raise max_num_seqs to 8"):
        replica_speed(spec, q, est, A100, input_tokens=10, output_tokens=10, batch=8)
    with pytest.raises(InputError, match="raise max_model_len to at least 5000"):
        replica_speed(spec, q, est, A100, input_tokens=4000, output_tokens=1000, batch=1)
    with pytest.raises(InputError, match="memory_bandwidth_gb_per_s"):
        lookup_gpu("MyGPU:24GiB").speed()
    with pytest.raises(InputError, match="dense_tflops.bf16"):
        replica_speed(spec, q, est, lookup_gpu("T4").speed(), input_tokens=10, output_tokens=10, batch=1)
    with pytest.raises(InputError, match="no speed numbers on a GPU yet"):
        speed_of("llamacpp")


def test_a_kernel_without_numbers_borrows_with_a_note():
    spec = load_spec("Qwen/Qwen2.5-7B-Instruct")
    q = resolve_quant(spec, "nf4")
    est = estimate_replica(spec, quant=q, engine="transformers", max_model_len=4096)
    s = replica_speed(spec, q, est, A100, input_tokens=100, output_tokens=100, batch=1)
    assert s.kernel == "bnb-4bit" and any("assumption" in n for n in s.notes)


def test_every_engine_declares_its_speed():
    for name, mod in ENGINES.items():
        assert hasattr(mod, "SPEED"), name


def test_cli_estimate_speed_json():
    p = subprocess.run([sys.executable, "-m", "planner", "estimate", "Qwen/Qwen2.5-7B-Instruct", "--engine", "vllm",
                        "--gpu", "A100-80GB", "--input-tokens", "6144", "--output-tokens", "2048", "--batch", "1",
                        "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["speed"]
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "tpot_ms", "tokens_per_s"):
        assert s[key] > 0
    # the published row (vLLM, bf16, 6,144 in): 80.7 tokens/s over the run
    assert s["tokens_per_s"] == pytest.approx(80.7, rel=0.06)
    bad = subprocess.run([sys.executable, "-m", "planner", "estimate", "Qwen/Qwen2.5-7B-Instruct", "--gpu", "T4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "dense_tflops.bf16" in bad.stderr and "Traceback" not in bad.stderr


def test_cpu_numbers_are_the_fit_of_the_saved_run():
    """SPEED_CPU in the engine modules is benchmarks/cpu_speed.py's fit of the run saved beside it (TPOT at 1 and 16
    streams, less the model's own memory term), and the model predicts the held-out 8-stream TPOT within 20% (llama.cpp's
    cache-resident tiny model: +18%; the others within 8%)."""
    from benchmarks.cpu_speed import fit, predicted_tpot

    run = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "data" /
                      "cpu_speed-2026-12-06.json").read_text())
    fitted = fit(run)
    for case in run["cases"]:
        ks = speed_of(case["engine"], "cpu").kernels[case["kernel"]]
        f = fitted[case["name"]]
        assert ks.step_s == pytest.approx(f["step_s"], rel=1e-3, abs=1e-7)
        assert ks.seq_s == pytest.approx(f["seq_s"], rel=1e-3)
        assert ks.request_s == pytest.approx(f["request_s"], rel=1e-3)
        eight = next(x for x in case["levels"] if x["clients"] == 8)["tpot_ms"] / 1e3
        model = predicted_tpot(case, {"step_s": ks.step_s, "seq_s": ks.seq_s}, 8, run["max_tokens"])
        assert model == pytest.approx(eight, rel=0.20), case["name"]


def test_cli_estimate_speed_on_this_cpu():
    """`--gpu cpu`: the CPU catalog's device and the engine's SPEED_CPU, with what those numbers do not cover."""
    p = subprocess.run([sys.executable, "-m", "planner", "estimate", "./models/tiny-chat", "--quant", "int4",
                        "--gpu", "cpu", "--input-tokens", "30", "--output-tokens", "64", "--batch", "8", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    s = out["speed"]
    assert out["device"] == "cpu" and s["device"] == "cpu" and s["kernel"] == "bnb-4bit"
    ks = speed_of("transformers", "cpu").kernels["bnb-4bit"]
    step = s["terms"]["decode_step"]
    assert step["fixed_s"] == pytest.approx(ks.step_s + 8 * ks.seq_s)  # the fitted costs per step and per sequence
    assert s["tpot_ms"] == pytest.approx((step["fixed_s"] + max(step["memory_s"], step["compute_s"])) * 1e3, rel=1e-3)
    assert any("4-layer tiny model only" in n for n in s["notes"])
