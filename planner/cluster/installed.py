"""Which engines are installed for the replicas, found the way `make run` finds them (without importing them):
transformers always; vLLM in its own venv (`make vllm`: .venv-vllm), in ``$GPUPLAN_VLLM_PYTHON``, or in this Python;
llama.cpp where llama-cpp-python is importable. ``gpuplan plan`` and the Serve app (serve/engines/) both ask here,
so a plan made in the checkout is the plan `make run` serves."""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VLLM_VENV_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")


def vllm_python() -> str | None:
    """The Python that vLLM replicas run (Ray runtime_env py_executable): ``$GPUPLAN_VLLM_PYTHON``, else the repo's
    .venv-vllm (`make vllm`), else this interpreter when it has vllm; None when there is none."""
    env = os.environ.get("GPUPLAN_VLLM_PYTHON")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access(VLLM_VENV_PYTHON, os.X_OK) and os.path.exists(os.path.join(ROOT, ".venv-vllm", "bin", ".installed")):
        return VLLM_VENV_PYTHON
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def installed_engines() -> frozenset[str]:
    """Engines installed for the replicas (what ``engine: auto`` may pick)."""
    return frozenset({"transformers"} | ({"vllm"} if vllm_python() else set())
                     | ({"llamacpp"} if importlib.util.find_spec("llama_cpp") is not None else set()))
