"""One shared Ray cluster for the integration tests: a head without GPUs and three worker nodes with fake GPUs of
two types, labelled as declared nodes (``gpuplan.io/node``). Ray schedules fractional GPUs without CUDA; replicas then
load on the CPU, as they would on a laptop."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ray = pytest.importorskip("ray")

from serve.api.front import pick_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "models", "tiny-chat")
GiB = 1024**3
# (declared node name = its gpuplan.io/node label, GPUs, type)
GPU_NODES = [("a10g-1", 2, "A10G"), ("a10g-2", 1, "A10G"), ("l4-1", 1, "L4")]



@pytest.fixture(scope="session")
def ray_cluster():
    from ray.cluster_utils import Cluster

    # NOTE: CPU counts are Ray's bookkeeping, not real cores; fractional num_cpus keep replicas schedulable.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 0})
    for name, gpus, kind in GPU_NODES:
        cluster.add_node(num_cpus=4, num_gpus=gpus, resources={f"accelerator_type:{kind}": 1},
                         labels={"gpuplan.io/node": name})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    from ray import serve

    port = pick_port()
    # one proxy, on the head (deploy.yaml's HeadOnly): the four Ray nodes share this machine, so proxies on every node
    # would share the port through SO_REUSEPORT, and one starting mid-test (when a node gets its first replica) took
    # connections it dropped (CI: RemoteDisconnected on GET /plan right after "Proxy starting on node ...")
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield {"cluster": cluster, "port": port}
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
