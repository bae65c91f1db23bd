"""The CLI: stable JSON, readable tables, exit 2 with one line (no traceback) on bad input."""

import json
import subprocess
import sys

import pytest

from planner.cli import main


def run(*args):
    p = subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def test_estimate_json_shape(capsys):
    assert main(["estimate", "Qwen/Qwen2.5-7B-Instruct", "--quant", "int4", "--max-model-len", "2048",
                 "--max-num-seqs", "4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "Qwen/Qwen2.5-7B-Instruct" and d["quantization"] == "int4"
    assert set(d["params"]) == {"total", "quantized", "unquantized"}
    assert set(d["bytes"]) == {"weights", "kv_cache", "activations", "runtime_overhead", "total"}
    b = d["bytes"]
    assert b["total"] == b["weights"] + b["kv_cache"] + b["activations"] + b["runtime_overhead"]
    assert d["params"]["total"] == d["params"]["quantized"] + d["params"]["unquantized"] == 7_615_616_512


def test_estimate_table_and_compare(capsys):
    assert main(["estimate", "meta-llama/Llama-3.2-1B-Instruct"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "kv_cache" in out and "total" in out
    assert main(["estimate", "meta-llama/Llama-3.2-1B-Instruct", "--quant", "bf16,int8,int4"]) == 0
    out = capsys.readouterr().out
    assert "int8 (bitsandbytes LLM.int8)" in out and "int4 (nf4 + double quant)" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["estimate", "no/such-model"], "neither a local directory"),
        (["estimate", "meta-llama/Llama-3.1-8B", "--quant", "int3"], "unknown quantization 'int3'"),
        (["estimate", "Qwen/Qwen3-32B-FP8", "--quant", "int8"], "contradicts"),
        (["estimate", "meta-llama/Llama-3.1-8B", "--max-model-len", "0"], "must be positive"),
        (["estimate", "meta-llama/Llama-3.1-8B", "--dtype", "int8"], "not a float dtype"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, needle):
    rc, out, err = run(*args)
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err


def test_catalog_lists_all(capsys):
    assert main(["catalog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 21
    assert {r["name"] for r in rows} >= {"meta-llama/Llama-3.1-8B", "openai/gpt-oss-20b"}


def test_probe_without_gpu_says_why(capsys):
    assert main(["probe", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["gpus"] or d["reason"].startswith("no GPU, because")
