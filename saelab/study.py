"""The Optuna side of a sweep: storage, study, samplers, pruners, the training
callback, the records each trial leaves, and the ``saelab trials`` table.

The Hydra sweeper (``hydra_plugins/saelab_sweeper``) drives these; so can any
script. A trial's record lives in its user attributes: ``config`` (the
resolved trial config), ``metrics`` (final), ``history`` (validation metrics
at each evaluation), ``sae_path``, ``run_dir``, ``wandb_run_dir``,
``constraints`` and ``prune_reason``/``fail_reason``.

Dead workers: every running trial beats in the storage (Optuna's RDB
heartbeat; the journal storage gets the same through system attributes here)
and carries its worker's ``host:pid:start``. A trial whose worker is gone is
failed and re-queued with the same params (``RetryHeartbeatStaleTrialCallback``):
at once when the worker ran on this machine, after ``grace_period`` otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import optuna
from filelock import FileLock
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DBAPIError

from saelab.config import StudyConfig, TrialConfig
from saelab.train import Callback, StopTraining, TrainingDiverged

WORKER_ATTR = "saelab:worker"
HEARTBEAT_ATTR = "saelab:heartbeat"
KEY_METRICS = ("val/nmse", "val/nmse_p99", "val/l0", "val/dead_fraction", "time/wall_s")

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats, stale-trial failing and retries are "experimental" but stable since Optuna 2.9
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# ask/tell with heartbeats is what the sweeper does on purpose (it runs the heartbeat thread)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# ---------------------------------------------------------------- storage & study

class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with heartbeats (Optuna has them for RDB only):
    the beat is a system attribute, so ``fail_stale_trials`` works the same."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int, callback) -> None:
        super().__init__(JournalFileBackend(path))
        self.url = f"journal://{path}"
        self._interval, self._grace, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [t._trial_id for t in running
                if HEARTBEAT_ATTR in t.system_attrs and now - t.system_attrs[HEARTBEAT_ATTR] > self._grace]

    def get_heartbeat_interval(self) -> int:
        return self._interval

    def get_heartbeat_stale_trial_callback(self):
        return self._callback


def open_storage(cfg: StudyConfig) -> BaseStorage:
    """``sqlite:///rel/path`` (relative to the cwd; parent dirs created),
    ``journal:///path``, or any SQLAlchemy URL (postgresql, mysql); with heartbeats."""
    url = cfg.storage
    retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
    try:
        if url.startswith("journal://"):
            path = Path(url[len("journal://"):]).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(str(path), cfg.heartbeat_interval, cfg.grace_period, retry)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url[len("sqlite:///"):]).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        # SQLite: wait on a locked database instead of failing at once (several workers write)
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        for attempt in range(3):  # workers starting together may race to create the schema
            try:
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_interval,
                                  grace_period=cfg.grace_period, heartbeat_stale_trial_callback=retry)
            except DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(1.0)
    except Exception as e:  # noqa: BLE001  (any driver error means: cannot be opened)
        raise ValueError(f"study.storage={cfg.storage!r} cannot be opened ({type(e).__name__}: {e}); "
                         "allowed: sqlite:///path.db, journal:///path.log, postgresql://..., "
                         "mysql://...") from e


def constraints_of(trial: FrozenTrial) -> list[float]:
    """Optuna ``constraints_func``: <= 0 is feasible; read from the trial's record."""
    return list(trial.user_attrs.get("constraints", []))


def make_sampler(cfg: StudyConfig, grid: Optional[dict[str, list]] = None,
                 seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler named by ``cfg.sampler``. ``seed_offset`` keeps workers and
    resumed runs from replaying the same random draws."""
    seed = cfg.seed + seed_offset
    cons = constraints_of if cfg.constraints else None
    if cfg.sampler == "tpe":
        startup = min(10, max(2, cfg.n_trials // 3))  # small studies still get model-based trials
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constraints_func=cons)
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cons,
                                             population_size=max(2, min(50, cfg.n_trials // 2)))
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid or {}, seed=seed)
    if cfg.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=cfg.seed)  # QMC indexes its sequence by trial number
    return optuna.samplers.GPSampler(seed=seed, constraints_func=cons)


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


def open_existing_storage(url: str) -> BaseStorage:
    """Open an Optuna storage that must already exist (never creates an empty database)."""
    for scheme in ("sqlite:///", "journal://"):
        if url.startswith(scheme) and url != "sqlite:///:memory:":
            path = Path(url[len(scheme):]).expanduser()
            if not path.is_file():
                raise ValueError(f"--storage={url!r} does not exist: no such database file "
                                 f"{path.resolve()}; "
                                 "allowed: the storage a sweep wrote, e.g. sqlite:///outputs/optuna.db")
    return open_storage(StudyConfig(storage=url))


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    """Load study ``name``; a clear ValueError (listing the studies there) if it is absent."""
    storage = open_existing_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ValueError(f"study={name!r} is not in {storage_url}; allowed: "
                         f"{', '.join(sorted(names)) or '(no studies in this storage)'}")
    return optuna.load_study(study_name=name, storage=storage)


def objectives_of(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives") or
                [f"value_{i}" for i in range(len(study.directions))])


# ---------------------------------------------------------------- workers & budget

def _start_time(pid: int) -> Optional[str]:
    try:  # field 22 of /proc/<pid>/stat: start time, tells a reused pid apart
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def worker_alive(worker: str) -> Optional[bool]:
    """True/False for a worker on this machine, None for another machine's."""
    host, pid, start = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(int(pid))
    return now is None or start == "None" or now == start


def ask_lock(study: optuna.Study) -> FileLock:
    """Held while counting and asking, so this machine's workers never overshoot n_trials."""
    storage = study._storage
    url = getattr(storage, "url", None) or getattr(getattr(storage, "_backend", None), "url", "")
    digest = hashlib.sha1(f"{url}|{study.study_name}".encode()).hexdigest()[:16]
    return FileLock(str(Path(tempfile.gettempdir()) / f"saelab-study-{digest}.lock"))


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark ``trial`` as run by this process."""
    study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker_id())


def reap_dead_trials(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """Fail (and re-queue) running trials whose worker died; returns their numbers."""
    storage, retry = study._storage, RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retry)
    reaped = []
    for t in study.get_trials(deepcopy=True, states=(TrialState.RUNNING,)):
        worker = t.system_attrs.get(WORKER_ATTR)
        if worker is None or worker_alive(worker) is not False:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died")
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry(study, t)  # the snapshot without fail_reason: the retry starts clean
                reaped.append(t.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first
    optuna.storages.fail_stale_trials(study)
    return reaped


@dataclass
class Budget:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0

    @property
    def used(self) -> int:
        """Trials that count toward ``n_trials``: finished (a failure that was
        re-queued counts through its retry) plus running."""
        return self.complete + self.pruned + self.failed + self.running


def budget(study: optuna.Study) -> Budget:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    b = Budget()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            b.complete += 1
        elif t.state == TrialState.PRUNED:
            b.pruned += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            b.failed += 1
        elif t.state == TrialState.RUNNING:
            b.running += 1
    return b


def unowned_running(study: optuna.Study) -> list[int]:
    """Running trials not known to be alive on this machine (another machine's,
    or a dead worker's that the heartbeat has not yet declared stale)."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not (w := t.system_attrs.get(WORKER_ATTR)) or worker_alive(w) is not True]


# ---------------------------------------------------------------- the training callback

class OptunaCallback(Callback):
    """Reports intermediate values, prunes, applies the guard rules, keeps the history."""

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

    def on_eval(self, step: int, metrics: dict) -> None:
        tokens = step * self.batch_size
        self.history.append({"step": step, "train/tokens": tokens,
                             **{k: float(v) for k, v in metrics.items()}})
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


_ACTIVE: Optional[OptunaCallback] = None


def set_active(cb: Optional[OptunaCallback]) -> None:
    """The callback the next in-process trial gets (the sweeper sets it around a launch)."""
    global _ACTIVE
    _ACTIVE = cb


def callback_factory(cfg: TrialConfig) -> Callback:
    """Registered in ``saelab.trial.CALLBACK_FACTORIES`` by the sweeper: the
    active trial's callback, its loss guard referenced to comparable trials."""
    if _ACTIVE is None:
        return Callback()
    _ACTIVE.best_history, _ACTIVE.best_number = best_reference(_ACTIVE.trial.study, asdict(cfg))
    return _ACTIVE


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
    # constraints_func also reads pruned trials: judge them by their last evaluation
    seen = attrs.get("metrics") or (attrs["history"][-1] if attrs["history"] else {})
    attrs["constraints"] = [seen[m] - b if _finite(seen.get(m)) else math.inf
                            for m, b in cfg.constraints.items()]
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


# ---------------------------------------------------------------- tables & summaries

def trial_rows(study: optuna.Study) -> tuple[list[str], list[list[Any]]]:
    """One row per trial: number, state, Pareto mark, params, objectives, key metrics, reason."""
    trials = study.get_trials(deepcopy=False)
    objectives = objectives_of(study)
    pareto = {t.number for t in study.best_trials} if any(
        t.state == TrialState.COMPLETE for t in trials) else set()
    params = sorted({p for t in trials for p in t.params})
    metrics = [m for m in KEY_METRICS if m not in objectives]
    cols = ["trial", "state", "pareto", *params, *objectives, *metrics, "reason"]
    rows = []
    for t in trials:
        m = t.user_attrs.get("metrics", {})
        vals = list(t.values) if t.values else [None] * len(objectives)
        reason = t.user_attrs.get("prune_reason") or t.user_attrs.get("fail_reason") or ""
        if t.system_attrs.get("failed_trial") is not None:
            reason = f"retry of #{t.system_attrs['failed_trial']} {reason}".strip()
        reason = reason.splitlines()[0][:80] if reason else ""
        rows.append([t.number, t.state.name, t.number in pareto, *(t.params.get(p) for p in params),
                     *vals, *(m.get(k) for k in metrics), reason])
    return cols, rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "*" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_trials(study: optuna.Study) -> None:
    cols, rows = trial_rows(study)
    title = f"study {study.study_name}: {len(rows)} trials (* = Pareto set)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(_fmt(r[i])) for r in rows)) if rows else len(c)
                  for i, c in enumerate(cols)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
        for r in rows:
            print("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*(_fmt(v) for v in r))
    console = Console()
    if not console.is_terminal:  # logs and pipes: no 80-column wrapping
        console = Console(width=240)
    console.print(table)


def log_summary_run(study: optuna.Study, project: str, directory: str) -> Optional[str]:
    """One W&B run per study: a table of all trials with the Pareto set marked, and the
    report's figures (Pareto front, NMSE vs L0/expansion, history, importances, curves)."""
    import wandb

    from saelab.report import report_figures

    cols, rows = trial_rows(study)
    run = wandb.init(project=project, group=study.study_name, name=f"{study.study_name}-summary",
                     job_type="study-summary", dir=directory, reinit="create_new",
                     mode=os.environ.get("WANDB_MODE", "offline"),
                     settings=wandb.Settings(silent=True, x_disable_stats=True),
                     config={"study": study.study_name, **study.user_attrs})
    table = wandb.Table(columns=[c.replace("pareto", "is_pareto") for c in cols],
                        data=[[v if not isinstance(v, float) or math.isfinite(v) else None
                               for v in r] for r in rows])
    pareto = [r[0] for r in rows if r[2]]
    figures = report_figures(study, [t for t in study.get_trials(deepcopy=False) if t.number in pareto])
    run.log({"trials": table, **{f"report/{name}": fig for name, fig in figures.items()}})
    b = budget(study)
    run.summary.update({"n_complete": b.complete, "n_pruned": b.pruned, "n_failed": b.failed,
                        "pareto_trials": pareto})
    run_dir = os.path.dirname(run.dir)
    run.finish()
    return run_dir


def trials_main(argv: Sequence[str]) -> int:
    """``saelab trials STUDY [--storage URL]``."""
    p = argparse.ArgumentParser(prog="saelab trials", description="Table of a study's trials.")
    p.add_argument("study", help="study name (study.name of the sweep)")
    p.add_argument("--storage", default=StudyConfig.storage, help="Optuna storage URL")
    args = p.parse_args(list(argv))
    try:
        study = load_existing_study(args.study, args.storage)
    except ValueError as e:
        print(f"saelab trials: {e}", file=sys.stderr)
        return 2
    print_trials(study)
    return 0
