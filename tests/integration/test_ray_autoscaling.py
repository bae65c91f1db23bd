"""Autoscaling within the planned capacity: from min to more replicas under concurrent load, and back."""

from __future__ import annotations

import os
import threading
import time

import pytest
import requests

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models",
                    "tiny-chat")
ARGS = {
    "cluster": {"nodes": [{"name": "cpu-only", "cpu_memory": "6GiB", "gpus": []}]},
    "models": [{
        "name": "auto", "source": TINY, "quantization": "bf16", "engine": "transformers", "max_model_len": 256,
        "max_num_seqs": 1,
        "replicas": {"min": 1, "max": 3}, "max_ongoing_requests": 1, "max_queued_requests": -1,
        "autoscaling": {"target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                        "look_back_period_s": 2, "metrics_interval_s": 0.5},
    }],
}


def running(app: str, model: str) -> int:
    """RUNNING replicas of a model, over its deployments (one per node: "<model>@<node>")."""
    st = serve.status().applications.get(app)
    if not st:
        return 0
    return sum((d.replica_states or {}).get("RUNNING", 0) for name, d in st.deployments.items()
               if name.startswith(f"{model}@"))


def test_scales_up_under_load_and_back_down(ray_cluster):
    from serve.app.build import build_app

    serve.run(build_app(ARGS), name="scale", route_prefix="/scale", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/scale"
    deadline = time.time() + 240
    while running("scale", "auto") < 1 or requests.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.time() < deadline, "app did not become ready"
        time.sleep(1)
    plan = requests.get(f"{base}/plan", timeout=10).json()
    assert plan["models"][0]["placed_replicas"] == 3  # the planned capacity: max 3 fits in 6 GiB RAM

    stop = threading.Event()
    codes: list[int] = []

    def client():
        while not stop.is_set():
            r = requests.post(f"{base}/v1/completions", timeout=120, json={
                "model": "auto", "prompt": "def ", "max_tokens": 200, "temperature": 1.0})
            codes.append(r.status_code)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    peak, deadline = 1, time.time() + 120
    try:
        while time.time() < deadline and peak < 2:
            peak = max(peak, running("scale", "auto"))
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    assert peak >= 2, "never scaled above min_replicas under 6 concurrent clients"
    assert peak <= 3  # never above the planned capacity
    assert codes and all(c == 200 for c in codes), sorted(set(codes))
    deadline = time.time() + 120
    while running("scale", "auto") > 1:
        assert time.time() < deadline, "did not scale back down to min_replicas"
        time.sleep(1)
    serve.delete("scale")


def test_full_queue_is_shed_with_429_in_openai_shape(ray_cluster):
    """Ray's own backpressure (max_queued_requests) comes back as 429 + Retry-After in the OpenAI error shape."""
    import concurrent.futures

    from serve.app.build import build_app

    args = {"cluster": ARGS["cluster"], "models": [{
        "name": "shed", "source": TINY, "quantization": "bf16", "engine": "transformers", "max_model_len": 256,
        "max_num_seqs": 1,
        "replicas": {"min": 1, "max": 1}, "max_ongoing_requests": 1, "max_queued_requests": 1}]}
    serve.run(build_app(args), name="shed", route_prefix="/shed", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/shed"
    deadline = time.time() + 240
    while requests.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.time() < deadline, "app did not become ready"
        time.sleep(1)

    def one(i):
        r = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": "shed", "prompt": "def ", "max_tokens": 150, "temperature": 1.0, "seed": i})
        return r.status_code, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert 200 in codes and 429 in codes, codes
    for code, retry_after, body in results:
        if code == 429:
            assert retry_after and int(retry_after) >= 1
            assert body["error"]["type"] == "rate_limit_error" and "shed" in body["error"]["message"]
    serve.delete("shed")


def _zero_args(wake: str) -> dict:
    return {
        "cluster": {"nodes": [{"name": "cpu-only", "cpu_memory": "6GiB", "gpus": []}]},
        "models": [{
            "name": "nap", "source": TINY, "quantization": "bf16", "engine": "transformers", "max_model_len": 256,
            "max_num_seqs": 2, "replicas": {"min": 0, "max": 1}, "request_timeout_s": 180,
            "autoscaling": {"policy": "requests", "target_ongoing_requests": 1, "upscale_delay_s": 30,
                            "downscale_delay_s": 1, "zero_after_s": 4, "look_back_period_s": 2,
                            "metrics_interval_s": 0.5, "wake": wake},
        }],
    }


def _wait(cond, timeout_s: float, what: str) -> float:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout_s, what
        time.sleep(0.5)
    return time.time() - t0


def test_scales_to_zero_when_idle_and_a_request_wakes_it(ray_cluster):
    """replicas.min 0: no replica at the start; a request wakes one at once (upscale_delay_s is 30 s here) and
    waits for it (wake: wait), and the wake time is in /plan; after zero_after_s without requests the replica
    goes. With wake: reject the request is answered 503 with Retry-After while the replica starts."""
    from serve.app.build import build_app

    serve.run(build_app(_zero_args("wait")), name="nap", route_prefix="/nap", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/nap"
    _wait(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 240, "app did not become ready")
    time.sleep(3)
    assert running("nap", "nap") == 0  # min 0: nothing runs until asked
    body = {"model": "nap", "prompt": "def ", "max_tokens": 4}
    t0 = time.time()
    r = requests.post(f"{base}/v1/completions", json=body, timeout=200)
    took = time.time() - t0
    assert r.status_code == 200, r.text
    assert took < 28, f"the wake waited for upscale_delay_s ({took:.1f} s)"
    wake = requests.get(f"{base}/plan", timeout=10).json()["wake"]["nap"]
    assert wake["mode"] == "wait" and wake["count"] == 1 and 0 < wake["last_s"] <= took + 0.5, wake
    print(f"scale to zero: wake (wait) {wake['last_s']:.2f} s, request {took:.2f} s")
    # idle: back to zero after zero_after_s (plus Serve's look-back window)
    _wait(lambda: running("nap", "nap") == 0, 90, "did not scale back to zero when idle")
    serve.delete("nap")

    serve.run(build_app(_zero_args("reject")), name="nap2", route_prefix="/nap2", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/nap2"
    _wait(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, 240, "app did not become ready")
    time.sleep(3)
    assert running("nap2", "nap") == 0
    t0 = time.time()
    r = requests.post(f"{base}/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and float(r.headers["Retry-After"]) >= 1, (r.status_code, r.text)
    assert "scaled to zero" in r.json()["error"]["message"]
    codes = []

    def served():
        resp = requests.post(f"{base}/v1/completions", json=body, timeout=60)
        codes.append(resp.status_code)
        return resp.status_code == 200

    _wait(served, 120, "a replica never came up after the 503")
    assert set(codes) <= {503, 200}
    wake = requests.get(f"{base}/plan", timeout=10).json()["wake"]["nap"]
    assert wake["mode"] == "reject" and wake["count"] == 1 and wake["last_s"] > 0, wake
    print(f"scale to zero: wake (reject) {wake['last_s']:.2f} s, first 503 to first 200 {time.time() - t0:.2f} s, "
          f"answers {codes}")
    serve.delete("nap2")
