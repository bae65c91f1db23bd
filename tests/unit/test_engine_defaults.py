"""The defaults a new user meets (issue: a GGUF source with no `quantization`, `estimate` and `plan` sizing the same
file differently, `plan` refusing `engine: vllm` in a checkout where `make vllm` ran): a source's own quantization
is the default, `gpuplan estimate` sizes for the engine `gpuplan plan` picks, and `gpuplan plan` plans an engine
named in the file wherever it runs, saying when it is not found there."""

import json
import os

import pytest
import yaml

from planner.cli import main
from planner.config import parse_deploy_args
from planner.errors import InputError, QuantConflictError
from planner.planning import cluster_from_decl, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = os.path.join(ROOT, "models", "tiny-chat", "tiny-chat-Q8_0.gguf")
CPU_NODE = {"nodes": [{"name": "n", "cpu_memory": "8GiB"}]}
WITH_LLAMACPP = frozenset({"transformers", "llamacpp"})


def _args(**entry):
    return parse_deploy_args({"cluster": CPU_NODE, "models": [{"name": "m", "max_model_len": 256, "max_num_seqs": 8,
                                                               **entry}]})


def test_a_gguf_source_without_quantization_plans_as_the_files_own_types():
    args = _args(source=GGUF)
    assert args.models[0].quantization is None  # nothing chosen at the edge: the source decides
    r = make_plan(args, cluster_from_decl(args.cluster), WITH_LLAMACPP)
    (m,) = r.plan.models
    assert m.quantization == "gguf" and m.placed_replicas == 1
    est = r.estimate_for("m")
    assert est.engine == "llamacpp" and est.weights == sum(t.stored_bytes for t in r.specs["m"].tensors)
    assert r.args.models[0].quantization == ["gguf"]  # what the plan ran with


def test_a_listed_quantization_a_gguf_file_rules_out_still_says_what_to_list():
    args = _args(source=GGUF, quantization="bf16")
    with pytest.raises(QuantConflictError, match=r"models\[m\]\.quantization \[bf16\].*GGUF file.*Fix: set .* to gguf"):
        make_plan(args, cluster_from_decl(args.cluster), WITH_LLAMACPP)


def test_a_pre_quantized_checkpoint_without_quantization_plans_as_its_own_scheme():
    h100 = cluster_from_decl(parse_deploy_args({"cluster": {"nodes": [{"name": "n", "gpus": [{"name": "H100"}]}]},
                                                "models": [{"name": "x", "source": GGUF}]}).cluster)
    r = make_plan(_args(source="Qwen/Qwen3-32B-FP8"), h100, frozenset({"transformers"}))
    assert r.plan.models[0].quantization == "fp8"
    assert _args(source="meta-llama/Llama-3.2-1B-Instruct").models[0].quantization is None
    r = make_plan(_args(source="meta-llama/Llama-3.2-1B-Instruct"), h100, frozenset({"transformers"}))
    assert r.plan.models[0].quantization == "bf16"  # the config's dtype


def test_estimate_sizes_a_gguf_for_the_engine_plan_picks(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("planner.cluster.installed.installed_engines", lambda: WITH_LLAMACPP)
    assert main(["estimate", GGUF, "--device", "cpu", "--max-model-len", "256", "--max-num-seqs", "8",
                 "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"cluster": CPU_NODE, "models": [
        {"name": "m", "source": GGUF, "max_model_len": 256, "max_num_seqs": 8}]}))
    assert main(["plan", str(deploy), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert est["engine"] == "llamacpp" == plan["engines"]["m"]["engine"]
    assert est["bytes"]["total"] == plan["models"][0]["replica_bytes"]
    # and --engine asks for another: transformers dequantizes the file (more bytes than it holds)
    assert main(["estimate", GGUF, "--device", "cpu", "--engine", "transformers", "--json"]) == 0
    deq = json.loads(capsys.readouterr().out)
    assert deq["engine"] == "transformers" and deq["bytes"]["weights"] > est["bytes"]["weights"]


def test_plan_plans_an_engine_the_file_names_where_it_is_not_installed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("planner.cluster.installed.installed_engines", lambda: frozenset({"transformers"}))
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({
        "cluster": {"nodes": [{"name": "n", "gpus": [{"name": "L4", "count": 1}]}]},
        "models": [{"name": "m", "source": "meta-llama/Llama-3.2-1B-Instruct", "engine": "vllm",
                    "max_model_len": 1024}]}))
    assert main(["plan", str(deploy), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engines"]["m"]["engine"] == "vllm" and "not found here" in out["engines"]["m"]["why"]
    assert main(["plan", str(deploy)]) == 0
    assert "m: vllm" in capsys.readouterr().out
    # serving is strict: the replicas cannot start an engine that is not there
    args = parse_deploy_args(yaml.safe_load(deploy.read_text()))
    with pytest.raises(InputError, match="make vllm"):
        make_plan(args, cluster_from_decl(args.cluster), frozenset({"transformers"}))


def test_auto_says_what_it_assumed(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("planner.cluster.installed.installed_engines", lambda: frozenset({"transformers"}))
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"cluster": CPU_NODE, "models": [
        {"name": "m", "source": "meta-llama/Llama-3.2-1B-Instruct", "quantization": "bf16", "max_model_len": 256}]}))
    assert main(["plan", str(deploy)]) == 0
    assert "m: transformers (auto: vLLM is not installed (`make vllm`))" in capsys.readouterr().out


def test_fit_gpus_takes_the_sources_own_quantization_too(capsys, tmp_path):
    """`gpuplan plan --fit-gpus` sizes a cluster from the same resolved entries as `plan`: an entry without
    `quantization` is its checkpoint's own scheme there as well."""
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(yaml.safe_dump({"models": [{"name": "m", "source": "Qwen/Qwen3-32B-FP8", "max_model_len": 1024,
                                                  "max_num_seqs": 1}]}))
    assert main(["plan", str(deploy), "--fit-gpus", "H100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["models"][0]["quantization"] == "fp8"
