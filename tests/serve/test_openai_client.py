"""The official ``openai`` Python client against the app served by uvicorn on 127.0.0.1 (no Ray, no model).

Also checks real streaming over a socket: the first delta reaches the client while the backend is still generating.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from serve.api.app import create_app
from serve.types import GenerationChunk, Overloaded, Unavailable

try:  # tests/serve is a package
    from .test_openai_api import FakeBackend, build_tokenizer, card, chat_ids, load_tokenizer
except ImportError:  # rootdir-relative imports (no __init__.py): pytest puts this folder on sys.path
    from test_openai_api import FakeBackend, build_tokenizer, card, chat_ids, load_tokenizer

API_KEY = "test-key"
USER = [{"role": "user", "content": "hello world"}]


class GatedBackend(FakeBackend):
    """FakeBackend plus a "gated" model: yields one chunk, then waits until the test says it received it."""

    def __init__(self, cards):
        super().__init__(cards)
        self.gate = threading.Event()
        self.gated_closed = 0

    async def generate(self, model, prompt_ids, params):
        if model != "gated":
            async for chunk in super().generate(model, prompt_ids, params):
                yield chunk
            return
        try:
            yield GenerationChunk(text="first", token_ids=(1,), completion_tokens=1)
            released = await asyncio.to_thread(self.gate.wait, 10)
            yield GenerationChunk(text=" released" if released else " never-released", token_ids=(2,),
                                  finish_reason="stop", completion_tokens=2)
        finally:
            self.gated_closed += 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tok = load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))
    backend = GatedBackend([card("chat", max_model_len=64), card("gated", max_model_len=64)])
    app = create_app(backend, api_key=API_KEY, tokenizers={"chat": tok, "gated": tok})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield {"base": f"http://127.0.0.1:{port}", "backend": backend, "tok": tok}
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def env(server):
    b: GatedBackend = server["backend"]
    b.calls.clear()
    b.raise_before = b.raise_after = None
    b.delay, b.delays, b.finish, b.extra_after_finish = 0.0, None, True, 0
    b.gate.clear()
    return server


@pytest.fixture
def client(env) -> OpenAI:
    c = OpenAI(base_url=env["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=20)
    yield c
    c.close()


def test_models_list(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["chat", "gated"]
    m = models.data[0]
    assert m.object == "model" and m.owned_by == "gpuplan"
    assert m.model_extra["max_model_len"] == 64 and m.model_extra["quantization"] == "int8"
    assert client.models.retrieve("chat").id == "chat"


def test_chat_completion(client, env):
    r = client.chat.completions.create(model="chat", messages=USER, max_tokens=10, temperature=0, seed=1,
                                       stop=["END"], user="someone")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "Hello world"
    assert r.choices[0].finish_reason == "stop"
    n_prompt = len(chat_ids(env["tok"], USER))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 3, n_prompt + 3)
    params = env["backend"].calls[-1][2]
    assert (params.max_tokens, params.temperature, params.seed, params.stop) == (10, 0.0, 1, ("END",))


def test_chat_completion_max_completion_tokens(client, env):
    r = client.chat.completions.create(model="chat", messages=USER, max_completion_tokens=1)
    assert r.choices[0].message.content == "Hel" and r.choices[0].finish_reason == "length"


def test_chat_stream(client, env):
    stream = client.chat.completions.create(model="chat", messages=USER, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello world"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    n_prompt = len(chat_ids(env["tok"], USER))
    assert chunks[-1].usage.prompt_tokens == n_prompt and chunks[-1].usage.total_tokens == n_prompt + 3


def test_completion(client):
    r = client.completions.create(model="chat", prompt="once upon a time", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == "Hello world" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 3
    chunks = list(client.completions.create(model="chat", prompt="once upon a time", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hello world"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_bad_request(client, env):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="chat", messages=USER, max_tokens=60)
    assert ei.value.status_code == 400
    assert ei.value.code == "context_length_exceeded"
    assert "shorten the prompt or lower max_tokens" in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="chat", messages=USER, n=3)
    assert ei.value.param == "n"
    assert env["backend"].calls == []


def test_rate_limited(client, env):
    env["backend"].raise_before = Overloaded("model 'chat' queue is full", retry_after_s=1.5)
    with pytest.raises(openai.RateLimitError) as ei:
        client.chat.completions.create(model="chat", messages=USER)
    assert ei.value.status_code == 429
    assert ei.value.response.headers["retry-after"] == "2"
    assert "queue is full" in ei.value.message
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="chat", messages=USER, stream=True)


def test_unavailable_not_found_and_auth(client, env):
    env["backend"].raise_before = Unavailable("no replica", retry_after_s=5)
    with pytest.raises(openai.InternalServerError) as ei:
        client.completions.create(model="chat", prompt="hi")
    assert ei.value.status_code == 503 and ei.value.response.headers["retry-after"] == "5"
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert "'chat'" in ei.value.message
    bad = OpenAI(base_url=env["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    bad.close()


def test_error_after_stream_started_raises_api_error(client, env):
    env["backend"].raise_after = (1, Unavailable("replica died"))
    stream = client.chat.completions.create(model="chat", messages=USER, stream=True)
    got = []
    with pytest.raises(openai.APIError) as ei:
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                got.append(c.choices[0].delta.content)
    assert got == ["Hel"]
    assert "replica died" in str(ei.value.message)


def test_stream_is_forwarded_as_generated(client, env):
    """The first delta arrives while the backend is still blocked on the gate (no buffering anywhere)."""
    stream = client.chat.completions.create(model="gated", messages=USER, stream=True)
    texts = []
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            texts.append(c.choices[0].delta.content)
            if len(texts) == 1:
                env["backend"].gate.set()
    assert texts == ["first", " released"]


def test_raw_http_sse_framing(env):
    """Byte-level framing over a real socket: each event is 'data: <json>\\n\\n', then 'data: [DONE]\\n\\n'."""
    with httpx.Client(base_url=env["base"], headers={"Authorization": f"Bearer {API_KEY}"}) as h:
        with h.stream("POST", "/v1/completions", json={"model": "chat", "prompt": "hi", "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(r.iter_bytes())
        assert raw.endswith(b"data: [DONE]\n\n")
        events = raw.split(b"\n\n")[:-1]
        assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
        assert h.get("/healthz", headers={"Authorization": ""}).json() == {"status": "ok"}


def test_client_disconnect_closes_backend_generator(env):
    """A client that goes away mid-stream stops the generation (the backend generator is closed), so an abandoned
    stream does not keep a GPU slot busy."""
    b = env["backend"]
    before = b.gated_closed
    with httpx.Client(base_url=env["base"], headers={"Authorization": f"Bearer {API_KEY}"}) as h:
        with h.stream("POST", "/v1/chat/completions",
                      json={"model": "gated", "messages": USER, "stream": True}) as r:
            for line in r.iter_lines():
                if "first" in line:
                    break
    deadline = time.monotonic() + 5
    while b.gated_closed == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert b.gated_closed == before + 1
    assert not b.gate.is_set()  # closed while still waiting, not because it was released
    b.gate.set()  # let the worker thread go
