"""Prefix-aware routing (planner/rollout/routing.py): block hashes as vLLM's prefix cache keys them, the index of
which replica each block went to, and the choice between the prefix's replica and the less loaded of two."""

from __future__ import annotations

import random

from planner.rollout.routing import PrefixIndex, pick_by_prefix, prefix_hashes

SYSTEM_A = list(range(1000, 1400))  # a 400-token system prompt
SYSTEM_B = list(range(5000, 5400))


def test_hashes_are_chained_per_whole_block():
    a = prefix_hashes(SYSTEM_A + [1, 2, 3])
    b = prefix_hashes(SYSTEM_A + [7, 8, 9, 10] * 10)
    assert len(a) == 400 // 16 and len(b) == (400 + 40) // 16
    assert a == b[:len(a)]  # the same 25 leading blocks
    c = prefix_hashes([0] + SYSTEM_A[1:])
    assert all(x != y for x, y in zip(a, c))  # one token differs in block 0: every later block differs too
    assert prefix_hashes(list(range(15))) == []  # no whole block


def test_index_finds_the_longest_run_on_a_live_replica():
    idx = PrefixIndex()
    ha = prefix_hashes(SYSTEM_A + list(range(64)))
    idx.record(ha[:20], "r1")
    idx.record(ha, "r2")  # a longer prompt with the same start went to r2 later
    assert idx.match(ha, {"r1", "r2"}) == ("r2", len(ha))
    assert idx.match(ha[:10], {"r1", "r2"}) == ("r2", 10)
    # r2 is gone: nothing of it counts, and the blocks r1 was the last to get are... none (r2 overwrote them)
    assert idx.match(ha, {"r1"}) == (None, 0)
    assert idx.match(prefix_hashes(SYSTEM_B), {"r1", "r2"}) == (None, 0)


def test_index_forgets_the_least_recently_routed_blocks_first():
    idx = PrefixIndex(capacity=30)
    ha, hb = prefix_hashes(SYSTEM_A), prefix_hashes(SYSTEM_B)  # 25 blocks each
    idx.record(ha, "r1")
    idx.record(hb, "r2")
    assert len(idx.owner) == 30
    assert idx.match(hb, {"r1", "r2"}) == ("r2", 25)
    assert idx.match(ha, {"r1", "r2"}) == (None, 0)  # A's first blocks went first


def _route(idx, loads, prompt, **kw):
    hashes = prefix_hashes(prompt)
    rid, why = pick_by_prefix(loads, idx.match(hashes, loads), len(hashes), random.Random(1).random,
                              max_imbalance=kw.get("max_imbalance", 4), min_match_blocks=kw.get("min_match_blocks", 2),
                              sizes=idx.sizes)
    idx.record(hashes, rid)
    return rid, why


def test_requests_sharing_a_system_prompt_follow_it_while_the_load_allows():
    idx = PrefixIndex()
    loads = {"r1": 0, "r2": 0, "r3": 0}
    first, why = _route(idx, loads, SYSTEM_A + [1, 2, 3] * 10)
    assert why == "room"
    for q in range(5):
        rid, why = _route(idx, loads, SYSTEM_A + [q] * 30)
        assert (rid, why) == (first, "prefix")
    # a different system prompt goes where the index holds least (not where A went), then sticks there
    other, why = _route(idx, loads, SYSTEM_B + [1] * 30)
    assert why == "room" and other != first
    assert _route(idx, loads, SYSTEM_B + [2] * 30) == (other, "prefix")
    # the prefix's replica has 5 more in flight than the least loaded (bound 4): load wins
    rid, why = _route(idx, {**loads, first: 5}, SYSTEM_A + [9] * 30)
    assert why == "imbalanced" and rid != first
    assert _route(idx, {**loads, first: 4}, SYSTEM_A + [8] * 30)[1] == "prefix"


def test_a_short_shared_start_does_not_pin_requests():
    """A chat template's header is shared by every prompt: one block in common is below min_match_blocks (2), and
    two blocks of a 400-token prompt are below 10% of it."""
    idx = PrefixIndex()
    header = list(range(16))
    _route(idx, {"r1": 0, "r2": 0}, header + SYSTEM_A)
    assert _route(idx, {"r1": 0, "r2": 0}, header + SYSTEM_B)[1] == "room"
    header2 = list(range(32))
    _route(idx, {"r1": 0, "r2": 0}, header2 + SYSTEM_A)
    assert _route(idx, {"r1": 0, "r2": 0}, header2 + SYSTEM_B)[1] == "room"  # 2 of 27 blocks < 10%


def test_by_load_picks_the_less_loaded_of_two():
    idx = PrefixIndex()
    loads = {"r1": 7, "r2": 1}
    for seed in range(10):
        hashes = prefix_hashes(list(range(seed * 100, seed * 100 + 64)))
        rid, why = pick_by_prefix(loads, idx.match(hashes, loads), len(hashes), random.Random(seed).random,
                                  max_imbalance=4, min_match_blocks=2)
        assert (rid, why) == ("r2", "load")
    assert pick_by_prefix({}, (None, 0), 3, random.random, max_imbalance=4, min_match_blocks=2) == (None, "none")


def test_new_prefixes_spread_over_the_caches_and_sizes_follow_the_index():
    """Eight system prompts, one at a time on idle replicas: each new one goes to the replica holding the fewest
    blocks, so each of two replicas gets four (routing by load alone split them at random: 6 and 2 in a measured
    run, more than one replica's KV cache held)."""
    idx = PrefixIndex()
    loads = {"r1": 0, "r2": 0}
    where = {}
    for t in range(8):
        prompt = list(range(t * 1000, t * 1000 + 400)) + [7] * 20
        where[t] = _route(idx, loads, prompt)[0]
    assert sorted(list(where.values()).count(r) for r in loads) == [4, 4]
    assert idx.sizes == {r: sum(len(prefix_hashes(list(range(t * 1000, t * 1000 + 400)) + [7] * 20))
                                for t in where if where[t] == r) for r in loads}
    small = PrefixIndex(capacity=10)
    small.record(prefix_hashes(SYSTEM_A), "r1")
    assert small.sizes == {"r1": 10}
    small.record(prefix_hashes(SYSTEM_A)[:4], "r2")  # 4 blocks more for r2: the 4 oldest of r1 are forgotten
    assert small.sizes == {"r1": 6, "r2": 4} and len(small.owner) == 10
    # a miss goes to the least loaded, even one request apart; the fewest blocks only among equal loads
    for loads, expect in (({"r1": 9, "r2": 0}, "r2"), ({"r1": 1, "r2": 0}, "r2"), ({"r1": 0, "r2": 0, "r3": 0}, "r1"),
                          ({"r1": 2, "r2": 1, "r3": 1}, "r3")):
        rid, why = pick_by_prefix(loads, (None, 0), 3, random.random, max_imbalance=4, min_match_blocks=2,
                                  sizes={"r1": 0, "r2": 100, "r3": 50})
        assert (rid, why) == (expect, "room"), loads
