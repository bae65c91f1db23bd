"""The llama.cpp engine: a GGUF model run by llama.cpp (``llama-cpp-python``'s low-level C API) inside the Serve
replica, with the batching of the transformers engine (serve/engines/batching.py ``BatchedEngine``: admission,
joining between steps, streaming, stop strings, cancellation).

The high-level ``llama_cpp.Llama`` and its bundled server run one sequence at a time. Here one context holds
``n_seq_max = max_num_seqs`` sequences, each in its own KV stream of ``n_ctx_seq`` = max_model_len rounded up to 256
cells (llama.cpp's padding; ``kv_unified`` off, as llama-server's slots); every decode step is one ``llama_decode``
of a ``llama_batch`` holding one token per running sequence, each under its own ``seq_id``, and newcomers are
prefilled together in one batch between steps. A finished sequence's cells are freed with ``llama_memory_seq_rm``
and its slot (seq id) is reused.

Sampling runs in llama.cpp, one sampler chain per request: greedy at temperature 0, else temperature -> top-p ->
``dist`` seeded by the request's seed (a request's draws depend only on its own seed, not on its batch-mates).

Memory as llama.cpp allocates it, and as the planner sizes it (planner/model/engines/llamacpp.py): the model buffer
(the GGUF's tensors; mmap'd on the CPU), the KV buffer (n_ctx = n_seq_max x n_ctx_seq cells, f16 K and V), the output
buffer (logits of ``n_outputs_max`` = n_seq_max rows; llama.cpp's default of n_batch rows would only serve prompt
logits, which nothing here asks for) and the compute buffer (one ``n_ubatch`` graph). llama.cpp's own log lines for
each are kept and shown in ``report()``."""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass

from planner.model.engines.llamacpp import llamacpp_settings

from serve.engines.batching import BatchedEngine, Seq

log = logging.getLogger("gpuplan")

# llama.cpp logs through one process-wide callback: keep its lines (the buffer sizes are read from them)
_LOG_LINES: collections.deque = collections.deque(maxlen=5000)  # (sequence number, line)
_LOG_COUNT = [0]
_LOG_LOCK = threading.Lock()
_LOG_CB = None
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s*([\d.]+) MiB")
_OFFLOAD_RE = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
UINT32 = 0xFFFFFFFF


def _install_log() -> None:
    global _LOG_CB
    import llama_cpp as L

    if _LOG_CB is not None:
        return

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def cb(level, text, _user):
        line = text.decode("utf-8", errors="replace") if text else ""
        with _LOG_LOCK:
            _LOG_LINES.append((_LOG_COUNT[0], line))
            _LOG_COUNT[0] += 1
        if level in (3, 4) and line.strip():  # GGML_LOG_LEVEL_WARN, _ERROR
            log.warning("llama.cpp: %s", line.rstrip())

    _LOG_CB = cb
    L.llama_log_set(cb, ctypes.c_void_p(0))
    L.llama_backend_init()


def parse_buffers(lines: list[str]) -> dict:
    """llama.cpp's buffer log lines -> {"model": {buffer name: bytes}, "KV": ..., "compute": ..., "output": ...}
    (sizes are logged in MiB with two decimals: +-5 KiB)."""
    out: dict = {}
    for line in lines:
        for m in _BUFFER_RE.finditer(line):
            out.setdefault(m.group(2), {})[m.group(1)] = int(round(float(m.group(3)) * 2**20))
        m = _OFFLOAD_RE.search(line)
        if m:
            out["offloaded_layers"] = [int(m.group(1)), int(m.group(2))]
    return out


@dataclass(eq=False)
class _Running:
    seqs: list[Seq]


class LlamaCppEngine(BatchedEngine):
    """Batched generation over llama.cpp (see the module docstring). The context is the one the planner sizes
    (planner.model.engines.llamacpp.llamacpp_settings): ``n_batch`` / ``n_ubatch`` left out take its values."""

    name = "llamacpp"

    def __init__(self, path: str, tokenizer, *, max_num_seqs: int, max_model_len: int, n_gpu_layers: int = 0,
                 n_batch: int | None = None, n_ubatch: int | None = None, n_threads: int | None = None,
                 flash_attn: str = "auto", batch_wait_s: float = 0.005, use_mmap: bool = True):
        import llama_cpp as L

        self._L = L
        _install_log()
        with _LOG_LOCK:
            first_line = _LOG_COUNT[0]
        self.path = path
        n_threads = int(n_threads or len(os.sched_getaffinity(0)))
        planned = llamacpp_settings(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                    prefill_tokens=max_model_len, n_gpu_layers=n_gpu_layers)
        cells = planned.n_ctx_seq
        n_batch = int(n_batch or planned.n_batch)
        n_ubatch = int(n_ubatch or min(planned.n_ubatch, n_batch))
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = int(n_gpu_layers)
        mp.use_mmap = bool(use_mmap)
        self._model = L.llama_model_load_from_file(path.encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path} (see the log above)")
        self._vocab = L.llama_model_get_vocab(self._model)
        n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        cp = L.llama_context_default_params()
        cp.n_ctx = cells * max_num_seqs
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = int(max_num_seqs)
        cp.n_outputs_max = int(max_num_seqs)  # one logits row per running sequence is all a step asks for
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.kv_unified = False
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context of {cp.n_ctx} cells for {path} "
                               "(see the log above)")
        self._mem = L.llama_get_memory(self._ctx)
        self._lbatch = L.llama_batch_init(max(n_batch, max_num_seqs), 0, 1)
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        eos = {t for t in range(n_vocab) if L.llama_vocab_is_eog(self._vocab, t)}
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        with _LOG_LOCK:
            lines = [line for n, line in _LOG_LINES if n >= first_line]
        self.settings = {"n_gpu_layers": int(n_gpu_layers), "n_ctx": cells * max_num_seqs, "n_ctx_seq": cells,
                         "n_seq_max": int(max_num_seqs), "n_batch": n_batch, "n_ubatch": n_ubatch,
                         "n_outputs_max": int(max_num_seqs), "n_threads": n_threads, "flash_attn": flash_attn,
                         "use_mmap": bool(use_mmap)}
        self.reported = {"buffers": parse_buffers(lines), "model_size": int(L.llama_model_size(self._model)),
                         "n_ctx": int(L.llama_n_ctx(self._ctx)), "n_vocab": n_vocab}
        super().__init__(tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                         batch_wait_s=batch_wait_s, max_num_batched_tokens=n_batch, eos_ids=frozenset(eos),
                         vocab_size=n_vocab)
        self._joinable = True  # every sequence has its own KV stream: newcomers join between steps
        self._batch: _Running | None = None
        self._freed = False
        self._start_worker()

    # -- the interface of serve/engines/base.py (the rest is BatchedEngine's)

    def report(self) -> dict:
        return {"engine": "llamacpp", "given": self.settings, "reported": self.reported}

    async def close(self) -> None:
        await super().close()
        self._free_native()

    def shutdown(self, timeout: float | None = None) -> None:
        super().shutdown(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._free_native()

    def _free_native(self) -> None:
        if self._freed:
            return
        self._freed = True
        L = self._L
        L.llama_batch_free(self._lbatch)
        L.llama_free(self._ctx)
        L.llama_model_free(self._model)

    # -- model calls (worker thread)

    def _sampler(self, s: Seq):
        L = self._L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        p = s.params
        if p.temperature == 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(p.temperature)))
            if p.top_p < 1:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(p.top_p), 1))
            seed = L.LLAMA_DEFAULT_SEED if p.seed is None else int(p.seed) & UINT32
            if p.seed is not None and seed == L.LLAMA_DEFAULT_SEED:
                seed = UINT32 - 1  # 0xFFFFFFFF means "random" to llama.cpp
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def _put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b = self._lbatch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = 1 if logits else 0

    def _run_batch(self, n: int) -> None:
        self._lbatch.n_tokens = n
        rc = self._L.llama_decode(self._ctx, self._lbatch)
        self.forward_passes += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens"
                               + (" (no room in the KV cache)" if rc == 1 else ""))

    def _release(self, s: Seq) -> None:
        st = s.engine_state
        if st.get("sampler") is not None:
            self._L.llama_sampler_free(st.pop("sampler"))
        slot = st.pop("slot", None)
        if slot is not None:
            self._L.llama_memory_seq_rm(self._mem, slot, -1, -1)
            self._free_slots.append(slot)

    def _prefill(self, seqs: list[Seq]) -> None:
        n, last = 0, []
        for s in seqs:
            slot = self._free_slots.pop()
            s.engine_state["slot"] = slot
            self._L.llama_memory_seq_rm(self._mem, slot, -1, -1)
            for j, t in enumerate(s.prompt_ids):
                self._put(n, t, j, slot, j == len(s.prompt_ids) - 1)
                n += 1
            last.append(n - 1)
        try:
            self._run_batch(n)
        except Exception:
            for s in seqs:
                self._release(s)
            raise
        self.prefill_passes += 1
        tokens = []
        for s, i in zip(seqs, last):
            self._init_seq(s)
            s.engine_state["sampler"] = self._sampler(s)
            tokens.append(int(self._L.llama_sampler_sample(s.engine_state["sampler"], self._ctx, i)))
        self._emit(seqs, tokens)
        running = self._batch.seqs if self._batch is not None else []
        if self._batch is not None:
            self.joins += 1
        self._batch = self._compact(_Running(seqs=running + list(seqs)))
        if self._batch is not None:
            self.max_running_seen = max(self.max_running_seen, len(self._batch.seqs))

    def _decode_step(self) -> None:
        batch = self._compact(self._batch)
        self._batch = batch
        if batch is None:
            return
        for i, s in enumerate(batch.seqs):
            self._put(i, s.out_ids[-1], s.n_cached, s.engine_state["slot"], True)
        try:
            self._run_batch(len(batch.seqs))
        except Exception:
            for s in batch.seqs:
                self._release(s)
            raise
        self.decode_steps += 1
        tokens = []
        for i, s in enumerate(batch.seqs):
            s.n_cached += 1
            tokens.append(int(self._L.llama_sampler_sample(s.engine_state["sampler"], self._ctx, i)))
        self._emit(batch.seqs, tokens)
        self._batch = self._compact(batch)

    def _compact(self, batch: _Running | None) -> _Running | None:
        if batch is None:
            return None
        keep = []
        for s in batch.seqs:
            if s.cancelled and not s.done:
                self._finish_cancelled(s)
            if s.done:
                self._release(s)
            else:
                keep.append(s)
        if not keep:
            return None
        batch.seqs = keep
        return batch

    def _drain(self, exc: Exception) -> None:
        running = self._batch.seqs if self._batch is not None else []
        super()._drain(exc)
        for s in running:
            self._release(s)


# ------------------------------------------------------------------------------------------------ start-up

def start(cfg, host):
    """llama.cpp with the context the plan gave this replica (planner.model.engines.llamacpp.settings): one KV stream
    per sequence, as many layers on the GPU as its free memory holds within the plan (all of them when the plan
    holds; a CPU build runs everything on the CPU)."""
    from planner.decisions import classify_load_failure
    from planner.errors import InfeasiblePlanError
    from planner.model.engines.llamacpp import decide_gpu_layers
    from planner.model.estimate import CUDA_CONTEXT_BYTES
    from planner.model.spec import spec_from_gguf
    from serve.engines.base import Started
    from serve.engines.loader import load_tokenizer

    st = cfg.settings
    cuda, idx, total, free, why = host.cuda_state()
    budget = min(cfg.planned_bytes, free if free is not None else total) if cuda else None
    try:
        layers = decide_gpu_layers(spec_from_gguf(cfg.source), st, model=cfg.name, budget_bytes=budget,
                                   offload_cpu_bytes=cfg.offload_cpu_bytes, fixed_gpu_bytes=CUDA_CONTEXT_BYTES,
                                   why_no_cuda=why or "no CUDA")
    except InfeasiblePlanError as exc:  # the GPU's free memory is below plan and the rest exceeds offload
        host.report_failure("gpu", "gpu_memory", str(exc), gave_up=True)
        host.give_up("gpu", "gpu_memory", str(exc))
    log.info("gpuplan replica %s: %s", cfg.name, layers.reason)
    try:
        tokenizer = load_tokenizer(cfg.source, cfg.trust_remote_code)
        engine = LlamaCppEngine(
            cfg.source, tokenizer, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len,
            n_gpu_layers=layers.n_gpu_layers, n_batch=st.n_batch, n_ubatch=st.n_ubatch, flash_attn=st.flash_attn,
            n_threads=cfg.cpu_threads())
    except Exception as exc:
        kind = classify_load_failure(type(exc).__name__, str(exc))
        msg = f"{type(exc).__name__}: {str(exc)[:300]}"
        host.report_failure("gpu" if cuda else "cpu", kind, msg, gave_up=True)
        host.give_up("gpu" if cuda else "cpu", kind, msg)
    rep = engine.report()
    log.info("gpuplan replica %s: llama.cpp context of %s cells (%s sequences), buffers %s; %s", cfg.name,
             rep["given"]["n_ctx"], rep["given"]["n_seq_max"], rep["reported"]["buffers"],
             "GPU" if cuda else f"CPU ({why or 'no CUDA'})")
    return Started(engine, layers, {"total": rep["reported"]["model_size"],
                                    "llamacpp_buffers": rep["reported"]["buffers"]})
