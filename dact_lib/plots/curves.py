"""Training curves: losses, scores and the average exit layer per step, one panel each; EMA smoothing; the
config differences of the runs compared."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .base import MAX_POINTS, colour, empty_figure, flatten, metric_series, panels_layout

LOSS_NAMES = ("train_loss", "val_loss")
SCORE_PREFIXES = ("val_accuracy", "val_macro_f1", "train_accuracy")
EXIT_NAME = "val_avg_exit_layer"


#: what the curves' x axis can show, and its title
X_AXES = {"step": "step", "epoch": "epoch", "time": "minutes since the run started"}


def x_axis_maps(metrics: pd.DataFrame, how: str, steps_per_epoch: dict[int, float] | None = None
                ) -> dict[int, Any]:
    """Per run id, a function from optimizer steps to the x axis ``how``: ``"epoch"`` — fractional epochs, step /
    steps per epoch (``steps_per_epoch[run]``, e.g. from the run's 'start' event; else read off its logged
    ``epoch`` metric); ``"time"`` — minutes since the run's first logged row, interpolated between logged steps.
    ``"step"``: no maps (steps are the x axis)."""
    if how not in X_AXES:
        raise ValueError(f"x axis {how!r}: choose one of {list(X_AXES)}.")
    out: dict[int, Any] = {}
    if how == "step" or metrics is None or len(metrics) == 0:
        return out
    for rid, df in metrics.groupby("run_id"):
        rid = int(rid)
        if how == "epoch":
            spe = (steps_per_epoch or {}).get(rid)
            if spe:
                out[rid] = lambda s, spe=float(spe): np.asarray(s, dtype=np.float64) / spe
                continue
            ep = df[df["name"] == "epoch"].sort_values("step")
            if len(ep):
                xs, ys = ep["step"].to_numpy(np.float64), ep["value"].to_numpy(np.float64)
                out[rid] = lambda s, xs=xs, ys=ys: np.interp(np.asarray(s, dtype=np.float64), xs, ys)
        else:
            t = df.groupby("step")["time"].min().sort_index()
            xs = t.index.to_numpy(np.float64)
            ys = (t.to_numpy(np.float64) - float(np.nanmin(t.to_numpy(np.float64)))) / 60.0
            out[rid] = lambda s, xs=xs, ys=ys: np.interp(np.asarray(s, dtype=np.float64), xs, ys)
    return out


# ----------------------------------------------------------------------------------------------- training curves


def _panel_of(name: str) -> str | None:
    if name in LOSS_NAMES or name.startswith(("val_loss/", "train_loss/")):
        return "loss"
    if name.startswith(SCORE_PREFIXES):
        return "score"
    if name == EXIT_NAME:
        return "exit"
    return None


def score_title(names: set[str]) -> str:
    """The score panel's title names what it draws: the validation scores, and the training accuracy when a run
    logs it (a panel titled "validation" drew train_accuracy)."""
    split = ("train · validation" if any(n.startswith("train_") for n in names) and
             any(n.startswith("val_") for n in names) else "train" if all(n.startswith("train_") for n in names)
             else "validation")
    kinds = [w for w, pre in (("accuracy", "_accuracy"), ("macro-F1", "_macro_f1")) if any(pre in n for n in names)]
    return f"{split} {' · '.join(kinds) or 'scores'}"


def curve_metric(name: str) -> bool:
    """True for the metrics :func:`curves_figure` draws (losses, validation accuracy / F1, avg exit layer)."""
    return _panel_of(name) is not None


def curves_figure(metrics: pd.DataFrame, run_labels: dict[int, str] | None = None, *,
                  names: Sequence[str] | None = None, max_points: int = MAX_POINTS, title: str = "",
                  height: int | None = None, smoothing: float = 0.0, log_y: bool = False, x_axis: str = "step",
                  steps_per_epoch: dict[int, float] | None = None, per_task: bool = False) -> go.Figure:
    """Training curves of one or several runs on shared axes: loss (train/val), validation accuracy / macro-F1
    (per task too) and, for DACT runs, the validation average exit layer. One colour per run, one dash per metric.
    ``names`` restricts the metric names drawn. Each trace has at most ``max_points`` points. ``smoothing``
    (0 … <1): an exponential moving average of every curve (:func:`ema`, the TensorBoard slider); ``log_y``: log
    scale on the loss panel; ``x_axis``: ``"step"``, ``"epoch"`` (fractional, ``steps_per_epoch`` per run when
    known) or ``"time"`` (minutes since each run started), see :func:`x_axis_maps`; ``per_task``: small
    multiples — one score panel per task of a multi-task run (``val_accuracy/<task>``, ``val_macro_f1/<task>``)
    instead of every task's lines on one.

    Built as plain trace dicts (no per-trace validation): comparing 50 runs means ~200 traces, and plotly's
    validating constructors would cost more than everything else on the page."""
    wanted = set(names) if names is not None else None
    series = metric_series(metrics, max_points, keep=lambda n: curve_metric(n) and (wanted is None or n in wanted))
    if not series:
        return empty_figure(title or "training curves", "no loss / accuracy metrics logged yet")
    def panel(name: str) -> str:
        p = _panel_of(name) or ""  # "" never happens: every series is a curve_metric, which has a panel
        if per_task and p == "score" and "/" in name:
            return f"score/{name.split('/', 1)[1]}"
        return p

    tasks = sorted({p for k in series if (p := panel(k[1])).startswith("score/")})
    panels = [p for p in ("loss", "score", *tasks, "exit") if any(panel(k[1]) == p for k in series)]
    titles = {"loss": "loss", "score": score_title({k[1] for k in series if panel(k[1]) == "score"}),
              "exit": "validation avg exit layer", **{t: f"{t.split('/', 1)[1]}: accuracy · macro-F1" for t in tasks}}
    run_ids = sorted({k[0] for k in series})
    run_colour = {rid: colour(i) for i, rid in enumerate(run_ids)}
    names_sorted = sorted({k[1] for k in series})
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    name_dash = {n: dashes[i % len(dashes)] for i, n in enumerate(names_sorted)}
    several = len(run_ids) > 1
    x_maps = x_axis_maps(metrics, x_axis, steps_per_epoch)
    x_name = X_AXES[x_axis]
    x_fmt = "" if x_axis == "step" else ":.3g"
    traces = []
    shown_runs: dict[int, str] = {}
    for (rid, name), (x, v) in sorted(series.items()):
        if smoothing:
            v = ema(v, smoothing)
        if rid in x_maps:
            x = x_maps[rid](x)
        i = panels.index(panel(name))
        sfx = "" if i == 0 else str(i + 1)
        label = (run_labels or {}).get(rid, f"run {rid}")
        shown_runs.setdefault(rid, label)
        traces.append({
            "type": "scatter", "x": x, "y": v, "name": f"{label} · {name}" if several else name,
            # several runs: the legend has one entry per run (its colour; clicking it hides the run's lines) and
            # one per metric (its dash), added below — not one per run × metric
            "showlegend": not several,
            "legendgroup": str(rid), "mode": "lines+markers" if len(x) < 30 else "lines",
            "line": {"color": run_colour[rid] if several else colour(names_sorted.index(name)),
                     "dash": name_dash[name] if several else "solid"},
            "xaxis": f"x{sfx}", "yaxis": f"y{sfx}",
            "hovertemplate": f"{label}<br>{name}<br>{x_axis} %{{x{x_fmt}}}<br>%{{y:.4g}}<extra></extra>",
        })
    if several:  # legend-only entries (meta "legend"): each run's colour, each metric's dash in grey
        for rid, label in shown_runs.items():
            traces.append({"type": "scatter", "x": [None], "y": [None], "name": label, "mode": "lines",
                           "line": {"color": run_colour[rid]}, "legendgroup": str(rid), "showlegend": True,
                           "hoverinfo": "skip", "meta": "legend"})
        for name in names_sorted:
            traces.append({"type": "scatter", "x": [None], "y": [None], "name": name, "mode": "lines",
                           "line": {"color": "#888888", "dash": name_dash[name]}, "legendgroup": f"metric:{name}",
                           "showlegend": True, "hoverinfo": "skip", "meta": "legend"})
    layout = panels_layout([titles[p] for p in panels], x_title=x_name)
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
    flats = {rid: flatten(c or {}) for rid, c in configs.items()}
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
