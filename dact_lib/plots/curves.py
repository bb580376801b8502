"""Training curves: losses, scores and the average exit layer per step, one panel each; EMA smoothing; the
config differences of the runs compared."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .base import MAX_POINTS, colour, empty_figure, metric_series

LOSS_NAMES = ("train_loss", "val_loss")
SCORE_PREFIXES = ("val_accuracy", "val_macro_f1", "train_accuracy")
EXIT_NAME = "val_avg_exit_layer"


def _panels_layout(titles: Sequence[str], gap: float = 0.07) -> dict:
    """A plain layout dict for ``len(titles)`` side-by-side panels (axes x/y, x2/y2, ...), titles as annotations."""
    n = len(titles)
    width = (1 - gap * (n - 1)) / n
    layout: dict[str, Any] = {"annotations": []}
    for i, title in enumerate(titles):
        sfx = "" if i == 0 else str(i + 1)
        lo = i * (width + gap)
        layout[f"xaxis{sfx}"] = {"domain": [lo, lo + width], "anchor": f"y{sfx}", "title": {"text": "step"}}
        layout[f"yaxis{sfx}"] = {"domain": [0, 1], "anchor": f"x{sfx}"}
        layout["annotations"].append({"text": title, "x": lo + width / 2, "y": 1.0, "xref": "paper",
                                      "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                                      "showarrow": False, "font": {"size": 14}})
    return layout


# ----------------------------------------------------------------------------------------------- training curves


def _panel_of(name: str) -> str | None:
    if name in LOSS_NAMES or name.startswith(("val_loss/", "train_loss/")):
        return "loss"
    if name.startswith(SCORE_PREFIXES):
        return "score"
    if name == EXIT_NAME:
        return "exit"
    return None


def curve_metric(name: str) -> bool:
    """True for the metrics :func:`curves_figure` draws (losses, validation accuracy / F1, avg exit layer)."""
    return _panel_of(name) is not None


def curves_figure(metrics: pd.DataFrame, run_labels: dict[int, str] | None = None, *,
                  names: Sequence[str] | None = None, max_points: int = MAX_POINTS, title: str = "",
                  height: int | None = None, smoothing: float = 0.0, log_y: bool = False) -> go.Figure:
    """Training curves of one or several runs on shared axes: loss (train/val), validation accuracy / macro-F1
    (per task too) and, for DACT runs, the validation average exit layer. One colour per run, one dash per metric.
    ``names`` restricts the metric names drawn. Each trace has at most ``max_points`` points. ``smoothing``
    (0 … <1): an exponential moving average of every curve (:func:`ema`, the TensorBoard slider); ``log_y``: log
    scale on the loss panel.

    Built as plain trace dicts (no per-trace validation): comparing 50 runs means ~200 traces, and plotly's
    validating constructors would cost more than everything else on the page."""
    wanted = set(names) if names is not None else None
    series = metric_series(metrics, max_points, keep=lambda n: curve_metric(n) and (wanted is None or n in wanted))
    if not series:
        return empty_figure(title or "training curves", "no loss / accuracy metrics logged yet")
    panels = [p for p in ("loss", "score", "exit") if any(_panel_of(k[1]) == p for k in series)]
    titles = {"loss": "loss", "score": "validation accuracy · macro-F1", "exit": "validation avg exit layer"}
    run_ids = sorted({k[0] for k in series})
    run_colour = {rid: colour(i) for i, rid in enumerate(run_ids)}
    names_sorted = sorted({k[1] for k in series})
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    name_dash = {n: dashes[i % len(dashes)] for i, n in enumerate(names_sorted)}
    several = len(run_ids) > 1
    traces = []
    for (rid, name), (x, v) in sorted(series.items()):
        if smoothing:
            v = ema(v, smoothing)
        i = panels.index(_panel_of(name))
        sfx = "" if i == 0 else str(i + 1)
        label = (run_labels or {}).get(rid, f"run {rid}")
        traces.append({
            "type": "scatter", "x": x, "y": v, "name": f"{label} · {name}" if several else name,
            "legendgroup": str(rid), "mode": "lines+markers" if len(x) < 30 else "lines",
            "line": {"color": run_colour[rid] if several else colour(names_sorted.index(name)),
                     "dash": name_dash[name] if several else "solid"},
            "xaxis": f"x{sfx}", "yaxis": f"y{sfx}",
            "hovertemplate": f"{label}<br>{name}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
        })
    layout = _panels_layout([titles[p] for p in panels])
    if log_y and "loss" in panels:
        layout["yaxis" + ("" if panels.index("loss") == 0 else str(panels.index("loss") + 1))]["type"] = "log"
    layout.update(title={"text": title}, height=height or 420, margin={"l": 40, "r": 20, "t": 60, "b": 40},
                  legend={"orientation": "h", "y": -0.2})
    return go.Figure(data=traces, layout=layout, _validate=False)


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing: s_t = w·s_{t-1} + (1-w)·v_t, divided by
    1 - w^t, so the first point is the first value (not pulled towards 0)."""
    w = float(weight)
    if not 0.0 <= w < 1.0:
        raise ValueError(f"smoothing = {weight!r}: expected a number in [0, 1).")
    out = np.empty(len(values), dtype=np.float64)
    s = 0.0
    for t, v in enumerate(np.asarray(values, dtype=np.float64), start=1):
        s = w * s + (1 - w) * v
        out[t - 1] = s / (1 - w ** t)
    return out


def config_diff(configs: dict[Any, dict]) -> pd.DataFrame:
    """Only the settings that differ between runs: one row per dotted key, one column per run."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    flats = {rid: flat(c or {}) for rid, c in configs.items()}
    keys = sorted(set().union(*[set(f) for f in flats.values()])) if flats else []
    rows = []
    for k in keys:
        vals = [flats[r].get(k) for r in flats]
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals}) > 1:
            rows.append({"setting": k, **{f"run {r}": json.dumps(flats[r].get(k), default=str) for r in flats}})
    return pd.DataFrame(rows, columns=["setting", *[f"run {r}" for r in flats]])


def metric_figure(metrics: pd.DataFrame, name: str, run_labels: dict[int, str] | None = None, *,
                  max_points: int = MAX_POINTS, title: str | None = None, height: int = 320,
                  line_shape: str = "linear") -> go.Figure:
    """One metric over steps, one line per run (e.g. the runs of a comparison, or the members of a PBT run)."""
    series = metric_series(metrics, max_points, keep=lambda n: n == name)
    if not series:
        return empty_figure(title or name, f"no {name} logged yet", height)
    fig = go.Figure()
    for i, ((rid, _), (x, v)) in enumerate(sorted(series.items())):
        label = (run_labels or {}).get(rid, f"run {rid}")
        fig.add_trace(go.Scatter(x=x, y=v, name=label, mode="lines+markers" if len(x) < 30 else "lines",
                                 line=dict(color=colour(i), shape=line_shape),
                                 hovertemplate=f"{label}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=title or name, height=height, xaxis_title="step", yaxis_title=name,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig
