"""Plotly figure builders for the dashboard pages (and anything else that wants a figure). No streamlit here.

Every builder takes plain data — a long-format metrics frame (``run_id, step, epoch, name, value, time``) as
:meth:`Tracker.get_metrics` returns it, lists of dicts, arrays — and returns a ``plotly.graph_objects.Figure``.
Long series are thinned to at most ``max_points`` points per trace by :func:`downsample` (min/max per bucket,
so spikes survive), which keeps the page fast however long a run was.
"""
from __future__ import annotations

import json

import math
import time as _time
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .jobs import ENGINE_KINDS  # the kinds of the tuning engines' parent runs

MAX_POINTS = 2000
PALETTE = qualitative.Plotly + qualitative.D3 + qualitative.Set2

LOSS_NAMES = ("train_loss", "val_loss")
SCORE_PREFIXES = ("val_accuracy", "val_macro_f1", "train_accuracy")
EXIT_NAME = "val_avg_exit_layer"
HP_NAMES = ("hp/lr", "hp/weight_decay", "hp/dropout", "hp/warmup_ratio")
POLICY_LABELS = {"dact": "DACT rule", "patience": "patience (PABEE)", "entropy": "entropy (DeeBERT)",
                 "fixed": "fixed depth"}
POLICY_COLOURS = {"dact": "#d62728", "patience": "#1f77b4", "entropy": "#2ca02c", "fixed": "#7f7f7f"}


def colour(i: int) -> str:
    return PALETTE[int(i) % len(PALETTE)]


def _empty(title: str, note: str = "no data yet", height: int = 320) -> go.Figure:
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


def _series(metrics: pd.DataFrame, max_points: int,
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
    series = _series(metrics, max_points, keep=lambda n: curve_metric(n) and (wanted is None or n in wanted))
    if not series:
        return _empty(title or "training curves", "no loss / accuracy metrics logged yet")
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
    series = _series(metrics, max_points, keep=lambda n: n == name)
    if not series:
        return _empty(title or name, f"no {name} logged yet", height)
    fig = go.Figure()
    for i, ((rid, _), (x, v)) in enumerate(sorted(series.items())):
        label = (run_labels or {}).get(rid, f"run {rid}")
        fig.add_trace(go.Scatter(x=x, y=v, name=label, mode="lines+markers" if len(x) < 30 else "lines",
                                 line=dict(color=colour(i), shape=line_shape),
                                 hovertemplate=f"{label}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>"))
    fig.update_layout(title=title or name, height=height, xaxis_title="step", yaxis_title=name,
                      margin=dict(l=50, r=20, t=50, b=40))
    return fig


# ----------------------------------------------------------------------------------------------- progress / ETA


def _cfg_total_steps(config: dict | None) -> int | None:
    tc = (config or {}).get("train") or {}
    max_steps = tc.get("max_steps")
    return int(max_steps) if max_steps else None


def progress_eta(run: dict, metrics: pd.DataFrame | None = None, events: Iterable[dict] | None = None,
                 now: float | None = None, steps_done: int | None = None) -> dict[str, Any]:
    """Progress of a run: ``steps_done`` (the highest logged step, or the given ``steps_done``; the summary's
    ``steps`` once ended), ``total_steps`` (from the 'start' event's ``steps``; else the config's
    ``train.max_steps``; else None), ``fraction`` (0..1 or None), ``elapsed_s`` and ``eta_s`` (seconds left at
    the average pace since the run started; None when unknown; 0 once the run has ended) and a short ``text``."""
    now = _time.time() if now is None else float(now)
    status = run.get("status")
    summary = run.get("summary") or {}
    total = None
    for e in events or []:
        if e.get("kind") == "start" and isinstance(e.get("payload"), dict) and e["payload"].get("steps"):
            total = int(e["payload"]["steps"])  # the last start wins (a restarted run)
    if total is None:
        total = _cfg_total_steps(run.get("config"))
    done = 0
    first_t = last_t = None
    if metrics is not None and len(metrics):
        done = int(metrics["step"].max())
        t = metrics["time"].to_numpy(dtype=np.float64)
        first_t, last_t = float(np.nanmin(t)), float(np.nanmax(t))
    if steps_done is not None:
        done = max(done, int(steps_done))
    if summary.get("steps") is not None and status not in ("running", "queued"):
        done = max(done, int(summary["steps"]))
    started = run.get("started") if run.get("started") is not None else first_t
    ended = run.get("ended") if status not in ("running", "queued") else None
    elapsed = ((ended if ended is not None else now) - started) if started is not None else None
    fraction = min(1.0, done / total) if total else None
    if status == "finished":
        fraction = 1.0 if total or done else fraction
    eta = None
    if status in ("running", "queued"):
        if total and done and elapsed and elapsed > 0:
            eta = max(0.0, elapsed / done * (total - done))
    elif status is not None:
        eta = 0.0
    phase = None
    for e in events or []:
        if e.get("kind") == "phase" and isinstance(e.get("payload"), dict):
            phase = e["payload"].get("phase")  # the latest
    if total:
        text = f"step {done:,} / {total:,}"
    else:
        text = f"step {done:,}"
    if status == "running" and not done and phase and phase != "training":
        text = f"{phase}… · " + text  # before the first step: say what it is doing
    if eta is not None and status in ("running", "queued"):
        text += f" · ETA {format_seconds(eta)}"
    if elapsed is not None:
        text += f" · elapsed {format_seconds(elapsed)}"
    return {"steps_done": done, "total_steps": total, "fraction": fraction, "elapsed_s": elapsed, "eta_s": eta,
            "text": text, "last_metric_time": last_t}


_STAGES = ("stage1", "stage2", "stage3")


def engine_progress(run: dict, events: Iterable[dict] | None = None, members: Iterable[dict] | None = None,
                    now: float | None = None) -> dict[str, Any]:
    """Progress of a tuning engine's parent run (kinds in :data:`ENGINE_KINDS`), which logs no training steps of
    its own, in the shape of :func:`progress_eta`.

    * ``pbt``: ``members`` are the :func:`progress_eta` results of its member runs (they train side by side):
      fraction = steps of all members / their planned steps; ETA at the population's pace.
    * ``tune-backbone``: trials done (its 'trial' events) + the final run, out of the configured trials (+ 1 when
      a final training is asked for); ETA at the average trial time (trials cost about the same).
    * ``dact-pipeline``: trials done per stage out of ``trials_stage1..3`` + the final run. No ETA: a stage-1 trial
      on cached features takes seconds, a stage-2 trial minutes, so an average would mislead; the text names the
      stage instead.

    Ended runs report fraction 1.0 when finished (their last value otherwise) and ETA 0."""
    now = _time.time() if now is None else float(now)
    kind, status = run.get("kind"), run.get("status")
    cfg = run.get("config") or {}
    events = list(events or [])
    active = status in ("running", "queued")
    started = run.get("started")
    ended = run.get("ended") if not active else None
    elapsed = ((ended if ended is not None else now) - started) if started is not None else None
    done = total = None
    eta = None
    text = ""
    if kind == "pbt":
        ms = list(members or [])
        totals = [m.get("total_steps") for m in ms]
        done = sum(int(m.get("steps_done") or 0) for m in ms)
        pop = ((cfg.get("pbt") or {}).get("population"))
        if ms and all(totals):
            total = sum(int(t) for t in totals)
        text = f"{len(ms) or pop or '?'} members · step {done:,}" + (f" / {total:,}" if total else "")
        if active and total and done and elapsed:
            eta = max(0.0, elapsed / done * (total - done))
    elif kind == "tune-backbone":
        trials = cfg.get("trials")
        finals = 1 if cfg.get("final") else 0
        n_trials = sum(1 for e in events if e.get("kind") == "trial")
        stopped = any(e.get("kind") == "timeout" for e in events)
        done = n_trials
        if isinstance(trials, int) and trials > 0:
            total = (n_trials if stopped else trials) + finals
        text = f"trial {n_trials}" + (f" / {trials}" if isinstance(trials, int) else "")
        if finals and active and total is not None and n_trials >= total - finals:
            text += " · final training"
        if active and total and done and elapsed:
            eta = max(0.0, elapsed / done * (total - done))
    elif kind == "dact-pipeline":
        pipe = cfg.get("pipeline") or {}
        planned = {s: int(pipe.get(f"trials_{s}") or 0) for s in _STAGES}
        per_stage = {s: 0 for s in _STAGES}
        current = None
        for e in events:
            pl = e.get("payload") if isinstance(e.get("payload"), dict) else {}
            if e.get("kind") == "trial" and pl.get("stage") in per_stage:
                per_stage[pl["stage"]] += 1
            elif e.get("kind") == "stage_start":
                current = pl.get("stage")
            elif e.get("kind") == "stage_end" and pl.get("stage") in planned:
                per_stage[pl["stage"]] = max(per_stage[pl["stage"]], planned[pl["stage"]])  # a timeout ends it early
            elif e.get("kind") == "resumed":
                for s in pl.get("stages_done") or []:
                    if s in planned:
                        per_stage[s] = max(per_stage[s], planned[s])
        final_done = any(e.get("kind") == "pipeline_end" or (e.get("kind") == "stage_end" and isinstance(
            e.get("payload"), dict) and e["payload"].get("stage") == "final") for e in events)
        done = sum(min(per_stage[s], planned[s]) for s in _STAGES) + int(final_done)
        total = sum(planned.values()) + 1 if any(planned.values()) else None
        if current in planned:
            text = f"{current}: trial {per_stage[current]} / {planned[current]}"
        elif current == "final":
            text = "final training"
        else:
            text = "starting"
    fraction = min(1.0, done / total) if total and done is not None else None
    if status == "finished":
        fraction, eta = 1.0, 0.0
    elif not active and status is not None:
        eta = 0.0
    if eta is not None and active:
        text += f" · ETA {format_seconds(eta)}"
    if elapsed is not None:
        text += f" · elapsed {format_seconds(elapsed)}"
    return {"steps_done": done or 0, "total_steps": total, "fraction": fraction, "elapsed_s": elapsed,
            "eta_s": eta, "text": text.strip(" ·"), "last_metric_time": None}


def run_progress(tracker, run: dict, metrics: pd.DataFrame | None = None, events: Iterable[dict] | None = None,
                 steps_done: int | None = None, now: float | None = None) -> dict[str, Any]:
    """:func:`progress_eta` for a training run, :func:`engine_progress` for an engine's parent run (reading its
    PBT members' steps and events from ``tracker``)."""
    events = tracker.get_events(run["id"]) if events is None else events
    if run.get("kind") not in ENGINE_KINDS:
        if steps_done is None and metrics is None:
            steps_done = tracker.last_steps([run["id"]]).get(run["id"])
        return progress_eta(run, metrics, events, now=now, steps_done=steps_done)
    members = None
    if run.get("kind") == "pbt":
        kids = tracker.list_runs(parent_id=run["id"])
        steps = tracker.last_steps([k["id"] for k in kids])
        members = [progress_eta(k, None, tracker.get_events(k["id"]), now=now, steps_done=steps.get(k["id"]))
                   for k in kids]
    return engine_progress(run, events, members, now=now)


def format_seconds(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# ----------------------------------------------------------------------------------------------- PBT


def member_labels(members: Sequence[dict]) -> dict[int, str]:
    """run id -> "<name> (#id)" (or "member k (#id)" in id order)."""
    out = {}
    for i, m in enumerate(sorted(members, key=lambda m: int(m["id"]))):
        out[int(m["id"])] = f"{m['name']} (#{m['id']})" if m.get("name") else f"member {i} (#{m['id']})"
    return out


def pbt_member_curves(metrics: pd.DataFrame, members: Sequence[dict], metric: str = "val_accuracy", *,
                      max_points: int = MAX_POINTS, height: int = 360) -> go.Figure:
    """One line per PBT member for ``metric`` over steps."""
    return metric_figure(metrics, metric, member_labels(members), max_points=max_points,
                         title=f"members · {metric}", height=height)


def hp_trajectories(metrics: pd.DataFrame, members: Sequence[dict], hp_names: Sequence[str] | None = None, *,
                    max_points: int = MAX_POINTS) -> go.Figure:
    """Hyperparameter trajectories (``hp/*`` metrics) of every member over steps, one row per hyperparameter,
    drawn as steps (a value holds until exploit/explore changes it). The learning rate uses a log axis."""
    labels = member_labels(members)
    series = _series(metrics, max_points, keep=lambda n: n.startswith("hp/"))
    present = sorted({k[1] for k in series})
    if hp_names is None:
        hp_names = [h for h in HP_NAMES if h in present] + [h for h in present if h not in HP_NAMES]
    hp_names = [h for h in hp_names if h in present]
    if not hp_names:
        return _empty("hyperparameter trajectories", "no hp/* metrics logged yet")
    fig = make_subplots(rows=len(hp_names), cols=1, shared_xaxes=True, subplot_titles=list(hp_names),
                        vertical_spacing=min(0.08, 0.3 / max(1, len(hp_names))))
    ids = sorted(labels) or sorted({k[0] for k in series})
    for r, hp in enumerate(hp_names, start=1):
        for i, rid in enumerate(ids):
            if (rid, hp) not in series:
                continue
            x, v = series[(rid, hp)]
            label = labels.get(rid, f"run {rid}")
            fig.add_trace(go.Scatter(x=x, y=v, name=label, legendgroup=str(rid), showlegend=r == 1,
                                     mode="lines+markers" if len(x) < 30 else "lines",
                                     line=dict(color=colour(i), shape="hv"),
                                     hovertemplate=f"{label}<br>step %{{x}}<br>{hp} %{{y:.4g}}<extra></extra>"),
                          row=r, col=1)
        if hp in ("hp/lr", "hp/weight_decay") and all(
                (series[(rid, hp)][1] > 0).all() for rid in ids if (rid, hp) in series):
            fig.update_yaxes(type="log", row=r, col=1)
    fig.update_xaxes(title_text="step", row=len(hp_names), col=1)
    fig.update_layout(height=220 * len(hp_names) + 80, margin=dict(l=60, r=20, t=50, b=40),
                      title="hyperparameter trajectories")
    return fig




def _member_lookup(members: Sequence[dict]) -> dict[Any, int]:
    """Keys under which an exploit event may name a member -> its run id (run id, its str, its name, its config's
    member index, its position in id order)."""
    look: dict[Any, int] = {}
    ordered = sorted(members, key=lambda m: int(m["id"]))
    for pos, m in enumerate(ordered):
        rid = int(m["id"])
        look.setdefault(("pos", pos), rid)
        cfg = m.get("config") or {}
        for key in ("member", "member_index", "index"):
            if isinstance(cfg, dict) and cfg.get(key) is not None:
                look.setdefault(("idx", str(cfg[key])), rid)
        summ = m.get("summary") or {}
        for key in ("member", "member_index", "index"):
            if isinstance(summ, dict) and summ.get(key) is not None:
                look.setdefault(("idx", str(summ[key])), rid)
        if m.get("name"):
            look.setdefault(("name", str(m["name"])), rid)
        look[("id", str(rid))] = rid
    return look


def resolve_member(ref: Any, members: Sequence[dict], lookup: dict | None = None) -> int | None:
    """The run id of the member an event field names (a run id, a member index, a name), or None."""
    if ref is None:
        return None
    if isinstance(ref, dict):
        ref = ref.get("run_id", ref.get("id", ref.get("member")))
    look = lookup if lookup is not None else _member_lookup(members)
    s = str(ref)
    for key in (("id", s), ("idx", s), ("name", s)):
        if key in look:
            return look[key]
    try:
        return look.get(("pos", int(ref)))
    except (TypeError, ValueError):
        return None


def exploit_edges(events: Iterable[dict], members: Sequence[dict]) -> list[dict]:
    """Exploit events as edges: ``donor`` and ``recipient`` run ids, ``step`` (the recipient's), ``old`` / ``new``
    hyperparameters, scores, time. Members are named by ``donor_run_id`` / ``recipient_run_id`` when the payload
    has them, else by ``donor`` / ``recipient`` (a run id, a member index or a name). A matching explore event
    (same recipient and step) adds its ``explored`` values. Duplicates (the same event logged on the parent and on
    the recipient's run) are dropped. Without any exploit event, explore events become the edges."""
    look = _member_lookup(members)
    events = list(events)
    kinds = [str(e.get("kind", "")) for e in events]
    use = "exploit" if any("exploit" in k for k in kinds) else "explore"

    def ref(p: dict, who: str) -> int | None:
        rid = resolve_member(p.get(f"{who}_run_id"), members, look) if p.get(f"{who}_run_id") is not None else None
        if rid is None:
            rid = resolve_member(p.get(who), members, look)
        return rid

    edges, seen, explored = [], set(), {}
    for e, kind in zip(events, kinds):
        p = e.get("payload") or {}
        if "explore" in kind and use == "exploit":
            explored[(ref(p, "recipient"), p.get("step"))] = p.get("new")
            continue
        if use not in kind:
            continue
        donor, recipient = ref(p, "donor"), ref(p, "recipient")
        if recipient is None and p.get("member") is not None:
            recipient = resolve_member(p.get("member"), members, look)
        key = (kind, donor, recipient, p.get("step"), p.get("time"))
        if key in seen:
            continue
        seen.add(key)
        edges.append({"kind": kind, "donor": donor, "recipient": recipient, "step": p.get("step"),
                      "time": p.get("time", e.get("time")), "old": p.get("old"), "new": p.get("new"),
                      "score": p.get("score"), "donor_score": p.get("donor_score"), "explored": None})
    for edge in edges:
        edge["explored"] = explored.get((edge["recipient"], edge["step"]))
    return edges


def lineage_figure(members: Sequence[dict], events: Iterable[dict], last_steps: dict[int, int] | None = None,
                   ) -> go.Figure:
    """Exploit/explore lineage: one row per member over steps, an arrow donor → recipient at every exploit step
    (hover: old → new hyperparameters). Events without a step are placed in time order."""
    labels = member_labels(members)
    if not labels:
        return _empty("lineage", "no PBT members")
    ids = sorted(labels)
    row = {rid: i for i, rid in enumerate(ids)}
    edges = [e for e in exploit_edges(events, members) if e["recipient"] in row]
    # x position: the step when given, else the rank of the event time
    if any(e["step"] is None for e in edges):
        times = sorted({e["time"] or 0 for e in edges})
        for e in edges:
            if e["step"] is None:
                e["step"] = times.index(e["time"] or 0) + 1
    max_step = max([int(e["step"]) for e in edges] + list((last_steps or {}).values()) + [1])
    fig = go.Figure()
    for rid in ids:
        end = (last_steps or {}).get(rid, max_step)
        fig.add_trace(go.Scatter(x=[0, end], y=[row[rid]] * 2, mode="lines", line=dict(color=colour(row[rid]),
                                 width=6), opacity=0.35, name=labels[rid], hoverinfo="name", showlegend=False))
    ex, ey, texts = [], [], []
    for e in edges:
        s, r = float(e["step"]), row[e["recipient"]]
        old, new = e.get("old"), e.get("new")
        text = f"{e['kind']} at step {e['step']}<br>{labels.get(e['donor'], e['donor'])} → {labels[e['recipient']]}"
        if e.get("score") is not None and e.get("donor_score") is not None:
            text += f"<br>score {_fmt(e['score'])} → donor {_fmt(e['donor_score'])}"
        if old is not None or new is not None:
            text += f"<br>old: {_short(old)}<br>copied: {_short(new)}"
        if e.get("explored") is not None:
            text += f"<br>explored: {_short(e['explored'])}"
        if e["donor"] in row and e["donor"] != e["recipient"]:
            d = row[e["donor"]]
            fig.add_annotation(x=s, y=r, ax=s, ay=d, xref="x", yref="y", axref="x", ayref="y", showarrow=True,
                               arrowhead=2, arrowsize=1.2, arrowwidth=1.5, arrowcolor=colour(d))
        ex.append(s)
        ey.append(r)
        texts.append(text)
    if ex:
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="markers", marker=dict(size=10, symbol="diamond", color="black"),
                                 hovertext=texts, hoverinfo="text", name="exploit / explore"))
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(ids))), ticktext=[labels[r] for r in ids],
                     range=[len(ids) - 0.3, -0.7])  # member 0 on top
    fig.update_layout(title="exploit / explore lineage (arrow: donor → recipient)", xaxis_title="step",
                      height=max(260, 60 * len(ids) + 120), margin=dict(l=120, r=20, t=50, b=40))
    return fig


def _short(v: Any, n: int = 160) -> str:
    if isinstance(v, dict):
        s = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    else:
        s = _fmt(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------- DACT: λ Pareto


def _num(d: dict, *keys: str) -> float | None:
    for k in keys:
        v = d.get(k)
        if v is not None:
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if np.isfinite(f):
                return f
    return None


def normalize_point(p: dict) -> dict:
    """A stage-3 trial/front point with canonical keys: trial, lambda, val_loss, val_error, val_accuracy,
    val_avg_exit_layer, run_id, params (the original keys are kept too)."""
    q = dict(p)
    params = p.get("params") if isinstance(p.get("params"), dict) else {}
    q["params"] = params
    q["trial"] = p.get("trial", p.get("number", p.get("trial_number")))
    lam = _num(p, "lambda", "ponder_lambda", "lam")
    if lam is None:
        lam = _num(params, "lambda", "ponder_lambda", "model.ponder_lambda", "lam")
    q["lambda"] = lam
    q["val_avg_exit_layer"] = _num(p, "val_avg_exit_layer", "avg_exit_layer", "exit_layer")
    acc = _num(p, "val_accuracy", "accuracy")
    err = _num(p, "val_error", "error")
    if acc is None and err is not None:
        acc = 1.0 - err
    if err is None and acc is not None:
        err = 1.0 - acc
    q["val_accuracy"], q["val_error"] = acc, err
    q["val_loss"] = _num(p, "val_loss", "loss")
    q["val_nll"] = _num(p, "val_nll", "nll")
    rid = p.get("run_id")
    q["run_id"] = int(rid) if rid is not None and str(rid).lstrip("-").isdigit() else rid
    return q


def front_mask(points: Sequence[dict], x: str = "val_avg_exit_layer", y: str = "val_accuracy") -> list[bool]:
    """Non-dominated points (lower ``x``, higher ``y`` is better); points missing x or y are never on it."""
    ok = [p.get(x) is not None and p.get(y) is not None for p in points]
    out = []
    for i, p in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and q[x] <= p[x] and q[y] >= p[y] and (q[x] < p[x] or q[y] > p[y])
                        for j, q in enumerate(points) if j != i)
        out.append(not dominated)
    return out


_SWEEP_STYLE = {"entropy": ("#d62728", "diamond"), "patience": ("#2ca02c", "square"), "fixed": ("#7f7f7f", "x")}


def lambda_pareto_figure(points: Sequence[dict], front: Sequence[dict] | None = None, *,
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
    pts = [normalize_point(p) for p in points]
    pts = [p for p in pts if p["val_avg_exit_layer"] is not None and p["val_accuracy"] is not None]
    if not pts:
        return _empty("λ trade-off", "no stage-3 λ trials yet", height)
    if front is not None:
        fr = [normalize_point(p) for p in front]
        # a point is matched on its trial number when it has one (a fitted pipeline's front names the final run,
        # its trials the stage-2 run), on its run id only when it has no trial number
        def key(p: dict) -> tuple:
            return ("t", p["trial"]) if p["trial"] is not None else ("r", p["run_id"])

        keys = {key(p) for p in fr}
        on = [key(p) in keys for p in pts]
        known = {key(p) for p in pts}
        for p in fr:  # front points that are not among the trials: add them
            if key(p) not in known and p["val_avg_exit_layer"] is not None \
                    and p["val_accuracy"] is not None:
                pts.append(p)
                on.append(True)
    else:
        on = front_mask(pts)
    lam = np.array([p["lambda"] if p["lambda"] is not None else np.nan for p in pts], dtype=np.float64)
    positive = lam[np.isfinite(lam) & (lam > 0)]
    floor = positive.min() / 10 if len(positive) else 1e-6
    loglam = np.log10(np.where(np.isfinite(lam) & (lam > 0), lam, floor))

    def hover(p: dict) -> str:
        parts = [f"trial {p['trial']}" if p["trial"] is not None else "trial ?",
                 f"λ = {p['lambda']:.3g}" if p["lambda"] is not None else
                 f"threshold τ = {_num(p, 'tau'):.3g}" if _num(p, "tau") is not None else "λ = ?",
                 f"avg exit layer {p['val_avg_exit_layer']:.3f}", f"val accuracy {p['val_accuracy']:.4f}"]
        if p["val_loss"] is not None:
            parts.append(f"val loss {p['val_loss']:.4f}")
        if _num(p, "val_nll") is not None:
            parts.append(f"val NLL {_num(p, 'val_nll'):.4f}")
        if p["run_id"] is not None:
            parts.append(f"run {p['run_id']}")
        parts += [f"{k} = {_fmt(v)}" for k, v in list(p["params"].items())[:12]]
        return "<br>".join(parts)

    def cd(p: dict) -> list:
        return [p["trial"], p["run_id"]]

    cmin, cmax = float(loglam.min()), float(loglam.max())
    if cmin == cmax:
        cmin, cmax = cmin - 0.5, cmax + 0.5
    marker = dict(color=loglam, colorscale="Viridis", cmin=cmin, cmax=cmax, size=10,
                  colorbar=dict(title="log10 λ"), line=dict(width=0))
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[p["val_avg_exit_layer"] for p in pts], y=[p["val_accuracy"] for p in pts], mode="markers",
        name="λ trials", marker=marker, customdata=[cd(p) for p in pts], hovertext=[hover(p) for p in pts],
        hoverinfo="text"))
    fr_pts = sorted((p for p, o in zip(pts, on) if o), key=lambda p: p["val_avg_exit_layer"])
    fr_idx = [i for i, o in enumerate(on) if o]
    fr_idx.sort(key=lambda i: pts[i]["val_avg_exit_layer"])
    fig.add_trace(go.Scatter(
        x=[p["val_avg_exit_layer"] for p in fr_pts], y=[p["val_accuracy"] for p in fr_pts], mode="lines+markers",
        name="Pareto front", line=dict(color="black", dash="dash", width=1.5, shape="hv"),
        marker=dict(size=15, color=[float(loglam[i]) for i in fr_idx], colorscale="Viridis", cmin=cmin, cmax=cmax,
                    line=dict(color="black", width=2.5)),
        customdata=[cd(p) for p in fr_pts], hovertext=["<b>on the front</b><br>" + hover(p) for p in fr_pts],
        hoverinfo="text"))
    ys, xs = [p["val_accuracy"] for p in pts], [p["val_avg_exit_layer"] for p in pts]
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
            hovertext=[f"{fam} {_fmt(r.get('value'))}<br>avg exit layer {r['avg_exit_layer']:.3f}<br>"
                       f"accuracy {r['accuracy']:.4f}" for r in rows], hoverinfo="text", opacity=0.8))
    marks = []
    if pipeline_trial is not None:
        marks.append(("pipeline's choice", pipeline_trial, dict(symbol="circle-open", size=26,
                                                                 color="black", line=dict(width=2.5))))
    if chosen_trial is not None:
        marks.append(("used for prediction", chosen_trial, dict(symbol="star", size=22, color="gold",
                                                                 line=dict(color="black", width=1))))
    for label, trial, mk in marks:
        ch = [p for p in pts if p["trial"] is not None and str(p["trial"]) == str(trial)]
        if ch:
            fig.add_trace(go.Scatter(x=[ch[0]["val_avg_exit_layer"]], y=[ch[0]["val_accuracy"]], mode="markers",
                                     name=label, marker=mk, customdata=[cd(ch[0])],
                                     hovertext=[f"{label}: " + hover(ch[0])], hoverinfo="text"))
    lo, hi = min(ys), max(ys)
    pad = max(0.01, 0.08 * (hi - lo))
    fig.update_yaxes(range=[max(0.0, lo - pad), min(1.0, hi + pad) if hi < 1.0 else 1.0 + pad / 4])
    fig.update_xaxes(range=[max(0.0, min(xs) - 0.3), max(xs) + 0.3])
    if chosen_run_id is not None and chosen_trial is None:
        ch = [p for p in pts if p["run_id"] is not None and str(p["run_id"]) == str(chosen_run_id)]
        if ch:
            fig.add_trace(go.Scatter(x=[ch[0]["val_avg_exit_layer"]], y=[ch[0]["val_accuracy"]], mode="markers",
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
        return _empty("exit policies", "no exit-policy sweep recorded", height)
    df = pd.DataFrame([dict(r) for r in rows])
    if "policy" not in df or "avg_exit_layer" not in df or "accuracy" not in df:
        return _empty("exit policies", "sweep rows lack policy / avg_exit_layer / accuracy", height)
    fig = go.Figure()
    order = [p for p in POLICY_LABELS if p in set(df["policy"])] + sorted(
        set(df["policy"]) - set(POLICY_LABELS))
    for i, pol in enumerate(order):
        part = df[df["policy"] == pol].sort_values("avg_exit_layer")
        texts = []
        for _, r in part.iterrows():
            t = f"{POLICY_LABELS.get(pol, pol)}"
            if r.get("value") is not None and not (isinstance(r.get("value"), float) and np.isnan(r.get("value"))):
                t += f" ({_fmt(r['value'])})"
            t += f"<br>avg exit layer {r['avg_exit_layer']:.3f}<br>accuracy {r['accuracy']:.4f}"
            if num_layers:
                t += f"<br>layer speed-up {num_layers / max(r['avg_exit_layer'], 1e-9):.2f}×"
            if "wall_s" in part and pd.notna(r.get("wall_s")):
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


# ----------------------------------------------------------------------------------------------- per-sample exits


def exit_histogram(exit_layers: Sequence[int] | np.ndarray, num_layers: int | None = None,
                   height: int = 340) -> go.Figure:
    """Number of samples per exit layer (1..N, zero bars included)."""
    e = np.asarray(exit_layers, dtype=np.int64)
    if e.size == 0:
        return _empty("exit layers", "no samples", height)
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
        return _empty("accuracy per exit layer", "no samples", height)
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


# ----------------------------------------------------------------------------------------------- pipeline records


def pipeline_view(run: dict, events: Sequence[dict]) -> dict[str, Any]:
    """What the Pareto explorer shows of a ``dact-pipeline`` parent run, from its summary and events:

    * ``trials`` — every finished stage-3 trial (``trial`` events of stage 'stage3', state complete) as points
      (trial, lambda, val_avg_exit_layer, val_accuracy, val_nll / val_error, val_loss, run_id, params);
    * ``front`` — the stage-3 Pareto front (summary ``front``, else the last ``pareto_front`` event), or None;
    * ``pipeline_choice`` — the point the pipeline's choice rule (or ``choose_point``) picked;
    * ``sweep`` / ``num_layers`` — the final model's exit-policy sweep rows (summary, else the last
      ``exit_policy_sweep`` event);
    * ``final_run_id``; ``chosen_run_id`` — the model chosen for prediction in the dashboard (last ``chosen``
      event), or None; ``user_choice`` — that choice's payload (trial, λ) when it is another point than the
      pipeline's own choice, else None; ``fitted`` — the points share one model (stage 3 fitted halting units per
      point), so a choice swaps halting files instead of runs.
    """
    summary = run.get("summary") or {}
    trials, front, choice, sweep, num_layers, chosen, final_id = [], None, None, None, None, None, None
    user = None
    for e in events:
        kind, p = e.get("kind"), e.get("payload") or {}
        if kind == "trial" and p.get("stage") == "stage3" and p.get("state", "complete") == "complete":
            ua = p.get("user_attrs") or {}
            values = p.get("values") or []
            params = p.get("params") or {}
            pt = {"trial": p.get("number"), "lambda": params.get("ponder_lambda", p.get("lambda")),
                  "val_avg_exit_layer": ua.get("val_avg_exit_layer", values[1] if len(values) > 1 else None),
                  "val_accuracy": ua.get("val_accuracy"), "val_nll": ua.get("val_nll"),
                  "val_loss": ua.get("val_loss"), "run_id": ua.get("run_id"), "params": params,
                  "tau": params.get("tau"), **{k: ua[k] for k in ("halting_file", "spec_lambda") if k in ua}}
            if pt["val_accuracy"] is not None:
                pt["val_error"] = 1.0 - float(pt["val_accuracy"])
            trials.append(pt)
        elif kind == "pareto_front" and isinstance(p.get("front"), list):
            front = p["front"]
        elif kind == "chosen_point" and isinstance(p.get("point"), dict):  # the pipeline's rule (never the user's)
            choice = p["point"]
        elif kind == "exit_policy_sweep" and isinstance(p.get("rows"), list):
            sweep, num_layers = p["rows"], p.get("num_layers")
            final_id = p.get("final_run_id", final_id)
        elif kind == "chosen" and p.get("run_id") is not None:
            chosen = p["run_id"]
            user = dict(p) if p.get("source") != "final" else None
    if isinstance(summary.get("front"), list):
        front = summary["front"]
    if choice is None and isinstance(summary.get("chosen"), dict):
        choice = summary["chosen"]
    if isinstance(summary.get("exit_policy_sweep"), list) and summary["exit_policy_sweep"]:
        sweep = summary["exit_policy_sweep"]
    final_id = summary.get("final_run_id", final_id)
    if not trials and front:
        trials = list(front)
    return {"trials": [normalize_point(t) for t in trials],
            "front": [normalize_point(p) for p in front] if front is not None else None,
            "pipeline_choice": normalize_point(choice) if choice else None, "sweep": sweep or [],
            "num_layers": num_layers, "final_run_id": final_id, "chosen_run_id": chosen,
            "user_choice": user if user and user.get("trial") != (choice or {}).get("trial") else None,
            "fitted": any(p.get("halting_file") for p in trials + list(front or []))}


def point_name(p: dict | None) -> str:
    """How a stage-3 point is named on the pages: ``threshold τ = …``, ``λ = …`` or ``trial n``."""
    if not p:
        return "?"
    if p.get("tau") is not None:
        return f"threshold τ = {p['tau']:.3g}"
    return f"λ = {p['lambda']:.3g}" if p.get("lambda") is not None else f"trial {p.get('trial')}"


def prediction_trial(view: dict, current_run_id: Any) -> Any:
    """The stage-3 trial whose halting units the model ``current_run_id`` predicts with, for a pipeline whose
    points share one model (``view["fitted"]``): the user's choice if any, else the pipeline's; None when
    ``current_run_id`` is not the pipeline's final run."""
    final = view.get("final_run_id")
    if current_run_id is None or final is None or int(current_run_id) != int(final):
        return None
    chosen = view.get("user_choice") or view.get("pipeline_choice") or {}
    return chosen.get("trial")


def chosen_prediction_run(tracker, parent_id: int | None = None) -> int | None:
    """The run id last chosen for prediction on the Pareto explorer (a ``chosen`` event on a ``dact-pipeline``
    run: ``parent_id``'s, else the newest over all pipelines), or None. Lets a page restore the choice after a
    reload."""
    parents = [parent_id] if parent_id is not None else [r["id"] for r in tracker.list_runs(kind="dact-pipeline")]
    best = None
    for pid in parents:
        for e in tracker.get_events(pid, kinds=["chosen"]):
            rid = (e.get("payload") or {}).get("run_id")
            if rid is not None and (best is None or e["id"] > best[0]):
                best = (e["id"], int(rid))
    return None if best is None else best[1]
