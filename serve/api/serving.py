"""How the API answers: one object holding the backend, the tokenizers and the limits, with a method per endpoint
(the way vLLM's ``OpenAIServingChat`` / ``OpenAIServingCompletion`` hold an engine client); routes.py binds them to
paths and app.py wires the FastAPI app. A request's way: read the body (415/413/400), find the model's card,
tokenize (chat template or prompt), bound max_tokens by the context, then ``run``: generate and answer, streamed or
not, sending a request again when its replica died before the client saw anything."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Mapping

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from serve import trace
from serve.api import sse
from serve.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, ApiMetrics
from serve.api.errors import RETRY_LIMIT, ApiError, _backend_error, _short, _validation_error, error_body
from serve.api.protocol import (Backend, ChatCompletionRequest, CompletionRequest, _GenerationBody, _maybe_await,
                                _reject_constant)
from serve.api.tokenize import _encode_prompt, _render_chat, _Tokenizers
from serve.types import GenerationChunk, ModelCard, ReplicaLost, SamplingParams

log = logging.getLogger("gpuplan.api")
DEFAULT_MAX_TOKENS = 512
MAX_BODY_BYTES = 16 * 1024 * 1024
OWNED_BY = "gpuplan"


class _Tally:
    """Text, completion-token count and finish reason accumulated over the chunks of one generation."""

    def __init__(self, n_prompt: int, max_tokens: int):
        self.n_prompt = n_prompt
        self.max_tokens = max_tokens
        self.parts: list[str] = []
        self.n_ids = 0
        self.reported = 0
        self.finish: str | None = None

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        self.n_ids += len(chunk.token_ids)
        self.reported = max(self.reported, int(chunk.completion_tokens or 0))
        if chunk.finish_reason:
            self.finish = chunk.finish_reason

    @property
    def completion_tokens(self) -> int:
        return max(self.reported, self.n_ids)

    def finish_reason(self) -> str:
        # a backend that ends without saying why: "length" if it used the whole budget, else "stop"
        return self.finish or ("length" if self.completion_tokens >= self.max_tokens else "stop")

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": self.n_prompt + self.completion_tokens}


async def _aclose(it: Any) -> None:
    close = getattr(it, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:  # closing is best effort: the answer (or error) is already decided
        log.debug("closing a backend generator failed", exc_info=True)


async def _next(it: Any, timeout: float | None) -> GenerationChunk | None:
    try:
        return await asyncio.wait_for(it.__anext__(), timeout)
    except StopAsyncIteration:
        return None


# ----------------------------------------------------------------------------------------------- the app


class OpenAIServing:
    """The endpoints' logic over one ``backend`` (see serve/api/app.py for the defaults and status codes)."""

    def __init__(self, backend: Backend, *, api_key: str | None = None, tokenizers: Mapping[str, Any] | None = None,
                 default_max_tokens: int | None = DEFAULT_MAX_TOKENS, max_body_bytes: int = MAX_BODY_BYTES):
        self.backend = backend
        self.api_key = api_key
        self.tokenizers = _Tokenizers(tokenizers)
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.started_at = int(time.time())
        self.metrics = ApiMetrics()

    async def read_body(self, request: Request, model_cls: type[BaseModel]) -> Any:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json (got {ctype or 'none'!r})",
                           code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"request body is {int(length)} bytes, more than the limit of "
                                f"{self.max_body_bytes}", code="request_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > self.max_body_bytes:
                raise ApiError(413, f"request body is more than the limit of {self.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            obj = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"invalid JSON body: {exc}", code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, f"the JSON body must be an object, not {type(obj).__name__}", code="invalid_json")
        try:
            return model_cls.model_validate(obj)
        except ValidationError as exc:
            raise _validation_error(exc.errors()) from None

    def cards(self) -> dict[str, ModelCard]:
        return {c.name: c for c in self.backend.cards()}

    def find_card(self, name: str, param: str | None = "model") -> ModelCard:
        served = self.cards()
        card = served.get(name)
        if card is None:
            names = ", ".join(repr(n) for n in served) or "none"
            raise ApiError(404, f"model {name!r} does not exist; served models: {names}",
                           code="model_not_found", param=param)
        return card

    def resolve_max_tokens(self, requested: int | None, param: str, n_prompt: int, card: ModelCard,
                           where: str) -> int:
        limit = card.max_model_len
        if n_prompt >= limit:
            raise ApiError(400, f"prompt has {n_prompt} tokens, max_model_len of model {card.name!r} is {limit}: "
                                f"no room for a completion; shorten the prompt to at most {limit - 1} tokens",
                           code="context_length_exceeded", param=where)
        room = limit - n_prompt
        if requested is None:
            return room if self.default_max_tokens is None else max(1, min(room, self.default_max_tokens))
        if requested > limit:
            raise ApiError(400, f"{param} is {requested} > max_model_len {limit} of model {card.name!r}; "
                                f"with this {n_prompt}-token prompt lower {param} to at most {room}",
                           code="invalid_value", param=param)
        if n_prompt + requested > limit:
            raise ApiError(400, f"prompt has {n_prompt} tokens and {param} is {requested}, together "
                                f"{n_prompt + requested} > max_model_len {limit} of model {card.name!r}: "
                                f"shorten the prompt or lower {param} to {room}",
                           code="context_length_exceeded", param=where)
        return requested

    def sampling(self, req: _GenerationBody, max_tokens: int, trace_id: str | None = None) -> SamplingParams:
        return SamplingParams(
            trace_id=trace_id,
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(req.stop or ()),
            seed=req.seed,
            ignore_eos=bool(req.ignore_eos),
        )

    async def open_generation(self, model: str, ids: list[int], params: SamplingParams) -> Any:
        res = self.backend.generate(model, ids, params)
        res = await _maybe_await(res)
        return res.__aiter__()

    async def run(self, kind: str, req: _GenerationBody, card: ModelCard, ids: list[int], max_tokens: int,
                  trace_id: str | None = None) -> Response:
        """Generate and answer, stream or not. ``kind``: "chat" or "text"."""
        params = self.sampling(req, max_tokens, trace_id)
        timeout = card.request_timeout_s or None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        tally = _Tally(len(ids), max_tokens)
        timer = self.metrics.request(card.name)  # TTFT, inter-token latency, e2e (GET /metrics)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None

        def retry(exc: ReplicaLost, attempt: int) -> bool:
            """Try again? (a replica died before the client saw anything of the answer)"""
            if attempt > RETRY_LIMIT or (deadline is not None and loop.time() >= deadline):
                return False
            log.warning("model %r: %s; sending request %s again (try %d of %d)", card.name, exc, rid, attempt + 1,
                        RETRY_LIMIT + 1)
            return True

        if not req.stream:
            async def collect(t: _Tally) -> None:
                it = await self.open_generation(card.name, ids, params)
                try:
                    async for chunk in it:
                        before = t.completion_tokens
                        t.add(chunk)
                        timer.token(t.completion_tokens - before, time.monotonic())
                        if chunk.finish_reason:
                            break
                finally:
                    await _aclose(it)

            attempt = 0
            while True:
                tally = _Tally(len(ids), max_tokens)  # a retry starts the answer over
                left = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait_for(collect(tally), left)
                    break
                except ReplicaLost as exc:
                    attempt += 1
                    if not retry(exc, attempt):
                        raise _backend_error(exc, card.name, timeout, streaming=False) from None
                except Exception as exc:
                    raise _backend_error(exc, card.name, timeout, streaming=False) from None
            timer.done(tally.finish_reason(), time.monotonic())
            text = "".join(tally.parts)
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": tally.finish_reason()}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": tally.finish_reason()}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": card.name,
                                 "choices": [choice], "usage": tally.usage()})

        # stream: wait for the first chunk before committing to 200, so early failures keep their status code (and a
        # replica that dies before it costs nothing: the request goes again)
        attempt = 0
        while True:
            it = None
            try:
                it = await self.open_generation(card.name, ids, params)
                first = await _next(it, timeout)
                break
            except ReplicaLost as exc:
                if it is not None:
                    await _aclose(it)
                attempt += 1
                if not retry(exc, attempt):
                    raise _backend_error(exc, card.name, timeout, streaming=False) from None
            except Exception as exc:
                if it is not None:
                    await _aclose(it)
                raise _backend_error(exc, card.name, timeout, streaming=False) from None
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = self.stream_events(kind, rid, created, card.name, first, it, timeout, tally, include_usage, timer)
        return StreamingResponse(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def stream_events(self, kind: str, rid: str, created: int, model: str, first: GenerationChunk | None,
                            it: Any,
                            timeout: float | None, tally: _Tally, include_usage: bool,
                            timer=None) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            return sse.event(payload)

        def choice(text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            if kind == "chat":
                yield event([choice(role=True)])
            chunk = first
            while chunk is not None:
                before = tally.completion_tokens
                tally.add(chunk)
                if timer is not None:
                    timer.token(tally.completion_tokens - before, time.monotonic())
                if chunk.text:
                    yield event([choice(text=chunk.text)])
                if chunk.finish_reason:
                    break
                chunk = await _next(it, timeout)
            yield event([choice(finish=tally.finish_reason())])
            if timer is not None:
                timer.done(tally.finish_reason(), time.monotonic())
            if include_usage:
                yield event([], tally.usage())
        except Exception as exc:  # headers are gone: report in-band, then end the stream normally
            yield sse.event(_backend_error(exc, model, timeout, streaming=True).body())
        finally:
            await _aclose(it)
        yield sse.DONE

    async def healthz(self) -> dict:
        """Liveness: 200 while the process serves HTTP."""
        return {"status": "ok"}

    async def health(self) -> Response:
        """vLLM's probe: 200 with an empty body while the server can serve (every model has its minimum replicas
        running), else 503, so that load and eval tools built for vLLM's server wait for it."""
        try:
            ok, _ = await _maybe_await(self.backend.readiness())
        except Exception:
            ok = False
        return Response(status_code=200 if ok else 503)

    async def version(self) -> dict:
        """vLLM's /version: the server's version (gpuplan's)."""
        return {"version": _version()}

    async def prometheus(self) -> Response:
        """Prometheus text (serve/api/metrics.py): the API's request histograms, each replica's latest report and
        the scaling policy's latest decision (``backend.metrics_source()``, when it has one)."""
        replicas, scaling = [], None
        source = getattr(self.backend, "metrics_source", None)
        if source is not None:
            try:
                replicas, scaling = await _maybe_await(source())
            except Exception:
                log.warning("metrics: the replicas' reports could not be read", exc_info=True)
        return Response(self.metrics.render(replicas, scaling), media_type=METRICS_CONTENT_TYPE)

    async def readyz(self) -> Response:
        """Readiness: 200 when self.backend.readiness() is true, else 503; both carry the self.backend's detail dict."""
        try:
            ok, detail = await _maybe_await(self.backend.readiness())
        except Exception as exc:
            log.warning("readiness check failed", exc_info=True)
            ok, detail = False, {"error": f"readiness check failed: {type(exc).__name__}: {_short(exc, 200)}"}
        detail = jsonable_encoder(detail)
        ident = getattr(self.backend, "identity", None)
        extra = {"app": jsonable_encoder(ident())} if ident else {}
        if ok:
            return JSONResponse({"status": "ready", "detail": detail, **extra})
        body = error_body("not ready", "service_unavailable_error", "not_ready")
        body.update(status="not_ready", detail=detail, **extra)
        return JSONResponse(body, status_code=503)

    async def plan(self) -> Response:
        """The placement plan and what each replica reports (self.backend.plan())."""
        return JSONResponse(jsonable_encoder(await _maybe_await(self.backend.plan())))

    async def drain(self, request: Request) -> Response:
        """Start draining (`make run` calls it on SIGTERM): requests in flight finish, new ones get 503 with
        Retry-After, /readyz answers 503 with the count still in flight. With no API key set, only a client on
        this machine may ask."""
        host = (request.client.host if request.client else "") or ""
        if self.api_key is None and host not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise ApiError(403, "draining is for the server's own host (or a client with the API key)",
                           code="forbidden")
        fn = getattr(self.backend, "drain", None)
        if fn is None:
            raise ApiError(404, "this self.backend cannot drain", code="not_found")
        return JSONResponse(jsonable_encoder(await _maybe_await(fn())))

    def model_object(self, card: ModelCard) -> dict:
        obj = {"id": card.name, "object": "model", "created": self.started_at, "owned_by": OWNED_BY,
               "max_model_len": card.max_model_len, "quantization": card.quantization}
        if card.extra.get("simulated"):  # engine: sim, a test and benchmark engine: say so
            obj["simulated"] = True
        return obj

    async def list_models(self) -> dict:
        """The served models, with max_model_len and quantization."""
        return {"object": "list", "data": [self.model_object(c) for c in self.cards().values()]}

    async def get_model(self, model_id: str) -> dict:
        """One served model (404 if unknown)."""
        return self.model_object(self.find_card(model_id, param=None))

    async def chat_completions(self, request: Request) -> Response:
        """Chat completion, stream (SSE) or not."""
        req: ChatCompletionRequest = await self.read_body(request, ChatCompletionRequest)
        param, max_tokens = "max_tokens", req.max_tokens
        if req.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != req.max_completion_tokens:
                raise ApiError(400, f"max_tokens ({max_tokens}) and max_completion_tokens "
                                    f"({req.max_completion_tokens}) differ; send one of them",
                               code="invalid_value", param="max_completion_tokens")
            param, max_tokens = "max_completion_tokens", req.max_completion_tokens
        card = self.find_card(req.model)
        tok = await self.tokenizers.get(card)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = await asyncio.to_thread(_render_chat, tok, card.name, messages)
        limit = self.resolve_max_tokens(max_tokens, param, len(ids), card, "messages")
        return await self.run("chat", req, card, ids, limit, _trace_id(request))

    async def completions(self, request: Request) -> Response:
        """Text completion, stream (SSE) or not."""
        req: CompletionRequest = await self.read_body(request, CompletionRequest)
        card = self.find_card(req.model)
        tok = await self.tokenizers.get(card)
        ids = await asyncio.to_thread(_encode_prompt, tok, req.prompt)
        if not ids:
            raise ApiError(400, "prompt is empty (0 tokens)", code="invalid_value", param="prompt")
        limit = self.resolve_max_tokens(req.max_tokens, "max_tokens", len(ids), card, "prompt")
        return await self.run("text", req, card, ids, limit, _trace_id(request))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuplan")
    except PackageNotFoundError:
        return "unknown"


def _trace_id(request: Request) -> str | None:
    """The client's x-request-id while request timelines are on (serve/trace.py); None otherwise."""
    return request.headers.get("x-request-id") if trace.enabled() else None
