"""Fake GPUs on a real Ray cluster: the plan's num_gpus fractions are a memory ledger Ray enforces.

Two models whose fractions fill the GPUs tightly, pinned to two GPU types on two nodes: every planned replica
runs, no GPU holds more planned bytes than its usable memory, and a replica beyond the ledger stays pending."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import requests

import os

GiB = 1024**3
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models", "tiny-chat")

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

USABLE = int(10 * GiB * 0.9)  # headroom 0.10, gpu_reserve 0
ARGS = {
    "headroom": 0.10,
    "gpu_reserve": 0,
    "cluster": {"nodes": [
        {"name": "gpu-a", "cpu_memory": "8GiB", "gpus": [{"name": "A10G", "memory": "10GiB", "count": 2}]},
        {"name": "gpu-b", "cpu_memory": "8GiB", "gpus": [{"name": "L4", "memory": "10GiB", "count": 1}]},
    ]},
    "models": [
        # 4.5 GiB of 9 GiB usable = 0.5: exactly two per L4
        {"name": "big", "source": TINY, "quantization": "int8", "max_model_len": 256, "max_num_seqs": 2,
         "replicas": {"min": 2, "max": 2}, "replica_memory": "4.5GiB", "gpu_type": "L4"},
        # 2.9 GiB / 9 GiB -> 0.3223: three per A10G (0.9669), six on the two A10Gs
        {"name": "small", "source": TINY, "quantization": "int4", "max_model_len": 256, "max_num_seqs": 2,
         "replicas": {"min": 6, "max": 6}, "replica_memory": "2.9GiB", "gpu_type": "A10G"},
    ],
}


def wait_running(app: str, want: dict, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    last = {}
    while time.time() < deadline:
        st = serve.status().applications.get(app)
        if st:
            last = {name: (d.replica_states or {}).get("RUNNING", 0) for name, d in st.deployments.items()}
            if all(last.get(k, 0) >= v for k, v in want.items()):
                return last
        time.sleep(1)
    raise AssertionError(f"replicas not running after {timeout}s: {last}, want {want}")


@pytest.fixture(scope="module")
def placement_app(ray_cluster):
    from serve.app import build_app

    serve.run(build_app(ARGS), name="placement", route_prefix="/placement", blocking=False)
    wait_running("placement", {"model-big": 2, "model-small": 6, "Ingress": 1})
    yield f"http://127.0.0.1:{ray_cluster['port']}/placement"
    serve.delete("placement")


def replica_infos(base: str, models: set[str], want: int, timeout: float = 60) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        infos = [r for r in requests.get(f"{base}/plan", timeout=10).json()["replicas"] if r["model"] in models]
        if len(infos) >= want:
            return infos
        time.sleep(1)
    raise AssertionError(f"only {len(infos)} replicas reported")


def test_every_planned_replica_runs_and_no_gpu_over_its_bytes(placement_app):
    plan = requests.get(f"{placement_app}/plan", timeout=10).json()
    assert plan["feasible"] and {m["name"]: m["placed_replicas"] for m in plan["models"]} == {"big": 2, "small": 6}
    infos = replica_infos(placement_app, {"big", "small"}, 8)
    per_gpu_bytes, per_gpu_frac = defaultdict(int), defaultdict(float)
    nodes = defaultdict(set)
    for r in infos:
        assert len(r["gpu_ids"]) == 1, r
        key = (r["node_id"], r["gpu_ids"][0])
        per_gpu_bytes[key] += r["planned_bytes"]
        per_gpu_frac[key] += r["num_gpus"]
        nodes[r["model"]].add(r["node_id"])
        assert r["load_decision"]["mode"] == "cpu"  # fake GPUs: no CUDA, the replica says so
        assert r["resident_weight_bytes"] == r["estimated_weight_bytes"]
    assert len(per_gpu_bytes) == 3  # all three GPUs used
    for key, used in per_gpu_bytes.items():
        assert used <= USABLE, (key, used)
        assert per_gpu_frac[key] <= 1.0
    # pinned by GPU type: the two models live on different nodes
    assert len(nodes["big"]) == 1 and len(nodes["small"]) == 1 and nodes["big"] != nodes["small"]


def test_replica_beyond_the_ledger_stays_pending(placement_app):
    plan = requests.get(f"{placement_app}/plan", timeout=10).json()
    frac = next(r["num_gpus"] for g in plan["gpus"] for r in g["replicas"] if r["model"] == "small")

    @ray.remote(num_cpus=0)
    class Extra:
        def gpu(self):
            return ray.get_gpu_ids()

    extra = Extra.options(num_gpus=frac, accelerator_type="A10G").remote()
    ready, _ = ray.wait([extra.gpu.remote()], timeout=8)
    assert not ready, "Ray admitted a replica the memory plan has no room for"
    ray.kill(extra)
    # and one that does fit the ledger's leftover is admitted (the GPUs are not simply all taken)
    fits = Extra.options(num_gpus=0.03, accelerator_type="A10G").remote()
    assert ray.get(fits.gpu.remote(), timeout=30)
    ray.kill(fits)


def test_chat_through_the_ingress(placement_app):
    r = requests.post(f"{placement_app}/v1/chat/completions", timeout=60, json={
        "model": "small", "messages": [{"role": "user", "content": "What does os.path.join do?"}],
        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["content"] is not None


def test_inventory_sees_every_node(ray_cluster):
    from serve.inventory import gather_cluster

    c = gather_cluster()
    assert len(c.nodes) == 3
    # fake GPUs cannot be sized by NVML: the inventory says so instead of guessing
    assert sum("Ray advertises" in n for n in c.notes) == 2
