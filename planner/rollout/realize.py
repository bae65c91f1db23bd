"""From a plan to the rollout that runs: bring the deployments up in the order Serve would, through the node gates,
and lower the planned count of any deployment no order can bring up (realize)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Mapping

from planner.placement.packing import RAY_GPU_UNITS, Plan
from planner.rollout.deployments import ModelRule, Rollout, _plan_id, fill_order, rollout_from_plan
from planner.rollout.gate import _MEMO, best_fit
from planner.rollout.scale import DeploymentObs, ScaleMemory, decide_scale

# realize(): rounds of lowering unreachable deployments one replica at a time before taking what bring_up reaches
REALIZE_ROUNDS = 12


def bring_up(rollout: Rollout, *, max_steps: int = 10_000) -> dict[str, int]:
    """How many replicas of each deployment :func:`decide_scale` brings up on a Ray that lands each request by best
    fit as soon as it is made (a replica is known on its GPU at once): first with no load (every model's minimum,
    as at a cold start), then with every model wanting its maximum. The gates are the ones used at run time, so a
    slot this cannot reach is one the cluster would not reach either."""
    return _bring_up(rollout, max_steps)[0]


def _bring_up(rollout: Rollout, max_steps: int = 10_000) -> tuple[dict[str, int], dict[str, tuple]]:
    """:func:`bring_up`'s counts, and per node the deployments best fit put on each GPU (in GPU order)."""
    rooms = {n.node: [RAY_GPU_UNITS] * len(n.gpus) for n in rollout.nodes}
    running: dict[str, list[tuple[str, int | None]]] = {d.name: [] for d in rollout.deployments}
    busy = {r.name: r.max_replicas * r.target_ongoing_requests * 2 for r in rollout.models}
    per = {r.name: max(1, len(rollout.of_model(r.name))) for r in rollout.models}
    memory = ScaleMemory()
    n, loads, now = 0, {r.name: 0.0 for r in rollout.models}, 0.0
    for _ in range(max_steps):
        obs = {d.name: DeploymentObs(len(running[d.name]), tuple(running[d.name]), loads[d.model] / per[d.model])
               for d in rollout.deployments}
        dec = decide_scale(rollout, obs, memory, now)
        memory = dec.memory
        changed = False
        handed = dict(memory.applied)  # the targets handed to Serve, recorded once per step (applied(), batched)
        for d in rollout.deployments:
            want = dec.targets[d.name]
            while len(running[d.name]) < want:
                n += 1
                if d.kind == "cpu" or rollout.layout(d.node) is None:
                    running[d.name].append((f"b{n}", None))
                else:
                    lay = rollout.layout(d.node)
                    i = best_fit(rooms[d.node], d.units)
                    if i is None:
                        break
                    rooms[d.node][i] -= d.units
                    running[d.name].append((f"b{n}", lay.gpus[i]))
                changed = True
            handed[d.name] = len(running[d.name])
        memory = replace(memory, applied=handed)
        if not changed:
            if loads == busy:
                break
            # the minimums (and any scaffold) are up: now every model wants its maximum, with no delay
            loads = busy
            memory = replace(memory, goal={r.name: r.max_replicas for r in rollout.models})
    layouts = {}
    for lay in rollout.nodes:
        per_gpu: dict[int, list[str]] = {g: [] for g in lay.gpus}
        for d in rollout.deployments:
            if d.node == lay.node and d.kind != "cpu":
                for _, gpu in running[d.name]:
                    per_gpu[gpu].append(d.name)
        layouts[lay.node] = tuple(tuple(per_gpu[g]) for g in lay.gpus)
    return {name: len(r) for name, r in running.items()}, layouts


def realize(plan: Plan, rules: Mapping[str, ModelRule] | None = None) -> Rollout:
    """:func:`rollout_from_plan`, with each deployment's ``planned`` lowered to what :func:`bring_up` reaches, and a
    note per deployment that lost slots: the plan is what runs. Ray's best fit, the minimums first and the search
    budgets can leave a packed node short of its plan (rare: no random layout of 2-3 GPUs tried in the tests was);
    lowering one replica at a time keeps as many as can be reached."""
    ro = first = rollout_from_plan(plan, rules)
    # The gate searches share a memo and a budget, and a remembered answer costs no budget, so a bring-up's order
    # (hence its GPU layouts, not its counts) depends on what the process searched before: start from an empty memo,
    # so that the same plan gives the same rollout in every process (the driver, `gpuplan plan`, the KubeRay render).
    _MEMO.clear()
    layouts = None  # the GPU layouts of the last bring-up, while it was of ``ro`` itself
    for _ in range(REALIZE_ROUNDS):
        got, layouts = _bring_up(ro)
        short = {d.name: max(got[d.name], d.planned - 1) for d in ro.deployments if got[d.name] < d.planned}
        if not short:
            break
        # one slot less at a time: the gate wants room for every planned replica, so fewer may all fit
        ro, layouts = _with_planned(ro, {d.name: short.get(d.name, d.planned) for d in ro.deployments}), None
    else:
        got = bring_up(ro)
        ro = _with_planned(ro, {d.name: min(got[d.name], d.planned) for d in ro.deployments})
    final = {d.name: d.planned for d in ro.deployments}
    # the GPU layout the rollout expects is the one best fit reaches, not the packer's: both pack the node's replicas
    # within the same ledger, but Ray may only reach the first (two 0.5s started one after the other share a GPU,
    # so the packer's {0.5, 0.25} twice runs as {0.5, 0.5} and {0.25, 0.25}). The bring-up that found nothing short
    # has them (a second bring-up for them was half of realize()'s time at 1,000 GPUs)
    if layouts is None:
        _, layouts = _bring_up(ro)
    ro = replace(ro, nodes=tuple(replace(n, planned=layouts.get(n.node, n.planned)) for n in ro.nodes))
    ro = replace(ro, plan_id=_plan_id(ro.deployments, ro.nodes, ro.models, ro.fill))
    notes = tuple(
        f"{d.name}: Ray picks each replica's GPU itself (best fit, in the order replicas start); gpuplan found no "
        f"order that starts every model's minimum first and then brings up all {d.planned} replicas the plan puts "
        f"on {d.node} beside that node's others, only {final.get(d.name, 0)}, so {final.get(d.name, 0)} are "
        "planned there"
        for d in first.deployments if final.get(d.name, 0) < d.planned)
    return replace(ro, notes=notes) if notes else ro


def _with_planned(ro: Rollout, planned: Mapping[str, int]) -> Rollout:
    """The rollout with fewer replicas planned per deployment: layouts drop the lost replicas from their GPUs,
    models' max follow, fill orders and minimum slots are recomputed."""
    deps = [replace(d, planned=planned[d.name]) for d in ro.deployments if planned[d.name] > 0]
    left = dict(planned)
    nodes = []
    for n in ro.nodes:
        keep = []
        for names in n.planned:
            k = []
            for nm in names:
                if left.get(nm, 0) > 0:
                    left[nm] -= 1
                    k.append(nm)
            keep.append(tuple(k))
        nodes.append(replace(n, planned=tuple(keep)))
    models = []
    for r in ro.models:
        mx = sum(d.planned for d in deps if d.model == r.name)
        models.append(replace(r, max_replicas=mx, min_replicas=min(r.min_replicas, mx)))
    fill = tuple((r.name, fill_order([d for d in deps if d.model == r.name])) for r in models)
    mins: Counter = Counter()
    for r, (_, slots) in zip(models, fill):
        mins.update(slots[:r.min_replicas])
    deps = tuple(replace(d, min_slots=mins[d.name]) for d in deps)
    nodes_t, models_t = tuple(nodes), tuple(models)
    return Rollout(_plan_id(deps, nodes_t, models_t, fill), deps, nodes_t, models_t, fill, ro.notes)
