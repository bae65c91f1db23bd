"""Memory-aware placement of model replicas on GPUs: how many replicas of each model fit on each GPU, never
over-committing a GPU's memory.

Ray Serve lets a replica ask for ``num_gpus: 0.25``, but the fraction is a scheduling label: Ray does not enforce
memory, so replicas that share a GPU can OOM each other. ``plan()`` decides, from byte sizes computed by the caller
(the memory model), which quantization each model runs at, how many replicas of each model go on which GPU, and the
``num_gpus`` label each replica must carry so that Ray's fractional accounting never admits what the memory plan would
not.

Pipeline (each step documented on its helper; ``plan()`` is here, the steps live in problem.py, greedy.py (2, 3),
exact.py (3, 4), fill.py (4, 5) and explain.py (the errors)):

1. ``usable bytes`` per GPU = ``floor(total * (1 - headroom)) - gpu_reserve_bytes``, capped by probed free memory
   (see :func:`usable_gpu_bytes`).
2. Quantization: each model runs at one of its ``options`` (most preferred first). We minimise the sum of preference
   ranks over the models that have minimum replicas, ties broken by model order (an earlier model keeps its
   preference first) -- exhaustively when the number of combinations is small (``EXHAUSTIVE_QUANT_MAX``), otherwise
   by greedy downgrade of the model whose downgrade frees the most memory, then a pass that upgrades back any
   model that still fits.
3. Minimum replicas: spread-first best-fit decreasing, then plain best-fit decreasing, then an exact search:
   column generation over per-GPU "patterns" with an integer master (``scipy.optimize.milp``, HiGHS), then one
   integer variable per (model, GPU) if still undecided, all within ``time_limit_s``.
4. Extra replicas up to each ``max_replicas``: smallest replicas first (that maximises the number placed), each put
   on the GPU of the node with the fewest replicas of that model, then the GPU with the fewest, then the tightest
   fit (anti-affinity, so one GPU or node failure does not take a model down). On small instances (models x GPUs
   <= ``EXACT_MAX_VARS``) the column generation proves the count optimal or improves it.
5. Models that fit on no GPU at any option: split GPU+CPU replicas when ``offload_cpu_bytes`` allows (packed as
   their least GPU share, then grown into the room left on their GPU), or CPU replicas when ``offload_cpu_bytes``
   covers a whole replica. With no GPU at all, every replica is a CPU replica sized against its node's RAM.
6. ``num_gpus`` per replica: its bytes over the GPU's total (or usable, ``fraction_basis``), rounded up to 1e-4;
   the per-GPU sum of those units is a packing constraint (<= 1). How the plan is brought up on Ray so that Ray's
   own fractional placement reproduces it is planner/rollout/'s job.

Sizes are ints of bytes; the results are frozen dataclasses with ``to_json()``. Pure Python: numpy and scipy are
imported lazily inside the functions that need them.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

from planner.errors import InfeasiblePlanError, InputError
from planner.cluster.inventory import Cluster
from planner.units import format_bytes
# Every name of the placement modules, importable from here as before the split (callers and tests use
# ``planner.placement.packing``; the modules are problem, exact, greedy, fill and explain).
from planner.placement.problem import (  # noqa: F401
    CpuReplica,
    DEFAULT_GPU_RESERVE,
    DEFAULT_HEADROOM,
    DEFAULT_TIME_LIMIT_S,
    EXACT_MAX_VARS,
    EXHAUSTIVE_QUANT_MAX,
    PROOF_MAX_VARS,
    SPREAD_PAIRS_TIME_LIMIT_S,
    SPREAD_TIME_LIMIT_S,
    SPREAD_TOTAL_S,
    GpuPlan,
    GpuReplica,
    ModelDemand,
    ModelPlan,
    OFFLOAD_MIN_GPU_BYTES,
    OffloadReplica,
    Plan,
    QuantOption,
    RAY_GPU_UNITS,
    SolverInfo,
    SuggestFn,
    _MILP_MAX_COEF,
    _Problem,
    _State,
    _gpu_type,
    num_gpus_for,
    ray_basis_bytes,
    ray_gpu_units,
    usable_gpu_bytes,
)
from planner.placement.exact import (  # noqa: F401
    _MilpResult,
    _colgen_fill,
    _milp,
    _quiet_native_stdout,
    _run_milp,
    _scale_for,
    _spread_milp,
    spread_score,
)
from planner.placement.greedy import (  # noqa: F401
    _Budget,
    _choose_quantization,
    _min_bound_ok,
    _place_min_heuristic,
    _place_mins,
    _respread,
    _smallest_choice,
    _why_rank,
)
from planner.placement.fill import (  # noqa: F401
    _fill,
    _grow_offload,
    _place_cpu_replica,
)
from planner.placement.explain import (  # noqa: F401
    _fallback_fix,
    _feasible_with,
    _fits_nowhere_error,
    _gpu_room_lines,
    _infeasible_error,
    _room_for,
    _try_add_gpus,
    _with_min,
    mixed_node_notes,
)

# ----------------------------------------------------------------------------------------------------------------
# The planner


def _validate(demands, cluster, headroom, reserve):
    if not isinstance(cluster, Cluster):
        raise InputError(f"cluster must be a planner.cluster.inventory.Cluster, got {type(cluster).__name__}")
    if not cluster.nodes:
        raise InputError("the cluster has no nodes; declare at least one node (with its GPUs, or CPU-only)")
    ids = [g.id for g in cluster.gpus]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"GPU id(s) {dup} appear more than once in the cluster; give every GPU a unique id")
    for g in cluster.gpus:
        if g.total_bytes <= 0:
            raise InputError(f"GPU {g.id}: total_bytes must be > 0, got {g.total_bytes}")
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not (0.0 <= headroom < 1.0):
        raise InputError(f"headroom must be a fraction in [0, 1), got {headroom!r}; e.g. 0.10 keeps 10% free")
    if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
        raise InputError(f"gpu_reserve_bytes must be an int >= 0, got {reserve!r}")
    demands = tuple(demands)
    for d in demands:
        if not isinstance(d, ModelDemand):
            raise InputError(f"demands must be ModelDemand values, got {type(d).__name__}")
    names = [d.name for d in demands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"model name(s) {dup} appear more than once; give every model a unique name")
    return demands


def plan(
    demands: Sequence[ModelDemand],
    cluster: Cluster,
    *,
    headroom: float = DEFAULT_HEADROOM,
    gpu_reserve_bytes: int = DEFAULT_GPU_RESERVE,
    suggest: SuggestFn | None = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    exact: bool | None = None,
    fraction_basis: str = "total",
    spread: bool = True,
) -> Plan:
    """Place every model's replicas on ``cluster`` without over-committing any GPU's (or node's) memory.

    ``exact``: None (default) proves the fill optimal with an integer program when models x GPUs <=
    ``EXACT_MAX_VARS``; True always tries (within ``time_limit_s``); False never does. ``suggest(demand,
    room_bytes)`` is asked, when the plan is infeasible, for a fix phrased in the caller's terms ("lower
    max_model_len to 2048") that would make one replica of ``demand`` need at most ``room_bytes``.

    ``fraction_basis``: what a replica's ``num_gpus`` is a fraction of. ``"total"`` (default): ``replica_bytes /
    total_bytes`` rounded up to 1e-4. Ray then sees ``1 - sum(num_gpus)`` free on a planned GPU -- the headroom and
    reserve included -- and may start a small replica there (Ray puts a fractional request on the best-fitting GPU
    of the node), which the memory plan would not admit.
    ``"usable"``: ``replica_bytes / (floor(total * (1 - headroom)) - reserve)``: Ray's sum <= 1 then means "fits in
    the usable memory", so Ray's accounting never admits more than the plan (at the cost of rounding on exact
    fits).

    ``spread``: after the count is settled, move replicas so that no model is confined to one node or GPU where a
    placement of the same counts avoids it (:func:`_spread`); False keeps the fill's own placement (which Ray's best
    fit may find easier to bring up: planner.planning.plan_realized tries it when the spread one loses replicas).

    Raises ``InfeasiblePlanError`` when some model's min_replicas cannot be placed, ``InputError`` for bad input.
    """
    t0 = time.perf_counter()
    demands = _validate(demands, cluster, headroom, gpu_reserve_bytes)
    if fraction_basis not in ("total", "usable"):
        raise InputError(f"fraction_basis must be 'total' or 'usable', got {fraction_basis!r}")
    P = _Problem(demands, cluster, headroom, gpu_reserve_bytes, fraction_basis)
    budget = _Budget(time_limit_s)
    notes: list[str] = []
    np = P.np

    if P.mode == "cpu":
        notes.append("no GPU in the cluster: every replica is a CPU replica, sized against its node's RAM")
        pinned = [d.name for d in demands if d.gpu_type]
        if pinned:
            notes.append(f"gpu_type pin ignored on a CPU-only cluster for: {', '.join(pinned)}")
            P.E[:] = True
    else:
        for g, cap in zip(P.gpus, P.cap.tolist()):
            if g.free_bytes is not None:
                nominal = max(0, math.floor(g.total_bytes * (1 - headroom)) - gpu_reserve_bytes)
                if cap < nominal:
                    notes.append(
                        f"gpu {g.id}: probed free memory {format_bytes(g.free_bytes)} of {format_bytes(g.total_bytes)} "
                        f"(something else uses {format_bytes(g.total_bytes - g.free_bytes)}); usable capped at "
                        f"{format_bytes(cap)} instead of {format_bytes(nominal)}"
                    )

    # which options can hold one replica somewhere at all
    fit_ranks: dict[int, list[int]] = {}
    for m, d in enumerate(demands):
        fit_ranks[m] = [r for r in range(len(d.options)) if P.alone_mask(m, r).any()]
    # models that fit on no GPU: split GPU+CPU when offload is allowed, else CPU replicas when offload covers a
    # whole replica, else infeasible (when they have minimum replicas)
    offload_models: list[int] = []
    cpu_models: list[int] = []
    if P.mode == "gpu":
        for m, d in enumerate(demands):
            if fit_ranks[m] or d.offload_cpu_bytes <= 0:
                continue
            P.offload[m] = True
            fit_ranks[m] = [r for r in range(len(d.options)) if P.alone_mask(m, r).any()]
            if fit_ranks[m]:
                offload_models.append(m)
            else:
                P.offload[m] = False
                cpu_ranks = [r for r, o in enumerate(d.options) if d.offload_cpu_bytes >= o.replica_bytes]
                if cpu_ranks:
                    cpu_models.append(m)
                    fit_ranks[m] = []
    nowhere = [m for m in range(P.nm) if not fit_ranks[m] and m not in cpu_models]
    hard = [m for m in nowhere if demands[m].min_replicas > 0]
    if hard:
        raise _fits_nowhere_error(P, hard, suggest)
    active = [m for m, d in enumerate(demands) if d.min_replicas > 0 and fit_ranks[m]]

    choice, st, qsearch, min_method, reasons, q_proven = _choose_quantization(P, fit_ranks, active, budget)
    if choice is None:
        raise _infeasible_error(P, fit_ranks, active, suggest, budget)

    # models with min 0: most preferred option that still fits after the minimums
    for m, d in enumerate(demands):
        if m in active or m in cpu_models:
            continue
        if not fit_ranks[m]:
            reasons[m] = (
                f"{d.options[0].quantization}: fits on no "
                + ("GPU" if P.mode == "gpu" else "node")
                + " at any listed option; 0 replicas (min_replicas is 0)"
            )
            continue
        for r in fit_ranks[m]:
            st.set_option(m, r)
            if st.fits_mask(m).any():
                break
        else:
            st.set_option(m, fit_ranks[m][0])
        r = st.choice[m]
        reasons[m] = (
            f"{d.options[r].quantization}: "
            + ("first preference" if r == 0 else f"most preferred option with room left after the minimums (preference {r + 1})")
            + "; min_replicas is 0"
        )
    for m in offload_models:
        d = demands[m]
        o = d.options[st.choice[m]]
        largest = int(P.cap[P.E[m]].max()) if P.E[m].any() else 0
        reasons[m] = (
            f"{o.quantization}: fits on no GPU at any option (a replica needs {format_bytes(o.replica_bytes)}, the "
            f"largest usable GPU has {format_bytes(largest)}); runs split: at least "
            f"{format_bytes(P.offload_gpu_bytes(m, st.choice[m]))} on a GPU, up to {format_bytes(d.offload_cpu_bytes)} "
            "in host RAM"
        )
    # CPU-only models (offload_cpu_bytes covers a whole replica): most preferred such option, on node RAM
    for m in cpu_models:
        d = demands[m]
        r = next(r for r, o in enumerate(d.options) if d.offload_cpu_bytes >= o.replica_bytes)
        st.set_option(m, r)
        for _ in range(d.min_replicas):
            if not _place_cpu_replica(st, m):
                raise _cpu_replica_error(P, st, m)
        reasons[m] = (
            f"{d.options[r].quantization}: fits on no GPU even split; offload.cpu_memory "
            f"({format_bytes(d.offload_cpu_bytes)}) holds a whole replica, so it runs on CPU"
        )

    # fill up to max
    gpu_models = [m for m in range(P.nm) if fit_ranks[m] and not P.offload[m]]
    base_fill = st
    fills = []
    for spread_first in (True, False):
        s = base_fill.copy()
        _fill(s, gpu_models, spread_first)
        fills.append((int(s.placed.sum()), spread_first, s))
        if all(s.placed[m] >= P.max_rep[m] for m in gpu_models):
            break
    best_total, best_spread, st = max(fills, key=lambda t: (t[0], t[1]))
    fill_method = "spread" if best_spread else "best-fit"
    all_max = all(st.placed[m] >= P.max_rep[m] for m in gpu_models)
    optimal: bool | None = None
    bound = None
    status = ""
    n_vars = int(sum(P.E[m].sum() for m in gpu_models))
    want_exact = exact if exact is not None else n_vars <= EXACT_MAX_VARS
    if all_max:
        optimal = True
        bound = int(sum(st.placed[m] for m in gpu_models))
        status = "every model reached max_replicas"
    elif want_exact and budget.left() > 0.01:
        # free every GPU replica of gpu_models (minimums included) and solve the whole fill exactly
        free = base_fill.without(gpu_models)
        lo = P.min_rep.copy()
        res = _colgen_fill(free, gpu_models, lo, P.max_rep, st, budget.left())
        heur = int(sum(st.placed[m] for m in gpu_models))
        if res.objective is not None and res.objective > heur:
            st = free.with_placed(res.x)
            _respread(st, gpu_models)
            fill_method = "exact"
        bound = res.bound
        if res.status != "optimal" and n_vars <= PROOF_MAX_VARS and budget.left() > 0.01:
            # column generation's integer master holds only the columns it generated; on a small instance the
            # compact program over every (model, GPU) pair settles the total
            res2 = _milp(free, gpu_models, lo, P.max_rep, maximize=True, time_limit=budget.left())
            best = int(sum(st.placed[m] for m in gpu_models))
            if res2.objective is not None and res2.objective > best:
                st = free.with_placed(res2.x)
                _respread(st, gpu_models)
                fill_method = "exact"
            if res2.bound is not None:
                bound = res2.bound if bound is None else min(bound, res2.bound)
            if res2.status == "optimal":
                res = _MilpResult("optimal", res2.x, res2.objective, res2.objective, res.seconds + res2.seconds)
            else:
                res = _MilpResult(res.status, res.x, res.objective, bound, res.seconds + res2.seconds)
        best = int(sum(st.placed[m] for m in gpu_models))
        if res.status == "optimal":
            optimal = True
            status = f"proven optimal (integer programs, HiGHS) in {res.seconds:.2f} s"
        else:
            optimal = bound is not None and best >= bound
            status = (
                f"exact search ended without proof after {res.seconds:.2f} s (time limit {time_limit_s:g} s); "
                + (f"upper bound {bound} replicas" if bound is not None else "no bound")
            )
    else:
        status = (
            f"heuristic fill; exact search skipped ({n_vars} model x GPU pairs > {EXACT_MAX_VARS})"
            if not want_exact
            else "heuristic fill; no time left for the exact search"
        )
    if bound is not None and (offload_models or cpu_models):
        status += " (the count covers models that fit whole on a GPU; split and CPU replicas come after)"

    spread_line, confined = "", {}
    if spread:
        st, spread_line, confined = _spread(P, base_fill, st, gpu_models, n_vars, budget)

    # split and CPU-only models: extra replicas after everything else, then split replicas grow into free room
    _fill(st, offload_models, True)
    for m in cpu_models:
        while st.placed[m] < demands[m].max_replicas and _place_cpu_replica(st, m):
            pass
    _grow_offload(st, offload_models)

    if not q_proven and qsearch == "exhaustive":
        notes.append("quantization search hit the time limit on some combination; the choice may not be optimal")
    if budget.timed_out:
        notes.append(f"the exact search hit its time limit ({time_limit_s:g} s); results are heuristic where noted")

    return _build_plan(
        P, st, reasons, notes, qsearch, min_method, fill_method, optimal, status, bound, t0, set(offload_models),
        set(cpu_models), spread_line, confined,
    )


def _spread(P, base_fill, st, gpu_models, n_vars: int, budget) -> tuple:
    """Spread as a tie-breaker: keep each model's replica count as placed and move replicas so that a model with two
    or more replicas is not confined to one node, then not to one GPU, wherever some placement of the same counts
    allows it; then, within a short time, use the most (model, node) and (model, GPU) pairs. Each confinement is
    tested by a feasibility program (:func:`_spread_milp`); "infeasible" proves that nothing else fits. Small
    instances only (<= ``PROOF_MAX_VARS`` model x GPU pairs); larger ones keep the fill's heuristic spread.

    Returns (state, SolverInfo.spread line, {model: {level: "proven" | "traded"}}: where a model stays on one node
    or GPU, whether nothing else fits (proven) or spreading it would confine a model that is spread now)."""
    np = P.np
    if P.mode != "gpu" or not gpu_models:
        return st, "", {}
    if n_vars > PROOF_MAX_VARS:
        return st, f"heuristic ({n_vars} model x GPU pairs > {PROOF_MAX_VARS})", {}
    free = base_fill.without(gpu_models)
    counts = {m: int(st.placed[m] - free.placed[m]) for m in gpu_models}
    multi = [m for m in gpu_models if counts[m] >= 2]

    def room(m):
        bs = np.flatnonzero(free.fits_mask(m))
        return int(bs.size), len(set(P.node_of[bs].tolist()))

    def apart(s):
        g = {m for m in multi if (s.cnt[m] > 0).sum() >= 2}
        n = {m for m in multi if (s.cnt_node[m] > 0).sum() >= 2}
        return g, n

    t_end = time.perf_counter() + SPREAD_TOTAL_S

    def left() -> float:  # seconds the next program may use: the plan's budget and the spread's own
        return min(budget.left(), t_end - time.perf_counter())

    proven: dict = {}  # model -> levels at which no placement of the same counts spreads it
    traded: dict = {}  # model -> levels at which spreading it would confine a model that is spread now
    unsettled = 0
    t0 = time.perf_counter()
    for level in ("node", "gpu"):
        for m in multi:
            gpus_m, nodes_m = room(m)
            if (nodes_m if level == "node" else gpus_m) < 2:
                continue  # one node (GPU) is all it may use: confined by its pins, not by the others
            ag, an = apart(st)
            if m in (an if level == "node" else ag):
                continue
            if left() <= 0.01:
                unsettled += 1
                continue
            res = _spread_milp(free, gpu_models, counts, min(left(), SPREAD_TIME_LIMIT_S),
                               apart_gpu=ag | ({m} if level == "gpu" else set()),
                               apart_node=an | ({m} if level == "node" else set()))
            if res.status in ("optimal", "feasible"):
                st = free.with_placed(res.x)
            elif res.status == "infeasible":
                # that kept every model already spread spread; asked alone, the answer is a proof about m itself
                alone = _spread_milp(free, gpu_models, counts, min(max(left(), 0.05), SPREAD_TIME_LIMIT_S),
                                     apart_gpu={m} if level == "gpu" else set(),
                                     apart_node={m} if level == "node" else set())
                if alone.status == "infeasible":
                    proven.setdefault(m, set()).add(level)
                elif alone.status == "unknown":
                    unsettled += 1
                else:
                    traded.setdefault(m, set()).add(level)
            else:
                unsettled += 1
    ag, an = apart(st)
    res = None
    if left() > 0.01:
        res = _spread_milp(free, gpu_models, counts, min(left(), SPREAD_PAIRS_TIME_LIMIT_S), apart_gpu=ag,
                           apart_node=an, maximize_pairs=True)
        now = spread_score(st.cnt, P.node_of, gpu_models, P.nn >= 2)
        if res.status in ("optimal", "feasible"):
            s = free.with_placed(res.x)
            if spread_score(s.cnt, P.node_of, gpu_models, P.nn >= 2) > now:
                st = s
    secs = time.perf_counter() - t0
    line = "; ".join(
        part
        for part in (
            f"{len(proven)} model(s) on one node or GPU because no placement of the same counts spreads them (proven)"
            if proven else "",
            f"{len(traded)} model(s) on one node or GPU because spreading them would confine another" if traded else "",
            f"{unsettled} spread test(s) left undecided at the time limit" if unsettled else "",
            "no model on one node or GPU where a placement of the same counts avoids it" if not unsettled else "",
            "nodes and GPUs used per model maximised (proven)" if res is not None and res.status == "optimal"
            else "nodes and GPUs used per model: best found",
        )
        if part
    ) + f" ({time.perf_counter() - t0:.2f} s)"
    confined: dict = {}
    for why, found in (("proven", proven), ("traded", traded)):
        for m, levels in found.items():
            for level in levels:
                confined.setdefault(m, {}).setdefault(level, why)
    return st, line, confined


def _cpu_replica_error(P: _Problem, st: _State, m: int) -> InfeasiblePlanError:
    d = P.demands[m]
    o = d.options[st.choice[m]]
    ram = int(st.ram.max()) if P.nn else 0
    return InfeasiblePlanError(
        f"model {d.name} fits on no GPU and runs on CPU (offload.cpu_memory {format_bytes(d.offload_cpu_bytes)} covers a "
        f"replica), but its {d.min_replicas} CPU replica(s) need {format_bytes(o.replica_bytes + o.cpu_bytes)} RAM each "
        f"and the most host RAM left on a node is {format_bytes(ram)} (headroom {P.headroom:.0%}); fix: more host RAM, "
        "fewer min_replicas, or a larger GPU",
        details={"model": d.name, "replica_bytes": o.replica_bytes + o.cpu_bytes, "ram_room_bytes": ram},
    )


def _build_plan(
    P, st, reasons, notes, qsearch, min_method, fill_method, optimal, status, bound, t0, offload_models, cpu_models,
    spread: str = "", confined: dict | None = None,
) -> Plan:
    np = P.np
    demands = P.demands
    gpus_out: list[GpuPlan] = []
    cpu_out: list[CpuReplica] = []
    off_out: list[OffloadReplica] = []
    per_bin_extra: dict[int, list] = {}
    for (m, b, gpu_part, cpu_part, units, n) in st.extra:
        q = demands[m].options[st.choice[m]].quantization
        if b >= 0:
            per_bin_extra.setdefault(b, []).append((m, gpu_part, cpu_part, units))
            off_out.append(
                OffloadReplica(demands[m].name, P.bin_ids[b], P.node_names[n], gpu_part, cpu_part, round(units / RAY_GPU_UNITS, 4), q)
            )
        else:
            cpu_out.append(CpuReplica(demands[m].name, cpu_part, P.node_names[n], q))
    gpu_count = np.zeros(P.nm, dtype=np.int64)
    off_count = np.zeros(P.nm, dtype=np.int64)
    cpu_count = np.zeros(P.nm, dtype=np.int64)
    bins_of_model = [set() for _ in range(P.nm)]
    nodes_of_model = [set() for _ in range(P.nm)]
    num_by_type: list[dict] = [dict() for _ in range(P.nm)]
    if P.mode == "gpu":
        for b, g in enumerate(P.gpus):
            reps: list[GpuReplica] = []
            for m in np.flatnonzero(st.cnt[:, b]).tolist():
                k = int(st.cnt[m, b])
                o = demands[m].options[st.choice[m]]
                ng = round(int(st.units[m, b]) / RAY_GPU_UNITS, 4)
                reps.extend([GpuReplica(demands[m].name, o.replica_bytes, ng, o.quantization, False, o.cpu_bytes)] * k)
                gpu_count[m] += k
                bins_of_model[m].add(b)
                nodes_of_model[m].add(g.node)
                t = P.types[b]
                num_by_type[m][t] = max(num_by_type[m].get(t, 0.0), ng)
            for (m, gpu_part, cpu_part, units) in per_bin_extra.get(b, []):
                o = demands[m].options[st.choice[m]]
                ng = round(units / RAY_GPU_UNITS, 4)
                reps.append(GpuReplica(demands[m].name, gpu_part, ng, o.quantization, True, cpu_part + o.cpu_bytes))
                off_count[m] += 1
                bins_of_model[m].add(b)
                nodes_of_model[m].add(g.node)
                t = P.types[b]
                num_by_type[m][t] = max(num_by_type[m].get(t, 0.0), ng)
            used = int(P.cap[b] - st.rem[b])
            gpus_out.append(
                GpuPlan(
                    g.id,
                    g.name,
                    g.node,
                    g.index,
                    g.gpu_type or P.types[b],
                    g.total_bytes,
                    int(P.cap[b]),
                    used,
                    tuple(reps),
                    int(P.denom[b]),
                )
            )
    else:
        for b in range(P.nb):
            for m in np.flatnonzero(st.cnt[:, b]).tolist():
                k = int(st.cnt[m, b])
                o = demands[m].options[st.choice[m]]
                cpu_out.extend([CpuReplica(demands[m].name, int(st.size[m]), P.node_names[b], o.quantization)] * k)
    for c in cpu_out:
        m = next(i for i, d in enumerate(demands) if d.name == c.model)
        cpu_count[m] += 1
        nodes_of_model[m].add(c.node)
    order = {d.name: i for i, d in enumerate(demands)}
    cpu_out.sort(key=lambda c: (P.node_names.index(c.node), order[c.model]))

    models_out = []
    for m, d in enumerate(demands):
        r = st.choice[m]
        o = d.options[r]
        placed = int(gpu_count[m] + off_count[m] + cpu_count[m])
        why_not = None
        if placed < d.max_replicas:
            why_not = _why_not_max(P, st, m, m in offload_models, m in cpu_models)
        models_out.append(
            ModelPlan(
                name=d.name,
                quantization=o.quantization,
                option_rank=r,
                replica_bytes=o.replica_bytes,
                cpu_bytes=o.cpu_bytes,
                min_replicas=d.min_replicas,
                max_replicas=d.max_replicas,
                placed_replicas=placed,
                gpu_replicas=int(gpu_count[m]),
                offload_replicas=int(off_count[m]),
                cpu_replicas=int(cpu_count[m]),
                gpu_type=d.gpu_type,
                gpus_used=len(bins_of_model[m]),
                nodes_used=len(nodes_of_model[m]),
                num_gpus_by_gpu_type=tuple(sorted(num_by_type[m].items())),
                why_quantization=reasons.get(m, f"{o.quantization}: first preference"),
                why_not_max=why_not,
            )
        )
    names = [d.name for d in demands]
    for mp in models_out:
        if mp.why_not_max:
            notes.append(f"model {mp.name}: {mp.placed_replicas} of max {mp.max_replicas} replicas; {mp.why_not_max}")
        if P.mode != "gpu" or mp.gpu_replicas < 2 or mp.offload_replicas or mp.cpu_replicas:
            continue
        m = names.index(mp.name)
        why = {
            "proven": "; nothing else fits: no placement of the same replica counts spreads it further (proven)",
            "traded": "; spreading it would put another model's replicas on one GPU or node instead",
        }
        seen = (confined or {}).get(m, {})
        if mp.gpus_used == 1 and int(P.E[m].sum()) == 1:
            notes.append(f"model {mp.name}: all {mp.gpu_replicas} GPU replicas share one GPU; one GPU failure takes it "
                         + (f"down; gpu_type {demands[m].gpu_type} pins it to the cluster's only {demands[m].gpu_type}"
                            if demands[m].gpu_type else "down; the cluster has one GPU"))
        elif mp.gpus_used == 1:
            notes.append(f"model {mp.name}: all {mp.gpu_replicas} GPU replicas share one GPU; one GPU failure takes it "
                         f"down{why.get(seen.get('gpu'), '')}")
        elif mp.nodes_used == 1 and len(set(P.node_of[P.E[m]].tolist())) >= 2:
            node = next(g.node for g in gpus_out if any(r.model == mp.name for r in g.replicas))
            notes.append(f"model {mp.name}: all {mp.gpu_replicas} GPU replicas are on node {node}; one node failure "
                         f"takes it down{why.get(seen.get('node'), '')}")
    # invariant checks (never over-commit); a violation here is a bug, not user error
    for g in gpus_out:
        assert g.used_bytes <= g.usable_bytes, g
        assert sum(int(round(r.num_gpus * RAY_GPU_UNITS)) for r in g.replicas) <= RAY_GPU_UNITS, g
    assert (st.ram >= 0).all()
    placed = int(sum(mp.placed_replicas for mp in models_out))
    solver = SolverInfo(qsearch, min_method, fill_method, optimal, status, placed, bound, time.perf_counter() - t0, spread)
    return Plan(
        feasible=True,
        mode=P.mode,
        headroom=P.headroom,
        gpu_reserve_bytes=P.reserve if P.mode == "gpu" else 0,
        models=tuple(models_out),
        gpus=tuple(gpus_out),
        cpu_replicas=tuple(cpu_out),
        offload=tuple(off_out),
        notes=tuple(notes),
        solver=solver,
        fraction_basis=P.basis,
    )


def _why_not_max(P: _Problem, st: _State, m: int, offloaded: bool, on_cpu: bool = False) -> str:
    """One line: why model m stopped below max_replicas, with the numbers."""
    np = P.np
    d = P.demands[m]
    o = d.options[st.choice[m]]
    where = "GPU" if P.mode == "gpu" else "node"
    if on_cpu:
        ram = int(st.ram.max()) if P.nn else 0
        return (
            f"a CPU replica needs {format_bytes(o.replica_bytes + o.cpu_bytes)} host RAM, the most left on a node is "
            f"{format_bytes(ram)}"
        )
    elig = np.flatnonzero(P.E[m])
    if elig.size == 0:
        return f"no {where} of type {d.gpu_type} in the cluster"
    size = int(st.size[m])
    b = int(elig[np.argmax(st.rem[elig])])
    room = int(st.rem[b])
    if offloaded:
        need_gpu = P.offload_gpu_bytes(m, st.choice[m])
        return (
            f"a split replica needs >= {format_bytes(need_gpu)} on a GPU and "
            f"{format_bytes(o.replica_bytes - need_gpu + o.cpu_bytes)} host RAM; the most GPU room left is "
            f"{format_bytes(room)} on {P.bin_ids[b]}, the most host RAM {format_bytes(int(st.ram.max()))}"
        )
    if room < size:
        msg = f"{where} {P.bin_ids[b]} has the most room left, {format_bytes(room)}; a replica needs {format_bytes(size)}"
        extra = o.cpu_bytes if P.mode == "cpu" else 0
        lower = [x for x in d.options if x is not o and x.replica_bytes + (x.cpu_bytes if P.mode == "cpu" else 0) <= room]
        if lower:
            x = lower[0]
            msg += f" ({x.quantization}, listed, needs {format_bytes(x.replica_bytes + (x.cpu_bytes if extra else 0))} and would fit)"
        return msg
    fits_bytes = elig[st.rem[elig] >= size]
    if P.mode == "gpu":
        ok_units = fits_bytes[st.rem_units[fits_bytes] >= st.units[m, fits_bytes]]
        if ok_units.size == 0:
            b = int(fits_bytes[0])
            return (
                f"gpu {P.bin_ids[b]} has {format_bytes(int(st.rem[b]))} left but only "
                f"{int(st.rem_units[b]) / RAY_GPU_UNITS:.4f} of its Ray GPU fraction; a replica needs "
                f"{int(st.units[m, b]) / RAY_GPU_UNITS:.4f} (num_gpus rounds up to 1e-4)"
            )
        nodes = np.unique(P.node_of[ok_units])
        if (st.ram[nodes] < st.cpu[m]).all():
            n = int(nodes[np.argmax(st.ram[nodes])])
            return (
                f"the GPUs with room are on nodes whose host RAM is spent: node {P.node_names[n]} has "
                f"{format_bytes(int(st.ram[n]))} left; a replica needs {format_bytes(int(st.cpu[m]))} besides its GPU "
                "memory"
            )
    return "the exact search placed other models' replicas instead (maximum total count)"


