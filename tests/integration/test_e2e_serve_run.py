"""End to end, as a user runs it: `python -m serve.run deploy.yaml` (what `make run` runs) in a subprocess, the
official openai client against it, bad requests, 16 concurrent clients, and a clean stop on one SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from serve.api.front import pick_port
import requests
import yaml
from ray_helpers import need_no_ray, wait_ready

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



def ray_running() -> bool:
    out = subprocess.run(["pgrep", "-f", "gcs_server|raylet"], capture_output=True, text=True).stdout
    return bool(out.strip())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_no_ray("the end-to-end test")
    cfg = yaml.safe_load(open(os.path.join(ROOT, "deploy.yaml")))
    port, proxy_port = pick_port(), pick_port()  # the front binds late: a port outside the ephemeral range
    cfg["http_options"]["port"] = proxy_port  # Ray Serve's proxy
    cfg["applications"][0]["args"]["http"]["port"] = port  # gpuplan's own front (serve/api/front.py)
    for m in cfg["applications"][0]["args"]["models"]:
        m["source"] = os.path.normpath(os.path.join(ROOT, m["source"]))  # relative to deploy.yaml
    path = tmp_path_factory.mktemp("e2e") / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(path.parent / "serve.log", "w")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("GPUPLAN_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "serve.run", str(path)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    if not wait_ready(base, 300, gave_up=lambda: proc.poll() is not None):
        log.flush()
        proc.kill()
        pytest.fail("serve run did not become ready:\n" + open(path.parent / "serve.log").read()[-4000:])
    yield {"base": base, "proxy": f"http://127.0.0.1:{proxy_port}", "proc": proc, "log": path.parent / "serve.log"}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)


def test_openai_client_chat_stream_and_completion(server):
    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused")
    assert {m.id for m in client.models.list().data} == {"tiny-int8", "tiny-int4", "tiny-gguf"}
    r = client.chat.completions.create(model="tiny-int4", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What does json.dumps do?"}])
    assert r.choices[0].message.content and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-int8", max_tokens=16, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What does os.getcwd do?"}]) if c.choices]
    assert len(pieces) >= 2 and "".join(pieces)
    c = client.completions.create(model="tiny-int4", prompt="import os\n", max_tokens=12, temperature=0.7, seed=3)
    assert c.choices[0].text is not None and c.usage.completion_tokens >= 1
    # the GGUF model runs on llama.cpp, behind the same API
    g = client.chat.completions.create(model="tiny-gguf", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "What does os.getcwd do?"}])
    assert g.choices[0].message.content and g.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-gguf", max_tokens=16, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What does os.getcwd do?"}]) if c.choices]
    assert "".join(pieces) == g.choices[0].message.content  # streamed = not streamed, greedy
    plan = requests.get(server["base"] + "/plan").json()
    gg = [r for r in plan["replicas"] if r["model"] == "tiny-gguf"]
    assert gg and all(r["engine"] == "llamacpp" for r in gg), gg


def test_ray_serve_proxy_serves_the_same_api(server):
    """The front (args.http.port) and Ray Serve's proxy (http_options.port) are two doors to one ingress: the same
    models, the same greedy answer, streamed and not."""
    body = {"model": "tiny-gguf", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What does os.path.join do?"}]}
    answers = []
    for base in (server["base"], server["proxy"]):
        assert {m["id"] for m in requests.get(base + "/v1/models").json()["data"]} == {"tiny-int8", "tiny-int4",
                                                                                       "tiny-gguf"}
        r = requests.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
        with requests.post(base + "/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=60) as s:
            events = [ln for ln in s.iter_lines() if ln.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        answers.append("".join((json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                               for e in events[:-1]))
    assert answers[0] and len(set(answers)) == 1, answers


def test_bad_requests_get_openai_errors(server):
    base = server["base"]
    bad_json = requests.post(f"{base}/v1/chat/completions", data="{nope", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    unknown = requests.post(f"{base}/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and "tiny-int4" in unknown.json()["error"]["message"]
    too_long = requests.post(f"{base}/v1/completions", json={"model": "tiny-int4", "prompt": "x", "max_tokens": 5000})
    assert too_long.status_code == 400 and "256" in too_long.json()["error"]["message"]
    form = requests.post(f"{base}/v1/completions", data="prompt=x", headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "error" in form.json()
    assert requests.get(f"{base}/healthz").status_code == 200
    plan = requests.get(f"{base}/plan").json()
    assert plan["feasible"] and {m["name"] for m in plan["models"]} == {"tiny-int8", "tiny-int4", "tiny-gguf"}


def test_16_concurrent_clients_none_lost(server):
    def one(i):
        r = requests.post(server["base"] + "/v1/chat/completions", timeout=180, json={
            "model": ("tiny-int8", "tiny-int4", "tiny-gguf")[i % 3], "max_tokens": 24, "temperature": 0.8, "seed": i,
            "messages": [{"role": "user", "content": f"What does module {i} do?"}]})
        return r.status_code, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(one, range(16)))
    assert len(results) == 16
    for code, retry_after, body in results:
        assert code in (200, 429, 503), (code, body)
        if code != 200:
            assert retry_after and "error" in body
        else:
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert sum(code == 200 for code, _, _ in results) >= 8
    # they went over the direct stream (serve/app/direct.py), not Serve's router: each replica counts what it served
    # (replicas report at their health checks: wait for one)
    deadline = time.time() + 40
    while True:
        replicas = requests.get(server["base"] + "/plan", timeout=30).json()["replicas"]
        served = sum(r["direct_served"] for r in replicas)
        if served >= sum(code == 200 for code, _, _ in results) or time.time() > deadline:
            break
        time.sleep(2)
    assert all(r["direct"] for r in replicas), replicas
    assert served >= sum(code == 200 for code, _, _ in results), replicas


def test_vllm_probes_and_metrics(server):
    """What tools built for vLLM's server probe (/health, /version) and what Prometheus scrapes (/metrics): the
    requests above in the histograms, every replica's report in the gauges, every engine's KV use."""
    base = server["base"]
    assert requests.get(base + "/health", timeout=10).status_code == 200
    assert requests.get(base + "/version", timeout=10).json()["version"]
    text = requests.get(base + "/metrics", timeout=30).text
    for model in ("tiny-int8", "tiny-int4", "tiny-gguf"):
        assert f'vllm:time_to_first_token_seconds_count{{model_name="{model}"}}' in text, model
        assert f'vllm:num_requests_running{{model_name="{model}",deployment="{model}@' in text, model
        assert f'vllm:kv_cache_usage_perc{{model_name="{model}"' in text, model
        assert f'gpuplan:planned_bytes{{model_name="{model}"' in text, model


def test_one_sigterm_drains_then_stops_everything(server):
    """A stream running when SIGTERM arrives completes; a request sent while draining gets 503 + Retry-After; then
    nothing of Ray is left."""
    import threading

    proc, base = server["proc"], server["base"]
    out: dict = {"lines": []}
    started = threading.Event()

    def stream():  # as long as the context allows, whatever the sampled tokens (EOS does not end it)
        with requests.post(base + "/v1/completions", timeout=120, stream=True, json={
                "model": "tiny-int8", "prompt": "def ", "max_tokens": 240, "ignore_eos": True, "temperature": 1.0,
                "seed": 3, "stream": True, "stream_options": {"include_usage": True}}) as r:
            out["status"] = r.status_code
            for ln in r.iter_lines():
                if ln:
                    out["lines"].append(ln.decode())
                    started.set()
        started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60), "the stream did not start"
    proc.send_signal(signal.SIGTERM)
    deadline, late = time.time() + 20, None
    while late is None and time.time() < deadline and t.is_alive():  # draining begins within a second or so
        try:
            r = requests.post(base + "/v1/completions", timeout=30, json={"model": "tiny-int8", "prompt": "x",
                                                                           "max_tokens": 2})
        except requests.RequestException:
            break  # the server is already gone: the stream must have finished (checked below)
        if r.status_code == 503:
            late = r
        time.sleep(0.2)
    t.join(timeout=120)
    assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]"
    events = [json.loads(ln.removeprefix("data: ")) for ln in out["lines"][:-1]]
    assert not any("error" in e for e in events), events[-3:]
    assert any(e["choices"] and e["choices"][0].get("finish_reason") == "length" for e in events)  # it finished
    assert events[-1]["usage"]["completion_tokens"] == 240
    assert late is not None and late.headers.get("retry-after") and late.json()["error"]["code"] == "model_unavailable"
    assert "draining" in late.json()["error"]["message"]
    proc.wait(timeout=90)
    deadline = time.time() + 30
    while ray_running() and time.time() < deadline:
        time.sleep(1)
    assert not ray_running(), "Ray processes survived one SIGTERM"
