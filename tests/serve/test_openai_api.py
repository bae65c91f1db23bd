"""serve/api/app.py through FastAPI's TestClient: every endpoint, every error code, SSE framing, usage counts.

No Ray, no model: a FakeBackend streams canned chunks, and a tiny WordLevel tokenizer (built here with the
``tokenizers`` library, wrapped in PreTrainedTokenizerFast with a Jinja chat template) does the token counting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.api import sse
from serve.api.app import (
    DEFAULT_MAX_TOKENS,
    RETRY_LIMIT,
    Backend,
    create_app,
    error_response,
    retry_after_headers,
)
from serve.types import GenerationChunk, ModelCard, Overloaded, ReplicaLost, SamplingParams, Unavailable

# ----------------------------------------------------------------------------------------------- helpers
# (also imported by test_openai_client.py)

WORDS = ("hello world the quick brown fox jumps over lazy dog you are a helpful assistant hi "
         "tell me a story about once upon time").split()
SPECIALS = ["[UNK]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the conversation must not start with an assistant message') }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a tiny word-level tokenizer (one token per word or punctuation mark; unknown words -> [UNK]) with a
    chat template to ``directory``; return the directory (usable as ModelCard.source)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"chat_template": chat_template} if chat_template else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|end|>",
                                  additional_special_tokens=SPECIALS[1:], **kwargs)
    tok.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def chat_ids(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])


class FakeBackend:
    """Streams ``texts`` one token each (finish "stop" after the last, "length" when max_tokens is reached).

    Knobs: ``raise_before`` (raised on the first iteration, like Ray's backpressure errors), ``raise_after``
    (``(n, exc)``: raised after n chunks), ``delay`` (seconds before each chunk), ``delays`` (per-chunk list),
    ``finish`` (False: never send a finish_reason), ``extra_after_finish`` (chunks after the finishing one).
    """

    def __init__(self, cards: list[ModelCard], texts: tuple[str, ...] = ("Hel", "lo", " world")):
        self._cards = list(cards)
        self.texts = texts
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.raise_before: BaseException | None = None
        self.raise_after: tuple[int, BaseException] | None = None
        self.delay = 0.0
        self.delays: list[float] | None = None
        self.finish = True
        self.extra_after_finish = 0
        self.closed = 0
        self.ready: tuple[bool, dict] = (True, {"chat": {"running_replicas": 1}})
        self.plan_value: dict = {"gpus": [], "models": [{"name": "chat"}]}

    def cards(self) -> list[ModelCard]:
        return self._cards

    async def generate(self, model: str, prompt_ids: list[int], params: SamplingParams):
        self.calls.append((model, list(prompt_ids), params))
        try:
            if self.raise_before is not None:
                raise self.raise_before
            n = 0
            total = len(self.texts) + self.extra_after_finish
            for i in range(total):
                if self.raise_after is not None and i == self.raise_after[0]:
                    raise self.raise_after[1]
                d = self.delays[i] if self.delays and i < len(self.delays) else self.delay
                if d:
                    await asyncio.sleep(d)
                n += 1
                text = self.texts[i] if i < len(self.texts) else f"<extra{i}>"
                finish = None
                if self.finish and n >= params.max_tokens:
                    finish = "length"
                elif self.finish and i == len(self.texts) - 1:
                    finish = "stop"
                yield GenerationChunk(text=text, token_ids=(100 + i,), finish_reason=finish,
                                      prompt_tokens=len(prompt_ids), completion_tokens=n)
                if finish and not self.extra_after_finish:
                    return
                if not self.finish and n >= params.max_tokens:
                    return
        finally:
            self.closed += 1

    def readiness(self) -> tuple[bool, dict]:
        return self.ready

    def plan(self) -> dict:
        return self.plan_value


def card(name: str = "chat", source: str = "/nonexistent", max_model_len: int = 64, **kw) -> ModelCard:
    return ModelCard(name=name, source=source, max_model_len=max_model_len, quantization="int8", **kw)


def sse_events(text: str) -> list:
    """Strict parse of an OpenAI SSE body: every event is exactly ``data: <payload>\\n\\n``."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    out = []
    for b in blocks[:-1]:
        assert b.startswith("data: ") and "\n" not in b, repr(b)
        payload = b[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out == sse.parse_stream(text)
    return out


def assert_error(resp, status: int, code: str | None = None, *, contains: str | None = None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) >= {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if contains is not None:
        assert contains in err["message"], err["message"]
    return err


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend([card("chat", max_model_len=64), card("big", max_model_len=4096)])


@pytest.fixture
def make_client(tok):
    clients = []

    def make(backend, **kw) -> TestClient:
        if "tokenizers" not in kw:
            kw["tokenizers"] = {c.name: tok for c in backend.cards()}
        c = TestClient(create_app(backend, **kw))
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(make_client, backend) -> TestClient:
    return make_client(backend)


USER = [{"role": "user", "content": "hello world"}]


def chat(client, **body):
    body.setdefault("model", "chat")
    body.setdefault("messages", USER)
    return client.post("/v1/chat/completions", json=body)


def complete(client, **body):
    body.setdefault("model", "chat")
    body.setdefault("prompt", "once upon a time")
    return client.post("/v1/completions", json=body)


# ----------------------------------------------------------------------------------------------- probes, models, plan


def test_backend_protocol_and_helpers(backend):
    assert isinstance(backend, Backend)
    r = error_response(429, "slow down", "rate_limit_error", "queue_full", headers={"Retry-After": "2"})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert json.loads(r.body) == {"error": {"message": "slow down", "type": "rate_limit_error",
                                            "code": "queue_full", "param": None}}
    assert retry_after_headers(2.3) == {"Retry-After": "3"}
    assert retry_after_headers(0) == {"Retry-After": "1"}
    assert retry_after_headers(float("nan")) == {"Retry-After": "1"}


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_ready_and_not_ready(client, backend):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "detail": {"chat": {"running_replicas": 1}}}
    backend.ready = (False, {"chat": {"running_replicas": 0, "min_replicas": 1}})
    r = client.get("/readyz")
    err = assert_error(r, 503, "not_ready")
    assert r.json()["detail"] == {"chat": {"running_replicas": 0, "min_replicas": 1}}
    assert r.json()["status"] == "not_ready" and err["type"] == "service_unavailable_error"


def test_readyz_says_which_deploy_answers(make_client, backend):
    class Built(FakeBackend):
        def identity(self):
            return {"run_id": "abc123", "built_at": 1.5, "plan_id": "p1"}

    b = Built(backend.cards())
    c = make_client(b)
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["app"] == {"run_id": "abc123", "built_at": 1.5, "plan_id": "p1"}
    b.ready = (False, {})
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["app"]["run_id"] == "abc123"


def test_readyz_async_and_failing(make_client, backend):
    class AsyncReady(FakeBackend):
        async def readiness(self):
            await asyncio.sleep(0)
            return True, {"async": True}

        async def plan(self):
            return {"async_plan": 1}

    b = AsyncReady(backend.cards())
    c = make_client(b)
    assert c.get("/readyz").json() == {"status": "ready", "detail": {"async": True}}
    assert c.get("/plan").json() == {"async_plan": 1}

    class Broken(FakeBackend):
        def readiness(self):
            raise RuntimeError("serve status unreachable")

    r = make_client(Broken(backend.cards())).get("/readyz")
    assert_error(r, 503, "not_ready")
    assert "serve status unreachable" in r.json()["detail"]["error"]


def test_plan(client, backend):
    r = client.get("/plan")
    assert r.status_code == 200 and r.json() == backend.plan_value


def test_models(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat", "big"]
    m = body["data"][0]
    assert m["object"] == "model" and m["owned_by"] == "gpuplan"
    assert m["max_model_len"] == 64 and m["quantization"] == "int8" and isinstance(m["created"], int)
    r = client.get("/v1/models/big")
    assert r.status_code == 200 and r.json()["max_model_len"] == 4096
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", contains="'chat', 'big'")


def test_openapi_documents_request_fields(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    schemas = r.json()["components"]["schemas"]
    chat_props = schemas["ChatCompletionRequest"]["properties"]
    for field in ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                  "seed", "ignore_eos", "stream", "stream_options", "n", "user"):
        assert chat_props[field].get("description"), field
    for field, prop in schemas["CompletionRequest"]["properties"].items():
        assert prop.get("description"), field
    for name in ("ChatMessage", "StreamOptions", "TextPart"):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), (name, field)
    body = r.json()["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")


# ----------------------------------------------------------------------------------------------- chat


def test_chat_non_stream(client, backend, tok):
    r = chat(client, temperature=0.5, top_p=0.9, stop=["\n\n", "END"], seed=7, max_tokens=10, user="u1",
             ignore_eos=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "chat" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "Hello world"}
    assert choice["finish_reason"] == "stop"
    expected_ids = chat_ids(tok, USER)
    assert body["usage"] == {"prompt_tokens": len(expected_ids), "completion_tokens": 3,
                             "total_tokens": len(expected_ids) + 3}
    ((model, ids, params),) = backend.calls
    assert model == "chat" and ids == expected_ids
    assert params == SamplingParams(max_tokens=10, temperature=0.5, top_p=0.9, stop=("\n\n", "END"), seed=7,
                                    ignore_eos=True)
    assert backend.closed == 1


def test_chat_template_roles_and_parts(client, backend, tok):
    messages = [
        {"role": "developer", "content": "you are a helpful assistant"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": "hi", "name": "bot"},
        {"role": "user", "content": "tell me a story"},
    ]
    r = chat(client, messages=messages)
    assert r.status_code == 200, r.text
    expected = chat_ids(tok, [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "hello\nworld"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "tell me a story"},
    ])
    assert backend.calls[0][1] == expected
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_chat_defaults(client, backend, tok):
    n_prompt = len(chat_ids(tok, USER))
    assert chat(client).status_code == 200
    p = backend.calls[-1][2]
    assert (p.temperature, p.top_p, p.stop, p.seed, p.ignore_eos) == (1.0, 1.0, (), None, False)
    assert p.max_tokens == 64 - n_prompt  # whole remaining context when it is under the cap
    assert chat(client, model="big").status_code == 200
    assert backend.calls[-1][2].max_tokens == DEFAULT_MAX_TOKENS == 512
    # null values mean "default"
    assert chat(client, temperature=None, top_p=None, stop=None, seed=None, max_tokens=None, n=None,
                stream=None, stream_options=None).status_code == 200
    assert backend.calls[-1][2].temperature == 1.0
    # a single stop string is a list of one; temperature 0 (greedy) and ints for floats are fine
    assert chat(client, stop="END", temperature=0, top_p=1).status_code == 200
    assert backend.calls[-1][2].stop == ("END",) and backend.calls[-1][2].temperature == 0.0


def test_default_max_tokens_is_configurable(make_client, backend, tok):
    n_prompt = len(chat_ids(tok, USER))
    c = make_client(backend, default_max_tokens=None)
    assert chat(c, model="big").status_code == 200
    assert backend.calls[-1][2].max_tokens == 4096 - n_prompt
    c = make_client(backend, default_max_tokens=20)
    assert chat(c, model="big").status_code == 200
    assert backend.calls[-1][2].max_tokens == 20


def test_max_completion_tokens_alias(client, backend):
    assert chat(client, max_completion_tokens=2).status_code == 200
    assert backend.calls[-1][2].max_tokens == 2
    r = chat(client, max_completion_tokens=2)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["choices"][0]["message"]["content"] == "Hello"
    assert chat(client, max_completion_tokens=3, max_tokens=3).status_code == 200
    assert_error(chat(client, max_completion_tokens=3, max_tokens=4), 400, "invalid_value",
                 contains="max_completion_tokens")


def test_unknown_harmless_fields_are_ignored(client):
    r = chat(client, presence_penalty=0.5, frequency_penalty=0.1, logit_bias={"1": 2}, metadata={"a": "b"},
             store=False, parallel_tool_calls=False, service_tier="auto", tool_choice="none", tools=[],
             response_format={"type": "text"}, logprobs=False, n=1, something_new={"x": 1})
    assert r.status_code == 200, r.text


def test_chat_stream(client, backend, tok):
    r = chat(client, stream=True, max_tokens=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "chat" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert deltas == ["Hel", "lo", " world"]  # one event per backend chunk
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert backend.closed == 1


def test_chat_stream_include_usage(client, tok):
    r = chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=2)
    events = sse_events(r.text)
    chunks = events[:-1]
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    n_prompt = len(chat_ids(tok, USER))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 2, "total_tokens": n_prompt + 2}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"


def test_backend_without_finish_reason(client, backend):
    backend.finish = False
    r = chat(client, max_tokens=10)
    assert r.json()["choices"][0]["finish_reason"] == "stop"  # stream ended under budget
    r = chat(client, max_tokens=2)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    events = sse_events(chat(client, max_tokens=10, stream=True).text)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_chunks_after_finish_are_dropped_and_generator_closed(client, backend):
    backend.extra_after_finish = 3
    r = chat(client)
    assert r.json()["choices"][0]["message"]["content"] == "Hello world"
    assert r.json()["usage"]["completion_tokens"] == 3
    events = sse_events(chat(client, stream=True).text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello world"
    assert backend.closed == 2


def test_generate_as_coroutine_returning_iterator(make_client, backend):
    class CoroBackend(FakeBackend):
        async def generate(self, model, prompt_ids, params):  # noqa: D401 - coroutine, not an async generator
            await asyncio.sleep(0)
            return FakeBackend.generate(self, model, prompt_ids, params)

    c = make_client(CoroBackend(backend.cards()))
    assert chat(c).json()["choices"][0]["message"]["content"] == "Hello world"
    assert "".join(e["choices"][0]["delta"].get("content", "")
                   for e in sse_events(chat(c, stream=True).text)[:-1]) == "Hello world"


# ----------------------------------------------------------------------------------------------- completions


def test_completion_non_stream(client, backend, tok):
    r = complete(client, max_tokens=5, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "Hello world", "logprobs": None, "finish_reason": "stop"}]
    ids = list(tok("once upon a time")["input_ids"])
    assert backend.calls[-1][1] == ids
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 3, "total_tokens": len(ids) + 3}
    # a list of one prompt is the same request
    r = complete(client, prompt=["once upon a time"], max_tokens=5)
    assert r.status_code == 200 and backend.calls[-1][1] == ids


def test_completion_stream(client):
    r = complete(client, stream=True, stream_options={"include_usage": True}, max_tokens=5)
    assert r.status_code == 200
    events = sse_events(r.text)
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["Hel", "lo", " world", ""]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_completion_prompt_errors(client):
    assert_error(complete(client, prompt=["a", "b"]), 400, "invalid_value", contains="prompt")
    assert_error(complete(client, prompt=[1, 2, 3]), 400, "invalid_value", contains="token-id")
    assert_error(complete(client, prompt=""), 400, "invalid_value", contains="empty")
    assert_error(complete(client, prompt=5), 400, "invalid_value", contains="prompt")
    assert_error(complete(client, echo=True), 400, contains="echo")
    assert_error(complete(client, best_of=2), 400, contains="best_of")
    assert_error(complete(client, suffix="x"), 400, contains="suffix")
    assert_error(complete(client, logprobs=2), 400, contains="logprobs")


# ----------------------------------------------------------------------------------------------- 400s


@pytest.mark.parametrize("body,param", [
    ({"model": "chat"}, "messages"),
    ({"messages": USER}, "model"),
    ({"model": "chat", "messages": []}, "messages"),
    ({"model": "chat", "messages": USER, "temperature": 2.5}, "temperature"),
    ({"model": "chat", "messages": USER, "temperature": -1}, "temperature"),
    ({"model": "chat", "messages": USER, "temperature": "0.5"}, "temperature"),
    ({"model": "chat", "messages": USER, "top_p": 0}, "top_p"),
    ({"model": "chat", "messages": USER, "top_p": 1.5}, "top_p"),
    ({"model": "chat", "messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"model": "chat", "messages": USER, "max_tokens": 2.5}, "max_tokens"),
    ({"model": "chat", "messages": USER, "max_tokens": "10"}, "max_tokens"),
    ({"model": "chat", "messages": USER, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"model": "chat", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "chat", "messages": USER, "stop": [""]}, "stop"),
    ({"model": "chat", "messages": USER, "stop": 3}, "stop"),
    ({"model": "chat", "messages": USER, "seed": "x"}, "seed"),
    ({"model": "chat", "messages": USER, "seed": 2**70}, "seed"),
    ({"model": "chat", "messages": USER, "stream": "yes"}, "stream"),
    ({"model": "chat", "messages": USER, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": "chat", "messages": USER, "n": 2}, "n"),
    ({"model": "chat", "messages": USER, "n": 0}, "n"),
    ({"model": "chat", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": "chat", "messages": [{"role": "user"}]}, "messages.0.content"),
    ({"model": "chat", "messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"model": "chat", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ({"model": "chat", "messages": ["hello"]}, "messages.0"),
    ({"model": "chat", "messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ({"model": "chat", "messages": USER, "tool_choice": "auto"}, "tool_choice"),
    ({"model": "chat", "messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"model": "chat", "messages": USER, "logprobs": True}, "logprobs"),
    ({"model": 3, "messages": USER}, "model"),
])
def test_invalid_fields_are_400_naming_the_field(client, backend, body, param):
    r = client.post("/v1/chat/completions", json=body)
    err = assert_error(r, 400, "invalid_value")
    assert err["param"] == param
    assert param in err["message"]
    assert err["type"] == "invalid_request_error"
    assert backend.calls == []


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"model": "chat", "temperature": NaN}', "{\"a\": \"\xff\"}"
                                 .encode("latin-1")])
def test_invalid_json_is_400(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json", contains="JSON")


def test_json_not_an_object_is_400(client):
    r = client.post("/v1/chat/completions", json=[1, 2])
    assert_error(r, 400, "invalid_json", contains="object")


def test_max_tokens_over_max_model_len(client, backend, tok):
    n_prompt = len(chat_ids(tok, USER))
    err = assert_error(chat(client, max_tokens=65), 400, "invalid_value", contains="max_model_len 64")
    assert err["param"] == "max_tokens"
    assert f"at most {64 - n_prompt}" in err["message"]
    err = assert_error(chat(client, max_completion_tokens=100), 400, "invalid_value")
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens is 100" in err["message"]
    assert backend.calls == []


def test_context_budget_message(client, backend, tok):
    n_prompt = len(chat_ids(tok, USER))
    mt = 64 - n_prompt + 1
    err = assert_error(chat(client, max_tokens=mt), 400, "context_length_exceeded")
    assert err["message"] == (
        f"prompt has {n_prompt} tokens and max_tokens is {mt}, together {n_prompt + mt} > max_model_len 64 of "
        f"model 'chat': shorten the prompt or lower max_tokens to {64 - n_prompt}")
    assert err["param"] == "messages"
    assert chat(client, max_tokens=mt - 1).status_code == 200  # exactly fits


def test_prompt_alone_too_long(client, backend):
    long_prompt = " ".join(["hello"] * 64)
    err = assert_error(complete(client, prompt=long_prompt), 400, "context_length_exceeded",
                       contains="64 tokens")
    assert err["param"] == "prompt"
    err = assert_error(complete(client, prompt=" ".join(["hello"] * 60), max_tokens=10), 400,
                       "context_length_exceeded")
    assert err["message"] == ("prompt has 60 tokens and max_tokens is 10, together 70 > max_model_len 64 of "
                              "model 'chat': shorten the prompt or lower max_tokens to 4")
    assert backend.calls == []


def test_chat_template_error_is_400(client, backend):
    r = chat(client, messages=[{"role": "assistant", "content": "hi"}])
    assert_error(r, 400, "invalid_messages", contains="must not start with an assistant")
    assert backend.calls == []


def test_model_without_chat_template(make_client, backend, tmp_path):
    plain = load_tokenizer(build_tokenizer(tmp_path / "plain", chat_template=None))
    c = make_client(backend, tokenizers={"chat": plain})
    assert_error(chat(c), 400, "no_chat_template", contains="/v1/completions")
    assert complete(c).status_code == 200


# ------------------------------------------------------------------------------------------ 404, 405, 401, 413, 415


def test_unknown_model_404_lists_models(client, backend):
    err = assert_error(chat(client, model="gpt-4"), 404, "model_not_found")
    assert "'gpt-4'" in err["message"] and "'chat'" in err["message"] and "'big'" in err["message"]
    assert err["param"] == "model"
    assert_error(complete(client, model="nope"), 404, "model_not_found")
    assert backend.calls == []


def test_framework_404_405_are_openai_shaped(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found", contains="/v1/nothing")
    r = client.get("/v1/chat/completions")
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers.get("allow", "")
    assert_error(client.delete("/v1/models"), 405)


def test_auth(make_client, backend):
    c = make_client(backend, api_key="sekrit")
    # probes stay open
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                    {"Authorization": "Basic sekrit"}, {"Authorization": "Bearer "}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/plan"), ("GET", "/v1/models/chat")):
            r = c.request(method, path, headers=headers, json={"model": "chat", "messages": USER, "prompt": "hi"})
            err = assert_error(r, 401, "invalid_api_key")
            assert err["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    ok = {"Authorization": "Bearer sekrit"}
    assert c.get("/v1/models", headers=ok).status_code == 200
    assert c.get("/plan", headers={"authorization": "bearer sekrit"}).status_code == 200
    assert c.post("/v1/chat/completions", headers=ok, json={"model": "chat", "messages": USER}).status_code == 200
    assert backend.calls and len(backend.calls) == 1


def test_auth_non_ascii_key_and_empty_key(make_client, backend):
    c = make_client(backend, api_key="clé-🔑")
    assert c.get("/v1/models", headers={"Authorization": "Bearer clé-🔑".encode()}).status_code == 200
    assert_error(c.get("/v1/models", headers={"Authorization": "Bearer cle-"}), 401)
    assert make_client(backend, api_key="").get("/v1/models").status_code == 200  # "" = no key configured


def test_content_type_415(client, backend):
    body = json.dumps({"model": "chat", "messages": USER})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = client.post("/v1/chat/completions", content=body, headers=headers)
        assert_error(r, 415, "unsupported_media_type", contains="application/json")
    r = client.post("/v1/completions", content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    r = client.post("/v1/chat/completions", content=body,
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200
    assert len(backend.calls) == 1


def test_body_too_large_413(make_client, backend):
    c = make_client(backend, max_body_bytes=1000)
    r = chat(c, messages=[{"role": "user", "content": "hello " * 500}])
    assert_error(r, 413, "request_too_large")
    assert backend.calls == []


# ----------------------------------------------------------------------------------------------- backend errors


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_429_with_retry_after(client, backend, stream):
    backend.raise_before = Overloaded("model 'chat' has a full queue (64 waiting)", retry_after_s=2.3)
    r = chat(client, stream=stream)
    err = assert_error(r, 429, "model_overloaded", contains="full queue")
    assert err["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "3"
    assert r.headers["content-type"].startswith("application/json")
    assert backend.closed == 1


@pytest.mark.parametrize("stream", [False, True])
def test_unavailable_503_with_retry_after(client, backend, stream):
    backend.raise_before = Unavailable("no replica of 'chat' is running", retry_after_s=5)
    r = complete(client, stream=stream)
    assert_error(r, 503, "model_unavailable", contains="no replica")
    assert r.headers["retry-after"] == "5"


def test_overloaded_when_generate_itself_raises(make_client, backend):
    class Eager(FakeBackend):
        def generate(self, model, prompt_ids, params):  # raises at call time, before any iterator exists
            raise Overloaded("busy", retry_after_s=0.2)

    c = make_client(Eager(backend.cards()))
    r = chat(c)
    assert_error(r, 429, "model_overloaded")
    assert r.headers["retry-after"] == "1"
    assert_error(chat(c, stream=True), 429)


def test_timeout_non_stream_504(make_client, backend):
    b = FakeBackend([card("chat", request_timeout_s=0.3)])
    b.delays = [0.0, 0.2, 0.2, 0.2]  # each chunk in time, the whole generation not
    c = make_client(b)
    err = assert_error(chat(c), 504, "timeout", contains="request_timeout_s=0.3s")
    assert err["type"] == "timeout_error"
    assert b.closed == 1  # the backend generator was closed (cancelled) on timeout


def test_timeout_stream_first_chunk_504(make_client):
    b = FakeBackend([card("chat", request_timeout_s=0.2)])
    b.delays = [1.0]
    r = chat(make_client(b), stream=True)
    assert_error(r, 504, "timeout")
    assert not r.headers["content-type"].startswith("text/event-stream")


def test_timeout_stream_is_per_chunk(make_client):
    b = FakeBackend([card("chat", request_timeout_s=0.3)], texts=("a", "b", "c", "d", "e"))
    b.delays = [0.15] * 5  # 0.75 s in all, but each chunk within 0.3 s: no timeout when streaming
    c = make_client(b)
    r = chat(c, stream=True)
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "abcde"
    assert_error(chat(c), 504)  # the same generation exceeds the whole-request limit when not streamed
    # a stall mid-stream: error event in the OpenAI shape, then [DONE]
    b.delays = [0.0, 0.0, 1.0]
    events = sse_events(chat(c, stream=True).text)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == "timeout" and err["type"] == "timeout_error" and set(err) == {"message", "type", "code",
                                                                                          "param"}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == ["a", "b"]


@pytest.mark.parametrize("exc", [asyncio.TimeoutError(), TimeoutError("ray get timed out")])
def test_backend_timeout_error_is_504(client, backend, exc):
    backend.raise_before = exc
    assert_error(chat(client), 504, "timeout")


@pytest.mark.parametrize("exc,status,code", [
    (Unavailable("replica died", retry_after_s=3), 503, "model_unavailable"),
    (Overloaded("queue full"), 429, "model_overloaded"),
    (RuntimeError("CUDA error: an illegal memory access"), 500, "internal_error"),
])
def test_error_after_stream_started_is_sse_event(client, backend, exc, status, code, caplog):
    backend.raise_after = (2, exc)
    r = chat(client, stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    assert set(events[-2]) == {"error"}
    err = events[-2]["error"]
    assert err["code"] == code and set(err) == {"message", "type", "code", "param"}
    if status == 500:
        assert "CUDA" not in err["message"] and "RuntimeError" in err["message"]
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == ["Hel", "lo"]
    assert backend.closed == 1


def test_unexpected_backend_error_is_short_500(client, backend, caplog):
    backend.raise_before = KeyError("secret internal detail")
    with caplog.at_level(logging.ERROR, logger="gpuplan.api"):
        r = chat(client)
    err = assert_error(r, 500, "internal_error")
    assert err["type"] == "server_error"
    assert "secret internal detail" not in err["message"] and "KeyError" in err["message"]
    assert any(rec.exc_info for rec in caplog.records)  # traceback logged


def test_unexpected_error_outside_generation_is_500(make_client, backend):
    class BadCards(FakeBackend):
        def cards(self):
            raise RuntimeError("registry gone")

    c = make_client(BadCards([]), tokenizers={})
    assert_error(c.get("/v1/models"), 500, "internal_error")
    assert_error(chat(c), 500, "internal_error")
    assert c.get("/healthz").status_code == 200


# ----------------------------------------------------------------------------------------------- tokenizer loading


def test_tokenizers_loaded_from_card_source_and_cached(tok_dir, tok):
    b = FakeBackend([card("a", source=str(tok_dir)), card("b", source=str(tok_dir)),
                     card("broken", source="/no/such")])
    app = create_app(b)  # no injected tokenizers: AutoTokenizer.from_pretrained(card.source)
    with TestClient(app) as c:
        r = chat(c, model="a")
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == len(chat_ids(tok, USER))
        assert chat(c, model="b").status_code == 200
        assert len(app.state.tokenizers._by_source) == 1  # one load for one source
        assert b.calls[0][1] == b.calls[1][1] == chat_ids(tok, USER)
        err = assert_error(chat(c, model="broken"), 500, "tokenizer_unavailable", contains="'broken'")
        assert "/no/such" not in err["message"]


def test_prompt_ids_match_apply_chat_template_tokenize_true(client, backend, tok):
    messages = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "hi"}]
    assert chat(client, messages=messages).status_code == 200
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert backend.calls[-1][1] == list(expected)


TINY_CHAT = Path(__file__).resolve().parents[2] / "models" / "tiny-chat"


@pytest.mark.skipif(not (TINY_CHAT / "tokenizer_config.json").exists(), reason="models/tiny-chat not built")
def test_with_shipped_tiny_chat_tokenizer():
    from transformers import AutoTokenizer

    b = FakeBackend([card("tiny", source=str(TINY_CHAT), max_model_len=512)])
    with TestClient(create_app(b)) as c:
        r = chat(c, model="tiny", messages=[{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "What does json.dumps do?"}])
        assert r.status_code == 200, r.text
        assert complete(c, model="tiny", prompt="def main():").status_code == 200
    t = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    expected = t.apply_chat_template([{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "What does json.dumps do?"}],
                                     add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert b.calls[0][1] == list(expected)
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


# ----------------------------------------------------------------------------------------------- replica deaths


class DiesFirst(FakeBackend):
    """The first ``deaths`` calls lose their replica: after ``after`` chunks (or before any)."""

    def __init__(self, cards, deaths: int, after: int = 0):
        super().__init__(cards)
        self.deaths, self.after = deaths, after

    async def generate(self, model, prompt_ids, params):
        dying = len(self.calls) < self.deaths
        self.raise_after = (self.after, ReplicaLost("ActorDiedError: replica xyz died", retry_after_s=2)) \
            if dying else None
        async for chunk in super().generate(model, prompt_ids, params):
            yield chunk


def test_a_replica_death_before_the_answer_is_retried_without_the_client_noticing(make_client, backend):
    b = DiesFirst(backend.cards(), deaths=2, after=2)  # dies after 2 of 3 chunks, twice
    r = chat(make_client(b))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello world"  # the answer once, not the lost parts
    assert r.json()["usage"]["completion_tokens"] == 3
    assert len(b.calls) == 3 and b.closed == 3


def test_a_stream_whose_replica_dies_before_its_first_chunk_is_retried(make_client, backend):
    b = DiesFirst(backend.cards(), deaths=1, after=0)
    r = chat(make_client(b), stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello world"
    assert len(b.calls) == 2


@pytest.mark.parametrize("stream", [False, True])
def test_no_replica_left_to_take_it_is_503_with_retry_after_never_500(make_client, backend, stream):
    b = DiesFirst(backend.cards(), deaths=99, after=0 if stream else 1)
    r = chat(make_client(b), stream=stream)
    err = assert_error(r, 503, "replica_lost", contains="died")
    assert err["type"] == "service_unavailable_error" and r.headers["retry-after"] == "2"
    assert len(b.calls) == 1 + RETRY_LIMIT


def test_a_replica_death_mid_stream_is_an_error_event_then_done(make_client, backend):
    b = DiesFirst(backend.cards(), deaths=1, after=2)
    r = chat(make_client(b), stream=True)
    assert r.status_code == 200
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_died"
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == ["Hel", "lo"]
    assert len(b.calls) == 1  # the client has part of the answer: not sent again


def test_drain_is_asked_of_the_backend_and_needs_the_key_when_one_is_set(make_client, backend):
    class Drains(FakeBackend):
        def drain(self):
            self.drained = True
            return {"draining": True, "in_flight": 0}

    b = Drains(backend.cards())
    r = make_client(b).post("/admin/drain")
    assert r.status_code == 200 and r.json()["draining"] and b.drained
    assert make_client(backend).post("/admin/drain").status_code == 404  # a backend that cannot drain
    keyed = make_client(Drains(backend.cards()), api_key="sekrit")
    assert keyed.post("/admin/drain").status_code == 401
    assert keyed.post("/admin/drain", headers={"Authorization": "Bearer sekrit"}).status_code == 200


# ---- the probes vLLM's server answers, and /metrics


def test_health_version_and_metrics(make_client, backend):
    c = make_client(backend, api_key="k")  # the probes and /metrics need no key, as on vLLM's server
    assert c.get("/health").status_code == 200 and c.get("/health").content == b""
    assert c.get("/version").json()["version"]
    r = c.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 8}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 200
    s = c.post("/v1/completions", json={"model": "chat", "prompt": "hi", "max_tokens": 8, "stream": True},
               headers={"Authorization": "Bearer k"})
    assert s.status_code == 200
    m = c.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'vllm:time_to_first_token_seconds_count{model_name="chat"} 2.0' in text
    assert 'vllm:e2e_request_latency_seconds_count{model_name="chat"} 2.0' in text
    # three chunks ("Hel", "lo", " world"): the first token, then two intervals per request
    assert 'vllm:inter_token_latency_seconds_count{model_name="chat"} 4.0' in text
    assert 'vllm:request_success_total{finished_reason=' in text
    backend.ready = (False, {"chat": {"running_replicas": 0}})
    assert c.get("/health").status_code == 503


def test_metrics_render_the_replicas_and_the_policy():
    from serve.api.metrics import ApiMetrics

    rows = [{"model": "chat", "deployment": "chat@n0", "replica_id": "r1", "planned_bytes": 1024,
             "resident_weight_bytes": 512, "stats": {"running": 3, "waiting": 1, "kv_cache_usage": 0.25,
                                                     "generated_tokens": 99}}]
    scaling = {"models": [{"model": "chat", "load": 4.0, "want": 2, "goal": 2, "placed": 1, "why": "x"}]}
    text = ApiMetrics().render(rows, scaling).decode()
    labels = 'model_name="chat",deployment="chat@n0",replica="r1"'
    for line in (f"vllm:num_requests_running{{{labels}}} 3.0", f"vllm:num_requests_waiting{{{labels}}} 1.0",
                 f"vllm:kv_cache_usage_perc{{{labels}}} 0.25", f"gpuplan:planned_bytes{{{labels}}} 1024.0",
                 f"gpuplan:resident_weight_bytes{{{labels}}} 512.0",
                 f"gpuplan:generation_tokens_total{{{labels}}} 99.0",
                 'gpuplan:scaling_goal{model_name="chat"} 2.0', 'gpuplan:scaling_load{model_name="chat"} 4.0'):
        assert line in text, line
    assert "# TYPE vllm:num_requests_running gauge" in text
