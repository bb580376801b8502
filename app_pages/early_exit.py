"""Early exit: per-sample exit layers of a trained DACT run (DactBert.infer under the DACT rule) — histogram,
accuracy per exit layer, and a filterable table of sentences with their exit layer and confidence."""
from __future__ import annotations

from pathlib import Path


import streamlit as st

from dact_lib import plots
from dact_lib.exits import filter_exits, per_sample_exits
from dact_lib.halting import exit_advice
from dact_lib.models import halting_choice, model_version
from ui.safe import plain
from ui.state import tracker

st.title("Early exit")
tr = tracker()


def _has_model(r: dict) -> bool:
    return (Path(r.get("run_dir") or tr.run_dir(r["id"])) / "model.safetensors").is_file()


runs = [r for r in tr.list_runs(kind="dact") if r["status"] == "finished" and _has_model(r)]
if not runs:
    st.info("No finished DACT run with a saved model yet. Train one (DACT pipeline, or kind 'dact' on the Train "
            "pages); this page then shows how many layers each test sentence needed.")
    st.stop()

by_id = {r["id"]: r for r in runs}
default = st.session_state.get("predict_run_id")
if st.session_state.get("early_run") not in by_id:
    st.session_state["early_run"] = default if default in by_id else runs[0]["id"]
c1, c2 = st.columns([3, 1])
run_id = c1.selectbox("DACT run", list(by_id), key="early_run",
                      format_func=lambda i: f"#{i} {by_id[i].get('name') or 'dact'}"
                      + (f" · {by_id[i]['tag']}" if by_id[i].get("tag") else ""))
split = c2.radio("Split", ["test", "val"], horizontal=True, key="early_split")


@st.cache_data(show_spinner=False, max_entries=8)
def _exits(run_dir: str, split: str, version: str):
    return per_sample_exits(run_dir, split=split)


run_dir = Path(by_id[run_id].get("run_dir") or tr.run_dir(run_id))
try:
    with st.spinner("Running the model over the split (cached in the run folder afterwards)…"):
        df = _exits(str(run_dir), split, model_version(run_dir))
except Exception as exc:  # noqa: BLE001 - show the library's message, keep the page alive
    st.error(f"Could not compute per-sample exits of run {run_id}: {plain(exc)}")
    st.stop()

n_layers = int(df.attrs.get("num_layers") or (df["exit_layer"].max() if len(df) else 1))
used = df.attrs.get("split", split)
if used != split:
    st.caption(f"Run {run_id} has no {split} split: showing the {used} split.")
_data = (by_id[run_id].get("config") or {}).get("data") or {}
_frac = _data.get("test_frac" if used == "test" else "val_frac")
st.caption(f"The run's own {used} split: {len(df):,} rows"
           + (f" ({_frac:.0%} of its dataset, split seed {_data.get('split_seed', 0)})" if _frac else "")
           + " — the rows the run was evaluated on, not a new sample.")
if not len(df):
    st.info("The split is empty.")
    st.stop()

avg = float(df["exit_layer"].mean())
m1, m2, m3, m4 = st.columns(4)
m1.metric("sentences", f"{len(df):,}")
m2.metric("accuracy", f"{df['correct'].mean():.1%}")
m3.metric("average exit layer", f"{avg:.2f} / {n_layers}")
m4.metric("layer speed-up", f"{n_layers / avg:.2f}×")
hc = halting_choice(run_dir)
if hc:
    st.caption(f"Halting units: trial {hc.get('trial')} of the pipeline's stage 3, chosen on the Pareto explorer "
               "(the run's own units are the pipeline's choice).")
advice = exit_advice(run_dir, n_layers) if not hc else None
if advice:
    st.info(advice)

g1, g2 = st.columns(2)
g1.plotly_chart(plots.exit_histogram(df["exit_layer"].to_numpy(), n_layers), key="early_hist")
g2.plotly_chart(plots.accuracy_per_layer(df, n_layers), key="early_acc")

st.subheader("Sentences")
if "early_layers" not in st.session_state or max(st.session_state["early_layers"]) > n_layers:
    st.session_state["early_layers"] = (1, n_layers)


def _all_layers() -> None:
    # every such sentence, as the histogram counts them: the other filters are cleared (it kept "incorrect")
    st.session_state["early_layers"] = (n_layers, n_layers)
    st.session_state["early_correct"] = "all"
    st.session_state["early_search"] = ""


def _reset() -> None:
    st.session_state["early_layers"] = (1, n_layers)
    st.session_state["early_correct"] = "all"
    st.session_state["early_search"] = ""


f1, f2, f3 = st.columns([2, 2, 3])
if n_layers > 1:
    layers = f1.slider("exit layer", 1, n_layers, key="early_layers")
else:
    layers = (1, 1)
correct = f2.radio("answers", ["all", "correct", "incorrect"], horizontal=True, key="early_correct")
search = f3.text_input("text contains", key="early_search", placeholder="search the sentences…")
with st.container(horizontal=True):
    st.button(f"Sentences that needed all {n_layers} layers", on_click=_all_layers, key="early_all_btn")
    st.button("Reset filters", on_click=_reset, key="early_reset")

shown = filter_exits(df, tuple(layers), correct, search)
st.caption(f"{len(shown):,} of {len(df):,} sentences")
st.dataframe(shown.drop(columns=["row"]), hide_index=True, height=420,
             column_config={"text": st.column_config.TextColumn(width="large"),
                            "confidence": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                          format="%.3f"),
                            "exit_layer": st.column_config.NumberColumn("exit layer", format="%d")})
st.download_button("Download these rows (CSV)", lambda: shown.to_csv(index=False).encode("utf-8"),
                   file_name=f"exits_run{run_id}_{used}.csv", mime="text/csv", on_click="ignore", key="early_dl")
