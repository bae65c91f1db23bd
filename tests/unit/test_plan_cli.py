"""`gpuplan plan`: deploy.yaml + cluster -> picture / JSON; bad input exits 2 with one line naming the field;
an infeasible plan exits 3 with the fix."""

import json
import re
import subprocess
import sys

import pytest
import yaml

from planner.cli import main

MODEL = {"name": "llama", "source": "meta-llama/Llama-3.1-8B-Instruct", "quantization": ["int4", "int8"],
         "max_model_len": 4096, "max_num_seqs": 4, "replicas": {"min": 1, "max": 4}}
CLUSTER = {"nodes": [{"name": "n1", "cpu_memory": "64GiB", "gpus": [{"name": "A10G", "count": 2}]}]}


def write(tmp_path, args: dict, name="deploy.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump({"applications": [{"name": "llm", "import_path": "serve.app:build_app",
                                                   "args": args}]}))
    return str(p)


def run(*argv):
    p = subprocess.run([sys.executable, "-m", "planner", *argv], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_plan_json_shape_and_ledger(tmp_path, capsys):
    path = write(tmp_path, {"cluster": CLUSTER, "models": [MODEL, dict(MODEL, name="qwen",
                            source="Qwen/Qwen2.5-7B-Instruct", quantization="int8", replicas={"min": 1, "max": 3})]})
    assert main(["plan", path, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["feasible"] is True
    for m in d["models"]:
        assert set(m) >= {"name", "quantization", "replica_bytes", "min_replicas", "max_replicas", "placed_replicas"}
        assert m["min_replicas"] <= m["placed_replicas"] <= m["max_replicas"]
    for g in d["gpus"]:
        assert set(g) >= {"id", "total_bytes", "usable_bytes", "used_bytes", "replicas"}
        assert sum(r["bytes"] for r in g["replicas"]) == g["used_bytes"] <= g["usable_bytes"]
        assert sum(r["num_gpus"] for r in g["replicas"]) <= 1.0
        # the Ray ledger is the memory ledger: num_gpus is a share of usable bytes, rounded up
        for r in g["replicas"]:
            assert r["num_gpus"] * g["usable_bytes"] >= r["bytes"]
    assert d["cpu_replicas"] == []


def test_plan_picture_and_svg(tmp_path):
    path = write(tmp_path, {"cluster": CLUSTER, "models": [MODEL]})
    svg = tmp_path / "plan.svg"
    rc, out, err = run("plan", path, "--svg", str(svg))
    assert rc == 0, err
    assert "llama" in out and "int4" in out and "GiB" in out
    assert svg.read_text().startswith("<svg") or "<svg" in svg.read_text()[:200]


def test_cluster_file_flag(tmp_path):
    path = write(tmp_path, {"models": [MODEL]})
    cl = tmp_path / "cluster.yaml"
    cl.write_text(yaml.safe_dump(CLUSTER))
    rc, out, err = run("plan", path, "--cluster", str(cl), "--json")
    assert rc == 0, err
    assert len(json.loads(out)["gpus"]) == 2


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda a: a.update(colour="red"), "colour: unknown key"),
        (lambda a: a["models"][0].update(replica_memory="-5GiB"), "replica_memory"),
        (lambda a: a["models"][0].update(replicas={"min": 3, "max": 2}), "min (3) is greater than max (2)"),
        (lambda a: a["models"][0].update(quantization="int3"), "unknown quantization 'int3'"),
        (lambda a: a["models"].append(dict(MODEL)), "'llama' appears 2 times"),
        (lambda a: a["models"][0].update(source="./no/such/dir"), "neither a local directory"),
        (lambda a: a["models"][0].update(max_model_len=0), "max_model_len"),
        (lambda a: a["cluster"]["nodes"][0]["gpus"][0].update(name="Z9000"), "Z9000"),
        (lambda a: a["models"][0].update(max_model_len=10**6), "exceeds the model's max_position_embeddings"),
    ],
)
def test_bad_input_exits_2(tmp_path, mutate, needle):
    args = {"cluster": json.loads(json.dumps(CLUSTER)), "models": [dict(MODEL)]}
    mutate(args)
    rc, out, err = run("plan", write(tmp_path, args))
    assert rc == 2, (out, err)
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_infeasible_exits_3_with_fix(tmp_path):
    big = dict(MODEL, name="big", source="meta-llama/Llama-3.1-70B-Instruct", quantization="bf16",
               replicas={"min": 1, "max": 1})
    rc, out, err = run("plan", write(tmp_path, {"cluster": CLUSTER, "models": [big]}))
    assert rc == 3
    assert "GiB" in err and "fix:" in err
    assert "model big fits on no GPU" in err
    # Llama-3.1-70B's bf16 weights alone are 70.55e9 params x 2 bytes = 131.4 GiB; the replica needs more than that
    need = re.search(r"needs (\d+\.\d) GiB per replica", err)
    assert need and 131.4 < float(need.group(1)) < 150, err
    assert "offload.cpu_memory" in err  # the deploy.yaml field, not an internal name
    assert "Traceback" not in err


def test_infeasible_plan_names_a_node_that_mixes_gpu_sizes(tmp_path):
    """One node holds a T4 and two A100-80GB: Ray picks the GPU inside a node, so the node is planned against the
    T4; the message says so instead of asking for GPUs the user already has on that node."""
    cluster = {"nodes": [
        {"name": "n0", "cpu_memory": "64GiB", "gpus": [{"name": "A100-80GB", "count": 1}]},
        {"name": "n2", "cpu_memory": "64GiB", "gpus": [{"name": "T4", "count": 1}, {"name": "A100-80GB", "count": 2}]},
    ]}
    m2 = dict(MODEL, name="m2", source="Qwen/Qwen2.5-32B-Instruct", quantization="bf16",
              replicas={"min": 2, "max": 2})
    rc, out, err = run("plan", write(tmp_path, {"cluster": cluster, "models": [m2]}))
    assert rc == 3 and "Traceback" not in err
    assert "node n2 mixes T4 (13.0 GiB usable) and A100-80GB (71.5 GiB usable)" in err
    assert "planned against 13.0 GiB" in err and "m2 needs" in err
    assert "run each GPU type as its own Ray node" in err
    rc, out, err = run("plan", write(tmp_path, {"cluster": cluster, "models": [m2]}), "--json")
    assert rc == 3
    small = dict(MODEL, name="m1", quantization="int4", replicas={"min": 1, "max": 2})
    rc, out, err = run("plan", write(tmp_path, {"cluster": cluster, "models": [small]}))
    assert rc == 0 and "node n2 mixes GPU sizes (T4 13.0 GiB, A100-80GB 71.5 GiB usable)" in " ".join(out.split())
    rc, out, err = run("plan", write(tmp_path, {"cluster": cluster, "models": [small]}), "--json")
    basis = {g["id"]: g["ray_basis_bytes"] for g in json.loads(out)["gpus"]}
    assert basis["n2/gpu-1"] == basis["n2/gpu-0"] < basis["n0/gpu-0"]  # the JSON shows each GPU's basis


def test_fit_gpus(tmp_path):
    path = write(tmp_path, {"models": [MODEL]})
    rc, out, err = run("plan", path, "--fit-gpus", "L4,A10G,A100-80GB", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["gpus"] >= 1 and sum(d["counts"].values()) == d["gpus"]
    assert d["replicas"]["llama"] >= 1
    rc, out, err = run("plan", path, "--fit-gpus", "L4,A10G")
    assert rc == 0 and "smallest cluster by count" in out, err
    rc, out, err = run("plan", path, "--fit-gpus", "Z9000")
    assert rc == 2 and "Z9000" in err


def test_plan_says_which_engine_runs_each_model(tmp_path, capsys):
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    gguf = os.path.join(root, "models", "tiny-chat", "tiny-chat-Q8_0.gguf")
    path = write(tmp_path, {"cluster": CLUSTER, "models": [
        {"name": "g", "source": gguf, "quantization": "gguf", "max_model_len": 256, "max_num_seqs": 4}]})
    assert main(["plan", path, "--engines", "transformers,llamacpp"]) == 0
    out = capsys.readouterr().out
    # on a GPU node llama.cpp gets every layer: 4 blocks + the output layer; 4 KV streams of 256 cells
    assert "g: llamacpp: n_ctx 1024 (4 x 256), n_ubatch 256, n_gpu_layers 5" in out
    assert main(["plan", path, "--json", "--engines", "transformers,llamacpp"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["engines"]["g"]["engine"] == "llamacpp" and d["engines"]["g"]["llamacpp"]["n_ctx"] == 1024
    # without llama.cpp the file is dequantized by transformers, and the plan says so with the factor
    assert main(["plan", path, "--engines", "transformers"]) == 0
    out = capsys.readouterr().out
    assert "g: transformers" in out and re.search(r"dequantizes a GGUF file on load: .* planned at \w+, [\d.]+x", out)
    code, _, err = run("plan", path, "--engines", "tensorrt")
    assert code == 2 and "unknown tensorrt" in err and "Traceback" not in err


@pytest.mark.parametrize("source, quant, says", [
    # a pre-quantized checkpoint (mxfp4 experts), every listed quantization contradicting it
    ("openai/gpt-oss-20b", ["int4", "int8"],
     "models[llama].quantization [int4, int8]: openai/gpt-oss-20b is a pre-quantized mxfp4 checkpoint "
     "(quantization_config.quant_method='mxfp4'), which int4 and int8 contradict. Fix: set models[llama].quantization "
     "to mxfp4 (the checkpoint as it is) or bf16/fp16 (dequantized on load), or point the source at the unquantized "
     "model"),
    # one of two contradicting: drop it
    ("Qwen/Qwen3-32B-FP8", ["fp8", "int4"],
     "models[llama].quantization [fp8, int4]: Qwen/Qwen3-32B-FP8 is a pre-quantized fp8 checkpoint "
     "(quantization_config.quant_method='fp8'), which int4 contradicts. Fix: drop int4 from "
     "models[llama].quantization (fp8 stays)"),
    # gguf asked of a safetensors checkpoint
    ("meta-llama/Llama-3.1-8B-Instruct", ["gguf"],
     "models[llama].quantization [gguf]: gguf needs a .gguf file as the model source, got "
     "'meta-llama/Llama-3.1-8B-Instruct', which gguf contradicts. Fix: set models[llama].quantization to bf16 (or "
     "int8, int4), or point the source at a .gguf file"),
])
def test_a_quantization_the_source_rules_out_names_the_deploy_field(tmp_path, source, quant, says):
    """The estimate's own wording says --quant; in a deploy file the error names models[...].quantization, every
    listed quantization that cannot apply, and what to list instead."""
    path = write(tmp_path, {"cluster": CLUSTER, "models": [dict(MODEL, source=source, quantization=quant)]})
    rc, out, err = run("plan", path)
    assert rc == 2 and "Traceback" not in err
    assert " ".join(err.split()) == f"gpuplan: error: {says}", err


def test_a_gguf_file_asked_at_another_quantization_names_the_deploy_field(tmp_path):
    import os

    gguf = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-chat", "tiny-chat-Q8_0.gguf")
    path = write(tmp_path, {"cluster": CLUSTER, "models": [dict(MODEL, source=os.path.abspath(gguf),
                                                                  quantization="int4", max_model_len=256)]})
    rc, out, err = run("plan", path)
    assert rc == 2, err
    assert "models[llama].quantization [int4]: " in err and "is a GGUF file with per-tensor types fixed in the file, " \
        "which int4 contradicts. Fix: set models[llama].quantization to gguf (the file's own types), or point the " \
        "source at the original checkpoint" in " ".join(err.split()), err


def test_the_cluster_line_groups_nodes_of_one_shape(tmp_path):
    """`gpuplan plan` starts with one line about the cluster: at 500 GPUs it once listed every GPU."""
    from planner.planning import cluster_from_decl, describe_cluster
    from planner.config import ClusterDecl

    decl = ClusterDecl.model_validate({"nodes": [
        {"name": "a10g", "replicas": 16, "cpu_memory": "512GiB", "gpus": [{"name": "A10G", "count": 8}]},
        {"name": "h100", "replicas": 2, "cpu_memory": "512GiB", "gpus": [{"name": "H100", "count": 8}]},
        {"name": "mixed", "cpu_memory": "64GiB", "gpus": [{"name": "T4", "count": 1}, {"name": "A100-80GB", "count": 2}]},
        {"name": "cpu", "replicas": 3, "cpu_memory": "64GiB"}]})
    line = describe_cluster(cluster_from_decl(decl))
    assert line.startswith("147 GPUs on 22 nodes; 16 nodes a10g-0..a10g-15: 8 x A10G "), line
    assert "; 2 nodes h100-0, h100-1: 8 x H100 " in line and "; mixed: 1 x T4 " in line, line
    assert " + 2 x A100-80GB " in line and line.endswith("; 3 nodes cpu-0..cpu-2: no GPU"), line
    assert "gpu-0" not in line and len(line) < 400


def test_plan_scales_cli_case_plans_every_minimum(tmp_path, capsys):
    """benchmarks/plan_scale.py's `gpuplan plan` case (504 GPUs x 40 real catalog models, tight minimums) is a
    valid deploy file and cluster that plan with every minimum met and the rollout planning every placed replica."""
    from benchmarks import plan_scale

    d, c = plan_scale.cli_files(tmp_path)
    assert main(["plan", str(d), "--cluster", str(c), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["gpus"]) == 504 and len(out["models"]) == 40
    assert all(m["min_replicas"] <= m["placed_replicas"] for m in out["models"])
    planned = sum(dep["planned"] for dep in out["rollout"]["deployments"])
    assert planned == sum(m["placed_replicas"] for m in out["models"])
