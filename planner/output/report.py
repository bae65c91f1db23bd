"""Printing estimates. Takes result values, never recomputes (plans are drawn by plan_report.py)."""

from __future__ import annotations

from planner.model.estimate import ReplicaEstimate
from planner.units import format_bytes


def _console(width: int = 100):
    from rich.console import Console

    return Console(record=True, width=width, force_terminal=False, color_system=None, file=_Null())


class _Null:
    def write(self, *_):
        pass

    def flush(self):
        pass


def estimate_table(est: ReplicaEstimate) -> str:
    """One replica's memory, term by term, with the parts of each term."""
    from rich.table import Table

    t = Table(title=f"{est.model} — {est.quant_label}, {est.dtype} compute, on {est.device}, engine {est.engine}",
              title_justify="left")
    t.add_column("term")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    t.add_column("how")
    d = est.detail
    kv = d["kv_cache"]
    act = d["activations"]
    t.add_row("weights", f"{est.weights:,}", _g(est.weights),
              f"{est.params_total:,} params ({est.params_quantized:,} quantized), source: {est.source}")
    for role, b in sorted(d["weights"].items(), key=lambda kv_: -kv_[1]):
        t.add_row(f"  {role}", f"{b:,}", _g(b), "")
    if est.weights_quant_state:
        t.add_row("  of which quant state", f"{est.weights_quant_state:,}", _g(est.weights_quant_state),
                  "scales / zeros / absmax / lookup tables")
    if "per_token_per_layer" in kv:  # KV that grows per sequence (transformers)
        sliding = (f", {kv['sliding_layers']} sliding layers at {kv['sliding_window_tokens']} tokens"
                   if kv["sliding_layers"] else "")
        kv_how = (f"{kv['per_token_per_layer']:,} B/token/layer x {est.max_model_len} tokens x {est.max_num_seqs} "
                  f"seqs{sliding}")
    else:  # preallocated by the engine (vLLM's blocks, llama.cpp's cells)
        kv_how = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in kv.items())
    t.add_row("kv_cache", f"{est.kv_cache:,}", _g(est.kv_cache), kv_how)
    t.add_row("activations", f"{est.activations:,}", _g(est.activations),
              f"prefill peak of {act['prefill_tokens']} tokens in one layer + logits" if "prefill_tokens" in act
              else f"{est.engine}'s buffers")
    for k in ("residual", "attention", "mlp", "quant_workspace", "mask", "logits", "compute_buffer", "output_buffer"):
        if act.get(k):
            t.add_row(f"  {k}", f"{act[k]:,}", _g(act[k]), "")
    t.add_row("runtime_overhead", f"{est.runtime_overhead:,}", _g(est.runtime_overhead),
              ", ".join(f"{k} {format_bytes(v)}" for k, v in d["runtime_overhead"].items()))
    t.add_row("total", f"{est.total:,}", _g(est.total), "", style="bold")
    c = _console(120)
    c.print(t)
    for n in est.notes:
        c.print(f"note: {n}")
    return c.export_text()


def compare_table(ests: list[ReplicaEstimate]) -> str:
    """Several quantizations of one model side by side."""
    from rich.table import Table

    t = Table(title=f"{ests[0].model}: max_model_len {ests[0].max_model_len}, max_num_seqs {ests[0].max_num_seqs}",
              title_justify="left")
    for col in ("quantization", "engine", "weights", "kv_cache", "activations", "runtime", "total"):
        t.add_column(col, justify="left" if col in ("quantization", "engine") else "right")
    for e in ests:
        t.add_row(e.quant_label, e.engine, format_bytes(e.weights, precision=2), format_bytes(e.kv_cache, precision=2),
                  format_bytes(e.activations, precision=2), format_bytes(e.runtime_overhead, precision=2),
                  format_bytes(e.total, precision=2))
    c = _console(130)
    c.print(t)
    return c.export_text()


def speed_table(speeds) -> str:
    """The speed model's predictions (planner/model/speed.py), one row per estimate."""
    from rich.table import Table

    s0 = speeds[0]
    t = Table(title=f"speed on {s0.device}: {s0.batch} sequence(s) of {s0.input_tokens} tokens in, "
                    f"{s0.output_tokens} out", title_justify="left")
    for col in ("engine", "kernel", "TTFT ms", "TPOT ms", "decode tok/s/seq", "prefill tok/s", "replica tok/s",
                "bound"):
        t.add_column(col, justify="left" if col in ("engine", "kernel", "bound") else "right")
    for s in speeds:
        t.add_row(s.engine, s.kernel, f"{s.ttft_s * 1e3:.1f}", f"{s.tpot_s * 1e3:.2f}", f"{s.decode_tokens_per_s:.1f}",
                  f"{s.prefill_tokens_per_s:.0f}", f"{s.tokens_per_s:.1f}", s.bound)
    c = _console(130)
    c.print(t)
    for note in dict.fromkeys(n for s in speeds for n in s.notes):
        c.print(f"note: {note}")
    return c.export_text()


def _g(b: int) -> str:
    return f"{b / 1024**3:.3f}"
