"""benchmarks/compare_servers.py's verdicts: which targets apply (issue 21's for forced answers, issue 30's for answers
ending at EOS) and each round's own ratio (the two runs of a round are neighbours in time)."""

from benchmarks.compare_servers import TARGETS, TARGETS_EOS, round_ratios, verdicts


def row(server, clients, by_round):
    runs = list(by_round.values())
    return {"server": server, "clients": clients, "ok": 10, "lost": 0, "runs": runs, "by_round": by_round,
            "tokens_per_s": sorted(runs)[len(runs) // 2], "latency_p50_s": 0.1}


def test_each_rounds_ratio_pairs_the_runs_of_one_round():
    me, them = row("gpuplan-vllm", 8, {0: 90.0, 1: 200.0, 2: 50.0}), row("vllm", 8, {0: 100.0, 1: 100.0})
    assert round_ratios(me, them) == [0.9, 2.0]  # round 2 has no plain vLLM run: no pair


def test_answers_ending_at_eos_are_judged_by_issue_30s_targets_at_their_own_levels():
    rows = [row("vllm", c, {0: 100.0, 1: 100.0, 2: 100.0}) for c in (1, 8, 16, 32)]
    rows += [row("gpuplan-vllm", 1, {0: 84.0, 1: 86.0, 2: 90.0}), row("gpuplan-vllm", 8, {0: 95.0, 1: 80.0, 2: 91.0}),
             row("gpuplan-vllm", 16, {0: 50.0, 1: 60.0, 2: 95.0}), row("gpuplan-vllm", 32, {0: 10.0, 1: 10.0, 2: 10.0})]
    lines = verdicts(rows, "gpuplan-vllm", TARGETS_EOS)
    assert len(lines) == 3 and not any("at 32 clients" in ln for ln in lines)  # issue 30 names 1, 8 and 16
    one, eight, sixteen = lines
    assert "at 1 clients: tok/s 0.86x (target >= 0.85x): met" in one and "(2 of 3 met)" in one
    assert "at 8 clients: tok/s 0.91x (target >= 0.9x): met" in eight and "each round 0.95, 0.80, 0.91" in eight
    assert "NOT met" in sixteen and "(1 of 3 met)" in sixteen


def test_forced_answers_keep_issue_21s_targets():
    rows = [row("vllm", c, {0: 100.0}) for c in (1, 8, 16)] + [row("gpuplan-vllm", c, {0: 99.0}) for c in (1, 8, 16)]
    lines = verdicts(rows, "gpuplan-vllm", TARGETS)
    assert [ln.split(":")[0] for ln in lines if "tok/s" in ln] == [
        "gpuplan-vllm vs vllm at 1 clients", "gpuplan-vllm vs vllm at 8 clients", "gpuplan-vllm vs vllm at 16 clients"]
    assert "at 8 clients: tok/s 0.99x (target >= 1.0x): NOT met" in lines[1]
    assert any("p50 latency 1.00x (target <= 1.3x): met" in ln for ln in lines)
