"""What a replica can serve within a latency target: queueing arithmetic over the speed model's step times.

A replica with continuous batching runs up to ``max_num_seqs`` sequences; each request is a prefill of its prompt then
``output_tokens`` decode steps. At ``λ`` requests/s (Poisson arrivals, requests of the traffic's mean shape):

- **prefills** queue for the engine one at a time, each taking ``D`` (the speed model's prefill of the prompt): an
  M/D/1 queue, whose waiting time has an exact distribution (``md1_wait_cdf``); ``ρ_p = λ D`` of the engine's time
  goes to prefills, so decode steps are stretched by ``1 / (1 - ρ_p)``;
- **decoding** sequences are many servers sharing the engine: their mean number ``n`` solves
  ``n = λ x (D + W + output x step(n) / (1 - ρ_p))`` (Little's law), and their number at a random moment is Poisson
  with mean ``n`` (an M/G/∞ occupancy), whose 95th percentile sets the TPOT p95;
- beyond ``max_num_seqs`` running, requests wait for a slot: an M/M/c queue (c = max_num_seqs, Erlang C).

TTFT p95 = prefill + prefill-queue wait p95 (+ slot wait p95); TPOT p95 = step at the p95 batch, stretched by
prefills. The most requests/s a replica sustains within an SLO is the largest ``λ`` whose p95s meet it (bisection:
both grow with ``λ``). Pure; every result explains itself with numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from planner.errors import InputError

StepFn = Callable[[int, float], float]  # (batch, context tokens) -> seconds of one decode step
PrefillFn = Callable[[int], float]  # prompt tokens -> seconds of its prefill


@dataclass(frozen=True)
class Traffic:
    """One model's traffic: mean arrival rate and mean request shape."""

    requests_per_s: float
    prompt_tokens: int
    output_tokens: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Slo:
    """Latency targets at the 95th percentile; None = no target on that one."""

    ttft_p95_ms: float | None = None
    tpot_p95_ms: float | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------------ closed forms


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load ``a`` = λ/μ (< c)."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    term, total = 1.0, 1.0  # a^k / k!, summed for k < c
    for k in range(1, c):
        term *= a / k
        total += term
    last = term * a / c  # a^c / c!
    tail = last * c / (c - a)
    return tail / (total + tail)


def mmc_wait_quantile(c: int, rate: float, service_s: float, p: float) -> float:
    """The ``p`` quantile of the waiting time in an M/M/c queue: P(W > t) = C e^{-(c μ - λ) t}."""
    a = rate * service_s
    if a >= c:
        return math.inf
    pc = erlang_c(c, a)
    if pc <= 1 - p:
        return 0.0
    return math.log(pc / (1 - p)) / (c / service_s - rate)


def md1_mean_wait(rate: float, service_s: float) -> float:
    """Pollaczek-Khinchine for deterministic service: W = ρ D / (2 (1 - ρ))."""
    rho = rate * service_s
    return math.inf if rho >= 1 else rho * service_s / (2 * (1 - rho))


def md1_wait_cdf(t: float, rate: float, service_s: float) -> float:
    """P(W <= t) in an M/D/1 queue (Erlang's formula): (1 - ρ) Σ_{k=0}^{⌊t/D⌋} (λ(kD - t))^k / k! e^{-λ(kD - t)}."""
    rho = rate * service_s
    if rho >= 1:
        return 0.0
    if t < 0:
        return 0.0
    total = 0.0
    for k in range(int(t // service_s) + 1):
        x = rate * (k * service_s - t)
        total += (x ** k / math.factorial(k)) * math.exp(-x)
    return min(1.0, max(0.0, (1 - rho) * total))


def md1_wait_quantile(rate: float, service_s: float, p: float) -> float:
    """The ``p`` quantile of the M/D/1 waiting time: exact (bisection on ``md1_wait_cdf``) while the sum is short
    enough to be evaluated in floating point (t up to 40 service times), else the exponential tail with the exact mean
    (P(W > 0) = ρ, conditional mean W / ρ)."""
    rho = rate * service_s
    if rho >= 1:
        return math.inf
    if 1 - rho >= p:
        return 0.0
    hi = service_s
    while md1_wait_cdf(hi, rate, service_s) < p and hi < 40 * service_s:
        hi *= 2
    if md1_wait_cdf(hi, rate, service_s) >= p:
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if md1_wait_cdf(mid, rate, service_s) >= p:
                hi = mid
            else:
                lo = mid
        return hi
    mean_given_wait = md1_mean_wait(rate, service_s) / rho
    return mean_given_wait * math.log(rho / (1 - p))


def poisson_quantile(mean: float, p: float) -> int:
    """The smallest k with P(N <= k) >= p for N ~ Poisson(mean)."""
    if mean <= 0:
        return 0
    k, term = 0, math.exp(-mean)
    cdf = term
    while cdf < p and k < 100_000:
        k += 1
        term *= mean / k
        cdf += term
    return k


# ------------------------------------------------------------------------------------------------ a replica's load


@dataclass(frozen=True)
class LoadPoint:
    """A replica's predicted state at ``requests_per_s`` of ``traffic``."""

    requests_per_s: float
    prefill_s: float
    prefill_share: float  # ρ_p: share of the engine's time in prefills
    running_mean: float  # sequences decoding, mean
    running_p95: int
    slot_wait_p95_s: float
    prefill_wait_p95_s: float
    ttft_p95_s: float
    tpot_p50_s: float
    tpot_p95_s: float
    saturated: str | None  # why the replica cannot hold this rate at all (None when it can)

    def to_json(self) -> dict:
        out = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in self.__dict__.items()}
        for k in ("ttft_p95_s", "tpot_p50_s", "tpot_p95_s", "slot_wait_p95_s", "prefill_wait_p95_s", "prefill_s"):
            if out[k] is not None:
                out[k] = round(out[k], 6)
        return out


def load_point(rate: float, traffic: Traffic, step: StepFn, prefill_fn: PrefillFn, max_num_seqs: int,
               path_s: float = 0.0) -> LoadPoint:
    """TTFT and TPOT percentiles of one replica at ``rate`` requests/s of ``traffic``'s shape; ``path_s``: the serving
    path's latency before the first token, outside the engine."""
    d = prefill_fn(traffic.prompt_tokens)
    ctx = traffic.prompt_tokens + (traffic.output_tokens - 1) / 2
    rho_p = rate * d
    inf = math.inf
    if rho_p >= 1:
        return LoadPoint(rate, d, rho_p, inf, max_num_seqs, inf, inf, inf, inf, inf,
                         f"prefills alone need {rho_p:.2f} of the engine's time ({rate:.3g} req/s x {d * 1e3:.1f} ms)")
    stretch = 1 / (1 - rho_p)
    w_mean = md1_mean_wait(rate, d)
    n = 1.0
    for _ in range(200):  # Little's law, step time growing with the batch: a monotone fixed point
        tpot = step(max(1, min(max_num_seqs, round(n))), ctx) * stretch
        nxt = rate * (d + w_mean + traffic.output_tokens * tpot)
        if abs(nxt - n) < 1e-6 * max(1.0, n):
            n = nxt
            break
        n = nxt
    slot_wait = 0.0
    if n >= max_num_seqs:  # the slots fill: requests wait for one (M/M/c with c = max_num_seqs)
        service = d + traffic.output_tokens * step(max_num_seqs, ctx) * stretch
        if rate * service >= max_num_seqs:
            return LoadPoint(rate, d, rho_p, n, max_num_seqs, inf, inf, inf, inf, inf,
                             f"{max_num_seqs} slots each held {service:.2f} s per request serve at most "
                             f"{max_num_seqs / service:.3g} req/s")
        slot_wait = mmc_wait_quantile(max_num_seqs, rate, service, 0.95)
    b95 = max(1, min(max_num_seqs, poisson_quantile(n, 0.95)))
    b50 = max(1, min(max_num_seqs, poisson_quantile(n, 0.5)))
    pw = md1_wait_quantile(rate, d, 0.95)
    return LoadPoint(rate, d, rho_p, n, b95, slot_wait, pw, path_s + d + pw + slot_wait, step(b50, ctx) * stretch,
                     step(b95, ctx) * stretch, None)


@dataclass(frozen=True)
class Capacity:
    """The most requests/s one replica holds within the SLO, what limits it, and the predicted p95s there."""

    requests_per_s: float
    limited_by: str  # "ttft" | "tpot" | "throughput"
    at: LoadPoint
    why: str

    def to_json(self) -> dict:
        return {"requests_per_s": round(self.requests_per_s, 4), "limited_by": self.limited_by,
                "at": self.at.to_json(), "why": self.why}


def _meets(lp: LoadPoint, slo: Slo) -> str | None:
    """Which target ``lp`` misses (None when it meets every one)."""
    if lp.saturated:
        return "throughput"
    if slo.ttft_p95_ms is not None and lp.ttft_p95_s * 1e3 > slo.ttft_p95_ms:
        return "ttft"
    if slo.tpot_p95_ms is not None and lp.tpot_p95_s * 1e3 > slo.tpot_p95_ms:
        return "tpot"
    return None


def replica_capacity(traffic: Traffic, slo: Slo, step: StepFn, prefill_fn: PrefillFn, max_num_seqs: int,
                     model: str = "", path_s: float = 0.0) -> Capacity:
    """The largest arrival rate one replica serves within ``slo``. InputError when no rate does (a TTFT target below
    one prefill, a TPOT target below one decode step), with the numbers and the fix."""
    where = f"models[{model}]: " if model else ""
    idle = load_point(1e-9, traffic, step, prefill_fn, max_num_seqs, path_s)
    if slo.ttft_p95_ms is not None and idle.ttft_p95_s * 1e3 > slo.ttft_p95_ms:
        raise InputError(f"{where}slo.ttft_p95_ms {slo.ttft_p95_ms:g} is below one prefill of "
                         f"{traffic.prompt_tokens} prompt tokens ({idle.ttft_p95_s * 1e3:.1f} ms on an idle replica, the "
                         "serving path's latency included): "
                         "no number of replicas meets it; raise the target, shorten the prompts, or plan a faster "
                         "GPU or quantization")
    if slo.tpot_p95_ms is not None and idle.tpot_p95_s * 1e3 > slo.tpot_p95_ms:
        raise InputError(f"{where}slo.tpot_p95_ms {slo.tpot_p95_ms:g} is below one decode step "
                         f"({idle.tpot_p95_s * 1e3:.2f} ms with a single sequence): no number of replicas meets it; "
                         "raise the target, or plan a faster GPU or quantization")
    lo, hi = 0.0, 1.0
    while _meets(load_point(hi, traffic, step, prefill_fn, max_num_seqs, path_s), slo) is None:
        lo, hi = hi, hi * 2
        if hi > 1e7:
            break
    for _ in range(50):
        mid = (lo + hi) / 2
        if _meets(load_point(mid, traffic, step, prefill_fn, max_num_seqs, path_s), slo) is None:
            lo = mid
        else:
            hi = mid
    at = load_point(lo, traffic, step, prefill_fn, max_num_seqs, path_s)
    limit = _meets(load_point(hi, traffic, step, prefill_fn, max_num_seqs, path_s), slo) or "throughput"
    targets = ", ".join(f"{k} {v:g} ms" for k, v in (("TTFT p95", slo.ttft_p95_ms), ("TPOT p95", slo.tpot_p95_ms))
                        if v is not None) or "no latency target"
    breaks = {"ttft": "the TTFT target", "tpot": "the TPOT target", "throughput": "its throughput"}[limit]
    why = (f"one replica holds {lo:.3g} req/s within {targets} (then TTFT p95 {at.ttft_p95_s * 1e3:.0f} ms, TPOT p95 "
           f"{at.tpot_p95_s * 1e3:.1f} ms, {at.running_mean:.1f} sequences running); more breaks {breaks}")
    return Capacity(lo, limit, at, why)


def replicas_needed(traffic: Traffic, cap: Capacity) -> int:
    """Replicas that hold ``traffic`` within the SLO, spread evenly (each gets rate / replicas)."""
    if traffic.requests_per_s <= 0:
        return 0
    if cap.requests_per_s <= 0:
        raise InputError(f"a replica holds no traffic within the target ({cap.why}); raise the target")
    return max(1, math.ceil(traffic.requests_per_s / cap.requests_per_s - 1e-9))


# ------------------------------------------------------------------------------------------------ traces


@lru_cache(maxsize=8)
def read_trace(path: str) -> tuple[tuple[float, int, int], ...]:
    """(seconds since the first request, prompt tokens, output tokens) per request of a CSV trace with TIMESTAMP,
    ContextTokens and GeneratedTokens columns (the Azure LLM inference traces' shape), in arrival order."""
    import csv
    from datetime import datetime

    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
            if not need <= set(reader.fieldnames or ()):
                raise InputError(f"trace {path}: needs the columns TIMESTAMP, ContextTokens, GeneratedTokens; it has "
                                 f"{', '.join(reader.fieldnames or ()) or 'none'}")
            for i, r in enumerate(reader, start=2):
                try:
                    day, _, clock = r["TIMESTAMP"].strip().partition(" ")
                    hms, _, frac = clock.partition(".")
                    t = datetime.fromisoformat(f"{day} {hms}").timestamp() + float(f"0.{frac or 0}")
                    rows.append((t, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
                except (ValueError, TypeError):
                    raise InputError(f"trace {path} line {i}: cannot read {dict(r)} (expected a timestamp like "
                                     "2023-11-16 18:15:46.68 and two token counts)") from None
    except OSError as exc:
        raise InputError(f"trace {path}: {exc.strerror or exc}") from None
    if len(rows) < 2:
        raise InputError(f"trace {path}: needs at least two requests, has {len(rows)}")
    rows.sort()
    t0 = rows[0][0]
    return tuple((t - t0, p, o) for t, p, o in rows)


def traffic_of_trace(rows, scale: float = 1.0) -> Traffic:
    """Mean rate and shape of a trace (requests over its span)."""
    span = rows[-1][0] - rows[0][0]
    if span <= 0:
        raise InputError("a trace whose requests all arrive at once has no rate; give requests_per_s")
    n = len(rows)
    return Traffic(requests_per_s=(n - 1) / span * scale, prompt_tokens=round(sum(r[1] for r in rows) / n),
                   output_tokens=max(1, round(sum(r[2] for r in rows) / n)))
