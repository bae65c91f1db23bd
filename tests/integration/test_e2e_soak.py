"""The soak benchmark in short (benchmarks/soak.py --minutes 1): a minute of mixed traffic (both endpoints, streamed
and not, clients that hang up, bad requests, two models) with one replica SIGKILLed; nothing is lost and no 5xx
other than 503 is answered. The 10-minute run's table is in docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from ray_helpers import need_no_ray

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_minute_soak_with_a_kill_loses_nothing(tmp_path):
    need_no_ray("the soak")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "benchmarks", "soak.yaml")))
    from serve.api.front import pick_port

    # Ray Serve's proxy and our front bind after Ray started: ports outside the ephemeral range
    cfg["http_options"]["port"] = pick_port()
    cfg["applications"][0]["args"]["http"]["port"] = pick_port()
    for m in cfg["applications"][0]["args"]["models"]:
        m["source"] = os.path.normpath(os.path.join(ROOT, "benchmarks", m["source"]))  # relative to soak.yaml
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "soak.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", GPUPLAN_STATE_DIR=str(tmp_path / "state"))
    env.pop("GPUPLAN_API_KEY", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--start", "--config",
                        str(path), "--minutes", "1", "--rate", "3", "--kill-every", "35", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    kinds = r["kinds"]
    assert r["sent"] >= 150 and kinds.get("ok", 0) >= 100, (r["sent"], kinds)
    assert len(r["kills"]) == 1, r["kills"]
    assert kinds.get("lost", 0) == 0, r["examples"]
    assert kinds.get("other_5xx", 0) == 0, r["examples"]
    assert r["kills"][0]["recovered_s"] is not None, r["kills"]  # the killed replica came back
