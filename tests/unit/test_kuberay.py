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
from planner.output.kuberay import render_files, render_rayservice, upgrade_spare_gpus
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
        {"name": "L4_pool", "replicas": 3, "cpu_memory": "32GiB", "num_cpus": 7.5, "gpus": [{"name": "L4"}],
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
    wgs = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # one group per planned node (the declaration's 2 replicas), each labelled as the node its deployments select
    assert [(w["groupName"], w["labels"]) for w in wgs] == [("a10g-0", {"gpuplan.io/node": "a10g-0"}),
                                                             ("a10g-1", {"gpuplan.io/node": "a10g-1"})]
    assert all((w["minReplicas"], w["maxReplicas"], w["rayStartParams"]["num-gpus"]) == (1, 1, "4") for w in wgs)
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
    """groupName -> (GPUs per pod, min pods, max pods, advertised Ray resources, Ray labels)"""
    out = {}
    for wg in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        c = wg["template"]["spec"]["containers"][0]["resources"]
        assert c["limits"] == c["requests"]
        n = int(c["limits"].get("nvidia.com/gpu", 0))
        assert wg["rayStartParams"]["num-gpus"] == str(n)
        res = json.loads(wg["rayStartParams"]["resources"].strip("'")) if "resources" in wg["rayStartParams"] else {}
        out[wg["groupName"]] = (n, wg["minReplicas"], wg["maxReplicas"], res, wg.get("labels", {}))
    return out


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_deployments_fit_the_gpus_their_worker_group_asks_for(tmp_path, key):
    """Every deployment of the manifest selects one worker group's node label, and per group the deployments'
    num_gpus x max replicas fit its pod's GPUs (per GPU too, as the plan lays them out)."""
    from ray.serve.schema import ServeDeploySchema

    doc, _, _ = _render(tmp_path, key)
    groups = _group_gpus(doc)
    by_label = {labels["gpuplan.io/node"]: name for name, (*_, labels) in groups.items()}
    app = _gpuplan_app(doc)
    deps = [d for d in app["deployments"] if "@" in d["name"]]
    assert deps
    asked: dict = {}
    for d in deps:
        actor, auto = d["ray_actor_options"], d["autoscaling_config"]
        node = actor["label_selector"]["gpuplan.io/node"]
        assert node in by_label, (d["name"], node)
        assert d["name"].split("@")[1].split(".")[0] == node
        assert auto["min_replicas"] == 0 and auto["policy"]["policy_function"] == "serve.app.autoscale:PlanPolicy"
        num_gpus = actor.get("num_gpus", 0.0)
        assert num_gpus <= 1.0
        asked[by_label[node]] = asked.get(by_label[node], 0.0) + num_gpus * auto["max_replicas"]
    for group, used in asked.items():
        assert used <= groups[group][0] + 1e-9, (group, used)
    # what build_app makes of the baked args inside the cluster: the same deployments, and per GPU within one GPU
    baked = parse_deploy_args(app["args"])
    inside = make_plan(baked, cluster_from_decl(baked.cluster))
    assert {d.name: (d.num_gpus, d.planned) for d in inside.rollout.deployments if d.kind != "cpu"} == {
        d["name"]: (d["ray_actor_options"]["num_gpus"], d["autoscaling_config"]["max_replicas"]) for d in deps
        if "num_gpus" in d["ray_actor_options"]}
    for g in inside.plan.gpus:
        assert sum(r.num_gpus for r in g.replicas) <= 1.0 + 1e-9, g.id
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))


@pytest.mark.parametrize("key", sorted(SCENARIOS))
def test_min_pods_are_the_nodes_of_every_models_minimum(tmp_path, key):
    """The groups that keep a pod (minReplicas 1) are the nodes where the first min_replicas slots of each model's
    fill order are, and they hold every model's minimum."""
    doc, _, _ = _render(tmp_path, key)
    groups = _group_gpus(doc)
    kept = {labels["gpuplan.io/node"] for (_, mn, mx, _, labels) in groups.values() if mn == 1}
    assert all(mx == 1 for (_, _, mx, _, _) in groups.values())
    baked = parse_deploy_args(_gpuplan_app(doc)["args"])
    ro = make_plan(baked, cluster_from_decl(baked.cluster)).rollout
    for r in ro.models:
        mins = ro.slots(r.name)[:r.min_replicas]
        assert {ro.deployment(n).node for n in mins} <= kept
        assert len(mins) == r.min_replicas
    assert kept == {d.node for d in ro.deployments if d.min_slots}


def test_worker_groups_follow_the_declaration(tmp_path):
    doc, _, decl = _render(tmp_path, "mixed-all-options")
    rc = doc["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == "2.60.0"  # not the custom image's tag
    head = rc["headGroupSpec"]
    assert head["rayStartParams"] == {"num-cpus": "0", "num-gpus": "0"}
    wgs = {w["groupName"]: w for w in rc["workerGroupSpecs"]}
    assert list(wgs) == ["a10g-0", "a10g-1", "l4-pool-0", "l4-pool-1", "l4-pool-2", "custom", "cpu"]
    assert all(w["labels"] == {"gpuplan.io/node": w["groupName"].replace("l4-pool", "L4_pool")} for w in wgs.values())
    assert rc["autoscalerOptions"]["version"] == "v2"
    l4 = wgs["l4-pool-1"]
    assert l4["maxReplicas"] == 1
    assert l4["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    c = l4["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"] == {"cpu": "7500m", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert l4["rayStartParams"]["resources"] == "'{\"accelerator_type:L4\": 1}'"
    assert wgs["a10g-0"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "16"  # 4 per GPU
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
    """Ray's own KubeRay autoscaler config reader sees the GPUs, CPUs, memory, accelerator type and node label of each
    group."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (_get_labels_from_group_spec,
                                                                    _get_ray_resources_from_group_spec)

    doc, _, _ = _render(tmp_path, "mixed-all-options")
    rc = doc["spec"]["rayClusterConfig"]
    by = {w["groupName"]: _get_ray_resources_from_group_spec(w, False) for w in rc["workerGroupSpecs"]}
    assert by["a10g-1"] == {"CPU": 16, "GPU": 4, "memory": 64 * 1024**3, "accelerator_type:A10G": 1}
    assert by["l4-pool-0"]["GPU"] == 1 and by["l4-pool-0"]["accelerator_type:L4"] == 1
    labels = {w["groupName"]: _get_labels_from_group_spec(w, w["groupName"]) for w in rc["workerGroupSpecs"]}
    assert labels["a10g-1"] == {"gpuplan.io/node": "a10g-1"} and labels["cpu"] == {"gpuplan.io/node": "cpu"}
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
        "import sys, json\nfrom planner.output.kuberay import render_files\n"
        f"render_files({d!r}, cluster_path={c!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_infeasible_plan_error_comes_from_render_files_too(tmp_path):
    d, c = _write(tmp_path, DEPLOY, {"nodes": [{"name": "t4", "gpus": [{"name": "T4"}]}]})
    with pytest.raises(InfeasiblePlanError):
        render_files(d, cluster_path=c)


def test_gpuplans_own_front_is_not_rendered_into_pods(tmp_path):
    """args.http.port (gpuplan's front beside Ray Serve's proxy, deploy.yaml's shape) stays out of the RayService: its
    serve Service targets the proxies' port 8000 on every pod, where a front of our own would only collide."""
    deploy = {**PINNED_DEPLOY, "http": {"port": 8000, "host": "0.0.0.0", "api_key_env": "TEAM_KEY"}}
    d, c = _write(tmp_path, yaml.safe_dump(deploy), yaml.safe_dump(MIXED_CLUSTER))
    app = _gpuplan_app(yaml.safe_load(render_files(d, cluster_path=c)))
    assert app["args"]["http"] == {"api_key_env": "TEAM_KEY"}
