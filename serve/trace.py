"""Opt-in timestamps of one request's path, for benchmarks/request_timeline.py: with ``GPUPLAN_TRACE=<file>`` in
the environment of `make run` (Ray's workers inherit it), the API entry, the ingress and the replica append one JSON
line per event, ``{"event": ..., "t": <time.time()>, "id": <the request's x-request-id header>}``. Unset (always, outside that benchmark): one dict lookup."""

from __future__ import annotations

import json
import os
import time

_PATH = os.environ.get("GPUPLAN_TRACE") or None


def enabled() -> bool:
    return _PATH is not None


def mark(event: str, trace_id: str | None = None) -> None:
    """One event of a request's path; ``trace_id``: the client's x-request-id, so that concurrent requests' events
    can be told apart."""
    if _PATH is None:
        return
    with open(_PATH, "a") as f:  # one short write per line: lines of several processes do not interleave
        f.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), "id": trace_id}) + "\n")
