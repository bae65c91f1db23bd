"""Soak: minutes of mixed traffic at a fixed rate, with a replica killed every K seconds. Is anything lost?

    .venv/bin/python -m benchmarks.soak --start                 # start benchmarks/soak.yaml with serve.run.main, 10 min
    .venv/bin/python -m benchmarks.soak --minutes 2 --kill-every 30 --url http://127.0.0.1:8000   # a running server

Traffic (seeded): ``--rate`` requests per second, each drawn at random: one of the served models, chat or plain
completions, streamed or not, 10% clients that hang up after the first chunk, 5% bad requests (``max_tokens: -1``,
which must get a 400). Every ``--kill-every`` seconds a live replica (pid from GET /plan) of a model with at least
two live replicas gets SIGKILL.

Outcomes: *ok* (200 and a whole answer: JSON with choices, or a stream that ends with a finish reason and
``[DONE]``), *typed* (the answer the API promises for the case: 400 for a bad request, 429/503 with Retry-After, a
stream that ends with an error event and ``[DONE]``, a hang-up by the client), *lost* (no answer, a broken one: a
connection error, a timeout, a stream without ``[DONE]``, a 200 without choices) and *other 5xx* (a 5xx that is not
503). Latency p50/p95 is over the ok requests. Recovery after a kill: seconds until every model runs all its
replicas again (GET /readyz detail). Memory: the resident set of every Ray and replica process at the start and the
end, by role (replicas are replaced by the kills, so per role, not per process).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common.machine import machine_line  # noqa: E402
from benchmarks.common.server import start_gpuplan  # noqa: E402
from benchmarks.common.stats import percentile  # noqa: E402
from serve.api.sse import iter_data  # noqa: E402


def ray_roles() -> dict[str, int]:
    """Resident bytes of the Ray processes of this machine by role (raylet, gcs_server, ServeReplica:<app>:<dep>,
    ServeController, proxy, ...)."""
    import psutil

    out: dict[str, int] = defaultdict(int)
    for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            rss = p.info["memory_info"].rss
        except (psutil.Error, TypeError, AttributeError):
            continue
        name = p.info["name"] or ""
        if name.startswith("ray::") or cmd.startswith("ray::"):
            # the command line (set by setproctitle) first: the process name is cut at 15 characters
            role = (cmd.split()[0] if cmd.startswith("ray::") else name).removeprefix("ray::")
            role = role.split("#")[0] if role.startswith("ServeReplica") else role.split(".")[0]
        elif any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                                    "runtime_env/agent", "dashboard_agent")):
            role = next(k for k in ("raylet", "gcs_server", "dashboard_agent", "dashboard", "log_monitor",
                                    "monitor.py", "runtime_env/agent") if k in cmd)
        else:
            continue
        out[role] += rss
    return dict(out)


def plan(url: str) -> dict:
    return requests.get(f"{url}/plan", timeout=30).json()


def full(url: str) -> tuple[bool, dict]:
    try:
        r = requests.get(f"{url}/readyz", timeout=10)
        detail = r.json().get("detail", {})
    except Exception:
        return False, {}
    counts = {m: d.get("running_replicas", 0) for m, d in detail.items() if isinstance(d, dict)
              and "running_replicas" in d}
    return r.status_code == 200, counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.kinds: Counter = Counter()
        self.detail: Counter = Counter()
        self.latency: list[float] = []
        self.examples: dict[str, str] = {}

    def add(self, kind: str, what: str, latency: float | None = None, example: str = "") -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.detail[f"{kind}: {what}"] += 1
            if latency is not None and kind == "ok":
                self.latency.append(latency)
            if kind in ("lost", "other_5xx") and what not in self.examples:
                self.examples[what] = example[:300]


def one_request(url: str, rng: random.Random, models: list[str], tally: Tally, timeout: float) -> None:
    model = rng.choice(models)
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    hang_up = stream and rng.random() < 0.1
    bad = rng.random() < 0.05
    body: dict = {"model": model, "max_tokens": rng.randint(8, 64), "temperature": 0.8, "seed": rng.randint(0, 9999)}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(["Tell me a story", "What does os.path do?",
                                                                    "Write a haiku about GPUs"])}]
    else:
        body["prompt"] = rng.choice(["def ", "import ", "The quick brown fox"])
    if stream:
        body["stream"] = True
    if bad:
        body["max_tokens"] = -1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.time()
    try:
        with requests.post(url + path, json=body, stream=stream, timeout=timeout) as r:
            if bad:
                return tally.add("typed" if r.status_code == 400 else "lost", f"bad request -> {r.status_code}",
                                 example=r.text)
            if r.status_code in (429, 503):
                ok = bool(r.headers.get("retry-after"))
                return tally.add("typed" if ok else "lost", f"{r.status_code}", example=r.text)
            if r.status_code >= 500:
                return tally.add("other_5xx", f"{r.status_code}", example=r.text)
            if r.status_code != 200:
                return tally.add("lost", f"{r.status_code}", example=r.text)
            if not stream:
                ch = r.json().get("choices")
                return tally.add("ok" if ch else "lost", "json" if ch else "200 without choices",
                                 time.time() - t0, r.text)
            finished = errored = done = False
            for payload in iter_data(r.iter_lines(decode_unicode=True)):
                if payload == "[DONE]":
                    done = True
                    break
                ev = json.loads(payload)
                if hang_up:
                    return tally.add("typed", "client hung up")
                if "error" in ev:
                    errored = ev["error"].get("code") or "error"
                elif ev.get("choices") and ev["choices"][0].get("finish_reason"):
                    finished = True
            if done and finished:
                return tally.add("ok", "stream", time.time() - t0)
            if done and errored:
                return tally.add("typed", f"stream error event {errored}")
            return tally.add("lost", "stream without [DONE]" if not done else "stream without a finish",
                             example=str(errored))
    except requests.RequestException as exc:
        return tally.add("lost", type(exc).__name__, example=str(exc))


def killer(url: str, every: float, stop: threading.Event, rng: random.Random, kills: list, expect: dict) -> None:
    """Every ``every`` s, SIGKILL a live replica; record the kill and the seconds until all replicas run again."""
    while not stop.wait(every):
        try:
            reps = [r for r in plan(url)["replicas"] if r.get("state") == "running" and alive(r["pid"])]
        except Exception:
            continue
        per = Counter(r["model"] for r in reps)
        reps = [r for r in reps if per[r["model"]] >= 2]  # a replica with a live sibling
        if not reps:
            continue
        victim = rng.choice(reps)
        t0 = time.time()
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            continue
        rec = {"model": victim["model"], "replica": victim["replica_id"], "at": t0, "recovered_s": None,
               "live_before": dict(per)}
        kills.append(rec)
        time.sleep(2)  # Serve sees the death at its next health check
        while time.time() - t0 < every * 3:  # a kill near the end is still watched until it recovers
            ready, counts = full(url)
            live = Counter(r["model"] for r in plan(url)["replicas"] if r.get("state") == "running"
                           and alive(r["pid"]))
            if ready and all(counts.get(m, 0) >= n and live[m] >= n for m, n in expect.items()):
                rec["recovered_s"] = round(time.time() - t0, 1)
                break
            time.sleep(0.5)


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: --start's, else http://127.0.0.1:8000)")
    ap.add_argument("--start", action="store_true", help="start --config with python -m serve.run and stop it")
    ap.add_argument("--config", default=str(ROOT / "benchmarks" / "soak.yaml"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second")
    ap.add_argument("--kill-every", type=float, default=60.0, help="seconds between replica kills (0: none)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the results to this file (tests read it)")
    a = ap.parse_args(argv)
    proc = None
    url = a.url
    if a.start:
        import yaml

        cfg = yaml.safe_load(open(a.config))
        from serve.run.main import api_address

        url = url or "http://127.0.0.1:{}".format(api_address(cfg)[1])
        log = open(os.path.join(tempfile.gettempdir(), "soak_server.log"), "w")
        proc = start_gpuplan(a.config, log.name)
        deadline = time.time() + 600
        while not full(url)[0]:
            if proc.poll() is not None or time.time() > deadline:
                print("server did not become ready; see", log.name)
                return 1
            time.sleep(1)
    url = url or "http://127.0.0.1:8000"
    models = [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    expect = full(url)[1]
    # warm-up, not counted: every model on both endpoints, streamed and not (the ingress loads each tokenizer, and
    # transformers with it, on a model's first request; replicas allocate on their first generations)
    warm = Tally()
    for i in range(24):
        one_request(url, random.Random(1000 + i), models, warm, a.timeout)
    time.sleep(5)
    mem0 = ray_roles()
    rng = random.Random(a.seed)
    tally, kills, stop = Tally(), [], threading.Event()
    kt = threading.Thread(target=killer, args=(url, a.kill_every, stop, random.Random(a.seed + 1), kills, expect),
                          daemon=True) if a.kill_every > 0 else None
    if kt:
        kt.start()
    t_start, sent = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        futs = []
        while time.time() - t_start < a.minutes * 60:
            futs.append(ex.submit(one_request, url, random.Random(rng.random()), models, tally, a.timeout))
            sent += 1
            next_at = t_start + sent / a.rate
            time.sleep(max(0.0, next_at - time.time()))
        stop.set()
        for f in futs:
            f.result()
    if kt:
        kt.join(timeout=a.kill_every * 3)
    time.sleep(5)
    mem1 = ray_roles()
    elapsed = time.time() - t_start
    k = tally.kinds
    print(machine_line())
    print(f"soak: {elapsed / 60:.1f} min at {a.rate:g} req/s against {url} ({', '.join(models)}), a replica killed "
          f"every {a.kill_every:g} s\n")
    print("| sent | answered | ok | typed errors | lost | other 5xx | latency p50 / p95 | kills | recovery max |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rec = [x["recovered_s"] for x in kills if x["recovered_s"] is not None]
    p50, p95 = percentile(tally.latency, 50), percentile(tally.latency, 95)
    print(f"| {sent} | {k['ok'] + k['typed']} | {k['ok']} | {k['typed']} | {k['lost']} | {k['other_5xx']} | "
          f"{fmt_ms(p50)} / {fmt_ms(p95)} ms | {len(kills)} | "
          f"{max(rec) if rec else '-'} s{'' if len(rec) == len(kills) else f' ({len(kills) - len(rec)} not recovered)'} |")
    print("\noutcomes:")
    for what, n in sorted(tally.detail.items()):
        print(f"  {what}: {n}")
    for what, ex in tally.examples.items():
        print(f"  example of {what}: {ex}")
    print("\nrecovery after each kill (s):", ", ".join(f"{x['model']} {x['recovered_s']}" for x in kills) or "-")
    print("live replicas before each kill:", ", ".join(str(x["live_before"]) for x in kills) or "-")
    print("\nresident memory by role, start -> end:")
    total0, total1 = sum(mem0.values()), sum(mem1.values())
    for role in sorted(set(mem0) | set(mem1)):
        print(f"  {role:<40} {mem0.get(role, 0) / 2**20:8.0f} MiB -> {mem1.get(role, 0) / 2**20:8.0f} MiB")
    growth = (total1 - total0) / total0 * 100 if total0 else 0.0
    print(f"  {'all':<40} {total0 / 2**20:8.0f} MiB -> {total1 / 2**20:8.0f} MiB ({growth:+.1f}%)")
    ok = k["lost"] == 0 and k["other_5xx"] == 0 and (not kills or (rec and len(rec) == len(kills) and max(rec) < 15)) \
        and growth < 10
    print("\ntargets: lost 0, other 5xx 0, recovery < 15 s, memory growth < 10% ->", "MET" if ok else "NOT MET")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"sent": sent, "kinds": dict(k), "detail": dict(tally.detail), "examples": tally.examples,
                       "p50_s": p50, "p95_s": p95, "kills": kills, "memory_start": mem0, "memory_end": mem1,
                       "memory_growth_pct": growth, "targets_met": bool(ok)}, f, indent=1)
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
