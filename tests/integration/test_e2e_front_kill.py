"""The API survives the death of the process that serves it: `python -m serve.run` with gpuplan's front on two ingress
replicas (args.http.replicas: one serves the port, the other stands by on a file lock), 4 clients sending short chats
without pause, and the ingress process that answered /readyz SIGKILLed under that load. Counted: connections refused
(the port closed), and requests lost (a connection reset or a 5xx other than the typed 503s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import requests
import yaml

from ray_helpers import alive, need_no_ray, wait_ready
from serve.api.front import pick_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = 4


def client(base: str, stop: threading.Event, log: list) -> None:
    """Short chats back to back; every attempt logged as (start, end, outcome)."""
    s = requests.Session()
    body = {"model": "tiny-gguf", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0}
    while not stop.is_set():
        t = time.time()
        try:
            r = s.post(base + "/v1/chat/completions", json=body, timeout=30)
            outcome = "ok" if r.status_code == 200 else ("typed" if r.status_code in (429, 503) else
                                                         f"http {r.status_code}")
        except requests.ConnectionError as exc:
            refused = "refused" in str(exc).lower() or "Errno 111" in str(exc)
            outcome = "refused" if refused else "reset"
            s = requests.Session()  # a fresh connection after a broken one
        except requests.RequestException as exc:
            outcome = f"error {type(exc).__name__}"
        log.append((t, time.time(), outcome))


def ingress_pids() -> set[int]:
    """The ingress replicas' processes (Ray titles them ServeReplica:<app>:Ingress)."""
    import psutil

    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "ServeReplica:llm:Ingress" in " ".join(p.info["cmdline"] or []):
                out.add(p.info["pid"])
        except psutil.Error:
            continue
    return out


def longest_refusal(log: list) -> float:
    """The longest stretch, in seconds, from a refused attempt to the next attempt (of any client) that got in."""
    longest, start = 0.0, None
    for t, _, outcome in sorted(log):
        if outcome == "refused":
            start = t if start is None else start
        elif start is not None:
            longest, start = max(longest, t - start), None
    return longest if start is None else float("inf")


def start_server(tmp_path):
    """`python -m serve.run` of deploy.yaml's tiny-gguf with gpuplan's front on a fresh port; (proc, base, config)."""
    need_no_ray("this test")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    port, proxy_port = pick_port(), pick_port()
    cfg["http_options"]["port"] = proxy_port
    args = cfg["applications"][0]["args"]
    args["http"]["port"] = port
    assert args["http"].get("replicas", 2) == 2  # the default: two fronts on one port
    args["models"] = [m for m in args["models"] if m["name"] == "tiny-gguf"]
    for m in args["models"]:
        m["source"] = os.path.normpath(os.path.join(ROOT, m["source"]))
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("GPUPLAN_API_KEY", None)
    log_path = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "serve.run", str(path)], cwd=ROOT, env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    if not wait_ready(base, 300, gave_up=lambda: proc.poll() is not None):
        proc.kill()
        pytest.fail("serve run did not become ready:\n" + log_path.read_text()[-4000:])
    return proc, base, cfg


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def load(base: str):
    """CLIENTS client threads started; returns (stop event, log, threads)."""
    stop, log = threading.Event(), []
    threads = [threading.Thread(target=client, args=(base, stop, log), daemon=True) for _ in range(CLIENTS)]
    for th in threads:
        th.start()
    return stop, log, threads


def split(log: list, at: float):
    """(answered before ``at``, in flight at ``at``, sent after ``at``) outcomes, and the requests lost."""
    before = [o for t, end, o in log if end < at]
    in_flight = [o for t, end, o in log if t < at <= end]
    after = [o for t, end, o in log if t >= at]
    lost = [o for o in in_flight + after if o not in ("ok", "typed", "refused")]
    return before, in_flight, after, lost


def test_sigkill_of_the_front_under_load_keeps_the_port_open(tmp_path):
    proc, base, _ = start_server(tmp_path)
    try:
        pids = ingress_pids()
        assert len(pids) == 2, f"two ingress processes expected (one serving, one standing by), saw {pids}"
        leader = {requests.get(base + "/readyz", timeout=10).json()["app"]["ingress_pid"] for _ in range(10)}
        assert len(leader) == 1 and leader <= pids, (leader, pids)  # one of them serves the port
        stop, log, threads = load(base)
        time.sleep(5)
        victim = requests.get(base + "/readyz", timeout=10).json()["app"]["ingress_pid"]
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        time.sleep(15)
        stop.set()
        for th in threads:
            th.join(timeout=60)
        before, in_flight, after, lost = split(log, killed_at)
        refused = sum(o == "refused" for o in after)
        print(f"front kill: before {dict(Counter(before))}, in flight at the kill {dict(Counter(in_flight))}, after "
              f"{dict(Counter(after))}; {refused} refused, {len(lost)} lost; longest refusal "
              f"{longest_refusal(log):.2f} s; the victim {'still runs' if alive(victim) else 'is gone'}")
        assert not alive(victim)
        assert before.count("ok") > 10 and not [o for o in before if o not in ("ok", "typed")], before
        assert after.count("ok") > 20, "the other front must keep answering"
        assert longest_refusal(log) < 1.0, f"the port was closed for {longest_refusal(log):.2f} s"
        # lost: only what the dead process held, each client's request in flight there and at most one more sent on
        # its kept-alive connection to it before the reset told it so (a client that retries those loses nothing);
        # never an HTTP error
        assert len(lost) <= 2 * CLIENTS and not [o for o in lost if o.startswith("http")], lost
        # the standby serves now, and Serve starts a new standby in place of the dead one
        assert requests.get(base + "/readyz", timeout=10).json()["app"]["ingress_pid"] in pids - {victim}
        deadline = time.time() + 120
        while len(ingress_pids() - {victim}) < 2 and time.time() < deadline:
            time.sleep(0.5)
        assert len(ingress_pids() - {victim}) == 2, ingress_pids()
    finally:
        stop_server(proc)


def test_a_config_update_that_replaces_the_ingress_keeps_the_port_open(tmp_path):
    """The same app deployed again (a new build: new ingress replicas, the model's deployment unchanged) under the same
    load: the old fronts hand the port to the new ones without a second of refusals."""
    proc, base, cfg = start_server(tmp_path)
    try:
        old = requests.get(base + "/readyz", timeout=10).json()["app"]
        stop, log, threads = load(base)
        time.sleep(5)
        args = cfg["applications"][0]["args"]
        redeploy = ("import ray, sys, json\nfrom ray import serve\nfrom serve.app.build import build_app\n"
                    "ray.init(address='auto', namespace='serve')\n"
                    "serve.run(build_app(json.loads(sys.argv[1])), name='llm', route_prefix='/', blocking=False)\n")
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        updated_at = time.time()
        r = subprocess.run([sys.executable, "-c", redeploy, json.dumps(args)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        deadline = time.time() + 120
        new = old
        while new.get("built_at") == old.get("built_at") and time.time() < deadline:
            try:
                new = requests.get(base + "/readyz", timeout=10).json()["app"]
            except requests.RequestException:
                pass
            time.sleep(0.5)
        time.sleep(10)
        stop.set()
        for th in threads:
            th.join(timeout=60)
        before, in_flight, after, lost = split(log, updated_at)
        print(f"config update: before {dict(Counter(before))}, in flight {dict(Counter(in_flight))}, after "
              f"{dict(Counter(after))}; {len(lost)} lost; longest refusal {longest_refusal(log):.2f} s; "
              f"ingress {old.get('ingress_pid')} -> {new.get('ingress_pid')}")
        assert new.get("built_at") != old.get("built_at"), "the new build never answered"
        assert after.count("ok") > 20
        assert longest_refusal(log) < 1.0, f"the port was closed for {longest_refusal(log):.2f} s"
        assert len(lost) <= CLIENTS, lost
    finally:
        stop_server(proc)
