"""End-to-end sweeps: real `saelab sweep` subprocesses (Hydra + the saelab
sweeper), real Optuna SQLite studies, real training on the default model.

Trials are tiny (sweeps/smoke.yaml: 4k captured tokens, 20k token-steps). The first
test reads the session's smoke study (tests/conftest.py; the export and report tests use
it too); the others but the two-worker and layer-scan ones read its activation cache,
captured once. Downstream metrics (a model load per process and a forward pass per trial)
are asserted on the smoke study and kept in the two-worker test (they keep the first
worker's trials long enough for the second to join); the other sweeps turn them off.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from saelab.config import StudyConfig
from saelab.evals import DOWNSTREAM_METRICS
from saelab.storage import JOB_ATTR, WORKER_ATTR
from saelab.study import open_study
from saelab.trials import trials_main
from wandb_offline import read_run

pytestmark = pytest.mark.slow  # `saelab sweep` subprocesses training on the default model

SEED_METRICS = {"train/loss", "train/recon_loss", "train/l0", "train/dead_fraction", "train/l1_loss",
                "train/learning_rate", "val/loss", "val/l0", "val/dead_fraction"}
NO_DOWNSTREAM = "sae.downstream_eval=off"


def sweep_cmd(tmp: Path, name: str, *overrides: str, storage: str = "") -> list[str]:
    return [sys.executable, "-m", "saelab.cli", "sweep", "sweep=smoke", f"study.name={name}",
            f"study.storage={storage or f'sqlite:///{tmp}/optuna.db'}", *overrides]


def sweep_env(tmp: Path, cache: Path) -> dict:
    return {**os.environ, "SAELAB_OUTPUTS": str(tmp / "out"), "SAELAB_ACT_CACHE": str(cache),
            "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}


def run_sweep(tmp: Path, cache: Path, name: str, *overrides: str, check: bool = True,
              storage: str = ""):
    p = subprocess.run(sweep_cmd(tmp, name, *overrides, storage=storage), cwd=tmp, env=sweep_env(tmp, cache),
                       capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def load(tmp: Path, name: str, storage: str = "") -> optuna.Study:
    if storage:
        return open_study(StudyConfig(name=name, storage=storage))
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")


def test_four_trials_record_everything(smoke, capsys):
    """The session's smoke study (tests/conftest.py): 4 trials of TPE with a constraint."""
    assert "FutureWarning" not in smoke.output  # Optuna 5 warned about constraints_func
    study = smoke.load()
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(t.constraints == {"val/dead_fraction": pytest.approx(t.values[1] - 0.5)}
               for t in trials)  # Trial.set_constraint's record, read by the samplers
    assert study.user_attrs["objectives"] == ["val/nmse", "val/dead_fraction"]
    for t in trials:
        assert len(t.values) == 2 and set(t.params) == {"sae.k", "sae.learning_rate"}
        a = t.user_attrs
        assert a["metrics"]["val/nmse"] == t.values[0] and a["metrics"]["val/dead_fraction"] == t.values[1]
        assert a["config"]["sae"]["k"] == t.params["sae.k"]
        assert set(DOWNSTREAM_METRICS) <= a["metrics"].keys()
        assert a["config"]["sae"]["learning_rate"] == pytest.approx(t.params["sae.learning_rate"])
        assert Path(a["run_dir"]).name == f"trial_{t.number}" and Path(a["sae_path"]).exists()
        assert a["history"] and all("train/tokens" in h and "val/nmse" in h for h in a["history"])
        run = read_run(a["wandb_run_dir"])
        logged = {k for h in run["history"] for k in h}
        assert SEED_METRICS <= logged, SEED_METRICS - logged
        assert run["config"]["wandb_group"] == "smoke"
    summary = [d for d in (smoke.root / "out/wandb").glob("offline-run-*")
               if d.name not in {Path(t.user_attrs["wandb_run_dir"]).name for t in trials}]
    assert len(summary) == 1
    summary_run = read_run(summary[0])
    assert summary_run["config"]["study"] == "smoke"
    # media (the trials table, plotly figures) are logged as files: <key>/_type, <key>/path, ...
    summary_media = {k.rsplit("/", 1)[0] for h in summary_run["history"] for k in h
                     if k.endswith("/_type")}
    assert {"trials", "report/pareto_front", "report/optimization_history/val/nmse"} <= summary_media, summary_media
    assert (smoke.root / "out/studies/smoke/optimization_results.yaml").exists()
    assert trials_main(["smoke", "--storage", smoke.storage]) == 0
    table = capsys.readouterr().out
    assert "4 trials" in table and table.count("COMPLETE") == 4 and "*" in table


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_jobs_in_other_processes_are_guarded_and_recorded(tmp_path, smoke_cache, launcher):
    """Hydra launchers that run each job in another process (joblib's workers; submitit's
    local executor, as on SLURM): the job finds its trial through the storage alone."""
    run_sweep(tmp_path, smoke_cache, launcher, f"hydra/launcher={launcher}", "study.sampler=grid",
              "study.n_trials=2", "sae.k=16,32", "sae.learning_rate=1e-3",
              "study.max_dead_fraction=0.05", "sae.use_wandb=false", NO_DOWNSTREAM)
    trials = {t.params["sae.k"]: t for t in load(tmp_path, launcher).trials}
    assert trials[32].state == TrialState.COMPLETE and Path(trials[32].user_attrs["sae_path"]).exists()
    assert trials[16].state == TrialState.PRUNED  # by the dead-latent guard, inside the job
    assert trials[16].user_attrs["prune_reason"].startswith("guard: val/dead_fraction=")
    for t in trials.values():
        a = t.user_attrs
        assert a["config"]["sae"]["k"] == t.params["sae.k"] and "saelab_trial" not in a["config"]
        assert a["history"] and all("train/tokens" in h and "val/nmse" in h for h in a["history"])
        assert Path(a["run_dir"]).name == f"trial_{t.number}"
        sweeper, job = t.system_attrs[WORKER_ATTR], t.system_attrs[JOB_ATTR]
        assert sweeper.split(":")[1] != job.split(":")[1]  # trained in another process
    assert len(trials[16].user_attrs["history"]) < len(trials[32].user_attrs["history"])


def test_sigkill_then_resume_loses_nothing(tmp_path, smoke_cache):
    args = ("study.n_trials=2", "sae.train_tokens=60000", NO_DOWNSTREAM)
    proc = subprocess.Popen(sweep_cmd(tmp_path, "kill", *args), cwd=tmp_path,
                            env=sweep_env(tmp_path, smoke_cache), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:  # kill while trial 1 trains, after trial 0 finished
            time.sleep(0.3)
            try:  # read-only: opening it with Optuna could race the sweep creating the schema
                with sqlite3.connect(f"file:{tmp_path}/optuna.db?mode=ro", uri=True) as db:
                    states = [r[0] for r in db.execute("SELECT state FROM trials ORDER BY number")]
            except sqlite3.Error:
                continue
            if states[:1] == ["COMPLETE"] and "RUNNING" in states:
                time.sleep(1.0)
                break
        else:
            pytest.fail("the sweep never reached its second trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: (t.params, t.values) for t in load(tmp_path, "kill").trials
              if t.state == TrialState.COMPLETE}
    killed = [t for t in load(tmp_path, "kill").trials if t.state == TrialState.RUNNING]
    assert len(killed) == 1

    run_sweep(tmp_path, smoke_cache, "kill", *args)
    trials = load(tmp_path, "kill").trials
    after = {t.number: (t.params, t.values) for t in trials if t.state == TrialState.COMPLETE}
    # none lost or re-run, and the resumed sweep ran only the retry (the failed trial counts not)
    assert len(after) == 2 and all(after[n] == v for n, v in before.items())
    lost = trials[killed[0].number]
    assert lost.state == TrialState.FAIL and "died" in lost.user_attrs["fail_reason"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert len(retry) == 1 and retry[0].params == lost.params and retry[0].state == TrialState.COMPLETE


def test_two_workers_share_the_study_and_capture_once(tmp_path):
    cache = tmp_path / "fresh_cache"  # downstream on: the second worker must get a trial
    p = run_sweep(tmp_path, cache, "two", "study.n_trials=4", "study.n_jobs=2",
                  "sae.use_wandb=false")
    trials = load(tmp_path, "two").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    workers = {t.system_attrs[WORKER_ATTR] for t in trials}
    assert len(workers) == 2  # both processes ran trials
    assert len({t.user_attrs["run_dir"] for t in trials}) == 4
    logs = "".join(f.read_text() for f in (tmp_path / "out/studies/two").glob("trial_*/*.log"))
    assert "captured" not in logs  # the sweeper captured before the first trial
    worker_log = (tmp_path / "out/studies/two/worker_1.log").read_text()
    assert worker_log and (p.stdout + p.stderr + worker_log).count("captured 4000 tokens") == 1
    assert len([d for d in cache.iterdir() if not d.name.startswith(".")]) == 1


def test_diverging_trial_is_recorded_and_the_study_continues(tmp_path, smoke_cache):
    journal = f"journal:///{tmp_path}/journal/optuna.log"  # the journal storage, end to end
    run_sweep(tmp_path, smoke_cache, "nan", "study.sampler=grid", "study.n_trials=2", "sae.k=32",
              "sae.learning_rate=1e30,1e-3", "sae.use_wandb=false", NO_DOWNSTREAM, storage=journal)
    trials = {t.params["sae.learning_rate"]: t for t in load(tmp_path, "nan", journal).trials}
    bad, good = trials[1e30], trials[1e-3]
    assert bad.state == TrialState.FAIL and bad.user_attrs["diverged"]
    assert bad.user_attrs["fail_reason"].startswith("diverged: ")
    assert good.state == TrialState.COMPLETE


def test_bad_sweep_fails_before_any_trial(tmp_path, smoke_cache):
    p = run_sweep(tmp_path, smoke_cache, "bad", "layer=choice(3,99)", check=False)
    assert p.returncode != 0
    assert "sweep point" in p.stderr and "layer=99" in p.stderr and "0..29" in p.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "out/studies").exists()


def test_layer_scan_captures_in_one_pass(tmp_path):
    cache = tmp_path / "scan_cache"
    p = run_sweep(tmp_path, cache, "scan", "study.sampler=grid", "study.n_trials=4",
                  "layer=choice(2,4)", "component=choice(mlp,output)", "sae.k=32",
                  "sae.learning_rate=1e-3", "sae.train_tokens=5120", "sae.use_wandb=false",
                  NO_DOWNSTREAM)
    trials = load(tmp_path, "scan").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {(t.params["layer"], t.params["component"]) for t in trials} == \
        {(2, "mlp"), (2, "output"), (4, "mlp"), (4, "output")}
    assert "captured 4000 tokens x 4 activations" in p.stdout + p.stderr  # one forward pass
    trial_logs = "".join(f.read_text() for f in (tmp_path / "out/studies/scan").glob("trial_*/*.log"))
    assert "captured" not in trial_logs
    assert len([d for d in cache.iterdir() if not d.name.startswith(".")]) == 4
