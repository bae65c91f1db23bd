"""Hand-made placement instances: bin-packing traps, quantization choice, anti-affinity, offload, CPU-only,
Ray fractions, error messages."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest

from planner.errors import InfeasiblePlanError, InputError
from planner.cluster.inventory import Cluster, Gpu, Node
from planner.placement.packing import (
    DEFAULT_GPU_RESERVE,
    RAY_GPU_UNITS,
    ModelDemand,
    Plan,
    QuantOption,
    _place_min_heuristic,
    _Problem,
    _State,
    num_gpus_for,
    plan,
    ray_gpu_units,
    usable_gpu_bytes,
)
from planner.output.plan_report import render_svg, render_text
from planner.units import GiB, MiB


def gpus_on(node: str, totals, gpu_type="A10G", free=None):
    return tuple(
        Gpu(
            id=f"{node}/gpu-{i}",
            name=f"NVIDIA {gpu_type}",
            total_bytes=t,
            node=node,
            index=i,
            gpu_type=gpu_type,
            free_bytes=None if free is None else free[i],
        )
        for i, t in enumerate(totals)
    )


def cluster(*nodes):
    """nodes: (name, totals, gpu_type[, ram])"""
    out = []
    for spec in nodes:
        name, totals, t = spec[:3]
        ram = spec[3] if len(spec) > 3 else 256 * GiB
        out.append(Node(name, ram, gpus_on(name, totals, t)))
    return Cluster(nodes=tuple(out))


def one(name, size, mn=1, mx=None, **kw):
    return ModelDemand(name, (QuantOption("bf16", size),), mn, mn if mx is None else mx, **kw)


def check_invariants(p: Plan, c: Cluster, headroom, reserve):
    for g, src in zip(p.gpus, c.gpus):
        assert g.usable_bytes == usable_gpu_bytes(src, headroom=headroom, gpu_reserve_bytes=reserve)
        assert sum(r.bytes for r in g.replicas) == g.used_bytes <= g.usable_bytes
        assert sum(round(r.num_gpus * RAY_GPU_UNITS) for r in g.replicas) <= RAY_GPU_UNITS
        for r in g.replicas:
            assert r.num_gpus == num_gpus_for(r.bytes, g.ray_basis_bytes)
    for m in p.models:
        assert m.min_replicas <= m.placed_replicas <= m.max_replicas


# --- capacity arithmetic -----------------------------------------------------------------------------------------


def test_usable_bytes_formula_and_probed_free_cap():
    g = Gpu("g", "NVIDIA A10G", 24 * GiB)
    assert usable_gpu_bytes(g, headroom=0.10, gpu_reserve_bytes=512 * MiB) == int(24 * GiB * 0.9) - 512 * MiB
    # probed: 10 GiB used by something else -> free - ceil(total * headroom)
    g2 = dataclasses.replace(g, free_bytes=14 * GiB)
    assert usable_gpu_bytes(g2, headroom=0.10, gpu_reserve_bytes=512 * MiB) == 14 * GiB - -(-24 * GiB // 10)
    # an idle probed GPU is never planned above the declared formula
    g3 = dataclasses.replace(g, free_bytes=24 * GiB - 200 * MiB)
    assert usable_gpu_bytes(g3) == usable_gpu_bytes(g)
    assert usable_gpu_bytes(dataclasses.replace(g, free_bytes=0)) == 0
    assert DEFAULT_GPU_RESERVE == 512 * MiB


def test_num_gpus_rounds_up_to_1e4():
    assert ray_gpu_units(1, 24 * GiB) == 1
    assert num_gpus_for(6 * GiB, 24 * GiB) == 0.25
    assert num_gpus_for(6 * GiB + 1, 24 * GiB) == 0.2501
    assert num_gpus_for(8 * GiB, 24 * GiB) == 0.3334  # 1/3 rounds up, never down


def test_rounding_that_pushes_a_gpu_over_one_means_no_fit():
    # three replicas of exactly 1/3 of the GPU fit in bytes (headroom 0, reserve 0) but 3 x 0.3334 > 1
    total = 3 * GiB
    c = cluster(("n", [total], "A10G"))
    p = plan([one("a", GiB, 1, 3)], c, headroom=0.0, gpu_reserve_bytes=0)
    assert p.model("a").placed_replicas == 2
    assert "Ray GPU fraction" in p.model("a").why_not_max
    check_invariants(p, c, 0.0, 0)


# --- bin-packing traps --------------------------------------------------------------------------------------------


def _trap(sizes_gib, bins, usable_gib):
    # total = usable + 1 GiB reserve, headroom 0, so usable is exact
    c = cluster(("n", [(usable_gib + 1) * GiB] * bins, "A10G"))
    demands = [one(f"m{i}", s * GiB) for i, s in enumerate(sizes_gib)]
    return c, demands


@pytest.mark.parametrize(
    "sizes,bins,usable",
    [
        ([5, 5, 4, 4, 3, 3], 2, 12),  # FFD: {5,5} {4,4,3} and a 3 left over; exact: {5,4,3} twice
        ([3, 3, 3, 3, 2, 2, 2, 2], 2, 10),  # FFD: {3,3,3} {3,2,2,2} and a 2 left over; exact: {3,3,2,2} twice
        ([7, 6, 5, 4, 3, 2, 2, 1], 2, 15),  # FFD: {7,6,2} {5,4,3,2,1}: fits; sanity case
    ],
)
def test_bin_packing_traps_are_solved_exactly(sizes, bins, usable):
    c, demands = _trap(sizes, bins, usable)
    p = plan(demands, c, headroom=0.0, gpu_reserve_bytes=GiB)
    assert all(m.placed_replicas == 1 for m in p.models)
    check_invariants(p, c, 0.0, GiB)


def test_best_fit_decreasing_really_fails_on_the_trap():
    c, demands = _trap([5, 5, 4, 4, 3, 3], 2, 12)
    P = _Problem(demands, c, 0.0, GiB)
    st = _State(P, [0] * len(demands))
    assert not _place_min_heuristic(st, list(range(len(demands))), spread=False)
    p = plan(demands, c, headroom=0.0, gpu_reserve_bytes=GiB)
    assert p.solver.min_placement == "exact"
    layouts = sorted(sorted(r.bytes // GiB for r in g.replicas) for g in p.gpus)
    assert layouts == [[3, 4, 5], [3, 4, 5]]


def test_triplets_every_gpu_exactly_full():
    # 4 GPUs, each cut into three pieces between 1/4 and 1/2 of its usable memory, shuffled
    usable = 12 * GiB
    pieces = [[4.5, 4.25, 3.25], [5.5, 3.5, 3.0], [4.75, 4.0, 3.25], [5.25, 3.75, 3.0]]
    sizes = [int(x * GiB) for trip in pieces for x in trip]
    order = [5, 0, 11, 3, 8, 1, 10, 6, 2, 9, 4, 7]
    demands = [one(f"t{i}", sizes[k]) for i, k in enumerate(order)]
    c = cluster(("n", [usable + GiB] * 4, "A10G"))
    p = plan(demands, c, headroom=0.0, gpu_reserve_bytes=GiB)
    assert all(g.used_bytes == usable for g in p.gpus)
    check_invariants(p, c, 0.0, GiB)


# --- quantization ------------------------------------------------------------------------------------------------


def test_quantization_minimises_sum_of_preference_ranks():
    a = ModelDemand("a", (QuantOption("bf16", 10 * GiB), QuantOption("int4", 4 * GiB)), 1, 1)
    b = ModelDemand(
        "b", (QuantOption("bf16", 10 * GiB), QuantOption("int8", 6 * GiB), QuantOption("int4", 4 * GiB)), 1, 1
    )
    c = cluster(("n", [17 * GiB], "A10G"))
    p = plan([a, b], c, headroom=0.0, gpu_reserve_bytes=GiB)
    # rank sums: (0,0) does not fit; (0,1) = 10 + 6 = 16 fits, preferred over (1,0) by model order
    assert (p.model("a").quantization, p.model("b").quantization) == ("bf16", "int8")
    assert p.solver.quantization_search == "exhaustive"
    assert "bf16" in p.model("b").why_quantization and "do not fit" in p.model("b").why_quantization
    assert p.model("a").why_quantization.startswith("bf16: first preference")


def test_tie_on_rank_sum_keeps_the_earlier_models_preference():
    a = ModelDemand("a", (QuantOption("bf16", 10 * GiB), QuantOption("int4", 4 * GiB)), 1, 1)
    b = ModelDemand("b", (QuantOption("bf16", 10 * GiB), QuantOption("int4", 4 * GiB)), 1, 1)
    p = plan([a, b], cluster(("n", [15 * GiB], "A10G")), headroom=0.0, gpu_reserve_bytes=GiB)
    assert (p.model("a").quantization, p.model("b").quantization) == ("bf16", "int4")


def test_greedy_quantization_on_many_models():
    opts = (QuantOption("bf16", 16 * GiB), QuantOption("int8", 9 * GiB), QuantOption("int4", 5 * GiB))
    demands = [ModelDemand(f"m{i}", opts, 1, 2) for i in range(8)]  # 3**8 combinations: greedy
    c = cluster(("n0", [24 * GiB] * 4, "A10G"), ("n1", [24 * GiB] * 2, "A10G"))
    p = plan(demands, c)
    assert p.solver.quantization_search == "greedy"
    assert sum(m.option_rank for m in p.models) > 0
    check_invariants(p, c, 0.10, DEFAULT_GPU_RESERVE)
    assert all("do not fit" in m.why_quantization or "first preference" in m.why_quantization for m in p.models)


def test_max_not_reached_names_a_listed_lower_bit_option_that_would_fit():
    m = ModelDemand("m", (QuantOption("bf16", 15 * GiB), QuantOption("int4", 4 * GiB)), 1, 2)
    p = plan([m], cluster(("n", [21 * GiB], "A10G")), headroom=0.0, gpu_reserve_bytes=GiB)
    assert p.model("m").quantization == "bf16" and p.model("m").placed_replicas == 1
    assert "5.0 GiB" in p.model("m").why_not_max and "int4" in p.model("m").why_not_max


# --- fill and spreading ------------------------------------------------------------------------------------------


def test_replicas_spread_across_nodes_then_gpus():
    c = cluster(("n0", [24 * GiB] * 2, "A10G"), ("n1", [24 * GiB] * 2, "A10G"))
    p = plan([one("a", 5 * GiB, 2, 4)], c)
    per_gpu = [sum(r.model == "a" for r in g.replicas) for g in p.gpus]
    assert per_gpu == [1, 1, 1, 1]
    assert p.model("a").nodes_used == 2 and p.model("a").gpus_used == 4


def test_fill_maximises_total_replicas_and_proves_it():
    c = cluster(("n", [11 * GiB], "A10G"))
    small = one("small", GiB, 0, 10)
    big = one("big", 9 * GiB, 0, 1)
    p = plan([big, small], c, headroom=0.0, gpu_reserve_bytes=GiB)
    assert p.model("small").placed_replicas == 10 and p.model("big").placed_replicas == 0
    assert p.solver.optimal is True and p.solver.placed == 10


def test_exact_fill_beats_greedy_and_is_proven():
    # six optional single-replica models 3,3,4,4,5,5 GiB on two GPUs of 12 GiB usable: smallest-first best fit
    # packs {3,3,4} {4,5} and the last 5 no longer fits (5 placed); the exact fill finds {3,4,5} twice (6)
    c = cluster(("n", [13 * GiB] * 2, "A10G"))
    demands = [one(f"m{i}", s * GiB, 0, 1) for i, s in enumerate([3, 3, 4, 4, 5, 5])]
    p = plan(demands, c, headroom=0.0, gpu_reserve_bytes=GiB)
    assert p.solver.placed == 6 and p.solver.fill == "exact" and p.solver.optimal is True
    assert p.solver.gap == 0 and p.to_json()["solver"]["gap"] == 0
    p2 = plan(demands, c, headroom=0.0, gpu_reserve_bytes=GiB, exact=False)
    assert p2.solver.placed == 5 and p2.solver.optimal is None
    assert p2.solver.gap == (None if p2.solver.bound is None else p2.solver.bound - 5)
    check_invariants(p, c, 0.0, GiB)


def test_host_ram_limits_replicas_per_node():
    c = cluster(("n", [80 * GiB] * 2, "A100-80GB", 10 * GiB))  # 9 GiB usable RAM
    m = ModelDemand("m", (QuantOption("bf16", 4 * GiB, cpu_bytes=2 * GiB),), 1, 10)
    p = plan([m], c)
    assert p.model("m").placed_replicas == 4  # 4 x 2 GiB <= 9 GiB of host RAM
    assert "host RAM" in p.model("m").why_not_max


# --- pins, heterogeneity, probes ---------------------------------------------------------------------------------


def test_pinned_gpu_type_is_respected_and_num_gpus_per_type():
    c = Cluster(
        nodes=(
            Node("a", 256 * GiB, gpus_on("a", [23028 * MiB] * 2, "A10G")),
            Node("b", 256 * GiB, gpus_on("b", [81920 * MiB] * 1, "A100-80GB")),
        )
    )
    pinned = one("pinned", 8 * GiB, 1, 6, gpu_type="a10g")
    free = one("free", 8 * GiB, 1, 12)
    p = plan([pinned, free], c)
    for g in p.gpus:
        if g.gpu_type != "A10G":
            assert all(r.model != "pinned" for r in g.replicas)
    assert dict(p.model("free").num_gpus_by_gpu_type).keys() == {"A10G", "A100-80GB"}
    assert not any("one per GPU type" in n for n in p.notes)  # serve/ deploys per node: nothing to warn about
    check_invariants(p, c, 0.10, DEFAULT_GPU_RESERVE)


def test_pin_to_a_missing_type_is_an_infeasible_plan_with_the_types():
    c = cluster(("n", [24 * GiB], "A10G"))
    with pytest.raises(InfeasiblePlanError) as e:
        plan([one("m", GiB, 1, 1, gpu_type="L4")], c)
    assert "L4" in str(e.value) and "A10G" in str(e.value)


def test_probed_free_memory_shrinks_the_plan_and_says_so():
    gpus = gpus_on("n", [24 * GiB, 24 * GiB], "A10G", free=[8 * GiB, 24 * GiB - 300 * MiB])
    c = Cluster(nodes=(Node("n", 64 * GiB, gpus),))
    p = plan([one("m", 5 * GiB, 1, 8)], c)
    assert p.gpus[0].usable_bytes < 6 * GiB
    assert sum(r.model == "m" for r in p.gpus[0].replicas) == 1
    assert any("probed free memory" in n and "n/gpu-0" in n for n in p.notes)


# --- offload and CPU ---------------------------------------------------------------------------------------------


def test_model_too_big_for_any_gpu_is_split_gpu_cpu():
    c = cluster(("n", [24 * GiB, 24 * GiB], "A10G", 128 * GiB))
    big = ModelDemand("big", (QuantOption("int4", 40 * GiB),), 1, 1, offload_cpu_bytes=30 * GiB)
    small = one("small", 4 * GiB, 1, 2)
    p = plan([big, small], c)
    assert len(p.offload) == 1
    o = p.offload[0]
    assert o.gpu_bytes + o.cpu_bytes == 40 * GiB and o.cpu_bytes <= 30 * GiB and o.gpu_bytes >= 10 * GiB
    g = next(g for g in p.gpus if g.id == o.gpu)
    assert any(r.offload and r.model == "big" for r in g.replicas)
    assert p.model("big").offload_replicas == 1 and p.model("big").placed_replicas == 1
    assert "split" in p.model("big").why_quantization
    check_invariants(p, c, 0.10, DEFAULT_GPU_RESERVE)


def test_offload_too_small_to_split_is_infeasible_with_the_fix():
    c = cluster(("n", [24 * GiB], "A10G"))
    big = ModelDemand("big", (QuantOption("int4", 40 * GiB),), 1, 1, offload_cpu_bytes=5 * GiB)
    with pytest.raises(InfeasiblePlanError) as e:
        plan([big], c)
    assert "raise offload.cpu_memory" in str(e.value) and "GiB" in str(e.value)


def test_model_runs_on_cpu_when_offload_covers_it_and_no_gpu_can_hold_a_share():
    tiny = Cluster(nodes=(Node("n", 64 * GiB, gpus_on("n", [GiB], "T4")),))  # < 1 GiB usable
    m = ModelDemand("m", (QuantOption("bf16", 6 * GiB, cpu_bytes=GiB),), 1, 3, offload_cpu_bytes=8 * GiB)
    p = plan([m], tiny)
    assert p.model("m").cpu_replicas == 3 and all(c.bytes == 7 * GiB for c in p.cpu_replicas)


def test_cpu_only_cluster_packs_against_node_ram():
    c = Cluster(nodes=(Node("c0", 64 * GiB), Node("c1", 32 * GiB)))
    m = ModelDemand("m", (QuantOption("bf16", 16 * GiB, cpu_bytes=2 * GiB),), 2, 10, gpu_type="A10G")
    p = plan([m], c)
    assert p.mode == "cpu" and not p.gpus
    assert p.model("m").cpu_replicas == p.model("m").placed_replicas == 4  # 57.6 GiB -> 3 x 18, 28.8 -> 1 x 18
    per_node = {}
    for r in p.cpu_replicas:
        per_node[r.node] = per_node.get(r.node, 0) + r.bytes
    assert per_node["c0"] <= int(64 * GiB * 0.9) and per_node["c1"] <= int(32 * GiB * 0.9)
    assert any("CPU replica" in n for n in p.notes) and any("pin ignored" in n for n in p.notes)


# --- errors ------------------------------------------------------------------------------------------------------


def test_infeasible_message_has_needs_room_and_smallest_fixes():
    c = cluster(("n", [24 * GiB] * 2, "A10G"))
    demands = [
        ModelDemand("big", (QuantOption("bf16", 20 * GiB), QuantOption("int8", 15 * GiB)), 3, 3),
        one("b2", 10 * GiB, 2, 3),
    ]
    asked = []

    def suggest(d, room):
        asked.append((d.name, room))
        return f"lower max_model_len of {d.name} to 2048"

    with pytest.raises(InfeasiblePlanError) as e:
        plan(demands, c, suggest=suggest)
    msg = str(e.value)
    assert "15.0 GiB" in msg and "int8" in msg  # needs at the least-memory option
    assert "21.1 GiB usable of 24.0 GiB" in msg  # room per GPU
    assert "add 2 more GPUs of 24.0 GiB" in msg
    assert "lower min_replicas of big from 3 to 1" in msg
    assert "lower max_model_len of big to 2048" in msg
    assert asked and asked[0][0] == "big" and 0 < asked[0][1] < 15 * GiB
    kinds = {f["kind"] for f in e.value.details["fixes"]}
    assert {"add_gpus", "min_replicas", "replica_bytes", "suggest"} <= kinds
    assert e.value.details["models"][0]["replica_bytes"] == 15 * GiB
    assert e.value.exit_code == 3


def test_fits_on_no_gpu_message():
    c = cluster(("n", [24 * GiB], "A10G"))
    with pytest.raises(InfeasiblePlanError) as e:
        plan([one("huge", 30 * GiB)], c, suggest=lambda d, room: "use a 4-bit checkpoint")
    msg = str(e.value)
    assert "fits on no GPU" in msg and "30.0 GiB" in msg and "21.1 GiB" in msg
    assert "offload.cpu_memory" in msg and "use a 4-bit checkpoint" in msg and ">= 33.9 GiB total" in msg


@pytest.mark.parametrize(
    "make",
    [
        lambda: plan([one("a", GiB), one("a", GiB)], cluster(("n", [24 * GiB], "A10G"))),
        lambda: ModelDemand("a", (QuantOption("bf16", GiB),), 3, 2),
        lambda: ModelDemand("a", (), 1, 1),
        lambda: QuantOption("bf16", 0),
        lambda: QuantOption("bf16", 1.5),
        lambda: plan([one("a", GiB)], cluster(("n", [24 * GiB], "A10G")), headroom=1.0),
        lambda: plan([one("a", GiB)], Cluster(nodes=())),
    ],
)
def test_bad_input_is_an_input_error_with_one_line(make):
    with pytest.raises(InputError) as e:
        make()
    assert "\n" not in str(e.value)


# --- results -----------------------------------------------------------------------------------------------------


def test_to_json_shape_is_stable_and_serialisable():
    c = cluster(("n0", [24 * GiB] * 2, "A10G"), ("n1", [24 * GiB], "L4"))
    p = plan([one("a", 5 * GiB, 1, 3), one("b", 7 * GiB, 1, 2)], c)
    d = json.loads(json.dumps(p.to_json()))
    assert isinstance(d["feasible"], bool) and d["feasible"]
    for m in d["models"]:
        assert {"name", "quantization", "replica_bytes", "min_replicas", "max_replicas", "placed_replicas"} <= m.keys()
    for g in d["gpus"]:
        assert {"id", "total_bytes", "usable_bytes", "used_bytes", "replicas"} <= g.keys()
        for r in g["replicas"]:
            assert {"model", "bytes", "num_gpus"} <= r.keys()
    assert isinstance(d["cpu_replicas"], list)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.feasible = False  # type: ignore[misc]


def test_usable_fraction_basis_keeps_ray_from_admitting_into_headroom():
    # a (14.4 GiB) + b (4.8 GiB) per 24 GiB GPU: with fractions of the total, each GPU shows 0.2 free to Ray and the
    # second b (0.2) best-fits into the first GPU: 24 GiB on a GPU planned for 21.1; no start order avoids it
    c = cluster(("n0", [24 * GiB] * 2, "A10G"))
    ds = [one("a", int(14.4 * GiB), 2, 2), one("b", int(4.8 * GiB), 2, 2)]
    p = plan(ds, c)
    assert p.fraction_basis == "total" and p.gpus[0].ray_basis_bytes == 24 * GiB
    # what Ray sees free on each GPU: 1 - sum(num_gpus) = 0.2, room for one more b (0.2) the memory plan has not
    assert all(round(1 - g.num_gpus_used, 4) >= num_gpus_for(int(4.8 * GiB), 24 * GiB) for g in p.gpus)
    q = plan(ds, c, fraction_basis="usable")
    usable = q.gpus[0].usable_bytes
    assert q.gpus[0].ray_basis_bytes == usable
    assert all(round(1 - g.num_gpus_used, 4) < num_gpus_for(int(4.8 * GiB), usable) for g in q.gpus)
    assert q.model("a").num_gpus_by_gpu_type == (("A10G", num_gpus_for(int(14.4 * GiB), usable)),)
    check_invariants(q, c, 0.10, DEFAULT_GPU_RESERVE)
    with pytest.raises(InputError):
        plan(ds, c, fraction_basis="free")


def test_reports_render_text_and_svg():
    c = cluster(("n0", [24 * GiB] * 2, "A10G"))
    big = ModelDemand("big", (QuantOption("int4", 40 * GiB),), 1, 1, offload_cpu_bytes=30 * GiB)
    p = plan([one("llama", 9 * GiB, 1, 3), one("qwen", 5 * GiB, 1, 2), big], c)
    txt = render_text(p)
    assert "n0/gpu-0" in txt and "A=llama" in txt and "B=qwen" in txt and "GiB" in txt
    assert "Split GPU+CPU" in txt and max(len(line) for line in txt.splitlines()) <= 100
    svg = render_svg(p)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert svg.count("<title>llama") == p.model("llama").placed_replicas
