"""Shared fixtures of tests/serve: a random tiny llama (benchmarks.common.calibration) with a small byte-level BPE tokenizer.

Nothing is downloaded: the weights are random, the tokenizer is trained in a few milliseconds on a few of the local
Python standard library's sources (so its 512 entries cover the model's whole vocabulary, including byte pieces of
multi-byte characters)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

# Fixture names are prefixed with ``tiny_llama`` so they do not collide with other test modules' fixtures.


def _train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    stdlib_json = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "json", "*.py")))
    texts = [Path(p).read_text(encoding="utf-8", errors="ignore") for p in stdlib_json]
    texts += ["héllo wörld 日本語 ünïcödé ✓ — “quotes” ½ €"] * 20
    tk.train_from_iterator(texts, trainer)
    return tk


def save_tiny_llama_tokenizer(model_dir: str | Path, *, with_pad: bool = True) -> None:
    from transformers import PreTrainedTokenizerFast

    kw = {"pad_token": "<pad>"} if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token="<s>", eos_token="</s>", **kw)
    tok.save_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def tiny_llama_save_tokenizer():
    """``save_tiny_llama_tokenizer(model_dir, with_pad=True)``, for tests that need a variant of the tokenizer."""
    return save_tiny_llama_tokenizer


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A random bf16 tiny llama (pad 0, eos 1, bos 2, vocab 512) with a matching tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks.common.calibration import save_random_model

    model_dir, _ = save_random_model("llama", str(tmp_path_factory.mktemp("tiny-llama")))
    save_tiny_llama_tokenizer(model_dir)
    return model_dir
