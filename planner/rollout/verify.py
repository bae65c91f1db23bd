"""Where Ray put the replicas, against the plan: each replica's node and GPU mapped to the plan's."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.rollout.binding import NodeBinding
from planner.rollout.deployments import NodeLayout, Rollout


@dataclass(frozen=True)
class ReplicaReport:
    replica_id: str
    deployment: str
    node_id: str | None
    gpu: int | None
    node_label: str | None = None  # the Ray node's gpuplan.io/node label


def _gpu_mapping(layout: NodeLayout, actual: Mapping[int, Counter]) -> dict[int, int]:
    """Actual GPU index -> planned GPU position, where what runs on the actual GPU is part of what the plan put on
    the planned one (same deployments); the index itself first. GPUs that map nowhere are left out."""
    planned = [Counter(p) for p in layout.planned]
    gpus = sorted(actual, key=lambda g: -sum(actual[g].values()))
    best: dict[int, int] = {}

    def fits(g, pos):
        return all(planned[pos][k] >= v for k, v in actual[g].items())

    def go(i, used, cur):
        nonlocal best
        if len(cur) + (len(gpus) - i) <= len(best):
            return
        if i == len(gpus):
            best = dict(cur)
            return
        g = gpus[i]
        order = sorted(range(len(planned)), key=lambda p: (layout.gpus[p] != g, p))
        for pos in order:
            if pos not in used and fits(g, pos):
                cur[g] = pos
                used.add(pos)
                go(i + 1, used, cur)
                used.discard(pos)
                del cur[g]
                if len(best) == len(gpus):
                    return
        go(i + 1, used, cur)

    go(0, set(), {})
    return best


def placements(rollout: Rollout, reports: Sequence[ReplicaReport],
               bindings: Sequence[NodeBinding] = ()) -> list[dict]:
    """Per replica: the plan's node and GPU for it, Ray's node and GPU, and ``matches_plan`` (the planned node and a
    GPU that holds what the plan put on one of its GPUs: the same GPU, or one with the same planned replicas)."""
    by_id = {b.ray_node_id: b.node for b in bindings if b.ray_node_id}
    types = {n.node: dict(zip(n.gpus, n.gpu_types)) for n in rollout.nodes}
    plan_nodes = {d.node for d in rollout.deployments}
    rows, per_node = [], {}
    for r in reports:
        d = rollout._by_name().get(r.deployment)
        actual = r.node_label if r.node_label in plan_nodes else by_id.get(r.node_id or "")
        rows.append((r, d, actual))
        if d is not None and actual == d.node and d.kind != "cpu" and r.gpu is not None:
            per_node.setdefault(actual, {}).setdefault(int(r.gpu), Counter())[d.name] += 1
    maps = {}
    for node, actual in per_node.items():
        lay = rollout.layout(node)
        maps[node] = _gpu_mapping(lay, actual) if lay else {}
    out = []
    for r, d, actual in rows:
        row = {"replica_id": r.replica_id, "deployment": r.deployment, "model": d.model if d else None,
               "planned_node": d.node if d else None, "node": actual, "node_id": r.node_id, "gpu": r.gpu,
               "gpu_type": None, "planned_gpu": None, "matches_plan": False}
        if d is None:
            out.append(row)
            continue
        lay = rollout.layout(d.node)
        if d.kind == "cpu":
            row["matches_plan"] = actual == d.node
        elif actual == d.node and r.gpu is not None and lay is not None:
            row["gpu_type"] = types.get(d.node, {}).get(int(r.gpu))
            pos = maps.get(actual, {}).get(int(r.gpu))
            if pos is not None:
                row["planned_gpu"] = lay.gpus[pos]
                row["matches_plan"] = True
        out.append(row)
    return out
