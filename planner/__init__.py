"""gpuplan's planner: pure sizing and placement. Imports no ray, torch, transformers, bitsandbytes or NVML.

The stages, in the order data flows through them (a module imports only its own stage and the ones above it in this
list; tests/unit/test_layout.py checks it):

- ``errors``, ``units``, ``config``: typed errors, byte units, the deploy.yaml schema (pydantic, at the edge);
- ``model/``: model -> bytes of one replica, per quantization and engine;
- ``cluster/``: the nodes and GPUs, and the one hardware probe;
- ``placement/`` and ``decisions``: replicas onto GPUs, the rollout as Ray Serve deployments, what to buy; the
  run-time choices of one replica (GPU, offload or CPU);
- ``planning``: the orchestrator, deploy args -> estimates -> plan -> rollout;
- ``output/``: tables, pictures, KubeRay manifests;
- ``cli/``: parse, call, print.
"""

from planner.errors import GpuplanError, InfeasiblePlanError, InputError, ModelSpecError

__all__ = ["GpuplanError", "InfeasiblePlanError", "InputError", "ModelSpecError"]
