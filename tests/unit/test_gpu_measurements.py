"""The estimator against a real GPU run (tests/unit/data/gpu-h200-*.json: benchmarks/gpu_validate.py on an H200,
serve.engines.transformers at 4 sequences x 4096 tokens, random weights with the catalog's real configs). Weights must be exact;
the whole replica (NVML's used memory of the process) within -2% / +10%: never under by more than 2%, as an
under-estimate is an OOM on a shared GPU."""

import json
import os

import pytest

from planner.model.engines import estimate_replica
from planner.model.spec import load_spec

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpu-h200-2026-12-04.json")
ROWS = json.load(open(DATA))["rows"]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['model']}-{r['scheme']}" for r in ROWS])
def test_replica_estimate_matches_the_h200_run(row):
    assert row["completion_tokens"] == 16 * row["max_num_seqs"]  # the run did what the engine does at its limits
    est = estimate_replica(load_spec(row["model"]), quant=row["scheme"], dtype="bf16",
                           max_model_len=row["max_model_len"], max_num_seqs=row["max_num_seqs"], device="cuda")
    assert est.weights == row["measured_weights"]
    used = row["nvml_process_used"]
    err = (est.total - used) / used
    assert -0.02 <= err <= 0.10, f"total {est.total:,} vs NVML {used:,}: {100 * err:+.1f}%"
    # torch's own peak fits weights + KV + activations + workspaces + the fragmentation allowance
    assert row["max_allocated"] <= est.total - est.detail["runtime_overhead"]["cuda_context"]
