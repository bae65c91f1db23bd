"""The engines a replica can run, as units: one module each, behind one small interface (base.py), one registry
(this file).

Each engine module has ``start(cfg: ReplicaConfig, host: Host) -> Started``: it reads its typed settings from
``cfg.settings`` (what the plan gave it: planner/model/engines/<name>.py ``settings``), loads the model and returns
an ``Engine``. transformers.py: transformers + bitsandbytes + CPU offload under gpuplan's continuous batching
(batching.py); vllm.py: vLLM's AsyncLLM inside the replica, in vLLM's own venv; llamacpp.py: GGUF files through
llama-cpp-python's C API with the same batching. loader.py loads transformers models and tokenizers;
memory_probe.py measures what a loaded model holds.

Adding an engine: its module here, its planner module (planner/model/engines/), one line in each registry
(docs/architecture.md). Which engines are installed: planner.cluster.installed.
"""

from __future__ import annotations

import importlib

from serve.engines.base import Host, ReplicaConfig, Started

# the registry: name -> module (imported when a replica starts one: the ingress imports no engine)
ENGINES = {
    "transformers": "serve.engines.transformers",
    "vllm": "serve.engines.vllm",
    "llamacpp": "serve.engines.llamacpp",
}


def start(cfg: ReplicaConfig, host: Host) -> Started:
    """Start ``cfg.engine`` with what the plan gave it."""
    try:
        path = ENGINES[cfg.engine]
    except KeyError:
        raise ValueError(f"engine {cfg.engine!r} is not one of {', '.join(ENGINES)}") from None
    return importlib.import_module(path).start(cfg, host)
