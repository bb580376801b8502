"""Comparing runs: the settings and results of several runs side by side (a table and its parallel-coordinates
drawing), and runs that differ only in their seeds grouped into one mean ± spread curve."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .base import MAX_POINTS, colour, empty_figure, flatten, metric_series, panels_layout

#: settings that tell repeated runs apart without changing what is trained
SEED_KEYS = ("train.seed", "data.split_seed", "name", "tag")
RESULT_KEYS = ("val_accuracy", "val_macro_f1", "val_loss", "val_avg_exit_layer")


def _config(run: dict) -> dict:
    cfg = run.get("config") or {}
    return cfg.get("run", cfg) if isinstance(cfg.get("run"), dict) else cfg  # an engine parent: its RunConfig


def latest_values(metrics: pd.DataFrame, prefix: str = "hp/") -> dict[int, dict[str, float]]:
    """{run id: {name: its last logged value}} of the metrics whose name starts with ``prefix`` (a tracker metrics
    frame: run_id, name, step, value): PBT members log their hyperparameters as ``hp/...`` metrics, and the last
    value is where exploit / explore left them (their config holds only the starting values)."""
    if metrics is None or not len(metrics):
        return {}
    m = metrics[metrics["name"].astype(str).str.startswith(prefix)].sort_values(["run_id", "name", "step"])
    last = m.groupby(["run_id", "name"], sort=False)["value"].last()
    out: dict[int, dict[str, float]] = {}
    for (rid, name), v in last.items():
        out.setdefault(int(rid), {})[str(name)] = float(v)
    return out


def compare_table(runs: Sequence[dict], latest: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per run: ``run`` (id), the settings that differ between the runs (dotted keys; lists and
    mappings as JSON text), each run's ``latest`` values (e.g. a PBT member's explored hyperparameters,
    :func:`latest_values`, as ``hp/lr (last)``) and the best validation results of its summary
    (:data:`RESULT_KEYS`)."""
    flats = {int(r["id"]): flatten(_config(r)) for r in runs}
    keys = sorted(set().union(*[set(f) for f in flats.values()])) if flats else []
    varying = [k for k in keys if k not in ("name", "tag") and len(
        {json.dumps(f.get(k), sort_keys=True, default=str) for f in flats.values()}) > 1]
    rows = []
    for r in runs:
        f = flats[int(r["id"])]
        best = (r.get("summary") or {}).get("best") or {}
        row: dict[str, Any] = {"run": int(r["id"])}
        for k in varying:
            v = f.get(k)
            row[k] = json.dumps(v, default=str) if isinstance(v, (list, dict)) else v
        for k, v in sorted(((latest or {}).get(int(r["id"])) or {}).items()):
            row[f"{k} (last)"] = v
        for k in RESULT_KEYS:
            if isinstance(best.get(k), (int, float)):
                row[k] = float(best[k])
        rows.append(row)
    return pd.DataFrame(rows)


def _numeric_dimension(label: str, vals: pd.Series) -> dict[str, Any]:
    """A parcoords axis of numbers. Positive values spanning a decade or more (learning rates, weight decay) are
    drawn on a log scale, ticks at the decades written 1e-05, 1e-04 (a linear axis put every small value at 0 and
    wrote 0.0001, 0.0002 …); any other axis gets ticks with 3 significant digits."""
    import math

    known = vals.dropna()
    if len(known) >= 2 and (known > 0).all() and known.max() / known.min() >= 10:
        logs = np.log10(vals.where(vals > 0))
        lo, hi = math.floor(logs.min()), math.ceil(logs.max())
        ticks = list(range(lo, hi + 1))
        return {"label": label, "values": logs.fillna(lo), "tickvals": ticks,
                "ticktext": [f"{10.0 ** t:.0e}".replace("e-0", "e-").replace("e+0", "e") for t in ticks],
                "range": [lo, hi]}
    return {"label": label, "values": vals.fillna(known.min() if len(known) else 0.0), "tickformat": ".3~g"}


def parallel_coordinates_figure(table: pd.DataFrame, color: str = "val_accuracy", height: int = 420) -> go.Figure:
    """Parallel coordinates of :func:`compare_table`: one axis per differing setting (categories as ticks) and per
    result, one line per run, coloured by ``color``."""
    dims = []
    cols = [c for c in table.columns if c != "run" and table[c].notna().any()]
    for c in cols:
        col = table[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            dims.append(_numeric_dimension(c, col.astype(float)))
        else:
            cats = sorted({str(v) for v in col})
            idx = {v: i for i, v in enumerate(cats)}
            dims.append({"label": c, "values": [idx[str(v)] for v in col], "tickvals": list(range(len(cats))),
                         "ticktext": cats})
    if len(table) < 2 or not dims:
        return empty_figure("parallel coordinates", "choose two or more runs that differ in a setting")
    line: dict[str, Any] = {"color": colour(0)}
    if color in table.columns and table[color].notna().any():
        line = {"color": table[color].astype(float).fillna(table[color].min()), "colorscale": "Viridis",
                "showscale": True, "colorbar": {"title": {"text": color}}}
    fig = go.Figure(go.Parcoords(line=line, dimensions=dims))
    fig.update_layout(height=height, margin={"l": 60, "r": 60, "t": 60, "b": 30},
                      title={"text": "settings and results of the selected runs"})
    return fig


def seed_groups(runs: Sequence[dict]) -> dict[str, list[int]]:
    """Runs whose configs are equal but for their seeds (:data:`SEED_KEYS`): label -> run ids, in id order. A
    label names the group's first run and its size."""
    groups: dict[str, list[int]] = {}
    for r in sorted(runs, key=lambda r: int(r["id"])):
        f = {k: v for k, v in flatten(_config(r)).items() if k not in SEED_KEYS}
        key = f"{r.get('kind')}|" + json.dumps(f, sort_keys=True, default=str)
        groups.setdefault(key, []).append(int(r["id"]))
    return {f"#{ids[0]} ×{len(ids)}": ids for ids in groups.values()}


def grouped_curves_figure(metrics: pd.DataFrame, groups: dict[str, list[int]], names: Sequence[str], *,
                          max_points: int = MAX_POINTS, height: int = 380) -> go.Figure:
    """Per group of seeds and metric: the mean over the group's runs at every step that all of them logged, and
    a band from the lowest to the highest run (mean ± spread). One panel per metric."""
    wanted = set(names)
    series = metric_series(metrics, max_points, keep=lambda n: n in wanted)
    names = [n for n in names if any(k[1] == n for k in series)]
    if not names:
        return empty_figure("seeds grouped", "no metrics logged yet")
    fig = go.Figure()
    layout = panels_layout(names)
    for i, name in enumerate(names):
        sfx = "" if i == 0 else str(i + 1)
        for g, (label, ids) in enumerate(groups.items()):
            runs = [series[(rid, name)] for rid in ids if (rid, name) in series]
            if not runs:
                continue
            common = sorted(set.intersection(*[set(x.tolist()) for x, _ in runs]))
            if not common:
                continue
            by_step = [dict(zip(x.tolist(), v.tolist())) for x, v in runs]
            mat = np.array([[d[s] for s in common] for d in by_step])
            mean, low, high = mat.mean(0), mat.min(0), mat.max(0)
            c = colour(g)
            band = {"xaxis": f"x{sfx}", "yaxis": f"y{sfx}", "legendgroup": label, "showlegend": False,
                    "hoverinfo": "skip", "line": {"width": 0}, "mode": "lines"}
            fig.add_trace(go.Scatter(x=common, y=high, **band))
            fig.add_trace(go.Scatter(x=common, y=low, fill="tonexty", fillcolor=_rgba(c, 0.2), **band))
            fig.add_trace(go.Scatter(x=common, y=mean, name=f"{label} (n={len(runs)})", legendgroup=label,
                                     showlegend=i == 0, line={"color": c}, mode="lines",
                                     xaxis=f"x{sfx}", yaxis=f"y{sfx}"))
    layout.update(height=height, margin={"l": 40, "r": 20, "t": 50, "b": 40}, legend={"orientation": "h", "y": -0.25},
                  title={"text": "seeds grouped: mean and the range of the runs"})
    fig.update_layout(**layout)
    return fig


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    if len(h) != 6:
        return f"rgba(99,110,250,{alpha})"
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"
