"""AppTest of the Watch & explore pages (Runs, PBT view, Pareto explorer, Early exit, Studies), opened through app.py,
on an empty home and on the records of real engine runs.

The populated home is ``records.engine_records``: two DACT ``train`` runs, a ``run_pbt`` population, a
``tune_backbone`` study and a ``run_pipeline`` DACT pipeline, made once per test session on the tiny encoder.
Every value a test expects on a page is read from that home's tracker or Optuna storage. Tests that change
records (a choice on the Pareto explorer) work on a private copy of the home; the cancel tests start real jobs
through the app's job manager (``ui.state.jobs()``) in a fresh home."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
import optuna  # noqa: E402
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dact_lib.config import RunConfig, default_config  # noqa: E402
from dact_lib.home import optuna_storage_url  # noqa: E402
from dact_lib.jobs import ENGINE_KINDS  # noqa: E402
from dact_lib.tracker import Tracker  # noqa: E402
from records import copy_home, engine_records  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["app_pages/runs.py", "app_pages/pbt_view.py", "app_pages/pareto.py", "app_pages/early_exit.py", "app_pages/studies.py"]
TIMEOUT = 60


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return engine_records(tmp_path_factory)


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def pop_home(records, monkeypatch):
    monkeypatch.setenv("DACT_LAB_HOME", str(records.home))
    return records


@pytest.fixture
def app_jobs(home):
    """The app's job manager of the test's home (ui.state.jobs()); its jobs are cancelled and joined afterwards."""
    from ui import state

    st.cache_resource.clear()
    jm = state.jobs()
    yield jm
    jm.shutdown(cancel=True, timeout=60)


def _open(page: str, **state) -> AppTest:
    """app.py, then ``page`` through its navigation (``state``: session state set before the page runs)."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page(page)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not _errors(at), _errors(at)
    return at


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


def _table(at: AppTest, *columns: str):
    """The page's dataframe that has ``columns``."""
    found = [d.value for d in at.dataframe if set(columns) <= set(d.value.columns)]
    assert len(found) == 1, [list(d.value.columns) for d in at.dataframe]
    return found[0]


def _chart(at: AppTest, title_part: str) -> dict:
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    found = [s for s in specs if title_part in ((s["layout"].get("title") or {}).get("text") or "")]
    assert len(found) == 1, [(s["layout"].get("title") or {}).get("text") for s in specs]
    return found[0]


def _values(v) -> list:
    """A figure spec's array (plotly writes numpy arrays as ``{"dtype", "bdata"}``) as a list."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def _same(a, b) -> bool:
    """Equal numbers, or both missing (None / NaN)."""
    missing = [x is None or (isinstance(x, float) and x != x) for x in (a, b)]
    return all(missing) if any(missing) else a == pytest.approx(b)


def _wait(cond, timeout: float = 60.0, what: str = "") -> None:
    """Poll ``cond`` until it holds (a job's progress is asynchronous); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ empty home

EMPTY_HINTS = {
    "app_pages/runs.py": "No runs yet. Train a model (Train page or `python -m dact_lib train`) and it shows up here, live.",
    "app_pages/pbt_view.py": "No PBT runs yet. Start Population Based Training on the PBT page (or `python -m dact_lib "
                         "pbt`); its members, their hyperparameters and who copied whom show up here.",
    "app_pages/pareto.py": "No DACT pipeline runs yet. Run the staged DACT tuning (DACT pipeline page or `python -m "
                       "dact_lib dact-pipeline --name NAME`); its λ trade-off and exit-policy comparison show up here.",
    "app_pages/early_exit.py": "No finished DACT run with a saved model yet. Train one (DACT pipeline, or kind 'dact' on "
                           "the Train pages); this page then shows how many layers each test sentence needed.",
    "app_pages/studies.py": "No Optuna studies in this home yet. Backbone tuning and the DACT pipeline create them (the "
                        "pipeline runs three: stage 1 architecture, stage 2 training parameters, stage 3 λ). "
                        "Storage: `{url}`",
}


@pytest.mark.parametrize("page", PAGES)
def test_page_on_an_empty_home_shows_only_its_hint(home, page):
    at = _open(page)
    assert [i.value for i in at.main.info] == [EMPTY_HINTS[page].format(url=optuna_storage_url(home))]
    assert not at.dataframe and not at.get("plotly_chart") and not at.selectbox


def test_studies_page_does_not_create_optuna_tables_on_empty_home(home):
    import sqlite3

    _open("app_pages/studies.py")
    con = sqlite3.connect(home / "experiments.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert "studies" not in tables


# ------------------------------------------------------------------------------------------------ Runs


def test_runs_page_lists_every_engine_run_with_its_recorded_scores(pop_home):
    rec = pop_home
    tr = Tracker(rec.home)
    runs = tr.list_runs()
    at = _open("app_pages/runs.py")
    assert at.main.caption[0].value == f"home: `{rec.home}`"
    table = _table(at, "id", "kind", "val_accuracy")
    assert list(table["id"]) == [r["id"] for r in runs]
    assert {rec.pbt, *rec.members, rec.tune, rec.pipeline, rec.pipeline_final, *rec.dact} <= set(table["id"])
    assert list(table["kind"]) == [r["kind"] for r in runs]
    assert list(table["status"]) == [r["status"] for r in runs]
    assert list(table["name"]) == [r["name"] or "" for r in runs]
    for row, r in zip(table.to_dict("records"), runs):
        best = (r.get("summary") or {}).get("best") or {}
        test = (r.get("summary") or {}).get("test") or {}
        assert _same(row["val_accuracy"], best.get("val_accuracy")), r["id"]
        assert _same(row["val_macro_f1"], best.get("val_macro_f1")), r["id"]
        assert _same(row["val_avg_exit_layer"], best.get("val_avg_exit_layer")), r["id"]
        assert _same(row["test_accuracy"], test.get("test_accuracy")), r["id"]
    assert {r["kind"] for r in runs} >= {"dact", "pbt", "pbt-member", "tune-backbone", "backbone", "dact-pipeline"}

    # nothing is active: the newest run that trains a model is shown (engine parents have no curves)
    newest = next(r for r in runs if r["kind"] not in ENGINE_KINDS)
    assert at.multiselect(key="runs_selected").value == [newest["id"]]
    events = _table(at, "time", "kind", "payload")
    assert list(events["kind"]) == [e["kind"] for e in tr.get_events(newest["id"])]
    assert at.get("progress")[0].proto.text.startswith(f"#{newest['id']} {newest['status']} · ")


def test_runs_page_compares_selected_runs_and_offers_downloads(pop_home):
    rec = pop_home
    a, b = rec.dact
    at = _open("app_pages/runs.py", runs_selected=[a, b])
    spec = _chart(at, "training curves")
    names = {t.get("name", "") for t in spec["data"] if t.get("meta") != "legend"}
    tr = Tracker(rec.home)
    for rid in (a, b):  # the run's logged losses, scores and exit layer, named after the run
        drawn = {n.split(" · ", 1)[1] for n in names if n.startswith(f"#{rid} ")}
        assert {"train_loss", "val_loss", "val_accuracy", "val_avg_exit_layer"} <= drawn <= set(tr.metric_names([rid]))
    buttons = {b.proto.label: b.proto for b in at.get("download_button")}
    # bytes, never a deferred callable: the live part reruns every 2 s while a run is active, and a deferred file
    # registered by an earlier rerun was "not found" when clicked (MediaFileStorageError)
    assert buttons["Download metrics (CSV)"].url and not buttons["Download metrics (CSV)"].deferred_file_id
    assert "Download model (zip)" not in buttons  # zipped on request: not on every rerun
    focus = at.selectbox(key="runs_focus").value
    at.button(key=f"runs_zip_prep_{focus}").click().run()
    buttons = {b.proto.label: b.proto for b in at.get("download_button")}
    zipped = buttons["Download model (zip)"]
    assert zipped.url and not zipped.deferred_file_id
    status = _table(at, "run", "status", "progress")
    assert list(status["status"]) == [tr.get_run(a)["status"], tr.get_run(b)["status"]] == ["finished"] * 2


def test_runs_page_kind_filter_empty_lists_every_kind_and_narrows_when_set(pop_home):
    tr = Tracker(pop_home.home)
    n_all = len(tr.list_runs())
    at = _open("app_pages/runs.py")
    kind = next(m for m in at.multiselect if m.label == "kind")
    assert kind.value == [] and len(at.dataframe[0].value) == n_all
    kind.set_value(["pbt"]).run()
    table = at.dataframe[0].value
    assert list(table["id"]) == [r["id"] for r in tr.list_runs(kind="pbt")] == [pop_home.pbt]


def _long_job_config(kind: str = "backbone"):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len = 400, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 300, 16, "cpu"
    cfg.train.early_stopping.enabled = False
    return cfg.validate()


def test_runs_page_cancels_a_running_job_of_this_process(home, app_jobs):
    tr = Tracker(home)
    rid = app_jobs.submit("backbone", _long_job_config())
    _wait(lambda: tr.last_steps([rid]).get(rid, -1) >= 1, what="the job's first logged step")
    assert app_jobs.status(rid) == "running" and tr.get_run(rid)["status"] == "running"

    at = _open("app_pages/runs.py")
    assert at.multiselect(key="runs_selected").value == [rid]  # active runs are selected by default
    button = at.button(key=f"runs_cancel_{rid}")
    assert button.label == "Cancel run"
    button.click().run()
    assert not _errors(at), _errors(at)
    assert [s.value for s in at.success] == [f"Cancellation of run {rid} requested: it stops within a few seconds."]
    assert not at.warning
    # shown at once: the progress of the page's rerun says so, not 'running' (the worker may still be stopping, or
    # have stopped already)
    assert re.match(rf"#{rid} cancell(ing|ed) ", at.get("progress")[0].proto.text), at.get("progress")[0].proto.text
    assert app_jobs.wait(rid, 60) == "cancelled"
    assert tr.get_run(rid)["status"] == "cancelled" and app_jobs.get(rid)["state"] == "cancelled"


def test_runs_page_cancels_the_engine_job_that_runs_a_member(home, app_jobs):
    tr = Tracker(home)
    cfg = _long_job_config()
    pbt = app_jobs.submit("pbt", cfg, options={"population": 2, "ready_every_epochs": None,
                                               "ready_every_steps": 2, "seed": 0})
    members = lambda: [r["id"] for r in tr.list_runs(parent_id=pbt)]  # noqa: E731
    _wait(lambda: len(members()) == 2 and all(tr.last_steps(members()).get(m, -1) >= 1 for m in members()),
          what="both PBT members training")
    member = min(members())

    at = _open("app_pages/runs.py", runs_selected=[member])
    button = at.button(key=f"runs_cancel_{member}")
    assert button.label == "Cancel (the job that runs it)"
    button.click().run()
    assert not _errors(at), _errors(at)
    assert [s.value for s in at.success] == [
        f"Run {member} is part of job #{pbt} (pbt): cancellation of job #{pbt} requested; it and its runs stop within "
        "a few seconds."]
    assert app_jobs.wait(pbt, 60) == "cancelled"
    assert tr.get_run(pbt)["status"] == "cancelled"
    assert {tr.get_run(m)["status"] for m in members()} == {"cancelled"}
    # a cancelled run's "error" is the user's own action: shown as information, not as a failure
    at.run()
    assert not _errors(at), _errors(at)
    assert any("cancelled by user" in i.value for i in at.info), [i.value for i in at.info]


def test_runs_page_cancel_of_another_process_run_says_where_to_stop_it(home):
    tr = Tracker(home)
    rid = tr.create_run("dact", {"train": {"epochs": 1}}, name="live", status="running")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # e.g. a CLI run
    try:
        tr.set_status(rid, "running", pid=other.pid, host=socket.gethostname())
        tr.log_event(rid, "start", {"steps": 100})
        now = time.time()
        tr.log_metrics_many([{"run_id": rid, "step": s, "epoch": 0, "name": "train_loss", "value": 1.0 / s,
                              "time": now - 40 + s} for s in range(1, 41)])
        at = _open("app_pages/runs.py")
        assert at.multiselect(key="runs_selected").value == [rid]  # active runs are selected by default
        text = at.get("progress")[0].proto.text
        assert "step 40 / 100" in text and "ETA" in text
        at.button(key=f"runs_cancel_{rid}").click().run()
        assert not _errors(at), _errors(at)
        assert [w.value for w in at.warning] == [
            f"Run {rid} is not a job of this dashboard process (started elsewhere, e.g. the CLI, or already ended): "
            "stop it where it runs."]
        assert not at.success
        assert tr.get_run(rid)["status"] == "running"  # left to the process that runs it
    finally:
        other.kill()
        other.wait()


def test_zip_model_holds_the_model_files_and_loads_back(pop_home, tmp_path):
    import io
    import zipfile

    from dact_lib.errors import DactLabError
    from dact_lib.models import load_model, zip_model

    rec = pop_home
    data = zip_model(Path(rec.home) / "runs" / str(rec.dact[0]))
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    assert {"model.safetensors", "config.json", "label_maps.json"} <= names
    assert any(n.startswith("encoder/") for n in names)
    zf.extractall(tmp_path / "unzipped")
    assert load_model(tmp_path / "unzipped").kind == load_model(rec.dact[0], home=rec.home).kind
    with pytest.raises(DactLabError, match="no model.safetensors"):
        zip_model(tmp_path)


def test_tracker_metric_names_and_last_steps(pop_home):
    tr = Tracker(pop_home.home)
    ids = list(pop_home.dact)
    df = tr.get_metrics(ids)
    assert tr.metric_names(ids) == sorted(set(df["name"]))
    assert tr.last_steps(ids) == {int(r): int(s) for r, s in df.groupby("run_id")["step"].max().items()}
    assert tr.metric_names([]) == [] and tr.last_steps([]) == {}


# ------------------------------------------------------------------------------------------------ PBT view


def test_pbt_view_shows_the_population_its_exploits_and_lineage(pop_home):
    rec = pop_home
    tr = Tracker(rec.home)
    parent = tr.get_run(rec.pbt)
    summary = parent["summary"]
    members = sorted(tr.list_runs(parent_id=rec.pbt), key=lambda m: m["id"])
    assert [m["id"] for m in members] == sorted(rec.members)
    label = {m["id"]: f"{m['name']} (#{m['id']})" for m in members}
    events = tr.get_events(rec.pbt)
    exploits = [e["payload"] for e in events if e["kind"] == "pbt_exploit"]
    explores = {(e["payload"]["recipient_run_id"], e["payload"]["step"]): e["payload"]["new"]
                for e in events if e["kind"] == "pbt_explore"}
    assert exploits, "the tiny population exploited at least once"

    at = _open("app_pages/pbt_view.py")
    assert at.main.caption[0].value == (f"status **{parent['status']}** · {len(members)} members · best member run "
                                   f"#{summary['best_run_id']}")
    assert [s.value for s in at.subheader][0] == f"Exploit / explore ({len(exploits)})"
    table = _table(at, "recipient", "donor", "copied")
    assert list(table["step"]) == [x["step"] for x in exploits]
    assert list(table["recipient"]) == [label[x["recipient_run_id"]] for x in exploits]
    assert list(table["donor"]) == [label[x["donor_run_id"]] for x in exploits]
    assert list(table["score"]) == pytest.approx([x["score"] for x in exploits])
    assert list(table["donor score"]) == pytest.approx([x["donor_score"] for x in exploits])
    assert [json.loads(c) for c in table["copied"]] == [x["new"] for x in exploits]
    assert [json.loads(c) for c in table["explored"]] == [explores[(x["recipient_run_id"], x["step"])]
                                                          for x in exploits]

    mtable = _table(at, "run", "best score", "exploits")
    by_run = {m["run_id"]: m for m in summary["members"]}
    assert list(mtable["run"]) == [m["id"] for m in members]
    assert list(mtable["best score"]) == pytest.approx([by_run[m["id"]]["best_score"] for m in members])
    assert list(mtable["exploits"]) == [by_run[m["id"]]["exploits"] for m in members]
    assert list(mtable["lr"]) == pytest.approx([by_run[m["id"]]["final"]["lr"] for m in members])
    assert list(mtable["last step"]) == [tr.last_steps([m["id"]])[m["id"]] for m in members]
    assert sum(mtable["exploits"]) == len(exploits)

    lineage = _chart(at, "lineage")
    row = {m["id"]: i for i, m in enumerate(members)}
    arrows = [(a["x"], a["y"], a["ay"]) for a in lineage["layout"].get("annotations", [])]
    assert arrows == [(x["step"], row[x["recipient_run_id"]], row[x["donor_run_id"]]) for x in exploits]
    assert lineage["layout"]["yaxis"]["ticktext"] == [label[m["id"]] for m in members]
    curves = _chart(at, "members · ")
    assert [t["name"] for t in curves["data"]] == [label[m["id"]] for m in members]
    assert at.selectbox(key="pbt_metric").value == parent["config"]["pbt"]["metric"]


# ------------------------------------------------------------------------------------------------ Pareto explorer


def _stage3_trials(home: Path) -> list:
    study = optuna.load_study(study_name="pipe/stage3", storage=optuna_storage_url(home))
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_pareto_explorer_shows_the_pipelines_front_choice_and_sweep(pop_home):
    rec = pop_home
    tr = Tracker(rec.home)
    run = tr.get_run(rec.pipeline)
    summary = run["summary"]
    rule, final = summary["chosen"], summary["final_run_id"]
    front = sorted(summary["front"], key=lambda p: p["val_avg_exit_layer"])
    assert final == rec.pipeline_final

    at = _open("app_pages/pareto.py")
    assert at.main.caption[0].value == (
        f"status **{run['status']}** · stages done: {', '.join(summary['stages_done'])} · pipeline's choice: trial "
        f"{rule['trial']} (λ = {rule['front_lambda']:.3g}) · final model: run #{final}")
    # which model the pipeline returned and why (issue 27's final_choice; this pipeline has no single-run candidate)
    assert summary["final_choice"]["winner"] == "pipeline"
    assert at.main.caption[1].value == f"Final model = stage 3's point: {summary['final_choice']['why']}."
    assert [i.value for i in at.main.info] == [
        "No model chosen for prediction yet: pick a front point below (or click one on the chart)."]

    table = _table(at, "trial", "val accuracy", "pipeline's choice")
    assert list(table["trial"]) == [p["trial"] for p in front]
    assert list(table["val accuracy"]) == pytest.approx([p["val_accuracy"] for p in front])
    assert list(table["val avg exit layer"]) == pytest.approx([p["val_avg_exit_layer"] for p in front])
    assert list(table["λ"]) == pytest.approx([p["front_lambda"] for p in front])
    assert list(table["pipeline's choice"]) == [p["trial"] == rule["trial"] for p in front]
    assert not any(table["for prediction"])

    sweep = _table(at, "policy", "avg_exit_layer", "accuracy")
    assert list(sweep["policy"]) == [r["policy"] for r in summary["exit_policy_sweep"]]
    assert list(sweep["avg_exit_layer"]) == pytest.approx([r["avg_exit_layer"] for r in summary["exit_policy_sweep"]])

    options = at.selectbox(key=f"pareto_pick_{rec.pipeline}").options
    assert options == [f"final model · run #{final} · the pipeline's choice (λ = {rule['front_lambda']:.3g})"] + [
        f"trial {p['trial']} · λ = {p['front_lambda']:.3g} · exit {p['val_avg_exit_layer']:.2f} · acc "
        f"{p['val_accuracy']:.3f}" for p in front]

    chart = _chart(at, "λ trade-off")
    traces = {t["name"]: t for t in chart["data"]}
    trials = _stage3_trials(rec.home)  # every complete stage-3 trial of the study is a point
    assert sorted(cd[0] for cd in traces["λ trials"]["customdata"]) == [t.number for t in trials]  # each once
    points = {cd[0]: (x, y) for cd, x, y in zip(traces["λ trials"]["customdata"], _values(traces["λ trials"]["x"]),
                                                _values(traces["λ trials"]["y"]))}
    for t in trials:
        assert points[t.number] == pytest.approx((t.user_attrs["val_avg_exit_layer"], t.user_attrs["val_accuracy"]))
    assert [cd[0] for cd in traces["Pareto front"]["customdata"]] == [p["trial"] for p in front]
    assert traces["pipeline's choice"]["customdata"][0][0] == rule["trial"]


def test_pareto_choice_swaps_in_the_points_halting_units_and_persists(pop_home, tmp_path, monkeypatch):
    from dact_lib.models import halting_choice

    rec = pop_home
    h = copy_home(rec, tmp_path / "home")  # the choice writes records: a private copy
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    tr = Tracker(h)
    summary = tr.get_run(rec.pipeline)["summary"]
    rule, final = summary["chosen"], summary["final_run_id"]
    others = [p for p in summary["front"] if p["trial"] != rule["trial"]]
    assert others, "the tiny pipeline's front holds a point besides the rule's choice"
    point = others[0]

    at = _open("app_pages/pareto.py")
    pick = at.selectbox(key=f"pareto_pick_{rec.pipeline}")
    pick.select(next(o for o in pick.options if o.startswith(f"trial {point['trial']} "))).run()
    assert not _errors(at), _errors(at)
    assert at.session_state["predict_run_id"] == final  # one model: its halting units are swapped
    assert [s.value for s in at.success] == [
        f"Trial {point['trial']} (λ = {point['front_lambda']:.3g}) is now used for prediction: run #{final} with that "
        "point's halting units (swapped in, nothing retrained). The pipeline's own choice stays recorded."]
    chosen = [e["payload"] for e in tr.get_events(rec.pipeline, kinds=["chosen"])]
    assert [(c["run_id"], c["trial"], c["source"], c["halting"]) for c in chosen] == [
        (final, point["trial"], "front", True)]
    hc = halting_choice(tr.run_dir(final))
    assert hc["trial"] == point["trial"] and (tr.run_dir(final) / hc["file"]).is_file()
    assert tr.get_run(rec.pipeline)["summary"]["chosen"] == rule  # the pipeline's record is unchanged
    shown = (f"Model used for prediction: **run #{final}** with the halting units of **trial {point['trial']}** "
             f"(your choice; the pipeline's choice is trial {rule['trial']})")
    assert [i.value for i in at.main.info] == [shown]
    # a reload (new session) restores the persisted choice
    st.cache_resource.clear()
    at2 = _open("app_pages/pareto.py")
    assert at2.session_state["predict_run_id"] == final
    assert [i.value for i in at2.main.info] == [shown]
    assert list(_table(at2, "trial", "for prediction")["for prediction"]) == [
        p["trial"] == point["trial"] for p in sorted(summary["front"], key=lambda p: p["val_avg_exit_layer"])]


# ------------------------------------------------------------------------------------------------ Early exit


def test_early_exit_shows_the_final_models_recorded_test_metrics_and_filters_by_layer(pop_home):
    from dact_lib.train import load_split

    rec = pop_home
    tr = Tracker(rec.home)
    final = tr.get_run(rec.pipeline_final)
    test = final["summary"]["test"]
    n = len(load_split(RunConfig.from_dict(final["config"]))[0].test)
    layers = tr.get_events(rec.pipeline, kinds=["exit_policy_sweep"])[-1]["payload"]["num_layers"]
    avg = test["test_avg_exit_layer"]
    assert layers == 2  # the tiny encoder: every row exits at layer 1 or 2, so the average gives the counts
    at_last = round((avg - 1) * n)
    assert 0 < at_last < n, "the pipeline's model exits early on some rows and late on others"

    at = _open("app_pages/early_exit.py", early_run=rec.pipeline_final)
    assert {m.label: m.value for m in at.metric} == {
        "sentences": f"{n:,}", "accuracy": f"{test['test_accuracy']:.1%}",
        "average exit layer": f"{avg:.2f} / {layers}", "layer speed-up": f"{layers / avg:.2f}×"}
    # bug (dashboard issue): the page evaluated another sample than the run's own split; it says which rows
    assert any(c.value.startswith(f"The run's own test split: {n:,} rows") for c in at.main.caption)
    hist = _chart(at, "exit layer per sample")
    assert _values(hist["data"][0]["x"]) == [1, 2] and _values(hist["data"][0]["y"]) == [n - at_last, at_last]
    assert at.main.caption[-1].value == f"{n:,} of {n:,} sentences"

    at.button(key="early_all_btn").click().run()
    assert not _errors(at), _errors(at)
    assert at.slider(key="early_layers").value == (layers, layers)
    assert at.main.caption[-1].value == f"{at_last:,} of {n:,} sentences"
    df = _table(at, "text", "exit_layer")
    assert len(df) == at_last and (df["exit_layer"] == layers).all()


# ------------------------------------------------------------------------------------------------ Studies


def test_studies_page_lists_the_engines_studies_with_trial_counts_and_best_values(pop_home):
    from optuna.trial import TrialState

    rec = pop_home
    url = optuna_storage_url(rec.home)
    at = _open("app_pages/studies.py")
    table = _table(at, "study", "trials", "best")
    assert sorted(table["study"]) == rec.studies == sorted([rec.tune_study, "pipe/stage1", "pipe/stage2",
                                                            "pipe/stage3"])
    for row in table.to_dict("records"):
        study = optuna.load_study(study_name=row["study"], storage=url)
        states = [t.state for t in study.trials]
        assert row["trials"] == len(study.trials) > 0
        assert (row["complete"], row["pruned"], row["failed"]) == (
            states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED), states.count(TrialState.FAIL))
        assert row["directions"] == " / ".join(d.name.lower() for d in study.directions)
        if len(study.directions) == 1:
            assert row["best"] == f"{study.best_value:.5g}"
        else:
            assert row["best"] == f"{len(study.best_trials)} Pareto-optimal"
        assert row["parent run"] == (rec.tune if row["study"] == rec.tune_study else rec.pipeline)

    at.selectbox(key="studies_pick").select(rec.tune_study).run()
    assert not _errors(at), _errors(at)
    study = optuna.load_study(study_name=rec.tune_study, storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    caption = next(c.value for c in at.main.caption if " trials (" in c.value)
    assert caption.startswith(f"{len(study.trials)} trials ({len(complete)} complete) · 1 objective(s): ")
    assert caption.endswith(" · minimize")
    history = _chart(at, "Optimization History")
    assert sorted(history["data"][0]["y"]) == pytest.approx(sorted(t.value for t in complete))
    trials = _table(at, "number", "state")
    assert list(trials["number"]) == [t.number for t in study.trials]
    assert list(trials["state"]) == [t.state.name for t in study.trials]


def test_studies_dashboard_button_starts_a_server(pop_home):
    import signal

    at = _open("app_pages/studies.py")
    at.button(key="studies_dashboard").click().run(timeout=TIMEOUT)
    pid = at.session_state["studies_dashboard_pid"] if "studies_dashboard_pid" in at.session_state else None
    try:
        port = at.session_state["studies_dashboard_port"]
        assert port, _errors(at)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert at.get("link_button")
    finally:
        if pid:  # the server this test started
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


def test_a_late_exiting_dact_run_gets_the_advice_with_its_measured_points_on_both_pages(pop_home, tmp_path,
                                                                                       monkeypatch):
    # issue "Early exit that pays": when a model exits late, the Runs and Early-exit pages say which setting would
    # trade accuracy for layers, with the sweep's measured numbers (a run of the records rewritten to exit late)
    import json

    rec = pop_home
    h = copy_home(rec, tmp_path / "home")
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    tr = Tracker(h)
    run = rec.dact[0]
    path = tr.run_dir(run) / "report.json"
    rep = json.loads(path.read_text())
    pts = [{"lambda": 0.0, "avg_exit_layer": 2.0, "accuracy": 0.9}, {"lambda": 2.0, "avg_exit_layer": 1.3,
                                                                    "accuracy": 0.87}]
    rep["halting"] = {"points": pts, "chosen": pts[0], "rows": 24, "tolerance_points": 0.5,
                      "layer_accuracy": [0.8, 0.9], "entropy_points": []}
    path.write_text(json.dumps(rep))
    expect = ("This run exits after 2.00 of 2 layers on average: within its tolerance of 0.5 points no fitted λ "
              "exits earlier. Measured on its validation split (24 rows): λ = 2: 1.30 layers at 87.0% (-3.0 points). "
              "Retrain with model.halting_tolerance ≥ 3.1 (CLI --halting-tolerance) to take λ = 2.")
    at = _open("app_pages/early_exit.py", early_run=run)
    assert [i.value for i in at.main.info] == [expect]
    at = _open("app_pages/runs.py", runs_focus=run)
    assert expect in [i.value for i in at.main.info]
    rep["halting"]["chosen"] = pts[1]  # an early point: no advice
    path.write_text(json.dumps(rep))
    at = _open("app_pages/early_exit.py", early_run=run)
    assert not [i.value for i in at.main.info if "exits after" in i.value]


# ------------------------------------------------------------------------------------------------ issue 28


def _resumed_pipeline(h: Path, name: str = "financial") -> tuple[int, int, dict]:
    """A pipeline run #a that a guard stopped, then resumed by a job's run #b under the same name (the records
    ``dact_pipeline.record.open_parent`` writes); its front does not hold its final choice (the single run)."""
    tr = Tracker(h)
    cfg = default_config("dact", encoder="tiny").to_dict()
    front = [{"trial": 3, "lambda": 0.01, "val_avg_exit_layer": 1.4, "val_accuracy": 0.70},
             {"trial": 5, "lambda": 0.001, "val_avg_exit_layer": 2.0, "val_accuracy": 0.80}]
    chosen = {"source": "single run", "trial": None, "lambda": 0.02, "val_avg_exit_layer": 1.9, "val_accuracy": 0.78}
    a = tr.create_run("dact-pipeline", {"run": cfg, "pipeline": {"name": name}}, name=name, status="finished")
    tr.update_run(a, summary={"stages_done": ["stage1", "stage2", "stage3", "single", "final"], "front": front,
                              "chosen": chosen, "final_run_id": None})
    tr.log_event(a, "guard_failed", {"stage": "stage2", "message": "Pipeline stopped after stage2: What to change: "
                                     "raise pipeline.min_steps (optimizer steps per trial)."})
    tr.log_event(a, "resumed", {"stages_done": ["stage1"], "previous_status": "failed"})
    b = tr.create_run("dact-pipeline", {"run": cfg, "pipeline": {"name": name}}, name=name, status="finished")
    tr.update_run(b, summary={"engine_run_id": a, "resumes": name})
    tr.log_event(b, "resumes", {"pipeline": name, "run_id": a})
    return a, b, chosen


def test_pareto_explorer_opens_the_run_a_resumed_pipeline_holds_and_lists_its_choice(home):
    """Defects (issue 28): started again under the same name, the pipeline's job run #10 resumed #7 — the explorer
    opened #10 ("stages done: none") while #7 still showed the earlier attempt's red guard error; the pipeline's
    choice was not in the front table; the guard message named config keys."""
    a, b, chosen = _resumed_pipeline(home)
    at = _open("app_pages/pareto.py")
    pick = at.selectbox(key="pareto_parent")
    assert pick.options == [f"#{a} financial · finished · resumed by job #{b}"] and pick.value == a
    assert "stages done: stage1, stage2, stage3, single, final" in at.main.caption[0].value
    assert not at.error  # the earlier attempt's guard is history
    (old,) = at.expander
    assert "An earlier attempt stopped" in old.label
    said = " ".join(c.value for c in old.caption)
    assert "“Minimum optimizer steps per trial”" in said and "pipeline.min_steps" not in said
    table = _table(at, "trial", "pipeline's choice")
    assert list(table["pipeline's choice"]) == [False, False, True]  # the choice: the single run, off the front
    assert table["val accuracy"].iloc[-1] == pytest.approx(chosen["val_accuracy"])
    # a session that still points at the job's run opens the run that holds the stages
    at2 = _open("app_pages/pareto.py", pareto_parent=b)
    assert at2.selectbox(key="pareto_parent").value == a


def test_the_pipeline_page_says_which_run_a_same_name_start_resumes(home, app_jobs):
    """Defect (issue 28): starting the pipeline again under the same name made a new run that silently resumed
    the earlier one. The page says so, with the run's number, and the Pareto explorer opens that run."""
    a, b, _ = _resumed_pipeline(home, name="again")
    at = _open("app_pages/dact_pipeline.py")
    at.radio(key="dact:mode").set_value("Full pipeline").run()
    at.text_input(key="dact/dact:name").set_value("again")
    at.button(key="FormSubmitter:dact:form-Check config").click().run()
    assert not _errors(at), _errors(at)
    assert any(f"Start resumes run #{a}" in i.value for i in at.info), [i.value for i in at.info]
    at.button(key="FormSubmitter:dact:form-Start").click().run()
    (job,) = app_jobs.jobs()
    assert any(i.value.startswith(f"Job #{job['run_id']} resumes pipeline “again”, run #{a} (") for i in at.info), \
        [i.value for i in at.info]
    app_jobs.cancel(job["run_id"])
    assert at.session_state["pareto_parent"] == a  # the Pareto explorer opens the run that holds the stages
    at.text_input(key="dact/dact:name").set_value("a new name")
    at.button(key="FormSubmitter:dact:form-Check config").click().run()
    assert not any("resumes" in i.value for i in at.info)


def test_pareto_explorer_shows_a_single_dact_runs_fitted_front(pop_home):
    """Issue 28 (item 4): the explorer was empty for single DACT runs, though each has a fitted front of λ and τ
    points (report.json "halting"). It shows them with the pipeline's chart and a front table."""
    from dact_lib.front import FrontPoint
    from dact_lib.plots import front_mask

    rec = pop_home
    tr = Tracker(rec.home)
    singles = [r for r in tr.list_runs(kind="dact") if r["parent_id"] is None and r["status"] == "finished"]
    assert singles
    run = singles[0]  # the newest: the page's default
    halting = json.loads((tr.run_dir(run["id"]) / "report.json").read_text())["halting"]
    raw = halting["points"] + halting["calibrated_front"] + halting["threshold_points"]
    pts = [FrontPoint(val_avg_exit_layer=p["val_avg_exit_layer"], val_accuracy=p["val_accuracy"]) for p in raw]
    front = sorted((p for p, on in zip(raw, front_mask(pts)) if on), key=lambda p: p["val_avg_exit_layer"])

    at = _open("app_pages/pareto.py")
    at.radio(key="pareto_source").set_value("Single DACT run").run()
    assert not _errors(at), _errors(at)
    assert at.selectbox(key="pareto_single").value == run["id"]
    table = _table(at, "point", "val accuracy", "run's choice")
    chosen = halting["chosen"]
    on_front = any(p["val_avg_exit_layer"] == chosen["val_avg_exit_layer"]
                   and p["val_accuracy"] == chosen["val_accuracy"] for p in front)
    assert len(table) == len(front) + (0 if on_front else 1)
    assert list(table["val avg exit layer"])[:len(front)] == pytest.approx([p["val_avg_exit_layer"] for p in front])
    assert list(table["val accuracy"])[:len(front)] == pytest.approx([p["val_accuracy"] for p in front])
    (kept,) = table[table["run's choice"]].to_dict("records")
    assert kept["val accuracy"] == pytest.approx(chosen["val_accuracy"])
    chart = _chart(at, "λ trade-off")
    names = [t["name"] for t in chart["data"]]
    assert "Pareto front" in names and "the run's choice" in names
    assert sum(len(t["customdata"]) for t in chart["data"] if t["name"] == "λ trials") == len(raw)


def _tiny_dact_on_a_stored_dataset(h: Path, *, rows: int = 240, max_rows: int = 80) -> tuple[int, RunConfig]:
    from dact_lib.data import read_csv
    from dact_lib.train import train

    tr = Tracker(h)
    lines = ["text,label"] + [f"{w} sentence number {i},{w}" for i in range(rows // 3) for w in ("red", "green",
                                                                                                 "blue")]
    ds = tr.add_dataset(read_csv(("\n".join(lines) + "\n").encode(), name="colours"), name="colours")
    cfg = default_config("dact", encoder="tiny")
    cfg.data.dataset_id, cfg.data.max_rows, cfg.data.max_seq_len = ds, max_rows, 16
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 1, 16, "cpu"
    cfg.model.exit_refit_epochs = 0
    return train(cfg.validate(), tracker=tr, home=h).run_id, cfg


def test_early_exit_counts_a_row_limited_runs_own_test_split(home):
    """Defect (issue 28): for a run limited to 800 rows of a saved 2,264-row dataset the page evaluated (and named)
    a test split of 227 rows — the whole dataset's — instead of the run's own 80."""
    from dact_lib.train import load_split

    run_id, cfg = _tiny_dact_on_a_stored_dataset(home)
    tr = Tracker(home)
    n = len(load_split(cfg, tr)[0].test)
    whole = len(load_split(RunConfig.from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"],
                                                                         "max_rows": None}}), tr)[0].test)
    assert n < whole  # what tells the two apart
    at = _open("app_pages/early_exit.py", early_run=run_id)
    assert any(c.value.startswith(f"The run's own test split: {n:,} rows") for c in at.main.caption), \
        [c.value for c in at.main.caption]
    assert {m.label: m.value for m in at.metric}["sentences"] == f"{n:,}"


def test_needed_all_layers_shows_every_such_sentence_whatever_the_answers_filter(pop_home):
    """Defect (issue 28): "Sentences that needed all 6 layers" kept the "incorrect" filter: 1 row shown while the
    histogram said 3."""
    rec = pop_home
    at = _open("app_pages/early_exit.py", early_run=rec.pipeline_final)
    hist = _chart(at, "exit layer per sample")
    layers, counts = _values(hist["data"][0]["x"]), _values(hist["data"][0]["y"])
    at.radio(key="early_correct").set_value("incorrect").run()
    at.text_input(key="early_search").set_value("no sentence holds this").run()
    at.button(key="early_all_btn").click().run()
    assert not _errors(at), _errors(at)
    assert at.radio(key="early_correct").value == "all" and at.text_input(key="early_search").value == ""
    n_last = counts[layers.index(max(layers))]
    assert len(_table(at, "text", "exit_layer")) == n_last  # as many as the histogram's last bar


def test_a_many_class_label_chart_stays_readable(home):
    """Defect (issue 28): a 77-class label chart skipped and cut its labels. Many classes: horizontal bars, every
    label in full, as tall as the classes need."""
    classes = [f"card_payment_not_recognised_{i:02d}" for i in range(77)]
    lines = ["text,label"] + [f"my card question number {j} about {c},{c}" for c in classes for j in range(12)]
    at = _open("app_pages/data.py")
    at.file_uploader(key="data:upload").upload("banking77.csv", ("\n".join(lines) + "\n").encode(), "text/csv")
    at.run()
    assert not _errors(at), _errors(at)
    chart = _chart(at, "Classes of label")
    (bars,) = chart["data"]
    assert bars["orientation"] == "h" and sorted(_values(bars["y"])) == sorted(classes)  # full labels, all of them
    assert chart["layout"]["yaxis"]["dtick"] == 1 and chart["layout"]["height"] >= 18 * 77
    # a few classes keep the small vertical chart
    at.file_uploader(key="data:upload").set_value(("two.csv", b"text,label\n" + b"".join(
        f"text {i},{'ab'[i % 2]}\n".encode() for i in range(20)), "text/csv"))
    at.run()
    assert _chart(at, "Classes of label")["data"][0].get("orientation") in (None, "v")


def test_learning_rate_axes_are_readable():
    """Defect (issue 28): the parallel-coordinates and PBT learning-rate axes were unreadable (every small value at
    the bottom of a linear axis, ticks 0.0001, 0.0002 …; SI-suffixed log ticks)."""
    import pandas as pd

    from dact_lib import plots

    table = pd.DataFrame({"run": [1, 2, 3], "encoder_lr": [1e-5, 3e-5, 2e-3], "epochs": [1, 2, 3],
                          "val_accuracy": [0.5, 0.6, 0.7]})
    (pc,) = plots.parallel_coordinates_figure(table).to_plotly_json()["data"]
    dims = {d["label"]: d for d in pc["dimensions"]}
    lr = dims["encoder_lr"]
    assert lr["ticktext"] == ["1e-5", "1e-4", "1e-3", "1e-2"] and lr["tickvals"] == [-5, -4, -3, -2]
    assert _values(lr["values"]) == pytest.approx([-5, -5 + 0.47712, -2.69897], abs=1e-4)  # log10 of the values
    assert dims["epochs"]["tickformat"] == ".3~g" and "ticktext" not in dims["epochs"]

    metrics = pd.DataFrame({"run_id": [7, 7, 8, 8], "name": ["hp/lr"] * 4, "step": [0, 10, 0, 10],
                            "value": [1e-5, 2e-5, 3e-5, 1.2e-5]})
    fig = plots.hp_trajectories(metrics, [{"id": 7, "name": "a"}, {"id": 8, "name": "b"}]).to_plotly_json()
    assert fig["layout"]["yaxis"]["type"] == "log" and fig["layout"]["yaxis"]["tickformat"] == ".1~e"


def test_a_single_runs_front_point_is_used_for_prediction_without_retraining(pop_home):
    """Issue 28 (item 4): "use this point" for a single DACT run — its halting weights, kept at training time, are
    swapped in (the loaded model's halting units are that point's), and the run's own point clears the choice."""
    from dact_lib.halting import front_state
    from dact_lib.models import halting_choice, load_model

    tr = Tracker(pop_home.home)
    run = [r for r in tr.list_runs(kind="dact") if r["parent_id"] is None and r["status"] == "finished"][0]
    run_dir = tr.run_dir(run["id"])
    at = _open("app_pages/pareto.py")
    at.radio(key="pareto_source").set_value("Single DACT run").run()
    pick = at.selectbox(key=f"pareto_single_pick_{run['id']}")
    other = [o for o in pick.options if not o.startswith("the run's own point")]
    assert other, pick.options
    try:
        pick.set_value(other[0]).run()
        assert not _errors(at), _errors(at)
        choice = halting_choice(run_dir)
        assert choice and choice["source"] == "run front" and at.session_state["predict_run_id"] == run["id"]
        want = front_state(run_dir, choice["trial"])
        got = load_model(run_dir).model.halters.state_dict()
        assert want and all(torch.equal(got[k], v) for k, v in want.items())
        table = _table(at, "point", "for prediction")
        assert table["for prediction"].sum() == 1
        assert any("your choice" in i.value for i in at.info)
    finally:
        at.selectbox(key=f"pareto_single_pick_{run['id']}").set_value(pick.options[0]).run()
    assert halting_choice(run_dir) is None
