"""Shared test set-up: saelab before mlx (fast path), W&B offline, quiet progress bars;
the ``require_system`` fixture for tests that need a system package; ``smoke_cache``, the
session's one activation cache for ``sweep=smoke`` studies."""

import os

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
