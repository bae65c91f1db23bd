"""Nothing left behind: `python -m serve.run` (what `make run` runs) killed with SIGKILL takes its whole Ray
cluster with it within 15 s; a later start stops and names an orphaned cluster of an earlier run and becomes ready
on its own app; a cluster started with `ray start` is used and left running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from serve.api.front import pick_port
import requests
import yaml

from ray_helpers import need_no_ray

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)



def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def ray_daemons() -> list[int]:
    """Live (not zombie) gcs_server and raylet processes."""
    from serve.run.lifecycle import ray_daemons as daemons

    return [pid for pid, _ in daemons()]


def marked(run_id: str) -> list[int]:
    pids = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("GPUPLAN_RUN_ID") == run_id and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture
def env(tmp_path):
    need_no_ray("these tests")
    e = dict(os.environ, RAY_AUTH_MODE="disabled", GPUPLAN_STATE_DIR=str(tmp_path / "state"))
    e.pop("GPUPLAN_API_KEY", None)
    e.pop("RAY_ADDRESS", None)
    return e


def config(tmp_path) -> tuple[str, int]:
    """deploy.yaml with one model (a faster start) on a free port."""
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    cfg["http_options"]["port"] = pick_port()  # Ray Serve's proxy
    args = cfg["applications"][0]["args"]
    args["http"]["port"] = port = pick_port()  # the API (gpuplan's front), outside the ephemeral range
    args["models"] = [dict(args["models"][0], source=os.path.join(ROOT, "models", "tiny-chat"))]
    path = tmp_path / f"deploy-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), port


def start(tmp_path, env) -> tuple[subprocess.Popen, int, str]:
    path, port = config(tmp_path)
    log = tmp_path / f"run-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve.run", path], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while "gpuplan: ready in" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"serve.run did not become ready:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    return proc, port, str(log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def test_sigkill_of_the_wrapper_leaves_nothing_within_15s(tmp_path, env):
    proc, port, log = start(tmp_path, env)
    run_id = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["app"]["run_id"]
    ours = marked(run_id)
    assert len(ours) >= 5 and ray_daemons()  # serve run, gcs_server, raylet, the dashboard, replicas, ...
    proc.kill()  # SIGKILL: no handler runs in the wrapper
    t0 = time.time()
    # the supervisor removes the run record as its last step, after every process it stopped is gone
    while (marked(run_id) or ray_daemons() or not port_free(port) or os.listdir(env["GPUPLAN_STATE_DIR"])) \
            and time.time() - t0 < 15:
        time.sleep(0.25)
    took = time.time() - t0
    left = [p for p in ours if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not marked(run_id) and not left and not ray_daemons(), (left, open(log).read()[-3000:])
    assert port_free(port), f"port {port} still answers {took:.1f} s after SIGKILL"
    assert not os.listdir(env["GPUPLAN_STATE_DIR"])  # the run record went with it
    assert "wrapper (pid" in open(log).read() and "is gone" in open(log).read()


def test_an_orphaned_cluster_is_named_and_stopped_and_ready_means_the_new_app(tmp_path, env):
    """The orphan: a Ray cluster marked as run `orphan0001` of a wrapper that is gone (what is left when wrapper,
    supervisor and `serve run` are all SIGKILLed at once, the OOM killer taking the whole tree)."""
    from serve.run.lifecycle import Proc, RunRecord, record_path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.makedirs(env["GPUPLAN_STATE_DIR"], exist_ok=True)
    RunRecord(run_id="orphan0001", wrapper=Proc(int(gone.stdout), time.time() - 100), config="old.yaml", port=1,
              started_at=time.time() - 100).write(record_path("orphan0001", env["GPUPLAN_STATE_DIR"]))
    orphan_env = dict(env, GPUPLAN_RUN_ID="orphan0001")
    subprocess.run([os.path.join(BIN, "ray"), "start", "--head", "--port", str(pick_port()), "--num-cpus", "1",
                    "--include-dashboard=false", "--disable-usage-stats"], env=orphan_env, check=True,
                   capture_output=True, timeout=120)
    try:
        orphan = marked("orphan0001")
        assert orphan and ray_daemons()
        t0 = time.time()
        proc, port, log = start(tmp_path, env)
        text = open(log).read()
        assert "run orphan0001" in text and "is gone but left" in text, text[-3000:]
        assert all(str(p) in text for p in orphan)  # every pid of the orphan is named
        assert not marked("orphan0001")
        body = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert body["app"]["run_id"] and body["app"]["run_id"] != "orphan0001" and body["app"]["built_at"] > t0
        # a real cold start: a fresh local cluster, not the orphan's
        assert all(marked(body["app"]["run_id"]).count(p) == 1 for p in ray_daemons())
        stop(proc)
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env, capture_output=True)
    assert not ray_daemons()


def test_a_ray_start_cluster_is_used_and_left_running(tmp_path, env):
    subprocess.run([os.path.join(BIN, "ray"), "start", "--head", "--port", str(pick_port()), "--num-cpus", "4",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    try:
        theirs = ray_daemons()
        assert theirs
        proc, port, log = start(tmp_path, env)
        text = open(log).read()
        assert "did not start is running" in text and "left running on exit" in text, text[-3000:]
        body = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert body["app"]["built_at"]
        stop(proc)
        assert proc.returncode == 0
        time.sleep(2)
        assert all(psutil.pid_exists(p) for p in theirs), "make run stopped a cluster it did not start"
        assert port_free(port)  # Serve (our app) is gone from it
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env, capture_output=True)
    assert not ray_daemons()
    assert json.dumps(os.listdir(env["GPUPLAN_STATE_DIR"])) == "[]"
