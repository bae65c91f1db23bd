"""Read safetensors headers directly: 8-byte little-endian header length, then that many bytes of JSON.

No tensor data is read. Format: https://github.com/huggingface/safetensors (README, "Format").
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from planner.errors import ModelSpecError

# NOTE: element sizes of the dtype strings safetensors writes (safetensors' Dtype enum). Sub-byte types are
# stored packed, so their element size is fractional.
DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}

# Largest header we accept; safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    nbytes: int
    file: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict, tuple[StoredTensor, ...]]:
    """Return (``__metadata__`` dict, tensors) of one ``.safetensors`` file, validating the header against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelSpecError(
                    f"{path}: file is {size} bytes, too short for a safetensors header (needs at least 8); "
                    "re-download the checkpoint"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelSpecError(
                    f"{path}: safetensors header says it is {n} bytes, but the file has only {size - 8} bytes after "
                    "the length field; the file is truncated or not safetensors: re-download it"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ModelSpecError(f"{path}: cannot read safetensors file: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{path}: safetensors header is not valid JSON ({exc}); re-download the file") from None
    if not isinstance(header, dict):
        raise ModelSpecError(f"{path}: safetensors header is not a JSON object; re-download the file")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelSpecError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r}; expected dtype, shape, data_offsets"
            ) from None
        if end > data_len or begin > end or begin < 0:
            raise ModelSpecError(
                f"{path}: tensor {name!r} claims bytes {begin}..{end} but the data section is {data_len} bytes; "
                "the file is truncated: re-download it"
            )
        tensors.append(StoredTensor(name=name, dtype=dtype, shape=shape, nbytes=end - begin, file=path))
    tensors.sort(key=lambda t: t.name)
    return meta, tuple(tensors)


def read_checkpoint(model_dir: str) -> tuple[StoredTensor, ...] | None:
    """Headers of every ``*.safetensors`` file of a model directory (sharded or not); ``None`` when there is none.

    With a ``model.safetensors.index.json``, every shard it names must be present.
    """
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    files: list[str]
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelSpecError(f"{index_path}: unreadable index ({exc}); re-download it") from None
        files = sorted(set(weight_map.values()))
        missing = [s for s in files if not os.path.exists(os.path.join(model_dir, s))]
        if missing:
            if len(missing) == len(files):
                return None  # an index without shards: estimate from config.json instead
            raise ModelSpecError(
                f"{model_dir}: {len(missing)} of {len(files)} shards named in model.safetensors.index.json are "
                f"missing (first: {missing[0]}); download all shards or remove the index"
            )
        files = [os.path.join(model_dir, s) for s in files]
    else:
        files = sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        return None
    out: list[StoredTensor] = []
    for path in files:
        out.extend(read_header(path)[1])
    return tuple(out)
