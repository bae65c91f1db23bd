"""OpenAI-compatible HTTP API (FastAPI) in front of a ``Backend`` object; no Ray here. This module wires the app:
error shaping, the bearer-key guard, the routes (routes.py) over the serving object (serving.py), the OpenAPI schema.

The Ray glue (``serve/app/build.py``) builds this app with ``create_app(ingress, api_key=...)`` and wraps it as the
ingress deployment; tests build it around a fake backend. The API owns tokenization: it loads each model's tokenizer
(``AutoTokenizer.from_pretrained(card.source)``, cached), applies the chat template, counts prompt tokens, checks
the context budget, and sends token ids to ``backend.generate``.

Endpoints::

    GET  /v1/models, /v1/models/{id}   models from backend.cards()
    POST /v1/chat/completions          chat (stream or not)
    POST /v1/completions               plain prompt (stream or not)
    GET  /healthz                      liveness: always 200 {"status": "ok"}
    GET  /health                       vLLM's probe: 200 (empty) when ready, else 503
    GET  /version                      {"version": gpuplan's}
    GET  /metrics                      Prometheus text (serve/api/metrics.py)
    GET  /readyz                       200 if backend.readiness() says ready, else 503 (with the detail dict and
                                       ``app``: backend.identity(), which deploy answers)
    GET  /plan                         backend.plan()
    POST /admin/drain                  backend.drain(): finish what is in flight, 503 for new requests

Every error is in the OpenAI shape ``{"error": {"message", "type", "code", "param"}}`` (FastAPI's own 404/405/422
and unexpected exceptions included). Status codes: 400 bad body or values, context too long; 401 bad or missing
bearer key (when ``api_key`` is set; the probes and /metrics are open); 404 unknown model or route; 405; 413 body over
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

import hmac
import logging
from typing import Any, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import trace
from serve.api.errors import (_TYPE_BY_STATUS, RETRY_LIMIT, ApiError, _validation_error, error_body,  # noqa: F401
                              error_response, retry_after_headers)
from serve.api.protocol import (MAX_STOP_SEQUENCES, Backend, ChatCompletionRequest, ChatMessage,  # noqa: F401
                                CompletionRequest, StreamOptions, TextPart)
from serve.api.routes import register
from serve.api.serving import DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, OWNED_BY, OpenAIServing  # noqa: F401

log = logging.getLogger("gpuplan.api")

# no bearer key needed: the probes (and /metrics, as vLLM's server leaves it open for Prometheus)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/health", "/version", "/metrics"})


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
        if scope.get("method") == "POST" and trace.enabled():
            tid = next((v.decode() for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
            trace.mark("api.request", tid)
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

    ``api_key``: when set (non-empty), every endpoint except the probes and /metrics needs
    ``Authorization: Bearer <api_key>``; None or "" turns the check off.
    ``tokenizers``: model name -> tokenizer, to skip ``AutoTokenizer.from_pretrained(card.source)``.
    ``default_max_tokens``: cap on the max_tokens default when a request omits it (None: the whole remaining
    context). ``max_body_bytes``: larger request bodies get 413.
    """
    app = FastAPI(title="gpuplan OpenAI-compatible API", version="1")
    serving = OpenAIServing(backend, api_key=api_key, tokenizers=tokenizers, default_max_tokens=default_max_tokens,
                            max_body_bytes=max_body_bytes)
    app.state.backend = backend
    app.state.tokenizers = serving.tokenizers
    app.state.serving = serving

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

    register(app, serving)

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
