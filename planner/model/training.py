"""Training memory per GPU: model states under ZeRO stages 0-3, and transformer activations.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", Sec. 3.1 and 5, Figure 1). With mixed-precision Adam and Psi parameters a GPU holds
2*Psi (bf16/fp16 weights) + 2*Psi (16-bit gradients) + K*Psi (optimizer states, K = 12: fp32 master weights 4 +
momentum 4 + variance 4). Over N_d data-parallel GPUs:

    stage 0  (2 + 2 + K) * Psi
    stage 1  2*Psi + 2*Psi + K*Psi / N_d            (P_os: optimizer states, master weights included, sharded)
    stage 2  2*Psi + (2 + K) * Psi / N_d            (P_os+g: gradients sharded too)
    stage 3  (2 + 2 + K) * Psi / N_d                (P_os+g+p: parameters sharded too)

Here the K term is split into ``optimizer_states`` and ``master_weights``. Frozen parameters (``trainable_params <
total_params``) have weights only: no gradients, optimizer states or master copy. A shard is ``ceil(count / N_d)``
elements (DeepSpeed pads its flat partitions to equal size).

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198, Sec. 4, Table 2): bytes per transformer layer with 16-bit activations, sequence length s,
micro-batch b, hidden size h, a attention heads, tensor-parallel size t.

Pure arithmetic over ints; nothing is imported from torch or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from planner.errors import InputError
from planner.units import format_bytes

# Optimizer states per trainable parameter, in units of optimizer_state_dtype_bytes (fp32 = 4 by default).
# NOTE: torch.optim.AdamW keeps exp_avg and exp_avg_sq (2 states); SGD with momentum keeps momentum_buffer (1);
# plain SGD keeps none. "adamw-8bit" is bitsandbytes' 8-bit AdamW: 2 states of 1 byte (block-wise quantization
# statistics, ~1% more, are ignored) -- its state size is fixed at 1 byte whatever optimizer_state_dtype_bytes says.
_STATES_PER_PARAM = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0}
OPTIMIZERS = ("adamw", "adam", "adamw-8bit", "sgd-momentum", "sgd", "adafactor")
# NOTE: Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost") with
# beta1=None (no momentum; the default of transformers' Adafactor) stores, for an r x c weight, row and column
# second-moment factors: r + c values instead of r * c. For h x h and h x 4h transformer matrices that is at most
# 2/h of the parameters, so we count ceil(2 * trainable / hidden_size) fp32 values; without hidden_size we assume
# h = 128 (1/64 of the parameters), an upper bound for any LLM. 1-D parameters (norms, biases) are ignored.
_ADAFACTOR_DEFAULT_HIDDEN = 128
RECOMPUTE = ("none", "selective", "full")


def _int(value: object, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{field} must be an int, got {value!r}; pass a whole number")
    if value < minimum:
        raise InputError(f"{field} must be >= {minimum}, got {value}; pass a value of at least {minimum}")
    return value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TrainingMemory:
    """Per-GPU bytes of training state, split by term; ``total`` = weights + gradients + optimizer_states +
    master_weights + activations. ``k_bytes_per_param`` is the paper's K (optimizer states + master copy per
    trainable parameter, 12 for mixed-precision Adam)."""

    weights: int
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int
    total: int
    total_params: int
    trainable_params: int
    zero_stage: int
    n_gpus: int
    optimizer: str
    mixed_precision: bool
    weight_dtype_bytes: int
    grad_dtype_bytes: int
    k_bytes_per_param: float

    def to_json(self) -> dict:
        out = asdict(self)
        out["human"] = {
            k: format_bytes(getattr(self, k))
            for k in ("weights", "gradients", "optimizer_states", "master_weights", "activations", "total")
        }
        return out


def estimate_training_memory(
    total_params: int,
    trainable_params: int | None = None,
    *,
    weight_dtype_bytes: int = 2,
    mixed_precision: bool = True,
    master_dtype_bytes: int = 4,
    grad_dtype_bytes: int | None = None,
    optimizer: str = "adamw",
    optimizer_state_dtype_bytes: int = 4,
    zero_stage: int = 0,
    n_gpus: int = 1,
    hidden_size: int | None = None,
    activation_bytes: int = 0,
) -> TrainingMemory:
    """Per-GPU model-state bytes (weights, gradients, optimizer states, fp32 master copy) under ZeRO ``zero_stage``
    over ``n_gpus`` data-parallel GPUs, plus ``activation_bytes`` if given (see ``estimate_activation_memory``).

    Defaults are mixed-precision AdamW (bf16 weights and gradients, fp32 master weights and two fp32 states).
    ``grad_dtype_bytes`` defaults to ``weight_dtype_bytes``; ``hidden_size`` is used by ``adafactor`` only.
    """
    total = _int(total_params, "total_params", minimum=0)
    trainable = total if trainable_params is None else _int(trainable_params, "trainable_params", minimum=0)
    if trainable > total:
        raise InputError(
            f"trainable_params {trainable} exceeds total_params {total}; trainable params are a subset of the total"
        )
    w_bytes = _int(weight_dtype_bytes, "weight_dtype_bytes", minimum=1)
    g_bytes = w_bytes if grad_dtype_bytes is None else _int(grad_dtype_bytes, "grad_dtype_bytes", minimum=1)
    m_bytes = _int(master_dtype_bytes, "master_dtype_bytes", minimum=1)
    s_bytes = _int(optimizer_state_dtype_bytes, "optimizer_state_dtype_bytes", minimum=1)
    if not isinstance(mixed_precision, bool):
        raise InputError(f"mixed_precision must be true or false, got {mixed_precision!r}")
    if mixed_precision and w_bytes >= m_bytes:
        raise InputError(
            f"mixed_precision keeps a {m_bytes}-byte master copy of lower-precision weights, but weight_dtype_bytes "
            f"is {w_bytes}; set mixed_precision=False for full-precision training or weight_dtype_bytes=2 for bf16"
        )
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise InputError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}; use 0 for plain data parallelism")
    n = _int(n_gpus, "n_gpus", minimum=1)
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    act = _int(activation_bytes, "activation_bytes", minimum=0)

    def shard(count: int, stage_from: int) -> int:
        return _ceil_div(count, n) if zero_stage >= stage_from else count

    if optimizer == "adafactor":
        h = _ADAFACTOR_DEFAULT_HIDDEN if hidden_size is None else _int(hidden_size, "hidden_size", minimum=1)
        state_elems, per_elem = _ceil_div(2 * trainable, h), 4
    elif optimizer == "adamw-8bit":
        state_elems, per_elem = 2 * trainable, 1
    else:
        state_elems, per_elem = _STATES_PER_PARAM[optimizer] * trainable, s_bytes

    weights = shard(total, 3) * w_bytes
    gradients = shard(trainable, 2) * g_bytes
    optimizer_states = shard(state_elems, 1) * per_elem
    master = shard(trainable, 1) * m_bytes if mixed_precision else 0
    k = (state_elems * per_elem + (trainable * m_bytes if mixed_precision else 0)) / trainable if trainable else 0.0
    return TrainingMemory(
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_states,
        master_weights=master,
        activations=act,
        total=weights + gradients + optimizer_states + master + act,
        total_params=total,
        trainable_params=trainable,
        zero_stage=zero_stage,
        n_gpus=n,
        optimizer=optimizer,
        mixed_precision=mixed_precision,
        weight_dtype_bytes=w_bytes,
        grad_dtype_bytes=g_bytes,
        k_bytes_per_param=k,
    )


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes kept for the backward pass on one GPU: ``per_layer`` x ``num_layers`` = ``total``."""

    per_layer: int
    total: int
    num_layers: int
    seq_len: int
    micro_batch: int
    hidden_size: int
    num_heads: int
    tensor_parallel: int
    sequence_parallel: bool
    recompute: str
    formula: str

    def to_json(self) -> dict:
        out = asdict(self)
        out["human"] = {"per_layer": format_bytes(self.per_layer), "total": format_bytes(self.total)}
        return out


def estimate_activation_memory(
    seq_len: int,
    micro_batch: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    *,
    recompute: str = "none",
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
) -> ActivationMemory:
    """Activation bytes per GPU for a GPT-style transformer (Korthikanti et al. 2022, Table 2), 16-bit activations.

    Per layer, s = seq_len, b = micro_batch, h = hidden_size, a = num_heads, t = tensor_parallel:
    ``none``: sbh(34 + 5as/h) for t = 1; sbh(10 + 24/t + 5as/(ht)) with tensor parallelism; sbh/t (34 + 5as/h)
    with sequence parallelism. ``selective`` (attention recomputed): sbh(10 + 24/t), or 34sbh/t with sequence
    parallelism. ``full``: 2sbh (the layer input only), 2sbh/t with sequence parallelism.
    Excludes embeddings, the final norm, logits and loss, and pipeline-parallel in-flight micro-batches.
    """
    s = _int(seq_len, "seq_len", minimum=1)
    b = _int(micro_batch, "micro_batch", minimum=1)
    h = _int(hidden_size, "hidden_size", minimum=1)
    L = _int(num_layers, "num_layers", minimum=1)
    a = _int(num_heads, "num_heads", minimum=1)
    t = _int(tensor_parallel, "tensor_parallel", minimum=1)
    if recompute not in RECOMPUTE:
        raise InputError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if not isinstance(sequence_parallel, bool):
        raise InputError(f"sequence_parallel must be true or false, got {sequence_parallel!r}")
    sbh = s * b * h
    attn = 5 * a * s * s * b  # = sbh * 5as/h: softmax input/output and dropout mask of the attention scores
    if recompute == "full":
        per_layer = _ceil_div(2 * sbh, t) if sequence_parallel else 2 * sbh
        formula = "2sbh/t" if sequence_parallel else "2sbh"
    elif recompute == "selective":
        if sequence_parallel:
            per_layer, formula = _ceil_div(34 * sbh, t), "34sbh/t"
        else:
            per_layer = 10 * sbh + _ceil_div(24 * sbh, t)
            formula = "34sbh" if t == 1 else "sbh(10 + 24/t)"
    elif sequence_parallel:
        per_layer, formula = _ceil_div(34 * sbh + attn, t), "sbh/t (34 + 5as/h)"
    else:
        per_layer = 10 * sbh + _ceil_div(24 * sbh + attn, t)
        formula = "sbh(34 + 5as/h)" if t == 1 else "sbh(10 + 24/t + 5as/(ht))"
    return ActivationMemory(
        per_layer=per_layer,
        total=per_layer * L,
        num_layers=L,
        seq_len=s,
        micro_batch=b,
        hidden_size=h,
        num_heads=a,
        tensor_parallel=t,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        formula=formula,
    )


# ---------------------------------------------------------------------------------------------------------------
# From a ModelSpec (planner.model.spec), for ``gpuplan estimate --mode train``

_TRAIN_DTYPES = {"bf16": (2, True), "fp16": (2, True), "fp32": (4, False)}  # weight bytes, mixed precision


@dataclass(frozen=True)
class TrainingEstimate:
    """Per-GPU training memory of one model: model states (``states``, whose ``activations`` term is
    ``activations.total``) and the activation estimate behind it."""

    model: str
    dtype: str
    states: TrainingMemory
    activations: ActivationMemory

    @property
    def total(self) -> int:
        return self.states.total

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "total_bytes": self.total,
            "states": self.states.to_json(),
            "activations": self.activations.to_json(),
        }


def estimate_from_spec(
    spec,
    *,
    dtype: str = "bf16",
    zero_stage: int = 0,
    num_gpus: int = 1,
    seq_len: int = 2048,
    micro_batch: int = 1,
    optimizer: str = "adamw",
    recompute: str = "none",
    trainable_params: int | None = None,
) -> TrainingEstimate:
    """Training memory per GPU for a ``planner.model.spec.ModelSpec``: ``params_total`` parameters trained in ``dtype``
    (bf16/fp16: mixed precision with an fp32 master copy; fp32: full precision) under ZeRO ``zero_stage`` over
    ``num_gpus``, plus Korthikanti activations from ``spec.dims`` (num_layers, hidden_size, num_heads).

    The activation formula assumes a GPT-style layer (4h MLP, full multi-head attention); for SwiGLU/GQA models it
    is an approximation of the same order.
    """
    if dtype not in _TRAIN_DTYPES:
        raise InputError(
            f"training dtype must be one of {', '.join(_TRAIN_DTYPES)}, got {dtype!r}; quantized (QLoRA-style) "
            f"training is not modelled"
        )
    w_bytes, mixed = _TRAIN_DTYPES[dtype]
    d = spec.dims
    act = estimate_activation_memory(
        seq_len, micro_batch, d.hidden_size, d.num_layers, d.num_heads, recompute=recompute
    )
    states = estimate_training_memory(
        spec.params_total,
        trainable_params,
        weight_dtype_bytes=w_bytes,
        mixed_precision=mixed,
        optimizer=optimizer,
        zero_stage=zero_stage,
        n_gpus=num_gpus,
        hidden_size=d.hidden_size,
        activation_bytes=act.total,
    )
    return TrainingEstimate(model=spec.name, dtype=dtype, states=states, activations=act)


def format_table(est: TrainingEstimate) -> str:
    """Plain-text table of a ``TrainingEstimate``: one line per term, bytes and GiB."""
    s, a = est.states, est.activations
    rows = [
        ("weights", s.weights),
        ("gradients", s.gradients),
        ("optimizer states", s.optimizer_states),
        ("fp32 master weights", s.master_weights),
        (f"activations ({a.formula} x {a.num_layers} layers, recompute={a.recompute})", s.activations),
        ("total per GPU", s.total),
    ]
    width = max(len(r[0]) for r in rows)
    head = (
        f"{est.model}: {est.dtype} {s.optimizer}, ZeRO stage {s.zero_stage} over {s.n_gpus} GPU(s), "
        f"{s.trainable_params:,} of {s.total_params:,} params trainable, seq {a.seq_len} x micro-batch {a.micro_batch}"
    )
    lines = [head] + [f"  {name:{width}}  {n:>20,} B  {format_bytes(n):>10}" for name, n in rows]
    return "\n".join(lines)
