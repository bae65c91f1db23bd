"""Servers side by side, one after another, same model, same requests, same load: the plain vLLM OpenAI server,
Ray Serve LLM (the same vLLM behind Ray Serve), gpuplan with the vLLM engine, gpuplan with the transformers engine.

    .venv/bin/python -m benchmarks.compare_servers                          # all four, 1 / 8 / 16 / 32 clients
    .venv/bin/python -m benchmarks.compare_servers --rounds 2 --seed -1 --ignore-eos   # what docs/benchmarks.md reports
    .venv/bin/python -m benchmarks.compare_servers --servers gpuplan-vllm vllm --clients 1 8 --requests 100

Each server is started alone on the machine (nothing else of ours runs), warmed up with a few requests, loaded
with the levels of benchmarks/serve_load.py (N clients share ``--requests`` streamed chat completions, request i
with seed SEED+i at every level unless ``--seed -1``), and stopped before the next one starts; ``--rounds N``
repeats the whole sequence N times, interleaved, every other round in reverse order (A B, B A, ...: a drift of the
machine's speed falls on both alike), and the table shows medians (this machine's run-to-run spread is large).
The model is the shipped tiny model in bf16, ``max_model_len`` 256, ``max_num_seqs`` 16 everywhere; plain vLLM
and Ray Serve LLM get the KV cache bytes and block size the plan gives gpuplan's vLLM replica. gpuplan is reached as
deploy.yaml serves it, through its own front (``--via proxy``: through Ray Serve's proxy only). Prints one table
(tokens/s, each round's, the ratios to plain vLLM and to Ray Serve LLM at the same level, latency and
time-to-first-token, requests lost: there should be none), then which targets each gpuplan server meets (issue 21's
with ``--ignore-eos``, issue 30's for answers ending at EOS), with each round's own ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.common.machine import machine_line  # noqa: E402
from benchmarks import serve_load  # noqa: E402
from benchmarks.common.server import ray_daemons, start_gpuplan, wait_ready  # noqa: E402
from benchmarks.common.stats import percentile  # noqa: E402
from serve.api.front import pick_port  # noqa: E402

MODEL = str(ROOT / "models" / "tiny-chat")
SERVED = "tiny"
MAX_MODEL_LEN, MAX_NUM_SEQS = 256, 16



def planned_vllm(device: str = "cpu") -> dict:
    """The settings gpuplan's plan gives a vLLM replica of the model (so plain vLLM gets the same)."""
    from planner.model.engines.vllm import vllm_settings
    from planner.model.engines import estimate_replica
    from planner.model.spec import load_spec

    est = estimate_replica(load_spec(MODEL), quant="bf16", max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
                           device=device, engine="vllm")
    kv = est.detail["kv_cache"]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return vllm_settings(planned_bytes=est.total, device_total_bytes=ram, kv_cache_bytes=est.kv_cache,
                         kv_tokens=kv["tokens"], block_size=kv["block_size"], max_model_len=MAX_MODEL_LEN,
                         max_num_seqs=MAX_NUM_SEQS, prefill_tokens=est.prefill_tokens, dtype="bf16",
                         quantization=None).to_json()


def gpuplan_config(engine: str, port: int, path: Path, via: str = "front", fronts: int = 2,
                   direct: bool = True) -> None:
    """deploy.yaml's shape: the API on ``port`` from gpuplan's own front (serve/api/front.py) and Ray Serve's proxy on
    another port, or (``via="proxy"``) only the proxy, on ``port``; ``direct``: args.http.direct."""
    front = via == "front"
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": pick_port() if front else port},
           "applications": [{"name": "llm", "route_prefix": "/", "import_path": "serve.app:build_app", "args": {
               "http": {**({"host": "127.0.0.1", "port": port, "replicas": fronts} if front else {}),
                        "direct": direct},
               "cluster": "auto", "models": [{
                   "name": SERVED, "source": MODEL, "quantization": "bf16", "engine": engine,
                   "max_model_len": MAX_MODEL_LEN, "max_num_seqs": MAX_NUM_SEQS,
                   "replicas": {"min": 1, "max": 1}, "max_ongoing_requests": 64, "max_queued_requests": -1}]}}]}
    path.write_text(yaml.safe_dump(cfg))


def start(kind: str, port: int, log: Path, via: str = "front", fronts: int = 2) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = open(log, "w")
    py = os.environ.get("GPUPLAN_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    s = planned_vllm()
    if kind == "rayserve-llm":
        cmd = [py, str(ROOT / "benchmarks" / "rayserve_llm_server.py"), "--model", MODEL, "--served-model-name",
               SERVED, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs",
               str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(s["max_num_batched_tokens"]),
               "--kv-cache-memory-bytes", str(s["kv_cache_memory_bytes"]), "--block-size", str(s["block_size"])]
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), \
            "/v1/models"
    if kind == "vllm":
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL, "--served-model-name", SERVED,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len",
               str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens",
               str(s["max_num_batched_tokens"]), "--kv-cache-memory-bytes", str(s["kv_cache_memory_bytes"]),
               "--block-size", str(s["block_size"]), "--enforce-eager", "--disable-log-stats"]
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), "/health"
    cfg = log.with_suffix(".yaml")
    # gpuplan-<engine>[-handle]: -handle sends every request through Serve's handle (args.http.direct false)
    gpuplan_config(kind.split("-")[1], port, cfg, via, fronts, direct=not kind.endswith("-handle"))
    out.close()
    return start_gpuplan(cfg, log), "/readyz"


def stop(proc: subprocess.Popen, kind: str) -> None:
    if proc.poll() is None:
        if kind in ("vllm", "rayserve-llm"):
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    deadline = time.time() + 60  # the next server must find no Ray of this one
    while ray_daemons() and time.time() < deadline:
        time.sleep(1)
    if ray_daemons() and kind == "rayserve-llm":
        subprocess.run([str(ROOT / ".venv" / "bin" / "ray"), "stop", "--force"], capture_output=True)
    time.sleep(3)


def _role(p) -> str:
    """A short name for a process of a server under test, from its title / command line."""
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except Exception:
        return "gone"
    for key, role in (("EngineCore", "vLLM engine core"), ("VLLM::Worker", "vLLM worker"),
                      ("ReplicaBook", "gpuplan registry"), ("DashboardAgent", "dashboard + agents"),
                      ("ProxyActor", "Ray Serve proxy"),
                      ("ServeController", "Ray Serve controller"), ("Ingress", "ingress replica"),
                      ("LLMRouter", "ingress replica"), ("OpenAi", "ingress replica"),
                      ("ServeReplica", "model replica"),
                      ("LLMServer", "model replica"), ("raylet", "raylet"), ("gcs_server", "GCS"),
                      ("dashboard", "dashboard + agents"), ("runtime_env", "dashboard + agents"),
                      ("log_monitor", "Ray monitors"), ("monitor.py", "Ray monitors"),
                      ("vllm.entrypoints", "vLLM API server"), ("serve.run", "gpuplan wrapper"),
                      ("serve.run.supervisor", "gpuplan wrapper"), ("serve run", "serve run CLI"),
                      ("rayserve_llm_server", "serve run CLI"), ("ray::IDLE", "idle Ray workers"),
                      ("default_worker", "Ray workers (other)"), ("compare_servers", "load generator")):
        if key in cmd:
            return role
    return "other: " + os.path.basename(cmd.split()[0])[:24]


def cpu_snapshot() -> dict:
    """pid -> (role, user + system CPU seconds) for every process on the machine (each server runs alone)."""
    import psutil

    snap = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            snap[p.pid] = (_role(p), t.user + t.system)
        except Exception:
            continue
    return snap


def cpu_by_role(before: dict, after: dict) -> dict:
    """CPU seconds spent between two snapshots, by role (processes born in between count from zero)."""
    out: dict[str, float] = {}
    for pid, (role, t) in after.items():
        t0 = before.get(pid, (role, 0.0))[1]
        out[role] = out.get(role, 0.0) + max(0.0, t - t0)
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0}


def run(kind: str, a, rnd: int = 0) -> dict:
    port = pick_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"compare_{kind}.log"
    proc, probe = start(kind, port, log, a.via, a.fronts)
    try:
        ready = wait_ready(url, probe, proc, a.ready_timeout)
        if ready is None:
            return {"server": kind, "round": rnd, "error": f"not ready; see {log}"}
        ns = argparse.Namespace(url=url, model=SERVED, requests=a.requests, max_tokens=a.max_tokens,
                                prompt=a.prompt, temperature=a.temperature, seed=a.seed, timeout=300.0,
                                ignore_eos=a.ignore_eos)
        warm = argparse.Namespace(**{**vars(ns), "requests": a.warmup})
        asyncio.run(serve_load.run_level(warm, 1))
        levels, cpu = [], []
        for c in a.clients:
            before = cpu_snapshot()
            levels.append(asyncio.run(serve_load.run_level(ns, c)))
            cpu.append(cpu_by_role(before, cpu_snapshot()))
        return {"server": kind, "round": rnd, "ready_s": round(ready, 1), "levels": levels, "cpu": cpu}
    finally:
        stop(proc, kind)


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (server, clients) over every round: median tokens/s, p50 latency and TTFT (medians of the
    rounds' p50s), and each round's tokens/s."""
    rows: dict[tuple, dict] = {}
    for r in runs:
        if "error" in r:
            rows.setdefault((r["server"], None), {"server": r["server"], "clients": None, "error": r["error"]})
            continue
        for lv, cpu in zip(r["levels"], r["cpu"]):
            ok = lv.of("ok")
            lat = [x.latency_s for x in ok if x.latency_s is not None]
            ttft = [x.ttft_s for x in ok if x.ttft_s is not None]
            row = rows.setdefault((r["server"], lv.clients), {
                "server": r["server"], "clients": lv.clients, "ok": 0, "lost": 0, "runs": [], "by_round": {},
                "p50": [], "p95": [], "ttft50": [], "cpu": []})
            row["ok"] += len(ok)
            row["tokens"] = row.get("tokens", 0) + sum(x.tokens for x in ok)
            row["lost"] += len(lv.of("lost")) + len(lv.of("error"))
            row["runs"].append(lv.tokens_per_s)
            row["by_round"][r.get("round", 0)] = lv.tokens_per_s
            row["p50"].append(percentile(lat, 50))
            row["p95"].append(percentile(lat, 95))
            row["ttft50"].append(percentile(ttft, 50))
            row["cpu"].append(cpu)
    out = []
    for row in rows.values():
        if row.get("error"):
            out.append(row)
            continue
        med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) \
            else None  # noqa: E731
        out.append({**row, "tokens_per_s": med(row["runs"]) if row["ok"] else 0.0, "latency_p50_s": med(row["p50"]),
                    "latency_p95_s": med(row["p95"]), "ttft_p50_s": med(row["ttft50"])})
    return out


# (peer, clients: None = every level, and_more: that level and every higher one, what, threshold)
TARGETS = (  # issue 21, every answer --max-tokens long
    ("rayserve-llm", None, False, "tok/s", 1.0), ("rayserve-llm", 1, False, "p50", 1.0),
    ("vllm", 1, False, "tok/s", 0.8), ("vllm", 8, True, "tok/s", 1.0), ("vllm", 1, False, "p50", 1.3))
# issue 30, answers ending at EOS (short: a request's fixed cost is paid every ~20 tokens): tok/s against plain vLLM
TARGETS_EOS = (("vllm", 1, False, "tok/s", 0.85), ("vllm", 8, False, "tok/s", 0.9), ("vllm", 16, False, "tok/s", 0.9))


def round_ratios(me: dict, them: dict) -> list[float]:
    """tok/s of ``me`` over ``them`` in each round both ran (the two runs of a round are neighbours in time)."""
    return [me["by_round"][k] / them["by_round"][k] for k in sorted(me["by_round"])
            if them["by_round"].get(k)]


def verdicts(rows: list[dict], server: str, targets=TARGETS) -> list[str]:
    """The targets of the serving path for one gpuplan server against the peers that ran: the ratio of the rounds'
    medians, and in how many rounds the pair's own ratio met it."""
    by = {(r["server"], r["clients"]): r for r in rows if not r.get("error")}
    levels = sorted({c for s, c in by if s == server})
    out = []
    for peer, at, and_more, what, thr in targets:
        lv = levels if at is None else [c for c in levels if c >= at] if and_more else [at]
        for c in lv:
            me, them = by.get((server, c)), by.get((peer, c))
            if not me or not them:
                continue
            if what == "tok/s":
                if not them["tokens_per_s"]:
                    out.append(f"{server} vs {peer} at {c} clients: {peer} answered nothing (no ratio)")
                    continue
                ratio = me["tokens_per_s"] / them["tokens_per_s"]
                ok = ratio >= thr
                each = round_ratios(me, them)
                out.append(f"{server} vs {peer} at {c} clients: tok/s {ratio:.2f}x (target >= {thr}x): "
                           f"{'met' if ok else 'NOT met'}; each round {', '.join(f'{x:.2f}' for x in each)} "
                           f"({sum(x >= thr for x in each)} of {len(each)} met)")
            elif me["latency_p50_s"] and them["latency_p50_s"]:
                ratio = me["latency_p50_s"] / them["latency_p50_s"]
                out.append(f"{server} vs {peer} at {c} client: p50 latency {ratio:.2f}x (target <= {thr}x): "
                           f"{'met' if ratio <= thr else 'NOT met'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", nargs="+", default=["vllm", "rayserve-llm", "gpuplan-vllm", "gpuplan-transformers"],
                    choices=["vllm", "rayserve-llm", "gpuplan-vllm", "gpuplan-transformers", "gpuplan-sim",
                             "gpuplan-vllm-handle", "gpuplan-sim-handle"],
                    help="gpuplan-sim: gpuplan with the simulated engine, which takes almost no CPU: what the "
                         "serving path itself costs per request; -handle: every request through Serve's handle "
                         "(args.http.direct false), as before the direct stream")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every server this many times, interleaved, every other round in reverse order (A B C, "
                         "C B A, A B C, ...: a drift of the machine's speed over the run falls on every server "
                         "alike); the table shows medians, the targets each round's ratio too")
    ap.add_argument("--via", choices=["front", "proxy"], default="front",
                    help="gpuplan's API from its own front (args.http.port, as deploy.yaml) or only Ray Serve's proxy")
    ap.add_argument("--fronts", type=int, default=2, help="gpuplan's args.http.replicas (fronts sharing the port)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="every answer is --max-tokens long")
    ap.add_argument("--prompt", default="Tell me a short story about a robot who learns to paint.")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1234, help="request i gets seed SEED+i; -1: no seeds")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    runs = [run(k, a, r) for r in range(a.rounds) for k in (a.servers if r % 2 == 0 else a.servers[::-1])]
    rows = summarize(runs)
    print(machine_line())
    print(f"model: {MODEL} bf16, max_model_len {MAX_MODEL_LEN}, max_num_seqs {MAX_NUM_SEQS}; {a.requests} streamed "
          f"chats per level, max_tokens {a.max_tokens}{' (ignore_eos)' if a.ignore_eos else ''}, "
          f"{'seeded' if a.seed >= 0 else 'no seeds'}; gpuplan via {a.via} ({a.fronts} front(s)); {a.rounds} round(s), "
          "medians\n")
    by = {(r["server"], r["clients"]): r for r in rows if not r.get("error")}

    def ratio(r: dict, peer: str) -> str:
        b = by.get((peer, r["clients"]))
        return f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b and b["tokens_per_s"] and r["ok"] else "-"

    print("| server | clients | ok | lost | tok/s | each round | vs plain vLLM | vs Ray Serve LLM "
          "| latency p50 / p95 ms | TTFT p50 ms | tokens per answer |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    bad = 0
    for r in rows:
        if r.get("error"):
            print(f"| {r['server']} | - | - | - | - | - | - | - | {r['error']} | - | - |")
            bad += 1
            continue
        bad += r["lost"]
        print(f"| {r['server']} | {r['clients']} | {r['ok']} | {r['lost']} | {r['tokens_per_s']:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in r['runs'])} | {ratio(r, 'vllm')} | {ratio(r, 'rayserve-llm')} | "
              f"{serve_load.ms(r['latency_p50_s'])} / {serve_load.ms(r['latency_p95_s'])} | "
              f"{serve_load.ms(r['ttft_p50_s'])} | {r['tokens'] / r['ok'] if r['ok'] else 0:.1f} |")
    for server in [s for s in a.servers if s.startswith("gpuplan")]:
        lines = verdicts(rows, server, TARGETS if a.ignore_eos else TARGETS_EOS)
        if lines:
            print(f"\ntargets ({'issue 21, forced answers' if a.ignore_eos else 'issue 30, answers ending at EOS'}), "
                  + server + ":\n" + "\n".join("- " + ln for ln in lines))
    print("\nCPU seconds per level by process (user + system, whole machine; the load generator is this process), "
          "first round:")
    for r in runs[:len(a.servers)]:  # the first round (in --servers order)
        for lv, cpu in zip(r.get("levels", []), r.get("cpu", [])):
            toks = sum(x.tokens for x in lv.of("ok"))
            total = sum(cpu.values())
            print(f"- {r['server']}, {lv.clients} clients: {total:.1f} s in {lv.wall_s:.1f} s wall"
                  + (f", {1000 * total / toks:.0f} ms per token" if toks else "") + ": "
                  + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v >= 0.05))
    print("\nready after start (s): " + ", ".join(f"{r['server']} {r.get('ready_s', '-')}" for r in runs))
    if a.json:
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "cpu"}
                                            | ({"cpu_s_by_role": r["cpu"][0]} if r.get("cpu") else {})
                                            for r in rows], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
