"""Taking the model out in the dashboard (ui/deploy.py on the Runs page): the export zip, the REST service started
and stopped from the page, the latency budget — through streamlit's AppTest on a home with tiny runs."""
from __future__ import annotations

import io
import json
import urllib.request
import zipfile
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from dact_lib.config import default_config
from dact_lib.tracker import Tracker
from dact_lib.train import train

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"


def tiny_cfg(kind: str):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len = 120, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 1, 16, "cpu"
    return cfg.validate()


@pytest.fixture(scope="module")
def runs_home(tmp_path_factory):
    h = tmp_path_factory.mktemp("deploy_pages")
    tr = Tracker(h)
    ids = {kind: train(tiny_cfg(kind), tracker=tr, home=h).run_id for kind in ("backbone", "dact")}
    tr.close()
    return h, ids


@pytest.fixture
def app(runs_home, monkeypatch):
    h, ids = runs_home
    monkeypatch.setenv("DACT_LAB_HOME", str(h))
    st.cache_resource.clear()
    yield h, ids
    from dact_lib.deploy.service import stop_all

    stop_all()
    st.cache_resource.clear()


def runs_page(run_id: int) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.run()
    at.switch_page("app_pages/runs.py").run()
    at.selectbox(key="runs_focus").set_value(run_id).run()
    assert not at.exception, at.exception
    return at


def test_export_zip_from_the_runs_page_is_a_transformers_folder(app, served):
    h, ids = app
    run = ids["dact"]
    at = runs_page(run)
    at.text_input(key=f"dep_pol_{run}").set_value("entropy:0.3")
    at.button(key=f"dep_go_{run}").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    name = f"dact_lab_run_{run}_hf.zip"
    assert name in served
    zf = zipfile.ZipFile(io.BytesIO(served[name]))
    names = set(zf.namelist())
    assert {"config.json", "model.safetensors", "modeling_dact_lab.py", "README.md"} <= names
    cfg = json.loads(zf.read("config.json"))
    assert cfg["model_type"] == "dact_lab" and cfg["exit_policy"] == "entropy:0.3"


def test_a_bad_policy_is_shown_with_the_fix_and_nothing_is_offered(app, served):
    h, ids = app
    run = ids["dact"]
    at = runs_page(run)
    at.text_input(key=f"dep_pol_{run}").set_value("entropy")
    at.button(key=f"dep_go_{run}").click().run()
    assert any("needs a value" in e.value for e in at.error)
    assert not any(n and n.startswith(f"dact_lab_run_{run}_") for n in served)


def test_rest_service_started_and_stopped_from_the_page(app):
    h, ids = app
    run = ids["backbone"]
    at = runs_page(run)
    at.button(key=f"dep_start_{run}").click().run()
    assert not at.error, [e.value for e in at.error]
    (ok,) = [s.value for s in at.success if "REST service" in s.value]
    url = ok.split(" on ")[1].split(" ")[0]
    (curl,) = [c.value for c in at.code if "curl" in c.value]
    assert url in curl and "/predict" in curl
    req = urllib.request.Request(f"{url}/predict", data=json.dumps({"text": "great food"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = json.loads(resp.read())
    assert body["predictions"][0]["label"] in ("food", "sports", "technology")
    at.button(key=f"dep_stop_{run}").click().run()
    from dact_lib.deploy.service import health

    assert not health(url) and at.button(key=f"dep_start_{run}")


def test_latency_budget_on_the_runs_page(app):
    h, ids = app
    run = ids["dact"]
    at = runs_page(run)
    at.number_input(key=f"dep_budget_{run}").set_value(10000.0)
    at.button(key=f"dep_budget_go_{run}").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("most accurate point that fits" in s.value for s in at.success)
    (table,) = [d.value for d in at.dataframe if "p50 ms" in d.value.columns]
    assert table["fits (p50 ≤ budget)"].all() and len(table) >= 3
