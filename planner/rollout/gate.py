"""Ray's GPU choice (best fit, in arrival order) and the node gate: may a node take one more starting replica, whatever
order its starting replicas reach Ray in, and still bring up what is planned there? Searches with a budget and a
memo of answers; the budget is part of the answer (a search that passes it says 'not shown safe')."""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from typing import Iterable, Mapping, Sequence

from planner.placement.packing import RAY_GPU_UNITS

# NOTE: how long a replica that left Serve's running set may still hold its GPU share: Serve's graceful shutdown
# (graceful_shutdown_timeout_s, 30 s in serve/app/build.py) plus the actor's exit. Until then the node gate plans both
# for the share being held and for it being free.
GHOST_S = 40.0
# Ghosts per node the gate enumerates (2**k worlds); with more, the node takes no new replica until they expire
# (Serve still restarts the replicas it already has).
MAX_GHOSTS = 4
# States the node gate's searches may visit before it answers "not shown safe".
SEARCH_BUDGET = 2_000
# A settled node (nothing on its way, no ghost) whose gate stays closed gets one deeper search for an order that
# brings up all its planned replicas; its first step is then safe, and so is every next one.
DEEP_SEARCH_BUDGET = 50_000
# States all the searches of one decision may visit together (answers are remembered, so a later decision goes on
# where this one stopped): keeps one decision within tens of milliseconds on the Serve controller.
DECISION_BUDGET = 20_000
# The node gate's searches remember their answers (keyed by sorted rooms and replica counts, so a hit is exact);
# the memory is dropped when it holds more than this many.
MEMO_MAX = 500_000
_MEMO: dict = {}
_UNSEEN = object()


def best_fit(rooms: Sequence[int], units: int) -> int | None:
    """The GPU Ray gives a request of ``units`` on a node whose GPUs have ``rooms`` free (1e-4 units): the one with
    the least room that holds it, ties to the lowest index (raylet ``resource_instance_set.cc``, measured in
    docs/ray-gpu-fractions.md). None when no GPU holds it: the request stays pending."""
    best = None
    for i, r in enumerate(rooms):
        if r >= units and (best is None or r < rooms[best]):
            best = i
    return best


class _TooBig(Exception):
    def __init__(self, pool: bool = False):
        super().__init__()
        self.pool = pool  # the decision's shared pool ran out (retry later), not this search's own budget


class _Budget:
    """States a search may visit; ``pool`` is the whole decision's (shared by its searches)."""

    def __init__(self, n: int, pool: "_Budget | None" = None):
        self.left = n
        self.pool = pool

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooBig()
        if self.pool is not None:
            self.pool.left -= 1
            if self.pool.left < 0:
                raise _TooBig(pool=True)


# all_land's states live in one sub-dictionary per (sizes, phases) inside _MEMO (cheaper keys); _MEMO_SUB counts
# [sub-dictionaries, their entries] so that the memo is cleared at the same size as if they were top-level keys.
_MEMO_SUB = [0, 0]


def _memo() -> dict:
    if not _MEMO:  # cleared from outside (a benchmark's cold start)
        _MEMO_SUB[0] = _MEMO_SUB[1] = 0
    if len(_MEMO) - _MEMO_SUB[0] + _MEMO_SUB[1] > MEMO_MAX:
        _MEMO.clear()
        _MEMO_SUB[0] = _MEMO_SUB[1] = 0
    return _MEMO


class _Search:
    """Best-fit searches over one node's states. A state is the GPUs' free units as a sorted tuple (GPUs with equal
    room are interchangeable) and, per phase, a count per replica size (``classes``, largest first)."""

    def __init__(self, classes: Sequence[int], budget: _Budget):
        self.classes = tuple(classes)
        self.budget = budget
        self.memo = _memo()

    @staticmethod
    def place(rooms: tuple, u: int) -> tuple | None:
        i = bisect.bisect_left(rooms, u)  # the least room that holds u: Ray's best fit
        if i == len(rooms):
            return None
        room = rooms[i] - u  # below rooms[i]: it moves left (the rooms stay sorted)
        j = bisect.bisect_left(rooms, room, 0, i)
        return rooms[:j] + (room,) + rooms[j:i] + rooms[i + 1:]

    @staticmethod
    def waste(rooms: tuple, u: int) -> int:
        """Room left on the GPU best fit gives ``u`` (more than a GPU when none holds it)."""
        i = bisect.bisect_left(rooms, u)
        return rooms[i] - u if i < len(rooms) else RAY_GPU_UNITS + 1

    def greedy(self, rooms: tuple, phases: tuple, tight: bool) -> bool:
        """Largest first (best fit decreasing), or the step that leaves its GPU the least room, phase by phase."""
        place, classes = self.place, self.classes
        for counts in phases:
            if not tight:  # largest first: each size's replicas one after another, by best fit
                for k, n in enumerate(counts):
                    for _ in range(n):
                        rooms = place(rooms, classes[k])
                        if rooms is None:
                            return False
                continue
            left = list(counts)
            while any(left):  # the step that leaves its GPU the least room (the larger on a tie)
                w, _, k = min((self.waste(rooms, u), -u, k) for k, u in enumerate(classes) if left[k])
                if w > RAY_GPU_UNITS:
                    return False
                rooms = place(rooms, classes[k])
                left[k] -= 1
        return True

    def _steps(self, rooms: tuple, counts: tuple) -> list[int]:
        """Class indexes to try next, the one leaving the least room first."""
        return sorted((k for k in range(len(counts)) if counts[k]),
                      key=lambda k: (self.waste(rooms, self.classes[k]), -self.classes[k]))

    def order(self, rooms: tuple, phases: tuple) -> tuple | None:
        """Units of each step of an order that lands every replica of ``phases`` (phase by phase), or None. Steps
        are tried in :meth:`_steps`' order (written out here: this is the search's inner loop)."""
        while phases and not any(phases[0]):
            phases = phases[1:]
        if not phases:
            return ()
        memo = self.memo
        key = ("o", self.classes, rooms, phases)
        found = memo.get(key, _UNSEEN)
        if found is not _UNSEEN:
            return found
        self.budget.spend()
        found = None
        classes, head, n_rooms = self.classes, phases[0], len(rooms)
        steps = []
        for k, n in enumerate(head):
            if n:
                u = classes[k]
                i = bisect.bisect_left(rooms, u)  # best fit: the least room that holds u
                if i < n_rooms:  # (a class no GPU holds is skipped: placing it fails)
                    steps.append((rooms[i] - u, -u, k, i))
        steps.sort()
        for room, neg_u, k, i in steps:
            j = bisect.bisect_left(rooms, room, 0, i)
            nxt = rooms[:j] + (room,) + rooms[j:i] + rooms[i + 1:]
            rest = self.order(nxt, (head[:k] + (head[k] - 1,) + head[k + 1:],) + phases[1:])
            if rest is not None:
                found = (-neg_u,) + rest
                break
        memo[key] = found
        return found

    def completes(self, rooms: tuple, phases: tuple) -> bool:
        while phases and not any(phases[0]):
            phases = phases[1:]
        if not phases:
            return True
        key = ("c", self.classes, rooms, phases)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        ok = self.greedy(rooms, phases, False) or self.greedy(rooms, phases, True) or \
            self.order(rooms, phases) is not None
        self.memo[key] = ok
        return ok

    def all_land(self, rooms: tuple, arriving: tuple, phases: tuple | None) -> bool:
        """Every order of ``arriving`` lands each, and then (``phases`` not None) ``phases`` can still land."""
        left = sum(arriving)
        if not left:
            return phases is None or self.completes(rooms, phases)
        sub_key = ("a", self.classes, phases)
        states = self.memo.get(sub_key)
        if states is None:
            states = self.memo[sub_key] = {}
            _MEMO_SUB[0] += 1
        ids = _ids(self.memo, self.classes)
        rid, aid = ids.rooms_id(rooms), ids.arriving_id(arriving)
        hit = states.get(rid << 32 | aid)
        if hit is not None:
            return hit
        return self._all_land(rid, aid, left, phases, states, ids)

    def _all_land(self, rid: int, aid: int, left: int, phases: tuple | None, states: dict, ids: "_Ids") -> bool:
        """all_land of a state not in ``states`` (rooms ``rid``, arriving ``aid``, ``left`` replicas arriving > 0);
        children found in ``states`` are read there without a call."""
        self.budget.spend()
        ok = True
        steps = ids.steps[rid]
        kids = ids.kids[aid]
        if kids is None:
            kids = ids.arrivals(aid)
        for u, child in kids:  # each size with a replica arriving, largest first
            nxt = steps.get(u)
            if nxt is None:
                nxt = ids.step(rid, u)
            if nxt < 0:  # no GPU holds it
                ok = False
                break
            if left > 1:
                hit = states.get(nxt << 32 | child)
                if hit is None:
                    hit = self._all_land(nxt, child, left - 1, phases, states, ids)
                if not hit:
                    ok = False
                    break
            elif phases is not None and not self.completes(ids.rooms[nxt], phases):
                ok = False
                break
        states[rid << 32 | aid] = ok
        _MEMO_SUB[1] += 1
        return ok


class _Ids:
    """all_land's states as one int each (``rooms id << 32 | arriving id``), with every step from a state worked
    out once: the node's rooms (sorted tuples) and the arriving counts (tuples over one list of sizes) numbered as
    first met, best fit's move for each (rooms, size) and the one-fewer counts for each (counts, size) remembered.
    The same states in the same order as searching on the tuples themselves, without building tuples per step."""

    def __init__(self, classes: tuple):
        self.classes = classes
        self.rooms_ids: dict[tuple, int] = {}
        self.rooms: list[tuple] = []
        self.steps: list[dict[int, int]] = []  # per rooms id: size -> rooms id after best fit places it (-1: none)
        self.arr_ids: dict[tuple, int] = {}
        self.arr: list[tuple] = []
        self.kids: list[list | None] = []  # per arriving id: [(size, arriving id with one fewer)], largest first

    def rooms_id(self, rooms: tuple) -> int:
        i = self.rooms_ids.get(rooms)
        if i is None:
            i = self.rooms_ids[rooms] = len(self.rooms)
            self.rooms.append(rooms)
            self.steps.append({})
        return i

    def arriving_id(self, arriving: tuple) -> int:
        i = self.arr_ids.get(arriving)
        if i is None:
            i = self.arr_ids[arriving] = len(self.arr)
            self.arr.append(arriving)
            self.kids.append(None)
        return i

    def known_key(self, rooms: tuple, arriving: tuple) -> int | None:
        """The state's int when both parts were numbered already, else None (a state never met); numbers nothing."""
        rid, aid = self.rooms_ids.get(rooms), self.arr_ids.get(arriving)
        return None if rid is None or aid is None else rid << 32 | aid

    def step(self, rid: int, u: int) -> int:
        """The rooms id after best fit places ``u`` on rooms ``rid`` (-1: no GPU holds it); remembered."""
        rooms = self.rooms[rid]
        i = bisect.bisect_left(rooms, u)  # _Search.place, inline
        if i == len(rooms):
            self.steps[rid][u] = -1
            return -1
        room = rooms[i] - u
        j = bisect.bisect_left(rooms, room, 0, i)
        nxt = rooms[:j] + (room,) + rooms[j:i] + rooms[i + 1:]
        n = self.rooms_ids.get(nxt)
        if n is None:
            n = self.rooms_ids[nxt] = len(self.rooms)
            self.rooms.append(nxt)
            self.steps.append({})
        self.steps[rid][u] = n
        return n

    def arrivals(self, aid: int) -> list:
        kids = self.kids[aid]
        if kids is None:
            a = self.arr[aid]
            kids = self.kids[aid] = [(self.classes[k], self.arriving_id(a[:k] + (n - 1,) + a[k + 1:]))
                                     for k, n in enumerate(a) if n]
        return kids


def _ids(memo: dict, classes: tuple) -> _Ids:
    """The memo's state numbering for ``classes`` (kept with the states it numbers; cleared with them)."""
    ids = memo.get(("ids", classes))
    if ids is None:
        ids = memo[("ids", classes)] = _Ids(classes)
        _MEMO_SUB[0] += 1  # not a state: kept out of the memo's size, as the sub-dictionaries
    return ids


def _class_vectors(*maps) -> tuple[tuple[int, ...], list[tuple]]:
    """(replica sizes with a nonzero count in any of ``maps``, largest first; per map, its counts in that order)."""
    counts = []
    for m in maps:
        if not m:
            counts.append({})
            continue
        items = m.items() if hasattr(m, "items") else dict(m).items()
        counts.append({int(u): int(n) for u, n in items if n})
    classes = tuple(sorted({u for d in counts for u in d}, reverse=True))
    zeros = (0,) * len(classes)
    return classes, [tuple(map(d.get, classes, zeros)) for d in counts]


def _plus(a: Mapping[int, int], b: Mapping[int, int]) -> Counter:
    """Two count maps added (positive counts only, as Counters add)."""
    out = Counter(a)
    out.update(b)
    return +out


def node_gate(rooms: Sequence[int], arriving: Mapping[int, int], remaining: Mapping[int, int] = (),
              ghosts: Sequence[tuple[int, int]] = (), *, later: Mapping[int, int] = (), complete: bool = True,
              budget: int = SEARCH_BUDGET, pool: _Budget | None = None) -> bool:
    """May these replicas be on their way to one node at once?

    ``rooms``: each GPU's free units counting the replicas known to hold it; ``arriving``: units -> how many
    replicas have no known GPU yet (starting, or running but not yet reported, plus the ones to start now);
    ``remaining``: units -> planned replicas of the node not yet asked for, and ``later`` those that may only be
    asked for after all of ``remaining`` (extra replicas after the minimums); ``ghosts``: (GPU position, units) of
    replicas that stopped recently and may still hold their share. True when, whichever ghosts still hold and in
    whatever order the arriving replicas reach Ray, each lands (best fit) and, with ``complete``, the remaining ones
    can still land afterwards in some order. A search past ``budget`` states answers False (not shown safe); one
    that exhausts ``pool`` (a decision's shared allowance) answers False without remembering it."""
    ghosts = list(ghosts)
    if len(ghosts) > MAX_GHOSTS:
        return False
    classes, (arr, first, then) = _class_vectors(arriving, remaining, later)
    return _gate(rooms, classes, arr, (first, then) if complete else None, ghosts, budget, pool)


def _gate(rooms: Sequence[int], classes: tuple, arr: tuple, phases: tuple | None, ghosts: list, budget: int,
          pool: _Budget | None) -> bool:
    """:func:`node_gate` on count vectors over ``classes`` (at most MAX_GHOSTS ``ghosts``)."""
    memo = _memo()
    top = ("gate", classes, tuple(rooms), arr, phases, tuple(sorted(ghosts)), budget)
    if top in memo:
        return memo[top]
    if pool is not None and pool.left <= 0 < budget and any(arr):
        return _gate_remembered(rooms, classes, arr, phases, ghosts, memo, top)
    return _gate_search(rooms, classes, arr, phases, ghosts, budget, pool, memo, top)


def _worlds(rooms: Sequence[int], ghosts: list) -> Iterable[tuple]:
    """The node's rooms (sorted) for each subset of the ghosts still holding their share that Ray can hold at once."""
    for held in itertools.product((False, True), repeat=len(ghosts)):
        world = list(rooms)
        for (pos, units), h in zip(ghosts, held):
            if h:
                world[pos] -= units
        if min(world, default=0) >= 0:
            yield tuple(sorted(world))


def _gate_search(rooms, classes, arr, phases, ghosts, budget, pool, memo, top) -> bool:
    search = _Search(classes, _Budget(budget, pool))
    try:
        for world in _worlds(rooms, ghosts):
            if not search.all_land(world, arr, phases):
                memo[top] = False
                return False
    except _TooBig as exc:
        if not exc.pool:
            memo[top] = False
        return False
    memo[top] = True
    return True


def _gate_remembered(rooms, classes, arr, phases, ghosts, memo, top) -> bool:
    """The gate once the decision's allowance is spent: every search would stop at its first new state (the pool
    exception, answer False, nothing remembered), so only remembered states answer; the same answer, and the same
    entries remembered, as :func:`_gate_search` (without raising and catching at every closed gate)."""
    states = memo.get(("a", classes, phases))
    ids = memo.get(("ids", classes))
    for world in _worlds(rooms, ghosts):
        key = None if ids is None or states is None else ids.known_key(world, arr)
        hit = None if key is None else states.get(key)
        if hit is None:
            return False  # a new state: the search would have raised the pool's exception
        if not hit:
            memo[top] = False
            return False
    memo[top] = True
    return True


def completion_order(rooms: Sequence[int], remaining: Mapping[int, int], *, later: Mapping[int, int] = (),
                     budget: int = DEEP_SEARCH_BUDGET, pool: _Budget | None = None) -> tuple[int, ...] | None:
    """An order (the units of each replica, one at a time) in which a node whose GPUs have ``rooms`` free can start
    ``remaining`` and then ``later`` so that Ray's best fit lands every one; None when none was found within
    ``budget`` states (raises the budget's exception when ``pool``, the decision's allowance, ran out first). Each
    order found is remembered by its state, so following it step by step costs nothing."""
    classes, (first, then) = _class_vectors(remaining, later)
    memo = _memo()
    top = ("order", classes, tuple(sorted(rooms)), first, then, budget)
    if top in memo:
        return memo[top]
    if pool is not None and pool.left <= 0 < budget:  # the allowance is spent: only a remembered order answers
        phases = tuple(itertools.dropwhile(lambda c: not any(c), (first, then)))
        found = memo.get(("o", classes, top[2], phases), False) if phases else ()
        if found is False:  # the search would stop at its first state, then ask the greedy orders
            found = _greedy_order(top[2], classes, (first, then))
            if found is None:
                raise _TooBig(pool=True)
        memo[top] = found
        return found
    try:
        found = _Search(classes, _Budget(budget, pool)).order(tuple(sorted(rooms)), (first, then))
    except _TooBig as exc:
        # out of states: the greedy orders (no state each) may still know one; else not an answer when the
        # decision's allowance ran out (ask again next decision), "none found" when this search's own did
        found = _greedy_order(top[2], classes, (first, then))
        if found is None and exc.pool:
            raise
    memo[top] = found
    return found


def _greedy_order(rooms: tuple, classes: tuple, phases: tuple) -> tuple[int, ...] | None:
    """The units of each step of largest-first (best fit decreasing), else of tightest-first (the step that leaves
    its GPU the least room), phase by phase, when that order lands every replica; else None. Asked when the search
    runs out of states: on a packed node the search, which starts tightest-first and backtracks one step at a time,
    spent its whole allowance in each of 11 decisions (175,000 states, 504 GPUs x 40 models with tight minimums)
    where largest-first lands every replica at once."""
    for tight in (False, True):
        r, steps = rooms, []
        for counts in phases:
            left = list(counts)
            while any(left):
                if tight:
                    k = min((_Search.waste(r, u), -u, k) for k, u in enumerate(classes) if left[k])[2]
                else:
                    k = next(k for k in range(len(classes)) if left[k])
                nxt = _Search.place(r, classes[k])
                if nxt is None:
                    break
                r = nxt
                left[k] -= 1
                steps.append(classes[k])
            if any(left):
                break
        else:
            return tuple(steps)
    return None


def _greedy_count(rooms: Sequence[int], remaining: Mapping[int, int]) -> int:
    """How many of ``remaining`` the better of largest-first and tightest-first lands (the rest left out)."""
    classes, (counts,) = _class_vectors(remaining)
    best = 0
    for tight in (False, True):
        r, left, n = tuple(sorted(rooms)), list(counts), 0
        while True:
            cands = [(_Search.waste(r, u), -u, k) for k, u in enumerate(classes) if left[k]]
            cands = [c for c in cands if c[0] <= RAY_GPU_UNITS]
            if not cands:
                break
            k = min(cands)[2] if tight else min(cands, key=lambda c: c[1])[2]
            r = _Search.place(r, classes[k])
            left[k] -= 1
            n += 1
        best = max(best, n)
    return best


def no_regret(rooms: Sequence[int], units: int, remaining: Mapping[int, int]) -> bool:
    """On a settled node where no order bringing up every planned replica was found: a step of ``units`` is still
    taken when it lands and, after it, the greedy orders land as many of the other planned replicas as they would
    have landed with it among them (it costs no other replica a place that greedy could give it)."""
    i = best_fit(rooms, units)
    if i is None:
        return False
    before = _greedy_count(rooms, Counter(dict(remaining)) + Counter({units: 1}))
    after = list(rooms)
    after[i] -= units
    return 1 + _greedy_count(after, remaining) >= before
