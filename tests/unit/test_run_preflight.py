"""`make run` (python -m serve.run) plans before it starts Ray: a bad or infeasible deploy.yaml fails in about a
second with one line and exit 2/3, and no Ray process is started."""

import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_with(tmp_path, mutate):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    for m in cfg["applications"][0]["args"]["models"]:
        m["source"] = os.path.normpath(os.path.join(ROOT, m["source"]))  # relative to deploy.yaml
    mutate(cfg["applications"][0]["args"])
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "serve.run", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_infeasible_exits_3_before_ray(tmp_path):
    p = run_with(tmp_path, lambda a: a["models"][0].update(replicas={"min": 100000, "max": 100000}))
    assert p.returncode == 3
    assert "cannot place every model's minimum replicas" in p.stderr and "fix:" in p.stderr
    assert "Traceback" not in p.stderr and "Starting" not in p.stdout + p.stderr


def test_bad_field_exits_2(tmp_path):
    p = run_with(tmp_path, lambda a: a["models"][0].update(max_num_seq=4))
    assert p.returncode == 2 and "max_num_seq: unknown key" in p.stderr


def test_front_port_on_the_proxy_port_exits_2(tmp_path):
    """args.http.port (gpuplan's own front) and http_options.port (Ray Serve's proxy) cannot share a port."""
    p = run_with(tmp_path, lambda a: a["http"].update(port=8001))  # deploy.yaml's proxy port
    assert p.returncode == 2 and "args.http.port 8001 is also http_options.port" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_api_address_is_the_front_when_there_is_one():
    from serve.run import api_address

    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    assert api_address(cfg) == ("127.0.0.1", 8000) and cfg["http_options"]["port"] == 8001
    del cfg["applications"][0]["args"]["http"]
    assert api_address(cfg) == ("127.0.0.1", 8001)
