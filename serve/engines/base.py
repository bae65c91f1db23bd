"""The one interface every engine implements (Engine), and what starts one: a ReplicaConfig in, a Host to ask about
the GPU, a Started out. The replica (serve/app/replica.py) and the HTTP layer only use this:
request semantics (max_tokens, temperature, top_p, stop strings, a seed per request, streaming, cancellation when
the consumer stops iterating) are the engine's job and are tested against every engine
(tests/integration/test_engines.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import AsyncIterator, NoReturn, Protocol, runtime_checkable

from serve.types import GenerationChunk, SamplingParams


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt_ids``: chunks of new text with cumulative ``completion_tokens``; the last
        one has ``finish_reason`` "stop" (EOS or a stop string, which is not in the text) or "length"."""

    def stats(self) -> dict:
        """Counters for /plan and the metrics: at least ``waiting``, ``running``, ``tokens_per_s``."""

    def check_health(self) -> None:
        """Raise when the engine can no longer serve (the replica's health check: Serve replaces it)."""

    def report(self) -> dict:
        """What the engine was given and what it reports of itself (for /plan next to the plan's numbers)."""

    async def close(self) -> None:
        """Stop; requests still running end."""


@dataclass(frozen=True)
class ReplicaConfig:
    """What one replica is started with (built by serve/app/build.py from the plan; Ray pickles it to the replica).
    ``settings`` is the engine's typed settings from the plan (planner.model.engines.<engine>.settings)."""

    name: str  # the model's name in the API
    deployment: str  # the Serve deployment: model@node
    node: str | None  # the plan's node of the deployment
    source: str  # model directory, config.json or .gguf file
    engine: str  # a name of the registry (serve/engines/__init__.py)
    settings: object  # TransformersSettings | VllmSettings | LlamaCppSettings
    quantization: str
    max_model_len: int
    max_num_seqs: int
    planned_bytes: int  # the plan's bytes of one replica
    weights_bytes: int  # the estimate's weights
    offload_cpu_bytes: int = 0  # offload.cpu_memory
    trust_remote_code: bool = False
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    registry: str = "gpuplan-registry"  # the ReplicaBook actor's name
    registry_namespace: str | None = None
    stream_interval_s: float = 0.0
    direct_secret: str | None = None  # the build's secret of the direct stream (serve/app/direct.py); None: off
    max_ongoing_requests: int = 64  # the deployment's: the direct stream refuses beyond it (Serve then queues)
    # test hook (GPUPLAN_FAULTS): {"cuda": {"total", "free"}} stands in for a GPU; "fail": load modes that fail
    faults: dict = field(default_factory=dict)

    def cpu_threads(self) -> int:
        """Threads of a CPU engine: one per whole CPU the replica asked Ray for (at least one), or
        $GPUPLAN_CPU_THREADS. Measured with benchmarks/serve_load.py on 2 cores: 2 threads made 1 client 20% slower
        and 8 clients no faster, since the HTTP proxy and the ingress need the other core."""
        return int(os.environ.get("GPUPLAN_CPU_THREADS", 0)) or max(1, int(self.num_cpus or 1))


@dataclass
class Started:
    """What an engine's ``start`` hands the replica: the engine, where it loaded (a ``to_json()``-able decision, or
    None) and the bytes it holds as it measured them (``{"total": bytes, ...}``)."""

    engine: Engine
    decision: object = None
    resident: dict = field(default_factory=lambda: {"total": 0})


class Host(Protocol):
    """What the replica gives an engine's ``start``: the GPU Ray assigned it, and the way to report a failed load."""

    gpu_key: str  # "<node>-gpu<i>" or "<node>-cpu": one start lock per device (vLLM)

    def cuda_state(self) -> tuple[bool, int | None, int | None, int | None, str]:
        """(CUDA usable, local index, total bytes, free bytes, why not)."""

    def report_failure(self, mode: str, kind: str, message: str, gave_up: bool) -> None:
        """Tell /readyz and /plan that a load in ``mode`` failed."""

    def give_up(self, mode: str, kind: str, message: str) -> NoReturn:
        """No placement left: back off, then raise (Serve starts another replica)."""
