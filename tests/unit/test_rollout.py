"""planner/rollout/: the plan as Ray Serve deployments, Ray's best-fit GPU choice, the node gate, the scaling
decision (fake clock), routing, node binding and plan-vs-actual matching; and, as a property, that bringing a plan
up and down through a simulated Ray (random arrival order, random scale-down victims, stopped replicas that hold
their share a while) never leaves a planned replica pending and never over-fills a GPU."""

from __future__ import annotations

import random
from collections import Counter

from benchmarks.common.fake_ray import FakeRay, drive
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from planner.errors import InfeasiblePlanError
from planner.cluster.inventory import Cluster, Gpu, Node
from planner.placement.packing import (RAY_GPU_UNITS, GpuPlan, GpuReplica, ModelDemand, ModelPlan, Plan, QuantOption,
                             SolverInfo, plan)
from planner.rollout import (GPUPLAN_NODE_LABEL, RAY_NODE_ID_LABEL, DeploymentObs, ModelRule, RayNode, ReplicaReport,
                             Rollout, ScaleMemory, applied, best_fit, bind_nodes, bring_up, decide_scale, fill_order,
                             node_gate, pick_deployment, placements, realize, rollout_from_plan)
from planner.units import GiB

# ----------------------------------------------------------------------------------------------------------------
# Helpers: a Plan written by hand (no packer), per GPU a list of (model, Ray units)


def hand_plan(nodes: dict[str, list[list[tuple[str, int]]]], mins: dict[str, int], gtype="H100") -> Plan:
    gpus, counts = [], Counter()
    for node, per_gpu in nodes.items():
        for i, reps in enumerate(per_gpu):
            rs = tuple(GpuReplica(m, u * 8 * GiB // RAY_GPU_UNITS, u / RAY_GPU_UNITS, "bf16") for m, u in reps)
            counts.update(m for m, _ in reps)
            used = sum(r.bytes for r in rs)
            gpus.append(GpuPlan(f"{node}/gpu-{i}", gtype, node, i, gtype, 10 * GiB, 8 * GiB, used, rs, 8 * GiB))
    models = tuple(ModelPlan(m, "bf16", 0, GiB, 0, mins.get(m, 0), counts[m], counts[m], counts[m], 0, 0, None, 1, 1,
                             (), "bf16", None) for m in sorted(counts))
    solver = SolverInfo("none", "none", "spread", None, "", sum(counts.values()), None, 0.0)
    return Plan(True, "gpu", 0.1, 0, models, tuple(gpus), (), (), (), solver, "usable")


def rules(ro_plan: Plan, target=1.0, up=2.0, down=3.0) -> dict[str, ModelRule]:
    return {m.name: ModelRule(m.name, m.min_replicas, m.placed_replicas, target, up, down) for m in ro_plan.models}


# ----------------------------------------------------------------------------------------------------------------
# Ray's rule and the gate


def test_best_fit_reproduces_the_gpu_choices_measured_on_ray():
    # docs/ray-gpu-fractions.md: actors started one after another on ray.init(num_gpus=2), ray.get_gpu_ids() read
    for requests, measured in [((6000, 3000, 3000, 5000), [0, 0, 1, 1]), ((3000, 8000, 2000), [0, 1, 1]),
                               ((3000, 8000, 1000, 1000, 6000), [0, 1, 1, 1, 0])]:
        rooms, got = [RAY_GPU_UNITS] * 2, []
        for u in requests:
            i = best_fit(rooms, u)
            rooms[i] -= u
            got.append(i)
        assert got == measured
    assert best_fit([4000, 3000], 5000) is None


def test_gate_refuses_orders_that_fragment_a_node():
    # two GPUs planned as {0.6, 0.4} each: 0.4, 0.4, 0.6, 0.6 puts both 0.4s on GPU 0 and leaves a 0.6 pending
    empty = [RAY_GPU_UNITS] * 2
    assert not node_gate(empty, {4000: 2, 6000: 2})
    assert node_gate(empty, {6000: 2}, {4000: 2})  # the 0.6s first, then the 0.4s fit
    # GPU 0 holds a 0.2: a 0.3 now goes there too (least room that fits), and the two 0.6s still to come cannot
    # both fit any more; starting a 0.6 first keeps the node completable
    assert not node_gate([8000, RAY_GPU_UNITS], {3000: 1}, {2000: 1, 6000: 2})
    assert node_gate([8000, RAY_GPU_UNITS], {6000: 1}, {2000: 1, 6000: 1, 3000: 1})
    assert node_gate([4000, 4000], {4000: 2})
    # planned {0.5, 0.5} and {0.3 x 3}: with a 0.5 and a 0.3 on their way at once, the 0.3 may arrive first, the
    # 0.5 then joins it on GPU 0 and the rest no longer fits
    assert not node_gate(empty, {5000: 1, 3000: 1}, {5000: 1, 3000: 2})
    assert node_gate(empty, {5000: 2}, {3000: 3})
    # landing only (a minimum replica on a settled node): the gate ignores what is still to come
    assert node_gate([8000, RAY_GPU_UNITS], {3000: 1}, {2000: 1, 6000: 2}, complete=False)


def test_gate_plans_for_stopped_replicas_that_may_still_hold_their_share():
    # GPU 0 had a 0.6 that is stopping; a new 0.6 fits on GPU 1 either way, a second new 0.6 only once it is gone
    assert node_gate([RAY_GPU_UNITS, RAY_GPU_UNITS], {6000: 1}, ghosts=[(0, 6000)])
    assert not node_gate([RAY_GPU_UNITS, RAY_GPU_UNITS], {6000: 2}, ghosts=[(0, 6000)])
    assert node_gate([RAY_GPU_UNITS, RAY_GPU_UNITS], {6000: 2})


# ----------------------------------------------------------------------------------------------------------------
# The plan as deployments


def mixed_cluster() -> Cluster:
    """The issue's cluster: 2 nodes x 4 L4 (24 GB) and 1 node x 8 H100 (80 GB)."""
    def node(name, n, gib, t):
        return Node(name, 512 * GiB, tuple(Gpu(f"{name}/gpu-{i}", f"NVIDIA {t}", int(gib * GiB), node=name, index=i,
                                               gpu_type=t) for i in range(n)))
    return Cluster((node("l4-0", 4, 22.0, "L4"), node("l4-1", 4, 22.0, "L4"), node("h100", 8, 79.6, "H100")))


def test_one_deployment_per_model_and_node_with_the_plans_fraction_there():
    c = mixed_cluster()
    ds = [ModelDemand("llama", (QuantOption("int4", int(8.5 * GiB)),), 2, 40),
          ModelDemand("qwen", (QuantOption("int8", int(10.4 * GiB)),), 1, 40)]
    p = plan(ds, c, headroom=0.1, fraction_basis="usable")
    ro = rollout_from_plan(p)
    assert {d.name for d in ro.deployments} == {f"{m}@{n}" for m in ("llama", "qwen") for n in ("l4-0", "l4-1", "h100")
                                              if any(r.model == m for g in p.gpus if g.node == n for r in g.replicas)}
    for d in ro.deployments:
        on_node = [r for g in p.gpus if g.node == d.node for r in g.replicas if r.model == d.model]
        assert d.planned == len(on_node) and {r.num_gpus for r in on_node} == {d.num_gpus}
        assert d.gpu_type == ("H100" if d.node == "h100" else "L4")
    for m in p.models:
        assert sum(d.planned for d in ro.of_model(m.name)) == m.placed_replicas == len(ro.slots(m.name))
    llama = {d.node: d.num_gpus for d in ro.of_model("llama")}
    assert llama["h100"] < llama["l4-0"] == llama["l4-1"]  # 8.5 GiB of a bigger GPU is a smaller fraction
    # the rollout travels as JSON (build_app -> Ray's KV -> the controller's policy)
    assert Rollout.from_json(ro.to_json()) == ro


def test_fill_order_spreads_first_and_prefers_the_node_with_the_most_slots():
    ro = rollout_from_plan(hand_plan({"a": [[("m", 2000)] * 3], "b": [[("m", 2000)]], "c": [[("m", 2000)] * 2]},
                                     {"m": 2}))
    assert ro.slots("m") == ("m@a", "m@c", "m@b", "m@a", "m@c", "m@a")
    assert {d.name: d.min_slots for d in ro.deployments} == {"m@a": 1, "m@b": 0, "m@c": 1}
    assert fill_order([]) == ()


# ----------------------------------------------------------------------------------------------------------------
# The scaling decision, on a fake clock


def obs_of(targets: dict, running: dict | None = None, load: dict | None = None) -> dict:
    running = running or {}
    return {n: DeploymentObs(t, tuple(running.get(n, ())), (load or {}).get(n, 0.0)) for n, t in targets.items()}


def test_minimums_start_at_once_then_load_scales_up_after_the_delay_and_down_in_reverse_order():
    p = hand_plan({"a": [[("m", 3000)] * 3], "b": [[("m", 3000)] * 3]}, {"m": 1})
    ro = rollout_from_plan(p, {"m": ModelRule("m", 1, 6, 2.0, 10.0, 30.0)})
    mem = ScaleMemory()
    d = decide_scale(ro, obs_of({"m@a": 0, "m@b": 0}), mem, 0.0)
    assert d.targets == {"m@a": 1, "m@b": 0}  # the minimum needs no delay
    mem = d.memory
    running = {"m@a": [("r1", 0)]}
    load = {"m@a": 7.0}  # 7 ongoing / target 2 -> wants 4
    d = decide_scale(ro, obs_of({"m@a": 1, "m@b": 0}, running, load), mem, 1.0)
    assert d.targets == {"m@a": 1, "m@b": 0} and "waiting 10.0s" in d.models[0].why
    d = decide_scale(ro, obs_of({"m@a": 1, "m@b": 0}, running, load), d.memory, 11.0)
    assert d.models[0].goal == 4 and d.targets == {"m@a": 2, "m@b": 2}  # round-robin over the nodes
    mem = d.memory
    for n, t in d.targets.items():
        mem = applied(mem, n, t)
    running = {"m@a": [("r1", 0), ("r2", 0)], "m@b": [("r3", 0), ("r4", 0)]}
    d = decide_scale(ro, obs_of({"m@a": 2, "m@b": 2}, running, {}), mem, 12.0)
    assert d.targets == {"m@a": 2, "m@b": 2} and "waiting 30.0s" in d.models[0].why
    d = decide_scale(ro, obs_of({"m@a": 2, "m@b": 2}, running, {}), d.memory, 42.0)
    assert d.models[0].goal == 1 and d.targets == {"m@a": 1, "m@b": 0}  # the last slots go first


def test_a_fresh_board_keeps_what_serve_runs_until_the_delay_says_otherwise():
    # Serve's controller restarted: the decision has no memory, 4 replicas run and the load asks for 1
    p = hand_plan({"a": [[("m", 3000)] * 3], "b": [[("m", 3000)] * 3]}, {"m": 1})
    ro = rollout_from_plan(p, {"m": ModelRule("m", 1, 6, 2.0, 10.0, 30.0)})
    running = {"m@a": [("r1", 0), ("r2", 0)], "m@b": [("r3", 0), ("r4", 0)]}
    d = decide_scale(ro, obs_of({"m@a": 2, "m@b": 2}, running, {"m@a": 1.0}), ScaleMemory(), 100.0)
    assert d.targets == {"m@a": 2, "m@b": 2} and "waiting 30.0s" in d.models[0].why
    d = decide_scale(ro, obs_of({"m@a": 2, "m@b": 2}, running, {"m@a": 1.0}), d.memory, 130.0)
    assert d.targets == {"m@a": 1, "m@b": 0}


def test_a_model_never_scales_above_its_planned_replicas():
    p = hand_plan({"a": [[("m", 5000)] * 2]}, {"m": 1})
    ro = rollout_from_plan(p, {"m": ModelRule("m", 1, 99, 1.0, 0.0, 0.0)})
    d = decide_scale(ro, obs_of({"m@a": 1}, {"m@a": [("r", 0)]}, {"m@a": 1000.0}), ScaleMemory(), 0.0)
    assert ro.rule("m").max_replicas == 2 and d.targets == {"m@a": 2}


def test_starting_replicas_of_two_models_on_one_node_wait_for_each_other():
    # GPU 0 planned {a 0.5, a 0.5}, GPU 1 {b 0.3 x 3}: with a's still on their way, a b could arrive first and take
    # GPU 0 (0.3, 0.5 -> 0.2 left, then the second a goes to GPU 1 and a b is left without room), so the b's wait
    p = hand_plan({"n": [[("a", 5000), ("a", 5000)], [("b", 3000)] * 3]}, {"a": 2, "b": 3})
    ro = rollout_from_plan(p)
    d = decide_scale(ro, obs_of({"a@n": 0, "b@n": 0}), ScaleMemory(), 0.0)
    assert d.targets == {"a@n": 2, "b@n": 0} and any(w.startswith("b: slot on n waits") for w in d.waits)
    mem = applied(applied(d.memory, "a@n", 2), "b@n", 0)
    d = decide_scale(ro, obs_of({"a@n": 2, "b@n": 0}, {"a@n": [("a1", 0)]}), mem, 1.0)
    assert d.targets["b@n"] == 0  # one a is still starting
    d = decide_scale(ro, obs_of({"a@n": 2, "b@n": 0}, {"a@n": [("a1", 0), ("a2", 0)]}), mem, 2.0)
    assert d.targets == {"a@n": 2, "b@n": 3}  # replicas of one deployment may start together: they are alike


# ----------------------------------------------------------------------------------------------------------------
# Property: through a simulated Ray, every planned replica comes up, nothing is left pending, no GPU over-fills


@st.composite
def cases(draw):
    nodes = []
    for n in range(draw(st.integers(1, 3))):
        k, size = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([24, 48, 80]))
        nodes.append(Node(f"n{n}", 1024 * GiB, tuple(Gpu(f"n{n}/gpu-{i}", "X", size * GiB, node=f"n{n}", index=i,
                                                         gpu_type=f"T{size}") for i in range(k))))
    demands = []
    for m in range(draw(st.integers(1, 4))):
        size = draw(st.integers(4, 60)) * GiB // 2
        mn = draw(st.integers(0, 2))
        demands.append(ModelDemand(f"m{m}", (QuantOption("bf16", size),), mn, draw(st.integers(max(mn, 1), 10))))
    return Cluster(tuple(nodes)), demands, draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.generate])
@given(cases())
def test_bring_up_scale_down_and_up_again_through_a_simulated_ray(case):
    cluster, demands, seed = case
    try:
        p = plan(demands, cluster, headroom=0.1, gpu_reserve_bytes=0, fraction_basis="usable")
    except InfeasiblePlanError:
        return
    ro = realize(p, rules(p))
    fr, mem, now = FakeRay(ro, random.Random(seed)), ScaleMemory(), 0.0
    busy = {r.name: 1000.0 for r in ro.models}
    mem, now, _ = drive(fr, mem, {}, 15, now)
    assert {r.name: fr.count(r.name) for r in ro.models} == {r.name: r.min_replicas for r in ro.models}
    mem, now, _ = drive(fr, mem, busy, 60, now)
    assert {r.name: fr.count(r.name) for r in ro.models} == {r.name: r.max_replicas for r in ro.models}
    assert fr.pending() == 0
    mem, now, _ = drive(fr, mem, {}, 40, now)
    assert {r.name: fr.count(r.name) for r in ro.models} == {r.name: r.min_replicas for r in ro.models}
    mem, now, _ = drive(fr, mem, busy, 80, now)
    assert {r.name: fr.count(r.name) for r in ro.models} == {r.name: r.max_replicas for r in ro.models}
    assert fr.pending() == 0
    # what the packer placed and what realize() kept differ only by the slots realize() explained
    lost = sum(m.placed_replicas for m in p.models) - sum(r.max_replicas for r in ro.models)
    assert (lost > 0) == bool(ro.notes)


SHAPED = [[("a", 2683), ("a", 2683), ("b", 4513)]] * 3 + [[("c", 5006), ("d", 3708)]]


def test_a_node_whose_minimums_cannot_start_first_is_shaped_by_replicas_started_out_of_turn():
    # 3 GPUs planned {a, a, b}, one {c, d}; b's three minimums first would stack two b's on one GPU (least room that
    # fits) and leave no room for all six a's. So the node follows an order that mixes minimums and extras, one
    # step at a time; an extra started that way is kept until the node's minimums run and its model's downscale
    # delay has passed
    p = hand_plan({"n": SHAPED}, {"b": 3, "c": 1, "d": 1})
    ro = rollout_from_plan(p, rules(p, down=30.0))
    names = [d.name for d in ro.deployments]
    d = decide_scale(ro, obs_of(dict.fromkeys(names, 0)), ScaleMemory(), 0.0)
    assert sum(d.targets.values()) == 1 and any("starts first (out of turn)" in w for w in d.waits)
    assert bring_up(ro) == {d.name: d.planned for d in ro.deployments}  # the whole plan comes up
    assert realize(p, rules(p)).notes == ()
    fr, mem, now = FakeRay(ro, random.Random(7)), ScaleMemory(), 0.0
    mem, now, waits = drive(fr, mem, {}, 30, now)
    assert (fr.count("b"), fr.count("c"), fr.count("d")) == (3, 1, 1)
    assert any("a replica of a starts first" in w for w in waits)
    mem, now, _ = drive(fr, mem, {}, 40, now)
    assert fr.count("a") == 0  # the out-of-turn a's are gone once a's delay has passed
    mem, now, _ = drive(fr, mem, {"a": 100.0}, 40, now)
    assert fr.count("a") == 6 and fr.pending() == 0


def test_realize_plans_only_what_comes_up_and_says_why():
    # a layout Ray cannot hold (two 0.6 on one GPU; no packer makes it, a hand-written plan can): realize() lowers the
    # deployment to what best fit brings up, so what Serve is asked for is what runs
    p = hand_plan({"n": [[("a", 6000), ("a", 6000)], [("b", 5000), ("b", 5000)]]}, {"a": 1, "b": 2})
    assert bring_up(rollout_from_plan(p, rules(p)))["a@n"] == 1
    ro = realize(p, rules(p))
    assert ro.deployment("a@n").planned == 1 and ro.rule("a").max_replicas == 1
    assert bring_up(ro) == {d.name: d.planned for d in ro.deployments}
    assert len(ro.notes) == 1 and "a@n" in ro.notes[0] and "so 1 are planned there" in ro.notes[0]


# ----------------------------------------------------------------------------------------------------------------
# Routing, node binding, plan vs actual


def test_power_of_two_choices_prefers_the_less_loaded_deployment():
    cands = [("a", 2, 6), ("b", 1, 0), ("c", 0, 0)]
    draws = iter([0.0, 0.0])  # draws live[0], then live[1]
    assert pick_deployment(cands, lambda: next(draws)) == "b"  # 1/1 in flight per replica beats 7/2
    assert pick_deployment([("a", 0, 0)], random.random) is None
    assert pick_deployment([("a", 3, 100), ("b", 0, 0)], random.random) == "a"
    rng = random.Random(1)
    picks = Counter(pick_deployment([("a", 1, 0), ("b", 1, 0), ("c", 1, 0)], rng.random) for _ in range(3000))
    assert min(picks.values()) > 800  # ties go to the first drawn: equal deployments share the traffic


def test_declared_nodes_bind_by_label_then_by_same_gpus_then_wait():
    def pnode(name, n, t="A10G"):
        return Node(name, GiB, tuple(Gpu(f"{name}/gpu-{i}", t, 24 * GiB, node=name, index=i, gpu_type=t)
                                     for i in range(n)))
    ray_nodes = [RayNode("id-head", {}, 0), RayNode("id-x", {GPUPLAN_NODE_LABEL: "a"}, 2, "A10G"),
                 RayNode("id-y", {}, 2, "A10G"), RayNode("id-z", {}, 1, "L4")]
    b = {x.node: x for x in bind_nodes([pnode("a", 2), pnode("b", 2), pnode("c", 2), pnode("cpu", 0)], ray_nodes)}
    assert b["a"].how == "label" and b["a"].selector == {GPUPLAN_NODE_LABEL: "a"} and b["a"].note is None
    assert b["b"].how == "same-gpus" and b["b"].selector == {RAY_NODE_ID_LABEL: "id-y"}
    assert "no Ray node is labelled gpuplan.io/node=b" in b["b"].note and "2 x A10G" in b["b"].note
    assert b["c"].how == "unbound" and b["c"].ray_node_id is None and b["c"].selector == {GPUPLAN_NODE_LABEL: "c"}
    assert "ray start --labels gpuplan.io/node=c" in b["c"].note
    assert b["cpu"].ray_node_id == "id-head"
    probed = Node("p", GiB, (), ray_node_id="id-z")
    assert bind_nodes([probed], ray_nodes)[0].selector == {RAY_NODE_ID_LABEL: "id-z"}


def test_placements_match_a_gpu_that_holds_what_the_plan_put_on_one():
    p = hand_plan({"n": [[("a", 6000), ("b", 4000)], [("a", 6000), ("b", 4000)]]}, {"a": 2, "b": 2})
    ro = rollout_from_plan(p)
    bind = bind_nodes([Node("n", GiB, ())], [RayNode("id-n", {GPUPLAN_NODE_LABEL: "n"}, 2)])
    ok = [ReplicaReport("r1", "a@n", "id-n", 1, "n"), ReplicaReport("r2", "b@n", "id-n", 1, "n"),
          ReplicaReport("r3", "a@n", "id-n", 0, None)]
    rows = {r["replica_id"]: r for r in placements(ro, ok, bind)}
    assert all(r["matches_plan"] and r["planned_node"] == r["node"] == "n" for r in rows.values())
    assert rows["r1"]["planned_gpu"] == 1 and rows["r3"]["planned_gpu"] == 0 and rows["r1"]["gpu_type"] == "H100"
    # both b's on one GPU: the plan has no GPU with two b's, so the second one does not match
    bad = [ReplicaReport("r1", "b@n", "id-n", 0, "n"), ReplicaReport("r2", "b@n", "id-n", 0, "n")]
    assert sorted(r["matches_plan"] for r in placements(ro, bad, bind)) == [False, False]
