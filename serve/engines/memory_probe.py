"""Measure what a loaded model keeps resident: every parameter, buffer and bitsandbytes quantization-state tensor,
counted once per storage (tied weights and shared lookup tables once). Used by the calibration tests, the
benchmarks and by replicas to report their real footprint next to the plan."""

from __future__ import annotations

import torch


def _quant_state_tensors(param) -> list[torch.Tensor]:
    out = []
    qs = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
    while qs is not None:
        for name in ("absmax", "code", "offset"):
            t = getattr(qs, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
        qs = getattr(qs, "state2", None)
    for name in ("SCB", "CB"):  # bitsandbytes Int8Params
        t = getattr(param, name, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


def resident_bytes(model: torch.nn.Module, device: str | None = None) -> dict:
    """{"total", "params", "buffers", "quant_state", "by_dtype"} in bytes, unique storages only.

    ``device`` ("cpu", "cuda", "cuda:0") restricts the count to tensors on that device type."""
    seen: set[tuple[str, int]] = set()
    parts = {"params": 0, "buffers": 0, "quant_state": 0}
    by_dtype: dict[str, int] = {}

    def add(t: torch.Tensor, kind: str) -> None:
        if device is not None and t.device.type != torch.device(device).type:
            return
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if st.data_ptr() == 0 or key in seen:
            return
        seen.add(key)
        n = st.nbytes()
        parts[kind] += n
        by_dtype[str(t.dtype).replace("torch.", "")] = by_dtype.get(str(t.dtype).replace("torch.", ""), 0) + n

    for p in model.parameters():
        add(p, "params")
        for t in _quant_state_tensors(p):
            add(t, "quant_state")
    for b in model.buffers():
        add(b, "buffers")
    return {"total": sum(parts.values()), **parts, "by_dtype": by_dtype}
