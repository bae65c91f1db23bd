"""The HTTP ingress (the Backend of serve/api/app.py): routes each request for a model to one of the model's
deployments (planner.rollout.pick_deployment: fewest requests in flight per running replica, of two), then streams it
from one of the deployment's replicas over the direct stream (serve/app/direct.py; the less loaded of two) or, when no
replica can take it that way, through Serve's handle; answers /readyz and /plan from Serve's status and the
registry, drains on shutdown, and, with args.http.port, serves the API from its own process too
(serve/api/front.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import ray
from ray import serve
from ray.exceptions import RayActorError

from planner.rollout import (NodeBinding, PrefixIndex, ReplicaReport, Rollout, pick_by_prefix, pick_deployment,
                             placements, prefix_hashes)
from planner.rollout.routing import PREFIX_BLOCK_TOKENS
from serve import trace
from serve.app.direct import DirectBusy, DirectLost, DirectRoutes, direct_stream
from serve.app.registry import REGISTRY
from serve.app.status_cache import StaleWhileRevalidate
from serve.types import ModelCard, Overloaded, ReplicaLost, SamplingParams, Unavailable

log = logging.getLogger("gpuplan")
INGRESS_CPUS = 0.1  # see planner/rollout/ for the replicas' CPUs
INGRESS_ACTOR = {"num_cpus": INGRESS_CPUS}  # the ingress's Ray actor options (.options() replaces, not merges, them)
AVOID_AFTER_LOSS_S = 5.0  # a deployment whose replica just died gets no new request while another can take it
# Serve's status of the deployments (replicas running per deployment): read again in the background once a second
# old; a request routes on a value up to ROUTE_STATUS_MAX_AGE_S old rather than wait for Serve's controller
# (serve/app/status_cache.py), /readyz on one under a second old
STATUS_REFRESH_S = 1.0
ROUTE_STATUS_MAX_AGE_S = 10.0
READY_STATUS_MAX_AGE_S = 1.0


# NOTE: the ingress's health check is also when it tells the registry its requests in flight and learns that its build
# drains (a drain reaches one of the replicas that share the API port): every second, so a drain holds for all of them
# within about one
INGRESS_HEALTH_CHECK_S = 1.0
PRUNE_EVERY_S = 5.0  # how often the health check also forgets replicas Serve no longer has


@serve.deployment(ray_actor_options=dict(INGRESS_ACTOR), max_ongoing_requests=256,
                  health_check_period_s=INGRESS_HEALTH_CHECK_S)
@serve.ingress()
class Ingress:
    """The HTTP front (the Backend of openai_api): routes each request for a model to one of the model's
    deployments (planner.rollout.pick_deployment: fewest requests in flight per running replica, of two)."""

    def __init__(self, handles: dict, cards: list[ModelCard], plan_json: dict, rollout_json: dict,
                 bindings_json: list, api_key_env: str, built: dict | None = None, front: dict | None = None,
                 direct_secret: str | None = None):
        self.built = dict(built or {})  # {"run_id", "built_at"}: which start of `make run` deployed this app
        self.handles = {model: [(name, h) for name, h in pairs] for model, pairs in handles.items()}
        self._cards = cards
        self._plan = plan_json
        self.rollout = Rollout.from_json(rollout_json)
        self.bindings = tuple(NodeBinding(b["node"], b["selector"], b["ray_node_id"], b["how"], b.get("note"))
                              for b in bindings_json)
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.replica_id = getattr(ctx.replica_id, "unique_id", str(ctx.replica_id))
        # the ingress replicas of one build (their built_at) share the API port and its drain (serve/app/registry.py)
        self.build_key = f"{self.app_name}@{self.built.get('built_at') or 0}"
        self._pruned_at = 0.0
        self.api_key = os.environ.get(api_key_env) or None
        self.inflight: dict[str, int] = {}
        self._lost: dict[str, float] = {}  # deployment -> when a request found one of its replicas dead
        self.draining: float | None = None  # when draining began
        self._status = StaleWhileRevalidate(self._read_status, refresh_after_s=STATUS_REFRESH_S)
        self._logged: set[str] = set()
        # the replicas this ingress streams from directly (serve/app/direct.py), learnt from the registry each second
        self.routes = DirectRoutes(direct_secret) if direct_secret else None
        self.max_ongoing = {c.name: int(c.extra.get("max_ongoing_requests") or 0) or None for c in cards}
        self.routing = {c.name: c.extra.get("routing") or {} for c in cards}  # args.models[].routing
        # models that may scale to zero (replicas.min 0): how a request wakes them, and what the wakes measured
        self.wake_mode = {c.name: c.extra.get("wake", "wait") for c in cards if c.extra.get("min_replicas", 1) == 0}
        self.waking: dict[str, float] = {}  # model -> when a request found it with no replica running
        self.wakes: dict[str, dict] = {}  # model -> {"count", "last_s", "max_s", "at"}
        self._wake_asked: dict[str, float] = {}
        self.prefix: dict[str, PrefixIndex] = {}  # model -> which replica each prompt block was routed to
        self.routed: dict[str, dict[str, int]] = {}  # model -> {"prefix" | "room" | "imbalanced": requests}
        self.front = None
        if front and front.get("port"):  # args.http.port: serve the API from this process too (serve/api/front.py)
            from serve.api.app import create_app
            from serve.api.front import DirectFront, leader_lock_path

            host, port = front.get("host") or "127.0.0.1", int(front["port"])
            # args.http.replicas ingress replicas take turns on the port: one serves, the others stand by
            self.front = DirectFront(create_app(self, api_key=self.api_key), host, port, reuse_port=True,
                                     leader_lock=leader_lock_path(host, port)).start()

    def __serve_build_asgi_app__(self):
        from serve.api.app import create_app

        return create_app(self, api_key=self.api_key)

    async def _read_status(self) -> dict:
        status = await asyncio.to_thread(serve.status)
        return status.applications[self.app_name].deployments

    async def _deployments(self, max_age_s: float = ROUTE_STATUS_MAX_AGE_S) -> dict:
        """Serve's status of this app's deployments: the last read while it is younger than ``max_age_s`` (read
        again in the background once it is STATUS_REFRESH_S old), else a fresh read, waited for."""
        return await self._status.get(max_age_s)

    async def _running(self, max_age_s: float = ROUTE_STATUS_MAX_AGE_S) -> dict[str, int]:
        try:
            deps = await self._deployments(max_age_s)
        except Exception:
            return {}
        now = time.time()
        out = {name: (d.replica_states or {}).get("RUNNING", 0) for name, d in deps.items()}
        # a deployment that just lost a replica is passed over while another has one running (Serve takes a
        # moment to stop routing to a dead replica)
        recent = {n for n, t in self._lost.items() if now - t < AVOID_AFTER_LOSS_S}
        if recent and any(v for n, v in out.items() if n not in recent):
            out = {n: (0 if n in recent else v) for n, v in out.items()}
        return out

    def _live_replica_ids(self) -> list[str] | None:
        """Every replica Serve has for this app's deployments (starting, running, stopping), from Serve's own
        details; None when they cannot be read."""
        from ray.serve.context import _get_global_client

        try:
            details = _get_global_client().get_serve_details()
        except Exception:
            return None
        app = (details.get("applications") or {}).get(self.app_name) or {}
        return [r["replica_id"] for d in (app.get("deployments") or {}).values() for r in d.get("replicas") or []]

    # ---- Backend protocol
    def cards(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if self.draining:
            raise Unavailable("the server is shutting down (draining); send the request again in a few seconds "
                              "or to another instance", retry_after_s=5.0)
        pairs = self.handles.get(model) or []
        if not pairs:
            raise Unavailable(f"model {model!r} has no replica in the plan (it fit nowhere); see GET /plan",
                              retry_after_s=60.0)
        if model in self.wake_mode:
            await self._wake_if_zero(model, pairs)
        name, route = self._by_prefix(model, pairs, prompt_ids)
        if name is not None:
            pass  # the replica whose prefix cache holds the prompt's start, or the less loaded of two of all
        elif len(pairs) == 1:
            name = pairs[0][0]  # one deployment: nothing to choose, and no need to ask Serve what runs
        else:
            running = await self._running()
            name = pick_deployment([(n, running.get(n, 0), self.inflight.get(n, 0)) for n, _ in pairs],
                                   random.random) or pairs[0][0]
        self.inflight[name] = self.inflight.get(name, 0) + 1

        def move_to(other: str) -> str:  # the request now counts against another deployment of the model
            self.inflight[name] -= 1
            self.inflight[other] = self.inflight.get(other, 0) + 1
            return other

        def another():  # another of the model's replicas with room, in any deployment: its route, or None
            nonlocal name
            nxt = self.routes.pick_any([n for n, _ in pairs], random.random, max_ongoing=cap)
            if nxt is not None and nxt[0] != name:
                name = move_to(nxt[0])
            return None if nxt is None else nxt[1]

        try:
            cap = self.max_ongoing.get(model)
            passed_over = False  # a replica chosen was full or gone, or the deployment chosen had none with room
            if route is None and self.routes is not None:
                # a deployment chosen on a status up to 10 s old may have no replica with room that the registry
                # knows: not its own Serve queue blindly (its replicas may have just been stopped by the plan's
                # decision, and a request queued at a deployment with none makes Serve start one there, again and
                # again) but another replica, else Serve's queue of a deployment chosen on a fresh status
                route = self.routes.pick(name, random.random, max_ongoing=cap) or another()
                passed_over = route is None
            while route is not None:
                rid, addr = route
                self.routes.inflight[rid] = self.routes.inflight.get(rid, 0) + 1
                sent = refused = False
                try:
                    trace.mark("ingress.call", params.trace_id)
                    async for chunk in direct_stream(addr, self.routes.secret, prompt_ids, params):
                        if not sent:
                            trace.mark("ingress.first", params.trace_id)
                            sent = True
                            if model in self.waking:
                                self._woke(model)
                        if chunk.finish_reason:
                            trace.mark("ingress.last", params.trace_id)
                        yield chunk
                    return
                except DirectBusy:
                    # the replica is full (requests through Serve's queue hold its slots)
                    passed_over = refused = True
                    self.routes.full(rid)
                except DirectLost as exc:
                    self.routes.failed(rid, exc)
                    if sent:  # part of the answer is out
                        self._lost[name] = time.time()
                        raise ReplicaLost(f"a replica of {name} died or could not be reached ({exc})",
                                          retry_after_s=2.0) from None
                    # nothing was sent back: the replica stopped (scaled down) or died. Its deployment may have no
                    # replica left, and a request queued at its handle would make Serve start one there against the
                    # plan's decision: pass the deployment over while another has replicas
                    passed_over = refused = True
                    self._lost[name] = time.time()
                finally:
                    self.routes.ended(rid, ran=not refused)
                route = another()  # before Serve's queue
            if passed_over and len(pairs) > 1:
                # every replica reachable directly is full or gone: Serve's queue of the deployment with the fewest
                # requests in flight per running replica (not the one a prefix chose, nor one that just lost its
                # replica), on a status under a second old
                running = await self._running(max_age_s=READY_STATUS_MAX_AGE_S)
                best = pick_deployment([(n, running.get(n, 0), self.inflight.get(n, 0)) for n, _ in pairs],
                                       random.random)
                if best is not None and best != name:
                    name = move_to(best)
            handle = dict(pairs)[name].options(stream=True)
            trace.mark("ingress.call", params.trace_id)
            gen = handle.generate.remote(prompt_ids, params)
            first = True
            async for chunk in gen:
                if first:
                    trace.mark("ingress.first", params.trace_id)
                    first = False
                    if model in self.waking:
                        self._woke(model)
                if chunk.finish_reason:
                    trace.mark("ingress.last", params.trace_id)
                yield chunk
        except BackPressureError as exc:
            raise Overloaded(f"model {model!r} has a full queue: {exc}", retry_after_s=1.0) from None
        except DeploymentUnavailableError as exc:
            raise Unavailable(f"model {model!r} has no replica available: {exc}", retry_after_s=5.0) from None
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError: the replica is gone or unreachable
            self._lost[name] = time.time()
            raise ReplicaLost(f"a replica of {name} died or could not be reached ({type(exc).__name__})",
                              retry_after_s=2.0) from None
        finally:
            self.inflight[name] -= 1

    async def _wake_if_zero(self, model: str, pairs: list) -> None:
        """A model that may scale to zero (replicas.min 0) and has no replica running: ask for one at once (a note in
        Ray's KV store that gpuplan's autoscaling policy reads, serve/app/scale_board.py) and, with wake: reject,
        answer 503 with Retry-After; with wait, the request goes on to Serve's handle, which holds it until the
        replica runs (within request_timeout_s). The wake's time is measured to the first token (GET /plan)."""
        running = await self._running()
        if not sum(running.get(n, 0) for n, _ in pairs):  # none, a second ago or more: ask Serve now
            running = await self._running(max_age_s=STATUS_REFRESH_S)
        if sum(running.get(n, 0) for n, _ in pairs):
            return
        now = time.time()
        since = self.waking.setdefault(model, now)
        if now - self._wake_asked.get(model, -1e18) >= 1.0:
            self._wake_asked[model] = now
            try:
                from serve.app.scale_board import ask_wake

                await asyncio.to_thread(ask_wake, self.app_name, self.rollout.plan_id, model, now)
            except Exception:  # Serve's own queue metric still wakes it (wake: wait)
                log.warning("gpuplan: could not record the wake of %s in Ray's KV store", model)
        if since == now:
            log.warning("gpuplan: %s has no replica running (scaled to zero): starting one", model)
        if self.wake_mode.get(model) == "reject":
            w = self.wakes.get(model)
            est = max(1.0, (w or {}).get("last_s") or 30.0)
            took = f"; the last wake took {w['last_s']:.1f} s" if w else ""
            raise Unavailable(f"model {model!r} is scaled to zero (replicas.min 0) and its replica is starting (waking "
                              f"for {now - since:.0f} s{took}); send the request again in {est:.0f} s, or set "
                              "autoscaling.wake: wait to have requests wait for the replica", retry_after_s=est)

    def _woke(self, model: str) -> None:
        """The first token of a model that was at zero replicas: the wake took from the first request to now."""
        since = self.waking.pop(model, None)
        if since is None:
            return
        took = time.time() - since
        w = self.wakes.setdefault(model, {"count": 0, "last_s": None, "max_s": 0.0, "at": None})
        w.update(count=w["count"] + 1, last_s=round(took, 3), max_s=round(max(w["max_s"], took), 3), at=time.time())
        log.warning("gpuplan: %s woke from zero replicas in %.1f s (first request to first token)", model, took)

    def _by_prefix(self, model: str, pairs: list, prompt_ids: list[int]) -> tuple:
        """(deployment, (replica id, address)) for a model with two or more replicas reachable directly, by prefix
        (planner.rollout.pick_by_prefix over every replica of the model, across its deployments); (None, None) when
        prefix routing is off for the model or fewer than two replicas are reachable."""
        cfg = self.routing.get(model)
        if not cfg or not cfg.get("prefix") or self.routes is None:
            return None, None
        cap = self.max_ongoing.get(model)
        where = {rid: (n, addr) for n, _ in pairs for rid, addr in self.routes.live(n, max_ongoing=cap)}
        if len(where) < 2:
            return None, None
        hashes = prefix_hashes(prompt_ids)
        index = self.prefix.get(model)
        if index is None:
            index = self.prefix[model] = PrefixIndex()
        loads = {rid: self.routes.inflight.get(rid, 0) for rid in where}
        rid, why = pick_by_prefix(loads, index.match(hashes, where), len(hashes), random.random,
                                  max_imbalance=int(cfg.get("max_imbalance", 4)),
                                  min_match_blocks=-(-int(cfg.get("min_match_tokens", 32)) // PREFIX_BLOCK_TOKENS),
                                  sizes=index.sizes)
        index.record(hashes, rid)
        counts = self.routed.setdefault(model, {})
        counts[why] = counts.get(why, 0) + 1
        n, addr = where[rid]
        return n, (rid, addr)

    async def drain(self) -> dict:
        """Stop taking new requests; the ones in flight go on (the Backend's drain). The drain holds for every
        ingress replica of this build: it is recorded in the registry, where the others read it within a second."""
        if self.draining is None:
            self.draining = time.time()
            log.warning("gpuplan: draining: %d request(s) in flight finish, new ones get 503",
                        sum(self.inflight.values()))
        try:
            await ray.get_actor(REGISTRY).drain.remote(self.build_key)
        except Exception:  # no registry: this replica drains alone
            log.warning("gpuplan: could not record the drain in the registry; the other ingress replicas go on")
        return {"draining": True, "since": self.draining, "in_flight": await self._in_flight_all()}

    async def _in_flight_all(self) -> int:
        """Requests in flight on every ingress replica of this build: this one's now, the others' as they last
        reported them."""
        own = sum(self.inflight.values())
        try:
            others = await ray.get_actor(REGISTRY).in_flight.remote(self.build_key)
        except Exception:
            others = {}
        return own + sum(n for rid, n in others.items() if rid != self.replica_id)

    async def check_health(self) -> None:
        """Serve's health check of the ingress, also the moment to forget replicas Serve no longer has."""
        if self.front is not None and not self.front.alive():
            f = self.front
            raise RuntimeError(f"gpuplan's API server on {f.host}:{f.port} stopped: {f.error}. "
                               "Serve restarts this ingress, which binds the port again; the ingress replica's log "
                               "has the cause (`ray logs`, or the Serve dashboard). Fix: if another program holds "
                               "the port, stop it or change args.http.port")
        try:
            reg = ray.get_actor(REGISTRY)
            since = await reg.ingress_report.remote(self.build_key, self.replica_id, sum(self.inflight.values()))
            if since is not None and self.draining is None:
                self.draining = since
                log.warning("gpuplan: draining (asked of another ingress replica): %d request(s) in flight finish, "
                            "new ones get 503", sum(self.inflight.values()))
            if self.routes is not None:
                self.routes.update(await reg.routes.remote(self.app_name))
            if time.time() - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = time.time()
                live = await asyncio.to_thread(self._live_replica_ids)
                if live is not None:
                    await reg.prune.remote(live, self.app_name)
        except Exception:  # /plan prunes again when it is read; the drain is also this replica's own
            pass

    async def __del__(self):
        """Serve's graceful shutdown of the ingress: the front stops taking connections and lets the requests in
        flight finish (Serve waits for its own requests; it does not see the front's)."""
        if self.front is not None:
            await asyncio.to_thread(self.front.stop)

    def identity(self) -> dict:
        """Which deploy this app is (the run id of `make run`, when it was built, the plan) and which ingress replica
        answered (its process): /readyz's ``app``."""
        return dict(self.built, ingress_pid=os.getpid())

    async def readiness(self) -> tuple[bool, dict]:
        try:
            deps = await self._deployments(READY_STATUS_MAX_AGE_S)
        except Exception as exc:
            return False, {"error": f"cannot read Serve status: {exc}"}
        detail, ok = {}, True
        for card in self._cards:
            names = [n for n, _ in self.handles.get(card.name, [])]
            running = sum((deps[n].replica_states or {}).get("RUNNING", 0) for n in names if n in deps)
            need = card.extra.get("min_replicas", 1)
            detail[card.name] = {"running_replicas": running, "min_replicas": need,
                                 "deployments": {n: str(deps[n].status) if n in deps else "MISSING" for n in names}}
            ok = ok and running >= need
        try:
            failures = await ray.get_actor(REGISTRY).failures_of.remote(self.app_name)
        except Exception:
            failures = {}
        for model, fs in failures.items():
            if model in detail:
                detail[model]["load_failures"] = [
                    {k: f.get(k) for k in ("mode", "kind", "message", "gave_up", "at", "replica_id")} for f in fs]
        if self.draining:
            detail["draining"] = {"since": self.draining, "in_flight": await self._in_flight_all()}
            ok = False
        return ok, detail

    async def metrics_source(self) -> tuple[list[dict], dict | None]:
        """(each running replica's latest report, the scaling policy's latest decision) for GET /metrics."""
        reg = ray.get_actor(REGISTRY)
        rows = [r for r in await reg.all.remote() if r.get("app") == self.app_name]
        try:
            from serve.app.scale_board import fetch_decision

            decision = await asyncio.to_thread(fetch_decision, self.rollout.plan_id)
        except Exception:
            decision = None
        return rows, decision

    async def plan(self) -> dict:
        out = dict(self._plan)
        out["rollout"] = self.rollout.to_json()
        out["node_bindings"] = [b.to_json() for b in self.bindings]
        try:
            from serve.app.scale_board import fetch_decision

            out["scaling"] = await asyncio.to_thread(fetch_decision, self.rollout.plan_id)
        except Exception:
            out["scaling"] = None
        try:
            reg = ray.get_actor(REGISTRY)
            live = await asyncio.to_thread(self._live_replica_ids)
            out["restarts"] = await reg.prune.remote(live, self.app_name) if live is not None else None
            replicas = [r for r in await reg.all.remote() if live is None or r["replica_id"] in live]
        except Exception:
            replicas = []
        reports = [ReplicaReport(r["replica_id"], r.get("deployment", ""), r.get("node_id"),
                                 int(r["gpu_ids"][0]) if r.get("gpu_ids") else None, r.get("node_label"))
                   for r in replicas]
        where = {p["replica_id"]: p for p in placements(self.rollout, reports, self.bindings)}
        rows = []
        for r in replicas:
            p = where.get(r["replica_id"], {})
            row = dict(r, planned_node=p.get("planned_node"), node=p.get("node"), gpu=p.get("gpu"),
                       gpu_type=p.get("gpu_type"), planned_gpu=p.get("planned_gpu"),
                       matches_plan=p.get("matches_plan", False))
            rows.append(row)
            if not row["matches_plan"] and r["replica_id"] not in self._logged and row.get("gpu_ids") is not None:
                self._logged.add(r["replica_id"])
                log.warning("gpuplan: replica %s of %s runs on node %s GPU %s; the plan put it on node %s (%s)",
                            r["replica_id"], r.get("model"), row["node"] or r.get("node_id"), row["gpu"],
                            row["planned_node"], "no GPU there holds what the plan put on it"
                            if row["node"] == row["planned_node"] else "another node")
        out["replicas"] = sorted(rows, key=lambda r: (r.get("model") or "", r["replica_id"]))
        # models that may scale to zero: how a request wakes them, what the wakes took (this ingress's view)
        out["wake"] = {m: dict(self.wakes.get(m) or {"count": 0, "last_s": None, "max_s": None, "at": None},
                               mode=mode, waking_since=self.waking.get(m)) for m, mode in self.wake_mode.items()}
        # how this ingress routed each model's requests: "prefix" (to the replica holding the prompt's start),
        # "room" (a new prefix, to the replica holding the fewest blocks), "imbalanced" (by load, over the bound)
        out["routing"] = {m: dict(c) for m, c in self.routed.items()}
        return out
