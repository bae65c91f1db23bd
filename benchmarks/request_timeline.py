"""Where one request's time goes: the serving path of gpuplan, segment by segment, through its own front and through
Ray Serve's proxy, on the shipped tiny model (bf16, one CPU replica).

    .venv/bin/python -m benchmarks.request_timeline                       # transformers engine, 30 requests per size
    .venv/bin/python -m benchmarks.request_timeline --engine vllm --requests 50

Starts `python -m serve.run` (deploy.yaml's shape: the front on one port, the proxy on another) with
``GPUPLAN_TRACE`` set, so the API entry, the ingress and the replica write a timestamp at each step (serve/trace.py).
Sends streamed chats one at a time (the n-th event of each kind belongs to the n-th request), 1 token and
``--max-tokens`` tokens (ignore_eos), through each door, and prints the median of each segment in milliseconds:

    client -> API            HTTP in (through the proxy: the proxy, then the request as ASGI messages over Ray)
    API -> ingress call      body parsing, chat template, choice of deployment
    ingress call -> replica  the Ray call to the model replica
    replica: engine first    the engine's queue, prefill and first token
    replica -> ingress       the first chunk's way back over Ray
    ingress -> client        SSE encoding and HTTP out (through the proxy: one more Ray hop)
    last chunk: replica -> client
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import compare_servers as cs  # noqa: E402
from benchmarks.common.server import start_gpuplan, stop_gpuplan, wait_ready  # noqa: E402

EVENTS = ("api.request", "ingress.call", "replica.enter", "replica.first", "ingress.first", "replica.last",
          "ingress.last")
SEGMENTS = (  # name, from, to (client events: send, first, end)
    ("client -> API", "send", "api.request"),
    ("API -> ingress call", "api.request", "ingress.call"),
    ("ingress call -> replica", "ingress.call", "replica.enter"),
    ("replica: engine first chunk", "replica.enter", "replica.first"),
    ("first chunk: replica -> ingress", "replica.first", "ingress.first"),
    ("first chunk: ingress -> client", "ingress.first", "first"),
    ("last chunk: replica -> ingress", "replica.last", "ingress.last"),
    ("last chunk: ingress -> client", "ingress.last", "end"),
    ("total", "send", "end"),
)


def read_trace(path: Path) -> dict[str, dict[str, float]]:
    """event -> {request id -> time} (the id is the x-request-id each request carried)."""
    out: dict[str, dict[str, float]] = {e: {} for e in EVENTS}
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d.get("id") is not None:
            out.setdefault(d["event"], {})[d["id"]] = d["t"]
    return out


def send(url: str, n: int, max_tokens: int, trace: Path, clients: int = 1, ignore_eos: bool = True) -> list[dict]:
    """n streamed chats from ``clients`` concurrent clients (each sends its next request when its last one ended);
    each row has the client's and the server's timestamps of one request, matched by its x-request-id."""
    import threading
    import uuid

    trace.write_text("")
    rows: dict[str, dict] = {}
    counter = iter(range(n))
    lock = threading.Lock()
    tag = uuid.uuid4().hex[:8]

    def one_client():
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                rid = f"{tag}-{i}"
                body = {"model": cs.SERVED, "max_tokens": max_tokens, "ignore_eos": ignore_eos, "temperature": 0.8,
                        "seed": i, "stream": True,
                        "messages": [{"role": "user", "content": "Tell me a short story about a robot."}]}
                t0, first = time.time(), None
                with c.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": rid}) as r:
                    if r.status_code != 200:
                        raise SystemExit(f"request {i}: HTTP {r.status_code}: {r.read()[:300]!r}")
                    for _ in r.iter_raw():
                        if first is None:
                            first = time.time()
                rows[rid] = {"send": t0, "first": first, "end": time.time()}

    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(0.5)  # the last lines of the trace
    ev = read_trace(trace)
    for e in EVENTS:
        missing = [rid for rid in rows if rid not in ev[e]]
        if missing:
            raise SystemExit(f"trace {trace}: no {e!r} event for {len(missing)} of {n} requests")
        for rid, row in rows.items():
            row[e] = ev[e][rid]
    return list(rows.values())


def segments(rows: list[dict]) -> dict[str, float]:
    return {name: 1000 * statistics.median(r[b] - r[a] for r in rows) for name, a, b in SEGMENTS}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--requests", type=int, default=30, help="per size and door (after 3 warm-up requests)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=1, help="concurrent clients (the segments under load)")
    ap.add_argument("--eos", action="store_true", help="answers end where the model ends them (no ignore_eos)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gpuplan-timeline-"))
    from serve.api.front import pick_port

    front, proxy = pick_port(), pick_port()  # bound late (after Ray started): ports outside the ephemeral range
    cfg_path = tmp / "deploy.yaml"
    cs.gpuplan_config(a.engine, front, cfg_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["http_options"]["port"] = proxy
    cfg_path.write_text(yaml.safe_dump(cfg))
    trace = tmp / "trace.jsonl"
    log = tmp / "server.log"
    proc = start_gpuplan(cfg_path, log, GPUPLAN_TRACE=str(trace))
    results = {}
    try:
        if wait_ready(f"http://127.0.0.1:{front}", "/readyz", proc, 600) is None:
            raise SystemExit(f"the server did not become ready; see {log}")
        for door, port in (("front", front), ("proxy", proxy)):
            for tokens in (1, a.max_tokens):
                send(f"http://127.0.0.1:{port}", 3, tokens, trace)  # warm-up
                results[(door, tokens)] = segments(send(f"http://127.0.0.1:{port}", a.requests, tokens, trace,
                                                        a.clients, not a.eos))
    finally:
        stop_gpuplan(proc)
    cols = [(d, t) for t in (1, a.max_tokens) for d in ("front", "proxy")]
    print(f"gpuplan, {a.engine} engine, shipped tiny model bf16, one CPU replica; median of {a.requests} streamed "
          f"chats per column from {a.clients} concurrent client(s){', answers ending at EOS' if a.eos else ''}, ms")
    print("| segment | " + " | ".join(f"{d}, {t} token{'s' if t > 1 else ''}" for d, t in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, _, _ in SEGMENTS:
        print(f"| {name} | " + " | ".join(f"{results[c][name]:.1f}" for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{d}/{t}": results[(d, t)] for d, t in cols}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
