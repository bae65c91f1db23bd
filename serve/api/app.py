"""OpenAI-compatible HTTP API (FastAPI) in front of a ``Backend`` object; no Ray here.

The Ray glue (``serve/app/build.py``) builds this app with ``create_app(ingress, api_key=...)`` and wraps it as the
ingress deployment; tests build it around a fake backend. The API owns tokenization: it loads each model's tokenizer
(``AutoTokenizer.from_pretrained(card.source)``, cached), applies the chat template, counts prompt tokens, checks
the context budget, and sends token ids to ``backend.generate``.

Endpoints::

    GET  /v1/models, /v1/models/{id}   models from backend.cards()
    POST /v1/chat/completions          chat (stream or not)
    POST /v1/completions               plain prompt (stream or not)
    GET  /healthz                      liveness: always 200 {"status": "ok"}
    GET  /readyz                       200 if backend.readiness() says ready, else 503 (with the detail dict and
                                       ``app``: backend.identity(), which deploy answers)
    GET  /plan                         backend.plan()
    POST /admin/drain                  backend.drain(): finish what is in flight, 503 for new requests

Every error is in the OpenAI shape ``{"error": {"message", "type", "code", "param"}}`` (FastAPI's own 404/405/422
and unexpected exceptions included). Status codes: 400 bad body or values, context too long; 401 bad or missing
bearer key (when ``api_key`` is set; /healthz and /readyz are open); 404 unknown model or route; 405; 413 body over
``max_body_bytes``; 415 Content-Type not application/json; 429 ``Overloaded`` (+ Retry-After); 503 ``Unavailable``
(+ Retry-After), or ``ReplicaLost`` on every try; 504 no answer within ``ModelCard.request_timeout_s``; 500 unexpected
backend failure (traceback logged, short message returned).

A replica that dies (``ReplicaLost``) before anything of its answer reached the client -- a request without
streaming at any point, a stream before its first chunk -- costs the client nothing: the request is sent again, up
to ``RETRY_LIMIT`` more times within its deadline (the backend routes it to another replica). Mid-stream, the
client gets an error event with code ``replica_died``, then ``[DONE]``.

Defaults chosen here:

* ``max_tokens`` omitted -> ``min(max_model_len - prompt_tokens, default_max_tokens)``; ``default_max_tokens`` is
  ``DEFAULT_MAX_TOKENS`` = 512 unless ``create_app(default_max_tokens=...)`` says otherwise (``None`` = no cap).
  A client that wants a longer answer asks for it explicitly, so one careless request cannot hold a GPU slot for a
  whole context window.
* ``temperature`` 1.0 and ``top_p`` 1.0 when omitted (OpenAI's defaults); ``temperature`` 0 means greedy.
* Streaming waits for the backend's first chunk before sending the 200 headers, so queue-full / no-replica /
  timeout before the first token still get a real 429 / 503 / 504 status; later failures become an SSE error
  event followed by ``[DONE]``.
* Timeouts: non-stream, one ``asyncio.wait_for`` around the whole generation; stream, the same limit per chunk
  (including the first).
* Harmless OpenAI fields we do not implement (``user``, ``presence_penalty``, ``frequency_penalty``,
  ``logit_bias``, ``metadata``, ``store``, ``parallel_tool_calls``, ...) are ignored. Fields that would change the
  shape of the answer if silently ignored (``n`` != 1, ``tools``/``functions``, ``tool_choice`` other than "none",
  ``response_format`` other than text, ``logprobs``, ``echo``, ``best_of`` > 1, ``suffix``) are a 400.
* Message roles: system, developer (sent to the template as "system"), user, assistant; content is a string or a
  list of ``{"type": "text", "text": ...}`` parts, joined with "\\n".
* Completions prompts are tokenized with the tokenizer's special tokens (BOS where the model uses one); chat prompts
  are the rendered template tokenized without adding special tokens (the template writes them), which is what
  ``apply_chat_template(tokenize=True)`` does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import trace
from serve.api import sse
from serve.types import GenerationChunk, ModelCard, ReplicaLost, SamplingParams

from serve.api.errors import (_TYPE_BY_STATUS, RETRY_LIMIT, ApiError, _backend_error, _short,  # noqa: F401
                               _validation_error, error_body, error_response, retry_after_headers)
from serve.api.protocol import (MAX_STOP_SEQUENCES, Backend, ChatCompletionRequest, ChatMessage,  # noqa: F401
                                CompletionRequest, StreamOptions, TextPart, _GenerationBody, _maybe_await,
                                _reject_constant)
from serve.api.tokenize import _encode_prompt, _render_chat, _Tokenizers

log = logging.getLogger("gpuplan.api")

DEFAULT_MAX_TOKENS = 512
MAX_BODY_BYTES = 16 * 1024 * 1024
OWNED_BY = "gpuplan"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})  # no bearer key needed (probes)

# ----------------------------------------------------------------------------------------------- generation


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


class _Guard:
    """Pure ASGI middleware: bearer-key check (except PUBLIC_PATHS) and a last-resort OpenAI-shaped 500."""

    def __init__(self, app: Any, api_key: str | None):
        self.app = app
        self.api_key = api_key or None
        self._key = api_key.encode("utf-8") if api_key else b""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST":
            trace.mark("api.request")
        if self.api_key is not None and _route_path(scope) not in PUBLIC_PATHS and not self._authorized(scope):
            resp = error_response(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                                  "authentication_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await error_response(500, "internal server error; see the server log", "server_error",
                                 "internal_error")(scope, receive, send)

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


def _route_path(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def create_app(
    backend: Backend,
    *,
    api_key: str | None = None,
    tokenizers: Mapping[str, Any] | None = None,
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible FastAPI app around ``backend`` (see the module docstring).

    ``api_key``: when set (non-empty), every endpoint except /healthz and /readyz needs
    ``Authorization: Bearer <api_key>``; None or "" turns the check off.
    ``tokenizers``: model name -> tokenizer, to skip ``AutoTokenizer.from_pretrained(card.source)``.
    ``default_max_tokens``: cap on the max_tokens default when a request omits it (None: the whole remaining
    context). ``max_body_bytes``: larger request bodies get 413.
    """
    app = FastAPI(title="gpuplan OpenAI-compatible API", version="1")
    toks = _Tokenizers(tokenizers)
    app.state.backend = backend
    app.state.tokenizers = toks
    started_at = int(time.time())

    # ---- error shaping (FastAPI's own errors too)
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        status = exc.status_code
        if status == 404:
            msg, code = f"no route {request.method} {request.url.path}", "not_found"
        elif status == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return error_response(status, msg, _TYPE_BY_STATUS.get(status, "invalid_request_error"), code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error; see the server log", "server_error", "internal_error")

    app.add_middleware(_Guard, api_key=api_key)

    # ---- helpers bound to this app
    async def read_body(request: Request, model_cls: type[BaseModel]) -> Any:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, f"Content-Type must be application/json (got {ctype or 'none'!r})",
                           code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise ApiError(413, f"request body is {int(length)} bytes, more than the limit of {max_body_bytes}",
                           code="request_too_large")
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > max_body_bytes:
                raise ApiError(413, f"request body is more than the limit of {max_body_bytes} bytes",
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

    def cards() -> dict[str, ModelCard]:
        return {c.name: c for c in backend.cards()}

    def find_card(name: str, param: str | None = "model") -> ModelCard:
        served = cards()
        card = served.get(name)
        if card is None:
            names = ", ".join(repr(n) for n in served) or "none"
            raise ApiError(404, f"model {name!r} does not exist; served models: {names}",
                           code="model_not_found", param=param)
        return card

    def resolve_max_tokens(requested: int | None, param: str, n_prompt: int, card: ModelCard, where: str) -> int:
        limit = card.max_model_len
        if n_prompt >= limit:
            raise ApiError(400, f"prompt has {n_prompt} tokens, max_model_len of model {card.name!r} is {limit}: "
                                f"no room for a completion; shorten the prompt to at most {limit - 1} tokens",
                           code="context_length_exceeded", param=where)
        room = limit - n_prompt
        if requested is None:
            return room if default_max_tokens is None else max(1, min(room, default_max_tokens))
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

    def sampling(req: _GenerationBody, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p),
            stop=tuple(req.stop or ()),
            seed=req.seed,
            ignore_eos=bool(req.ignore_eos),
        )

    async def open_generation(model: str, ids: list[int], params: SamplingParams) -> Any:
        res = backend.generate(model, ids, params)
        res = await _maybe_await(res)
        return res.__aiter__()

    async def run(kind: str, req: _GenerationBody, card: ModelCard, ids: list[int], max_tokens: int) -> Response:
        """Generate and answer, stream or not. ``kind``: "chat" or "text"."""
        params = sampling(req, max_tokens)
        timeout = card.request_timeout_s or None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        tally = _Tally(len(ids), max_tokens)

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
                it = await open_generation(card.name, ids, params)
                try:
                    async for chunk in it:
                        t.add(chunk)
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
                it = await open_generation(card.name, ids, params)
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
        body = stream_events(kind, rid, created, card.name, first, it, timeout, tally, include_usage)
        return StreamingResponse(body, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    async def stream_events(kind: str, rid: str, created: int, model: str, first: GenerationChunk | None, it: Any,
                            timeout: float | None, tally: _Tally, include_usage: bool) -> AsyncIterator[bytes]:
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
                tally.add(chunk)
                if chunk.text:
                    yield event([choice(text=chunk.text)])
                if chunk.finish_reason:
                    break
                chunk = await _next(it, timeout)
            yield event([choice(finish=tally.finish_reason())])
            if include_usage:
                yield event([], tally.usage())
        except Exception as exc:  # headers are gone: report in-band, then end the stream normally
            yield sse.event(_backend_error(exc, model, timeout, streaming=True).body())
        finally:
            await _aclose(it)
        yield sse.DONE

    def body_schema(model_cls: type[BaseModel]) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model_cls.__name__}"}}}}}

    # ---- routes
    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict:
        """Liveness: 200 while the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"])
    async def readyz() -> Response:
        """Readiness: 200 when backend.readiness() is true, else 503; both carry the backend's detail dict."""
        try:
            ok, detail = await _maybe_await(backend.readiness())
        except Exception as exc:
            log.warning("readiness check failed", exc_info=True)
            ok, detail = False, {"error": f"readiness check failed: {type(exc).__name__}: {_short(exc, 200)}"}
        detail = jsonable_encoder(detail)
        ident = getattr(backend, "identity", None)
        extra = {"app": jsonable_encoder(ident())} if ident else {}
        if ok:
            return JSONResponse({"status": "ready", "detail": detail, **extra})
        body = error_body("not ready", "service_unavailable_error", "not_ready")
        body.update(status="not_ready", detail=detail, **extra)
        return JSONResponse(body, status_code=503)

    @app.get("/plan", tags=["gpuplan"])
    async def plan() -> Response:
        """The placement plan and what each replica reports (backend.plan())."""
        return JSONResponse(jsonable_encoder(await _maybe_await(backend.plan())))

    @app.post("/admin/drain", tags=["gpuplan"])
    async def drain(request: Request) -> Response:
        """Start draining (`make run` calls it on SIGTERM): requests in flight finish, new ones get 503 with
        Retry-After, /readyz answers 503 with the count still in flight. With no API key set, only a client on
        this machine may ask."""
        host = (request.client.host if request.client else "") or ""
        if api_key is None and host not in ("127.0.0.1", "::1", "localhost", "testclient"):
            raise ApiError(403, "draining is for the server's own host (or a client with the API key)",
                           code="forbidden")
        fn = getattr(backend, "drain", None)
        if fn is None:
            raise ApiError(404, "this backend cannot drain", code="not_found")
        return JSONResponse(jsonable_encoder(await _maybe_await(fn())))

    def model_object(card: ModelCard) -> dict:
        return {"id": card.name, "object": "model", "created": started_at, "owned_by": OWNED_BY,
                "max_model_len": card.max_model_len, "quantization": card.quantization}

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> dict:
        """The served models, with max_model_len and quantization."""
        return {"object": "list", "data": [model_object(c) for c in cards().values()]}

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str) -> dict:
        """One served model (404 if unknown)."""
        return model_object(find_card(model_id, param=None))

    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        """Chat completion, stream (SSE) or not."""
        req: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
        param, max_tokens = "max_tokens", req.max_tokens
        if req.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != req.max_completion_tokens:
                raise ApiError(400, f"max_tokens ({max_tokens}) and max_completion_tokens "
                                    f"({req.max_completion_tokens}) differ; send one of them",
                               code="invalid_value", param="max_completion_tokens")
            param, max_tokens = "max_completion_tokens", req.max_completion_tokens
        card = find_card(req.model)
        tok = await toks.get(card)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                    for m in req.messages]
        ids = await asyncio.to_thread(_render_chat, tok, card.name, messages)
        limit = resolve_max_tokens(max_tokens, param, len(ids), card, "messages")
        return await run("chat", req, card, ids, limit)

    @app.post("/v1/completions", tags=["openai"], openapi_extra=body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        """Text completion, stream (SSE) or not."""
        req: CompletionRequest = await read_body(request, CompletionRequest)
        card = find_card(req.model)
        tok = await toks.get(card)
        ids = await asyncio.to_thread(_encode_prompt, tok, req.prompt)
        if not ids:
            raise ApiError(400, "prompt is empty (0 tokens)", code="invalid_value", param="prompt")
        limit = resolve_max_tokens(req.max_tokens, "max_tokens", len(ids), card, "prompt")
        return await run("text", req, card, ids, limit)

    # ---- OpenAPI: the request bodies are parsed by hand (for 415/400 control), so add their schemas here
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible API of gpuplan")
            _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation"),
                                          (TextPart, "validation")], ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


__all__ = [
    "ApiError", "Backend", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "DEFAULT_MAX_TOKENS",
    "MAX_STOP_SEQUENCES", "StreamOptions", "TextPart", "create_app", "error_body", "error_response",
    "retry_after_headers",
]
