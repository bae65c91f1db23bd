"""GET /metrics: Prometheus text of what LLM serving is judged by, in the names people already graph (vLLM's, where the
meaning is the same), plus gpuplan's own.

Measured here, in the API's process, per request (label ``model_name``):
- ``vllm:time_to_first_token_seconds`` (histogram): request received -> first token out;
- ``vllm:inter_token_latency_seconds`` (histogram): between tokens after the first (a chunk of k tokens that came
  after a gap counts k intervals of gap / k: the replica coalesces tokens, ``stream_interval_s``);
- ``vllm:e2e_request_latency_seconds`` (histogram): request received -> last token;
- ``vllm:request_success_total{finished_reason}`` (counter).

From each replica's latest report (the registry, refreshed at every health check; labels ``model_name``,
``deployment``, ``replica``):
- ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` (gauges): sequences in the engine's batch / waiting;
- ``vllm:kv_cache_usage_perc`` (gauge, 0-1): where the engine reports it (vLLM's scheduler);
- ``gpuplan:planned_bytes``, ``gpuplan:resident_weight_bytes`` (gauges): the plan's bytes of the replica and what its
  weights took when loaded;
- ``gpuplan:generation_tokens_total`` (counter): tokens the replica generated.

From the scaling policy's latest decision (label ``model_name``): ``gpuplan:scaling_load`` (requests in flight it
saw), ``gpuplan:scaling_want``, ``gpuplan:scaling_goal``, ``gpuplan:scaling_placed``.

Every ingress keeps its own histograms (the one serving the port has the traffic); a scrape of the port reads the
serving one's.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# bucket bounds, seconds: TTFT and e2e span milliseconds (a tiny model on a CPU) to minutes (long prompts queued)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
               240.0, 480.0)


class ApiMetrics:
    """The API process's per-request series (one registry per app, so that tests and several apps do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, seconds",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between tokens after the first, seconds",
                             ["model_name"], buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request received to last token, seconds",
                             ["model_name"], buckets=E2E_BUCKETS, registry=self.registry)
        self.success = Counter("vllm:request_success", "Requests answered, by finish reason",
                               ["model_name", "finished_reason"], registry=self.registry)

    def request(self, model: str) -> "RequestTimer":
        return RequestTimer(self, model)

    def render(self, replicas: list[dict] | None = None, scaling: dict | None = None) -> bytes:
        """The exposition text: the histograms, then the replicas' and the policy's gauges."""
        return generate_latest(self.registry) + replica_text(replicas or [], scaling or {}).encode("utf-8")


class RequestTimer:
    """One request's clock: ``token(n, now)`` when a chunk of n new tokens arrives, ``done(reason, now)`` at the end."""

    def __init__(self, m: ApiMetrics, model: str) -> None:
        import time

        self.m, self.model = m, model
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self._itl = None  # the inter-token histogram's child for this model (looked up once, not per token)

    def token(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = self.last = now
            self.m.ttft.labels(self.model).observe(now - self.t0)
            n -= 1
            if n <= 0:
                return
        if self._itl is None:
            self._itl = self.m.itl.labels(self.model)
        gap = (now - self.last) / n
        for _ in range(n):
            self._itl.observe(gap)
        self.last = now

    def done(self, reason: str, now: float) -> None:
        self.m.e2e.labels(self.model).observe(now - self.t0)
        self.m.success.labels(self.model, reason).inc()


def _esc(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _line(name: str, labels: dict, value: float) -> str:
    inner = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {float(value)!r}\n"


GAUGES = (("vllm:num_requests_running", "gauge", "Requests in the engine's batch", lambda r: r["stats"].get("running")),
          ("vllm:num_requests_waiting", "gauge", "Requests waiting for the engine's batch",
           lambda r: r["stats"].get("waiting")),
          ("vllm:kv_cache_usage_perc", "gauge", "KV cache usage, 0-1 (where the engine reports it)",
           lambda r: r["stats"].get("kv_cache_usage")),
          ("gpuplan:planned_bytes", "gauge", "Bytes the plan gave one replica", lambda r: r.get("planned_bytes")),
          ("gpuplan:resident_weight_bytes", "gauge", "Bytes the replica's weights took when loaded",
           lambda r: r.get("resident_weight_bytes")),
          ("gpuplan:generation_tokens_total", "counter", "Tokens the replica generated",
           lambda r: r["stats"].get("generated_tokens")))


def replica_text(replicas: list[dict], scaling: dict) -> str:
    """Prometheus text of each replica's latest report and the policy's latest decision."""
    out = []
    for name, kind, help_, get in GAUGES:
        rows = []
        for r in replicas:
            r = dict(r, stats=r.get("stats") or {})
            v = get(r)
            if v is None:
                continue
            rows.append(_line(name, {"model_name": r.get("model", ""), "deployment": r.get("deployment", ""),
                                     "replica": r.get("replica_id", "")}, v))
        if rows:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n" + "".join(rows))
    models = [m for m in (scaling or {}).get("models") or [] if isinstance(m, dict) and m.get("model")]
    for name, key, help_ in (("gpuplan:scaling_load", "load", "Requests in flight the scaling policy saw (its load)"),
                             ("gpuplan:scaling_want", "want", "Replicas the load asks for, within the plan's bounds"),
                             ("gpuplan:scaling_goal", "goal", "Replicas decided, after the up/down delays"),
                             ("gpuplan:scaling_placed", "placed", "Replicas given slots (below goal while a node's "
                                                                  "gate is closed)")):
        rows = [_line(name, {"model_name": m["model"]}, m[key]) for m in sorted(models, key=lambda m: m["model"])
                if m.get(key) is not None]
        if rows:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} gauge\n" + "".join(rows))
    return "".join(out)
