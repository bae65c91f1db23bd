"""GGUF header reader and llama.cpp layer-offload planning, on small GGUF files written by the tests.

The writer below is independent of planner.model.formats.gguf: its block sizes are the literal ``sizeof(block_*)`` values
of ggml's ggml-common.h. Where the ``gguf`` package (gguf-py, llama.cpp's own writer) is installed, files it writes
are read back too.
"""

from __future__ import annotations

import math

import json
import struct
import subprocess
import sys

import pytest

from planner.errors import InputError, ModelSpecError
from planner.model.formats.gguf import GGML_TYPES, GgufFile, read_gguf, summarize_gguf
from planner.model.engines.llamacpp_offload import (
    DEFAULT_COMPUTE_RESERVE_BYTES,
    kv_cache_bytes_per_layer,
    plan_gguf_offload,
    plan_gpu_layers,
    plan_layer_offload,
)

# type name -> (id, elements per block, bytes per block): literal values from ggml's ggml.h / ggml-common.h.
REF_TYPES = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q8_1": (9, 32, 36),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "Q8_K": (15, 256, 292),
    "IQ2_XXS": (16, 256, 66),
    "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98),
    "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18),
    "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82),
    "IQ4_XS": (23, 256, 136),
    "I8": (24, 1, 1),
    "I16": (25, 1, 2),
    "I32": (26, 1, 4),
    "I64": (27, 1, 8),
    "F64": (28, 1, 8),
    "IQ1_M": (29, 256, 56),
    "BF16": (30, 1, 2),
    "TQ1_0": (34, 256, 54),
    "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17),
    "NVFP4": (40, 64, 36),
    "Q1_0": (41, 128, 18),
}

# value type ids (gguf.h): name -> (id, struct format)
VT = {
    "u8": (0, "<B"),
    "i8": (1, "<b"),
    "u16": (2, "<H"),
    "i16": (3, "<h"),
    "u32": (4, "<I"),
    "i32": (5, "<i"),
    "f32": (6, "<f"),
    "bool": (7, "<B"),
    "str": (8, None),
    "arr": (9, None),
    "u64": (10, "<Q"),
    "i64": (11, "<q"),
    "f64": (12, "<d"),
}


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _val(vtype: str, value) -> bytes:
    _, fmt = VT[vtype]
    if vtype == "str":
        return _s(value)
    if vtype == "arr":
        etype, items = value
        return struct.pack("<IQ", VT[etype][0], len(items)) + b"".join(_val(etype, v) for v in items)
    return struct.pack(fmt, value)


def write_gguf(path, metadata, tensors, *, version=3, alignment=32, magic=b"GGUF", data_fill=None):
    """metadata: [(key, vtype, value)]; tensors: [(name, dims (ggml order), type name)]. Returns data sizes."""
    kv = b"".join(_s(k) + struct.pack("<I", VT[t][0]) + _val(t, v) for k, t, v in metadata)
    sizes, infos, offset = [], b"", 0
    for name, dims, tname in tensors:
        tid, blck, bsize = REF_TYPES[tname]
        n = 1
        for d in dims:
            n *= d
        nbytes = n // blck * bsize
        sizes.append(nbytes)
        infos += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", tid, offset)
        offset += -(-nbytes // alignment) * alignment
    head = magic + struct.pack("<IQQ", version, len(tensors), len(metadata)) + kv + infos
    head += b"\0" * (-len(head) % alignment)
    data = b""
    for nbytes in sizes:
        data += (data_fill or b"\xab") * nbytes
        data += b"\0" * (-len(data) % alignment)
    path.write_bytes(head + data)
    return sizes, len(head)


ALL_VALUE_TYPES = [
    ("general.architecture", "str", "llama"),
    ("general.name", "str", "tiny ünïcode"),
    ("t.u8", "u8", 250),
    ("t.i8", "i8", -7),
    ("t.u16", "u16", 65000),
    ("t.i16", "i16", -30000),
    ("t.u32", "u32", 4_000_000_000),
    ("t.i32", "i32", -2_000_000_000),
    ("t.f32", "f32", 0.5),
    ("t.bool", "bool", 1),
    ("t.u64", "u64", 2**63 + 5),
    ("t.i64", "i64", -(2**62)),
    ("t.f64", "f64", 1e-300),
    ("t.arr_i32", "arr", ("i32", [1, -2, 3])),
    ("t.arr_str", "arr", ("str", ["a", "", "<0x0A>"])),
    ("t.arr_bool", "arr", ("bool", [1, 0])),
    ("t.arr_f64", "arr", ("f64", [1.5, -2.25])),
    ("t.arr_nested", "arr", ("arr", [("u8", [1, 2]), ("str", ["x"])])),
    ("t.arr_empty", "arr", ("u64", [])),
]


def _all_type_tensors():
    return [(f"t_{name}", (blck * 2, 3), name) for name, (_, blck, _) in REF_TYPES.items()]


def test_every_type_and_value_roundtrips(tmp_path):
    path = tmp_path / "all.gguf"
    tensors = _all_type_tensors()
    sizes, _ = write_gguf(path, ALL_VALUE_TYPES, tensors)
    g = read_gguf(path)
    assert g.version == 3 and g.alignment == 32 and g.data_offset % 32 == 0
    assert g.file_size == path.stat().st_size
    m = g.metadata
    assert m["general.name"] == "tiny ünïcode"
    assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (250, -7, 65000, -30000)
    assert (m["t.u32"], m["t.i32"], m["t.f32"], m["t.bool"]) == (4_000_000_000, -2_000_000_000, 0.5, True)
    assert (m["t.u64"], m["t.i64"], m["t.f64"]) == (2**63 + 5, -(2**62), 1e-300)
    assert m["t.arr_i32"] == (1, -2, 3) and m["t.arr_str"] == ("a", "", "<0x0A>")
    assert m["t.arr_bool"] == (True, False) and m["t.arr_f64"] == (1.5, -2.25)
    assert m["t.arr_nested"] == ((1, 2), ("x",)) and m["t.arr_empty"] == ()
    assert [t.name for t in g.tensors] == [n for n, _, _ in tensors]
    for t, (_, dims, tname), size in zip(g.tensors, tensors, sizes):
        assert (t.shape, t.ggml_type, t.n_elements) == (dims, tname, dims[0] * dims[1])
        assert t.nbytes == size, t.ggml_type
    # the bytes the writer really laid out: gaps between consecutive offsets, and the last tensor up to EOF
    ends = [t.offset for t in g.tensors[1:]] + [g.file_size - g.data_offset]
    for t, end in zip(g.tensors, ends):
        assert end - t.offset == -(-t.nbytes // 32) * 32
    assert g.tensor_bytes == sum(sizes)
    json.dumps(g.to_json())


def test_type_table_matches_reference():
    assert {name: (tid, blck, size) for tid, (name, blck, size) in GGML_TYPES.items()} == REF_TYPES


def test_version_2_and_custom_alignment(tmp_path):
    path = tmp_path / "v2.gguf"
    meta = [("general.alignment", "u32", 64), ("general.architecture", "str", "llama")]
    sizes, header_len = write_gguf(path, meta, [("a", (32, 2), "Q8_0"), ("b", (5,), "F32")], version=2, alignment=64)
    g = read_gguf(path)
    assert g.version == 2 and g.alignment == 64
    assert g.data_offset == header_len and g.data_offset % 64 == 0
    assert [t.offset for t in g.tensors] == [0, 128] and [t.nbytes for t in g.tensors] == sizes == [68, 20]


@pytest.mark.parametrize("magic", [b"GGML", b"\x7fELF", b"gguf"])
def test_bad_magic(tmp_path, magic):
    path = tmp_path / "bad.gguf"
    write_gguf(path, [], [], magic=magic)
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        read_gguf(path)


def test_empty_and_missing_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelSpecError, match="0 bytes"):
        read_gguf(tmp_path / "empty.gguf")
    with pytest.raises(ModelSpecError, match="cannot read GGUF file"):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("version,hint", [(1, "versions 2 and 3"), (4, "versions 2 and 3"), (3 << 24, "big-endian")])
def test_unsupported_version(tmp_path, version, hint):
    path = tmp_path / "v.gguf"
    write_gguf(path, [], [], version=version)
    with pytest.raises(ModelSpecError, match=hint) as err:
        read_gguf(path)
    assert f"version {version}" in str(err.value) and "\n" not in str(err.value)


def test_truncated_header_everywhere(tmp_path):
    path = tmp_path / "full.gguf"
    _, header_len = write_gguf(path, ALL_VALUE_TYPES, _all_type_tensors()[:5])
    whole = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in range(4, header_len - 32, 5):  # every 5th prefix of the header (the last 32 bytes may be padding)
        cut.write_bytes(whole[:n])
        with pytest.raises(ModelSpecError, match="truncated") as err:
            read_gguf(cut)
        msg = str(err.value)
        assert f"has {n} bytes" in msg or f"file size {n}" in msg, msg
        assert "\n" not in msg


def test_length_past_end(tmp_path):
    path = tmp_path / "long.gguf"
    write_gguf(path, [("general.name", "str", "abc")], [])
    raw = bytearray(path.read_bytes())
    # the value string's length field: after magic(4)+version(4)+counts(16)+key(8+12)+type(4) = 48
    assert raw[48:56] == struct.pack("<Q", 3)
    raw[48:56] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelSpecError, match=r"at offset 56 needs 1099511627776 bytes but the file has \d+ bytes"):
        read_gguf(path)


def test_array_count_past_end(tmp_path):
    path = tmp_path / "arr.gguf"
    write_gguf(path, [("tokenizer.ggml.tokens", "arr", ("str", ["a", "b"]))], [])
    raw = bytearray(path.read_bytes())
    at = 4 + 4 + 16 + 8 + len("tokenizer.ggml.tokens") + 4 + 4  # the array count
    assert raw[at : at + 8] == struct.pack("<Q", 2)
    raw[at : at + 8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelSpecError, match="array 'tokenizer.ggml.tokens' of 1000000000000 STRING elements"):
        read_gguf(path)


def test_huge_counts_rejected_fast(tmp_path):
    path = tmp_path / "counts.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60))
    with pytest.raises(ModelSpecError, match="truncated"):
        read_gguf(path)


def test_tensor_data_past_end(tmp_path):
    path = tmp_path / "data.gguf"
    write_gguf(path, [], [("w", (256, 4), "Q4_K")])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelSpecError, match=r"tensor 'w' \(576 bytes at offset \d+\) ends at \d+, past the file size"):
        read_gguf(path)


@pytest.mark.parametrize("type_id,why", [(99, "not in ggml's type table"), (31, "it is Q4_0_4_4, removed")])
def test_unknown_ggml_type(tmp_path, type_id, why):
    path = tmp_path / "type.gguf"
    write_gguf(path, [], [("w", (32,), "F32")])
    raw = bytearray(path.read_bytes())
    at = 4 + 4 + 16 + 8 + 1 + 4 + 8  # name, n_dims, dims -> type id
    assert raw[at : at + 4] == struct.pack("<I", 0)
    raw[at : at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelSpecError, match=f"unknown ggml type id {type_id} \\({why}"):
        read_gguf(path)


def test_unknown_value_type_and_bad_rows(tmp_path):
    path = tmp_path / "vt.gguf"
    write_gguf(path, [("k", "u8", 1)], [])
    raw = bytearray(path.read_bytes())
    raw[4 + 4 + 16 + 8 + 1 : 4 + 4 + 16 + 8 + 1 + 4] = struct.pack("<I", 13)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelSpecError, match="unknown GGUF value type id 13 for key 'k' at offset 33"):
        read_gguf(path)
    # a Q4_0 row of 48 values is not a whole number of 32-value blocks
    path2 = tmp_path / "rows.gguf"
    write_gguf(path2, [], [("w", (64,), "Q4_0")])
    raw = bytearray(path2.read_bytes())
    raw[4 + 4 + 16 + 8 + 1 + 4 : 4 + 4 + 16 + 8 + 1 + 4 + 8] = struct.pack("<Q", 48)
    path2.write_bytes(bytes(raw))
    with pytest.raises(ModelSpecError, match="row length 48 of type Q4_0 is not a multiple of its block size 32"):
        read_gguf(path2)


# ---- a tiny llama-shaped model --------------------------------------------------------------------------------
EMB, HEADS, KV_HEADS, VOCAB, FF, BLOCKS = 64, 4, 2, 96, 128, 4


def _llama_meta(extra=()):
    return [
        ("general.architecture", "str", "llama"),
        ("general.name", "str", "tiny"),
        ("llama.block_count", "u32", BLOCKS),
        ("llama.context_length", "u32", 2048),
        ("llama.embedding_length", "u32", EMB),
        ("llama.feed_forward_length", "u32", FF),
        ("llama.attention.head_count", "u32", HEADS),
        ("llama.attention.head_count_kv", "u32", KV_HEADS),
        ("tokenizer.ggml.tokens", "arr", ("str", [f"t{i}" for i in range(VOCAB)])),
        *extra,
    ]


def _llama_tensors(tied=False):
    ts = [("token_embd.weight", (EMB, VOCAB), "Q8_0")]
    for i in range(BLOCKS):
        ts += [
            (f"blk.{i}.attn_norm.weight", (EMB,), "F32"),  # 256 B
            (f"blk.{i}.attn_q.weight", (EMB, EMB), "Q4_0"),  # 4096/32*18 = 2304 B
            (f"blk.{i}.attn_k.weight", (EMB, EMB // 2), "Q4_0"),  # 1152 B
            (f"blk.{i}.attn_v.weight", (EMB, EMB // 2), "Q8_0"),  # 2048/32*34 = 2176 B
            (f"blk.{i}.attn_output.weight", (EMB, EMB), "F16"),  # 8192 B
            (f"blk.{i}.ffn_norm.weight", (EMB,), "F32"),  # 256 B
            (f"blk.{i}.ffn_up.weight", (EMB * 4, FF), "Q4_K"),  # 256*128/256*144 = 18432 B
            (f"blk.{i}.ffn_down.weight", (FF * 2, EMB), "Q6_K"),  # 256*64/256*210 = 13440 B
        ]
    ts.append(("output_norm.weight", (EMB,), "F32"))  # 256 B
    if not tied:
        ts.append(("output.weight", (EMB, VOCAB), "F16"))  # 12288 B
    return ts


LAYER = 256 + 2304 + 1152 + 2176 + 8192 + 256 + 18432 + 13440  # = 46208 bytes per block
TOKEN_EMBD = EMB * VOCAB // 32 * 34  # 6528
OUTPUT = 256 + EMB * VOCAB * 2  # 12544


def test_summary(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors())
    s = summarize_gguf(read_gguf(path))
    assert (s.architecture, s.name, s.block_count, s.context_length) == ("llama", "tiny", 4, 2048)
    assert (s.embedding_length, s.head_count, s.head_count_kv, s.key_length) == (EMB, HEADS, KV_HEADS, None)
    assert s.layer_bytes == (LAYER,) * BLOCKS
    assert dict(s.non_layer_bytes) == {
        "token_embd.weight": TOKEN_EMBD,
        "output_norm.weight": 256,
        "output.weight": EMB * VOCAB * 2,
    }
    assert (s.input_bytes, s.output_bytes, s.tied_output) == (TOKEN_EMBD, OUTPUT, False)
    assert s.tensor_bytes == BLOCKS * LAYER + TOKEN_EMBD + OUTPUT
    assert dict(s.ggml_type_counts)["Q4_0"] == 8
    assert json.loads(json.dumps(s.to_json()))["layer_bytes"] == [LAYER] * 4


def test_summary_tied_embeddings(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors(tied=True))
    s = summarize_gguf(read_gguf(path))
    assert s.tied_output and s.input_bytes == TOKEN_EMBD and s.output_bytes == 256 + TOKEN_EMBD


def test_kv_cache_bytes(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors())
    g = read_gguf(path)
    # 2 (K and V) x n_ctx x n_head_kv x head_dim x 2 bytes (f16); head_dim = 64 / 4 = 16
    assert kv_cache_bytes_per_layer(g, 256) == (2 * 256 * 2 * 16 * 2,) * 4 == (32768,) * 4
    # q8_0 cache: rows of 2*16 = 32 values -> one 34-byte block per row, 256 rows, K and V
    assert kv_cache_bytes_per_layer(g, 256, cache_type_k="q8_0", cache_type_v="Q8_0") == (2 * 256 * 34,) * 4
    path2 = tmp_path / "kl.gguf"
    extra = [
        ("llama.attention.key_length", "u32", 32),
        ("llama.attention.value_length", "u32", 16),
        ("llama.attention.head_count_kv", "arr", ("u32", [2, 0, 1, 2])),
    ]
    meta = [m for m in _llama_meta() if m[0] != "llama.attention.head_count_kv"] + extra
    write_gguf(path2, meta, _llama_tensors())
    # per block: n_ctx x n_head_kv x (32 + 16) x 2 bytes; block 1 has no attention
    assert kv_cache_bytes_per_layer(read_gguf(path2), 100) == (100 * 2 * 48 * 2, 0, 100 * 1 * 48 * 2, 100 * 2 * 48 * 2)


def test_kv_cache_needs_metadata(tmp_path):
    path = tmp_path / "nometa.gguf"
    write_gguf(path, [("general.architecture", "str", "llama")], _llama_tensors())
    with pytest.raises(ModelSpecError, match="lacks llama.attention.head_count, llama.embedding_length"):
        kv_cache_bytes_per_layer(read_gguf(path), 512)


def test_plan_layer_offload_hand_numbers():
    # 10 blocks of 1000 B, KV 100 B each, output layer 500 B, input 700 B, reserve 300 B, VRAM 2000 B
    kw = {"kv_bytes_per_layer": 100, "output_bytes": 500, "input_bytes": 700, "compute_reserve_bytes": 300}
    p = plan_layer_offload([1000] * 10, 2000, **kw)
    # -ngl 1: output 500 + reserve 300 = 800; -ngl 2: + one block 1100 = 1900; -ngl 3: 3000 > 2000
    assert (p.n_gpu_layers, p.output_on_gpu, p.gpu_blocks, p.fits) == (2, True, (9, 10), True)
    assert (p.gpu_weight_bytes, p.gpu_kv_bytes, p.gpu_bytes) == (1500, 100, 1900)
    assert (p.cpu_weight_bytes, p.cpu_kv_bytes, p.cpu_bytes) == (9 * 1000 + 700, 900, 10600)
    assert p.max_n_gpu_layers == 11 and not p.full_offload
    # before llama.cpp PR #18148 the output layer came last: -ngl 1 = one block 1100 + 300 = 1400; -ngl 2 = 2500
    old = plan_layer_offload([1000] * 10, 2000, order="output_last", **kw)
    assert (old.n_gpu_layers, old.output_on_gpu, old.gpu_blocks, old.gpu_bytes) == (1, False, (9, 10), 1400)
    assert old.cpu_weight_bytes == 9000 + 500 + 700
    # everything: 10 x 1100 + 500 + 300 = 11800
    full = plan_layer_offload([1000] * 10, 11800, **kw)
    assert (full.n_gpu_layers, full.full_offload, full.gpu_bytes, full.cpu_bytes) == (11, True, 11800, 700)
    assert plan_layer_offload([1000] * 10, 11799, **kw).n_gpu_layers == 10
    # rule of thumb: floor(VRAM / file_size x (layers - 4)) = floor(2000 / 8000 x 6) = 1
    assert plan_layer_offload([1000] * 10, 2000, file_size=8000, **kw).rule_of_thumb_n_gpu_layers == 1
    assert plan_layer_offload([1000] * 10, 10**9, file_size=8000, **kw).rule_of_thumb_n_gpu_layers == 11


def test_plan_layer_offload_uneven_layers_and_tiny_budget():
    # the last blocks go first: blocks [5000, 10, 10] with 40 B of VRAM and no reserve -> output + blk.2 + blk.1
    p = plan_layer_offload([5000, 10, 10], 40, output_bytes=20, compute_reserve_bytes=0)
    assert (p.n_gpu_layers, p.gpu_blocks, p.gpu_bytes, p.cpu_bytes) == (3, (1, 3), 40, 5000)
    assert plan_layer_offload([5000, 10, 10], 39, output_bytes=20, compute_reserve_bytes=0).n_gpu_layers == 2
    none = plan_layer_offload([10, 10], 100, compute_reserve_bytes=200)
    assert none.n_gpu_layers == 0 and not none.fits and none.gpu_bytes == 200 and "exceeds" in none.notes[0]
    with pytest.raises(InputError, match="kv_bytes_per_layer has 1 entries for 2 layers"):
        plan_layer_offload([10, 10], 100, kv_bytes_per_layer=[1])
    with pytest.raises(InputError, match="vram_bytes must be >= 0, got -1"):
        plan_layer_offload([10], -1)
    with pytest.raises(InputError, match="order must be one of"):
        plan_layer_offload([10], 1, order="first")


def test_plan_gguf_offload(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors())
    g = read_gguf(path)
    kv = 2 * 1024 * KV_HEADS * (EMB // HEADS) * 2  # n_ctx 1024 -> 131072 B per block
    reserve = 100_000
    # output (12544) + 2 blocks (2 x (46208 + 131072)) + reserve = 467104; a third block would add 177280
    vram = OUTPUT + 2 * (LAYER + kv) + reserve
    p = plan_gguf_offload(g, vram, n_ctx=1024, compute_reserve_bytes=reserve)
    assert (p.n_gpu_layers, p.output_on_gpu, p.gpu_blocks) == (3, True, (2, 4))
    assert p.gpu_bytes == vram == 467_104
    assert p.cpu_bytes == TOKEN_EMBD + 2 * (LAYER + kv)
    assert p.kv_bytes_per_layer == (kv,) * 4
    assert p.llama_cpp_args == ("--n-gpu-layers 3", "--ctx-size 1024")
    assert plan_gguf_offload(g, vram - 1, n_ctx=1024, compute_reserve_bytes=reserve).n_gpu_layers == 2
    full = plan_gguf_offload(summarize_gguf(g), 10**9, n_ctx=1024)
    assert full.n_gpu_layers == 5 and full.full_offload
    assert full.gpu_bytes == 4 * (LAYER + kv) + OUTPUT + DEFAULT_COMPUTE_RESERVE_BYTES
    # rule of thumb for a 4-block model: layers - 4 = 0
    assert p.rule_of_thumb_n_gpu_layers == 0
    out = json.loads(json.dumps(p.to_json()))
    assert out["n_gpu_layers"] == 3 and out["gpu_blocks"] == [2, 4]
    text = p.describe()
    assert text.startswith("--n-gpu-layers 3 (of 5): output layer + 2 of 4 blocks on the GPU, context 1024")
    assert plan_gpu_layers is plan_gguf_offload


def test_plan_gguf_offload_tied(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors(tied=True))
    p = plan_gguf_offload(read_gguf(path), 10**9, n_ctx=16, compute_reserve_bytes=0)
    kv = 2 * 16 * KV_HEADS * 16 * 2
    # token_embd is on the CPU as the input layer and duplicated on the GPU as the output layer
    assert p.gpu_bytes == 4 * (LAYER + kv) + 256 + TOKEN_EMBD and p.cpu_bytes == TOKEN_EMBD
    assert "tied embeddings" in p.notes[0]


def test_planner_imports_stay_pure():
    code = (
        "import sys, planner.model.formats.gguf, planner.model.engines.llamacpp_offload, planner.model.training\n"
        "bad = [m for m in ('torch', 'numpy', 'ray', 'transformers', 'bitsandbytes', 'pynvml') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- cross-check against gguf-py, llama.cpp's reference reader/writer (optional dev dependency) ----------------


def test_against_gguf_py(tmp_path):
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    ref = {t.name: v for t, v in gguf.GGML_QUANT_SIZES.items()}
    mine = {name: (blck, size) for _, (name, blck, size) in GGML_TYPES.items()}
    # gguf-py still lists Q8_1 with the old two-float header (40 B); ggml's block_q8_1 is 36 B.
    assert {k: v for k, v in ref.items() if k != "Q8_1"} == {k: v for k, v in mine.items() if k in ref and k != "Q8_1"}
    assert ref["Q8_1"] == (32, 40) and mine["Q8_1"] == (32, 36)

    path = tmp_path / "ref.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_token_list([b"<s>", b"</s>", b"hi"])
    w.add_array("test.floats", [1.5, 2.5])
    expected = {}
    rng = np.random.default_rng(0)
    for i, qt in enumerate(["Q4_K", "Q6_K", "Q8_0", "IQ4_XS", "TQ2_0", "MXFP4"]):
        qtype = gguf.GGMLQuantizationType[qt]
        blck, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = 3, blck * 2
        raw = rng.integers(0, 255, size=(rows, cols // blck * size), dtype=np.uint8)
        name = f"blk.{i % 2}.w{i}.weight"
        w.add_tensor(name, raw, raw_dtype=qtype)
        expected[name] = (qt, (cols, rows), raw.nbytes)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("token_embd.weight", np.ones((3, 64), dtype=np.float16))
    expected["output_norm.weight"] = ("F32", (64,), 256)
    expected["token_embd.weight"] = ("F16", (64, 3), 384)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    g = read_gguf(path)
    assert isinstance(g, GgufFile)
    got = {t.name: (t.ggml_type, t.shape, t.nbytes) for t in g.tensors}
    assert got == expected
    r = gguf.GGUFReader(str(path))
    assert r.data_offset == g.data_offset
    for rt in r.tensors:
        mt = next(t for t in g.tensors if t.name == rt.name)
        assert (int(rt.n_bytes), int(rt.data_offset)) == (mt.nbytes, g.data_offset + mt.offset)
    assert g.metadata["tokenizer.ggml.tokens"] == ("<s>", "</s>", "hi")
    assert g.metadata["test.floats"] == (1.5, 2.5)
    s = summarize_gguf(g)
    assert (s.architecture, s.block_count, s.head_count, s.head_count_kv, s.context_length) == ("llama", 2, 8, 2, 4096)
    assert s.tied_output and s.input_bytes == 384


def test_estimate_from_gguf_counts_stored_bytes(tmp_path):
    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec

    path = tmp_path / "tiny.gguf"
    write_gguf(path, _llama_meta(), _llama_tensors())
    g = read_gguf(path)
    est = estimate_replica(load_spec(str(path)), max_model_len=1024, engine="llamacpp", device="cpu")
    assert est.quantization == "gguf" and est.source == "gguf" and est.engine == "llamacpp"
    assert est.weights == sum(t.nbytes for t in g.tensors)  # llama.cpp keeps the tensors as stored
    # KV: 2 x n_ctx x kv_heads x head_dim x 2 bytes per block, 4 blocks
    assert est.kv_cache == 4 * 2 * 1024 * KV_HEADS * (EMB // HEADS) * 2
    # transformers dequantizes on load: every element at bf16, and the plan says so
    tf = estimate_replica(load_spec(str(path)), max_model_len=1024, dtype="bf16")
    n = sum(math.prod(t.shape) for t in g.tensors)
    assert tf.weights == 2 * n and any("dequantizes" in x for x in tf.notes)
    with pytest.raises(ModelSpecError, match="GGUF file"):
        estimate_replica(load_spec(str(path)), quant="int4")
