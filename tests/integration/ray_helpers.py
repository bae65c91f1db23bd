"""Helpers the integration tests share (not fixtures: those are in conftest.py)."""

from __future__ import annotations

import os
import time

import requests


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
