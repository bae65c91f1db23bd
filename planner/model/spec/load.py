"""Where a model comes from: a local directory (safetensors or a .gguf inside), a config.json, a .gguf file, or a
catalog name; one dispatch to the reader of each."""

from __future__ import annotations

import json
import os

from planner.errors import ModelSpecError
from planner.model.spec.from_config import _from_config
from planner.model.spec.from_gguf import spec_from_gguf
from planner.model.spec.from_safetensors import _from_stored
from planner.model.spec.types import ModelSpec

CATALOG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "catalog",
                           "models")


def catalog_names() -> list[str]:
    """Hub-style names (``meta-llama/Llama-3.1-8B``) of the configs shipped in ``planner/catalog/models``."""
    return sorted(f[:-5].replace("--", "/", 1) for f in os.listdir(CATALOG_DIR) if f.endswith(".json"))


def _catalog_path(name: str) -> str | None:
    names = catalog_names()
    low = name.lower()
    for n in names:
        if n.lower() == low or n.split("/", 1)[1].lower() == low:
            return os.path.join(CATALOG_DIR, n.replace("/", "--", 1) + ".json")
    return None


def load_spec(source: str) -> ModelSpec:
    """A ModelSpec from a local model directory, a ``config.json`` path, or a catalog name."""
    if not isinstance(source, str) or not source.strip():
        raise ModelSpecError("model source is empty; give a model directory, a config.json or a catalog name")
    if os.path.isdir(source):
        return _from_dir(source)
    if os.path.isfile(source):
        if source.endswith(".gguf"):
            return spec_from_gguf(source)
        return _from_config(_read_config(source), name=_name_from_path(source), path=source)
    cat = _catalog_path(source)
    if cat:
        return _from_config(_read_config(cat), name=source if "/" in source else _hub_name(cat), path=None)
    close = [n for n in catalog_names() if source.lower().split("/")[-1][:6] in n.lower()]
    hint = f" Similar catalog names: {', '.join(close[:5])}." if close else ""
    raise ModelSpecError(
        f"model source {source!r} is neither a local directory, a file, nor a catalog name.{hint} "
        f"Run `gpuplan catalog` for the {len(catalog_names())} shipped configs, or point at a local model directory."
    )


def _hub_name(path: str) -> str:
    return os.path.basename(path)[:-5].replace("--", "/", 1)


def _name_from_path(path: str) -> str:
    p = os.path.abspath(path)
    return os.path.basename(os.path.dirname(p)) if os.path.basename(p) == "config.json" else os.path.basename(p)


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelSpecError(f"{path}: no such file; a model directory needs its config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSpecError(f"{path}: config.json is not valid JSON ({exc}); re-download it") from None
    if not isinstance(cfg, dict):
        raise ModelSpecError(f"{path}: config.json must be a JSON object, got {type(cfg).__name__}")
    return cfg


def _from_dir(model_dir: str) -> ModelSpec:
    from planner.model.formats.safetensors import read_checkpoint

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        ggufs = sorted(f for f in os.listdir(model_dir) if f.endswith(".gguf"))
        if ggufs:
            return spec_from_gguf(os.path.join(model_dir, ggufs[0]))
        raise ModelSpecError(f"{model_dir}: no config.json in the model directory; download it with the weights")
    cfg = _read_config(cfg_path)
    name = os.path.basename(os.path.abspath(model_dir))
    # Shapes derived from config.json, when the family is known: they supply the buffers checkpoints don't store
    # and the KV dims. Without weights, a config that cannot be derived is the error to report.
    config_error: ModelSpecError | None = None
    try:
        from_config = _from_config(cfg, name=name, path=model_dir)
    except ModelSpecError as exc:
        from_config, config_error = None, exc
    stored = read_checkpoint(model_dir)
    if stored is None:
        if config_error is not None:
            raise config_error
        return from_config
    return _from_stored(cfg, stored, name=name, path=model_dir, derived=from_config)


