"""The engines a replica can run, as units: one module each, behind one small interface (base.py).

Each engine module, named as the engine is in the planner's registry (planner/model/engines/: ``ENGINES``), has
``start(cfg: ReplicaConfig, host: Host) -> Started``: it reads its typed settings from ``cfg.settings`` (what the
plan gave it: planner/model/engines/<name>.py ``settings``), loads the model and returns an ``Engine``.
transformers.py: transformers + bitsandbytes + CPU offload under gpuplan's continuous batching (batching.py);
vllm.py: vLLM's AsyncLLM inside the replica, in vLLM's own venv; llamacpp.py: GGUF files through llama-cpp-python's
C API with the same batching. loader.py loads transformers models and tokenizers; memory_probe.py measures what a
loaded model holds.

Adding an engine: its module here, its planner module, one line in the planner's registry (docs/architecture.md).
Which engines are installed: planner.cluster.installed.
"""

from __future__ import annotations

import importlib

from planner.model.engines import ENGINE_NAMES
from serve.engines.base import Host, ReplicaConfig, Started


def module_of(engine: str) -> str:
    """The module that starts ``engine``: serve.engines.<name>, for every name of the planner's registry."""
    if engine not in ENGINE_NAMES:
        raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINE_NAMES)}")
    return f"serve.engines.{engine}"


def start(cfg: ReplicaConfig, host: Host) -> Started:
    """Start ``cfg.engine`` with what the plan gave it (the module is imported here, in the replica: the ingress
    imports no engine)."""
    return importlib.import_module(module_of(cfg.engine)).start(cfg, host)
