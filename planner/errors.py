"""Typed errors. Each carries a one-line message with the numbers and the fix.

The CLI maps them to exit codes: ``InputError`` and ``ModelSpecError`` -> 2 (bad input),
``InfeasiblePlanError`` -> 3.
"""

from __future__ import annotations


class GpuplanError(Exception):
    """Base of every error a user can cause."""

    exit_code = 2


class InputError(GpuplanError, ValueError):
    """A value given by the user (CLI flag, deploy.yaml field, size string) is invalid."""


class ModelSpecError(GpuplanError, ValueError):
    """A model source cannot be read or described (missing/corrupt config.json, bad safetensors header, unknown
    architecture without weights, a quantization that contradicts the checkpoint)."""


class QuantConflictError(ModelSpecError):
    """A quantization asked for that the model source rules out (a pre-quantized checkpoint, a GGUF file, or gguf
    asked of a checkpoint). ``str()`` is worded for ``gpuplan estimate --quant``; ``reason``, ``allowed`` (the
    quantizations this source can be planned at, the one it is stored in first) and ``fix`` (what else would do)
    let a deploy file's error name its own field."""

    def __init__(self, message: str, *, model: str, requested: str, reason: str, allowed: tuple[str, ...],
                 fix: str = ""):
        super().__init__(message)
        self.model, self.requested, self.reason, self.allowed, self.fix = model, requested, reason, allowed, fix


class InfeasiblePlanError(GpuplanError):
    """No placement meets every model's minimum replicas on the given cluster."""

    exit_code = 3

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}
