"""Exact placement: integer programs over (model, GPU) counts (HiGHS through scipy.optimize.milp) and column
generation over per-GPU patterns with an integer master, used for the minimums when best fit fails and for an
exact fill to the maxima on small instances. numpy and scipy are imported lazily."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from planner.units import GiB
from planner.placement.problem import _MILP_MAX_COEF, _State  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Exact search (scipy.optimize.milp / HiGHS)


def _scale_for(values: Iterable[int]) -> int:
    """A divisor that keeps byte coefficients small: their gcd, times a power of two if they are still large."""
    vals = [int(v) for v in values if v > 0]
    if not vals:
        return 1
    g = 0
    for v in vals:
        g = math.gcd(g, v)
    mx = max(vals) // g
    s = g
    while mx > _MILP_MAX_COEF:
        s *= 2
        mx //= 2
    return s


@dataclass
class _MilpResult:
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    x: dict  # (model, bin) -> count, for models in the program
    objective: int | None
    bound: int | None
    seconds: float


class _quiet_native_stdout:
    """HiGHS (the solver behind scipy.optimize.milp) prints some debug lines straight to file descriptor 1 from C++,
    which would corrupt ``--json`` output; point fd 1 at /dev/null while it runs (process-wide, for the length of
    one solve)."""

    def __enter__(self):
        import os
        import sys

        self.saved = None
        try:
            sys.stdout.flush()
        except Exception:
            pass
        try:
            self.saved = os.dup(1)
            self.devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self.devnull, 1)
        except OSError:
            self.saved = None
        return self

    def __exit__(self, *exc):
        import os

        if self.saved is not None:
            os.dup2(self.saved, 1)
            os.close(self.saved)
            os.close(self.devnull)
        return False


def _run_milp(*args, **kwargs):
    from scipy.optimize import milp

    with _quiet_native_stdout():
        return milp(*args, **kwargs)


@dataclass
class _Program:
    """The compact integer program of one placement: one variable per (model, GPU) pair that could hold a replica,
    and rows for per-GPU bytes and Ray units, per-node host RAM and per-model counts."""

    vm: object  # model of each variable
    vb: object  # GPU (bin) of each variable
    ub: list  # upper bound of each variable
    rows: list
    cols: list
    vals: list
    lbs: list
    ubs: list
    n_rows: int
    model_row: dict  # model -> its count row


def _program(st: _State, models: Sequence[int], lo, hi) -> "_Program | None":
    """The program over the free capacity of ``st`` with ``lo[m] <= sum_b x[m, b] <= hi[m]``; None when a model
    with ``lo > 0`` has no GPU it could use. Byte coefficients are divided by a common scale: exactly (their gcd)
    when they are small, otherwise sizes are rounded up and capacities down, so every solution is feasible in exact
    bytes (the callers re-check)."""
    P = st.P
    np = P.np
    var_m, var_b, var_ub = [], [], []
    for m in models:
        mask = st.fits_mask(m)
        bs = np.flatnonzero(mask)
        if bs.size == 0:
            continue
        ub = np.minimum(st.rem[bs] // max(int(st.size[m]), 1), hi[m])
        u = st.units[m, bs]
        ub = np.where(u > 0, np.minimum(ub, st.rem_units[bs] // np.maximum(u, 1)), ub)
        if P.mode == "gpu" and st.cpu[m] > 0:
            ub = np.minimum(ub, st.ram[P.node_of[bs]] // st.cpu[m])
        keep = ub > 0
        var_m.extend([m] * int(keep.sum()))
        var_b.extend(bs[keep].tolist())
        var_ub.extend(ub[keep].tolist())
    nv = len(var_m)
    have = set(var_m)
    if any(lo[m] > 0 and m not in have for m in models):
        return None
    vm = np.array(var_m, dtype=np.int64)
    vb = np.array(var_b, dtype=np.int64)
    rows, cols, vals, lbs, ubs = [], [], [], [], []
    r = 0
    if nv:
        bins_used = np.unique(vb)
        bin_row = {int(b): k for k, b in enumerate(bins_used)}
        sizes = st.size[vm]
        sc = _scale_for(list(sizes) + [int(st.rem[b]) for b in bins_used])
        coef = -(-sizes // sc)
        for k in range(nv):
            rows.append(r + bin_row[int(vb[k])])
            cols.append(k)
            vals.append(float(coef[k]))
        for b in bins_used:
            ubs.append(float(int(st.rem[b]) // sc))
            lbs.append(-np.inf)
        r += len(bins_used)
        if P.mode == "gpu":
            uc = st.units[vm, vb]
            for k in range(nv):
                rows.append(r + bin_row[int(vb[k])])
                cols.append(k)
                vals.append(float(uc[k]))
            for b in bins_used:
                ubs.append(float(st.rem_units[b]))
                lbs.append(-np.inf)
            r += len(bins_used)
            cpus = st.cpu[vm]
            if (cpus > 0).any():
                nodes = np.unique(P.node_of[vb[cpus > 0]])
                node_row = {int(n): k for k, n in enumerate(nodes)}
                rs = _scale_for(list(cpus[cpus > 0]) + [int(st.ram[n]) for n in nodes])
                for k in range(nv):
                    if cpus[k] > 0:
                        rows.append(r + node_row[int(P.node_of[vb[k]])])
                        cols.append(k)
                        vals.append(float(-(-int(cpus[k]) // rs)))
                for n in nodes:
                    ubs.append(float(int(st.ram[n]) // rs))
                    lbs.append(-np.inf)
                r += len(nodes)
    model_row = {}
    for m in models:
        if m in have:
            model_row[m] = r
            lbs.append(float(lo[m]))
            ubs.append(float(hi[m]))
            r += 1
    for k in range(nv):
        rows.append(model_row[int(vm[k])])
        cols.append(k)
        vals.append(1.0)
    return _Program(vm, vb, var_ub, rows, cols, vals, lbs, ubs, r, model_row)


def _checked(st: _State, models: Sequence[int], lo, hi, sol: dict) -> bool:
    """``sol`` ((model, bin) -> count) fits the free capacity of ``st`` in exact integers, counts within bounds."""
    trial = st.with_placed(sol)
    ok = (trial.rem >= 0).all() and (trial.rem_units >= 0).all() and (trial.ram >= 0).all()
    return bool(ok) and all(lo[m] <= trial.placed[m] - st.placed[m] <= hi[m] for m in models)


def _milp(st: _State, models: Sequence[int], lo, hi, *, maximize: bool, time_limit: float) -> _MilpResult:
    """Integer program over the free capacity of ``st`` (:func:`_program`): x[m, b] replicas of model m on bin b.
    Maximises the total when ``maximize`` (else any feasible point)."""
    t0 = time.perf_counter()
    np = st.P.np
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.sparse import coo_array

    prog = _program(st, models, lo, hi)
    if prog is None:
        return _MilpResult("infeasible", {}, None, None, time.perf_counter() - t0)
    nv = len(prog.ub)
    if nv == 0:
        return _MilpResult("optimal", {}, 0, 0, time.perf_counter() - t0)
    A = coo_array((np.array(prog.vals), (np.array(prog.rows), np.array(prog.cols))), shape=(prog.n_rows, nv)).tocsr()
    c = -np.ones(nv) if maximize else np.zeros(nv)
    res = _run_milp(
        c,
        constraints=[LinearConstraint(A, np.array(prog.lbs), np.array(prog.ubs))],
        integrality=np.ones(nv),
        bounds=Bounds(np.zeros(nv), np.array(prog.ub, dtype=float)),
        options={"time_limit": max(0.05, float(time_limit)), "disp": False, "mip_rel_gap": 1e-9},
    )
    secs = time.perf_counter() - t0
    bound = None
    db = getattr(res, "mip_dual_bound", None)
    if maximize and db is not None and np.isfinite(db):
        bound = int(math.floor(-db + 1e-6))
    if res.x is None:
        status = "infeasible" if res.status == 2 else "unknown"
        return _MilpResult(status, {}, None, bound, secs)
    x = np.rint(res.x).astype(np.int64)
    sol = {(int(prog.vm[k]), int(prog.vb[k])): int(x[k]) for k in range(nv) if x[k] > 0}
    if not _checked(st, models, lo, hi, sol):
        return _MilpResult("unknown", {}, None, bound, secs)
    obj = int(sum(sol.values()))
    status = "optimal" if res.status == 0 else "feasible"
    if status == "optimal" and maximize:
        bound = obj
    return _MilpResult(status, sol, obj, bound, secs)


@dataclass
class _SpreadResult:
    status: str  # "optimal" | "feasible" | "infeasible" | "unknown"
    x: dict  # (model, bin) -> count
    seconds: float


def spread_score(cnt, node_of, models: Sequence[int], multi_node: bool) -> tuple:
    """How well a placement spreads each model over failure domains, compared lexicographically: models whose
    replicas span two or more nodes, then two or more GPUs, then the (model, node) and (model, GPU) pairs used.
    ``cnt[m, b]`` replicas of model m on GPU b."""
    span_n = span_b = pairs_n = pairs_b = 0
    for m in models:
        bs = (cnt[m] > 0).nonzero()[0]
        span_b += int(bs.size >= 2)
        pairs_b += int(bs.size)
        if multi_node:
            nodes = {int(node_of[b]) for b in bs.tolist()}
            span_n += int(len(nodes) >= 2)
            pairs_n += len(nodes)
    return (span_n, span_b, pairs_n, pairs_b)


def _spread_milp(
    st: _State, models: Sequence[int], counts: dict, time_limit: float, *, apart_gpu=(), apart_node=(),
    maximize_pairs: bool = False,
) -> _SpreadResult:
    """A placement on the free capacity of ``st`` with exactly ``counts[m]`` replicas of each model, in which every
    model of ``apart_gpu`` uses two or more GPUs (no GPU holds more than count - 1 of it) and every model of
    ``apart_node`` two or more nodes (no node holds more than count - 1). A feasibility program, fast to decide even
    on full GPUs; "infeasible" is a proof that no such placement exists. With ``maximize_pairs``, among those, the
    most (model, node) pairs, then the most (model, GPU) pairs (binary y[m, b] <= x[m, b] marks a GPU that holds m,
    z[m, n] <= sum_{b in n} x[m, b] a node; z's weight exceeds every y's together)."""
    t0 = time.perf_counter()
    P = st.P
    np = P.np
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.sparse import coo_array

    lo = {m: counts[m] for m in models}
    prog = _program(st, models, lo, lo)
    if prog is None:
        return _SpreadResult("infeasible", {}, time.perf_counter() - t0)
    nx = len(prog.ub)
    if nx == 0:
        return _SpreadResult("optimal", {}, time.perf_counter() - t0)
    ub = [float(u) for u in prog.ub]
    for k in range(nx):
        m = int(prog.vm[k])
        if m in apart_gpu:
            ub[k] = min(ub[k], float(counts[m] - 1))
    rows, cols, vals = list(prog.rows), list(prog.cols), list(prog.vals)
    lbs, ubs = list(prog.lbs), list(prog.ubs)
    r = prog.n_rows
    by_mn: dict = {}
    for k in range(nx):
        by_mn.setdefault((int(prog.vm[k]), int(P.node_of[prog.vb[k]])), []).append(k)
    for (m, n), ks in by_mn.items():
        if m in apart_node:
            for k in ks:
                rows.append(r)
                cols.append(k)
                vals.append(1.0)
            lbs.append(-np.inf)
            ubs.append(float(counts[m] - 1))
            r += 1
    col = nx
    weights: list[float] = []
    if maximize_pairs:
        multi_node = len({n for _, n in by_mn}) >= 2
        for k in range(nx):  # y[m, b] <= x[m, b]
            rows += [r, r]
            cols += [col, k]
            vals += [1.0, -1.0]
            lbs.append(-np.inf)
            ubs.append(0.0)
            r += 1
            col += 1
        w_z = float(nx + 1)
        weights = [1.0] * nx
        if multi_node:
            for (m, n), ks in by_mn.items():  # z[m, n] <= sum of x[m, b] on node n
                rows.append(r)
                cols.append(col)
                vals.append(1.0)
                for k in ks:
                    rows.append(r)
                    cols.append(k)
                    vals.append(-1.0)
                lbs.append(-np.inf)
                ubs.append(0.0)
                r += 1
                col += 1
                weights.append(w_z)
        ub += [1.0] * (col - nx)
    c = np.concatenate([np.zeros(nx), -np.array(weights, dtype=float)])
    A = coo_array((np.array(vals), (np.array(rows), np.array(cols))), shape=(r, col)).tocsr()
    res = _run_milp(
        c,
        constraints=[LinearConstraint(A, np.array(lbs), np.array(ubs))],
        integrality=np.ones(col),
        bounds=Bounds(np.zeros(col), np.array(ub)),
        options={"time_limit": max(0.05, float(time_limit)), "disp": False, "mip_rel_gap": 1e-9},
    )
    secs = time.perf_counter() - t0
    if res.x is None:
        return _SpreadResult("infeasible" if res.status == 2 else "unknown", {}, secs)
    x = np.rint(res.x[:nx]).astype(np.int64)
    sol = {(int(prog.vm[k]), int(prog.vb[k])): int(x[k]) for k in range(nx) if x[k] > 0}
    if not _checked(st, models, lo, lo, sol):
        return _SpreadResult("unknown", {}, secs)
    return _SpreadResult("optimal" if res.status == 0 else "feasible", sol, secs)


def _colgen_fill(st: _State, models: Sequence[int], lo, hi, seed: "_State | None", time_limit: float) -> _MilpResult:
    """Maximise the replicas placed on the free capacity of ``st`` exactly, by column generation.

    GPUs with the same free bytes, Ray units, total and type (and node, when host RAM constrains) form a class of
    interchangeable bins; a column is a *pattern* (how many replicas of each model one bin of the class holds). The
    master problem ``max sum_m y_m`` with ``lo <= y <= hi``, ``y_m <= sum_p a_mp * lambda_p``, ``sum_{p in c}
    lambda_p <= n_c`` (and per-node host RAM) has a far tighter linear relaxation than one variable per (model, GPU),
    and no symmetry between identical GPUs. Pricing is a small bounded knapsack per class (bytes and Ray units),
    solved exactly on a relaxation of the byte sizes; the upper bound used to prove optimality is the Lagrangian
    bound ``z_LP + sum_c n_c * max(0, best reduced profit_c)``, valid at every iteration. The integer master over
    the generated columns gives the placement; it is proven optimal when it reaches ``floor(bound)``. ``seed`` (a
    heuristic placement on the same free capacity) supplies initial columns, so the result is never worse.
    """
    t0 = time.perf_counter()
    P = st.P
    np = P.np
    from scipy.optimize import Bounds, LinearConstraint, linprog

    deadline = t0 + max(0.05, time_limit)
    models = [m for m in models if hi[m] > 0]
    ram_rel = P.mode == "gpu" and any(int(st.cpu[m]) > 0 for m in models)
    classes: dict = {}
    for b in range(P.nb):
        elig = [
            m
            for m in models
            if P.E[m, b] and st.size[m] <= st.rem[b] and st.units[m, b] <= st.rem_units[b]
            and (not ram_rel or st.cpu[m] <= st.ram[P.node_of[b]])
        ]
        if not elig:
            continue
        key = (int(st.rem[b]), int(st.rem_units[b]), int(P.denom[b]), P.types[b], int(P.node_of[b]) if ram_rel else -1)
        classes.setdefault(key, {"bins": [], "elig": elig})["bins"].append(b)
    have = {m for c in classes.values() for m in c["elig"]}
    if any(lo[m] > 0 and m not in have for m in models):
        return _MilpResult("infeasible", {}, None, None, time.perf_counter() - t0)
    cls = list(classes.items())
    if not cls:
        return _MilpResult("optimal", {}, 0, 0, time.perf_counter() - t0)
    midx = {m: i for i, m in enumerate(models)}
    M = len(models)
    nodes = sorted({k[4] for k, _ in cls}) if ram_rel else []
    nidx = {n: i for i, n in enumerate(nodes)}

    def ub_alone(ci: int, m: int) -> int:
        key, c = cls[ci]
        b0 = c["bins"][0]
        u = int(st.units[m, b0])
        ub = min(int(hi[m]), key[0] // max(1, int(st.size[m])))
        if u > 0:
            ub = min(ub, key[1] // u)
        if ram_rel and st.cpu[m] > 0:
            ub = min(ub, int(st.ram[key[4]]) // int(st.cpu[m]))
        return ub

    cols: list[tuple[int, tuple]] = []
    seen = set()

    def add_col(ci: int, pat: dict) -> bool:
        pat = {m: k for m, k in pat.items() if k > 0}
        if not pat:
            return False
        t = (ci, tuple(sorted(pat.items())))
        if t in seen:
            return False
        seen.add(t)
        cols.append(t)
        return True

    for ci, (key, c) in enumerate(cls):
        for m in c["elig"]:
            add_col(ci, {m: ub_alone(ci, m)})
    if seed is not None:
        bin_class = {b: ci for ci, (_, c) in enumerate(cls) for b in c["bins"]}
        for b in range(P.nb):
            if b in bin_class:
                add_col(bin_class[b], {m: int(seed.cnt[m, b]) for m in models})

    n_c = np.array([len(c["bins"]) for _, c in cls], dtype=float)
    GiBf = float(GiB)

    def master(integer: bool, seconds: float):
        K = len(cols)
        nv = K + M
        rows, colsi, vals = [], [], []
        for k, (ci, pat) in enumerate(cols):
            for m, a in pat:
                rows.append(midx[m])
                colsi.append(k)
                vals.append(-float(a))
            rows.append(M + ci)
            colsi.append(k)
            vals.append(1.0)
        for i in range(M):
            rows.append(i)
            colsi.append(K + i)
            vals.append(1.0)
        ub = [0.0] * M + list(n_c)
        nr = M + len(cls)
        if ram_rel:
            rs = _scale_for([int(st.cpu[m]) for m in models] + [int(st.ram[n]) for n in nodes]) if integer else 1
            for k, (ci, pat) in enumerate(cols):
                ram = sum(int(st.cpu[m]) * a for m, a in pat)
                if ram > 0:
                    rows.append(nr + nidx[cls[ci][0][4]])
                    colsi.append(k)
                    coef = sum(-(-int(st.cpu[m]) // rs) * a for m, a in pat) if integer else ram / GiBf
                    vals.append(float(coef))
            ub += [float(int(st.ram[n]) // rs) if integer else float(st.ram[n]) / GiBf for n in nodes]
            nr += len(nodes)
        from scipy.sparse import coo_array

        A = coo_array((np.array(vals), (np.array(rows), np.array(colsi))), shape=(nr, nv)).tocsr()
        cvec = np.concatenate([np.zeros(K), -np.ones(M)])
        lb_v = np.concatenate([np.zeros(K), np.array([float(lo[m]) for m in models])])
        ub_v = np.concatenate([np.full(K, np.inf), np.array([float(hi[m]) for m in models])])
        if not integer:
            res = linprog(cvec, A_ub=A, b_ub=np.array(ub), bounds=list(zip(lb_v, ub_v)), method="highs")
            return res
        return _run_milp(
            cvec,
            constraints=[LinearConstraint(A, -np.inf, np.array(ub))],
            integrality=np.ones(nv),
            bounds=Bounds(lb_v, ub_v),
            options={"time_limit": max(0.05, seconds), "disp": False, "mip_rel_gap": 1e-9},
        )

    def price(ci: int, w: dict, mu: float, exact_sizes: bool):
        """Best pattern of class ci for weights w: a bounded knapsack on bytes, by dynamic programming over a
        grid of at most 2**16 cells. ``exact_sizes=False`` rounds sizes down and the capacity up (a relaxation:
        its value bounds the true best); True rounds the other way (every pattern it returns fits)."""
        key, c = cls[ci]
        items = [m for m in c["elig"] if w.get(m, 0.0) > 1e-12]
        if not items:
            return 0.0, None
        cap_b = key[0]
        grid = max(1, -(-cap_b // 65536))
        if exact_sizes:
            cap = cap_b // grid
            sz = [-(-int(st.size[m]) // grid) for m in items]
        else:
            cap = -(-cap_b // grid)
            sz = [int(st.size[m]) // grid for m in items]
        # binary splitting of the bounded counts into 0/1 pieces
        pieces = []
        for m, s_, ub in zip(items, sz, (ub_alone(ci, m) for m in items)):
            k = 1
            while ub > 0:
                t = min(k, ub)
                pieces.append((m, t, s_ * t, w[m] * t))
                ub -= t
                k *= 2
        best = np.zeros(cap + 1)
        take = np.zeros((len(pieces), cap + 1), dtype=bool)
        for i, (m, t, wt, val) in enumerate(pieces):
            if wt > cap:
                continue
            if wt == 0:
                best += val
                take[i, :] = True
                continue
            cand = best[: cap + 1 - wt] + val
            better = cand > best[wt:] + 1e-12
            take[i, wt:] = better
            best[wt:] = np.where(better, cand, best[wt:])
        c_ = int(np.argmax(best))
        val = float(best[c_])
        pat: dict = {}
        for i in range(len(pieces) - 1, -1, -1):
            if take[i, c_]:
                m, t, wt, _ = pieces[i]
                pat[m] = pat.get(m, 0) + t
                c_ -= wt
        return val, pat

    def exact_ok(ci: int, pat: dict) -> bool:
        key, c = cls[ci]
        b0 = c["bins"][0]
        if sum(int(st.size[m]) * k for m, k in pat.items()) > key[0]:
            return False
        if sum(int(st.units[m, b0]) * k for m, k in pat.items()) > key[1]:
            return False
        if ram_rel and sum(int(st.cpu[m]) * k for m, k in pat.items()) > int(st.ram[key[4]]):
            return False
        return True

    best_ub = float("inf")
    iters = 0
    while time.perf_counter() < deadline and iters < 500:
        iters += 1
        res = master(False, 0)
        if res.status != 0:
            break
        z = -float(res.fun)
        marg = res.ineqlin.marginals
        pi = {m: max(0.0, -float(marg[midx[m]])) for m in models}
        mu = [max(0.0, -float(marg[M + ci])) for ci in range(len(cls))]
        rho = [max(0.0, -float(marg[M + len(cls) + i])) for i in range(len(nodes))] if ram_rel else []
        gap_sum = 0.0
        added = False
        for ci, (key, c) in enumerate(cls):
            r = rho[nidx[key[4]]] if ram_rel else 0.0
            w = {m: pi[m] - r * float(st.cpu[m]) / GiBf for m in c["elig"]}
            v, pat = price(ci, w, mu[ci], exact_sizes=False)
            if v - mu[ci] > 1e-7:
                gap_sum += n_c[ci] * (v - mu[ci])
                if pat is None or not exact_ok(ci, pat):
                    v2, pat = price(ci, w, mu[ci], exact_sizes=True)
                    if pat is None or v2 - mu[ci] <= 1e-7 or not exact_ok(ci, pat):
                        pat = None
                # add the best pattern, then up to two more built from the models it did not use: disjoint
                # columns speed up convergence a lot on bin-packing-like instances
                w2 = dict(w)
                for _ in range(3):
                    if pat is None:
                        break
                    added |= add_col(ci, pat)
                    for m in pat:
                        w2[m] = 0.0
                    v3, pat = price(ci, w2, mu[ci], exact_sizes=True)
                    if pat is None or v3 - mu[ci] <= 1e-7 or not exact_ok(ci, pat):
                        pat = None
        best_ub = min(best_ub, z + gap_sum)
        if gap_sum <= 1e-7:
            break
        if not added:
            break
    bound = int(math.floor(best_ub + 1e-6)) if best_ub < float("inf") else None
    res = master(True, deadline - time.perf_counter() + 0.5)
    secs = time.perf_counter() - t0
    if res.x is None:
        return _MilpResult("unknown", {}, None, bound, secs)
    x = np.rint(res.x).astype(np.int64)
    K = len(cols)
    y = {m: int(x[K + midx[m]]) for m in models}
    # patterns -> bins, then drop copies beyond y_m from the bins holding the most of that model
    sol: dict = {}
    per_bin: dict = {}
    next_bin = {ci: 0 for ci in range(len(cls))}
    for k, (ci, pat) in enumerate(cols):
        for _ in range(int(x[k])):
            bins = cls[ci][1]["bins"]
            if next_bin[ci] >= len(bins):
                return _MilpResult("unknown", {}, None, bound, secs)
            b = bins[next_bin[ci]]
            next_bin[ci] += 1
            per_bin[b] = dict(pat)
    for m in models:
        have_m = sum(p.get(m, 0) for p in per_bin.values())
        excess = have_m - y[m]
        while excess > 0:
            b = max((b for b, p in per_bin.items() if p.get(m, 0) > 0), key=lambda b: (per_bin[b][m], b))
            per_bin[b][m] -= 1
            excess -= 1
    for b, p in per_bin.items():
        for m, k in p.items():
            if k > 0:
                sol[(m, b)] = k
    if not _checked(st, models, lo, hi, sol):
        return _MilpResult("unknown", {}, None, bound, secs)
    obj = int(sum(y.values()))
    proven = bound is not None and obj >= bound
    status = "optimal" if proven else "feasible"
    if proven:
        bound = obj
    return _MilpResult(status, sol, obj, bound, secs)


