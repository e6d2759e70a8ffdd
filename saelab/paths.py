"""Where saelab keeps things (download/conversion cache, run outputs) and how it
writes them atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


# -- atomic writes: readers see the old version or the new one, never a partial one --

def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path`` (named ``.<name>.*.tmp``) for the block to write
    (e.g. a binary stream); renamed over ``path`` when the block succeeds, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o644)  # mkstemp's 0600 would make the file private to its writer
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``, moving an old ``target`` aside first."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / "old")
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``target`` (named ``.<name>.tmp-*``) that replaces
    ``target`` when the block succeeds; on error it is removed and ``target`` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the result private to its writer
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
