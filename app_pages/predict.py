"""Predict: run a trained model on your own sentences — label, probabilities and, for DACT, the per-layer exit trace —
or on a whole file of texts (deploy.predict_files), with the predictions as a CSV download."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dact_lib import plots
from dact_lib.deploy.predict_files import predict_upload
from dact_lib.deploy.predictor import from_loaded
from dact_lib.errors import DactLabError
from dact_lib.models import MODEL_FILE, halting_choice, load_model, model_version, predict
from ui import state
from ui.safe import plain

st.title("Predict")
st.markdown("Pick a finished run with a saved model, type one sentence per line and press **Predict**. A DACT "
            "model also shows, layer by layer, its answer *y*ₙ (probability of the predicted class), the halting "
            "unit's *h*ₙ (the probability of going on after layer n; small means stop) and *p*ₙ = *h*₁⋯*h*ₙ, the "
            "probability mass still going on after layer n (the weight layer n+1's answer gets in the running "
            "answer), with the layer where it stopped.")


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _load(run_dir: str, version: str):
    """One loaded model per run folder and checkpoint version (the mtime of model.safetensors)."""
    return load_model(run_dir)


def model_runs() -> list[dict]:
    out = []
    # an interrupted (or cancelled) run's best checkpoint predicts too
    for r in state.tracker().list_runs(status=["finished", "interrupted", "cancelled"]):
        d = r.get("run_dir")
        if d and (Path(d) / MODEL_FILE).is_file():
            out.append(r)
    return out


def summary_row(text: str, res: dict) -> dict:
    """One row of the several-sentences table: every task's label and probability (multi-task), the exit layer
    (DACT)."""
    row: dict = {"text": text}
    tasks = res.get("tasks")
    if tasks:
        for task, r in tasks.items():
            row[task], row[f"{task} probability"] = r["label"], r["probability"]
    else:
        row["label"], row["probability"] = res["label"], res["probability"]
    if "exit_layer" in res:
        row["exit layer"] = res["exit_layer"]
    return row


def _label(r: dict) -> str:
    best = (r.get("summary") or {}).get("best") or {}
    acc = best.get("val_accuracy")
    extra = f", val acc {acc:.3f}" if isinstance(acc, (int, float)) else ""
    status = "" if r.get("status") == "finished" else f" ({r['status']}: its best checkpoint)"
    return f"#{r['id']} {r['kind']}{' ' + r['name'] if r.get('name') else ''}{extra}{status}"


def prob_chart(probs: dict[str, float], title: str, key: str) -> None:
    fig = go.Figure(go.Bar(x=list(probs.values()), y=list(probs), orientation="h"))
    fig.update_layout(title=title, height=80 + 28 * len(probs), margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(range=[0, 1], title="probability"), yaxis=dict(autorange="reversed"))
    st.plotly_chart(fig, width="stretch", key=key)


def dact_chart(res: dict, key: str) -> None:
    fig = plots.trace_figure(res)
    st.plotly_chart(fig, width="stretch", key=key)
    layers = res["layers"]
    st.dataframe(pd.DataFrame([{"layer": lay["layer"], "label": lay["label"], "y (pred. class)":
                                lay["y"].get(res["label"], 0.0), "h": lay["h"], "p": lay["p"]} for lay in layers]),
                 hide_index=True)


def show(res: dict, i: int) -> None:
    if "tasks" in res:  # multi-task: both heads
        cols = st.columns(len(res["tasks"]))
        for c, (task, r) in zip(cols, res["tasks"].items()):
            with c:
                st.metric(plain(task), plain(r["label"]), f"p = {r['probability']:.1%}", delta_color="off",
                          delta_arrow="off")
                prob_chart(r["probabilities"], task, key=f"predict:probs-{i}-{task}")
        return
    st.metric(plain(res.get("task") or "label"), plain(res["label"]), f"p = {res['probability']:.1%}",
              delta_color="off", delta_arrow="off")  # a probability, not a change: no arrow
    if "layers" in res:
        c1, c2 = st.columns(2)
        with c1:
            prob_chart(res["probabilities"], "Probabilities", key=f"predict:probs-{i}")
        with c2:
            dact_chart(res, key=f"predict:trace-{i}")
    else:
        prob_chart(res["probabilities"], "Probabilities", key=f"predict:probs-{i}")


runs = model_runs()
if not runs:
    st.info("No finished run with a saved model yet: train one from a Train page (or the demo button on Home).")
else:
    by_id = {r["id"]: r for r in runs}
    wanted = st.session_state.get("predict_run_id")
    if wanted is None:  # after a reload: the point last chosen on the Pareto explorer (stored as an event)
        from dact_lib.tuning.dact_pipeline.view import chosen_prediction_run

        wanted = chosen_prediction_run(state.tracker())
    if wanted is not None and int(wanted) in by_id and st.session_state.get("predict:run-from") != wanted:
        st.session_state["predict:run"] = int(wanted)  # chosen elsewhere (Pareto explorer, Runs)
        st.session_state["predict:run-from"] = wanted
    if st.session_state.get("predict:run") not in by_id:
        st.session_state["predict:run"] = runs[0]["id"]
    run_id = st.selectbox("Model", list(by_id), format_func=lambda i: _label(by_id[i]), key="predict:run")
    try:
        hc = halting_choice(Path(by_id[run_id]["run_dir"]))
    except Exception as exc:  # noqa: BLE001 - a damaged choice file: say so, predict still reports the error
        st.warning(plain(exc))
        hc = None
    if hc:
        from dact_lib.front import FrontPoint
        from dact_lib.tuning.dact_pipeline.view import point_name

        point = FrontPoint.from_dict(hc)
        st.caption(f"Halting units: trial {point.trial} {point_name(point)} — chosen on the Pareto explorer"
                   + (f" (validation: exit {point.val_avg_exit_layer:.2f} layers, accuracy "
                      f"{point.val_accuracy:.1%})" if point.val_avg_exit_layer is not None and
                      point.val_accuracy is not None else "")
                   + "; the run's own halting units are the pipeline's choice.")
    st.session_state.setdefault("predict:text", "The waiter was friendly and the pasta was delicious.")
    text = st.text_area("Text (one per line)", key="predict:text", height=120)
    if st.button("Predict", type="primary", key="predict:go", icon=":material/psychology:"):
        texts = [t.strip() for t in text.splitlines() if t.strip()]
        run_dir = Path(by_id[run_id]["run_dir"])
        try:
            loaded = _load(str(run_dir), model_version(run_dir))
            results = predict(loaded, texts)
        except DactLabError as exc:
            st.error(plain(exc))
        else:
            st.session_state["predict:results"] = (run_id, texts, results)
    stored = st.session_state.get("predict:results")
    if stored and stored[0] == run_id:
        _, texts, results = stored
        if len(results) > 1:
            st.dataframe(pd.DataFrame([summary_row(t, r) for t, r in zip(texts, results)]), hide_index=True,
                         width="stretch")
        for i, (t, r) in enumerate(zip(texts[:5], results[:5])):  # details of the first five
            if len(results) > 1:
                st.markdown(f"**{plain(t)}**")
            show(r, i)

    st.divider()
    st.subheader("Predict a file")
    upload = st.file_uploader("A file of texts: .csv / .tsv (a header row with a text column: text or sentence, or "
                              "one column only), .jsonl (one {\"text\": …} per line) or .txt (one text per line)",
                              type=["csv", "tsv", "jsonl", "txt"], key="predict:file")
    if st.button("Predict a file", key="predict:file-go", icon=":material/upload_file:", disabled=upload is None):
        run_dir = Path(by_id[run_id]["run_dir"])
        bar = st.progress(0.0, text="Reading the file…")

        def progress(done: int, total: int) -> None:
            bar.progress(done / total if total else 1.0, text=f"Predicted {done:,} of {total:,} texts")

        try:
            predictor = from_loaded(_load(str(run_dir), model_version(run_dir)))
            got = predict_upload(predictor, upload.name, upload.getvalue(), progress=progress)
        except DactLabError as exc:
            bar.empty()
            st.session_state.pop("predict:file-results", None)  # not the predictions of an earlier file
            st.error(plain(exc))
        else:
            bar.empty()
            got["rows"] = got["rows"][:20]  # what is shown; the whole file lives in the CSV bytes only
            st.session_state["predict:file-results"] = (run_id, upload.name, got)
    done = st.session_state.get("predict:file-results")
    if done and done[0] == run_id:
        _, name, got = done
        st.caption(plain(f"{name}: {got['count']:,} texts in {got['seconds']:.1f} s "
                         f"({got['rows_per_s']:,.0f} texts/s); the first {min(20, got['count'])} below."))
        st.dataframe(pd.DataFrame(got["rows"][:20]), hide_index=True, width="stretch")
        st.download_button("Download the predictions (CSV)", got["csv"], file_name=f"{Path(name).stem}-predictions.csv",
                           mime="text/csv", key="predict:file-download", icon=":material/download:")
