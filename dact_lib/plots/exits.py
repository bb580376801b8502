"""Per-sample exit depth: the histogram of exit layers, accuracy per exit layer, and one sentence's per-layer trace."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .base import empty_figure


def exit_histogram(exit_layers: Sequence[int] | np.ndarray, num_layers: int | None = None,
                   height: int = 340) -> go.Figure:
    """Number of samples per exit layer (1..N, zero bars included)."""
    e = np.asarray(exit_layers, dtype=np.int64)
    if e.size == 0:
        return empty_figure("exit layers", "no samples", height)
    n = int(num_layers or e.max())
    layers = np.arange(1, n + 1)
    counts = np.bincount(e, minlength=n + 1)[1:n + 1]
    fig = go.Figure(go.Bar(x=layers, y=counts, text=[f"{c} ({c / e.size:.0%})" for c in counts],
                           textposition="auto", marker_color="#1f77b4",
                           hovertemplate="exit layer %{x}<br>%{y} samples<extra></extra>"))
    fig.update_layout(title=f"exit layer per sample (average {e.mean():.2f} of {n})", height=height,
                      xaxis=dict(title="exit layer (layers run)", tickmode="linear", dtick=1),
                      yaxis_title="samples", margin=dict(l=50, r=20, t=50, b=40))
    return fig


def accuracy_per_layer(df: pd.DataFrame, num_layers: int | None = None, height: int = 340) -> go.Figure:
    """Accuracy of the samples that exited at each layer (``exit_layer``, ``correct`` columns); hover gives
    the count. Layers where nobody exited have no bar."""
    if df is None or len(df) == 0:
        return empty_figure("accuracy per exit layer", "no samples", height)
    g = df.groupby("exit_layer")["correct"].agg(["mean", "size"]).reset_index()
    n = int(num_layers or g["exit_layer"].max())
    fig = go.Figure(go.Bar(x=g["exit_layer"], y=g["mean"], customdata=g["size"],
                           text=[f"{m:.0%}" for m in g["mean"]], textposition="auto", marker_color="#2ca02c",
                           hovertemplate="exit layer %{x}<br>accuracy %{y:.3f}<br>%{customdata} samples"
                                         "<extra></extra>"))
    overall = float(df["correct"].mean())
    fig.add_hline(y=overall, line_dash="dash", line_color="black", annotation_text=f"overall {overall:.1%}")
    fig.update_layout(title="accuracy per exit layer", height=height,
                      xaxis=dict(title="exit layer", tickmode="linear", dtick=1, range=[0.5, n + 0.5]),
                      yaxis=dict(title="accuracy", range=[0, 1.05]), margin=dict(l=50, r=20, t=50, b=40))
    return fig


def trace_figure(res: dict, height: int = 360) -> go.Figure:
    """One sentence through a DACT model (``models.predict``'s result with ``layers``): y_n of the predicted class,
    h_n, p_n per layer and the exit layer. The legend sits below the plot, so it never covers the exit label
    (both at the top right would overlap)."""
    layers = res["layers"]
    xs = [lay["layer"] for lay in layers]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=[lay["y"].get(res["label"], 0.0) for lay in layers], mode="lines+markers",
                             name=f"yₙ: p({res['label']})"))
    fig.add_trace(go.Scatter(x=xs, y=[lay["h"] for lay in layers], mode="lines+markers", name="hₙ go on"))
    fig.add_trace(go.Bar(x=xs, y=[lay["p"] for lay in layers], name="pₙ = h₁⋯hₙ", opacity=0.4))
    # the label on the side of the line with room for it (centred on the last layer it was cut off at the edge)
    side = "top left" if res["exit_layer"] > (res["num_layers"] + 1) / 2 else "top right"
    fig.add_vline(x=res["exit_layer"], line_dash="dash", line_color="red", annotation_position=side,
                  annotation_text=f"exit at layer {res['exit_layer']} of {res['num_layers']}")
    fig.update_layout(title="Per-layer trace", height=height, margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(title="layer", dtick=1, range=[0.5, res["num_layers"] + 0.5]),
                      yaxis=dict(range=[0, 1.12]),
                      legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0))
    return fig
