"""``serve run deploy.yaml`` entry point: ``build_app(args)`` plans, binds every plan node to a Ray node, and builds
one deployment per (model, node, fraction) of the plan (planner/placement/rollout.py) behind an OpenAI-compatible FastAPI
ingress that routes each model's requests over its deployments. Thin Ray glue; every decision is in planner/."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time

import ray
from ray import serve
from ray.exceptions import RayActorError

from planner.config import DeployArgs, ModelEntry, parse_deploy_args
from planner.errors import GpuplanError
from planner.planning import PlanningResult, cluster_from_decl, make_plan, model_rules
from planner.placement.rollout import (NodeBinding, RayNode, ReplicaReport, Rollout, bind_nodes,
                                       deployment_options, pick_deployment, placements, realize)

from .engines import available as available_engines
from .engines import vllm_python
from . import trace
from .replica import ModelReplica
from .types import ModelCard, Overloaded, ReplicaLost, SamplingParams, Unavailable

log = logging.getLogger("gpuplan")
REGISTRY = "gpuplan-registry"
INGRESS_CPUS = 0.1  # see planner/placement/rollout.py for the replicas' CPUs
INGRESS_ACTOR = {"num_cpus": INGRESS_CPUS}  # the ingress's Ray actor options (.options() replaces, not merges, them)
AVOID_AFTER_LOSS_S = 5.0  # a deployment whose replica just died gets no new request while another can take it


class PlanFailed(RuntimeError):
    """The deploy.yaml args cannot be planned; the message has the numbers and the fix."""


class ReplicaBook:
    """What each replica reports about itself (placement, load decision, resident bytes, failed loads) for GET /plan
    and /readyz, and the replicas that died: one Serve no longer lists that did not say it stopped. Plain Python;
    ``Registry`` is its Ray actor."""

    def __init__(self):
        self.replicas: dict[str, dict] = {}
        self.stopped_ids: set[str] = set()
        self.deaths: dict[str, list] = {}  # model -> [(replica_id, when it was found gone)]
        self.failures: list[dict] = []  # failed loads, newest last

    def put(self, info: dict) -> None:
        if info["replica_id"] in self.stopped_ids:
            return  # a late report of a replica that has stopped
        info = dict(info, reported_at=time.time())
        self.replicas[info["replica_id"]] = info

    def load_failed(self, info: dict) -> None:
        """A replica's load failed (it may step down and try again, or give up)."""
        self.failures.append(dict(info, at=time.time()))
        del self.failures[:-200]

    def recent_failures(self, deployment: str, within_s: float = 600.0) -> int:
        """Replicas of ``deployment`` that gave up loading in the last ``within_s`` (sets the back-off)."""
        now = time.time()
        return sum(1 for f in self.failures if f["deployment"] == deployment and f["gave_up"]
                   and now - f["at"] < within_s)

    def failures_of(self, app: str | None, within_s: float = 600.0) -> dict:
        """model -> its last few failed loads (for /readyz), of the last ``within_s``."""
        now, out = time.time(), {}
        for f in self.failures:
            if (app is None or f.get("app") in (None, app)) and now - f["at"] < within_s:
                out.setdefault(f["model"], []).append(f)
        return {m: fs[-5:] for m, fs in out.items()}

    def stopped(self, replica_id: str) -> None:
        """A replica shutting down the graceful way (scale-down, redeploy): not a death."""
        self.stopped_ids.add(replica_id)
        self.replicas.pop(replica_id, None)

    def prune(self, live: list[str], app: str | None = None) -> dict:
        """Forget replicas Serve no longer lists (``live``: every replica id Serve has for the app's deployments,
        starting ones included); those that did not stop the graceful way count as restarts of their model."""
        keep = set(live)
        now = time.time()
        for rid, info in list(self.replicas.items()):
            if app is not None and info.get("app") not in (None, app):
                continue
            if rid not in keep:
                self.replicas.pop(rid)
                if rid not in self.stopped_ids:
                    self.deaths.setdefault(info.get("model", "?"), []).append((rid, now))
        return {m: {"count": len(d), "last": max(t for _, t in d)} for m, d in self.deaths.items()}

    def all(self) -> list[dict]:
        return list(self.replicas.values())


Registry = ray.remote(num_cpus=0)(ReplicaBook)


def replica_configs(result: PlanningResult, args: DeployArgs, rollout: Rollout | None = None,
                    bindings: tuple[NodeBinding, ...] = ()) -> dict[str, dict]:
    """Per rollout deployment: what ModelReplica needs and its Serve options (pure)."""
    rollout = rollout or result.rollout or realize(result.plan, model_rules(args))
    by_node = {b.node: b for b in bindings}
    entries = {m.name: m for m in args.models}
    plans = {m.name: m for m in result.plan.models}
    nodes = {n.name: n for n in result.cluster.nodes}
    out = {}
    for spec in rollout.deployments:
        entry, mp = entries[spec.model], plans[spec.model]
        est = result.estimates[spec.model][mp.quantization]
        b = by_node.get(spec.node)
        opts = deployment_options(spec, entry, b.selector if b else None, rollout.plan_id)
        extra: dict = {"engine": est.engine}
        if est.engine == "llamacpp":
            extra["llamacpp"] = llamacpp_settings_for(est, entry, int(mp.replica_bytes), result.device)
        if est.engine == "vllm":
            extra["vllm"] = vllm_settings_for(est, entry, int(mp.replica_bytes), nodes.get(spec.node),
                                              result.device).to_json()
            py = vllm_python()
            if py and py != sys.executable:  # vLLM's own venv (`make vllm`): the replica runs its Python
                opts["ray_actor_options"]["runtime_env"] = {"py_executable": py}
        out[spec.name] = {
            "replica": {
                "name": entry.name, "deployment": spec.name, "node": spec.node, "source": entry.source,
                "quantization": mp.quantization, "dtype": entry.dtype,
                "max_model_len": entry.max_model_len, "max_num_seqs": entry.max_num_seqs,
                "planned_bytes": int(mp.replica_bytes), "weights_bytes": est.weights,
                "offload_cpu_bytes": entry.offload.cpu_memory if entry.offload else 0,
                "trust_remote_code": entry.trust_remote_code, "num_gpus": spec.num_gpus,
                "num_cpus": opts["ray_actor_options"]["num_cpus"], "registry": REGISTRY,
                "stream_interval_s": entry.stream_interval_s, **extra,
            },
            "options": opts,
        }
    return out


def llamacpp_settings_for(est, entry, planned_bytes: int, device: str) -> dict:
    """planner.model.llamacpp settings for one deployment: every layer on the GPU, or, when the plan gives the replica less
    than the whole model (``replica_memory``), the largest ``n_gpu_layers`` that fits its share (the replica decides
    again from the GPU's free memory when it starts)."""
    from planner.model.gguf_spec import spec_from_gguf
    from planner.model.llamacpp import LlamaCppSettings, decide_gpu_layers
    from planner.model.memory import CUDA_CONTEXT_BYTES

    st = dict(est.detail["llamacpp"])
    if device == "cuda" and planned_bytes < est.total:
        d = decide_gpu_layers(spec_from_gguf(entry.source), LlamaCppSettings(**st), model=entry.name,
                              budget_bytes=planned_bytes, fixed_gpu_bytes=CUDA_CONTEXT_BYTES,
                              offload_cpu_bytes=entry.offload.cpu_memory if entry.offload else 0)
        st["n_gpu_layers"] = d.n_gpu_layers
    return st


def vllm_settings_for(est, entry, planned_bytes: int, node, device: str):
    """planner.model.engines.vllm_settings for one deployment: the share is of the node's GPU total (the basis the plan
    used: its smallest GPU) or, for CPU replicas, of the node's RAM."""
    from planner.model.engines import vllm_quantization, vllm_settings

    if device == "cuda" and node is not None and node.gpus:
        total = min(g.total_bytes for g in node.gpus)
    else:
        total = (node.cpu_memory_bytes if node is not None else 0) or planned_bytes
    kv = est.detail["kv_cache"]
    return vllm_settings(
        planned_bytes=planned_bytes, device_total_bytes=total, kv_cache_bytes=est.kv_cache, kv_tokens=kv["tokens"],
        block_size=kv["block_size"], max_model_len=est.max_model_len, max_num_seqs=est.max_num_seqs,
        prefill_tokens=est.prefill_tokens, dtype=est.dtype,
        quantization=vllm_quantization(est.quantization, est.detail.get("checkpoint_scheme"), entry.name))


def model_cards(result: PlanningResult, args: DeployArgs) -> list[ModelCard]:
    """What the API says of each model; ``placed_replicas`` is what the rollout runs at most (planner.placement.rollout)."""
    plans = {m.name: m for m in result.plan.models}
    ro = result.rollout or realize(result.plan, model_rules(args))
    return [ModelCard(name=e.name, source=e.source, max_model_len=e.max_model_len,
                      quantization=plans[e.name].quantization, max_queued_requests=e.max_queued_requests,
                      request_timeout_s=e.request_timeout_s,
                      extra={"min_replicas": ro.rule(e.name).min_replicas,
                             "placed_replicas": ro.rule(e.name).max_replicas})
            for e in args.models]


@serve.deployment(ray_actor_options=dict(INGRESS_ACTOR), max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The HTTP front (the Backend of openai_api): routes each request for a model to one of the model's
    deployments (planner.placement.rollout.pick_deployment: fewest requests in flight per running replica, of two)."""

    def __init__(self, handles: dict, cards: list[ModelCard], plan_json: dict, rollout_json: dict,
                 bindings_json: list, api_key_env: str, built: dict | None = None, front: dict | None = None):
        self.built = dict(built or {})  # {"run_id", "built_at"}: which start of `make run` deployed this app
        self.handles = {model: [(name, h) for name, h in pairs] for model, pairs in handles.items()}
        self._cards = cards
        self._plan = plan_json
        self.rollout = Rollout.from_json(rollout_json)
        self.bindings = tuple(NodeBinding(b["node"], b["selector"], b["ray_node_id"], b["how"], b.get("note"))
                              for b in bindings_json)
        self.app_name = serve.get_replica_context().app_name
        self.api_key = os.environ.get(api_key_env) or None
        self.inflight: dict[str, int] = {}
        self._lost: dict[str, float] = {}  # deployment -> when a request found one of its replicas dead
        self.draining: float | None = None  # when draining began
        self._status: tuple[float, dict] | None = None
        self._logged: set[str] = set()
        self.front = None
        if front and front.get("port"):  # args.http.port: serve the API from this process too (serve/front.py)
            from .front import DirectFront
            from .openai_api import create_app

            self.front = DirectFront(create_app(self, api_key=self.api_key), front.get("host") or "127.0.0.1",
                                     int(front["port"])).start()

    def __serve_build_asgi_app__(self):
        from .openai_api import create_app

        return create_app(self, api_key=self.api_key)

    async def _deployments(self) -> dict:
        """Serve's status of this app's deployments, read at most once a second."""
        now = time.time()
        if self._status and now - self._status[0] < 1.0:
            return self._status[1]
        status = await asyncio.to_thread(serve.status)
        deps = status.applications[self.app_name].deployments
        self._status = (now, deps)
        return deps

    async def _running(self) -> dict[str, int]:
        try:
            deps = await self._deployments()
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
        if len(pairs) == 1:
            name = pairs[0][0]  # one deployment: nothing to choose, and no need to ask Serve what runs
        else:
            running = await self._running()
            name = pick_deployment([(n, running.get(n, 0), self.inflight.get(n, 0)) for n, _ in pairs],
                                   random.random) or pairs[0][0]
        handle = dict(pairs)[name].options(stream=True)
        self.inflight[name] = self.inflight.get(name, 0) + 1
        try:
            trace.mark("ingress.call")
            gen = handle.generate.remote(prompt_ids, params)
            first = True
            async for chunk in gen:
                if first:
                    trace.mark("ingress.first")
                    first = False
                if chunk.finish_reason:
                    trace.mark("ingress.last")
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

    def drain(self) -> dict:
        """Stop taking new requests; the ones in flight go on (the Backend's drain)."""
        if self.draining is None:
            self.draining = time.time()
            log.warning("gpuplan: draining: %d request(s) in flight finish, new ones get 503",
                        sum(self.inflight.values()))
        return {"draining": True, "since": self.draining, "in_flight": sum(self.inflight.values())}

    async def check_health(self) -> None:
        """Serve's health check of the ingress, also the moment to forget replicas Serve no longer has."""
        if self.front is not None and not self.front.alive():
            f = self.front
            raise RuntimeError(f"gpuplan's API server on {f.host}:{f.port} stopped: {f.error}. "
                               "Serve restarts this ingress, which binds the port again; the ingress replica's log "
                               "has the cause (`ray logs`, or the Serve dashboard). Fix: if another program holds "
                               "the port, stop it or change args.http.port")
        try:
            live = await asyncio.to_thread(self._live_replica_ids)
            if live is not None:
                await ray.get_actor(REGISTRY).prune.remote(live, self.app_name)
        except Exception:  # /plan prunes again when it is read
            pass

    async def __del__(self):
        """Serve's graceful shutdown of the ingress: the front stops taking connections and lets the requests in
        flight finish (Serve waits for its own requests; it does not see the front's)."""
        if self.front is not None:
            await asyncio.to_thread(self.front.stop)

    def identity(self) -> dict:
        """Which deploy this app is (the run id of `make run`, when it was built, the plan): /readyz's ``app``."""
        return self.built

    async def readiness(self) -> tuple[bool, dict]:
        try:
            deps = await self._deployments()
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
            detail["draining"] = {"since": self.draining, "in_flight": sum(self.inflight.values())}
            ok = False
        return ok, detail

    async def plan(self) -> dict:
        out = dict(self._plan)
        out["rollout"] = self.rollout.to_json()
        out["node_bindings"] = [b.to_json() for b in self.bindings]
        try:
            from .scale_board import fetch_decision

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
        return out


def _plan_or_exit(args: DeployArgs) -> PlanningResult:
    if args.cluster == "auto":
        from .inventory import gather_cluster

        cluster = gather_cluster()
    else:
        cluster = cluster_from_decl(args.cluster)
    return make_plan(args, cluster, available_engines())


def ray_nodes() -> list[RayNode]:
    """Ray's nodes as planner.placement.rollout sees them: id, labels, GPUs and accelerator type."""
    out = []
    for n in ray.nodes():
        res = n.get("Resources", {}) or {}
        types = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
        out.append(RayNode(n["NodeID"], dict(n.get("Labels") or {}), int(res.get("GPU", 0)),
                           types[0] if types else None, bool(n.get("Alive"))))
    return out


def build_app(args: dict) -> serve.Application:
    """Ray Serve application builder (``import_path: serve.app:build_app``)."""
    base = os.environ.get("GPUPLAN_CONFIG_DIR") or os.getcwd()
    try:
        parsed = parse_deploy_args(args or {}, base_dir=base)
        result = _plan_or_exit(parsed)
    except GpuplanError as exc:
        # the planner's message becomes the application's DEPLOY_FAILED message (`serve status`); a SystemExit
        # here would kill the build worker and Ray would retry it forever
        raise PlanFailed(f"gpuplan: {exc}") from None
    from planner.output.plan_report import render_text

    from .scale_board import publish

    log.warning("gpuplan plan:\n%s", render_text(result.plan))
    bindings = bind_nodes(result.cluster.nodes, ray_nodes())
    for b in bindings:
        if b.note:
            log.warning("gpuplan: %s", b.note)
    rollout = result.rollout
    for n in rollout.notes:
        log.warning("gpuplan: %s", n)
    publish(rollout)
    Registry.options(name=REGISTRY, get_if_exists=True, lifetime="detached").remote()
    cfgs = replica_configs(result, parsed, rollout, bindings)
    # test hook: GPUPLAN_FAULTS={"<model>": {"cuda": {"total": bytes, "free": bytes}, "fail": ["gpu", ...]}} makes
    # that model's replicas see a GPU that is not there and fail their loads in those modes (tests/integration)
    faults = json.loads(os.environ.get("GPUPLAN_FAULTS") or "{}")
    for c in cfgs.values():
        if c["replica"]["name"] in faults:
            c["replica"]["faults"] = faults[c["replica"]["name"]]
    handles: dict[str, list] = {m.name: [] for m in parsed.models}
    for model, slots in rollout.fill:
        for name in dict.fromkeys(slots):
            c = cfgs[name]
            handles[model].append([name, ModelReplica.options(**c["options"]).bind(c["replica"])])
    # a new ingress at every deploy (its init args change), so /readyz says which deploy answers (serve/run.py)
    built = {"run_id": os.environ.get("GPUPLAN_RUN_ID"), "built_at": time.time(), "plan_id": rollout.plan_id}
    ingress = Ingress
    front = {"port": parsed.http.port, "host": parsed.http.host} if parsed.http.port else None
    if front:  # the front listens where the ingress runs: on the head node, like Serve's HeadOnly proxy
        ingress = Ingress.options(ray_actor_options={**INGRESS_ACTOR, "resources": {"node:__internal_head__": 0.001}})
    return ingress.bind(handles, model_cards(result, parsed), result.to_json(), rollout.to_json(),
                        [b.to_json() for b in bindings], parsed.http.api_key_env, built, front)
