"""Home: what DACT Lab does, the runs recorded in this home, and a first run on the demo data."""
from __future__ import annotations

import datetime as _dt

import pandas as pd
import streamlit as st

from dact_lib.config import default_config
from dact_lib.tracker import run_scores
from ui import forms, state

st.title("DACT Lab")
st.markdown(
    "DACT Lab fine-tunes BERT-style text classifiers on your labelled CSV files and makes them **exit early**: "
    "a DACT-BERT model stops at the encoder layer where its answer is settled, saving computation on easy "
    "texts.\n\n"
    "Upload a dataset on **Data**, train a backbone, a DACT model, a multi-task model or a PBT population from "
    "the **Train** pages (Optuna tuning included), watch the runs live, compare accuracy against exit layer "
    "on the Pareto explorer, and try a trained model on **Predict**. Everything is stored in the home folder "
    f"`{state.home()}`."
)

st.subheader("First run")
st.markdown("New here? Train a small DACT model (bundled encoder, 2 epochs) on the bundled demo dataset — topics "
            "× sentiment sentences — then watch it on Runs and try it on Predict.")
if st.button("Train a DACT model on the demo data", type="primary", key="home:demo", icon=":material/rocket_launch:"):
    cfg = default_config("dact")
    cfg.train.epochs = 2
    cfg.name = "demo DACT"
    forms.submit_job("dact", cfg, name="demo DACT")
c1, c2 = st.columns(2)
with c1:
    forms.page_link("app_pages/runs.py", "Watch runs", ":material/monitoring:")
with c2:
    forms.page_link("app_pages/predict.py", "Try a model on Predict", ":material/psychology:")


def _time(t) -> str:
    return _dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def _best_val_accuracy(summary) -> float | None:
    if not isinstance(summary, dict):
        return None
    best = summary.get("best")
    if isinstance(best, dict) and best.get("val_accuracy") is not None:
        return best["val_accuracy"]
    for key in ("best_val_accuracy", "val_accuracy"):
        if isinstance(summary.get(key), (int, float)):
            return summary[key]
    return None


def _val_scores(run: dict) -> dict:
    """Best validation accuracy and macro-F1; for a multi-task run each task's, its mean labelled as such."""
    out = {}
    for k, v in run_scores(run).items():
        if k.startswith("val_"):
            out["best " + k.replace("val_accuracy", "val accuracy").replace("val_macro_f1", "val macro-F1")] = v
    if out.get("best val accuracy") is None and run["kind"] != "multitask":
        out["best val accuracy"] = _best_val_accuracy(run["summary"])  # engine parents record it elsewhere
    return out


def runs_table() -> None:
    tr = state.tracker()
    runs = tr.list_runs()
    if not runs:
        st.info("No runs yet: start one above or from a Train page.")
        return
    names = {d["id"]: d["name"] for d in tr.list_datasets()}
    table = pd.DataFrame([{
        "id": r["id"],
        "kind": r["kind"],
        "name": r["name"] or "",
        "status": r["status"],
        "dataset": names.get(r["dataset_id"], "" if r["dataset_id"] is None else f"#{r['dataset_id']} (deleted)"),
        **_val_scores(r),
        "parent": r["parent_id"],
        "started": _time(r["started"]),
        "ended": _time(r["ended"]),
    } for r in runs])
    scores = [c for c in table.columns if c.startswith("best val")]
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={**{c: st.column_config.NumberColumn(format="%.3f") for c in scores},
                                "parent": st.column_config.NumberColumn(format="%d")})
    forms.active_runs_caption(runs)


st.subheader("Runs")
# re-read with the page: the sidebar's status watch reruns it when a run is queued, starts training, ends or is deleted
runs_table()

st.subheader("Jobs of this server")
forms.jobs_panel(key="home:jobs")
