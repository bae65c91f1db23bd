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


class InfeasiblePlanError(GpuplanError):
    """No placement meets every model's minimum replicas on the given cluster."""

    exit_code = 3

    def __init__(self, message: str, *, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}
