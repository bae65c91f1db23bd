"""Reading model directories: safetensors headers parsed directly, and every bad input gives a one-line
ModelSpecError that says what was wrong and what to do."""

import json
import struct

import pytest

from planner.errors import InputError, ModelSpecError
from planner.model.formats.safetensors import read_header
from planner.model.engines import estimate_replica
from planner.model.spec import load_spec

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
         "max_position_embeddings": 256, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def write_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...]]], truncate: int = 0):
    sizes = {"BF16": 2, "F32": 4, "I32": 4, "U8": 1, "F16": 2}
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * max(0, off - truncate))


def test_header_read_and_sizes(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a.weight": ("BF16", (4, 8)), "b": ("F32", (3,))})
    meta, tensors = read_header(str(p))
    assert [(t.name, t.shape, t.nbytes) for t in tensors] == [("a.weight", (4, 8), 64), ("b", (3,), 12)]


def test_truncated_file_names_numbers(tmp_path):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"a.weight": ("BF16", (4, 8))}, truncate=10)
    with pytest.raises(ModelSpecError, match=r"claims bytes 0\.\.64 .* 54 bytes.*re-download"):
        read_header(str(p))


def test_header_length_past_end(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ModelSpecError, match="10000 bytes, but the file has only 2"):
        read_header(str(p))


def test_missing_and_corrupt_config(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load_spec(str(tmp_path))


def test_unknown_architecture_names_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ModelSpecError, match="lacks num_hidden_layers, num_attention_heads, vocab_size"):
        load_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(ModelSpecError, match="'mamba'.*safetensors"):
        load_spec(str(tmp_path))


def test_safetensors_shapes_win_over_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    write_safetensors(tmp_path / "model.safetensors", {"model.embed_tokens.weight": ("BF16", (512, 128)),
                                                       "lm_head.weight": ("BF16", (512, 128))})
    spec = load_spec(str(tmp_path))
    assert spec.source == "safetensors"
    assert spec.params_total == 2 * 512 * 128
    assert any("implies" in n for n in spec.notes)


def test_gptq_checkpoint_from_headers_and_contradicting_quant(tmp_path):
    cfg = dict(LLAMA, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = {"model.embed_tokens.weight": ("F16", (512, 128)), "lm_head.weight": ("F16", (512, 128)),
               "model.layers.0.mlp.up_proj.qweight": ("I32", (128 // 8, 256)),
               "model.layers.0.mlp.up_proj.qzeros": ("I32", (1, 256 // 8)),
               "model.layers.0.mlp.up_proj.scales": ("F16", (1, 256)),
               "model.layers.0.mlp.up_proj.g_idx": ("I32", (128,))}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    spec = load_spec(str(tmp_path))
    est = estimate_replica(spec, max_model_len=16, dtype="fp16")
    stored = 2 * 512 * 128 * 2 + 16 * 256 * 4 + 32 * 4 + 256 * 2 + 128 * 4
    assert est.quantization == "gptq"
    assert est.params_quantized == 128 * 256
    rotary_buffers = sum(t.numel * 4 for t in spec.tensors if t.role == "buffer")  # fp32 inv_freq x 2
    assert est.weights == stored + rotary_buffers
    with pytest.raises(ModelSpecError, match="pre-quantized gptq checkpoint.*--quant int8 contradicts"):
        estimate_replica(spec, quant="int8")


def test_bad_numbers_and_names():
    spec = load_spec("meta-llama/Llama-3.2-1B-Instruct")
    with pytest.raises(InputError, match="max_model_len must be a positive integer, got 0"):
        estimate_replica(spec, max_model_len=0)
    with pytest.raises(InputError, match="unknown quantization 'int3'"):
        estimate_replica(spec, quant="int3")
    with pytest.raises(ModelSpecError, match="Similar catalog names"):
        load_spec("Llama-3.2-1B")
