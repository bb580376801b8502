"""PBT: member curves, hyperparameter trajectories, the exploit lineage (edges from the engine's events)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .curves import metric_figure
from .base import MAX_POINTS, colour, empty_figure, fmt_value, metric_series, short_text

HP_NAMES = ("hp/lr", "hp/weight_decay", "hp/dropout", "hp/warmup_ratio")


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
    series = metric_series(metrics, max_points, keep=lambda n: n.startswith("hp/"))
    present = sorted({k[1] for k in series})
    if hp_names is None:
        hp_names = [h for h in HP_NAMES if h in present] + [h for h in present if h not in HP_NAMES]
    hp_names = [h for h in hp_names if h in present]
    if not hp_names:
        return empty_figure("hyperparameter trajectories", "no hp/* metrics logged yet")
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
            # "1e-5", "3e-5", not SI-suffixed ticks ("10µ") nor cut decimals
            fig.update_yaxes(type="log", tickformat=".1~e", row=r, col=1)
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

    edges: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    explored: dict[tuple[int | None, Any], Any] = {}  # (recipient, step) -> the explored values
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
        return empty_figure("lineage", "no PBT members")
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
            text += f"<br>score {fmt_value(e['score'])} → donor {fmt_value(e['donor_score'])}"
        if old is not None or new is not None:
            text += f"<br>old: {short_text(old)}<br>copied: {short_text(new)}"
        if e.get("explored") is not None:
            text += f"<br>explored: {short_text(e['explored'])}"
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
