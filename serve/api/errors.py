"""Every error the API answers, in OpenAI's shape ``{"error": {"message", "type", "code", "param"}}``: the body, the
response with its Retry-After, ``ApiError``, and how a backend's exception or a body's validation errors become
one."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Mapping

from fastapi.responses import JSONResponse

from serve.types import Overloaded, ReplicaLost, Unavailable

log = logging.getLogger("gpuplan.api")

RETRY_LIMIT = 2  # more tries of a request whose replica died before the client saw anything


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict:
    """The OpenAI error object: ``{"error": {"message", "type", "code", "param"}}``."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(
    status: int,
    message: str,
    type: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """A JSON response in the OpenAI error shape (reusable by the Ray glue for its own backpressure errors)."""
    return JSONResponse(error_body(message, type, code, param), status_code=status,
                        headers=dict(headers) if headers else None)


def retry_after_headers(seconds: float | None) -> dict[str, str]:
    """``{"Retry-After": "<int>"}``: whole seconds, rounded up, at least 1 (0 would invite a tight retry loop)."""
    try:
        s = float(seconds) if seconds is not None else 1.0
    except (TypeError, ValueError):
        s = 1.0
    if not math.isfinite(s):
        s = 1.0
    return {"Retry-After": str(max(1, math.ceil(s)))}


class ApiError(Exception):
    """An error the API answers with (status + OpenAI error object); raised inside handlers."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.param = param
        self.headers = dict(headers) if headers else None

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _validation_error(errors: list[dict]) -> ApiError:
    """First few pydantic errors -> one 400 whose message names the fields; ``param`` is the first field."""
    parts = []
    for e in errors[:3]:
        msg = str(e.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        loc = tuple(p for p in e.get("loc", ()) if p != "body")
        parts.append(f"{_loc(loc)}: {msg}")
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    first = tuple(p for p in errors[0].get("loc", ()) if p != "body") if errors else ()
    return ApiError(400, "invalid request: " + "; ".join(parts), code="invalid_value",
                    param=_loc(first) if first else None)


def _backend_error(exc: BaseException, model: str, timeout: float | None, streaming: bool) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(429, _short(exc) or f"model {model!r} is overloaded; retry later", code="model_overloaded",
                        headers=retry_after_headers(exc.retry_after_s))
    if isinstance(exc, Unavailable):
        return ApiError(503, _short(exc) or f"model {model!r} is unavailable; retry later",
                        code="model_unavailable", headers=retry_after_headers(exc.retry_after_s))
    if isinstance(exc, ReplicaLost):
        if streaming:  # part of the answer is out: say so, the client decides what to do with it
            return ApiError(503, f"model {model!r}: the replica generating this answer died ({_short(exc, 200)}); "
                                 "the text so far is incomplete", code="replica_died",
                            headers=retry_after_headers(exc.retry_after_s))
        return ApiError(503, f"model {model!r}: the replica serving the request died and no other took it after "
                             f"{RETRY_LIMIT} more tries ({_short(exc, 200)}); retry later", code="replica_lost",
                        headers=retry_after_headers(exc.retry_after_s))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):  # distinct classes before Python 3.11
        what = "no new output" if streaming else "the generation did not finish"
        limit = f"within request_timeout_s={timeout:g}s" if timeout else "in time"
        return ApiError(504, f"model {model!r}: {what} {limit}", code="timeout")
    log.error("unexpected error while generating with model %r", model, exc_info=exc)
    return ApiError(500, f"internal error while generating with model {model!r} ({type(exc).__name__}); "
                         "see the server log", code="internal_error")


def _short(exc: BaseException, limit: int = 500) -> str:
    s = str(exc).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


