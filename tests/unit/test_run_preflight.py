"""`make run` (python -m serve.run) plans before it starts Ray: a bad or infeasible deploy.yaml fails in about a
second with one line and exit 2/3, and no Ray process is started."""

import os
import subprocess
import sys

import pytest
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
    from serve.run.main import api_address

    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    assert api_address(cfg) == ("127.0.0.1", 8000) and cfg["http_options"]["port"] == 8001
    del cfg["applications"][0]["args"]["http"]
    assert api_address(cfg) == ("127.0.0.1", 8001)


def _ports_cfg(tmp_path, front: int, proxy: int):
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    for m in cfg["applications"][0]["args"]["models"]:
        m["source"] = os.path.normpath(os.path.join(ROOT, m["source"]))
    cfg["applications"][0]["args"]["http"]["port"] = front
    cfg["http_options"]["port"] = proxy
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


class _Started(Exception):
    pass


def _no_start(monkeypatch, other_ray=()):
    """serve.run.main.main up to the point where it would start the supervisor (nothing is started)."""
    import serve.run.lifecycle as lc
    import serve.run.main as run

    monkeypatch.setattr(run, "start_clean", lambda: 0)
    monkeypatch.setattr(lc, "survey", lambda directory=None: ([], list(other_ray), None))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def popen(*a, **k):
        raise _Started()
    monkeypatch.setattr(run.subprocess, "Popen", popen)
    return run


@pytest.mark.parametrize("held", ["front", "proxy"])
def test_a_port_another_program_holds_exits_2_before_ray(tmp_path, monkeypatch, capsys, held):
    """A program already listening on the API port: Ray's proxy would fail to start, gpuplan's front would wait for
    the port and `make run` would never be ready. Said before Ray starts, with the port, who holds it and the fix."""
    from serve.api.front import bind, pick_port

    front, proxy = pick_port(), pick_port()
    run = _no_start(monkeypatch)
    sock = bind("127.0.0.1", front if held == "front" else proxy)
    try:
        rc = run.main([_ports_cfg(tmp_path, front, proxy)])
    finally:
        sock.close()
    err = capsys.readouterr().err
    port, field = (front, "applications[0].args.http.port") if held == "front" else (proxy, "http_options.port")
    assert rc == 2, err
    what = "gpuplan's API" if held == "front" else "Ray Serve's proxy"
    assert f"port {port} on 127.0.0.1, {what} ({field} in deploy.yaml), is taken" in err, err
    assert f"pid {os.getpid()}" in err and f"Fix: stop that program, or set {field} in deploy.yaml" in err, err


def test_free_ports_go_on_to_start(tmp_path, monkeypatch):
    from serve.api.front import pick_port

    run = _no_start(monkeypatch)
    with pytest.raises(_Started):
        run.main([_ports_cfg(tmp_path, pick_port(), pick_port())])


def test_ports_are_not_checked_on_a_cluster_someone_else_runs(tmp_path, monkeypatch):
    """On a Ray cluster started on purpose Serve may be running already and hold its own proxy port."""
    from serve.api.front import bind, pick_port

    front, proxy = pick_port(), pick_port()
    run = _no_start(monkeypatch, other_ray=[(1, "gcs_server")])
    sock = bind("127.0.0.1", proxy)
    try:
        with pytest.raises(_Started):
            run.main([_ports_cfg(tmp_path, front, proxy)])
    finally:
        sock.close()
