"""The one interface every engine implements. The replica (serve/replica.py) and the HTTP layer only use this:
request semantics (max_tokens, temperature, top_p, stop strings, a seed per request, streaming, cancellation when
the consumer stops iterating) are the engine's job and are tested against every engine
(tests/integration/test_engines.py)."""

from __future__ import annotations

from typing import AsyncIterator, Protocol, runtime_checkable

from ..types import GenerationChunk, SamplingParams


@runtime_checkable
class Engine(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt_ids``: chunks of new text with cumulative ``completion_tokens``; the last
        one has ``finish_reason`` "stop" (EOS or a stop string, which is not in the text) or "length"."""

    def stats(self) -> dict:
        """Counters for /plan and the metrics: at least ``waiting``, ``running``, ``tokens_per_s``."""

    def check_health(self) -> None:
        """Raise when the engine can no longer serve (the replica's health check: Serve replaces it)."""

    def report(self) -> dict:
        """What the engine was given and what it reports of itself (for /plan next to the plan's numbers)."""

    async def close(self) -> None:
        """Stop; requests still running end."""
