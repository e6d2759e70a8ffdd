"""saelab's Hydra sweeper: an Optuna study whose trials run as jobs of Hydra's
launcher (``hydra/sweeper=saelab``; sweep files select it): in-process by default,
in worker processes with ``hydra/launcher=joblib``, on SLURM with submitit.

This is the Hydra adapter only: the search space (``study.params`` plus the
command line's sweep overrides) is ``saelab.search_space``'s, the study and its
records ``saelab.study``'s, storages and workers ``saelab.storage``'s. Every
activation the study can need (each (layer, component) the space can produce, per
model/data setting) is captured before the first trial, one forward pass per
setting. ``study.n_jobs`` > 1 starts that many worker
processes in all (this one included) that share the study; any shell or
machine can add workers by running the same command (``study.n_jobs=1`` adds
exactly one). Workers stop asking once finished + running trials reach
``n_trials``. Each job gets its trial's ``saelab.study.TrialLink`` as hidden
overrides and reaches the trial through the storage (``run_linked_job``), so
pruning, guards and records do not depend on where the launcher runs it.

Module-level imports stay light (saelab is imported inside the methods):
Hydra imports every plugin module on each start, sweep or not.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from saelab.search_space import SearchSpace

log = logging.getLogger(__name__)

WORKER_ENV = "SAELAB_SWEEP_WORKER"
"""Set (to the worker index) in worker processes started by a sweep's first process."""


@dataclass
class SaelabSweeperConf:
    _target_: str = "hydra_plugins.saelab_sweeper.saelab_sweeper.SaelabSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="saelab", node=SaelabSweeperConf,
                             provider="saelab")


# ---------------------------------------------------------------- workers

def _die_with_parent() -> None:
    """preexec_fn: the kernel kills this worker when the sweep's first process dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: workers outlive a killed parent and finish the study


def spawn_workers(n: int, log_dir: Path) -> list[subprocess.Popen]:
    """Re-run this command line ``n`` times as extra workers (output to worker_<i>.log)."""
    argv = list(getattr(sys, "orig_argv", []))[1:]
    if not argv or argv[0] == "-c":
        raise ValueError("study.n_jobs > 1 needs a command line to re-run (saelab sweep ...); "
                         "allowed with python -c: study.n_jobs=1")
    procs = []
    log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        with open(log_dir / f"worker_{i}.log", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, WORKER_ENV: str(i)},
                                          preexec_fn=_die_with_parent))
    log.info("started %d worker processes (logs: %s/worker_*.log)", n, log_dir)
    return procs


def _check_writable(directory: Path) -> None:
    """A read-only or full output disk fails the sweep before its first trial."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"hydra.sweep.dir={str(directory)!r} is not writable ({e.strerror or e}); "
                         "allowed: a writable directory (set SAELAB_OUTPUTS or hydra.sweep.dir)") from e


# ---------------------------------------------------------------- the sweeper

class SaelabSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        from saelab.study import run_linked_job

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context,
            task_function=functools.partial(run_linked_job, task_function))

    def _task_dict(self) -> dict:
        task = OmegaConf.to_container(self.config, resolve=False)
        task.pop("hydra", None)
        try:
            return OmegaConf.to_container(OmegaConf.create(task), resolve=True)
        except Exception:  # noqa: BLE001  (hydra-only interpolations resolve per job)
            return task

    def plan(self, arguments: Sequence[str]) -> tuple[dict, Any, "SearchSpace", Optional[dict], int]:
        """Everything checked before a study exists: (task config, StudyConfig,
        search space, grid or None, trials wanted). Raises ValueError."""
        from saelab.configs import trial_from_dict
        from saelab.search_space import (corner_values, grid_of, parse_search_space,
                                         trial_overrides, validate_search_space)

        task = self._task_dict()
        scfg = trial_from_dict(task).study
        space = parse_search_space(scfg.params, arguments)
        groups = list(OmegaConf.to_container(self.config.hydra.runtime.choices).keys())
        checked = validate_search_space(task, space, groups)
        if space.distributions:  # one composition through Hydra catches schema/type errors
            first = {k: corner_values(d)[0] for k, d in space.distributions.items()}
            self.validate_batch_is_legal([trial_overrides(space, first)])
        if scfg.sampler == "gp":
            try:
                import torch  # noqa: F401
            except ImportError as e:
                raise ValueError("study.sampler='gp' needs PyTorch (pip install torch); allowed "
                                 "without it: tpe, nsga2, random, grid, qmc") from e
        grid = grid_of(space) if scfg.sampler == "grid" else None
        n_trials = min(scfg.n_trials, math.prod(map(len, grid.values()))) if grid else scfg.n_trials
        log.info("study %s in %s: %d params (%d corner points valid), %d trials",
                 scfg.name, scfg.storage, len(space.distributions), checked, n_trials)
        return task, scfg, space, grid, n_trials

    def sweep(self, arguments: List[str]) -> Any:
        from saelab import storage as sg
        from saelab import study as st
        from saelab.search_space import capture_pairs

        task, scfg, space, grid, n_trials = self.plan(arguments)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        _check_writable(sweep_dir)
        worker = int(os.environ.get(WORKER_ENV, "0"))
        study = st.open_study(scfg)
        study.sampler = st.make_sampler(scfg, grid, seed_offset=7919 * worker + len(study.trials))
        plan = capture_pairs(task, space)
        if plan:  # before any trial: a death while capturing is never a trial's failure
            from saelab.cache import ensure_activations

            for cfg, pairs in plan:  # other workers wait on the cache's locks, then reuse it
                log.info("capturing %d (layer, component) pairs in one pass", len(pairs))
                ensure_activations(cfg.model, cfg.data, pairs, root=cfg.cache_dir)
        else:
            log.info("no capture before the trials (a continuous or group-swept model/data key, "
                     "or a per-job cache_dir): each trial captures its own")
        procs = spawn_workers(scfg.n_jobs - 1, sweep_dir) if worker == 0 and scfg.n_jobs > 1 else []
        try:
            self._loop(study, scfg, space, n_trials, sg.ask_lock(study))
        finally:
            for p in procs:
                if p.wait() != 0:
                    log.warning("worker pid %d exited with %d (see %s/worker_*.log)",
                                p.pid, p.returncode, sweep_dir)
        if worker == 0:
            self._summarize(study, task, sweep_dir)
        return study

    def _loop(self, study, scfg, space: "SearchSpace", n_trials: int, lock) -> None:
        from saelab import storage as sg

        waited_since = None
        while True:
            with lock:  # count + ask atomically among this machine's workers
                reaped = sg.reap_dead_trials(study, scfg)
                if reaped:
                    log.info("trials %s lost their worker: failed and re-queued", reaped)
                trial = study.ask() if sg.budget(study).used < n_trials else None
                if trial is not None:
                    sg.claim(study, trial)
            if trial is None:
                pending = sg.unowned_running(study)
                if not pending:
                    return
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > 2 * scfg.grace_period + scfg.heartbeat_interval:
                    log.warning("giving up waiting for running trials %s", pending)
                    return
                log.info("waiting for running trials %s (other workers or stale)", pending)
                time.sleep(min(5, scfg.heartbeat_interval))
                continue
            waited_since = None
            self._run(study, trial, scfg, space)

    def _run(self, study, trial, scfg, space: "SearchSpace") -> None:
        from hydra.core.utils import JobStatus
        from optuna.storages._heartbeat import get_heartbeat_thread

        from saelab import storage as sg
        from saelab import study as st
        from saelab.errors import OutputFailure, is_output_failure
        from saelab.search_space import suggest, trial_overrides
        from saelab.storage import storage_url

        overrides = trial_overrides(space, suggest(trial, space))
        taken = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        for key, value in (("sae.wandb_group", scfg.name), ("sae.wandb_name", f"trial_{trial.number}")):
            if key not in taken:
                overrides.append(f"{key}={value}")
        link = st.TrialLink(storage_url(study._storage), study.study_name, trial._trial_id)
        ret, outcome = None, None
        with get_heartbeat_thread(trial._trial_id, study._storage):
            try:
                (ret,) = self.launcher.launch([overrides + link.overrides()],
                                              initial_job_idx=trial.number)
                outcome = ret.return_value if ret.status == JobStatus.COMPLETED else ret._return_value
            except Exception as e:  # noqa: BLE001  (composition errors, lost job processes: this trial only)
                outcome = e
        config = run_dir = None
        if ret is not None and ret.cfg is not None:
            try:
                config = OmegaConf.to_container(ret.cfg, resolve=True)
            except Exception:  # noqa: BLE001
                config = OmegaConf.to_container(ret.cfg, resolve=False)
            st.TrialLink.pop(config)
            run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir)
        before = study._storage.get_trial(trial._trial_id)  # as the job left it
        lost_output = isinstance(outcome, BaseException) and is_output_failure(outcome)
        if lost_output:  # the machine's fault, not the trial's: run it again after the fix
            sg.requeue(study, before, scfg)
        frozen = st.finish_trial(study, trial, scfg, outcome, before.user_attrs.get("history", []),
                                 config, run_dir)
        reason = frozen.user_attrs.get("prune_reason") or frozen.user_attrs.get("fail_reason") or ""
        log.info("trial %d %s %s %s", frozen.number, frozen.state.name, frozen.values or "",
                 reason.splitlines()[0] if reason else "")
        if lost_output:  # later trials would fail the same way: stop here
            where = Path(run_dir or str(self.config.hydra.sweep.dir))
            free = shutil.disk_usage(where if where.exists() else where.parent).free / 2**20
            raise OutputFailure(
                f"trial {frozen.number} could not write its output under {where} "
                f"({reason.splitlines()[0]}; {free:.0f} MiB free there); it is re-queued: free "
                "space or fix the directory, then re-run the same command to resume")

    def _summarize(self, study, task: dict, sweep_dir: Path) -> None:
        from saelab.paths import atomic_write_text, outputs_root
        from saelab.trials import log_summary_run, print_trials, trial_rows

        print_trials(study)
        cols, rows = trial_rows(study)
        results = {"study": study.study_name, "objectives": study.user_attrs.get("objectives"),
                   "pareto": [{c: v for c, v in zip(cols, r) if c not in ("pareto", "reason")}
                              for r in rows if r[2]]}
        atomic_write_text(sweep_dir / "optimization_results.yaml",
                          OmegaConf.to_yaml(OmegaConf.create(results)))
        sae = task.get("sae", {})
        if sae.get("use_wandb"):
            run_dir = log_summary_run(study, sae.get("wandb_project", "saelab"), str(outputs_root()))
            log.info("study summary W&B run: %s", run_dir)
