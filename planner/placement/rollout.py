"""How a Plan runs on Ray Serve: its deployments, the order in which replicas start and scale, which Ray node each
plan node is, and whether Ray put every replica where the plan did. Pure functions of plain values; ``serve/``
feeds them what Ray reports (docs/ray-gpu-fractions.md has the measurements behind each rule).

- **One deployment per (model, node, fraction).** Ray Serve gives every replica of a deployment one ``num_gpus``,
  while the plan's fraction depends on the GPU a replica is planned on. So each model gets one deployment per node
  it is planned on, whose ``num_gpus`` is the plan's fraction for that node's GPUs and whose label selector pins it
  to that node (:func:`rollout_from_plan`, :func:`bind_nodes`). Its ``max_replicas`` is the plan's count there.
- **Ray picks the GPU, in arrival order.** Within a node Ray puts a fractional request on the GPU with the least
  room that holds it (best fit, ties to the lowest index; :func:`best_fit`). The fractions keep memory safe whatever
  Ray picks, but the order matters for what still fits: with two GPUs planned as {0.6, 0.4} each, the arrivals
  0.4, 0.4, 0.6, 0.6 put both 0.4s on GPU 0 and leave the second 0.6 pending. :func:`decide_scale` starts a replica
  on a node only when *every* order in which that node's starting replicas can reach Ray lands each of them and
  leaves the node's other planned replicas an order that still fits (:func:`node_gate`). Replicas of one
  deployment are interchangeable, so a node whose starting replicas all belong to one deployment is always safe.
- **A model scales over its slots in a fixed order.** :func:`fill_order`: round-robin over the nodes the model is
  planned on, the node with the most planned replicas first (ties: the node name), GPU slots before split
  GPU+CPU slots before CPU slots; the first ``min_replicas`` slots always run, load adds the next slots and scale-down
  releases the last ones first. A slot whose node gate is closed is skipped for the next one, never forced.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Iterable, Mapping, Sequence

from planner.placement.packing import RAY_GPU_UNITS, Plan

GPUPLAN_NODE_LABEL = "gpuplan.io/node"  # a Ray node label: which declared node this Ray node is
RAY_NODE_ID_LABEL = "ray.io/node-id"  # Ray's own label on every node (Ray >= 2.49)
# NOTE: how long a replica that left Serve's running set may still hold its GPU share: Serve's graceful shutdown
# (graceful_shutdown_timeout_s, 30 s in serve/app.py) plus the actor's exit. Until then the node gate plans both
# for the share being held and for it being free.
GHOST_S = 40.0
# Ghosts per node the gate enumerates (2**k worlds); with more, the node takes no new replica until they expire
# (Serve still restarts the replicas it already has).
MAX_GHOSTS = 4
# States the node gate's searches may visit before it answers "not shown safe".
SEARCH_BUDGET = 2_000
# A settled node (nothing on its way, no ghost) whose gate stays closed gets one deeper search for an order that
# brings up all its planned replicas; its first step is then safe, and so is every next one.
DEEP_SEARCH_BUDGET = 50_000
# States all the searches of one decision may visit together (answers are remembered, so a later decision goes on
# where this one stopped): keeps one decision within tens of milliseconds on the Serve controller.
DECISION_BUDGET = 20_000
# realize(): rounds of lowering unreachable deployments one replica at a time before taking what bring_up reaches
REALIZE_ROUNDS = 12
KIND_RANK = {"gpu": 0, "offload": 1, "cpu": 2}
POLICY = "serve.autoscale:PlanPolicy"  # the Serve autoscaling policy every deployment carries (serve/)
# NOTE: fractional CPUs so that an ingress and several replicas schedule on a 2-core laptop (Ray Serve's own
# controller and proxy also need CPU).
GPU_REPLICA_CPUS = 0.5
CPU_REPLICA_CPUS = 0.5
GRACEFUL_SHUTDOWN_S = 30  # Serve's graceful_shutdown_timeout_s per replica; GHOST_S covers it
# The node gate's searches remember their answers (keyed by sorted rooms and replica counts, so a hit is exact);
# the memory is dropped when it holds more than this many.
MEMO_MAX = 500_000
_MEMO: dict = {}
# Tests set this: decide_scale then recounts, at every gate, what it keeps incrementally (replicas asked for per
# model, models below their minimum) and raises if the two differ, so the incremental bookkeeping is shown to give
# the decisions that a recount at every step gives.
VERIFY_BOOKKEEPING = False


# ----------------------------------------------------------------------------------------------------------------
# What the plan becomes on Ray


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


# ----------------------------------------------------------------------------------------------------------------
# Ray's GPU choice, and the node gate


def best_fit(rooms: Sequence[int], units: int) -> int | None:
    """The GPU Ray gives a request of ``units`` on a node whose GPUs have ``rooms`` free (1e-4 units): the one with
    the least room that holds it, ties to the lowest index (raylet ``resource_instance_set.cc``, measured in
    docs/ray-gpu-fractions.md). None when no GPU holds it: the request stays pending."""
    best = None
    for i, r in enumerate(rooms):
        if r >= units and (best is None or r < rooms[best]):
            best = i
    return best


class _TooBig(Exception):
    def __init__(self, pool: bool = False):
        super().__init__()
        self.pool = pool  # the decision's shared pool ran out (retry later), not this search's own budget


class _Budget:
    """States a search may visit; ``pool`` is the whole decision's (shared by its searches)."""

    def __init__(self, n: int, pool: "_Budget | None" = None):
        self.left = n
        self.pool = pool

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooBig()
        if self.pool is not None:
            self.pool.left -= 1
            if self.pool.left < 0:
                raise _TooBig(pool=True)


# all_land's states live in one sub-dictionary per (sizes, phases) inside _MEMO (cheaper keys); _MEMO_SUB counts
# [sub-dictionaries, their entries] so that the memo is cleared at the same size as if they were top-level keys.
_MEMO_SUB = [0, 0]


def _memo() -> dict:
    if not _MEMO:  # cleared from outside (a benchmark's cold start)
        _MEMO_SUB[0] = _MEMO_SUB[1] = 0
    if len(_MEMO) - _MEMO_SUB[0] + _MEMO_SUB[1] > MEMO_MAX:
        _MEMO.clear()
        _MEMO_SUB[0] = _MEMO_SUB[1] = 0
    return _MEMO


class _Search:
    """Best-fit searches over one node's states. A state is the GPUs' free units as a sorted tuple (GPUs with equal
    room are interchangeable) and, per phase, a count per replica size (``classes``, largest first)."""

    def __init__(self, classes: Sequence[int], budget: _Budget):
        self.classes = tuple(classes)
        self.budget = budget
        self.memo = _memo()

    @staticmethod
    def place(rooms: tuple, u: int) -> tuple | None:
        i = bisect.bisect_left(rooms, u)  # the least room that holds u: Ray's best fit
        if i == len(rooms):
            return None
        room = rooms[i] - u  # below rooms[i]: it moves left (the rooms stay sorted)
        j = bisect.bisect_left(rooms, room, 0, i)
        return rooms[:j] + (room,) + rooms[j:i] + rooms[i + 1:]

    @staticmethod
    def waste(rooms: tuple, u: int) -> int:
        """Room left on the GPU best fit gives ``u`` (more than a GPU when none holds it)."""
        i = bisect.bisect_left(rooms, u)
        return rooms[i] - u if i < len(rooms) else RAY_GPU_UNITS + 1

    def greedy(self, rooms: tuple, phases: tuple, tight: bool) -> bool:
        """Largest first (best fit decreasing), or the step that leaves its GPU the least room, phase by phase."""
        place, classes = self.place, self.classes
        for counts in phases:
            if not tight:  # largest first: each size's replicas one after another, by best fit
                for k, n in enumerate(counts):
                    for _ in range(n):
                        rooms = place(rooms, classes[k])
                        if rooms is None:
                            return False
                continue
            left = list(counts)
            while any(left):  # the step that leaves its GPU the least room (the larger on a tie)
                w, _, k = min((self.waste(rooms, u), -u, k) for k, u in enumerate(classes) if left[k])
                if w > RAY_GPU_UNITS:
                    return False
                rooms = place(rooms, classes[k])
                left[k] -= 1
        return True

    def _steps(self, rooms: tuple, counts: tuple) -> list[int]:
        """Class indexes to try next, the one leaving the least room first."""
        return sorted((k for k in range(len(counts)) if counts[k]),
                      key=lambda k: (self.waste(rooms, self.classes[k]), -self.classes[k]))

    def order(self, rooms: tuple, phases: tuple) -> tuple | None:
        """Units of each step of an order that lands every replica of ``phases`` (phase by phase), or None."""
        while phases and not any(phases[0]):
            phases = phases[1:]
        if not phases:
            return ()
        key = ("o", self.classes, rooms, phases)
        if key in self.memo:
            return self.memo[key]
        self.budget.spend()
        found = None
        for k in self._steps(rooms, phases[0]):
            nxt = self.place(rooms, self.classes[k])
            if nxt is None:
                continue
            head = phases[0][:k] + (phases[0][k] - 1,) + phases[0][k + 1:]
            rest = self.order(nxt, (head,) + phases[1:])
            if rest is not None:
                found = (self.classes[k],) + rest
                break
        self.memo[key] = found
        return found

    def completes(self, rooms: tuple, phases: tuple) -> bool:
        while phases and not any(phases[0]):
            phases = phases[1:]
        if not phases:
            return True
        key = ("c", self.classes, rooms, phases)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        ok = self.greedy(rooms, phases, False) or self.greedy(rooms, phases, True) or \
            self.order(rooms, phases) is not None
        self.memo[key] = ok
        return ok

    def all_land(self, rooms: tuple, arriving: tuple, phases: tuple | None) -> bool:
        """Every order of ``arriving`` lands each, and then (``phases`` not None) ``phases`` can still land."""
        left = sum(arriving)
        if not left:
            return phases is None or self.completes(rooms, phases)
        sub_key = ("a", self.classes, phases)
        states = self.memo.get(sub_key)
        if states is None:
            states = self.memo[sub_key] = {}
            _MEMO_SUB[0] += 1
        ids = _ids(self.memo, self.classes)
        rid, aid = ids.rooms_id(rooms), ids.arriving_id(arriving)
        hit = states.get(rid << 32 | aid)
        if hit is not None:
            return hit
        return self._all_land(rid, aid, left, phases, states, ids)

    def _all_land(self, rid: int, aid: int, left: int, phases: tuple | None, states: dict, ids: "_Ids") -> bool:
        """all_land of a state not in ``states`` (rooms ``rid``, arriving ``aid``, ``left`` replicas arriving > 0);
        children found in ``states`` are read there without a call."""
        self.budget.spend()
        ok = True
        steps = ids.steps[rid]
        kids = ids.kids[aid]
        if kids is None:
            kids = ids.arrivals(aid)
        for u, child in kids:  # each size with a replica arriving, largest first
            nxt = steps.get(u)
            if nxt is None:
                nxt = ids.step(rid, u)
            if nxt < 0:  # no GPU holds it
                ok = False
                break
            if left > 1:
                hit = states.get(nxt << 32 | child)
                if hit is None:
                    hit = self._all_land(nxt, child, left - 1, phases, states, ids)
                if not hit:
                    ok = False
                    break
            elif phases is not None and not self.completes(ids.rooms[nxt], phases):
                ok = False
                break
        states[rid << 32 | aid] = ok
        _MEMO_SUB[1] += 1
        return ok


class _Ids:
    """all_land's states as one int each (``rooms id << 32 | arriving id``), with every step from a state worked
    out once: the node's rooms (sorted tuples) and the arriving counts (tuples over one list of sizes) numbered as
    first met, best fit's move for each (rooms, size) and the one-fewer counts for each (counts, size) remembered.
    The same states in the same order as searching on the tuples themselves, without building tuples per step."""

    def __init__(self, classes: tuple):
        self.classes = classes
        self.rooms_ids: dict[tuple, int] = {}
        self.rooms: list[tuple] = []
        self.steps: list[dict[int, int]] = []  # per rooms id: size -> rooms id after best fit places it (-1: none)
        self.arr_ids: dict[tuple, int] = {}
        self.arr: list[tuple] = []
        self.kids: list[list | None] = []  # per arriving id: [(size, arriving id with one fewer)], largest first

    def rooms_id(self, rooms: tuple) -> int:
        i = self.rooms_ids.get(rooms)
        if i is None:
            i = self.rooms_ids[rooms] = len(self.rooms)
            self.rooms.append(rooms)
            self.steps.append({})
        return i

    def arriving_id(self, arriving: tuple) -> int:
        i = self.arr_ids.get(arriving)
        if i is None:
            i = self.arr_ids[arriving] = len(self.arr)
            self.arr.append(arriving)
            self.kids.append(None)
        return i

    def known_key(self, rooms: tuple, arriving: tuple) -> int | None:
        """The state's int when both parts were numbered already, else None (a state never met); numbers nothing."""
        rid, aid = self.rooms_ids.get(rooms), self.arr_ids.get(arriving)
        return None if rid is None or aid is None else rid << 32 | aid

    def step(self, rid: int, u: int) -> int:
        """The rooms id after best fit places ``u`` on rooms ``rid`` (-1: no GPU holds it); remembered."""
        rooms = self.rooms[rid]
        i = bisect.bisect_left(rooms, u)  # _Search.place, inline
        if i == len(rooms):
            self.steps[rid][u] = -1
            return -1
        room = rooms[i] - u
        j = bisect.bisect_left(rooms, room, 0, i)
        nxt = rooms[:j] + (room,) + rooms[j:i] + rooms[i + 1:]
        n = self.rooms_ids.get(nxt)
        if n is None:
            n = self.rooms_ids[nxt] = len(self.rooms)
            self.rooms.append(nxt)
            self.steps.append({})
        self.steps[rid][u] = n
        return n

    def arrivals(self, aid: int) -> list:
        kids = self.kids[aid]
        if kids is None:
            a = self.arr[aid]
            kids = self.kids[aid] = [(self.classes[k], self.arriving_id(a[:k] + (n - 1,) + a[k + 1:]))
                                     for k, n in enumerate(a) if n]
        return kids


def _ids(memo: dict, classes: tuple) -> _Ids:
    """The memo's state numbering for ``classes`` (kept with the states it numbers; cleared with them)."""
    ids = memo.get(("ids", classes))
    if ids is None:
        ids = memo[("ids", classes)] = _Ids(classes)
        _MEMO_SUB[0] += 1  # not a state: kept out of the memo's size, as the sub-dictionaries
    return ids


def _class_vectors(*maps) -> tuple[tuple[int, ...], list[tuple]]:
    """(replica sizes with a nonzero count in any of ``maps``, largest first; per map, its counts in that order)."""
    counts = []
    for m in maps:
        if not m:
            counts.append({})
            continue
        items = m.items() if hasattr(m, "items") else dict(m).items()
        counts.append({int(u): int(n) for u, n in items if n})
    classes = tuple(sorted({u for d in counts for u in d}, reverse=True))
    zeros = (0,) * len(classes)
    return classes, [tuple(map(d.get, classes, zeros)) for d in counts]


def _plus(a: Mapping[int, int], b: Mapping[int, int]) -> Counter:
    """Two count maps added (positive counts only, as Counters add)."""
    out = Counter(a)
    out.update(b)
    return +out


def node_gate(rooms: Sequence[int], arriving: Mapping[int, int], remaining: Mapping[int, int] = (),
              ghosts: Sequence[tuple[int, int]] = (), *, later: Mapping[int, int] = (), complete: bool = True,
              budget: int = SEARCH_BUDGET, pool: _Budget | None = None) -> bool:
    """May these replicas be on their way to one node at once?

    ``rooms``: each GPU's free units counting the replicas known to hold it; ``arriving``: units -> how many
    replicas have no known GPU yet (starting, or running but not yet reported, plus the ones to start now);
    ``remaining``: units -> planned replicas of the node not yet asked for, and ``later`` those that may only be
    asked for after all of ``remaining`` (extra replicas after the minimums); ``ghosts``: (GPU position, units) of
    replicas that stopped recently and may still hold their share. True when, whichever ghosts still hold and in
    whatever order the arriving replicas reach Ray, each lands (best fit) and, with ``complete``, the remaining ones
    can still land afterwards in some order. A search past ``budget`` states answers False (not shown safe); one
    that exhausts ``pool`` (a decision's shared allowance) answers False without remembering it."""
    ghosts = list(ghosts)
    if len(ghosts) > MAX_GHOSTS:
        return False
    classes, (arr, first, then) = _class_vectors(arriving, remaining, later)
    return _gate(rooms, classes, arr, (first, then) if complete else None, ghosts, budget, pool)


def _gate(rooms: Sequence[int], classes: tuple, arr: tuple, phases: tuple | None, ghosts: list, budget: int,
          pool: _Budget | None) -> bool:
    """:func:`node_gate` on count vectors over ``classes`` (at most MAX_GHOSTS ``ghosts``)."""
    memo = _memo()
    top = ("gate", classes, tuple(rooms), arr, phases, tuple(sorted(ghosts)), budget)
    if top in memo:
        return memo[top]
    if pool is not None and pool.left <= 0 < budget and any(arr):
        return _gate_remembered(rooms, classes, arr, phases, ghosts, memo, top)
    return _gate_search(rooms, classes, arr, phases, ghosts, budget, pool, memo, top)


def _worlds(rooms: Sequence[int], ghosts: list) -> Iterable[tuple]:
    """The node's rooms (sorted) for each subset of the ghosts still holding their share that Ray can hold at once."""
    for held in itertools.product((False, True), repeat=len(ghosts)):
        world = list(rooms)
        for (pos, units), h in zip(ghosts, held):
            if h:
                world[pos] -= units
        if min(world, default=0) >= 0:
            yield tuple(sorted(world))


def _gate_search(rooms, classes, arr, phases, ghosts, budget, pool, memo, top) -> bool:
    search = _Search(classes, _Budget(budget, pool))
    try:
        for world in _worlds(rooms, ghosts):
            if not search.all_land(world, arr, phases):
                memo[top] = False
                return False
    except _TooBig as exc:
        if not exc.pool:
            memo[top] = False
        return False
    memo[top] = True
    return True


def _gate_remembered(rooms, classes, arr, phases, ghosts, memo, top) -> bool:
    """The gate once the decision's allowance is spent: every search would stop at its first new state (the pool
    exception, answer False, nothing remembered), so only remembered states answer; the same answer, and the same
    entries remembered, as :func:`_gate_search` (without raising and catching at every closed gate)."""
    states = memo.get(("a", classes, phases))
    ids = memo.get(("ids", classes))
    for world in _worlds(rooms, ghosts):
        key = None if ids is None or states is None else ids.known_key(world, arr)
        hit = None if key is None else states.get(key)
        if hit is None:
            return False  # a new state: the search would have raised the pool's exception
        if not hit:
            memo[top] = False
            return False
    memo[top] = True
    return True


def completion_order(rooms: Sequence[int], remaining: Mapping[int, int], *, later: Mapping[int, int] = (),
                     budget: int = DEEP_SEARCH_BUDGET, pool: _Budget | None = None) -> tuple[int, ...] | None:
    """An order (the units of each replica, one at a time) in which a node whose GPUs have ``rooms`` free can start
    ``remaining`` and then ``later`` so that Ray's best fit lands every one; None when none was found within
    ``budget`` states (raises the budget's exception when ``pool``, the decision's allowance, ran out first). Each
    order found is remembered by its state, so following it step by step costs nothing."""
    classes, (first, then) = _class_vectors(remaining, later)
    memo = _memo()
    top = ("order", classes, tuple(sorted(rooms)), first, then, budget)
    if top in memo:
        return memo[top]
    if pool is not None and pool.left <= 0 < budget:  # the allowance is spent: only a remembered order answers
        phases = tuple(itertools.dropwhile(lambda c: not any(c), (first, then)))
        found = memo.get(("o", classes, top[2], phases), False) if phases else ()
        if found is False:
            raise _TooBig(pool=True)
        memo[top] = found
        return found
    try:
        found = _Search(classes, _Budget(budget, pool)).order(tuple(sorted(rooms)), (first, then))
    except _TooBig as exc:
        if exc.pool:
            raise  # the decision's allowance ran out: not an answer, ask again next decision
        found = None
    memo[top] = found
    return found


def _greedy_count(rooms: Sequence[int], remaining: Mapping[int, int]) -> int:
    """How many of ``remaining`` the better of largest-first and tightest-first lands (the rest left out)."""
    classes, (counts,) = _class_vectors(remaining)
    best = 0
    for tight in (False, True):
        r, left, n = tuple(sorted(rooms)), list(counts), 0
        while True:
            cands = [(_Search.waste(r, u), -u, k) for k, u in enumerate(classes) if left[k]]
            cands = [c for c in cands if c[0] <= RAY_GPU_UNITS]
            if not cands:
                break
            k = min(cands)[2] if tight else min(cands, key=lambda c: c[1])[2]
            r = _Search.place(r, classes[k])
            left[k] -= 1
            n += 1
        best = max(best, n)
    return best


def no_regret(rooms: Sequence[int], units: int, remaining: Mapping[int, int]) -> bool:
    """On a settled node where no order bringing up every planned replica was found: a step of ``units`` is still
    taken when it lands and, after it, the greedy orders land as many of the other planned replicas as they would
    have landed with it among them (it costs no other replica a place that greedy could give it)."""
    i = best_fit(rooms, units)
    if i is None:
        return False
    before = _greedy_count(rooms, Counter(dict(remaining)) + Counter({units: 1}))
    after = list(rooms)
    after[i] -= units
    return 1 + _greedy_count(after, remaining) >= before


# ----------------------------------------------------------------------------------------------------------------
# Scaling: one decision for every deployment of the app, from what Serve reports


@dataclass(frozen=True)
class DeploymentObs:
    """What Serve says about one deployment (its autoscaling context)."""

    target: int  # Serve's current target replicas
    running: tuple[tuple[str, int | None], ...] = ()  # (replica id, GPU index Ray gave it; None until reported)
    load: float = 0.0  # ongoing requests, Serve's total_num_requests


@dataclass(frozen=True)
class Ghost:
    node: str
    gpu: int  # GPU index
    units: int
    until: float  # after this time the share is surely free


@dataclass(frozen=True)
class ScaleMemory:
    """What the decision carries between calls (Serve keeps none of it for us)."""

    goal: Mapping[str, int] = field(default_factory=dict)  # model -> replicas it should run
    since_up: Mapping[str, float] = field(default_factory=dict)  # model -> when it first wanted more
    since_down: Mapping[str, float] = field(default_factory=dict)
    applied: Mapping[str, int] = field(default_factory=dict)  # deployment -> target last handed to Serve
    seen: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)  # deployment -> replica -> GPU
    ghosts: tuple[Ghost, ...] = ()
    # deployment -> (replicas started out of turn to shape a node, when they stop being kept; None: not yet known)
    scaffold: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelScale:
    model: str
    load: float
    want: int  # replicas the load asks for, within [min, max]
    goal: int  # replicas decided (after delays)
    placed: int  # slots given this call (below goal when node gates are closed)
    why: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScaleDecision:
    targets: Mapping[str, int]  # deployment -> replicas
    models: tuple[ModelScale, ...]
    waits: tuple[str, ...]  # slots skipped because their node gate was closed, with why
    memory: ScaleMemory

    def to_json(self) -> dict:
        return {"targets": dict(self.targets), "models": [m.to_json() for m in self.models],
                "waits": list(self.waits)}


def observe(rollout: Rollout, memory: ScaleMemory, name: str, obs: DeploymentObs, now: float,
            ghost_s: float = GHOST_S) -> ScaleMemory:
    """Record one deployment's running replicas: the GPU each reported (kept when a report lags) and, for a replica
    that left the running set, a ghost that may hold its GPU share for ``ghost_s``."""
    spec = rollout._by_name().get(name)
    before = dict(memory.seen.get(name, {}))
    now_seen = {}
    for rid, gpu in obs.running:
        now_seen[rid] = gpu if gpu is not None else before.get(rid)
    ghosts = [g for g in memory.ghosts if g.until > now]
    if spec is not None and spec.kind != "cpu":
        for rid, gpu in before.items():
            if rid not in now_seen and gpu is not None:
                ghosts.append(Ghost(spec.node, int(gpu), spec.units, now + ghost_s))
    seen = dict(memory.seen)
    seen[name] = now_seen
    return replace(memory, seen=seen, ghosts=tuple(ghosts))


def _want(rule: ModelRule, load: float) -> int:
    w = math.ceil(load / rule.target_ongoing_requests - 1e-9) if load > 0 else 0
    return max(rule.min_replicas, min(rule.max_replicas, w))


def _goal(rule: ModelRule, want: int, now: float, goal: dict, up: dict, down: dict, current: int = 0) -> str:
    """Move the model's goal to ``want`` once it has wanted it for the delay (up and down timed apart); returns
    why, in words. ``goal``/``up``/``down`` are updated in place. A model without a goal yet (a fresh board, e.g.
    after Serve's controller restarted) starts from the ``current`` replicas Serve runs, so nothing drops at once."""
    m = rule.name
    g = max(goal.get(m, min(current, rule.max_replicas)), rule.min_replicas)
    why = "steady"
    if want == g:
        up.pop(m, None)
        down.pop(m, None)
    else:
        rising = want > g
        since, other = (up, down) if rising else (down, up)
        delay, word = (rule.upscale_delay_s, "up") if rising else (rule.downscale_delay_s, "down")
        other.pop(m, None)
        t0 = since.setdefault(m, now)
        if now - t0 >= delay - 1e-9:
            g, why = want, f"scale {word} to {want}"
            since.pop(m, None)
        else:
            why = f"wants {want}, waiting {delay - (now - t0):.1f}s more ({word}scale_delay_s)"
    goal[m] = g
    return why


class _NodeState:
    """One node during a decision: known rooms, replicas with no known GPU, ghosts, and the steps added so far."""

    def __init__(self, layout: NodeLayout):
        self.layout = layout
        self.pos = {g: i for i, g in enumerate(layout.gpus)}
        self.rooms = [RAY_GPU_UNITS] * len(layout.gpus)
        self.unknown: Counter = Counter()
        self.ghosts: list[tuple[int, int]] = []
        self.new: Counter = Counter()


def decide_scale(rollout: Rollout, obs: Mapping[str, DeploymentObs], memory: ScaleMemory, now: float) -> ScaleDecision:
    """The replicas every deployment should run now.

    Per model: ``want`` = ceil(load / target_ongoing_requests) within [min, max] (Ray Serve's rule, summed over the
    model's deployments), moved into ``goal`` after upscale/downscale delays (at once up to ``min``). The goal is
    spread over the model's slots in fill order: slots already asked for are kept, a new slot is taken when its
    node gate is open (:func:`node_gate`, with every deployment's starting, unreported and newly asked replicas on
    that node), and skipped otherwise; scale-down drops the last slots. Every model's ``min`` is placed before any
    model's extra replicas; a minimum slot whose gate is closed only by the completion test still starts (the model
    must run), with a line in ``waits``."""
    goal, up, down = dict(memory.goal), dict(memory.since_up), dict(memory.since_down)
    ghosts = [g for g in memory.ghosts if g.until > now]
    baseline = {}
    for d in rollout.deployments:
        o = obs.get(d.name)
        baseline[d.name] = min(d.planned, max(memory.applied.get(d.name, 0), o.target if o else 0))
    nodes: dict[str, _NodeState] = {n.node: _NodeState(n) for n in rollout.nodes}
    for d in rollout.deployments:
        st = nodes.get(d.node)
        if d.kind == "cpu" or st is None:
            continue
        o = obs.get(d.name)
        seen = memory.seen.get(d.name, {})
        running = list(o.running) if o else []
        for rid, gpu in running:
            gpu = gpu if gpu is not None else seen.get(rid)
            if gpu is not None and int(gpu) in st.pos:
                st.rooms[st.pos[int(gpu)]] -= d.units
            else:
                st.unknown[d.units] += 1
        starting = max(0, baseline[d.name] - len(running))
        st.unknown[d.units] += starting
    for g in ghosts:
        st = nodes.get(g.node)
        if st is not None and g.gpu in st.pos:
            st.ghosts.append((st.pos[g.gpu], g.units))

    alloc = {d.name: 0 for d in rollout.deployments}
    waits: list[str] = []
    work = _Budget(DECISION_BUDGET)
    scales = {}
    models = [r for r in rollout.models]
    for r in models:
        load = sum(obs[d.name].load for d in rollout.of_model(r.name) if d.name in obs)
        want = _want(r, load)
        why = _goal(r, want, now, goal, up, down, sum(baseline[d.name] for d in rollout.of_model(r.name)))
        scales[r.name] = [load, want, why]

    # replicas asked for per model (sum over its deployments of max(baseline, alloc)) and the models still below
    # their minimum, kept up to date by bump() instead of recounted at every gate (a 500-GPU plan asks millions)
    asked_n: dict[str, int] = {}
    short: set[str] = set()
    model_of = {d.name: d.model for d in rollout.deployments}
    min_of = {r.name: r.min_replicas for r in models}

    def recount() -> None:
        asked_n.clear()
        for d in rollout.deployments:
            asked_n[d.model] = asked_n.get(d.model, 0) + max(baseline[d.name], alloc[d.name])
        short.clear()
        short.update(r.name for r in models if asked_n.get(r.name, 0) < r.min_replicas)

    def bump(name: str, k: int) -> None:
        before = max(baseline[name], alloc[name])
        alloc[name] += k
        delta = max(baseline[name], alloc[name]) - before
        if delta:
            m = model_of[name]
            asked_n[m] = asked_n.get(m, 0) + delta
            if asked_n[m] < min_of.get(m, 0):
                short.add(m)
            else:
                short.discard(m)

    def verify() -> None:
        fresh: dict[str, int] = {}
        for d in rollout.deployments:
            fresh[d.model] = fresh.get(d.model, 0) + max(baseline[d.name], alloc[d.name])
        below = {r.name for r in models if fresh.get(r.name, 0) < r.min_replicas}
        if {m: n for m, n in fresh.items() if n} != {m: n for m, n in asked_n.items() if n} or below != short:
            raise AssertionError(f"rollout bookkeeping drifted: asked {asked_n} vs {fresh}, short {short} vs {below}")

    node_rows: dict[str, list[tuple]] = {}  # node -> its GPU deployments' fixed fields, read once

    def remaining(node: str) -> tuple[dict[int, int], dict[int, int]]:
        """The node's planned replicas not asked for yet, units -> count (positive counts only): (minimum slots of
        models still below their minimum, the rest)."""
        if VERIFY_BOOKKEEPING:
            verify()
        rows = node_rows.get(node)
        if rows is None:
            rows = node_rows[node] = [(d.name, d.model, d.units, d.min_slots, d.planned)
                                      for d in rollout.on_node(node) if d.kind != "cpu"]
        first: dict[int, int] = {}
        then: dict[int, int] = {}
        for name, model, units, min_slots, planned in rows:
            b, c = baseline[name], alloc[name]
            a = b if b > c else c
            if min_slots > a and model in short:
                first[units] = first.get(units, 0) + min_slots - a
                a = min_slots
            if planned > a:
                then[units] = then.get(units, 0) + planned - a
        return first, then

    def gate(d: DeploymentSpec, complete: bool) -> bool:
        st = nodes[d.node]
        arriving: dict[int, int] = {}  # st.unknown + st.new + this step, as Counters add (positive counts only)
        for c in (st.unknown, st.new):
            for u, n in c.items():
                if n > 0:
                    arriving[u] = arriving.get(u, 0) + n
        arriving[d.units] = arriving.get(d.units, 0) + 1
        bump(d.name, 1)  # the step counts as asked for in `remaining`
        try:
            first, then = remaining(d.node)
            if node_gate(st.rooms, arriving, first, st.ghosts, later=then, complete=complete, pool=work):
                return True
        finally:
            bump(d.name, -1)
        if not complete or any(st.unknown.values()) or any(st.new.values()) or st.ghosts:
            return False
        first, then = remaining(d.node)
        try:
            order = completion_order(st.rooms, first, later=then, pool=work)
            if order is not None:
                return bool(order) and order[0] == d.units
            if completion_order(st.rooms, {}, later=_plus(first, then), pool=work) is not None:
                return False  # a mixed order exists: the minimum pass shapes the node instead
        except _TooBig:
            return False  # this decision's search allowance is spent: the next decision goes on
        rest = _plus(first, then)
        rest[d.units] -= 1
        return no_regret(st.rooms, d.units, rest)

    def settled(st: _NodeState) -> bool:
        return not (any(st.unknown.values()) or any(st.new.values()) or st.ghosts)

    def shape(r: ModelRule, d: DeploymentSpec) -> str:
        """A minimum slot whose node cannot start every minimum first in an order best fit follows: take the first
        step of an order that brings up all the node's planned replicas, minimums and extras mixed. "take" when that
        step is this slot; "shaped" when it started another deployment's planned replica out of turn (a scaffold)
        and this slot waits for the next decision; "wait" when the decision's search allowance ran out; "none" when
        no such order was found."""
        st = nodes[d.node]
        first, then = remaining(d.node)
        try:
            order = completion_order(st.rooms, {}, later=_plus(first, then), pool=work)
        except _TooBig:
            return "wait"
        if not order:
            return "none"
        if order[0] == d.units:
            return "take"
        e = next((x for x in rollout.on_node(d.node) if x.kind != "cpu" and x.units == order[0]
                  and max(baseline[x.name], alloc[x.name]) < x.planned), None)
        if e is None:
            return "none"
        bump(e.name, 1)
        st.new[e.units] += 1
        n, _ = scaffold.get(e.name, (0, None))
        scaffold[e.name] = (n + 1, None)
        waits.append(f"{r.name}: on {d.node} a replica of {e.model} starts first (out of turn) so that Ray's "
                     "best fit leaves room for every planned replica there")
        return "shaped"

    def take(r: ModelRule, limit: int, complete: bool) -> None:
        count = sum(alloc[d.name] for d in rollout.of_model(r.name))
        passed: Counter = Counter()
        for name in rollout.slots(r.name):
            if count >= limit:
                return
            j = passed[name]
            passed[name] += 1
            if j != alloc[name]:
                continue  # taken already, or an earlier slot of this deployment was skipped
            d = rollout.deployment(name)
            if not (j < baseline[name] or d.kind == "cpu" or d.node not in nodes):
                st = nodes[d.node]
                if not complete and not settled(st):
                    continue  # not settled: waiting may open the gate, so do not force it yet
                if not gate(d, complete):
                    if complete:
                        waits.append(f"{r.name}: slot on {d.node} waits: a replica started there now could leave "
                                     "a planned replica of the node without a GPU")
                    continue
                if not complete:
                    how = shape(r, d)
                    if how in ("shaped", "wait"):
                        continue  # a replica started out of turn instead, or the next decision goes on
                    if how == "none":
                        waits.append(f"{r.name}: starting a minimum replica on {d.node} although the node's other "
                                     "planned replicas may then not all fit")
                st.new[d.units] += 1
            bump(name, 1)
            count += 1

    # replicas started out of turn stay until their node's minimums run, then for their model's downscale delay
    scaffold = {}
    for name, (n, until) in memory.scaffold.items():
        if until is not None and now >= until:
            continue
        d = rollout._by_name().get(name)
        if d is None:
            continue
        scaffold[name] = (n, until)
        alloc[name] = min(max(alloc[name], n), d.planned)
        if d.node in nodes and alloc[name] > baseline[name]:
            nodes[d.node].new[d.units] += alloc[name] - baseline[name]  # asked for, not yet handed to Serve
    recount()
    for r in models:  # every model's minimum, keeping every node completable
        take(r, min(goal[r.name], r.min_replicas), True)
    for r in models:  # a minimum that cannot be had that way, on a settled node, starts where it lands
        take(r, min(goal[r.name], r.min_replicas), False)
    for r in models:
        take(r, goal[r.name], True)

    for name, (n, until) in list(scaffold.items()):
        d = rollout.deployment(name)
        st = nodes[d.node]
        if until is None and settled(st) and not any(remaining(d.node)[0].values()):
            scaffold[name] = (n, now + rollout.rule(d.model).downscale_delay_s)
    out_models = []
    for r in models:
        load, want, why = scales[r.name]
        placed = sum(alloc[d.name] for d in rollout.of_model(r.name))
        if placed < goal[r.name]:
            why += f"; {goal[r.name] - placed} slot(s) waiting for a node gate"
        out_models.append(ModelScale(r.name, round(load, 3), want, goal[r.name], placed, why))
    mem = replace(memory, goal=goal, since_up=up, since_down=down, ghosts=tuple(ghosts), scaffold=scaffold)
    return ScaleDecision(alloc, tuple(out_models), tuple(dict.fromkeys(waits)), mem)


def applied(memory: ScaleMemory, name: str, target: int) -> ScaleMemory:
    """Record the target handed to Serve for one deployment."""
    a = dict(memory.applied)
    a[name] = target
    return replace(memory, applied=a)


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


# ----------------------------------------------------------------------------------------------------------------
# Routing a request to one of a model's deployments


def pick_deployment(cands: Sequence[tuple[str, int, int]], rand: Callable[[], float]) -> str | None:
    """Power of two choices over ``(deployment, running replicas, requests in flight)``: two distinct deployments
    with running replicas drawn at random, the one with fewer requests in flight per running replica wins (ties:
    the first drawn). None when no deployment has a running replica."""
    live = [c for c in cands if c[1] > 0]
    if not live:
        return None
    if len(live) == 1:
        return live[0][0]
    i = min(int(rand() * len(live)), len(live) - 1)
    j = min(int(rand() * (len(live) - 1)), len(live) - 2)
    if j >= i:
        j += 1
    score = lambda c: (c[2] + 1) / c[1]  # noqa: E731
    return live[j][0] if score(live[j]) < score(live[i]) else live[i][0]


# ----------------------------------------------------------------------------------------------------------------
# Which Ray node is which plan node


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


# ----------------------------------------------------------------------------------------------------------------
# Where Ray put the replicas, against the plan


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
