"""Load on the OpenAI-compatible server: does continuous batching pay off, and how fast is a cold start?

    .venv/bin/python -m benchmarks.serve_load                  # against a server already running (`make run`)
    .venv/bin/python -m benchmarks.serve_load --start          # start `python -m serve.run deploy.yaml` itself
    .venv/bin/python -m benchmarks.serve_load --clients 1 4 8 16 --requests 48 --max-tokens 64 --model tiny-int8

For each concurrency level N, N asyncio clients share a fixed number of requests (``--requests``; each client takes
the next request from a shared counter until none are left). Every request is a streamed chat completion
(``stream: true``, ``stream_options: {include_usage: true}``), so the time to the first token (TTFT) is measured as
well as the full latency. Request ``i`` is sent with ``temperature`` 0.8 and ``seed = --seed + i`` at every level:
the tiny model often stops early at EOS, so the levels get the *same* set of requests (the engine's per-request
generator makes a request's draws independent of its batch-mates) and tokens/s is computed from the completion tokens
actually generated (``usage.completion_tokens``; the count of streamed content chunks when no usage arrives).
``--ignore-eos`` sends vLLM's ``ignore_eos`` extension (gpuplan, vLLM and Ray Serve LLM take it): every answer is
then exactly ``--max-tokens`` long.

Per level: requests ok / shed (429 or 503: the server's back-pressure) / other errors / lost, completion tokens,
wall time, aggregate tokens/s and requests/s, latency and TTFT p50/p95, the 1-minute load average. Any 5xx other
than 503, an error sent in-band in the stream, a stream that ends without ``data: [DONE]``, a dropped connection or
a request that never came back is printed loudly and makes the exit status 1.

The batching ratio compares aggregate tokens/s at the highest level with >= 8 clients against 1 client
("batched vs one-at-a-time"); the project's target is >= 3x at 8 clients (PASS/FAIL printed, not in the exit status).

With ``--start`` the cold start is measured from the server process's start to the first 200 on GET /readyz and to
the first successful chat completion; the server is stopped at the end with one SIGTERM (serve.run then stops Ray
completely; we wait until no gcs_server/raylet is left). Its output goes to ``--server-log``.

Numbers depend on what else uses the CPUs; the load average is printed per level for that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common.machine import machine_line
from benchmarks.common.server import ray_daemons, start_gpuplan, stop_gpuplan
from benchmarks.common.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
TARGET_CLIENTS = 8
SHED = (429, 503)


# ---------------------------------------------------------------------------------------------------------------
# one request


@dataclass
class Result:
    index: int
    kind: str = "lost"  # ok | shed | error | lost
    status: int | None = None
    detail: str = ""
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens: int = 0
    tokens_from_usage: bool = False
    chunks: int = 0
    finish_reason: str | None = None


def request_body(a: argparse.Namespace, index: int) -> dict:
    return {
        "model": a.model,
        "messages": [{"role": "user", "content": a.prompt}],
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        **({"seed": a.seed + index} if a.seed is not None and a.seed >= 0 else {}),  # --seed -1: no seeds
        **({"ignore_eos": True} if getattr(a, "ignore_eos", False) else {}),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client: httpx.AsyncClient, a: argparse.Namespace, index: int) -> Result:
    r = Result(index)
    t0 = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=request_body(a, index)) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                r.latency_s = time.perf_counter() - t0
                r.kind = "shed" if resp.status_code in SHED else "error"
                r.detail = f"HTTP {resp.status_code}: {_error_message(body)}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    r.kind, r.detail = "error", f"unparsable SSE data: {data[:200]!r}"
                    continue
                if "error" in obj:  # in-band: the headers (200) were already sent
                    r.kind = "error"
                    r.detail = f"in-band stream error: {_error_message(json.dumps(obj))}"
                    continue
                for ch in obj.get("choices") or []:
                    delta = ch.get("delta") or {}
                    if delta.get("content"):
                        if r.ttft_s is None:
                            r.ttft_s = time.perf_counter() - t0
                        r.chunks += 1
                    if ch.get("finish_reason"):
                        r.finish_reason = ch["finish_reason"]
                usage = obj.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    r.tokens = int(usage["completion_tokens"])
                    r.tokens_from_usage = True
        r.latency_s = time.perf_counter() - t0
    except httpx.HTTPError as exc:
        r.latency_s = time.perf_counter() - t0
        r.kind, r.detail = "lost", f"{type(exc).__name__}: {exc}"
        return r
    if r.kind == "error":
        return r
    if not done:
        r.kind, r.detail = "lost", "stream ended without data: [DONE]"
        return r
    if not r.tokens_from_usage:
        r.tokens = r.chunks
    r.kind = "ok"
    return r


def _error_message(body: str) -> str:
    try:
        obj = json.loads(body)
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return f"{err.get('type') or ''} {err.get('code') or ''}: {err.get('message') or ''}".strip()
        return str(err)[:300]
    except ValueError:
        return body[:300]


# ---------------------------------------------------------------------------------------------------------------
# one concurrency level


@dataclass
class Level:
    clients: int
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0
    loadavg: float = 0.0

    def of(self, kind: str) -> list[Result]:
        return [r for r in self.results if r.kind == kind]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.of("ok"))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def run_level(a: argparse.Namespace, clients: int) -> Level:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    timeout = httpx.Timeout(a.timeout, connect=30.0)
    counter = iter(range(a.requests))
    lvl = Level(clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in counter:  # shared: each client takes the next request index until none are left
            lvl.results.append(await one_request(client, a, i))

    async with httpx.AsyncClient(base_url=a.url, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(client_loop(client) for _ in range(clients)), return_exceptions=True)
        lvl.wall_s = time.perf_counter() - t0
    for exc in outcomes:
        if isinstance(exc, BaseException):
            print(f"!! client task crashed: {type(exc).__name__}: {exc}", file=sys.stderr)
    seen = {r.index for r in lvl.results}
    for i in range(a.requests):  # a request that never produced a Result (a crashed client task) is lost too
        if i not in seen:
            lvl.results.append(Result(i, "lost", detail="no result (client task crashed)"))
    lvl.loadavg = os.getloadavg()[0]
    return lvl


# ---------------------------------------------------------------------------------------------------------------
# server: start / readiness / plan / stop


def get(url: str, path: str, timeout: float = 5.0) -> httpx.Response | None:
    try:
        return httpx.get(url + path, timeout=timeout)
    except httpx.HTTPError:
        return None


def first_chat(a: argparse.Namespace) -> tuple[bool, str]:
    body = {"model": a.model, "messages": [{"role": "user", "content": a.prompt}], "max_tokens": 8,
            "temperature": 0.0}
    try:
        r = httpx.post(a.url + "/v1/chat/completions", json=body, timeout=a.timeout)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    if r.status_code == 200 and r.json().get("choices"):
        return True, ""
    return False, f"HTTP {r.status_code}: {_error_message(r.text)}"


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, float | None, float | None]:
    if get(a.url, "/healthz", timeout=2) is not None:
        sys.exit(f"serve_load: something already answers at {a.url}; stop it or drop --start")
    if ray_daemons():
        print("serve_load: WARNING: a Ray cluster is already running here; serve.run will connect to it, so this is "
              "not a cold start of a fresh cluster", file=sys.stderr)
    print(f"serve_load: starting `{Path(sys.executable).name} -m serve.run {a.config}` (log: {a.server_log})",
          flush=True)
    t0 = time.perf_counter()
    proc = start_gpuplan(a.config, a.server_log)
    ready_s = chat_s = None
    last = ""
    try:
        while time.perf_counter() - t0 < a.ready_timeout:
            if proc.poll() is not None:
                print(f"!! server exited with {proc.returncode} before it was ready; see {a.server_log}",
                      file=sys.stderr)
                return proc, ready_s, chat_s
            if ready_s is None:
                r = get(a.url, "/readyz", timeout=2)
                if r is not None and r.status_code == 200:
                    ready_s = time.perf_counter() - t0
            if ready_s is not None:
                ok, last = first_chat(a)
                if ok:
                    chat_s = time.perf_counter() - t0
                    break
            time.sleep(0.25)
        else:
            print(f"!! server not ready after {a.ready_timeout:.0f} s ({last or 'no /readyz 200'}); see "
                  f"{a.server_log}", file=sys.stderr)
    except KeyboardInterrupt:
        stop_server(proc)
        raise
    return proc, ready_s, chat_s


def stop_server(proc: subprocess.Popen) -> tuple[float, int | None, list]:
    return stop_gpuplan(proc)


def server_ready_line(path: str) -> str | None:
    try:
        for line in Path(path).read_text(errors="replace").splitlines():
            if line.startswith("gpuplan: ready in"):
                return line.strip()
    except OSError:
        pass
    return None


def describe_plan(a: argparse.Namespace) -> list[str]:
    r = get(a.url, "/plan", timeout=10)
    if r is None or r.status_code != 200:
        return [f"server /plan: unavailable ({'no answer' if r is None else f'HTTP {r.status_code}'})"]
    plan = r.json()
    out = []
    m = next((m for m in plan.get("models") or [] if m.get("name") == a.model), None)
    if m is None:
        out.append(f"server /plan: model {a.model!r} not in the plan "
                   f"(models: {', '.join(x.get('name', '?') for x in plan.get('models') or [])})")
    else:
        out.append(f"server /plan: {a.model}: quantization **{m.get('quantization')}** (option rank "
                   f"{m.get('option_rank')}; {m.get('why_quantization') or '-'}), replicas placed "
                   f"{m.get('placed_replicas')} (gpu {m.get('gpu_replicas')}, offload {m.get('offload_replicas')}, "
                   f"cpu {m.get('cpu_replicas')}), min {m.get('min_replicas')} / max {m.get('max_replicas')}")
    running = running_replicas(a)
    if running is not None:
        out.append(f"  running replicas now (GET /readyz): {running}")
    reps = [x for x in plan.get("replicas") or [] if x.get("model") == a.model]
    for x in reps:
        st = x.get("stats") or {}
        out.append(f"  replica {str(x.get('replica_id'))[:12]}: {x.get('quantization')}, "
                   f"num_gpus {x.get('num_gpus')}, decision {(x.get('load_decision') or {}).get('mode', '-')}, "
                   f"max_num_seqs {st.get('max_num_seqs', '?')}, continuous batching "
                   f"{st.get('continuous_batching', '?')}")
    return out


def running_replicas(a: argparse.Namespace) -> int | None:
    r = get(a.url, "/readyz", timeout=10)
    try:
        return int(r.json()["detail"][a.model]["running_replicas"])
    except Exception:
        return None


def replica_stats(a: argparse.Namespace, expect_completed: int, wait_s: float = 15.0) -> list[str]:
    """Per-replica engine counters from /plan, after waiting (up to wait_s) for them to count our requests."""
    deadline = time.perf_counter() + wait_s
    while True:
        r = get(a.url, "/plan", timeout=10)
        if r is None or r.status_code != 200:
            return []
        reps = [x for x in r.json().get("replicas") or [] if x.get("model") == a.model]
        done = sum(int((x.get("stats") or {}).get("completed") or 0) for x in reps)
        if done >= expect_completed or time.perf_counter() > deadline:
            break
        time.sleep(1.0)
    out = []
    for x in reps:
        st = x.get("stats") or {}
        out.append(f"  replica {str(x.get('replica_id'))[:12]}: completed {st.get('completed')}, generated tokens "
                   f"{st.get('generated_tokens')}, decode steps {st.get('decode_steps')}, joins {st.get('joins')}, "
                   f"max running seen {st.get('max_running_seen')}, errors {st.get('errors')}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# report


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def table(levels: list[Level], base: Level | None) -> str:
    head = ("| clients | ok | shed | errors | lost | completion tokens | mean tok/req | wall s | tok/s | req/s "
            "| vs 1 client | latency p50 ms | latency p95 ms | TTFT p50 ms | TTFT p95 ms | load avg 1m |")
    rows = [head, "|" + "---:|" * (head.count("|") - 1)]
    for lv in levels:
        ok = lv.of("ok")
        lat = [r.latency_s for r in ok if r.latency_s is not None]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        ratio = (f"{lv.tokens_per_s / base.tokens_per_s:.2f}x" if base is not None and base.tokens_per_s > 0
                 else "-")
        rows.append(
            f"| {lv.clients} | {len(ok)} | {len(lv.of('shed'))} | {len(lv.of('error'))} | {len(lv.of('lost'))} "
            f"| {lv.tokens} | {lv.tokens / len(ok) if ok else 0:.1f} | {lv.wall_s:.2f} | {lv.tokens_per_s:.1f} "
            f"| {len(ok) / lv.wall_s if lv.wall_s else 0:.2f} | {ratio} | {ms(percentile(lat, 50))} | {ms(percentile(lat, 95))} "
            f"| {ms(percentile(ttft, 50))} | {ms(percentile(ttft, 95))} | {lv.loadavg:.2f} |")
    return "\n".join(rows)


def loud_problems(levels: list[Level]) -> list[str]:
    out = []
    for lv in levels:
        for r in sorted(lv.results, key=lambda r: r.index):
            bad_5xx = r.status is not None and r.status >= 500 and r.status != 503
            if r.kind in ("lost", "error") or bad_5xx:
                out.append(f"{lv.clients} clients, request {r.index}: {r.kind.upper()}: {r.detail}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="tiny-int4")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16], help="concurrency levels (default 1 8 16)")
    ap.add_argument("--requests", type=int, default=32, help="total requests per level, shared by its clients")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="send ignore_eos (vLLM's extension): every answer is exactly --max-tokens long")
    ap.add_argument("--prompt", default="Tell me a short story about a robot who learns to paint.")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1234, help="request i is sent with seed SEED+i at every level")
    ap.add_argument("--warmup", type=int, default=2, help="sequential requests before the levels, not counted")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    ap.add_argument("--start", action="store_true",
                    help="start `python -m serve.run CONFIG` here, measure its cold start, SIGTERM it at the end")
    ap.add_argument("--config", default="deploy.yaml", help="with --start: the deploy file (default deploy.yaml)")
    ap.add_argument("--server-log", default=os.path.join(tempfile.gettempdir(), "serve_load_server.log"))
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    a = ap.parse_args(argv)
    if a.requests < 1 or any(c < 1 for c in a.clients):
        ap.error("--requests and every --clients value must be >= 1")
    a.url = a.url.rstrip("/")
    clients = sorted(set(a.clients))

    sys.stdout.reconfigure(line_buffering=True)  # progress in a log file as it happens
    print("# serve_load\n")
    print(machine_line(load_avg=" ".join(f"{x:.2f}" for x in os.getloadavg())))
    print(f"workload: model {a.model}, {a.requests} streamed chat completions per level, max_tokens {a.max_tokens}, "
          f"temperature {a.temperature}, seeds {a.seed}..{a.seed + a.requests - 1}, prompt {a.prompt!r}")

    proc = None
    status = 0
    try:
        if a.start:
            proc, ready_s, chat_s = start_server(a)
            print("\n## cold start\n")
            print("| measured from server process start | seconds |\n|---|---:|")
            print(f"| first 200 on GET /readyz | {'-' if ready_s is None else f'{ready_s:.1f}'} |")
            print(f"| first successful chat completion | {'-' if chat_s is None else f'{chat_s:.1f}'} |")
            line = server_ready_line(a.server_log)
            if line:
                print(f"\nserve.run says: {line}")
            if chat_s is None:
                print(f"\n!! no successful chat completion; server log: {a.server_log}")
                return 1
        else:
            r = get(a.url, "/readyz")
            if r is None or r.status_code != 200:
                print(f"\n!! {a.url}/readyz: {'no answer' if r is None else f'HTTP {r.status_code}'}; start the "
                      "server (`make run`) or pass --start", file=sys.stderr)
                return 1
        print()
        for line in describe_plan(a):
            print(line)

        warm_ok = 0
        for i in range(a.warmup):
            res = asyncio.run(_warm(a, i))
            warm_ok += res.kind == "ok"
            if res.kind != "ok":
                print(f"!! warm-up request {i}: {res.kind}: {res.detail}", file=sys.stderr)

        levels = []
        for n in clients:
            print(f"... {n} client(s)", file=sys.stderr, flush=True)
            levels.append(asyncio.run(run_level(a, n)))
        base = next((lv for lv in levels if lv.clients == 1), None)

        print("\n## load\n")
        print(table(levels, base))
        print("\ntok/s = completion tokens of the ok requests / wall time of the level; latency = request sent to "
              "`data: [DONE]`; TTFT = request sent to the first content delta.")
        tok = {lv.clients: lv.tokens for lv in levels}
        if len(set(tok.values())) > 1:
            print(f"note: completion tokens differ between levels ({tok}): sampling is seeded per request, so "
                  "batching numerics (padding) or failed requests changed some completions.")

        print("\n## batching\n")
        hi = max((lv for lv in levels if lv.clients >= TARGET_CLIENTS), key=lambda lv: lv.clients, default=None)
        at_target = next((lv for lv in levels if lv.clients == TARGET_CLIENTS), hi)
        if base is None or base.tokens_per_s <= 0 or hi is None:
            print(f"batched vs one-at-a-time: n/a (needs a 1-client level and a level with >= {TARGET_CLIENTS} "
                  "clients)")
        else:
            print(f"batched vs one-at-a-time: {hi.tokens_per_s:.1f} tok/s at {hi.clients} clients / "
                  f"{base.tokens_per_s:.1f} tok/s at 1 client = **{hi.tokens_per_s / base.tokens_per_s:.2f}x**")
            ratio = at_target.tokens_per_s / base.tokens_per_s
            verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
            print(f"target >= {TARGET_RATIO:.0f}x at {TARGET_CLIENTS} clients: {at_target.clients} clients = "
                  f"{ratio:.2f}x -> **{verdict}**")
        stats = replica_stats(a, sum(len(lv.of("ok")) for lv in levels) + warm_ok)
        if stats:
            running = running_replicas(a)
            print(f"\nreplica counters (cumulative since start, warm-up included; each replica reports them to /plan "
                  f"at its health check, about every 10 s, so they may lag); running replicas now: "
                  f"{'?' if running is None else running}")
            print("\n".join(stats))

        problems = loud_problems(levels)
        shed = sum(len(lv.of("shed")) for lv in levels)
        if shed:
            print(f"\nshed (429/503, back-pressure): {shed} request(s); tokens/s counts only the ok ones")
        if problems:
            status = 1
            print(f"\n!! {len(problems)} FAILED REQUEST(S) (5xx other than 503, in-band errors, lost streams):")
            for p in problems[:50]:
                print(f"!!   {p}")
            if len(problems) > 50:
                print(f"!!   ... and {len(problems) - 50} more")
    finally:
        if proc is not None:
            took, rc, left = stop_server(proc)
            print(f"\nserver stopped with one SIGTERM in {took:.1f} s (serve.run exit {rc})"
                  + (f"; !! Ray processes still running: {left}" if left else "; no Ray process left"))
    return status


async def _warm(a: argparse.Namespace, i: int) -> Result:
    async with httpx.AsyncClient(base_url=a.url, timeout=httpx.Timeout(a.timeout, connect=30.0)) as client:
        return await one_request(client, a, -1 - i)


if __name__ == "__main__":
    sys.exit(main())
