"""The cluster as Ray sees it: run the one hardware probe (planner.cluster.inventory.probe_local_gpus) as a task pinned
to every alive node, and combine it with each node's Ray resources. Thin glue; the planner only gets the Cluster."""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from planner.cluster.inventory import Cluster, Gpu, Node, probe_local_gpus
from planner.rollout import GPUPLAN_NODE_LABEL

log = logging.getLogger("gpuplan")


@ray.remote(num_cpus=0)
def _probe(node_name: str):
    return probe_local_gpus(node=node_name)


def _node_name(n: dict) -> str:
    """A probed node's plan name: its gpuplan.io/node label when it has one, else Ray's node name or address."""
    label = (n.get("Labels") or {}).get(GPUPLAN_NODE_LABEL)
    return label or n.get("NodeName") or n.get("NodeManagerAddress") or n["NodeID"][:8]


def gather_cluster(timeout_s: float = 60.0) -> Cluster:
    """Probe every alive Ray node. GPUs that Ray advertises but NVML cannot see (``ray.init(num_gpus=N)`` on a
    machine without a driver) cannot be sized, so they are left out with a note; declare the cluster to plan them."""
    nodes, notes = [], []
    alive = [n for n in ray.nodes() if n.get("Alive")]
    names = [_node_name(n) for n in alive]
    # several Ray nodes on one host share its name and address (ray.cluster_utils, or one raylet per GPU group)
    names = [f"{nm}-{n['NodeID'][:6]}" if names.count(nm) > 1 else nm for nm, n in zip(names, alive)]
    refs = []
    for n, name in zip(alive, names):
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs.append(_probe.options(scheduling_strategy=strategy).remote(name))
    results = ray.get(refs, timeout=timeout_s)
    for n, name, probe in zip(alive, names, results):
        res = n.get("Resources", {})
        ray_gpus = int(res.get("GPU", 0))
        gpus = tuple(probe.gpus)
        if ray_gpus and not gpus:
            notes.append(f"node {name}: Ray advertises {ray_gpus} GPU(s) but {probe.reason}; they are not planned "
                         "(declare `cluster:` with their memory to plan them)")
        elif len(gpus) > ray_gpus:
            # Ray may be started with fewer GPUs than the host has (CUDA_VISIBLE_DEVICES / --num-gpus)
            gpus = gpus[:ray_gpus]
        if not gpus and probe.reason:
            notes.append(f"node {name}: {probe.reason}")
        mem = int(res.get("memory", 0))
        nodes.append(Node(name=name, cpu_memory_bytes=mem, gpus=tuple(
            Gpu(id=g.id, name=g.name, total_bytes=g.total_bytes, free_bytes=g.free_bytes, node=name, index=g.index,
                gpu_type=g.gpu_type) for g in gpus), num_cpus=res.get("CPU"), ray_node_id=n["NodeID"]))
    for line in notes:
        log.warning(line)
    return Cluster(nodes=tuple(nodes), source="probed", notes=tuple(notes))
