"""The node gate's search over arrival orders (rollout._Search.all_land) keeps its states as ints and remembers each
step (rollout._Ids); the gate and completion_order answer from what is remembered alone once a decision's allowance
is spent. Each must give what the plain search gives, having visited the same states in the same order, because the
search budget makes the answer depend on how many states were visited. The plain search is written out here and
compared, state count and budget exception included, on random nodes with a shared memo."""

from __future__ import annotations

import bisect
import random

import pytest

import planner.rollout.gate as R
from planner.placement.problem import RAY_GPU_UNITS


class _Plain:
    """all_land as a direct recursion over (rooms, arriving) tuples, counting the states it visits."""

    def __init__(self, search: R._Search):
        self.search = search  # for completes() (not under test) and the budget
        self.states: dict = {}

    def all_land(self, rooms: tuple, arriving: tuple, phases) -> bool:
        if not sum(arriving):
            return phases is None or self.search.completes(rooms, phases)
        hit = self.states.get((rooms, arriving))
        return hit if hit is not None else self._visit(rooms, arriving, phases)

    def _visit(self, rooms, arriving, phases) -> bool:
        self.search.budget.spend()
        ok = True
        for k, n in enumerate(arriving):
            if not n:
                continue
            u = self.search.classes[k]
            i = bisect.bisect_left(rooms, u)
            if i == len(rooms):
                ok = False
                break
            nxt = tuple(sorted(rooms[:i] + (rooms[i] - u,) + rooms[i + 1:]))
            rest = arriving[:k] + (n - 1,) + arriving[k + 1:]
            if sum(rest):
                hit = self.states.get((nxt, rest))
                if hit is None:
                    hit = self._visit(nxt, rest, phases)
            else:
                hit = phases is None or self.search.completes(nxt, phases)
            if not hit:
                ok = False
                break
        self.states[(rooms, arriving)] = ok
        return ok


def _node(rng: random.Random):
    gpus = rng.randint(1, 8)
    classes = tuple(sorted(rng.sample([1000, 1500, 2500, 3000, 3300, 4000, 5000, 6000, 7500], rng.randint(1, 4)),
                           reverse=True))
    rooms = tuple(sorted(rng.choice([RAY_GPU_UNITS, RAY_GPU_UNITS, 8000, 6500, 5000, 2000, 0]) for _ in range(gpus)))
    return classes, rooms


def _counts(rng, classes, hi):
    return tuple(rng.randint(0, hi) for _ in classes)


def test_interned_search_visits_the_plain_searchs_states():
    outcomes = [outcome for seed in range(60) for outcome in _interned_vs_plain(seed)]
    assert {True, False, "budget spent"} <= set(outcomes)  # open, closed, and searches stopped by the budget


def _interned_vs_plain(seed: int) -> list:
    rng = random.Random(seed)
    classes, _ = _node(rng)
    phases = None if rng.random() < 0.3 else (_counts(rng, classes, 2), _counts(rng, classes, 2))
    budget = rng.choice([40, 400, 10_000])
    asks = [(tuple(sorted(rng.choice([RAY_GPU_UNITS, 8000, 6500, 5000, 2000]) for _ in range(rng.randint(1, 8)))),
             _counts(rng, classes, 3)) for _ in range(12)]
    runs = []
    for plain in (True, False):
        R._MEMO.clear()  # each on its own memo (completes() remembers too)
        search = R._Search(classes, R._Budget(budget))
        who = _Plain(search) if plain else search
        seen = []
        for rooms, arriving in asks:  # several searches sharing one memo and budget, as a decision's gates do
            try:
                seen.append(who.all_land(rooms, arriving, phases))
            except R._TooBig:
                seen.append("budget spent")
            seen.append(search.budget.left)  # the same number of states visited so far
        runs.append(seen)
    assert runs[0] == runs[1], seed
    return runs[0][::2]


def test_gate_with_the_allowance_spent_answers_as_the_search_would():
    """Once the decision's pool is spent, the gate answers from remembered states (_gate_remembered) instead of
    starting a search that raises the pool's exception at its first new state (_gate_search): the same answers and
    the same memo afterwards, over gates with ghosts, after a few gates that remembered states."""
    answers = [a for seed in range(40) for a in _spent_pool(seed)]
    assert {True, False} <= set(answers)  # some gates open from remembered states alone, some stay closed


def _spent_pool(seed: int) -> list:
    rng = random.Random(1000 + seed)
    classes, rooms = _node(rng)
    remaining = dict(zip(classes, _counts(rng, classes, 2)))
    asks = []
    for _ in range(12):
        arriving = {u: n for u, n in zip(classes, _counts(rng, classes, 2)) if n} or {classes[-1]: 1}
        ghosts = [(rng.randrange(len(rooms)), rng.choice(classes))] if rng.random() < 0.3 else []
        asks.append((arriving, ghosts))
    results = []
    for how in (R._gate_remembered, None):
        R._MEMO.clear()
        warm = R._Budget(10_000)
        for arriving, ghosts in asks[::2]:  # some of the states the asks below meet are remembered, some not
            R.node_gate(rooms, arriving, remaining, ghosts, pool=warm)
        spent = R._Budget(0)
        got = []
        for arriving, ghosts in asks:
            cls, (arr, first, then) = R._class_vectors(arriving, remaining, {})
            phases = (first, then)
            memo = R._memo()
            top = ("gate", cls, tuple(rooms), arr, phases, tuple(sorted(ghosts)), R.SEARCH_BUDGET)
            if top in memo:
                got.append(("remembered", memo[top]))
            elif how is None:
                got.append(R._gate_search(rooms, cls, arr, phases, ghosts, R.SEARCH_BUDGET, spent, memo, top))
            else:
                got.append(how(rooms, cls, arr, phases, ghosts, memo, top))
        results.append((got, {k: v for k, v in R._MEMO.items() if k[0] == "gate"}))
    assert results[0] == results[1], seed
    return [g for g in results[0][0] if not isinstance(g, tuple)]


class _SpentUnseen(R._Budget):
    """A spent pool that the shortcut's test does not see (it reads 1 there) and that stops the search at its first
    state (after one spend it reads -1): the search path with the allowance spent."""

    def __init__(self):
        super().__init__(1)
        self.__dict__["_ready"] = True

    @property
    def left(self):
        return -1 if self.__dict__.get("_spent") else 1

    @left.setter
    def left(self, value):
        if self.__dict__.get("_ready"):
            self.__dict__["_spent"] = True


def test_completion_order_with_the_allowance_spent_answers_as_the_search_would():
    seen = set()
    for seed in range(40):
        rng = random.Random(2000 + seed)
        classes, rooms = _node(rng)
        asks = [(dict(zip(classes, _counts(rng, classes, 2))), dict(zip(classes, _counts(rng, classes, 2))))
                for _ in range(10)]
        results = []
        for pool in (lambda: R._Budget(0), _SpentUnseen):
            R._MEMO.clear()
            for first, then in asks[::3]:  # orders remembered for some asks
                R.completion_order(rooms, first, later=then, pool=R._Budget(10_000))
            got = []
            for first, then in asks:
                try:
                    got.append(R.completion_order(rooms, first, later=then, pool=pool()))
                except R._TooBig as exc:
                    got.append(("stopped", exc.pool))
            results.append((got, {k: v for k, v in R._MEMO.items() if k[0] == "order"}))
        assert results[0] == results[1], seed
        seen.update("stopped" if isinstance(g, tuple) and g and g[0] == "stopped" else "none" if g is None
                    else "order" for g in results[0][0])
    assert seen == {"stopped", "none", "order"}


def _plain_order(search: R._Search, rooms: tuple, phases: tuple):
    """The order search as first written (and as the packed-node measurements of issue 31 ran it): sorted steps,
    Ray's best fit by scanning, the memo under the same keys."""
    while phases and not any(phases[0]):
        phases = phases[1:]
    if not phases:
        return ()
    key = ("o", search.classes, rooms, phases)
    if key in search.memo:
        return search.memo[key]
    search.budget.spend()
    found = None
    steps = sorted((k for k in range(len(phases[0])) if phases[0][k]),
                   key=lambda k: (R._Search.waste(rooms, search.classes[k]), -search.classes[k]))
    for k in steps:
        u = search.classes[k]
        fit = [i for i, r in enumerate(rooms) if r >= u]
        if not fit:
            continue
        i = min(fit, key=lambda i: (rooms[i], i))
        nxt = tuple(sorted(rooms[:i] + (rooms[i] - u,) + rooms[i + 1:]))
        head = phases[0][:k] + (phases[0][k] - 1,) + phases[0][k + 1:]
        rest = _plain_order(search, nxt, (head,) + phases[1:])
        if rest is not None:
            found = (u,) + rest
            break
    search.memo[key] = found
    return found


def test_order_search_visits_the_plain_searchs_states():
    """The search's inner loop, written out for speed, finds the same order after the same number of states, and
    stops at the same state when the budget runs out."""
    seen = set()
    for seed in range(300):
        rng = random.Random(5000 + seed)
        classes, rooms = _node(rng)
        phases = (_counts(rng, classes, 3), _counts(rng, classes, 2))
        budget = rng.choice([5, 50, 10_000])
        got = []
        for run in (lambda s: s.order(rooms, phases), lambda s: _plain_order(s, rooms, phases)):
            R._MEMO.clear()
            s = R._Search(classes, R._Budget(budget))
            try:
                got.append((run(s), s.budget.left))
            except R._TooBig:
                got.append(("stopped", s.budget.left))
        assert got[0] == got[1], (seed, classes, rooms, phases, got)
        seen.add("stopped" if got[0][0] == "stopped" else "none" if got[0][0] is None else "order")
    assert seen == {"stopped", "none", "order"}


def _lands(rooms, order, first: dict, then: dict) -> bool:
    """Ray's best fit follows ``order`` on ``rooms``: every replica lands, the first phase's before the second's."""
    rooms = list(rooms)
    need, later = dict(first), dict(then)
    for u in order:
        if any(need.values()):
            if need.get(u, 0) <= 0:
                return False
            need[u] -= 1
        else:
            if later.get(u, 0) <= 0:
                return False
            later[u] -= 1
        i = R.best_fit(rooms, u)
        if i is None:
            return False
        rooms[i] -= u
    return not any(need.values()) and not any(later.values())


def test_completion_order_asks_the_greedy_orders_when_the_search_runs_out():
    """A packed node of the 504-GPU plan with tight minimums (issue 31): one GPU 47% used, seven empty, 17
    minimum replicas of 7 sizes and one extra. The search, which starts tightest-first and backtracks one step at a
    time, does not find an order within a decision's allowance (20,000 states); largest-first lands every replica,
    and completion_order returns it instead of "ask again next decision"."""
    rooms = (4731,) + (RAY_GPU_UNITS,) * 7
    first = {6159: 4, 6138: 3, 3675: 3, 3339: 2, 2616: 1, 2269: 3, 655: 1}
    then = {655: 1}
    classes, (f, t) = R._class_vectors(first, then)
    R._MEMO.clear()
    try:
        R._Search(classes, R._Budget(R.DECISION_BUDGET)).order(rooms, (f, t))
        raise AssertionError("the search found an order within the allowance: the fallback is not what finds it")
    except R._TooBig:
        pass
    R._MEMO.clear()
    order = R.completion_order(rooms, first, later=then, pool=R._Budget(R.DECISION_BUDGET))
    assert order is not None and _lands(rooms, order, first, then)
    assert order[0] == 6159  # largest first
    # the same answer when the allowance was spent before the call
    R._MEMO.clear()
    assert R.completion_order(rooms, first, later=then, pool=R._Budget(0)) == order
    # and a node where no greedy order lands everything still says "ask again" when the allowance is spent
    R._MEMO.clear()
    with pytest.raises(R._TooBig) as exc:
        R.completion_order((RAY_GPU_UNITS,), {6000: 2}, pool=R._Budget(0))
    assert exc.value.pool
