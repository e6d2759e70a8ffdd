"""report.html and the report's figures, on the session's real smoke study (conftest.py);
the page is opened in headless Chromium (skipped where it is not installed, failed under CI)."""

import re
import shutil
import subprocess

import optuna
import pytest
from optuna.trial import TrialState

from saelab.report import report_figures, write_report
from test_export import single_objective_copy

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def varied(study) -> set[str]:
    done = study.get_trials(states=(TrialState.COMPLETE,))
    return {p for p in done[0].params if len({repr(t.params[p]) for t in done}) > 1}


def test_figures_show_the_study(smoke):
    study = smoke.load()
    pareto = sorted(study.best_trials, key=lambda t: t.number)
    figs = report_figures(study, pareto)
    # the smoke sweep varies sae.k and sae.learning_rate: quality vs L0 only if k took two values;
    # never vs width (expansion fixed) nor per layer (layer and component fixed)
    assert "sae.learning_rate" in varied(study)
    expected = {"pareto_front", "optimization_history/val/nmse",
                "optimization_history/val/dead_fraction", "param_importances", "training_curves"}
    assert set(figs) == expected | ({"quality_vs_l0"} if "sae.k" in varied(study) else set())
    for name, fig in figs.items():  # every figure is titled and plots something
        assert fig.layout.title.text, name
        assert any(t.x is not None and len(t.x) for t in fig.data), name
    assert figs["pareto_front"].layout.title.text.startswith(
        "Pareto front: reconstruction error (val/nmse) vs dead latents (val/dead_fraction)")

    front = next(t for t in figs["pareto_front"].data if t.name == "Pareto set")
    assert list(front.text) == [f"#{t.number}" for t in sorted(pareto, key=lambda t: t.values[0])]
    assert sorted(front.x) == sorted(t.values[0] for t in pareto)
    n_points = sum(len(t.x) for t in figs["pareto_front"].data)
    assert n_points == len(study.get_trials(states=(TrialState.COMPLETE,)))

    curves = figs["training_curves"].data
    assert len(curves) == 2 * len(pareto)  # nmse and dead fraction per exported trial
    hist = pareto[0].user_attrs["history"]
    assert list(curves[0].y) == [h["val/nmse"] for h in hist]
    assert list(curves[0].x) == [h["train/tokens"] for h in hist]
    assert {t.name for t in figs["param_importances"].data} == {"val/nmse", "val/dead_fraction"}
    if "quality_vs_l0" in figs:  # nMSE and the added LM loss (downstream metrics) vs L0
        fig = figs["quality_vs_l0"]
        assert [a.text for a in fig.layout.annotations] == [
            "reconstruction error (val/nmse)", "added LM loss (val/delta_lm_loss)"]
        l0 = [x for t in fig.data if t.xaxis == "x" for x in t.x]
        assert sorted(l0) == sorted(t.user_attrs["metrics"]["val/l0"] for t in study.trials)
        delta = sorted(y for t in fig.data if t.xaxis == "x2" for y in t.y)
        assert delta == sorted(t.user_attrs["metrics"]["val/delta_lm_loss"] for t in study.trials)


def test_a_layer_scan_compares_layers_by_lm_loss(smoke):
    """A layer x component scan (single objective): per-layer nMSE and added LM loss; no
    Pareto/L0/width figures, whose points would differ only in layer."""
    src = smoke.load()
    scan = optuna.create_study(study_name="layer_scan", storage=smoke.storage, direction="minimize")
    scan.set_user_attr("objectives", ["val/nmse"])
    dist = {"layer": optuna.distributions.CategoricalDistribution([2, 6, 10]),
            "component": optuna.distributions.CategoricalDistribution(["mlp", "output"])}
    for t, layer, comp in zip(src.get_trials(states=(TrialState.COMPLETE,))[:3], (2, 6, 10),
                              ("mlp", "output", "mlp"), strict=True):
        attrs = {**t.user_attrs, "config": {**t.user_attrs["config"], "layer": layer,
                                             "component": comp}}
        scan.add_trial(optuna.trial.create_trial(
            params={"layer": layer, "component": comp}, distributions=dist,
            value=attrs["metrics"]["val/nmse"], user_attrs=attrs))
    figs = report_figures(scan, scan.trials[:1])
    assert set(figs) == {"layers_components", "optimization_history/val/nmse",
                         "param_importances", "training_curves"}
    fig = figs["layers_components"]
    assert [a.text for a in fig.layout.annotations][:2] == [
        "reconstruction error (val/nmse)", "added LM loss (val/delta_lm_loss)"]
    assert sorted(x for t in fig.data if t.xaxis == "x" for x in t.x) == [2, 6, 10]
    assert {t.name for t in fig.data} == {"component mlp", "component output"}
    page = write_report(scan, smoke.root / "scan.html", scan.trials[:1]).read_text()
    assert "<h2>Layers and components: reconstruction error and added LM loss" in page
    assert "Pareto front" not in page


def test_too_few_trials_give_notes_not_errors(smoke, tmp_path):
    src = smoke.load()
    one = optuna.create_study(study_name="one_trial", storage=smoke.storage, direction="minimize")
    one.set_user_attr("objectives", ["val/nmse"])
    t = src.trials[0]
    one.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                            value=t.user_attrs["metrics"]["val/nmse"],
                                            user_attrs=t.user_attrs))
    figs = report_figures(one, one.trials)
    assert "param_importances" not in figs and "pareto_front" in figs
    page = write_report(one, tmp_path / "one.html").read_text()
    assert "Parameter importances need at least 2 finished trials" in page

    empty = optuna.create_study(study_name="empty", storage=smoke.storage)
    assert report_figures(empty, []) == {}
    assert "has no finished trial yet" in write_report(empty, tmp_path / "empty.html").read_text()

    single = single_objective_copy(smoke, "single_report")
    figs = report_figures(single, single.trials[:1])
    assert "single-objective" in figs["pareto_front"].layout.title.text


def test_report_renders_offline_in_chromium(smoke, tmp_path, require_system):
    study = smoke.load()
    path = write_report(study, tmp_path / "report.html")  # default trials: the Pareto set
    page = path.read_text()
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js inline, nothing fetched
    n_figs = len(report_figures(study, sorted(study.best_trials, key=lambda t: t.number)))
    assert page.count("Plotly.newPlot") == n_figs
    require_system("Chromium", CHROMIUM is not None, "apt-get install chromium")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--window-size=1200,5200", "--virtual-time-budget=15000"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-3000:]
    assert dom.stdout.count('class="plot-container plotly"') == n_figs, dom.stdout[-2000:]
    assert dom.stdout.count('class="main-svg"') >= 2 * n_figs  # each plot draws its svg layers
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console

    png = tmp_path / "report.png"
    shot = subprocess.run([*flags, f"--screenshot={png}", path.as_uri()], capture_output=True,
                          text=True, timeout=180)
    assert shot.returncode == 0 and png.stat().st_size > 50_000, shot.stderr[-3000:]
