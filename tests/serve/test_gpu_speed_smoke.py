"""benchmarks/gpu_speed.py runs (CPU, tiny random llama) so it is ready when a GPU is lent: every request of a batch
makes its tokens, TTFT / TPOT / tokens/s are measured, and the speed model's prediction stands beside them."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_speed_runs_on_cpu(tmp_path):
    rows = tmp_path / "rows.jsonl"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_speed", "--tiny", "--device", "cpu", "--schemes", "bf16",
                        "--batches", "1", "3", "--input-tokens", "32", "--output-tokens", "8", "--jsonl", str(rows),
                        "--out", str(tmp_path / "s.md")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(rows.read_text().splitlines()[0])
    assert set(row["measured"]) == {"1", "3"} and set(row["predicted"]) == {"1", "3"}, row
    for b, m in row["measured"].items():
        assert m["tokens"] == 8 * int(b)  # ignore_eos: every request made its tokens
        assert m["tpot_ms"] > 0 and m["ttft_ms"] > 0 and m["tokens_per_s"] > 0  # tokens arrived one by one
        assert row["predicted"][b]["tpot_ms"] > 0 and row["predicted"][b]["device"] == "cpu"
    assert "| llama | bf16 | 3 |" in (tmp_path / "s.md").read_text()
