"""Memory-aware placement of model replicas on GPUs: how many replicas of each model fit on each GPU, never
over-committing a GPU's memory.

Ray Serve lets a replica ask for ``num_gpus: 0.25``, but the fraction is a scheduling label: Ray does not enforce
memory, so replicas that share a GPU can OOM each other. ``plan()`` decides, from byte sizes computed by the caller
(the memory model), which quantization each model runs at, how many replicas of each model go on which GPU, and the
``num_gpus`` label each replica must carry so that Ray's fractional accounting never admits what the memory plan would
not.

Pipeline (each step documented on its helper):

1. ``usable bytes`` per GPU = ``floor(total * (1 - headroom)) - gpu_reserve_bytes``, capped by probed free memory
   (see :func:`usable_gpu_bytes`).
2. Quantization: each model runs at one of its ``options`` (most preferred first). We minimise the sum of preference
   ranks over the models that have minimum replicas, ties broken by model order (an earlier model keeps its
   preference first) -- exhaustively when the number of combinations is small (``EXHAUSTIVE_QUANT_MAX``), otherwise
   by greedy downgrade of the model whose downgrade frees the most memory, then a pass that upgrades back any
   model that still fits.
3. Minimum replicas: spread-first best-fit decreasing, then plain best-fit decreasing, then an exact search:
   column generation over per-GPU "patterns" with an integer master (``scipy.optimize.milp``, HiGHS), then one
   integer variable per (model, GPU) if still undecided, all within ``time_limit_s``.
4. Extra replicas up to each ``max_replicas``: smallest replicas first (that maximises the number placed), each put
   on the GPU of the node with the fewest replicas of that model, then the GPU with the fewest, then the tightest
   fit (anti-affinity, so one GPU or node failure does not take a model down). On small instances (models x GPUs
   <= ``EXACT_MAX_VARS``) the column generation proves the count optimal or improves it.
5. Models that fit on no GPU at any option: split GPU+CPU replicas when ``offload_cpu_bytes`` allows (packed as
   their least GPU share, then grown into the room left on their GPU), or CPU replicas when ``offload_cpu_bytes``
   covers a whole replica. With no GPU at all, every replica is a CPU replica sized against its node's RAM.
6. ``num_gpus`` per replica: its bytes over the GPU's total (or usable, ``fraction_basis``), rounded up to 1e-4;
   the per-GPU sum of those units is a packing constraint (<= 1). How the plan is brought up on Ray so that Ray's
   own fractional placement reproduces it is planner/placement/rollout.py's job.

Sizes are ints of bytes; the results are frozen dataclasses with ``to_json()``. Pure Python: numpy and scipy are
imported lazily inside the functions that need them.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from planner.errors import InfeasiblePlanError, InputError
from planner.cluster.inventory import Cluster, Gpu, gpu_type_of
from planner.units import GiB, MiB, format_bytes

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

    def to_json(self) -> dict:
        return {
            "quantization_search": self.quantization_search,
            "min_placement": self.min_placement,
            "fill": self.fill,
            "optimal": self.optimal,
            "status": self.status,
            "placed": self.placed,
            "bound": self.bound,
            "seconds": round(self.seconds, 4),
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


# ----------------------------------------------------------------------------------------------------------------
# Exact search (scipy.optimize.milp / HiGHS)


def _scale_for(values: Iterable[int]) -> int:
    """A divisor that keeps byte coefficients small: their gcd, times a power of two if they are still large."""
    vals = [int(v) for v in values if v > 0]
    if not vals:
        return 1
    g = 0
    for v in vals:
        g = math.gcd(g, v)
    mx = max(vals) // g
    s = g
    while mx > _MILP_MAX_COEF:
        s *= 2
        mx //= 2
    return s


@dataclass
class _MilpResult:
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    x: dict  # (model, bin) -> count, for models in the program
    objective: int | None
    bound: int | None
    seconds: float


class _quiet_native_stdout:
    """HiGHS (the solver behind scipy.optimize.milp) prints some debug lines straight to file descriptor 1 from C++,
    which would corrupt ``--json`` output; point fd 1 at /dev/null while it runs (process-wide, for the length of
    one solve)."""

    def __enter__(self):
        import os
        import sys

        self.saved = None
        try:
            sys.stdout.flush()
        except Exception:
            pass
        try:
            self.saved = os.dup(1)
            self.devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.devnull, 1)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        import os

        if self.saved is not None:
            os.dup2(self.saved, 1)
            os.close(self.saved)
            os.close(self.devnull)
        return False


def _run_milp(*args, **kwargs):
    from scipy.optimize import milp

    with _quiet_native_stdout():
        return milp(*args, **kwargs)


def _milp(st: _State, models: Sequence[int], lo, hi, *, maximize: bool, time_limit: float) -> _MilpResult:
    """Integer program over the free capacity of ``st``: x[m, b] replicas of model m on bin b, with
    ``lo[m] <= sum_b x[m, b] <= hi[m]``, per-bin bytes and Ray-unit capacity, and per-node host RAM. Maximises the
    total when ``maximize`` (else any feasible point). Byte coefficients are divided by a common scale: exactly
    (their gcd) when they are small, otherwise sizes are rounded up and capacities down, so every solution is
    feasible in exact bytes (re-checked here)."""
    t0 = time.perf_counter()
    P = st.P
    np = P.np
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.sparse import coo_array

    var_m, var_b, var_ub = [], [], []
    for m in models:
        mask = st.fits_mask(m)
        bs = np.flatnonzero(mask)
        if bs.size == 0:
            continue
        ub = np.minimum(st.rem[bs] // max(int(st.size[m]), 1), hi[m])
        u = st.units[m, bs]
        ub = np.where(u > 0, np.minimum(ub, st.rem_units[bs] // np.maximum(u, 1)), ub)
        if P.mode == "gpu" and st.cpu[m] > 0:
            ub = np.minimum(ub, st.ram[P.node_of[bs]] // st.cpu[m])
        keep = ub > 0
        var_m.extend([m] * int(keep.sum()))
        var_b.extend(bs[keep].tolist())
        var_ub.extend(ub[keep].tolist())
    nv = len(var_m)
    # infeasible at once if a model with lo > 0 has no variable
    have = set(var_m)
    for m in models:
        if lo[m] > 0 and m not in have:
            return _MilpResult("infeasible", {}, None, None, time.perf_counter() - t0)
    if nv == 0:
        return _MilpResult("optimal", {}, 0, 0, time.perf_counter() - t0)
    vm = np.array(var_m)
    vb = np.array(var_b)
    rows, cols, vals, lbs, ubs = [], [], [], [], []
    r = 0
    bins_used = np.unique(vb)
    bin_row = {int(b): k for k, b in enumerate(bins_used)}
    sizes = st.size[vm]
    sc = _scale_for(list(sizes) + [int(st.rem[b]) for b in bins_used])
    coef = -(-sizes // sc)
    for k in range(nv):
        rows.append(r + bin_row[int(vb[k])])
        cols.append(k)
        vals.append(float(coef[k]))
    for b in bins_used:
        ubs.append(float(int(st.rem[b]) // sc))
        lbs.append(-np.inf)
    r += len(bins_used)
    if P.mode == "gpu":
        uc = st.units[vm, vb]
        for k in range(nv):
            rows.append(r + bin_row[int(vb[k])])
            cols.append(k)
            vals.append(float(uc[k]))
        for b in bins_used:
            ubs.append(float(st.rem_units[b]))
            lbs.append(-np.inf)
        r += len(bins_used)
        cpus = st.cpu[vm]
        if (cpus > 0).any():
            nodes = np.unique(P.node_of[vb[cpus > 0]])
            node_row = {int(n): k for k, n in enumerate(nodes)}
            rs = _scale_for(list(cpus[cpus > 0]) + [int(st.ram[n]) for n in nodes])
            for k in range(nv):
                if cpus[k] > 0:
                    rows.append(r + node_row[int(P.node_of[vb[k]])])
                    cols.append(k)
                    vals.append(float(-(-int(cpus[k]) // rs)))
            for n in nodes:
                ubs.append(float(int(st.ram[n]) // rs))
                lbs.append(-np.inf)
            r += len(nodes)
    model_row = {}
    for m in models:
        if m in have:
            model_row[m] = r
            lbs.append(float(lo[m]))
            ubs.append(float(hi[m]))
            r += 1
    for k in range(nv):
        rows.append(model_row[int(vm[k])])
        cols.append(k)
        vals.append(1.0)
    A = coo_array((np.array(vals), (np.array(rows), np.array(cols))), shape=(r, nv)).tocsr()
    c = -np.ones(nv) if maximize else np.zeros(nv)
    res = _run_milp(
        c,
        constraints=[LinearConstraint(A, np.array(lbs), np.array(ubs))],
        integrality=np.ones(nv),
        bounds=Bounds(np.zeros(nv), np.array(var_ub, dtype=float)),
        options={"time_limit": max(0.05, float(time_limit)), "disp": False, "mip_rel_gap": 1e-9},
    )
    secs = time.perf_counter() - t0
    bound = None
    db = getattr(res, "mip_dual_bound", None)
    if maximize and db is not None and np.isfinite(db):
        bound = int(math.floor(-db + 1e-6))
    if res.x is None:
        status = "infeasible" if res.status == 2 else "unknown"
        return _MilpResult(status, {}, None, bound, secs)
    x = np.rint(res.x).astype(np.int64)
    sol = {(int(vm[k]), int(vb[k])): int(x[k]) for k in range(nv) if x[k] > 0}
    # re-check in exact integers
    trial = st.copy()
    for (m, b), k in sol.items():
        trial.place(m, b, k)
    ok = (trial.rem >= 0).all() and (trial.rem_units >= 0).all() and (trial.ram >= 0).all()
    ok = ok and all(lo[m] <= trial.placed[m] - st.placed[m] <= hi[m] for m in models if m in have)
    if not ok:
        return _MilpResult("unknown", {}, None, bound, secs)
    obj = int(sum(sol.values()))
    status = "optimal" if res.status == 0 else "feasible"
    if status == "optimal" and maximize:
        bound = obj
    return _MilpResult(status, sol, obj, bound, secs)


def _colgen_fill(st: _State, models: Sequence[int], lo, hi, seed: "_State | None", time_limit: float) -> _MilpResult:
    """Maximise the replicas placed on the free capacity of ``st`` exactly, by column generation.

    GPUs with the same free bytes, Ray units, total and type (and node, when host RAM constrains) form a class of
    interchangeable bins; a column is a *pattern* (how many replicas of each model one bin of the class holds). The
    master problem ``max sum_m y_m`` with ``lo <= y <= hi``, ``y_m <= sum_p a_mp * lambda_p``, ``sum_{p in c}
    lambda_p <= n_c`` (and per-node host RAM) has a far tighter linear relaxation than one variable per (model, GPU),
    and no symmetry between identical GPUs. Pricing is a small bounded knapsack per class (bytes and Ray units),
    solved exactly on a relaxation of the byte sizes; the upper bound used to prove optimality is the Lagrangian
    bound ``z_LP + sum_c n_c * max(0, best reduced profit_c)``, valid at every iteration. The integer master over
    the generated columns gives the placement; it is proven optimal when it reaches ``floor(bound)``. ``seed`` (a
    heuristic placement on the same free capacity) supplies initial columns, so the result is never worse.
    """
    t0 = time.perf_counter()
    P = st.P
    np = P.np
    from scipy.optimize import Bounds, LinearConstraint, linprog

    deadline = t0 + max(0.05, time_limit)
    models = [m for m in models if hi[m] > 0]
    ram_rel = P.mode == "gpu" and any(int(st.cpu[m]) > 0 for m in models)
    classes: dict = {}
    for b in range(P.nb):
        elig = [
            m
            for m in models
            if P.E[m, b] and st.size[m] <= st.rem[b] and st.units[m, b] <= st.rem_units[b]
            and (not ram_rel or st.cpu[m] <= st.ram[P.node_of[b]])
        ]
        if not elig:
            continue
        key = (int(st.rem[b]), int(st.rem_units[b]), int(P.denom[b]), P.types[b], int(P.node_of[b]) if ram_rel else -1)
        classes.setdefault(key, {"bins": [], "elig": elig})["bins"].append(b)
    have = {m for c in classes.values() for m in c["elig"]}
    if any(lo[m] > 0 and m not in have for m in models):
        return _MilpResult("infeasible", {}, None, None, time.perf_counter() - t0)
    cls = list(classes.items())
    if not cls:
        return _MilpResult("optimal", {}, 0, 0, time.perf_counter() - t0)
    midx = {m: i for i, m in enumerate(models)}
    M = len(models)
    nodes = sorted({k[4] for k, _ in cls}) if ram_rel else []
    nidx = {n: i for i, n in enumerate(nodes)}

    def ub_alone(ci: int, m: int) -> int:
        key, c = cls[ci]
        b0 = c["bins"][0]
        u = int(st.units[m, b0])
        ub = min(int(hi[m]), key[0] // max(1, int(st.size[m])))
        if u > 0:
            ub = min(ub, key[1] // u)
        if ram_rel and st.cpu[m] > 0:
            ub = min(ub, int(st.ram[key[4]]) // int(st.cpu[m]))
        return ub

    cols: list[tuple[int, tuple]] = []
    seen = set()

    def add_col(ci: int, pat: dict) -> bool:
        pat = {m: k for m, k in pat.items() if k > 0}
        if not pat:
            return False
        t = (ci, tuple(sorted(pat.items())))
        if t in seen:
            return False
        seen.add(t)
        cols.append(t)
        return True

    for ci, (key, c) in enumerate(cls):
        for m in c["elig"]:
            add_col(ci, {m: ub_alone(ci, m)})
    if seed is not None:
        bin_class = {b: ci for ci, (_, c) in enumerate(cls) for b in c["bins"]}
        for b in range(P.nb):
            if b in bin_class:
                add_col(bin_class[b], {m: int(seed.cnt[m, b]) for m in models})

    n_c = np.array([len(c["bins"]) for _, c in cls], dtype=float)
    GiBf = float(GiB)

    def master(integer: bool, seconds: float):
        K = len(cols)
        nv = K + M
        rows, colsi, vals = [], [], []
        for k, (ci, pat) in enumerate(cols):
            for m, a in pat:
                rows.append(midx[m])
                colsi.append(k)
                vals.append(-float(a))
            rows.append(M + ci)
            colsi.append(k)
            vals.append(1.0)
        for i in range(M):
            rows.append(i)
            colsi.append(K + i)
            vals.append(1.0)
        ub = [0.0] * M + list(n_c)
        nr = M + len(cls)
        if ram_rel:
            rs = _scale_for([int(st.cpu[m]) for m in models] + [int(st.ram[n]) for n in nodes]) if integer else 1
            for k, (ci, pat) in enumerate(cols):
                ram = sum(int(st.cpu[m]) * a for m, a in pat)
                if ram > 0:
                    rows.append(nr + nidx[cls[ci][0][4]])
                    colsi.append(k)
                    coef = sum(-(-int(st.cpu[m]) // rs) * a for m, a in pat) if integer else ram / GiBf
                    vals.append(float(coef))
            ub += [float(int(st.ram[n]) // rs) if integer else float(st.ram[n]) / GiBf for n in nodes]
            nr += len(nodes)
        from scipy.sparse import coo_array

        A = coo_array((np.array(vals), (np.array(rows), np.array(colsi))), shape=(nr, nv)).tocsr()
        cvec = np.concatenate([np.zeros(K), -np.ones(M)])
        lb_v = np.concatenate([np.zeros(K), np.array([float(lo[m]) for m in models])])
        ub_v = np.concatenate([np.full(K, np.inf), np.array([float(hi[m]) for m in models])])
        if not integer:
            res = linprog(cvec, A_ub=A, b_ub=np.array(ub), bounds=list(zip(lb_v, ub_v)), method="highs")
            return res
        return _run_milp(
            cvec,
            constraints=[LinearConstraint(A, -np.inf, np.array(ub))],
            integrality=np.ones(nv),
            bounds=Bounds(lb_v, ub_v),
            options={"time_limit": max(0.05, seconds), "disp": False, "mip_rel_gap": 1e-9},
        )

    def price(ci: int, w: dict, mu: float, exact_sizes: bool):
        """Best pattern of class ci for weights w: a bounded knapsack on bytes, by dynamic programming over a
        grid of at most 2**16 cells. ``exact_sizes=False`` rounds sizes down and the capacity up (a relaxation:
        its value bounds the true best); True rounds the other way (every pattern it returns fits)."""
        key, c = cls[ci]
        items = [m for m in c["elig"] if w.get(m, 0.0) > 1e-12]
        if not items:
            return 0.0, None
        cap_b = key[0]
        grid = max(1, -(-cap_b // 65536))
        if exact_sizes:
            cap = cap_b // grid
            sz = [-(-int(st.size[m]) // grid) for m in items]
        else:
            cap = -(-cap_b // grid)
            sz = [int(st.size[m]) // grid for m in items]
        # binary splitting of the bounded counts into 0/1 pieces
        pieces = []
        for m, s_, ub in zip(items, sz, (ub_alone(ci, m) for m in items)):
            k = 1
            while ub > 0:
                t = min(k, ub)
                pieces.append((m, t, s_ * t, w[m] * t))
                ub -= t
                k *= 2
        best = np.zeros(cap + 1)
        take = np.zeros((len(pieces), cap + 1), dtype=bool)
        for i, (m, t, wt, val) in enumerate(pieces):
            if wt > cap:
                continue
            if wt == 0:
                best += val
                take[i, :] = True
                continue
            cand = best[: cap + 1 - wt] + val
            better = cand > best[wt:] + 1e-12
            take[i, wt:] = better
            best[wt:] = np.where(better, cand, best[wt:])
        c_ = int(np.argmax(best))
        val = float(best[c_])
        pat: dict = {}
        for i in range(len(pieces) - 1, -1, -1):
            if take[i, c_]:
                m, t, wt, _ = pieces[i]
                pat[m] = pat.get(m, 0) + t
                c_ -= wt
        return val, pat

    def exact_ok(ci: int, pat: dict) -> bool:
        key, c = cls[ci]
        b0 = c["bins"][0]
        if sum(int(st.size[m]) * k for m, k in pat.items()) > key[0]:
            return False
        if sum(int(st.units[m, b0]) * k for m, k in pat.items()) > key[1]:
            return False
        if ram_rel and sum(int(st.cpu[m]) * k for m, k in pat.items()) > int(st.ram[key[4]]):
            return False
        return True

    best_ub = float("inf")
    iters = 0
    while time.perf_counter() < deadline and iters < 500:
        iters += 1
        res = master(False, 0)
        if res.status != 0:
            break
        z = -float(res.fun)
        marg = res.ineqlin.marginals
        pi = {m: max(0.0, -float(marg[midx[m]])) for m in models}
        mu = [max(0.0, -float(marg[M + ci])) for ci in range(len(cls))]
        rho = [max(0.0, -float(marg[M + len(cls) + i])) for i in range(len(nodes))] if ram_rel else []
        gap_sum = 0.0
        added = False
        for ci, (key, c) in enumerate(cls):
            r = rho[nidx[key[4]]] if ram_rel else 0.0
            w = {m: pi[m] - r * float(st.cpu[m]) / GiBf for m in c["elig"]}
            v, pat = price(ci, w, mu[ci], exact_sizes=False)
            if v - mu[ci] > 1e-7:
                gap_sum += n_c[ci] * (v - mu[ci])
                if pat is None or not exact_ok(ci, pat):
                    v2, pat = price(ci, w, mu[ci], exact_sizes=True)
                    if pat is None or v2 - mu[ci] <= 1e-7 or not exact_ok(ci, pat):
                        pat = None
                # add the best pattern, then up to two more built from the models it did not use: disjoint
                # columns speed up convergence a lot on bin-packing-like instances
                w2 = dict(w)
                for _ in range(3):
                    if pat is None:
                        break
                    added |= add_col(ci, pat)
                    for m in pat:
                        w2[m] = 0.0
                    v3, pat = price(ci, w2, mu[ci], exact_sizes=True)
                    if pat is None or v3 - mu[ci] <= 1e-7 or not exact_ok(ci, pat):
                        pat = None
        best_ub = min(best_ub, z + gap_sum)
        if gap_sum <= 1e-7:
            break
        if not added:
            break
    bound = int(math.floor(best_ub + 1e-6)) if best_ub < float("inf") else None
    res = master(True, deadline - time.perf_counter() + 0.5)
    secs = time.perf_counter() - t0
    if res.x is None:
        return _MilpResult("unknown", {}, None, bound, secs)
    x = np.rint(res.x).astype(np.int64)
    K = len(cols)
    y = {m: int(x[K + midx[m]]) for m in models}
    # patterns -> bins, then drop copies beyond y_m from the bins holding the most of that model
    sol: dict = {}
    per_bin: dict = {}
    next_bin = {ci: 0 for ci in range(len(cls))}
    for k, (ci, pat) in enumerate(cols):
        for _ in range(int(x[k])):
            bins = cls[ci][1]["bins"]
            if next_bin[ci] >= len(bins):
                return _MilpResult("unknown", {}, None, bound, secs)
            b = bins[next_bin[ci]]
            next_bin[ci] += 1
            per_bin[b] = dict(pat)
    for m in models:
        have_m = sum(p.get(m, 0) for p in per_bin.values())
        excess = have_m - y[m]
        while excess > 0:
            b = max((b for b, p in per_bin.items() if p.get(m, 0) > 0), key=lambda b: (per_bin[b][m], b))
            per_bin[b][m] -= 1
            excess -= 1
    for b, p in per_bin.items():
        for m, k in p.items():
            if k > 0:
                sol[(m, b)] = k
    trial = st.copy()
    for (m, b), k in sol.items():
        trial.place(m, b, k)
    ok = (trial.rem >= 0).all() and (trial.rem_units >= 0).all() and (trial.ram >= 0).all()
    ok = ok and all(lo[m] <= trial.placed[m] - st.placed[m] <= hi[m] for m in models)
    if not ok:
        return _MilpResult("unknown", {}, None, bound, secs)
    obj = int(sum(y.values()))
    proven = bound is not None and obj >= bound
    status = "optimal" if proven else "feasible"
    if proven:
        bound = obj
    return _MilpResult(status, sol, obj, bound, secs)


# ----------------------------------------------------------------------------------------------------------------
# Minimum replicas: heuristics, then the exact program


class _Budget:
    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)
        self.deadline = time.perf_counter() + self.seconds
        self.timed_out = False

    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())


def _min_bound_ok(P: _Problem, st: _State, models: Sequence[int]) -> bool:
    """Cheap necessary conditions for placing every min replica (False = proven impossible)."""
    np = P.np
    need = 0
    for m in models:
        k = int(P.min_rep[m])
        if k == 0:
            continue
        mask = st.fits_mask(m)
        if not mask.any():
            return False
        per_bin = st.rem[mask] // max(int(st.size[m]), 1)
        u = st.units[m, mask]
        per_bin = np.where(u > 0, np.minimum(per_bin, st.rem_units[mask] // np.maximum(u, 1)), per_bin)
        if int(per_bin.sum()) < k:
            return False
        need += k * int(st.size[m])
    return need <= int(st.rem[P.E[list(models)].any(axis=0)].sum()) if models else True


def _place_min_heuristic(st: _State, models: Sequence[int], spread: bool) -> bool:
    """Best-fit decreasing over the min replicas (largest first); with ``spread``, a replica first goes to the node
    and then the GPU with the fewest replicas of its model. Places what it can; True when every one was placed."""
    order = sorted(
        ((int(st.size[m]), m) for m in models for _ in range(int(st.P.min_rep[m]) - int(st.placed[m]))),
        key=lambda t: (-t[0], t[1]),
    )
    ok = True
    for _, m in order:
        b = st.choose(m, spread)
        if b < 0:
            ok = False
            continue
        st.place(m, b)
    return ok


def _place_mins(P: _Problem, choice: Sequence[int], models: Sequence[int], budget: _Budget, *, use_milp: bool = True):
    """Place the min replicas of ``models`` at ``choice``. Returns (status, state, method): heuristics first, then
    column generation (max replicas placed with ``y_m <= min_m``: feasible iff it reaches the sum of minimums,
    proven infeasible when its bound is below), then one variable per (model, GPU) if still undecided."""
    base = _State(P, choice)
    if not _min_bound_ok(P, base, models):
        return "infeasible", None, "bound"
    partial = None
    for spread in (True, False):
        st = base.copy()
        if _place_min_heuristic(st, models, spread):
            return "feasible", st, "spread" if spread else "best-fit"
        partial = st
    if not use_milp or budget.left() <= 0.01:
        budget.timed_out = budget.timed_out or use_milp
        return "unknown", None, "heuristic"
    need = int(sum(int(P.min_rep[m]) for m in models))
    zeros = P.np.zeros(P.nm, dtype=P.np.int64)
    res = _colgen_fill(base, models, zeros, P.min_rep, partial, budget.left())
    if res.objective is not None and res.objective >= need:
        st = base.copy()
        for (m, b), k in res.x.items():
            st.place(m, b, k)
        _respread(st, models)
        return "feasible", st, "exact"
    if res.bound is not None and res.bound < need:
        return "infeasible", None, "exact"
    if budget.left() <= 0.01:
        budget.timed_out = True
        return "unknown", None, "exact"
    lo = P.min_rep
    res = _milp(base, models, lo, lo, maximize=False, time_limit=budget.left())
    if res.status in ("optimal", "feasible"):
        st = base.copy()
        for (m, b), k in res.x.items():
            st.place(m, b, k)
        _respread(st, models)
        return "feasible", st, "exact"
    if res.status == "unknown":
        budget.timed_out = True
    return res.status, None, "exact"


def _respread(st: _State, models: Sequence[int], max_moves: int | None = None):
    """Move replicas to reduce how many replicas of one model share a node, then a GPU (anti-affinity), without
    changing any count. Used after exact placements, which ignore spreading."""
    P = st.P
    np = P.np
    if max_moves is None:
        max_moves = 4 * int(st.placed.sum()) + 8
    moves = 0
    for m in models:
        while moves < max_moves:
            src = np.flatnonzero(st.cnt[m] > 0)
            if src.size <= 0:
                break
            cn_src = st.cnt_node[m, P.node_of[src]]
            cb_src = st.cnt[m, src]
            order = np.lexsort((-cb_src, -cn_src))
            moved = False
            for a in src[order]:
                a = int(a)
                st.remove(m, a)
                mask = st.fits_mask(m)
                mask[a] = False
                cand = np.flatnonzero(mask)
                na = P.node_of[a]
                if cand.size:
                    cn = st.cnt_node[m, P.node_of[cand]]
                    cb = st.cnt[m, cand]
                    cn_a = st.cnt_node[m, na]  # after removal
                    cb_a = st.cnt[m, a]
                    same = P.node_of[cand] == na
                    better = np.where(same, cb < cb_a, (cn < cn_a) | ((cn == cn_a) & (cb < cb_a)))
                    cand = cand[better]
                if cand.size:
                    cn = st.cnt_node[m, P.node_of[cand]]
                    cand = cand[cn == cn.min()]
                    cb = st.cnt[m, cand]
                    cand = cand[cb == cb.min()]
                    b = int(cand[np.argmin(st.rem[cand])])
                    st.place(m, b)
                    moves += 1
                    moved = True
                    break
                st.place(m, a)
            if not moved:
                break


# ----------------------------------------------------------------------------------------------------------------
# Quantization choice


def _choose_quantization(P: _Problem, fit_ranks: dict, active: list[int], budget: _Budget):
    """Pick one option per active model (min_replicas > 0, fits somewhere).

    Returns (choice, state, search, method, reasons, proven); choice is None when even the least-memory options do
    not fit. The exact program is asked on every candidate only when the instance is small (models x GPUs <=
    EXACT_MAX_VARS); on larger ones candidates are checked by the heuristics and the program is asked once, on the
    least-memory combination, when every heuristic check failed."""
    choice = [0] * P.nm
    for m in range(P.nm):
        if fit_ranks.get(m):
            choice[m] = fit_ranks[m][0]
    reasons: dict[int, str] = {}
    if not active:
        return choice, _State(P, choice), "none", "none", reasons, True
    small = int(sum(P.E[m].sum() for m in active)) <= EXACT_MAX_VARS
    n_combos = 1
    for m in active:
        n_combos *= len(fit_ranks[m])
        if n_combos > EXHAUSTIVE_QUANT_MAX:
            break

    def least_memory_exact():
        ch = list(choice)
        for m in active:
            ch[m] = _smallest_choice(P, fit_ranks, m)
        status, st, method = _place_mins(P, ch, active, budget, use_milp=True)
        return (ch, st, method) if status == "feasible" else (None, None, method)

    if n_combos <= EXHAUSTIVE_QUANT_MAX:
        combos = list(itertools.product(*[fit_ranks[m] for m in active]))
        combos.sort(key=lambda c: (sum(c), c))
        unknown_before = False
        for combo in combos:
            ch = list(choice)
            for m, r in zip(active, combo):
                ch[m] = r
            status, st, method = _place_mins(P, ch, active, budget, use_milp=small)
            if status == "feasible":
                for m, r in zip(active, combo):
                    reasons[m] = _why_rank(P, m, r, "exhaustive" if small else "heuristic")
                return ch, st, "exhaustive", method, reasons, small and not unknown_before
            if status == "unknown":
                unknown_before = True
        if not small:
            ch, st, method = least_memory_exact()
            if ch is not None:
                for m in active:
                    reasons[m] = _why_rank(P, m, ch[m], "heuristic")
                return ch, st, "exhaustive", method, reasons, False
        return None, None, "exhaustive", "none", reasons, not unknown_before
    # greedy downgrade
    ch = list(choice)
    downgraded: dict[int, list[str]] = {}
    while True:
        status, st, method = _place_mins(P, ch, active, budget, use_milp=small)
        if status == "feasible":
            break
        best = None
        for m in active:
            cur = ch[m]
            cur_size = P.demands[m].options[cur].replica_bytes
            nxt = next((r for r in fit_ranks[m] if r > cur and P.demands[m].options[r].replica_bytes < cur_size), None)
            if nxt is None:
                continue
            freed = (cur_size - P.demands[m].options[nxt].replica_bytes) * int(P.min_rep[m])
            key = (freed, m)  # most freed; ties: the later model gives up its preference first
            if best is None or key > best[0]:
                best = (key, m, nxt)
        if best is None:
            if small:
                return None, None, "greedy", "none", reasons, not budget.timed_out
            ch2, st, method = least_memory_exact()
            if ch2 is None:
                return None, None, "greedy", "none", reasons, not budget.timed_out
            ch = ch2
            break
        (freed, _), m, nxt = best
        downgraded.setdefault(m, []).append(
            f"{P.demands[m].options[ch[m]].quantization}->{P.demands[m].options[nxt].quantization} freed "
            f"{format_bytes(freed)}"
        )
        ch[m] = nxt
    # upgrade pass: give back preference to any model that still fits (model order first)
    improved = True
    while improved:
        improved = False
        for m in active:
            for r in fit_ranks[m]:
                if r >= ch[m]:
                    break
                trial = list(ch)
                trial[m] = r
                s2, st2, meth2 = _place_mins(P, trial, active, budget, use_milp=small)
                if s2 == "feasible":
                    ch, st, method = trial, st2, meth2
                    improved = True
                    break
    for m in active:
        reasons[m] = _why_rank(P, m, ch[m], "greedy", downgraded.get(m))
    return ch, st, "greedy", method, reasons, False


def _why_rank(P: _Problem, m: int, r: int, search: str, steps: list[str] | None = None) -> str:
    d = P.demands[m]
    o = d.options[r]
    if r == 0:
        return f"{o.quantization}: first preference; every model's minimum replicas fit with it"
    better = ", ".join(f"{x.quantization} ({format_bytes(x.replica_bytes)})" for x in d.options[:r])
    if search in ("exhaustive", "heuristic"):
        tried = (
            "every combination with a lower total preference rank was tried"
            if search == "exhaustive"
            else "combinations with a lower total preference rank were checked by the heuristics only (large cluster)"
        )
        return (
            f"{o.quantization} (preference {r + 1} of {len(d.options)}, {format_bytes(o.replica_bytes)}/replica): "
            f"with {better} the minimum replicas of all models do not fit together; {tried}"
        )
    how = f" (greedy downgrade: {'; '.join(steps)})" if steps else ""
    return (
        f"{o.quantization} (preference {r + 1} of {len(d.options)}, {format_bytes(o.replica_bytes)}/replica): "
        f"with {better} the minimum replicas of all models do not fit together{how}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Extra replicas up to max


def _fill(st: _State, models: Sequence[int], spread: bool) -> None:
    """Add replicas up to max, smallest replica first (maximises how many are placed), anti-affinity per model."""
    import heapq

    heap = [(int(st.size[m]), int(st.placed[m]), m) for m in models if st.placed[m] < st.P.max_rep[m]]
    heapq.heapify(heap)
    while heap:
        size, placed, m = heapq.heappop(heap)
        b = st.choose(m, spread)
        if b < 0:
            continue  # nothing this size fits any more; bins only get fuller
        st.place(m, b)
        if st.placed[m] < st.P.max_rep[m]:
            heapq.heappush(heap, (size, int(st.placed[m]), m))


# ----------------------------------------------------------------------------------------------------------------
# Offload and CPU replicas (models that fit on no GPU)


def _place_cpu_replica(st: _State, m: int) -> bool:
    """One CPU replica of model m (replica_bytes + cpu_bytes of host RAM) on the node with the most RAM left, fewest
    replicas of m first."""
    P = st.P
    o = P.demands[m].options[st.choice[m]]
    need = o.replica_bytes + o.cpu_bytes
    best, bkey = -1, None
    for n in range(P.nn):
        if int(st.ram[n]) >= need:
            key = (int(st.cnt_node[m, n]), -int(st.ram[n]), n)
            if bkey is None or key < bkey:
                best, bkey = n, key
    if best < 0:
        return False
    st.ram[best] -= need
    st.cnt_node[m, best] += 1
    st.placed[m] += 1
    st.extra.append((m, -1, 0, need, 0, best))
    return True


def _grow_offload(st: _State, models: Sequence[int]) -> None:
    """Turn the packed items of split models into split replicas: each keeps its least GPU share and grows into the
    usable bytes left on its GPU (more layers on the GPU, fewer in host RAM), never past its replica_bytes nor the
    GPU's Ray fraction. Recorded in ``st.extra``; the items leave ``st.cnt``."""
    P = st.P
    np = P.np
    for m in models:
        o = P.demands[m].options[st.choice[m]]
        base = int(st.size[m])
        for b in np.flatnonzero(st.cnt[m]).tolist():
            k = int(st.cnt[m, b])
            n = int(P.node_of[b])
            total = int(P.denom[b])
            for j in range(k):
                # give back this item, then take its grown share
                st.rem[b] += base
                st.rem_units[b] += int(st.units[m, b])
                share_room = int(st.rem[b]) // (k - j)
                gpu_part = min(o.replica_bytes, max(base, share_room))
                max_units = int(st.rem_units[b])
                while ray_gpu_units(gpu_part, total) > max_units and gpu_part > base:
                    gpu_part = max(base, (max_units * total) // RAY_GPU_UNITS)
                    if ray_gpu_units(gpu_part, total) > max_units:
                        gpu_part -= 1
                units = ray_gpu_units(gpu_part, total)
                st.rem[b] -= gpu_part
                st.rem_units[b] -= units
                cpu_part = o.replica_bytes - gpu_part
                st.ram[n] += gpu_part - base  # host RAM released by the bytes that moved to the GPU
                st.extra.append((m, b, gpu_part, cpu_part, units, n))
            st.cnt[m, b] = 0


# ----------------------------------------------------------------------------------------------------------------
# The planner


def _validate(demands, cluster, headroom, reserve):
    if not isinstance(cluster, Cluster):
        raise InputError(f"cluster must be a planner.cluster.inventory.Cluster, got {type(cluster).__name__}")
    if not cluster.nodes:
        raise InputError("the cluster has no nodes; declare at least one node (with its GPUs, or CPU-only)")
    ids = [g.id for g in cluster.gpus]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"GPU id(s) {dup} appear more than once in the cluster; give every GPU a unique id")
    for g in cluster.gpus:
        if g.total_bytes <= 0:
            raise InputError(f"GPU {g.id}: total_bytes must be > 0, got {g.total_bytes}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not (0.0 <= headroom < 1.0):
        raise InputError(f"headroom must be a fraction in [0, 1), got {headroom!r}; e.g. 0.10 keeps 10% free")
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise InputError(f"gpu_reserve_bytes must be an int >= 0, got {reserve!r}")
    demands = tuple(demands)
    for d in demands:
        if not isinstance(d, ModelDemand):
            raise InputError(f"demands must be ModelDemand values, got {type(d).__name__}")
    names = [d.name for d in demands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"model name(s) {dup} appear more than once; give every model a unique name")
    return demands


def plan(
    demands: Sequence[ModelDemand],
    cluster: Cluster,
    *,
    headroom: float = DEFAULT_HEADROOM,
    gpu_reserve_bytes: int = DEFAULT_GPU_RESERVE,
    suggest: SuggestFn | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    exact: bool | None = None,
    fraction_basis: str = "total",
) -> Plan:
    """Place every model's replicas on ``cluster`` without over-committing any GPU's (or node's) memory.

    ``exact``: None (default) proves the fill optimal with an integer program when models x GPUs <=
    ``EXACT_MAX_VARS``; True always tries (within ``time_limit_s``); False never does. ``suggest(demand,
    room_bytes)`` is asked, when the plan is infeasible, for a fix phrased in the caller's terms ("lower
    max_model_len to 2048") that would make one replica of ``demand`` need at most ``room_bytes``.

    ``fraction_basis``: what a replica's ``num_gpus`` is a fraction of. ``"total"`` (default): ``replica_bytes /
    total_bytes`` rounded up to 1e-4. Ray then sees ``1 - sum(num_gpus)`` free on a planned GPU -- the headroom and
    reserve included -- and may start a small replica there (Ray puts a fractional request on the best-fitting GPU
    of the node), which the memory plan would not admit.
    ``"usable"``: ``replica_bytes / (floor(total * (1 - headroom)) - reserve)``: Ray's sum <= 1 then means "fits in
    the usable memory", so Ray's accounting never admits more than the plan (at the cost of rounding on exact
    fits).

    Raises ``InfeasiblePlanError`` when some model's min_replicas cannot be placed, ``InputError`` for bad input.
    """
    t0 = time.perf_counter()
    demands = _validate(demands, cluster, headroom, gpu_reserve_bytes)
    if fraction_basis not in ("total", "usable"):
        raise InputError(f"fraction_basis must be 'total' or 'usable', got {fraction_basis!r}")
    P = _Problem(demands, cluster, headroom, gpu_reserve_bytes, fraction_basis)
    budget = _Budget(time_limit_s)
    notes: list[str] = []
    np = P.np

    if P.mode == "cpu":
        notes.append("no GPU in the cluster: every replica is a CPU replica, sized against its node's RAM")
        pinned = [d.name for d in demands if d.gpu_type]
        if pinned:
            notes.append(f"gpu_type pin ignored on a CPU-only cluster for: {', '.join(pinned)}")
            P.E[:] = True
    else:
        for g, cap in zip(P.gpus, P.cap.tolist()):
            if g.free_bytes is not None:
                nominal = max(0, math.floor(g.total_bytes * (1 - headroom)) - gpu_reserve_bytes)
                if cap < nominal:
                    notes.append(
                        f"gpu {g.id}: probed free memory {format_bytes(g.free_bytes)} of {format_bytes(g.total_bytes)} "
                        f"(something else uses {format_bytes(g.total_bytes - g.free_bytes)}); usable capped at "
                        f"{format_bytes(cap)} instead of {format_bytes(nominal)}"
                    )

    # which options can hold one replica somewhere at all
    fit_ranks: dict[int, list[int]] = {}
    for m, d in enumerate(demands):
        fit_ranks[m] = [r for r in range(len(d.options)) if P.alone_mask(m, r).any()]
    # models that fit on no GPU: split GPU+CPU when offload is allowed, else CPU replicas when offload covers a
    # whole replica, else infeasible (when they have minimum replicas)
    offload_models: list[int] = []
    cpu_models: list[int] = []
    if P.mode == "gpu":
        for m, d in enumerate(demands):
            if fit_ranks[m] or d.offload_cpu_bytes <= 0:
                continue
            P.offload[m] = True
            fit_ranks[m] = [r for r in range(len(d.options)) if P.alone_mask(m, r).any()]
            if fit_ranks[m]:
                offload_models.append(m)
            else:
                P.offload[m] = False
                cpu_ranks = [r for r, o in enumerate(d.options) if d.offload_cpu_bytes >= o.replica_bytes]
                if cpu_ranks:
                    cpu_models.append(m)
                    fit_ranks[m] = []
    nowhere = [m for m in range(P.nm) if not fit_ranks[m] and m not in cpu_models]
    hard = [m for m in nowhere if demands[m].min_replicas > 0]
    if hard:
        raise _fits_nowhere_error(P, hard, suggest)
    active = [m for m, d in enumerate(demands) if d.min_replicas > 0 and fit_ranks[m]]

    choice, st, qsearch, min_method, reasons, q_proven = _choose_quantization(P, fit_ranks, active, budget)
    if choice is None:
        raise _infeasible_error(P, fit_ranks, active, suggest, budget)

    # models with min 0: most preferred option that still fits after the minimums
    for m, d in enumerate(demands):
        if m in active or m in cpu_models:
            continue
        if not fit_ranks[m]:
            reasons[m] = (
                f"{d.options[0].quantization}: fits on no "
                + ("GPU" if P.mode == "gpu" else "node")
                + " at any listed option; 0 replicas (min_replicas is 0)"
            )
            continue
        for r in fit_ranks[m]:
            st.set_option(m, r)
            if st.fits_mask(m).any():
                break
        else:
            st.set_option(m, fit_ranks[m][0])
        r = st.choice[m]
        reasons[m] = (
            f"{d.options[r].quantization}: "
            + ("first preference" if r == 0 else f"most preferred option with room left after the minimums (preference {r + 1})")
            + "; min_replicas is 0"
        )
    for m in offload_models:
        d = demands[m]
        o = d.options[st.choice[m]]
        largest = int(P.cap[P.E[m]].max()) if P.E[m].any() else 0
        reasons[m] = (
            f"{o.quantization}: fits on no GPU at any option (a replica needs {format_bytes(o.replica_bytes)}, the "
            f"largest usable GPU has {format_bytes(largest)}); runs split: at least "
            f"{format_bytes(P.offload_gpu_bytes(m, st.choice[m]))} on a GPU, up to {format_bytes(d.offload_cpu_bytes)} "
            "in host RAM"
        )
    # CPU-only models (offload_cpu_bytes covers a whole replica): most preferred such option, on node RAM
    for m in cpu_models:
        d = demands[m]
        r = next(r for r, o in enumerate(d.options) if d.offload_cpu_bytes >= o.replica_bytes)
        st.set_option(m, r)
        for _ in range(d.min_replicas):
            if not _place_cpu_replica(st, m):
                raise _cpu_replica_error(P, st, m)
        reasons[m] = (
            f"{d.options[r].quantization}: fits on no GPU even split; offload.cpu_memory "
            f"({format_bytes(d.offload_cpu_bytes)}) holds a whole replica, so it runs on CPU"
        )

    # fill up to max
    gpu_models = [m for m in range(P.nm) if fit_ranks[m] and not P.offload[m]]
    base_fill = st
    fills = []
    for spread in (True, False):
        s = base_fill.copy()
        _fill(s, gpu_models, spread)
        fills.append((int(s.placed.sum()), spread, s))
        if all(s.placed[m] >= P.max_rep[m] for m in gpu_models):
            break
    best_total, best_spread, st = max(fills, key=lambda t: (t[0], t[1]))
    fill_method = "spread" if best_spread else "best-fit"
    all_max = all(st.placed[m] >= P.max_rep[m] for m in gpu_models)
    optimal: bool | None = None
    bound = None
    status = ""
    n_vars = int(sum(P.E[m].sum() for m in gpu_models))
    want_exact = exact if exact is not None else n_vars <= EXACT_MAX_VARS
    if all_max:
        optimal = True
        bound = int(sum(st.placed[m] for m in gpu_models))
        status = "every model reached max_replicas"
    elif want_exact and budget.left() > 0.01:
        # free every GPU replica of gpu_models (minimums included) and solve the whole fill exactly
        free = base_fill.copy()
        for m in gpu_models:
            for b in np.flatnonzero(free.cnt[m]).tolist():
                free.remove(m, b, int(free.cnt[m, b]))
        lo = P.min_rep.copy()
        res = _colgen_fill(free, gpu_models, lo, P.max_rep, st, budget.left())
        heur = int(sum(st.placed[m] for m in gpu_models))
        if res.objective is not None and res.objective > heur:
            s = free.copy()
            for (m, b), k in res.x.items():
                s.place(m, b, k)
            _respread(s, gpu_models)
            st = s
            fill_method = "exact"
        bound = res.bound
        best = int(sum(st.placed[m] for m in gpu_models))
        if res.status == "optimal":
            optimal = True
            status = f"proven optimal (column generation bound met by the integer master, HiGHS) in {res.seconds:.2f} s"
        else:
            optimal = bound is not None and best >= bound
            status = (
                f"exact search ended without proof after {res.seconds:.2f} s (time limit {time_limit_s:g} s); "
                + (f"upper bound {bound} replicas" if bound is not None else "no bound")
            )
    else:
        status = (
            f"heuristic fill; exact search skipped ({n_vars} model x GPU pairs > {EXACT_MAX_VARS})"
            if not want_exact
            else "heuristic fill; no time left for the exact search"
        )
    if bound is not None and (offload_models or cpu_models):
        status += " (the count covers models that fit whole on a GPU; split and CPU replicas come after)"

    # split and CPU-only models: extra replicas after everything else, then split replicas grow into free room
    _fill(st, offload_models, True)
    for m in cpu_models:
        while st.placed[m] < demands[m].max_replicas and _place_cpu_replica(st, m):
            pass
    _grow_offload(st, offload_models)

    if not q_proven and qsearch == "exhaustive":
        notes.append("quantization search hit the time limit on some combination; the choice may not be optimal")
    if budget.timed_out:
        notes.append(f"the exact search hit its time limit ({time_limit_s:g} s); results are heuristic where noted")

    return _build_plan(
        P, st, reasons, notes, qsearch, min_method, fill_method, optimal, status, bound, t0, set(offload_models),
        set(cpu_models),
    )


def _cpu_replica_error(P: _Problem, st: _State, m: int) -> InfeasiblePlanError:
    d = P.demands[m]
    o = d.options[st.choice[m]]
    ram = int(st.ram.max()) if P.nn else 0
    return InfeasiblePlanError(
        f"model {d.name} fits on no GPU and runs on CPU (offload.cpu_memory {format_bytes(d.offload_cpu_bytes)} covers a "
        f"replica), but its {d.min_replicas} CPU replica(s) need {format_bytes(o.replica_bytes + o.cpu_bytes)} RAM each "
        f"and the most host RAM left on a node is {format_bytes(ram)} (headroom {P.headroom:.0%}); fix: more host RAM, "
        "fewer min_replicas, or a larger GPU",
        details={"model": d.name, "replica_bytes": o.replica_bytes + o.cpu_bytes, "ram_room_bytes": ram},
    )


def _build_plan(
    P, st, reasons, notes, qsearch, min_method, fill_method, optimal, status, bound, t0, offload_models, cpu_models
) -> Plan:
    np = P.np
    demands = P.demands
    gpus_out: list[GpuPlan] = []
    cpu_out: list[CpuReplica] = []
    off_out: list[OffloadReplica] = []
    per_bin_extra: dict[int, list] = {}
    for (m, b, gpu_part, cpu_part, units, n) in st.extra:
        q = demands[m].options[st.choice[m]].quantization
        if b >= 0:
            per_bin_extra.setdefault(b, []).append((m, gpu_part, cpu_part, units))
            off_out.append(
                OffloadReplica(demands[m].name, P.bin_ids[b], P.node_names[n], gpu_part, cpu_part, round(units / RAY_GPU_UNITS, 4), q)
            )
        else:
            cpu_out.append(CpuReplica(demands[m].name, cpu_part, P.node_names[n], q))
    gpu_count = np.zeros(P.nm, dtype=np.int64)
    off_count = np.zeros(P.nm, dtype=np.int64)
    cpu_count = np.zeros(P.nm, dtype=np.int64)
    bins_of_model = [set() for _ in range(P.nm)]
    nodes_of_model = [set() for _ in range(P.nm)]
    num_by_type: list[dict] = [dict() for _ in range(P.nm)]
    if P.mode == "gpu":
        for b, g in enumerate(P.gpus):
            reps: list[GpuReplica] = []
            for m in np.flatnonzero(st.cnt[:, b]).tolist():
                k = int(st.cnt[m, b])
                o = demands[m].options[st.choice[m]]
                ng = round(int(st.units[m, b]) / RAY_GPU_UNITS, 4)
                reps.extend([GpuReplica(demands[m].name, o.replica_bytes, ng, o.quantization, False, o.cpu_bytes)] * k)
                gpu_count[m] += k
                bins_of_model[m].add(b)
                nodes_of_model[m].add(g.node)
                t = P.types[b]
                num_by_type[m][t] = max(num_by_type[m].get(t, 0.0), ng)
            for (m, gpu_part, cpu_part, units) in per_bin_extra.get(b, []):
                o = demands[m].options[st.choice[m]]
                ng = round(units / RAY_GPU_UNITS, 4)
                reps.append(GpuReplica(demands[m].name, gpu_part, ng, o.quantization, True, cpu_part + o.cpu_bytes))
                off_count[m] += 1
                bins_of_model[m].add(b)
                nodes_of_model[m].add(g.node)
                t = P.types[b]
                num_by_type[m][t] = max(num_by_type[m].get(t, 0.0), ng)
            used = int(P.cap[b] - st.rem[b])
            gpus_out.append(
                GpuPlan(
                    g.id,
                    g.name,
                    g.node,
                    g.index,
                    g.gpu_type or P.types[b],
                    g.total_bytes,
                    int(P.cap[b]),
                    used,
                    tuple(reps),
                    int(P.denom[b]),
                )
            )
    else:
        for b in range(P.nb):
            for m in np.flatnonzero(st.cnt[:, b]).tolist():
                k = int(st.cnt[m, b])
                o = demands[m].options[st.choice[m]]
                cpu_out.extend([CpuReplica(demands[m].name, int(st.size[m]), P.node_names[b], o.quantization)] * k)
    for c in cpu_out:
        m = next(i for i, d in enumerate(demands) if d.name == c.model)
        cpu_count[m] += 1
        nodes_of_model[m].add(c.node)
    order = {d.name: i for i, d in enumerate(demands)}
    cpu_out.sort(key=lambda c: (P.node_names.index(c.node), order[c.model]))

    models_out = []
    for m, d in enumerate(demands):
        r = st.choice[m]
        o = d.options[r]
        placed = int(gpu_count[m] + off_count[m] + cpu_count[m])
        why_not = None
        if placed < d.max_replicas:
            why_not = _why_not_max(P, st, m, m in offload_models, m in cpu_models)
        models_out.append(
            ModelPlan(
                name=d.name,
                quantization=o.quantization,
                option_rank=r,
                replica_bytes=o.replica_bytes,
                cpu_bytes=o.cpu_bytes,
                min_replicas=d.min_replicas,
                max_replicas=d.max_replicas,
                placed_replicas=placed,
                gpu_replicas=int(gpu_count[m]),
                offload_replicas=int(off_count[m]),
                cpu_replicas=int(cpu_count[m]),
                gpu_type=d.gpu_type,
                gpus_used=len(bins_of_model[m]),
                nodes_used=len(nodes_of_model[m]),
                num_gpus_by_gpu_type=tuple(sorted(num_by_type[m].items())),
                why_quantization=reasons.get(m, f"{o.quantization}: first preference"),
                why_not_max=why_not,
            )
        )
    for mp in models_out:
        if mp.why_not_max:
            notes.append(f"model {mp.name}: {mp.placed_replicas} of max {mp.max_replicas} replicas; {mp.why_not_max}")
        if mp.placed_replicas >= 2 and mp.gpu_replicas >= 2 and mp.gpus_used == 1 and P.mode == "gpu":
            notes.append(f"model {mp.name}: all {mp.gpu_replicas} GPU replicas share one GPU; one GPU failure takes it down")
    # invariant checks (never over-commit); a violation here is a bug, not user error
    for g in gpus_out:
        assert g.used_bytes <= g.usable_bytes, g
        assert sum(int(round(r.num_gpus * RAY_GPU_UNITS)) for r in g.replicas) <= RAY_GPU_UNITS, g
    assert (st.ram >= 0).all()
    placed = int(sum(mp.placed_replicas for mp in models_out))
    solver = SolverInfo(qsearch, min_method, fill_method, optimal, status, placed, bound, time.perf_counter() - t0)
    return Plan(
        feasible=True,
        mode=P.mode,
        headroom=P.headroom,
        gpu_reserve_bytes=P.reserve if P.mode == "gpu" else 0,
        models=tuple(models_out),
        gpus=tuple(gpus_out),
        cpu_replicas=tuple(cpu_out),
        offload=tuple(off_out),
        notes=tuple(notes),
        solver=solver,
        fraction_basis=P.basis,
    )


def _why_not_max(P: _Problem, st: _State, m: int, offloaded: bool, on_cpu: bool = False) -> str:
    """One line: why model m stopped below max_replicas, with the numbers."""
    np = P.np
    d = P.demands[m]
    o = d.options[st.choice[m]]
    where = "GPU" if P.mode == "gpu" else "node"
    if on_cpu:
        ram = int(st.ram.max()) if P.nn else 0
        return (
            f"a CPU replica needs {format_bytes(o.replica_bytes + o.cpu_bytes)} host RAM, the most left on a node is "
            f"{format_bytes(ram)}"
        )
    elig = np.flatnonzero(P.E[m])
    if elig.size == 0:
        return f"no {where} of type {d.gpu_type} in the cluster"
    size = int(st.size[m])
    b = int(elig[np.argmax(st.rem[elig])])
    room = int(st.rem[b])
    if offloaded:
        need_gpu = P.offload_gpu_bytes(m, st.choice[m])
        return (
            f"a split replica needs >= {format_bytes(need_gpu)} on a GPU and "
            f"{format_bytes(o.replica_bytes - need_gpu + o.cpu_bytes)} host RAM; the most GPU room left is "
            f"{format_bytes(room)} on {P.bin_ids[b]}, the most host RAM {format_bytes(int(st.ram.max()))}"
        )
    if room < size:
        msg = f"{where} {P.bin_ids[b]} has the most room left, {format_bytes(room)}; a replica needs {format_bytes(size)}"
        extra = o.cpu_bytes if P.mode == "cpu" else 0
        lower = [x for x in d.options if x is not o and x.replica_bytes + (x.cpu_bytes if P.mode == "cpu" else 0) <= room]
        if lower:
            x = lower[0]
            msg += f" ({x.quantization}, listed, needs {format_bytes(x.replica_bytes + (x.cpu_bytes if extra else 0))} and would fit)"
        return msg
    fits_bytes = elig[st.rem[elig] >= size]
    if P.mode == "gpu":
        ok_units = fits_bytes[st.rem_units[fits_bytes] >= st.units[m, fits_bytes]]
        if ok_units.size == 0:
            b = int(fits_bytes[0])
            return (
                f"gpu {P.bin_ids[b]} has {format_bytes(int(st.rem[b]))} left but only "
                f"{int(st.rem_units[b]) / RAY_GPU_UNITS:.4f} of its Ray GPU fraction; a replica needs "
                f"{int(st.units[m, b]) / RAY_GPU_UNITS:.4f} (num_gpus rounds up to 1e-4)"
            )
        nodes = np.unique(P.node_of[ok_units])
        if (st.ram[nodes] < st.cpu[m]).all():
            n = int(nodes[np.argmax(st.ram[nodes])])
            return (
                f"the GPUs with room are on nodes whose host RAM is spent: node {P.node_names[n]} has "
                f"{format_bytes(int(st.ram[n]))} left; a replica needs {format_bytes(int(st.cpu[m]))} besides its GPU "
                "memory"
            )
    return "the exact search placed other models' replicas instead (maximum total count)"


# ----------------------------------------------------------------------------------------------------------------
# Infeasibility: numbers and the smallest fix


def _gpu_room_lines(P: _Problem, limit: int = 6) -> list[str]:
    groups: dict = {}
    for b in range(P.nb):
        key = (P.types[b], int(P.total[b]), int(P.cap[b]))
        groups.setdefault(key, []).append(P.bin_ids[b])
    out = []
    for (t, total, cap), ids in list(groups.items())[:limit]:
        if P.mode == "gpu":
            who = f"{ids[0]} ({t})" if len(ids) == 1 else f"{len(ids)} x {t}"
            out.append(f"{who}: {format_bytes(cap)} usable of {format_bytes(total)}" + (" each" if len(ids) > 1 else ""))
        else:
            who = ids[0] if len(ids) == 1 else f"{len(ids)} nodes"
            out.append(f"{who}: {format_bytes(cap)} RAM usable" + (" each" if len(ids) > 1 else ""))
    if len(groups) > limit:
        out.append(f"... {len(groups) - limit} more kinds")
    return out


def _smallest_choice(P: _Problem, fit_ranks: dict, m: int) -> int:
    rs = fit_ranks.get(m) or list(range(len(P.demands[m].options)))
    return min(rs, key=lambda r: (P.demands[m].options[r].replica_bytes, r))


def _feasible_with(P: _Problem, choice, active, use_milp: bool, seconds: float) -> bool:
    status, _, _ = _place_mins(P, choice, active, _Budget(seconds), use_milp=use_milp)
    return status == "feasible"


def _infeasible_error(P: _Problem, fit_ranks: dict, active: list[int], suggest, budget: _Budget) -> InfeasiblePlanError:
    demands = P.demands
    choice = [_smallest_choice(P, fit_ranks, m) for m in range(P.nm)]
    need_lines, model_details = [], []
    total_need = 0
    for m in active:
        d = demands[m]
        o = d.options[choice[m]]
        size = int(P.opt_arrays(m, choice[m])[0])
        total_need += size * d.min_replicas
        pin = f" on {d.gpu_type}" if d.gpu_type and P.mode == "gpu" else ""
        split = ", split: GPU share" if P.offload[m] else ""
        need_lines.append(f"{d.name} {d.min_replicas} x {format_bytes(size)} ({o.quantization}{pin}{split})")
        model_details.append(
            {
                "name": d.name,
                "quantization": o.quantization,
                "replica_bytes": size,
                "min_replicas": d.min_replicas,
                "needs_bytes": size * d.min_replicas,
                "gpu_type": d.gpu_type,
            }
        )
    total_cap = int(P.cap.sum())
    where = "GPUs" if P.mode == "gpu" else "nodes"
    head = (
        f"cannot place every model's minimum replicas: they need {format_bytes(total_need)} at their least-memory "
        f"options, the {P.nb} {where} have {format_bytes(total_cap)} usable "
        f"(headroom {P.headroom:.0%}" + (f", reserve {format_bytes(P.reserve)}/GPU)" if P.mode == "gpu" else ")")
    )
    fixes: list[str] = []
    fix_details: list[dict] = []
    # the fix search shares one time budget; exact checks only on small instances
    fb = _Budget(min(5.0, max(1.0, budget.seconds)))
    small = int(sum(P.E[m].sum() for m in active)) <= EXACT_MAX_VARS

    def ok(P2: _Problem) -> bool:
        exact = small and fb.left() > 0.05
        return _feasible_with(P2, choice, active, exact, min(1.0, fb.left()))

    # biggest consumers first
    by_need = sorted(active, key=lambda m: -int(P.opt_arrays(m, choice[m])[0]) * int(P.min_rep[m]))[:10]
    # 0. a node that mixes GPU sizes is planned against its smallest GPU: say so, with the models it shuts out
    if P.mode == "gpu":
        for text, detail in mixed_node_notes(P, [(demands[m].name, int(P.opt_arrays(m, choice[m])[0]))
                                                  for m in by_need]):
            fixes.append(text)
            fix_details.append(detail)
    # 1. add GPUs like an existing one
    if P.mode == "gpu":
        add = _try_add_gpus(P, ok, max(0, total_need - total_cap), fb)
        if add:
            k, g = add
            fixes.append(
                f"add {'one more GPU' if k == 1 else f'{k} more GPUs'} of {format_bytes(g.total_bytes)} "
                f"({P.types[P.gpus.index(g)]}, like {g.id})"
            )
            fix_details.append({"kind": "add_gpus", "count": k, "total_bytes": g.total_bytes, "like": g.id})
    # 2. lower one model's min_replicas: the largest value that fits (bisection; fewer is always easier)
    for m in by_need:
        d = demands[m]
        if not ok(_with_min(P, m, 0)):
            continue
        lo_k, hi_k = 0, d.min_replicas  # ok(lo_k), not ok(hi_k)
        while hi_k - lo_k > 1:
            mid = (lo_k + hi_k) // 2
            if ok(_with_min(P, m, mid)):
                lo_k = mid
            else:
                hi_k = mid
        fixes.append(f"lower min_replicas of {d.name} from {d.min_replicas} to {lo_k}")
        fix_details.append({"kind": "min_replicas", "model": d.name, "to": lo_k})
    # 3. per-model replica size that would fit (and the caller's suggestion for it)
    for m in by_need:
        if P.offload[m]:
            continue
        room = _room_for(P, choice, active, m)
        d = demands[m]
        o = d.options[choice[m]]
        if room > 0:
            fix_details.append({"kind": "replica_bytes", "model": d.name, "room_bytes": room})
            fixes.append(f"make a replica of {d.name} need <= {format_bytes(room)} (it needs {format_bytes(o.replica_bytes)} at {o.quantization})")
            if suggest is not None:
                s = suggest(d, room)
                if s:
                    fixes.append(f"{d.name}: {s}")
                    fix_details.append({"kind": "suggest", "model": d.name, "text": s})
    if len(need_lines) > 8:
        need_lines = need_lines[:8] + [f"... {len(need_lines) - 8} more models"]
    msg = (
        head
        + "\n  needs: "
        + "; ".join(need_lines)
        + "\n  room:  "
        + "; ".join(_gpu_room_lines(P))
        + ("\n  fix:   " + "; or ".join(fixes[:6]) if fixes else "\n  fix:   " + _fallback_fix(P, total_need, total_cap))
    )
    if budget.timed_out:
        msg += f"\n  note:  the exact search hit its time limit; a placement may exist (raise time_limit_s)"
    details = {
        "models": model_details,
        "gpus": [
            {"id": P.bin_ids[b], "total_bytes": int(P.total[b]), "usable_bytes": int(P.cap[b]), "gpu_type": P.types[b]}
            for b in range(P.nb)
        ],
        "fixes": fix_details,
        "timed_out": budget.timed_out,
    }
    return InfeasiblePlanError(msg, details=details)


def mixed_node_notes(P: _Problem, sizes: list[tuple[str, int]]) -> list[tuple[str, dict]]:
    """For each node whose GPUs differ in size: Ray picks the GPU inside a node, so every replica there is planned
    against the node's smallest basis. The text names the GPU types, the basis, the models (name, replica bytes)
    that need more than it but would fit one of the node's larger GPUs, and the fix."""
    out = []
    nodes: dict[str, list[int]] = {}
    for b, g in enumerate(P.gpus):
        nodes.setdefault(g.node, []).append(b)
    for node, bins in nodes.items():
        caps = {P.types[b]: int(P.cap[b]) for b in bins}
        basis = int(min(P.denom[b] for b in bins))
        if len(set(int(P.cap[b]) for b in bins)) < 2:
            continue
        shut_out = [(n, sz) for n, sz in sizes if basis < sz <= max(caps.values())]
        kinds = " and ".join(f"{t} ({format_bytes(c)} usable)" for t, c in sorted(caps.items(), key=lambda x: x[1]))
        text = (f"node {node} mixes {kinds}; Ray cannot tell its GPUs apart, so every replica there is planned "
                f"against {format_bytes(basis)}")
        if shut_out:
            text += "; " + ", ".join(f"{n} needs {format_bytes(sz)}" for n, sz in shut_out)
        text += (". Fix: run each GPU type as its own Ray node (one pod per GPU type on KubeRay), so the larger "
                 "GPUs are planned at their own size")
        out.append((text, {"kind": "split_mixed_node", "node": node, "basis_bytes": basis,
                           "usable_by_type": caps, "models": [n for n, _ in shut_out]}))
    return out


def _fallback_fix(P: _Problem, need: int, cap: int) -> str:
    """When no single change was found in the time allowed: the byte deficit in GPUs like the largest one."""
    if P.mode == "gpu" and P.nb:
        b = int(P.np.argmax(P.cap))
        per = int(P.cap[b])
        k = max(1, -(-max(0, need - cap) // max(per, 1)))
        return (
            f"add at least {k} GPUs like {P.bin_ids[b]} ({P.types[b]}, {format_bytes(per)} usable each; the minimums "
            f"need {format_bytes(max(0, need - cap))} more than the cluster has), or lower min_replicas"
        )
    return f"add nodes with {format_bytes(max(0, need - cap))} more RAM in all, or lower min_replicas"


def _with_min(P: _Problem, m: int, k: int) -> _Problem:
    import copy

    P2 = copy.copy(P)
    P2.min_rep = P.min_rep.copy()
    P2.min_rep[m] = k
    return P2


def _room_for(P: _Problem, choice, active, m: int) -> int:
    """Largest replica size of model m (others unchanged) with which every minimum fits, by bisection over the
    heuristics (0 when none does). In CPU mode the size includes the option's cpu_bytes."""
    import copy

    d = P.demands[m]
    o = d.options[choice[m]]
    extra = o.cpu_bytes if P.mode == "cpu" else 0
    hi = int(P.cap[P.E[m]].max()) if P.E[m].any() else 0
    hi = min(hi, o.replica_bytes + extra - 1)

    def ok(size: int) -> bool:
        P2 = copy.copy(P)
        opts = list(d.options)
        opts[choice[m]] = QuantOption(o.quantization, max(1, size - extra), o.cpu_bytes)
        P2.demands = list(P.demands)
        P2.demands[m] = ModelDemand(d.name, tuple(opts), d.min_replicas, d.max_replicas, d.offload_cpu_bytes, d.gpu_type)
        return _feasible_with(P2, choice, active, False, 0.0)

    if hi < MiB or not ok(MiB):
        return 0
    lo = MiB
    while hi - lo > MiB:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo // MiB * MiB


def _try_add_gpus(P: _Problem, ok, deficit: int, budget: _Budget, max_factor: int = 4):
    """Fewest GPUs like an existing one that make the minimums fit; among equal counts the smaller GPU. New GPUs go
    on new nodes shaped like the template GPU's node (same GPUs per node, same host RAM). Per kind of GPU (largest
    first): the byte deficit's lower bound, then doubling, then bisection (more GPUs never hurt), within
    ``budget``. ``ok(problem)`` is the feasibility check. Returns (count, template gpu) or None."""
    from dataclasses import replace

    from planner.cluster.inventory import Cluster, Node

    kinds: dict = {}
    for b, g in enumerate(P.gpus):
        kinds.setdefault((P.types[b], g.total_bytes), g)
    node_of = {n.name: n for n in P.cluster.nodes}

    def fits_with(g, t, k) -> bool:
        template = node_of[g.node]
        per_node = max(1, len(template.gpus))
        new_nodes = []
        for start in range(0, k, per_node):
            name = f"new-node-{start // per_node}"
            gpus = tuple(
                replace(g, id=f"{name}/gpu-{i}", node=name, index=i, free_bytes=None, gpu_type=g.gpu_type or t)
                for i in range(min(per_node, k - start))
            )
            new_nodes.append(Node(name, template.cpu_memory_bytes, gpus))
        cl = Cluster(nodes=tuple(P.cluster.nodes) + tuple(new_nodes), source=P.cluster.source)
        try:
            P2 = _Problem(P.demands, cl, P.headroom, P.reserve, P.basis)
        except InputError:
            return False
        P2.min_rep = P.min_rep
        P2.offload = P.offload.copy()
        return ok(P2)

    best = None
    for (t, total), g in sorted(kinds.items(), key=lambda kv: -kv[0][1]):
        if budget.left() <= 0:
            break
        cap = usable_gpu_bytes(replace(g, free_bytes=None), headroom=P.headroom, gpu_reserve_bytes=P.reserve)
        if cap <= 0:
            continue
        lo = max(1, -(-deficit // cap))  # fewer than this cannot hold the missing bytes
        limit = max_factor * max(P.nb, 1) + 64
        if best is not None:
            limit = min(limit, best[0])
        hi = lo
        while hi <= limit and budget.left() > 0 and not fits_with(g, t, hi):
            lo = hi + 1
            hi = hi * 2
        if hi > limit or budget.left() <= 0:
            continue
        while lo < hi and budget.left() > 0:  # fits_with(hi) holds; find the least
            mid = (lo + hi) // 2
            if fits_with(g, t, mid):
                hi = mid
            else:
                lo = mid + 1
        if best is None or (hi, total) < (best[0], best[1].total_bytes):
            best = (hi, g)
    return best


def _fits_nowhere_error(P: _Problem, hard: list[int], suggest) -> InfeasiblePlanError:
    lines, details = [], []
    for m in hard:
        d = P.demands[m]
        o = min(d.options, key=lambda x: x.replica_bytes)
        size = o.replica_bytes + (o.cpu_bytes if P.mode == "cpu" else 0)
        elig = P.E[m]
        if P.mode == "gpu" and not elig.any():
            have = sorted(set(P.types))
            lines.append(
                f"model {d.name} ({d.min_replicas} x {format_bytes(size)} at {o.quantization}) is pinned to gpu_type "
                f"{d.gpu_type} but the cluster has none (types: {', '.join(have)}); fix: remove the pin or add a GPU "
                f"of type {d.gpu_type}"
            )
            details.append({"name": d.name, "reason": "no_gpu_of_type", "gpu_type": d.gpu_type, "types": have})
            continue
        largest = int(P.cap[elig].max())
        b = int(P.np.flatnonzero(elig)[P.np.argmax(P.cap[elig])])
        if P.mode == "gpu":
            need_total = math.ceil((size + P.reserve) / (1.0 - P.headroom))
            fix = [f"a GPU of >= {format_bytes(need_total)} total"]
            split_need = max(size - largest, 0)
            if d.offload_cpu_bytes == 0:
                fix.append(f"set offload.cpu_memory >= {format_bytes(split_need)} to split it GPU+CPU")
            elif d.offload_cpu_bytes < split_need:
                fix.append(
                    f"raise offload.cpu_memory from {format_bytes(d.offload_cpu_bytes)} to >= {format_bytes(split_need)}"
                )
            ram_n = int(P.node_of[b])
            if o.cpu_bytes > int(P.ram_cap[ram_n]) and largest >= size:
                lines.append(
                    f"model {d.name}: a replica needs {format_bytes(o.cpu_bytes)} host RAM besides, node "
                    f"{P.node_names[ram_n]} has {format_bytes(int(P.ram_cap[ram_n]))} usable; fix: more host RAM"
                )
                details.append({"name": d.name, "reason": "host_ram", "cpu_bytes": o.cpu_bytes})
                continue
            s = suggest(d, largest) if suggest is not None else None
            if s:
                fix.append(s)
            lines.append(
                f"model {d.name} fits on no GPU: its least-memory option {o.quantization} needs "
                f"{format_bytes(size)} per replica, the largest usable GPU is {P.bin_ids[b]} with "
                f"{format_bytes(largest)} ({format_bytes(int(P.total[b]))} total, headroom {P.headroom:.0%}, reserve "
                f"{format_bytes(P.reserve)}); fix: " + "; or ".join(fix)
            )
        else:
            fix = [f"a node with >= {format_bytes(math.ceil(size / (1.0 - P.headroom)))} RAM"]
            s = suggest(d, largest) if suggest is not None else None
            if s:
                fix.append(s)
            lines.append(
                f"model {d.name} fits on no node: a CPU replica ({o.quantization}) needs {format_bytes(size)}, the "
                f"largest node {P.bin_ids[b]} has {format_bytes(largest)} RAM usable; fix: " + "; or ".join(fix)
            )
        details.append(
            {"name": d.name, "reason": "too_large", "replica_bytes": size, "largest_room_bytes": largest, "bin": P.bin_ids[b]}
        )
    return InfeasiblePlanError("\n".join(lines), details={"models": details, "fixes": [], "timed_out": False})
