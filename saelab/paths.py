"""Where saelab keeps things: the download/conversion cache and the run outputs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Model downloads and conversions: ``$SAELAB_CACHE`` or ``~/.cache/saelab``."""
    # an empty variable counts as unset (not as the current directory)
    root = Path(os.environ.get("SAELAB_CACHE") or Path.home() / ".cache" / "saelab").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def outputs_root() -> Path:
    """Runs, studies and activation caches: ``$SAELAB_OUTPUTS`` or ``./outputs``."""
    root = Path(os.environ.get("SAELAB_OUTPUTS") or "outputs").expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def activation_cache_root() -> Path:
    """Shared activation caches: ``<outputs>/cache`` unless ``SAELAB_ACT_CACHE`` is set."""
    env = os.environ.get("SAELAB_ACT_CACHE")
    root = Path(env).expanduser().resolve() if env else outputs_root() / "cache"
    root.mkdir(parents=True, exist_ok=True)
    return root
