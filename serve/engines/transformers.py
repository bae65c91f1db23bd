"""The transformers engine: a transformers (+ bitsandbytes, accelerate offload) model under gpuplan's continuous
batching (serve/engines/batching.py), and its start-up: where to load (GPU, GPU + CPU offload, CPU; decided by
planner.decisions from the GPU the replica finds), capped at the replica's planned share, stepping down when a load
fails. The plan's side of this engine is planner/model/engines/transformers.py.

One background thread owns the model. It keeps one running batch with a shared KV cache
(transformers ``DynamicCache``, left-padded, with a 2-D attention mask and explicit position ids) and loops:

1. admit: with nothing running it takes up to ``max_num_seqs`` waiting requests, waiting up to ``batch_wait_s`` for
   more when fewer are there and newcomers could not join later (no wait when they can); while a batch runs, newly
   arrived requests *join between decode steps* (continuous batching): they are prefilled together in their own
   forward pass, and their cache is merged into the running one (the shorter of the two is left-padded with masked
   zeros). Models whose cache is not plain full-attention
   ``DynamicLayer``s (sliding-window / hybrid / linear-attention layers) cannot be merged that way: for them new
   requests wait for the running wave to finish.
2. one batched decode step for every running sequence, then per-sequence sampling (greedy at temperature 0, else
   temperature + top-p with a per-request ``torch.Generator`` seeded by ``params.seed``: a request's random draws
   depend only on its own seed, not on what else is in the batch);
3. incremental detokenization, EOS / stop-string / max_tokens checks (serve/engines/batching.py); finished and
   cancelled sequences leave the batch (``cache.batch_select_indices``) and columns that became padding for everyone
   are trimmed off the cache."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.engines.batching import BatchedEngine, Seq

log = logging.getLogger("gpuplan")


@dataclass(eq=False)
class _Batch:
    seqs: list[Seq]
    cache: object
    mask: torch.Tensor  # [B, T] long, 1 = real token in the cache


class GenerationEngine(BatchedEngine):
    """Batched generation over a transformers model (see the module docstring)."""

    name = "transformers"

    def __init__(self, model, tokenizer, *, max_num_seqs: int, max_model_len: int, batch_wait_s: float = 0.005,
                 continuous: bool = True, max_num_batched_tokens: int | None = None):
        self.model = model
        try:
            vocab = int(model.get_input_embeddings().num_embeddings)
        except Exception:
            vocab = 0  # unknown: not checked
        super().__init__(tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                         batch_wait_s=batch_wait_s, continuous=continuous,
                         max_num_batched_tokens=max_num_batched_tokens,
                         eos_ids=self._eos_token_ids(model, tokenizer), vocab_size=vocab)
        self._device = self._input_device(model)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None) or 0
        self._pad_id = int(pad)
        params = inspect.signature(model.forward).parameters
        accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._logits_to_keep = "logits_to_keep" in params
        # transformers >= 5.2x calls the KV cache argument ``cache`` (``past_key_values`` is deprecated)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._position_ids = "position_ids" in params or accepts_kwargs
        self._start_worker()

    def _worker_context(self):
        return torch.inference_mode()

    def _after_error(self) -> None:
        super()._after_error()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _input_device(model) -> torch.device:
        try:
            return model.get_input_embeddings().weight.device
        except Exception:
            return next(model.parameters()).device

    @staticmethod
    def _eos_token_ids(model, tokenizer) -> frozenset[int]:
        ids: set[int] = set()
        for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                    getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
            if src is None:
                continue
            for t in (src if isinstance(src, (list, tuple)) else [src]):
                if t is not None:
                    ids.add(int(t))
        return frozenset(ids)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        kw = {"input_ids": input_ids, "attention_mask": mask, self._cache_kw: cache, "use_cache": True}
        if self._position_ids:
            kw["position_ids"] = positions
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.model(**kw)
        self.forward_passes += 1
        new_cache = out.get("cache")
        if new_cache is None:
            new_cache = out.get("past_key_values")
        return out.logits[:, -1, :], new_cache

    def _prefill(self, seqs: list[Seq]) -> None:
        lens = [len(s.prompt_ids) for s in seqs]
        width = max(lens)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - lens[i]:] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[i, width - lens[i]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self._device) for t in (ids, mask, positions))
        logits, cache = self._forward(ids, mask, positions, None)
        self.prefill_passes += 1
        for s in seqs:
            self._init_seq(s)
            s.generator = torch.Generator(device="cpu")
            if s.params.seed is not None:
                s.generator.manual_seed(int(s.params.seed))
            else:
                s.generator.seed()
        if self._joinable is None:
            self._joinable = self._plain_dynamic_cache(cache)
            if not self._joinable and self.continuous:
                log.info("KV cache %s is not plain full attention: new requests wait for the running batch",
                         type(cache).__name__)
        new = _Batch(seqs=list(seqs), cache=cache, mask=mask)
        tokens = self._sample(seqs, logits)
        self._emit(seqs, tokens)
        new = self._compact(new)
        if new is None:
            return
        if self._batch is None:
            self._batch = new
        else:
            running = self._batch
            try:
                self._batch = self._merge(running, new)
            except Exception as exc:  # half-merged caches are unusable: fail both groups
                self._batch = None
                self._fail(running.seqs + new.seqs, exc)
                raise
            self.joins += 1
        self.max_running_seen = max(self.max_running_seen, len(self._batch.seqs))

    def _decode_step(self) -> None:
        batch = self._compact(self._batch)  # drop what was cancelled meanwhile
        self._batch = batch
        if batch is None:
            return
        ids = torch.tensor([[s.out_ids[-1] if not s.done else self._pad_id] for s in batch.seqs], dtype=torch.long)
        positions = torch.tensor([[s.n_cached] for s in batch.seqs], dtype=torch.long)
        mask = torch.cat([batch.mask, torch.ones((len(batch.seqs), 1), dtype=torch.long, device=batch.mask.device)],
                         dim=1)
        logits, batch.cache = self._forward(ids.to(self._device), mask, positions.to(self._device), batch.cache)
        batch.mask = mask
        self.decode_steps += 1
        for s in batch.seqs:
            s.n_cached += 1
        live = [i for i, s in enumerate(batch.seqs) if not s.done]
        seqs = [batch.seqs[i] for i in live]
        tokens = self._sample(seqs, logits[live] if len(live) != len(batch.seqs) else logits)
        self._emit(seqs, tokens)
        self._batch = self._compact(batch)

    # -- batch bookkeeping

    @staticmethod
    def _plain_dynamic_cache(cache) -> bool:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
            return False
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None and layer.keys.dim() == 4
                                    for layer in layers)

    def _compact(self, batch: _Batch | None) -> _Batch | None:
        """Drop finished / cancelled sequences from ``batch`` (None when nothing is left), trim all-pad columns."""
        if batch is None:
            return None
        for s in batch.seqs:
            if s.cancelled and not s.done:
                self._finish_cancelled(s)
        keep = [i for i, s in enumerate(batch.seqs) if not s.done]
        if not keep:
            return None
        if len(keep) != len(batch.seqs):
            idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
            try:
                batch.cache.batch_select_indices(idx)
            except (AttributeError, NotImplementedError, TypeError):
                return batch  # cannot shrink this cache: finished rows stay as masked passengers until the wave ends
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.mask = batch.mask.index_select(0, idx)
        if self._joinable:
            used = batch.mask.any(dim=0).nonzero()
            first = int(used[0]) if used.numel() else 0
            if first > 0:
                for layer in batch.cache.layers:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]
                batch.mask = batch.mask[:, first:]
        return batch

    @staticmethod
    def _merge(a: _Batch, b: _Batch) -> _Batch:
        """One batch from two (both plain DynamicCache): left-pad the shorter cache with masked zeros.

        Layer by layer, into one new tensor per K and V, dropping both sources as it goes: the merge holds at most
        one layer's K (or V) of the merged batch beyond the cache itself (the planner's ``kv_concat_transient``)."""
        width = max(a.mask.shape[1], b.mask.shape[1])

        def joined(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((x.shape[0] + y.shape[0], *x.shape[1:-2], width, x.shape[-1]))
            out[:x.shape[0], ..., width - x.shape[-2]:, :] = x
            out[x.shape[0]:, ..., width - y.shape[-2]:, :] = y
            return out

        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys = joined(la.keys, lb.keys)
            lb.keys = None
            la.values = joined(la.values, lb.values)
            lb.values = None

        def pad(t: torch.Tensor) -> torch.Tensor:
            n = width - t.shape[-1]
            return F.pad(t, [n, 0]) if n else t

        a.mask = torch.cat([pad(a.mask), pad(b.mask)], dim=0)
        a.seqs = a.seqs + b.seqs
        return a

    # -- sampling

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> list[int]:
        out = [0] * len(seqs)
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        if greedy:
            ids = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, ids):
                out[i] = int(t)
        rand = [i for i, s in enumerate(seqs) if s.params.temperature != 0]
        if rand:
            lg = logits[rand].float()
            temp = torch.tensor([seqs[i].params.temperature for i in rand], dtype=torch.float32, device=lg.device)
            probs = torch.softmax(lg / temp[:, None], dim=-1)
            sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            top_p = torch.tensor([seqs[i].params.top_p for i in rand], dtype=torch.float32, device=lg.device)
            cum = sp.cumsum(dim=-1)
            sp = sp.masked_fill((cum - sp) >= top_p[:, None], 0.0)  # nucleus; the top token always stays
            cum = sp.cumsum(dim=-1)
            u = torch.stack([torch.rand((), generator=seqs[i].generator) for i in rand]).to(lg.device)
            pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).clamp(max=cum.shape[-1] - 1)
            ids = order.gather(1, pick).squeeze(1).tolist()
            for i, t in zip(rand, ids):
                out[i] = int(t)
        return out

    # -- detokenization and delivery



# ------------------------------------------------------------------------------------------------ start-up

def start(cfg, host):
    """Load ``cfg.source`` where planner.decisions.decide_load says (GPU capped at the planned share, GPU + CPU
    offload, or CPU), stepping down to the next mode when a load fails and the deploy file allows it; give up
    (``host.give_up``) when no mode is left."""
    from planner.decisions import classify_load_failure, decide_load, next_load_decision
    from planner.errors import InfeasiblePlanError
    from serve.engines.base import Started
    from serve.engines.memory_probe import resident_bytes

    cuda, idx, total, free, why = host.cuda_state()
    try:
        decision = decide_load(
            model=cfg.name, planned_bytes=cfg.planned_bytes, weights_bytes=cfg.weights_bytes,
            cuda_available=cuda, gpu_index=idx, gpu_total_bytes=total, gpu_free_bytes=free,
            offload_cpu_bytes=cfg.offload_cpu_bytes, why_no_cuda=why or "no CUDA",
        )
    except InfeasiblePlanError as exc:  # the GPU's free memory is below plan and offload is off
        host.report_failure("gpu", "gpu_memory", str(exc), gave_up=True)
        host.give_up("gpu", "gpu_memory", str(exc))
    tried: list[str] = []
    while True:
        log.info("gpuplan replica %s: %s", cfg.name, decision.reason)
        try:
            model, tokenizer = _load(cfg, decision, idx)
            break
        except Exception as exc:  # a failed load: say why, step down if deploy.yaml allows, else back off
            kind = classify_load_failure(type(exc).__name__, str(exc))
            msg = f"{type(exc).__name__}: {str(exc)[:300]}"
            tried.append(decision.mode)
            log.error("gpuplan replica %s: loading in mode %s failed (%s): %s", cfg.name, decision.mode, kind, msg)
            _free_partial_load()
            cuda, idx, total, free, why = host.cuda_state()
            nxt = next_load_decision(
                failed=tried, failure=kind, model=cfg.name, planned_bytes=cfg.planned_bytes,
                weights_bytes=cfg.weights_bytes, cuda_available=cuda, gpu_index=idx, gpu_total_bytes=total,
                gpu_free_bytes=free, offload_cpu_bytes=cfg.offload_cpu_bytes)
            host.report_failure(decision.mode, kind, msg, gave_up=nxt is None)
            if nxt is None:
                host.give_up(decision.mode, kind, msg)
            decision = nxt
    engine = GenerationEngine(model, tokenizer, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len)
    return Started(engine, decision, resident_bytes(model))


def _load(cfg, decision, idx: int | None):
    """(model, tokenizer) loaded as ``decision`` says (GPU, GPU + CPU offload, or CPU)."""
    from serve.engines.loader import load_model

    if decision.mode in cfg.faults.get("fail", ()):  # test hook (GPUPLAN_FAULTS): this mode fails
        raise MemoryError(f"injected failure of mode {decision.mode}") if decision.mode == "cpu" \
            else RuntimeError(f"CUDA out of memory (injected failure of mode {decision.mode})")
    if decision.mode in ("gpu", "offload"):
        torch.cuda.set_per_process_memory_fraction(decision.memory_fraction, idx)
    device = "cpu" if decision.mode == "cpu" else "cuda"
    if device == "cpu":
        torch.set_num_threads(cfg.cpu_threads())
    st = cfg.settings
    return load_model(cfg.source, quantization=st.quantization, dtype=st.dtype or "bf16", device=device,
                      gpu_index=idx or 0, max_memory=decision.max_memory, trust_remote_code=cfg.trust_remote_code)


def _free_partial_load() -> None:
    import gc

    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
