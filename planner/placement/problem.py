"""The placement problem: its inputs (QuantOption, ModelDemand), its results (GpuReplica, GpuPlan, CpuReplica,
OffloadReplica, ModelPlan, SolverInfo, Plan), GPU byte and Ray-unit arithmetic, and the mutable search state
(_Problem, _State) the other placement modules work on."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from planner.errors import InputError
from planner.cluster.inventory import Cluster, Gpu, gpu_type_of
from planner.units import GiB, MiB


# NOTE (reserve): GPU memory no replica owns, taken off every GPU on top of the headroom. Origin: NVML's
# ``used`` includes memory the driver/firmware reserves on an idle GPU ("Sum of Reserved and Allocated device
# memory", nvmlMemory_t in the NVML API reference; nvmlMemory_v2_t reports it as ``reserved``). Observed values:
# the GSP firmware carves out 256 MiB on GSP-enabled drivers (NVIDIA/open-gpu-kernel-modules#357, a T4), idle
# V100/P100 show 103-112 MiB used with no process (4paradigm/k8s-vgpu-scheduler#7, wookayin/gpustat#130). 512 MiB
# covers the largest of these with margin for driver growth. Each replica's own CUDA context (~300-500 MiB) is
# part of its ``replica_bytes`` (the memory model's job), not of this reserve.
DEFAULT_GPU_RESERVE = 512 * MiB
# NOTE (headroom): fraction of each GPU (and node RAM) left unplanned, for estimation error, allocator
# fragmentation and activation spikes the memory model does not see.
DEFAULT_HEADROOM = 0.10
# Ray keeps resource quantities in fixed point with 4 decimals (ray/common/scheduling/fixed_point.h,
# RESOURCE_UNIT_SCALING = 10000), so num_gpus is planned in integer units of 1e-4 GPU.
RAY_GPU_UNITS = 10_000
# An offloaded (split GPU+CPU) replica keeps at least this much on its GPU (CUDA context plus a few layers);
# below that it is planned as a CPU replica instead.
OFFLOAD_MIN_GPU_BYTES = 1 * GiB
# Exact search limits.
DEFAULT_TIME_LIMIT_S = 10.0  # total seconds the integer programs of one plan() may use
EXACT_MAX_VARS = 2_000  # auto exact fill (column generation) when eligible model x GPU pairs are at most this
# small instances: when column generation ends without proof, the compact program (one integer per model x GPU pair)
# proves the total; and among placements of the same counts, the one that spreads each model over the most nodes
# and GPUs is found by an integer program
PROOF_MAX_VARS = 600
SPREAD_TIME_LIMIT_S = 0.5  # at most this long for one confinement test of the spread (within the plan's time limit)
SPREAD_PAIRS_TIME_LIMIT_S = 0.3  # and for the finer spread (nodes and GPUs used per model), best found when it ends
SPREAD_TOTAL_S = 1.5  # and for the whole spread step
EXHAUSTIVE_QUANT_MAX = 256  # enumerate quantization combinations when there are at most this many
_MILP_MAX_COEF = 10_000_000  # byte coefficients are scaled (conservatively) below this for the solver

SuggestFn = Callable[["ModelDemand", int], "str | None"]


# ----------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class QuantOption:
    """One way to run a model: its quantization and the bytes one replica needs at it (computed by the caller)."""

    quantization: str  # "int4", "int8", "bf16", ...
    replica_bytes: int  # GPU bytes one replica needs at this quantization
    cpu_bytes: int = 0  # host RAM one replica needs besides (tokenizer, pinned buffers, ...)

    def __post_init__(self):
        if not isinstance(self.quantization, str) or not self.quantization:
            raise InputError(f"quantization option: name must be a non-empty string, got {self.quantization!r}")
        for name in ("replica_bytes", "cpu_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"quantization {self.quantization}: {name} must be an int of bytes, got {v!r}")
        if self.replica_bytes <= 0:
            raise InputError(
                f"quantization {self.quantization}: replica_bytes must be > 0, got {self.replica_bytes}; "
                "compute it with the memory model"
            )
        if self.cpu_bytes < 0:
            raise InputError(f"quantization {self.quantization}: cpu_bytes must be >= 0, got {self.cpu_bytes}")

    def to_json(self) -> dict:
        return {"quantization": self.quantization, "replica_bytes": self.replica_bytes, "cpu_bytes": self.cpu_bytes}


@dataclass(frozen=True)
class ModelDemand:
    """A model to serve: its allowed quantizations (most preferred first) and how many replicas it needs."""

    name: str
    options: tuple[QuantOption, ...]
    min_replicas: int
    max_replicas: int
    offload_cpu_bytes: int = 0  # host RAM the model may spill to when it fits on no GPU (0 = no offload)
    gpu_type: str | None = None  # pin to GPUs with this gpu_type (None = any)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"model name must be a non-empty string, got {self.name!r}")
        opts = tuple(self.options) if not isinstance(self.options, QuantOption) else (self.options,)
        object.__setattr__(self, "options", opts)
        if not opts:
            raise InputError(f"model {self.name}: no quantization option given; list at least one, e.g. bf16")
        for o in opts:
            if not isinstance(o, QuantOption):
                raise InputError(f"model {self.name}: options must be QuantOption values, got {type(o).__name__}")
        seen = [o.quantization for o in opts]
        if len(set(seen)) != len(seen):
            raise InputError(f"model {self.name}: quantization listed twice in {seen}; list each once")
        for name in ("min_replicas", "max_replicas", "offload_cpu_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"model {self.name}: {name} must be an int >= 0, got {v!r}")
        if self.max_replicas < self.min_replicas:
            raise InputError(
                f"model {self.name}: max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas}); "
                f"set max_replicas >= {self.min_replicas}"
            )
        if self.gpu_type is not None and (not isinstance(self.gpu_type, str) or not self.gpu_type.strip()):
            raise InputError(f"model {self.name}: gpu_type must be a GPU type like 'A10G' or None")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "options": [o.to_json() for o in self.options],
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "offload_cpu_bytes": self.offload_cpu_bytes,
            "gpu_type": self.gpu_type,
        }


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class GpuReplica:
    """One replica on one GPU. ``bytes`` is its share of this GPU; an offloaded replica also holds ``cpu_bytes``."""

    model: str
    bytes: int
    num_gpus: float  # Ray's fractional label: bytes / gpu total, rounded up to 1e-4
    quantization: str
    offload: bool = False
    cpu_bytes: int = 0  # host RAM it needs besides (offloaded layers + the option's cpu_bytes)

    def to_json(self) -> dict:
        d = {"model": self.model, "bytes": self.bytes, "num_gpus": self.num_gpus, "quantization": self.quantization}
        if self.offload:
            d["offload"] = True
        if self.cpu_bytes:
            d["cpu_bytes"] = self.cpu_bytes
        return d


@dataclass(frozen=True)
class GpuPlan:
    id: str
    name: str
    node: str
    index: int
    gpu_type: str | None
    total_bytes: int
    usable_bytes: int
    used_bytes: int
    replicas: tuple[GpuReplica, ...]
    ray_basis_bytes: int = 0  # num_gpus = bytes / ray_basis_bytes (total, or nominal usable; see plan())

    @property
    def free_bytes(self) -> int:
        """Usable bytes left unplanned."""
        return self.usable_bytes - self.used_bytes

    @property
    def num_gpus_used(self) -> float:
        return round(sum(r.num_gpus for r in self.replicas), 4)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "node": self.node,
            "index": self.index,
            "gpu_type": self.gpu_type,
            "total_bytes": self.total_bytes,
            "usable_bytes": self.usable_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "num_gpus_used": self.num_gpus_used,
            "ray_basis_bytes": self.ray_basis_bytes,
            "replicas": [r.to_json() for r in self.replicas],
        }


@dataclass(frozen=True)
class CpuReplica:
    """A replica that runs on a node's CPU; ``bytes`` is all the host RAM it needs."""

    model: str
    bytes: int
    node: str
    quantization: str

    def to_json(self) -> dict:
        return {"model": self.model, "bytes": self.bytes, "node": self.node, "quantization": self.quantization}


@dataclass(frozen=True)
class OffloadReplica:
    """A split replica, ``max_memory``-style: ``gpu_bytes`` on ``gpu``, ``cpu_bytes`` of its weights in host RAM."""

    model: str
    gpu: str
    node: str
    gpu_bytes: int
    cpu_bytes: int  # offloaded part of replica_bytes (host RAM), excluding the option's own cpu_bytes
    num_gpus: float
    quantization: str

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "gpu": self.gpu,
            "node": self.node,
            "gpu_bytes": self.gpu_bytes,
            "cpu_bytes": self.cpu_bytes,
            "num_gpus": self.num_gpus,
            "quantization": self.quantization,
        }


@dataclass(frozen=True)
class ModelPlan:
    name: str
    quantization: str
    option_rank: int  # 0 = most preferred option
    replica_bytes: int
    cpu_bytes: int
    min_replicas: int
    max_replicas: int
    placed_replicas: int
    gpu_replicas: int
    offload_replicas: int
    cpu_replicas: int
    gpu_type: str | None  # the pin, if any
    gpus_used: int  # distinct GPUs holding a replica
    nodes_used: int  # distinct nodes holding a replica
    num_gpus_by_gpu_type: tuple[tuple[str, float], ...]  # Ray label per GPU type (one deployment per type)
    why_quantization: str
    why_not_max: str | None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "quantization": self.quantization,
            "option_rank": self.option_rank,
            "replica_bytes": self.replica_bytes,
            "cpu_bytes": self.cpu_bytes,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "placed_replicas": self.placed_replicas,
            "gpu_replicas": self.gpu_replicas,
            "offload_replicas": self.offload_replicas,
            "cpu_replicas": self.cpu_replicas,
            "gpu_type": self.gpu_type,
            "gpus_used": self.gpus_used,
            "nodes_used": self.nodes_used,
            "num_gpus_by_gpu_type": dict(self.num_gpus_by_gpu_type),
            "why_quantization": self.why_quantization,
            "why_not_max": self.why_not_max,
        }


@dataclass(frozen=True)
class SolverInfo:
    quantization_search: str  # "none" | "exhaustive" | "greedy"
    min_placement: str  # "none" | "spread" | "best-fit" | "exact" | "bound" (how the minimums were placed)
    fill: str  # "spread" | "best-fit" | "exact" (how extra replicas were placed)
    optimal: bool | None  # total replicas placed proven maximal (None: not checked)
    status: str  # one line: how optimality was established or why not
    placed: int
    bound: int | None  # proven upper bound on replicas placeable (when known)
    seconds: float
    spread: str = ""  # how replicas were spread over GPUs and nodes ("proven best for these counts", "heuristic")

    @property
    def gap(self) -> int | None:
        """Replicas between the total placed and the proven bound (0 when optimal; None when no bound is known)."""
        return None if self.bound is None else max(0, self.bound - self.placed)

    def to_json(self) -> dict:
        return {
            "quantization_search": self.quantization_search,
            "min_placement": self.min_placement,
            "fill": self.fill,
            "optimal": self.optimal,
            "status": self.status,
            "placed": self.placed,
            "bound": self.bound,
            "gap": self.gap,
            "seconds": round(self.seconds, 4),
            "spread": self.spread,
        }


@dataclass(frozen=True)
class Plan:
    feasible: bool
    mode: str  # "gpu" | "cpu" (no GPU in the cluster: every replica is a CPU replica)
    headroom: float
    gpu_reserve_bytes: int
    models: tuple[ModelPlan, ...]
    gpus: tuple[GpuPlan, ...]
    cpu_replicas: tuple[CpuReplica, ...]
    offload: tuple[OffloadReplica, ...]
    notes: tuple[str, ...]
    solver: SolverInfo
    fraction_basis: str = "total"  # what num_gpus is a fraction of: "total" or "usable" GPU bytes

    def model(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "feasible": self.feasible,
            "mode": self.mode,
            "headroom": self.headroom,
            "gpu_reserve_bytes": self.gpu_reserve_bytes,
            "fraction_basis": self.fraction_basis,
            "models": [m.to_json() for m in self.models],
            "gpus": [g.to_json() for g in self.gpus],
            "cpu_replicas": [c.to_json() for c in self.cpu_replicas],
            "offload": [o.to_json() for o in self.offload],
            "notes": list(self.notes),
            "solver": self.solver.to_json(),
        }


# ----------------------------------------------------------------------------------------------------------------
# Capacity helpers


def usable_gpu_bytes(gpu: Gpu, *, headroom: float = DEFAULT_HEADROOM, gpu_reserve_bytes: int = DEFAULT_GPU_RESERVE) -> int:
    """Bytes of ``gpu`` replicas may fill: ``floor(total * (1 - headroom)) - gpu_reserve_bytes``.

    When the GPU was probed (``free_bytes`` set) the result is also capped at ``free_bytes - ceil(total *
    headroom)``: NVML's free already excludes the driver's reservation and anything else living on the GPU (another
    process, a previous deployment), so that term is the same formula with the measured reservation in place of the
    constant. Taking the smaller of the two never assumes less reserved memory than ``gpu_reserve_bytes``, and
    free memory below ``total - reserve`` (something else is there) shrinks the plan. Never negative.
    """
    planned = math.floor(gpu.total_bytes * (1.0 - headroom)) - gpu_reserve_bytes
    if gpu.free_bytes is not None:
        planned = min(planned, gpu.free_bytes - math.ceil(gpu.total_bytes * headroom))
    return max(0, int(planned))


def ray_gpu_units(replica_bytes: int, basis_bytes: int) -> int:
    """``num_gpus`` in units of 1e-4: ``ceil(replica_bytes / basis_bytes * 10000)``, in exact integer arithmetic."""
    if basis_bytes <= 0:
        return RAY_GPU_UNITS + 1
    return -(-replica_bytes * RAY_GPU_UNITS // basis_bytes)


def num_gpus_for(replica_bytes: int, basis_bytes: int) -> float:
    """The ``num_gpus`` label of a replica of ``replica_bytes`` on a GPU whose Ray fraction basis is ``basis_bytes``
    (its total bytes by default), rounded UP to 1e-4."""
    return round(ray_gpu_units(replica_bytes, basis_bytes) / RAY_GPU_UNITS, 4)


def ray_basis_bytes(gpu: Gpu, fraction_basis: str, *, headroom: float, gpu_reserve_bytes: int) -> int:
    """The bytes ``num_gpus`` is a fraction of: the GPU's total (``"total"``), or its nominal usable bytes
    ``floor(total * (1 - headroom)) - reserve`` (``"usable"``; probed free memory is left out so that every GPU of one
    size gets the same label, as Ray Serve sets num_gpus per deployment)."""
    if fraction_basis == "usable":
        return max(1, math.floor(gpu.total_bytes * (1.0 - headroom)) - gpu_reserve_bytes)
    return gpu.total_bytes


def _gpu_type(g: Gpu) -> str:
    return (g.gpu_type or gpu_type_of(g.name) or g.name).upper()


# ----------------------------------------------------------------------------------------------------------------
# Internal problem: "bins" are GPUs (GPU mode) or nodes (CPU mode)


class _Problem:
    def __init__(
        self, demands: Sequence[ModelDemand], cluster: Cluster, headroom: float, reserve: int, basis: str = "total"
    ):
        import numpy as np

        self.np = np
        self.demands = list(demands)
        self.cluster = cluster
        self.headroom = headroom
        self.reserve = reserve
        self.basis = basis
        self.node_names = [n.name for n in cluster.nodes]
        self.ram_cap = np.array(
            [max(0, math.floor(n.cpu_memory_bytes * (1.0 - headroom))) for n in cluster.nodes], dtype=np.int64
        )
        gpus = list(cluster.gpus)
        self.gpus = gpus
        self.mode = "gpu" if gpus else "cpu"
        node_idx = {name: i for i, name in enumerate(self.node_names)}
        if self.mode == "gpu":
            self.bin_ids = [g.id for g in gpus]
            self.cap = np.array(
                [usable_gpu_bytes(g, headroom=headroom, gpu_reserve_bytes=reserve) for g in gpus], dtype=np.int64
            )
            self.total = np.array([g.total_bytes for g in gpus], dtype=np.int64)
            # NOTE: Ray puts a fractional request on any GPU of the node that has room, so every GPU of one node
            # carries one basis: the smallest of the node's GPUs (a replica sized for the node's big GPU may land
            # on its small one, where its fraction must still cover its bytes). One GPU size per node: no change.
            basis_of = [ray_basis_bytes(g, basis, headroom=headroom, gpu_reserve_bytes=reserve) for g in gpus]
            node_min: dict[str, int] = {}
            for g, b in zip(gpus, basis_of):
                node_min[g.node] = min(b, node_min.get(g.node, b))
            self.denom = np.array([node_min[g.node] for g in gpus], dtype=np.int64)
            self.node_of = np.array([node_idx.get(g.node, -1) for g in gpus], dtype=np.int64)
            missing = sorted({g.node for g in gpus if g.node not in node_idx})
            if missing:
                raise InputError(f"GPU(s) on unknown node(s) {missing}; every Gpu.node must name a Node of the cluster")
            self.types = [_gpu_type(g) for g in gpus]
        else:
            self.bin_ids = list(self.node_names)
            self.cap = self.ram_cap.copy()
            self.total = self.ram_cap.copy()
            self.denom = np.maximum(self.ram_cap, 1)
            self.node_of = np.arange(len(self.node_names), dtype=np.int64)
            self.types = ["CPU"] * len(self.node_names)
        nb, nm = len(self.bin_ids), len(self.demands)
        self.nb, self.nm, self.nn = nb, nm, len(self.node_names)
        self.E = np.ones((nm, nb), dtype=bool)
        if self.mode == "gpu":
            types = np.array(self.types, dtype=object)
            for i, d in enumerate(self.demands):
                if d.gpu_type is not None:
                    self.E[i] = types == d.gpu_type.strip().upper()
        # pin pressure: how many pinned models can use each bin; unpinned replicas go to low-pressure bins first,
        # leaving the pinned types to the models that can only run there
        self.pressure = np.zeros(nb, dtype=np.int64)
        for i, d in enumerate(self.demands):
            if d.gpu_type is not None and self.mode == "gpu" and d.max_replicas > 0:
                self.pressure += self.E[i]
        # models that run split GPU+CPU (set by plan()): packed as items of their minimum GPU share
        self.offload = np.zeros(nm, dtype=bool)
        self.min_rep = np.array([d.min_replicas for d in self.demands], dtype=np.int64)
        self.max_rep = np.array([d.max_replicas for d in self.demands], dtype=np.int64)

    # sizes of model i at option r ------------------------------------------------------------------------------
    def offload_gpu_bytes(self, i: int, r: int) -> int:
        """The least GPU share of a split replica of model i at option r: what offload_cpu_bytes cannot take, and
        at least OFFLOAD_MIN_GPU_BYTES."""
        d = self.demands[i]
        return max(OFFLOAD_MIN_GPU_BYTES, d.options[r].replica_bytes - d.offload_cpu_bytes)

    def opt_arrays(self, i: int, r: int):
        """(size, cpu, units_row) of one replica of model i at option r on every bin. A split (offloaded) replica
        is packed as its least GPU share, with the rest of its weights counted as host RAM."""
        np = self.np
        o = self.demands[i].options[r]
        if self.mode == "gpu" and self.offload[i]:
            g = self.offload_gpu_bytes(i, r)
            units = -(-(g * RAY_GPU_UNITS) // np.maximum(self.denom, 1))
            return g, o.replica_bytes - g + o.cpu_bytes, units.astype(np.int64)
        if self.mode == "gpu":
            units = -(-(o.replica_bytes * RAY_GPU_UNITS) // np.maximum(self.denom, 1))
            return o.replica_bytes, o.cpu_bytes, units.astype(np.int64)
        return o.replica_bytes + o.cpu_bytes, 0, np.zeros(self.nb, dtype=np.int64)

    def alone_mask(self, i: int, r: int):
        """Bins where one replica of model i at option r fits on its own (empty bin, empty node)."""
        size, cpu, units = self.opt_arrays(i, r)
        m = self.E[i] & (self.cap >= size) & (units <= RAY_GPU_UNITS)
        if self.mode == "gpu":
            m &= self.ram_cap[self.node_of] >= cpu
        return m


class _State:
    """Mutable placement state over a _Problem for one choice of options."""

    def __init__(self, P: _Problem, choice: Sequence[int]):
        np = P.np
        self.P = P
        self.choice = list(choice)
        self.size = np.zeros(P.nm, dtype=np.int64)
        self.cpu = np.zeros(P.nm, dtype=np.int64)
        self.units = np.zeros((P.nm, P.nb), dtype=np.int64)
        for i, r in enumerate(self.choice):
            self.set_option(i, r)
        self.rem = P.cap.copy()
        self.rem_units = np.full(P.nb, RAY_GPU_UNITS, dtype=np.int64)
        self.ram = P.ram_cap.copy()
        self.cnt = np.zeros((P.nm, P.nb), dtype=np.int64)
        self.cnt_node = np.zeros((P.nm, P.nn), dtype=np.int64)
        self.placed = np.zeros(P.nm, dtype=np.int64)
        # offload / cpu replicas: (model, bin or -1, gpu_bytes, cpu_part, units, node)
        self.extra: list[tuple[int, int, int, int, int, int]] = []

    def set_option(self, i: int, r: int):
        self.choice[i] = r
        size, cpu, units = self.P.opt_arrays(i, r)
        self.size[i] = size
        self.cpu[i] = cpu
        self.units[i] = units

    def copy(self) -> "_State":
        s = object.__new__(_State)
        s.P = self.P
        s.choice = list(self.choice)
        for k in ("size", "cpu", "units", "rem", "rem_units", "ram", "cnt", "cnt_node", "placed"):
            setattr(s, k, getattr(self, k).copy())
        s.extra = list(self.extra)
        return s

    def without(self, models) -> "_State":
        """A copy without any replica of ``models`` on a bin: the free capacity the exact programs place them on."""
        free = self.copy()
        for m in models:
            for b in self.P.np.flatnonzero(free.cnt[m]).tolist():
                free.remove(m, b, int(free.cnt[m, b]))
        return free

    def with_placed(self, sol: dict) -> "_State":
        """A copy with ``sol`` ((model, bin) -> replicas) placed."""
        s = self.copy()
        for (m, b), k in sol.items():
            s.place(m, b, k)
        return s

    def fits_mask(self, i: int):
        P = self.P
        m = P.E[i] & (self.rem >= self.size[i]) & (self.rem_units >= self.units[i])
        if P.mode == "gpu" and self.cpu[i] > 0:
            m &= self.ram[P.node_of] >= self.cpu[i]
        return m

    def place(self, i: int, b: int, k: int = 1):
        P = self.P
        self.rem[b] -= self.size[i] * k
        self.rem_units[b] -= self.units[i, b] * k
        n = P.node_of[b]
        if P.mode == "gpu":
            self.ram[n] -= self.cpu[i] * k
        self.cnt[i, b] += k
        self.cnt_node[i, n] += k
        self.placed[i] += k

    def remove(self, i: int, b: int, k: int = 1):
        self.place(i, b, -k)

    def choose(self, i: int, spread: bool) -> int:
        """The bin for one more replica of model i, or -1. Spread: fewest of this model on the node, then on the
        GPU; then the least pin pressure (GPU types other models are pinned to come last); then the tightest fit
        (best fit). Ties go to the lowest index."""
        np = self.P.np
        idx = np.flatnonzero(self.fits_mask(i))
        if idx.size == 0:
            return -1
        if spread and idx.size > 1:
            cn = self.cnt_node[i, self.P.node_of[idx]]
            idx = idx[cn == cn.min()]
            if idx.size > 1:
                cb = self.cnt[i, idx]
                idx = idx[cb == cb.min()]
        if idx.size > 1:
            pr = self.P.pressure[idx]
            idx = idx[pr == pr.min()]
        return int(idx[np.argmin(self.rem[idx])])


