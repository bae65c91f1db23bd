"""A ModelSpec from a GGUF file: tensors as stored (per-tensor ggml types), dims from the metadata."""

from __future__ import annotations

import os

from planner.errors import ModelSpecError
from planner.model.spec.types import ArchDims, ModelSpec, TensorSpec


def spec_from_gguf(path: str) -> ModelSpec:
    from planner.model.formats.gguf import read_gguf, summarize_gguf  # the reader only when a GGUF is read

    g = read_gguf(path)
    s = summarize_gguf(g)
    missing = [k for k, v in (("block_count", s.block_count), ("embedding_length", s.embedding_length),
                              ("attention.head_count", s.head_count)) if v is None]
    if missing:
        raise ModelSpecError(f"{path}: GGUF metadata lacks {', '.join(f'{s.architecture}.{m}' for m in missing)}; "
                             "the KV cache cannot be sized without them")
    heads = s.head_count if isinstance(s.head_count, int) else max(s.head_count)
    kv = s.head_count_kv if s.head_count_kv is not None else heads
    kv = kv if isinstance(kv, int) else max(kv)
    hd = s.key_length or s.embedding_length // heads
    tensors = tuple(
        TensorSpec(name=t.name, shape=tuple(reversed(t.shape)), role="other", stored_dtype=t.ggml_type,
                   stored_bytes=t.nbytes)
        for t in g.tensors
    )
    vocab = next((t.shape[-1] for t in g.tensors if t.name == "token_embd.weight"), 0)
    dims = ArchDims(num_layers=s.block_count, hidden_size=s.embedding_length, num_heads=heads, num_kv_heads=kv,
                    head_dim=hd, intermediate_size=_meta_int(g.metadata, f"{s.architecture}.feed_forward_length")
                    or 4 * s.embedding_length, vocab_size=vocab, max_position_embeddings=s.context_length,
                    layer_types=("full",) * s.block_count)
    types = ", ".join(f"{n}x{t}" for t, n in s.ggml_type_counts[:4])
    return ModelSpec(name=s.name or os.path.basename(path), model_type=s.architecture or "gguf",
                     architecture=s.architecture or "gguf", source="gguf", dims=dims, tensors=tensors,
                     config_dtype="fp16", tied_embeddings=s.tied_output, checkpoint_quant=None, path=path,
                     notes=(f"GGUF tensors as stored ({types})",))


def _meta_int(meta: dict, key: str) -> int | None:
    v = meta.get(key)
    if isinstance(v, (list, tuple)):
        v = max(v) if v else None
    return int(v) if isinstance(v, int) else None
