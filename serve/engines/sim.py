"""The simulated engine: no model, tokens on the speed model's clock (planner/model/engines/sim.py says what it
imitates and why it exists).

One asyncio task per replica runs the batch as the discrete-event simulator does (planner/simulate.py), in real time:
at a step boundary it admits waiting sequences while the batch has a slot (``max_num_seqs``) and the planned KV
tokens hold their prompt and ``max_tokens``; the admitted group is prefilled (``prefill_s`` of their prompt tokens,
after which each has its first token); then the batch decodes, one token per sequence per ``step_s(batch, mean
context)``, until its first sequence ends. It does not wake per step: it sleeps until that end, waking every
``emit_s`` to hand each sequence the tokens its steps made by then, and when a request arrives that could join it
stops at the next step boundary to admit it (vLLM schedules at every step). So a replica costs a few wake-ups per
``emit_s``, not one per token, and dozens of them run on a laptop's cores.

The text is filler words drawn from the request's seed (the same seed gives the same text, streamed or not;
temperature 0 is seed 0); stop strings, max_tokens, cancellation and the counters behave as on the real engines.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from serve.engines.base import ReplicaConfig, Started
from serve.engines.batching import BatchedEngine, EngineClosed
from serve.types import GenerationChunk, SamplingParams

_TPS_WINDOW_S = 10.0
WORDS = ("the", "model", "plan", "replica", "token", "cache", "batch", "memory", "serve", "route", "queue", "step",
         "prefill", "decode", "latency", "budget", "node", "gpu", "share", "load", "scale", "trace", "prompt",
         "answer", "simulated", "engine", "speed", "window", "slot", "bytes", "time", "fit")


@dataclass(eq=False)
class _Seq:
    n_prompt: int
    params: SamplingParams
    queue: asyncio.Queue
    rng: random.Random
    made: int = 0  # tokens produced
    base: int = 0  # tokens at the start of the chunk of steps in progress
    fresh: bool = True  # admitted in the chunk in progress: its first token comes with the prefill
    text: str = ""  # completion text so far (stop string cut off)
    sent_chars: int = 0
    sent_tokens: int = 0
    stop_scan_from: int = 0
    done: bool = False
    cancelled: bool = False
    freed: bool = False  # its KV tokens were given back

    @property
    def reserve(self) -> int:
        """KV tokens held while running: the prompt and every token max_tokens allows."""
        return self.n_prompt + self.params.max_tokens


class SimEngine:
    """A replica's batch on the clock of ``step_s(batch, context)`` and ``prefill_s(tokens)`` (seconds)."""

    name = "sim"

    def __init__(self, *, step_s, prefill_s, max_num_seqs: int, max_model_len: int, kv_tokens: int,
                 emit_s: float = 0.05, clock=time.monotonic, report: dict | None = None):
        self.step_s, self.prefill_s = step_s, prefill_s
        self.max_num_seqs, self.max_model_len, self.kv_tokens = int(max_num_seqs), int(max_model_len), int(kv_tokens)
        self.emit_s = max(0.001, float(emit_s))
        self.clock = clock
        self._report = dict(report or {})
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._kv_used = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._error: BaseException | None = None
        self.completed = self.cancelled = self.generated_tokens = self.prompt_tokens = 0
        self.decode_steps = self.prefill_passes = self.max_running_seen = 0
        self._tps: collections.deque = collections.deque()
        self._started = clock()

    # ------------------------------------------------------------------ the Engine interface

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the completion; ValueError at the call for what cannot run (as the real engines)."""
        if self._closed:
            raise EngineClosed("the simulated engine is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        n = len(prompt_ids)
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                             f"{self.max_model_len}")
        if n + params.max_tokens > self.kv_tokens:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the replica's KV "
                             f"cache of {self.kv_tokens} tokens")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        seed = 0 if params.temperature == 0 else params.seed
        rng = random.Random(seed) if seed is not None else random.Random()
        return self._stream(_Seq(n, params, asyncio.Queue(), rng))

    def stats(self) -> dict:
        now = self.clock()
        while self._tps and self._tps[0][0] < now - _TPS_WINDOW_S:
            self._tps.popleft()
        span = max(1e-3, min(_TPS_WINDOW_S, now - self._started))
        return {"waiting": sum(1 for s in self._waiting if not s.cancelled), "running": len(self._running),
                "completed": self.completed, "cancelled": self.cancelled, "generated_tokens": self.generated_tokens,
                "prompt_tokens": self.prompt_tokens, "tokens_per_s": round(sum(n for _, n in self._tps) / span, 2),
                "kv_cache_usage": round(self._kv_used / self.kv_tokens, 4) if self.kv_tokens else 0.0,
                "decode_steps": self.decode_steps, "prefill_passes": self.prefill_passes,
                "max_running_seen": self.max_running_seen, "max_num_seqs": self.max_num_seqs,
                "continuous_batching": True, "simulated": True}

    def check_health(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the simulated engine's loop died: {self._error!r}")

    def report(self) -> dict:
        return {"engine": self.name, "simulated": True, "given": self._report}

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
        for s in [*self._waiting, *self._running]:
            if not s.done:
                s.done = True
                s.queue.put_nowait(EngineClosed("the simulated engine is closed"))

    # ------------------------------------------------------------------ consumer side

    async def _stream(self, s: _Seq) -> AsyncIterator[GenerationChunk]:
        if self._task is None:  # started on the first request's loop (the replica's)
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._waiting.append(s)
        self._wake.set()
        try:
            while True:
                item = await s.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not s.done:
                s.cancelled = True
                self._wake.set()

    # ------------------------------------------------------------------ the batch

    def _admit(self) -> list[_Seq]:
        fresh = []
        while self._waiting and len(self._running) < self.max_num_seqs:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                self._drop(s)
                continue
            if self._kv_used + s.reserve > self.kv_tokens:
                break
            self._waiting.popleft()
            self._kv_used += s.reserve
            s.fresh, s.base = True, 0
            self._running.append(s)
            fresh.append(s)
            self.prompt_tokens += s.n_prompt
        self.max_running_seen = max(self.max_running_seen, len(self._running))
        return fresh

    def _can_join(self) -> bool:
        return bool(self._waiting) and len(self._running) < self.max_num_seqs and (
            self._kv_used + self._waiting[0].reserve <= self.kv_tokens or self._waiting[0].cancelled)

    async def _sleep_until(self, t: float, interruptible: bool) -> None:
        delay = t - self.clock()
        if delay <= 0:
            return
        if not interruptible:
            await asyncio.sleep(delay)
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> None:
        try:
            while not self._closed:
                self._running = [s for s in self._running if not self._settled(s)]
                fresh = self._admit()
                if not self._running:
                    self._wake.clear()
                    if not self._waiting:
                        await self._wake.wait()
                    else:  # the head of the queue waits for KV (never: the replica is empty) or was cancelled
                        await asyncio.sleep(self.emit_s)
                    continue
                await self._chunk(fresh)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the health check reports it; requests get the error
            self._error = exc
            for s in [*self._waiting, *self._running]:
                if not s.done:
                    s.done = True
                    s.queue.put_nowait(exc)

    async def _chunk(self, fresh: list[_Seq]) -> None:
        """One prefill of ``fresh`` (if any), then decode steps until the first sequence ends, an arrival can join
        (cut at the next step boundary), or every sequence has stopped (stop string, cancelled)."""
        t0 = self.clock()
        pre = self.prefill_s(sum(s.n_prompt for s in fresh)) if fresh else 0.0
        if fresh:
            self.prefill_passes += 1
        for s in self._running:
            s.base = s.made
        k = min(s.params.max_tokens - s.made - (1 if s.fresh else 0) for s in self._running)
        ctx = sum(s.n_prompt + s.made for s in self._running) / len(self._running) + k / 2
        step = self.step_s(len(self._running), ctx)
        end = t0 + pre + k * step
        taken = 0
        while True:
            now = self.clock()
            if now >= end:
                taken = k
                break
            # wake at the prefill's end (first tokens go out at once: TTFT is exact), then every emit_s
            wake = t0 + pre if fresh and now < t0 + pre else now + self.emit_s
            await self._sleep_until(min(end, wake), interruptible=True)
            now = self.clock()
            taken = self._steps_by(now, t0, pre, step, k)
            self._progress(taken, now >= t0 + pre)
            if now >= end or all(s.done for s in self._running):
                break
            if self._can_join():
                # an arrival joins at the next step boundary
                nxt = t0 + pre + (taken + 1) * step if now >= t0 + pre else t0 + pre
                await self._sleep_until(nxt, interruptible=False)
                taken = min(k, taken + 1) if now >= t0 + pre else 0
                break
        self._progress(taken, True)
        self.decode_steps += taken
        for s in self._running:  # every sequence of the chunk has its first token now
            s.fresh = False

    @staticmethod
    def _steps_by(now: float, t0: float, pre: float, step: float, k: int) -> int:
        if now < t0 + pre:
            return 0
        if step <= 0:
            return k
        return max(0, min(k, math.floor((now - t0 - pre) / step + 1e-9)))

    def _progress(self, steps: int, prefilled: bool) -> None:
        """Hand each running sequence the tokens made by ``steps`` decode steps of the chunk (and its first token
        once the prefill is done)."""
        now = self.clock()
        made_now = 0
        for s in self._running:
            if s.done:
                continue
            if s.cancelled:
                self._drop(s)
                continue
            target = min(s.params.max_tokens, s.base + (1 if s.fresh and prefilled else 0) + steps)
            if target > s.made:
                made_now += target - s.made
                self._tokens(s, target)
        if made_now:
            self.generated_tokens += made_now
            self._tps.append((now, made_now))

    def _tokens(self, s: _Seq, target: int) -> None:
        """Make ``s``'s tokens up to ``target`` and send the chunk of new text."""
        finish = None
        while s.made < target:
            s.made += 1
            s.text += " " + WORDS[s.rng.randrange(len(WORDS))]
            if s.params.stop:
                cut = BatchedEngine._find_stop(s)
                if cut is not None:
                    s.text, finish = s.text[:cut], "stop"
                    break
        if finish is None and s.made >= s.params.max_tokens:
            finish = "length"
        end = len(s.text) if finish else len(s.text) - BatchedEngine._stop_holdback(s)
        if end <= s.sent_chars and finish is None:
            return
        s.queue.put_nowait(GenerationChunk(text=s.text[s.sent_chars:end], finish_reason=finish,
                                           prompt_tokens=s.n_prompt, completion_tokens=s.made))
        s.sent_chars = max(s.sent_chars, end)
        if finish:
            s.done = True
            self.completed += 1

    def _settled(self, s: _Seq) -> bool:
        """Whether ``s`` left the batch (done or cancelled); frees its KV tokens once."""
        if s.done or s.cancelled:
            self._drop(s)
            return True
        return False

    def _drop(self, s: _Seq) -> None:
        if not s.freed and s in self._running:
            self._kv_used -= s.reserve
            s.freed = True
        if s.cancelled and not s.done:
            s.done = True
            self.cancelled += 1


def start(cfg: ReplicaConfig, host) -> Started:
    """A simulated replica: nothing to load; its settings are the speed model's terms for its device."""
    st = cfg.settings
    eng = SimEngine(step_s=st.step_s, prefill_s=st.prefill_s, max_num_seqs=st.max_num_seqs,
                    max_model_len=st.max_model_len, kv_tokens=st.kv_tokens,
                    emit_s=cfg.stream_interval_s or 0.05, report=st.to_json())
    return Started(eng, None, {"total": 0})
