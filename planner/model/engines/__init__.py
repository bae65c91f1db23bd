"""The engines a replica can run, as units: one module each, one registry (this file).

Each engine module (transformers.py, vllm.py, llamacpp.py; sim.py, the simulated engine) owns, for its engine:

- ``NAME``: its name in deploy files and plans;
- ``estimate(req: ReplicaRequest) -> ReplicaEstimate``: what one replica allocates, term by term;
- ``settings(est, target: DeploymentTarget) -> <Engine>Settings``: the typed settings one deployment is started with
  (a frozen dataclass with ``to_json()``), which the serve side's module of the same name starts
  (serve/engines/<name>.py ``start``);
- ``describe(est) -> str``: what a replica is given, in a few words, for ``gpuplan plan``;
- the words ``pick_engine`` uses: ``LABEL``, ``INSTALL_HINT`` (None when always installed), ``AUTO_MISSING``,
  ``auto_takes(scheme)``, ``cannot_run(scheme)``;
- ``IMITATES`` (optional): the engine whose schemes it runs (the simulated engine runs what vLLM runs).

Which schemes an engine runs is the scheme registry's (planner/model/quant/: each scheme lists its engines). Adding
an engine is its module here, its module in serve/engines/ (found by name), and one line in ``ENGINES`` below
(docs/architecture.md).
"""

from __future__ import annotations

from planner.errors import InputError
from planner.model.engines import llamacpp, sim, transformers, vllm
from planner.model.estimate import KV_DTYPES, DeploymentTarget, ReplicaEstimate, ReplicaRequest
from planner.model.quant import FLOAT_BYTES, SCHEMES, QuantSpec, resolve_quant
from planner.model.spec import ModelSpec
from planner.model.speed import DeviceSpeed, EngineSpeed, SpeedEstimate, estimate_speed

# the registry: name -> module. The order is the order engines are listed in messages.
ENGINES = {m.NAME: m for m in (transformers, vllm, llamacpp, sim)}
ENGINE_NAMES = tuple(ENGINES)


def engine(name: str):
    """The module of engine ``name``."""
    try:
        return ENGINES[name]
    except KeyError:
        raise InputError(f"engine {name!r}: use {', '.join(ENGINE_NAMES[:-1])} or {ENGINE_NAMES[-1]}") from None


def pick_engine(requested: str, scheme: str, available, model: str = "", *, strict: bool = True,
                asked_by: str = "deploy.yaml") -> tuple[str, str]:
    """(engine, why) for a model entry's ``engine`` at quantization ``scheme``; ``available``: the engines installed
    for the replicas. ``auto`` takes the first installed of the engines the scheme registry lists for the scheme, in
    its order (llama.cpp for GGUF files, vLLM where it runs the scheme, transformers, which runs every scheme); an
    engine asked for by name must run the scheme.

    ``strict`` (serving): an engine asked for by name that is not installed is an error. Not strict (planning, maybe
    for another machine): it is planned as asked, and the reason says it was not found here. The words come from the
    engine modules (``LABEL``, ``INSTALL_HINT``, ``AUTO_MISSING``, ``auto_takes``, ``cannot_run``); ``asked_by``
    names who asked for an engine by name (the deploy file, ``--engine``)."""
    where = f"models[{model}]." if model else ""
    if requested not in ("auto", *ENGINE_NAMES):
        raise InputError(f"{where}engine {requested!r}: use auto, {', '.join(ENGINE_NAMES[:-1])} or "
                         f"{ENGINE_NAMES[-1]}")
    runs = SCHEMES[scheme].engines if scheme in SCHEMES else ENGINE_NAMES
    if requested != "auto":
        unit = ENGINES[requested]
        if getattr(unit, "IMITATES", requested) not in runs:  # sim runs what the engine it imitates runs
            raise InputError(where + unit.cannot_run(scheme))
        if requested not in available and unit.INSTALL_HINT:
            if not strict:
                return requested, (f"{asked_by} asks for {requested}; not found here, planned as asked: "
                                   f"{unit.INSTALL_HINT}")
            raise InputError(f"{where}engine {requested}: {unit.INSTALL_HINT}")
        return requested, f"{asked_by} asks for {requested}"
    chosen = next((e for e in runs if e in available or not ENGINES[e].INSTALL_HINT), runs[-1])
    if chosen != runs[0]:  # passed over the preferred one: say why
        return chosen, f"auto: {ENGINES[runs[0]].AUTO_MISSING}"
    why = ENGINES[chosen].auto_takes(scheme)
    if why is None:
        others = [ENGINES[e].LABEL for e in ENGINE_NAMES if e in available and e not in runs]
        why = (f"{scheme} is not a scheme {' or '.join(others)} runs" if others
               else f"only {ENGINES[chosen].LABEL} of the engines here runs {scheme}")
    return chosen, f"auto: {why}"


def estimate_replica(
    spec: ModelSpec,
    *,
    quant: str | QuantSpec | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 1,
    max_num_batched_tokens: int | None = None,
    kv_dtype: str = "auto",
    device: str = "cuda",
    mla_latent_cache: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    engine: str = "transformers",
) -> ReplicaEstimate:
    """Bytes one replica of ``spec`` needs: weights, KV cache for ``max_num_seqs`` sequences of ``max_model_len``
    tokens, the activation peak of one prefill chunk of ``max_num_batched_tokens`` (default ``max_model_len``), and
    the runtime overhead of the process on ``device``, as ``engine`` allocates them (its module in this package)."""
    q = quant if isinstance(quant, QuantSpec) else resolve_quant(spec, quant, bits=bits, group_size=group_size)
    if dtype is None:
        dtype = q.scheme if q.scheme in FLOAT_BYTES else (spec.config_dtype or "bf16")
    dtype = dtype.lower()
    if dtype not in FLOAT_BYTES:
        raise InputError(f"--dtype {dtype!r} is not a float dtype; use bf16, fp16 or fp32")
    if q.scheme in FLOAT_BYTES and q.scheme != dtype and not q.label.endswith("(dequantized checkpoint)"):
        q = QuantSpec(dtype, bits=FLOAT_BYTES[dtype] * 8, label=dtype)
    if max_model_len is None:
        max_model_len = min(spec.dims.max_position_embeddings or 4096, 4096)
    for name, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    notes = list(spec.notes)
    mpe = spec.dims.max_position_embeddings
    if mpe and max_model_len > mpe:
        notes.append(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {mpe}")
    if kv_dtype not in KV_DTYPES:
        raise InputError(f"--kv-dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
    if device not in ("cuda", "cpu"):
        raise InputError(f"device {device!r}: use cuda or cpu")
    unit = ENGINES.get(engine)
    if unit is None:
        raise InputError(f"engine {engine!r}: use {', '.join(ENGINE_NAMES[:-1])} or {ENGINE_NAMES[-1]}")
    req = ReplicaRequest(spec=spec, quant=q, dtype=dtype, device=device,
                         kv_bytes=KV_DTYPES[kv_dtype] or FLOAT_BYTES[dtype], max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs,
                         prefill_tokens=min(max_model_len, max_num_batched_tokens or max_model_len),
                         mla_latent_cache=mla_latent_cache, notes=tuple(notes))
    return unit.estimate(req)


def speed_of(name: str, kind: str = "gpu") -> EngineSpeed:
    """The speed numbers of engine ``name`` on a ``kind`` device ("gpu": its module's ``SPEED``; "cpu":
    ``SPEED_CPU``); InputError where it has none."""
    attr = "SPEED_CPU" if kind == "cpu" else "SPEED"
    sp = getattr(engine(name), attr, None)
    if sp is None:
        raise InputError(f"engine {name}: no speed numbers on a {kind.upper()} yet (nothing measured or published "
                         "was fitted for it), so its speed cannot be predicted; plan it for memory only, or fit its "
                         f"numbers (benchmarks/speed_fit.py, benchmarks/cpu_speed.py) and set {attr} in "
                         f"planner/model/engines/{name}.py")
    return sp


def replica_speed(spec: ModelSpec, quant: QuantSpec, est: ReplicaEstimate, device: DeviceSpeed, *, input_tokens: int,
                  output_tokens: int, batch: int, kv_dtype: str = "auto", mla_latent_cache: bool = False) -> SpeedEstimate:
    """TTFT, TPOT and tokens/s of a replica sized as ``est`` (its engine, dtype, KV dtype) on ``device``, for
    ``batch`` sequences of ``input_tokens`` in and ``output_tokens`` out. A batch larger than the replica holds, or a
    sequence longer than its max_model_len, is an InputError with the fix."""
    if batch > est.max_num_seqs:
        raise InputError(f"batch {batch} is more sequences than the replica holds (max_num_seqs {est.max_num_seqs}); "
                         f"raise max_num_seqs to {batch} or ask for a smaller batch")
    if input_tokens + output_tokens > est.max_model_len:
        raise InputError(f"{input_tokens} input + {output_tokens} output tokens do not fit max_model_len "
                         f"{est.max_model_len}; raise max_model_len to at least {input_tokens + output_tokens}")
    kv_bytes = KV_DTYPES[kv_dtype] or FLOAT_BYTES[est.dtype]
    return estimate_speed(spec, quant, est.dtype, kv_bytes, speed_of(est.engine, device.kind), device,
                          input_tokens=input_tokens,
                          output_tokens=output_tokens, batch=batch, mla_latent=mla_latent_cache)


def deployment_settings(est: ReplicaEstimate, target: DeploymentTarget):
    """The typed settings (``<Engine>Settings``) one deployment of ``est``'s engine is started with."""
    return engine(est.engine).settings(est, target)


__all__ = ["ENGINES", "ENGINE_NAMES", "SCHEMES", "DeploymentTarget", "ReplicaEstimate", "deployment_settings",
           "engine", "estimate_replica", "pick_engine", "replica_speed", "speed_of"]
