"""The Optuna study of a sweep: creating and loading it, its samplers and
pruners, the training callback that reports, prunes and guards, how a launched
job finds its trial, and the record each trial leaves.

The Hydra sweeper (``hydra_plugins/saelab_sweeper``) drives these; so can any
script. A trial's record lives in its user attributes: ``config`` (the
resolved trial config), ``metrics`` (final), ``history`` (validation metrics
at each evaluation, written as the job goes), ``sae_path``, ``run_dir``,
``wandb_run_dir`` and ``prune_reason``/``fail_reason``; constraint values are
Optuna's own (``Trial.set_constraint``, read back as ``FrozenTrial.constraints``).
Storages and worker liveness are ``saelab.storage``'s.

A job reaches its trial through the storage only (``TrialLink``: storage URL,
study name, trial id, passed as the hidden config key ``saelab_trial``), never
through this process's memory, so pruning, guards and records work the same
under any Hydra launcher: in-process, joblib worker processes, or SLURM jobs
through submitit.
"""

from __future__ import annotations

import json
import math
import resource
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Optional, Sequence

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from saelab.config import StudyConfig, TrialConfig
from saelab.configs import trial_from_dict
from saelab.storage import (JOB_ATTR, close_storage, open_existing_storage, open_storage,
                            worker_id)
from saelab.train import Callback, StopTraining, TrainingDiverged


# ---------------------------------------------------------------- study

def make_sampler(cfg: StudyConfig, grid: Optional[dict[str, list]] = None,
                 seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler named by ``cfg.sampler``. ``seed_offset`` keeps workers and
    resumed runs from replaying the same random draws. Constrained samplers (TPE,
    NSGA-II, GP) read each trial's ``set_constraint`` values (see ``finish_trial``)."""
    seed = cfg.seed + seed_offset
    if cfg.sampler == "tpe":
        startup = min(10, max(2, cfg.n_trials // 3))  # small studies still get model-based trials
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed,
                                             population_size=max(2, min(50, cfg.n_trials // 2)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=seed)
    if cfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.seed)  # QMC indexes its sequence by trial number
    return optuna.samplers.GPSampler(seed=seed)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    """Pruners see ``train/tokens`` as the step, comparable across batch sizes."""
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, storage: Optional[BaseStorage] = None) -> optuna.Study:
    """Create or load ``cfg.name`` (all objectives minimized) and record its setup."""
    storage = storage or open_storage(cfg)
    directions = ["minimize"] * len(cfg.objectives)
    study = optuna.create_study(study_name=cfg.name, storage=storage, directions=directions,
                                load_if_exists=True, pruner=make_pruner(cfg))
    old = study.user_attrs.get("objectives")
    if old is not None and list(old) != list(cfg.objectives):
        raise ValueError(f"study.objectives={list(cfg.objectives)} is not valid for the existing "
                         f"study {cfg.name!r} in {cfg.storage}; allowed: {old} (or a new study.name)")
    if old is None:
        study.set_user_attr("objectives", list(cfg.objectives))
        study.set_user_attr("directions", directions)
        study.set_user_attr("constraints", dict(cfg.constraints))
    return study


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    """Load study ``name``; a clear ValueError (listing the studies there) if it is absent."""
    storage = open_existing_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ValueError(f"study={name!r} is not in {storage_url}; allowed: "
                         f"{', '.join(sorted(names)) or '(no studies in this storage)'}")
    return optuna.load_study(study_name=name, storage=storage)


def objectives_of(study: optuna.Study) -> list[str]:
    """The objective metric names the study was created with (``value_<i>`` for a
    study made outside saelab)."""
    return list(study.user_attrs.get("objectives") or
                [f"value_{i}" for i in range(len(study.directions))])


# ---------------------------------------------------------------- the training callback

class OptunaCallback(Callback):
    """Reports intermediate values, prunes, applies the guard rules, keeps the history
    (in the trial's ``history`` user attribute after each evaluation, so a trial whose
    job dies or runs elsewhere still has its curve)."""

    def __init__(self, trial: optuna.Trial, cfg: StudyConfig,
                 best_history: Sequence[dict] = (), best_number: Optional[int] = None) -> None:
        self.trial, self.cfg = trial, cfg
        self.best_history, self.best_number = list(best_history), best_number
        self.history: list[dict] = []
        self.batch_size, self.warmup_steps, self.total_steps = 1, 0, 0

    def on_start(self, config: dict) -> None:
        self.batch_size = int(config.get("batch_size", 1))
        self.total_steps = int(config.get("total_steps", 0))
        self.warmup_steps = config.get("warmup_steps") or round(
            config.get("warmup_fraction", 0) * self.total_steps)
        self.trial.set_user_attr("history", [])  # a retry inherits its failed run's record

    def on_eval(self, step: int, metrics: dict) -> None:
        tokens = step * self.batch_size
        self.history.append({"step": step, "train/tokens": tokens,
                             **{k: float(v) for k, v in metrics.items()}})
        self.trial.set_user_attr("history", self.history)
        objective = self.cfg.objectives[0] if len(self.cfg.objectives) == 1 else None
        if objective in metrics:  # Optuna prunes single-objective studies only
            self.trial.report(float(metrics[objective]), tokens)
        if step >= self.total_steps > 0:
            return  # the last evaluation: the trial is done, stopping it would only lose it
        if objective in metrics and self.trial.should_prune():
            raise StopTraining(f"pruned by {self.cfg.pruner} at {tokens} tokens: "
                               f"{objective}={metrics[objective]:.4g}")
        dead = metrics.get("val/dead_fraction")
        if step > self.warmup_steps and dead is not None and dead > self.cfg.max_dead_fraction:
            raise StopTraining(f"guard: val/dead_fraction={dead:.3f} > study.max_dead_fraction="
                               f"{self.cfg.max_dead_fraction} after warm-up (step {step})")
        ref = _at_tokens(self.best_history, tokens)
        nmse = metrics.get("val/nmse")
        if ref is not None and nmse is not None and nmse > self.cfg.max_loss_ratio * ref:
            raise StopTraining(f"guard: val/nmse={nmse:.4g} > study.max_loss_ratio="
                               f"{self.cfg.max_loss_ratio} x {ref:.4g} (best trial "
                               f"#{self.best_number} at {tokens} tokens)")


def _at_tokens(history: Sequence[dict], tokens: int) -> Optional[float]:
    """The reference val/nmse at the last evaluation at or before ``tokens``."""
    before = [h for h in history if h.get("train/tokens", 0) <= tokens and "val/nmse" in h]
    return before[-1]["val/nmse"] if before else None


def comparable(config: dict) -> str:
    """Trials whose val/nmse can be compared: same model, data, layer and component."""
    keep = {k: config.get(k) for k in ("model", "data", "layer", "component")}
    return json.dumps(keep, sort_keys=True, default=str)


def best_reference(study: optuna.Study, like: Optional[dict] = None) -> tuple[list[dict], Optional[int]]:
    """History and number of the completed trial with the lowest final val/nmse
    (among those ``comparable`` with the trial config ``like``, if given)."""
    key = comparable(like) if like is not None else None
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "val/nmse" in t.user_attrs.get("metrics", {})
            and (key is None or comparable(t.user_attrs.get("config", {})) == key)]
    if not done:
        return [], None
    best = min(done, key=lambda t: t.user_attrs["metrics"]["val/nmse"])
    return best.user_attrs.get("history", []), best.number


# ---------------------------------------------------------------- the job's end

@dataclass(frozen=True)
class TrialLink:
    """Where a launched job's Optuna trial lives. The sweeper passes it as hidden
    overrides (``+saelab_trial.*``); the job, in whatever process or machine the
    launcher runs it, opens the storage and rebuilds the trial from it."""

    KEY: ClassVar[str] = "saelab_trial"

    storage: str
    """Absolute storage URL (a relative sqlite path would depend on the job's cwd)."""
    study: str
    trial_id: int

    def overrides(self) -> list[str]:
        def quoted(v: str) -> str:  # Hydra's grammar: URLs hold ':', '@', '?', '='
            return "'" + v.replace("'", "\\'") + "'"

        return [f"+{self.KEY}.storage={quoted(self.storage)}",
                f"+{self.KEY}.study={quoted(self.study)}", f"+{self.KEY}.trial_id={self.trial_id}"]

    @classmethod
    def pop(cls, config: dict) -> Optional["TrialLink"]:
        """Remove the link from a job's resolved config (it is not part of the trial)."""
        link = config.pop(cls.KEY, None)
        return cls(**link) if link is not None else None


def run_linked_job(task: Callable[..., Any], cfg: Any) -> Any:
    """The Hydra task of every sweep job: ``functools.partial(run_linked_job, task)``
    (picklable, so any launcher can ship it). Opens the trial of the job's
    ``saelab_trial`` key and runs ``task(cfg, callbacks=[its OptunaCallback])``, the
    loss guard referenced to comparable completed trials."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg, resolve=True)
    link = TrialLink.pop(config)
    if link is None:
        return task(cfg)
    scfg = replace(trial_from_dict(config).study, storage=link.storage)
    storage = open_storage(scfg)
    try:
        # the job never asks: the cheapest sampler will do; the pruner must be the study's
        study = optuna.load_study(study_name=link.study, storage=storage,
                                  sampler=optuna.samplers.RandomSampler(), pruner=make_pruner(scfg))
        trial = optuna.trial.Trial(study, link.trial_id)
        storage.set_trial_system_attr(link.trial_id, JOB_ATTR, worker_id())
        check_memory(trial_from_dict(config))
        cb = OptunaCallback(trial, scfg, *best_reference(study, config))
        return task(cfg, callbacks=[cb])
    finally:
        close_storage(storage)


def _available_bytes() -> Optional[int]:
    """Memory this process can still take: MemAvailable, capped by RLIMIT_AS (Linux)."""
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            free = min(free, soft - int(status["VmSize"].split()[0]) * 1024)
        return free
    except (OSError, KeyError, ValueError):
        return None  # not Linux: no check


def check_memory(cfg: TrialConfig) -> None:
    """MemoryError when the SAE, its gradients and Adam's two moments (float32) cannot fit:
    MLX would crash the whole worker on the failed allocation, losing the sweep; this
    fails only the trial, with its reason."""
    from saelab.models import model_info

    d_model = model_info(cfg.model).d_model
    d_hidden = cfg.sae.expansion_factor * d_model
    params = d_model * d_hidden * (1 if cfg.sae.tied_weights else 2) + d_hidden + d_model
    need = 4 * (4 * params + 4 * cfg.sae.batch_size * d_hidden)  # + a batch's activations
    free = _available_bytes()
    if free is not None and need > free:
        raise MemoryError(f"sae.expansion_factor={cfg.sae.expansion_factor} (d_hidden={d_hidden}) "
                          f"needs ~{need / 2**30:.1f} GiB for the SAE, its gradients and Adam "
                          f"state; {max(free, 0) / 2**30:.1f} GiB available")


# ---------------------------------------------------------------- records

def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def finish_trial(study: optuna.Study, trial: optuna.Trial, cfg: StudyConfig, outcome: Any,
                 history: Sequence[dict], config: Optional[dict], run_dir: Optional[str]) -> FrozenTrial:
    """Record ``outcome`` (a TrialResult or the exception the trial raised) and tell Optuna.
    Raises ValueError if an objective is missing from a finished trial's metrics
    (a sweep configuration error: every trial would fail the same way)."""
    attrs: dict[str, Any] = {"history": list(history), "run_dir": run_dir}
    if config is not None:
        attrs["config"] = config
    state, values, missing = TrialState.FAIL, None, []
    if isinstance(outcome, StopTraining):
        state, attrs["prune_reason"] = TrialState.PRUNED, outcome.reason
    elif isinstance(outcome, TrainingDiverged):
        attrs["fail_reason"], attrs["diverged"] = f"diverged: {outcome.reason}", True
    elif isinstance(outcome, BaseException):
        tail = "".join(traceback.format_exception(outcome)[-6:])
        attrs["fail_reason"] = f"{type(outcome).__name__}: {outcome}\n{tail}"[-2000:]
    else:
        metrics = {k: float(v) for k, v in outcome.metrics.items()}
        attrs.update(metrics=metrics, sae_path=outcome.sae_path, run_dir=outcome.output_dir,
                     history=list(history) or list(outcome.history),  # ours has train/tokens
                     wandb_run_dir=getattr(outcome, "wandb_run_dir", None))
        missing = [o for o in cfg.objectives if o not in metrics]
        values = [metrics.get(o) for o in cfg.objectives]
        if missing:
            attrs["fail_reason"] = f"objectives {missing} not in metrics {sorted(metrics)}"
        elif not all(_finite(v) for v in values):
            attrs["fail_reason"] = f"non-finite objective values {values}"
        else:
            state = TrialState.COMPLETE
    # samplers also read pruned trials' constraints: judge them by their last evaluation
    seen = attrs.get("metrics") or (attrs["history"][-1] if attrs["history"] else {})
    for m, bound in cfg.constraints.items():
        trial.set_constraint(m, seen[m] - bound if _finite(seen.get(m)) else math.inf)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    try:
        frozen = study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    except RuntimeError as e:  # GridSampler calls study.stop() once the grid is covered
        if "Study.stop" not in str(e):
            raise
        frozen = study._storage.get_trial(trial._trial_id)  # tell stores the trial regardless
    if missing:
        raise ValueError(f"study.objectives={list(cfg.objectives)} is not valid: {missing} are "
                         f"not metrics of a trial; allowed: {sorted(outcome.metrics)}")
    return frozen

