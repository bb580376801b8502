"""Data: upload a labelled data file (CSV, TSV, JSON Lines, JSON, Parquet), check it, look at it, try a split,
save it; manage the saved datasets."""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from dact_lib.data import (UPLOAD_TYPES, ColumnError, DataError, IncompleteRowsError, csv_header, csv_rows, format_of,
                           read_csv, split_dataset, spreadsheet_safe_csv)
from dact_lib.errors import DactLabError
from ui import state
from ui.safe import plain
from ui.forms import SPLIT_KEY

st.title("Data")
st.markdown("Upload a CSV with a text column and one label column (`text,label`) or two "
            "(`sentence,class_label,sentiment_label` for multi-task). Comma, semicolon and tab separated files "
            "work, and so do JSON Lines (`.jsonl`, one object per line), JSON (`.json`, a list of records) and "
            "Parquet with the same columns; columns with other names can be mapped below. Nothing is stored until "
            "you press **Save**.")

ONE_TASK = ("text", "label")
TWO_TASKS = ("sentence", "class_label", "sentiment_label")



def download_name(dataset_id: int, name: str) -> str:
    """``dataset-4-reviews.csv``: the id and the name, in characters every file system takes."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60]
    return f"dataset-{dataset_id}{'-' + safe if safe else ''}.csv"

def parse_upload(raw: bytes, columns: dict[str, str] | None, name: str, drop_incomplete: bool = False,
                 file_name: str = ""):
    """read_csv with a per-session cache: (TextDataset, None) or (None, the DataError). The bytes go in as a file
    named as the upload (``file_name``), so its name picks the format as a path's does."""
    key = (hashlib.sha256(raw).hexdigest(), json.dumps(columns, sort_keys=True), name, drop_incomplete, file_name)
    cached = st.session_state.get("data:parsed")
    if cached and cached[0] == key:
        return cached[1]
    upload = io.BytesIO(raw)
    upload.name = file_name
    try:
        result = (read_csv(upload, columns=columns, name=name, drop_incomplete=drop_incomplete), None)
    except DataError as exc:
        result = (None, exc)
    st.session_state["data:parsed"] = (key, result)
    return result


def column_mapping(header: list[str]) -> dict[str, str] | None:
    if not header or not st.checkbox("Map the columns myself", key="data:map",
                                     help="Needed when the file's columns have other names than text/label."):
        return None
    layout = st.radio("Tasks", ["One task (text, label)", "Two tasks (sentence, class_label, sentiment_label)"],
                      key="data:map-layout", horizontal=True)
    canon = ONE_TASK if layout.startswith("One") else TWO_TASKS
    cols = st.columns(len(canon))
    mapping = {}
    lower = [h.lower() for h in header]
    for i, (c, name) in enumerate(zip(cols, canon)):
        default = lower.index(name) if name in lower else min(i, len(header) - 1)
        mapping[name] = c.selectbox(f"{name} column", header, index=default, key=f"data:map-{name}")
    return mapping


#: more classes than this: horizontal bars, every label written in full, the chart as tall as its classes need
FEW_CLASSES = 12


def class_chart(counts: dict, task: str):
    """Rows per class: vertical bars for a few classes; for many (a 77-class intent set), horizontal bars sorted
    by count with every label in full and 18 px per class (labels were skipped and cut)."""
    if len(counts) <= FEW_CLASSES:
        fig = px.bar(x=[str(k) for k in counts], y=list(counts.values()), labels={"x": task, "y": "rows"},
                     title=f"Classes of {task}")
        fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10))
        return fig
    order = sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0])))  # the largest class on top
    fig = px.bar(x=[v for _, v in order], y=[str(k) for k, _ in order], orientation="h",
                 labels={"x": "rows", "y": task}, title=f"Classes of {task} ({len(counts)})")
    fig.update_yaxes(dtick=1, automargin=True, categoryorder="array", categoryarray=[str(k) for k, _ in order])
    fig.update_layout(height=18 * len(counts) + 90, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def show_dataset(ds) -> None:
    for w in ds.warnings:
        st.warning(plain(w))
    tasks = ", ".join(f"{plain(t)} ({ds.num_classes(t)} classes)" for t in ds.tasks)
    st.success(f"{len(ds)} rows, task(s) {tasks}.")
    st.dataframe(ds.to_frame().head(20), hide_index=True, width="stretch")
    cols = st.columns(len(ds.tasks) + 1)
    for c, task in zip(cols, ds.tasks):
        counts = ds.class_counts(task)
        fig = class_chart(counts, task)
        if len(counts) > FEW_CLASSES:  # a long chart of its own, at full width
            st.plotly_chart(fig, width="stretch", key=f"data:classes-{task}")
        else:
            c.plotly_chart(fig, width="stretch", key=f"data:classes-{task}")
    lengths = pd.Series([len(t.split()) for t in ds.texts], name="words per text")
    fig = px.histogram(lengths, x="words per text", nbins=40, title="Text length")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    cols[-1].plotly_chart(fig, width="stretch", key="data:lengths")


def split_preview(ds) -> None:
    st.markdown("**Split** — the settings below become the training forms' validation/test fraction and split seed")
    c1, c2, c3 = st.columns(3)
    val = c1.number_input("Validation fraction", value=0.1, step=0.05, format="%.2f", key="data:val")
    test = c2.number_input("Test fraction", value=0.1, step=0.05, format="%.2f", key="data:test")
    seed = c3.number_input("Split seed", value=0, step=1, key="data:seed")
    try:
        split = split_dataset(ds, val_frac=float(val), test_frac=float(test), seed=int(seed))
    except DataError as exc:
        st.error(plain(exc))
        return
    # a split that works here becomes the training forms' default (ui.forms.SPLIT_KEY; the forms apply a change once)
    st.session_state[SPLIT_KEY] = {"val_frac": float(val), "test_frac": float(test), "split_seed": int(seed)}
    sizes = {"train": len(split.train), "validation": len(split.val), "test": len(split.test) if split.test else 0}
    st.dataframe(pd.DataFrame([sizes]), hide_index=True)


tr = state.tracker()

up = st.file_uploader("Data file (CSV, TSV, JSON Lines, JSON or Parquet)", type=UPLOAD_TYPES, key="data:upload")
if up is not None:
    raw = up.getvalue()
    fmt = format_of(up.name)  # the name decides, as for a path (read_csv refuses content that contradicts it)
    mapping = column_mapping(csv_header(raw, format=fmt))
    default_name = Path(up.name).stem or "dataset"
    file_key = hashlib.sha256(raw).hexdigest()
    drop = st.session_state.get("data:drop-incomplete") == file_key
    ds, error = parse_upload(raw, mapping, default_name, drop_incomplete=drop, file_name=up.name)
    if error is not None:
        if isinstance(error, ColumnError):  # the page's own fix, not the library's columns={...} hint
            st.error(plain(f"{error.problem} Tick “Map the columns myself” above and choose which column is the "
                           "text and which the label."))
        else:
            st.error(plain(error))
        if isinstance(error, IncompleteRowsError):  # a way on: leave those rows out, keep the rest
            try:
                full = parse_upload(raw, mapping, default_name, drop_incomplete=True, file_name=up.name)[0]
            except Exception:  # noqa: BLE001 - no offer when the rest is not usable either
                full = None
            if full is not None:
                bad = [r for r in error.rows]
                st.dataframe(csv_rows(raw, bad, format=fmt), hide_index=True, width="stretch")
                dropped = next((w for w in full.warnings if w.startswith("left out")), "")
                if st.button(f"Leave out the rows with empty cells and use the other {len(full):,}",
                             key="data:drop", icon=":material/playlist_remove:", help=plain(dropped) or None):
                    st.session_state["data:drop-incomplete"] = file_key
                    st.rerun()
    else:
        show_dataset(ds)
        split_preview(ds)
        c1, c2 = st.columns([3, 1])
        # the name follows each new file (it kept the first file's name across uploads); an edit is kept for its file
        if st.session_state.get("data:name-for") != (up.file_id, file_key):
            st.session_state["data:name-for"] = (up.file_id, file_key)
            st.session_state["data:name"] = default_name
        name = c1.text_input("Dataset name", key="data:name")
        if c2.button("Save", type="primary", key="data:save", icon=":material/save:"):
            before = {d["id"] for d in tr.list_datasets()}
            dataset_id = tr.add_dataset(ds, name=name.strip() or default_name)
            if dataset_id in before:
                st.info(f"This data is already stored as dataset #{dataset_id}.")
            else:
                st.success(f"Saved as dataset #{dataset_id}. Pick it in the Dataset box of the Train pages.")



def delete_dataset(dataset_id: int) -> None:
    """Button callback (runs before the page is drawn again, so the table below is already up to date)."""
    try:
        state.tracker().delete_dataset(dataset_id)
    except DactLabError as exc:
        st.session_state["data:flash"] = ("error", str(exc))
    else:
        st.session_state["data:flash"] = ("success", f"Deleted dataset #{dataset_id}.")


st.divider()
st.subheader("Saved datasets")
flash = st.session_state.pop("data:flash", None)
if flash:
    (st.error if flash[0] == "error" else st.success)(flash[1])
datasets = tr.list_datasets()
if not datasets:
    st.info("No datasets saved yet. The bundled demo dataset is always available in the Train pages.")
else:
    st.dataframe(pd.DataFrame([{
        "id": d["id"], "name": d["name"], "rows": d["rows"], "tasks": ", ".join(d["tasks"] or []),
        "classes": "; ".join(f"{t}: {len(m)}" for t, m in (d["label_maps"] or {}).items()),
        "created": _dt.datetime.fromtimestamp(d["created"]).strftime("%Y-%m-%d %H:%M") if d["created"] else "",
    } for d in datasets]), hide_index=True, width="stretch")
    labels = {d["id"]: f"#{d['id']} {d['name']}" for d in datasets}
    by_id_name = {d["id"]: d["name"] or "" for d in datasets}
    c1, c2, c3 = st.columns([2, 1, 1])
    pick = c1.selectbox("Dataset", list(labels), format_func=labels.get, key="data:pick")
    c2.download_button("Download CSV", spreadsheet_safe_csv(tr.get_dataset_csv(pick)), file_name=download_name(pick, by_id_name.get(pick, "")),
                       mime="text/csv", key="data:download", on_click="ignore", icon=":material/download:")
    c3.button("Delete", key="data:delete", icon=":material/delete:", on_click=delete_dataset, args=(pick,))
