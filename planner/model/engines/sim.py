"""The simulated engine (serve/engines/sim.py runs it): a replica that loads no model and emits tokens on the speed
model's clock, for testing and benchmarking a plan of many replicas on a machine that has none of its GPUs (as
llm-d's inference simulator does for vLLM).

It imitates vLLM: a replica is planned with vLLM's bytes (``estimate`` is vLLM's, under this engine's name), runs the
schemes vLLM runs, and its time per decode step and per prefill is the speed model's (planner/model/speed.py) with
vLLM's fitted numbers, on the device the plan put the deployment on (``DeploymentTarget.device_speed``: the GPU
type's datasheet figures, or this machine's CPU for CPU replicas). It batches as the discrete-event simulator does
(planner/simulate.py): up to ``max_num_seqs`` sequences, a sequence admitted at a step boundary when its prompt and
``max_tokens`` fit the planned KV tokens left, one prefill per admitted group, then decode steps at the running batch
and its mean context. So ``gpuplan simulate`` and a served plan of sim replicas run the same engine model, one in
simulated time and one in real time under Ray Serve.

It is a test and benchmark engine: ``/v1/models`` and ``/plan`` say so, and nothing is generated (the text is filler
words drawn from the request's seed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from planner.errors import InputError
import planner.model.engines.vllm as vllm
from planner.model.estimate import DeploymentTarget, ReplicaEstimate, ReplicaRequest
from planner.model.quant import FLOAT_BYTES, resolve_quant, schemes_run_by
from planner.model.speed import (DeviceSpeed, KernelSpeed, Work, compute_dtype_of, decode_step, kernel_of, prefill,
                                 work_of)

NAME = "sim"
LABEL = "the simulated engine"
IMITATES = vllm.NAME  # whose bytes, schemes and speed numbers it takes
INSTALL_HINT = None  # pure Python, always there
AUTO_MISSING = ""
SPEED = vllm.SPEED
SPEED_CPU = vllm.SPEED_CPU
NOTE = "engine sim: a simulated replica (no model runs; tokens come on the speed model's clock, as vLLM's)"


def auto_takes(scheme: str) -> str:
    """Why ``engine: auto`` took it (it never does: auto picks real engines only)."""
    return "the simulated engine was asked for"


def cannot_run(scheme: str) -> str:
    """Why it refuses a scheme, and the fix."""
    return (f"engine sim imitates vLLM, which does not run quantization {scheme}; use one of "
            f"{', '.join(sorted(schemes_run_by(IMITATES)))}")


def estimate(req: ReplicaRequest) -> ReplicaEstimate:
    """vLLM's bytes under this engine's name (the plan reserves what a vLLM replica would hold)."""
    est = vllm.estimate(req)
    return dataclasses.replace(est, engine=NAME, notes=(*est.notes, NOTE))


@dataclass(frozen=True)
class SimSettings:
    """What a simulated replica is started with: the planned KV tokens and batch, and the speed model's terms for the
    device it was placed on."""

    imitates: str
    device: str  # the GPU type, or "cpu"
    kv_tokens: int
    max_num_seqs: int
    max_model_len: int
    work: Work
    device_speed: DeviceSpeed
    kernel: str
    kernel_speed: KernelSpeed
    compute_eff: float
    compute_dtype: str

    def step_s(self, batch: int, context: float) -> float:
        """One decode step of ``batch`` sequences at a mean context of ``context`` tokens."""
        return decode_step(self.work, self.device_speed, self.kernel_speed, self.compute_eff, self.compute_dtype,
                           batch=max(1, int(batch)), context=float(context)).seconds

    def prefill_s(self, tokens: int) -> float:
        """A prefill of ``tokens`` prompt tokens."""
        return prefill(self.work, self.device_speed, self.kernel_speed, self.compute_eff, self.compute_dtype,
                       tokens=max(1, int(tokens))).seconds

    def to_json(self) -> dict:
        return {"imitates": self.imitates, "device": self.device, "kv_tokens": self.kv_tokens,
                "max_num_seqs": self.max_num_seqs, "max_model_len": self.max_model_len, "kernel": self.kernel,
                "step_ms_1_seq": round(self.step_s(1, 1) * 1e3, 4),
                f"step_ms_{self.max_num_seqs}_seqs": round(self.step_s(self.max_num_seqs, 1) * 1e3, 4),
                "prefill_ms_per_128_tokens": round(self.prefill_s(128) * 1e3, 4)}


def settings(est: ReplicaEstimate, target: DeploymentTarget) -> SimSettings:
    """The speed model's terms on the deployment's device (``target.device_speed``: the plan's GPU type, or the CPU)
    and the planned KV tokens."""
    dev = target.device_speed
    if dev is None:
        raise InputError(f"model {target.model}: engine sim needs the speed of the device the plan put it on "
                         f"({target.device_name or target.device}), and the catalog has none; add "
                         "memory_bandwidth_gb_per_s and dense_tflops for it to planner/catalog/gpus.json (a GPU) or "
                         "planner/catalog/cpus.json (a CPU)")
    speed = SPEED_CPU if dev.kind == "cpu" else SPEED
    q = resolve_quant(target.spec, est.quantization)
    kernel = kernel_of(q)
    ks, _ = speed.kernel(kernel)
    kv = (est.detail.get("kv_cache") or {}).get("tokens") or est.max_num_seqs * est.max_model_len
    return SimSettings(
        imitates=IMITATES, device=target.device_name or dev.name, kv_tokens=int(kv), max_num_seqs=est.max_num_seqs,
        max_model_len=est.max_model_len,
        work=work_of(target.spec, q, est.dtype, FLOAT_BYTES[est.dtype]), device_speed=dev, kernel=kernel,
        kernel_speed=ks, compute_eff=speed.compute_eff, compute_dtype=compute_dtype_of(q, est.dtype, dev))


def describe(est: ReplicaEstimate) -> str:
    """What a replica is given, in a few words (``gpuplan plan``'s engines section)."""
    kv = est.detail.get("kv_cache") or {}
    return f"simulated (vLLM's bytes and speed), KV {kv.get('tokens')} tokens"
