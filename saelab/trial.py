"""The trial is a function: one resolved config in, one trained SAE and its metrics out.

``saelab train``, the sweeper, the guide's ``model.train_sae``, the tests and
the benchmarks all go through ``run_trial``. Optuna and W&B attach from
outside as callbacks; a sweep job gets its Optuna callback from
``saelab.study.run_linked_job`` through ``hydra_task(cfg, callbacks)``.
``TrialDownstream`` adds the downstream metrics (``saelab.evals``) at the end or at
every evaluation, holding the callbacks' ``on_end`` until they exist.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from saelab.config import TrialConfig
from saelab.configs import trial_from_dict
from saelab.paths import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class TrialResult:
    metrics: dict[str, float]
    """Final metrics: ``val/*`` (mse, nmse, nmse_p99, explained_variance, l0,
    dead_fraction), ``train/tokens`` and ``time/*`` (wall_s, capture_s, train_s,
    tokens_per_s, overhead_fraction)."""
    sae_path: str
    """Directory of the saved SAE (``SAE.load`` / ``model.load_sae``)."""
    output_dir: str
    history: list[dict[str, float]] = field(default_factory=list)
    """Validation metrics at each evaluation (with ``step`` and ``train/tokens``)."""
    wandb_run_dir: str | None = None
    sae: Any = field(default=None, repr=False, compare=False)
    """The trained SAE object (in-process callers; not serialized)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sae"}


class HistoryCallback:
    """Keeps the validation curve so the study can store it for reports."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []

    def on_start(self, config: dict) -> None: ...
    def on_log(self, step: int, metrics: dict) -> None: ...
    def on_end(self, metrics: dict) -> None: ...

    def on_eval(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, "train/tokens": step * self.batch_size,
                             **{k: float(v) for k, v in metrics.items()}})


def validate_trial(cfg: TrialConfig, info: Any = None):
    """Checks that need the model's shape; cheap (no weights loaded). Returns ModelInfo
    (``info`` skips looking it up again)."""
    from saelab.models import model_info

    info = info or model_info(cfg.model)
    info.check_layer(cfg.layer)
    cfg.sae.check_dims(info.d_model, prefix="sae.")
    return info


def run_trial(cfg: TrialConfig, callbacks: Sequence[Any] = (), output_dir: str | Path | None = None,
              progress: bool = True, *, sae_path: str | Path | None = None,
              texts: Sequence[str] | None = None, model: Any = None) -> TrialResult:
    """Capture (or reuse) activations, train one SAE, save it, return its metrics.

    ``texts`` replaces the configured corpus and ``model`` is an already loaded
    InterpretableModel (both for the guide's ``model.train_sae``)."""
    from saelab.batches import EntryRows
    from saelab.cache import ensure_activations
    from saelab.train import train_sae_on_arrays

    t0 = time.perf_counter()
    info = validate_trial(cfg)
    out = Path(output_dir or cfg.output_dir or ".").resolve()
    out.mkdir(parents=True, exist_ok=True)

    entry = ensure_activations(cfg.model, cfg.data, [(cfg.layer, cfg.component)],
                               root=cfg.cache_dir, texts=texts,
                               model=model)[(cfg.layer, cfg.component)]
    split = entry.split(cfg.sae.validation_split, cfg.data.split_seed)
    train = EntryRows(entry, split.train, cfg.data.shuffle_buffer_tokens)  # out of core
    val = entry.validation(split, cfg.data.max_val_tokens)
    t_data = time.perf_counter()

    metadata = {
        "model_name": info.name, "model_identity": info.identity, "layer": cfg.layer,
        "component": cfg.component, "d_model": info.d_model, "activation_cache": str(entry.path),
        "train_activations": int(train.shape[0]), "val_activations": int(val.shape[0]),
        "model_dtype": cfg.model.dtype, "data_config": asdict(cfg.data) if texts is None else None,
    }
    history = HistoryCallback(cfg.sae.batch_size)
    cbs: list[Any] = [history, *callbacks]
    wandb_cb = None
    if cfg.sae.use_wandb:
        from saelab.tracking import WandbCallback

        wandb_cb = WandbCallback(
            project=cfg.sae.wandb_project,
            name=cfg.sae.wandb_name or f"l{cfg.layer}_{cfg.component}_x{cfg.sae.expansion_factor}_k{cfg.sae.k}",
            tags=list(cfg.sae.wandb_tags), group=cfg.sae.wandb_group,
            config={**asdict(cfg), **metadata},
        )
        cbs.append(wandb_cb)
    downstream = None
    if cfg.sae.downstream_eval != "off":  # its metrics reach the callbacks' on_end
        downstream = TrialDownstream(cfg, entry, texts, model)
        cbs = downstream.hold(cbs)

    try:
        every = downstream.evaluate if cfg.sae.downstream_eval == "every" else None
        sae, metrics = train_sae_on_arrays(train, val, cfg.sae, metadata=metadata,
                                           callbacks=cbs, progress=progress, eval_hook=every)
        if downstream is not None:
            metrics = downstream.finish(sae, metrics)
    except BaseException as e:  # a stopped/failed trial still points at its W&B run
        e.wandb_run_dir = wandb_cb.run_dir if wandb_cb is not None else None
        raise
    finally:
        if wandb_cb is not None:
            wandb_cb.close()
    sae_path = sae.save(sae_path or out / "sae.mlx")
    t_end = time.perf_counter()
    # the training loop's own time: set-up, W&B and saving count as overhead (evaluation not)
    train_s = metrics["train/steps"] * cfg.sae.batch_size / metrics["train/tokens_per_second"]
    eval_s = metrics.get("time/downstream_s", 0.0)
    metrics = {
        **metrics,
        "time/capture_s": t_data - t0,
        "time/train_s": train_s,
        "time/wall_s": t_end - t0,
        "time/tokens_per_s": metrics["train/tokens_per_second"],
        "time/overhead_fraction": (t_end - t0 - train_s - eval_s) / (t_end - t0),
    }
    result = TrialResult(metrics=metrics, sae_path=str(sae_path), output_dir=str(out),
                         history=history.history,
                         wandb_run_dir=wandb_cb.run_dir if wandb_cb is not None else None,
                         sae=sae)
    atomic_write_text(out / "metrics.json", json.dumps(result.to_dict(), indent=2, default=str))
    return result


def hydra_task(cfg, callbacks: Sequence[Any] = ()) -> TrialResult:
    """The Hydra task function of ``saelab train`` (single run or one multirun job).
    Returns the result without the SAE object: a launcher may carry it to another process."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    trial_cfg = trial_from_dict(OmegaConf.to_container(cfg, resolve=True))
    out = trial_cfg.output_dir or HydraConfig.get().runtime.output_dir
    result = run_trial(trial_cfg, callbacks, output_dir=out)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if k.startswith("val/"))
    print(f"[saelab] layer {trial_cfg.layer} {trial_cfg.component}: {summary}")
    print(f"[saelab] SAE saved to {result.sae_path}")
    return replace(result, sae=None)


class _HeldEnd:
    """A training callback whose ``on_end`` waits until the downstream metrics exist."""

    def __init__(self, cb: Any):
        self.cb = cb

    def on_start(self, config: dict) -> None:
        self.cb.on_start(config)

    def on_log(self, step: int, metrics: dict) -> None:
        self.cb.on_log(step, metrics)

    def on_eval(self, step: int, metrics: dict) -> None:
        self.cb.on_eval(step, metrics)

    def on_end(self, metrics: dict) -> None: ...

    def on_abort(self, reason: str) -> None:
        if hasattr(self.cb, "on_abort"):
            self.cb.on_abort(reason)


class TrialDownstream:
    """A trial's downstream evaluation: at the end (``sae.downstream_eval=end``) or at
    every evaluation (``every``: ``evaluate`` is the trainer's ``eval_hook``, so the
    last evaluation's metrics are the final ones). ``hold(callbacks)`` delays their
    ``on_end`` so W&B and the study see the final metrics with the downstream ones,
    which ``finish(sae, metrics)`` adds (with ``time/downstream_s``, all evaluations)."""

    def __init__(self, cfg: Any, entry: Any, texts: list[str] | None, model: Any):
        self.cfg, self.entry, self.texts, self.model = cfg, entry, texts, model
        self.held: list[_HeldEnd] = []
        self.seconds = 0.0

    def hold(self, callbacks: list[Any]) -> list[Any]:
        self.held = [_HeldEnd(cb) for cb in callbacks]
        return self.held

    def evaluate(self, sae: Any) -> dict[str, float]:
        from saelab.evals import entry_downstream
        from saelab.trace import shared_model

        cfg, t0 = self.cfg, time.perf_counter()
        model = self.model or shared_model(cfg.model)
        metrics = entry_downstream(
            self.entry, cfg.data, model, sae, layer=cfg.layer, component=cfg.component,
            n_sequences=cfg.sae.downstream_sequences, validation_split=cfg.sae.validation_split,
            seed=cfg.data.split_seed, texts=self.texts)
        self.seconds += time.perf_counter() - t0
        return metrics

    def finish(self, sae: Any, metrics: dict[str, float]) -> dict[str, float]:
        try:
            if self.cfg.sae.downstream_eval != "every":  # else: in the last evaluation's
                metrics = {**metrics, **self.evaluate(sae)}
        except BaseException as e:
            for h in self.held:
                h.on_abort(f"downstream evaluation failed: {type(e).__name__}: {e}")
            raise
        metrics = {**metrics, "time/downstream_s": self.seconds}
        sae.update_metadata(metrics=metrics)
        for h in self.held:
            h.cb.on_end(metrics)
        return metrics
