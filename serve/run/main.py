"""`make run`: serve a deploy.yaml with `serve run`, drain and stop completely on one SIGTERM or Ctrl-C (requests in
flight finish, new ones get 503; a second signal stops at once), report the cold start (seconds until GET /readyz
answers 200 *for the app this start deployed*), and leave nothing behind however the wrapper dies.

How: `serve run` runs under a supervisor (serve/run/supervisor.py) in a session of its own, which holds a pipe from this
wrapper and tears down `serve run` and the local Ray it started when the pipe closes, SIGKILL of the wrapper
included. At start, what earlier runs left is sorted out first (serve/run/lifecycle.py): a live `make run` (refuse), an
orphaned cluster of an earlier run (stopped, pids named), a cluster someone started on purpose (used, left
running), a stale /tmp/ray/ray_current_cluster (removed: `serve run` would hang on it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import yaml

# NOTE: how long a SIGTERM waits for requests in flight to finish: Serve's graceful_shutdown_timeout_s of a replica
# (planner/rollout/ GRACEFUL_SHUTDOWN_S), which bounds the same wait inside Serve.
DRAIN_TIMEOUT_S = 30.0
ORPHAN_WAIT_S = 15.0  # an earlier run's supervisor still stopping: how long to wait for it


def start_clean() -> int:
    """Look at what earlier runs left (serve.run.lifecycle): refuse beside a live `make run` (2), stop an orphaned
    cluster of ours and name it, use a cluster someone started on purpose and say so, drop a stale cluster file."""
    from serve.run import lifecycle as lc

    deadline = time.time() + ORPHAN_WAIT_S
    while True:
        runs, other, stale = lc.survey()
        plan = lc.decide_start(runs, other, os.environ.get("RAY_ADDRESS"), stale, time.time())
        if not plan.wait_for or time.time() > deadline:
            break
        time.sleep(0.5)
    if plan.refuse:
        print(f"gpuplan: error: {plan.refuse}", file=sys.stderr)
        return 2
    if plan.wait_for:  # its supervisor did not finish: what it left is an orphan now
        plan = lc.decide_start([lc.RunSeen(r.path, r.record, r.wrapper_alive, False, r.alive) for r in runs], other,
                               os.environ.get("RAY_ADDRESS"), stale, time.time())
    for m in plan.messages:
        print(m, file=sys.stderr, flush=True)
    for run_id, pids in plan.stop:
        left = lc.stop_processes(pids)
        if left:
            print(f"gpuplan: error: could not stop pids {left} of run {run_id}; stop them by hand (kill -9) and "
                  "start again", file=sys.stderr)
            return 2
        print(f"gpuplan: stopped {len(pids)} process(es) of run {run_id}", file=sys.stderr, flush=True)
    for path in plan.forget:
        try:
            os.remove(path)
        except OSError:
            pass
    if plan.remove_stale_file:
        try:
            os.remove(lc.STALE_CLUSTER_FILE)
        except OSError:
            pass
    return 0


def preflight(config: str) -> int:
    """Plan before starting Ray, so a bad or infeasible deploy.yaml fails in a second with one line (exit 2 or
    3) instead of a crashing Serve application. `cluster: auto` is planned against this host's probe, which is what
    `serve run` on this machine will see."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from planner.config import load_deploy_file
    from planner.errors import GpuplanError
    from planner.cluster.inventory import Cluster, Node, probe_local_gpus
    from planner.planning import cluster_from_decl, make_plan

    try:
        args, _ = load_deploy_file(config)
        if args.cluster == "auto":
            probe = probe_local_gpus()
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            cluster = Cluster(nodes=(Node(name="local", cpu_memory_bytes=ram, gpus=probe.gpus),), source="probed")
        else:
            cluster = cluster_from_decl(args.cluster)
        from planner.cluster.installed import installed_engines as available

        make_plan(args, cluster, available())
    except GpuplanError as exc:
        print(f"gpuplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def api_address(cfg: dict) -> tuple[str, int]:
    """Where the API answers: gpuplan's own front (``args.http.port``, serve/api/front.py) when the app has one, else
    Ray Serve's proxy (``http_options``)."""
    http = cfg.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    for app in cfg.get("applications") or []:
        front = ((app.get("args") or {}).get("http") or {})
        if front.get("port"):
            return front.get("host", "127.0.0.1"), int(front["port"])
    return host, port


def listen_ports(cfg: dict) -> list[tuple[str, str, str, int]]:
    """(what listens, the deploy file's field, host, port) of each port the app will listen on: Ray Serve's proxy
    (``http_options``) and gpuplan's own front (``args.http.port``) where an application has one."""
    http = cfg.get("http_options") or {}
    out = [("Ray Serve's proxy", "http_options.port", http.get("host", "127.0.0.1"), int(http.get("port", 8000)))]
    for i, app in enumerate(cfg.get("applications") or []):
        front = (app.get("args") or {}).get("http") or {}
        if front.get("port"):
            out.append(("gpuplan's API", f"applications[{i}].args.http.port", front.get("host", "127.0.0.1"),
                        int(front["port"])))
    return out


def port_taken(host: str, port: int) -> str | None:
    """None when a server can listen on (host, port) now; else why not, with the process listening there when the
    OS tells."""
    from serve.api.front import bind

    try:
        bind(host, port).close()
        return None
    except OSError as exc:
        why = exc.strerror or str(exc)
    try:
        import psutil

        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f"{why}; pid {c.pid} ({psutil.Process(c.pid).name()}) listens on it"
    except Exception:  # noqa: BLE001 - naming the holder is a courtesy (psutil may lack the permission)
        pass
    return why


def check_ports(cfg: dict, config: str) -> str | None:
    """Before a fresh local cluster starts: the first port of :func:`listen_ports` another program holds, as the
    error to print (Ray's proxy would fail to start on it; gpuplan's front would wait for it and never be ready)."""
    for what, field_, host, port in listen_ports(cfg):
        why = port_taken(host, port)
        if why is not None:
            name = os.path.basename(config)
            return (f"port {port} on {host}, {what} ({field_} in {name}), is taken: {why}. Fix: stop that program, "
                    f"or set {field_} in {name} to a free port")
    return None


def drain(base: str, timeout_s: float) -> None:
    """Ask the ingress to drain (POST /admin/drain), then wait until nothing is in flight or ``timeout_s`` passed:
    running requests and streams finish, new ones get 503 + Retry-After meanwhile."""
    import json

    headers = {"Content-Type": "application/json"}
    key = os.environ.get("GPUPLAN_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.time()
    try:
        req = urllib.request.Request(f"{base}/admin/drain", data=b"{}", headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            left = json.loads(r.read()).get("in_flight", 0)
    except Exception as exc:
        print(f"gpuplan: could not drain ({exc}); stopping", file=sys.stderr, flush=True)
        return
    print(f"gpuplan: draining: {left} request(s) in flight; new ones get 503", flush=True)
    while left and time.time() - t0 < timeout_s:
        time.sleep(0.5)
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 503 while draining, with the detail
            body = json.loads(e.read() or b"{}")
        except Exception:
            break
        left = ((body.get("detail") or {}).get("draining") or {}).get("in_flight", 0)
    print(f"gpuplan: drained in {time.time() - t0:.1f} s" + (f" ({left} still in flight)" if left else ""),
          flush=True)


def is_this_app(body: dict, run_id: str, t0: float) -> bool:
    """Does a /readyz answer come from the app this start deployed (not an older one still on the port)? The
    ingress reports the run id it was built under (local clusters inherit it) and when it was built."""
    app = body.get("app") or {}
    if app.get("run_id"):
        return app["run_id"] == run_id
    return float(app.get("built_at") or 0.0) >= t0 - 1.0


def wait_ready(url: str, proc: subprocess.Popen, t0: float, timeout_s: float, run_id: str,
               stop=lambda: False) -> float | None:
    import json

    while time.time() - t0 < timeout_s and proc.poll() is None and not stop():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and is_this_app(json.loads(r.read()), run_id, t0):
                    return time.time() - t0
        except Exception:
            pass
        time.sleep(0.5)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="deploy.yaml")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="drain and stop when the process that started this one exits (make run passes it)")
    a = ap.parse_args(argv)
    if not os.path.exists(a.config):
        print(f"gpuplan: {a.config}: no such file", file=sys.stderr)
        return 2
    with open(a.config) as f:
        cfg = yaml.safe_load(f) or {}
    rc = preflight(a.config)
    if rc:
        return rc
    host, port = api_address(cfg)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/readyz"
    rc = start_clean()
    if rc:
        return rc
    from serve.run import lifecycle as lc

    if not os.environ.get("RAY_ADDRESS") and not lc.survey()[1]:  # a fresh cluster: nothing of Serve's holds a port
        err = check_ports(cfg, a.config)
        if err:
            print(f"gpuplan: error: {err}", file=sys.stderr)
            return 2
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               GPUPLAN_CONFIG_DIR=os.path.dirname(os.path.abspath(a.config)))
    # the `serve` CLI of this interpreter's environment (the venv), not whichever one is first on PATH
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    if not os.path.exists(serve_bin):
        serve_bin = shutil.which("serve") or serve_bin
    run_id = uuid.uuid4().hex[:12]
    parent = os.getppid()
    t0 = time.time()
    # the supervisor: a session of its own, the read end of a pipe whose only write end is ours (serve/run/supervisor.py)
    proc = subprocess.Popen([sys.executable, "-m", "serve.run.supervisor", "--run-id", run_id, "--wrapper-pid",
                             str(os.getpid()), "--config", os.path.abspath(a.config), "--port", str(port), "--",
                             serve_bin, "run", a.config], env=env, stdin=subprocess.PIPE, start_new_session=True,
                            cwd=os.getcwd())
    stopping = {"sig": None, "killed": False}

    def tell_supervisor() -> None:
        stopping["killed"] = True
        try:
            proc.stdin.write(b"stop\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def stop(signum, _frame):
        if stopping["sig"] is not None:  # a second signal: stop now, drained or not
            tell_supervisor()
            return
        stopping["sig"] = signum

    def parent_gone() -> bool:
        if a.exit_with_parent and stopping["sig"] is None and os.getppid() != parent:
            print(f"gpuplan: the process that started this one (pid {parent}) is gone; stopping", flush=True)
            stopping["sig"] = signal.SIGHUP
        return stopping["sig"] is not None

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    ready = wait_ready(url, proc, t0, a.ready_timeout, run_id, parent_gone)
    if ready is not None:
        print(f"gpuplan: ready in {ready:.1f} s (cold start to GET /readyz 200) at http://{host}:{port}", flush=True)
    elif proc.poll() is None and stopping["sig"] is None:
        print(f"gpuplan: not ready after {a.ready_timeout:.0f} s; still waiting (see the log above)", flush=True)
    base = url.rsplit("/", 1)[0]
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            stop(signal.SIGINT, None)
        parent_gone()
        if stopping["sig"] is not None and not stopping["killed"]:
            if ready is not None:
                drain(base, DRAIN_TIMEOUT_S)
            tell_supervisor()
    return 0 if stopping["sig"] is not None else rc


if __name__ == "__main__":
    sys.exit(main())
