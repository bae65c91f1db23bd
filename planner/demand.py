"""What each model's traffic demands of the plan: how many replicas, at which of its allowed quantizations.

For a deploy entry with ``traffic`` and ``slo``: for every allowed quantization (on the engine its estimate has) and
every GPU type the model may be placed on, the speed model (planner/model/speed.py) gives a replica's step and
prefill times, and the queueing arithmetic (planner/traffic.py) the most requests/s one replica holds within the SLO;
the replicas needed are the traffic's rate over that, on the slowest GPU type (a replica may land on any of them).
The quantization that serves the traffic on the fewest bytes (replicas x bytes per replica; the user's order breaks
ties) sets the model's minimum replicas; the allowed quantizations that need more replicas than that are dropped,
the others stay in the user's order for the packer. Pure: values in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.cluster.inventory import Cluster
from planner.config import DeployArgs, ModelEntry
from planner.errors import InputError
from planner.model.engines import speed_of
from planner.model.estimate import KV_DTYPES, ReplicaEstimate
from planner.model.quant import FLOAT_BYTES, QuantSpec, resolve_quant
from planner.model.spec import ModelSpec
from planner.model.speed import compute_dtype_of, decode_step, kernel_of, prefill, work_of
from planner.placement.capacity import CPU_DEVICE, device_speed, lookup_gpu
from planner.rollout import ModelRule
from planner.simulate import SimModel, arrivals_from_trace, simulate
from planner.traffic import (Capacity, Slo, Traffic, load_point, read_trace, replica_capacity, replicas_needed,
                             traffic_of_trace)

# sizing by simulation (a model whose traffic is a trace): the most replicas tried above the closed form's answer, and
# the requests of the replay the search simulates (the first ones; an hour of the shipped trace is 19,366) before the
# answer is checked on the whole trace (and raised until it holds there): a plan of ten such models takes seconds
SIM_SIZING_MAX_FACTOR = 4
SIM_SIZING_REQUESTS = 4000


@dataclass(frozen=True)
class OptionDemand:
    """One allowed quantization's answer: replicas needed on the slowest GPU type, and its capacity there."""

    quantization: str
    engine: str
    kernel: str
    gpu_type: str
    replicas: int
    replica_bytes: int
    capacity: Capacity
    per_gpu_type: dict  # gpu type -> requests/s one replica holds there
    closed_form: int = 0  # replicas the queueing formulas ask for (== replicas unless sized by simulation)
    simulated: dict | None = None  # sized by simulating the model's trace: the p95s with `replicas`, and why

    def to_json(self) -> dict:
        return {"quantization": self.quantization, "engine": self.engine, "kernel": self.kernel,
                "gpu_type": self.gpu_type, "replicas_needed": self.replicas, "replica_bytes": self.replica_bytes,
                "closed_form_replicas": self.closed_form, "simulated": self.simulated,
                "per_replica_requests_per_s": round(self.capacity.requests_per_s, 4),
                "per_gpu_type": {k: round(v, 4) for k, v in self.per_gpu_type.items()},
                "limited_by": self.capacity.limited_by, "why": self.capacity.why}


@dataclass(frozen=True)
class ModelTraffic:
    """A model's traffic, its SLO, and what each allowed quantization needs to serve it."""

    model: str
    traffic: Traffic
    slo: Slo
    replicas_needed: int
    chosen: str  # the quantization that serves it on the fewest bytes
    options: dict  # quantization -> OptionDemand (those that could not meet the SLO are absent)
    max_num_seqs: int
    steps: dict = field(default_factory=dict, compare=False)  # quantization -> (step, prefill) functions
    notes: tuple[str, ...] = ()

    def predicted(self, quantization: str, replicas: int) -> dict:
        """TTFT/TPOT p95 with ``replicas`` replicas at ``quantization`` sharing the traffic evenly (slowest GPU)."""
        step, pre, path = self.steps[quantization]
        lp = load_point(self.traffic.requests_per_s / max(1, replicas), self.traffic, step, pre, self.max_num_seqs,
                        path)
        return {"ttft_p95_ms": None if lp.saturated else round(lp.ttft_p95_s * 1e3, 1),
                "tpot_p95_ms": None if lp.saturated else round(lp.tpot_p95_s * 1e3, 2),
                "saturated": lp.saturated}

    def line(self, quantization: str, replicas: int) -> str:
        """"12 req/s; one replica holds 4.1 req/s within TTFT p95 500 ms, TPOT p95 60 ms: 3"."""
        o = self.options[quantization]
        targets = ", ".join(f"{k} {v:g} ms" for k, v in (("TTFT p95", self.slo.ttft_p95_ms),
                                                          ("TPOT p95", self.slo.tpot_p95_ms)) if v is not None)
        p = self.predicted(quantization, replicas)
        got = (f"predicted TTFT p95 {p['ttft_p95_ms']:g} ms, TPOT p95 {p['tpot_p95_ms']:g} ms"
               if not p["saturated"] else f"saturated: {p['saturated']}")
        if o.simulated and not o.simulated["meets_slo"]:
            return (f"{self.traffic.requests_per_s:.3g} req/s of {self.traffic.prompt_tokens} in / "
                    f"{self.traffic.output_tokens} out (a trace); one replica ({quantization} on {o.gpu_type}) holds "
                    f"{o.capacity.requests_per_s:.3g} req/s of steady traffic within {targets}: needs {o.replicas}; "
                    f"but {o.simulated['why']}")
        if o.simulated:
            sim = o.simulated
            return (f"{self.traffic.requests_per_s:.3g} req/s of {self.traffic.prompt_tokens} in / "
                    f"{self.traffic.output_tokens} out (a trace); one replica ({quantization} on {o.gpu_type}) holds "
                    f"{o.capacity.requests_per_s:.3g} req/s of steady traffic within {targets}, so {o.closed_form}; "
                    f"the trace's bursts need {o.replicas} (simulated: TTFT p95 {sim['ttft_p95_ms']} ms, TPOT p95 "
                    f"{sim['tpot_p95_ms']} ms); with {replicas}: {got if replicas != o.replicas else 'as simulated'}")
        return (f"{self.traffic.requests_per_s:.3g} req/s of {self.traffic.prompt_tokens} in / "
                f"{self.traffic.output_tokens} out; one replica ({quantization} on {o.gpu_type}) holds "
                f"{o.capacity.requests_per_s:.3g} req/s within {targets}: needs {o.replicas}; with {replicas}: {got}")

    def to_json(self, quantization: str | None = None, replicas: int | None = None) -> dict:
        q = quantization or self.chosen
        n = replicas if replicas is not None else self.replicas_needed
        o = self.options.get(q)
        return {"requests_per_s": round(self.traffic.requests_per_s, 4), "prompt_tokens": self.traffic.prompt_tokens,
                "output_tokens": self.traffic.output_tokens, "slo": self.slo.to_json(),
                "replicas_needed": o.replicas if o else self.replicas_needed,
                "per_replica_requests_per_s": round(o.capacity.requests_per_s, 4) if o else None,
                "quantization": q, "replicas": n, "predicted": self.predicted(q, n) if o else None,
                "chosen_for_fewest_bytes": self.chosen,
                "options": {k: v.to_json() for k, v in self.options.items()}, "notes": list(self.notes)}


@dataclass(frozen=True)
class UnsizedTraffic:
    """A model whose traffic could not be sized: a device it may run on has no speed numbers (a GPU without a
    bandwidth in the catalog). Its replicas stay as declared, and the plan says why and what to add."""

    model: str
    why: str
    chosen: str | None = None
    replicas_needed: int = 0
    options: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def line(self, quantization: str | None = None, replicas: int | None = None) -> str:
        return f"traffic not sized ({self.why}); replicas as declared"

    def to_json(self, quantization: str | None = None, replicas: int | None = None) -> dict:
        return {"sized": False, "why": self.why}


def traffic_of(entry: ModelEntry) -> Traffic:
    """The entry's traffic as means: declared, or taken from its trace (declared values override the trace's)."""
    t = entry.traffic
    base = traffic_of_trace(read_trace(t.trace)) if t.trace else None
    rate = t.requests_per_s if t.requests_per_s is not None else base.requests_per_s
    out = Traffic(requests_per_s=rate * t.scale,
                  prompt_tokens=t.prompt_tokens if t.prompt_tokens is not None else base.prompt_tokens,
                  output_tokens=t.output_tokens if t.output_tokens is not None else base.output_tokens)
    if out.prompt_tokens + out.output_tokens > entry.max_model_len:
        raise InputError(f"models[{entry.name}].traffic: a mean request of {out.prompt_tokens} + {out.output_tokens} "
                         f"tokens does not fit max_model_len {entry.max_model_len}; raise max_model_len to at least "
                         f"{out.prompt_tokens + out.output_tokens}")
    return out


def speed_fns(spec: ModelSpec, quant: QuantSpec, est: ReplicaEstimate, device: str):
    """(step(batch, context) -> s, prefill(tokens) -> s, the serving path's latency before a first token in s) of a
    replica sized as ``est`` on ``device`` (a GPU type, or ``cpu``)."""
    dev = device_speed(device)
    speed = speed_of(est.engine, dev.kind)
    ks, _ = speed.kernel(kernel_of(quant))
    cd = compute_dtype_of(quant, est.dtype, dev)
    work = work_of(spec, quant, est.dtype, KV_DTYPES["auto"] or FLOAT_BYTES[est.dtype])
    eff = speed.compute_eff

    def step(b: int, c: float) -> float:
        return decode_step(work, dev, ks, eff, cd, batch=b, context=c).seconds

    def pre(n: int) -> float:
        return prefill(work, dev, ks, eff, cd, tokens=n).seconds

    return step, pre, ks.request_s


def candidate_cluster(gpu_types: list[str]) -> Cluster:
    """One GPU of each type, on one node: what ``--fit-gpus`` sizes the traffic against (its slowest type)."""
    from planner.cluster.inventory import Gpu, Node

    gpus = []
    for i, t in enumerate(gpu_types):
        g = lookup_gpu(t)
        gpus.append(Gpu(id=f"fit/gpu-{i}", name=g.name, total_bytes=g.planning_bytes, node="fit", index=i,
                        gpu_type=g.name))
    return Cluster(nodes=(Node(name="fit", cpu_memory_bytes=2**50, gpus=tuple(gpus)),), source="declared")


def _gpu_types(entry: ModelEntry, cluster: Cluster) -> list[str]:
    """The devices the entry's replicas may run on: the cluster's GPU types (its pin, if any), or ``cpu`` for a
    cluster without GPUs (the CPU catalog's device)."""
    types = sorted({g.gpu_type for g in cluster.gpus})
    if entry.gpu_type:
        types = [t for t in types if t.upper() == entry.gpu_type.upper()] or [entry.gpu_type]
    return types or [CPU_DEVICE]


def model_traffic(entry: ModelEntry, spec: ModelSpec, estimates: dict, cluster: Cluster) -> ModelTraffic:
    """What ``entry``'s traffic needs at each of its allowed quantizations (``estimates``: quantization ->
    ReplicaEstimate, each on its engine)."""
    traffic = traffic_of(entry)
    slo = Slo(entry.slo.ttft_p95_ms, entry.slo.tpot_p95_ms)
    types = _gpu_types(entry, cluster)
    options, steps, errors, notes = {}, {}, [], []
    for q in entry.quantization:
        est: ReplicaEstimate = estimates[q]
        try:
            quant = resolve_quant(spec, q)
            sp = speed_of(est.engine, device_speed(types[0]).kind)
            notes += [n for n in (sp.kernel(kernel_of(quant))[1], sp.caveat) if n]
            per_type, worst = {}, None
            for t in types:
                step, pre, path = speed_fns(spec, quant, est, t)
                cap = replica_capacity(traffic, slo, step, pre, entry.max_num_seqs, model=entry.name, path_s=path)
                per_type[t] = cap.requests_per_s
                if worst is None or cap.requests_per_s < worst[1].requests_per_s:
                    worst = (t, cap, step, pre, path)
        except InputError as exc:
            errors.append(f"{q}: {exc}")
            continue
        t, cap, step, pre, path = worst
        nbytes = entry.replica_memory if entry.replica_memory is not None else est.total
        n = replicas_needed(traffic, cap)
        sim = None
        if entry.traffic.trace:  # the trace's bursts and spread, which the formulas leave out
            sim = size_by_simulation(entry, traffic, slo, est, t, step, pre, n, path)
        options[q] = OptionDemand(q, est.engine, kernel_of(quant), t, sim["replicas"] if sim else n, nbytes, cap,
                                  per_type, closed_form=n, simulated=sim)
        steps[q] = (step, pre, path)
    if not options:
        raise InputError(f"models[{entry.name}]: no allowed quantization serves its traffic within its slo: "
                         + "; ".join(errors))
    notes += [f"{e} (left out)" for e in errors]
    order = list(options)
    chosen = min(order, key=lambda q: (options[q].replicas * options[q].replica_bytes, order.index(q)))
    return ModelTraffic(entry.name, traffic, slo, options[chosen].replicas, chosen, options, entry.max_num_seqs,
                        steps, tuple(dict.fromkeys(notes)))


def size_by_simulation(entry: ModelEntry, traffic: Traffic, slo: Slo, est: ReplicaEstimate, device: str, step, pre,
                       start: int, path_s: float = 0.0) -> dict:
    """The fewest replicas whose simulated p95s on the entry's trace (replayed at its traffic's rate and token means;
    fixed replicas, no scaling, on ``device``, the slowest the model may get) meet ``slo``: the closed form's
    ``start`` if it does, else a bisection up to SIM_SIZING_MAX_FACTOR times it. When even that many miss the SLO
    (a target below the prefill of the trace's longer prompts), ``start`` stays and the answer says so."""
    every = arrivals_from_trace(read_trace(entry.traffic.trace), [(entry.name, traffic)])[entry.name]
    window = every[:SIM_SIZING_REQUESTS]
    kv = (est.detail.get("kv_cache") or {}).get("tokens") or entry.max_num_seqs * entry.max_model_len
    runs: dict[int, dict] = {}
    whole: dict[int, dict] = {}

    def run(n: int, rows=None) -> dict:
        cache = whole if rows is every else runs
        rows = window if rows is None else rows
        if n not in cache:
            m = SimModel(entry.name, tuple((f"{entry.name}#{i}", device) for i in range(n)), {device: step},
                         {device: pre}, entry.max_num_seqs, int(kv), entry.max_model_len, entry.max_ongoing_requests,
                         entry.max_queued_requests, ModelRule(entry.name, n, n), entry.autoscaling.metrics_interval_s,
                         slo, path_s)
            r = simulate([m], {entry.name: rows}, start_s=0.0).models[0]
            ok = bool(r.completed) and r.refused_queue_full == 0 and \
                (slo.ttft_p95_ms is None or r.ttft_p95_ms <= slo.ttft_p95_ms) and \
                (slo.tpot_p95_ms is None or r.tpot_p95_ms <= slo.tpot_p95_ms)
            cache[n] = {"replicas": n, "ttft_p95_ms": r.ttft_p95_ms, "tpot_p95_ms": r.tpot_p95_ms,
                        "within_slo": r.within_slo, "requests": r.requests,
                        "refused": r.refused_too_long + r.refused_queue_full, "meets_slo": ok}
        return cache[n]

    start = max(1, start)
    if run(start)["meets_slo"]:
        n = start
    else:
        top = start * SIM_SIZING_MAX_FACTOR
        if not run(top)["meets_slo"]:
            out = dict(run(start), tried=top)
            out["why"] = (f"the trace misses the SLO even with {top} replicas (TTFT p95 {runs[top]['ttft_p95_ms']} "
                          f"ms, TPOT p95 {runs[top]['tpot_p95_ms']} ms): a target below what its longer requests take "
                          f"alone; planned with the formulas' {start}")
            return out
        lo, hi = start, top
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if run(mid)["meets_slo"] else (mid, hi)
        n = hi
    while not run(n, every)["meets_slo"] and n < start * SIM_SIZING_MAX_FACTOR:  # the whole trace has more bursts
        n += 1
    out = dict(whole[n])
    out["why"] = (f"sized by simulating the trace ({out['requests']} requests at {traffic.requests_per_s:.3g} req/s): "
                  f"{n} replicas give TTFT p95 {out['ttft_p95_ms']:g} ms, TPOT p95 {out['tpot_p95_ms']:g} ms (the "
                  f"formulas, which assume steady arrivals, said {start})")
    return out


def apply_traffic(args: DeployArgs, specs: dict, estimates: dict, cluster: Cluster) -> tuple[DeployArgs, dict]:
    """``args`` with each traffic entry's replicas raised to what its traffic needs and its quantizations limited
    to those that serve it with that many; and {model: ModelTraffic}. A replicas.max set below the need is an
    InputError with the fix. A model that may land on a device without speed numbers keeps its declared replicas
    (UnsizedTraffic says why): a deploy file with traffic still plans, and serves, on hardware the catalog lacks."""
    if not any(m.traffic is not None for m in args.models):
        return args, {}
    out, report = [], {}
    for entry in args.models:
        if entry.traffic is None:
            out.append(entry)
            continue
        unknown = []
        for t in _gpu_types(entry, cluster):
            try:
                device_speed(t)
            except InputError as exc:
                unknown.append(str(exc))
        if unknown:  # a replica may land where nothing says how fast it runs: plan it for memory, and say so
            report[entry.name] = UnsizedTraffic(entry.name, "; ".join(unknown))
            out.append(entry)
            continue
        mt = model_traffic(entry, specs[entry.name], estimates[entry.name], cluster)
        report[entry.name] = mt
        need = mt.replicas_needed
        r = entry.replicas
        if "max" in r.model_fields_set and r.max < need:
            raise InputError(f"models[{entry.name}].replicas.max {r.max} is below the {need} replicas its traffic "
                             f"needs ({mt.line(mt.chosen, need)}); raise replicas.max to {need}, or lower the traffic "
                             "or loosen the slo")
        lo = max(need, r.min if "min" in r.model_fields_set else 0)
        hi = max(lo, r.max if "max" in r.model_fields_set else lo)
        keep = [q for q in entry.quantization if q in mt.options and mt.options[q].replicas <= lo]
        out.append(entry.model_copy(update={"quantization": keep,
                                            "replicas": r.model_copy(update={"min": lo, "max": hi})}))
    return args.model_copy(update={"models": out}), report


def sim_models(result) -> list[SimModel]:
    """The simulator's view of a planned deploy file (a planner.planning.PlanningResult)."""
    out = []
    ro = result.rollout
    for entry in result.args.models:
        pm = result.plan.model(entry.name)
        if pm.placed_replicas == 0:
            continue
        est = result.estimates[entry.name][pm.quantization]
        spec = result.specs[entry.name]
        quant = resolve_quant(spec, pm.quantization)
        slots = []
        for dname in ro.slots(entry.name):
            d = ro.deployment(dname)
            if d.kind == "cpu":
                slots.append((dname, CPU_DEVICE))
            elif d.kind == "gpu" and d.gpu_type:
                slots.append((dname, d.gpu_type))
            else:
                raise InputError(f"model {entry.name}: its deployment {dname} is an {d.kind} replica (part on the GPU, "
                                 "part on the CPU); the simulator has no speed for a split replica")
        fns = {t: speed_fns(spec, quant, est, t) for t in {t for _, t in slots}}
        # the serving path's latency: the same engine's on every device it has numbers for; the slowest taken
        path = max(f[2] for f in fns.values())
        kv = (est.detail.get("kv_cache") or {}).get("tokens") or entry.max_num_seqs * entry.max_model_len
        out.append(SimModel(
            name=entry.name, slots=tuple(slots), step={t: f[0] for t, f in fns.items()},
            prefill={t: f[1] for t, f in fns.items()}, max_num_seqs=entry.max_num_seqs, kv_tokens=int(kv),
            max_model_len=entry.max_model_len, max_ongoing=entry.max_ongoing_requests,
            max_queued=entry.max_queued_requests, rule=ro.rule(entry.name),
            metrics_interval_s=entry.autoscaling.metrics_interval_s,
            slo=Slo(entry.slo.ttft_p95_ms, entry.slo.tpot_p95_ms) if entry.slo else None, path_s=path,
            look_back_period_s=entry.autoscaling.look_back_period_s))
    return out
