"""`gpuplan render kuberay`: the RayService manifest is valid for KubeRay's own CRD schema (vendored, ray.io/v1), its
Serve config parses with Ray Serve's own schema, the plan it bakes in replans identically, the worker groups hold
what the replicas ask for, and k8s/rayservice.yaml is exactly what the renderer makes of k8s/deploy.yaml."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from planner.cli import main
from planner.config import ClusterDecl, load_cluster_file, load_deploy_file, parse_deploy_args
from planner.errors import InfeasiblePlanError, InputError
from planner.kuberay import render_files, render_rayservice, upgrade_spare_gpus
from planner.planning import cluster_from_decl, make_plan

# Ray Serve's own pydantic models warn about their Field(...) style on import; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = Path(__file__).parent / "data" / "kuberay" / "rayservice-v1.schema.json"
EXAMPLE_ARGS = ["k8s/deploy.yaml", "--cluster", "k8s/cluster.yaml", "--hf-token-secret", "hf-token"]


def _strict(node):
    """The CRD schema as JSON Schema for `kubectl apply` with strict field validation: unknown fields are errors
    (objects with `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` are closed),
    and `x-kubernetes-int-or-string` means integer or string. jsonschema ignores the other `x-kubernetes-*` keys
    (list/map types, CEL validations), as a schema check without an API server must."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator():
    schema = _strict(json.loads(SCHEMA_PATH.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ----------------------------------------------------------------------------------------------------------------
# Scenarios: (deploy file, cluster file, render options)

DEPLOY = (ROOT / "k8s" / "deploy.yaml").read_text()
MIXED_CLUSTER = {
    "nodes": [
        {"name": "a10g", "replicas": 2, "cpu_memory": "64GiB", "gpus": [{"name": "A10G", "count": 4}]},
        {"name": "L4 pool", "replicas": 3, "cpu_memory": "32GiB", "num_cpus": 7.5, "gpus": [{"name": "L4"}],
         "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}},
        {"name": "custom", "cpu_memory": "48GiB", "gpus": [{"name": "MI-X", "memory": "40GiB", "count": 2}]},
        {"name": "cpu", "cpu_memory": "32GiB"},
    ]
}
PINNED_DEPLOY = {  # a bare args mapping, a model pinned to a GPU type, min 0
    "models": [
        {"name": "qwen", "source": "Qwen/Qwen2.5-7B-Instruct", "quantization": "int8", "max_model_len": 2048,
         "replicas": {"min": 1, "max": 3}, "gpu_type": "L4"},
        {"name": "phi", "source": "microsoft/Phi-3-mini-4k-instruct", "quantization": ["bf16", "int8"],
         "max_model_len": 2048, "replicas": {"min": 0, "max": 2}},
    ]
}
SCENARIOS = {
    "example": (DEPLOY, (ROOT / "k8s" / "cluster.yaml").read_text(), {"hf_token_secret": "hf-token"}),
    "mixed-all-options": (DEPLOY, yaml.safe_dump(MIXED_CLUSTER), dict(
        name="llm-prod", namespace="serving", image="registry.example.com/gpuplan:0.1.0", gpuplan_pip=None,
        model_cache_pvc="hf-cache", hf_token_secret="hf:token", api_key_secret="gpuplan-api",
        upgrade_strategy="NewCluster", ray_token_auth=True)),
    "pinned-bare-args": (yaml.safe_dump(PINNED_DEPLOY), yaml.safe_dump(MIXED_CLUSTER), {}),
}


def _render(tmp_path, key):
    deploy, cluster, opts = SCENARIOS[key]
    (tmp_path / "deploy.yaml").write_text(deploy)
    (tmp_path / "cluster.yaml").write_text(cluster)
    text = render_files(str(tmp_path / "deploy.yaml"), cluster_path=str(tmp_path / "cluster.yaml"), **opts)
    args, _ = load_deploy_file(str(tmp_path / "deploy.yaml"))
    decl = load_cluster_file(str(tmp_path / "cluster.yaml"))
    return yaml.safe_load(text), args, decl


def _gpuplan_app(doc) -> dict:
    cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return next(a for a in cfg["applications"] if a["import_path"].startswith("serve.app"))


# ----------------------------------------------------------------------------------------------------------------
# The example cannot drift


def test_k8s_rayservice_yaml_is_what_the_renderer_makes_of_the_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "rayservice.yaml"
    assert main(["render", "kuberay", *EXAMPLE_ARGS, "-o", str(out)]) == 0
    want = (ROOT / "k8s" / "rayservice.yaml").read_text()
    assert out.read_text() == want, (
        "k8s/rayservice.yaml is stale; re-render it: gpuplan render kuberay " + " ".join(EXAMPLE_ARGS)
        + " -o k8s/rayservice.yaml")
    assert want.startswith("# Rendered by `gpuplan render kuberay " + " ".join(EXAMPLE_ARGS) + "`")


def test_example_plan_is_the_one_the_readme_describes(tmp_path):
    doc, args, decl = _render(tmp_path, "example")
    models = {m["name"]: m for m in _gpuplan_app(doc)["args"]["models"]}
    assert models["llama-3.1-8b"]["quantization"] == "int4" and models["qwen2.5-7b"]["quantization"] == "int8"
    (wg,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (wg["minReplicas"], wg["maxReplicas"], wg["rayStartParams"]["num-gpus"]) == (2, 2, "4")
    assert upgrade_spare_gpus(doc) == (8, 8)  # k8s/README.md: a NewCluster upgrade needs the whole cluster again


# ----------------------------------------------------------------------------------------------------------------
# Schemas: KubeRay's CRD, Ray Serve's config, gpuplan's own args


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_manifest_is_valid_for_the_kuberay_crd(tmp_path, validator, key):
    doc, _, _ = _render(tmp_path, key)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert _errors(validator, doc) == []


def test_the_schema_check_catches_what_kubectl_would_reject(tmp_path, validator):
    doc, _, _ = _render(tmp_path, "example")
    wg = lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]  # noqa: E731
    typo = copy.deepcopy(doc)
    wg(typo)["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in _errors(validator, typo))
    not_string = copy.deepcopy(doc)
    wg(not_string)["rayStartParams"]["num-gpus"] = 4
    assert any("not of type 'string'" in e for e in _errors(validator, not_string))
    quantity = copy.deepcopy(doc)
    wg(quantity)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 4  # int-or-string
    assert _errors(validator, quantity) == []
    bad_quantity = copy.deepcopy(doc)
    wg(bad_quantity)["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "lots"
    assert any("memory" in e for e in _errors(validator, bad_quantity))
    no_cluster = copy.deepcopy(doc)
    del no_cluster["spec"]["rayClusterConfig"]
    assert any("rayClusterConfig" in e for e in _errors(validator, no_cluster))


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_serve_config_parses_with_ray_serve_schema(tmp_path, key):
    from ray.serve.schema import ServeDeploySchema

    doc, _, _ = _render(tmp_path, key)
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert cfg.http_options.host == "0.0.0.0" and cfg.http_options.port == 8000
    assert cfg.proxy_location.value == "EveryNode"
    (app,) = [a for a in cfg.applications if a.import_path == "serve.app:build_app"]
    if SCENARIOS[key][2].get("gpuplan_pip", "default") is None:
        assert "pip" not in (app.runtime_env or {})
    else:
        assert app.runtime_env["pip"]["packages"][0].startswith("gpuplan")


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_baked_args_plan_identically_inside_the_cluster(tmp_path, key):
    doc, args, decl = _render(tmp_path, key)
    baked = parse_deploy_args(_gpuplan_app(doc)["args"])
    assert isinstance(baked.cluster, ClusterDecl)
    for m in baked.models:
        assert len(m.quantization) == 1, "one quantization per model, the planned one"
    before = make_plan(args, cluster_from_decl(decl)).plan
    after = make_plan(baked, cluster_from_decl(baked.cluster)).plan
    key_of = lambda p: {m.name: (m.quantization, m.placed_replicas, m.num_gpus_by_gpu_type) for m in p.models}  # noqa
    assert key_of(after) == key_of(before)
    for m in baked.models:
        assert m.replicas.max == max(min(args.models[[a.name for a in args.models].index(m.name)].replicas.max,
                                         before.model(m.name).placed_replicas), m.replicas.min, 1)


# ----------------------------------------------------------------------------------------------------------------
# The worker groups hold what the replicas ask for


def _group_gpus(doc) -> dict:
    """groupName -> (GPUs per pod, min pods, max pods, advertised Ray resources)"""
    out = {}
    for wg in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        c = wg["template"]["spec"]["containers"][0]["resources"]
        assert c["limits"] == c["requests"]
        n = int(c["limits"].get("nvidia.com/gpu", 0))
        assert wg["rayStartParams"]["num-gpus"] == str(n)
        res = json.loads(wg["rayStartParams"]["resources"].strip("'")) if "resources" in wg["rayStartParams"] else {}
        out[wg["groupName"]] = (n, wg["minReplicas"], wg["maxReplicas"], res)
    return out


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_replicas_fit_the_gpus_the_manifest_asks_for(tmp_path, key):
    from serve.app import replica_configs

    doc, _, _ = _render(tmp_path, key)
    baked = parse_deploy_args(_gpuplan_app(doc)["args"])
    result = make_plan(baked, cluster_from_decl(baked.cluster))
    groups = _group_gpus(doc)
    total_gpus = sum(n * mx for n, _, mx, _ in groups.values())
    advertised = {k for *_, res in groups.values() for k in res}
    asked = 0.0
    for name, cfg in replica_configs(result, baked).items():
        actor, auto = cfg["options"]["ray_actor_options"], cfg["options"]["autoscaling_config"]
        num_gpus = actor.get("num_gpus", 0.0)
        assert num_gpus <= 1.0
        assert num_gpus * auto["max_replicas"] <= total_gpus, name
        asked += num_gpus * auto["max_replicas"]
        if "accelerator_type" in actor:
            assert f"accelerator_type:{actor['accelerator_type']}" in advertised
    assert asked <= total_gpus + 1e-9
    for g in result.plan.gpus:  # as the plan placed them, Ray's fractional ledger never exceeds one GPU
        assert sum(r.num_gpus for r in g.replicas) <= 1.0 + 1e-9, g.id


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_min_pods_hold_every_models_min_replicas(tmp_path, key):
    """A cluster of only each group's minReplicas pods is feasible for every model's minimum replicas."""
    doc, args, decl = _render(tmp_path, key)
    groups = _group_gpus(doc)
    from planner.kuberay import group_name

    nodes = [nd.model_copy(update={"replicas": groups[group_name(nd.name)][1]}) for nd in decl.nodes
             if groups[group_name(nd.name)][1] > 0]
    baked = parse_deploy_args(_gpuplan_app(doc)["args"])
    if not any(m.replicas.min for m in baked.models):
        return
    mins = baked.model_copy(update={"models": [m.model_copy(update={"replicas": m.replicas.model_copy(
        update={"max": max(m.replicas.min, 1)})}) for m in baked.models]})
    small = make_plan(mins, cluster_from_decl(ClusterDecl(nodes=nodes)))
    for m in small.plan.models:
        assert m.placed_replicas >= m.min_replicas


def test_worker_groups_follow_the_declaration(tmp_path):
    doc, _, decl = _render(tmp_path, "mixed-all-options")
    rc = doc["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == "2.60.0"  # not the custom image's tag
    head = rc["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    wgs = {w["groupName"]: w for w in rc["workerGroupSpecs"]}
    assert list(wgs) == ["a10g", "l4-pool", "custom", "cpu"]
    l4 = wgs["l4-pool"]
    assert l4["maxReplicas"] == 3
    assert l4["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    c = l4["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"] == {"cpu": "7500m", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert l4["rayStartParams"]["resources"] == "'{\"accelerator_type:L4\": 1}'"
    assert wgs["a10g"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "16"  # 4 per GPU
    assert "nvidia.com/gpu" not in wgs["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert wgs["cpu"]["rayStartParams"] == {"num-gpus": "0"}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["GPUPLAN_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "gpuplan-api", "key": "api_key"}
    assert env["HF_HOME"]["value"] == "/models/huggingface"
    assert c["volumeMounts"] == [{"name": "model-cache", "mountPath": "/models"}]
    assert l4["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert doc["metadata"]["namespace"] == "serving" and doc["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rc["authOptions"] == {"mode": "token"}
    assert c["image"] == "registry.example.com/gpuplan:0.1.0"


def test_autoscaler_reads_the_groups_as_the_manifest_means_them(tmp_path):
    """Ray's own KubeRay autoscaler config reader sees the GPUs, CPUs, memory and accelerator type of each group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    doc, _, _ = _render(tmp_path, "mixed-all-options")
    rc = doc["spec"]["rayClusterConfig"]
    by = {w["groupName"]: _get_ray_resources_from_group_spec(w, False) for w in rc["workerGroupSpecs"]}
    assert by["a10g"] == {"CPU": 16, "GPU": 4, "memory": 64 * 1024**3, "accelerator_type:A10G": 1}
    assert by["l4-pool"]["GPU"] == 1 and by["l4-pool"]["accelerator_type:L4"] == 1
    assert "GPU" not in by["cpu"] or by["cpu"]["GPU"] == 0
    assert _get_ray_resources_from_group_spec(rc["headGroupSpec"], True)["CPU"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Bad input: the planner's errors and exit codes


def _write(tmp_path, deploy, cluster):
    d, c = tmp_path / "deploy.yaml", tmp_path / "cluster.yaml"
    d.write_text(deploy if isinstance(deploy, str) else yaml.safe_dump(deploy))
    c.write_text(cluster if isinstance(cluster, str) else yaml.safe_dump(cluster))
    return str(d), str(c)


def test_infeasible_cluster_exits_3_with_the_planners_message(tmp_path, capsys):
    d, c = _write(tmp_path, DEPLOY, {"nodes": [{"name": "t4", "gpus": [{"name": "T4", "count": 1}]}]})
    assert main(["plan", d, "--cluster", c]) == 3
    planned = capsys.readouterr().err
    assert main(["render", "kuberay", d, "--cluster", c]) == 3
    rendered = capsys.readouterr()
    assert rendered.out == ""
    assert rendered.err == planned and "fix" in planned


def test_unknown_gpu_exits_2_listing_the_known_names(tmp_path, capsys):
    d, c = _write(tmp_path, DEPLOY, {"nodes": [{"name": "n", "gpus": [{"name": "Z9000", "count": 2}]}]})
    assert main(["render", "kuberay", d, "--cluster", c]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'Z9000'" in err and "A10G" in err and "H100" in err and "memory: 24GiB" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("deploy,cluster,needle", [
    (DEPLOY, None, "cannot be rendered"),
    ({"models": [{"name": "tiny", "source": "./models/tiny-chat", "quantization": "int8"}]},
     {"nodes": [{"name": "n", "gpus": [{"name": "L4"}]}]}, "local path"),
    (DEPLOY, {"nodes": [{"name": "n", "gpus": [{"name": "L4"}, {"name": "T4"}]}]}, "2 GPU kinds"),
    (DEPLOY, {"nodes": [{"name": "a-b", "gpus": [{"name": "L4"}]}, {"name": "A_B", "gpus": [{"name": "L4"}]}]},
     "same worker group name"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, deploy, cluster, needle):
    d, c = _write(tmp_path, deploy, cluster or {"nodes": [{"name": "x"}]})
    if "local path" in needle:  # a local model directory next to deploy.yaml, which the pods do not have
        (tmp_path / "models" / "tiny-chat").mkdir(parents=True)
        (tmp_path / "models" / "tiny-chat" / "config.json").write_text(
            (ROOT / "models" / "tiny-chat" / "config.json").read_text())
    argv = ["render", "kuberay", d] + (["--cluster", c] if cluster else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("opts,needle", [
    ({"name": "Bad_Name"}, "--name"), ({"name": "x" * 48}, "47"), ({"namespace": "NS"}, "--namespace"),
    ({"upgrade_strategy": "Recreate"}, "--upgrade-strategy"), ({"hf_token_secret": "a b"}, "secret"),
    ({"model_cache_pvc": "Cache"}, "--model-cache-pvc"),
    ({"ray_token_auth": True, "image": "rayproject/ray:2.50.0-py311-gpu"}, "2.52.0"),
])
def test_bad_render_options_are_input_errors(tmp_path, opts, needle):
    d, c = _write(tmp_path, DEPLOY, (ROOT / "k8s" / "cluster.yaml").read_text())
    args, data = load_deploy_file(d)
    decl = load_cluster_file(c)
    result = make_plan(args, cluster_from_decl(decl))
    with pytest.raises(InputError, match=needle.replace("-", "\\-")):
        render_rayservice(data, args, result, decl, **opts)


def test_render_rayservice_returns_a_plain_dict_without_ray(tmp_path):
    import subprocess
    import sys

    d, c = _write(tmp_path, DEPLOY, (ROOT / "k8s" / "cluster.yaml").read_text())
    code = (
        "import sys, json\nfrom planner.kuberay import render_files\n"
        f"render_files({d!r}, cluster_path={c!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_infeasible_plan_error_comes_from_render_files_too(tmp_path):
    d, c = _write(tmp_path, DEPLOY, {"nodes": [{"name": "t4", "gpus": [{"name": "T4"}]}]})
    with pytest.raises(InfeasiblePlanError):
        render_files(d, cluster_path=c)
