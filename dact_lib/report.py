"""A self-contained HTML report of one run (curves, config, test results) for users without the dashboard."""
from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .tracker import Tracker


PANELS = ("loss", "accuracy · macro-F1", "average exit layer")


def panel_of(name: str) -> int | None:
    """Which panel (1-3) a metric is drawn in — quantities with different units never share a y-axis."""
    if "exit_layer" in name:
        return 3
    if name.endswith("loss") or "/loss" in name or name.startswith("val_loss"):
        return 1
    if "accuracy" in name or "f1" in name:
        return 2
    return None


def curves_figure(metrics, title: str = "") -> go.Figure:
    """Loss, accuracy / F1 (0-1) and the exit layer (1-N) against step, each on its own y-axis."""
    names = [n for n in metrics["name"].unique() if panel_of(n)]
    panels = sorted({p for n in names if (p := panel_of(n)) is not None}) or [1]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[PANELS[p - 1] for p in panels])
    for name, part in metrics.groupby("name"):
        col = panel_of(name)
        if col is None:
            continue
        part = part.sort_values("step")
        fig.add_trace(go.Scatter(x=part["step"], y=part["value"], mode="lines+markers" if len(part) < 30 else "lines",
                                 name=name), row=1, col=panels.index(col) + 1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title=title, height=420, margin=dict(l=40, r=20, t=60, b=40))
    return fig


def _when(t: float | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def write_report(run_id: int, out: str | Path, home=None, plotly_cdn: bool = False) -> Path:
    """Write run ``run_id``'s HTML report to ``out``. plotly.js is inlined (a self-contained page of ~4.6 MB that
    opens offline) unless ``plotly_cdn``: then the page loads it from plotly's CDN and holds only the run's own
    data (~40 KB for a small run; drawing needs the internet)."""
    tracker = Tracker(home)
    run = tracker.get_run(run_id)
    metrics = tracker.get_metrics(run_id)
    parts = [f"<h1>DACT Lab run {run_id}: {html.escape(str(run.get('kind')))} — {html.escape(str(run.get('status')))}</h1>"]
    if len(metrics):
        fig = curves_figure(metrics, f"run {run_id}")
        parts.append(fig.to_html(full_html=False, include_plotlyjs="cdn" if plotly_cdn else True))
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
        rows = "".join(f"<tr><td>{_when(e['time'])}</td><td>{html.escape(e['kind'])}</td><td><code>"
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
