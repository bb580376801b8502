"""AppTest of the Watch & explore pages (Runs, PBT view, Pareto explorer, Early exit, Studies) on an empty home and a
populated one. The populated home (built once per module) holds two tiny trained DACT runs, a small Optuna study
pair (single- and multi-objective) in the home's storage, and PBT / DACT-pipeline parent runs recorded with the
payload shapes of ``dact_lib.tuning.pbt`` and ``dact_lib.tuning.dact_pipeline`` (training those engines for real
takes too long for a page test)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import optuna  # noqa: E402
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dact_lib import home as _home  # noqa: E402
from dact_lib.config import default_config  # noqa: E402
from dact_lib.tracker import Tracker  # noqa: E402
from dact_lib.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["pages/runs.py", "pages/pbt_view.py", "pages/pareto.py", "pages/early_exit.py", "pages/studies.py"]
TIMEOUT = 60


def _tiny_cfg(seed: int = 0, lam: float | None = None):
    cfg = default_config("dact", encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs, cfg.train.seed = 120, 32, 1, seed
    if lam is not None:
        cfg.model.ponder_lambda = lam
    return cfg


def populate(home: Path) -> dict:
    tr = Tracker(home)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # two tiny trained DACT runs (real training loop, real models)
    a = train(_tiny_cfg(0, 1e-3), tracker=tr, home=home).run_id
    b = train(_tiny_cfg(1, 1e-2), tracker=tr, home=home).run_id

    # a DACT pipeline parent with its stage-3 trials (two point at the real runs) and the final sweep
    parent = tr.create_run("dact-pipeline", {"run": {}, "pipeline": {"name": "pipe"}}, name="pipe", tag="pipeline")
    tr.update_run(a, parent_id=parent)
    tr.update_run(b, parent_id=parent)
    c = tr.create_run("dact", {}, name="pipe/stage3/trial2", tag="stage3", parent_id=parent, status="finished")
    trials = [(0, 1e-4, a, 0.80, 1.9), (1, 1e-2, b, 0.70, 1.2), (2, 1e-3, c, 0.60, 1.95)]
    for n, lam, rid, acc, ex in trials:
        tr.log_event(parent, "trial", {"stage": "stage3", "number": n, "state": "complete",
                                       "params": {"ponder_lambda": lam}, "values": [1.0 - acc, ex],
                                       "user_attrs": {"run_id": rid, "val_accuracy": acc, "val_nll": 1.0 - acc,
                                                      "val_avg_exit_layer": ex, "val_loss": 1.1 - acc}})
    front = [{"trial": n, "lambda": lam, "objective": "val_nll", "val_nll": 1.0 - acc, "val_avg_exit_layer": ex,
              "val_accuracy": acc, "run_id": rid} for n, lam, rid, acc, ex in trials[:2]]
    tr.log_event(parent, "pareto_front", {"objectives": ["val_nll", "val_avg_exit_layer"], "front": front})
    tr.log_event(parent, "chosen_point", {"rule": "lowest_exit_within_1pt", "point": front[1]})
    sweep = [{"policy": "dact", "value": None, "avg_exit_layer": 1.6, "accuracy": 0.78, "wall_s": 0.1}]
    sweep += [{"policy": "fixed", "value": k, "avg_exit_layer": float(k), "accuracy": 0.6 + 0.1 * k, "wall_s": 0.1}
              for k in (1, 2)]
    sweep += [{"policy": "entropy", "value": s, "avg_exit_layer": 1 + s, "accuracy": 0.7 + s / 10, "wall_s": 0.1}
              for s in (0.1, 0.5)]
    sweep += [{"policy": "patience", "value": 1, "avg_exit_layer": 1.5, "accuracy": 0.75, "wall_s": 0.1}]
    tr.log_event(parent, "exit_policy_sweep", {"split": "val", "num_layers": 2, "rows": sweep, "final_run_id": a})
    tr.set_status(parent, "finished", summary={"front": front, "chosen": front[1], "final_run_id": a,
                                               "exit_policy_sweep": sweep, "stages_done": ["stage3", "final"]})

    # a PBT parent with two members, hp trajectories and one exploit/explore pair (parent AND recipient, as pbt.py)
    pbt = tr.create_run("pbt", {"pbt": {"metric": "val_accuracy"}}, name="pbt")
    members = [tr.create_run("pbt-member", {}, name=f"pbt · member {i}", parent_id=pbt) for i in range(2)]
    tr.log_event(pbt, "pbt_start", {"members": [{"member": i, "run_id": m} for i, m in enumerate(members)]})
    for i, m in enumerate(members):
        for step in (0, 3, 6, 9):
            lr = 1e-3 * (i + 1) if not (i == 1 and step >= 6) else 8e-4
            tr.log_metrics(m, {"hp/lr": lr, "hp/weight_decay": 0.01, "hp/dropout": 0.1, "hp/warmup_ratio": 0.1},
                           step=step)
            if step:
                tr.log_metrics(m, {"val_accuracy": 0.5 + 0.05 * step / 3 - 0.1 * i, "train_loss": 1.0 / step},
                               step=step)
        tr.set_status(m, "finished")
    common = {"step": 6, "epoch": 0, "progress": 1.0, "recipient": 1, "recipient_run_id": members[1], "donor": 0,
              "donor_run_id": members[0], "donor_step": 6, "metric": "val_accuracy", "score": 0.5,
              "donor_score": 0.6, "time": time.time()}
    for rid in (pbt, members[1]):
        tr.log_event(rid, "pbt_exploit", {**common, "old": {"lr": 2e-3}, "new": {"lr": 1e-3}})
        tr.log_event(rid, "pbt_explore", {**common, "old": {"lr": 1e-3}, "new": {"lr": 8e-4}})
    tr.set_status(pbt, "finished", summary={"best_run_id": members[0], "members": [
        {"member": i, "run_id": m, "best_score": 0.6 - 0.1 * i, "exploits": i, "final": {"lr": 1e-3}}
        for i, m in enumerate(members)]})

    # Optuna studies in the home's storage: one single-objective, one two-objective
    url = _home.optuna_storage_url(home)
    s1 = optuna.create_study(study_name="demo/single", storage=url, direction="minimize")
    s1.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2 + t.suggest_int("k", 0, 3), n_trials=6)
    s2 = optuna.create_study(study_name="demo/stage3", storage=url, directions=["minimize", "minimize"])
    s2.optimize(lambda t: (t.suggest_float("ponder_lambda", 1e-4, 1e-1, log=True) * 10,
                           1.0 / (1 + t.params["ponder_lambda"] * 100)), n_trials=5)
    return {"a": a, "b": b, "c": c, "pipeline": parent, "pbt": pbt, "members": members}


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    h = tmp_path_factory.mktemp("populated") / "home"
    h.mkdir()
    return h, populate(h)


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def pop_home(populated, monkeypatch):
    h, ids = populated
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    return h, ids


def _app(page: str) -> AppTest:
    return AppTest.from_file(str(ROOT / page), default_timeout=TIMEOUT)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.exception] + [e.value for e in at.error]


# ------------------------------------------------------------------------------------------------ empty home


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_empty_home(home, page):
    at = _app(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.info, "an empty home shows a hint"


def test_studies_page_does_not_create_optuna_tables_on_empty_home(home):
    import sqlite3

    _app("pages/studies.py").run()
    con = sqlite3.connect(home / "experiments.db")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    con.close()
    assert "studies" not in tables


# ------------------------------------------------------------------------------------------------ populated home


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_on_populated_home(pop_home, page):
    at = _app(page).run()
    assert not _errors(at), _errors(at)


def test_runs_page_compares_selected_runs_and_offers_downloads(pop_home):
    _, ids = pop_home
    at = _app("pages/runs.py")
    at.session_state["runs_selected"] = [ids["a"], ids["b"]]
    at.run()
    assert not _errors(at), _errors(at)
    charts = at.get("plotly_chart")
    assert charts, "the curves chart is drawn"
    import json

    spec = json.loads(charts[0].proto.spec)
    names = {t.get("name", "") for t in spec["data"]}
    assert any(n.startswith(f"#{ids['a']} ") for n in names) and any(n.startswith(f"#{ids['b']} ") for n in names)
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download metrics (CSV)" in labels and "Download model (zip)" in labels
    assert at.get("progress"), "a progress bar with the step / ETA text"


def test_runs_page_kind_filter_empty_lists_every_kind_and_narrows_when_set(pop_home):
    h, ids = pop_home
    n_all = len(Tracker(h).list_runs())
    at = _app("pages/runs.py").run()
    kind = next(m for m in at.multiselect if m.label == "kind")
    assert kind.value == [] and len(at.dataframe[0].value) == n_all
    kind.set_value(["pbt"]).run()
    table = at.dataframe[0].value
    assert 0 < len(table) < n_all and set(table["kind"]) == {"pbt"}


def test_runs_page_live_run_shows_progress_eta_and_cancel(home):
    tr = Tracker(home)
    rid = tr.create_run("dact", {"train": {"epochs": 1}}, name="live", status="running")
    tr.log_event(rid, "start", {"steps": 100})
    now = time.time()
    tr.log_metrics_many([{"run_id": rid, "step": s, "epoch": 0, "name": "train_loss", "value": 1.0 / s,
                          "time": now - 40 + s} for s in range(1, 41)])
    at = _app("pages/runs.py").run()
    assert not _errors(at), _errors(at)
    assert at.multiselect(key="runs_selected").value == [rid]  # active runs are selected by default
    text = at.get("progress")[0].proto.text
    assert "step 40 / 100" in text and "ETA" in text
    at.button(key=f"runs_cancel_{rid}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.warning or at.success  # not a job of this process: the page says where to stop it


def test_zip_model_holds_the_model_files_and_loads_back(pop_home, tmp_path):
    import io
    import zipfile

    from dact_lib.errors import DactLabError
    from dact_lib.models import load_model, zip_model

    h, ids = pop_home
    data = zip_model(Path(h) / "runs" / str(ids["a"]))
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = set(zf.namelist())
    assert {"model.safetensors", "config.json", "label_maps.json"} <= names
    assert any(n.startswith("encoder/") for n in names)
    zf.extractall(tmp_path / "unzipped")
    assert load_model(tmp_path / "unzipped").kind == load_model(ids["a"], home=h).kind
    with pytest.raises(DactLabError, match="no model.safetensors"):
        zip_model(tmp_path)


def test_tracker_metric_names_and_last_steps(pop_home):
    h, ids = pop_home
    tr = Tracker(h)
    df = tr.get_metrics([ids["a"], ids["b"]])
    assert tr.metric_names([ids["a"], ids["b"]]) == sorted(set(df["name"]))
    assert tr.last_steps([ids["a"], ids["b"]]) == {int(r): int(s) for r, s in df.groupby("run_id")["step"].max().items()}
    assert tr.metric_names([]) == [] and tr.last_steps([]) == {}


def test_pareto_choice_sets_and_persists_predict_run_id(pop_home):
    h, ids = pop_home
    tr = Tracker(h)
    at = _app("pages/pareto.py").run()
    assert not _errors(at), _errors(at)
    pick = at.selectbox(key=f"pareto_pick_{ids['pipeline']}")
    label = next(o for o in pick.options if o.startswith("trial 1 "))
    pick.select(label).run()
    assert not _errors(at), _errors(at)
    assert at.session_state["predict_run_id"] == ids["b"]
    chosen = tr.get_events(ids["pipeline"], kinds=["chosen"])
    assert chosen and chosen[-1]["payload"]["run_id"] == ids["b"]
    # a reload (new session) restores the persisted choice
    st.cache_resource.clear()
    at2 = _app("pages/pareto.py").run()
    assert at2.session_state["predict_run_id"] == ids["b"]


def test_early_exit_filter_all_layers(pop_home):
    _, ids = pop_home
    at = _app("pages/early_exit.py")
    at.session_state["early_run"] = ids["a"]
    at.run()
    assert not _errors(at), _errors(at)
    assert len(at.get("plotly_chart")) == 2
    at.button(key="early_all_btn").click().run()
    assert not _errors(at), _errors(at)
    assert at.slider(key="early_layers").value == (2, 2)
    df = at.dataframe[-1].value
    assert len(df) == 0 or (df["exit_layer"] == 2).all()


def test_pbt_view_draws_lineage(pop_home):
    import json

    at = _app("pages/pbt_view.py").run()
    assert not _errors(at), _errors(at)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    lineage = next(s for s in specs if "lineage" in s["layout"]["title"]["text"])
    assert len(lineage["layout"].get("annotations", [])) == 1, "one exploit arrow (parent + member copies deduped)"


def test_studies_dashboard_button_starts_a_server(pop_home):
    import signal

    at = _app("pages/studies.py").run()
    assert not _errors(at), _errors(at)
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
