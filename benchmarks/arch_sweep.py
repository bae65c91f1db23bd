"""Every decoder-only ``*ForCausalLM`` of the installed transformers, as a new user would bring it: is the planner's
weights estimate byte-exact?

    .venv/bin/python -m benchmarks.arch_sweep [--only llama,gpt2] [--json out.json] [--markdown out.md]

For each architecture in transformers' causal-LM auto mapping whose class name ends in ``ForCausalLM`` (and is not
an encoder-decoder): a tiny config (``tiny_config``: 2 layers, widths divisible by 64, vocabulary 512), a random
model built by transformers on the CPU and saved as bf16 safetensors, loaded with bf16, bitsandbytes int8, nf4, fp4
and nf4 + double quant ("int4"); the resident bytes (unique storages of parameters, buffers and quantization state,
serve/engines/memory_probe.py) against the planner's ``bytes.weights`` from the safetensors headers, and from config.json
alone where the planner knows the family by name. An architecture that cannot be built tiny on the CPU says why.

Rows: architecture, build status, the error of the headers estimate per scheme (0 = exact), and the config-only
estimate's status (exact, off by N bytes, or the fields/family it lacks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path


SCHEMES = ("bf16", "int8", "nf4", "fp4", "int4")
# generic names -> tiny values; set only where the config has the attribute (attribute_map aliases included)
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=256)
# other spellings some configs use for the same things
TINY_EXTRA = dict(ffn_dim=256, n_inner=256, d_ff=256, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                  num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=64,
                  q_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, first_k_dense_replace=1,
                  n_group=1, topk_group=1, sliding_window=64, linear_key_head_dim=64, linear_value_head_dim=64,
                  linear_num_key_heads=2, linear_num_value_heads=2, num_local_experts_per_tok=2)
MAX_PARAMS = 20_000_000


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout()


def causal_lm_architectures() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if isinstance(cls, (list, tuple)):
            cls = cls[0]
        if isinstance(cls, str) and cls.endswith("ForCausalLM"):
            out.append((model_type, cls))
    return sorted(out)


def tiny_config(model_type: str):
    """The config of ``model_type`` with its sizes made tiny (only attributes it has are set)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder")
    targets = [cfg]
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if text is not cfg:
        targets.append(text)
    for c in targets:
        attrs = set(c.to_dict()) | set(getattr(c, "attribute_map", {}) or {})
        for key, value in {**TINY, **TINY_EXTRA}.items():
            if key in attrs or hasattr(c, key):
                try:
                    setattr(c, key, value)
                except Exception:
                    pass
        for key in ("layer_types",):  # per-layer lists must match the new layer count
            v = getattr(c, key, None)
            if isinstance(v, list) and v:
                setattr(c, key, (v * 2)[:getattr(c, "num_hidden_layers", 2)])
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v >= 512:
                setattr(c, key, 1)
    return cfg


def not_linear_2d(model) -> list[str]:
    """Modules holding a 2-D ``weight`` that bitsandbytes leaves alone although their names look like Linear layers:
    transformers converts exact ``nn.Linear`` (and GPT-2's Conv1D) only, so subclasses (FalconLinear, ...) and
    other modules stay at the load dtype. Layer indices become ``*``."""
    import re

    import torch
    from transformers.pytorch_utils import Conv1D

    out = set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.nn.Parameter) or w.dim() != 2:
            continue
        if type(mod) is torch.nn.Linear or isinstance(mod, (Conv1D, torch.nn.Embedding)):
            continue
        out.add(re.sub(r"\.\d+\.", ".*.", name + ".").rstrip("."))
    return sorted(out)


def build(model_type: str, out_dir: str) -> tuple[str, int, list[str]]:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"tiny config still has {n:,} parameters")
    d = os.path.join(out_dir, model_type)
    model.save_pretrained(d)
    return d, n, not_linear_2d(model)


def sweep_one(model_type: str, cls: str, root: str, per_arch_s: int) -> dict:
    from planner.errors import GpuplanError
    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec
    from benchmarks.common.calibration import load_and_measure

    row: dict = {"arch": model_type, "class": cls, "built": False, "params": None, "schemes": {}, "config": {}}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(per_arch_s)
    try:
        d, n, not_linear = build(model_type, root)
        row.update(built=True, params=n, not_linear=not_linear)
        cfg_only = os.path.join(root, model_type + "-config")
        os.makedirs(cfg_only, exist_ok=True)
        shutil.copy(os.path.join(d, "config.json"), os.path.join(cfg_only, "config.json"))
        for scheme in SCHEMES:
            try:
                measured = load_and_measure(d, scheme)["total"]
            except _Timeout:
                raise
            except Exception as exc:
                row["schemes"][scheme] = {"error": f"load: {type(exc).__name__}: {str(exc)[:160]}"}
                continue
            cell: dict = {"measured": measured}
            try:
                est = estimate_replica(load_spec(d), quant=scheme, dtype="bf16", max_model_len=64, device="cpu")
                cell["headers"] = est.weights - measured
            except GpuplanError as exc:
                cell["headers_error"] = str(exc)[:200]
            try:
                est = estimate_replica(load_spec(os.path.join(cfg_only, "config.json")), quant=scheme, dtype="bf16",
                                       max_model_len=64, device="cpu")
                cell["config"] = est.weights - measured
            except GpuplanError as exc:
                cell["config_error"] = str(exc)[:200]
            row["schemes"][scheme] = cell
    except _Timeout:
        row["error"] = f"over {per_arch_s} s"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row["trace"] = traceback.format_exc(limit=3)[-600:]
    finally:
        signal.alarm(0)
        shutil.rmtree(os.path.join(root, model_type), ignore_errors=True)
    return row


def _cell(c: dict, key: str) -> str:
    if "error" in c:
        return "load fails"
    if key in c:
        e = c[key]
        return "exact" if e == 0 else f"{100 * e / c['measured']:+.2f}%"
    return "-"


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | params | " + " | ".join(SCHEMES) + " | config.json alone |",
             "|---|---:|" + "---:|" * len(SCHEMES) + "---|"]
    for r in rows:
        if not r["built"]:
            lines.append(f"| {r['arch']} | - | " + " | ".join("-" for _ in SCHEMES)
                         + f" | not built tiny: {r.get('error', '?')[:90]} |")
            continue
        cfg = {_cell(c, "config") if "config" in c else (c.get("config_error", "")[:90] or "-")
               for c in r["schemes"].values()}
        cfg_s = "exact" if cfg == {"exact"} else "; ".join(sorted(cfg))[:120]
        lines.append(f"| {r['arch']} | {r['params']:,} | "
                     + " | ".join(_cell(r["schemes"].get(s, {}), "headers") for s in SCHEMES) + f" | {cfg_s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model types (default: every one)")
    ap.add_argument("--per-arch-s", type=int, default=120)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--write-not-linear", default=None, metavar="JSON",
                    help="write {model_type: [module patterns]} of 2-D weights bitsandbytes does not convert "
                         "(planner/catalog/not_linear.json)")
    a = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    archs = causal_lm_architectures()
    if a.only:
        want = set(a.only.split(","))
        archs = [x for x in archs if x[0] in want]
    root = tempfile.mkdtemp(prefix="arch-sweep-")
    rows, t0 = [], time.time()
    for i, (mt, cls) in enumerate(archs):
        r = sweep_one(mt, cls, root, a.per_arch_s)
        rows.append(r)
        status = r.get("error") or " ".join(f"{s}:{_cell(c, 'headers')}" for s, c in r["schemes"].items())
        print(f"[{i + 1}/{len(archs)}] {mt}: {status}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    head = (f"transformers {transformers.__version__}, {platform.platform()}, python {platform.python_version()}, "
            f"{time.time() - t0:.0f} s")
    built = [r for r in rows if r["built"]]
    exact = [r for r in built if r["schemes"] and all(c.get("headers") == 0 for c in r["schemes"].values())]
    summary = f"{len(rows)} architectures, {len(built)} built tiny, {len(exact)} byte-exact from headers in every scheme"
    print(head)
    print(summary)
    md = markdown(rows)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": head, "summary": summary, "rows": rows}, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(head + "\n\n" + summary + "\n\n" + md + "\n")
    if a.write_not_linear:
        table = {r["arch"]: r["not_linear"] for r in rows if r.get("not_linear")}
        Path(a.write_not_linear).write_text(json.dumps(
            {"_source": f"benchmarks/arch_sweep.py --write-not-linear ({head})", **table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
