"""What Ray runs is the plan, on a real multi-node Ray cluster of fake GPUs of two types (conftest.py: three GPU nodes
labelled gpuplan.io/node=<declared name>).

Two models sized with replica_memory so that the plan spans both GPU types and fills GPUs to the last planned byte.
At the minimum and, under load, at every model's planned maximum: every replica Serve was asked for runs (none
pending); each replica's Ray request is the plan's fraction for the GPU type it runs on; replicas per (model, node)
are the plan's; per physical GPU (node and ray.get_gpu_ids()) the planned bytes stay within its usable bytes; and
after the load the models scale back down to their minimums. Ray's ledger still refuses what the plan has no room
for."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict

import pytest
import requests
from ray_helpers import wait_ready

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

GiB = 1024**3
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models", "tiny-chat")
APP = "multi"
FAST = {"target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2,
        "metrics_interval_s": 0.5}
ARGS = {
    "headroom": 0.10,
    "gpu_reserve": 0,
    "cluster": {"nodes": [
        {"name": "a10g-1", "cpu_memory": "8GiB", "gpus": [{"name": "A10G", "memory": "10GiB", "count": 2}]},
        {"name": "a10g-2", "cpu_memory": "8GiB", "gpus": [{"name": "A10G", "memory": "10GiB", "count": 1}]},
        {"name": "l4-1", "cpu_memory": "8GiB", "gpus": [{"name": "L4", "memory": "16GiB", "count": 1}]},
    ]},
    "models": [
        # 4.5 GiB: exactly half of an A10G's 9 GiB usable (0.5), 0.3125 of the L4's 14.4 GiB
        {"name": "big", "source": TINY, "quantization": "int8", "max_model_len": 256, "max_num_seqs": 1,
         "replicas": {"min": 2, "max": 4}, "replica_memory": "4.5GiB", "max_ongoing_requests": 1,
         "max_queued_requests": -1, "autoscaling": FAST},
        # 2.25 GiB: a quarter of an A10G (0.25), 0.1563 of the L4
        {"name": "small", "source": TINY, "quantization": "int4", "max_model_len": 256, "max_num_seqs": 1,
         "replicas": {"min": 1, "max": 5}, "replica_memory": "2.25GiB", "max_ongoing_requests": 1,
         "max_queued_requests": -1, "autoscaling": FAST},
    ],
}
USABLE = {"A10G": int(10 * GiB * 0.9), "L4": int(16 * GiB * 0.9)}


def status() -> dict:
    st = serve.status().applications.get(APP)
    return {name: dict(d.replica_states or {}) for name, d in st.deployments.items()} if st else {}


def wait_for(pred, what: str, timeout: float):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        last = status()
        if pred(last):
            return last
        time.sleep(1)
    raise AssertionError(f"{what} not reached after {timeout}s: {last}")


@pytest.fixture(scope="module")
def app(ray_cluster):
    from serve.app.build import build_app

    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}", blocking=False)
    base = f"http://127.0.0.1:{ray_cluster['port']}/{APP}"
    assert wait_ready(base, 300), f"app not ready: {status()}"
    plan = requests.get(f"{base}/plan", timeout=10).json()
    yield base, plan
    serve.delete(APP)


def labels_of_nodes() -> dict[str, str]:
    return {n["NodeID"]: (n.get("Labels") or {}).get("gpuplan.io/node") for n in ray.nodes()}


def live_replicas(base: str) -> list[dict]:
    """Every alive replica actor of the app, with Ray's request and node, joined with what it reported (GPU ids)."""
    from ray.util.state import list_actors

    node_label = labels_of_nodes()
    actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
              if (a.name or "").startswith(f"SERVE_REPLICA::{APP}#") and "@" in a.name]
    reports = {r["replica_id"]: r for r in requests.get(f"{base}/plan", timeout=10).json()["replicas"]}
    out = []
    for a in actors:
        _, deployment, rid = a.name.split("::", 1)[1].split("#")
        out.append({"deployment": deployment, "replica_id": rid, "node": node_label.get(a.node_id),
                    "gpu_request": (a.required_resources or {}).get("GPU"), "report": reports.get(rid)})
    return out


def check_against_plan(base: str, plan: dict, expect: dict[str, int]) -> list[dict]:
    """The checks of the issue, for the replica counts ``expect`` (deployment -> replicas)."""
    ro = {d["name"]: d for d in plan["rollout"]["deployments"]}
    st = status()
    for name, n in expect.items():
        assert st.get(name, {}).get("RUNNING", 0) == n, (name, st)
        assert set(st.get(name, {})) <= {"RUNNING"}, (name, st)  # nothing starting, pending or stopping
    reps = live_replicas(base)
    assert Counter(r["deployment"] for r in reps) == Counter({k: v for k, v in expect.items() if v})
    gpu_types = {g["node"]: g["gpu_type"] for g in plan["gpus"]}
    per_gpu = defaultdict(int)
    for r in reps:
        d = ro[r["deployment"]]
        assert r["node"] == d["node"]  # on the plan's node
        # Ray's request is the plan's fraction for the GPU type the replica runs on
        planned = {x["num_gpus"] for g in plan["gpus"] if g["node"] == r["node"] for x in g["replicas"]
                   if x["model"] == d["model"]}
        assert planned == {r["gpu_request"]}, (r, planned)
        rep = r["report"]
        assert rep is not None and len(rep["gpu_ids"]) == 1 and rep["planned_node"] == rep["node"] == d["node"]
        per_gpu[(r["node"], rep["gpu_ids"][0])] += rep["planned_bytes"]
    for (node, _), used in per_gpu.items():
        assert used <= USABLE[gpu_types[node]], (node, used)
    return reps


def test_plan_spans_both_types_and_fills_gpus_to_the_last_byte(app):
    _, plan = app
    assert plan["feasible"]
    types = {g["gpu_type"] for g in plan["gpus"] if g["replicas"]}
    assert types == {"A10G", "L4"}
    assert any(g["used_bytes"] == g["usable_bytes"] for g in plan["gpus"])
    # one deployment per (model, node), and the plan's counts
    ro = plan["rollout"]
    per = Counter((x["model"], g["node"]) for g in plan["gpus"] for x in g["replicas"])
    assert {(d["model"], d["node"]): d["planned"] for d in ro["deployments"]} == dict(per)
    assert all(d["name"] == f"{d['model']}@{d['node']}" for d in ro["deployments"])
    assert ro["notes"] == []  # every planned replica can be brought up


def ledger_refuses_what_the_plan_has_no_room_for(base: str, plan: dict, full: dict[str, int]) -> None:
    """With every planned replica running: a request for a little more than the emptiest GPU of a node has left in
    the plan stays pending there, and one that fits what is left is admitted. A probe during which a planned replica
    stopped (the policy scaled down for a moment: a 4 s downscale delay on two busy cores) proves nothing and is
    made again once every planned replica runs."""
    @ray.remote(num_cpus=0)
    class Extra:
        def gpu(self):
            return ray.get_gpu_ids()

    node = next(g["node"] for g in plan["gpus"] if g["num_gpus_used"] >= 0.99)
    free = max(round(1 - g["num_gpus_used"], 4) for g in plan["gpus"] if g["node"] == node)
    for _ in range(3):
        wait_for(lambda st: all(st.get(k, {}).get("RUNNING", 0) == v and set(st.get(k, {})) <= {"RUNNING"}
                                for k, v in full.items()), "every planned replica", 300)
        before = {r["replica_id"] for r in live_replicas(base)}
        extra = Extra.options(num_gpus=round(free + 0.05, 4), label_selector={"gpuplan.io/node": node}).remote()
        ready, _ = ray.wait([extra.gpu.remote()], timeout=8)
        ray.kill(extra)
        held = {r["replica_id"] for r in live_replicas(base)}
        if held == before and len(before) == sum(full.values()):
            break  # every planned replica held its share all through the probe
    else:
        raise AssertionError("planned replicas kept stopping during the probe: no conclusive ledger check")
    assert not ready, f"Ray admitted on {node} a replica the memory plan has no room for"
    left = max((round(1 - g["num_gpus_used"], 4), g["node"]) for g in plan["gpus"])
    if left[0] >= 0.01:
        fits = Extra.options(num_gpus=0.01, label_selector={"gpuplan.io/node": left[1]}).remote()
        assert ray.get(fits.gpu.remote(), timeout=60)
        ray.kill(fits)


def test_at_the_minimum_every_replica_runs_where_the_plan_says(app):
    base, plan = app
    mins = Counter()
    for model, slots in plan["rollout"]["fill_order"].items():
        m = next(x for x in plan["models"] if x["name"] == model)
        mins.update(slots[:m["min_replicas"]])
    expect = {d["name"]: mins.get(d["name"], 0) for d in plan["rollout"]["deployments"]}
    wait_for(lambda st: all(st.get(k, {}).get("RUNNING", 0) == v and set(st.get(k, {})) <= {"RUNNING"}
                            for k, v in expect.items()), "the minimums", 120)
    check_against_plan(base, plan, expect)
    scaling = requests.get(f"{base}/plan", timeout=10).json()["scaling"]  # the policy's latest decision
    assert scaling["targets"] == expect and {m["model"] for m in scaling["models"]} == {"big", "small"}
    models = requests.get(f"{base}/v1/models", timeout=10).json()["data"]
    assert sorted(m["id"] for m in models) == ["big", "small"]  # each model once, whatever its deployments


def test_under_load_every_model_reaches_its_planned_max_across_both_types_and_back(app):
    base, plan = app
    ro = plan["rollout"]
    full = {d["name"]: d["planned"] for d in ro["deployments"]}
    spans = {m: {d["gpu_type"] for d in ro["deployments"] if d["model"] == m} for m in ("big", "small")}
    assert any(t == {"A10G", "L4"} for t in spans.values()), spans
    stop, codes = threading.Event(), Counter()

    def client(model: str):
        while not stop.is_set():
            r = requests.post(f"{base}/v1/completions", timeout=300, json={
                "model": model, "prompt": "def ", "max_tokens": 48, "temperature": 1.0})
            codes[r.status_code] += 1

    threads = [threading.Thread(target=client, args=(m,), daemon=True) for m in ["big"] * 6 + ["small"] * 7]
    for t in threads:
        t.start()
    try:
        wait_for(lambda st: all(st.get(k, {}).get("RUNNING", 0) == v and set(st.get(k, {})) <= {"RUNNING"}
                                for k, v in full.items()), "every planned replica", 300)
        reps = check_against_plan(base, plan, full)
        seen = {(r["node"], r["deployment"].split("@")[0]) for r in reps}
        assert {t for (n, m) in seen for g in plan["gpus"] if g["node"] == n for t in [g["gpu_type"]]} == \
            {"A10G", "L4"}
        # GPU by GPU, what runs is what the rollout expects on some GPU of that node (here every order the gate
        # lets through reaches the same layout)
        rows = [r["report"] for r in reps]
        assert all(r["matches_plan"] and r["planned_gpu"] is not None and r["gpu_type"] for r in rows), rows
        ledger_refuses_what_the_plan_has_no_room_for(base, plan, full)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert codes and set(codes) == {200}, codes
    mins = {m["name"]: m["min_replicas"] for m in plan["models"]}

    def at_min(st):
        running = Counter()
        for d in ro["deployments"]:
            running[d["model"]] += st.get(d["name"], {}).get("RUNNING", 0)
        return dict(running) == mins and all(set(v) <= {"RUNNING"} for v in st.values())
    wait_for(at_min, "the minimums again", 180)


def test_chat_through_the_ingress(app):
    base, _ = app
    r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "small", "messages": [{"role": "user", "content": "What does os.path.join do?"}],
        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["content"] is not None


def test_inventory_sees_every_node(ray_cluster):
    from serve.app.inventory import gather_cluster

    c = gather_cluster()
    assert len(c.nodes) == 4
    assert {n.name for n in c.nodes} >= {"a10g-1", "a10g-2", "l4-1"}  # a labelled node is named by its label
    # fake GPUs cannot be sized by NVML: the inventory says so instead of guessing
    assert sum("Ray advertises" in n for n in c.notes) == 3
