"""gpuplan's scaling rule (planner/rollout/policy.py signal_want) on the signals replicas report: up on a p95 near its
target, on saturation (the batches 40% full, a full KV cache) or on a rate above the plan's capacity; down only
when one replica fewer keeps the load and every p95 comfortably within; without an SLO, saturation alone. The
decision over time (fake clock, the delays) through decide_scale, and the signals' plumbing from Serve's metrics."""

from __future__ import annotations

import pytest

from planner.rollout import DeploymentObs, ModelRule, ScaleMemory, decide_scale, rollout_from_plan
from planner.rollout.policy import LatencyWindow, ModelSignals, signal_want
from planner.rollout.scale import model_signals
from serve.app.scale_board import signals_of

from test_rollout import hand_plan

SLO = dict(policy="gpuplan", max_num_seqs=8, slo_ttft_p95_s=0.5, slo_tpot_p95_s=0.05)


def rule(lo=1, hi=6, **kw) -> ModelRule:
    return ModelRule("m", lo, hi, 2.0, 10.0, 30.0, **{**SLO, **kw})


def test_up_when_a_p95_nears_its_target():
    want, why = signal_want(rule(), ModelSignals(load=4, ttft_p95_s=0.46, tpot_p95_s=0.02), 2)
    assert want == 3 and "TTFT p95 460 ms > 90% of its 500 ms target" in why
    want, why = signal_want(rule(), ModelSignals(load=4, ttft_p95_s=0.2, tpot_p95_s=0.048), 2)
    assert want == 3 and "TPOT" in why
    assert signal_want(rule(), ModelSignals(load=4, ttft_p95_s=0.44, tpot_p95_s=0.044), 2)[0] == 2  # just below


def test_up_on_saturation_and_on_a_rate_above_capacity():
    want, why = signal_want(rule(), ModelSignals(load=7), 2)  # 2 replicas x 8 slots, 6.4 of them 40%
    assert want == 3 and "7.0 requests > 2 x 3.2 (40% of max_num_seqs 8, at least 1)" in why
    assert signal_want(rule(), ModelSignals(load=6.4), 2)[0] == 2
    # at once to the batches that hold them 40% full: 40 / 3.2
    assert signal_want(rule(hi=20), ModelSignals(load=40), 2)[0] == 13
    want, why = signal_want(rule(), ModelSignals(load=3, kv_usage=0.97), 2)
    assert want == 3 and "KV cache 97% full" in why
    # the plan says one replica serves 1.5 req/s within the SLO: 7 req/s needs 5 at once
    want, why = signal_want(rule(capacity_rps=1.5), ModelSignals(load=4, requests_per_s=7.0), 2)
    assert want == 5 and "needs 5 replicas" in why
    assert signal_want(rule(hi=4, capacity_rps=1.5), ModelSignals(load=4, requests_per_s=7.0), 2)[0] == 4  # max


def test_down_to_what_keeps_the_load_and_the_latency():
    calm = dict(ttft_p95_s=0.1, tpot_p95_s=0.02)
    # capacity known: 2.0 req/s on 3 replicas -> 2 replicas hold 2 x 1.5 x 0.7 = 2.1
    want, why = signal_want(rule(capacity_rps=1.5), ModelSignals(load=3, requests_per_s=2.0, **calm), 3)
    assert want == 2 and why == "down: 2.00 req/s within 70% of 2 x 1.50"
    assert signal_want(rule(capacity_rps=1.5), ModelSignals(load=3, requests_per_s=2.2, **calm), 3)[0] == 3
    # at once to what the load needs, not one by one
    assert signal_want(rule(capacity_rps=1.5), ModelSignals(load=1, requests_per_s=0.5, **calm), 6)[0] == 1
    # while requests press (more in flight than replicas), a p95 above 70% of its target holds the count
    hot = ModelSignals(load=4, requests_per_s=0.1, ttft_p95_s=0.4, tpot_p95_s=0.02)
    assert signal_want(rule(capacity_rps=1.5), hot, 3) == (3, "within target")
    # nothing presses: a slow window left by a burst that has drained neither holds nor adds replicas
    after = ModelSignals(load=1, requests_per_s=0.1, ttft_p95_s=0.9, tpot_p95_s=0.02)
    assert signal_want(rule(capacity_rps=1.5), after, 3)[0] == 1
    # no capacity (no traffic declared): the batch slots of one replica fewer
    assert signal_want(rule(), ModelSignals(load=5.6, **calm), 3)[0] == 2  # 5.6 <= 0.35 x 2 x 8
    assert signal_want(rule(), ModelSignals(load=5.7, **calm), 3)[0] == 3
    assert signal_want(rule(lo=3), ModelSignals(load=0, **calm), 3)[0] == 3  # never below min


def test_without_an_slo_saturation_alone_moves_it():
    r = rule(slo_ttft_p95_s=None, slo_tpot_p95_s=None)
    assert signal_want(r, ModelSignals(load=6, ttft_p95_s=9.0, tpot_p95_s=1.0), 2)[0] == 2  # slow, not saturated
    assert signal_want(r, ModelSignals(load=7), 2)[0] == 3
    # an engine of one slot (transformers, llama.cpp's default): up when requests queue, not at 40% of one request
    one = rule(max_num_seqs=1, slo_ttft_p95_s=None, slo_tpot_p95_s=None)
    assert signal_want(one, ModelSignals(load=2), 2)[0] == 2
    assert signal_want(one, ModelSignals(load=2.5), 2)[0] == 3
    assert signal_want(one, ModelSignals(load=1.7), 2)[0] == 2  # 1.7 > 0.875: two still needed
    assert signal_want(one, ModelSignals(load=0.8), 2)[0] == 1
    assert signal_want(r, ModelSignals(load=2), 2)[0] == 1


def test_the_decision_over_time_with_the_delays():
    p = hand_plan({"a": [[("m", 3000)] * 3], "b": [[("m", 3000)] * 3]}, {"m": 1})
    ro = rollout_from_plan(p, {"m": rule(capacity_rps=1.5)})
    running = {"m@a": [("r1", 0)]}

    def obs(t, load=0.0, **sig):
        return {"m@a": DeploymentObs(t, tuple(running.get("m@a", ())), load, **sig), "m@b": DeploymentObs(0)}

    d = decide_scale(ro, obs(0), ScaleMemory(), 0.0)
    assert d.targets == {"m@a": 1, "m@b": 0}
    slow = dict(ttft_p95_s=0.8, tpot_p95_s=0.02, requests_per_s=1.0)
    d = decide_scale(ro, obs(1, 3, **slow), d.memory, 1.0)
    assert d.models[0].want == 2 and "waiting 10.0s" in d.models[0].why and "TTFT p95 800 ms" in d.models[0].why
    d = decide_scale(ro, obs(1, 3, **slow), d.memory, 11.0)
    assert d.models[0].goal == 2
    # calm again at a low rate: down after the downscale delay
    calm = dict(ttft_p95_s=0.1, tpot_p95_s=0.01, requests_per_s=0.2)
    d = decide_scale(ro, obs(2, 1, **calm), d.memory, 12.0)
    assert d.models[0].goal == 2 and d.models[0].want == 1
    d = decide_scale(ro, obs(2, 1, **calm), d.memory, 42.0)
    assert d.models[0].goal == 1


def test_latency_window_p95_and_rate():
    w = LatencyWindow(window_s=10.0)
    for i in range(20):
        w.start(float(i))
        w.add(float(i), 0.1 * (i + 1), 0.01)
    s = w.summary(20.0)  # rows finished at 10..19 are in the window: TTFT 1.1 .. 2.0
    assert s["ttft_p95_s"] == pytest.approx(1.955) and s["tpot_p95_s"] == pytest.approx(0.01)
    assert s["requests_per_s"] == pytest.approx(1.0)
    assert w.summary(100.0) == {"ttft_p95_s": -1.0, "tpot_p95_s": -1.0, "requests_per_s": 0.0}
    assert LatencyWindow(30).summary(5.0, started=0.0)["requests_per_s"] == 0.0


def test_signals_from_serves_metrics_and_over_deployments():
    agg = {"gpuplan_waiting": {"r1": 2.0, "r2": 1.0}, "gpuplan_kv_usage": {"r1": 0.5, "r2": 0.9},
           "gpuplan_ttft_p95_s": {"r1": 0.3, "r2": 0.0}, "gpuplan_tpot_p95_s": {"r1": 0.0, "r2": 0.0},
           "gpuplan_requests_per_s": {"r1": 1.5, "r2": 0.5}}
    s = signals_of(agg)
    assert s == {"waiting": 3.0, "kv_usage": 0.9, "ttft_p95_s": 0.3, "tpot_p95_s": None, "requests_per_s": 2.0}
    m = model_signals([DeploymentObs(1, (("r1", 0),), 4.0, **s), DeploymentObs(1, (("r3", 0),), 1.0, ttft_p95_s=0.6)])
    assert (m.replicas, m.load, m.ttft_p95_s, m.kv_usage, m.requests_per_s) == (2, 5.0, 0.6, 0.9, 2.0)


@pytest.mark.parametrize("policy", ["gpuplan", "requests"])
def test_scale_to_zero_after_idle_and_wake_at_once(policy):
    """min 0: the last replica goes after zero_after_s without a request (not downscale_delay_s), and a request for
    a model at zero wakes it at once, whatever upscale_delay_s says; a model with min 1 never goes to zero."""
    from planner.rollout.policy import desired_replicas, move_goal

    r = ModelRule("m", 0, 4, 2.0, 10.0, 30.0, policy=policy, max_num_seqs=8, zero_after_s=120.0)

    def want(load, current):
        return signal_want(r, ModelSignals(load=load), current)[0] if policy == "gpuplan" else \
            desired_replicas(r, load)

    goal, up, down = {"m": 1}, {}, {}
    for t in (0.0, 30.0, 119.0):
        why = move_goal(r, want(0, 1), t, goal, up, down)
        assert goal["m"] == 1, (t, why)
    assert "zero_after_s" in why
    move_goal(r, want(0, 1), 120.0, goal, up, down)
    assert goal["m"] == 0
    why = move_goal(r, want(1, 0), 121.0, goal, up, down)  # a request arrived: no upscale delay
    assert goal["m"] == 1 and why.startswith("wake")
    # without zero_after_s the downscale delay applies; with min 1 the goal stays at 1
    r2 = ModelRule("m", 0, 4, 2.0, 10.0, 30.0, policy=policy, max_num_seqs=8)
    goal, up, down = {"m": 1}, {}, {}
    move_goal(r2, want(0, 1), 0.0, goal, up, down)
    move_goal(r2, want(0, 1), 30.0, goal, up, down)
    assert goal["m"] == 0
    r3 = ModelRule("m", 1, 4, 2.0, 10.0, 30.0, policy=policy, max_num_seqs=8, zero_after_s=1.0)
    goal, up, down = {"m": 1}, {}, {}
    for t in (0.0, 500.0):
        move_goal(r3, max(1, want(0, 1)), t, goal, up, down)
    assert goal["m"] == 1


def test_scale_to_zero_knobs_need_min_zero():
    from planner.config import parse_deploy_args
    from planner.errors import InputError

    m = {"name": "m", "source": "Qwen/Qwen2.5-7B-Instruct", "replicas": {"min": 1, "max": 2},
         "autoscaling": {"zero_after_s": 300, "wake": "reject"}}
    with pytest.raises(InputError, match=r"autoscaling\.zero_after_s and wake .* replicas\.min is 1; set "
                                         r"replicas\.min: 0"):
        parse_deploy_args({"models": [m]})
    m["replicas"]["min"] = 0
    args = parse_deploy_args({"models": [m]})
    assert args.models[0].autoscaling.zero_after_s == 300
