"""A self-contained HTML report of one run (curves, config, test results) for users without the dashboard."""
from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .tracker import Tracker


def curves_figure(metrics, title: str = "") -> go.Figure:
    """Loss (left) and accuracy / F1 / exit layer (right) against step, from a long-format metrics frame."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy · macro-F1 · exit layer"))
    for name, part in metrics.groupby("name"):
        part = part.sort_values("step")
        if name.endswith("loss") or "/loss" in name or name.startswith("val_loss"):
            col = 1
        elif "accuracy" in name or "f1" in name or "exit_layer" in name:
            col = 2
        else:
            continue
        fig.add_trace(go.Scatter(x=part["step"], y=part["value"], mode="lines+markers" if len(part) < 30 else "lines",
                                 name=name), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, height=420, margin=dict(l=40, r=20, t=60, b=40))
    return fig


def write_report(run_id: int, out: str | Path, home=None) -> Path:
    tracker = Tracker(home)
    run = tracker.get_run(run_id)
    metrics = tracker.get_metrics(run_id)
    parts = [f"<h1>DACT Lab run {run_id}: {html.escape(str(run.get('kind')))} — {html.escape(str(run.get('status')))}</h1>"]
    if len(metrics):
        fig = curves_figure(metrics, f"run {run_id}")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True))
        lr = metrics[metrics["name"] == "lr"]
        if len(lr):
            parts.append(go.Figure(go.Scatter(x=lr["step"], y=lr["value"], name="lr")).update_layout(
                title="learning rate", height=300).to_html(full_html=False, include_plotlyjs=False))
    else:
        parts.append("<p>No metrics were recorded for this run.</p>")
    summary = run.get("summary") or {}
    parts.append("<h2>Summary</h2><pre>" + html.escape(json.dumps(summary, indent=2)) + "</pre>")
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(run.get("config"), indent=2)) + "</pre>")
    events = tracker.get_events(run_id)
    if events:
        rows = "".join(f"<tr><td>{e['time']:.0f}</td><td>{html.escape(e['kind'])}</td><td><code>"
                       f"{html.escape(json.dumps(e['payload'])[:300])}</code></td></tr>" for e in events[:500])
        parts.append(f"<h2>Events</h2><table border=1 cellpadding=3><tr><th>time</th><th>kind</th><th>payload</th>"
                     f"</tr>{rows}</table>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>DACT Lab run "
            f"{run_id}</title></head><body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
            + "\n".join(parts) + "</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .files import atomic_write_text

    atomic_write_text(out, page)
    return out
