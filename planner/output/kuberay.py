"""A KubeRay ``RayService`` (``ray.io/v1``) from a deploy.yaml, a cluster declaration and the plan made on it.

``render_rayservice()`` turns one :class:`~planner.planning.PlanningResult` into a manifest (a dict):

- ``spec.serveConfigV2``: the deploy file's applications with the plan baked into the gpuplan app's args -- each
  model's quantization is the one the plan chose, ``replicas.max`` is clamped to what the plan placed, and
  ``cluster:`` is the inline declaration -- so the replicas plan identically inside the cluster, whatever the pods
  that exist at the moment (``cluster: auto`` would plan against however many worker pods the autoscaler has started).
- ``spec.rayClusterConfig``: a CPU-only head (``num-cpus: "0"``: no replica and no ingress lands there) and one worker
  group per node declaration, sized from the plan (see :func:`worker_groups`).
- ``spec.upgradeStrategy``: ``None`` by default, because a ``NewCluster`` upgrade needs a second cluster's worth of
  GPUs the plan has already given away (see :func:`upgrade_spare_gpus` and k8s/README.md).

Pure: PyYAML only, no ray; the planner's own ``plan()`` sizes the worker groups. ``rayservice_text()`` writes the
manifest as YAML with a comment header that summarises the plan.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, replace

import yaml

from planner.config import ClusterDecl, DeployArgs, NodeDecl, parse_deploy_args
from planner.errors import InputError
from planner.planning import PlanningResult, cluster_from_decl, make_plan
from planner.rollout import GPUPLAN_NODE_LABEL, deployment_options
from planner.units import GiB, MiB, format_bytes

# NOTE: the Ray image matching the Ray the project is tested with (ray[serve] 2.60 in the venv); `-gpu` images
# carry CUDA. rayVersion is read from the image tag when it has one (the autoscaler sidecar uses the same image).
DEFAULT_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
DEFAULT_RAY_VERSION = "2.60.0"
# NOTE: where the pods get gpuplan. The Ray image does not have it, so the gpuplan application installs it with a
# runtime_env pip requirement (a PEP 508 spec: a git URL, a wheel URL or a package index name). This default is a
# PLACEHOLDER -- the repository has no published home yet: pass --gpuplan-pip with yours, or --gpuplan-pip "" with an
# --image that already has gpuplan installed (k8s/README.md shows both).
DEFAULT_GPUPLAN_PIP = "gpuplan @ git+https://github.com/OWNER/gpuplan.git@main"
# NOTE: head pod size. It runs the GCS, the dashboard, the Serve controller, one HTTP proxy and the autoscaler's
# monitor, never a replica; the KubeRay LLM samples give it 2 CPUs and 4-32 GiB.
HEAD_CPUS = "2"
HEAD_MEMORY = "8Gi"
# NOTE: CPUs of a worker pod whose node declaration has no num_cpus: 4 per GPU (AWS g5/g6 and GCP g2 give 4-12
# vCPUs per GPU, so 4 fits their allocatable after daemonsets); 4 for a node without GPUs. A GPU replica asks for
# 0.5 CPU (serve/app/build.py), so 4 per GPU leaves room for 8 replicas per GPU plus tokenisation threads.
DEFAULT_CPUS_PER_GPU = 4
DEFAULT_CPUS_CPU_NODE = 4
# NOTE: a GPU pod's cold start (image pull, runtime_env pip install, model download and load) takes minutes, so the
# autoscaler keeps an idle worker pod 10 minutes (Ray's default is 60 s) before giving its GPUs back.
WORKER_IDLE_TIMEOUT_S = 600
SERVE_PORT = 8000  # KubeRay's serve Service and the workers' proxy readiness probe use the port named "serve"
MODEL_CACHE_MOUNT = "/models"  # the optional PVC; HF_HOME points here so that downloads survive pod restarts
HF_TOKEN_KEY = "hf_token"  # default key in the HF token Secret (as in KubeRay's ray-service.llm-serve sample)
UPGRADE_STRATEGIES = ("None", "NewCluster")
_MAX_NAME = 47  # KubeRay: RayService names longer than MaxRayServiceNameLength (53 - 6) are rejected
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class WorkerGroup:
    """One KubeRay worker group: the pod of one planned node (a declaration with ``replicas: N`` is N nodes)."""

    name: str  # groupName
    node: NodeDecl
    node_name: str  # the plan's node: the pod's Ray node label gpuplan.io/node, which its deployments select
    gpus_per_pod: int
    gpu_type: str | None  # Ray's accelerator type, as the plan and serve/app/build.py name it ("A10G")
    min_pods: int  # 1 when the node holds a minimum replica (the first min_replicas slots of a model's fill order)
    max_pods: int  # 1
    cpus: float

    @property
    def resource_name(self) -> str | None:
        return f"accelerator_type:{self.gpu_type}" if self.gpu_type else None


# ----------------------------------------------------------------------------------------------------------------
# Checks on the declaration (before planning)


def check_declaration(decl: ClusterDecl, *, where: str = "cluster") -> None:
    """What a KubeRay worker group cannot express, and unknown GPU names, as one-line InputErrors.

    A worker group requests one kind of ``nvidia.com/gpu``, so a node declaration holds one GPU kind; a GPU without
    ``memory`` must be in planner/catalog/gpus.json."""
    from planner.placement.capacity import lookup_gpu

    for nd in decl.nodes:
        if len(nd.gpus) > 1:
            kinds = ", ".join(f"{g.count} x {g.name}" for g in nd.gpus)
            raise InputError(
                f"{where}: nodes[{nd.name}] declares {len(nd.gpus)} GPU kinds ({kinds}); a KubeRay worker group "
                f"requests one kind of nvidia.com/gpu per pod: split it into one node entry per GPU kind"
            )
        for g in nd.gpus:
            if g.memory is not None:
                continue
            try:
                lookup_gpu(g.name)
            except InputError as exc:
                msg = str(exc).split("; or give", 1)[0]
                raise InputError(
                    f"{where}: nodes[{nd.name}].gpus: {msg}; or give its memory: "
                    f"{{name: {g.name}, memory: 24GiB, count: {g.count}}}"
                ) from None


# ----------------------------------------------------------------------------------------------------------------
# Worker groups from the plan


def group_name(node_name: str) -> str:
    """A KubeRay groupName (it becomes part of pod names) from a node declaration's name."""
    n = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return n or "workers"


def _nodes_by_decl(decl: ClusterDecl, result: PlanningResult) -> list[tuple[NodeDecl, list]]:
    """Pair each node declaration with its Cluster nodes (cluster_from_decl emits ``replicas`` nodes per entry, in
    declaration order)."""
    nodes = list(result.cluster.nodes)
    want = sum(nd.replicas for nd in decl.nodes)
    if len(nodes) != want:
        raise InputError(
            f"the plan was made on a cluster of {len(nodes)} nodes but the declaration has {want}; plan with "
            "cluster_from_decl(decl) of the same declaration"
        )
    out, i = [], 0
    for nd in decl.nodes:
        out.append((nd, nodes[i:i + nd.replicas]))
        i += nd.replicas
    return out


def worker_groups(decl: ClusterDecl, result: PlanningResult) -> list[WorkerGroup]:
    """One worker group per planned node (a declaration with ``replicas: N`` gives N groups, named like the plan's
    nodes, ``<name>-<i>``), each of one pod whose Ray node carries the label ``gpuplan.io/node=<node>`` that the
    node's deployments select; ``min_pods`` is 1 for a node that holds a minimum replica (the rollout's minimum
    slots), else 0 (the autoscaler starts the pod when a replica pinned to it is pending)."""
    pairs = _nodes_by_decl(decl, result)
    ro = result.rollout
    holds_min = {d.node for d in ro.deployments if d.min_slots} if ro is not None else set()
    groups, seen = [], {}
    for nd, nodes in pairs:
        for node in nodes:
            name = group_name(node.name)
            if name in seen:
                raise InputError(f"nodes {seen[name]!r} and {node.name!r} give the same worker group name {name!r}; "
                                 "rename one (lowercase letters, digits and '-')")
            seen[name] = node.name
            gpus = node.gpus
            gpu_type = (gpus[0].gpu_type or gpus[0].name).upper() if gpus else None
            cpus = nd.num_cpus if nd.num_cpus is not None else (
                DEFAULT_CPUS_PER_GPU * len(gpus) if gpus else DEFAULT_CPUS_CPU_NODE)
            groups.append(WorkerGroup(
                name=name, node=nd, node_name=node.name, gpus_per_pod=len(gpus), gpu_type=gpu_type,
                min_pods=1 if node.name in holds_min else 0, max_pods=1, cpus=cpus,
            ))
    return groups


def upgrade_spare_gpus(doc: dict) -> tuple[int, int]:
    """(GPUs a NewCluster upgrade needs free beside the running cluster -- the new cluster's minimum pods --, GPUs
    of all the worker groups at their maximum) of a rendered RayService."""
    spare = total = 0
    for wg in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        n = int(wg["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        spare += n * wg["minReplicas"]
        total += n * wg["maxReplicas"]
    return spare, total


# ----------------------------------------------------------------------------------------------------------------
# serveConfigV2


def _size(n: int) -> int | str:
    """Bytes back to the unit form a person wrote ("64GiB") when exact, else the int."""
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return n


def declaration_args(decl: ClusterDecl) -> dict:
    """The declaration as deploy.yaml ``cluster:`` args: what planning reads (the Kubernetes-only node_selector and
    tolerations stay in the worker groups), sizes in units, defaults left out."""
    nodes = []
    for nd in decl.nodes:
        d: dict = {"name": nd.name}
        if nd.replicas != 1:
            d["replicas"] = nd.replicas
        d["cpu_memory"] = _size(nd.cpu_memory)
        if nd.num_cpus is not None:
            d["num_cpus"] = int(nd.num_cpus) if float(nd.num_cpus).is_integer() else nd.num_cpus
        gpus = []
        for g in nd.gpus:
            e: dict = {"name": g.name}
            if g.memory is not None:
                e["memory"] = _size(g.memory)
            e["count"] = g.count
            gpus.append(e)
        if gpus:
            d["gpus"] = gpus
        nodes.append(d)
    return {"nodes": nodes}


def check_sources(raw_args: dict, args: DeployArgs, *, model_cache: bool = False) -> None:
    """Model sources the pods can load: catalog or Hugging Face names, or paths on the cache volume. A source is
    local when it looks like a path or when deploy.yaml's loader resolved it to one (``args`` is the parsed file)."""
    resolved = {m.name: m.source for m in args.models}
    for raw in raw_args.get("models") or []:
        src = str(raw.get("source", ""))
        local = (src.startswith((".", "/", "~")) or resolved.get(raw.get("name"), src) != src
                 or os.path.exists(src))
        if local and not (model_cache and src.startswith(MODEL_CACHE_MOUNT + "/")):
            raise InputError(
                f"models[{raw.get('name')}].source {src!r} is a local path, which the pods do not have; use a "
                f"catalog or Hugging Face name (`gpuplan catalog`), or copy the model onto the cache volume "
                f"(--model-cache-pvc) and give its path under {MODEL_CACHE_MOUNT}/"
            )


def bake_args(raw_args: dict, args: DeployArgs, result: PlanningResult, decl: ClusterDecl, *,
              model_cache: bool = False) -> dict:
    """The gpuplan app's args with the plan baked in: one quantization per model (the plan's), ``replicas.max``
    clamped to what the plan placed, and ``cluster:``
    the inline declaration. Everything else is kept as the user wrote it."""
    check_sources(raw_args, args, model_cache=model_cache)
    by_name = {m.name: m for m in result.plan.models}
    entries = {m.name: m for m in args.models}
    models = []
    for raw in raw_args.get("models") or []:
        m = dict(raw)
        entry, mp = entries[m["name"]], by_name[m["name"]]
        m["quantization"] = mp.quantization
        upper = max(min(entry.replicas.max, mp.placed_replicas), entry.replicas.min, 1)
        m["replicas"] = {"min": entry.replicas.min, "max": upper}
        models.append(m)
    out = {}
    for k, v in raw_args.items():
        if k == "cluster":
            continue
        if k == "models":
            out["cluster"] = declaration_args(decl)
            out["models"] = models
        else:
            out[k] = copy.deepcopy(v)
    return out


def _gpuplan_app_index(apps: list, app: str | None) -> int:
    for i, a in enumerate(apps):
        if isinstance(a, dict) and str(a.get("import_path", "")).startswith("serve.app") and (
                app is None or a.get("name") == app):
            return i
    raise InputError("deploy file: no application with import_path serve.app:build_app"
                     + (f" named {app!r}" if app else ""))


def inside_plan(deploy_file: dict, args: DeployArgs, result: PlanningResult, decl: ClusterDecl, *,
                app: str | None = None, model_cache: bool = False) -> tuple[dict, PlanningResult]:
    """(the gpuplan app's baked args, the plan build_app makes of them inside the cluster): the deployments and
    worker groups are rendered from the latter, so the manifest names exactly what runs."""
    if "applications" in deploy_file:
        raw = deploy_file["applications"][_gpuplan_app_index(deploy_file["applications"], app)].get("args") or {}
    else:
        raw = deploy_file
    baked = bake_args(raw, args, result, decl, model_cache=model_cache)
    parsed = parse_deploy_args(baked, what="baked args")
    return baked, make_plan(parsed, cluster_from_decl(parsed.cluster))


def serve_config(deploy_file: dict, args: DeployArgs, result: PlanningResult, decl: ClusterDecl, *,
                 app: str | None = None, gpuplan_pip: str | None = DEFAULT_GPUPLAN_PIP,
                 model_cache: bool = False, inside: tuple[dict, PlanningResult] | None = None) -> dict:
    """The Serve config (``ServeDeploySchema`` shape) the RayService runs: the deploy file with the gpuplan app's args
    baked (:func:`bake_args`), its deployments as build_app makes them (one per model and node, pinned by the node's
    ``gpuplan.io/node`` label), a runtime_env that installs gpuplan, and HTTP on 0.0.0.0:8000 behind a proxy on every
    node (KubeRay's serve Service selects the pods whose proxy is healthy)."""
    if "applications" in deploy_file:
        cfg = copy.deepcopy(deploy_file)
    else:  # a bare args mapping
        cfg = {"applications": [{"name": "llm", "route_prefix": "/", "import_path": "serve.app:build_app",
                                 "args": copy.deepcopy(deploy_file)}]}
    apps = cfg["applications"]
    i = _gpuplan_app_index(apps, app)
    a = dict(apps[i])
    baked, planned = inside or inside_plan(deploy_file, args, result, decl, app=app, model_cache=model_cache)
    front = baked.get("http") or {}
    if front.get("port"):  # KubeRay's serve Service targets the proxies' port on every pod: no front of our own
        baked = {**baked, "http": {k: v for k, v in front.items() if k not in ("port", "host")}}
    a["args"] = baked
    ro = planned.rollout
    entries = {m.name: m for m in parse_deploy_args(baked, what="baked args").models}
    ours = [deployment_options(d, entries[d.model], {GPUPLAN_NODE_LABEL: d.node}, ro.plan_id)
            for d in ro.deployments]
    names = {d["name"] for d in ours}
    a["deployments"] = [d for d in (a.get("deployments") or []) if d.get("name") not in names] + ours
    env = dict(a.get("runtime_env") or {})
    if gpuplan_pip and not {"pip", "uv", "conda"} & env.keys():
        env["pip"] = {"packages": [gpuplan_pip], "pip_check": False}
    if env:
        a["runtime_env"] = env
    apps[i] = a
    http = dict(cfg.get("http_options") or {})
    http.update(host="0.0.0.0", port=SERVE_PORT)
    out = {"proxy_location": "EveryNode", "http_options": http}
    out.update({k: v for k, v in cfg.items() if k not in ("proxy_location", "http_options")})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The manifest


def _ray_version(image: str) -> str:
    """The Ray version of a rayproject/ray[-llm] image from its tag; DEFAULT_RAY_VERSION for any other image (build
    yours FROM the default image, k8s/README.md)."""
    m = re.match(r"^(?:.*/)?rayproject/ray(?:-llm|-ml)?:(\d+\.\d+\.\d+)", image)
    return m.group(1) if m else DEFAULT_RAY_VERSION


def _secret_ref(spec: str, default_key: str) -> tuple[str, str]:
    name, _, key = spec.partition(":")
    if not _DNS_LABEL.match(name) or len(name) > 253:
        raise InputError(f"secret {spec!r}: write NAME or NAME:KEY with a Kubernetes name (lowercase letters, digits "
                         "and '-')")
    return name, key or default_key


def _env_and_volumes(model_cache_pvc, hf_token_secret, api_key_secret, api_key_env) -> tuple[list, list, list]:
    env, mounts, volumes = [], [], []
    if hf_token_secret:
        name, key = _secret_ref(hf_token_secret, HF_TOKEN_KEY)
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    if api_key_secret:
        name, key = _secret_ref(api_key_secret, "api_key")
        env.append({"name": api_key_env, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    if model_cache_pvc:
        if not _DNS_LABEL.match(model_cache_pvc):
            raise InputError(f"--model-cache-pvc {model_cache_pvc!r}: give the name of a PersistentVolumeClaim "
                             "(lowercase letters, digits and '-')")
        env.append({"name": "HF_HOME", "value": f"{MODEL_CACHE_MOUNT}/huggingface"})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": model_cache_pvc}})
    return env, mounts, volumes


def _cpu(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{int(round(n * 1000))}m"


def _memory(n: int) -> str:
    """Kubernetes quantity, in Gi/Mi when exact."""
    for unit, size in (("Gi", GiB), ("Mi", MiB)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def render_rayservice(deploy_file: dict, args: DeployArgs, result: PlanningResult, decl: ClusterDecl, *,
                      name: str = "gpuplan", namespace: str | None = None, image: str = DEFAULT_IMAGE,
                      gpuplan_pip: str | None = DEFAULT_GPUPLAN_PIP, model_cache_pvc: str | None = None,
                      hf_token_secret: str | None = None, api_key_secret: str | None = None,
                      upgrade_strategy: str = "None", ray_token_auth: bool = False, app: str | None = None) -> dict:
    """A ``ray.io/v1`` RayService for ``result`` (planned on ``cluster_from_decl(decl)``); see the module doc.

    ``hf_token_secret`` / ``api_key_secret``: ``NAME`` or ``NAME:KEY`` of a Secret whose value becomes ``HF_TOKEN``
    (gated models) / the API bearer token (``http.api_key_env``) in every pod. ``model_cache_pvc``: a PVC mounted
    at /models with ``HF_HOME=/models/huggingface``. ``gpuplan_pip``: the pip requirement that installs gpuplan in
    the app's runtime_env (None or "" when ``image`` has it). ``ray_token_auth``: Ray's token authentication for the
    whole cluster through KubeRay's ``authOptions`` (KubeRay >= 1.6, Ray >= 2.52)."""
    if not _DNS_LABEL.match(name) or len(name) > _MAX_NAME:
        raise InputError(f"--name {name!r}: a RayService name is lowercase letters, digits and '-', starts with a "
                         f"letter and has at most {_MAX_NAME} characters (KubeRay's limit)")
    if namespace is not None and (not _DNS_LABEL.match(namespace) or len(namespace) > 63):
        raise InputError(f"--namespace {namespace!r}: a namespace is lowercase letters, digits and '-' (at most 63)")
    if upgrade_strategy not in UPGRADE_STRATEGIES:
        raise InputError(f"--upgrade-strategy {upgrade_strategy!r}: choose {' or '.join(UPGRADE_STRATEGIES)}")
    ray_version = _ray_version(image)
    if ray_token_auth and tuple(int(x) for x in ray_version.split(".")) < (2, 52, 0):
        raise InputError(f"--ray-token-auth needs Ray >= 2.52.0 (KubeRay's authOptions), the image has {ray_version}; "
                         "use a newer --image or leave token auth off")
    check_declaration(decl)
    inside = inside_plan(deploy_file, args, result, decl, app=app, model_cache=bool(model_cache_pvc))
    groups = worker_groups(decl, inside[1])
    cfg = serve_config(deploy_file, args, result, decl, app=app, gpuplan_pip=gpuplan_pip,
                       model_cache=bool(model_cache_pvc), inside=inside)
    env, mounts, volumes = _env_and_volumes(model_cache_pvc, hf_token_secret, api_key_secret, args.http.api_key_env)

    def container(cname: str, resources: dict, ports: list) -> dict:
        c: dict = {"name": cname, "image": image}
        if env:
            c["env"] = copy.deepcopy(env)
        c["ports"] = ports
        c["resources"] = resources
        if mounts:
            c["volumeMounts"] = copy.deepcopy(mounts)
        return c

    def pod_spec(c: dict, node: NodeDecl | None) -> dict:
        s: dict = {"containers": [c]}
        if node is not None and node.node_selector:
            s["nodeSelector"] = dict(node.node_selector)
        if node is not None and node.tolerations:
            s["tolerations"] = copy.deepcopy(node.tolerations)
        if volumes:
            s["volumes"] = copy.deepcopy(volumes)
        return s

    head_res = {"requests": {"cpu": HEAD_CPUS, "memory": HEAD_MEMORY}, "limits": {"cpu": HEAD_CPUS,
                                                                                   "memory": HEAD_MEMORY}}
    head_ports = [{"containerPort": 6379, "name": "gcs", "protocol": "TCP"},
                  {"containerPort": 8265, "name": "dashboard", "protocol": "TCP"},
                  {"containerPort": 10001, "name": "client", "protocol": "TCP"},
                  {"containerPort": SERVE_PORT, "name": "serve", "protocol": "TCP"},
                  {"containerPort": 8080, "name": "metrics", "protocol": "TCP"}]
    head = {
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
        "template": {"spec": pod_spec(container("ray-head", head_res, head_ports), None)},
    }
    workers = []
    for g in groups:
        res = {"cpu": _cpu(g.cpus), "memory": _memory(g.node.cpu_memory)}
        params = {}
        if g.gpus_per_pod:
            res["nvidia.com/gpu"] = str(g.gpus_per_pod)
            params["num-gpus"] = str(g.gpus_per_pod)
            # Ray sets accelerator_type:<T> itself once the pod runs; the autoscaler can only scale a group from
            # zero for a replica pinned to <T> if the group advertises it before any pod exists.
            params["resources"] = "'{\"%s\": 1}'" % g.resource_name
        else:
            params["num-gpus"] = "0"
        ports = [{"containerPort": SERVE_PORT, "name": "serve", "protocol": "TCP"}]
        workers.append({
            "groupName": g.name,
            "replicas": g.min_pods,
            "minReplicas": g.min_pods,
            "maxReplicas": g.max_pods,
            # the Ray node label (KubeRay >= 1.5) its deployments select; the autoscaler (v2) reads it to start
            # this group when a replica pinned to it is pending
            "labels": {GPUPLAN_NODE_LABEL: g.node_name},
            "rayStartParams": params,
            "template": {"spec": pod_spec(container("ray-worker", {"requests": dict(res), "limits": dict(res)},
                                                    ports), g.node)},
        })
    meta: dict = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/name": "gpuplan", "app.kubernetes.io/managed-by": "gpuplan"}
    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta,
        "spec": {
            "upgradeStrategy": {"type": upgrade_strategy},
            "serveConfigV2": yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=120),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": True,
                # v2: the autoscaler that understands label selectors (each deployment selects its node's label)
                "autoscalerOptions": {"version": "v2", "idleTimeoutSeconds": WORKER_IDLE_TIMEOUT_S},
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }
    if ray_token_auth:
        # one switch for every pod and for the operator's own dashboard calls (KubeRay makes and mounts the
        # token Secret); RAY_AUTH_MODE in the app's runtime_env would reach only the replicas
        doc["spec"]["rayClusterConfig"]["authOptions"] = {"mode": "token"}
    return doc


# ----------------------------------------------------------------------------------------------------------------
# Text


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, s: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def summary_lines(result: PlanningResult, args: DeployArgs, doc: dict) -> list[str]:
    """The plan, the deployments and the worker groups of a rendered RayService in a few lines, for the manifest's
    header."""
    p = result.plan
    lines = [f"Plan: headroom {p.headroom:.0%}, reserve {format_bytes(p.gpu_reserve_bytes)}/GPU, "
             f"{len(result.cluster.gpus)} GPUs declared"]
    entries = {m.name: m for m in args.models}
    w = max(len(m.name) for m in p.models)
    for m in p.models:
        e = entries[m.name]
        upper = max(min(e.replicas.max, m.placed_replicas), e.replicas.min, 1)
        lines.append(f"  {m.name:{w}}  {m.quantization:5} {format_bytes(m.replica_bytes)}/replica  replicas "
                     f"{e.replicas.min}..{upper} (asked max {e.replicas.max})")
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = cfg["applications"][_gpuplan_app_index(cfg["applications"], None)]
    deps = [d for d in app.get("deployments") or [] if "@" in d.get("name", "")]
    lines.append(f"Deployments ({len(deps)}, one per model and node; num_gpus is the plan's share of that node's "
                 "GPUs, label_selector pins the node):")
    for d in deps:
        actor = d["ray_actor_options"]
        share = f"num_gpus {actor['num_gpus']:g}" if "num_gpus" in actor else f"memory {format_bytes(actor['memory'])}"
        lines.append(f"  {d['name']}: {share}, up to {d['autoscaling_config']['max_replicas']} replicas")
    lines.append("Worker groups (one pod per planned node, Ray label gpuplan.io/node=<node>; min 1 where a model's "
                 "minimum replicas run):")
    for wg in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        res = wg["template"]["spec"]["containers"][0]["resources"]["limits"]
        acc = json.loads(wg["rayStartParams"]["resources"].strip("'")) if "resources" in wg["rayStartParams"] else {}
        kind = (f"{res['nvidia.com/gpu']} x " + ", ".join(k.split(":", 1)[1] for k in acc)
                if "nvidia.com/gpu" in res else "no GPU")
        lines.append(f"  {wg['groupName']}: {wg['minReplicas']}..{wg['maxReplicas']} pod of {kind}, {res['cpu']} "
                     f"CPU, {res['memory']}")
    spare, total = upgrade_spare_gpus(doc)
    if doc["spec"]["upgradeStrategy"]["type"] == "None":
        lines.append(f"Upgrades: upgradeStrategy None (Serve config changes roll in place; cluster changes need a "
                     f"re-create). NewCluster would need {spare} free GPUs beside the {total} declared.")
    else:
        lines.append(f"Upgrades: upgradeStrategy NewCluster needs {spare} free GPUs beside the running cluster "
                     f"(the new cluster's min pods); the declaration has {total}.")
    for n in p.notes:
        lines.append(f"Note: {n}")
    if result.rollout is not None:
        for n in result.rollout.notes:
            lines.append(f"Note: {n}")
    return lines


def rayservice_text(doc: dict, header: list[str] | None = None) -> str:
    """The manifest as YAML (``serveConfigV2`` as a block), under ``#`` header lines wrapped at 118 columns."""
    import textwrap

    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    head = []
    for h in header or []:
        lead = " " * (len(h) - len(h.lstrip()))
        for line in textwrap.wrap(h, 116, subsequent_indent=lead + "  ", break_on_hyphens=False) or [""]:
            head.append(f"# {line}\n" if line else "#\n")
    return "".join(head) + body


def render_files(deploy_path: str, *, cluster_path: str | None = None, app: str | None = None,
                 command: str | None = None, **options) -> str:
    """Read deploy.yaml and the cluster file, plan, and return the manifest text (what ``gpuplan render kuberay``
    writes). Raises InputError (exit 2) and InfeasiblePlanError (exit 3) as ``gpuplan plan`` does."""
    from planner.config import load_cluster_file, load_deploy_file
    from planner.planning import cluster_from_decl, make_plan

    args, data = load_deploy_file(deploy_path, app=app)
    if cluster_path:
        decl, where = load_cluster_file(cluster_path), cluster_path
    elif args.cluster != "auto":
        decl, where = args.cluster, f"{deploy_path} cluster"
    else:
        raise InputError(f"{deploy_path}: `cluster: auto` cannot be rendered, the pods do not exist yet; pass "
                         "--cluster FILE with the nodes the RayService gets (see k8s/cluster.yaml)")
    check_declaration(decl, where=where)
    apps = data.get("applications")
    raw = apps[_gpuplan_app_index(apps, app)].get("args") or {} if apps is not None else data
    check_sources(raw, args, model_cache=bool(options.get("model_cache_pvc")))
    result = make_plan(args, cluster_from_decl(decl))
    doc = render_rayservice(data, args, result, decl, app=app, **options)
    header = []
    if command:
        header += [f"Rendered by `{command}`.", "Do not edit: change deploy.yaml or the cluster file and re-render "
                   "(k8s/README.md).", ""]
    header += summary_lines(result, args, doc)
    return rayservice_text(doc, header)
