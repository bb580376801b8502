"""The dashboard pages of app.py through streamlit's AppTest: render on an empty and a populated home, upload a CSV,
start / cancel jobs from the forms, load a config file, predict."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
import yaml
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dact_lib.config import DEFAULT_ENCODER, default_config  # noqa: E402
from dact_lib.data import load_demo_dataset, read_csv  # noqa: E402
from dact_lib.tracker import Tracker  # noqa: E402
from dact_lib.train import train  # noqa: E402

APP = ROOT / "app.py"
MY_PAGES = ["app_pages/home.py", "app_pages/data.py", "app_pages/backbone.py", "app_pages/dact_pipeline.py", "app_pages/pbt.py",
            "app_pages/multitask.py", "app_pages/predict.py"]
TIMEOUT = 60


def tiny_cfg(kind: str):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.epochs = 1
    cfg.train.batch_size = 16
    cfg.train.device = "cpu"
    return cfg.validate()


def csv_bytes(n_per_class: int = 15, header: str = "text,label", sep: str = ",") -> bytes:
    rows = [header.replace(",", sep)]
    for i in range(n_per_class):
        rows.append(f"the food was lovely number {i}{sep}pos")
        rows.append(f"the service was awful time {i}{sep}neg")
    return ("\n".join(rows) + "\n").encode()


# --------------------------------------------------------------------------------------------- fixtures


def _reset_app_state() -> None:
    from ui import state

    try:
        state.jobs().shutdown(cancel=True, timeout=60)
    except Exception:  # noqa: BLE001
        pass
    st.cache_resource.clear()


@pytest.fixture
def app_home(home):
    """An empty home for the app; the per-process singletons are dropped before and after."""
    st.cache_resource.clear()
    yield home
    _reset_app_state()


@pytest.fixture(scope="module")
def populated_dir(tmp_path_factory):
    """A home with a stored dataset and a tiny finished run of each kind (+ an engine parent with a child)."""
    h = tmp_path_factory.mktemp("populated")
    tr = Tracker(h)
    ds_id = tr.add_dataset(read_csv(csv_bytes(), name="reviews"), name="reviews")
    ids = {}
    for kind in ("backbone", "dact", "multitask"):
        ids[kind] = train(tiny_cfg(kind), tracker=tr, home=h).run_id
    cfg = tiny_cfg("backbone")
    cfg.data.dataset_id = ds_id
    cfg.data.max_rows = None
    ids["stored"] = train(cfg, tracker=tr, home=h).run_id
    parent = tr.create_run("pbt", tiny_cfg("backbone").to_dict(), status="finished")
    tr.create_run("pbt-member", tiny_cfg("backbone").to_dict(), parent_id=parent, status="failed")
    tr.update_run(parent + 1, error="RuntimeError: boom")
    tr.close()
    return h, ids, ds_id


@pytest.fixture
def populated(populated_dir, monkeypatch):
    h, ids, ds_id = populated_dir
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    st.cache_resource.clear()
    yield h, ids, ds_id
    _reset_app_state()


def open_app() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, (page, at.exception)
    return at


def shown(markdown: str) -> str:
    """The text a user reads: user text is backslash-escaped markdown (ui.safe.plain)."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)


def errors(at: AppTest) -> list[str]:
    return [shown(e.value) for e in at.error]


def successes(at: AppTest) -> list[str]:
    return [shown(s.value) for s in at.success]


def jobs():
    from ui import state

    return state.jobs()


# --------------------------------------------------------------------------------------------- rendering


def test_pages_render_on_an_empty_home(app_home):
    at = open_app()
    captions = " ".join(c.value for c in at.sidebar.caption)
    assert str(app_home) in captions and "0" in captions and "running" in captions
    for page in MY_PAGES:
        goto(at, page)
        assert not errors(at), (page, errors(at))
    goto(at, "app_pages/predict.py")
    assert any("No finished run" in i.value for i in at.info)


def test_pages_render_on_a_populated_home(populated):
    h, ids, ds_id = populated
    at = open_app()
    for page in MY_PAGES:
        goto(at, page)
        assert not errors(at), (page, errors(at))
    goto(at, "app_pages/home.py")
    table = at.dataframe[0].value
    assert set(ids.values()) <= set(table["id"]) and "reviews" in set(table["dataset"])
    assert table.loc[table["id"] == ids["dact"], "best val accuracy"].notna().all()
    # a multi-task run: each task's accuracy and macro-F1, its mean labelled (it was one unlabelled mean)
    best = Tracker(h).get_run(ids["multitask"])["summary"]["best"]
    row = table[table["id"] == ids["multitask"]].iloc[0]
    assert row["best val accuracy (mean of tasks)"] == pytest.approx(best["val_accuracy"])
    assert pd.isna(row["best val accuracy"])
    for task in ("class_label", "sentiment_label"):
        assert row[f"best val accuracy/{task}"] == pytest.approx(best[f"val_accuracy/{task}"])
        assert row[f"best val macro-F1/{task}"] == pytest.approx(best[f"val_macro_f1/{task}"])
    goto(at, "app_pages/data.py")
    assert "reviews" in set(at.dataframe[-1].value["name"])
    goto(at, "app_pages/predict.py")
    assert len(at.selectbox(key="predict:run").options) == 4  # the four runs with a model


# --------------------------------------------------------------------------------------------- data page


def test_uploaded_csv_is_stored_and_bad_one_is_not(app_home):
    tr = Tracker(app_home)
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("broken.csv", b"just one column\nand no labels\n", "text/csv")
    at.run()
    assert errors(at) and "delimiter" in errors(at)[0]
    assert not any(b.key == "data:save" for b in at.button)
    assert tr.list_datasets() == []

    at.file_uploader(key="data:upload").set_value(("reviews.csv", csv_bytes(), "text/csv"))
    at.run()
    assert not errors(at), errors(at)
    assert len(at.dataframe) >= 2  # preview + split sizes
    sizes = at.dataframe[1].value.iloc[0].to_dict()
    assert sum(sizes.values()) == 30 and sizes["test"] == 3
    at.text_input(key="data:name").set_value("my reviews")
    at.button(key="data:save").click().run()
    stored = tr.list_datasets()
    assert [d["name"] for d in stored] == ["my reviews"] and stored[0]["rows"] == 30
    assert any("Saved as dataset" in s for s in successes(at))

    # a split that cannot be made shows its DataError
    at.number_input(key="data:test").set_value(0.5)
    at.number_input(key="data:val").set_value(0.45)
    at.run()
    assert any("0.95" in e for e in errors(at))

    # deleting: refused while a queued run uses it, then allowed
    ds_id = stored[0]["id"]
    busy = tr.create_run("backbone", {}, status="queued", dataset_id=ds_id)
    at.selectbox(key="data:pick").set_value(ds_id)
    at.button(key="data:delete").click().run()
    assert any("active run" in e for e in errors(at)) and len(tr.list_datasets()) == 1
    tr.set_status(busy, "cancelled")
    at.button(key="data:delete").click().run()
    assert tr.list_datasets() == []


def test_a_downloaded_dataset_is_named_by_its_id_and_name(app_home, served):
    """Bug: the file was called "#4 name.csv" (the picker's label): a '#' and spaces in a file name."""
    tr = Tracker(app_home)
    ds_id = tr.add_dataset(read_csv(csv_bytes(), name="reviews"), name="my reviews (v2)")
    at = goto(open_app(), "app_pages/data.py")
    assert not errors(at), errors(at)
    [btn] = [b for b in at.get("download_button") if b.proto.label == "Download CSV"]
    assert btn.proto.url and not btn.proto.deferred_file_id  # the bytes are served, not a deferred callable
    name = f"dataset-{ds_id}-my-reviews-v2.csv"
    assert name in served and b"text,label" in served[name].replace(b"\r", b"")[:40]


def test_split_chosen_on_the_data_page_becomes_the_forms_default(app_home):
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("reviews.csv", csv_bytes(), "text/csv")
    at.run()
    at.number_input(key="data:val").set_value(0.2)
    at.number_input(key="data:seed").set_value(7)
    at.run()
    goto(at, "app_pages/backbone.py")
    assert at.number_input(key=f"{BB}:data.val_frac").value == pytest.approx(0.2)
    assert at.number_input(key=f"{BB}:data.split_seed").value == 7
    assert at.number_input(key=f"{BB}:data.test_frac").value == pytest.approx(0.1)
    # the split reaches every form and survives page switches
    goto(at, "app_pages/home.py")
    goto(at, "app_pages/dact_pipeline.py")
    assert at.number_input(key="dact/dact:data.split_seed").value == 7


def test_column_mapping(app_home):
    tr = Tracker(app_home)
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("odd.csv", csv_bytes(header="review;stars", sep=";"), "text/csv")
    at.run()
    assert errors(at) and "No text column" in errors(at)[0]
    at.checkbox(key="data:map").check().run()
    assert at.selectbox(key="data:map-text").value == "review" and at.selectbox(key="data:map-label").value == "stars"
    assert not errors(at), errors(at)
    at.button(key="data:save").click().run()
    assert tr.list_datasets()[0]["columns"] == {"text": "review", "label": "stars"}


# --------------------------------------------------------------------------------------------- launch forms

BB = "backbone/backbone"


def fill_tiny(at: AppTest, pre: str, *, epochs: int = 1, max_rows: int = 120) -> None:
    at.text_input(key=f"{pre}:encoder").set_value("tiny")
    at.number_input(key=f"{pre}:data.max_rows").set_value(max_rows)
    at.number_input(key=f"{pre}:data.max_seq_len").set_value(32)
    at.number_input(key=f"{pre}:train.epochs").set_value(epochs)
    at.selectbox(key=f"{pre}:train.device").set_value("cpu")


def start(at: AppTest, page: str) -> int:
    at.button(key=f"FormSubmitter:{page}:form-Start").click().run()
    assert not at.exception and not errors(at), (at.exception, errors(at))
    import re

    (msg,) = [s for s in successes(at) if re.match(r"(Started|Queued) job", s)]
    at.session_state["test:last-start-message"] = msg
    return int(re.search(r"#(\d+)", msg).group(1))


def test_form_job_runs_to_the_end(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    fill_tiny(at, BB)
    at.text_input(key=f"{BB}:name").set_value("from the form")
    run_id = start(at, "backbone")
    assert jobs().wait(run_id, timeout=120) == "finished"
    run = Tracker(app_home).get_run(run_id)
    assert run["status"] == "finished" and run["name"] == "from the form" and run["config"]["encoder"] == "tiny"
    assert (app_home / "runs" / str(run_id) / "model.safetensors").exists()
    goto(at, "app_pages/predict.py")  # the new model is offered at once
    assert at.selectbox(key="predict:run").value == run_id


def test_dataset_picker_shows_the_demo_by_name(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    pick = at.selectbox(key=f"{BB}:data.dataset_id")
    assert pick.value is None and pick.proto.placeholder.startswith("Demo dataset")


def test_multitask_form_job(app_home):
    at = goto(open_app(), "app_pages/multitask.py")
    pre = "multitask/multitask"
    fill_tiny(at, pre)
    at.text_input(key=f"{pre}:model.task_weights").set_value('{"class_label": 1.0, "sentiment_label": 0.5}')
    run_id = start(at, "multitask")
    assert jobs().wait(run_id, timeout=120) == "finished"
    run = Tracker(app_home).get_run(run_id)
    assert run["kind"] == "multitask" and run["config"]["model"]["task_weights"]["sentiment_label"] == 0.5


def test_invalid_form_values_show_an_error_and_submit_nothing(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    fill_tiny(at, BB, epochs=0)
    at.button(key="FormSubmitter:backbone:form-Start").click().run()
    # in the form's words (issue 28): its label, not the config key
    assert any("“Epochs”" in e for e in errors(at)) and not any("train.epochs" in e for e in errors(at))
    at.number_input(key=f"{BB}:train.epochs").set_value(1)
    at.text_input(key=f"{BB}:model.head.hidden_dims").set_value("256, lots")
    at.button(key="FormSubmitter:backbone:form-Check config").click().run()
    assert any("“Head hidden layers”" in e for e in errors(at)), errors(at)
    assert Tracker(app_home).list_runs() == [] and jobs().jobs() == []


def test_check_config_validates_the_engine_settings_too(app_home):
    at = goto(open_app(), "app_pages/pbt.py")
    pre = "pbt/backbone"
    fill_tiny(at, pre)
    at.number_input(key=f"{pre}:pbt.population").set_value(0)
    at.button(key="FormSubmitter:pbt:form-Check config").click().run()
    assert any("“Population size”" in e for e in errors(at)), errors(at)
    assert not any("valid" in s for s in successes(at))
    at.number_input(key=f"{pre}:pbt.population").set_value(2)
    at.button(key="FormSubmitter:pbt:form-Check config").click().run()
    assert not errors(at) and any("valid" in s for s in successes(at))
    assert Tracker(app_home).list_runs() == [] and jobs().jobs() == []


def test_cancel_queued_and_running_jobs_from_the_jobs_panel(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    fill_tiny(at, BB, epochs=300, max_rows=400)
    at.checkbox(key=f"{BB}:train.early_stopping.enabled").uncheck()
    first = start(at, "backbone")
    assert at.session_state["test:last-start-message"].startswith(f"Started job **#{first}** (backbone)")
    second = start(at, "backbone")
    # bug: a queued job was announced as "Started job #N"
    assert at.session_state["test:last-start-message"].startswith(f"Queued job **#{second}** (backbone, 1 ahead)")
    jm = jobs()
    assert jm.status(first) == "running" and jm.status(second) == "queued"  # one job at a time
    goto(at, "app_pages/home.py")
    at.selectbox(key="home:jobs:cancel-pick").set_value(second)
    at.button(key="home:jobs:cancel").click().run()
    assert not at.exception
    tr = Tracker(app_home)
    assert jm.status(second) == "cancelled" and tr.get_run(second)["status"] == "cancelled"
    at.selectbox(key="home:jobs:cancel-pick").set_value(first)
    at.button(key="home:jobs:cancel").click().run()
    assert jm.wait(first, 60) == "cancelled" and tr.get_run(first)["status"] == "cancelled"


def test_config_download_and_upload_fill_the_form(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    assert len(at.get("download_button")) == 2
    cfg = tiny_cfg("backbone")
    cfg.train.epochs = 7
    at.file_uploader(key="backbone:upload").upload("cfg.yaml", cfg.to_yaml().encode(), "application/x-yaml")
    at.run()
    assert not errors(at), errors(at)
    assert at.number_input(key=f"{BB}:train.epochs").value == 7
    assert at.text_input(key=f"{BB}:encoder").value == "tiny"
    # a later edit is not overwritten by the same upload
    at.number_input(key=f"{BB}:train.epochs").set_value(2)
    at.button(key="FormSubmitter:backbone:form-Check config").click().run()
    assert at.number_input(key=f"{BB}:train.epochs").value == 2 and any("valid" in s for s in successes(at))

    bad = cfg.to_dict()
    bad["train"]["epochs"] = 0
    at.file_uploader(key="backbone:upload").set_value(("bad.yaml", yaml.safe_dump(bad).encode(), "application/x-yaml"))
    at.run()
    assert any("train.epochs" in e for e in errors(at))
    at.file_uploader(key="backbone:upload").set_value(("dact.json", default_config("dact").to_json().encode(),
                                                       "application/json"))
    at.run()
    assert any("does not fit this page" in e for e in errors(at))


def test_engine_config_upload_switches_mode(app_home):
    at = goto(open_app(), "app_pages/pbt.py")
    doc = {"config": tiny_cfg("dact").to_dict(), "options": {"pbt": {"population": 3}}}
    at.file_uploader(key="pbt:upload").upload("pbt.json", yaml.safe_dump(doc).encode(), "application/json")
    at.run()
    assert not errors(at), errors(at)
    assert at.selectbox(key="pbt:kind").value == "dact"
    assert at.number_input(key="pbt/dact:pbt.population").value == 3


def test_pbt_job_from_the_form(app_home):
    at = goto(open_app(), "app_pages/pbt.py")
    pre = "pbt/backbone"
    fill_tiny(at, pre)
    at.number_input(key=f"{pre}:pbt.population").set_value(2)
    run_id = start(at, "pbt")
    assert jobs().wait(run_id, timeout=120) == "finished", jobs().jobs()
    run = Tracker(app_home).get_run(run_id)
    assert run["status"] == "finished" and run["kind"] == "pbt"
    # the engine's parent run (the job's own run when the engine takes run_id)
    linked = run["summary"].get("engine_run_id", run_id)
    assert Tracker(app_home).list_runs(parent_id=linked)


def test_tuning_and_pipeline_jobs_from_the_forms(app_home):
    at = goto(open_app(), "app_pages/backbone.py")
    at.radio(key="backbone:mode").set_value("Optuna tuning").run()
    fill_tiny(at, BB)
    at.number_input(key=f"{BB}:trials").set_value(1)
    at.checkbox(key=f"{BB}:final").uncheck()
    at.number_input(key=f"{BB}:space.epochs:low").set_value(1)
    at.number_input(key=f"{BB}:space.epochs:high").set_value(1)
    tune_id = start(at, "backbone")

    goto(at, "app_pages/dact_pipeline.py")
    at.radio(key="dact:mode").set_value("Full pipeline").run()
    pre = "dact/dact"
    fill_tiny(at, pre)
    for stage in ("trials_stage1", "trials_stage2", "trials_stage3", "stage1_epochs"):
        at.number_input(key=f"{pre}:pipeline.{stage}").set_value(1)
    at.number_input(key=f"{pre}:pipeline.epochs_range:low").set_value(1)
    at.number_input(key=f"{pre}:pipeline.epochs_range:high").set_value(1)
    at.checkbox(key=f"{pre}:pipeline.sweep_timed").uncheck()
    pipe_id = start(at, "dact")

    tr = Tracker(app_home)
    assert jobs().wait(tune_id, timeout=120) == "finished", jobs().jobs()
    assert tr.get_run(tune_id)["kind"] == "tune-backbone" and tr.get_run(tune_id)["summary"].get("study_name")
    # the random tiny encoder on 120 demo rows learns nothing: the guard stops the pipeline after stage 1 and
    # the job table says why and what to change
    assert jobs().wait(pipe_id, timeout=120) == "failed", jobs().jobs()
    run = tr.get_run(pipe_id)
    assert "not clearly better than always answering the largest class" in run["error"]
    assert "What to change" in run["error"] and not tr.list_runs(parent_id=pipe_id)
    at.run()
    assert any("What to change" in str(v) for df in at.dataframe for v in df.value.get("error", []))

    # with guards = warn it records the failed guard and goes on to the end
    at.selectbox(key=f"{pre}:pipeline.guards").set_value("warn")
    at.text_input(key=f"{pre}:name").set_value("warned-pipeline")  # the run name names the pipeline
    pipe_id = start(at, "dact")
    assert jobs().wait(pipe_id, timeout=120) == "finished", jobs().jobs()
    summary = tr.get_run(pipe_id)["summary"]
    assert summary["guard_warnings"] and tr.get_events(pipe_id, kinds=["guard_failed"])
    final = tr.get_run(summary["final_run_id"])
    assert final["kind"] == "dact" and final["status"] == "finished"
    # the engines adopt the job's pre-created run: one parent per job, trials and final run under it
    assert final["parent_id"] == pipe_id
    assert len(tr.list_runs(kind="dact-pipeline")) == 2 and len(tr.list_runs(kind="tune-backbone")) == 1


def test_home_demo_button_submits_a_dact_job(app_home, monkeypatch):
    seen = {}

    def fake_train(cfg, *, tracker, run_id, cancel, **kw):
        seen["cfg"] = cfg
        tracker.set_status(run_id, "finished")

    monkeypatch.setattr("dact_lib.train.train", fake_train)
    # the fake lives in this process: the app's job manager runs its jobs in threads here for this test
    import functools

    from dact_lib.jobs import JobManager

    monkeypatch.setattr("ui.state.JobManager", functools.partial(JobManager, processes=False))
    at = open_app()
    at.button(key="home:demo").click().run()
    assert not errors(at) and any("Started job" in s for s in successes(at))
    (job,) = jobs().jobs()
    assert jobs().wait(job["run_id"], 30) == "finished"
    cfg = seen["cfg"]
    assert cfg.kind == "dact" and cfg.encoder == DEFAULT_ENCODER and cfg.train.epochs == 2
    assert cfg.data.dataset_id is None and cfg.data.path is None  # the bundled demo dataset


# --------------------------------------------------------------------------------------------- predict


def test_predict_shows_a_prediction(populated):
    h, ids, _ = populated
    at = goto(open_app(), "app_pages/predict.py")
    labels = load_demo_dataset().label_maps
    at.selectbox(key="predict:run").set_value(ids["dact"])
    at.text_area(key="predict:text").set_value("The soup was cold.")
    at.button(key="predict:go").click().run()
    assert not at.exception and not errors(at), errors(at)
    (metric,) = at.metric
    assert shown(metric.value) in labels["class_label"]
    assert metric.delta.startswith("p = ")  # bug: a bare "26.5%" delta read like an increase
    assert len(at.get("plotly_chart")) == 2  # probabilities + the per-layer trace
    trace = at.dataframe[-1].value
    assert list(trace.columns[:2]) == ["layer", "label"] and 1 <= len(trace) <= 2

    at.selectbox(key="predict:run").set_value(ids["multitask"])
    at.button(key="predict:go").click().run()
    assert [shown(m.label) for m in at.metric] == ["class_label", "sentiment_label"]
    assert shown(at.metric[1].value) in labels["sentiment_label"]

    at.text_area(key="predict:text").set_value("first line\nsecond line")
    at.button(key="predict:go").click().run()
    table = at.dataframe[0].value  # bug: the several-sentences table showed only the first task
    assert list(table.columns) == ["text", "class_label", "class_label probability", "sentiment_label",
                                   "sentiment_label probability"]
    assert set(table["sentiment_label"]) <= set(labels["sentiment_label"])
    at.selectbox(key="predict:run").set_value(ids["backbone"])
    at.button(key="predict:go").click().run()
    assert len(at.dataframe[0].value) == 2 and len(at.metric) == 2
    assert list(at.dataframe[0].value.columns) == ["text", "label", "probability"]


def test_predict_defaults_to_the_chosen_run(populated):
    h, ids, _ = populated
    at = open_app()
    at.session_state["predict_run_id"] = ids["backbone"]
    goto(at, "app_pages/predict.py")
    assert at.selectbox(key="predict:run").value == ids["backbone"]
    at.text_area(key="predict:text").set_value("   ")
    at.button(key="predict:go").click().run()
    assert any("Nothing to predict" in e for e in errors(at))


def test_predict_restores_the_pareto_choice_after_a_reload(populated):
    h, ids, _ = populated
    tr = Tracker(h)
    parent = tr.create_run("dact-pipeline", {}, name="reload-check", status="finished")
    tr.log_event(parent, "chosen", {"run_id": ids["dact"]})
    try:
        at = open_app()  # a fresh session: nothing in session_state
        goto(at, "app_pages/predict.py")
        assert at.selectbox(key="predict:run").value == ids["dact"]
    finally:
        tr.delete_run(parent, force=True)


def test_predict_a_file_shows_rows_and_offers_the_csv(populated, served):
    """The Predict page's file upload (deploy.predict_files.predict_upload): the first rows and a CSV download; a bad
    file is an error naming its line and the fix, and no stale predictions stay on the page."""
    h, ids, _ = populated
    at = goto(open_app(), "app_pages/predict.py")
    at.selectbox(key="predict:run").set_value(ids["dact"]).run()
    at.file_uploader(key="predict:file").upload("mine.csv", b"id,text\n1,the soup was cold\n2,=1+1 great match\n",
                                                "text/csv")
    at.run()
    at.button(key="predict:file-go").click().run()
    assert not at.exception and not errors(at), errors(at)
    table = at.dataframe[-1].value
    assert list(table.columns) == ["text", "predicted_label", "probability", "exit_layer"]
    assert list(table["text"]) == ["the soup was cold", "=1+1 great match"] and table["exit_layer"].between(1, 2).all()
    download = "Download the predictions (CSV)"
    assert len([b for b in at.get("download_button") if b.proto.label == download]) == 1
    lines = served["mine-predictions.csv"].decode().splitlines()
    assert lines[0] == "text,predicted_label,probability,exit_layer" and len(lines) == 3
    assert lines[2].startswith("'=1+1 great match,")  # a formula cell is escaped in the download

    at.file_uploader(key="predict:file").upload("bad.jsonl", b'{"text": "ok"}\n{oops\n', "application/json")
    at.run()
    at.button(key="predict:file-go").click().run()
    assert any("bad.jsonl line 2 is not valid JSON" in e and "one JSON object per line" in e for e in errors(at))
    assert not [b for b in at.get("download_button") if b.proto.label == download]


def doc_epochs(doc: dict) -> int:
    return (doc.get("config") or doc)["train"]["epochs"]


@pytest.mark.parametrize("page, path, mode, kind", [
    ("backbone", "app_pages/backbone.py", "Single run", "backbone"),
    ("backbone", "app_pages/backbone.py", "Optuna tuning", "backbone"),
    ("dact", "app_pages/dact_pipeline.py", "Single DACT run", "dact"),
    ("dact", "app_pages/dact_pipeline.py", "Full pipeline", "dact"),
    ("pbt", "app_pages/pbt.py", None, "dact"),
    ("multitask", "app_pages/multitask.py", None, "multitask"),
])
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_every_page_download_uploads_back_unchanged(app_home, page, path, mode, kind, fmt):
    """Bug: a download from the Backbone-tuning, Pipeline or PBT page ({"config", "options"}) was refused when
    uploaded back. What the page offers is uploaded into a fresh session: same config, same options, same mode."""
    from ui.forms import config_download_texts

    at = goto(open_app(), path)
    if mode:
        at.radio(key=f"{page}:mode").set_value(mode).run()
    if page == "pbt":
        at.selectbox(key="pbt:kind").set_value(kind).run()
    pre = f"{page}/{kind}"
    at.number_input(key=f"{pre}:train.epochs").set_value(4)  # a change the file must carry
    at.button(key=f"FormSubmitter:{page}:form-Check config").click().run()
    assert doc_epochs(at.session_state[f"{page}:{kind}:download-doc"]) == 4
    doc = at.session_state[f"{page}:{kind}:download-doc"]
    engine = "options" in doc
    assert engine == (mode not in ("Single run", "Single DACT run") and page != "multitask")

    back = goto(open_app(), path)
    back.file_uploader(key=f"{page}:upload").upload(f"cfg.{fmt}", config_download_texts(doc)[fmt].encode(),
                                                    "application/octet-stream")
    back.run()
    assert not errors(back), errors(back)
    assert any("Loaded" in s for s in successes(back))
    assert back.number_input(key=f"{pre}:train.epochs").value == 4
    if mode:
        assert back.radio(key=f"{page}:mode").value == mode
    again = back.session_state[f"{page}:{kind}:download-doc"]
    assert again == doc  # the form offers the same document again: nothing lost on the way


def test_runs_table_shows_each_tasks_scores(populated):
    """Bug: multi-task runs showed one unlabeled val_accuracy (the mean of the two tasks)."""
    h, ids, _ = populated
    at = goto(open_app(), "app_pages/runs.py")
    table = at.dataframe[0].value
    for col in ("val_accuracy/class_label", "val_accuracy/sentiment_label", "val_macro_f1/class_label",
                "val_macro_f1/sentiment_label", "test_accuracy/class_label", "val_accuracy (mean of tasks)"):
        assert col in table.columns, list(table.columns)
    best = Tracker(h).get_run(ids["multitask"])["summary"]["best"]
    row = table[table["id"] == ids["multitask"]].iloc[0]
    assert row["val_accuracy/sentiment_label"] == pytest.approx(best["val_accuracy/sentiment_label"])
    assert row["val_accuracy (mean of tasks)"] == pytest.approx(best["val_accuracy"])
    single = table[table["id"] == ids["backbone"]].iloc[0]
    assert single["val_accuracy"] == pytest.approx(Tracker(h).get_run(ids["backbone"])["summary"]["best"]["val_accuracy"])
    # Run details for any run of the list, not only the ones on the chart
    at.multiselect(key="runs_selected").set_value([ids["backbone"]]).run()
    assert any(o.startswith(f"#{ids['stored']} ") for o in at.selectbox(key="runs_focus").options)
    at.selectbox(key="runs_focus").set_value(ids["stored"]).run()
    assert not at.exception
    assert at.get("progress")[0].proto.text.startswith(f"#{ids['stored']} finished")
    events = [d.value for d in at.dataframe if list(d.value.columns) == ["time", "kind", "payload"]]
    assert events and list(events[0]["kind"]) == [e["kind"] for e in Tracker(h).get_events(ids["stored"])]
    # a multi-task run's curves start as a panel per task (one score panel held 8 lines and a long legend)
    at = open_app()
    at.session_state["runs_selected"] = [ids["multitask"]]
    goto(at, "app_pages/runs.py")
    assert at.checkbox(key="runs_per_task").value is True
    spec = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                if "training curves" in json.dumps(json.loads(c.proto.spec)["layout"].get("title", {})))
    titles = [a["text"] for a in spec["layout"].get("annotations", [])]
    assert "class_label: accuracy · macro-F1" in titles and "sentiment_label: accuracy · macro-F1" in titles


def test_rows_with_empty_cells_can_be_left_out_in_the_browser(app_home):
    """Friction: a file with 2 empty cells was refused with no way on; now the page shows those rows and offers
    to leave them out, and the rest is saved."""
    rows = [f"sentence number {i} is here,{'abc'[i % 3]}" for i in range(30)]
    rows[4] = ",b"          # empty text
    rows[9] = "no label here,"  # empty label
    raw = ("text,label\n" + "\n".join(rows) + "\n").encode()
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("gaps.csv", raw, "text/csv")
    at.run()
    assert any("empty cells at row 6" in e for e in errors(at))
    shown_rows = at.dataframe[0].value
    assert list(shown_rows["row"]) == [6, 11] and list(shown_rows["text"]) == ["", "no label here"]
    assert Tracker(app_home).list_datasets() == []
    at.button(key="data:drop").click().run()
    assert not errors(at), errors(at)
    assert any("left out 2 row(s)" in shown(w.value) for w in at.warning)
    at.button(key="data:save").click().run()
    (d,) = Tracker(app_home).list_datasets()
    assert d["rows"] == 28


def test_wrong_columns_point_at_the_mapping_widgets(app_home):
    """Friction: the wrong-columns message showed a Python hint (columns={...}) on the Data page."""
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("odd.csv", csv_bytes(header="review,stars"), "text/csv")
    at.run()
    (err,) = errors(at)
    assert "No text column found" in err and "Map the columns myself" in err and "columns={" not in err
    at.checkbox(key="data:map").check().run()
    assert not errors(at)  # the mapping picks review -> text, stars -> label


def test_every_run_is_findable_by_search(populated):
    h, ids, ds_id = populated
    at = goto(open_app(), "app_pages/runs.py")
    at.text_input(key="runs_search").set_value("multitask").run()
    assert list(at.dataframe[0].value["id"]) == [ids["multitask"]]
    # the chips carry no status (it would go stale beside the live table)
    assert at.multiselect(key="runs_selected").options == [f"#{ids['multitask']} multitask"]
    at.text_input(key="runs_search").set_value(f"dataset:{ds_id} backbone").run()
    assert list(at.dataframe[0].value["id"]) == [ids["stored"]]
    at.text_input(key="runs_search").set_value("no-such-run").run()
    assert not at.exception and any("No run matches" in i.value for i in at.info)
    # settings are columns and searchable as key=value (a number matches as a number: 1.23e-03 == 0.00123)
    tr = Tracker(h)
    cfg = tiny_cfg("dact")
    cfg.train.head_lr, cfg.train.epochs = 0.00123, 12
    odd = tr.create_run("dact", cfg.to_dict(), name="odd lr", status="failed")
    try:
        at.text_input(key="runs_search").set_value("head_lr=1.23e-03").run()
        table = at.dataframe[0].value
        assert list(table["id"]) == [odd]
        assert {"encoder", "epochs", "batch_size", "encoder_lr", "head_lr", "seed", "ponder_lambda"} <= set(
            table.columns)
        assert list(table["head_lr"]) == [0.00123] and list(table["encoder"]) == [cfg.encoder]
        at.text_input(key="runs_search").set_value(f"epochs={cfg.train.epochs} odd").run()
        assert list(at.dataframe[0].value["id"]) == [odd]
        # a setting=value word matches the setting, not a prefix of it: epochs=1 does not find epochs=12
        at.text_input(key="runs_search").set_value("epochs=1 odd").run()
        assert any("No run matches" in i.value for i in at.info)
    finally:
        tr.delete_run(odd)


@pytest.mark.parametrize("path, page, mode, prefix", [("app_pages/dact_pipeline.py", "dact", "Full pipeline", "pipeline"),
                                                      ("app_pages/pbt.py", "pbt", None, "pbt"),
                                                      ("app_pages/backbone.py", "backbone", "Optuna tuning", "space")])
def test_engine_forms_have_human_labels_and_proper_widgets(app_home, path, page, mode, prefix):
    """Friction: the pipeline and PBT forms were raw JSON fields with code labels ("objective3", "ready every
    steps (JSON) = null"), PBT had "Epochs" and "epochs (JSON)", the pipeline two name fields."""
    at = goto(open_app(), path)
    if mode:
        at.radio(key=f"{page}:mode").set_value(mode).run()
    widgets = [w for kind in ("number_input", "text_input", "selectbox", "multiselect", "checkbox")
               for w in at.get(kind) if f":{prefix}." in str(getattr(w, "key", ""))]
    assert len(widgets) >= 5
    labels = [w.label for w in widgets]
    assert not [lab for lab in labels if "(JSON)" in lab or "_" in lab], labels
    assert not [w for w in at.get("text_input") if f":{prefix}." in str(w.key)
                and str(w.key).endswith(("_range", ".lr", ".dropout"))]  # ranges are two numbers
    if page == "dact":
        assert not any(str(w.key).endswith(":pipeline.name") for w in at.get("text_input"))  # one name
        assert at.number_input(key="dact/dact:pipeline.head_lr_range:low").value == pytest.approx(3e-4)
        assert at.selectbox(key="dact/dact:pipeline.stage2_pruner").label == "Stage 2 pruning"
    if page == "pbt":
        assert not any(str(w.key).endswith(":pbt.epochs") for w in widgets)  # one Epochs field
        assert at.multiselect(key="pbt/backbone:pbt.space.activations").value
        factors = at.text_input(key="pbt/backbone:pbt.perturb_factors")  # numbers, not JSON
        assert factors.value == "0.8, 1.2"
    # every field of the form says what it does (help text), the run's fields included
    every = [w for kind in ("number_input", "text_input", "selectbox", "multiselect", "checkbox", "text_area")
             for w in at.get(kind) if ":" in str(getattr(w, "key", "")) and "." in str(getattr(w, "key", ""))
             and not str(w.key).endswith((":low", ":high"))]
    assert len(every) > len(widgets)
    assert not [(w.key, w.label) for w in every if not (w.help or "").strip()]


def test_runs_page_organises_runs_and_shows_the_test_report(app_home):
    """Every tracker lets you rename, tag, note and delete runs, and shows the test confusion matrix."""
    tr = Tracker(app_home)
    keep = train(tiny_cfg("backbone"), tracker=tr, home=app_home).run_id
    gone = train(tiny_cfg("backbone"), tracker=tr, home=app_home).run_id
    at = goto(open_app(), "app_pages/runs.py")
    at.multiselect(key="runs_selected").set_value([keep, gone]).run()
    at.selectbox(key="runs_focus").set_value(keep).run()
    (rep,) = json.loads((app_home / "runs" / str(keep) / "report.json").read_text())["report"]["tasks"].values()
    (cm,) = [d.value for d in at.dataframe if list(d.value.columns) == [f"predicted {n}" for n in rep["labels"]]]
    assert cm.to_numpy().tolist() == rep["confusion_matrix"]
    (per,) = [d.value for d in at.dataframe if list(d.value.columns) == ["class", "precision", "recall", "f1", "rows"]]
    assert list(per["class"]) == [str(n) for n in rep["labels"]]
    assert list(per["rows"]) == [int(rep["per_class"][str(n)]["support"]) for n in rep["labels"]]
    assert list(per["f1"]) == pytest.approx([rep["per_class"][str(n)]["f1-score"] for n in rep["labels"]])
    at.text_input(key=f"runs_org_name_{keep}").set_value("my best")
    at.text_input(key=f"runs_org_tag_{keep}").set_value("keep")
    at.text_area(key=f"runs_org_note_{keep}").set_value("lr 1e-3 looked better")
    at.button(key=f"FormSubmitter:runs_org_{keep}-Save").click().run()
    assert not errors(at), errors(at)
    run = tr.get_run(keep)
    assert (run["name"], run["tag"], run["summary"]["note"]) == ("my best", "keep", "lr 1e-3 looked better")
    assert run["summary"]["best"]  # the rest of the summary is kept

    at.selectbox(key="runs_focus").set_value(gone).run()
    assert at.button(key=f"runs_del_{gone}").disabled  # not before the box is ticked
    at.checkbox(key=f"runs_del_sure_{gone}").check().run()
    at.button(key=f"runs_del_{gone}").click().run()
    assert not at.exception
    assert [r["id"] for r in tr.list_runs()] == [keep] and not (app_home / "runs" / str(gone)).exists()


def curves_spec(at) -> dict:
    """The Runs page's training-curves figure (the chart whose title says so)."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return next(sp for sp in specs if "training curves" in json.dumps(sp.get("layout", {}).get("title", "")))


def test_runs_page_deep_links_and_the_runs_environment(populated):
    """Issue 26 (item 5): ``?run=3`` / ``?runs=3,4`` open the Runs page on those runs, the address follows the
    choice, and a run shows the command, git commit and package versions it ran with."""
    h, ids, _ = populated
    a, b = ids["backbone"], ids["stored"]
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["runs"] = f"{b},{a}"
    at.run()
    at.switch_page("app_pages/runs.py").run()
    assert not errors(at), errors(at)
    assert at.multiselect(key="runs_selected").value == [b, a]
    at.multiselect(key="runs_selected").set_value([a]).run()
    assert at.query_params["runs"] in (str(a), [str(a)])  # shareable: the address says what is shown
    env = [d.value for d in at.dataframe if list(d.value.columns) == ["what", "value"]]
    assert env and "command line" in set(env[0]["what"]) and "torch" in set(env[0]["what"])
    _reset_app_state()


def test_runs_page_compares_configs_and_smooths_curves(populated):
    h, ids, _ = populated
    at = goto(open_app(), "app_pages/runs.py")
    at.multiselect(key="runs_selected").set_value([ids["backbone"], ids["stored"]]).run()
    (diff,) = [d.value for d in at.dataframe if list(d.value.columns)[:1] == ["setting"]]
    assert "data.dataset_id" in set(diff["setting"]) and "kind" not in set(diff["setting"])  # only what differs
    before = [t for t in at.get("plotly_chart")]
    at.slider(key="runs_smoothing").set_value(0.9).run()
    at.checkbox(key="runs_log_y").check().run()
    assert not at.exception and len(at.get("plotly_chart")) == len(before)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    (pc,) = [d for sp in specs for d in sp["data"] if d.get("type") == "parcoords"]
    assert any(d["label"] == "data.dataset_id" for d in pc["dimensions"])  # the setting the two runs differ in
    fig = curves_spec(at)
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert fig["layout"]["xaxis"]["title"]["text"] == "step"
    at.radio(key="runs_x_axis").set_value("epoch").run()
    fig = curves_spec(at)
    assert not at.exception and fig["layout"]["xaxis"]["title"]["text"] == "epoch"
    def values(x):  # plotly's JSON holds arrays as {"dtype", "bdata"} (base64)
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"]) if isinstance(x, dict) else x

    xs = [float(v) for t in fig["data"] if t.get("meta") != "legend" for v in values(t.get("x") or [])]
    assert xs and 0 < max(xs) <= 3.0 + 1e-9  # runs of at most 3 epochs, in epochs now (not hundreds of steps)
    at.radio(key="runs_x_axis").set_value("wall time").run()
    fig = curves_spec(at)
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("minutes")
    at.checkbox(key="runs_per_task").check().run()
    assert not at.exception and curves_spec(at)


def test_the_page_reruns_when_work_starts_or_ends_so_every_status_changes_together(app_home, monkeypatch):
    """Defect: parts of a page went stale while others updated (the sidebar drawn before a submit kept its idle
    timer; a page's pickers never re-read when the last job ended). The sidebar's status watch reruns the whole page
    when a run is queued, gets past its first step, ends or is deleted since the page was drawn — and only then —
    so the run tables and job panels need no timer of their own."""
    from ui import state

    at = open_app()
    assert at.session_state[state.TIMERS_ACTIVE] == "idle"  # nothing runs: the page set up idle timers
    reruns = []
    monkeypatch.setattr(state.st, "rerun", lambda *a, **k: reruns.append(1))
    monkeypatch.setattr(state, "_last_watch", {})  # this session alone watches
    monkeypatch.setattr(state.st, "session_state", {})
    assert state.refresh_every() == state.ACTIVE_REFRESH_S  # idle: nothing to slow down, a new run shows at once
    state.watch_status()
    assert reruns == []  # nothing changed
    tr = Tracker(app_home)
    rid = tr.create_run("backbone", {}, status="running")  # a run started elsewhere (CLI, another tab)
    state.watch_status()
    assert reruns == [1] and state.st.session_state[state.TIMERS_ACTIVE] == "starting"
    assert state.refresh_every() == state.ACTIVE_REFRESH_S  # until its first step shows: every 2 s
    state.watch_status()
    assert reruns == [1]  # once per change
    # its first step logged: the calmer timer (each redraw of every watching tab costs the training CPU)
    tr.log_metrics(rid, {"train_loss": 1.0}, step=1)
    state.watch_status()
    assert reruns == [1, 1] and state.refresh_every() == state.CALM_REFRESH_S
    tr.log_metrics(rid, {"train_loss": 0.9}, step=2)  # a step is not a status: no rerun
    state.watch_status()
    assert reruns == [1, 1]
    other = tr.create_run("backbone", {}, status="finished")  # a run listed that is not active: the tables change
    state.watch_status()
    assert reruns == [1, 1, 1]
    tr.delete_run(other)
    state.watch_status()
    assert reruns == [1, 1, 1, 1]
    tr.set_status(rid, "finished")  # the run ended
    state.watch_status()
    assert reruns == [1, 1, 1, 1, 1] and state.st.session_state[state.TIMERS_ACTIVE] == "idle"
    # a job submitted on this page: its timers and tables already show it (submit_job's refresh_every), no rerun
    state.st.session_state.clear()
    jid = tr.create_run("backbone", {}, status="queued")
    state.refresh_every()
    state.watch_status()
    assert reruns == [1, 1, 1, 1, 1] and state.st.session_state[state.TIMERS_ACTIVE] == "starting"
    tr.set_status(jid, "cancelled")


def test_the_live_refresh_slows_with_each_watching_tab_while_runs_train(app_home, monkeypatch):
    """Three tabs watching a training on 2 cores took 0.43 of its speed (docs/benchmarks.md, "The dashboard never
    slows the work"): while runs train, the status timers' period is CALM_REFRESH_S per watching tab (capped), so
    all the tabs together redraw as often as one; a closed tab stops counting; starting and idle stay fast."""
    from ui import state

    assert state.period_for("training", 1) == state.CALM_REFRESH_S
    assert state.period_for("training", 3) == 3 * state.CALM_REFRESH_S
    assert state.period_for("training", 100) == state.MAX_REFRESH_S
    assert state.period_for("training", 0) == state.CALM_REFRESH_S
    assert state.period_for("starting", 3) == state.period_for("idle", 3) == state.ACTIVE_REFRESH_S

    monkeypatch.setattr(state, "_last_watch", {})
    tabs = [{}, {}, {}]
    for i, tab in enumerate(tabs):
        monkeypatch.setattr(state.st, "session_state", tab)
        state.note_watch(now=100.0 + i)
    assert state.watching_tabs(now=103.0) == 3
    assert len({t[state.SESSION_ID] for t in tabs}) == 3  # one id per session, kept
    monkeypatch.setattr(state.st, "session_state", tabs[0])
    state.note_watch(now=100.0 + state.WATCH_GONE_S)  # the first tab watches on; the others closed
    assert state.watching_tabs(now=102.0 + state.WATCH_GONE_S + 0.5) == 1

    # a training run, and a second tab opening: the first tab's watch reruns its page onto the slower period
    open_app()
    tr = Tracker(app_home)
    rid = tr.create_run("backbone", {}, status="running")
    tr.log_metrics(rid, {"train_loss": 1.0}, step=1)
    reruns = []
    monkeypatch.setattr(state.st, "rerun", lambda *a, **k: reruns.append(1))
    monkeypatch.setattr(state, "_last_watch", {})
    monkeypatch.setattr(state.st, "session_state", tabs[0])
    assert state.refresh_every() == state.CALM_REFRESH_S
    state.watch_status()
    assert reruns == []
    monkeypatch.setattr(state.st, "session_state", tabs[1])
    tabs[1].clear()
    assert state.refresh_every() == 2 * state.CALM_REFRESH_S  # the second tab's page counts itself when drawn
    state.watch_status()
    assert reruns == []  # so its first watch does not rerun it
    monkeypatch.setattr(state.st, "session_state", tabs[0])
    state.watch_status()
    assert reruns and tabs[0][state.TIMERS_PERIOD] == 2 * state.CALM_REFRESH_S
    tr.set_status(rid, "finished")


def test_a_tab_closed_or_reloaded_stops_counting_among_the_watching_tabs_at_once(monkeypatch):
    """Driven in a browser: after Start on the DACT page and a reload onto Runs, the progress stayed on 'step 1' for
    28 s — the old page's session counted as a watching tab for WATCH_GONE_S (40 s), doubling the period. A session
    Streamlit no longer holds connected stops counting at once; one whose connection cannot be told still counts
    until WATCH_GONE_S. Old code: both counted."""
    from ui import state

    monkeypatch.setattr(state, "_last_watch", {})
    monkeypatch.setattr(state, "_runtime_ids", {})
    connected = {"rt-a", "rt-b"}
    monkeypatch.setattr(state, "_session_alive", lambda rid: rid in connected)
    for sid, rid in (("a", "rt-a"), ("b", "rt-b"), ("c", None)):
        state._last_watch[sid] = 100.0
        if rid:
            state._runtime_ids[sid] = rid
    assert state.watching_tabs(now=101.0) == 3
    connected.discard("rt-b")  # the tab of session b was reloaded or closed
    assert state.watching_tabs(now=101.0) == 2 and "b" not in state._runtime_ids
    assert state.watching_tabs(now=100.0 + state.WATCH_GONE_S + 1) == 0


def test_a_training_run_is_re_read_at_most_six_times_a_minute_per_tab_and_the_period_is_a_setting(monkeypatch):
    """Besides its redraws, each open tab pays a fixed cost in Chromium: the garbage collections of its ~30 MB JS
    heap after each burst of work (docs/benchmarks.md, "The dashboard never slows the work", runs 16-17). At the
    5-s status period three Runs tabs watching a synthetic DACT run took 2.96 browser CPU-s a minute, at 10 s 2.09
    (bench/ui_tab_cost.py). Old code: 12 re-reads a minute, no setting. $DACT_LAB_REFRESH_S sets the
    period, kept within ACTIVE_REFRESH_S..MAX_REFRESH_S (a slower tab would stop counting among the watching
    ones); starting and idle do not change with it."""
    from ui import state

    monkeypatch.delenv("DACT_LAB_REFRESH_S", raising=False)
    assert 60.0 / state.period_for("training", 1) <= 6
    assert state.period_for("training", 2) == 2 * state.period_for("training", 1) <= state.MAX_REFRESH_S
    assert state.MAX_REFRESH_S < state.WATCH_GONE_S
    monkeypatch.setenv("DACT_LAB_REFRESH_S", "4")
    assert (state.period_for("training", 1), state.period_for("training", 2)) == (4.0, 8.0)
    assert state.period_for("training", 20) == state.MAX_REFRESH_S
    assert state.period_for("starting", 1) == state.period_for("idle", 1) == state.ACTIVE_REFRESH_S
    monkeypatch.setenv("DACT_LAB_REFRESH_S", "0.1")
    assert state.period_for("training", 1) == state.ACTIVE_REFRESH_S
    monkeypatch.setenv("DACT_LAB_REFRESH_S", "600")
    assert state.period_for("training", 1) == state.MAX_REFRESH_S
    monkeypatch.setenv("DACT_LAB_REFRESH_S", "fast")  # not a number: the default, the page does not break
    assert state.period_for("training", 1) == state.CALM_REFRESH_S


def test_a_cancel_under_way_turns_the_status_timer_fast_until_the_run_has_stopped(app_home, monkeypatch):
    """Defect (bench/ui_overhead.py, run 11): after Cancel the run stopped in 0.7 s but the page said 'cancelled'
    17.5 s later — the next tick of a period slowed for the watching tabs. While a job of this server is being
    cancelled the status mode is 'starting' (2 s): the watch reruns the page onto it at once."""
    from ui import state

    open_app()
    tr = Tracker(app_home)
    rid = tr.create_run("backbone", {}, status="running")
    tr.log_metrics(rid, {"train_loss": 1.0}, step=1)

    class Jobs:
        cancelling = False

        def counts(self):
            return {"running": 1, "queued": 0}

        def jobs(self):
            return [{"run_id": rid, "state": "running", "cancelling": self.cancelling}]

    fake = Jobs()
    monkeypatch.setattr(state, "jobs", lambda: fake)
    assert state.status_now()[0] == "training"
    fake.cancelling = True
    assert state.status_now()[0] == "starting"
    assert state.period_for(state.status_now()[0], 3) == state.ACTIVE_REFRESH_S
    tr.set_status(rid, "cancelled")


def _spy_fragments(monkeypatch) -> list[tuple[str, float | None]]:
    """Every st.fragment the app creates from here on: (function name, run_every)."""
    made: list[tuple[str, float | None]] = []
    real = st.fragment

    def spy(func=None, *, run_every=None):
        if func is None:
            return lambda f: spy(f, run_every=run_every)
        made.append((getattr(func, "__name__", "?"), run_every))
        return real(func, run_every=run_every)

    monkeypatch.setattr(st, "fragment", spy)
    return made


def test_a_page_has_one_status_timer_while_a_run_trains(app_home, monkeypatch):
    """A watching tab's browser CPU grows with the number of fragment reruns, not with what they draw
    (docs/benchmarks.md, "The dashboard never slows the work", run 11): the Runs page had two timers on the same
    period (the sidebar's status watch and the live part), the PBT view a 2-s one beside the sidebar's, the Pareto
    explorer a 5-s one. Now a live page's live part carries the status watch: one timer at the status period on
    every page (the Runs page's run in detail keeps its slow one)."""
    from dact_lib.tuning.pipeline_runs import PIPELINE_KIND
    from ui import state

    monkeypatch.setattr(state, "_last_watch", {})  # this session alone watches
    at = open_app()  # (the job manager starts first: runs 'running' before it are swept as interrupted)
    tr = Tracker(app_home)
    rid = tr.create_run("backbone", {}, status="running")
    tr.log_metrics(rid, {"train_loss": 1.0}, step=1)  # it trains: the calm period
    pbt = tr.create_run("pbt", {}, status="running")
    member = tr.create_run("pbt-member", {}, parent_id=pbt, status="running")
    tr.log_metrics(member, {"train_loss": 1.0}, step=1)
    pipe = tr.create_run(PIPELINE_KIND, {}, status="running")
    made = _spy_fragments(monkeypatch)
    period = state.period_for("training", 1)
    for page, slow in (("app_pages/home.py", []), ("app_pages/runs.py", [30.0]), ("app_pages/pbt_view.py", []),
                       ("app_pages/pareto.py", []), ("app_pages/data.py", [])):
        made.clear()
        goto(at, page)
        timers = sorted(t for _, t in made if t is not None)
        assert timers == sorted([period] + slow), (page, made)
    # the live pages' one timer is their live part's, and it runs the watch; the sidebar's caption has no timer
    for page, part in (("app_pages/runs.py", "live"), ("app_pages/pbt_view.py", "population"),
                       ("app_pages/pareto.py", "explorer")):
        made.clear()
        goto(at, page)
        assert (part, period) in made and ("job_counts", period) not in made, (page, made)
    # three tabs watching: both of the Runs page's timers slow per tab (together they redraw as often as one)
    import time

    state._last_watch.update({"tab2": time.monotonic(), "tab3": time.monotonic()})
    made.clear()
    goto(at, "app_pages/runs.py")
    assert sorted(t for _, t in made if t is not None) == [3 * period, 90.0], made
    for r in (rid, member, pbt, pipe):
        tr.set_status(r, "finished")


def test_a_live_part_runs_the_status_watch_after_each_redraw_and_the_watch_alone_when_idle(monkeypatch):
    """ui.state.live_part: while active, one fragment on the status timer that draws the part and then runs the
    watch (also after an early return); otherwise the part has no timer and the watch gets its own in the sidebar.
    A live page that stops early (ui.state.stop) still draws the watch."""
    from ui import state

    calls: list = []
    made: list = []
    monkeypatch.setattr(st, "fragment", lambda func, run_every=None: (made.append((func.__name__, run_every)), func)[1])
    monkeypatch.setattr(state, "refresh_every", lambda: 7.0)
    monkeypatch.setattr(state, "watch_status", lambda: calls.append("watch"))
    monkeypatch.setattr(state, "watch_alone", lambda: calls.append("watch alone"))

    def body(x: int) -> None:
        calls.append(("body", x))
        if x < 0:
            return  # an early return

    state.live_part(body, True)(1)
    state.live_part(body, True)(-1)
    assert made == [("body", 7.0), ("body", 7.0)]
    assert calls == [("body", 1), "watch", ("body", -1), "watch"]
    calls.clear(), made.clear()
    state.live_part(body, False)(2)
    assert made == [("body", None)] and calls == ["watch alone", ("body", 2)]
    calls.clear()
    monkeypatch.setattr(state.st, "stop", lambda: calls.append("stop"))
    state.stop()
    assert calls == ["watch alone", "stop"]


def test_held_rebuilds_on_a_new_signature_or_after_its_period_per_watching_tab(monkeypatch):
    """ui.state.held: the object built last while the signature is the same and it is younger than the period
    (CHARTS_REFRESH_S per watching tab, at most MAX_CHARTS_REFRESH_S); a new signature or the period rebuilds."""
    from ui import state

    monkeypatch.setattr(state.st, "session_state", {})
    clock = [100.0]
    monkeypatch.setattr(state, "_clock", lambda: clock[0])
    monkeypatch.setattr(state, "watching_tabs", lambda now=None: 1)
    built: list[int] = []

    def build() -> dict:
        built.append(1)
        return {"n": len(built)}

    first = state.held("k", ("a",), build)
    clock[0] += state.CHARTS_REFRESH_S - 0.1
    assert state.held("k", ("a",), build) is first and len(built) == 1  # the very object: the same spec is sent
    assert state.held("k", ("b",), build) == {"n": 2}  # a new signature: at once
    clock[0] += state.CHARTS_REFRESH_S
    assert state.held("k", ("b",), build) == {"n": 3}  # its period passed
    assert state.held("other", ("b",), build) == {"n": 4}  # one value per key
    monkeypatch.setattr(state, "watching_tabs", lambda now=None: 3)  # three tabs: each redraws a third as often
    clock[0] += 2 * state.CHARTS_REFRESH_S
    assert state.held("k", ("b",), build) == {"n": 3}
    clock[0] += state.CHARTS_REFRESH_S
    assert state.held("k", ("b",), build) == {"n": 5}
    monkeypatch.setattr(state, "watching_tabs", lambda now=None: 100)
    clock[0] += state.MAX_CHARTS_REFRESH_S
    assert state.held("k", ("b",), build) == {"n": 6}  # capped
    assert state.held("k", ("b",), build, every=0.0) == {"n": 7}
    monkeypatch.setattr(state, "watching_tabs", lambda now=None: 1)
    monkeypatch.setenv("DACT_LAB_CHARTS_REFRESH_S", "0")  # the setting: 0 = a redraw on every rerun
    assert state.held("k", ("b",), build) == {"n": 8}
    monkeypatch.setenv("DACT_LAB_CHARTS_REFRESH_S", "120")  # above the cap: the setting itself
    assert state.charts_refresh_s() == 120.0
    clock[0] += state.MAX_CHARTS_REFRESH_S + 1  # past the usual cap, not past the setting
    assert state.held("k", ("b",), build) == {"n": 8}
    clock[0] += 120.0 - state.MAX_CHARTS_REFRESH_S
    assert state.held("k", ("b",), build) == {"n": 9}
    monkeypatch.setenv("DACT_LAB_CHARTS_REFRESH_S", "soon")  # not a number: the default
    assert state.charts_refresh_s() == state.CHARTS_REFRESH_S


def _spec(at: AppTest, title_part: str) -> str:
    found = [c.proto.spec for c in at.get("plotly_chart") if title_part in c.proto.spec]
    assert len(found) == 1, [c.proto.spec[:200] for c in at.get("plotly_chart")]
    return found[0]


def test_the_runs_live_chart_redraws_on_its_period_and_at_once_on_an_evaluation(app_home, monkeypatch):
    """A chart redraw was most of a watching tab's cost (bench/ui_tab_cost.py: ~0.17 browser CPU-s each, 2.0 of
    3.4 CPU-s a minute at the 5-s status period of then). While a run trains the
    Runs page's progress moves on every rerun, but its curves are the same figure (the same spec: the browser does
    not redraw it) until CHARTS_REFRESH_S passed — or at once when an evaluation arrives or the run ends. Old code:
    a new figure on every rerun."""
    from ui import state

    monkeypatch.setattr(state, "_last_watch", {})  # this session alone watches
    clock = [1000.0]
    monkeypatch.setattr(state, "_clock", lambda: clock[0])
    at = open_app()
    tr = Tracker(app_home)
    rid = tr.create_run("dact", {}, status="running")
    for step in range(1, 6):
        tr.log_metrics(rid, {"train_loss": 1.0 / step}, step=step)
    goto(at, "app_pages/runs.py")
    first = _spec(at, "training curves")
    assert "live" in first and "val_accuracy" not in first

    tr.log_metrics(rid, {"train_loss": 0.1}, step=6)  # a new step, within the chart's period
    clock[0] += state.CHARTS_REFRESH_S - 1
    at.run()
    assert not at.exception, at.exception
    assert _spec(at, "training curves") == first  # the same figure, sent again
    status = next(d.value for d in at.dataframe if "steps" in d.value.columns)
    assert status["steps"].iloc[0].startswith("step 6"), status  # while the progress moved
    csv = next(b.proto.url for b in at.get("download_button") if b.proto.label == "Download metrics (CSV)")

    tr.log_metrics(rid, {"val_loss": 0.5, "val_accuracy": 0.8}, step=6)  # an evaluation: at once
    at.run()
    second = _spec(at, "training curves")
    assert second != first and "val_accuracy" in second
    assert csv != next(b.proto.url for b in at.get("download_button") if b.proto.label == "Download metrics (CSV)")

    tr.log_metrics(rid, {"train_loss": 0.05}, step=7)
    clock[0] += state.CHARTS_REFRESH_S  # its period passed: the new step is drawn
    at.run()
    third = _spec(at, "training curves")
    assert third != second
    tr.set_status(rid, "finished")  # the run ended: drawn at once, no longer live
    at.run()
    assert "live" not in _spec(at, "training curves")


def test_the_pbt_view_charts_redraw_on_their_period_and_at_once_on_an_exploit(app_home, monkeypatch):
    """The PBT view's live part draws three charts (member curves, hyperparameters, lineage): the same figures
    until CHARTS_REFRESH_S passed, or at once on an evaluation or an exploit / explore."""
    from ui import state

    monkeypatch.setattr(state, "_last_watch", {})
    clock = [1000.0]
    monkeypatch.setattr(state, "_clock", lambda: clock[0])
    at = open_app()
    tr = Tracker(app_home)
    pbt = tr.create_run("pbt", {}, status="running")
    members = [tr.create_run("pbt-member", {}, parent_id=pbt, status="running") for _ in range(2)]
    for m in members:
        tr.log_metrics(m, {"train_loss": 1.0, "val_accuracy": 0.5, "lr": 1e-4}, step=1)
    goto(at, "app_pages/pbt_view.py")
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert len(charts) == 3
    tr.log_metrics(members[0], {"train_loss": 0.5, "lr": 1e-4}, step=2)
    clock[0] += state.CHARTS_REFRESH_S - 1
    at.run()
    assert [c.proto.spec for c in at.get("plotly_chart")] == charts
    tr.log_event(pbt, "exploit", {"recipient": members[1], "donor": members[0], "step": 2, "old": {}, "new": {}})
    at.run()
    assert [c.proto.spec for c in at.get("plotly_chart")] != charts
    for r in (*members, pbt):
        tr.set_status(r, "finished")


def test_live_pages_stop_through_the_status_watch():
    """A live page (ui.state.LIVE_PAGES) has no status watch in the sidebar: a bare st.stop() on it would leave the
    page without one (it would no longer rerun when a run starts or ends)."""
    from ui import state

    for path in state.LIVE_PAGES:
        src = (ROOT / "app_pages" / f"{path}.py").read_text()
        assert "st.stop()" not in src.replace("state.stop()", ""), path
        assert "state.live_part(" in src, path


def test_the_app_resolves_transformers_names_before_any_page_or_job_thread():
    """Bug (seen on Early exit in a fresh server): "cannot import name 'AutoTokenizer' from 'transformers'" — its
    lazy module raced between the page's thread and another first use. The app resolves the names at start."""
    import subprocess

    code = ("import sys\nsys.path.insert(0, '.')\nimport ui.state\n"
            "print(all(m in sys.modules for m in ('transformers.models.auto.tokenization_auto',"
            " 'transformers.models.auto.modeling_auto', 'transformers.models.bert.modeling_bert')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


# --------------------------------------------------------------------------------------------- issue 28: forms


def _forms(node) -> list:
    """Every st.form block under ``node`` (the AppTest tree)."""
    found = []
    for child in getattr(node, "children", {}).values():
        if getattr(child, "type", None) == "form":
            found.append(child)
        found += _forms(child)
    return found


@pytest.mark.parametrize("path", ["app_pages/backbone.py", "app_pages/dact_pipeline.py", "app_pages/pbt.py",
                                  "app_pages/multitask.py"])
def test_enter_in_a_field_does_not_submit_the_launch_form(app_home, path):
    """Defect (issue 28): Enter in a number or run-name field submitted the form — two jobs started by accident.
    Only the Start and Check config buttons submit."""
    at = goto(open_app(), path)
    forms = _forms(at.main)
    assert forms, "the launch page draws its form"
    assert [f.proto.form.enter_to_submit for f in forms] == [False] * len(forms)


def test_the_form_keeps_what_the_user_typed_across_pages(app_home):
    """Defect (issue 28): leaving the DACT pipeline page and coming back reset 12 settings and the dataset to the
    demo. What the user set (and the mode) is there again after a visit to other pages."""
    ds_id = Tracker(app_home).add_dataset(read_csv(csv_bytes(), name="reviews"), name="reviews")
    at = goto(open_app(), "app_pages/dact_pipeline.py")
    at.radio(key="dact:mode").set_value("Full pipeline").run()
    pre = "dact/dact"
    typed = {f"{pre}:train.epochs": 5, f"{pre}:data.max_rows": 800, f"{pre}:pipeline.min_steps": 123,
             f"{pre}:pipeline.trials_stage2": 4, f"{pre}:pipeline.head_lr_range:low": 1e-4,
             f"{pre}:train.encoder_lr": 3e-5}
    at.selectbox(key=f"{pre}:data.dataset_id").set_value(ds_id)
    for key, value in typed.items():
        at.number_input(key=key).set_value(value)
    at.checkbox(key=f"{pre}:pipeline.sweep_timed").uncheck()
    at.selectbox(key=f"{pre}:pipeline.guards").set_value("warn")
    at.text_input(key=f"{pre}:name").set_value("financial")
    at.button(key="FormSubmitter:dact:form-Check config").click().run()
    assert not errors(at), errors(at)

    for page in ("app_pages/data.py", "app_pages/backbone.py", "app_pages/home.py", "app_pages/dact_pipeline.py"):
        goto(at, page)
    assert at.radio(key="dact:mode").value == "Full pipeline"
    assert at.selectbox(key=f"{pre}:data.dataset_id").value == ds_id
    for key, value in typed.items():
        assert at.number_input(key=key).value == pytest.approx(value), key
    assert at.checkbox(key=f"{pre}:pipeline.sweep_timed").value is False
    assert at.selectbox(key=f"{pre}:pipeline.guards").value == "warn"
    assert at.text_input(key=f"{pre}:name").value == "financial"
    # and the mode's fields survive a switch to the other mode and back
    at.radio(key="dact:mode").set_value("Single DACT run").run()
    at.radio(key="dact:mode").set_value("Full pipeline").run()
    assert at.number_input(key=f"{pre}:pipeline.min_steps").value == 123


def test_the_dataset_name_follows_each_uploaded_file(app_home):
    """Defect (issue 28): the Data page's name field kept the first file's name across three uploads."""
    at = goto(open_app(), "app_pages/data.py")
    at.file_uploader(key="data:upload").upload("banking.csv", csv_bytes(), "text/csv")
    at.run()
    assert at.text_input(key="data:name").value == "banking"
    at.text_input(key="data:name").set_value("my banking").run()
    assert at.text_input(key="data:name").value == "my banking"  # an edit is kept for its file
    for name, n in (("financial.csv", 16), ("questions.csv", 17)):
        at.file_uploader(key="data:upload").set_value((name, csv_bytes(n), "text/csv"))
        at.run()
        assert not errors(at), errors(at)
        assert at.text_input(key="data:name").value == name[:-4]
    at.button(key="data:save").click().run()
    assert [d["name"] for d in Tracker(app_home).list_datasets()] == ["questions"]


def test_messages_name_the_forms_labels_not_config_keys():
    """Defect (issue 28): the pipeline's guard said "raise pipeline.min_steps …" — words the form does not show."""
    from dact_lib.tuning.dact_pipeline import PipelineConfig
    from dact_lib.tuning.dact_pipeline.guards import advice
    from ui.forms import form_words

    narrow = PipelineConfig(name="x", head_lr_range=(2e-3, 6e-3))  # without 1e-3: the advice names the range
    said = form_words(advice("stage2", narrow))
    assert "“Minimum optimizer steps per trial”" in said and "“Head learning rate range”" in said
    assert "pipeline." not in said
    said = form_words(advice("stage1", narrow))  # "pipeline.stage1_epochs / stage1_lr": both named
    assert "“Stage 1 epochs per trial” / “Stage 1 learning rate”" in said
    assert form_words("train.epochs = 0 is invalid; model.classifier.hidden_dims (Classifier hidden layers) = 'x'; "
                      "data.val_frac too big") == ("“Epochs” = 0 is invalid; “Classifier hidden layers” = 'x'; "
                                                   "“Validation fraction” too big")
    assert form_words("pipeline.no_such_setting stays") == "pipeline.no_such_setting stays"  # not on a form


def test_the_server_runs_no_full_garbage_collection_after_each_script_run():
    """Streamlit collects all generations after every script run by default; with torch and transformers loaded
    that was most of the server's CPU while tabs watched a training (each status timer's tick is a script run:
    docs/benchmarks.md, "The dashboard never slows the work"). The app's config turns it off."""
    import tomllib

    conf = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert conf["runner"]["postScriptGC"] is False
