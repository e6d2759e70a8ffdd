"""Unit tests of the sweep's pieces on real Optuna storages: search-space parsing
and validation (saelab.search_space), storages and dead-worker recovery
(saelab.storage), guards and records (saelab.study), the trials table (saelab.trials)."""

import dataclasses
import math
import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from saelab import storage as sg
from saelab import study as st
from saelab.config import StudyConfig, TrialConfig
from saelab.search_space import (capture_pairs, grid_of, parse_search_space, trial_overrides,
                                 validate_search_space)
from saelab.selection import KEY_METRICS
from saelab.train import StopTraining, TrainingDiverged
from saelab.trial import TrialResult
from saelab.trials import trial_rows, trials_main


def base_task() -> dict:
    return dataclasses.asdict(TrialConfig())


# ---------------------------------------------------------------- search space

def test_parse_params_and_command_line():
    space = parse_search_space(
        {"sae.k": "choice(16,32,64)", "sae.learning_rate": "tag(log, interval(1e-4, 3e-3))",
         "layer": "range(4, 13, 4)", "sae.expansion_factor": "choice(4, 8)"},
        ["sweep=quick", "study.n_trials=3", "component=mlp,output", "sae.expansion_factor=8"])
    d = space.distributions
    assert d["sae.k"] == CategoricalDistribution([16, 32, 64])
    assert d["sae.learning_rate"] == FloatDistribution(1e-4, 3e-3, log=True)
    assert d["layer"] == IntDistribution(4, 12, step=4)  # Hydra's range excludes its stop
    assert d["component"] == CategoricalDistribution(["mlp", "output"])
    assert "sae.expansion_factor" not in d  # fixed on the command line
    assert space.fixed == ["sweep=quick", "study.n_trials=3", "sae.expansion_factor=8"]
    assert trial_overrides(space, {"sae.learning_rate": 1e-4, "sae.use_wandb": False,
                                   "data.subset": None}) == [
        *space.fixed, "sae.learning_rate=0.0001", "sae.use_wandb=false", "data.subset=null"]


@pytest.mark.parametrize("params, match", [
    ({"layer": "range(5, 5)"}, "layer.*empty"),
    ({"sae.learning_rate": "interval(3e-3, 1e-4)"}, "sae.learning_rate.*start < end"),
    ({"sae.learning_rate": "tag(log, interval(0.0, 1e-3))"}, "start > 0"),
])
def test_bad_ranges_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        parse_search_space(params, [])


def test_grid_needs_discrete_values():
    space = parse_search_space({"sae.k": "choice(16,32)", "layer": "range(0, 6, 2)"}, [])
    assert grid_of(space) == {"sae.k": [16, 32], "layer": [0, 2, 4]}
    space = parse_search_space({"sae.learning_rate": "interval(1e-4, 1e-3)"}, [])
    with pytest.raises(ValueError, match="sae.learning_rate.*grid"):
        grid_of(space)


@pytest.mark.parametrize("params, match", [
    ({"sae.kk": "choice(1,2)"}, "sae.kk is not a key"),
    ({"layer": "choice(5, 40)"}, r"layer=40.*0\.\.29"),
    ({"component": "choice(mlp, foo)"}, "component='foo'"),
    ({"sae.k": "choice(32, 4096)", "sae.expansion_factor": "choice(1, 8)"},
     "sae.k=4096, sae.expansion_factor=1.*d_hidden"),
    ({"sae.learning_rate": "choice(1e-3, -1.0)"}, "learning_rate=-1.0"),
    ({"hydra.job.chdir": "choice(true,false)"}, "only config values"),
])
def test_validation_names_the_bad_point(params, match):
    space = parse_search_space(params, [])
    with pytest.raises(ValueError, match=match):
        validate_search_space(base_task(), space, groups=["model", "sae"])


def test_valid_space_checks_every_corner():
    space = parse_search_space({"sae.k": "choice(16,32,64)", "sae.expansion_factor": "choice(4,8)",
                                "sae.learning_rate": "tag(log, interval(1e-4, 1e-2))",
                                "model": "choice(smollm2_135m)"}, [])
    assert validate_search_space(base_task(), space, groups=["model"]) == 3 * 2 * 2


def test_capture_pairs_cover_every_key_of_the_study():
    task = base_task()  # layer 10, mlp
    scan = parse_search_space({"layer": "range(2, 7, 2)", "component": "choice(mlp, output)"}, [])
    ((cfg, pairs),) = capture_pairs(task, scan)
    assert pairs == [(layer, comp) for layer in (2, 4, 6) for comp in ("mlp", "output")]
    assert cfg.data.max_tokens == task["data"]["max_tokens"]
    layers = parse_search_space({"layer": "choice(3, 5)", "sae.k": "choice(16, 32)"}, [])
    assert [p for _, p in capture_pairs(task, layers)] == [[(3, "mlp"), (5, "mlp")]]
    only_k = parse_search_space({"sae.k": "choice(16, 32)"}, [])
    assert [p for _, p in capture_pairs(task, only_k)] == [[(10, "mlp")]]  # not swept: still first
    budgets = parse_search_space({"layer": "choice(3, 5)", "data.max_tokens": "choice(1000, 2000)",
                                  "component": "choice(resid)"}, [])
    plan = capture_pairs(task, budgets)
    assert [(c.data.max_tokens, p) for c, p in plan] == [(1000, [(3, "output"), (5, "output")]),
                                                        (2000, [(3, "output"), (5, "output")])]
    for params in ({"data.max_tokens": "interval(1000, 2000.5)"}, {"model": "choice(a, b)"}):
        assert capture_pairs(task, parse_search_space(params, [])) == []  # trials capture their own


# ---------------------------------------------------------------- storage & study

def test_storage_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    st.open_study(StudyConfig(name="a", storage="sqlite:///deep/dir/optuna.db"))
    assert (tmp_path / "deep/dir/optuna.db").is_file()  # relative to the cwd, parents made
    j = StudyConfig(name="j", storage=f"journal:///{tmp_path}/j/optuna.log")
    st.open_study(j).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert (tmp_path / "j/optuna.log").stat().st_size > 0
    (tmp_path / "afile").write_text("")
    for url in ("nosuchdb://x/y", f"sqlite:///{tmp_path}/afile/optuna.db"):
        with pytest.raises(ValueError, match="study.storage=.*cannot be opened"):
            sg.open_storage(StudyConfig(storage=url))


def test_existing_study_keeps_its_objectives(tmp_path):
    cfg = StudyConfig(name="s", storage=f"sqlite:///{tmp_path}/o.db")
    study = st.open_study(cfg)
    assert study.user_attrs["objectives"] == ["val/nmse", "val/dead_fraction"]
    assert study.user_attrs["directions"] == ["minimize", "minimize"]
    with pytest.raises(ValueError, match="study.objectives=.*existing study"):
        st.open_study(dataclasses.replace(cfg, objectives=["val/nmse"]))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_dead_local_worker_is_failed_and_retried(tmp_path, scheme):
    ext = "db" if scheme == "sqlite" else "log"
    cfg = StudyConfig(name="r", storage=f"{scheme}:///{tmp_path}/o.{ext}", n_trials=2)
    study = st.open_study(cfg)
    done = study.ask()
    done.suggest_int("sae.k", 16, 64)
    study.tell(done, [0.1, 0.0])
    lost = study.ask()
    k = lost.suggest_int("sae.k", 16, 64)
    study._storage.set_trial_system_attr(lost._trial_id, sg.WORKER_ATTR,
                                         f"{socket.gethostname()}:{_dead_pid()}:1")
    mine = study.ask()
    sg.claim(study, mine)  # a live worker's trial is left alone
    assert sg.budget(study).used == 3
    assert sg.reap_dead_trials(study, cfg) == [lost.number]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[1].user_attrs["fail_reason"].startswith("worker ")
    assert sg.budget(study).used == 2  # the failure counts through its retry
    retry = study.ask()
    assert retry.number == 3 and retry.params == {"sae.k": k}
    assert "fail_reason" not in study.trials[3].user_attrs
    assert sg.unowned_running(study) == [3]  # unclaimed: not known alive


def test_stale_heartbeat_fails_and_retries(tmp_path):
    studies = []
    for url in (f"sqlite:///{tmp_path}/o.db", f"journal:///{tmp_path}/o.log"):
        cfg = StudyConfig(name="h", storage=url, heartbeat_interval=1, grace_period=2)
        study = st.open_study(cfg)
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study._storage.record_heartbeat(t._trial_id)
        unclaimed = study.ask()  # its process died between ask and claim: no worker, no beat
        unclaimed.suggest_float("x", 0, 1)
        sg.reap_dead_trials(study, cfg)
        assert [s.state for s in study.trials] == [TrialState.RUNNING] * 2  # fresh
        studies.append((url, cfg, study))
    time.sleep(3.1)  # past the grace period, for both storages at once
    for url, cfg, study in studies:
        sg.reap_dead_trials(study, cfg)
        states = [s.state for s in study.trials]
        assert states == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2, url
        assert {t.params["x"] for t in study.trials[2:]} == {t.params["x"] for t in study.trials[:2]}


# ---------------------------------------------------------------- callback & records

def test_pruner_and_guards():
    cfg = StudyConfig(objectives=["val/nmse"], pruner="median", max_dead_fraction=0.5)
    study = optuna.create_study(pruner=st.make_pruner(cfg))
    for v in (0.1, 0.12):
        t = study.ask()
        t.report(v, 1000)
        study.tell(t, v)
    cb = st.OptunaCallback(study.ask(), cfg)
    cb.on_start({"batch_size": 100, "total_steps": 100, "warmup_fraction": 0.1})
    with pytest.raises(StopTraining, match="pruned by median at 1000 tokens"):
        cb.on_eval(10, {"val/nmse": 0.9})
    assert cb.history == [{"step": 10, "train/tokens": 1000, "val/nmse": 0.9}]

    multi = StudyConfig(max_dead_fraction=0.5, max_loss_ratio=3.0)
    cb = st.OptunaCallback(optuna.create_study(directions=["minimize"] * 2).ask(), multi,
                           best_history=[{"train/tokens": 1000, "val/nmse": 0.1}], best_number=4)
    cb.on_start({"batch_size": 100, "total_steps": 100, "warmup_fraction": 0.1})
    cb.on_eval(5, {"val/nmse": 0.5, "val/dead_fraction": 0.9})  # warm-up, no reference yet
    with pytest.raises(StopTraining, match="dead_fraction=0.900 > study.max_dead_fraction"):
        cb.on_eval(20, {"val/nmse": 0.2, "val/dead_fraction": 0.9})
    with pytest.raises(StopTraining, match=r"max_loss_ratio=3.0 x 0.1 \(best trial #4"):
        cb.on_eval(20, {"val/nmse": 0.31, "val/dead_fraction": 0.0})
    cb.on_eval(30, {"val/nmse": 0.29, "val/dead_fraction": 0.0})
    cb.on_eval(100, {"val/nmse": 0.9, "val/dead_fraction": 0.9})  # finished: kept, not stopped
    assert [h["step"] for h in cb.history] == [5, 20, 20, 30, 100]


def test_records_and_table(tmp_path, capsys):
    cfg = StudyConfig(name="t", storage=f"sqlite:///{tmp_path}/o.db",
                      constraints={"val/dead_fraction": 0.05})
    study = st.open_study(cfg)
    outcomes = [
        TrialResult(metrics={"val/nmse": 0.2, "val/dead_fraction": 0.0, "val/l0": 32.0},
                    sae_path="a/sae", output_dir="a", history=[{"step": 1, "val/nmse": 0.3}]),
        TrialResult(metrics={"val/nmse": 0.1, "val/dead_fraction": 0.04, "val/l0": 64.0},
                    sae_path="b/sae", output_dir="b"),
        TrialResult(metrics={"val/nmse": 0.3, "val/dead_fraction": 0.1}, sae_path="c", output_dir="c"),
        StopTraining("guard: too dead"),
        TrainingDiverged("loss became nan at step 3"),
        RuntimeError("boom"),
    ]
    for i, outcome in enumerate(outcomes):
        t = study.ask()
        t.suggest_categorical("sae.k", [16, 32, 64])
        history = [] if i == 0 else [{"step": 1}]  # trial 0: the result's own history is kept
        st.finish_trial(study, t, cfg, outcome, history, {"layer": 10}, f"run{i}")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED] + \
        [TrialState.FAIL] * 2
    a = trials[0].user_attrs
    assert trials[0].values == [0.2, 0.0] and a["sae_path"] == "a/sae" and a["config"] == {"layer": 10}
    assert a["history"] == [{"step": 1, "val/nmse": 0.3}]
    assert trials[0].constraints == {"val/dead_fraction": -0.05}  # Optuna's own record
    assert trials[3].user_attrs["prune_reason"] == "guard: too dead"
    assert trials[3].user_attrs["history"] == [{"step": 1}]
    assert trials[3].constraints == {"val/dead_fraction": float("inf")}  # unknown: infeasible
    assert trials[4].user_attrs["diverged"] and "nan" in trials[4].user_attrs["fail_reason"]
    assert trials[5].user_attrs["fail_reason"].startswith("RuntimeError: boom")
    cols, rows = trial_rows(study)
    # trial 2 is dominated, and infeasible: a Pareto set of feasible trials even without a sampler
    assert trials[2].constraints["val/dead_fraction"] > 0
    assert [r[2] for r in rows] == [True, True, False, False, False, False]
    # objectives once, then the other key metrics, with no column for the objectives twice
    assert cols[3:] == ["sae.k", "val/nmse", "val/dead_fraction",
                        *[m for m in KEY_METRICS if m not in ("val/nmse", "val/dead_fraction")],
                        "reason"]
    bad = study.ask()
    with pytest.raises(ValueError, match=r"study.objectives=.*\['val/dead_fraction'\]"):
        st.finish_trial(study, bad, cfg, TrialResult({"val/nmse": 0.1}, "x", "x"), [], None, None)

    assert trials_main(["t", "--storage", cfg.storage]) == 0
    out = capsys.readouterr().out
    assert "study t: 7 trials" in out and "guard: too dead" in out and "PRUNED" in out
    assert trials_main(["nope", "--storage", cfg.storage]) == 2
    assert "study='nope' is not in" in capsys.readouterr().err
    assert trials_main(["t", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no such database" in capsys.readouterr().err and not (tmp_path / "none.db").exists()


def test_trial_link_survives_hydra_overrides():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    url = "postgresql+psycopg2://u:p@ss=w'rd@127.0.0.1:5432/db?sslmode=disable&x=a,b"
    link = st.TrialLink(url, "my study", 7)
    parsed = OverridesParser.create().parse_overrides(link.overrides())
    config = {"layer": 10, st.TrialLink.KEY: {o.key_or_group.split(".")[1]: o.value()
                                              for o in parsed}}
    assert st.TrialLink.pop(config) == link and config == {"layer": 10}
    assert st.TrialLink.pop(config) is None


def test_slurm_launcher_composes():
    """hydra-submitit-launcher's SLURM launcher (no SLURM here: tests/test_sweep.py runs its
    local executor) composes with a sweep file."""
    from hydra import compose, initialize_config_dir

    from saelab.configs import register_configs
    from saelab.configs import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "sweep=smoke", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.sweeper._target_.endswith("SaelabSweeper")


def test_loss_guard_compares_like_with_like():
    cfg = StudyConfig()
    study = optuna.create_study(directions=["minimize"] * 2)
    for layer, nmse in ((2, 0.05), (10, 0.2), (10, 0.3)):
        t = study.ask()
        result = TrialResult({"val/nmse": nmse, "val/dead_fraction": 0.0}, "s", "o",
                             history=[{"train/tokens": 1, "val/nmse": nmse}])
        st.finish_trial(study, t, cfg, result, [], {**base_task(), "layer": layer}, None)
    assert st.best_reference(study)[1] == 0
    assert st.best_reference(study, {**base_task(), "layer": 10}) == (
        [{"train/tokens": 1, "val/nmse": 0.2}], 1)
    assert st.best_reference(study, {**base_task(), "component": "attn"}) == ([], None)


@pytest.mark.parametrize("name", ["smoke", "quick", "layers", "k_expansion"])
def test_ready_made_sweeps_are_valid(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from saelab.configs import register_configs
    from saelab.configs import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"sweep={name}"])
    task = OmegaConf.to_container(cfg, resolve=True)
    study = StudyConfig(**task["study"])
    assert study.name == name
    space = parse_search_space(study.params, [])
    assert space.distributions and validate_search_space(task, space, groups=["model", "sae"]) >= 2
    if study.sampler == "grid":
        assert math.prod(map(len, grid_of(space).values())) == study.n_trials
