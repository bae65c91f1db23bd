"""Why a plan is infeasible or under-placed, in numbers and with the smallest fix: per-GPU room, the model that
fits nowhere, mixed-size nodes, how many more GPUs of which type would do."""

from __future__ import annotations

import math
import time

from planner.errors import InfeasiblePlanError, InputError
from planner.cluster.inventory import Cluster
from planner.units import MiB, format_bytes
from planner.placement.greedy import _Budget, _place_mins, _smallest_choice  # noqa: F401
from planner.placement.problem import EXACT_MAX_VARS, ModelDemand, QuantOption, _Problem, usable_gpu_bytes  # noqa: F401

# ----------------------------------------------------------------------------------------------------------------
# Infeasibility: numbers and the smallest fix


def _gpu_room_lines(P: _Problem, limit: int = 6) -> list[str]:
    groups: dict = {}
    for b in range(P.nb):
        key = (P.types[b], int(P.total[b]), int(P.cap[b]))
        groups.setdefault(key, []).append(P.bin_ids[b])
    out = []
    for (t, total, cap), ids in list(groups.items())[:limit]:
        if P.mode == "gpu":
            who = f"{ids[0]} ({t})" if len(ids) == 1 else f"{len(ids)} x {t}"
            out.append(f"{who}: {format_bytes(cap)} usable of {format_bytes(total)}" + (" each" if len(ids) > 1 else ""))
        else:
            who = ids[0] if len(ids) == 1 else f"{len(ids)} nodes"
            out.append(f"{who}: {format_bytes(cap)} RAM usable" + (" each" if len(ids) > 1 else ""))
    if len(groups) > limit:
        out.append(f"... {len(groups) - limit} more kinds")
    return out



def _feasible_with(P: _Problem, choice, active, use_milp: bool, seconds: float) -> bool:
    status, _, _ = _place_mins(P, choice, active, _Budget(seconds), use_milp=use_milp)
    return status == "feasible"


def _infeasible_error(P: _Problem, fit_ranks: dict, active: list[int], suggest, budget: _Budget) -> InfeasiblePlanError:
    demands = P.demands
    choice = [_smallest_choice(P, fit_ranks, m) for m in range(P.nm)]
    need_lines, model_details = [], []
    total_need = 0
    for m in active:
        d = demands[m]
        o = d.options[choice[m]]
        size = int(P.opt_arrays(m, choice[m])[0])
        total_need += size * d.min_replicas
        pin = f" on {d.gpu_type}" if d.gpu_type and P.mode == "gpu" else ""
        split = ", split: GPU share" if P.offload[m] else ""
        need_lines.append(f"{d.name} {d.min_replicas} x {format_bytes(size)} ({o.quantization}{pin}{split})")
        model_details.append(
            {
                "name": d.name,
                "quantization": o.quantization,
                "replica_bytes": size,
                "min_replicas": d.min_replicas,
                "needs_bytes": size * d.min_replicas,
                "gpu_type": d.gpu_type,
            }
        )
    total_cap = int(P.cap.sum())
    where = "GPUs" if P.mode == "gpu" else "nodes"
    head = (
        f"cannot place every model's minimum replicas: they need {format_bytes(total_need)} at their least-memory "
        f"options, the {P.nb} {where} have {format_bytes(total_cap)} usable "
        f"(headroom {P.headroom:.0%}" + (f", reserve {format_bytes(P.reserve)}/GPU)" if P.mode == "gpu" else ")")
    )
    fixes: list[str] = []
    fix_details: list[dict] = []
    # the fix search shares one time budget; exact checks only on small instances
    fb = _Budget(min(5.0, max(1.0, budget.seconds)))
    small = int(sum(P.E[m].sum() for m in active)) <= EXACT_MAX_VARS

    def ok(P2: _Problem) -> bool:
        exact = small and fb.left() > 0.05
        return _feasible_with(P2, choice, active, exact, min(1.0, fb.left()))

    # biggest consumers first
    by_need = sorted(active, key=lambda m: -int(P.opt_arrays(m, choice[m])[0]) * int(P.min_rep[m]))[:10]
    # 0. a node that mixes GPU sizes is planned against its smallest GPU: say so, with the models it shuts out
    if P.mode == "gpu":
        for text, detail in mixed_node_notes(P, [(demands[m].name, int(P.opt_arrays(m, choice[m])[0]))
                                                  for m in by_need]):
            fixes.append(text)
            fix_details.append(detail)
    # 1. add GPUs like an existing one
    if P.mode == "gpu":
        add = _try_add_gpus(P, ok, max(0, total_need - total_cap), fb)
        if add:
            k, g = add
            fixes.append(
                f"add {'one more GPU' if k == 1 else f'{k} more GPUs'} of {format_bytes(g.total_bytes)} "
                f"({P.types[P.gpus.index(g)]}, like {g.id})"
            )
            fix_details.append({"kind": "add_gpus", "count": k, "total_bytes": g.total_bytes, "like": g.id})
    # 2. lower one model's min_replicas: the largest value that fits (bisection; fewer is always easier)
    for m in by_need:
        d = demands[m]
        if not ok(_with_min(P, m, 0)):
            continue
        lo_k, hi_k = 0, d.min_replicas  # ok(lo_k), not ok(hi_k)
        while hi_k - lo_k > 1:
            mid = (lo_k + hi_k) // 2
            if ok(_with_min(P, m, mid)):
                lo_k = mid
            else:
                hi_k = mid
        fixes.append(f"lower min_replicas of {d.name} from {d.min_replicas} to {lo_k}")
        fix_details.append({"kind": "min_replicas", "model": d.name, "to": lo_k})
    # 3. per-model replica size that would fit (and the caller's suggestion for it)
    for m in by_need:
        if P.offload[m]:
            continue
        room = _room_for(P, choice, active, m)
        d = demands[m]
        o = d.options[choice[m]]
        if room > 0:
            fix_details.append({"kind": "replica_bytes", "model": d.name, "room_bytes": room})
            fixes.append(f"make a replica of {d.name} need <= {format_bytes(room)} (it needs {format_bytes(o.replica_bytes)} at {o.quantization})")
            if suggest is not None:
                s = suggest(d, room)
                if s:
                    fixes.append(f"{d.name}: {s}")
                    fix_details.append({"kind": "suggest", "model": d.name, "text": s})
    if len(need_lines) > 8:
        need_lines = need_lines[:8] + [f"... {len(need_lines) - 8} more models"]
    msg = (
        head
        + "\n  needs: "
        + "; ".join(need_lines)
        + "\n  room:  "
        + "; ".join(_gpu_room_lines(P))
        + ("\n  fix:   " + "; or ".join(fixes[:6]) if fixes else "\n  fix:   " + _fallback_fix(P, total_need, total_cap))
    )
    if budget.timed_out:
        msg += f"\n  note:  the exact search hit its time limit; a placement may exist (raise time_limit_s)"
    details = {
        "models": model_details,
        "gpus": [
            {"id": P.bin_ids[b], "total_bytes": int(P.total[b]), "usable_bytes": int(P.cap[b]), "gpu_type": P.types[b]}
            for b in range(P.nb)
        ],
        "fixes": fix_details,
        "timed_out": budget.timed_out,
    }
    return InfeasiblePlanError(msg, details=details)


def mixed_node_notes(P: _Problem, sizes: list[tuple[str, int]]) -> list[tuple[str, dict]]:
    """For each node whose GPUs differ in size: Ray picks the GPU inside a node, so every replica there is planned
    against the node's smallest basis. The text names the GPU types, the basis, the models (name, replica bytes)
    that need more than it but would fit one of the node's larger GPUs, and the fix."""
    out = []
    nodes: dict[str, list[int]] = {}
    for b, g in enumerate(P.gpus):
        nodes.setdefault(g.node, []).append(b)
    for node, bins in nodes.items():
        caps = {P.types[b]: int(P.cap[b]) for b in bins}
        basis = int(min(P.denom[b] for b in bins))
        if len(set(int(P.cap[b]) for b in bins)) < 2:
            continue
        shut_out = [(n, sz) for n, sz in sizes if basis < sz <= max(caps.values())]
        kinds = " and ".join(f"{t} ({format_bytes(c)} usable)" for t, c in sorted(caps.items(), key=lambda x: x[1]))
        text = (f"node {node} mixes {kinds}; Ray cannot tell its GPUs apart, so every replica there is planned "
                f"against {format_bytes(basis)}")
        if shut_out:
            text += "; " + ", ".join(f"{n} needs {format_bytes(sz)}" for n, sz in shut_out)
        text += (". Fix: run each GPU type as its own Ray node (one pod per GPU type on KubeRay), so the larger "
                 "GPUs are planned at their own size")
        out.append((text, {"kind": "split_mixed_node", "node": node, "basis_bytes": basis,
                           "usable_by_type": caps, "models": [n for n, _ in shut_out]}))
    return out


def _fallback_fix(P: _Problem, need: int, cap: int) -> str:
    """When no single change was found in the time allowed: the byte deficit in GPUs like the largest one."""
    if P.mode == "gpu" and P.nb:
        b = int(P.np.argmax(P.cap))
        per = int(P.cap[b])
        k = max(1, -(-max(0, need - cap) // max(per, 1)))
        return (
            f"add at least {k} GPUs like {P.bin_ids[b]} ({P.types[b]}, {format_bytes(per)} usable each; the minimums "
            f"need {format_bytes(max(0, need - cap))} more than the cluster has), or lower min_replicas"
        )
    return f"add nodes with {format_bytes(max(0, need - cap))} more RAM in all, or lower min_replicas"


def _with_min(P: _Problem, m: int, k: int) -> _Problem:
    import copy

    P2 = copy.copy(P)
    P2.min_rep = P.min_rep.copy()
    P2.min_rep[m] = k
    return P2


def _room_for(P: _Problem, choice, active, m: int) -> int:
    """Largest replica size of model m (others unchanged) with which every minimum fits, by bisection over the
    heuristics (0 when none does). In CPU mode the size includes the option's cpu_bytes."""
    import copy

    d = P.demands[m]
    o = d.options[choice[m]]
    extra = o.cpu_bytes if P.mode == "cpu" else 0
    hi = int(P.cap[P.E[m]].max()) if P.E[m].any() else 0
    hi = min(hi, o.replica_bytes + extra - 1)

    def ok(size: int) -> bool:
        P2 = copy.copy(P)
        opts = list(d.options)
        opts[choice[m]] = QuantOption(o.quantization, max(1, size - extra), o.cpu_bytes)
        P2.demands = list(P.demands)
        P2.demands[m] = ModelDemand(d.name, tuple(opts), d.min_replicas, d.max_replicas, d.offload_cpu_bytes, d.gpu_type)
        return _feasible_with(P2, choice, active, False, 0.0)

    if hi < MiB or not ok(MiB):
        return 0
    lo = MiB
    while hi - lo > MiB:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo // MiB * MiB


def _try_add_gpus(P: _Problem, ok, deficit: int, budget: _Budget, max_factor: int = 4):
    """Fewest GPUs like an existing one that make the minimums fit; among equal counts the smaller GPU. New GPUs go
    on new nodes shaped like the template GPU's node (same GPUs per node, same host RAM). Per kind of GPU (largest
    first): the byte deficit's lower bound, then doubling, then bisection (more GPUs never hurt), within
    ``budget``. ``ok(problem)`` is the feasibility check. Returns (count, template gpu) or None."""
    from dataclasses import replace

    from planner.cluster.inventory import Cluster, Node

    kinds: dict = {}
    for b, g in enumerate(P.gpus):
        kinds.setdefault((P.types[b], g.total_bytes), g)
    node_of = {n.name: n for n in P.cluster.nodes}

    def fits_with(g, t, k) -> bool:
        template = node_of[g.node]
        per_node = max(1, len(template.gpus))
        new_nodes = []
        for start in range(0, k, per_node):
            name = f"new-node-{start // per_node}"
            gpus = tuple(
                replace(g, id=f"{name}/gpu-{i}", node=name, index=i, free_bytes=None, gpu_type=g.gpu_type or t)
                for i in range(min(per_node, k - start))
            )
            new_nodes.append(Node(name, template.cpu_memory_bytes, gpus))
        cl = Cluster(nodes=tuple(P.cluster.nodes) + tuple(new_nodes), source=P.cluster.source)
        try:
            P2 = _Problem(P.demands, cl, P.headroom, P.reserve, P.basis)
        except InputError:
            return False
        P2.min_rep = P.min_rep
        P2.offload = P.offload.copy()
        return ok(P2)

    best = None
    for (t, total), g in sorted(kinds.items(), key=lambda kv: -kv[0][1]):
        if budget.left() <= 0:
            break
        cap = usable_gpu_bytes(replace(g, free_bytes=None), headroom=P.headroom, gpu_reserve_bytes=P.reserve)
        if cap <= 0:
            continue
        lo = max(1, -(-deficit // cap))  # fewer than this cannot hold the missing bytes
        limit = max_factor * max(P.nb, 1) + 64
        if best is not None:
            limit = min(limit, best[0])
        hi = lo
        while hi <= limit and budget.left() > 0 and not fits_with(g, t, hi):
            lo = hi + 1
            hi = hi * 2
        if hi > limit or budget.left() <= 0:
            continue
        while lo < hi and budget.left() > 0:  # fits_with(hi) holds; find the least
            mid = (lo + hi) // 2
            if fits_with(g, t, mid):
                hi = mid
            else:
                lo = mid + 1
        if best is None or (hi, total) < (best[0], best[1].total_bytes):
            best = (hi, g)
    return best


def _fits_nowhere_error(P: _Problem, hard: list[int], suggest) -> InfeasiblePlanError:
    lines, details = [], []
    for m in hard:
        d = P.demands[m]
        o = min(d.options, key=lambda x: x.replica_bytes)
        size = o.replica_bytes + (o.cpu_bytes if P.mode == "cpu" else 0)
        elig = P.E[m]
        if P.mode == "gpu" and not elig.any():
            have = sorted(set(P.types))
            lines.append(
                f"model {d.name} ({d.min_replicas} x {format_bytes(size)} at {o.quantization}) is pinned to gpu_type "
                f"{d.gpu_type} but the cluster has none (types: {', '.join(have)}); fix: remove the pin or add a GPU "
                f"of type {d.gpu_type}"
            )
            details.append({"name": d.name, "reason": "no_gpu_of_type", "gpu_type": d.gpu_type, "types": have})
            continue
        largest = int(P.cap[elig].max())
        b = int(P.np.flatnonzero(elig)[P.np.argmax(P.cap[elig])])
        if P.mode == "gpu":
            need_total = math.ceil((size + P.reserve) / (1.0 - P.headroom))
            fix = [f"a GPU of >= {format_bytes(need_total)} total"]
            split_need = max(size - largest, 0)
            if d.offload_cpu_bytes == 0:
                fix.append(f"set offload.cpu_memory >= {format_bytes(split_need)} to split it GPU+CPU")
            elif d.offload_cpu_bytes < split_need:
                fix.append(
                    f"raise offload.cpu_memory from {format_bytes(d.offload_cpu_bytes)} to >= {format_bytes(split_need)}"
                )
            ram_n = int(P.node_of[b])
            if o.cpu_bytes > int(P.ram_cap[ram_n]) and largest >= size:
                lines.append(
                    f"model {d.name}: a replica needs {format_bytes(o.cpu_bytes)} host RAM besides, node "
                    f"{P.node_names[ram_n]} has {format_bytes(int(P.ram_cap[ram_n]))} usable; fix: more host RAM"
                )
                details.append({"name": d.name, "reason": "host_ram", "cpu_bytes": o.cpu_bytes})
                continue
            s = suggest(d, largest) if suggest is not None else None
            if s:
                fix.append(s)
            lines.append(
                f"model {d.name} fits on no GPU: its least-memory option {o.quantization} needs "
                f"{format_bytes(size)} per replica, the largest usable GPU is {P.bin_ids[b]} with "
                f"{format_bytes(largest)} ({format_bytes(int(P.total[b]))} total, headroom {P.headroom:.0%}, reserve "
                f"{format_bytes(P.reserve)}); fix: " + "; or ".join(fix)
            )
        else:
            fix = [f"a node with >= {format_bytes(math.ceil(size / (1.0 - P.headroom)))} RAM"]
            s = suggest(d, largest) if suggest is not None else None
            if s:
                fix.append(s)
            lines.append(
                f"model {d.name} fits on no node: a CPU replica ({o.quantization}) needs {format_bytes(size)}, the "
                f"largest node {P.bin_ids[b]} has {format_bytes(largest)} RAM usable; fix: " + "; or ".join(fix)
            )
        details.append(
            {"name": d.name, "reason": "too_large", "replica_bytes": size, "largest_room_bytes": largest, "bin": P.bin_ids[b]}
        )
    return InfeasiblePlanError("\n".join(lines), details={"models": details, "fixes": [], "timed_out": False})

