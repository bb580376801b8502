"""The λ / exit-layer / accuracy trade-off: front points (:class:`~dact_lib.front.FrontPoint`), their front, the λ
chart with the exit-policy curves of the same weights, and the exit-policy comparison."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..front import FrontPoint, front_mask
from .base import POLICY_COLOURS, POLICY_LABELS, colour, empty_figure, fmt_value


def _x(p: FrontPoint) -> float:
    return float(p.val_avg_exit_layer) if p.val_avg_exit_layer is not None else float("nan")


def _y(p: FrontPoint) -> float:
    return float(p.val_accuracy) if p.val_accuracy is not None else float("nan")


_SWEEP_STYLE = {"entropy": ("#d62728", "diamond"), "patience": ("#2ca02c", "square"), "fixed": ("#7f7f7f", "x")}


# complexity: one optional layer per branch (front, user's choice, pipeline's choice, policy sweep)
def lambda_pareto_figure(points: Sequence[FrontPoint], front: Sequence[FrontPoint] | None = None, *,
                         chosen_run_id: Any = None, height: int = 460, chosen_trial: Any = None,
                         pipeline_trial: Any = None, sweep: Sequence[dict] | None = None) -> go.Figure:
    """Stage-3 λ trials: average exit layer (x, lower = faster) vs validation accuracy (y), coloured by log10 λ.
    The Pareto front — ``front`` when given (matched on trial number / run id), else the non-dominated points —
    is drawn as a second trace with outlined markers joined by a line. Hover shows the trial, λ, loss and params.
    ``customdata`` of both traces is ``[trial, run_id]`` (for selection events); the front trace is named
    "Pareto front". ``chosen_run_id`` marks the chosen model with a star (older pipelines: one run per point);
    ``chosen_trial`` marks the point used for prediction (a star) and ``pipeline_trial`` the pipeline's own choice
    (a ring) — points that share one model's weights. ``sweep``: exit-policy rows of the same weights (entropy,
    patience, fixed depth; ``avg_exit_layer``, ``accuracy`` in 0..1) drawn on the same axes. The y axis fits the
    data."""
    pts = [p for p in points if p.val_avg_exit_layer is not None and p.val_accuracy is not None]
    if not pts:
        return empty_figure("λ trade-off", "no stage-3 λ trials yet", height)
    if front is not None:
        fr = list(front)
        # a point is matched on its trial number when it has one (a fitted pipeline's front names the final run,
        # its trials the stage-2 run), on its run id only when it has no trial number
        def key(p: FrontPoint) -> tuple:
            return ("t", p.trial) if p.trial is not None else ("r", p.run_id)

        keys = {key(p) for p in fr}
        on = [key(p) in keys for p in pts]
        known = {key(p) for p in pts}
        for p in fr:  # front points that are not among the trials: add them
            if key(p) not in known and p.val_avg_exit_layer is not None and p.val_accuracy is not None:
                pts.append(p)
                on.append(True)
    else:
        on = front_mask(pts)
    lam = np.array([p.front_lambda if p.front_lambda is not None else np.nan for p in pts], dtype=np.float64)
    positive = lam[np.isfinite(lam) & (lam > 0)]
    floor = positive.min() / 10 if len(positive) else 1e-6
    loglam = np.log10(np.where(np.isfinite(lam) & (lam > 0), lam, floor))

    def hover(p: FrontPoint) -> str:
        parts = [f"trial {p.trial}" if p.trial is not None else "trial ?",
                 f"λ = {p.front_lambda:.3g}" if p.front_lambda is not None else
                 f"threshold τ = {p.threshold:.3g}" if p.threshold is not None else "λ = ?",
                 f"avg exit layer {_x(p):.3f}", f"val accuracy {_y(p):.4f}"]
        if p.val_loss is not None:
            parts.append(f"val loss {p.val_loss:.4f}")
        if p.val_nll is not None:
            parts.append(f"val NLL {p.val_nll:.4f}")
        if p.run_id is not None:
            parts.append(f"run {p.run_id}")
        parts += [f"{k} = {fmt_value(v)}" for k, v in list(p.params.items())[:12]]
        return "<br>".join(parts)

    def cd(p: FrontPoint) -> list:
        return [p.trial, p.run_id]

    cmin, cmax = float(loglam.min()), float(loglam.max())
    if cmin == cmax:
        cmin, cmax = cmin - 0.5, cmax + 0.5
    marker = dict(color=loglam, colorscale="Viridis", cmin=cmin, cmax=cmax, size=10,
                  colorbar=dict(title="log10 λ"), line=dict(width=0))
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[_x(p) for p in pts], y=[_y(p) for p in pts], mode="markers",
        name="λ trials", marker=marker, customdata=[cd(p) for p in pts], hovertext=[hover(p) for p in pts],
        hoverinfo="text"))
    fr_pts = sorted((p for p, o in zip(pts, on) if o), key=_x)
    fr_idx = [i for i, o in enumerate(on) if o]
    fr_idx.sort(key=lambda i: _x(pts[i]))
    fig.add_trace(go.Scatter(
        x=[_x(p) for p in fr_pts], y=[_y(p) for p in fr_pts], mode="lines+markers",
        name="Pareto front", line=dict(color="black", dash="dash", width=1.5, shape="hv"),
        marker=dict(size=15, color=[float(loglam[i]) for i in fr_idx], colorscale="Viridis", cmin=cmin, cmax=cmax,
                    line=dict(color="black", width=2.5)),
        customdata=[cd(p) for p in fr_pts], hovertext=["<b>on the front</b><br>" + hover(p) for p in fr_pts],
        hoverinfo="text"))
    ys, xs = [_y(p) for p in pts], [_x(p) for p in pts]
    for fam in ("entropy", "patience", "fixed"):
        rows = sorted((r for r in sweep or () if r.get("policy") == fam and r.get("avg_exit_layer") is not None
                       and r.get("accuracy") is not None), key=lambda r: r["avg_exit_layer"])
        if not rows:
            continue
        color, symbol = _SWEEP_STYLE[fam]
        ys += [r["accuracy"] for r in rows]
        xs += [r["avg_exit_layer"] for r in rows]
        fig.add_trace(go.Scatter(
            x=[r["avg_exit_layer"] for r in rows], y=[r["accuracy"] for r in rows], mode="lines+markers",
            name=f"{fam} (same weights)", line=dict(color=color, width=1), marker=dict(symbol=symbol, size=7,
                                                                                      color=color),
            hovertext=[f"{fam} {fmt_value(r.get('value'))}<br>avg exit layer {r['avg_exit_layer']:.3f}<br>"
                       f"accuracy {r['accuracy']:.4f}" for r in rows], hoverinfo="text", opacity=0.8))
    marks = []
    if pipeline_trial is not None:
        marks.append(("pipeline's choice", pipeline_trial, dict(symbol="circle-open", size=26,
                                                                 color="black", line=dict(width=2.5))))
    if chosen_trial is not None:
        marks.append(("used for prediction", chosen_trial, dict(symbol="star", size=22, color="gold",
                                                                 line=dict(color="black", width=1))))
    for label, trial, mk in marks:
        ch = [p for p in pts if p.trial is not None and str(p.trial) == str(trial)]
        if ch:
            fig.add_trace(go.Scatter(x=[_x(ch[0])], y=[_y(ch[0])], mode="markers",
                                     name=label, marker=mk, customdata=[cd(ch[0])],
                                     hovertext=[f"{label}: " + hover(ch[0])], hoverinfo="text"))
    lo, hi = min(ys), max(ys)
    pad = max(0.01, 0.08 * (hi - lo))
    fig.update_yaxes(range=[max(0.0, lo - pad), min(1.0, hi + pad) if hi < 1.0 else 1.0 + pad / 4])
    fig.update_xaxes(range=[max(0.0, min(xs) - 0.3), max(xs) + 0.3])
    if chosen_run_id is not None and chosen_trial is None:
        ch = [p for p in pts if p.run_id is not None and str(p.run_id) == str(chosen_run_id)]
        if ch:
            fig.add_trace(go.Scatter(x=[_x(ch[0])], y=[_y(ch[0])], mode="markers",
                                     name="chosen", marker=dict(symbol="star", size=22, color="gold",
                                                                line=dict(color="black", width=1)),
                                     customdata=[cd(ch[0])], hovertext=["chosen: " + hover(ch[0])],
                                     hoverinfo="text"))
    fig.update_layout(title="λ trade-off: average exit layer vs validation accuracy", height=height,
                      xaxis_title="validation average exit layer (lower = faster)",
                      yaxis_title="validation accuracy", margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", y=-0.18))
    return fig


# ----------------------------------------------------------------------------------------------- exit policies


def exit_policy_figure(rows: Sequence[dict], num_layers: int | None = None, height: int = 440) -> go.Figure:
    """Exit policies on one trained model: average exit layer (x) vs accuracy (y), one trace per policy
    (DACT rule, patience, entropy, fixed depth), lines through each policy's sweep; hover names the setting and
    wall time. With ``num_layers`` the top axis label also gives the layer speed-up N / avg."""
    if not rows:
        return empty_figure("exit policies", "no exit-policy sweep recorded", height)
    df = pd.DataFrame([dict(r) for r in rows])
    if "policy" not in df or "avg_exit_layer" not in df or "accuracy" not in df:
        return empty_figure("exit policies", "sweep rows lack policy / avg_exit_layer / accuracy", height)
    fig = go.Figure()
    order = [p for p in POLICY_LABELS if p in set(df["policy"])] + sorted(
        set(df["policy"]) - set(POLICY_LABELS))
    for i, pol in enumerate(order):
        part = df[df["policy"] == pol].sort_values("avg_exit_layer")
        texts = []
        for _, r in part.iterrows():
            t = f"{POLICY_LABELS.get(pol, pol)}"
            if r.get("value") is not None and not (isinstance(r.get("value"), float) and np.isnan(r.get("value"))):
                t += f" ({fmt_value(r['value'])})"
            t += f"<br>avg exit layer {r['avg_exit_layer']:.3f}<br>accuracy {r['accuracy']:.4f}"
            if num_layers:
                t += f"<br>layer speed-up {num_layers / max(r['avg_exit_layer'], 1e-9):.2f}×"
            if "latency_ms_p50" in part and pd.notna(r.get("latency_ms_p50")):
                t += f"<br>batch-1 latency {r['latency_ms_p50']:.2f} ms"
            elif "wall_s" in part and pd.notna(r.get("wall_s")):  # pipelines recorded before interleaved timing
                t += f"<br>wall {r['wall_s']:.3f}s"
            texts.append(t)
        is_dact = pol == "dact"
        fig.add_trace(go.Scatter(
            x=part["avg_exit_layer"], y=part["accuracy"], name=POLICY_LABELS.get(pol, pol),
            mode="markers" if is_dact and len(part) == 1 else "lines+markers",
            marker=dict(size=16 if is_dact else 8, symbol="star" if is_dact else "circle",
                        color=POLICY_COLOURS.get(pol, colour(i))),
            line=dict(color=POLICY_COLOURS.get(pol, colour(i))), hovertext=texts, hoverinfo="text"))
    fig.update_layout(title="exit policies on the final model", height=height,
                      xaxis_title="average exit layer", yaxis_title="accuracy",
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.18))
    return fig
