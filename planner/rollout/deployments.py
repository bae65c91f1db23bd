"""What the plan becomes on Ray: one deployment per (model, node, fraction), its Serve options, the fill order of a
model's slots, and the Rollout value every later stage reads (docs/ray-gpu-fractions.md)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping, Sequence

from planner.placement.packing import RAY_GPU_UNITS, Plan

GPUPLAN_NODE_LABEL = "gpuplan.io/node"  # a Ray node label: which declared node this Ray node is
RAY_NODE_ID_LABEL = "ray.io/node-id"  # Ray's own label on every node (Ray >= 2.49)
KIND_RANK = {"gpu": 0, "offload": 1, "cpu": 2}
POLICY = "serve.app.autoscale:PlanPolicy"  # the Serve autoscaling policy every deployment carries (serve/)
# NOTE: fractional CPUs so that an ingress and several replicas schedule on a 2-core laptop (Ray Serve's own
# controller and proxy also need CPU).
GPU_REPLICA_CPUS = 0.5
CPU_REPLICA_CPUS = 0.5
GRACEFUL_SHUTDOWN_S = 30  # Serve's graceful_shutdown_timeout_s per replica; GHOST_S covers it


@dataclass(frozen=True)
class DeploymentSpec:
    """One Serve deployment: the replicas of one model on one node that share one Ray request."""

    name: str  # Serve deployment name, "<model>@<node>" (".2", ".3" when one node holds several fractions)
    model: str
    node: str
    kind: str  # "gpu" | "offload" (split GPU+CPU) | "cpu"
    units: int  # num_gpus in Ray's 1e-4 units; 0 for a CPU replica
    planned: int  # replicas the plan put there: the deployment's max_replicas
    replica_bytes: int  # GPU bytes of one replica (its GPU share when offloaded); host RAM for a CPU replica
    cpu_bytes: int = 0  # host RAM one replica needs besides (offloaded weights)
    gpu_type: str | None = None
    min_slots: int = 0  # how many of the model's first min_replicas slots (fill order) are this deployment's

    @property
    def num_gpus(self) -> float:
        return round(self.units / RAY_GPU_UNITS, 4)

    def to_json(self) -> dict:
        d = {f: getattr(self, f) for f in _SPEC_FIELDS}  # asdict's result (every field is a scalar), without its copies
        d["num_gpus"] = self.num_gpus
        return d


_SPEC_FIELDS = tuple(f.name for f in fields(DeploymentSpec))


@dataclass(frozen=True)
class NodeLayout:
    """A GPU node as the plan fills it: per GPU (in index order), the deployment of each planned replica."""

    node: str
    gpus: tuple[int, ...]  # GPU indexes on the node (what Ray's get_gpu_ids() reports), in order
    gpu_types: tuple[str | None, ...]
    planned: tuple[tuple[str, ...], ...]  # per GPU: one deployment name per planned replica

    def to_json(self) -> dict:
        return {"node": self.node, "gpus": list(self.gpus), "gpu_types": list(self.gpu_types),
                "planned": [list(p) for p in self.planned]}


@dataclass(frozen=True)
class ModelRule:
    """How one model scales: its bounds and the load that moves it."""

    name: str
    min_replicas: int
    max_replicas: int  # the replicas the plan placed: autoscaling never goes above
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    # "requests": Ray Serve's rule on ongoing requests; "gpuplan": on the SLO and saturation (policy.py signal_want)
    policy: str = "requests"
    max_num_seqs: int = 1  # what one replica's engine runs at once (saturation: more requests than the engines run)
    slo_ttft_p95_s: float | None = None
    slo_tpot_p95_s: float | None = None
    capacity_rps: float | None = None  # requests/s one replica serves within the SLO (the plan's traffic sizing)
    zero_after_s: float | None = None  # min 0: idle seconds before the last replica stops (None: downscale_delay_s)


@dataclass(frozen=True)
class Rollout:
    """Everything the serving side needs to run a plan; travels as JSON (``to_json``/``from_json``)."""

    plan_id: str
    deployments: tuple[DeploymentSpec, ...]
    nodes: tuple[NodeLayout, ...]
    models: tuple[ModelRule, ...]
    fill: tuple[tuple[str, tuple[str, ...]], ...]  # model -> its slots in fill order (a deployment name per slot)
    notes: tuple[str, ...] = ()  # slots the plan has that Ray's best fit cannot reach (see realize())

    def deployment(self, name: str) -> DeploymentSpec:
        return self._by_name()[name]

    def _by_name(self) -> dict[str, DeploymentSpec]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {d.name: d for d in self.deployments}
            object.__setattr__(self, "_cache", cache)
        return cache

    def rule(self, model: str) -> ModelRule:
        return next(m for m in self.models if m.name == model)

    def slots(self, model: str) -> tuple[str, ...]:
        cache = self.__dict__.get("_slots")
        if cache is None:
            cache = dict(self.fill)
            object.__setattr__(self, "_slots", cache)
        return cache[model]

    def layout(self, node: str) -> NodeLayout | None:
        cache = self.__dict__.get("_layouts")
        if cache is None:
            cache = {n.node: n for n in self.nodes}
            object.__setattr__(self, "_layouts", cache)
        return cache.get(node)

    def _group(self, field_name: str) -> dict[str, list[DeploymentSpec]]:
        """Deployments by one of their fields, computed once (the rollout is immutable)."""
        key = f"_by_{field_name}"
        cache = self.__dict__.get(key)
        if cache is None:
            cache = {}
            for d in self.deployments:
                cache.setdefault(getattr(d, field_name), []).append(d)
            object.__setattr__(self, key, cache)
        return cache

    def of_model(self, model: str) -> list[DeploymentSpec]:
        return self._group("model").get(model, [])

    def on_node(self, node: str) -> list[DeploymentSpec]:
        return self._group("node").get(node, [])

    def to_json(self) -> dict:
        return {
            "plan_id": self.plan_id,
            "deployments": [d.to_json() for d in self.deployments],
            "nodes": [n.to_json() for n in self.nodes],
            "models": [asdict(m) for m in self.models],
            "fill_order": {m: list(s) for m, s in self.fill},
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, d: dict) -> "Rollout":
        deps = tuple(DeploymentSpec(**{k: v for k, v in x.items() if k != "num_gpus"}) for x in d["deployments"])
        nodes = tuple(NodeLayout(n["node"], tuple(n["gpus"]), tuple(n["gpu_types"]),
                                 tuple(tuple(p) for p in n["planned"])) for n in d["nodes"])
        models = tuple(ModelRule(**m) for m in d["models"])
        fill = tuple((m, tuple(s)) for m, s in d["fill_order"].items())
        return cls(d["plan_id"], deps, nodes, models, fill, tuple(d.get("notes", ())))


def _plan_id(deployments, nodes, models, fill) -> str:
    body = json.dumps([[d.to_json() for d in deployments], [n.to_json() for n in nodes],
                       [asdict(m) for m in models], fill], sort_keys=True)
    return hashlib.sha1(body.encode()).hexdigest()[:12]


def fill_order(deployments: Sequence[DeploymentSpec]) -> tuple[str, ...]:
    """One model's slots in the order it fills them (module doc): round-robin over its deployments, GPU before
    split before CPU, within a kind the deployment with the most planned replicas first, then by name."""
    out: list[str] = []
    for kind in ("gpu", "offload", "cpu"):
        group = sorted((d for d in deployments if d.kind == kind), key=lambda d: (-d.planned, d.name))
        left = {d.name: d.planned for d in group}
        while any(left.values()):
            for d in group:
                if left[d.name]:
                    out.append(d.name)
                    left[d.name] -= 1
    return tuple(out)


def rollout_from_plan(plan: Plan, rules: Mapping[str, ModelRule] | None = None) -> Rollout:
    """The deployments, node layouts and fill orders of ``plan``. ``rules`` carry each model's autoscaling knobs
    (default: min from the plan, max = the replicas placed, Ray Serve's default delays)."""
    keyed: dict[tuple, dict] = {}  # (model, node, kind, units) -> {"planned", "bytes", "cpu", "type"}
    per_gpu: list[tuple] = []  # (GpuPlan, [key per replica])
    for g in plan.gpus:
        keys = []
        for r in g.replicas:
            kind = "offload" if r.offload else "gpu"
            units = int(round(r.num_gpus * RAY_GPU_UNITS))
            key = (r.model, g.node, kind, units)
            e = keyed.setdefault(key, {"planned": 0, "bytes": r.bytes, "cpu": r.cpu_bytes, "type": g.gpu_type})
            e["planned"] += 1
            e["bytes"] = max(e["bytes"], r.bytes)
            keys.append(key)
        per_gpu.append((g, keys))
    for c in plan.cpu_replicas:
        e = keyed.setdefault((c.model, c.node, "cpu", 0), {"planned": 0, "bytes": c.bytes, "cpu": 0, "type": None})
        e["planned"] += 1
    names: dict[tuple, str] = {}
    by_model_node: dict[tuple, list] = {}
    for key in keyed:
        by_model_node.setdefault(key[:2], []).append(key)
    for (model, node), keys in by_model_node.items():
        keys.sort(key=lambda k: (KIND_RANK[k[2]], -k[3]))
        for i, k in enumerate(keys):
            names[k] = f"{model}@{node}" + (f".{i + 1}" if i else "")
    order = {m.name: i for i, m in enumerate(plan.models)}
    deployments = tuple(sorted(
        (DeploymentSpec(names[k], k[0], k[1], k[2], k[3], e["planned"], e["bytes"], e["cpu"], e["type"])
         for k, e in keyed.items()),
        key=lambda d: (order.get(d.model, 0), KIND_RANK[d.kind], d.node, d.name)))
    layouts: dict[str, list] = {}
    for g, keys in per_gpu:
        layouts.setdefault(g.node, []).append((g.index, g.gpu_type, tuple(names[k] for k in keys)))
    nodes = tuple(
        NodeLayout(node, tuple(i for i, _, _ in sorted(gs)), tuple(t for _, t, _ in sorted(gs)),
                   tuple(p for _, _, p in sorted(gs)))
        for node, gs in layouts.items())
    models = []
    for m in plan.models:
        base = ModelRule(m.name, m.min_replicas, m.placed_replicas)
        r = (rules or {}).get(m.name)
        models.append(replace(r, name=m.name, min_replicas=min(r.min_replicas, m.placed_replicas),
                              max_replicas=m.placed_replicas) if r else base)
    fill = tuple((m.name, fill_order([d for d in deployments if d.model == m.name])) for m in plan.models)
    models_t = tuple(models)
    mins: Counter = Counter()
    for r, (_, slots) in zip(models_t, fill):
        mins.update(slots[:r.min_replicas])
    deployments = tuple(replace(d, min_slots=mins[d.name]) for d in deployments)
    return Rollout(_plan_id(deployments, nodes, models_t, fill), deployments, nodes, models_t, fill)


def deployment_options(spec: DeploymentSpec, entry, selector: Mapping[str, str] | None, plan_id: str) -> dict:
    """The Serve options of one deployment (``entry`` is its model's deploy.yaml entry, ``selector`` the label
    selector of its node): the plan's fraction of the node's GPUs, pinned to the node, bounds [0, planned] and
    gpuplan's policy, which decides every deployment's replicas together. build_app and the KubeRay render both use
    it, so the manifest shows what runs."""
    actor: dict = {"num_cpus": CPU_REPLICA_CPUS if spec.kind == "cpu" else GPU_REPLICA_CPUS}
    if spec.kind == "cpu":
        actor["memory"] = spec.replica_bytes
    else:
        actor["num_gpus"] = spec.num_gpus
    if selector:
        actor["label_selector"] = dict(selector)
    a = entry.autoscaling
    return {
        "name": spec.name,
        "ray_actor_options": actor,
        "autoscaling_config": {
            # min 0 and no Serve-side delays: decide_scale keeps each model's minimum, applies the delays per model
            # and opens each node only as fast as Ray's best fit keeps the plan reachable
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": spec.planned,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
            "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s,
            "policy": {"policy_function": POLICY, "policy_kwargs": {"plan_id": plan_id}},
        },
        "max_ongoing_requests": entry.max_ongoing_requests,
        "max_queued_requests": entry.max_queued_requests,
        "health_check_period_s": entry.health_check_period_s,
        "health_check_timeout_s": 60,
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
