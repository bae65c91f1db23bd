"""The engines a replica can run, as units: one module each, one registry (this file).

Each engine module (transformers.py, vllm.py, llamacpp.py) owns, for its engine:

- ``NAME``: its name in deploy files and plans;
- ``estimate(req: ReplicaRequest) -> ReplicaEstimate``: what one replica allocates, term by term;
- ``settings(est, target: DeploymentTarget) -> <Engine>Settings``: the typed settings one deployment is started with
  (a frozen dataclass with ``to_json()``), which the serve side's module of the same name starts
  (serve/engines/<name>.py ``start``);
- ``describe(est) -> str``: what a replica is given, in a few words, for ``gpuplan plan``.

Which schemes an engine runs is the scheme registry's (planner/model/quant/: each scheme lists its engines). Adding
an engine is its module here, its module in serve/engines/, and one line in ``ENGINES`` below and in
serve/engines/__init__.py (docs/architecture.md).
"""

from __future__ import annotations

from planner.errors import InputError
from planner.model.engines import llamacpp, transformers, vllm
from planner.model.estimate import KV_DTYPES, DeploymentTarget, ReplicaEstimate, ReplicaRequest
from planner.model.quant import FLOAT_BYTES, SCHEMES, QuantSpec, resolve_quant, schemes_run_by
from planner.model.spec import ModelSpec

# the registry: name -> module. The order is the order engines are listed in messages.
ENGINES = {m.NAME: m for m in (transformers, vllm, llamacpp)}
ENGINE_NAMES = tuple(ENGINES)


def engine(name: str):
    """The module of engine ``name``."""
    try:
        return ENGINES[name]
    except KeyError:
        raise InputError(f"engine {name!r}: use {', '.join(ENGINE_NAMES[:-1])} or {ENGINE_NAMES[-1]}") from None


def pick_engine(requested: str, scheme: str, available, model: str = "", *, strict: bool = True) -> tuple[str, str]:
    """(engine, why) for a model entry's ``engine`` at quantization ``scheme``; ``available``: the engines installed
    for the replicas. ``auto`` takes llama.cpp for GGUF files, vLLM where it is installed and runs the scheme,
    transformers otherwise (vLLM moved bitsandbytes out of its tree in 0.28, so int8/nf4/fp4/int4 stay on
    transformers; GGUF on transformers is planned at its dequantized size).

    ``strict`` (serving): an engine asked for by name that is not installed is an error. Not strict (planning, maybe
    for another machine): it is planned as asked, and the reason says it was not found here."""
    where = f"models[{model}]." if model else ""
    if requested not in ("auto", *ENGINE_NAMES):
        raise InputError(f"{where}engine {requested!r}: use auto, transformers, vllm or llamacpp")
    vllm_runs = schemes_run_by(vllm.NAME)
    if requested == "llamacpp" or (requested == "auto" and scheme == "gguf"):
        if scheme != "gguf":
            raise InputError(f"{where}engine llamacpp runs GGUF files, not quantization {scheme}: point source at a "
                             ".gguf file, or use engine: transformers or vllm")
        if "llamacpp" not in available:
            if requested == "auto":
                return "transformers", ("auto: llama-cpp-python is not installed (`make venv` builds it); "
                                        "transformers dequantizes the GGUF (planned at that size)")
            if not strict:
                return "llamacpp", ("deploy.yaml asks for llamacpp (llama-cpp-python is not found here: `make venv` "
                                    "builds it where the replicas run)")
            raise InputError(f"{where}engine llamacpp: llama-cpp-python is not installed for the replicas; run "
                             "`make venv` (it builds llama-cpp-python) or use engine: transformers, which "
                             "dequantizes the file (3.5-7x its size)")
        return "llamacpp", ("deploy.yaml asks for llamacpp" if requested == "llamacpp"
                            else "auto: a GGUF file runs on llama.cpp as stored")
    if requested == "vllm":
        if scheme not in vllm_runs:
            raise InputError(
                f"{where}engine vllm cannot run quantization {scheme}: vLLM removed bitsandbytes in 0.28 and runs "
                f"{', '.join(sorted(vllm_runs))}; use engine: transformers for {scheme}, or a quantization vLLM "
                "runs (awq, gptq, fp8)")
        if "vllm" not in available:
            if not strict:
                return "vllm", ("deploy.yaml asks for vllm (vLLM is not found here: `make vllm` installs it where "
                                "the replicas run)")
            raise InputError(f"{where}engine vllm: vLLM is not installed for the replicas; run `make vllm` (its own "
                             "venv, .venv-vllm) or set GPUPLAN_VLLM_PYTHON to a Python that has vllm and this Ray")
        return "vllm", "deploy.yaml asks for vllm"
    if requested == "transformers":
        return "transformers", "deploy.yaml asks for transformers"
    if scheme in vllm_runs and "vllm" in available:
        return "vllm", f"auto: vLLM is installed and runs {scheme}"
    if scheme not in vllm_runs:
        return "transformers", f"auto: {scheme} is not a scheme vLLM runs"
    return "transformers", "auto: vLLM is not installed (`make vllm`)"


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
        raise InputError(f"engine {engine!r}: use transformers, vllm or llamacpp")
    req = ReplicaRequest(spec=spec, quant=q, dtype=dtype, device=device,
                         kv_bytes=KV_DTYPES[kv_dtype] or FLOAT_BYTES[dtype], max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs,
                         prefill_tokens=min(max_model_len, max_num_batched_tokens or max_model_len),
                         mla_latent_cache=mla_latent_cache, notes=tuple(notes))
    return unit.estimate(req)


def deployment_settings(est: ReplicaEstimate, target: DeploymentTarget):
    """The typed settings (``<Engine>Settings``) one deployment of ``est``'s engine is started with."""
    return engine(est.engine).settings(est, target)


__all__ = ["ENGINES", "ENGINE_NAMES", "SCHEMES", "DeploymentTarget", "ReplicaEstimate", "deployment_settings",
           "engine", "estimate_replica", "pick_engine"]
