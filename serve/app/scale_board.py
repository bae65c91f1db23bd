"""The controller-side half of gpuplan's autoscaling: one board per plan, shared by every deployment's policy.

Ray Serve calls a deployment's autoscaling policy (``serve.app.autoscale:PlanPolicy``) once per control-loop tick, in
its controller process, one deployment at a time. A gpuplan decision is about the whole app (a model's slots span
deployments, a node gate spans models), so every policy call goes through this module -- imported, not pickled, so
that all of an app's policies share it -- which keeps each deployment's latest context, recomputes
``planner.rollout.decide_scale`` at most every ``DECIDE_EVERY_S`` (or at once when a context changed what runs),
and hands each deployment its own target. Thin glue: every decision is in planner/rollout/.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace

from planner.rollout import DeploymentObs, Rollout, ScaleMemory, applied, decide_scale, observe

log = logging.getLogger("ray.serve")

GPU_METRIC = "gpuplan_gpu"  # replicas report the GPU Ray gave them (record_autoscaling_stats); -1 = none
# replicas report the requests they hold through the direct stream (serve/app/direct.py), which Serve does not count
DIRECT_METRIC = "gpuplan_direct_requests"
KV_NAMESPACE = "gpuplan"
DECIDE_EVERY_S = 0.5
PUBLISH_EVERY_S = 5.0  # how often the latest decision is written for GET /plan when nothing changed
# NOTE: a fresh board (app deployed, or the controller restarted) waits until every deployment of the plan has
# reported once (Serve calls every policy in its first tick), at most this long, so that no decision is made on
# half the picture; until then each deployment keeps its target.
WARMUP_S = 5.0


def kv_key(plan_id: str) -> bytes:
    return f"rollout/{plan_id}".encode()


def publish(rollout: Rollout) -> None:
    """Store the rollout where the controller's policies find it (Ray's internal KV, next to Serve's own)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(kv_key(rollout.plan_id), json.dumps(rollout.to_json()).encode(), overwrite=True,
                     namespace=KV_NAMESPACE)


def publish_decision(plan_id: str, decision: dict) -> None:
    """The latest decision, for GET /plan (``scaling``)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(f"decision/{plan_id}".encode(), json.dumps(decision).encode(), overwrite=True,
                     namespace=KV_NAMESPACE)


# NOTE: a request for a model at zero replicas (replicas.min 0) leaves a note in Ray's KV store (the ingress's
# ask_wake); the policy counts it as one request for the model until a replica runs, or this long after the last
# note (a request with wake: reject is gone by then; one with wait is in Serve's queue, which counts by itself).
WAKE_HOLD_S = 60.0
WAKE_READ_EVERY_S = 0.5


def ask_wake(app: str, plan_id: str, model: str, now: float) -> None:
    """Record that a request came for ``model``, which has no replica running (the ingress, at most once a second)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(f"wake/{app}/{plan_id}/{model}".encode(), str(now).encode(), overwrite=True,
                     namespace=KV_NAMESPACE)


def wake_notes(app: str, plan_id: str) -> dict[str, float]:
    """model -> when a request last asked it to wake (ask_wake), for one app's plan."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    prefix = f"wake/{app}/{plan_id}/"
    out = {}
    for key in _internal_kv_list(prefix.encode(), namespace=KV_NAMESPACE) or ():
        raw = _internal_kv_get(key, namespace=KV_NAMESPACE)
        k = key.decode() if isinstance(key, bytes) else str(key)
        try:
            out[k[len(prefix):]] = float(raw.decode() if isinstance(raw, bytes) else raw)
        except (TypeError, ValueError):
            continue
    return out


def fetch_decision(plan_id: str) -> dict | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(f"decision/{plan_id}".encode(), namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


def fetch(plan_id: str) -> Rollout:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(kv_key(plan_id), namespace=KV_NAMESPACE)
    if raw is None:
        raise LookupError(f"gpuplan: no rollout {plan_id} in Ray's KV store (the app builder publishes it)")
    return Rollout.from_json(json.loads(raw))


class Board:
    """What one plan's policies know: the rollout, each deployment's latest observation, and the decision."""

    def __init__(self, rollout: Rollout, now: float, app: str = ""):
        self.rollout = rollout
        self.app = app
        self.created = now
        self.obs: dict[str, DeploymentObs] = {}
        self.memory = ScaleMemory()
        self.decision = None
        self.decided_at = -1e18
        self.dirty = True
        self.last_targets: dict[str, int] = {}
        self.published_at = -1e18
        self.lock = threading.Lock()
        self.zero_ok = {r.name for r in rollout.models if r.min_replicas == 0}  # models that may scale to zero
        self.wakes: dict[str, float] = {}
        self.wakes_read_at = -1e18

    def woken(self, name: str, obs: DeploymentObs, now: float) -> DeploymentObs:
        """``obs`` with one more request when its model (replicas.min 0) has no replica running and a request asked
        it to wake within WAKE_HOLD_S; on the model's first deployment only (the load is summed per model)."""
        if not self.zero_ok:
            return obs
        model = self.rollout.deployment(name).model
        if model not in self.zero_ok or self.rollout.of_model(model)[0].name != name:
            return obs
        if now - self.wakes_read_at >= WAKE_READ_EVERY_S:
            self.wakes_read_at = now
            try:
                self.wakes = wake_notes(self.app, self.rollout.plan_id)
            except Exception:
                pass
        asked = self.wakes.get(model)
        running = len(obs.running) + sum(len(o.running) for d, o in self.obs.items()
                                         if d != name and self.rollout.deployment(d).model == model)
        # a note older than this board is from an app deployed before (the same name, the same plan): not a request
        if asked is None or now - asked > WAKE_HOLD_S or asked < self.created or running:
            return obs
        return replace(obs, load=obs.load + 1.0)

    def target(self, name: str, obs: DeploymentObs, now: float) -> int:
        """Record ``obs`` for deployment ``name`` and return the replicas it should run."""
        with self.lock:
            obs = self.woken(name, obs, now)
            prev = self.obs.get(name)
            if prev is None or prev.target != obs.target or prev.running != obs.running:
                self.dirty = True
            self.obs[name] = obs
            self.memory = observe(self.rollout, self.memory, name, obs, now)
            known = {d.name for d in self.rollout.deployments}
            if not known <= self.obs.keys() and now - self.created < WARMUP_S:
                return obs.target
            if self.decision is None or self.dirty or now - self.decided_at >= DECIDE_EVERY_S:
                self.decision = decide_scale(self.rollout, self.obs, self.memory, now)
                self.memory = self.decision.memory
                self.decided_at, self.dirty = now, False
                changed = {k: v for k, v in self.decision.targets.items() if self.last_targets.get(k) != v}
                if changed:
                    log.info("gpuplan scale %s: %s%s", self.rollout.plan_id, json.dumps(changed, sort_keys=True),
                             "".join(f"\n  {w}" for w in self.decision.waits))
                    self.last_targets = dict(self.decision.targets)
                if changed or now - self.published_at >= PUBLISH_EVERY_S:
                    try:
                        publish_decision(self.rollout.plan_id, dict(self.decision.to_json(), decided_at=now))
                        self.published_at = now
                    except Exception:  # only GET /plan reads it
                        pass
            t = int(self.decision.targets.get(name, obs.target))
            self.memory = applied(self.memory, name, t)
            return t


_BOARDS: dict[str, Board] = {}
_LOCK = threading.Lock()


def board(plan_id: str, app: str, now: float) -> Board:
    """The board of one app's plan (two apps made of the same plan keep two boards)."""
    key = f"{app}/{plan_id}"
    with _LOCK:
        b = _BOARDS.get(key)
        if b is None:
            b = _BOARDS[key] = Board(fetch(plan_id), now, app)
            # an app redeployed with another plan leaves its old board: keep the few latest
            for old in sorted(_BOARDS, key=lambda k: _BOARDS[k].created)[:-8]:
                _BOARDS.pop(old, None)
        return b


def obs_from_context(ctx) -> DeploymentObs:
    """planner's view of a Serve AutoscalingContext: target, running replicas with the GPU each reported, load."""
    metrics, direct, sig = {}, 0.0, {}
    try:
        agg = ctx.aggregated_metrics or {}
        metrics = agg.get(GPU_METRIC, {}) or {}
        # requests that reached replicas through the direct stream (Serve's count has only its own)
        direct = sum(float(v) for v in (agg.get(DIRECT_METRIC, {}) or {}).values())
        sig = signals_of(agg)
    except Exception:  # metrics are optional: a replica that has not reported yet just has no known GPU
        metrics = {}
    by_id = {getattr(r, "unique_id", str(r)): v for r, v in metrics.items()}
    running = []
    for r in ctx.running_replicas or ():
        rid = getattr(r, "unique_id", str(r))
        v = by_id.get(rid)
        running.append((rid, int(round(v)) if v is not None and v >= 0 else None))
    return DeploymentObs(target=int(ctx.target_num_replicas), running=tuple(sorted(running)),
                         load=float(ctx.total_num_requests or 0.0) + direct, **sig)


def signals_of(agg: dict) -> dict:
    """The policy's signals of one deployment (planner.rollout.DeploymentObs fields) from Serve's aggregated custom
    metrics ({metric: {replica: value averaged over the look-back window}}): sums, and the worst replica's figures
    (a latency of 0: the replica finished no request in its window)."""
    def vals(key):
        return [float(v) for v in (agg.get(key) or {}).values()]

    def worst(key):
        xs = [v for v in vals(key) if v > 0]
        return max(xs) if xs else None

    return {"waiting": sum(vals("gpuplan_waiting")), "kv_usage": max(vals("gpuplan_kv_usage"), default=0.0),
            "ttft_p95_s": worst("gpuplan_ttft_p95_s"), "tpot_p95_s": worst("gpuplan_tpot_p95_s"),
            "requests_per_s": sum(vals("gpuplan_requests_per_s"))}


def decide(plan_id: str, ctx) -> tuple[int, dict]:
    """The policy body: (target replicas, policy state). Never raises: on error the target stays."""
    now = time.time()
    try:
        b = board(plan_id, str(getattr(ctx, "app_name", "") or ""), now)
        return b.target(ctx.deployment_name, obs_from_context(ctx), now), {}
    except Exception:
        log.exception("gpuplan autoscaling policy failed for %s; keeping its target", ctx.deployment_name)
        return int(ctx.target_num_replicas), {}
