"""``serve run deploy.yaml`` entry point: ``build_app(args)`` plans, binds every plan node to a Ray node, and builds
one deployment per (model, node, fraction) of the plan (planner/rollout.py) behind an OpenAI-compatible FastAPI
ingress that routes each model's requests over its deployments. Thin Ray glue; every decision is in planner/."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import ray
from ray import serve

from planner.config import DeployArgs, ModelEntry, parse_deploy_args
from planner.errors import GpuplanError
from planner.planning import PlanningResult, cluster_from_decl, make_plan, model_rules
from planner.rollout import (NodeBinding, RayNode, ReplicaReport, Rollout, bind_nodes, deployment_options,
                             pick_deployment, placements, realize)

from .replica import ModelReplica
from .types import ModelCard, Overloaded, SamplingParams, Unavailable

log = logging.getLogger("gpuplan")
REGISTRY = "gpuplan-registry"
INGRESS_CPUS = 0.1  # see planner/rollout.py for the replicas' CPUs


class PlanFailed(RuntimeError):
    """The deploy.yaml args cannot be planned; the message has the numbers and the fix."""


@ray.remote(num_cpus=0)
class Registry:
    """What each replica reports about itself (placement, load decision, resident bytes) for GET /plan."""

    def __init__(self):
        self.replicas: dict[str, dict] = {}

    def put(self, info: dict) -> None:
        info = dict(info, reported_at=time.time())
        self.replicas[info["replica_id"]] = info

    def all(self) -> list[dict]:
        return list(self.replicas.values())


def replica_configs(result: PlanningResult, args: DeployArgs, rollout: Rollout | None = None,
                    bindings: tuple[NodeBinding, ...] = ()) -> dict[str, dict]:
    """Per rollout deployment: what ModelReplica needs and its Serve options (pure)."""
    rollout = rollout or result.rollout or realize(result.plan, model_rules(args))
    by_node = {b.node: b for b in bindings}
    entries = {m.name: m for m in args.models}
    plans = {m.name: m for m in result.plan.models}
    out = {}
    for spec in rollout.deployments:
        entry, mp = entries[spec.model], plans[spec.model]
        est = result.estimates[spec.model][mp.quantization]
        b = by_node.get(spec.node)
        opts = deployment_options(spec, entry, b.selector if b else None, rollout.plan_id)
        out[spec.name] = {
            "replica": {
                "name": entry.name, "deployment": spec.name, "node": spec.node, "source": entry.source,
                "quantization": mp.quantization, "dtype": entry.dtype,
                "max_model_len": entry.max_model_len, "max_num_seqs": entry.max_num_seqs,
                "planned_bytes": int(mp.replica_bytes), "weights_bytes": est.weights,
                "offload_cpu_bytes": entry.offload.cpu_memory if entry.offload else 0,
                "trust_remote_code": entry.trust_remote_code, "num_gpus": spec.num_gpus,
                "num_cpus": opts["ray_actor_options"]["num_cpus"], "registry": REGISTRY,
                "stream_interval_s": entry.stream_interval_s,
            },
            "options": opts,
        }
    return out


def model_cards(result: PlanningResult, args: DeployArgs) -> list[ModelCard]:
    """What the API says of each model; ``placed_replicas`` is what the rollout runs at most (planner.rollout)."""
    plans = {m.name: m for m in result.plan.models}
    ro = result.rollout or realize(result.plan, model_rules(args))
    return [ModelCard(name=e.name, source=e.source, max_model_len=e.max_model_len,
                      quantization=plans[e.name].quantization, max_queued_requests=e.max_queued_requests,
                      request_timeout_s=e.request_timeout_s,
                      extra={"min_replicas": ro.rule(e.name).min_replicas,
                             "placed_replicas": ro.rule(e.name).max_replicas})
            for e in args.models]


@serve.deployment(ray_actor_options={"num_cpus": INGRESS_CPUS}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The HTTP front (the Backend of openai_api): routes each request for a model to one of the model's
    deployments (planner.rollout.pick_deployment: fewest requests in flight per running replica, of two)."""

    def __init__(self, handles: dict, cards: list[ModelCard], plan_json: dict, rollout_json: dict,
                 bindings_json: list, api_key_env: str):
        self.handles = {model: [(name, h) for name, h in pairs] for model, pairs in handles.items()}
        self._cards = cards
        self._plan = plan_json
        self.rollout = Rollout.from_json(rollout_json)
        self.bindings = tuple(NodeBinding(b["node"], b["selector"], b["ray_node_id"], b["how"], b.get("note"))
                              for b in bindings_json)
        self.app_name = serve.get_replica_context().app_name
        self.api_key = os.environ.get(api_key_env) or None
        self.inflight: dict[str, int] = {}
        self._status: tuple[float, dict] | None = None
        self._logged: set[str] = set()

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
        return {name: (d.replica_states or {}).get("RUNNING", 0) for name, d in deps.items()}

    # ---- Backend protocol
    def cards(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        pairs = self.handles.get(model) or []
        if not pairs:
            raise Unavailable(f"model {model!r} has no replica in the plan (it fit nowhere); see GET /plan",
                              retry_after_s=60.0)
        running = await self._running()
        name = pick_deployment([(n, running.get(n, 0), self.inflight.get(n, 0)) for n, _ in pairs],
                               random.random) or pairs[0][0]
        handle = dict(pairs)[name].options(stream=True)
        self.inflight[name] = self.inflight.get(name, 0) + 1
        try:
            gen = handle.generate.remote(prompt_ids, params)
            async for chunk in gen:
                yield chunk
        except BackPressureError as exc:
            raise Overloaded(f"model {model!r} has a full queue: {exc}", retry_after_s=1.0) from None
        except DeploymentUnavailableError as exc:
            raise Unavailable(f"model {model!r} has no replica available: {exc}", retry_after_s=5.0) from None
        finally:
            self.inflight[name] -= 1

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
            replicas = await reg.all.remote()
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
    return make_plan(args, cluster)


def ray_nodes() -> list[RayNode]:
    """Ray's nodes as planner.rollout sees them: id, labels, GPUs and accelerator type."""
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
    from planner.plan_report import render_text

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
    handles: dict[str, list] = {m.name: [] for m in parsed.models}
    for model, slots in rollout.fill:
        for name in dict.fromkeys(slots):
            c = cfgs[name]
            handles[model].append([name, ModelReplica.options(**c["options"]).bind(c["replica"])])
    return Ingress.bind(handles, model_cards(result, parsed), result.to_json(), rollout.to_json(),
                        [b.to_json() for b in bindings], parsed.http.api_key_env)
