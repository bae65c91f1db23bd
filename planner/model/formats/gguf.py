"""Read a GGUF file's header (metadata and tensor infos) without reading tensor data.

Layout (little-endian, GGUF versions 2 and 3; see ggml's ``docs/gguf.md`` and ``ggml/src/gguf.cpp``)::

    magic "GGUF" | uint32 version | uint64 n_tensors | uint64 n_kv
    n_kv x      { string key | uint32 value_type | value }
    n_tensors x { string name | uint32 n_dims | uint64 dims[n_dims] | uint32 ggml_type | uint64 offset }
    padding to ``general.alignment`` (default 32) | tensor data (each tensor at data_offset + offset)

A string is ``uint64 length`` + UTF-8 bytes; an array is ``uint32 element_type`` + ``uint64 count`` + elements.
``dims`` are in ggml order: ``dims[0]`` is the innermost (contiguous) dimension, the reverse of PyTorch's shape;
``GgufTensor.shape`` keeps the file's order.

``read_gguf(path)`` returns a ``GgufFile``; ``summarize_gguf(gguf)`` returns a ``GgufSummary`` with the architecture
hyper-parameters and bytes per transformer block (``blk.N.*``) and per non-block tensor.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from planner.errors import ModelSpecError
from planner.units import format_bytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# NOTE: default alignment GGUF_DEFAULT_ALIGNMENT = 32 in ggml/include/gguf.h and gguf-py constants.py.
DEFAULT_ALIGNMENT = 32
# NOTE: GGML_MAX_DIMS = 4 in ggml/include/ggml.h; gguf.cpp rejects tensor infos with more dims.
MAX_DIMS = 4

# ggml type id -> (name, block size in elements, bytes per block).
# NOTE: from ggml's type_traits table in ggml/src/ggml.c (blck_size, type_size = sizeof(block_*) as defined in
# ggml/src/ggml-common.h), cross-checked against gguf-py's GGML_QUANT_SIZES (gguf/constants.py, gguf 0.19.0).
# One difference: Q8_1 is 36 bytes per block in ggml (two ggml_half + 32 int8) while gguf-py still lists 4 + 4 + 32
# (the old float layout); we follow ggml, which is what llama.cpp allocates. Q8_1/Q8_K are activation types that
# never appear as stored weights in practice.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    6: ("Q5_0", 32, 2 + 4 + 16),
    7: ("Q5_1", 32, 2 + 2 + 4 + 16),
    8: ("Q8_0", 32, 2 + 32),
    9: ("Q8_1", 32, 2 + 2 + 32),
    10: ("Q2_K", 256, 2 * 2 + 256 // 16 + 256 // 4),
    11: ("Q3_K", 256, 256 // 8 + 256 // 4 + 12 + 2),
    12: ("Q4_K", 256, 2 * 2 + 12 + 256 // 2),
    13: ("Q5_K", 256, 2 * 2 + 12 + 256 // 8 + 256 // 2),
    14: ("Q6_K", 256, 256 // 2 + 256 // 4 + 256 // 16 + 2),
    15: ("Q8_K", 256, 4 + 256 + 2 * 256 // 16),
    16: ("IQ2_XXS", 256, 2 + 256 // 4),
    17: ("IQ2_XS", 256, 2 + 256 // 4 + 256 // 32),
    18: ("IQ3_XXS", 256, 2 + 256 // 4 + 256 // 8),
    19: ("IQ1_S", 256, 2 + 256 // 8 + 256 // 16),
    20: ("IQ4_NL", 32, 2 + 16),
    21: ("IQ3_S", 256, 2 + 256 // 4 + 256 // 32 + 256 // 8 + 256 // 64),
    22: ("IQ2_S", 256, 2 + 256 // 4 + 256 // 32 + 256 // 32),
    23: ("IQ4_XS", 256, 2 + 2 + 256 // 64 + 256 // 2),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 256 // 8 + 256 // 16 + 256 // 32),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, (256 - 4 * 256 // 64) // 5 + 256 // 64 + 2),
    35: ("TQ2_0", 256, 256 // 4 + 2),
    39: ("MXFP4", 32, 1 + 16),
    40: ("NVFP4", 64, 4 + 32),
    41: ("Q1_0", 128, 2 + 16),
}
# NOTE: ids removed from ggml (ggml.h keeps them as comments; gguf.cpp refuses files that use them).
REMOVED_GGML_TYPES: dict[int, str] = {
    4: "Q4_2",
    5: "Q4_3",
    31: "Q4_0_4_4",
    32: "Q4_0_4_8",
    33: "Q4_0_8_8",
    36: "IQ4_NL_4_4",
    37: "IQ4_NL_4_8",
    38: "IQ4_NL_8_8",
}
GGML_TYPE_BY_NAME: dict[str, tuple[int, int, int]] = {
    name: (tid, blck, size) for tid, (name, blck, size) in GGML_TYPES.items()
}

# GGUF metadata value types (gguf.h enum gguf_type / gguf-py GGUFValueType): id -> (name, struct format or None).
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<B"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
# Non-block tensors that llama.cpp treats as the input layer (always kept on the CPU).
_INPUT_PREFIXES = ("token_embd", "position_embd", "token_types")
# Longest array kept whole by GgufFile.to_json(); longer ones (vocabularies, merges) are summarised.
JSON_ARRAY_LIMIT = 64


def ggml_type_nbytes(ggml_type: str, n_elements: int, *, row_length: int | None = None) -> int:
    """Bytes of ``n_elements`` values stored as ``ggml_type`` (e.g. ``"Q4_K"``); ``n_elements / block * type_size``.

    Raises ``ModelSpecError`` for an unknown type name or a count (or ``row_length``) not a multiple of the block.
    """
    entry = GGML_TYPE_BY_NAME.get(str(ggml_type).upper())
    if entry is None:
        raise ModelSpecError(f"unknown ggml type {ggml_type!r}; use one of {', '.join(GGML_TYPE_BY_NAME)}")
    _, blck, size = entry
    row = n_elements if row_length is None else row_length
    if n_elements < 0 or row % blck or n_elements % blck:
        raise ModelSpecError(
            f"{n_elements} elements (row of {row}) of ggml type {ggml_type} is not a multiple of its block size "
            f"{blck}; use a row length divisible by {blck} or another type"
        )
    return n_elements // blck * size


@dataclass(frozen=True)
class GgufTensor:
    """One tensor info. ``shape`` is in ggml order (innermost dimension first), as stored in the file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    n_elements: int
    nbytes: int
    offset: int = 0  # relative to GgufFile.data_offset

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "ggml_type": self.ggml_type,
            "n_elements": self.n_elements,
            "nbytes": self.nbytes,
            "offset": self.offset,
        }


@dataclass(frozen=True)
class GgufFile:
    """A GGUF header. ``metadata`` maps key -> value (int, float, bool, str, or tuple for arrays)."""

    path: str
    version: int
    metadata: dict
    tensors: tuple[GgufTensor, ...]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT

    @property
    def tensor_bytes(self) -> int:
        """Sum of the tensors' data sizes (without alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    def to_json(self, *, array_limit: int = JSON_ARRAY_LIMIT) -> dict:
        """Plain dict; arrays longer than ``array_limit`` become ``{"array_length": n, "head": [first 8]}``."""
        return {
            "path": self.path,
            "version": self.version,
            "alignment": self.alignment,
            "data_offset": self.data_offset,
            "file_size": self.file_size,
            "tensor_bytes": self.tensor_bytes,
            "metadata": {k: _json_value(v, array_limit) for k, v in self.metadata.items()},
            "tensors": [t.to_json() for t in self.tensors],
        }


def _json_value(value: Any, limit: int) -> Any:
    if isinstance(value, tuple):
        if len(value) > limit:
            return {"array_length": len(value), "head": [_json_value(v, limit) for v in value[:8]]}
        return [_json_value(v, limit) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _Cursor:
    """Sequential reader over a file with bounds checks against the file size; reads in chunks."""

    CHUNK = 1 << 20

    def __init__(self, fh: BinaryIO, file_size: int, path: str):
        self._fh = fh
        self._buf = b""
        self._buf_start = 0
        self.pos = 0
        self.size = file_size
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelSpecError(
                f"truncated GGUF header in {self.path}: {what} at offset {self.pos} needs {n} bytes but the file "
                f"has {self.size} bytes ({max(self.size - self.pos, 0)} left); re-download or re-convert the file"
            )

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        lo = self.pos - self._buf_start
        if lo + n > len(self._buf):
            keep = self._buf[lo:]
            self._fh.seek(self._buf_start + len(self._buf))
            more = self._fh.read(max(n - len(keep), self.CHUNK))
            self._buf = keep + more
            self._buf_start = self.pos
            lo = 0
            if n > len(self._buf):  # the file shrank under us
                raise ModelSpecError(
                    f"truncated GGUF header in {self.path}: {what} at offset {self.pos} needs {n} bytes but only "
                    f"{len(self._buf)} could be read; re-download the file"
                )
        self.pos += n
        return self._buf[lo : lo + n]

    def unpack(self, st: struct.Struct, what: str) -> Any:
        return st.unpack(self.read(st.size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack(_U64, f"length of {what}")
        raw = self.read(n, f"{what} ({n} bytes)")
        # NOTE: GGUF strings are UTF-8; some vocabularies hold invalid byte sequences, so decode leniently.
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> tuple[str, ...]:
        """``count`` consecutive GGUF strings; parses straight from the buffer, refilling through ``string``."""
        out: list[str] = []
        append, unpack_from = out.append, _U64.unpack_from
        while len(out) < count:
            buf, lo = self._buf, self.pos - self._buf_start
            blen = len(buf)
            while len(out) < count and lo + 8 <= blen:
                n = unpack_from(buf, lo)[0]
                if lo + 8 + n > blen:
                    break
                append(buf[lo + 8 : lo + 8 + n].decode("utf-8", errors="replace"))
                lo += 8 + n
            self.pos = self._buf_start + lo
            if len(out) < count:
                append(self.string(f"{what} element {len(out)}"))
        return tuple(out)


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    info = _VALUE_TYPES.get(vtype)
    if info is None:
        raise ModelSpecError(
            f"unknown GGUF value type id {vtype} for key {key!r} at offset {cur.pos - 4} in {cur.path}; "
            f"valid ids are 0..12; the file is corrupt or from a newer GGUF revision"
        )
    name, fmt = info
    if vtype == _STRING:
        return cur.string(f"string value of {key!r}")
    if vtype == _ARRAY:
        if depth > 8:
            raise ModelSpecError(f"GGUF array nesting deeper than 8 for key {key!r} in {cur.path}; the file is corrupt")
        etype = cur.unpack(_U32, f"array element type of {key!r}")
        count = cur.unpack(_U64, f"array length of {key!r}")
        einfo = _VALUE_TYPES.get(etype)
        if einfo is None:
            raise ModelSpecError(
                f"unknown GGUF value type id {etype} in array {key!r} at offset {cur.pos - 12} in {cur.path}; "
                f"valid ids are 0..12; the file is corrupt or from a newer GGUF revision"
            )
        efmt = einfo[1]
        min_size = struct.calcsize(efmt) if efmt else (8 if etype == _STRING else 12)
        cur.need(count * min_size, f"array {key!r} of {count} {einfo[0]} elements")
        if efmt is not None:
            raw = cur.read(count * struct.calcsize(efmt), f"array {key!r}")
            values = struct.unpack(f"<{count}{efmt[1]}", raw)
            if etype == _BOOL:
                values = tuple(bool(v) for v in values)
            return tuple(values)
        if etype == _STRING:
            return cur.strings(count, f"array {key!r}")
        return tuple(_value(cur, etype, key, depth + 1) for _ in range(count))
    v = cur.unpack(struct.Struct(fmt), f"{name} value of {key!r}")  # type: ignore[arg-type]
    return bool(v) if vtype == _BOOL else v


def read_gguf(path: str | os.PathLike) -> GgufFile:
    """Parse the header of the GGUF file at ``path`` (metadata + tensor infos); tensor data is not read.

    Raises ``ModelSpecError`` for a missing file, bad magic, unsupported version, truncated header, unknown ggml
    type, or tensor data that would run past the end of the file.
    """
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            return _parse(fh, file_size, spath)
    except OSError as exc:
        raise ModelSpecError(f"cannot read GGUF file {spath}: {exc.strerror or exc}; check the path") from exc


def _parse(fh: BinaryIO, file_size: int, path: str) -> GgufFile:
    cur = _Cursor(fh, file_size, path)
    if file_size < 4:
        raise ModelSpecError(
            f"not a GGUF file: {path} has {file_size} bytes, fewer than the 4-byte magic 'GGUF'; pass a .gguf file"
        )
    magic = cur.read(4, "magic")
    if magic != GGUF_MAGIC:
        raise ModelSpecError(
            f"not a GGUF file: {path} starts with {magic!r}, expected b'GGUF'; pass a .gguf file (convert with "
            f"llama.cpp's convert_hf_to_gguf.py)"
        )
    version = cur.unpack(_U32, "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        hint = (
            "it is a big-endian GGUF; use a little-endian file"
            if swapped in SUPPORTED_VERSIONS
            else "re-convert it with a current llama.cpp (convert_hf_to_gguf.py) to get version 3"
        )
        raise ModelSpecError(f"unsupported GGUF version {version} in {path}; gpuplan reads versions 2 and 3; {hint}")
    n_tensors = cur.unpack(_U64, "tensor count")
    n_kv = cur.unpack(_U64, "metadata count")
    # Each key/value takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor info at least 8+4+8+4+8.
    cur.need(n_kv * 13 + n_tensors * 32, f"{n_kv} metadata entries and {n_tensors} tensor infos")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}")
        if key in metadata:
            raise ModelSpecError(f"duplicate metadata key {key!r} (entry {i}) in {path}; the file is corrupt")
        vtype = cur.unpack(_U32, f"value type of {key!r}")
        metadata[key] = _value(cur, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelSpecError(
            f"general.alignment is {alignment!r} in {path}; it must be a power of two (default {DEFAULT_ALIGNMENT})"
        )

    infos = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        if name in seen:
            raise ModelSpecError(f"duplicate tensor name {name!r} (tensor {i}) in {path}; the file is corrupt")
        seen.add(name)
        n_dims = cur.unpack(_U32, f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise ModelSpecError(
                f"tensor {name!r} in {path} has {n_dims} dims, more than ggml's {MAX_DIMS}; the file is corrupt"
            )
        raw = cur.read(8 * n_dims, f"dims of tensor {name!r}")
        dims = struct.unpack(f"<{n_dims}Q", raw)
        type_id = cur.unpack(_U32, f"ggml type of tensor {name!r}")
        offset = cur.unpack(_U64, f"data offset of tensor {name!r}")
        infos.append((name, dims, type_id, offset))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors = tuple(
        _tensor(name, dims, tid, off, alignment, data_offset, file_size, path) for name, dims, tid, off in infos
    )
    return GgufFile(
        path=path,
        version=version,
        metadata=metadata,
        tensors=tensors,
        data_offset=data_offset,
        file_size=file_size,
        alignment=alignment,
    )


def _tensor(
    name: str,
    dims: tuple[int, ...],
    type_id: int,
    offset: int,
    alignment: int,
    data_offset: int,
    file_size: int,
    path: str,
) -> GgufTensor:
    entry = GGML_TYPES.get(type_id)
    if entry is None:
        removed = REMOVED_GGML_TYPES.get(type_id)
        why = f"it is {removed}, removed from ggml" if removed else "not in ggml's type table"
        raise ModelSpecError(
            f"tensor {name!r} in {path} has unknown ggml type id {type_id} ({why}); known ids are "
            f"{min(GGML_TYPES)}..{max(GGML_TYPES)}; re-quantize the model with a current llama.cpp"
        )
    tname, blck, size = entry
    n_elements = math.prod(dims) if dims else 1
    if n_elements and dims[0] % blck:
        raise ModelSpecError(
            f"tensor {name!r} in {path}: row length {dims[0]} of type {tname} is not a multiple of its block size "
            f"{blck}; the file is corrupt"
        )
    nbytes = n_elements // blck * size
    if offset % alignment:
        raise ModelSpecError(
            f"tensor {name!r} in {path}: data offset {offset} is not a multiple of the alignment {alignment}; "
            f"the file is corrupt"
        )
    end = data_offset + offset + nbytes
    if end > file_size:
        raise ModelSpecError(
            f"truncated GGUF file {path}: tensor {name!r} ({nbytes} bytes at offset {data_offset + offset}) ends at "
            f"{end}, past the file size {file_size}; re-download the file"
        )
    return GgufTensor(
        name=name, shape=tuple(dims), ggml_type=tname, n_elements=n_elements, nbytes=nbytes, offset=offset
    )


# ---------------------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class GgufSummary:
    """Architecture hyper-parameters and the bytes per block of a GGUF model.

    ``head_count``/``head_count_kv`` are an int, or a tuple with one value per block where the file stores an array
    (e.g. OpenELM, hybrid models: 0 KV heads marks a block without attention). ``layer_bytes[i]`` is the sum of the
    ``blk.i.*`` tensors. ``input_bytes`` are token_embd/position_embd/token_types (llama.cpp keeps them on the CPU);
    ``output_bytes`` are every other non-block tensor (output, output_norm, ...), plus token_embd again when the
    model has no ``output.weight`` (tied embeddings: llama.cpp duplicates token_embd for the output layer).
    """

    path: str
    architecture: str | None
    name: str | None
    block_count: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | tuple[int, ...] | None
    head_count_kv: int | tuple[int, ...] | None
    key_length: int | None
    value_length: int | None
    layer_bytes: tuple[int, ...]
    non_layer_bytes: tuple[tuple[str, int], ...]  # (tensor name, bytes), in file order
    input_bytes: int
    output_bytes: int
    tied_output: bool
    tensor_bytes: int
    file_size: int
    ggml_type_counts: tuple[tuple[str, int], ...]  # (type, number of tensors), most common first

    def to_json(self) -> dict:
        out = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if f in ("non_layer_bytes", "ggml_type_counts"):
                v = {k: n for k, n in v}
            elif isinstance(v, tuple):
                v = list(v)
            out[f] = v
        out["file_size_human"] = format_bytes(self.file_size)
        return out


def _int_meta(meta: Mapping[str, Any], key: str) -> int | None:
    v = meta.get(key)
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return None


def _int_or_array(meta: Mapping[str, Any], key: str) -> int | tuple[int, ...] | None:
    v = meta.get(key)
    if isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        if v and all(x == v[0] for x in v):
            return v[0]
        return v
    return _int_meta(meta, key)


def summarize_gguf(gguf: GgufFile) -> GgufSummary:
    """Architecture, block count, context/embedding length, head counts and bytes per block of a ``GgufFile``."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    p = f"{arch}." if arch else "\0"  # no architecture: no arch-prefixed key matches

    per_block: dict[int, int] = {}
    non_layer: list[tuple[str, int]] = []
    counts: dict[str, int] = {}
    for t in gguf.tensors:
        counts[t.ggml_type] = counts.get(t.ggml_type, 0) + 1
        m = _BLOCK_RE.match(t.name)
        if m:
            i = int(m.group(1))
            per_block[i] = per_block.get(i, 0) + t.nbytes
        else:
            non_layer.append((t.name, t.nbytes))

    block_count = _int_meta(meta, p + "block_count")
    n_blocks = max([block_count or 0, *(i + 1 for i in per_block)]) if (per_block or block_count) else 0
    layer_bytes = tuple(per_block.get(i, 0) for i in range(n_blocks))

    input_bytes = sum(n for name, n in non_layer if name.startswith(_INPUT_PREFIXES))
    output_bytes = sum(n for name, n in non_layer if not name.startswith(_INPUT_PREFIXES))
    names = {name for name, _ in non_layer}
    tied = "output.weight" not in names and "token_embd.weight" in names
    if tied:
        output_bytes += dict(non_layer)["token_embd.weight"]

    name = meta.get("general.name")
    return GgufSummary(
        path=gguf.path,
        architecture=arch,
        name=name if isinstance(name, str) else None,
        block_count=block_count if block_count is not None else (n_blocks or None),
        context_length=_int_meta(meta, p + "context_length"),
        embedding_length=_int_meta(meta, p + "embedding_length"),
        head_count=_int_or_array(meta, p + "attention.head_count"),
        head_count_kv=_int_or_array(meta, p + "attention.head_count_kv"),
        key_length=_int_meta(meta, p + "attention.key_length"),
        value_length=_int_meta(meta, p + "attention.value_length"),
        layer_bytes=layer_bytes,
        non_layer_bytes=tuple(non_layer),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        tied_output=tied,
        tensor_bytes=gguf.tensor_bytes,
        file_size=gguf.file_size,
        ggml_type_counts=tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
    )
