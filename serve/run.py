"""`make run`: serve a deploy.yaml with `serve run`, drain and stop completely on one SIGTERM or Ctrl-C (requests in
flight finish, new ones get 503; a second signal stops at once), and report the cold start (seconds until GET
/readyz answers 200).

Why a wrapper: `serve run` starts its own local Ray. A `ray start --head` before it would leave a gcs_server that
ignores SIGTERM; a stale /tmp/ray/ray_current_cluster left by a killed cluster makes `serve run` hang while it tries
to connect. Both are handled here.
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

import yaml

STALE = "/tmp/ray/ray_current_cluster"
# NOTE: how long a SIGTERM waits for requests in flight to finish: Serve's graceful_shutdown_timeout_s of a replica
# (planner/rollout.py GRACEFUL_SHUTDOWN_S), which bounds the same wait inside Serve.
DRAIN_TIMEOUT_S = 30.0


def ray_processes() -> list[str]:
    try:
        out = subprocess.run(["pgrep", "-a", "-f", "gcs_server|raylet"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [ln for ln in out.splitlines() if "pgrep" not in ln]


def check_stale_cluster() -> None:
    if os.path.exists(STALE) and not ray_processes():
        with open(STALE) as f:
            addr = f.read().strip()
        print(f"gpuplan: {STALE} names a Ray cluster at {addr or '?'} but no Ray process is running (a cluster that "
              "was killed); `serve run` would hang trying to reach it. Removing the stale file.", file=sys.stderr)
        os.remove(STALE)
    elif ray_processes():
        print("gpuplan: a Ray cluster is already running on this machine; `serve run` will connect to it. "
              "Run `ray stop` first for a fresh local cluster.", file=sys.stderr)


def preflight(config: str) -> int:
    """Plan before starting Ray, so a bad or infeasible deploy.yaml fails in a second with one line (exit 2 or
    3) instead of a crashing Serve application. `cluster: auto` is planned against this host's probe, which is what
    `serve run` on this machine will see."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from planner.config import load_deploy_file
    from planner.errors import GpuplanError
    from planner.inventory import Cluster, Node, probe_local_gpus
    from planner.planning import cluster_from_decl, make_plan

    try:
        args, _ = load_deploy_file(config)
        if args.cluster == "auto":
            probe = probe_local_gpus()
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            cluster = Cluster(nodes=(Node(name="local", cpu_memory_bytes=ram, gpus=probe.gpus),), source="probed")
        else:
            cluster = cluster_from_decl(args.cluster)
        make_plan(args, cluster)
    except GpuplanError as exc:
        print(f"gpuplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


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


def wait_ready(url: str, proc: subprocess.Popen, t0: float, timeout_s: float, stop=lambda: False) -> float | None:
    while time.time() - t0 < timeout_s and proc.poll() is None and not stop():
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:
            pass
        time.sleep(1.0)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="deploy.yaml")
    ap.add_argument("--ready-timeout", type=float, default=600)
    a = ap.parse_args(argv)
    if not os.path.exists(a.config):
        print(f"gpuplan: {a.config}: no such file", file=sys.stderr)
        return 2
    with open(a.config) as f:
        cfg = yaml.safe_load(f) or {}
    http = cfg.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    port = int(http.get("port", 8000))
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/readyz"
    rc = preflight(a.config)
    if rc:
        return rc
    check_stale_cluster()
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
               GPUPLAN_CONFIG_DIR=os.path.dirname(os.path.abspath(a.config)))
    # the `serve` CLI of this interpreter's environment (the venv), not whichever one is first on PATH
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    if not os.path.exists(serve_bin):
        serve_bin = shutil.which("serve") or serve_bin
    t0 = time.time()
    proc = subprocess.Popen([serve_bin, "run", a.config], env=env, start_new_session=True)
    stopping = {"sig": None, "killed": False}

    def kill_serve() -> None:
        stopping["killed"] = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(signum, _frame):
        if stopping["sig"] is not None:  # a second signal: stop now, drained or not
            kill_serve()
            return
        stopping["sig"] = signum

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = wait_ready(url, proc, t0, a.ready_timeout, lambda: stopping["sig"] is not None)
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
        if stopping["sig"] is not None and not stopping["killed"]:
            if ready is not None:
                drain(base, DRAIN_TIMEOUT_S)
            kill_serve()
    # make sure nothing of the local cluster outlives us
    deadline = time.time() + 20
    while ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    if ray_processes():
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       capture_output=True, env=env)
    return 0 if stopping["sig"] is not None else rc


if __name__ == "__main__":
    sys.exit(main())
