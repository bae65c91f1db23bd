"""From deploy.yaml args and a cluster to a Plan: estimate every allowed quantization of every model with the memory
model, hand the byte sizes to the packer, and explain failures with the memory model's own levers
(a shorter max_model_len, fewer max_num_seqs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from planner.config import ClusterDecl, DeployArgs, ModelEntry
from planner.errors import InputError, ModelSpecError, QuantConflictError
from planner.cluster.inventory import Cluster, Gpu, Node, gpu_type_of
from planner.demand import apply_traffic
from planner.model.engines import estimate_replica, pick_engine
from planner.model.estimate import ReplicaEstimate
from planner.model.quant import resolve_quant
from planner.placement.packing import DEFAULT_GPU_RESERVE, ModelDemand, Plan, QuantOption, plan
from planner.rollout import ModelRule, Rollout, realize
from planner.model.spec import ModelSpec, load_spec
from planner.units import format_bytes

DEFAULT_ENGINES = frozenset({"transformers"})


@dataclass(frozen=True)
class PlanningResult:
    plan: Plan
    estimates: dict  # model name -> {quantization: ReplicaEstimate}
    demands: tuple[ModelDemand, ...]
    cluster: Cluster
    device: str  # "cuda" when the cluster has GPUs, else "cpu"
    rollout: Rollout | None = None  # the plan as Ray Serve deployments (planner/rollout/)
    specs: dict | None = None  # model name -> ModelSpec
    args: DeployArgs | None = None  # the deploy args as planned: every model's quantization list filled in
    engine_why: dict | None = None  # model name -> {quantization: why that engine (planner.model.engines.pick_engine)}
    traffic: dict | None = None  # model name -> planner.demand.ModelTraffic, for entries with traffic and slo

    def estimate_for(self, model: str) -> ReplicaEstimate:
        q = next(m.quantization for m in self.plan.models if m.name == model)
        return self.estimates[model][q]

    def to_json(self) -> dict:
        out = self.plan.to_json()
        out["estimates"] = {
            name: {q: e.to_json()["bytes"] for q, e in by_q.items()} for name, by_q in self.estimates.items()
        }
        out["cluster"] = self.cluster.to_json()
        if self.rollout is not None:
            out["rollout"] = self.rollout.to_json()
        return out


def cluster_from_decl(decl: ClusterDecl) -> Cluster:
    """A Cluster value from a declaration; GPU memory from planner/catalog/gpus.json when not given."""
    from planner.placement.capacity import lookup_gpu

    nodes = []
    for nd in decl.nodes:
        for copy in range(nd.replicas):
            name = nd.name if nd.replicas == 1 else f"{nd.name}-{copy}"
            gpus = []
            i = 0
            for g in nd.gpus:
                if g.memory is not None:
                    total, gtype = g.memory, gpu_type_of(g.name)
                else:
                    known = lookup_gpu(g.name)
                    total, gtype = known.planning_bytes, known.name
                for _ in range(g.count):
                    gpus.append(Gpu(id=f"{name}/gpu-{i}", name=g.name, total_bytes=total, node=name, index=i,
                                    gpu_type=gtype))
                    i += 1
            nodes.append(Node(name=name, cpu_memory_bytes=nd.cpu_memory, gpus=tuple(gpus), num_cpus=nd.num_cpus))
    return Cluster(nodes=tuple(nodes), source="declared")


def _estimate(spec: ModelSpec, entry: ModelEntry, quant: str, device: str, engine: str, **over) -> ReplicaEstimate:
    return estimate_replica(spec, quant=quant, dtype=entry.dtype,
                            max_model_len=over.get("max_model_len", entry.max_model_len),
                            max_num_seqs=over.get("max_num_seqs", entry.max_num_seqs), device=device, engine=engine)


def load_specs(args: DeployArgs) -> dict:
    """{model: ModelSpec} of every entry, each checked against its max_model_len."""
    specs = {}
    for entry in args.models:
        try:
            spec = load_spec(entry.source)
        except ModelSpecError as exc:  # say which deploy.yaml entry it came from
            raise ModelSpecError(f"models[{entry.name}].source: {exc}") from None
        specs[entry.name] = spec
        mpe = spec.dims.max_position_embeddings
        if mpe and entry.max_model_len > mpe:
            raise InputError(
                f"models[{entry.name}].max_model_len {entry.max_model_len} exceeds the model's "
                f"max_position_embeddings {mpe}: set max_model_len to {mpe} or less"
            )
    return specs


def with_default_quantization(args: DeployArgs, specs: dict) -> DeployArgs:
    """``args`` with every entry that lists no quantization given its source's own: a GGUF file's types, a
    pre-quantized checkpoint's scheme, else the config's dtype (what ``gpuplan estimate`` takes without --quant)."""
    if all(e.quantization for e in args.models):
        return args
    models = [e if e.quantization else
              e.model_copy(update={"quantization": [resolve_quant(specs[e.name], None).scheme]}) for e in args.models]
    return args.model_copy(update={"models": models})


def resolve_models(args: DeployArgs) -> tuple[DeployArgs, dict]:
    """(``args`` with every model's quantization list filled in, {model: ModelSpec}): what estimates start from."""
    specs = load_specs(args)
    return with_default_quantization(args, specs), specs


def estimate_models(args: DeployArgs, specs: dict, device: str, engines: frozenset = DEFAULT_ENGINES,
                    strict: bool = True) -> tuple[dict, dict]:
    """({model: {quantization: ReplicaEstimate}}, {model: {quantization: why that engine}}) for every allowed
    quantization of ``args`` as :func:`resolve_models` returns them."""
    estimates, why = {}, {}
    for entry in args.models:
        spec = specs[entry.name]
        by_q, clash = {}, []
        for q in entry.quantization:
            try:
                engine, why.setdefault(entry.name, {})[q] = pick_engine(entry.engine, q, engines, entry.name,
                                                                        strict=strict)
                by_q[q] = _estimate(spec, entry, q, device, engine)
            except QuantConflictError as exc:  # worded below for the deploy file's field, not estimate's --quant
                clash.append(exc)
        if clash:
            raise _quant_clash(entry, clash)
        estimates[entry.name] = by_q
    return estimates, why


def _quant_clash(entry: ModelEntry, clash: list) -> QuantConflictError:
    """One error for the quantizations of ``entry`` that its source rules out, with the deploy file's field."""
    bad = [e.requested for e in clash]
    first, field_ = clash[0], f"models[{entry.name}].quantization"
    good = [q for q in entry.quantization if q not in bad]
    if good:
        fix = f"drop {' and '.join(bad)} from {field_} ({', '.join(good)} stays)"
    else:
        fix = f"set {field_} to {first.allowed[0]} {first.fix}".rstrip()
    return QuantConflictError(f"{field_} [{', '.join(entry.quantization)}]: {first.reason}, which {' and '.join(bad)} "
                              f"{'contradicts' if len(bad) == 1 else 'contradict'}. Fix: {fix}",
                              model=first.model, requested=bad[0], reason=first.reason, allowed=first.allowed)


def _replica_bytes(entry: ModelEntry, est: ReplicaEstimate) -> int:
    return entry.replica_memory if entry.replica_memory is not None else est.total


def build_demands(args: DeployArgs, estimates: dict, device: str) -> tuple[ModelDemand, ...]:
    out = []
    for entry in args.models:
        opts = tuple(QuantOption(q, _replica_bytes(entry, estimates[entry.name][q])) for q in entry.quantization)
        out.append(ModelDemand(
            name=entry.name, options=opts, min_replicas=entry.replicas.min, max_replicas=entry.replicas.max,
            offload_cpu_bytes=entry.offload.cpu_memory if entry.offload else 0,
            gpu_type=entry.gpu_type.upper() if entry.gpu_type else None,
        ))
    return tuple(out)


def _suggester(args: DeployArgs, specs: dict, device: str, estimates: dict):
    """The memory model's levers for an infeasible plan: the longest max_model_len (halving), then the most
    max_num_seqs, at which the model's smallest allowed option fits in ``room`` bytes (on the engine its estimate
    has)."""
    entries = {m.name: m for m in args.models}

    def suggest(demand: ModelDemand, room: int) -> str | None:
        entry, spec = entries.get(demand.name), specs.get(demand.name)
        if entry is None or spec is None or entry.replica_memory is not None or room <= 0:
            return None
        q = min(entry.quantization, key=lambda x: estimates[demand.name][x].total)
        engine = estimates[demand.name][q].engine
        n = entry.max_model_len // 2
        while n >= 256:
            if _estimate(spec, entry, q, device, engine, max_model_len=n).total <= room:
                return f"lower models[{demand.name}].max_model_len from {entry.max_model_len} to {n} (at {q})"
            n //= 2
        s = entry.max_num_seqs - 1
        while s >= 1:
            if _estimate(spec, entry, q, device, engine, max_num_seqs=s).total <= room:
                return f"lower models[{demand.name}].max_num_seqs from {entry.max_num_seqs} to {s} (at {q})"
            s -= 1
        return None

    return suggest


def make_plan(args: DeployArgs, cluster: Cluster, engines: frozenset = DEFAULT_ENGINES, *,
              strict: bool = True) -> PlanningResult:
    """The plan of ``args`` on ``cluster``; ``engines``: the engines installed for the replicas (what ``engine:
    auto`` may pick; planner.cluster.installed.installed_engines()). ``strict`` (serving): an engine the deploy file
    names must be installed; not strict (planning, maybe for another machine): it is planned as named."""
    device = "cuda" if cluster.gpus else "cpu"
    args, specs = resolve_models(args)
    estimates, why = estimate_models(args, specs, device, engines, strict)
    args, traffic = apply_traffic(args, specs, estimates, cluster)  # replicas and quantizations the traffic needs
    demands = build_demands(args, estimates, device)
    reserve = args.gpu_reserve if args.gpu_reserve is not None else DEFAULT_GPU_RESERVE
    # num_gpus as a share of each GPU's *usable* bytes: then whatever Ray admits (sum <= 1 per GPU) fits in usable
    # memory, whichever GPU Ray picks; a share of the total would let Ray eat the headroom (see docs/ray-gpu-fractions.md)
    p, ro = plan_realized(
        demands, cluster, lambda p: model_rules(args, traffic, {m.name: m.quantization for m in p.models}),
        headroom=args.headroom, gpu_reserve_bytes=reserve, suggest=_suggester(args, specs, device, estimates),
        fraction_basis="usable")
    return PlanningResult(plan=p, estimates=estimates, demands=demands, cluster=cluster, device=device, rollout=ro,
                          specs=specs, args=args, engine_why=why, traffic=traffic)


def plan_realized(demands, cluster: Cluster, rules_of, **kw) -> tuple[Plan, Rollout]:
    """:func:`plan` and the rollout that brings it up (:func:`realize`, with ``rules_of(plan)``). The spread step
    moves replicas off a single node or GPU; when Ray's best fit then cannot bring up every planned replica
    (realize plans fewer than were packed) and the placement without that step brings up more, that placement is
    kept, with a note: a spread that costs replicas is not a tie-breaker."""
    p = plan(demands, cluster, **kw)
    ro = realize(p, rules_of(p))
    reached = sum(r.max_replicas for r in ro.models)
    if reached >= p.solver.placed or not p.solver.spread:
        return p, ro
    p2 = plan(demands, cluster, spread=False, **kw)
    ro2 = realize(p2, rules_of(p2))
    reached2 = sum(r.max_replicas for r in ro2.models)
    if reached2 <= reached:
        return p, ro
    note = (f"the placement spread over nodes and GPUs left {p.solver.placed - reached} replica(s) that Ray's best fit "
            f"cannot bring up; the fill's own placement brings up {reached2} of {p2.solver.placed}, so it is kept")
    return replace(p2, notes=p2.notes + (note,)), ro2


def model_rules(args: DeployArgs, traffic: dict | None = None, quantizations: dict | None = None
                ) -> dict[str, ModelRule]:
    """Each model's scaling knobs from deploy.yaml, for planner.rollout; ``traffic`` (model -> ModelTraffic) gives
    the capacity of one replica within the SLO at the plan's quantization (``quantizations``: model -> scheme), which
    gpuplan's policy scales by."""
    out = {}
    for m in args.models:
        t = (traffic or {}).get(m.name)
        opts = getattr(t, "options", None) or {}
        q = (quantizations or {}).get(m.name) or getattr(t, "chosen", None)
        opt = opts.get(q)
        out[m.name] = ModelRule(
            m.name, m.replicas.min, m.replicas.max, m.autoscaling.target_ongoing_requests, m.autoscaling.upscale_delay_s,
            m.autoscaling.downscale_delay_s, policy=m.autoscaling.policy, max_num_seqs=m.max_num_seqs,
            slo_ttft_p95_s=m.slo.ttft_p95_ms / 1e3 if m.slo and m.slo.ttft_p95_ms else None,
            slo_tpot_p95_s=m.slo.tpot_p95_ms / 1e3 if m.slo and m.slo.tpot_p95_ms else None,
            capacity_rps=round(opt.capacity.requests_per_s, 6) if opt is not None else None,
            zero_after_s=m.autoscaling.zero_after_s if m.replicas.min == 0 else None)
    return out


def describe_cluster(cluster: Cluster) -> str:
    if not cluster.gpus:
        ram = sum(n.cpu_memory_bytes for n in cluster.nodes)
        return f"{len(cluster.nodes)} node(s), no GPU, {format_bytes(ram)} RAM for CPU replicas"
    # nodes of one shape (the same GPUs) in one part, named as a range when numbered alike: 500 GPUs stay readable
    groups: dict[tuple, list[str]] = {}
    for n in cluster.nodes:
        shape: dict[tuple, int] = {}
        for g in n.gpus:
            shape[(g.name, g.total_bytes)] = shape.get((g.name, g.total_bytes), 0) + 1
        groups.setdefault(tuple(shape.items()), []).append(n.name)
    parts = []
    for shape, names in groups.items():
        gpus = " + ".join(f"{k} x {name} {format_bytes(b)}" for (name, b), k in shape) if shape else "no GPU"
        parts.append(f"{names[0]}: {gpus}" if len(names) == 1 else
                     f"{len(names)} nodes {_node_names(names)}: {gpus}{' each' * bool(shape)}")
    n_gpus, n_nodes = len(cluster.gpus), len(cluster.nodes)
    return (f"{n_gpus} GPU{'s' * (n_gpus != 1)} on {n_nodes} node{'s' * (n_nodes != 1)}; " + "; ".join(parts))


def _node_names(names: list[str]) -> str:
    """"a10g-0..a10g-15" for one prefix numbered without a gap (a declaration's ``replicas``), else the names (the
    first three and a count when there are more than four)."""
    m = [re.fullmatch(r"(.*?)(\d+)", n) for n in names]
    if len(names) > 2 and all(m) and len({x.group(1) for x in m}) == 1:
        nums = sorted(int(x.group(2)) for x in m)
        if nums == list(range(nums[0], nums[0] + len(nums))):
            return f"{m[0].group(1)}{nums[0]}..{m[0].group(1)}{nums[-1]}"
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more"
