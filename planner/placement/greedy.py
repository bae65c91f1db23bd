"""Greedy placement of the minimum replicas (spread-first and plain best-fit decreasing, then the exact search
within a budget) and the choice of each model's quantization (exhaustive over small combinations, else greedy
downgrade and upgrade), with the reason for each rank."""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from planner.units import format_bytes
from planner.placement.exact import _colgen_fill, _milp  # noqa: F401
from planner.placement.problem import EXACT_MAX_VARS, EXHAUSTIVE_QUANT_MAX, _Problem, _State  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Minimum replicas: heuristics, then the exact program


class _Budget:
    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)
        self.deadline = time.perf_counter() + self.seconds
        self.timed_out = False

    def left(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())


def _min_bound_ok(P: _Problem, st: _State, models: Sequence[int]) -> bool:
    """Cheap necessary conditions for placing every min replica (False = proven impossible)."""
    np = P.np
    need = 0
    for m in models:
        k = int(P.min_rep[m])
        if k == 0:
            continue
        mask = st.fits_mask(m)
        if not mask.any():
            return False
        per_bin = st.rem[mask] // max(int(st.size[m]), 1)
        u = st.units[m, mask]
        per_bin = np.where(u > 0, np.minimum(per_bin, st.rem_units[mask] // np.maximum(u, 1)), per_bin)
        if int(per_bin.sum()) < k:
            return False
        need += k * int(st.size[m])
    return need <= int(st.rem[P.E[list(models)].any(axis=0)].sum()) if models else True


def _place_min_heuristic(st: _State, models: Sequence[int], spread: bool) -> bool:
    """Best-fit decreasing over the min replicas (largest first); with ``spread``, a replica first goes to the node
    and then the GPU with the fewest replicas of its model. Places what it can; True when every one was placed."""
    order = sorted(
        ((int(st.size[m]), m) for m in models for _ in range(int(st.P.min_rep[m]) - int(st.placed[m]))),
        key=lambda t: (-t[0], t[1]),
    )
    ok = True
    for _, m in order:
        b = st.choose(m, spread)
        if b < 0:
            ok = False
            continue
        st.place(m, b)
    return ok


def _place_mins(P: _Problem, choice: Sequence[int], models: Sequence[int], budget: _Budget, *, use_milp: bool = True):
    """Place the min replicas of ``models`` at ``choice``. Returns (status, state, method): heuristics first, then
    column generation (max replicas placed with ``y_m <= min_m``: feasible iff it reaches the sum of minimums,
    proven infeasible when its bound is below), then one variable per (model, GPU) if still undecided."""
    base = _State(P, choice)
    if not _min_bound_ok(P, base, models):
        return "infeasible", None, "bound"
    partial = None
    for spread in (True, False):
        st = base.copy()
        if _place_min_heuristic(st, models, spread):
            return "feasible", st, "spread" if spread else "best-fit"
        partial = st
    if not use_milp or budget.left() <= 0.01:
        budget.timed_out = budget.timed_out or use_milp
        return "unknown", None, "heuristic"
    need = int(sum(int(P.min_rep[m]) for m in models))
    zeros = P.np.zeros(P.nm, dtype=P.np.int64)
    res = _colgen_fill(base, models, zeros, P.min_rep, partial, budget.left())
    if res.objective is not None and res.objective >= need:
        st = base.with_placed(res.x)
        _respread(st, models)
        return "feasible", st, "exact"
    if res.bound is not None and res.bound < need:
        return "infeasible", None, "exact"
    if budget.left() <= 0.01:
        budget.timed_out = True
        return "unknown", None, "exact"
    lo = P.min_rep
    res = _milp(base, models, lo, lo, maximize=False, time_limit=budget.left())
    if res.status in ("optimal", "feasible"):
        st = base.with_placed(res.x)
        _respread(st, models)
        return "feasible", st, "exact"
    if res.status == "unknown":
        budget.timed_out = True
    return res.status, None, "exact"


def _respread(st: _State, models: Sequence[int], max_moves: int | None = None):
    """Move replicas to reduce how many replicas of one model share a node, then a GPU (anti-affinity), without
    changing any count. Used after exact placements, which ignore spreading."""
    P = st.P
    np = P.np
    if max_moves is None:
        max_moves = 4 * int(st.placed.sum()) + 8
    moves = 0
    for m in models:
        while moves < max_moves:
            src = np.flatnonzero(st.cnt[m] > 0)
            if src.size <= 0:
                break
            cn_src = st.cnt_node[m, P.node_of[src]]
            cb_src = st.cnt[m, src]
            order = np.lexsort((-cb_src, -cn_src))
            moved = False
            for a in src[order]:
                a = int(a)
                st.remove(m, a)
                mask = st.fits_mask(m)
                mask[a] = False
                cand = np.flatnonzero(mask)
                na = P.node_of[a]
                if cand.size:
                    cn = st.cnt_node[m, P.node_of[cand]]
                    cb = st.cnt[m, cand]
                    cn_a = st.cnt_node[m, na]  # after removal
                    cb_a = st.cnt[m, a]
                    same = P.node_of[cand] == na
                    better = np.where(same, cb < cb_a, (cn < cn_a) | ((cn == cn_a) & (cb < cb_a)))
                    cand = cand[better]
                if cand.size:
                    cn = st.cnt_node[m, P.node_of[cand]]
                    cand = cand[cn == cn.min()]
                    cb = st.cnt[m, cand]
                    cand = cand[cb == cb.min()]
                    b = int(cand[np.argmin(st.rem[cand])])
                    st.place(m, b)
                    moves += 1
                    moved = True
                    break
                st.place(m, a)
            if not moved:
                break


# ----------------------------------------------------------------------------------------------------------------
# Quantization choice


def _choose_quantization(P: _Problem, fit_ranks: dict, active: list[int], budget: _Budget):
    """Pick one option per active model (min_replicas > 0, fits somewhere).

    Returns (choice, state, search, method, reasons, proven); choice is None when even the least-memory options do
    not fit. The exact program is asked on every candidate only when the instance is small (models x GPUs <=
    EXACT_MAX_VARS); on larger ones candidates are checked by the heuristics and the program is asked once, on the
    least-memory combination, when every heuristic check failed."""
    choice = [0] * P.nm
    for m in range(P.nm):
        if fit_ranks.get(m):
            choice[m] = fit_ranks[m][0]
    reasons: dict[int, str] = {}
    if not active:
        return choice, _State(P, choice), "none", "none", reasons, True
    small = int(sum(P.E[m].sum() for m in active)) <= EXACT_MAX_VARS
    n_combos = 1
    for m in active:
        n_combos *= len(fit_ranks[m])
        if n_combos > EXHAUSTIVE_QUANT_MAX:
            break

    def least_memory_exact():
        ch = list(choice)
        for m in active:
            ch[m] = _smallest_choice(P, fit_ranks, m)
        status, st, method = _place_mins(P, ch, active, budget, use_milp=True)
        return (ch, st, method) if status == "feasible" else (None, None, method)

    if n_combos <= EXHAUSTIVE_QUANT_MAX:
        combos = list(itertools.product(*[fit_ranks[m] for m in active]))
        combos.sort(key=lambda c: (sum(c), c))
        unknown_before = False
        for combo in combos:
            ch = list(choice)
            for m, r in zip(active, combo):
                ch[m] = r
            status, st, method = _place_mins(P, ch, active, budget, use_milp=small)
            if status == "feasible":
                for m, r in zip(active, combo):
                    reasons[m] = _why_rank(P, m, r, "exhaustive" if small else "heuristic")
                return ch, st, "exhaustive", method, reasons, small and not unknown_before
            if status == "unknown":
                unknown_before = True
        if not small:
            ch, st, method = least_memory_exact()
            if ch is not None:
                for m in active:
                    reasons[m] = _why_rank(P, m, ch[m], "heuristic")
                return ch, st, "exhaustive", method, reasons, False
        return None, None, "exhaustive", "none", reasons, not unknown_before
    # greedy downgrade
    ch = list(choice)
    downgraded: dict[int, list[str]] = {}
    while True:
        status, st, method = _place_mins(P, ch, active, budget, use_milp=small)
        if status == "feasible":
            break
        best = None
        for m in active:
            cur = ch[m]
            cur_size = P.demands[m].options[cur].replica_bytes
            nxt = next((r for r in fit_ranks[m] if r > cur and P.demands[m].options[r].replica_bytes < cur_size), None)
            if nxt is None:
                continue
            freed = (cur_size - P.demands[m].options[nxt].replica_bytes) * int(P.min_rep[m])
            key = (freed, m)  # most freed; ties: the later model gives up its preference first
            if best is None or key > best[0]:
                best = (key, m, nxt)
        if best is None:
            if small:
                return None, None, "greedy", "none", reasons, not budget.timed_out
            ch2, st, method = least_memory_exact()
            if ch2 is None:
                return None, None, "greedy", "none", reasons, not budget.timed_out
            ch = ch2
            break
        (freed, _), m, nxt = best
        downgraded.setdefault(m, []).append(
            f"{P.demands[m].options[ch[m]].quantization}->{P.demands[m].options[nxt].quantization} freed "
            f"{format_bytes(freed)}"
        )
        ch[m] = nxt
    # upgrade pass: give back preference to any model that still fits (model order first)
    improved = True
    while improved:
        improved = False
        for m in active:
            for r in fit_ranks[m]:
                if r >= ch[m]:
                    break
                trial = list(ch)
                trial[m] = r
                s2, st2, meth2 = _place_mins(P, trial, active, budget, use_milp=small)
                if s2 == "feasible":
                    ch, st, method = trial, st2, meth2
                    improved = True
                    break
    for m in active:
        reasons[m] = _why_rank(P, m, ch[m], "greedy", downgraded.get(m))
    return ch, st, "greedy", method, reasons, False


def _why_rank(P: _Problem, m: int, r: int, search: str, steps: list[str] | None = None) -> str:
    d = P.demands[m]
    o = d.options[r]
    if r == 0:
        return f"{o.quantization}: first preference; every model's minimum replicas fit with it"
    better = ", ".join(f"{x.quantization} ({format_bytes(x.replica_bytes)})" for x in d.options[:r])
    if search in ("exhaustive", "heuristic"):
        tried = (
            "every combination with a lower total preference rank was tried"
            if search == "exhaustive"
            else "combinations with a lower total preference rank were checked by the heuristics only (large cluster)"
        )
        return (
            f"{o.quantization} (preference {r + 1} of {len(d.options)}, {format_bytes(o.replica_bytes)}/replica): "
            f"with {better} the minimum replicas of all models do not fit together; {tried}"
        )
    how = f" (greedy downgrade: {'; '.join(steps)})" if steps else ""
    return (
        f"{o.quantization} (preference {r + 1} of {len(d.options)}, {format_bytes(o.replica_bytes)}/replica): "
        f"with {better} the minimum replicas of all models do not fit together{how}"
    )

def _smallest_choice(P: _Problem, fit_ranks: dict, m: int) -> int:
    rs = fit_ranks.get(m) or list(range(len(P.demands[m].options)))
    return min(rs, key=lambda r: (P.demands[m].options[r].replica_bytes, r))
