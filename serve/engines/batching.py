"""Continuous batching for the engines gpuplan drives itself (no Ray, no HTTP, no model runtime).

``BatchedEngine`` holds what does not depend on the model runtime (queue, admission, streaming, detokenization, stop
strings, cancellation); serve/engines/transformers.py runs a transformers model under it, and
serve/engines/llamacpp.py a GGUF file on llama.cpp. A sequence is a plain slot record (``Seq``), as in llama.cpp's
server.

One background thread owns the model: it admits waiting requests (a new wave, or joining the running batch between
decode steps: continuous batching), runs one step for every running sequence, then detokenizes incrementally and
checks EOS, stop strings and max_tokens; the subclass runs the model's prefill and decode
(serve/engines/transformers.py describes the transformers loop).

Chunks cross to asyncio with ``loop.call_soon_threadsafe`` onto one ``asyncio.Queue`` per request. A consumer that
stops iterating (client gone) marks its request cancelled; the worker drops it before the next forward pass."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator


from serve.types import GenerationChunk, SamplingParams

log = logging.getLogger("gpuplan")

_PREFIX_CONTEXT = 5  # prompt tokens decoded in front of the completion (keeps a first "▁word"'s space, like vLLM)
_TPS_WINDOW_S = 10.0


def merge_chunks(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    """Two consecutive chunks of one sequence as one (text and token ids concatenated, b's counters)."""
    return GenerationChunk(text=a.text + b.text, token_ids=tuple(a.token_ids) + tuple(b.token_ids),
                           finish_reason=b.finish_reason, prompt_tokens=b.prompt_tokens,
                           completion_tokens=b.completion_tokens)


async def coalesce(source: AsyncIterator[GenerationChunk], interval_s: float, clock=time.monotonic):
    """Re-chunk a stream: the first chunk with text goes out at once (chunks before it, token ids whose text is not
    known yet, go with it), later ones are merged until ``interval_s`` has passed since the last one sent; the final
    chunk (finish_reason set) is never held back."""
    pending, last = None, None
    async for chunk in source:
        pending = chunk if pending is None else merge_chunks(pending, chunk)
        now = clock()
        if (chunk.finish_reason is not None or (now - last >= interval_s if last is not None
                                                 else bool(pending.text))):
            yield pending
            pending, last = None, now
    if pending is not None:
        yield pending


class EngineClosed(RuntimeError):
    pass


@dataclass(eq=False)
class Seq:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the consumer's event loop, read by the worker
    done: bool = False  # set by the worker: final chunk (or an error) was sent
    out_ids: list[int] = field(default_factory=list)
    n_cached: int = 0  # real (non-pad) tokens of this sequence in the KV cache
    generator: object = None  # the engine's random generator for this sequence (a torch.Generator)
    # incremental detokenization
    ctx_ids: list[int] = field(default_factory=list)  # prompt tail + completion (minus EOS), what is decoded
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # completion text so far (stop string cut off)
    sent_chars: int = 0
    unsent_ids: list[int] = field(default_factory=list)
    stop_scan_from: int = 0
    engine_state: dict = field(default_factory=dict)  # what the engine running it keeps per sequence (a slot, ...)


class BatchedEngine:
    """What every batching engine of a replica shares, whatever runs the model (the transformers engine, llama.cpp
    in serve/engines/llamacpp.py): the waiting queue and admission (a new wave, or joining between decode steps), one
    worker thread, streaming to asyncio, incremental detokenization, EOS / stop strings / max_tokens, cancellation,
    counters. A subclass runs the model: ``_prefill(seqs)`` (prompts in, first tokens out through ``_emit``),
    ``_decode_step()`` (one token for each running sequence) and ``_compact(batch)`` (drop what finished); it calls
    ``_start_worker()`` at the end of its ``__init__``."""

    name = "batched"

    def __init__(self, tokenizer, *, max_num_seqs: int, max_model_len: int, batch_wait_s: float = 0.005,
                 continuous: bool = True, max_num_batched_tokens: int | None = None,
                 eos_ids: frozenset[int] = frozenset(), vocab_size: int = 0):
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        self.tokenizer = tokenizer
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = int(max_model_len)
        self.batch_wait_s = float(batch_wait_s)
        self.continuous = bool(continuous)
        # A prefill forward pass holds at most this many (padded) tokens: the activation peak the planner sized
        # (planner.model.estimate: one prefill chunk of max_num_batched_tokens, default max_model_len).
        self.max_num_batched_tokens = int(max_num_batched_tokens or max_model_len)
        self._eos_ids = frozenset(eos_ids)
        self._vocab_size = int(vocab_size)  # 0: unknown, not checked
        self._joinable: bool | None = None  # None until the subclass knows whether new requests can join

        self._cv = threading.Condition()
        self._waiting: collections.deque[Seq] = collections.deque()
        self._batch = None  # the running batch: any object with a ``seqs`` list
        self._stop = False
        self._closed = False

        # counters (written by the worker, read anywhere)
        self.forward_passes = 0
        self.prefill_passes = 0
        self.decode_steps = 0
        self.joins = 0
        self.completed = 0
        self.cancelled = 0
        self.errors = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.max_running_seen = 0
        self._tps = collections.deque()  # (monotonic time, tokens generated in that step)
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    def _start_worker(self) -> None:
        self._thread = threading.Thread(target=self._worker, name=f"gpuplan-{self.name}", daemon=True)
        self._thread.start()

    def _worker_context(self):
        """Context the worker thread runs the model in."""
        return contextlib.nullcontext()

    def _init_seq(self, s: Seq) -> None:
        """A sequence's detokenization state once its prompt is in the cache."""
        s.n_cached = len(s.prompt_ids)
        s.ctx_ids = list(s.prompt_ids[-_PREFIX_CONTEXT:])
        s.prefix_offset = 0
        s.read_offset = len(s.ctx_ids)
        self.prompt_tokens += len(s.prompt_ids)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt_ids`` as ``GenerationChunk``s (use with ``async for``).

        Raises ValueError right away (at the call, before any iteration) for an empty prompt, max_tokens < 1,
        prompt + max_tokens > max_model_len, or bad sampling values; the request is queued on first iteration."""
        prompt_ids = [int(t) for t in prompt_ids]
        self._validate(prompt_ids, params)
        return self._stream(prompt_ids, params)

    def check_health(self) -> None:
        """Raise when the worker thread is gone (the replica's health check)."""
        if not self._thread.is_alive() and not self._stop:
            raise RuntimeError("the generation thread has stopped")

    def report(self) -> dict:
        """What this engine was given (the interface of serve/engines/base.py)."""
        return {"engine": self.name, "given": {"max_num_seqs": self.max_num_seqs,
                                               "max_model_len": self.max_model_len}}

    def stats(self) -> dict:
        now = time.monotonic()
        with self._cv:
            waiting = sum(1 for s in self._waiting if not s.cancelled)
            batch = self._batch
            running = sum(1 for s in batch.seqs if not s.done) if batch is not None else 0
            cached = sum(s.n_cached for s in batch.seqs if not s.done) if batch is not None else 0
            while self._tps and self._tps[0][0] < now - _TPS_WINDOW_S:
                self._tps.popleft()
            recent = sum(n for _, n in self._tps)
        span = max(1e-3, min(_TPS_WINDOW_S, now - self._started))
        return {
            "waiting": waiting,
            "running": running,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "errors": self.errors,
            "generated_tokens": self.generated_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": round(recent / span, 2),
            # tokens the running sequences hold in the KV cache over the budget the plan sized (max_num_seqs full
            # sequences of max_model_len)
            "kv_cache_usage": round(cached / (self.max_num_seqs * self.max_model_len), 4),
            "forward_passes": self.forward_passes,
            "prefill_passes": self.prefill_passes,
            "decode_steps": self.decode_steps,
            "joins": self.joins,
            "max_running_seen": self.max_running_seen,
            "max_num_seqs": self.max_num_seqs,
            "continuous_batching": bool(self.continuous and self._joinable is not False),
        }

    async def close(self) -> None:
        """Stop the worker (requests still queued or running end with EngineClosed)."""
        self._signal_stop()
        await asyncio.to_thread(self._thread.join)

    def shutdown(self, timeout: float | None = None) -> None:
        """Synchronous close()."""
        self._signal_stop()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ submit / stream (event-loop side)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if self._closed:
            raise EngineClosed("the generation engine is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        bad = [t for t in prompt_ids if not 0 <= t < self._vocab_size] if self._vocab_size else []
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{self._vocab_size - 1})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len {self.max_model_len}")
        if params.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {params.temperature}")
        if not 0 < params.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")

    async def _stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        seq = Seq(prompt_ids=prompt_ids, params=params, loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        with self._cv:
            if self._stop:
                raise EngineClosed("the generation engine is closed")
            self._waiting.append(seq)
            self._cv.notify_all()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                # When the consumer is slower than the model (HTTP + Ray streaming per token on a busy host),
                # several steps wait in the queue: send them as one chunk instead of one message per token.
                pending_error = None
                while item.finish_reason is None and not seq.queue.empty():
                    nxt = seq.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        pending_error = nxt
                        break
                    item = merge_chunks(item, nxt)
                yield item
                if pending_error is not None:
                    raise pending_error
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                seq.cancelled = True  # the worker drops it before its next forward pass
                with self._cv:
                    self._cv.notify_all()

    def _signal_stop(self) -> None:
        self._closed = True
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ worker thread

    def _worker(self) -> None:
        try:
            with self._worker_context():
                while True:
                    newcomers = self._admit()
                    if newcomers is None:
                        break
                    for group in self._prefill_groups(newcomers):
                        try:
                            self._prefill(group)
                        except Exception as exc:  # a bad batch must not kill the replica
                            log.exception("prefill failed")
                            self._fail(group, exc)
                            self._after_error()
                    if self._batch is not None:
                        try:
                            self._decode_step()
                        except Exception as exc:
                            log.exception("decode step failed")
                            batch, self._batch = self._batch, None
                            self._fail(batch.seqs, exc)
                            self._after_error()
        except BaseException as exc:  # pragma: no cover - the worker itself broke
            log.exception("generation worker died")
            self._closed = True
            self._drain(exc if isinstance(exc, Exception) else EngineClosed(str(exc)))
            raise
        self._drain(EngineClosed("the generation engine was closed"))

    def _drain(self, exc: Exception) -> None:
        with self._cv:
            self._stop = True
            rest = list(self._waiting)
            self._waiting.clear()
            batch, self._batch = self._batch, None
        if batch is not None:
            rest += batch.seqs
        self._fail(rest, exc)

    def _after_error(self) -> None:
        self.errors += 1

    def _take(self, n: int) -> list[Seq]:
        out = []
        while self._waiting and len(out) < n:
            s = self._waiting.popleft()
            if s.cancelled:
                self._finish_cancelled(s)
                continue
            out.append(s)
        return out

    def _admit(self) -> list[Seq] | None:
        """Requests to prefill now ([] = none), or None to stop."""
        with self._cv:
            while True:
                if self._stop:
                    return None
                while self._waiting and self._waiting[0].cancelled:
                    self._finish_cancelled(self._waiting.popleft())
                if self._batch is not None:
                    free = self.max_num_seqs - len(self._batch.seqs)
                    if not self._waiting or free <= 0 or not self.continuous or self._joinable is False:
                        return []
                    return self._take(free)
                if self._waiting:
                    break
                self._cv.wait()
            # a new wave: give concurrent arrivals batch_wait_s to show up, unless they can join the running batch
            # at the next step anyway (continuous batching): then waiting only delays the first token (5 ms of
            # the 17 ms a 1-token request took end to end through the API)
            wait_s = 0.0 if self.continuous and self._joinable else self.batch_wait_s
            deadline = time.monotonic() + wait_s
            while not self._stop and sum(not s.cancelled for s in self._waiting) < self.max_num_seqs:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._stop:
                return None
            return self._take(self.max_num_seqs)

    # -- model calls

    def _prefill_groups(self, seqs: list[Seq]) -> list[list[Seq]]:
        """Split newcomers so that each prefill pass (padded to its longest prompt) stays within
        max_num_batched_tokens; a single prompt is never split (it is at most max_model_len)."""
        groups: list[list[Seq]] = []
        for s in sorted(seqs, key=lambda x: len(x.prompt_ids)):
            g = groups[-1] if groups else None
            if g is not None and (len(g) + 1) * len(s.prompt_ids) <= self.max_num_batched_tokens:
                g.append(s)
            else:
                groups.append([s])
        return groups

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self, s: Seq, final: bool) -> str:
        """Incremental detokenization (prefix/read offsets, as vLLM and TGI do it): the text the tokens after
        ``read_offset`` add, holding it back while it ends in an incomplete UTF-8 sequence (unless ``final``)."""
        if s.read_offset >= len(s.ctx_ids):
            return ""
        prefix = self._decode(s.ctx_ids[s.prefix_offset:s.read_offset])
        full = self._decode(s.ctx_ids[s.prefix_offset:])
        if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
            return ""
        s.prefix_offset, s.read_offset = s.read_offset, len(s.ctx_ids)
        return full[len(prefix):]

    def _emit(self, seqs: list[Seq], tokens: list[int]) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.monotonic()
        for s, tok in zip(seqs, tokens):
            if s.done:
                continue
            s.out_ids.append(tok)
            s.unsent_ids.append(tok)
            finish = None
            eos = tok in self._eos_ids and not s.params.ignore_eos
            if not eos:
                s.ctx_ids.append(tok)  # EOS ends the text; it is not part of it
            length = len(s.out_ids) >= s.params.max_tokens
            s.text += self._new_text(s, final=eos or length)
            if s.params.stop:
                cut = self._find_stop(s)
                if cut is not None:
                    s.text = s.text[:cut]
                    finish = "stop"
            if finish is None:
                finish = "stop" if eos else "length" if length else None
            if finish is not None:
                end = len(s.text)
            else:
                end = len(s.text) - self._stop_holdback(s)
            if end <= s.sent_chars and finish is None:
                continue  # nothing printable yet; these token ids go out with the next chunk
            chunk = GenerationChunk(text=s.text[s.sent_chars:end], token_ids=tuple(s.unsent_ids),
                                    finish_reason=finish, prompt_tokens=len(s.prompt_ids),
                                    completion_tokens=len(s.out_ids))
            s.sent_chars = max(s.sent_chars, end)
            s.unsent_ids = []
            if finish is not None:
                s.done = True
                self.completed += 1
            deliveries.setdefault(s.loop, []).append((s, chunk))
        n = len(tokens)
        self.generated_tokens += n
        with self._cv:
            self._tps.append((now, n))
            while self._tps[0][0] < now - _TPS_WINDOW_S:
                self._tps.popleft()
        self._deliver(deliveries)

    @staticmethod
    def _find_stop(s: Seq) -> int | None:
        longest = max(len(x) for x in s.params.stop)
        start = max(0, s.stop_scan_from - longest + 1)
        best = None
        for stop in s.params.stop:
            if not stop:
                continue
            i = s.text.find(stop, start)
            if i != -1 and (best is None or i < best):
                best = i
        s.stop_scan_from = len(s.text)
        return best

    @staticmethod
    def _stop_holdback(s: Seq) -> int:
        """Length of the longest tail of the text that could be the start of a stop string."""
        hold = 0
        for stop in s.params.stop:
            for k in range(min(len(stop) - 1, len(s.text)), hold, -1):
                if s.text.endswith(stop[:k]):
                    hold = k
                    break
        return hold

    def _deliver(self, deliveries: dict) -> None:
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the consumer's event loop is gone: nobody listens any more
                for s, _ in items:
                    s.cancelled = True
                    s.done = True

    def _finish_cancelled(self, s: Seq) -> None:
        if not s.done:
            s.done = True
            self.cancelled += 1

    def _fail(self, seqs: list[Seq], exc: BaseException) -> None:
        deliveries: dict = {}
        for s in seqs:
            if s.done:
                continue
            s.done = True
            deliveries.setdefault(s.loop, []).append((s, exc))
        self._deliver(deliveries)


def _put_all(items) -> None:
    for s, item in items:
        s.queue.put_nowait(item)
