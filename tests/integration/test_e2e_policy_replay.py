"""benchmarks/policy_replay.py runs (one model, two policies, 5 s of warm-up and 20 s), so it does not rot: the
simulated replicas answer every request on a Ray cluster of fake L4s, replica-seconds are counted, and simulate's
TPOT agrees with the served one (the engine keeps the speed model's time). Its real numbers are in
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ray_helpers import need_no_ray

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_policy_replay_runs_and_loses_nothing(tmp_path):
    need_no_ray("the benchmark")
    out = tmp_path / "replay.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    p = subprocess.run([sys.executable, "-m", "benchmarks.policy_replay", "--duration", "20", "--warmup", "5",
                        "--models", "1", "--policies", "gpuplan", "fixed", "--max-replicas", "2", "--timeline",
                        "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["table"]
    assert [(r["policy"], r["model"]) for r in rows] == [("gpuplan", "qwen-7b"), ("fixed", "qwen-7b")]
    for r in rows:
        assert r["requests"] >= 3 and r["errors"] == 0 and r["replica_seconds"] > 0, r
        assert r["tpot_p95_ms"] == pytest.approx(r["sim_tpot_p95_ms"], rel=0.25), r
    assert rows[1]["replica_seconds"] > rows[0]["replica_seconds"]  # the fixed fleet runs both from the start
    # the 5-s warm-up was served and left out
    kept = json.loads(out.read_text())["requests"]
    assert all(r["at"] >= 5.0 for pol in kept.values() for rs in pol.values() for r in rs)
    assert all(r["replica_seconds"] < 2 * 20 + 5 for r in rows), rows  # 2 replicas at most, counted after it
    assert "| gpuplan | qwen-7b |" in p.stdout
    # --timeline: every request's path was stamped, in order, and the engine's part of each TTFT is within it (so its
    # median is within the TTFT's; 1 ms for the two clocks read apart)
    where = json.loads(out.read_text())["timeline"]
    for r in rows:
        w = where[r["policy"]][r["model"]]
        assert w["requests"] == r["ok"], (w, r)
        assert w["in_p50_ms"] > 0 and w["out_p50_ms"] > 0, w
        assert 0 < w["engine_p50_ms"] <= r["ttft_p50_ms"] + 1.0, (w, r)
