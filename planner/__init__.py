"""gpuplan's planner: pure sizing and placement. Imports no ray, torch, transformers, bitsandbytes or NVML."""

from .errors import GpuplanError, InfeasiblePlanError, InputError, ModelSpecError

__all__ = ["GpuplanError", "InfeasiblePlanError", "InputError", "ModelSpecError"]
