"""`make run`: serve a deploy.yaml with `serve run`, stop completely on one SIGTERM or Ctrl-C, and report the cold
start (seconds until GET /readyz answers 200).

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
import urllib.request

import yaml

STALE = "/tmp/ray/ray_current_cluster"


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


def wait_ready(url: str, proc: subprocess.Popen, t0: float, timeout_s: float) -> float | None:
    while time.time() - t0 < timeout_s and proc.poll() is None:
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
    stopping = {"sig": None}

    def stop(signum, _frame):
        stopping["sig"] = signum
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready = wait_ready(url, proc, t0, a.ready_timeout)
    if ready is not None:
        print(f"gpuplan: ready in {ready:.1f} s (cold start to GET /readyz 200) at http://{host}:{port}", flush=True)
    elif proc.poll() is None and stopping["sig"] is None:
        print(f"gpuplan: not ready after {a.ready_timeout:.0f} s; still waiting (see the log above)", flush=True)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        stop(signal.SIGINT, None)
        rc = proc.wait()
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
