"""gpuplan's planner: pure sizing and placement. Imports no ray, torch, transformers, bitsandbytes or NVML.

The stages, in the order data flows through them (a module imports only its own stage and the ones above it in this
list; tests/unit/test_layout.py checks it):

- ``errors``, ``units``: typed errors, byte units;
- ``model/``: model -> bytes of one replica, per quantization scheme (quant/) and engine (engines/);
- ``cluster/``, ``config``: the nodes and GPUs, the one hardware probe, the engines installed; the deploy file's
  schema (pydantic, at the edge; scheme and engine names from the registries);
- ``placement/`` and ``decisions``: replicas onto GPUs, what to buy; the run-time choices of one replica (GPU,
  offload or CPU);
- ``rollout/``: the plan as Ray Serve deployments, the node gate, the scaling policy, routing, node binding;
- ``planning``: the orchestrator, deploy args -> estimates -> plan -> rollout;
- ``output/``: tables, pictures, KubeRay manifests;
- ``cli/``: parse, call, print.
"""

from planner.errors import GpuplanError, InfeasiblePlanError, InputError, ModelSpecError

__all__ = ["GpuplanError", "InfeasiblePlanError", "InputError", "ModelSpecError"]
