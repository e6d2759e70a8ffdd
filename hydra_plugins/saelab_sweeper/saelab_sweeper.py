"""saelab's Hydra sweeper: an Optuna study whose trials run in-process through
Hydra's launcher (``hydra/sweeper=saelab``; sweep files select it).

The search space is ``study.params`` (config key -> override grammar) plus the
command line's sweep overrides (``sae.k=16,32``, ``sae.k=choice(16,32)``,
``range(...)``, ``interval(...)``, ``tag(log, interval(...))``), as in
hydra-optuna-sweeper. It is validated at every corner point before any trial
runs. A layer/component scan captures all the activations it needs in one
forward pass before the first trial. ``study.n_jobs`` > 1 starts that many
worker processes in all (this one included) that share the study; any shell
or machine can add workers by running the same command (``study.n_jobs=1``
adds exactly one). Workers stop asking once finished + running trials reach
``n_trials``.

Module-level imports stay light: Hydra imports every plugin module on each start.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
import copy
import itertools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

WORKER_ENV = "SAELAB_SWEEP_WORKER"
"""Set (to the worker index) in worker processes started by a sweep's first process."""

MAX_POINTS = 4096
"""Corner points validated one by one; larger spaces are checked per parameter."""


@dataclass
class SaelabSweeperConf:
    _target_: str = "hydra_plugins.saelab_sweeper.saelab_sweeper.SaelabSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="saelab", node=SaelabSweeperConf,
                             provider="saelab")


# ---------------------------------------------------------------- search space

@dataclass
class SearchSpace:
    distributions: dict[str, Any] = field(default_factory=dict)
    """Config key -> optuna distribution."""
    fixed: list[str] = field(default_factory=list)
    """Overrides every trial gets unchanged (command-line values, groups, hydra.*)."""


def _distribution(override) -> Any:
    """An optuna distribution from a sweep override (Hydra's grammar)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise ValueError(f"{key}={override.input_line.split('=', 1)[1]} is empty; allowed: "
                             "one or more choices")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():  # Hydra's range excludes stop, like Python's
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{key}: range({value.start}, {value.stop}, {value.step}) is empty; "
                             "allowed: a range with at least one value")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_interval_sweep():
        lo, hi, is_log = value.start, value.end, "log" in value.tags
        if not lo < hi or (is_log and lo <= 0):
            raise ValueError(f"{key}: interval({lo}, {hi}) is empty or invalid; allowed: start < end"
                             f"{' and start > 0 for tag(log, ...)' if is_log else ''}")
        if isinstance(lo, int) and isinstance(hi, int):
            return IntDistribution(lo, hi, log=is_log)
        return FloatDistribution(float(lo), float(hi), log=is_log)
    raise ValueError(f"{override.input_line}: sweep kind not supported; allowed: choice, range, "
                     "interval, tag(log, interval(...))")


def parse_search_space(params: Mapping[str, Any], arguments: Sequence[str]) -> SearchSpace:
    """``study.params`` then the command line; a later value for a key replaces
    an earlier one (``sae.k=32`` on the command line fixes a swept ``sae.k``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    space = SearchSpace()
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        space.distributions.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space.distributions[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    space.fixed = list(fixed.values())
    return space


def corner_values(dist) -> list:
    """The values that bound a distribution (all choices, or both ends)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high] if dist.low != dist.high else [dist.low]


def grid_of(space: SearchSpace) -> dict[str, list]:
    """The GridSampler's grid; every parameter must be discrete."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    grid = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif d.step is not None and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step)) + 1
            grid[key] = [type(d.low)(d.low + i * d.step) if isinstance(d, IntDistribution)
                         else d.low + i * d.step for i in range(n)]
        else:
            raise ValueError(f"{key}: study.sampler=grid needs discrete values; allowed: choice(...) "
                             f"or range(...), not {d}")
    return grid


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def validate_search_space(task: dict, space: SearchSpace, groups: Sequence[str] = ()) -> int:
    """Check every key exists and every corner point makes a valid trial
    (values, component, layer < n_layers, k <= expansion * d_model). Raises
    ValueError naming the key or point; returns the number of points checked."""
    from saelab.config import trial_from_dict
    from saelab.models import model_info
    from saelab.trial import validate_trial

    keys = []
    for key in space.distributions:
        if key in groups:
            continue  # a config group choice: Hydra's composition checks it
        if key.startswith(("+", "~")) or key.startswith("hydra."):
            raise ValueError(f"{key}: only config values can be swept; allowed: keys of the trial "
                             "config such as sae.k, layer, component")
        if OmegaConf.select(OmegaConf.create(task), key, default="\0missing") == "\0missing":
            raise ValueError(f"{key} is not a key of the trial config; allowed: existing keys such "
                             "as sae.k, sae.expansion_factor, sae.learning_rate, layer, component")
        keys.append(key)
    corners = [corner_values(space.distributions[k]) for k in keys]
    size = 1
    for c in corners:
        size *= len(c)
    if size <= MAX_POINTS:
        points = [dict(zip(keys, p)) for p in itertools.product(*corners)]
    else:  # one parameter at a time, plus the k/expansion extremes
        points = [{k: v} for k, c in zip(keys, corners) for v in c]
        dims = [k for k in ("sae.k", "sae.expansion_factor") if k in keys]
        if len(dims) == 2:
            ks, es = corners[keys.index("sae.k")], corners[keys.index("sae.expansion_factor")]
            points.append({"sae.k": max(ks), "sae.expansion_factor": min(es)})
    infos: dict[tuple, Any] = {}
    for point in points:
        d = copy.deepcopy(task)
        for k, v in point.items():
            _set(d, k, v)
        where = ", ".join(f"{k}={v}" for k, v in point.items()) or "the base config"
        try:
            cfg = trial_from_dict(d)
            mkey = (cfg.model.name, cfg.model.dtype)
            if mkey not in infos:
                infos[mkey] = model_info(cfg.model)
            validate_trial(cfg, infos[mkey])
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep point {where}: {e}") from e
    return len(points)


def capture_pairs(task: dict, space: SearchSpace, n_trials: int) -> list[tuple[int, str]]:
    """The (layer, component) activations a layer/component scan will need, to
    capture in one forward pass before the trials; empty when trials should
    capture their own (no such scan, a swept model/data/cache, or more pairs
    than trials, where most would go unused)."""
    from optuna.distributions import CategoricalDistribution

    def values(key: str) -> list:
        d = space.distributions.get(key)
        if d is None:
            return [task[key]]
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        return list(range(d.low, d.high + 1, d.step)) if isinstance(d.low, int) else []

    keys = set(space.distributions)
    if not keys & {"layer", "component"} or "${" in str(task.get("cache_dir")) or any(
            k.split(".")[0] in ("model", "data", "cache_dir") for k in keys):
        return []
    pairs = [(int(layer), str(comp)) for layer in values("layer") for comp in values("component")]
    return pairs if 1 < len(pairs) <= n_trials else []


def format_value(v: Any) -> str:
    """A sampled value as override text."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return str(v)


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    out = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            out[key] = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            out[key] = trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        else:
            out[key] = trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
    return out


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


# ---------------------------------------------------------------- the sweeper

class SaelabSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def _task_dict(self) -> dict:
        task = OmegaConf.to_container(self.config, resolve=False)
        task.pop("hydra", None)
        try:
            return OmegaConf.to_container(OmegaConf.create(task), resolve=True)
        except Exception:  # noqa: BLE001  (hydra-only interpolations resolve per job)
            return task

    def plan(self, arguments: Sequence[str]) -> tuple[dict, Any, SearchSpace, Optional[dict], int]:
        """Everything checked before a study exists: (task config, StudyConfig,
        search space, grid or None, trials wanted). Raises ValueError."""
        from saelab.config import trial_from_dict

        task = self._task_dict()
        scfg = trial_from_dict(task).study
        space = parse_search_space(scfg.params, arguments)
        groups = list(OmegaConf.to_container(self.config.hydra.runtime.choices).keys())
        checked = validate_search_space(task, space, groups)
        if space.distributions:  # one composition through Hydra catches schema/type errors
            first = {k: corner_values(d)[0] for k, d in space.distributions.items()}
            self.validate_batch_is_legal([space.fixed + [f"{k}={format_value(v)}"
                                                         for k, v in first.items()]])
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
        from saelab import study as st
        from saelab import trial as tr

        task, scfg, space, grid, n_trials = self.plan(arguments)
        worker = int(os.environ.get(WORKER_ENV, "0"))
        study = st.open_study(scfg)
        study.sampler = st.make_sampler(scfg, grid, seed_offset=7919 * worker + len(study.trials))
        if st.callback_factory not in tr.CALLBACK_FACTORIES:
            tr.CALLBACK_FACTORIES.append(st.callback_factory)
        pairs = capture_pairs(task, space, n_trials)
        if pairs:  # one forward pass for the whole scan (the cache's locks make workers share it)
            from saelab.cache import ensure_activations
            from saelab.config import trial_from_dict

            cfg = trial_from_dict(task)
            log.info("capturing %d (layer, component) pairs in one pass", len(pairs))
            ensure_activations(cfg.model, cfg.data, pairs, root=cfg.cache_dir)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        procs = spawn_workers(scfg.n_jobs - 1, sweep_dir) if worker == 0 and scfg.n_jobs > 1 else []
        try:
            self._loop(study, scfg, space, n_trials, st.ask_lock(study))
        finally:
            for p in procs:
                if p.wait() != 0:
                    log.warning("worker pid %d exited with %d (see %s/worker_*.log)",
                                p.pid, p.returncode, sweep_dir)
        if worker == 0:
            self._summarize(study, task, sweep_dir)
        return study

    def _loop(self, study, scfg, space: SearchSpace, n_trials: int, lock) -> None:
        from saelab import study as st

        waited_since = None
        while True:
            with lock:  # count + ask atomically among this machine's workers
                reaped = st.reap_dead_trials(study, scfg)
                if reaped:
                    log.info("trials %s lost their worker: failed and re-queued", reaped)
                trial = study.ask() if st.budget(study).used < n_trials else None
                if trial is not None:
                    st.claim(study, trial)
            if trial is None:
                pending = st.unowned_running(study)
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

    def _run(self, study, trial, scfg, space: SearchSpace) -> None:
        from hydra.core.utils import JobStatus
        from optuna.storages._heartbeat import get_heartbeat_thread

        from saelab import study as st

        params = suggest(trial, space)
        overrides = space.fixed + [f"{k}={format_value(v)}" for k, v in params.items()]
        taken = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        for key, value in (("sae.wandb_group", scfg.name), ("sae.wandb_name", f"trial_{trial.number}")):
            if key not in taken:
                overrides.append(f"{key}={value}")
        cb = st.OptunaCallback(trial, scfg)  # the guard's reference is set once the config is known
        ret, outcome = None, None
        st.set_active(cb)
        try:
            with get_heartbeat_thread(trial._trial_id, study._storage):
                try:
                    (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
                    outcome = ret.return_value if ret.status == JobStatus.COMPLETED else ret._return_value
                except Exception as e:  # noqa: BLE001  (composition errors fail this trial only)
                    outcome = e
        finally:
            st.set_active(None)
        config = run_dir = None
        if ret is not None and ret.cfg is not None:
            try:
                config = OmegaConf.to_container(ret.cfg, resolve=True)
            except Exception:  # noqa: BLE001
                config = OmegaConf.to_container(ret.cfg, resolve=False)
            run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir)
        frozen = st.finish_trial(study, trial, scfg, outcome, cb.history, config, run_dir)
        reason = frozen.user_attrs.get("prune_reason") or frozen.user_attrs.get("fail_reason") or ""
        log.info("trial %d %s %s %s", frozen.number, frozen.state.name, frozen.values or "",
                 reason.splitlines()[0] if reason else "")

    def _summarize(self, study, task: dict, sweep_dir: Path) -> None:
        from saelab import study as st
        from saelab.paths import outputs_root

        st.print_trials(study)
        cols, rows = st.trial_rows(study)
        results = {"study": study.study_name, "objectives": study.user_attrs.get("objectives"),
                   "pareto": [{c: v for c, v in zip(cols, r) if c not in ("pareto", "reason")}
                              for r in rows if r[2]]}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tmp = sweep_dir / "optimization_results.yaml.tmp"
        OmegaConf.save(OmegaConf.create(results), tmp)
        os.replace(tmp, sweep_dir / "optimization_results.yaml")
        sae = task.get("sae", {})
        if sae.get("use_wandb"):
            run_dir = st.log_summary_run(study, sae.get("wandb_project", "saelab"), str(outputs_root()))
            log.info("study summary W&B run: %s", run_dir)
