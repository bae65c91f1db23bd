"""Opt-in timestamps of one request's path, for benchmarks/request_timeline.py: with ``GPUPLAN_TRACE=<file>`` in
the environment of `make run` (Ray's workers inherit it), the API entry, the ingress and the replica append one JSON
line per event, ``{"event": ..., "t": <time.time()>}``. Unset (always, outside that benchmark): one dict lookup."""

from __future__ import annotations

import json
import os
import time

_PATH = os.environ.get("GPUPLAN_TRACE") or None


def mark(event: str) -> None:
    if _PATH is None:
        return
    with open(_PATH, "a") as f:  # one short write per line: lines of several processes do not interleave
        f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid()}) + "\n")
