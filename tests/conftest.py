"""Shared test set-up: saelab before mlx (fast path), W&B offline, quiet progress bars."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import saelab  # noqa: E402,F401  (OpenBLAS preload before anything imports mlx.core)
