"""Weights & Biases tracking as a training callback (offline by default).

Runs land in ``<dir>/wandb/offline-run-*`` (``dir`` defaults to
``saelab.paths.outputs_root()``); ``wandb sync <run dir>`` uploads one where a
server is reachable. ``WANDB_MODE`` (e.g. ``online``) overrides the default
offline mode. The trainer itself never imports wandb.
"""

from __future__ import annotations

import os
from typing import Optional

from saelab.paths import outputs_root
from saelab.train import Callback


class WandbCallback(Callback):
    """Logs the run config once, every train/val metric with its step, and the
    final metrics as the summary; finishes the run (exit code 1 on abort)."""

    def __init__(self, project: str, name: Optional[str] = None, tags: Optional[list] = None,
                 config: Optional[dict] = None, dir: Optional[str] = None,
                 group: Optional[str] = None, mode: Optional[str] = None):
        self.init_kwargs = dict(project=project, name=name, tags=list(tags or []), group=group,
                                mode=mode or os.environ.get("WANDB_MODE", "offline"),
                                dir=str(dir or outputs_root()))
        self.extra_config = dict(config or {})
        self.run = None
        self.run_dir: Optional[str] = None
        """The run's directory (``.../wandb/offline-run-*``) once started."""

    def on_start(self, config: dict) -> None:
        import wandb

        os.makedirs(self.init_kwargs["dir"], exist_ok=True)
        self.run = wandb.init(config={**config, **self.extra_config}, reinit="create_new",
                              settings=wandb.Settings(silent=True, x_disable_stats=True),
                              **self.init_kwargs)
        self.run_dir = os.path.dirname(self.run.dir)  # run.dir is <run dir>/files

    def on_log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def on_eval(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def on_end(self, metrics: dict) -> None:
        self.run.summary.update(metrics)
        self.run.finish()
        self.run = None

    def on_abort(self, reason: str) -> None:
        if self.run is not None:
            self.run.summary["abort_reason"] = reason
            self.run.finish(exit_code=1)
            self.run = None

    def close(self) -> None:
        """Finish the run if training ended without on_end/on_abort (idempotent)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
