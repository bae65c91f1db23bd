"""The cluster as Ray sees it: run the one hardware probe (planner.inventory.probe_local_gpus) as a task pinned to
every alive node, and combine it with each node's Ray resources. Thin glue; the planner only gets the Cluster."""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from planner.inventory import Cluster, Gpu, Node, probe_local_gpus

log = logging.getLogger("gpuplan")


@ray.remote(num_cpus=0)
def _probe(node_name: str):
    return probe_local_gpus(node=node_name)


def _node_name(n: dict) -> str:
    return n.get("NodeName") or n.get("NodeManagerAddress") or n["NodeID"][:8]


def gather_cluster(timeout_s: float = 60.0) -> Cluster:
    """Probe every alive Ray node. GPUs that Ray advertises but NVML cannot see (``ray.init(num_gpus=N)`` on a
    machine without a driver) cannot be sized, so they are left out with a note; declare the cluster to plan them."""
    nodes, notes = [], []
    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = []
    for n in alive:
        strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
        refs.append(_probe.options(scheduling_strategy=strategy).remote(_node_name(n)))
    results = ray.get(refs, timeout=timeout_s)
    for n, probe in zip(alive, results):
        res = n.get("Resources", {})
        name = _node_name(n)
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
                gpu_type=g.gpu_type) for g in gpus), num_cpus=res.get("CPU")))
    for line in notes:
        log.warning(line)
    return Cluster(nodes=tuple(nodes), source="probed", notes=tuple(notes))
