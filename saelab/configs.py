"""Hydra's side of saelab's configuration: where it finds the configs (the primary
config directory and, in priority order, the directories whose ``NAME.yaml`` files
are the ``sweep`` group's options), the schemas it validates them against, and a
resolved config -> ``TrialConfig`` with errors naming the full key (``sae.k``).

The repository's top-level ``conf/`` and ``sweeps/`` are the single source of truth;
a wheel ships them as the packages ``saelab.conf`` and ``saelab.sweeps``, and an
editable install maps those package names back onto the repository's directories,
so both kinds of install find them through the import system.

The ``sweep`` group is assembled per process (each sweep worker re-runs the command
line and recomputes it) by the Hydra plugin ``hydra_plugins/saelab_configs``, which
appends one search-path entry per directory of :func:`sweep_dirs`.
"""

from __future__ import annotations

from dataclasses import fields
from importlib.resources import files
from pathlib import Path
from typing import Any

from saelab.config import (DataConfig, ModelConfig, SAEConfig, StudyConfig, TrialConfig,
                           check)

USER_SWEEPS = "sweeps"
"""A directory of this name in the current directory holds the user's own sweep files."""


def _package_dir(package: str) -> Path:
    path = Path(str(files(package)))
    if not path.is_dir():  # e.g. imported from a zip: Hydra needs real files
        raise RuntimeError(f"saelab: {package} at {path} is not a directory; install saelab "
                           "as files (pip install saelab or pip install -e .)")
    return path


def conf_dir() -> Path:
    """The primary config directory (``config.yaml`` and the model/data/sae/train groups)."""
    return _package_dir("saelab.conf")


def shipped_sweeps_dir() -> Path:
    """The sweep files that come with saelab (``smoke``, ``quick``, ...)."""
    return _package_dir("saelab.sweeps")


def sweep_dirs(cwd: Path | None = None) -> list[Path]:
    """Directories of sweep files, first match wins: ``./sweeps`` of ``cwd`` (default:
    the current directory), then the shipped ones. Hydra's ``--config-dir DIR`` and
    ``hydra.searchpath`` come after these (``DIR/sweep/NAME.yaml`` adds names)."""
    user = (cwd or Path.cwd()) / USER_SWEEPS
    dirs = [user.resolve()] if user.is_dir() else []
    shipped = shipped_sweeps_dir().resolve()
    # in a clone with an editable install, ./sweeps *is* the shipped directory
    return dirs + [shipped] if shipped not in dirs else dirs


def is_primary(path: str) -> bool:
    """Whether a Hydra search-path entry (a directory or URL) is saelab's primary config."""
    return path in (str(conf_dir()), f"file://{conf_dir()}", "pkg://saelab.conf")


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="trial_schema", node=TrialConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="sae", name="sae_schema", node=SAEConfig)
    cs.store(group="study", name="study_schema", node=StudyConfig)


def _section(prefix: str, cls: type, values: dict[str, Any]) -> Any:
    """Build one section of a TrialConfig; its errors name the full key (``sae.k``:
    SAEConfig alone says ``k``, as the guide's Python API spells it)."""
    known = {f.name for f in fields(cls)}
    for key in sorted(set(values) - known):
        check(False, f"{prefix}.{key}", values[key], f"the keys of {prefix}: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(f"{prefix}.") else f"{prefix}.{msg}") from e


def trial_from_dict(d: dict[str, Any]) -> TrialConfig:
    """Build (and validate) a TrialConfig from a plain dict, e.g. a resolved Hydra config."""
    d = dict(d)
    return TrialConfig(
        model=_section("model", ModelConfig, d.pop("model", {})),
        data=_section("data", DataConfig, d.pop("data", {})),
        sae=_section("sae", SAEConfig, d.pop("sae", {})),
        study=_section("study", StudyConfig, d.pop("study", {})),
        **{k: v for k, v in d.items() if k in {f.name for f in fields(TrialConfig)}},
    )
