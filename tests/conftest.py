"""Shared test set-up: saelab before mlx (fast path), W&B offline, quiet progress bars;
the ``require_system`` fixture for tests that need a system package; ``smoke_cache``, the
session's one activation cache for ``sweep=smoke`` studies, and ``smoke``, the session's one
real smoke study (test_sweep asserts what the sweep recorded, test_export and test_report
export and plot it)."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import saelab  # noqa: E402,F401  (OpenBLAS preload before anything imports mlx.core)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_system(what: str, ok: bool, hint: str) -> None:
    if ok:
        return
    if _in_ci():  # .ci/run installs it, so its absence there is a broken set-up, not a skip
        pytest.fail(f"{what} is missing under CI ({hint})")
    pytest.skip(f"{what} not installed ({hint})")


@pytest.fixture
def require_system():
    """``require_system(what, ok, hint)``: when ``ok`` is false, skip here but fail when
    the environment variable ``CI`` is set (CI sets CI=true and installs ``what``)."""
    return _require_system


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """The activation cache root (``SAELAB_ACT_CACHE``) that every ``sweep=smoke`` study of
    the session reads (test_sweep, test_export, test_report): the first to run captures
    the corpus and computes the downstream baseline, the others reuse both."""
    return tmp_path_factory.mktemp("smoke_cache")


@dataclass
class SmokeStudy:
    """A finished ``saelab sweep sweep=smoke`` study and where its sweep wrote."""

    root: Path
    """The sweep's working directory; its outputs (``SAELAB_OUTPUTS``) are ``root/out``."""
    storage: str
    """The study's SQLite URL (other tests add their own studies to the same file)."""
    env: dict
    """The sweep's environment (outputs, activation cache, W&B offline)."""
    output: str
    """The sweep process's stdout and stderr."""

    def load(self, name: str = "smoke"):
        import optuna

        return optuna.load_study(study_name=name, storage=self.storage)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, smoke_cache) -> SmokeStudy:
    """One real sweep for the session: ``sweep=smoke`` (W&B offline, downstream metrics), 4
    trials of TPE with a constraint on the dead fraction (real Hydra, Optuna on SQLite,
    training on the default model)."""
    root = tmp_path_factory.mktemp("smoke_study")
    env = {**os.environ, "SAELAB_OUTPUTS": str(root / "out"), "SAELAB_ACT_CACHE": str(smoke_cache),
           "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    storage = f"sqlite:///{root}/optuna.db"
    p = subprocess.run([sys.executable, "-m", "saelab.cli", "sweep", "sweep=smoke", "study.name=smoke",
                        "study.n_trials=4", "study.sampler=tpe",
                        "++study.constraints={val/dead_fraction:0.5}", f"study.storage={storage}"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return SmokeStudy(root, storage, env, p.stdout + p.stderr)
