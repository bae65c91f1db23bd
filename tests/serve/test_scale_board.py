"""serve/app/scale_board.py without Ray: Serve's autoscaling context as planner.rollout sees it, and the board every
deployment's policy shares (warm-up, one decision per interval, each deployment's own target)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.app.scale_board import DECIDE_EVERY_S, GPU_METRIC, WARMUP_S, Board, obs_from_context

from planner.placement.packing import GpuPlan, GpuReplica, ModelPlan, Plan, SolverInfo
from planner.rollout import rollout_from_plan

GiB = 1024**3


@dataclass(frozen=True)
class Rid:  # Serve's ReplicaID: hashable, with unique_id
    unique_id: str


@dataclass
class Ctx:  # the fields of Serve's AutoscalingContext the board reads
    deployment_name: str
    target_num_replicas: int
    running_replicas: list = field(default_factory=list)
    total_num_requests: float = 0.0
    aggregated_metrics: dict = field(default_factory=dict)


def two_models_plan(min_a: int = 1) -> Plan:
    reps = (GpuReplica("a", 4 * GiB, 0.5, "bf16"), GpuReplica("b", 4 * GiB, 0.5, "bf16"))
    g = GpuPlan("n/gpu-0", "L4", "n", 0, "L4", 10 * GiB, 8 * GiB, 8 * GiB, reps, 8 * GiB)
    models = tuple(ModelPlan(m, "bf16", 0, 4 * GiB, 0, lo, 1, 1, 1, 0, 0, None, 1, 1, (), "", None)
                   for m, lo in (("a", min_a), ("b", 1)))
    return Plan(True, "gpu", 0.1, 0, models, (g,), (), (), (), SolverInfo("none", "none", "spread", None, "", 2, None,
                                                                          0.0), "usable")


def two_models_on_one_gpu():
    return rollout_from_plan(two_models_plan())


def test_context_becomes_an_observation_with_each_replicas_gpu():
    r1, r2 = Rid("r1"), Rid("r2")
    ctx = Ctx("a@n", 2, [r2, r1], 3.0, {GPU_METRIC: {r1: 1.0, r2: -1.0}})
    obs = obs_from_context(ctx)
    assert obs.target == 2 and obs.load == 3.0
    assert obs.running == (("r1", 1), ("r2", None))  # -1: the replica has no GPU; sorted by id
    assert obs_from_context(Ctx("a@n", 0)).running == ()


def test_board_waits_for_every_deployment_then_hands_each_its_own_target():
    b = Board(two_models_on_one_gpu(), now=0.0)
    # only a@n has reported: no decision on half the picture, its target stays
    assert b.target("a@n", obs_from_context(Ctx("a@n", 0)), 0.1) == 0
    t_b = b.target("b@n", obs_from_context(Ctx("b@n", 0)), 0.2)
    t_a = b.target("a@n", obs_from_context(Ctx("a@n", 0)), 0.3)
    # both minimums, one GPU: the two 0.5s may start together (they fill it exactly whatever the order)
    assert (t_a, t_b) == (1, 1)
    decided = b.decided_at
    b.target("a@n", obs_from_context(Ctx("a@n", 1)), 0.3 + DECIDE_EVERY_S / 2)
    assert b.decided_at != decided  # a target changed: decided again at once
    decided = b.decided_at
    b.target("a@n", obs_from_context(Ctx("a@n", 1)), decided + DECIDE_EVERY_S / 2)
    assert b.decided_at == decided  # nothing changed: the last decision stands until the interval passes


def test_a_board_that_never_hears_from_a_deployment_decides_after_the_warmup():
    b = Board(two_models_on_one_gpu(), now=0.0)
    assert b.target("a@n", obs_from_context(Ctx("a@n", 0)), 1.0) == 0
    assert b.target("a@n", obs_from_context(Ctx("a@n", 0)), WARMUP_S + 1) == 1


def test_replica_configs_give_each_deployment_its_nodes_fraction_and_selector():
    """serve/app/build.py's pure part on a mixed declared cluster: one deployment per (model, node), the plan's fraction
    for that node's GPUs, the binding's label selector, and gpuplan's policy with the rollout's id."""
    from serve.app.build import model_cards, replica_configs

    from planner.config import parse_deploy_args
    from planner.planning import cluster_from_decl, make_plan
    from planner.rollout import POLICY, RayNode, bind_nodes

    args = parse_deploy_args({
        "headroom": 0.1, "gpu_reserve": 0,
        "cluster": {"nodes": [{"name": "l4", "gpus": [{"name": "L4", "memory": "16GiB", "count": 2}]},
                              {"name": "h100", "gpus": [{"name": "H100", "memory": "80GiB", "count": 1}]}]},
        "models": [{"name": "m", "source": "Qwen/Qwen2.5-7B-Instruct", "quantization": "int4",
                    "max_model_len": 1024, "replicas": {"min": 1, "max": 6}}]})
    result = make_plan(args, cluster_from_decl(args.cluster))
    bindings = bind_nodes(result.cluster.nodes, [RayNode("id-l4", {"gpuplan.io/node": "l4"}, 2, "L4"),
                                                RayNode("id-h", {}, 1, "H100")])
    cfgs = replica_configs(result, args, result.rollout, bindings)
    assert set(cfgs) == {"m@l4", "m@h100"}
    for name, c in cfgs.items():
        spec = result.rollout.deployment(name)
        actor, auto = c["options"]["ray_actor_options"], c["options"]["autoscaling_config"]
        planned = {r.num_gpus for g in result.plan.gpus if g.node == spec.node for r in g.replicas}
        assert {actor["num_gpus"]} == planned and c["replica"].num_gpus == actor["num_gpus"]
        assert auto["max_replicas"] == spec.planned and auto["min_replicas"] == 0
        assert auto["policy"] == {"policy_function": POLICY, "policy_kwargs": {"plan_id": result.rollout.plan_id}}
        assert c["replica"].deployment == name and c["replica"].node == spec.node
    assert cfgs["m@l4"]["options"]["ray_actor_options"]["label_selector"] == {"gpuplan.io/node": "l4"}
    assert cfgs["m@h100"]["options"]["ray_actor_options"]["label_selector"] == {"ray.io/node-id": "id-h"}
    assert cfgs["m@h100"]["options"]["ray_actor_options"]["num_gpus"] < cfgs["m@l4"]["options"][
        "ray_actor_options"]["num_gpus"]
    (card,) = model_cards(result, args)
    assert card.name == "m" and card.extra["placed_replicas"] == result.rollout.rule("m").max_replicas


def test_the_replica_book_forgets_dead_replicas_and_counts_them_as_restarts(monkeypatch):
    from serve.app.registry import ReplicaBook

    book = ReplicaBook()
    for rid in ("r1", "r2", "r3"):
        book.put({"replica_id": rid, "model": "m", "app": "a"})
    book.stopped("r3")  # scaled down the graceful way
    book.put({"replica_id": "r3", "model": "m", "app": "a"})  # a late report of it is ignored
    restarts = book.prune(["r1", "r4"], "a")  # r2 is gone without saying so: it died; r4 replaces it
    assert [r["replica_id"] for r in book.all()] == ["r1"]
    assert restarts["m"]["count"] == 1 and restarts["m"]["last"] > 0
    book.load_failed({"model": "m", "deployment": "m@n", "app": "a", "mode": "gpu", "gave_up": False})
    book.load_failed({"model": "m", "deployment": "m@n", "app": "a", "mode": "cpu", "gave_up": True})
    assert book.recent_failures("m@n") == 1 and book.recent_failures("other") == 0
    assert [f["mode"] for f in book.failures_of("a")["m"]] == ["gpu", "cpu"]
    assert book.failures_of("b") == {}


def test_a_wake_note_wakes_a_model_at_zero_at_once_and_an_older_one_does_not(monkeypatch):
    """replicas.min 0: the ingress's note (ask_wake) counts as a request for the model while it has no replica
    running: one replica at once, upscale_delay_s (30 s here) notwithstanding. A note from before the board (an app
    deployed earlier with the same plan) is not a request; once a replica runs, the note is not needed."""
    import serve.app.scale_board as sb
    from planner.rollout import ModelRule

    rules = {"a": ModelRule("a", 0, 1, 1.0, 30.0, 1.0, policy="requests", zero_after_s=5.0),
             "b": ModelRule("b", 1, 1, 1.0, 30.0, 1.0, policy="requests")}
    ro = rollout_from_plan(two_models_plan(min_a=0), rules)
    notes: dict = {}
    monkeypatch.setattr(sb, "wake_notes", lambda app, plan_id: dict(notes))
    b = Board(ro, now=10.0, app="x")

    def tick(t, running_a=0):
        ta = b.target("a@n", obs_from_context(Ctx("a@n", running_a, [Rid(f"r{i}") for i in range(running_a)])), t)
        b.target("b@n", obs_from_context(Ctx("b@n", 1, [Rid("rb")])), t)
        return ta

    assert tick(10.1) == 0 and tick(11.0) == 0  # min 0: nothing runs until asked
    notes["a"] = 5.0  # older than the board
    assert tick(12.0) == 0
    notes["a"] = 12.5
    assert tick(13.0) == 1  # woken at once
    assert tick(14.0, running_a=1) == 1
    notes.pop("a")
    assert tick(16.0, running_a=1) == 1  # idle, but zero_after_s (5 s) has not passed
    assert tick(21.5, running_a=1) == 0  # idle for zero_after_s: back to zero

