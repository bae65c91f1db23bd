"""``serve run deploy.yaml`` entry point: ``build_app(args)`` plans, binds every plan node to a Ray node, and builds
one deployment per (model, node, fraction) of the plan (planner/rollout/), each replica started with its
engine's settings from the plan, behind the OpenAI-compatible ingress (ingress.py) that routes each model's requests
over its deployments. Thin Ray glue; every decision is in planner/."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import ray
from ray import serve

from planner.config import DeployArgs, parse_deploy_args
from planner.errors import GpuplanError
from planner.planning import PlanningResult, cluster_from_decl, make_plan, model_rules
from planner.rollout import NodeBinding, RayNode, Rollout, bind_nodes, deployment_options, realize

from planner.cluster.installed import installed_engines, vllm_python
from planner.model.engines import DeploymentTarget, deployment_settings
from planner.model.spec import load_spec
from planner.placement.capacity import CPU_DEVICE, device_speed
from serve.app.direct import new_secret
from serve.app.ingress import INGRESS_ACTOR, Ingress
from serve.app.registry import REGISTRY, Registry
from serve.app.replica import ModelReplica
from serve.engines.base import ReplicaConfig
from serve.types import ModelCard

log = logging.getLogger("gpuplan")


class PlanFailed(RuntimeError):
    """The deploy.yaml args cannot be planned; the message has the numbers and the fix."""


def replica_configs(result: PlanningResult, args: DeployArgs, rollout: Rollout | None = None,
                    bindings: tuple[NodeBinding, ...] = (), direct_secret: str | None = None) -> dict[str, dict]:
    """Per rollout deployment: the ReplicaConfig its replicas start with (the engine's typed settings from the plan,
    planner.model.engines) and its Serve options (pure)."""
    rollout = rollout or result.rollout or realize(result.plan, model_rules(args))
    by_node = {b.node: b for b in bindings}
    entries = {m.name: m for m in (result.args or args).models}
    plans = {m.name: m for m in result.plan.models}
    nodes = {n.name: n for n in result.cluster.nodes}
    specs = result.specs or {}
    out = {}
    for spec in rollout.deployments:
        entry, mp = entries[spec.model], plans[spec.model]
        est = result.estimates[spec.model][mp.quantization]
        b = by_node.get(spec.node)
        opts = deployment_options(spec, entry, b.selector if b else None, rollout.plan_id)
        offload = entry.offload.cpu_memory if entry.offload else 0
        target = DeploymentTarget(
            model=entry.name, spec=specs.get(spec.model) or load_spec(entry.source),
            planned_bytes=int(mp.replica_bytes),
            device=result.device, device_total_bytes=_device_total(nodes.get(spec.node), result.device),
            offload_cpu_bytes=offload, dtype=entry.dtype, **_device_of(spec))
        if est.engine == "vllm":
            py = vllm_python()
            if py and py != sys.executable:  # vLLM's own venv (`make vllm`): the replica runs its Python
                opts["ray_actor_options"]["runtime_env"] = {"py_executable": py}
        out[spec.name] = {
            "replica": ReplicaConfig(
                name=entry.name, deployment=spec.name, node=spec.node, source=entry.source, engine=est.engine,
                settings=deployment_settings(est, target), quantization=mp.quantization,
                max_model_len=entry.max_model_len, max_num_seqs=entry.max_num_seqs,
                planned_bytes=int(mp.replica_bytes), weights_bytes=est.weights, offload_cpu_bytes=offload,
                trust_remote_code=entry.trust_remote_code, num_gpus=spec.num_gpus,
                num_cpus=opts["ray_actor_options"]["num_cpus"], registry=REGISTRY,
                stream_interval_s=entry.stream_interval_s, direct_secret=direct_secret,
                max_ongoing_requests=entry.max_ongoing_requests),
            "options": opts,
        }
    return out


def _device_of(spec) -> dict:
    """The device a rollout deployment runs on, by name (its GPU type, or ``cpu``), and its speed from the catalogs
    (None where they have none: only the simulated engine needs it, and says so)."""
    name = spec.gpu_type if spec.kind == "gpu" and spec.gpu_type else CPU_DEVICE
    try:
        speed = device_speed(name)
    except GpuplanError:
        speed = None
    return {"device_name": name, "device_speed": speed}


def _device_total(node, device: str) -> int:
    """The bytes a vLLM share is of: the node's smallest GPU (the basis the plan used), or its RAM for CPU replicas
    (0 when unknown: the settings then take the planned bytes)."""
    if device == "cuda" and node is not None and node.gpus:
        return min(g.total_bytes for g in node.gpus)
    return node.cpu_memory_bytes if node is not None else 0


def model_cards(result: PlanningResult, args: DeployArgs) -> list[ModelCard]:
    """What the API says of each model; ``placed_replicas`` is what the rollout runs at most (planner.rollout)."""
    plans = {m.name: m for m in result.plan.models}
    ro = result.rollout or realize(result.plan, model_rules(args))
    return [ModelCard(name=e.name, source=e.source, max_model_len=e.max_model_len,
                      quantization=plans[e.name].quantization, max_queued_requests=e.max_queued_requests,
                      request_timeout_s=e.request_timeout_s,
                      extra={"min_replicas": ro.rule(e.name).min_replicas,
                             "placed_replicas": ro.rule(e.name).max_replicas,
                             "max_ongoing_requests": e.max_ongoing_requests,
                             "routing": e.routing.model_dump(),
                             "wake": e.autoscaling.wake,
                             "simulated": result.estimates[e.name][plans[e.name].quantization].engine == "sim"})
            for e in args.models]


def _plan_or_exit(args: DeployArgs) -> PlanningResult:
    if args.cluster == "auto":
        from serve.app.inventory import gather_cluster

        cluster = gather_cluster()
    else:
        cluster = cluster_from_decl(args.cluster)
    return make_plan(args, cluster, installed_engines())


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
    from planner.output.plan_report import render_text

    from serve.app.scale_board import publish

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
    secret = new_secret() if parsed.http.direct else None  # the direct stream's (serve/app/direct.py)
    cfgs = replica_configs(result, parsed, rollout, bindings, secret)
    # test hook: GPUPLAN_FAULTS={"<model>": {"cuda": {"total": bytes, "free": bytes}, "fail": ["gpu", ...]}} makes
    # that model's replicas see a GPU that is not there and fail their loads in those modes (tests/integration)
    faults = json.loads(os.environ.get("GPUPLAN_FAULTS") or "{}")
    for c in cfgs.values():
        if c["replica"].name in faults:
            c["replica"] = dataclasses.replace(c["replica"], faults=faults[c["replica"].name])
    handles: dict[str, list] = {m.name: [] for m in parsed.models}
    for model, slots in rollout.fill:
        for name in dict.fromkeys(slots):
            c = cfgs[name]
            handles[model].append([name, ModelReplica.options(**c["options"]).bind(c["replica"])])
    # a new ingress at every deploy (its init args change), so /readyz says which deploy answers (serve/run/main.py)
    built = {"run_id": os.environ.get("GPUPLAN_RUN_ID"), "built_at": time.time(), "plan_id": rollout.plan_id}
    ingress = Ingress
    front = {"port": parsed.http.port, "host": parsed.http.host} if parsed.http.port else None
    if front:  # the front listens where the ingress runs: on the head node, like Serve's HeadOnly proxy; several
        # replicas share its port, so one that dies or is replaced leaves it open (args.http.replicas)
        ingress = Ingress.options(num_replicas=parsed.http.replicas,
                                  ray_actor_options={**INGRESS_ACTOR, "resources": {"node:__internal_head__": 0.001}})
    return ingress.bind(handles, model_cards(result, parsed), result.to_json(), rollout.to_json(),
                        [b.to_json() for b in bindings], parsed.http.api_key_env, built, front, secret)
