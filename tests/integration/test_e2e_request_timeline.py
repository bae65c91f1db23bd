"""benchmarks/request_timeline.py runs (few requests) so it does not rot: every segment of the path is measured
through both doors (gpuplan's front and Ray Serve's proxy), and the steps to the first byte fit in the total."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ray_helpers import need_no_ray

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_request_timeline_measures_every_segment(tmp_path):
    need_no_ray("the benchmark")
    out = tmp_path / "timeline.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", GPUPLAN_STATE_DIR=str(tmp_path / "state"))
    p = subprocess.run([sys.executable, "-m", "benchmarks.request_timeline", "--requests", "4",
                        "--max-tokens", "8", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cols = json.loads(out.read_text())
    assert set(cols) == {"front/1", "proxy/1", "front/8", "proxy/8"}
    for name, seg in cols.items():
        parts = [v for k, v in seg.items() if k != "total" and not k.startswith("last chunk")]
        assert all(v > 0 for v in parts), (name, seg)  # every step was traced, in order
        # the steps to the first byte come before the end (medians of 4 need not add up exactly: some slack)
        assert sum(parts) <= 1.2 * seg["total"] + 2.0, (name, seg)
    assert "| client -> API |" in p.stdout
