"""Server-sent events framing for the OpenAI streaming endpoints (no FastAPI, no Ray here).

OpenAI's stream format is plain SSE with one ``data:`` line per event and no ``event:`` names::

    data: {"id": "chatcmpl-…", "object": "chat.completion.chunk", …}\\n\\n
    …
    data: [DONE]\\n\\n

An error after the stream has started (headers already sent as 200) is one more ``data:`` event whose payload is
the OpenAI error shape ``{"error": {...}}``, followed by ``[DONE]``; the official client raises ``APIError`` on it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

MEDIA_TYPE = "text/event-stream"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies not to buffer the stream
}
DONE = b"data: [DONE]\n\n"


def event(payload: Any) -> bytes:
    """One SSE ``data:`` event carrying ``payload`` as compact JSON (JSON escapes newlines, so one line)."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


def iter_data(lines: Iterable[str]) -> Iterator[str]:
    """Parse an SSE stream given as text lines; yield each event's data (multi-line data joined with ``\\n``).

    Comment lines (``:``) and fields other than ``data`` are skipped. Used by the tests and handy for clients.
    """
    buf: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if line == "":
            if buf:
                yield "\n".join(buf)
                buf = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            buf.append(value)
    if buf:
        yield "\n".join(buf)


def parse_stream(text: str) -> list[Any]:
    """Whole stream text -> list of decoded events: dicts for JSON payloads, the string ``"[DONE]"`` for the end."""
    out: list[Any] = []
    for data in iter_data(text.splitlines()):
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
