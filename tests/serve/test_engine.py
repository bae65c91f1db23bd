"""serve/engines/batching.py on a random tiny llama (fp32 on CPU, so batched and single-sequence math agree): batched greedy ==
model.generate one at a time, streaming, stop strings, max_tokens, seeds, batching efficiency, continuous joining,
cancellation, validation and shutdown. No Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from serve.engines.batching import EngineClosed  # noqa: E402
from serve.engines.transformers import GenerationEngine  # noqa: E402
from serve.engines.loader import load_model  # noqa: E402
from serve.types import SamplingParams  # noqa: E402

EOS = 1  # benchmarks.common.calibration's tiny configs
PROMPTS = ["hello world", "def f(x):\n    return x", "The quick brown fox jumps over the lazy dog, and then", "a",
           "import json\n\nclass Encoder:", "héllo wörld ✓"]


@pytest.fixture(scope="module")
def fp32(tiny_llama_dir):
    return load_model(tiny_llama_dir, quantization="fp32")


@pytest.fixture
def make_engine(fp32):
    engines = []

    def make(**kw) -> GenerationEngine:
        model, tok = fp32
        kw.setdefault("max_num_seqs", 8)
        kw.setdefault("max_model_len", 256)
        eng = GenerationEngine(model, tok, **kw)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.shutdown(timeout=10)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


async def collect(eng: GenerationEngine, prompt_ids: list[int], params: SamplingParams, delay: float = 0.0):
    await asyncio.sleep(delay)
    chunks = [c async for c in eng.generate(prompt_ids, params)]
    return chunks


def ids_of(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def reference(model, prompt_ids: list[int], n: int) -> list[int]:
    """model.generate alone, greedy, cut after the first EOS (the engine stops there)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(prompt_ids):].tolist()
    return ref[:ref.index(EOS) + 1] if EOS in ref else ref


def test_batched_greedy_equals_generate_one_at_a_time(fp32, make_engine):
    model, tok = fp32
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 3  # different lengths: left padding is exercised
    n = 12
    refs = [reference(model, p, n) for p in prompts]

    async def main():
        eng = make_engine(max_num_seqs=len(prompts), batch_wait_s=1.0)  # the wave starts once all have arrived
        together = await asyncio.gather(*[collect(eng, p, greedy(n)) for p in prompts])
        assert eng.stats()["prefill_passes"] == 1  # all in one wave
        eng = make_engine()  # default batch_wait_s: later arrivals join the running batch
        staggered = await asyncio.gather(*[collect(eng, p, greedy(n), delay=0.015 * i) for i, p in enumerate(prompts)])
        return together, staggered, eng.stats()

    together, staggered, stats = asyncio.run(main())
    for ref, a, b in zip(refs, together, staggered):
        assert ids_of(a) == ref
        assert ids_of(b) == ref
        assert a[-1].finish_reason == ("stop" if ref[-1] == EOS else "length")
    assert stats["joins"] >= 1  # later arrivals joined a running batch (continuous batching) and still match


def test_bf16_engine_runs(tiny_llama_dir):
    model, tok = load_model(tiny_llama_dir, quantization="bf16")
    eng = GenerationEngine(model, tok, max_num_seqs=4, max_model_len=64)

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[collect(eng, tok.encode(p), greedy(6)) for p in PROMPTS[:4]]), 60)

    try:
        outs = asyncio.run(main())
    finally:
        eng.shutdown(timeout=10)
    assert all(o[-1].finish_reason in ("stop", "length") and o[-1].completion_tokens == len(ids_of(o)) for o in outs)


def test_streaming_chunks_concatenate_to_the_text(fp32, make_engine):
    model, tok = fp32
    eng = make_engine()
    prompt = tok.encode("hello world")
    assert EOS not in reference(model, prompt, 16)
    chunks = asyncio.run(collect(eng, prompt, greedy(16)))
    assert len(chunks) > 1
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 16 and last.prompt_tokens == len(prompt)
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    ids = ids_of(chunks)
    assert len(ids) == 16
    assert "".join(c.text for c in chunks) == tok.decode(ids)


def test_streaming_many_random_generations_decode_exactly(fp32, make_engine):
    """Sampled byte-level tokens split multi-byte characters all the time: the incremental detokenizer must still
    produce exactly tokenizer.decode of the completion (special tokens such as a sampled <s> are skipped)."""
    model, tok = fp32
    eng = make_engine()

    async def main():
        return await asyncio.gather(*[collect(eng, tok.encode(PROMPTS[i % len(PROMPTS)]),
                                              SamplingParams(max_tokens=24, temperature=1.5, seed=i))
                                      for i in range(8)])

    for chunks in asyncio.run(main()):
        ids = [t for t in ids_of(chunks) if t != EOS]
        assert "".join(c.text for c in chunks) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_the_text(fp32, make_engine):
    model, tok = fp32
    eng = make_engine()
    prompt = tok.encode("hello world")
    full = asyncio.run(collect(eng, prompt, greedy(16)))
    text = "".join(c.text for c in full)
    # a stop string that starts a few characters in (and holds no replacement character)
    i = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[i:i + 2]
    cut = text.find(stop)
    chunks = asyncio.run(collect(eng, prompt, greedy(16, stop=("never-there", stop))))
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == text[:cut]
    assert chunks[-1].completion_tokens < 16 or cut + len(stop) >= len(text) - 1


def test_max_tokens_gives_length_and_eos_gives_stop(fp32, make_engine):
    model, tok = fp32
    eng = make_engine()
    prompt = tok.encode("hello world")
    chunks = asyncio.run(collect(eng, prompt, greedy(5)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    # an EOS: force it by making EOS the most likely token through the engine's EOS set
    eos_eng = make_engine()
    first = ids_of(chunks)[0]
    eos_eng._eos_ids = frozenset({first})
    chunks = asyncio.run(collect(eos_eng, prompt, greedy(5)))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 1
    assert "".join(c.text for c in chunks) == ""
    # ignore_eos (vLLM's extension): the same EOS does not end it; max_tokens does
    chunks = asyncio.run(collect(eos_eng, prompt, greedy(5, ignore_eos=True)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 5
    assert ids_of(chunks)[0] == first


def test_seed_reproducible_whatever_the_batch(fp32, make_engine):
    _, tok = fp32
    eng = make_engine()
    prompt = tok.encode("hello world")
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)

    async def main():
        alone = await collect(eng, prompt, params)
        crowd = await asyncio.gather(collect(eng, prompt, params),
                                     *[collect(eng, tok.encode(p), SamplingParams(max_tokens=16, seed=i))
                                       for i, p in enumerate(PROMPTS[1:5])],
                                     collect(eng, prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=99)))
        return alone, crowd

    alone, crowd = asyncio.run(main())
    assert ids_of(alone) == ids_of(crowd[0])
    assert "".join(c.text for c in alone) == "".join(c.text for c in crowd[0])
    assert ids_of(crowd[-1]) != ids_of(alone)  # another seed, another sample (random model, 16 tokens)


def test_eight_concurrent_requests_share_forward_passes(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=8)
    eng._eos_ids = frozenset()  # every request runs its full 16 tokens
    n = 16

    async def main():
        return await asyncio.gather(*[collect(eng, tok.encode(PROMPTS[i % len(PROMPTS)] + str(i)), greedy(n))
                                      for i in range(8)])

    outs = asyncio.run(main())
    assert all(o[-1].finish_reason == "length" and o[-1].completion_tokens == n for o in outs)
    s = eng.stats()
    assert s["completed"] == 8 and s["running"] == 0 and s["waiting"] == 0
    assert s["generated_tokens"] == 8 * n
    one_at_a_time = 8 * n  # 1 prefill + n - 1 decode steps per request
    assert s["forward_passes"] <= n + 8 < one_at_a_time
    assert s["max_running_seen"] <= 8


def test_never_more_than_max_num_seqs(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=2)
    eng._eos_ids = frozenset()

    async def main():
        return await asyncio.gather(*[collect(eng, tok.encode(p), greedy(6), delay=0.002 * i)
                                      for i, p in enumerate(PROMPTS[:5])])

    outs = asyncio.run(main())
    assert all(o[-1].completion_tokens == 6 for o in outs)
    assert eng.stats()["max_running_seen"] == 2


def test_new_request_joins_instead_of_waiting_for_a_long_one(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=4)
    eng._eos_ids = frozenset()

    async def main():
        long_done = asyncio.Event()

        async def long():
            out = await collect(eng, tok.encode("hello world"), greedy(200))
            long_done.set()
            return out

        t = asyncio.create_task(long())
        await asyncio.sleep(0.05)
        assert not long_done.is_set()
        short = await collect(eng, tok.encode("a"), greedy(3))
        finished_first = not long_done.is_set()
        await t
        return short, finished_first

    short, finished_first = asyncio.run(main())
    assert short[-1].completion_tokens == 3
    assert finished_first
    assert eng.stats()["joins"] >= 1


def test_cancellation_frees_the_slot(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=1)
    eng._eos_ids = frozenset()

    async def main():
        agen = eng.generate(tok.encode("hello world"), greedy(200))
        got = [await agen.__anext__() for _ in range(2)]
        await agen.aclose()  # the client went away
        # the only slot is given back: a new request runs to the end
        other = await asyncio.wait_for(collect(eng, tok.encode("a"), greedy(4)), 30)
        return got, other

    got, other = asyncio.run(main())
    assert len(got) == 2 and other[-1].completion_tokens == 4
    s = eng.stats()
    assert s["cancelled"] == 1 and s["completed"] == 1 and s["running"] == 0
    assert s["generated_tokens"] < 200


def test_cancelled_consumer_task_is_dropped(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=2)
    eng._eos_ids = frozenset()

    async def main():
        task = asyncio.create_task(collect(eng, tok.encode("hello world"), greedy(200)))
        while eng.stats()["generated_tokens"] < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(400):
            if eng.stats()["running"] == 0:
                break
            await asyncio.sleep(0.005)

    asyncio.run(main())
    s = eng.stats()
    assert s["running"] == 0 and s["cancelled"] == 1 and s["generated_tokens"] < 200


def test_validation(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.generate(list(range(3, 23)), greedy(13))  # 20 + 13 > 32: refused at the call
    with pytest.raises(ValueError, match="empty"):
        eng.generate([], greedy(4))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate([5], greedy(0))
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([5, 512], greedy(2))
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([5], SamplingParams(max_tokens=2, top_p=0.0))
    chunks = asyncio.run(collect(eng, list(range(3, 23)), greedy(12)))  # exactly max_model_len is fine
    assert chunks[-1].finish_reason in ("stop", "length")


def test_stats_and_close(fp32, make_engine):
    _, tok = fp32
    eng = make_engine()
    s = eng.stats()
    for key in ("waiting", "running", "completed", "generated_tokens", "tokens_per_s", "prompt_tokens"):
        assert key in s
    prompt = tok.encode("hello world")

    async def main():
        await collect(eng, prompt, greedy(4))
        s = eng.stats()
        assert s["prompt_tokens"] == len(prompt) and s["tokens_per_s"] > 0
        await eng.close()
        with pytest.raises(EngineClosed):
            eng.generate(prompt, greedy(4))

    asyncio.run(main())
    assert not eng._thread.is_alive()


def test_close_fails_queued_requests(fp32, make_engine):
    _, tok = fp32
    eng = make_engine(max_num_seqs=1)
    eng._eos_ids = frozenset()

    async def main():
        running = asyncio.create_task(collect(eng, tok.encode("hello world"), greedy(200)))
        queued = asyncio.create_task(collect(eng, tok.encode("a"), greedy(200)))
        while eng.stats()["generated_tokens"] < 2:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        await eng.close()
        assert time.monotonic() - t0 < 10
        for task in (running, queued):
            with pytest.raises(EngineClosed):
                await task

    asyncio.run(main())


def test_waves_when_joining_is_off(fp32, make_engine):
    model, tok = fp32
    eng = make_engine(max_num_seqs=4, continuous=False)
    eng._eos_ids = frozenset()

    async def main():
        order = []

        async def run(name, prompt, n, delay):
            out = await collect(eng, tok.encode(prompt), greedy(n), delay=delay)
            order.append(name)
            return out

        return await asyncio.gather(run("long", "hello world", 60, 0), run("short", "a", 2, 0.03)), order

    (long, short), order = asyncio.run(main())
    assert order == ["long", "short"]  # the newcomer waited for the running wave
    assert eng.stats()["joins"] == 0 and eng.stats()["prefill_passes"] == 2
    with torch.inference_mode():
        ref = model.generate(torch.tensor([tok.encode("a")]), max_new_tokens=2, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 1:].tolist()
    assert ids_of(short) == ref


def test_sliding_window_model_runs_in_waves_and_matches_generate(tmp_path, tiny_llama_save_tokenizer):
    """mistral's sliding-window cache layers cannot be merged: the engine falls back to waves, still exact."""
    import transformers

    from benchmarks.common.calibration import save_random_model

    model_dir, _ = save_random_model("mistral", str(tmp_path))  # sliding_window=64
    tiny_llama_save_tokenizer(model_dir)
    model, tok = load_model(model_dir, quantization="fp32")
    assert isinstance(model, transformers.MistralForCausalLM)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    n = 70  # past the window
    refs = [reference(model, p, n) for p in prompts]
    eng = GenerationEngine(model, tok, max_num_seqs=4, max_model_len=256)
    try:
        async def main():
            return await asyncio.gather(*[collect(eng, p, greedy(n), delay=0.01 * i) for i, p in enumerate(prompts)])

        outs = asyncio.run(main())
        stats = eng.stats()
    finally:
        eng.shutdown(timeout=10)
    assert [ids_of(o) for o in outs] == refs
    assert stats["joins"] == 0 and not stats["continuous_batching"]


def test_prefill_passes_stay_within_the_token_budget(fp32, make_engine):
    """The planner sizes activations for one prefill chunk of max_num_batched_tokens; the engine splits newcomers
    so that no prefill pass (padded) holds more, and the output is still exactly greedy."""
    model, tok = fp32
    prompts = [tok.encode(p * 6) for p in PROMPTS]  # several tens of tokens each
    budget = max(len(p) for p in prompts) + 8  # the longest prompt alone, a few short ones together
    n = 6
    refs = [reference(model, p, n) for p in prompts]
    seen = []

    async def main():
        eng = make_engine(max_num_seqs=len(prompts), batch_wait_s=1.0, max_num_batched_tokens=budget)
        orig = eng._forward

        def spy(ids, mask, positions, cache):
            if cache is None:  # a prefill pass
                seen.append(ids.numel())
            return orig(ids, mask, positions, cache)

        eng._forward = spy
        return await asyncio.gather(*[collect(eng, p, greedy(n)) for p in prompts])

    outs = asyncio.run(main())
    assert len(seen) >= 3 and max(seen) <= budget, seen
    for ref, out in zip(refs, outs):
        assert ids_of(out) == ref


def test_coalesce_with_a_fake_clock():
    from serve.engines.batching import coalesce
    from serve.types import GenerationChunk

    t = {"now": 0.0}
    steps = [(0.00, "a"), (0.02, "b"), (0.05, "c"), (0.11, "d"), (0.15, "e"), (0.16, "f")]

    async def source():
        for i, (at, text) in enumerate(steps):
            t["now"] = at
            last = i == len(steps) - 1
            yield GenerationChunk(text=text, token_ids=(i,), finish_reason="stop" if last else None,
                                  prompt_tokens=3, completion_tokens=i + 1)

    async def main():
        return [c async for c in coalesce(source(), 0.1, clock=lambda: t["now"])]

    out = asyncio.run(main())
    # first at once; then held until 0.1 s after the last send (0.11: "bcd"); the final chunk is never held
    assert [c.text for c in out] == ["a", "bcd", "ef"]
    assert out[1].token_ids == (1, 2, 3) and out[-1].finish_reason == "stop" and out[-1].completion_tokens == 6
    assert [c.text for c in asyncio.run(_all(coalesce(source(), 0.0, clock=lambda: t["now"])))] == list("abcdef")
    # a first step without text (vLLM's first delta can be empty) neither goes out alone nor starts the interval:
    # the first text goes out at once
    steps[:1] = [(0.00, ""), (0.01, "a")]
    out = asyncio.run(_all(coalesce(source(), 0.1, clock=lambda: t["now"])))
    assert [c.text for c in out] == ["a", "bcd", "ef"] and out[0].token_ids == (0, 1)


async def _all(agen):
    return [c async for c in agen]


def test_health_check_fails_only_when_the_worker_died(make_engine):
    from serve.engines.base import Engine

    eng = make_engine()
    assert isinstance(eng, Engine) and eng.name == "transformers"
    eng.check_health()  # running
    assert eng.report()["given"] == {"max_num_seqs": 8, "max_model_len": 256}
    eng.shutdown(timeout=10)
    eng.check_health()  # stopped on purpose: not a failure
    eng._stop = False  # a worker that is gone without being told to stop
    with pytest.raises(RuntimeError, match="generation thread has stopped"):
        eng.check_health()


def test_merge_pads_left_and_releases_the_joining_cache():
    """_merge gives the left-padded concatenation of both caches and drops the joining batch's tensors layer by layer
    (so a merge holds one layer of the merged batch beyond the cache, as the planner's kv_concat_transient says)."""
    from transformers.cache_utils import DynamicCache

    from serve.engines.transformers import _Batch

    def batch(n, width, seed):
        g = torch.Generator().manual_seed(seed)
        cache = DynamicCache()
        for layer in range(2):
            cache.update(torch.randn(n, 2, width, 4, generator=g), torch.randn(n, 2, width, 4, generator=g), layer)
        return _Batch(seqs=[object()] * n, cache=cache, mask=torch.ones((n, width), dtype=torch.long))

    a, b = batch(3, 5, 0), batch(1, 8, 1)
    want = [(torch.cat([torch.nn.functional.pad(la.keys, [0, 0, 3, 0]), lb.keys]),
             torch.cat([torch.nn.functional.pad(la.values, [0, 0, 3, 0]), lb.values]))
            for la, lb in zip(a.cache.layers, b.cache.layers)]
    m = GenerationEngine._merge(a, b)
    for layer, (k, v) in zip(m.cache.layers, want):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert all(layer.keys is None and layer.values is None for layer in b.cache.layers)
    assert m.mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]] * 3 + [[1] * 8]
    assert len(m.seqs) == 4
