"""Write a Hugging Face Llama checkpoint (safetensors + tokenizer.json) as a GGUF file that llama.cpp loads, with the
``gguf`` package (its ``GGUFWriter`` and ``gguf.quants``): F32, F16, Q8_0 or Q4_0 weights.

What llama.cpp's own ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM``, for the models this project ships and
tests with (llama, byte-level BPE tokenizer):

- tensor names ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,
  ffn_down}``, ``output_norm``, ``output`` (left out when the embeddings are tied: llama.cpp then uses
  ``token_embd`` for the output too);
- the Q and K projections are permuted from Hugging Face's half-split rotary layout to llama.cpp's interleaved one;
- norms (1-D tensors) stay F32, 2-D weights take the requested type (rows of 32 for Q8_0/Q4_0);
- the vocabulary as ``tokenizer.ggml.model = gpt2`` (tokens in byte-level form, merges, token types: special added
  tokens are CONTROL), bos/eos/pad ids and the chat template.

    python -m benchmarks.common.gguf_export models/tiny-chat models/tiny-chat/tiny-chat-Q8_0.gguf --type Q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
# general.file_type (llama_ftype): ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}


def _permute(w, n_head: int):
    """Hugging Face's rotary layout (first half / second half of each head) -> llama.cpp's (pairs), as
    convert_hf_to_gguf.py's LlamaModel.permute."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _tokenizer_metadata(w, model_dir: str, cfg: dict) -> None:
    import gguf

    tj = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{model_dir}: tokenizer model {model.get('type')!r}; this exporter writes byte-level BPE "
                         "vocabularies only: use llama.cpp's convert_hf_to_gguf.py for this model")
    vocab = model["vocab"]
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    n = cfg["vocab_size"]
    used = max(max(vocab.values()) + 1, max(added, default=-1) + 1)
    if used > n:
        raise ValueError(f"{model_dir}: the tokenizer has ids up to {used - 1} but the model's vocab_size is {n}; "
                         "llama.cpp needs one token per embedding row: export a matching tokenizer")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc = {}
    tc_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(tc_path):
        tc = json.load(open(tc_path, encoding="utf-8"))
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            add(int(v))
    # as the Hugging Face tokenizer does: its post-processor adds bos to a plain prompt (a chat template writes its own)
    w.add_add_bos_token("bos" in json.dumps(tj.get("post_processor") or {}).lower() or
                        bool(tc.get("add_bos_token", False)))
    template = tc.get("chat_template")
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        template = open(jinja, encoding="utf-8").read()
    if template:
        w.add_chat_template(template)


def export_llama(model_dir: str, out_path: str, qtype: str = "Q8_0", name: str | None = None) -> str:
    """Write ``model_dir`` (a Llama checkpoint) to ``out_path`` as GGUF with 2-D weights in ``qtype``."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file as load_torch  # bf16 is no numpy dtype: read through torch

    qtype = qtype.upper()
    if qtype not in TYPES:
        raise ValueError(f"type {qtype!r}: use one of {', '.join(TYPES)}")
    cfg = json.load(open(os.path.join(model_dir, "config.json"), encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{model_dir}: model_type {cfg.get('model_type')!r}; this exporter writes llama "
                         "checkpoints only: use llama.cpp's convert_hf_to_gguf.py for this model")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: rope_type {rope.get('rope_type')!r} is not exported (default rope only): "
                         "use llama.cpp's convert_hf_to_gguf.py for this model")
    tensors = {}
    for fn in sorted(os.listdir(model_dir)):
        if fn.endswith(".safetensors"):
            for k, v in load_torch(os.path.join(model_dir, fn)).items():
                tensors[k] = v.float().numpy()

    w = gguf.GGUFWriter(out_path, "llama")
    w.add_name(name or os.path.basename(os.path.normpath(model_dir)))
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_dimension_count(int(head_dim))
    if head_dim != cfg["hidden_size"] // n_head:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_file_type(FILE_TYPE[qtype])
    _tokenizer_metadata(w, model_dir, cfg)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    target = gguf.GGMLQuantizationType[qtype]

    def add(gname: str, data) -> None:
        if data.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, data.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(gname, data.astype(np.float16))
        else:
            packed = gguf.quants.quantize(data.astype(np.float32), target)
            w.add_tensor(gname, packed, raw_shape=packed.shape, raw_dtype=target)

    add("token_embd.weight", tensors.pop("model.embed_tokens.weight"))
    for i in range(int(cfg["num_hidden_layers"])):
        for hf, g in names.items():
            t = tensors.pop(f"model.layers.{i}.{hf}.weight")
            if g == "attn_q":
                t = _permute(t, n_head)
            elif g == "attn_k":
                t = _permute(t, n_kv)
            add(f"blk.{i}.{g}.weight", t)
    add("output_norm.weight", tensors.pop("model.norm.weight"))
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not cfg.get("tie_word_embeddings", False):
        add("output.weight", head)
    if tensors:
        raise ValueError(f"{model_dir}: tensors not exported: {sorted(tensors)[:5]}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Hugging Face Llama checkpoint -> GGUF (for llama.cpp)")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--type", default="Q8_0", choices=TYPES)
    a = ap.parse_args(argv)
    try:
        export_llama(a.model_dir, a.out, a.type)
    except (OSError, ValueError, KeyError) as exc:
        print(f"gguf_export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({os.path.getsize(a.out):,} bytes, {a.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
