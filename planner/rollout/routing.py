"""Routing a request to one of a model's deployments."""

from __future__ import annotations

from typing import Callable, Sequence


def pick_deployment(cands: Sequence[tuple[str, int, int]], rand: Callable[[], float]) -> str | None:
    """Power of two choices over ``(deployment, running replicas, requests in flight)``: two distinct deployments
    with running replicas drawn at random, the one with fewer requests in flight per running replica wins (ties:
    the first drawn). None when no deployment has a running replica."""
    live = [c for c in cands if c[1] > 0]
    if not live:
        return None
    if len(live) == 1:
        return live[0][0]
    a, b = two_at_random(live, rand)
    score = lambda c: (c[2] + 1) / c[1]  # noqa: E731
    return b[0] if score(b) < score(a) else a[0]


def two_at_random(items: Sequence, rand: Callable[[], float]) -> tuple:
    """Two distinct items of ``items`` (at least two) drawn at random, in the order drawn."""
    i = min(int(rand() * len(items)), len(items) - 1)
    j = min(int(rand() * (len(items) - 1)), len(items) - 2)
    if j >= i:
        j += 1
    return items[i], items[j]


# ---- prefix-aware routing (the replica whose engine's prefix cache holds the prompt's start)

PREFIX_BLOCK_TOKENS = 16  # vLLM's default KV block: its prefix cache keeps and reuses whole blocks
PREFIX_INDEX_BLOCKS = 200_000  # blocks remembered per model (least recently routed forgotten first)


def prefix_hashes(prompt_ids: Sequence[int], block: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """One hash per whole block of ``block`` tokens, each chained on the ones before (as vLLM's prefix cache keys
    its blocks): two prompts share the first k hashes exactly when they share their first k blocks."""
    out: list[int] = []
    h = 0
    for i in range(block, len(prompt_ids) + 1, block):
        h = hash((h, tuple(prompt_ids[i - block:i])))
        out.append(h)
    return out


class PrefixIndex:
    """Which replica each prompt block (its chained hash) was last routed to, for one model: an approximation of
    the replicas' prefix caches that the router keeps itself (as Ray Serve LLM's PrefixCacheAffinityRouter and
    llm-d do), bounded to ``capacity`` blocks, the least recently routed forgotten first."""

    def __init__(self, capacity: int = PREFIX_INDEX_BLOCKS):
        from collections import OrderedDict

        self.capacity = capacity
        self.owner: "OrderedDict[int, str]" = OrderedDict()
        self.sizes: dict[str, int] = {}  # replica -> blocks it holds in the index (its prefix cache's use, roughly)

    def match(self, hashes: Sequence[int], live: "set[str] | dict") -> tuple[str | None, int]:
        """(replica, blocks) of the longest run of leading blocks last routed to one replica still in ``live``;
        (None, 0) when the first block is unknown."""
        owner = self.owner
        lo, hi = 0, len(hashes)  # chained hashes: if block k is known, so (almost always) are the ones before it
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in owner:
                lo = mid
            else:
                hi = mid - 1
        while lo > 0 and owner.get(hashes[lo - 1]) not in live:
            lo -= 1
        return (owner[hashes[lo - 1]], lo) if lo else (None, 0)

    def record(self, hashes: Sequence[int], replica: str) -> None:
        owner, sizes = self.owner, self.sizes
        for h in hashes:
            old = owner.get(h)
            if old != replica:
                if old is not None:
                    sizes[old] -= 1
                sizes[replica] = sizes.get(replica, 0) + 1
            owner[h] = replica
            owner.move_to_end(h)
        while len(owner) > self.capacity:
            _, old = owner.popitem(last=False)
            sizes[old] -= 1


def pick_by_prefix(loads: "dict[str, int]", match: tuple[str | None, int], prompt_blocks: int, rand: Callable[[], float],
                   *, max_imbalance: int, min_match_blocks: int, min_match_rate: float = 0.1,
                   sizes: "dict[str, int] | None" = None) -> tuple[str | None, str]:
    """The replica for a request among ``loads`` (replica -> requests in flight): the one ``match`` names when it
    holds at least ``min_match_blocks`` blocks and ``min_match_rate`` of the prompt's and has at most
    ``max_imbalance`` more requests in flight than the least loaded ("prefix"). A prompt no replica holds gains
    nothing from any cache, so it goes to the least loaded replica, and among equally loaded ones to the one holding
    the fewest blocks in the index (``sizes``: the most room in its prefix cache, as Ray Serve LLM's router picks the
    smallest tree), so that new prefixes spread over the caches ("room"). Otherwise, or without ``sizes``, the less
    loaded of two drawn at random ("load"; "imbalanced" when a match was passed over for load). (None, "none") when
    ``loads`` is empty."""
    if not loads:
        return None, "none"
    replica, blocks = match
    least = min(loads.values())
    if replica in loads and blocks >= min_match_blocks and blocks >= min_match_rate * max(prompt_blocks, 1):
        if loads[replica] - least <= max_imbalance:
            return replica, "prefix"
        why = "imbalanced"
    else:
        why = "load"
        if sizes is not None:
            return min(loads, key=lambda k: (loads[k], sizes.get(k, 0))), "room"
    keys = list(loads)
    if len(keys) == 1:
        return keys[0], why
    a, b = two_at_random(keys, rand)
    return (a if loads[a] <= loads[b] else b), why
