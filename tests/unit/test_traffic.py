"""The queueing arithmetic of planner/traffic.py against closed forms (Erlang C, M/M/1, Pollaczek-Khinchine for
M/D/1, Poisson), and a replica's capacity within an SLO."""

from __future__ import annotations

import math

import pytest

from planner.errors import InputError
from planner.traffic import (Slo, Traffic, erlang_c, load_point, md1_mean_wait, md1_wait_cdf, md1_wait_quantile,
                             mmc_wait_quantile, poisson_quantile, replica_capacity, replicas_needed)


def test_erlang_c_closed_forms():
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = ρ
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # c=2, a=1: (a^2/2 x 2/(2-1)) / (1 + a + 1) = 1/3
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 0.0) == 0.0


def test_mm1_wait_quantile():
    lam, mu = 8.0, 10.0  # ρ = 0.8: P(W > t) = 0.8 e^{-2 t}
    assert mmc_wait_quantile(1, lam, 1 / mu, 0.95) == pytest.approx(math.log(0.8 / 0.05) / 2)
    assert mmc_wait_quantile(1, 0.4, 0.1, 0.95) == 0.0  # ρ = 0.04 < 5%: the p95 waits nothing
    assert mmc_wait_quantile(2, 30.0, 0.1, 0.95) == math.inf


def test_md1_distribution_matches_pollaczek_khinchine():
    lam, d = 0.7, 1.0
    assert md1_wait_cdf(0.0, lam, d) == pytest.approx(1 - 0.7)
    # the mean from the exact distribution, E[W] = ∫ (1 - F(t)) dt, against ρ D / (2 (1 - ρ)) = 1.1667
    dt = 0.002
    mean = sum((1 - md1_wait_cdf(i * dt, lam, d)) * dt for i in range(int(30 / dt)))
    assert mean == pytest.approx(md1_mean_wait(lam, d), rel=0.01)
    q = md1_wait_quantile(lam, d, 0.95)
    assert md1_wait_cdf(q, lam, d) == pytest.approx(0.95, abs=1e-6)
    assert md1_wait_quantile(0.01, 1.0, 0.95) == 0.0  # P(wait) = 1%


def test_poisson_quantile():
    assert poisson_quantile(4.0, 0.95) == 8  # P(N<=7) = 0.949, P(N<=8) = 0.979
    assert poisson_quantile(0.0, 0.95) == 0


def _const(step_s=0.02, prefill_s=0.1):
    return (lambda b, c: step_s), (lambda n: prefill_s)


def test_load_point_obeys_littles_law():
    step, pre = _const()
    tr = Traffic(2.0, 500, 100)
    lp = load_point(2.0, tr, step, pre, max_num_seqs=64)
    stretch = 1 / (1 - 2.0 * 0.1)
    assert lp.prefill_share == pytest.approx(0.2)
    assert lp.tpot_p95_s == pytest.approx(0.02 * stretch)
    assert lp.running_mean == pytest.approx(2.0 * (0.1 + md1_mean_wait(2.0, 0.1) + 100 * 0.02 * stretch))
    assert lp.ttft_p95_s == pytest.approx(0.1 + md1_wait_quantile(2.0, 0.1, 0.95))
    assert load_point(10.0, tr, step, pre, 64).saturated  # prefills alone take all the time
    with_path = load_point(2.0, tr, step, pre, 64, path_s=0.015)  # the serving path: TTFT only
    assert with_path.ttft_p95_s == pytest.approx(lp.ttft_p95_s + 0.015) and with_path.tpot_p95_s == lp.tpot_p95_s


def test_capacity_is_the_edge_of_the_slo():
    # a step that grows with the batch: 10 ms + 1 ms per sequence
    step, pre = (lambda b, c: 0.010 + 0.001 * b), (lambda n: 0.05)
    tr = Traffic(12.0, 1000, 200)
    slo = Slo(ttft_p95_ms=500, tpot_p95_ms=40)
    cap = replica_capacity(tr, slo, step, pre, max_num_seqs=64)
    assert cap.requests_per_s > 0
    ok = load_point(cap.requests_per_s, tr, step, pre, 64)
    assert ok.ttft_p95_s <= 0.5 and ok.tpot_p95_s <= 0.040
    over = load_point(cap.requests_per_s * 1.02, tr, step, pre, 64)
    assert over.saturated or over.ttft_p95_s > 0.5 or over.tpot_p95_s > 0.040
    assert replicas_needed(tr, cap) == math.ceil(12.0 / cap.requests_per_s)
    assert "req/s within TTFT p95 500 ms, TPOT p95 40 ms" in cap.why


def test_unreachable_targets_are_refused_with_numbers():
    step, pre = _const(step_s=0.02, prefill_s=0.3)
    tr = Traffic(1.0, 4000, 100)
    with pytest.raises(InputError, match=r"ttft_p95_ms 200 is below one prefill of 4000 prompt tokens \(300.0 ms"):
        replica_capacity(tr, Slo(ttft_p95_ms=200), step, pre, 8, model="chat")
    with pytest.raises(InputError, match=r"tpot_p95_ms 10 is below one decode step \(20.00 ms"):
        replica_capacity(tr, Slo(tpot_p95_ms=10), step, pre, 8)
