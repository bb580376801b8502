"""PBT view: a population's per-member curves, hyperparameter trajectories, exploit/explore lineage and events."""
from __future__ import annotations

import json
from datetime import datetime


import pandas as pd
import streamlit as st

from dact_lib import plots
from dact_lib.tracker import ACTIVE_STATUSES
from ui.safe import plain
from ui import state
from ui.state import tracker

st.title("PBT view")
tr = tracker()
parents = tr.list_runs(kind="pbt")
if not parents:
    st.info("No PBT runs yet. Start Population Based Training on the PBT page (or `python -m dact_lib pbt`); its "
            "members, their hyperparameters and who copied whom show up here.")
    state.stop()

by_id = {r["id"]: r for r in parents}
parent_id = st.selectbox("PBT run", list(by_id), key="pbt_parent",
                         format_func=lambda i: f"#{i} {by_id[i].get('name') or 'pbt'} · {by_id[i]['status']}")
active = by_id[parent_id]["status"] in ACTIVE_STATUSES


def _ts(t) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S") if t else ""


def population(pid: int, was_active: bool) -> None:
    parent = tr.get_run(pid)
    if was_active and parent["status"] not in ACTIVE_STATUSES:
        st.rerun()  # the run ended: one full rerun turns the timer off
    members = [m for m in tr.list_runs(parent_id=pid) if m["kind"] == "pbt-member"] or tr.list_runs(parent_id=pid)
    members.sort(key=lambda m: m["id"])
    st.caption(f"status **{parent['status']}** · {len(members)} members"
               + (f" · best member run #{parent['summary'].get('best_run_id')}"
                  if (parent.get("summary") or {}).get("best_run_id") else ""))
    if parent.get("error"):
        st.error(plain(parent["error"]))
    if not members:
        st.info("The population has not been created yet.")
        return
    ids = [m["id"] for m in members]
    metrics = tr.get_metrics(ids)
    names = sorted(set(metrics["name"])) if len(metrics) else []
    score_names = [n for n in names if n.startswith("val_") or n == "train_loss"]
    metric_default = (parent.get("config") or {}).get("pbt", {}).get("metric", "val_accuracy") \
        if isinstance((parent.get("config") or {}).get("pbt"), dict) else "val_accuracy"
    metric = None
    if score_names:
        idx = score_names.index(metric_default) if metric_default in score_names else 0
        metric = st.selectbox("Member metric", score_names, index=idx, key="pbt_metric")
    events = tr.get_events(pid)
    if not any("exploit" in e["kind"] or "explore" in e["kind"] for e in events):
        for m in members:  # older layouts log exploit/explore on the members only
            events += tr.get_events(m["id"])
    last_steps = metrics.groupby("run_id")["step"].max().astype(int).to_dict() if len(metrics) else {}

    def charts() -> tuple:
        return (plots.pbt_member_curves(metrics, members, metric) if metric else None,
                plots.hp_trajectories(metrics, members), plots.lineage_figure(members, events, last_steps))

    # redrawn every ui.state.CHARTS_REFRESH_S (per watching tab) and at once on a new evaluation, exploit or
    # explore, a member's new status or another metric; in between the same figures are sent again (not redrawn)
    evaluated = int(metrics["name"].str.startswith("val_").sum()) if len(metrics) else 0
    curves, hps, lineage = state.held("pbt_charts", (pid, metric, tuple((m["id"], m["status"]) for m in members),
                                                     len(events), evaluated), charts)
    if curves is not None:
        st.plotly_chart(curves, key="pbt_curves")
    else:
        st.caption("No member metrics logged yet.")
    st.plotly_chart(hps, key="pbt_hp")
    st.plotly_chart(lineage, key="pbt_lineage")

    labels = plots.member_labels(members)
    edges = plots.exploit_edges(events, members)
    st.subheader(f"Exploit / explore ({len(edges)})")
    if edges:
        st.dataframe(pd.DataFrame([{
            "step": e["step"], "recipient": labels.get(e["recipient"], e["recipient"]),
            "donor": labels.get(e["donor"], e["donor"]), "score": e.get("score"), "donor score": e.get("donor_score"),
            "old": json.dumps(e["old"], default=str), "copied": json.dumps(e["new"], default=str),
            "explored": json.dumps(e["explored"], default=str) if e.get("explored") is not None else "",
        } for e in edges]), hide_index=True)
    else:
        st.caption("No member has exploited another yet.")

    st.subheader("Members")
    summ = {m.get("run_id"): m for m in (parent.get("summary") or {}).get("members", []) if isinstance(m, dict)}
    st.dataframe(pd.DataFrame([{
        "run": m["id"], "name": m.get("name") or "", "status": m["status"],
        "last step": last_steps.get(m["id"]),
        "best score": (summ.get(m["id"]) or {}).get("best_score"),
        "exploits": (summ.get(m["id"]) or {}).get("exploits"),
        **{k: v for k, v in ((summ.get(m["id"]) or {}).get("final") or {}).items()},
    } for m in members]), hide_index=True)

    with st.expander("All events of the PBT run"):
        st.dataframe(pd.DataFrame([{"time": _ts(e["time"]), "run": e["run_id"], "kind": e["kind"],
                                    "payload": json.dumps(e["payload"], default=str)[:400]} for e in events]),
                     hide_index=True)


# on the status timer while the run is active (2 s until its first step, then 10 s per watching tab); it carries
# the page's status watch (ui.state.live_part)
state.live_part(population, active)(parent_id, active)
