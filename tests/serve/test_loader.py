"""serve/engines/loader.py: bitsandbytes configs per planner scheme, CPU loads of a random tiny llama in bf16 / int8 / int4,
device maps for GPU and offload (checked without a GPU), tokenizer fixes, and the silenced int8 warning."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from serve.engines import loader  # noqa: E402
from serve.engines.loader import BNB_INT8_LOGGER, bnb_config, load_model  # noqa: E402


def _generate(model, tok, n: int = 4) -> list[int]:
    ids = tok("hello world", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


# ----------------------------------------------------------------------------------------------- bnb_config


def test_bnb_config_per_scheme():
    c = bnb_config("int8")
    assert c.load_in_8bit and not c.load_in_4bit and not c.llm_int8_enable_fp32_cpu_offload
    for scheme, qt, dq in (("nf4", "nf4", False), ("fp4", "fp4", False), ("int4", "nf4", True)):
        c = bnb_config(scheme, torch.float16)
        assert c.load_in_4bit and not c.load_in_8bit, scheme
        assert c.bnb_4bit_quant_type == qt and c.bnb_4bit_use_double_quant is dq, scheme
        assert c.bnb_4bit_compute_dtype == torch.float16, scheme
    assert bnb_config("nf4").bnb_4bit_compute_dtype == torch.bfloat16  # default compute dtype
    assert bnb_config("int4", "fp32").bnb_4bit_compute_dtype == torch.float32
    assert bnb_config("int8", cpu_offload=True).llm_int8_enable_fp32_cpu_offload
    for scheme in ("bf16", "fp16", "fp32", "awq", "gptq", "fp8", "mxfp4", "gguf"):
        assert bnb_config(scheme) is None, scheme
    with pytest.raises(ValueError, match="unknown quantization"):
        bnb_config("int3")


# ----------------------------------------------------------------------------------------------- real CPU loads


def test_load_bf16_on_cpu_generates(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir, quantization="bf16")
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert model.config.use_cache and model.generation_config.use_cache
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    assert len(_generate(model, tok)) == 4


def test_float_scheme_sets_the_weight_dtype(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, quantization="fp32", dtype="bf16")
    assert model.dtype == torch.float32


def test_load_int8_on_cpu_generates_without_per_forward_warning(tiny_llama_dir, caplog):
    import bitsandbytes as bnb

    model, tok = load_model(tiny_llama_dir, quantization="int8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)  # transformers keeps lm_head unquantized
    caplog.set_level(logging.WARNING)
    assert len(_generate(model, tok)) == 4
    assert not [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    # only that message is dropped: the logger still passes everything else
    logging.getLogger(BNB_INT8_LOGGER).warning("something else")
    assert [r for r in caplog.records if r.getMessage() == "something else"]


def test_load_int4_on_cpu_generates(tiny_llama_dir):
    import bitsandbytes as bnb

    model, tok = load_model(tiny_llama_dir, quantization="int4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    qs = layers[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # int4 = nf4 + double quantization
    assert len(_generate(model, tok)) == 4


def test_pad_token_falls_back_to_eos(tiny_llama_dir, tiny_llama_save_tokenizer, tmp_path):
    d = tmp_path / "nopad"
    shutil.copytree(tiny_llama_dir, d)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    tiny_llama_save_tokenizer(d, with_pad=False)
    assert transformers.AutoTokenizer.from_pretrained(str(d)).pad_token is None
    model, tok = load_model(str(d), quantization="fp32")
    assert tok.pad_token == tok.eos_token == "</s>" and tok.pad_token_id == 1
    assert tok.padding_side == "left"
    batch = tok(["a", "hello world"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == 1 and batch["attention_mask"][0, 0].item() == 0  # left-padded


# ----------------------------------------------------------------------------------------------- arguments only


class _FakeModel:
    def __init__(self):
        self.config = transformers.PretrainedConfig()
        self.generation_config = transformers.GenerationConfig()
        self.eval_called = False

    def eval(self):
        self.eval_called = True
        return self


@pytest.fixture
def captured(monkeypatch):
    calls = []

    def fake_from_pretrained(path, **kw):
        calls.append((path, kw))
        return _FakeModel()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    return calls


def test_device_maps(tiny_llama_dir, captured):
    load_model(tiny_llama_dir, quantization="bf16", device="cuda", gpu_index=1)
    load_model(tiny_llama_dir, quantization="int8", device="cuda", max_memory={0: 10 << 30, "cpu": 50 << 30})
    load_model(tiny_llama_dir, quantization="nf4", device="cuda", gpu_index=0)
    m, _ = load_model(tiny_llama_dir, quantization="fp16", device="cpu", trust_remote_code=True)
    (_, gpu), (_, off), (_, nf4), (_, cpu) = captured
    assert gpu["device_map"] == {"": 1} and "max_memory" not in gpu and gpu["dtype"] == torch.bfloat16
    assert "quantization_config" not in gpu and gpu["trust_remote_code"] is False
    assert off["device_map"] == "auto" and off["max_memory"] == {0: 10 << 30, "cpu": 50 << 30}
    assert off["quantization_config"].load_in_8bit and off["quantization_config"].llm_int8_enable_fp32_cpu_offload
    assert nf4["device_map"] == {"": 0} and not nf4["quantization_config"].llm_int8_enable_fp32_cpu_offload
    assert cpu["device_map"] == {"": "cpu"} and cpu["dtype"] == torch.float16 and cpu["trust_remote_code"] is True
    assert m.eval_called and m.config.use_cache
    with pytest.raises(ValueError, match="device"):
        load_model(tiny_llama_dir, quantization="bf16", device="tpu")


def _prequantized(tmp_path: Path, src: str, method: str) -> str:
    d = tmp_path / method
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_prequantized_checkpoints(tiny_llama_dir, tmp_path, captured, monkeypatch):
    fp8 = _prequantized(tmp_path, tiny_llama_dir, "fp8")
    load_model(fp8, quantization="fp8")
    assert "quantization_config" not in captured[-1][1]  # transformers reads the checkpoint's own config
    with pytest.raises(ValueError, match="cannot be re-quantized"):
        load_model(fp8, quantization="int8")
    load_model(fp8, quantization="bf16")  # the planner sizes this as the dequantized checkpoint
    qc = captured[-1][1]["quantization_config"]
    assert isinstance(qc, transformers.FineGrainedFP8Config) and qc.dequantize
    assert captured[-1][1]["dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="pre-quantized checkpoint"):
        load_model(tiny_llama_dir, quantization="awq")

    awq = _prequantized(tmp_path, tiny_llama_dir, "awq")
    with pytest.raises(ValueError, match="only fp8 and mxfp4"):
        load_model(awq, quantization="fp16")
    real_find_spec = loader.importlib.util.find_spec
    monkeypatch.setattr(loader.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r"pip install -e \.\[awq\]"):
        load_model(awq, quantization="awq")
