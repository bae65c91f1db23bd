"""The book of what each replica reports about itself (placement, load decision, resident bytes, failed loads) and
of the replicas that died, for GET /plan and /readyz. ``ReplicaBook`` is plain Python; ``Registry`` is its detached
Ray actor, named ``REGISTRY``."""

from __future__ import annotations

import time

import ray

REGISTRY = "gpuplan-registry"


class ReplicaBook:
    """What each replica reports about itself, and the replicas that died: one Serve no longer lists that did not say
    it stopped."""

    def __init__(self):
        self.replicas: dict[str, dict] = {}
        self.stopped_ids: set[str] = set()
        self.deaths: dict[str, list] = {}  # model -> [(replica_id, when it was found gone)]
        self.failures: list[dict] = []  # failed loads, newest last
        self.drains: dict[str, float] = {}  # build of the app (its built_at) -> when draining began
        self.fronts: dict[tuple[str, str], tuple[int, float]] = {}  # (build, ingress replica) -> (in flight, when)

    def put(self, info: dict) -> None:
        if info["replica_id"] in self.stopped_ids:
            return  # a late report of a replica that has stopped
        info = dict(info, reported_at=time.time())
        self.replicas[info["replica_id"]] = info

    def load_failed(self, info: dict) -> None:
        """A replica's load failed (it may step down and try again, or give up)."""
        self.failures.append(dict(info, at=time.time()))
        del self.failures[:-200]

    def recent_failures(self, deployment: str, within_s: float = 600.0) -> int:
        """Replicas of ``deployment`` that gave up loading in the last ``within_s`` (sets the back-off)."""
        now = time.time()
        return sum(1 for f in self.failures if f["deployment"] == deployment and f["gave_up"]
                   and now - f["at"] < within_s)

    def failures_of(self, app: str | None, within_s: float = 600.0) -> dict:
        """model -> its last few failed loads (for /readyz), of the last ``within_s``."""
        now, out = time.time(), {}
        for f in self.failures:
            if (app is None or f.get("app") in (None, app)) and now - f["at"] < within_s:
                out.setdefault(f["model"], []).append(f)
        return {m: fs[-5:] for m, fs in out.items()}

    def stopped(self, replica_id: str) -> None:
        """A replica shutting down the graceful way (scale-down, redeploy): not a death."""
        self.stopped_ids.add(replica_id)
        self.replicas.pop(replica_id, None)

    def prune(self, live: list[str], app: str | None = None) -> dict:
        """Forget replicas Serve no longer lists (``live``: every replica id Serve has for the app's deployments,
        starting ones included); those that did not stop the graceful way count as restarts of their model."""
        keep = set(live)
        now = time.time()
        for rid, info in list(self.replicas.items()):
            if app is not None and info.get("app") not in (None, app):
                continue
            if rid not in keep:
                self.replicas.pop(rid)
                if rid not in self.stopped_ids:
                    self.deaths.setdefault(info.get("model", "?"), []).append((rid, now))
        return {m: {"count": len(d), "last": max(t for _, t in d)} for m, d in self.deaths.items()}

    def all(self) -> list[dict]:
        return list(self.replicas.values())

    def routes(self, app: str | None) -> list[dict]:
        """The running replicas of ``app`` that take direct streams (serve/app/direct.py): what the ingress needs."""
        return [{k: r.get(k) for k in ("replica_id", "deployment", "state", "direct")}
                for r in self.replicas.values() if r.get("direct") and (app is None or r.get("app") == app)]


    # ---- the ingress replicas of one build share the API port; a drain reaches one of them and holds for all
    def drain(self, build: str) -> float:
        """Start draining ``build``'s ingress replicas (idempotent); returns when it began."""
        return self.drains.setdefault(build, time.time())

    def ingress_report(self, build: str, replica_id: str, in_flight: int) -> float | None:
        """An ingress replica's requests in flight (every second); returns when its build began draining, or None."""
        self.fronts[(build, replica_id)] = (int(in_flight), time.time())
        return self.drains.get(build)

    def in_flight(self, build: str, within_s: float = 5.0) -> dict[str, int]:
        """Requests in flight per ingress replica of ``build``, as reported in the last ``within_s``."""
        now = time.time()
        return {rid: n for (b, rid), (n, at) in self.fronts.items() if b == build and now - at < within_s}


Registry = ray.remote(num_cpus=0)(ReplicaBook)
