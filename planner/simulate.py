"""Replay a trace against a plan in simulated time: no Ray, no engine, the speed model's clock.

Every planned replica slot of a model (the rollout's fill order) is a simulated engine on the GPU type the plan put it
on (a CPU replica: the CPU catalog's device): continuous batching up to ``max_num_seqs`` with the planned KV budget (a request is admitted when its prompt +
output tokens fit the tokens left), one prefill per admitted request, decode steps timed by the speed model at the
running batch and its mean context. Requests are routed as the ingress does (``pick_deployment`` over the model's
deployments, then the replica with fewer requests of two, as Serve's router), wait at the router when every replica
holds ``max_ongoing_requests``, and are refused (429) beyond ``max_queued_requests``; a request longer than
``max_model_len`` is refused (400). Replicas scale as the model's policy does every ``metrics_interval_s``
(``autoscaling.policy``: gpuplan's ``signal_want`` on the signals the replicas would report, i.e. the mean requests in
flight over ``look_back_period_s`` as Serve averages them, sequences waiting, the fullest KV cache, TTFT/TPOT p95 and
rate of the last 30 s; or Ray Serve's ``desired_replicas`` on the mean requests in flight), ``move_goal`` with the upscale and downscale delays, within
[min, placed]; a replica started takes ``start_s`` before it serves, and one scaled down finishes what it holds.

Between events (an arrival, a batch's change) a replica's batch is fixed, so its decode steps are taken in one jump
to the next sequence's last token: the work is a few events per request, not per token. Pure: a result value with
``to_json()``; the clock is simulated.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from planner.errors import InputError
from planner.rollout import pick_deployment
from planner.rollout.policy import (SIGNAL_WINDOW_S, LatencyWindow, ModelSignals, desired_replicas, move_goal,
                                    signal_want)
from planner.traffic import Slo

_ARRIVE, _WAKE, _POLICY, _READY, _KICK, _MARK = 0, 1, 2, 3, 4, 5


@dataclass
class _Req:
    model: str
    t: float
    prompt: int
    output: int
    first: float = -1.0
    done: float = -1.0
    left: int = 0
    ctx: float = 0.0
    fresh: bool = False  # admitted in the chunk in progress (its first token comes at the prefill's end)


@dataclass
class _Replica:
    model: str
    deployment: str
    gpu_type: str
    step: object
    prefill: object
    max_seqs: int
    kv_tokens: int
    max_ongoing: int
    state: str = "off"  # off | starting | on | draining
    since: float = 0.0
    busy_s: float = 0.0  # seconds in state starting/on/draining (replica-seconds)
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    kv_used: int = 0
    # the chunk of work in progress: it started at chunk_t0, is `steps` decode steps of `step_s` each after a prefill
    # of `pre_s`; `ver` tells a stale wake-up event from the current one
    chunk_t0: float = 0.0
    pre_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    fresh: list = field(default_factory=list)  # admitted in this chunk: their first token comes at the prefill's end
    ver: int = 0
    active: bool = False  # a chunk is in progress
    kick_due: bool = False  # a start is queued for this instant (requests arriving at the same time join it)

    def load(self) -> int:
        return len(self.waiting) + len(self.running)


@dataclass(frozen=True)
class ModelResult:
    model: str
    requests: int
    completed: int
    refused_too_long: int
    refused_queue_full: int
    unfinished: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tpot_p50_ms: float | None
    tpot_p95_ms: float | None
    within_slo: float | None  # share of completed requests meeting every target
    max_router_queue: int
    replica_seconds: float
    replicas_min: int
    replicas_max_seen: int
    scale_events: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class SimResult:
    duration_s: float
    models: tuple[ModelResult, ...]
    events: int
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"duration_s": round(self.duration_s, 3), "events": self.events,
                "models": [m.to_json() for m in self.models], "notes": list(self.notes)}


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)  # numpy's "linear" (benchmarks/common/stats.py does the same)


@dataclass(frozen=True)
class SimModel:
    """What the simulator needs of one model of the plan."""

    name: str
    slots: tuple[tuple[str, str], ...]  # (deployment, gpu type) per replica slot, in fill order
    step: dict  # gpu type -> step(batch, context) seconds
    prefill: dict  # gpu type -> prefill(tokens) seconds
    max_num_seqs: int
    kv_tokens: int
    max_model_len: int
    max_ongoing: int
    max_queued: int  # -1 = unbounded
    rule: object  # planner.rollout.ModelRule
    metrics_interval_s: float
    slo: Slo | None
    path_s: float = 0.0  # the serving path's latency before a request's first token, outside the engine
    look_back_period_s: float = 0.0  # the load the policy sees: the mean in flight over this window (Serve's
    # look_back_period_s); 0: over the last metrics interval

def simulate(models: list[SimModel], arrivals: dict, *, start_s: float = 60.0, seed: int = 0,
             until: float | None = None, measure_from_s: float = 0.0) -> SimResult:
    """Replay ``arrivals`` ({model: [(t, prompt, output), ...]}, t ascending) against ``models``. Requests that
    arrive before ``measure_from_s`` (a warm-up) are served but left out of every figure, and replica-seconds, scale
    events and the replicas seen count from then."""
    rng = random.Random(seed)
    reps: dict[str, list[_Replica]] = {}
    for m in models:
        if not m.slots:
            raise InputError(f"model {m.name} has no replica in the plan; nothing to simulate it on")
        reps[m.name] = [_Replica(m.name, d, t, m.step[t], m.prefill[t], m.max_num_seqs, m.kv_tokens,
                                 m.max_ongoing) for d, t in m.slots]
    by_name = {m.name: m for m in models}
    heap: list = []
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, payload))

    reqs: dict[str, list[_Req]] = {m.name: [] for m in models}
    refused_long = {m.name: 0 for m in models}
    refused_full = {m.name: 0 for m in models}
    router: dict[str, deque] = {m.name: deque() for m in models}
    max_queue = {m.name: 0 for m in models}
    goal: dict = {}
    up: dict = {}
    down: dict = {}
    scale_events = {m.name: 0 for m in models}
    seen_max = {m.name: 0 for m in models}
    inflight_area = {m.name: 0.0 for m in models}  # integral of requests in flight over time, this interval
    inflight_now = {m.name: 0 for m in models}
    looked = {m.name: deque() for m in models}  # (integral, seconds) of each interval within the look-back window
    windows = {m.name: LatencyWindow(SIGNAL_WINDOW_S) for m in models}  # what the replicas report (gpuplan's policy)
    last_t = {m.name: 0.0 for m in models}
    end = 0.0
    for name, rows in arrivals.items():
        for t, p, o in rows:
            push(t, _ARRIVE, (name, p, o))
            end = max(end, t)
    horizon = until if until is not None else math.inf
    for m in models:
        for r in reps[m.name][: m.rule.min_replicas]:
            r.state, r.since = "on", 0.0
        goal[m.name] = m.rule.min_replicas
        seen_max[m.name] = m.rule.min_replicas
        push(m.metrics_interval_s, _POLICY, m.name)
    if measure_from_s > 0:
        push(measure_from_s, _MARK, None)

    def track(model, now, delta):
        inflight_area[model] += inflight_now[model] * (now - last_t[model])
        last_t[model] = now
        inflight_now[model] += delta

    def live(model):
        return [r for r in reps[model] if r.state == "on"]

    def route(model, now) -> _Replica | None:
        rs = [r for r in live(model) if r.load() < r.max_ongoing]
        if not rs:
            return None
        deps: dict[str, list[_Replica]] = {}
        for r in rs:
            deps.setdefault(r.deployment, []).append(r)
        d = pick_deployment([(k, len(v), sum(x.load() for x in v)) for k, v in deps.items()], rng.random)
        pool = deps[d]
        if len(pool) == 1:
            return pool[0]
        a, b = rng.sample(pool, 2)
        return a if a.load() <= b.load() else b

    def settle(r: _Replica, now: float):
        """Account the chunk in progress up to ``now`` at a step boundary: tokens made, sequences done."""
        if not r.active:
            return
        done_steps = r.steps
        if now < r.chunk_t0 + r.pre_s + r.steps * r.step_s - 1e-12:  # cut short: whole steps done by now
            done_steps = max(0, min(r.steps, math.ceil((now - r.chunk_t0 - r.pre_s) / r.step_s - 1e-9)))
        t_end = r.chunk_t0 + r.pre_s + done_steps * r.step_s
        for q in r.fresh:
            q.first = r.chunk_t0 + r.pre_s
            q.left -= 1
            q.fresh = False
        r.fresh = []
        keep = []
        for q in r.running:
            n = min(done_steps, q.left)
            q.left -= n
            q.ctx += n
            if q.left <= 0:
                q.done = r.chunk_t0 + r.pre_s + (n * r.step_s)
                windows[r.model].add(q.done, q.first - q.t, (q.done - q.first) / (q.output - 1) if q.output > 1 else None)
                r.kv_used -= q.prompt + q.output
                track(r.model, now, -1)
            else:
                keep.append(q)
        r.running = keep
        r.active = False
        r.pre_s = 0.0
        r.steps = 0
        return t_end

    def kick(r: _Replica, now: float):
        """Start the next chunk on ``r`` at ``now`` (admit what fits, prefill it, then decode to the next finish)."""
        if r.active or r.state not in ("on", "draining"):
            return
        while r.waiting and len(r.running) < r.max_seqs and \
                r.kv_used + r.waiting[0].prompt + r.waiting[0].output <= r.kv_tokens:
            q = r.waiting.popleft()
            r.kv_used += q.prompt + q.output
            q.left, q.ctx = q.output, float(q.prompt)
            r.running.append(q)
            r.fresh.append(q)
            q.fresh = True
        if not r.running:
            if r.state == "draining":
                r.busy_s += now - r.since
                r.state = "off"
            return
        new_tokens = sum(q.prompt for q in r.fresh)
        r.pre_s = r.prefill(new_tokens) if new_tokens else 0.0
        # decode steps until the next sequence finishes (the fresh ones made their first token in the prefill)
        k = min(q.left - q.fresh for q in r.running)
        ctx = sum(q.ctx for q in r.running) / len(r.running) + k / 2
        r.step_s = r.step(len(r.running), ctx)
        r.steps = max(0, k)
        r.chunk_t0 = now
        r.active = True
        r.ver += 1
        push(now + r.pre_s + r.steps * r.step_s, _WAKE, (r, r.ver))

    events, last = 0, 0.0
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if now > horizon:
            break
        events += 1
        last = now
        if kind == _ARRIVE:
            model, p, o = payload
            m = by_name[model]
            q = _Req(model, now, p, o)
            counted = now >= measure_from_s
            if counted:
                reqs[model].append(q)
            windows[model].start(now)
            if p + o > m.max_model_len or p + o > m.kv_tokens:
                refused_long[model] += counted
                continue
            r = route(model, now)
            if r is None:
                if m.max_queued >= 0 and len(router[model]) >= m.max_queued:
                    refused_full[model] += counted
                    continue
                router[model].append(q)
                if counted:
                    max_queue[model] = max(max_queue[model], len(router[model]))
                track(model, now, +1)
                continue
            track(model, now, +1)
            r.waiting.append(q)
            if r.active and r.steps and len(r.running) < r.max_seqs:
                # vLLM admits at every step: cut the chunk at the next step boundary
                t_cut = r.chunk_t0 + r.pre_s + max(0, math.ceil((now - r.chunk_t0 - r.pre_s) / r.step_s)) * r.step_s
                r.ver += 1
                push(max(now, t_cut), _WAKE, (r, r.ver))
                r.steps = max(0, min(r.steps, math.ceil((t_cut - r.chunk_t0 - r.pre_s) / r.step_s - 1e-9)))
            elif not r.active and not r.kick_due:
                r.kick_due = True  # after every arrival of this instant, so that they are admitted together
                push(now, _KICK, r)
        elif kind == _KICK:
            payload.kick_due = False
            kick(payload, now)
        elif kind == _MARK:  # the warm-up is over: replica time and scaling count from here
            for name, rs in reps.items():
                for r in rs:
                    r.busy_s = 0.0
                    if r.state != "off":
                        r.since = now
                scale_events[name] = 0
                seen_max[name] = sum(r.state in ("on", "starting") for r in rs)
        elif kind == _WAKE:
            r, ver = payload
            if ver != r.ver:
                continue
            settle(r, now)
            # the router's queue goes to replicas with room, oldest first
            model = r.model
            while router[model]:
                tgt = route(model, now)
                if tgt is None:
                    break
                q = router[model].popleft()
                tgt.waiting.append(q)
                if tgt is not r and not tgt.active:
                    kick(tgt, now)
            kick(r, now)
        elif kind == _READY:
            r = payload
            if r.state == "starting":
                r.state = "on"
                while router[r.model]:
                    if r.load() >= r.max_ongoing:
                        break
                    r.waiting.append(router[r.model].popleft())
                kick(r, now)
        elif kind == _POLICY:
            model = payload
            m = by_name[model]
            track(model, now, 0)
            looked[model].append((inflight_area[model], m.metrics_interval_s))
            inflight_area[model] = 0.0
            while len(looked[model]) > max(1, round(m.look_back_period_s / m.metrics_interval_s)):
                looked[model].popleft()
            load = sum(a for a, _ in looked[model]) / sum(s for _, s in looked[model])
            before = goal.get(model)
            if m.rule.policy == "requests":
                want = desired_replicas(m.rule, load)
            else:  # gpuplan's: the signals the replicas would report
                lat = windows[model].summary(now, 0.0)
                live_reps = [r for r in reps[model] if r.state == "on"]
                sig = ModelSignals(
                    replicas=len(live_reps), load=load, waiting=sum(len(r.waiting) for r in live_reps),
                    kv_usage=max((r.kv_used / r.kv_tokens for r in live_reps if r.kv_tokens), default=0.0),
                    ttft_p95_s=lat["ttft_p95_s"] if lat["ttft_p95_s"] >= 0 else None,
                    tpot_p95_s=lat["tpot_p95_s"] if lat["tpot_p95_s"] >= 0 else None,
                    requests_per_s=lat["requests_per_s"])
                want, _ = signal_want(m.rule, sig, goal.get(model, m.rule.min_replicas))
            move_goal(m.rule, want, now, goal, up, down)
            g = goal[model]
            if g != before:
                scale_events[model] += 1
            serving = [r for r in reps[model] if r.state in ("on", "starting")]
            if len(serving) < g:
                for r in reps[model]:
                    if len(serving) >= g:
                        break
                    if r.state in ("off", "draining"):
                        if r.state == "off":
                            r.since = now
                        r.state = "starting" if r.state == "off" else "on"
                        if r.state == "starting":
                            push(now + start_s, _READY, r)
                        serving.append(r)
            elif len(serving) > g:
                for r in reversed(reps[model]):
                    if len(serving) <= g:
                        break
                    if r.state in ("on", "starting"):
                        r.state = "draining"
                        serving.remove(r)
                        if not r.active and not r.running and not r.waiting:
                            r.busy_s += now - r.since
                            r.state = "off"
            seen_max[model] = max(seen_max[model], len(serving))
            busy = any(router.values()) or any(r.active or r.waiting for rs in reps.values() for r in rs)
            if now < end or busy:
                push(now + m.metrics_interval_s, _POLICY, model)
    stop = min(horizon, max(end, last))
    out = []
    for m in models:
        for r in reps[m.name]:
            if r.state != "off":
                r.busy_s += max(0.0, stop - r.since)
        done = [q for q in reqs[m.name] if q.done >= 0]
        ttft = [(q.first - q.t + m.path_s) * 1e3 for q in done]
        tpot = [(q.done - q.first) / (q.output - 1) * 1e3 for q in done if q.output > 1]
        within = None
        if m.slo is not None and done:
            ok = 0
            for q in done:
                t1 = (q.first - q.t + m.path_s) * 1e3
                t2 = (q.done - q.first) / (q.output - 1) * 1e3 if q.output > 1 else 0.0
                if (m.slo.ttft_p95_ms is None or t1 <= m.slo.ttft_p95_ms) and \
                        (m.slo.tpot_p95_ms is None or t2 <= m.slo.tpot_p95_ms):
                    ok += 1
            within = round(ok / len(done), 4)
        n = len(reqs[m.name])
        r2 = lambda x: None if x is None else round(x, 2)  # noqa: E731
        out.append(ModelResult(m.name, n, len(done), refused_long[m.name], refused_full[m.name],
                               n - len(done) - refused_long[m.name] - refused_full[m.name],
                               r2(_pct(ttft, 0.5)), r2(_pct(ttft, 0.95)), r2(_pct(tpot, 0.5)), r2(_pct(tpot, 0.95)),
                               within, max_queue[m.name], round(sum(r.busy_s for r in reps[m.name]), 1),
                               m.rule.min_replicas, seen_max[m.name], scale_events[m.name]))
    return SimResult(stop, tuple(out), events)


# ------------------------------------------------------------------------------------------------ from a plan


def arrivals_from_trace(rows, models: list, *, speedup: float = 1.0, duration_s: float | None = None) -> dict:
    """Each model's arrivals from one trace (``rows``: planner.traffic.read_trace). ``models``: (name, Traffic or
    None) each. Model ``i`` of ``n`` replays the trace shifted by i/n of its span (cyclically, so the models' bursts do
    not line up), its clock scaled so that its mean rate is its traffic's, its token counts scaled so that their means
    are its traffic's (the trace keeps the burstiness and the spread), then compressed ``speedup`` times; cut at
    ``duration_s`` of simulated time. A model without traffic replays the trace as it is."""
    if speedup <= 0:
        raise InputError(f"--speedup must be > 0, got {speedup}")
    span = rows[-1][0] - rows[0][0]
    n = len(rows)
    trace_rate = (n - 1) / span if span > 0 else 0.0
    mean_p = sum(r[1] for r in rows) / n
    mean_o = sum(r[2] for r in rows) / n
    out = {}
    for i, (name, traffic) in enumerate(models):
        shift = span * i / max(1, len(models))
        f = (trace_rate / traffic.requests_per_s if traffic else 1.0) / speedup
        kp = traffic.prompt_tokens / mean_p if traffic and mean_p else 1.0
        ko = traffic.output_tokens / mean_o if traffic and mean_o else 1.0
        ts = sorted((((t + shift) % (span or 1.0)) * f, max(1, round(p * kp)), max(1, round(o * ko)))
                    for t, p, o in rows)
        if duration_s is not None:
            ts = [x for x in ts if x[0] <= duration_s]
        out[name] = ts
    return out
