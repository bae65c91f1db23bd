"""Values shared by the HTTP layer, the Ray glue and the generation engine (no torch, no ray here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS until max_tokens or a stop string (vLLM's extension)
    trace_id: str | None = None  # the client's x-request-id while request timelines are on (serve/trace.py)


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed step of a generation: the new text since the previous chunk."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # None while running; "stop" (EOS or a stop string) or "length" at the end
    prompt_tokens: int = 0
    completion_tokens: int = 0  # cumulative


@dataclass(frozen=True)
class ModelCard:
    """What the API needs to know about a served model."""

    name: str
    source: str  # local path of the model (tokenizer lives there)
    max_model_len: int
    quantization: str
    max_queued_requests: int = 64
    request_timeout_s: float = 120.0
    extra: dict = field(default_factory=dict)


class Overloaded(Exception):
    """The model's queue is full: the API answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """No replica can take the request right now (starting, or all gone): the API answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 5.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ReplicaLost(Exception):
    """The replica serving a request died or could not be reached. Nothing of the answer has reached the client
    when the API sees this before the first chunk (or, without streaming, at any point), so it retries elsewhere."""

    def __init__(self, message: str, retry_after_s: float = 2.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
