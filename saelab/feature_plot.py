"""One SAE feature as a plotly figure: activation histogram, logit effect, top contexts
(``sae.visualize_feature`` and the feature dashboard's pages)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saelab.feature_index import BIN_EDGES, ActivatingText, FeatureIndex


def _show(token: str) -> str:
    """A token readable in a plot: whitespace made visible, markup escaped."""
    return html.escape(token.replace("\n", "\\n").replace(" ", "\u2423") or "\u2205")


def feature_figure(feature: int, index: FeatureIndex, contexts: Sequence[ActivatingText],
                   promoted: Sequence[tuple[str, float]],
                   suppressed: Sequence[tuple[str, float]]) -> go.Figure:
    fig = make_subplots(
        rows=2, cols=2, row_heights=[0.45, 0.55], vertical_spacing=0.14,
        specs=[[{"type": "xy"}, {"type": "xy"}], [{"type": "table", "colspan": 2}, None]],
        subplot_titles=("activations where it fires (code units)",
                        "logit effect: tokens promoted / suppressed", "top activating contexts"))
    counts = index.hist[feature]
    centers = np.sqrt(BIN_EDGES[:-1] * BIN_EDGES[1:])
    shown = np.flatnonzero(counts)
    if len(shown):
        shown = np.arange(shown[0], shown[-1] + 1)
    fig.add_trace(go.Bar(x=centers[shown], y=counts[shown], name="tokens", marker_color="#1f77b4",
                         hovertemplate="~%{x:.3g}: %{y} tokens<extra></extra>"), row=1, col=1)
    fig.update_xaxes(type="log", title_text="activation", row=1, col=1)
    fig.update_yaxes(title_text="tokens", row=1, col=1)
    effect = [*reversed(suppressed), *reversed(promoted)]
    fig.add_trace(go.Bar(
        x=[v for _, v in effect], y=[f"{_show(t)} " for t, _ in effect], orientation="h",
        name="logit effect", marker_color=["#d62728" if v < 0 else "#2ca02c" for _, v in effect],
        hovertemplate="%{y}: %{x:.3g}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="category", row=1, col=2)
    marked = [f"{_show(c.before)}<b>[{_show(c.token)}]</b>{_show(c.after)}" for c in contexts]
    fig.add_trace(go.Table(
        columnwidth=[1, 9], header=dict(values=["activation", "context (the token in [ ])"]),
        cells=dict(values=[[f"{c.activation:.3g}" for c in contexts], marked], align="left")),
        row=2, col=1)
    fired = index.counts[feature]
    fig.update_layout(
        title=(f"Feature {feature}: fires on {fired} of {index.n_tokens} tokens "
               f"({100 * fired / max(index.n_tokens, 1):.3g}%), max activation "
               f"{index.top_values[feature, 0]:.3g}"),
        template="plotly_white", height=820, showlegend=False,
        margin=dict(l=60, r=30, t=90, b=30))
    return fig
