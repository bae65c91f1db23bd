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
