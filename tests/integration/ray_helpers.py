"""Helpers the integration tests share (not fixtures: those are in conftest.py)."""

from __future__ import annotations

import os
import time

import pytest
import requests


def need_no_ray(what: str) -> None:
    """Fail at once when Ray's daemons already run on this machine: ``what`` starts a cluster of its own, and a
    second one on the same ports and cores makes it slow, flaky or hang."""
    from serve.run.lifecycle import ray_daemons

    found = ray_daemons()
    if found:
        pytest.fail(f"a Ray cluster is already running on this machine ({', '.join(f'{n} {pid}' for pid, n in found)}); "
                    f"{what} needs its own. Fix: stop it (`.venv/bin/serve shutdown -y` then `.venv/bin/ray stop`, "
                    "or kill those pids) and run the test again")


def wait_ready(base: str, timeout: float, gave_up=None) -> bool:
    """Poll ``base``/readyz until it answers 200 (True), ``timeout`` passes or ``gave_up()`` says so (False)."""
    deadline = time.time() + timeout
    while True:
        try:
            if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        if time.time() > deadline or (gave_up is not None and gave_up()):
            return False
        time.sleep(1)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
