"""The wire: the Backend the API serves (the ingress, or a test's fake), and the request bodies (pydantic, the edge:
``extra="forbid"`` where a field would change the answer's shape, a docstring on every field)."""

from __future__ import annotations

import inspect
import logging
from typing import Annotated, Any, AsyncIterator, Awaitable, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from serve.types import GenerationChunk, ModelCard, SamplingParams

log = logging.getLogger("gpuplan.api")

MAX_STOP_SEQUENCES = 4


@runtime_checkable
class Backend(Protocol):
    """What the API needs from the serving side (the Ray ingress in production, a fake in tests).

    * ``cards()`` - sync; the served models. Called per request, so it may change over time.
    * ``generate(model, prompt_ids, params)`` - an async generator function (``async def`` with ``yield``) of
      ``GenerationChunk``; a coroutine that returns an async iterator is accepted too. It may raise ``Overloaded``
      (-> 429), ``Unavailable`` (-> 503) or ``asyncio.TimeoutError`` (-> 504), when called or while iterating.
      The API closes the iterator (``aclose``) when it stops early (client gone, timeout, finish_reason seen).
    * ``readiness()`` - sync or async (the API awaits the result when it is awaitable): ``(ready, detail)``.
    * ``plan()`` - sync or async: a JSON-able dict for ``GET /plan``.
    """

    def cards(self) -> list[ModelCard]: ...

    def generate(self, model: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        ...

    def readiness(self) -> tuple[bool, dict] | Awaitable[tuple[bool, dict]]: ...

    def plan(self) -> dict | Awaitable[dict]: ...


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class _Body(BaseModel):
    # strict: no "0.5" -> 0.5 or "true" -> True coercion; extra="ignore": unknown (harmless) OpenAI fields are dropped
    model_config = ConfigDict(extra="ignore", strict=True, use_attribute_docstrings=True)


class TextPart(_Body):
    """One part of a message's content in the list form. Only text parts are supported."""

    type: Literal["text"]
    """Always "text"."""
    text: str
    """The text of this part."""


class ChatMessage(_Body):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    """Who wrote it. "developer" is treated as "system". Tool messages are not supported."""
    content: Annotated[
        str,
        WithJsonSchema({"anyOf": [{"type": "string"},
                                  {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}]}),
    ]
    """The text: a string, or a list of {"type": "text", "text": ...} parts (joined with a newline)."""
    name: str | None = None
    """Optional participant name (accepted, not passed to the model)."""

    @field_validator("content", mode="before")
    @classmethod
    def _join_parts(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} must be {{\"type\": \"text\", \"text\": \"...\"}}; "
                                 f"only text parts are supported (got type {kind!r})")
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(_Body):
    """Options for streamed answers."""

    include_usage: bool | None = None
    """When true, one more chunk before [DONE] carries `usage` (with empty `choices`); other chunks have usage null."""


def _reject_unless(value: Any, allowed: tuple, what: str) -> Any:
    if value not in allowed:
        raise ValueError(what)
    return value


class _GenerationBody(_Body):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    """Name of a served model (see GET /v1/models)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate, >= 1. Prompt tokens + max_tokens must fit the model's max_model_len. Omitted:
    min(max_model_len - prompt tokens, the server's default cap, 512 unless configured)."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """Sampling temperature in [0, 2]; 0 = greedy. Default 1."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling mass in (0, 1]. Default 1."""
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    """Up to 4 non-empty stop strings (a single string is accepted); the text stops before the first match."""
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    """Seed for sampling, for repeatable answers."""
    ignore_eos: bool | None = None
    """vLLM's extension: keep generating past the end-of-sequence token until max_tokens or a stop string (for
    benchmarks that need answers of a fixed length). Default false."""
    stream: bool | None = None
    """Stream the answer as server-sent events ending with `data: [DONE]`."""
    stream_options: StreamOptions | None = None
    """Options for streaming (only with stream=true)."""
    n: int | None = None
    """Number of choices; only 1 is supported."""
    user: str | None = None
    """End-user id (accepted and ignored)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if v is None or isinstance(v, list):
            return v
        if isinstance(v, str):
            return [v]
        raise ValueError(f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings")

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, v: list[str] | None) -> list[str] | None:
        if v and any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int | None) -> int | None:
        return _reject_unless(v, (None, 1), "only n=1 is supported")


class ChatCompletionRequest(_GenerationBody):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    """The conversation so far, at least one message; rendered with the model's chat template."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Alias of max_tokens (OpenAI's newer name); if both are given they must be equal."""
    logprobs: bool | None = None
    """Not supported: must be false or absent."""
    top_logprobs: int | None = None
    """Not supported: must be 0 or absent."""
    tools: list[Any] | None = None
    """Not supported: must be empty or absent."""
    functions: list[Any] | None = None
    """Not supported (deprecated OpenAI field): must be empty or absent."""
    tool_choice: Any = None
    """Not supported: must be "none" or absent."""
    response_format: dict[str, Any] | None = None
    """Only {"type": "text"} (or absent) is supported."""

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        return _reject_unless(v, (None, False), "logprobs are not supported")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        return _reject_unless(v, (None, 0), "logprobs are not supported")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tool calling is not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        return _reject_unless(v, (None, "none"), "tool calling is not supported (tool_choice may only be \"none\")")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict | None) -> dict | None:
        if v is not None and v.get("type") != "text":
            raise ValueError("only response_format {\"type\": \"text\"} is supported")
        return v


class CompletionRequest(_GenerationBody):
    """POST /v1/completions body."""

    prompt: Annotated[
        str,
        WithJsonSchema({"anyOf": [{"type": "string"},
                                  {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]}),
    ]
    """The prompt: a string, or a list of exactly one string. Token-id prompts are not supported."""
    echo: bool | None = None
    """Not supported: must be false or absent."""
    logprobs: int | None = None
    """Not supported: must be 0 or absent."""
    best_of: int | None = None
    """Not supported: must be 1 or absent."""
    suffix: str | None = None
    """Not supported: must be empty or absent."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) == 1 and isinstance(v[0], str):
                return v[0]
            if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError("token-id prompts are not supported; send the prompt as a string")
            raise ValueError(f"exactly one prompt string per request is supported (got a list of {len(v)})")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        return _reject_unless(v, (None, False), "echo is not supported")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        return _reject_unless(v, (None, 0), "logprobs are not supported")

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        return _reject_unless(v, (None, 1), "only best_of=1 is supported")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _reject_unless(v, (None, ""), "suffix is not supported")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


