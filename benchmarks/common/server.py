"""Start and stop gpuplan's server the way `make run` does (``python -m serve.run CONFIG``), wait for it, and find
the Ray daemons a run leaves (serve.run.lifecycle.ray_daemons, the check `make run` itself uses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def ray_daemons() -> list[tuple[int, str]]:
    """(pid, name) of the Ray daemons running on this machine."""
    from serve.run.lifecycle import ray_daemons as daemons

    return daemons()


def start_gpuplan(config, log_path, **env) -> subprocess.Popen:
    """``python -m serve.run CONFIG`` from the repo root, its output in ``log_path``; ``env`` adds variables
    (RAY_AUTH_MODE defaults to disabled)."""
    full = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen([sys.executable, "-m", "serve.run", str(config)], cwd=ROOT, env=full,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def wait_ready(url: str, probe: str, proc: subprocess.Popen, timeout_s: float, every_s: float = 1.0) -> float | None:
    """Seconds until ``GET url+probe`` answers 200, or None when ``proc`` exits or ``timeout_s`` passes first."""
    t0 = time.time()
    while time.time() - t0 < timeout_s and proc.poll() is None:
        try:
            if httpx.get(url + probe, timeout=3).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    return None


def stop_gpuplan(proc: subprocess.Popen, timeout_s: float = 120.0,
                 daemons_s: float = 60.0) -> tuple[float, int | None, list[tuple[int, str]]]:
    """One SIGTERM (serve.run drains, then stops `serve run` and its local Ray), then wait for the Ray daemons to go.
    Returns (seconds, exit code, daemons still running)."""
    t0 = time.perf_counter()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"!! serve.run (pid {proc.pid}) still running {timeout_s:.0f} s after SIGTERM; left alone",
                  file=sys.stderr)
    deadline = time.perf_counter() + daemons_s
    while ray_daemons() and time.perf_counter() < deadline:
        time.sleep(0.5)
    return time.perf_counter() - t0, proc.poll(), ray_daemons()
