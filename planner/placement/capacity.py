"""Which GPUs to buy or rent: the smallest set of GPUs of given types that holds every model's minimum replicas.

``load_gpu_catalog()`` reads ``planner/catalog/gpus.json`` (common NVIDIA GPUs: memory, the total NVML reports,
an approximate and editable price per hour). ``fit_gpus()`` searches GPU counts per type -- fewest GPUs, or cheapest
per hour -- and plans the winning cluster with :func:`planner.placement.packing.plan` to say how many replicas each model could
reach on it. Pure Python; numpy/scipy are imported lazily by the packing module.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from planner.errors import InfeasiblePlanError, InputError
from planner.cluster.inventory import Cluster, Gpu, Node, gpu_type_of
from planner.model.speed import DeviceSpeed
from planner.placement.packing import (
    DEFAULT_GPU_RESERVE,
    DEFAULT_HEADROOM,
    ModelDemand,
    Plan,
    QuantOption,
    _Budget,
    _place_mins,
    _Problem,
    plan,
    usable_gpu_bytes,
)
from planner.units import MiB, format_bytes, parse_bytes

CATALOG_PATH = Path(__file__).resolve().parent.parent / "catalog" / "gpus.json"
# Host RAM given to each node of a hypothetical cluster: fit_gpus sizes GPUs, not hosts.
FIT_NODE_RAM_BYTES = 2**50
MAX_CANDIDATES = 200_000  # GPU-count combinations considered at most
MAX_ORACLE_CALLS = 2_000  # combinations actually packed at most


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model. ``planning_bytes`` is what a declared GPU of this kind is sized with."""

    name: str
    memory_bytes: int  # datasheet capacity
    nvml_total_bytes: int | None = None  # what NVML reports as total (slightly lower), when known
    price_per_hour: float | None = None  # approximate on-demand USD per GPU-hour; None = unknown
    aliases: tuple[str, ...] = ()
    price_source: str | None = None
    bandwidth_bytes_per_s: float | None = None  # datasheet memory bandwidth; None = unknown
    dense_tflops: tuple[tuple[str, float], ...] = ()  # (compute dtype, dense TFLOPs) from the datasheet
    speed_source: str | None = None

    @property
    def planning_bytes(self) -> int:
        return self.nvml_total_bytes or self.memory_bytes

    def speed(self) -> DeviceSpeed:
        """What the speed model needs of this GPU; InputError naming the catalog field when it is not known."""
        if not self.bandwidth_bytes_per_s:
            raise InputError(f"GPU {self.name}: no memory bandwidth known, so its speed cannot be predicted; add "
                             f"memory_bandwidth_gb_per_s (and dense_tflops) to its entry in planner/catalog/gpus.json "
                             "from its datasheet")
        return DeviceSpeed(self.name, float(self.bandwidth_bytes_per_s), dict(self.dense_tflops),
                           self.speed_source or "")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "memory_bytes": self.memory_bytes,
            "nvml_total_bytes": self.nvml_total_bytes,
            "planning_bytes": self.planning_bytes,
            "price_per_hour": self.price_per_hour,
            "price_source": self.price_source,
            "aliases": list(self.aliases),
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "dense_tflops": dict(self.dense_tflops),
        }


def _norm(name: str) -> str:
    n = name.upper()
    for word in ("NVIDIA", "TESLA", "GEFORCE"):
        n = n.replace(word, "")
    return re.sub(r"[\s_\-]+", "", n)


def load_gpu_catalog(path: str | Path | None = None) -> tuple[GpuSpec, ...]:
    """The GPU table from ``planner/catalog/gpus.json`` (or ``path``). Raises InputError for a malformed file."""
    p = Path(path) if path is not None else CATALOG_PATH
    return _load(str(p))


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[GpuSpec, ...]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"GPU catalog {path}: cannot read it as JSON ({exc}); restore planner/catalog/gpus.json")
    out = []
    for i, e in enumerate(data.get("gpus", [])):
        try:
            name = str(e["name"])
            mem = int(e["memory_bytes"])
            nvml = e.get("nvml_total_mib")
            price = e.get("price_per_hour")
            bw = e.get("memory_bandwidth_gb_per_s")
            tflops = tuple(sorted((str(k), float(v)) for k, v in (e.get("dense_tflops") or {}).items()))
            out.append(
                GpuSpec(
                    name=name,
                    memory_bytes=mem,
                    nvml_total_bytes=int(nvml) * MiB if nvml is not None else None,
                    price_per_hour=float(price) if price is not None else None,
                    aliases=tuple(str(a) for a in e.get("aliases", ())),
                    price_source=e.get("price_source"),
                    bandwidth_bytes_per_s=float(bw) * 1e9 if bw is not None else None,
                    dense_tflops=tflops,
                    speed_source=e.get("speed_source"),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"GPU catalog {path}: entry {i} is malformed ({exc}); each needs name and memory_bytes")
        if mem <= 0 or (price is not None and float(price) < 0):
            raise InputError(f"GPU catalog {path}: entry {name}: memory_bytes must be > 0 and price_per_hour >= 0")
    return tuple(out)


CPU_CATALOG_PATH = Path(__file__).resolve().parent.parent / "catalog" / "cpus.json"
CPU_DEVICE = "cpu"  # the name a CPU replica's device goes by in plans (the catalog's default entry)


@lru_cache(maxsize=4)
def _cpus(path: str) -> tuple[DeviceSpeed, ...]:
    try:
        data = json.loads(Path(path).read_text())
        return tuple(DeviceSpeed(str(e["name"]), float(e["memory_bandwidth_gb_per_s"]) * 1e9,
                                 {str(k): float(v) for k, v in e["dense_tflops"].items()}, str(e.get("source", "")),
                                 kind="cpu") for e in data["cpus"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"CPU catalog {path}: cannot read it ({exc}); restore planner/catalog/cpus.json") from None


def device_speed(name: str) -> DeviceSpeed:
    """The speed model's device by name: a GPU of the catalog (GpuSpec.speed), or ``cpu`` (the CPU catalog's first
    entry, measured on this project's CI machine; planner/catalog/cpus.json says how to measure yours)."""
    if name.lower() == CPU_DEVICE:
        return _cpus(str(CPU_CATALOG_PATH))[0]
    try:
        gpu = lookup_gpu(name)
    except InputError:
        raise InputError(f"GPU {name}: not in the GPU catalog, so its speed is unknown; add it to "
                         "planner/catalog/gpus.json with memory_bytes, memory_bandwidth_gb_per_s and dense_tflops "
                         "from its datasheet") from None
    return gpu.speed()


def lookup_gpu(name: str | GpuSpec, catalog: Sequence[GpuSpec] | None = None) -> GpuSpec:
    """A catalog GPU by name or alias ("a10g", "NVIDIA A100-SXM4-80GB", "rtx 4090"), or a custom one written
    ``NAME:MEMORY[:PRICE]`` ("MI300X:192GiB:3.5"). Unknown name -> InputError listing the known names."""
    if isinstance(name, GpuSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"GPU type must be a name like 'A10G', got {name!r}")
    cat = tuple(catalog) if catalog is not None else load_gpu_catalog()
    if ":" in name:
        parts = name.split(":")
        if len(parts) not in (2, 3) or not parts[0].strip():
            raise InputError(f"GPU {name!r}: write a custom GPU as NAME:MEMORY[:PRICE], e.g. MI300X:192GiB:3.5")
        mem = parse_bytes(parts[1], field=f"GPU {parts[0]} memory")
        if mem <= 0:
            raise InputError(f"GPU {parts[0]}: memory must be > 0, got {parts[1]!r}")
        price = None
        if len(parts) == 3 and parts[2].strip():
            try:
                price = float(parts[2].strip().lstrip("$"))
            except ValueError:
                raise InputError(f"GPU {parts[0]}: price {parts[2]!r} is not a number of USD per hour, e.g. 1.5")
        return GpuSpec(parts[0].strip(), mem, None, price)
    want = {_norm(name), _norm(gpu_type_of(name))}
    for spec in cat:
        if want & {_norm(spec.name), *(_norm(a) for a in spec.aliases)}:
            return spec
    known = ", ".join(s.name for s in cat)
    raise InputError(
        f"unknown GPU {name!r}; known: {known}; or give its memory as {name.strip()}:24GiB "
        f"(and optionally a price per hour, {name.strip()}:24GiB:1.2)"
    )


@dataclass(frozen=True)
class FitResult:
    by: str  # "count" | "cost"
    counts: tuple[tuple[str, int], ...]  # GPUs per type, in the order the types were given
    gpus: int
    total_bytes: int  # sum of planning_bytes
    usable_bytes: int
    cost_per_hour: float | None  # None when a chosen type has no price
    cluster: Cluster
    plan: Plan  # the full plan on that cluster: replicas each model reaches, up to its max
    candidates_tested: int
    notes: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "by": self.by,
            "counts": dict(self.counts),
            "gpus": self.gpus,
            "total_bytes": self.total_bytes,
            "usable_bytes": self.usable_bytes,
            "cost_per_hour": self.cost_per_hour,
            "replicas": {m.name: m.placed_replicas for m in self.plan.models},
            "candidates_tested": self.candidates_tested,
            "notes": list(self.notes),
            "plan": self.plan.to_json(),
        }


def _cluster_for(specs: Sequence[GpuSpec], counts: Sequence[int], gpus_per_node: int) -> Cluster:
    nodes = []
    for spec, k in zip(specs, counts):
        for start in range(0, k, gpus_per_node):
            name = f"{spec.name.lower()}-{start // gpus_per_node}"
            gpus = tuple(
                Gpu(
                    id=f"{name}/gpu-{i}",
                    name=f"NVIDIA {spec.name}",
                    total_bytes=spec.planning_bytes,
                    node=name,
                    index=i,
                    gpu_type=spec.name,
                )
                for i in range(min(gpus_per_node, k - start))
            )
            nodes.append(Node(name=name, cpu_memory_bytes=FIT_NODE_RAM_BYTES, gpus=gpus))
    return Cluster(nodes=tuple(nodes), source="declared", notes=("hypothetical cluster sized by fit_gpus",))


def fit_gpus(
    demands: Sequence[ModelDemand],
    gpu_types: Sequence[str | GpuSpec],
    *,
    by: str = "count",
    max_gpus: int = 64,
    headroom: float = DEFAULT_HEADROOM,
    reserve: int = DEFAULT_GPU_RESERVE,
    quantization: str = "preferred",
    gpus_per_node: int = 8,
    time_limit_s: float = 10.0,
    catalog: Sequence[GpuSpec] | None = None,
    fraction_basis: str = "total",
) -> FitResult:
    """The smallest set of GPUs of ``gpu_types`` that holds every model's ``min_replicas``.

    ``by="count"``: fewest GPUs (ties: cheapest when every type has a price, then least memory). ``by="cost"``:
    cheapest per hour (every type needs a price). Each model is sized at its first (most preferred) option, or at
    its least-memory option with ``quantization="smallest"``. GPUs of one type share nodes of ``gpus_per_node``;
    host RAM is not sized (nodes get unlimited RAM) and offload is not used. The winning cluster is then planned
    with :func:`planner.placement.packing.plan` (all options allowed), which says how many replicas each model reaches.
    """
    if by not in ("count", "cost"):
        raise InputError(f"by must be 'count' or 'cost', got {by!r}")
    if fraction_basis not in ("total", "usable"):
        raise InputError(f"fraction_basis must be 'total' or 'usable', got {fraction_basis!r}")
    if quantization not in ("preferred", "smallest"):
        raise InputError(f"quantization must be 'preferred' or 'smallest', got {quantization!r}")
    if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus < 1:
        raise InputError(f"max_gpus must be an int >= 1, got {max_gpus!r}")
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise InputError(f"gpus_per_node must be an int >= 1, got {gpus_per_node!r}")
    if not gpu_types:
        raise InputError("no GPU type given; name at least one, e.g. A10G or L4 (see planner/catalog/gpus.json)")
    demands = tuple(demands)
    if not demands:
        raise InputError("no model given to fit")
    specs: list[GpuSpec] = []
    for t in gpu_types:
        s = lookup_gpu(t, catalog)
        if s.name.upper() not in {x.name.upper() for x in specs}:
            specs.append(s)
    if by == "cost":
        missing = [s.name for s in specs if s.price_per_hour is None]
        if missing:
            raise InputError(
                f"by='cost' needs a price per hour for {', '.join(missing)}; set price_per_hour in "
                "planner/catalog/gpus.json, write the GPU as NAME:MEMORY:PRICE, or use by='count'"
            )
    priced = all(s.price_per_hour is not None for s in specs)

    def option_of(d: ModelDemand) -> QuantOption:
        return d.options[0] if quantization == "preferred" else min(d.options, key=lambda o: o.replica_bytes)

    fixed = tuple(
        ModelDemand(d.name, (option_of(d),), d.min_replicas, d.max_replicas, 0, d.gpu_type) for d in demands
    )
    need = [d for d in fixed if d.min_replicas > 0]
    if not need:
        raise InputError("every model has min_replicas 0; nothing to size (set min_replicas >= 1)")
    usable = [
        usable_gpu_bytes(Gpu("x", s.name, s.planning_bytes), headroom=headroom, gpu_reserve_bytes=reserve) for s in specs
    ]
    # which types can hold one replica of each model
    allowed: dict[str, list[int]] = {}
    for d in need:
        o = d.options[0]
        ok = [
            i
            for i, s in enumerate(specs)
            if (d.gpu_type is None or d.gpu_type.strip().upper() == s.name.upper())
            and usable[i] >= o.replica_bytes
        ]
        if not ok:
            bigger = [
                s.name
                for s in load_gpu_catalog()
                if usable_gpu_bytes(Gpu("x", s.name, s.planning_bytes), headroom=headroom, gpu_reserve_bytes=reserve)
                >= o.replica_bytes
            ]
            pin = f" (pinned to {d.gpu_type})" if d.gpu_type else ""
            raise InfeasiblePlanError(
                f"model {d.name}{pin} fits on none of {', '.join(s.name for s in specs)}: a replica ({o.quantization}) "
                f"needs {format_bytes(o.replica_bytes)}, the largest usable is {format_bytes(max(usable))}; fix: "
                + (f"add a larger type ({', '.join(bigger)})" if bigger else "no catalog GPU is large enough; offload or shard it")
                + (", or fit with quantization='smallest'" if quantization == "preferred" else ""),
                details={"model": d.name, "replica_bytes": o.replica_bytes, "usable_bytes": dict(zip([s.name for s in specs], usable))},
            )
        allowed[d.name] = ok

    total_need = sum(d.min_replicas * d.options[0].replica_bytes for d in need)
    k = len(specs)
    price = [s.price_per_hour or 0.0 for s in specs]

    def cost(c) -> float:
        return sum(p * n for p, n in zip(price, c))

    def cheap_ok(c) -> bool:
        if sum(u * n for u, n in zip(usable, c)) < total_need:
            return False
        for d in need:
            if not any(c[i] for i in allowed[d.name]):
                return False
        # pinned models: their bytes must fit the capacity of their type
        per_type: dict[int, int] = {}
        for d in need:
            if d.gpu_type is not None:
                i = allowed[d.name][0]
                per_type[i] = per_type.get(i, 0) + d.min_replicas * d.options[0].replica_bytes
        return all(usable[i] * c[i] >= v for i, v in per_type.items())

    # enumerate GPU counts per type
    cands = []
    notes_enum = None
    for c in itertools.product(range(max_gpus + 1), repeat=k) if k <= 2 else _compositions(k, max_gpus):
        n = sum(c)
        if n == 0 or n > max_gpus or not cheap_ok(c):
            continue
        mem = sum(s.planning_bytes * x for s, x in zip(specs, c))
        key = (n, cost(c) if priced else 0.0, mem, c) if by == "count" else (cost(c), n, mem, c)
        cands.append(key)
        if len(cands) >= MAX_CANDIDATES:
            notes_enum = f"only the first {MAX_CANDIDATES} GPU-count combinations (fewest GPUs first) were considered"
            break
    cands.sort()
    budget = _Budget(time_limit_s)
    tested = 0
    notes: list[str] = [notes_enum] if notes_enum else []
    found = None
    for key in cands:
        c = key[-1]
        if tested >= MAX_ORACLE_CALLS:
            notes.append(f"search stopped after {MAX_ORACLE_CALLS} packings; a smaller set may exist")
            break
        tested += 1
        cl = _cluster_for(specs, c, gpus_per_node)
        P = _Problem(fixed, cl, headroom, reserve, fraction_basis)
        active = [m for m, d in enumerate(fixed) if d.min_replicas > 0]
        per_call = _Budget(min(2.0, max(0.05, budget.left())))
        status, _, _ = _place_mins(P, [0] * len(fixed), active, per_call, use_milp=True)
        if status == "feasible":
            found = (c, cl)
            break
    if found is None:
        lb = math.ceil(total_need / max(usable)) if max(usable) > 0 else max_gpus + 1
        raise InfeasiblePlanError(
            f"no set of at most {max_gpus} GPUs of {', '.join(s.name for s in specs)} holds every model's minimum "
            f"replicas: they need {format_bytes(total_need)} ({quantization} options), at least {lb} of the largest "
            f"({format_bytes(max(usable))} usable each); fix: raise max_gpus, add a larger GPU type, lower "
            "min_replicas" + (", or fit with quantization='smallest'" if quantization == "preferred" else ""),
            details={"needs_bytes": total_need, "max_gpus": max_gpus, "tested": tested},
        )
    c, cl = found
    p = plan(
        demands,
        cl,
        headroom=headroom,
        gpu_reserve_bytes=reserve,
        time_limit_s=max(1.0, budget.left()),
        fraction_basis=fraction_basis,
    )
    notes.append("host RAM is not sized: each hypothetical node is given unlimited RAM")
    if not priced:
        notes.append("no cost: " + ", ".join(s.name for s in specs if s.price_per_hour is None) + " has no price_per_hour")
    else:
        notes.append("prices are approximate on-demand list prices (planner/catalog/gpus.json); edit them for your account")
    return FitResult(
        by=by,
        counts=tuple((s.name, n) for s, n in zip(specs, c)),
        gpus=sum(c),
        total_bytes=sum(s.planning_bytes * n for s, n in zip(specs, c)),
        usable_bytes=sum(u * n for u, n in zip(usable, c)),
        cost_per_hour=round(cost(c), 4) if priced else None,
        cluster=cl,
        plan=p,
        candidates_tested=tested,
        notes=tuple(notes),
    )


def _compositions(k: int, max_total: int):
    """All k-tuples of non-negative ints with sum <= max_total, smallest sums first."""
    for n in range(1, max_total + 1):
        for cut in itertools.combinations(range(n + k - 1), k - 1):
            prev = -1
            parts = []
            for x in cut + (n + k - 1,):
                parts.append(x - prev - 1)
                prev = x
            yield tuple(parts)
