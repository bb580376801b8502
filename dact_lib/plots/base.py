"""What every figure shares: colours, the empty-state figure, min/max downsampling of long series, value
formatting."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

MAX_POINTS = 2000
PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Set2
POLICY_LABELS = {"dact": "DACT rule", "patience": "patience (PABEE)", "entropy": "entropy (DeeBERT)",
                 "fixed": "fixed depth"}
POLICY_COLOURS = {"dact": "#d62728", "patience": "#1f77b4", "entropy": "#2ca02c", "fixed": "#7f7f7f"}


def colour(i: int) -> str:
    return PALETTE[int(i) % len(PALETTE)]


def empty_figure(title: str, note: str = "no data yet", height: int = 320) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#888"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=height, margin=dict(l=40, r=20, t=50, b=40))
    return fig


# ----------------------------------------------------------------------------------------------- downsampling


def downsample_index(y: np.ndarray, max_points: int = MAX_POINTS) -> np.ndarray:
    """Positions to keep so that at most ``max_points`` remain: the first and last point and, per bucket of
    consecutive points, the minimum and the maximum (NaN-safe). Positions are sorted."""
    n = len(y)
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 4:
        return np.unique(np.linspace(0, n - 1, max(1, max_points)).round().astype(np.int64))
    buckets = (max_points - 2) // 2
    size = math.ceil(n / buckets)
    vals = np.asarray(y, dtype=np.float64)
    pad = buckets * size - n
    mat = np.concatenate([vals, np.full(pad, np.nan)]).reshape(buckets, size)
    finite = ~np.isnan(mat)
    has = finite.any(axis=1)
    lo = np.where(finite, mat, np.inf).argmin(axis=1)
    hi = np.where(finite, mat, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * size
    keep = np.concatenate([[0, n - 1], (base + lo)[has], (base + hi)[has]])
    keep = keep[keep < n]
    return np.unique(keep)


def downsample(df: pd.DataFrame, max_points: int = MAX_POINTS, y: str = "value") -> pd.DataFrame:
    """``df`` (one series, sorted by x) thinned to at most ``max_points`` rows (see :func:`downsample_index`)."""
    if max_points is None or len(df) <= max_points:
        return df
    return df.iloc[downsample_index(df[y].to_numpy(), max_points)]


def metric_series(metrics: pd.DataFrame, max_points: int,
            keep: Any = None) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(run_id, name) -> (steps, values) sorted by step, one value per step (the last logged), downsampled to
    ``max_points``. ``keep(name) -> bool`` selects names. Vectorised: one lexsort for the whole frame."""
    out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    if metrics is None or len(metrics) == 0:
        return out
    codes, uniq = pd.factorize(metrics["name"], sort=False)
    if keep is not None:
        wanted = np.array([bool(keep(str(n))) for n in uniq] + [False])
        mask = wanted[codes]  # code -1 (a missing name) maps to the trailing False
        if not mask.all():
            metrics, codes = metrics[mask], codes[mask]
        if len(codes) == 0:
            return out
    rid = metrics["run_id"].to_numpy(dtype=np.int64)
    step = metrics["step"].to_numpy(dtype=np.int64)
    val = metrics["value"].to_numpy(dtype=np.float64)
    order = np.lexsort((np.arange(len(rid)), step, codes, rid))  # run, name, step, then insertion order
    rid, codes, step, val = rid[order], codes[order], step[order], val[order]
    last = np.ones(len(rid), dtype=bool)  # the same (run, name, step) logged twice: keep the last
    last[:-1] = (rid[:-1] != rid[1:]) | (codes[:-1] != codes[1:]) | (step[:-1] != step[1:])
    rid, codes, step, val = rid[last], codes[last], step[last], val[last]
    starts = np.flatnonzero(np.r_[True, (rid[1:] != rid[:-1]) | (codes[1:] != codes[:-1])])
    ends = np.r_[starts[1:], len(rid)]
    for a, b in zip(starts, ends):
        x, v = step[a:b], val[a:b]
        if b - a > max_points:
            idx = downsample_index(v, max_points)
            x, v = x[idx], v[idx]
        out[(int(rid[a]), str(uniq[codes[a]]))] = (x, v)
    return out


def short_text(v: Any, n: int = 160) -> str:
    if isinstance(v, dict):
        s = ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    else:
        s = fmt_value(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``train.lr``)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def panels_layout(titles: Sequence[str], gap: float = 0.07, x_title: str = "step") -> dict:
    """A plain layout dict for ``len(titles)`` side-by-side panels (axes x/y, x2/y2, ...), titles as annotations."""
    n = len(titles)
    width = (1 - gap * (n - 1)) / n
    layout: dict[str, Any] = {"annotations": []}
    for i, title in enumerate(titles):
        sfx = "" if i == 0 else str(i + 1)
        lo = i * (width + gap)
        layout[f"xaxis{sfx}"] = {"domain": [lo, lo + width], "anchor": f"y{sfx}", "title": {"text": x_title}}
        layout[f"yaxis{sfx}"] = {"domain": [0, 1], "anchor": f"x{sfx}"}
        layout["annotations"].append({"text": title, "x": lo + width / 2, "y": 1.0, "xref": "paper",
                                      "yref": "paper", "xanchor": "center", "yanchor": "bottom",
                                      "showarrow": False, "font": {"size": 14}})
    return layout
