"""Which Ray node is which plan node: by gpuplan's node label, else by shape (GPUs and accelerator type)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from planner.rollout.deployments import GPUPLAN_NODE_LABEL, RAY_NODE_ID_LABEL


@dataclass(frozen=True)
class RayNode:
    node_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    num_gpus: int = 0
    gpu_type: str | None = None  # from Ray's accelerator_type:<T> resource
    alive: bool = True


@dataclass(frozen=True)
class NodeBinding:
    node: str  # plan node
    selector: Mapping[str, str]  # Ray label_selector its deployments carry
    ray_node_id: str | None  # the Ray node it is bound to now (None: none yet)
    how: str  # "label" | "probed" | "same-gpus" | "unbound"
    note: str | None = None

    def to_json(self) -> dict:
        return {"node": self.node, "selector": dict(self.selector), "ray_node_id": self.ray_node_id, "how": self.how,
                "note": self.note}


def bind_nodes(plan_nodes: Iterable, ray_nodes: Sequence[RayNode]) -> tuple[NodeBinding, ...]:
    """Bind every plan node (``planner.cluster.inventory.Node``) to a Ray node.

    A Ray node labelled ``gpuplan.io/node=<name>`` is that node (the label survives pod restarts: the binding is the
    label). A probed node is the Ray node it was probed on. Otherwise any alive, not yet bound Ray node with the
    same GPUs (count and type) will do, pinned by ``ray.io/node-id``, with a note saying so. With none, the
    deployments select the label and wait for such a node to join."""
    alive = sorted((n for n in ray_nodes if n.alive), key=lambda n: n.node_id)
    plan_nodes = list(plan_nodes)
    names = {n.name for n in plan_nodes}
    taken: set[str] = set()
    for n in alive:
        if n.labels.get(GPUPLAN_NODE_LABEL) in names:
            taken.add(n.node_id)
    out = []
    for pn in plan_nodes:
        labelled = next((n for n in alive if n.labels.get(GPUPLAN_NODE_LABEL) == pn.name), None)
        if labelled is not None:
            out.append(NodeBinding(pn.name, {GPUPLAN_NODE_LABEL: pn.name}, labelled.node_id, "label"))
            continue
        rid = getattr(pn, "ray_node_id", None)
        if rid and any(n.node_id == rid for n in alive):
            taken.add(rid)
            out.append(NodeBinding(pn.name, {RAY_NODE_ID_LABEL: rid}, rid, "probed"))
            continue
        gtype = next((g.gpu_type for g in pn.gpus if g.gpu_type), None)
        want_type = gtype.upper() if gtype else None
        same = [n for n in alive if n.node_id not in taken and n.num_gpus == len(pn.gpus)
                and (not pn.gpus or want_type is None or (n.gpu_type or "").upper() == want_type)]
        same.sort(key=lambda n: (GPUPLAN_NODE_LABEL in n.labels, n.node_id))
        gpus = f"{len(pn.gpus)} x {want_type or 'GPU'}" if pn.gpus else "no GPU"
        if same:
            n = same[0]
            taken.add(n.node_id)
            out.append(NodeBinding(pn.name, {RAY_NODE_ID_LABEL: n.node_id}, n.node_id, "same-gpus", (
                f"node {pn.name}: no Ray node is labelled {GPUPLAN_NODE_LABEL}={pn.name}; using Ray node "
                f"{n.node_id[:12]}, which has the same GPUs ({gpus}) (label the node to pin it: "
                f"ray start --labels {GPUPLAN_NODE_LABEL}={pn.name})")))
        else:
            out.append(NodeBinding(pn.name, {GPUPLAN_NODE_LABEL: pn.name}, None, "unbound", (
                f"node {pn.name}: no Ray node is labelled {GPUPLAN_NODE_LABEL}={pn.name} and no free one has its GPUs "
                f"({gpus}); its replicas wait until one joins (ray start --labels {GPUPLAN_NODE_LABEL}={pn.name})")))
    return tuple(out)
