"""``gpuplan plan`` (and ``render``): plan a deploy.yaml on a declared or probed cluster, or size the cluster."""

from __future__ import annotations

import json
import sys

from planner.errors import InputError


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="how many replicas of each model fit on each GPU, and why")
    p.add_argument("deploy", help="Ray Serve config file (deploy.yaml) or a bare args mapping")
    p.add_argument("--cluster", default=None,
                   help="cluster declaration YAML ({nodes: [{name, cpu_memory, gpus: [{name, memory, count}]}]}); "
                        "default: the config's `cluster:`, and `auto` probes this host with NVML")
    p.add_argument("--app", default=None, help="application name in the config (default: the gpuplan one)")
    p.add_argument("--fit-gpus", default=None, metavar="TYPES",
                   help="capacity planning: the smallest set of GPUs of these types (e.g. L4,A10G,A100-80GB,H100) "
                        "that holds every model's min replicas")
    p.add_argument("--by", choices=["count", "cost"], default="count", help="--fit-gpus: fewest GPUs or cheapest")
    p.add_argument("--max-gpus", type=int, default=64, help="--fit-gpus: largest cluster to consider (default 64)")
    p.add_argument("--engines", default=None, metavar="LIST",
                   help="engines the replicas have, for `engine: auto` (transformers,vllm,llamacpp); default: those "
                        "found as `make run` finds them (.venv-vllm, $GPUPLAN_VLLM_PYTHON, llama-cpp-python)")
    p.add_argument("--json", action="store_true", help="stable JSON instead of the picture")
    p.add_argument("--svg", default=None, metavar="FILE", help="also draw the plan as an SVG file")
    add_render_command(sub)  # `gpuplan render kuberay ...` (planner/output/kuberay.py)
    add_simulate_command(sub)  # `gpuplan simulate ...` (planner/simulate.py)


def add_simulate_command(sub) -> None:
    s = sub.add_parser("simulate", help="replay a request trace against the plan in simulated time (speed model, "
                                        "batching, routing and scaling as planned; no Ray, no engine)")
    s.add_argument("deploy", help="Ray Serve config file (deploy.yaml) or a bare args mapping")
    s.add_argument("--trace", required=True, help="CSV of TIMESTAMP, ContextTokens, GeneratedTokens (the Azure LLM "
                                                  "trace shape); each model replays it at its traffic's rate")
    s.add_argument("--speedup", type=float, default=1.0, help="compress the trace's clock K times (K x the rate)")
    s.add_argument("--duration", type=float, default=None, help="simulate at most this many seconds of traffic")
    s.add_argument("--warmup", type=float, default=0.0,
                   help="seconds of traffic served first and left out of every figure (the fleet starts at "
                        "replicas.min; a cold start into the trace's first burst is not a running service); "
                        "--duration counts after it")
    s.add_argument("--start-s", type=float, default=60.0,
                   help="seconds a replica the policy starts takes before it serves (default 60; an input, not a "
                        "measurement: set what your engine and model take)")
    s.add_argument("--seed", type=int, default=0, help="routing's random draws")
    s.add_argument("--policy", choices=["gpuplan", "requests", "fixed"], default=None,
                   help="scale every model by this policy instead of its autoscaling.policy (fixed: every planned "
                        "replica runs from the start, a fleet sized for the peak)")
    s.add_argument("--cluster", default=None, help="cluster declaration YAML (default: the config's `cluster:`)")
    s.add_argument("--app", default=None, help="application name in the config (default: the gpuplan one)")
    s.add_argument("--engines", default=None, metavar="LIST", help="as for `gpuplan plan`")
    s.add_argument("--json", action="store_true", help="stable JSON instead of the table")


def cmd_simulate(args) -> int:
    import time

    from planner.config import load_deploy_file
    from planner.demand import traffic_of
    from planner.planning import make_plan
    from planner.demand import sim_models
    from planner.simulate import arrivals_from_trace, simulate
    from planner.traffic import read_trace

    t0 = time.perf_counter()
    if args.warmup < 0:
        raise InputError(f"--warmup {args.warmup:g}: a warm-up is seconds of traffic, 0 or more; use --warmup 0 "
                         "to count every request")
    parsed, _ = load_deploy_file(args.deploy, app=args.app)
    result = make_plan(parsed, _cluster_for(args, parsed), _engines(args.engines), strict=False)
    models = sim_models(result)
    if args.policy:
        models = [with_policy(m, args.policy) for m in models]
    entries = {m.name: m for m in result.args.models}
    rows = read_trace(args.trace)
    shapes = [(m.name, traffic_of(entries[m.name]) if entries[m.name].traffic else None) for m in models]
    arrivals = arrivals_from_trace(rows, shapes, speedup=args.speedup,
                                   duration_s=None if args.duration is None else args.warmup + args.duration)
    res = simulate(models, arrivals, start_s=args.start_s, seed=args.seed, measure_from_s=args.warmup)
    wall = time.perf_counter() - t0
    if args.json:
        print(json.dumps(dict(res.to_json(), wall_s=round(wall, 3)), indent=2))
        return 0
    print(f"simulated {res.duration_s:.0f} s of traffic ({sum(m.requests for m in res.models)} requests, "
          f"{res.events} events) in {wall:.2f} s")
    head = ("model", "requests", "done", "refused", "TTFT p50/p95 ms", "TPOT p50/p95 ms", "in SLO", "max queue",
            "replicas", "replica-s")
    rows_out = []
    for m in res.models:
        f = lambda x: "-" if x is None else f"{x:g}"  # noqa: E731
        rows_out.append((m.model, str(m.requests), str(m.completed), str(m.refused_too_long + m.refused_queue_full),
                         f"{f(m.ttft_p50_ms)} / {f(m.ttft_p95_ms)}", f"{f(m.tpot_p50_ms)} / {f(m.tpot_p95_ms)}",
                         "-" if m.within_slo is None else f"{m.within_slo:.1%}", str(m.max_router_queue),
                         f"{m.replicas_min}..{m.replicas_max_seen}", f"{m.replica_seconds:.0f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows_out)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows_out:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


def with_policy(m, policy: str):
    """A SimModel scaled by ``policy`` (gpuplan, requests; fixed: its min is every slot, so all run from the start)."""
    import dataclasses

    if policy == "fixed":
        return dataclasses.replace(m, rule=dataclasses.replace(m.rule, min_replicas=len(m.slots),
                                                               max_replicas=len(m.slots)))
    return dataclasses.replace(m, rule=dataclasses.replace(m.rule, policy=policy))


def _cluster_for(args, parsed):
    from planner.config import load_cluster_file
    from planner.cluster.inventory import Cluster, Node, probe_local_gpus
    from planner.planning import cluster_from_decl

    if args.cluster:
        return cluster_from_decl(load_cluster_file(args.cluster))
    if parsed.cluster != "auto":
        return cluster_from_decl(parsed.cluster)
    probe = probe_local_gpus()
    ram = _host_ram()
    note = () if probe.gpus else (probe.reason,)
    return Cluster(nodes=(Node(name="node-0", cpu_memory_bytes=ram, gpus=probe.gpus),), source="probed", notes=note)


def _host_ram() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3


def _engines(spec: str | None) -> frozenset:
    """--engines, or the engines installed for the replicas, found as `make run` finds them
    (planner.cluster.installed)."""
    from planner.cluster.installed import installed_engines
    from planner.model.engines import ENGINE_NAMES

    if spec:
        names = frozenset(x.strip() for x in spec.split(",") if x.strip())
        bad = sorted(names - set(ENGINE_NAMES))
        if bad:
            raise InputError(f"--engines {spec!r}: unknown {', '.join(bad)}; use a comma-separated list of "
                             f"{', '.join(ENGINE_NAMES)}")
        return names | {"transformers"}
    return installed_engines()


def cmd_plan(args) -> int:
    from planner.config import load_deploy_file

    parsed, _ = load_deploy_file(args.deploy, app=args.app)
    if args.fit_gpus:
        return _fit(args, parsed)
    from planner.output.plan_report import render_svg, render_text
    from planner.planning import describe_cluster, make_plan

    cluster = _cluster_for(args, parsed)
    # not strict: an engine the file names is planned as named even where it is not installed (a plan for another
    # machine); the engines section says so
    result = make_plan(parsed, cluster, _engines(getattr(args, "engines", None)), strict=False)
    if args.svg:
        with open(args.svg, "w", encoding="utf-8") as f:
            f.write(render_svg(result.plan))
    if args.json:
        out = result.plan.to_json()
        out["engines"] = {}
        for m in result.plan.models:
            est = result.estimates[m.name][m.quantization]
            out["engines"][m.name] = {"engine": est.engine, "why": result.engine_why[m.name][m.quantization]}
            if est.engine_settings is not None:  # what the engine is started with, as sized (llama.cpp's context)
                out["engines"][m.name][est.engine] = est.engine_settings.to_json()
        for m in out["models"]:
            if m["name"] in (result.traffic or {}):
                pm = result.plan.model(m["name"])
                m["traffic"] = result.traffic[m["name"]].to_json(pm.quantization, pm.placed_replicas)
        out["rollout"] = result.rollout.to_json()
        print(json.dumps(out, indent=2))
    else:
        print(f"cluster: {describe_cluster(cluster)}")
        for n in cluster.notes:
            print(f"note: {n}")
        print(render_text(result.plan))
        print(engines_text(result))
        if result.traffic:
            print(traffic_text(result))
        print(rollout_text(result.rollout))
    return 0


def engines_text(result) -> str:
    """Which engine runs each model and why, and what it is given (vLLM's KV cache, llama.cpp's context)."""
    from planner.model.engines import engine

    lines = ["Engines (what runs each model's replicas)"]
    for m in result.plan.models:
        est = result.estimates[m.name][m.quantization]
        given = engine(est.engine).describe(est)
        why = result.engine_why[m.name][m.quantization]
        lines.append(f"  {m.name}: {est.engine}{': ' + given if given else ''} ({why})")
        lines += [f"    note: {n}" for n in est.notes if "dequantizes a GGUF" in n]
    return "\n".join(lines)


def traffic_text(result) -> str:
    """Per model with traffic: its rate, what one replica holds within its SLO, the replicas it needs, and the p95s
    predicted with the replicas placed."""
    lines = ["Traffic (planner/model/speed.py, planner/traffic.py; docs/speed-model.md)"]
    for name, mt in result.traffic.items():
        pm = result.plan.model(name)
        lines.append(f"  {name}: {mt.line(pm.quantization, pm.placed_replicas)}")
        if not mt.options:
            continue
        others = [f"{q} needs {o.replicas}" for q, o in mt.options.items() if q != pm.quantization]
        if others:
            lines.append(f"    other quantizations: {', '.join(others)}")
        lines += [f"    note: {n}" for n in mt.notes]
    return "\n".join(lines)


def rollout_text(ro) -> str:
    """How the plan runs on Ray Serve, in a few lines: its deployments and what best fit cannot bring up."""
    lines = [f"Ray Serve: {len(ro.deployments)} deployment(s), one per model and node (model@node: num_gpus x max "
             "replicas)"]
    for m in ro.models:
        deps = ro.of_model(m.name)
        parts = ", ".join(f"{d.name} {d.num_gpus:g} x {d.planned}" if d.kind != "cpu" else f"{d.name} CPU x {d.planned}"
                          for d in deps)
        lines.append(f"  {m.name} (min {m.min_replicas}, max {m.max_replicas}): {parts or 'none'}")
    for n in ro.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _fit(args, parsed) -> int:
    from planner.errors import InfeasiblePlanError
    from planner.placement.capacity import fit_gpus
    from planner.demand import apply_traffic, candidate_cluster
    from planner.planning import build_demands, estimate_models, resolve_models

    types = [t.strip() for t in args.fit_gpus.split(",") if t.strip()]
    if not types:
        raise InputError("--fit-gpus needs GPU types, e.g. --fit-gpus L4,A10G,A100-80GB")
    parsed, specs = resolve_models(parsed)  # every model's quantization filled in (the source's own by default)
    estimates, _ = estimate_models(parsed, specs, "cuda", _engines(getattr(args, "engines", None)), strict=False)
    # with traffic, what a model needs depends on the GPU it runs on: size it for every type alone, and for the mix
    # (on its slowest type, since a replica may land on any), and keep the smallest cluster
    tries = [types] + ([[t] for t in types] if len(types) > 1 and any(m.traffic for m in parsed.models) else [])
    best, errors = None, []
    for ts in tries:
        try:
            p2, traffic = apply_traffic(parsed, specs, estimates, candidate_cluster(ts))
            res = fit_gpus(list(build_demands(p2, estimates, "cuda")), ts, by=args.by, max_gpus=args.max_gpus,
                           headroom=p2.headroom)
        except (InputError, InfeasiblePlanError) as exc:
            errors.append((ts, exc))
            continue
        key = (res.cost_per_hour if args.by == "cost" and res.cost_per_hour is not None else 0,
               sum(n for _, n in res.counts))
        if best is None or key < best[0]:
            best = (key, res, traffic)
    if best is None:
        raise errors[0][1]
    _, res, traffic = best
    if args.json:
        out = res.to_json()
        if traffic:
            out["traffic"] = {name: mt.to_json() for name, mt in traffic.items()}
        print(json.dumps(out, indent=2))
        return 0
    from planner.output.plan_report import render_text
    from planner.units import format_bytes

    gpus = ", ".join(f"{n} x {t}" for t, n in res.counts if n)
    cost = f", ${res.cost_per_hour:.2f}/hour" if res.cost_per_hour is not None else ""
    print(f"smallest cluster by {res.by} that holds every model's min replicas: {gpus} "
          f"({format_bytes(res.usable_bytes)} usable{cost})")
    print("replicas each model reaches on it: "
          + ", ".join(f"{m.name} {m.placed_replicas}/{m.max_replicas}" for m in res.plan.models))
    for n in res.notes:
        print(f"note: {n}")
    for name, mt in traffic.items():
        print(f"traffic: {name}: {mt.line(mt.chosen, mt.replicas_needed)}")
    print(render_text(res.plan))
    return 0


def add_render_command(sub) -> None:
    """``gpuplan render kuberay DEPLOY --cluster FILE``: a KubeRay RayService with the plan baked in."""
    from planner.output.kuberay import DEFAULT_GPUPLAN_PIP, DEFAULT_IMAGE, UPGRADE_STRATEGIES

    r = sub.add_parser("render", help="deployment manifests with the plan baked in (KubeRay RayService)")
    rs = r.add_subparsers(dest="target", required=True, metavar="TARGET")
    k = rs.add_parser("kuberay", help="a ray.io/v1 RayService: Serve config with the plan baked in, one worker "
                                      "group per node declaration sized from the plan (k8s/README.md)")
    k.add_argument("deploy", help="Ray Serve config file (deploy.yaml) or a bare args mapping")
    k.add_argument("--cluster", default=None,
                   help="cluster declaration YAML: the worker nodes the RayService gets (nodes: [{name, replicas, "
                        "cpu_memory, num_cpus, gpus, node_selector, tolerations}]); default: the config's `cluster:`")
    k.add_argument("--app", default=None, help="application name in the config (default: the gpuplan one)")
    k.add_argument("--name", default="gpuplan", help="RayService name (default gpuplan)")
    k.add_argument("--namespace", default=None, help="metadata.namespace (default: none, kubectl's current one)")
    k.add_argument("--image", default=DEFAULT_IMAGE, help=f"Ray image of every pod (default {DEFAULT_IMAGE})")
    k.add_argument("--gpuplan-pip", default=DEFAULT_GPUPLAN_PIP, metavar="REQUIREMENT",
                   help="pip requirement that installs gpuplan in the app's runtime_env, e.g. 'gpuplan @ "
                        "git+https://github.com/you/gpuplan@v0.1.0'; '' when --image already has gpuplan "
                        "(default: a placeholder to replace)")
    k.add_argument("--hf-token-secret", default=None, metavar="NAME[:KEY]",
                   help="Secret whose key (default hf_token) becomes HF_TOKEN in every pod (gated models)")
    k.add_argument("--api-key-secret", default=None, metavar="NAME[:KEY]",
                   help="Secret whose key (default api_key) becomes the API bearer token (http.api_key_env)")
    k.add_argument("--model-cache-pvc", default=None, metavar="PVC",
                   help="PersistentVolumeClaim mounted at /models, HF_HOME=/models/huggingface (downloads survive "
                        "pod restarts)")
    k.add_argument("--upgrade-strategy", default="None", choices=UPGRADE_STRATEGIES,
                   help="None (default: Serve changes roll in place, no second cluster) or NewCluster (zero-downtime "
                        "cluster upgrades; needs the new cluster's GPUs free, printed in the header)")
    k.add_argument("--ray-token-auth", action="store_true",
                   help="Ray token authentication for the whole cluster (KubeRay authOptions; KubeRay >= 1.6)")
    k.add_argument("-o", "--output", default=None, metavar="FILE", help="write here instead of stdout")


def cmd_render(args) -> int:
    import shlex

    from planner.output.kuberay import DEFAULT_GPUPLAN_PIP, DEFAULT_IMAGE, render_files

    flags = [("--cluster", args.cluster, None), ("--app", args.app, None), ("--name", args.name, "gpuplan"),
             ("--namespace", args.namespace, None), ("--image", args.image, DEFAULT_IMAGE),
             ("--gpuplan-pip", args.gpuplan_pip, DEFAULT_GPUPLAN_PIP),
             ("--hf-token-secret", args.hf_token_secret, None), ("--api-key-secret", args.api_key_secret, None),
             ("--model-cache-pvc", args.model_cache_pvc, None), ("--upgrade-strategy", args.upgrade_strategy, "None")]
    command = " ".join(["gpuplan render kuberay", args.deploy] + [
        f"{flag} {shlex.quote(v)}" for flag, v, default in flags if v != default]
        + (["--ray-token-auth"] if args.ray_token_auth else []))
    text = render_files(
        args.deploy, cluster_path=args.cluster, app=args.app, command=command, name=args.name,
        namespace=args.namespace, image=args.image, gpuplan_pip=args.gpuplan_pip or None,
        hf_token_secret=args.hf_token_secret, api_key_secret=args.api_key_secret,
        model_cache_pvc=args.model_cache_pvc, upgrade_strategy=args.upgrade_strategy,
        ray_token_auth=args.ray_token_auth,
    )
    if args.gpuplan_pip == DEFAULT_GPUPLAN_PIP:
        print(f"gpuplan: note: the app installs gpuplan from the placeholder {DEFAULT_GPUPLAN_PIP!r}; pass "
              "--gpuplan-pip with where you host gpuplan, or --gpuplan-pip '' with an --image that has it",
              file=sys.stderr)
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"gpuplan: wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"plan": cmd_plan, "render": cmd_render, "simulate": cmd_simulate}
