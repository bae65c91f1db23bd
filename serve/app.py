"""``serve run deploy.yaml`` entry point: ``build_app(args)`` plans, then builds one deployment per model behind an
OpenAI-compatible FastAPI ingress. Thin Ray glue; every decision is in planner/."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
from ray import serve

from planner.config import DeployArgs, parse_deploy_args
from planner.errors import GpuplanError
from planner.planning import PlanningResult, cluster_from_decl, make_plan
from planner.decisions import autoscaling_config

from .replica import ModelReplica
from .types import ModelCard, Overloaded, SamplingParams, Unavailable

log = logging.getLogger("gpuplan")
REGISTRY = "gpuplan-registry"
# NOTE: fractional CPUs so that an ingress and several replicas schedule on a 2-core laptop (Ray Serve's own
# controller and proxy also need CPU); a CPU replica asks for one whole core to run its matmuls.
INGRESS_CPUS = 0.1
GPU_REPLICA_CPUS = 0.5
CPU_REPLICA_CPUS = 0.5


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


def replica_configs(result: PlanningResult, args: DeployArgs) -> dict[str, dict]:
    """Per model: what ModelReplica needs, and the deployment options the plan implies (pure)."""
    out = {}
    by_name = {m.name: m for m in result.plan.models}
    for entry in args.models:
        mp = by_name[entry.name]
        est = result.estimates[entry.name][mp.quantization]
        gpu_reps = [r for g in result.plan.gpus for r in g.replicas if r.model == entry.name]
        num_gpus = max((r.num_gpus for r in gpu_reps), default=0.0)
        placed = mp.placed_replicas
        cpu_bytes = max((r.bytes for r in result.plan.cpu_replicas if r.model == entry.name), default=0)
        gpu_types = {g.gpu_type for g in result.plan.gpus for r in g.replicas if r.model == entry.name}
        actor = {"num_cpus": GPU_REPLICA_CPUS if num_gpus else CPU_REPLICA_CPUS}
        if num_gpus:
            actor["num_gpus"] = num_gpus
            if entry.gpu_type or (len({g.gpu_type for g in result.cluster.gpus}) > 1 and len(gpu_types) == 1):
                actor["accelerator_type"] = (entry.gpu_type or next(iter(gpu_types))).upper()
        elif cpu_bytes:
            actor["memory"] = cpu_bytes
        planned = int(mp.replica_bytes)
        out[entry.name] = {
            "replica": {
                "name": entry.name, "source": entry.source, "quantization": mp.quantization, "dtype": entry.dtype,
                "max_model_len": entry.max_model_len, "max_num_seqs": entry.max_num_seqs,
                "planned_bytes": planned, "weights_bytes": est.weights,
                "offload_cpu_bytes": entry.offload.cpu_memory if entry.offload else 0,
                "trust_remote_code": entry.trust_remote_code, "num_gpus": num_gpus,
                "num_cpus": actor["num_cpus"], "registry": REGISTRY,
                "stream_interval_s": entry.stream_interval_s,
            },
            "options": {
                "name": f"model-{entry.name}",
                "ray_actor_options": actor,
                "autoscaling_config": autoscaling_config(
                    min_replicas=entry.replicas.min, max_replicas=entry.replicas.max, placed_replicas=placed,
                    target_ongoing_requests=entry.autoscaling.target_ongoing_requests,
                    upscale_delay_s=entry.autoscaling.upscale_delay_s,
                    downscale_delay_s=entry.autoscaling.downscale_delay_s,
                    look_back_period_s=entry.autoscaling.look_back_period_s,
                    metrics_interval_s=entry.autoscaling.metrics_interval_s),
                "max_ongoing_requests": entry.max_ongoing_requests,
                "max_queued_requests": entry.max_queued_requests,
                "health_check_period_s": 10,
                "health_check_timeout_s": 60,
                "graceful_shutdown_wait_loop_s": 2,
                "graceful_shutdown_timeout_s": 30,
            },
            "card": ModelCard(name=entry.name, source=entry.source, max_model_len=entry.max_model_len,
                              quantization=mp.quantization, max_queued_requests=entry.max_queued_requests,
                              request_timeout_s=entry.request_timeout_s,
                              extra={"min_replicas": entry.replicas.min, "placed_replicas": placed}),
        }
    return out


@serve.deployment(ray_actor_options={"num_cpus": INGRESS_CPUS}, max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    """The HTTP front: routes by model name to each model's deployment handle (the Backend of openai_api)."""

    def __init__(self, handles: dict, cards: list[ModelCard], plan_json: dict, api_key_env: str):
        self.handles = handles
        self._cards = cards
        self._plan = plan_json
        self.app_name = serve.get_replica_context().app_name
        self.api_key = os.environ.get(api_key_env) or None
        self._ready_cache: tuple[float, bool, dict] | None = None

    def __serve_build_asgi_app__(self):
        from .openai_api import create_app

        return create_app(self, api_key=self.api_key)

    # ---- Backend protocol
    def cards(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        handle = self.handles[model].options(stream=True)
        try:
            gen = handle.generate.remote(prompt_ids, params)
            async for chunk in gen:
                yield chunk
        except BackPressureError as exc:
            raise Overloaded(f"model {model!r} has a full queue: {exc}", retry_after_s=1.0) from None
        except DeploymentUnavailableError as exc:
            raise Unavailable(f"model {model!r} has no replica available: {exc}", retry_after_s=5.0) from None

    async def readiness(self) -> tuple[bool, dict]:
        now = time.time()
        if self._ready_cache and now - self._ready_cache[0] < 1.0:
            return self._ready_cache[1], self._ready_cache[2]
        detail, ok = {}, True
        try:
            status = await asyncio.to_thread(serve.status)
            deps = status.applications[self.app_name].deployments
        except Exception as exc:
            return False, {"error": f"cannot read Serve status: {exc}"}
        for card in self._cards:
            d = deps.get(f"model-{card.name}")
            running = (d.replica_states or {}).get("RUNNING", 0) if d else 0
            need = card.extra.get("min_replicas", 1)
            detail[card.name] = {"running_replicas": running, "min_replicas": need,
                                 "status": str(d.status) if d else "MISSING"}
            ok = ok and running >= max(need, 1)
        self._ready_cache = (now, ok, detail)
        return ok, detail

    async def plan(self) -> dict:
        out = dict(self._plan)
        try:
            reg = ray.get_actor(REGISTRY)
            replicas = await reg.all.remote()
        except Exception:
            replicas = []
        out["replicas"] = sorted(replicas, key=lambda r: (r["model"], r["replica_id"]))
        return out


def _plan_or_exit(args: DeployArgs) -> PlanningResult:
    if args.cluster == "auto":
        from .inventory import gather_cluster

        cluster = gather_cluster()
    else:
        cluster = cluster_from_decl(args.cluster)
    return make_plan(args, cluster)


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

    log.warning("gpuplan plan:\n%s", render_text(result.plan))
    Registry.options(name=REGISTRY, get_if_exists=True, lifetime="detached").remote()
    cfgs = replica_configs(result, parsed)
    handles = {name: ModelReplica.options(**c["options"]).bind(c["replica"]) for name, c in cfgs.items()}
    return Ingress.bind(handles, [c["card"] for c in cfgs.values()], result.to_json(), parsed.http.api_key_env)
