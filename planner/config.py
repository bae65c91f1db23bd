"""The edge schemas: deploy.yaml's application ``args`` and the ``--cluster`` declaration (pydantic v2).

Every model has ``extra="forbid"`` and a docstring on every field. Sizes are accepted as ints of bytes or strings
with units ("24GiB", "24GB") and become ints of bytes here; nothing inside gpuplan sees a unit again.
``load_deploy_args`` turns any validation failure into one ``InputError`` line that names the field.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.errors import InputError
from planner.model.engines import ENGINE_NAMES
from planner.model.quant import SCHEME_NAMES
from planner.units import parse_bytes

# a node's name is its Ray node label value (gpuplan.io/node), which follows Kubernetes' label value syntax
NODE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,54}[A-Za-z0-9])?$")
QUANTIZATIONS = SCHEME_NAMES  # the scheme registry's names (planner/model/quant/)
EngineName = Literal[("auto", *ENGINE_NAMES)]  # the engine registry's names (planner/model/engines/)


def _bytes(v):
    if v is None:
        return None
    try:
        return parse_bytes(v)
    except InputError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None


Bytes = Annotated[int, BeforeValidator(_bytes)]


def _require_unique(what: str, names: list[str]) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what} names must be unique, {dup[0]!r} appears {names.count(dup[0])} times")


class _Edge(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class GpuDecl(_Edge):
    name: str
    """GPU product or type, e.g. "A10G", "A100-80GB", "H100". Known names take their memory from
    planner/catalog/gpus.json; any other name needs `memory`."""
    memory: Bytes | None = None
    """Total memory of one GPU, bytes or "24GiB"; default: the catalog's value for `name`."""
    count: int = Field(1, ge=1)
    """How many GPUs of this kind the node has."""


class NodeDecl(_Edge):
    name: str
    """Node name, unique in the cluster. It is the Ray node label `gpuplan.io/node` of the node (`ray start --labels
    gpuplan.io/node=<name>`, or the KubeRay worker group's labels), so it is a label value: letters, digits, '-',
    '_' and '.', starting and ending with a letter or digit, at most 56 characters (room for the "-<i>" of
    `replicas`)."""
    cpu_memory: Bytes = Field(default=16 * 1024**3)
    """Host RAM the node gives replicas (CPU replicas and CPU offload), bytes or "64GiB"."""
    num_cpus: float | None = Field(None, gt=0)
    """CPUs of the node (optional; used for CPU-replica placement and KubeRay requests)."""
    gpus: list[GpuDecl] = Field(default_factory=list)
    """The node's GPUs."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Kubernetes nodeSelector for this node's worker group (KubeRay rendering only)."""
    tolerations: list[dict] = Field(default_factory=list)
    """Kubernetes tolerations for this node's worker group (KubeRay rendering only)."""
    replicas: int = Field(1, ge=1)
    """How many identical nodes this entry stands for (named <name>-0 ... <name>-<N-1>)."""

    @field_validator("name")
    @classmethod
    def _label_value(cls, v: str) -> str:
        if not NODE_NAME.match(v):
            fix = re.sub(r"[^A-Za-z0-9._-]+", "-", v).strip("-._")[:56] or "node-0"
            raise ValueError(f"{v!r} cannot be a node label value (gpuplan.io/node={v}): use letters, digits, '-', "
                             f"'_' and '.', starting and ending with a letter or digit, at most 56, e.g. {fix!r}")
        return v


class ClusterDecl(_Edge):
    nodes: list[NodeDecl] = Field(min_length=1)
    """The nodes of the cluster."""

    @model_validator(mode="after")
    def _unique(self):
        _require_unique("node", [n.name for n in self.nodes])
        return self


class Replicas(_Edge):
    min: int = Field(1, ge=0)
    """Replicas that must always run; the plan fails if they do not fit."""
    max: int = Field(1, ge=1)
    """Upper bound for autoscaling; the plan may place fewer when memory runs out, and says why."""

    @model_validator(mode="after")
    def _order(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max}); set max to at least {self.min}")
        return self


class Offload(_Edge):
    cpu_memory: Bytes
    """Host RAM one replica may spill weights to (accelerate `max_memory["cpu"]`) when the GPU has too little free."""


class Autoscaling(_Edge):
    policy: Literal["gpuplan", "requests"] = "gpuplan"
    """gpuplan: scale on the model's slo (TTFT/TPOT p95 its replicas measure) and on saturation (more requests than
    the engines' batches hold, a KV cache 95% full), down when one replica fewer keeps the load within the plan's
    capacity per replica (planner/rollout/policy.py signal_want); without slo, on saturation alone. requests: Ray
    Serve's rule, ceil(ongoing requests / target_ongoing_requests)."""
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Ray Serve autoscaling target (policy requests): ongoing requests per replica before it adds a replica."""
    upscale_delay_s: float = Field(10.0, ge=0)
    """Seconds the load must stay above target before scaling up."""
    downscale_delay_s: float = Field(60.0, ge=0)
    """Seconds the load must stay below target before scaling down."""
    look_back_period_s: float = Field(30.0, gt=0)
    """Window over which Ray Serve averages ongoing requests."""
    metrics_interval_s: float = Field(10.0, gt=0)
    """How often replicas and handles report their load to the autoscaler."""
    zero_after_s: float | None = Field(None, ge=0)
    """With `replicas.min: 0`: seconds without a request before the model's last replica stops (scale to zero);
    default `downscale_delay_s`. Its GPU share stays planned for it."""
    wake: Literal["wait", "reject"] = "wait"
    """With `replicas.min: 0`, a request for a model with no replica running starts one at once (no
    `upscale_delay_s`) and `wait`: waits for it, within `request_timeout_s`; `reject`: is answered 503 with
    Retry-After (the model's last measured wake time, else 30 s) while the replica starts."""


class Routing(_Edge):
    prefix: bool = True
    """Prefix-aware routing (a model with several replicas): a request whose prompt starts as an earlier one did
    goes to the replica that served that one (its engine's prefix cache holds the start's KV: vLLM, llama.cpp),
    while it has at most `max_imbalance` more requests in flight than the least loaded; else to the less loaded of
    two. Off: by load only. Applies to requests the API streams from replicas directly (http.direct)."""
    max_imbalance: int = Field(4, ge=0)
    """Requests in flight the prefix's replica may have beyond the least loaded one and still get the request."""
    min_match_tokens: int = Field(32, gt=0)
    """Leading prompt tokens a request must share with an earlier one to follow it (at least 10% of its prompt as
    well): a chat template's first few tokens, which every prompt shares, do not pin requests to one replica."""


class TrafficDecl(_Edge):
    requests_per_s: float | None = Field(None, gt=0)
    """Mean arrival rate of this model's requests (with prompt_tokens and output_tokens), or take it from `trace`."""
    prompt_tokens: int | None = Field(None, gt=0)
    """Mean prompt tokens of a request."""
    output_tokens: int | None = Field(None, gt=0)
    """Mean generated tokens of a request."""
    trace: str | None = None
    """A request trace (CSV with TIMESTAMP, ContextTokens, GeneratedTokens columns, the shape of the Azure LLM
    inference traces): the three means are taken from it; a relative path is resolved against the deploy file's
    folder. The values given beside it override its means."""
    scale: float = Field(1.0, gt=0)
    """Multiply the arrival rate by this (what if traffic doubles: 2)."""

    @model_validator(mode="after")
    def _complete(self):
        missing = [k for k in ("requests_per_s", "prompt_tokens", "output_tokens") if getattr(self, k) is None]
        if missing and not self.trace:
            raise ValueError(f"traffic needs {', '.join(missing)} (means), or a trace file to take them from")
        return self


class SloDecl(_Edge):
    ttft_p95_ms: float | None = Field(None, gt=0)
    """Time to first token, 95th percentile, milliseconds."""
    tpot_p95_ms: float | None = Field(None, gt=0)
    """Time per output token after the first, 95th percentile, milliseconds."""

    @model_validator(mode="after")
    def _some(self):
        if self.ttft_p95_ms is None and self.tpot_p95_ms is None:
            raise ValueError("slo needs ttft_p95_ms, tpot_p95_ms or both")
        return self


class ModelEntry(_Edge):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """The model's name in the API (`model` field of requests) and its deployment name."""
    source: str
    """Local model directory (relative paths are resolved against deploy.yaml's folder), a config.json, a .gguf
    file, or a catalog name (`gpuplan catalog`)."""
    quantization: list[str] | None = None
    """Allowed quantizations, most preferred first (a single string is one choice). Default: the source's own: a
    GGUF file's types (gguf), a pre-quantized checkpoint's scheme, else the config's dtype (bf16 when it has none)."""
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """Dtype of unquantized tensors and compute; default: the model's config dtype, else bf16."""
    engine: EngineName = "auto"
    """What runs the replicas: `transformers` (bitsandbytes, CPU offload), `vllm` (vLLM's own venv, `make vllm`),
    `llamacpp` (GGUF files as stored, llama-cpp-python), or `auto`: llama.cpp for a .gguf source, vLLM where it is
    installed and runs the chosen quantization (bf16/fp16, awq, gptq, fp8, mxfp4), transformers otherwise
    (bitsandbytes int8/nf4/fp4/int4)."""
    max_model_len: int = Field(2048, gt=0)
    """Prompt + completion tokens per sequence; sizes the KV cache and bounds requests."""
    max_num_seqs: int = Field(8, gt=0)
    """Concurrent sequences per replica (the KV-cache budget and the batch size)."""
    replicas: Replicas = Field(default_factory=Replicas)
    """Replica bounds."""
    replica_memory: Bytes | None = None
    """Override of the estimated bytes per replica, bytes or "7.5GiB" (use when you measured it)."""
    offload: Offload | None = None
    """Allow CPU offload when the GPU's free memory is below plan; null = never offload."""
    gpu_type: str | None = None
    """Pin replicas to GPUs of this type (e.g. "A10G"), set as Ray's accelerator_type."""
    trust_remote_code: bool = False
    """Pass trust_remote_code to transformers (off unless you trust the model's code)."""
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    """Ray Serve autoscaling knobs (bounds come from the plan)."""
    routing: Routing = Field(default_factory=Routing)
    """How the API picks a replica for each request (prefix-aware by default)."""
    max_ongoing_requests: int = Field(16, gt=0)
    """Requests one replica accepts at once (Ray Serve max_ongoing_requests)."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a replica before the API sheds load with 429 (-1 = unbounded)."""
    health_check_period_s: float = Field(2.0, gt=0)
    """Seconds between Serve's health checks of a replica: a replica that died is found and replaced at the next
    one (Serve's default is 10 s; measured recovery after a SIGKILL on 2 CPUs, benchmarks/soak.py:
    docs/benchmarks.md)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """Seconds a request may take before the API answers 504."""
    stream_interval_s: float = Field(0.1, ge=0)
    """After the first token, tokens produced within this many seconds are streamed as one chunk (0 = every
    token): fewer messages through Ray and HTTP for the same text (measured: +30% tokens/s at 8 clients on 2 CPUs)."""
    traffic: TrafficDecl | None = None
    """The load this model must serve; with `slo`, the plan derives its minimum replicas (and, among the allowed
    quantizations, the one that serves it on the fewest bytes) from the speed model (docs/speed-model.md)."""
    slo: SloDecl | None = None
    """Latency targets the traffic must get (needed with `traffic`)."""

    @model_validator(mode="after")
    def _zero_needs_min_zero(self):
        set_ = [k for k in ("zero_after_s", "wake") if k in self.autoscaling.model_fields_set]
        if set_ and self.replicas.min > 0:
            raise ValueError(f"models[{self.name}].autoscaling.{' and '.join(set_)} apply to a model that may scale to "
                             f"zero, and replicas.min is {self.replicas.min}; set replicas.min: 0 (the model then "
                             f"stops its last replica when idle), or remove {' and '.join(set_)}")
        return self

    @model_validator(mode="after")
    def _traffic_needs_slo(self):
        if self.traffic is not None and self.slo is None:
            raise ValueError(f"models[{self.name}].traffic needs an slo: the latency it must get, e.g. "
                             "slo: {ttft_p95_ms: 1000, tpot_p95_ms: 100}")
        return self

    @field_validator("quantization", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items:
            raise ValueError("give one quantization or a non-empty list, e.g. [int4, int8]")
        out = []
        for q in items:
            q = str(q).lower()
            if q not in QUANTIZATIONS:
                raise ValueError(f"unknown quantization {q!r}; choose from {', '.join(QUANTIZATIONS)}")
            if q not in out:
                out.append(q)
        return out


class HttpOptions(_Edge):
    api_key_env: str = "GPUPLAN_API_KEY"
    """Environment variable holding the bearer token; when it is set, every /v1 request must carry it."""
    port: int | None = Field(None, ge=1, le=65535)
    """When set, the ingress replica serves the API itself on this port (serve/api/front.py), one Ray hop less per
    request and per streamed chunk than Ray Serve's proxy, which keeps serving the same API on http_options.port
    (so the two ports must differ). None: only the proxy."""
    host: str = "127.0.0.1"
    """Interface of ``port``: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."""
    replicas: int = Field(2, ge=1, le=8)
    """Ingress replicas for the API on ``port``, each its own process on the head node: one serves, the others stand
    by (waiting on a file lock, no CPU) and the next takes the port within milliseconds when the serving one dies or
    is replaced, while Serve starts a new standby. 1 saves a process; the port then refuses
    connections while Serve restarts its only ingress."""
    direct: bool = True
    """The ingress streams each request from its replica over a socket of its own (serve/app/direct.py) rather than
    through Ray Serve's router and Ray's streaming: about half the path's CPU per request. Serve still places, scales
    and health-checks the replicas, and takes any request a replica cannot (full, unreachable). false: every request
    through Serve's handle."""


class DeployArgs(_Edge):
    headroom: float = Field(0.10, ge=0, lt=1)
    """Fraction of each GPU's memory kept free by the plan."""
    gpu_reserve: Bytes | None = None
    """Bytes per GPU no replica owns (driver and firmware reservations); default 512 MiB (planner/placement/packing.py)."""
    cluster: Union[Literal["auto"], ClusterDecl] = "auto"
    """`auto` probes every Ray node with NVML; or an inline declaration (same shape as --cluster files)."""
    models: list[ModelEntry] = Field(min_length=1)
    """The models to serve."""
    http: HttpOptions = Field(default_factory=HttpOptions)
    """API options."""

    @model_validator(mode="after")
    def _unique_names(self):
        _require_unique("model", [m.name for m in self.models])
        return self


def _one_line(exc: ValidationError, what: str) -> str:
    parts = []
    errors = exc.errors()
    # `cluster: auto | {nodes: ...}`: a bad declaration also fails the `auto` branch; say only what is wrong in it
    branch = [e for e in errors if not any(str(p).startswith("literal[") for p in e["loc"])]
    errors = branch or errors
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"] if "[" not in str(p)) or what
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/deploy-yaml.md)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"{what}: " + "; ".join(parts) + more


def parse_deploy_args(args: dict, *, base_dir: str | None = None, what: str = "deploy.yaml args") -> DeployArgs:
    """Validate application args (a dict); relative local model paths are resolved against ``base_dir``."""
    try:
        parsed = DeployArgs.model_validate(args)
    except ValidationError as exc:
        raise InputError(_one_line(exc, what)) from None
    if base_dir:
        models = []
        for m in parsed.models:
            src = m.source
            if not os.path.isabs(src) and (src.startswith(".") or os.path.exists(os.path.join(base_dir, src))):
                src = os.path.normpath(os.path.join(base_dir, src))
            update = {"source": src}
            if m.traffic is not None and m.traffic.trace and not os.path.isabs(m.traffic.trace):
                update["traffic"] = m.traffic.model_copy(
                    update={"trace": os.path.normpath(os.path.join(base_dir, m.traffic.trace))})
            models.append(m.model_copy(update=update))
        parsed = parsed.model_copy(update={"models": models})
    return parsed


def load_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


def load_deploy_file(path: str, app: str | None = None) -> tuple[DeployArgs, dict]:
    """Read a Ray Serve config file (``applications: [{name, import_path, args}]``) or a bare args mapping.
    Returns (parsed args of the chosen application, the whole file as a dict)."""
    data = load_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    if "applications" in data:
        apps = [a for a in data["applications"] if isinstance(a, dict)
                and str(a.get("import_path", "")).startswith("serve.app")]
        if app:
            apps = [a for a in apps if a.get("name") == app]
        if not apps:
            raise InputError(f"{path}: no application with import_path serve.app:build_app"
                             + (f" named {app!r}" if app else ""))
        args = parse_deploy_args(apps[0].get("args") or {}, base_dir=base, what=f"{path} args")
        proxy_port = int((data.get("http_options") or {}).get("port", 8000))  # Ray Serve's default
        if args.http.port == proxy_port:
            raise InputError(f"{path}: args.http.port {args.http.port} is also http_options.port, where Ray Serve's "
                             f"proxy listens; give them different ports (deploy.yaml: 8000 for gpuplan's API, "
                             f"8001 for the proxy)")
        return args, data
    return parse_deploy_args(data, base_dir=base, what=path), data


def load_cluster_file(path: str) -> ClusterDecl:
    data = load_yaml(path)
    try:
        return ClusterDecl.model_validate(data)
    except ValidationError as exc:
        raise InputError(_one_line(exc, path)) from None

