"""Scaling: one decision for every deployment of the app, from what Serve reports: each model's goal (policy.py)
spread over its slots in fill order, a new slot taken only when its node gate (gate.py) is open."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from planner.placement.packing import RAY_GPU_UNITS
from planner.rollout.deployments import DeploymentSpec, ModelRule, NodeLayout, Rollout
from planner.rollout.gate import (DECISION_BUDGET, GHOST_S, _Budget, _plus, _TooBig, completion_order, no_regret,
                                  node_gate)
from planner.rollout.policy import ModelSignals, desired_replicas, move_goal, signal_want

# Tests set this: decide_scale then recounts, at every gate, what it keeps incrementally (replicas asked for per
# model, models below their minimum) and raises if the two differ, so the incremental bookkeeping is shown to give
# the decisions that a recount at every step gives.
VERIFY_BOOKKEEPING = False


@dataclass(frozen=True)
class DeploymentObs:
    """What Serve says about one deployment (its autoscaling context)."""

    target: int  # Serve's current target replicas
    running: tuple[tuple[str, int | None], ...] = ()  # (replica id, GPU index Ray gave it; None until reported)
    load: float = 0.0  # ongoing requests: Serve's total_num_requests and the direct stream's
    # what the replicas measured (their autoscaling metrics; policy.py ModelSignals says how they combine)
    waiting: float = 0.0
    kv_usage: float = 0.0
    ttft_p95_s: float | None = None
    tpot_p95_s: float | None = None
    requests_per_s: float = 0.0


def model_signals(deployments: list[DeploymentObs]) -> ModelSignals:
    """One model's signals from its deployments' observations: sums, and the worst of the per-replica figures."""
    def worst(xs):
        xs = [x for x in xs if x is not None]
        return max(xs) if xs else None

    return ModelSignals(replicas=sum(len(o.running) for o in deployments), load=sum(o.load for o in deployments),
                        waiting=sum(o.waiting for o in deployments),
                        kv_usage=max((o.kv_usage for o in deployments), default=0.0),
                        ttft_p95_s=worst(o.ttft_p95_s for o in deployments),
                        tpot_p95_s=worst(o.tpot_p95_s for o in deployments),
                        requests_per_s=sum(o.requests_per_s for o in deployments))


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


class _NodeState:
    """One node during a decision: known rooms, replicas with no known GPU, ghosts, and the steps added so far."""

    def __init__(self, layout: NodeLayout):
        self.layout = layout
        self.pos = {g: i for i, g in enumerate(layout.gpus)}
        self.rooms = [RAY_GPU_UNITS] * len(layout.gpus)
        self.unknown: Counter = Counter()
        self.ghosts: list[tuple[int, int]] = []
        self.new: Counter = Counter()


class _Decision:
    """One scaling decision in progress: what each deployment is asked for (``alloc``, over Serve's ``baseline``), each
    node's state, the replicas asked per model and the models still below their minimum (kept up to date by ``bump``
    instead of recounted at every gate: a 500-GPU plan asks millions), the slots that wait and why, and the search
    allowance all of the decision's gates share."""

    def __init__(self, rollout: Rollout, baseline: dict[str, int], nodes: dict[str, _NodeState]):
        self.rollout = rollout
        self.baseline = baseline
        self.nodes = nodes
        self.models = list(rollout.models)
        self.alloc = {d.name: 0 for d in rollout.deployments}
        self.waits: list[str] = []
        self.work = _Budget(DECISION_BUDGET)
        self.asked_n: dict[str, int] = {}
        self.short: set[str] = set()
        self.model_of = {d.name: d.model for d in rollout.deployments}
        self.min_of = {r.name: r.min_replicas for r in self.models}
        self.node_rows: dict[str, list[tuple]] = {}  # node -> its GPU deployments' fixed fields, read once
        self.scaffold: dict[str, tuple[int, float | None]] = {}

    def recount(self) -> None:
        self.asked_n.clear()
        for d in self.rollout.deployments:
            self.asked_n[d.model] = self.asked_n.get(d.model, 0) + max(self.baseline[d.name], self.alloc[d.name])
        self.short.clear()
        self.short.update(r.name for r in self.models if self.asked_n.get(r.name, 0) < r.min_replicas)

    def bump(self, name: str, k: int) -> None:
        before = max(self.baseline[name], self.alloc[name])
        self.alloc[name] += k
        delta = max(self.baseline[name], self.alloc[name]) - before
        if delta:
            m = self.model_of[name]
            self.asked_n[m] = self.asked_n.get(m, 0) + delta
            if self.asked_n[m] < self.min_of.get(m, 0):
                self.short.add(m)
            else:
                self.short.discard(m)

    def verify(self) -> None:
        fresh: dict[str, int] = {}
        for d in self.rollout.deployments:
            fresh[d.model] = fresh.get(d.model, 0) + max(self.baseline[d.name], self.alloc[d.name])
        below = {r.name for r in self.models if fresh.get(r.name, 0) < r.min_replicas}
        if {m: n for m, n in fresh.items() if n} != {m: n for m, n in self.asked_n.items() if n} or below != self.short:
            raise AssertionError(f"rollout bookkeeping drifted: asked {self.asked_n} vs {fresh}, short {self.short} vs "
                                 f"{below}")

    def remaining(self, node: str) -> tuple[dict[int, int], dict[int, int]]:
        """The node's planned replicas not asked for yet, units -> count (positive counts only): (minimum slots of
        models still below their minimum, the rest)."""
        if VERIFY_BOOKKEEPING:
            self.verify()
        rows = self.node_rows.get(node)
        if rows is None:
            rows = self.node_rows[node] = [(d.name, d.model, d.units, d.min_slots, d.planned)
                                           for d in self.rollout.on_node(node) if d.kind != "cpu"]
        first: dict[int, int] = {}
        then: dict[int, int] = {}
        for name, model, units, min_slots, planned in rows:
            b, c = self.baseline[name], self.alloc[name]
            a = b if b > c else c
            if min_slots > a and model in self.short:
                first[units] = first.get(units, 0) + min_slots - a
                a = min_slots
            if planned > a:
                then[units] = then.get(units, 0) + planned - a
        return first, then

    def gate(self, d: DeploymentSpec, complete: bool) -> bool:
        st = self.nodes[d.node]
        arriving: dict[int, int] = {}  # st.unknown + st.new + this step, as Counters add (positive counts only)
        for c in (st.unknown, st.new):
            for u, n in c.items():
                if n > 0:
                    arriving[u] = arriving.get(u, 0) + n
        arriving[d.units] = arriving.get(d.units, 0) + 1
        self.bump(d.name, 1)  # the step counts as asked for in `remaining`
        try:
            first, then = self.remaining(d.node)
            if node_gate(st.rooms, arriving, first, st.ghosts, later=then, complete=complete, pool=self.work):
                return True
        finally:
            self.bump(d.name, -1)
        if not complete or any(st.unknown.values()) or any(st.new.values()) or st.ghosts:
            return False
        first, then = self.remaining(d.node)
        try:
            order = completion_order(st.rooms, first, later=then, pool=self.work)
            if order is not None:
                return bool(order) and order[0] == d.units
            if completion_order(st.rooms, {}, later=_plus(first, then), pool=self.work) is not None:
                return False  # a mixed order exists: the minimum pass shapes the node instead
        except _TooBig:
            return False  # this decision's search allowance is spent: the next decision goes on
        rest = _plus(first, then)
        rest[d.units] -= 1
        return no_regret(st.rooms, d.units, rest)

    @staticmethod
    def settled(st: _NodeState) -> bool:
        return not (any(st.unknown.values()) or any(st.new.values()) or st.ghosts)

    def shape(self, r: ModelRule, d: DeploymentSpec) -> str:
        """A minimum slot whose node cannot start every minimum first in an order best fit follows: take the first
        step of an order that brings up all the node's planned replicas, minimums and extras mixed. "take" when that
        step is this slot; "shaped" when it started another deployment's planned replica out of turn (a self.scaffold)
        and this slot self.waits for the next decision; "wait" when the decision's search allowance ran out; "none" when
        no such order was found."""
        st = self.nodes[d.node]
        first, then = self.remaining(d.node)
        try:
            order = completion_order(st.rooms, {}, later=_plus(first, then), pool=self.work)
        except _TooBig:
            return "wait"
        if not order:
            return "none"
        if order[0] == d.units:
            return "take"
        e = next((x for x in self.rollout.on_node(d.node) if x.kind != "cpu" and x.units == order[0]
                  and max(self.baseline[x.name], self.alloc[x.name]) < x.planned), None)
        if e is None:
            return "none"
        self.bump(e.name, 1)
        st.new[e.units] += 1
        n, _ = self.scaffold.get(e.name, (0, None))
        self.scaffold[e.name] = (n + 1, None)
        self.waits.append(f"{r.name}: on {d.node} a replica of {e.model} starts first (out of turn) so that Ray's "
                          "best fit leaves room for every planned replica there")
        return "shaped"

    def take(self, r: ModelRule, limit: int, complete: bool) -> None:
        count = sum(self.alloc[d.name] for d in self.rollout.of_model(r.name))
        passed: Counter = Counter()
        for name in self.rollout.slots(r.name):
            if count >= limit:
                return
            j = passed[name]
            passed[name] += 1
            if j != self.alloc[name]:
                continue  # taken already, or an earlier slot of this deployment was skipped
            d = self.rollout.deployment(name)
            if not (j < self.baseline[name] or d.kind == "cpu" or d.node not in self.nodes):
                st = self.nodes[d.node]
                if not complete and not self.settled(st):
                    continue  # not settled: waiting may open the gate, so do not force it yet
                if not self.gate(d, complete):
                    if complete:
                        self.waits.append(f"{r.name}: slot on {d.node} waits: a replica started there now could leave "
                                          "a planned replica of the node without a GPU")
                    continue
                if not complete:
                    how = self.shape(r, d)
                    if how in ("shaped", "wait"):
                        continue  # a replica started out of turn instead, or the next decision goes on
                    if how == "none":
                        self.waits.append(f"{r.name}: starting a minimum replica on {d.node} although the node's "
                                          "other planned replicas may then not all fit")
                st.new[d.units] += 1
            self.bump(name, 1)
            count += 1

    def keep_scaffold(self, memory: ScaleMemory, now: float) -> None:
        """Replicas started out of turn stay until their node's minimums run, then for their model's downscale
        delay."""
        for name, (n, until) in memory.scaffold.items():
            if until is not None and now >= until:
                continue
            d = self.rollout._by_name().get(name)
            if d is None:
                continue
            self.scaffold[name] = (n, until)
            self.alloc[name] = min(max(self.alloc[name], n), d.planned)
            if d.node in self.nodes and self.alloc[name] > self.baseline[name]:
                self.nodes[d.node].new[d.units] += self.alloc[name] - self.baseline[name]  # asked, not yet handed

    def release_scaffold(self, now: float) -> None:
        """A node's out-of-turn replicas start their downscale delay once its minimums all run."""
        for name, (n, until) in list(self.scaffold.items()):
            d = self.rollout.deployment(name)
            st = self.nodes[d.node]
            if until is None and self.settled(st) and not any(self.remaining(d.node)[0].values()):
                self.scaffold[name] = (n, now + self.rollout.rule(d.model).downscale_delay_s)


def _node_states(rollout: Rollout, obs: Mapping[str, DeploymentObs], memory: ScaleMemory,
                 baseline: Mapping[str, int], ghosts) -> dict[str, _NodeState]:
    """Each node as Serve reports it: the rooms its running replicas leave on each GPU, replicas with no known GPU
    (starting, or not reported yet), and the ghosts of stopped ones."""
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
    return nodes


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
    dec = _Decision(rollout, baseline, _node_states(rollout, obs, memory, baseline, ghosts))
    scales = {}  # the policy (policy.py): per model its load, the replicas it wants, and the goal after the delays
    for r in dec.models:
        seen = [obs[d.name] for d in rollout.of_model(r.name) if d.name in obs]
        load = sum(o.load for o in seen)
        running = sum(baseline[d.name] for d in rollout.of_model(r.name))
        if r.policy == "requests":
            want, said = desired_replicas(r, load), ""
        else:  # gpuplan's: the SLO and saturation, from the replicas' signals
            current = max(goal.get(r.name, min(running, r.max_replicas)), r.min_replicas)
            want, said = signal_want(r, model_signals(seen), current)
        why = move_goal(r, want, now, goal, up, down, running)
        scales[r.name] = [load, want, f"{why} ({said})" if said and said != "within target" else why]
    dec.keep_scaffold(memory, now)
    dec.recount()
    for r in dec.models:  # every model's minimum, keeping every node completable
        dec.take(r, min(goal[r.name], r.min_replicas), True)
    for r in dec.models:  # a minimum that cannot be had that way, on a settled node, starts where it lands
        dec.take(r, min(goal[r.name], r.min_replicas), False)
    for r in dec.models:
        dec.take(r, goal[r.name], True)
    dec.release_scaffold(now)
    out_models = []
    for r in dec.models:
        load, want, why = scales[r.name]
        placed = sum(dec.alloc[d.name] for d in rollout.of_model(r.name))
        if placed < goal[r.name]:
            why += f"; {goal[r.name] - placed} slot(s) waiting for a node gate"
        out_models.append(ModelScale(r.name, round(load, 3), want, goal[r.name], placed, why))
    mem = replace(memory, goal=goal, since_up=up, since_down=down, ghosts=tuple(ghosts), scaffold=dec.scaffold)
    return ScaleDecision(dec.alloc, tuple(out_models), tuple(dict.fromkeys(dec.waits)), mem)


def applied(memory: ScaleMemory, name: str, target: int) -> ScaleMemory:
    """Record the target handed to Serve for one deployment."""
    a = dict(memory.applied)
    a[name] = target
    return replace(memory, applied=a)
