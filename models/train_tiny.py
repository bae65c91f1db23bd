#!/usr/bin/env python
"""Train gpuplan's default laptop model, ``models/tiny-chat``, from scratch on CPU.

A ~1.4M-parameter Llama-architecture causal LM (hidden 128, intermediate 384,
4 layers, 2 heads of dim 64, 2 KV heads, tied embeddings) with a 4096-entry
byte-level BPE tokenizer.  The training text is only what ships with the local
Python: the standard library's ``.py`` sources (no ``test``/``tests``/
``idlelib``/``site-packages``) plus a few thousand chat conversations built
from the docstrings of public modules, classes, functions and methods
("What does json.dumps do?" -> first docstring paragraph + EOS).

Everything is deterministic for a given interpreter, stdlib, thread count and
``--tokens`` budget: sorted file lists, hash-based train/validation split,
seeded ``random``/``torch`` generators, a token budget that fixes the number of
optimiser steps and therefore the LR schedule.  ``--max-minutes`` is an
optional wall-clock safety cap; a run that hits it stops early (and is then no
longer reproducible), so it is off by default.

Training runs in fp32 (bf16 matmuls are far slower on CPUs without AMX) with
``torch.compile``; the weights are cast to bf16 for saving.

    .venv/bin/python models/train_tiny.py                      # ~4.2M tokens, ~11 min at ~6.5k tok/s
    .venv/bin/python models/train_tiny.py --tokens 200000 --out /tmp/tiny-smoke   # smoke run
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
import tokenize
import zlib
from pathlib import Path

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# Transformers renders chat templates with trim_blocks/lstrip_blocks, which
# eat the newline after every {% ... %} tag, so every newline we want in the
# output is written as a '\n' string literal inside {{ ... }}.  Rendered:
#   <|bos|><|system|>\nSYS<|eos|>\n<|user|>\nQ<|eos|>\n<|assistant|>\nA<|eos|>\n
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('tiny-chat only knows the system, user and assistant roles') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] | trim + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant for Python programmers.",
    "Answer questions about the Python standard library.",
    "You are tiny-chat, a small model that knows the Python standard library.",
]
Q_FUNC = ["What does {q} do?", "What does the function {q} do?", "Explain {q}.",
          "What is {q} for?", "Tell me about {q}.", "How would you describe {q}?"]
Q_METH = ["What does {q} do?", "What does the method {q} do?", "Explain {q}.",
          "What is {q} for?", "Tell me about {q}."]
Q_CLASS = ["What is {q}?", "What does the {q} class do?", "Explain the {q} class.",
           "Tell me about {q}.", "What is {q} used for?"]
Q_MOD = ["What is the {q} module?", "What does the {q} module do?",
         "Tell me about the {q} module.", "What is {q} for?"]


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Pure-Python twin of CHAT_TEMPLATE (checked against it at startup)."""
    out = BOS
    for m in messages:
        out += f"<|{m['role']}|>\n{m['content'].strip()}{EOS}\n"
    if add_generation_prompt:
        out += "<|assistant|>\n"
    return out


# ----------------------------------------------------------------------------- data

def stdlib_files(root: Path) -> list[Path]:
    skip = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_source(path: Path) -> str:
    try:
        with tokenize.open(path) as fh:  # honours PEP 263 coding cookies
            return fh.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return path.read_bytes().decode("utf-8", errors="replace")


def is_val_file(rel: str, every: int) -> bool:
    return zlib.crc32(rel.encode()) % every == 0


def module_name(rel: str) -> str | None:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def first_paragraph(doc: str, name: str) -> str | None:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", doc)]
    paras = [p for p in paras if p]
    # Skip "name(args) -> result" signature lines that C-style docstrings start with.
    while paras and re.match(re.escape(name) + r"\s*\(", paras[0]) and len(paras) > 1:
        paras = paras[1:]
    if not paras:
        return None
    p = paras[0]
    if len(p) < 20 or len(p) > 600 or "XXX" in p:
        return None
    return p


def docstring_pairs(source: str, mod: str) -> list[tuple[str, str, str]]:
    """(kind, qualified name, answer) for the public, documented names of one module."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    out = []
    doc = ast.get_docstring(tree)
    if doc and (a := first_paragraph(doc, mod.rsplit(".", 1)[-1])):
        out.append(("mod", mod, a))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and (a := first_paragraph(doc, node.name)):
                out.append(("func", f"{mod}.{node.name}", a))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and (a := first_paragraph(doc, node.name)):
                out.append(("class", f"{mod}.{node.name}", a))
            for m in node.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_"):
                    doc = ast.get_docstring(m)
                    if doc and (a := first_paragraph(doc, m.name)):
                        out.append(("meth", f"{mod}.{node.name}.{m.name}", a))
    return out


def build_conversations(pairs: list[tuple[str, str, str]], rng: random.Random) -> list[list[dict]]:
    templates = {"func": Q_FUNC, "meth": Q_METH, "class": Q_CLASS, "mod": Q_MOD}
    pairs = list(pairs)
    rng.shuffle(pairs)
    convs, i = [], 0
    while i < len(pairs):
        turns = 2 if rng.random() < 0.2 and i + 1 < len(pairs) else 1
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for kind, q, answer in pairs[i:i + turns]:
            msgs.append({"role": "user", "content": rng.choice(templates[kind]).format(q=q)})
            msgs.append({"role": "assistant", "content": answer})
        convs.append(msgs)
        i += turns
    return convs


def load_corpus(root: Path, val_every: int, max_pairs: int, seed: int):
    code = {"train": [], "val": []}
    pairs = {"train": [], "val": []}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        split = "val" if is_val_file(rel, val_every) else "train"
        src = read_source(path)
        if not src.strip():
            continue
        code[split].append(src)
        if (mod := module_name(rel)) is not None:
            pairs[split] += docstring_pairs(src, mod)
    rng = random.Random(seed)
    if len(pairs["train"]) > max_pairs:
        pairs["train"] = rng.sample(pairs["train"], max_pairs)
    chats = {s: build_conversations(pairs[s], random.Random(seed + i)) for i, s in enumerate(("train", "val"))}
    return code, pairs, chats


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain-text prompts get a BOS like every training document; apply_chat_template
    # tokenizes with add_special_tokens=False and the template writes BOS itself.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=max_len, padding_side="left",
    )


SAMPLE_PROMPTS = [
    # A code prompt should end where a token ends: byte-level BPE merges "\n" with the
    # following indentation ("\n   " + " return"), so a prompt ending in a bare "\n" is
    # off-distribution and degrades badly (the training run's own log shows it looping).
    ("code", "def is_prime(n):"),
    ("chat", [{"role": "user", "content": "What does json.dumps do?"}]),
    ("chat", [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is the shutil module?"}]),
]


def print_samples(out, log, max_new_tokens: int = 64) -> None:
    """Greedy and seeded-sampled continuations from the saved bf16 model (used for the README)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "code":
            enc = tok(prompt, return_tensors="pt")
        else:
            enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        for mode in ("greedy", "sampled"):
            torch.manual_seed(0)
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_p=0.95)
            o = lm.generate(**enc, max_new_tokens=max_new_tokens, **kw)
            text = tok.decode(o[0, enc["input_ids"].shape[1]:], skip_special_tokens=False)
            log(f"SAMPLE {kind} {mode} prompt={prompt!r}\n{text}\n---")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "tiny-chat"))
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--tokens", type=int, default=2048 * 2048,
                   help="training-token budget (fixes steps and LR schedule); default 4,194,304 "
                        "= 2048 steps of 8x256, ~11 min at ~6.5k tok/s on 2 threads")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="optional wall-clock cap on the training loop (breaks determinism if hit)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--chat-rows", type=int, default=2, help="rows per batch drawn from chat data")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-every", type=int, default=20, help="1 in N stdlib files is held out")
    p.add_argument("--max-chat-pairs", type=int, default=6000)
    p.add_argument("--eval-every", type=int, default=256)
    p.add_argument("--log-every", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--samples-only", action="store_true",
                   help="skip training; print greedy/sampled outputs of the model already in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    if args.samples_only:
        print_samples(Path(args.out), log)
        return 0
    log(f"torch {torch.__version__}, threads={torch.get_num_threads()}, stdlib={args.stdlib}")
    code, pairs, chats = load_corpus(Path(args.stdlib), args.val_every, args.max_chat_pairs, args.seed)
    log(f"files train/val {len(code['train'])}/{len(code['val'])}, "
        f"chat pairs train/val {len(pairs['train'])}/{len(pairs['val'])}, "
        f"conversations train/val {len(chats['train'])}/{len(chats['val'])}")

    tok_texts = code["train"] + [m["content"] for c in chats["train"] for m in c]
    tokenizer = train_tokenizer(tok_texts, args.vocab_size, args.seq_len)
    sample = chats["train"][0]
    assert tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True) \
        == render_chat(sample, add_generation_prompt=True), "CHAT_TEMPLATE and render_chat disagree"
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    log(f"tokenizer: vocab {len(tokenizer)}, bos/eos/pad = {bos_id}/{eos_id}/{pad_id}")

    backend = tokenizer.backend_tokenizer

    def code_stream(texts):
        ids = []
        for enc in backend.encode_batch(texts, add_special_tokens=False):
            ids += [bos_id] + enc.ids + [eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def chat_stream(convs):
        ids, starts = [], []
        for enc in backend.encode_batch([render_chat(c) for c in convs], add_special_tokens=False):
            starts.append(len(ids))
            ids += enc.ids
        return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)

    code_tr, code_va = code_stream(code["train"]), code_stream(code["val"])
    chat_tr, chat_tr_starts = chat_stream(chats["train"])
    chat_va, _ = chat_stream(chats["val"])
    nbytes = sum(len(t.encode()) for t in code["train"])
    log(f"tokens: code train {len(code_tr):,} ({nbytes / len(code_tr):.2f} bytes/token), "
        f"code val {len(code_va):,}, chat train {len(chat_tr):,}, chat val {len(chat_va):,}")

    T, B = args.seq_len, args.batch_size
    chat_tr_starts = chat_tr_starts[chat_tr_starts < len(chat_tr) - T - 1]

    def windows(stream, n):
        n = min(n, (len(stream) - 1) // T)
        x = torch.stack([stream[i * T:(i + 1) * T] for i in range(n)])
        y = torch.stack([stream[i * T + 1:(i + 1) * T + 1] for i in range(n)])
        return x, y

    val_sets = {"code": windows(code_va, 64), "chat": windows(chat_va, 16)}

    gen = torch.Generator().manual_seed(args.seed)

    def get_batch():
        n_chat = args.chat_rows
        offs = torch.randint(0, len(code_tr) - T - 1, (B - n_chat,), generator=gen).tolist()
        starts = chat_tr_starts[torch.randint(0, len(chat_tr_starts), (n_chat,), generator=gen)].tolist()
        rows = [code_tr[o:o + T + 1] for o in offs] + [chat_tr[s:s + T + 1] for s in starts]
        batch = torch.stack(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=T,
        hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    assert len(tokenizer) <= config.vocab_size
    model = LlamaForCausalLM(config).float()
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 64 == 0 and mod.out_features % 64 == 0, name
    log(f"model: {n_params:,} parameters (tied embeddings)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    total_steps = max(1, args.tokens // (B * T))

    def lr_at(step):  # linear warmup, cosine decay to min_lr_ratio * lr
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        prog = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    def loss_fn(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn)

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        res, tot_loss, tot_n = {}, 0.0, 0
        for name, (vx, vy) in val_sets.items():
            losses = []
            for i in range(0, len(vx), B):
                logits = m(input_ids=vx[i:i + B], use_cache=False).logits.float()
                losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), vy[i:i + B].reshape(-1),
                                              reduction="sum").item())
            n = vy.numel()
            res[name] = sum(losses) / n
            tot_loss, tot_n = tot_loss + sum(losses), tot_n + n
        res["all"] = tot_loss / tot_n
        m.train()
        return res

    log(f"training {total_steps} steps x {B}x{T} = {total_steps * B * T:,} tokens "
        f"({args.chat_rows}/{B} rows chat), lr {args.lr} warmup {args.warmup_steps} cosine -> "
        f"{args.lr * args.min_lr_ratio:g}, compile={not args.no_compile}")
    model.train()
    t_train = time.time()
    t_after_first = None
    run_loss, run_n, hist, evals = 0.0, 0, [], []
    step = 0
    for step in range(total_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = get_batch()
        loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = loss.item()
        hist.append(lv)
        run_loss, run_n = run_loss + lv, run_n + 1
        if step == 0:
            t_after_first = time.time()
            log(f"step 1 (incl. compile) took {t_after_first - t_train:.1f}s, loss {lv:.3f}")
        if (step + 1) % args.log_every == 0:
            el = time.time() - t_after_first
            tps = step * B * T / el if el > 0 else float("nan")
            log(f"step {step + 1}/{total_steps} tokens {(step + 1) * B * T:,} loss {run_loss / run_n:.3f} "
                f"lr {lr_at(step):.2e} {tps:,.0f} tok/s")
            run_loss, run_n = 0.0, 0
        if (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
            ev = evaluate(model)
            evals.append({"step": step + 1, **ev})
            log(f"eval step {step + 1}: val code {ev['code']:.3f} chat {ev['chat']:.3f} all {ev['all']:.3f}")
        if args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached at step {step + 1}; stopping early")
            break
    steps_done = step + 1
    t_end = time.time()
    train_wall = t_end - t_train
    steady_tps = (steps_done - 1) * B * T / max(1e-9, t_end - t_after_first) if steps_done > 1 else float("nan")
    ev32 = evaluate(model)
    tail = hist[-64:]
    log(f"done: {steps_done} steps, {steps_done * B * T:,} tokens in {train_wall:.1f}s "
        f"({steps_done * B * T / train_wall:,.0f} tok/s overall, {steady_tps:,.0f} tok/s after step 1); "
        f"train loss (mean of last {len(tail)} steps) {sum(tail) / len(tail):.3f}; "
        f"val fp32 code {ev32['code']:.3f} chat {ev32['chat']:.3f} all {ev32['all']:.3f}")

    # ---------------------------------------------------------------- save (bf16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "special_tokens_map.json", "generation_config.json", "config.json"):
        (out / stale).unlink(missing_ok=True)
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=128)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its internal class name "TokenizersBackend"; the public alias
    # PreTrainedTokenizerFast loads the same class there and also loads under transformers 4.x.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    evbf = evaluate(model)
    log(f"val bf16 code {evbf['code']:.3f} chat {evbf['chat']:.3f} all {evbf['all']:.3f}")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    metrics = {
        "params": n_params, "steps": steps_done, "tokens": steps_done * B * T, "seq_len": T, "batch_size": B,
        "train_wall_s": round(train_wall, 1), "tokens_per_s_overall": round(steps_done * B * T / train_wall),
        "tokens_per_s_after_first_step": round(steady_tps), "first_step_s": round(t_after_first - t_train, 1),
        "train_loss_last64": round(sum(tail) / len(tail), 4),
        "val_fp32": {k: round(v, 4) for k, v in ev32.items()},
        "val_bf16": {k: round(v, 4) for k, v in evbf.items()}, "evals": evals,
        "data": {"code_files": {s: len(v) for s, v in code.items()},
                 "chat_pairs": {s: len(v) for s, v in pairs.items()},
                 "conversations": {s: len(v) for s, v in chats.items()},
                 "tokens": {"code_train": len(code_tr), "code_val": len(code_va),
                            "chat_train": len(chat_tr), "chat_val": len(chat_va)},
                 "val_windows": {k: len(v[0]) for k, v in val_sets.items()}},
        "args": vars(args) | {"out": str(out)}, "torch": torch.__version__, "python": sys.version.split()[0],
        "stopped_early": steps_done < total_steps,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"saved {out} ({size / 1e6:.2f} MB): {sorted(f.name for f in out.iterdir())}")

    print_samples(out, log)
    log("all done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
