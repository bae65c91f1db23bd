"""The cluster as a value, and the one place that asks the hardware.

``Cluster`` / ``Node`` / ``Gpu`` are plain frozen dataclasses: the planner takes them as input and never probes.
``probe_local_gpus()`` is the only function in gpuplan that talks to the driver (through NVML, imported lazily so
that ``planner`` imports no NVML bindings); it never raises for a missing driver: it returns no GPUs and says why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Gpu:
    """One GPU. ``free_bytes`` is what NVML reported free at probe time (``None`` for a declared GPU)."""

    id: str  # unique in the cluster, e.g. "node-0/gpu-1"
    name: str  # product name, e.g. "NVIDIA A10G"
    total_bytes: int
    free_bytes: int | None = None
    node: str = "node-0"
    index: int = 0  # index on its node (CUDA ordinal)
    gpu_type: str | None = None  # normalised type used to pin replicas (accelerator_type), e.g. "A10G"


@dataclass(frozen=True)
class Node:
    name: str
    cpu_memory_bytes: int  # host RAM usable by replicas (CPU replicas and offload)
    gpus: tuple[Gpu, ...] = ()
    num_cpus: float | None = None
    ray_node_id: str | None = None  # set for a probed node: the Ray node it is (replicas are pinned to it)


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    source: str = "declared"  # "declared" | "probed"
    notes: tuple[str, ...] = ()  # e.g. "no GPU, because NVML could not load libnvidia-ml.so.1"

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        return tuple(g for n in self.nodes for g in n.gpus)

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class ProbeResult:
    """What the hardware said: the GPUs of this host, or none and the reason."""

    gpus: tuple[Gpu, ...] = ()
    reason: str | None = None  # set when gpus is empty: "no GPU, because ..."
    driver_version: str | None = None

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def probe_local_gpus(node: str = "node-0") -> ProbeResult:
    """Ask NVML for this host's GPUs: name, total and free bytes. Never raises for missing NVML or driver."""
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except Exception as exc:  # pragma: no cover - depends on the environment
        return ProbeResult(reason=f"no GPU, because the NVML bindings (nvidia-ml-py) cannot be imported: {exc}")
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return ProbeResult(reason=f"no GPU, because NVML could not start (no NVIDIA driver on this host?): {exc}")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        if isinstance(driver, bytes):
            driver = driver.decode()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode()
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                Gpu(
                    id=f"{node}/gpu-{i}",
                    name=name,
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    node=node,
                    index=i,
                    gpu_type=gpu_type_of(name),
                )
            )
        if not gpus:
            return ProbeResult(reason="no GPU, because NVML found 0 devices", driver_version=driver)
        return ProbeResult(gpus=tuple(gpus), driver_version=driver)
    except Exception as exc:  # pragma: no cover - needs a broken driver
        return ProbeResult(reason=f"no GPU, because NVML failed while listing devices: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_type_of(product_name: str) -> str:
    """Normalise an NVML product name to a short type: "NVIDIA A100-SXM4-80GB" -> "A100-80GB",
    "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A10G" -> "A10G". Used to pin replicas to a GPU type."""
    n = product_name.upper().replace("NVIDIA", "").replace("TESLA", "").replace("GEFORCE", "").strip()
    for token in n.replace("-", " ").split():
        if token[:1] in "AHLTVB" and any(c.isdigit() for c in token) and len(token) <= 6:
            base = token
            break
    else:
        return n.replace(" ", "-")
    if base in ("A100", "H100", "H200", "A800", "H800") or base.startswith("A100"):
        for size in ("80GB", "40GB", "94GB", "141GB"):
            if size in n.replace(" ", "").replace("-", ""):
                return f"{base}-{size}" if base == "A100" else base
    return base
