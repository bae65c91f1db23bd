"""Tokenizers of the models the API serves (loaded once per model, off the event loop), chat templates, prompt
encoding."""

from __future__ import annotations

import asyncio
import zlib
import logging
import threading
from typing import Any, Mapping


from serve.types import ModelCard

from serve.api.errors import ApiError

log = logging.getLogger("gpuplan.api")


class _Tokenizers:
    """Tokenizer per model: injected ones by model name, else ``AutoTokenizer.from_pretrained(card.source)``,
    loaded once per source (two models sharing a source share one tokenizer) in a worker thread."""

    def __init__(self, injected: Mapping[str, Any] | None):
        self._by_name: dict[str, Any] = dict(injected or {})
        self._by_source: dict[str, Any] = {}
        self._lock = threading.Lock()

    async def get(self, card: ModelCard) -> Any:
        tok = self._by_name.get(card.name)
        if tok is None:
            tok = self._by_source.get(card.source)
        if tok is None:
            try:
                tok = await asyncio.to_thread(self._load, card)
            except Exception as exc:
                log.exception("cannot load the tokenizer of model %r from %r", card.name, card.source)
                raise ApiError(500, f"cannot load the tokenizer of model {card.name!r} ({type(exc).__name__}); "
                                    "see the server log", code="tokenizer_unavailable") from None
        return tok

    def _load(self, card: ModelCard) -> Any:
        with self._lock:
            tok = self._by_source.get(card.source)
            if tok is None and card.extra.get("simulated") and not _has_tokenizer(card.source):
                tok = WordTokenizer()  # a simulated model planned from a config alone: words are tokens
                self._by_source[card.source] = tok
            if tok is None:
                from serve.engines.loader import load_tokenizer  # heavy import, only when a tokenizer is not injected

                tok = load_tokenizer(card.source, trust_remote_code=bool(card.extra.get("trust_remote_code", False)))
                self._by_source[card.source] = tok
            return tok


def _has_tokenizer(source: str) -> bool:
    """Whether ``source`` is a local model folder (or a file in one) with a tokenizer in it."""
    import os

    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model"))


class WordTokenizer:
    """The tokenizer of a simulated model that has none (its source is a config.json or a model id): one token per
    whitespace-separated word, a chat rendered as ``role: content`` lines. A prompt of N words is N tokens, which is
    what the trace replay needs of it."""

    chat_template = "role: content lines"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [zlib.crc32(w.encode()) % 32000 for w in text.split()] or [0]}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        text = "\n".join(f"{m.get('role', 'user')}: {m.get('content') or ''}" for m in messages)
        return text + ("\nassistant:" if add_generation_prompt else "")


def _ids(encoded: Any) -> list[int]:
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    ids = list(encoded)
    if ids and isinstance(ids[0], list):  # batched output of one
        ids = ids[0]
    return [int(i) for i in ids]


def _render_chat(tok: Any, model: str, messages: list[dict]) -> list[int]:
    if hasattr(tok, "chat_template") and not tok.chat_template:
        raise ApiError(400, f"model {model!r} has no chat template; use /v1/completions with a plain prompt",
                       code="no_chat_template", param="messages")
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with transformers' chat templating
        TemplateError = ()  # type: ignore[assignment]
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:  # templates raise on e.g. non-alternating roles: the client's messages
        raise ApiError(400, f"the chat template of model {model!r} rejected the messages: {exc}",
                       code="invalid_messages", param="messages") from None
    if not isinstance(text, str):  # a tokenizer whose template returns ids directly
        return _ids(text)
    return _ids(tok(text, add_special_tokens=False))


def _encode_prompt(tok: Any, prompt: str) -> list[int]:
    return _ids(tok(prompt))


