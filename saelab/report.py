"""A study's report: plotly figures and one self-contained ``report.html``.

``report_figures`` returns the figures by name (the study-summary W&B run logs
them as they are); ``write_report`` puts them in one HTML file with plotly.js
inlined once, so it opens offline. Figures come from ``optuna.visualization``
where it fits (Pareto front, optimization history, parameter importances) and
from the trials' records otherwise (metrics, configs, validation histories).
Titles name the study's own objectives, and a figure is drawn only when the
study varied what it plots against: quality vs L0 when ``sae.k`` varied, vs
width when ``sae.expansion_factor`` did, per layer and component when those
did (with the added LM loss beside normalized MSE: nMSE is relative to each
layer's variance, so only the downstream loss compares across layers). A figure
that cannot be made for this study (too few trials, a single value of every
parameter) becomes a note instead of an error.
"""

from __future__ import annotations

import html
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from saelab.paths import atomic_write_text
from saelab.selection import KEY_METRICS, fmt_value, select_trials
from saelab.study import objectives_of as _objectives

NMSE, DEAD, L0, DELTA = "val/nmse", "val/dead_fraction", "val/l0", "val/delta_lm_loss"
LABELS = {NMSE: "reconstruction error", "val/nmse_p99": "reconstruction error (99%)",
          "val/mse": "reconstruction MSE", "val/explained_variance": "explained variance",
          L0: "sparsity (L0)", DEAD: "dead latents", DELTA: "added LM loss",
          "val/ce_loss_spliced": "LM loss with the SAE", "val/ce_loss_score": "CE loss score",
          "val/kl_div": "KL to the model"}
"""What a metric measures, for titles."""
LAYOUT = dict(template="plotly_white", height=460, margin=dict(l=60, r=30, t=80, b=50))
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]


def label(metric: str) -> str:
    """``reconstruction error (val/nmse)``; an unknown metric is its own name."""
    return f"{LABELS[metric]} ({metric})" if metric in LABELS else metric


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _metric(t: FrozenTrial, name: str) -> float | None:
    v = t.user_attrs.get("metrics", {}).get(name)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _cfg(t: FrozenTrial, *keys: str) -> Any:
    node: Any = t.user_attrs.get("config", {})
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _hover(t: FrozenTrial) -> str:
    params = "<br>".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in t.params.items())
    return f"trial {t.number}<br>{params}"


def _scatter(trials: Sequence[FrozenTrial], x: Callable[[FrozenTrial], Any], ys: Sequence[str],
             *, title: str, x_title: str, group: Callable[[FrozenTrial], Any],
             group_name: str, exported: set[int], log_x: bool = False) -> go.Figure:
    """Each ``ys`` metric (one panel each) against ``x(trial)``, one trace per
    ``group(trial)`` value; exported trials get a ring. ``log_x``: a log axis when x
    spans a factor >= 4."""
    fig = make_subplots(rows=1, cols=len(ys), subplot_titles=[label(y) for y in ys],
                        horizontal_spacing=0.12)
    groups = sorted({group(t) for t in trials}, key=str)
    for col, y in enumerate(ys, start=1):
        points = [(t, x(t), _metric(t, y)) for t in trials]
        points = [p for p in points if p[1] is not None and p[2] is not None]
        for i, g in enumerate(groups):
            sel = [p for p in points if group(p[0]) == g]
            fig.add_trace(go.Scatter(
                x=[p[1] for p in sel], y=[p[2] for p in sel], mode="markers",
                name=f"{group_name} {g}", legendgroup=str(g), showlegend=col == 1,
                text=[_hover(p[0]) for p in sel],
                hovertemplate="%{text}<br>%{x}, %{y:.4g}<extra></extra>",
                marker=dict(color=PALETTE[i % len(PALETTE)],
                            size=[14 if p[0].number in exported else 9 for p in sel],
                            line=dict(width=[2.5 if p[0].number in exported else 0 for p in sel],
                                      color="black"))), row=1, col=col)
        fig.update_yaxes(title_text=y, row=1, col=col)
        xs = [p[1] for p in points if isinstance(p[1], (int, float))]
        if log_x and xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
            fig.update_xaxes(type="log", row=1, col=col)
    fig.update_xaxes(title_text=x_title)
    fig.update_layout(title=title, legend_title=group_name, showlegend=True, **LAYOUT)
    return fig


def _pareto(study: optuna.Study, trials: list[FrozenTrial], exported: set[int]) -> go.Figure:
    """The first two objectives with the Pareto set (``study.best_trials``) joined
    up; a single-objective study shows normalized MSE vs dead fraction instead.
    Drawn here rather than with ``plot_pareto_front``, whose hover text holds
    every trial's full user attributes (histories, configs): megabytes per study."""
    objectives = _objectives(study)
    if len(objectives) >= 2:
        names, front = objectives[:2], {t.number for t in study.best_trials}
        value = lambda t, i: t.values[i]  # noqa: E731
        title = f"Pareto front: {label(names[0])} vs {label(names[1])} (minimized)"
        if len(objectives) > 2:
            title += f"; 2 of {len(objectives)} objectives"
    else:
        names, front = [NMSE, DEAD], set()
        value = lambda t, i: _metric(t, names[i])  # noqa: E731
        title = f"{label(NMSE)} vs {label(DEAD)} (single-objective study: {objectives[0]})"
    pts = [(t, value(t, 0), value(t, 1)) for t in trials]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    fig = go.Figure()
    for kind, sel, color in (("other trials", [p for p in pts if p[0].number not in front], "#8a94a6"),
                              ("Pareto set", sorted((p for p in pts if p[0].number in front),
                                                    key=lambda p: p[1]), "#d62728")):
        if not sel:
            continue
        fig.add_trace(go.Scatter(
            x=[p[1] for p in sel], y=[p[2] for p in sel], name=kind,
            mode="lines+markers+text" if kind == "Pareto set" else "markers",
            line=dict(color=color, dash="dot", shape="hv"), text=[f"#{p[0].number}" for p in sel],
            textposition="top right", hovertext=[_hover(p[0]) for p in sel],
            hovertemplate="%{hovertext}<br>%{x:.4g}, %{y:.4g}<extra></extra>",
            marker=dict(color=color, size=[14 if p[0].number in exported else 10 for p in sel],
                        line=dict(width=[2.5 if p[0].number in exported else 0 for p in sel],
                                  color="black"))))
    fig.update_layout(title=title + " — ringed: exported", xaxis_title=names[0],
                      yaxis_title=names[1], **LAYOUT)
    return fig


def _importances(study: optuna.Study, trials: list[FrozenTrial]) -> tuple[go.Figure | None, str]:
    varied = [p for p in {p for t in trials for p in t.params}
              if len({repr(t.params.get(p)) for t in trials}) > 1]
    if len(trials) < 2 or not varied:
        return None, (f"Parameter importances need at least 2 finished trials with some "
                      f"parameter taking 2 values (here: {len(trials)} finished, varied "
                      f"parameters: {', '.join(varied) or 'none'}).")
    try:
        with warnings.catch_warnings():  # PED-ANOVA's reminder that it ranks by low values
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator")
            fig = optuna.visualization.plot_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as e:
        return None, f"Parameter importances could not be computed: {e}"
    fig.update_layout(title=f"Parameter importances (Optuna's default evaluator, "
                      f"{len(trials)} finished trials: few trials make them noisy)")
    names = _objectives(study)
    for i, trace in enumerate(fig.data):  # "Objective Value i" -> the metric's name
        if len(fig.data) == len(names) > 1:
            trace.name = names[i]
    fig.update_layout(**LAYOUT)
    return fig, ""


def _curves(trials: Sequence[FrozenTrial]) -> go.Figure | None:
    if not any(t.user_attrs.get("history") for t in trials):
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=(NMSE, DEAD), horizontal_spacing=0.1)
    for i, t in enumerate(trials):
        hist = t.user_attrs.get("history") or []
        x = [h.get("train/tokens", h.get("step")) for h in hist]
        for col, key in ((1, NMSE), (2, DEAD)):
            fig.add_trace(go.Scatter(
                x=x, y=[h.get(key) for h in hist], mode="lines+markers", name=f"trial {t.number}",
                legendgroup=str(t.number), showlegend=col == 1,
                line=dict(color=PALETTE[i % len(PALETTE)])), row=1, col=col)
    fig.update_xaxes(title_text="training tokens")
    fig.update_layout(title="Validation curves of the exported trials", **LAYOUT)
    return fig


def _varied(trials: Sequence[FrozenTrial]) -> set[str]:
    """Parameters that took two or more values among ``trials``."""
    return {p for p in {p for t in trials for p in t.params}
            if len({repr(t.params.get(p)) for t in trials}) > 1}


def _quality(objectives: Sequence[str], trials: Sequence[FrozenTrial]) -> list[str]:
    """The metrics that score an SAE in this study (its objectives other than L0 and dead
    latents, then normalized MSE and the added LM loss), those the trials recorded."""
    ys = [o for o in objectives if o not in (L0, DEAD)] + [NMSE, DELTA]
    return [y for y in dict.fromkeys(ys) if any(_metric(t, y) is not None for t in trials)][:3]


def _short(metrics: Sequence[str]) -> str:
    return " and ".join(LABELS.get(m, m) for m in metrics)


ORDER = ("pareto_front", "quality_vs_l0", "quality_vs_expansion", "layers_components",
         "optimization_history", "param_importances", "training_curves")
"""Report sections, in page order (a figure named ``key`` or ``key/...`` goes under ``key``)."""


def _figures(study: optuna.Study, trials: Sequence[FrozenTrial]
             ) -> tuple[dict[str, go.Figure], dict[str, str], dict[str, str]]:
    """(figures by name, notes by section for figures that could not be made,
    section titles)."""
    done = _complete(study)
    exported = {t.number for t in trials}
    figs: dict[str, go.Figure] = {}
    notes: dict[str, str] = {}
    objectives = _objectives(study)
    titles = {"optimization_history": "Optimization history",
              "param_importances": "Parameter importances",
              "training_curves": "Training curves of the exported trials"}
    if not done:
        return figs, {"study": f"Study {study.study_name!r} has no finished trial yet."}, titles
    varied, ys = _varied(done), _quality(objectives, done)
    scan = bool({"layer", "component"} & varied)
    if len(objectives) >= 2 or not scan:  # a layer scan's nMSE vs dead fraction compares nothing
        figs["pareto_front"] = _pareto(study, done, exported)
        pair = objectives[:2] if len(objectives) >= 2 else [NMSE, DEAD]
        titles["pareto_front"] = (("Pareto front: " if len(objectives) >= 2 else "") +
                                  f"{LABELS.get(pair[0], pair[0])} vs {LABELS.get(pair[1], pair[1])}")
    expansion = lambda t: _cfg(t, "sae", "expansion_factor")  # noqa: E731
    if "sae.k" in varied:
        figs["quality_vs_l0"] = _scatter(
            done, lambda t: _metric(t, L0), ys, x_title="L0 (measured; k)", group=expansion,
            title=f"{_short(ys)} vs L0", group_name="expansion", exported=exported, log_x=True)
        titles["quality_vs_l0"] = f"{_short(ys).capitalize()} vs sparsity"
    if "sae.expansion_factor" in varied:
        figs["quality_vs_expansion"] = _scatter(
            done, expansion, ys, x_title="expansion factor", group=lambda t: _cfg(t, "sae", "k"),
            title=f"{_short(ys)} vs expansion factor", group_name="k", exported=exported,
            log_x=True)
        titles["quality_vs_expansion"] = f"{_short(ys).capitalize()} vs width"
    if scan:
        per_layer = [y for y in (NMSE, DELTA, "val/ce_loss_score")
                     if any(_metric(t, y) is not None for t in done)]
        figs["layers_components"] = _scatter(
            done, lambda t: _cfg(t, "layer"), per_layer, x_title="layer",
            title=f"{_short(per_layer)} per layer and component (nMSE is relative to each "
                  "layer's variance; the LM loss compares across layers)",
            group=lambda t: _cfg(t, "component"), group_name="component", exported=exported)
        titles["layers_components"] = f"Layers and components: {_short(per_layer)}"
    for i, name in enumerate(objectives):
        # a target is required with several objectives; without one Optuna adds the best-value line
        target = (lambda t, i=i: t.values[i]) if len(objectives) > 1 else None
        fig = optuna.visualization.plot_optimization_history(study, target=target, target_name=name)
        fig.update_layout(title=f"Optimization history: {label(name)}", **LAYOUT)
        figs[f"optimization_history/{name}"] = fig
    fig, note = _importances(study, done)
    if fig is not None:
        figs["param_importances"] = fig
    else:
        notes["param_importances"] = note
    curves = _curves(trials)
    if curves is not None:
        figs["training_curves"] = curves
    else:
        notes["training_curves"] = "The exported trials have no validation history."
    return figs, notes, titles


def report_figures(study: optuna.Study, trials: Sequence[FrozenTrial]) -> dict[str, go.Figure]:
    """The report's plotly figures by name (e.g. for ``wandb.log({name: fig})``);
    ``trials`` are the highlighted/exported ones (their training curves are drawn)."""
    return _figures(study, trials)[0]


STYLE = """body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}.note{color:#8a5a00;background:#fff7e6;padding:8px}"""


def _table(study: optuna.Study, trials: Sequence[FrozenTrial]) -> str:
    params = sorted({p for t in trials for p in t.params})
    metrics = [m for m in dict.fromkeys([*_objectives(study), *KEY_METRICS])
               if any(_metric(t, m) is not None for t in trials)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["trial", *params, *metrics])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt_value(v))}</td>" for v in
                         [t.number, *(t.params.get(p) for p in params),
                          *(_metric(t, m) for m in metrics)]) + "</tr>" for t in trials)
    return f"<table><tr>{head}</tr>{rows}</table>"


def render_report(study: optuna.Study, trials: Sequence[FrozenTrial]) -> str:
    """The whole report as one HTML string (plotly.js inlined once, no network)."""
    from plotly.offline import get_plotlyjs

    figs, notes, titles = _figures(study, trials)
    all_trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in all_trials) for s in TrialState}
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items() if n)
    body = [f"<h1>Study <code>{html.escape(study.study_name)}</code></h1>",
            f"<p>{len(all_trials)} trials ({counts}). Objectives, minimized: "
            f"{html.escape(', '.join(_objectives(study)))}.</p>"]
    if "study" in notes:
        body.append(f"<p class=note>{html.escape(notes['study'])}</p>")
    if trials:
        body += ["<h2>Exported trials</h2>", _table(study, trials)]
    config = {"responsive": True, "displaylogo": False}
    for key in ORDER:
        names = [n for n in figs if n == key or n.startswith(key + "/")]
        if not names and key not in notes:
            continue
        body.append(f"<h2>{html.escape(titles[key])}</h2>")
        if key in notes:
            body.append(f"<p class=note>{html.escape(notes[key])}</p>")
        body += [figs[n].to_html(full_html=False, include_plotlyjs=False, config=config,
                                 div_id=re.sub(r"\W", "_", n)) for n in names]
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
            f"<title>saelab study {html.escape(study.study_name)}</title>"
            f"<style>{STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script>"
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(study: optuna.Study, out_path: str | os.PathLike,
                 trials: Sequence[FrozenTrial] | None = None) -> Path:
    """Write ``report.html`` atomically. ``trials`` default to what ``saelab export``
    would pick (the Pareto set, or the top trials of a single-objective study)."""
    if trials is None:
        trials = select_trials(study)[0] if _complete(study) else []
    return atomic_write_text(out_path, render_report(study, trials))

