"""Runs: live training curves, status, progress + ETA, events, cancel, comparison, downloads.

The live part is one ``st.fragment`` that reruns on the pages' status timer while a selected run is active (the rest
of the page is not rerun) and carries the page's status watch (``ui.state.live_part``: one timer, not the sidebar's
too); the run in detail below it (events, config, …) has its own, slower one. Only the selected runs' metrics are
read, incrementally (rows after the last step already held), and each plotted series is thinned to <= 2,000 points.
The curves are redrawn less often than the progress (``ui.state.held``): a chart redraw is most of a watching tab's
cost.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from dact_lib import plots
from dact_lib import progress
from dact_lib.halting import exit_advice
from dact_lib.jobs import ENGINE_KINDS  # (parent runs of the tuning engines: no training curves)
from dact_lib.models import zip_model
from dact_lib.resume import RESUME_KINDS, resume_check
from dact_lib.run_list import (EndedStore, default_selection, environment_rows, filter_runs, ids_from_query,
                               read_test_report, runs_table)
from dact_lib.tracker import ACTIVE_STATUSES, STATUSES
from dact_lib.tracker.store import SCORE_KEYS
from ui.forms import active_runs_caption
from ui.safe import plain
from ui import state
from ui.state import tracker

X_CHOICES = {"step": "step", "epoch": "epoch", "wall time": "time"}

MAX_EVENTS_SHOWN = 500
#: seconds between re-reads of the run in detail (event log, config, …) while it is active: its progress bar and
#: the curves move on the pages' status timer; each redraw of a part costs every watching tab's browser CPU, which
#: on a small machine is the training's (docs/benchmarks.md, "The dashboard never slows the work")
DETAILS_REFRESH_S = 30.0
MAX_DETAILS_REFRESH_S = 120.0
#: seconds a click's message (cancel, resume) stays on the page across its reruns
FLASH_S = 10.0


def _ts(t) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _label(r: dict, status: bool = True) -> str:
    name = f" {r['name']}" if r.get("name") else ""
    return f"#{r['id']} {r['kind']}{name}" + (f" · {r['status']}" if status else "")


# ---------------------------------------------------------------------------------------- metrics

EMPTY = pd.DataFrame({"run_id": pd.Series(dtype="int64"), "step": pd.Series(dtype="int64"),
                      "epoch": pd.Series(dtype="Int64"), "name": pd.Series(dtype="str"),
                      "value": pd.Series(dtype="float64"), "time": pd.Series(dtype="float64")})
ENDED_CACHE_RUNS = 500


@st.cache_resource(show_spinner=False)
def _ended_store() -> EndedStore:
    """Process-wide: (home, run id, ended) -> the curve metrics of a run that has ended (they no longer change)."""
    return EndedStore(ENDED_CACHE_RUNS)


def _split(df: pd.DataFrame, ids: list[int]) -> dict[int, pd.DataFrame]:
    groups = dict(tuple(df.groupby("run_id", sort=False))) if len(df) else {}
    return {i: groups.get(i, EMPTY) for i in ids}


def _evaluations(metrics: pd.DataFrame) -> tuple:
    """Per run on the chart: its last evaluation's step and how many validation values it logged (changes at each
    evaluation: the live chart is redrawn at once then)."""
    if not len(metrics):
        return ()
    val = metrics[metrics["name"].str.startswith("val_")]
    return tuple((int(i), int(g["step"].max()), len(g)) for i, g in val.groupby("run_id"))


def run_metrics(tr, runs: list[dict]) -> dict[int, pd.DataFrame]:
    """The curve metrics (losses, validation scores, exit layer) of ``runs``, one frame per run id.

    Ended runs: read once per server process (one query for all of them), then served from memory. Active runs:
    a per-session frame topped up with the rows after the last step held (``since_step``)."""
    home = str(tr.home)
    store = _ended_store()
    out: dict[int, pd.DataFrame] = {}
    ended = [r for r in runs if r["status"] not in ACTIVE_STATUSES]
    missing = []
    for r in ended:
        held = store.get((home, r["id"], r.get("ended")))
        if held is not None:
            out[r["id"]] = held
        else:
            missing.append(r["id"])
    if missing:
        names = [n for n in tr.metric_names(missing) if plots.curve_metric(n)]
        got = _split(tr.get_metrics(missing, names=names), missing) if names else {i: EMPTY for i in missing}
        for r in ended:
            if r["id"] in got:
                store.put((home, r["id"], r.get("ended")), got[r["id"]])
                out[r["id"]] = got[r["id"]]
    live: dict = st.session_state.setdefault("_runs_live_metrics", {})
    for r in runs:
        if r["status"] not in ACTIVE_STATUSES:
            continue
        key = (home, r["id"])
        held = live.get(key)
        if held is None:
            df = tr.get_metrics(r["id"])
        else:  # rows of the last held step may still be arriving: re-read from that step on
            last = int(held["step"].max()) if len(held) else -1
            new = tr.get_metrics(r["id"], since_step=last - 1) if last >= 0 else tr.get_metrics(r["id"])
            old = held[held["step"] < last]
            df = pd.concat([old, new], ignore_index=True) if len(old) else new
        df = df[df["name"].map(plots.curve_metric)] if len(df) else df
        live[key] = out[r["id"]] = df
    return out


# ---------------------------------------------------------------------------------------- downloads


def _cancelling(run_id: int) -> bool:
    """A cancel of the job that runs ``run_id`` is under way (its worker stops within a few seconds)."""
    try:
        from ui.state import jobs

        return jobs().cancelling(run_id)
    except Exception:  # noqa: BLE001 - never break the page
        return False


def _csv_bytes(tr, ids: list[int]) -> bytes:
    # the bytes themselves, not a deferred callable: a deferred download whose page rerun in between (the live
    # fragment) was answered "MediaFileStorageError: Deferred file not found"
    return tr.metrics_csv(ids)


@st.cache_resource(max_entries=2, show_spinner="Zipping the model…")  # one copy, not one per rerun
def _zip_bytes(run_dir: str, version: float) -> bytes:
    # bytes, kept for the next reruns: the button sits in the run-in-detail part, which reruns on its timer while
    # the run is active, and a deferred download (a callable) registered by an earlier rerun is gone when clicked
    return zip_model(Path(run_dir))


# ---------------------------------------------------------------------------------------- page

st.title("Runs")
tr = tracker()
# what the last click did (cancel, resume): shown by every page run of the next FLASH_S seconds, not only the first
# (the status watch may rerun the page at once, when the run it acts on changes status)
flash = st.session_state.get("runs_flash")
if flash and time.time() - flash[1] < FLASH_S:
    st.success(flash[0])
elif flash:
    del st.session_state["runs_flash"]
st.caption(f"home: `{tr.home}`")
all_runs = tr.list_runs()
if not all_runs:
    st.info("No runs yet. Train a model (Train page or `python -m dact_lib train`) and it shows up here, live.")
    state.stop()

with st.expander("Filter the run list", expanded=False):
    c1, c2, c3 = st.columns(3)
    kinds = sorted({r["kind"] for r in all_runs})
    statuses = list(STATUSES)  # all of them, fixed: a run that changes status (running -> finished) stays listed
    # empty = every kind, so a kind that appears later (a PBT started after this page was opened) is listed too
    sel_kinds = c1.multiselect("kind", kinds, default=[], key="runs_kinds", placeholder="all kinds")
    sel_status = c2.multiselect("status", statuses, default=statuses, key="runs_status")
    top_only = c3.checkbox("top-level runs only (hide trials / PBT members)", value=False, key="runs_top")
query = st.text_input("Search runs", key="runs_search", placeholder="id, name, kind, tag, status, dataset or "
                      "setting=value — every word must match, e.g. 'dact finished sst2 epochs=3'")
datasets = {d["id"]: d.get("name") or "" for d in tr.list_datasets()}


def filtered(all_runs: list[dict], words: list[str]) -> list[dict]:
    return filter_runs(all_runs, words, kinds=sel_kinds, statuses=sel_status, top_only=top_only, datasets=datasets)


words = query.lower().split()
runs = filtered(all_runs, words)
if words and not runs:
    st.info(f"No run matches {plain(query)!s}.")
    state.stop()
by_id = {r["id"]: r for r in all_runs}

# the run table is read with the page: the page's status watch reruns the whole page whenever a run starts, ends or
# changes status (ui.state.watch_status), so it never shows 'running' above a finished progress bar, and it costs no
# timer of its own (each timer's redraw costs every watching tab's browser CPU, the training's on a small machine)
table = runs_table(runs, datasets)
scores = [c for c in table.columns if c.split("/")[0].split(" (")[0] in SCORE_KEYS]
st.dataframe(table, hide_index=True, height=min(400, 38 + 35 * len(runs)),
             column_config={**{c: st.column_config.NumberColumn(format="%.4f") for c in scores},
                            **{c: st.column_config.NumberColumn(format="%.2f")
                               for c in ("val_avg_exit_layer", "test_avg_exit_layer")}})
active_runs_caption(runs)

options = [r["id"] for r in runs]
# a deep link (?run=3, ?runs=3,4) chooses what is shown, once per address (the pickers then follow the user)
link_shown, link_focus = ids_from_query(dict(st.query_params), set(options))
if link_shown and st.session_state.get("runs_link_applied") != (tuple(link_shown), link_focus):
    st.session_state["runs_link_applied"] = (tuple(link_shown), link_focus)
    st.session_state["runs_selected"] = link_shown
    st.session_state["runs_focus"] = link_focus
elif "runs_selected" in st.session_state:  # drop ids that are no longer listed (deleted / filtered out)
    st.session_state["runs_selected"] = [i for i in st.session_state["runs_selected"] if i in options]
else:
    # default: the active runs, else the newest finished run with curves (not a stub cancelled before its first
    # step; engine parents have no curves)
    candidates = [r["id"] for r in runs if r["kind"] not in ENGINE_KINDS][:50]
    st.session_state["runs_selected"] = default_selection(runs, tr.last_steps(candidates))
# the chips name the run without its status (a status here would go stale; the table and the live part show it)
selected = st.multiselect("Runs to show (several are compared on one chart)", options, key="runs_selected",
                          format_func=lambda i: _label(by_id[i], status=False))
if not selected:
    st.info("Choose one or more runs above.")
    state.stop()
# the address names what is shown: copy it to share or bookmark this view
st.query_params["runs"] = ",".join(str(i) for i in selected)
st.query_params.pop("run", None)
st.session_state["runs_link_applied"] = (tuple(selected), selected[0])  # what this address reads back as

# the run in detail (progress, cancel, events, config, model): any run of the list, the shown ones first. Picked here,
# with the page (not in the live part): both parts below follow the choice
focus_ids = list(selected) + [i for i in options if i not in selected]
if st.session_state.get("runs_focus") not in focus_ids:
    st.session_state["runs_focus"] = focus_ids[0]
focus = st.selectbox("Run details", focus_ids, key="runs_focus", help="Any run of the list (the runs on the chart "
                     "first): its progress, events, config and model, below the curves.",
                     format_func=lambda i: _label(by_id[i], status=False))
# the live part's timer: a shown run is active, or the run in detail is (it may be one not on the chart)
any_active = any(by_id[i]["status"] in ACTIVE_STATUSES for i in selected) or \
    by_id[focus]["status"] in ACTIVE_STATUSES


def live(ids: list[int], was_active: bool, focus: int) -> None:
    current = []
    for i in ids:
        try:
            current.append(tr.get_run(i))
        except Exception:  # noqa: BLE001 - deleted meanwhile
            continue
    if not current:
        st.warning("The selected runs no longer exist.")
        return
    per_run = run_metrics(tr, current)
    frames = [f for f in per_run.values() if len(f)]
    metrics = pd.concat(frames, ignore_index=True) if frames else EMPTY
    active_now = any(r["status"] in ACTIVE_STATUSES for r in current)
    steps_now = tr.last_steps([r["id"] for r in current if r["status"] in ACTIVE_STATUSES])

    # status of every selected run: one table with a progress column
    rows = []
    events_of: dict[int, list[dict]] = {}
    for r in current:
        ev = tr.get_events(r["id"])
        events_of[r["id"]] = ev
        pr = progress.run_progress(tr, r, per_run.get(r["id"]), ev, steps_done=steps_now.get(r["id"]))
        rows.append({"run": _label(r), "status": r["status"], "progress": pr["fraction"] or 0.0,
                     "steps": pr["text"], "ETA": progress.format_seconds(pr["eta_s"]) if r["status"] in
                     ACTIVE_STATUSES else "", "error": (r.get("error") or "")[:160], "_pr": pr})
    st.dataframe(pd.DataFrame(rows).drop(columns="_pr"), hide_index=True,
                 column_config={"progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0,
                                                                             format="percent")})

    labels = {r["id"]: f"#{r['id']} {r['kind']}" for r in current}
    settings = (float(st.session_state.get("runs_smoothing", 0.0)), bool(st.session_state.get("runs_log_y", False)),
                X_CHOICES[st.session_state.get("runs_x_axis", "step")],
                bool(st.session_state.get("runs_per_task", False)))

    def chart() -> tuple:
        smoothing, log_y, x_axis, per_task = settings
        title = "training curves" + (f" (live · drawn {datetime.now():%H:%M:%S})" if active_now else "")
        fig = plots.curves_figure(metrics, labels, title=title, smoothing=smoothing, log_y=log_y, x_axis=x_axis,
                                  per_task=per_task,
                                  steps_per_epoch={r["id"]: progress.steps_per_epoch(r, events_of[r["id"]])
                                                   for r in current})
        return fig, _csv_bytes(tr, [r["id"] for r in current])

    # redrawn every ui.state.CHARTS_REFRESH_S (per watching tab) and at once on a new evaluation, a run's new
    # status or a setting; in between the same figure is sent again, which the browser does not redraw
    fig, csv = state.held("runs_chart", (tuple((r["id"], r["status"]) for r in current), settings,
                                         _evaluations(metrics)), chart)
    st.plotly_chart(fig, key="runs_curves")

    st.download_button("Download metrics (CSV)", csv,
                       file_name=f"metrics_runs_{'_'.join(str(r['id']) for r in current[:10])}.csv",
                       mime="text/csv", on_click="ignore", key="runs_dl_csv",
                       help="Every metric the runs on the chart logged, as of the chart's last redraw.")

    # one run in detail: progress bar, cancel, events, model download — any run of the list (the shown ones first)
    shown_ids = [r["id"] for r in current]
    if focus in shown_ids:
        run = next(r for r in current if r["id"] == focus)
        pr = next(x["_pr"] for x, r in zip(rows, current) if r["id"] == focus)
    else:  # a run not on the chart: its record, events and progress read now
        try:
            run = tr.get_run(focus)
        except Exception:  # noqa: BLE001 - deleted meanwhile
            st.warning(f"Run {focus} no longer exists.")
            return
        events_of[focus] = tr.get_events(focus)
        pr = progress.run_progress(tr, run, run_metrics(tr, [run]).get(focus), events_of[focus])
    bar = st.empty()  # filled below: a cancel clicked in this rerun already shows as "cancelling"
    c1 = st.container()
    cancelling = run["status"] in ACTIVE_STATUSES and _cancelling(focus)
    if run["status"] in ACTIVE_STATUSES and not cancelling:
        label = "Cancel run" if run.get("parent_id") is None else "Cancel (the job that runs it)"
        if c1.button(label, key=f"runs_cancel_{focus}", type="primary"):
            try:
                from ui.state import jobs

                owner = jobs().cancel_owner(focus)
            except Exception as exc:  # noqa: BLE001 - show, never crash the page
                owner = None
                st.error(f"Could not cancel run {focus}: {plain(exc)}")
            if owner is not None:
                # the whole page reruns: its status timer turns fast while the cancel is under way
                # (ui.state.status_now), so 'cancelled' shows within seconds of the stop
                st.session_state["runs_flash"] = (
                    f"Cancellation of run {focus} requested: it stops within a few seconds." if owner == focus else
                    f"Run {focus} is part of job #{owner} ({by_id.get(owner, {}).get('kind', 'engine')}): "
                    f"cancellation of job #{owner} requested; it and its runs stop within a few seconds.",
                    time.time())
                st.rerun()
            else:
                st.warning(f"Run {focus} is not a job of this dashboard process (started elsewhere, e.g. the CLI, "
                           "or already ended): stop it where it runs.")
            cancelling = owner is not None
    shown_status = "cancelling" if cancelling else run["status"]
    bar.progress(min(1.0, max(0.0, pr["fraction"] or 0.0)), text=f"#{focus} {shown_status} · {pr['text']}")
    if run["status"] in ("interrupted", "cancelled", "failed") and run["kind"] in RESUME_KINDS:
        info = resume_check(tr, focus)  # the job manager and the CLI ask the same
        if info["ok"]:
            if c1.button("Resume run", key=f"runs_resume_{focus}", type="primary", icon=":material/replay:",
                         help="Continue this run from its last checkpoint (same run; metrics are appended)."):
                try:
                    from ui.state import jobs

                    jobs().resume(focus)
                except Exception as exc:  # noqa: BLE001 - show, never crash the page
                    st.error(f"Could not resume run {focus}: {plain(exc)}")
                else:
                    # the whole page reruns: the live part's timer, the run table and the pickers follow the run
                    st.session_state["runs_flash"] = (f"Run {focus} is queued to resume from its last checkpoint.",
                                                      time.time())
                    st.rerun()
        else:
            c1.caption(f"Not resumable: {plain(info['why'])}.")
    if was_active and not active_now:
        st.rerun()  # every selected run ended: one full rerun turns the timer off


def test_report(run_dir: Path) -> None:
    """The test split's confusion matrix and per-class report of every task (report.json of the run)."""
    tasks = read_test_report(run_dir)
    if not tasks:
        return
    with st.expander("Test split: confusion matrix and per-class report", icon=":material/grid_on:"):
        for task, r in tasks.items():
            st.markdown(f"**{plain(task)}** — accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")
            st.dataframe(r["confusion"], key=f"runs_cm_{run_dir.name}_{task}")
            if len(r["per_class"]):
                st.dataframe(r["per_class"], hide_index=True, key=f"runs_pc_{run_dir.name}_{task}")


def organise(run: dict) -> None:
    """Rename, tag, annotate or delete the run (what every tracker lets you do)."""
    rid = run["id"]
    with st.expander("Rename, tag, note or delete", icon=":material/edit:"):
        with st.form(f"runs_org_{rid}", enter_to_submit=False):  # Enter in the name field does not submit
            name = st.text_input("Name", value=run.get("name") or "", key=f"runs_org_name_{rid}")
            tag = st.text_input("Tag", value=run.get("tag") or "", key=f"runs_org_tag_{rid}")
            note = st.text_area("Note", value=(run.get("summary") or {}).get("note") or "",
                                key=f"runs_org_note_{rid}")
            if st.form_submit_button("Save", icon=":material/save:"):
                try:
                    tracker().organise(rid, name=name, tag=tag, note=note)
                except Exception as exc:  # noqa: BLE001 - show, never crash the page
                    st.error(plain(exc))
                else:
                    st.success(f"Saved run {rid}.")
        active = run["status"] in ACTIVE_STATUSES
        sure = st.checkbox(f"Delete run {rid}, its child runs, metrics and files", key=f"runs_del_sure_{rid}",
                           disabled=active, help="Cancel it first." if active else None)
        if st.button("Delete run", key=f"runs_del_{rid}", disabled=not sure or active, icon=":material/delete:"):
            try:
                tracker().delete_run(rid)
            except Exception as exc:  # noqa: BLE001
                st.error(plain(exc))
            else:
                st.session_state.pop("runs_selected", None)
                st.session_state.pop("runs_focus", None)
                st.rerun()


def details_every(focus: int | None) -> float | None:
    """The details part's timer while the run in detail is active (none once it ended): DETAILS_REFRESH_S per
    watching tab, like the status period (all the tabs together redraw it as often as one), at most
    MAX_DETAILS_REFRESH_S."""
    if (by_id.get(focus) or {}).get("status") not in ACTIVE_STATUSES:
        return None
    return state.per_tab(DETAILS_REFRESH_S, MAX_DETAILS_REFRESH_S)


def details(focus: int) -> None:
    """The run in detail below its progress bar: model download, deploy, error, event log, environment, config,
    test report, organise. Re-read on its own slow timer while the run is active (what moves every few seconds is
    in the live part); the status watch reruns the whole page when the run ends."""
    try:
        run = tr.get_run(focus)
    except Exception:  # noqa: BLE001 - deleted meanwhile
        return
    run_dir = Path(run.get("run_dir") or tr.run_dir(focus))
    c2 = st.container()
    prec = (run.get("summary") or {}).get("precision") or ((run.get("config") or {}).get("train") or {}).get(
        "precision")
    if prec:
        st.caption(f"precision: **{prec}**" + (" (train.precision = auto)" if
                                               ((run.get("config") or {}).get("train") or {}).get("precision")
                                               == "auto" else ""))
    if run["kind"] == "dact" and run["status"] == "finished":
        advice = exit_advice(run_dir)
        if advice:
            st.info(advice)
    if (run_dir / "model.safetensors").is_file():
        ready = f"runs_zip_ready_{focus}"
        if st.session_state.get(ready) or c2.button(
                "Prepare the run folder download (zip)", key=f"runs_zip_prep_{focus}",
                help="The run folder as DACT Lab keeps it (weights, config, tokenizer). To use the model elsewhere "
                     "(transformers, ONNX Runtime int8, a REST service): 'Take the model out' below."):
            st.session_state[ready] = True
            c2.download_button("Download model (zip)",
                               _zip_bytes(str(run_dir), (run_dir / "model.safetensors").stat().st_mtime),
                               file_name=f"dact_lab_run_{focus}.zip", mime="application/zip", on_click="ignore",
                               key=f"runs_dl_zip_{focus}", icon=":material/download:")
    else:
        c2.caption("No saved model yet (a checkpoint is written at the first evaluation).")
    if run["status"] in ("finished", "interrupted", "cancelled"):
        from ui.deploy import deploy_section

        deploy_section(run, run_dir)
    if run.get("error"):
        from ui.forms import form_words

        if run["status"] == "cancelled":  # the user's own action ("cancelled by user"), not a failure
            st.info(plain(form_words(run["error"])), icon=":material/cancel:")
        else:
            st.error(plain(form_words(run["error"])))  # the forms' words, not config keys
    ev = tr.get_events(focus)
    st.subheader("Event log")
    if ev:
        st.dataframe(pd.DataFrame([{"time": _ts(e["time"]), "kind": e["kind"],
                                    "payload": json.dumps(e["payload"], default=str, ensure_ascii=False)[:400]}
                                   for e in ev[-MAX_EVENTS_SHOWN:]]), hide_index=True)
    else:
        st.caption("No events yet.")
    env = environment_rows(run)
    if env:
        with st.expander("Environment (command, git commit, package versions)", icon=":material/terminal:"):
            st.dataframe(pd.DataFrame(env), hide_index=True, key=f"runs_env_{focus}")
    with st.expander("Config / summary"):
        st.json({"config": run.get("config"), "summary": run.get("summary")}, expanded=False)
    test_report(run_dir)
    organise(run)


c1, c2, c3 = st.columns([3, 2, 1])
c1.slider("Smoothing (exponential moving average)", 0.0, 0.99, 0.0, 0.01, key="runs_smoothing",
          help="0 = raw values; 0.9 averages over about the last 10 points (TensorBoard's slider).")
c2.radio("x axis", list(X_CHOICES), key="runs_x_axis", horizontal=True,
         help="Optimizer steps, epochs (fractional) or wall time since each run started.")
c3.checkbox("Loss on a log scale", key="runs_log_y")
if "runs_per_task" not in st.session_state:  # on at first when a multi-task run is shown: no 8-line score panel
    st.session_state["runs_per_task"] = any(by_id[i]["kind"] == "multitask" for i in selected)
c3.checkbox("A panel per task", key="runs_per_task", help="Multi-task runs: each task's accuracy and macro-F1 in "
            "its own panel.")
if len(selected) > 1:
    with st.expander(f"Config differences of the {len(selected)} runs", icon=":material/difference:"):
        diff = plots.config_diff({i: by_id[i].get("config") for i in selected})
        if len(diff):
            st.dataframe(diff, hide_index=True, key="runs_config_diff")
        else:
            st.caption("The runs have the same config.")
    with st.expander("Parallel coordinates and seeds", icon=":material/stacked_line_chart:"):
        chosen = [by_id[i] for i in selected]
        hp_names = [n for n in tr.metric_names(list(selected)) if n.startswith("hp/")]
        # PBT members: where exploit / explore left their hyperparameters (their config has the start values)
        latest = plots.latest_values(tr.get_metrics(list(selected), names=hp_names)) if hp_names else {}
        st.plotly_chart(plots.parallel_coordinates_figure(plots.compare_table(chosen, latest)), key="runs_parcoords")
        groups = plots.seed_groups(chosen)
        if any(len(ids) > 1 for ids in groups.values()):
            names = [n for n in ("val_accuracy", "val_loss") if n in set(tr.metric_names(list(selected)))]
            seed_metrics = tr.get_metrics(list(selected), names=names)
            st.plotly_chart(plots.grouped_curves_figure(seed_metrics, groups, names), key="runs_seed_groups")
        else:
            st.caption("No two selected runs differ only in their seeds (train.seed, data.split_seed): nothing to "
                       "group as mean ± spread.")
# the live part, on the status timer while a run is active (2 s until its first step, then 10 s per watching tab); it
# carries the page's status watch (ui.state.live_part)
state.live_part(live, any_active)(list(selected), any_active, focus)
st.fragment(details, run_every=details_every(focus))(focus)
