"""Property tests for the placement planner, checked against brute force on small instances
(<= 3 GPUs, <= 3 models, <= 3 replicas each).

Sizes are drawn on a 256 MiB grid, like the memory model's outputs (rounded to MiB), which makes exact fits -- the
hard cases -- common.
"""

from __future__ import annotations

import itertools
import json
import math
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.errors import InfeasiblePlanError
from planner.cluster.inventory import Cluster, Gpu, Node
from planner.placement.packing import RAY_GPU_UNITS, ModelDemand, QuantOption, plan, ray_gpu_units, usable_gpu_bytes
from planner.units import GiB, MiB

GRID = 256 * MiB
TYPES = ["A10G", "L4"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def clusters(draw, max_gpus=3, cpu_only=False):
    n_nodes = draw(st.integers(1, 2))
    rams = [draw(st.sampled_from([2, 4, 8, 64])) * GiB for _ in range(n_nodes)]
    if cpu_only:
        return Cluster(nodes=tuple(Node(f"n{i}", rams[i]) for i in range(n_nodes)))
    n_gpus = draw(st.integers(1, max_gpus))
    per_node: dict[int, list] = {i: [] for i in range(n_nodes)}
    for _ in range(n_gpus):
        node = draw(st.integers(0, n_nodes - 1))
        total = draw(st.integers(8, 64)) * GRID  # 2-16 GiB
        t = draw(st.sampled_from(TYPES))
        idx = len(per_node[node])
        per_node[node].append(
            Gpu(id=f"n{node}/gpu-{idx}", name=f"NVIDIA {t}", total_bytes=total, node=f"n{node}", index=idx, gpu_type=t)
        )
    return Cluster(nodes=tuple(Node(f"n{i}", rams[i], tuple(per_node[i])) for i in range(n_nodes)))


@st.composite
def demands(draw, max_models=3, max_rep=3, pins=True, cpu=True):
    n = draw(st.integers(1, max_models))
    out = []
    for i in range(n):
        k = draw(st.integers(1, 2))
        sizes = sorted({draw(st.integers(1, 40)) * GRID for _ in range(k)}, reverse=True)
        cpu_b = draw(st.sampled_from([0, 0, 0, 512 * MiB, GiB])) if cpu else 0
        opts = tuple(QuantOption(q, s, cpu_b) for q, s in zip(["bf16", "int4"], sizes))
        mn = draw(st.integers(0, max_rep))
        mx = draw(st.integers(mn, max_rep))
        pin = draw(st.sampled_from([None, None, *TYPES])) if pins else None
        out.append(ModelDemand(f"m{i}", opts, mn, mx, gpu_type=pin))
    return out


knobs = st.tuples(st.sampled_from([0.0, 0.05, 0.10]), st.sampled_from([0, 256 * MiB, 512 * MiB]))


# --- brute force -------------------------------------------------------------------------------------------------


def _bins(cluster, headroom, reserve):
    gpus = list(cluster.gpus)
    caps = [usable_gpu_bytes(g, headroom=headroom, gpu_reserve_bytes=reserve) for g in gpus]
    ram = {n.name: math.floor(n.cpu_memory_bytes * (1 - headroom)) for n in cluster.nodes}
    return gpus, caps, ram


def _node_min(gpus, value) -> dict:
    """Per node, the smallest ``value(gpu)`` of its GPUs: Ray may put a fractional request on any GPU of the node,
    so one node's GPUs share the fraction basis of its smallest."""
    out: dict = {}
    for g in gpus:
        out[g.node] = min(value(g), out.get(g.node, value(g)))
    return out


def _eligible(d, g):
    return d.gpu_type is None or d.gpu_type.upper() == g.gpu_type.upper()


def _fits(layout, demands, choice, gpus, caps, ram):
    """layout[m][b] replicas of model m on gpu b: bytes, Ray units and node RAM all within limits."""
    used_ram = {k: 0 for k in ram}
    basis = _node_min(gpus, lambda g: g.total_bytes)
    for b, g in enumerate(gpus):
        used = units = 0
        for m, d in enumerate(demands):
            k = layout[m][b]
            if k == 0:
                continue
            if not _eligible(d, g):
                return False
            o = d.options[choice[m]]
            used += k * o.replica_bytes
            units += k * ray_gpu_units(o.replica_bytes, basis[g.node])
            used_ram[g.node] += k * o.cpu_bytes
        if used > caps[b] or units > RAY_GPU_UNITS:
            return False
    return all(used_ram[k] <= ram[k] for k in ram)


def _splits(total, parts):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _splits(total - first, parts - 1):
            yield (first,) + rest


def brute_min_feasible(demands, cluster, headroom, reserve) -> bool:
    gpus, caps, ram = _bins(cluster, headroom, reserve)
    for choice in itertools.product(*[range(len(d.options)) for d in demands]):
        per_model = [list(_splits(d.min_replicas, len(gpus))) for d in demands]
        for layout in itertools.product(*per_model):
            if _fits(layout, demands, choice, gpus, caps, ram):
                return True
    return False


def brute_max_placed(demands, cluster, headroom, reserve, choice) -> int:
    gpus, caps, ram = _bins(cluster, headroom, reserve)
    per_model = [
        [s for k in range(d.min_replicas, d.max_replicas + 1) for s in _splits(k, len(gpus))] for d in demands
    ]
    best = -1
    for layout in itertools.product(*per_model):
        n = sum(sum(x) for x in layout)
        if n > best and _fits(layout, demands, choice, gpus, caps, ram):
            best = n
    return best


def assert_never_overcommitted(p, cluster, headroom, reserve):
    gpus, caps, ram = _bins(cluster, headroom, reserve)
    used_ram = {k: 0 for k in ram}
    by_name = {d.name: d for d in p.models}
    total_basis = _node_min(gpus, lambda g: g.total_bytes)
    usable_basis = _node_min(gpus, lambda g: max(1, math.floor(g.total_bytes * (1 - headroom)) - reserve))
    for g, src, cap in zip(p.gpus, gpus, caps):
        assert g.id == src.id and g.usable_bytes == cap
        assert sum(r.bytes for r in g.replicas) == g.used_bytes <= cap
        units = sum(round(r.num_gpus * RAY_GPU_UNITS) for r in g.replicas)
        assert units <= RAY_GPU_UNITS and sum(r.num_gpus for r in g.replicas) <= 1.0 + 1e-9
        for r in g.replicas:
            if p.fraction_basis == "total":
                assert g.ray_basis_bytes == total_basis[g.node]
            else:
                assert g.ray_basis_bytes == usable_basis[g.node]
            assert r.num_gpus == round(ray_gpu_units(r.bytes, g.ray_basis_bytes) / RAY_GPU_UNITS, 4)
            used_ram[g.node] += by_name[r.model].cpu_bytes
    for c in p.cpu_replicas:
        used_ram[c.node] += c.bytes
    assert all(used_ram[k] <= ram[k] for k in ram), (used_ram, ram)


# --- properties --------------------------------------------------------------------------------------------------


@settings(max_examples=70, **SETTINGS)
@given(clusters(), demands(), knobs)
def test_planner_finds_a_placement_exactly_when_brute_force_does(cluster, ds, kn):
    headroom, reserve = kn
    expect = brute_min_feasible(ds, cluster, headroom, reserve)
    try:
        p = plan(ds, cluster, headroom=headroom, gpu_reserve_bytes=reserve)
    except InfeasiblePlanError as e:
        assert not expect, f"brute force placed every minimum, planner said: {e}"
        msg = str(e)
        assert re.search(r"\d", msg) and re.search(r"\d+\.\d (GiB|MiB|KiB)", msg), msg
        return
    assert expect, "planner placed what brute force says cannot be placed"
    assert p.feasible
    assert_never_overcommitted(p, cluster, headroom, reserve)
    for m, d in zip(p.models, ds):
        assert m.min_replicas <= m.placed_replicas <= m.max_replicas
        assert m.placed_replicas == m.gpu_replicas  # no offload asked for
        if d.gpu_type:
            for g in p.gpus:
                if any(r.model == d.name for r in g.replicas):
                    assert g.gpu_type.upper() == d.gpu_type.upper()
    json.dumps(p.to_json())


@settings(max_examples=35, **SETTINGS)
@given(clusters(max_gpus=2), demands(max_models=2, max_rep=3), knobs)
def test_proven_optimal_fill_matches_brute_force_maximum(cluster, ds, kn):
    headroom, reserve = kn
    try:
        p = plan(ds, cluster, headroom=headroom, gpu_reserve_bytes=reserve, exact=True)
    except InfeasiblePlanError:
        return
    choice = [m.option_rank for m in p.models]
    best = brute_max_placed(ds, cluster, headroom, reserve, choice)
    assert p.solver.placed <= best
    if p.solver.optimal:
        assert p.solver.placed == best, (p.solver, best)


@settings(max_examples=30, **SETTINGS)
@given(clusters(cpu_only=True), demands(pins=True), st.sampled_from([0.0, 0.1]))
def test_cpu_only_cluster_every_replica_on_cpu_within_ram(cluster, ds, headroom):
    try:
        p = plan(ds, cluster, headroom=headroom)
    except InfeasiblePlanError as e:
        assert re.search(r"\d+\.\d (GiB|MiB)", str(e))
        return
    assert p.mode == "cpu" and p.gpus == ()
    per_node: dict = {}
    for c in p.cpu_replicas:
        per_node[c.node] = per_node.get(c.node, 0) + c.bytes
    for n in cluster.nodes:
        assert per_node.get(n.name, 0) <= math.floor(n.cpu_memory_bytes * (1 - headroom))
    for m in p.models:
        assert m.cpu_replicas == m.placed_replicas and m.min_replicas <= m.placed_replicas <= m.max_replicas
        o = next(o for o in ds[[d.name for d in ds].index(m.name)].options if o.quantization == m.quantization)
        assert all(c.bytes == o.replica_bytes + o.cpu_bytes for c in p.cpu_replicas if c.model == m.name)


@settings(max_examples=30, **SETTINGS)
@given(clusters(), demands(max_rep=3, cpu=False), knobs, st.sampled_from(["total", "usable"]))
def test_pinned_models_only_land_on_their_gpu_type(cluster, ds, kn, basis):
    headroom, reserve = kn
    try:
        p = plan(ds, cluster, headroom=headroom, gpu_reserve_bytes=reserve, fraction_basis=basis)
    except InfeasiblePlanError:
        return
    pins = {d.name: d.gpu_type for d in ds if d.gpu_type}
    for g in p.gpus:
        for r in g.replicas:
            if r.model in pins:
                assert g.gpu_type.upper() == pins[r.model].upper()
    assert_never_overcommitted(p, cluster, headroom, reserve)


@settings(max_examples=25, **SETTINGS)
@given(clusters(), demands(max_rep=3), knobs)
def test_split_offload_models_never_overcommit(cluster, ds, kn):
    headroom, reserve = kn
    # let every model spill up to 32 GiB to host RAM when it fits no GPU
    ds = [ModelDemand(d.name, d.options, d.min_replicas, d.max_replicas, 32 * GiB, d.gpu_type) for d in ds]
    big = ModelDemand("big", (QuantOption("int4", 40 * GiB),), 1, 2, offload_cpu_bytes=39 * GiB)
    try:
        p = plan(ds + [big], cluster, headroom=headroom, gpu_reserve_bytes=reserve)
    except InfeasiblePlanError as e:
        assert re.search(r"\d+\.\d (GiB|MiB)", str(e))
        return
    gpus, caps, ram = _bins(cluster, headroom, reserve)
    for g, cap in zip(p.gpus, caps):
        assert sum(r.bytes for r in g.replicas) == g.used_bytes <= cap
        assert sum(round(r.num_gpus * RAY_GPU_UNITS) for r in g.replicas) <= RAY_GPU_UNITS
    used_ram = {k: 0 for k in ram}
    for g in p.gpus:
        for r in g.replicas:
            used_ram[g.node] += r.cpu_bytes
    for c in p.cpu_replicas:
        used_ram[c.node] += c.bytes
    assert all(used_ram[k] <= ram[k] for k in ram)
    for o in p.offload:
        d = next(d for d in ds + [big] if d.name == o.model)
        assert o.cpu_bytes <= d.offload_cpu_bytes and o.gpu_bytes + o.cpu_bytes == p.model(o.model).replica_bytes
    for m in p.models:
        assert m.min_replicas <= m.placed_replicas <= m.max_replicas
