"""benchmarks/gpu_validate.py runs (CPU, tiny random model, the engine workload) so it does not rot between GPU
sessions: one case, a row with exact weights and every request's tokens made."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_validate_runs_on_cpu(tmp_path):
    rows = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_validate", "--tiny", "--device",
                        "cpu", "--schemes", "bf16", "--jsonl", str(rows), "--out", str(tmp_path / "v.md")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(rows.read_text().splitlines()[0])
    assert row["workload"] == "engine" and row["est"]["weights"] == row["measured_weights"]
    assert row["completion_tokens"] == 16 * row["max_num_seqs"] and row["prefill_passes"] >= 1
    assert "| llama | bf16 | +0 |" in (tmp_path / "v.md").read_text()
