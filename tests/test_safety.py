"""Issue "Nothing lost, nobody in": one test per reliability (R) and security (S) finding, each failing on the code
that had the finding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dact_lib.cli import main
from dact_lib.config import RunConfig, default_config, parse_mapping
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.files import atomic_write, atomic_write_text, clean_stale_temp, read_json
from dact_lib.models import load_model, resolve_run_dir
from dact_lib.tracker import Tracker
from dact_lib.train import train


def tiny_cfg(kind: str = "backbone") -> RunConfig:
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len = 120, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 1, 16, "cpu"
    return cfg.validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A home with one finished tiny backbone run."""
    h = tmp_path_factory.mktemp("safety")
    run_id = train(tiny_cfg(), tracker=Tracker(h), home=h).run_id
    return h, run_id


def copy_run(trained, tmp_path) -> Path:
    import shutil

    h, run_id = trained
    dst = tmp_path / "run"
    shutil.copytree(h / "runs" / str(run_id), dst)
    return dst


# ---------------------------------------------------------------------------------------------- R1 atomic files


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, '{"old": 1}')

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text('{"new": ')
        raise KeyboardInterrupt  # a kill between the write and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("name, damage, match", [
    ("config.json", "", "config.json is empty"),
    ("config.json", '{"kind": "backb', "config.json is damaged"),
    ("label_maps.json", "[]", "label_maps.json is damaged"),
    ("model.safetensors", "garbage", "model.safetensors is damaged"),
])
def test_a_damaged_run_folder_is_a_clear_error(trained, tmp_path, name, damage, match):
    run = copy_run(trained, tmp_path)
    (run / name).write_text(damage)
    with pytest.raises(DactLabError, match=match):
        load_model(run)


def test_damaged_run_in_the_cli_exits_3_without_traceback(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / "config.json").write_text("")
    assert main(["predict", "--run", str(run), "hello"]) == 3
    err = capsys.readouterr().err
    assert "config.json is empty" in err and "Traceback" not in err


def test_read_json_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DactLabError, match="is missing.*Retrain"):
        read_json(tmp_path / "report.json", "report")


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.safetensors.{dead.pid}.tmp"
    old_style = tmp_path / "model.safetensors.tmp"
    mine = tmp_path / f".config.json.{os.getpid()}.tmp"  # this process may be writing it right now
    # today's names carry the writing thread too (two threads of one process never share a temp file)
    stale_thread = tmp_path / f".report.json.12345-{dead.pid}.tmp"
    mine_thread = tmp_path / f".report.json.12345-{os.getpid()}.tmp"
    for p in (stale, old_style, mine, stale_thread, mine_thread):
        p.write_text("x")
    assert sorted(p.name for p in clean_stale_temp(tmp_path)) == sorted([stale.name, old_style.name,
                                                                          stale_thread.name])
    assert mine.exists() and mine_thread.exists() and not stale.exists()


def test_training_writes_no_temp_files(trained):
    h, run_id = trained
    leftovers = [p.name for p in (h / "runs" / str(run_id)).rglob("*.tmp")]
    assert leftovers == []


def test_kill_while_the_checkpoint_is_written_leaves_a_loadable_run(trained, tmp_path):
    """kill -9 in the middle of save_model (an injected pause between writing the new weights and renaming):
    the run folder still loads, with the previous files."""
    run = copy_run(trained, tmp_path)
    before = (run / "config.json").read_text()
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import dact_lib.files as files
real = files.os.replace
def slow_replace(a, b):
    print("writing", flush=True)
    time.sleep(60)
    real(a, b)
files.os.replace = slow_replace
from dact_lib.models import load_model, save_model
m = load_model({str(run)!r})
m.config.name = "changed"
save_model({str(run)!r}, m.model, m.tokenizer, m.config, m.label_maps)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "DACT_LAB_CACHE": os.environ.get("DACT_LAB_CACHE", "")})
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert (run / "config.json").read_text() == before
    loaded = load_model(run)  # every file is the old one or the new one: loads
    assert loaded.config.name != "changed"
    clean_stale_temp(run)
    assert list(run.rglob("*.tmp")) == []


# ---------------------------------------------------------------------------------------------- R2 dead CLI runs


def test_a_killed_cli_run_is_interrupted_for_the_next_cli_command(home, capsys):
    tr = Tracker(home)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rid = tr.create_run("backbone", {}, status="running")
    tr.update_run(rid, pid=dead.pid)  # as a CLI `train` killed with -9 leaves it
    assert main(["runs", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out.splitlines()[1]
    assert Tracker(home).get_run(rid)["status"] == "interrupted"


def test_opening_the_tracker_leaves_live_processes_runs_alone(home):
    tr = Tracker(home)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rid = tr.create_run("backbone", {}, status="running")
        tr.update_run(rid, pid=alive.pid)
        mine = tr.create_run("backbone", {}, status="running")  # this process: the job manager's call
        Tracker(home)
        assert tr.get_run(rid)["status"] == "running" and tr.get_run(mine)["status"] == "running"
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------------------- R3 moved home


def test_a_moved_home_serves_its_own_models(trained, tmp_path):
    import shutil

    h, run_id = trained
    moved = tmp_path / "moved-home"
    shutil.copytree(h, moved)
    tr = Tracker(moved)
    run = tr.get_run(run_id)
    assert Path(run["run_dir"]) == moved / "runs" / str(run_id)
    stored = tr.query("SELECT run_dir FROM runs WHERE id = ?", (run_id,))[0]["run_dir"]
    assert stored == f"runs/{run_id}"  # relative in the database
    assert all(Path(a["path"]).is_relative_to(moved) for a in tr.get_artifacts(run_id))
    assert load_model(run_id, moved).run_dir == moved / "runs" / str(run_id)


def test_an_old_absolute_run_dir_maps_into_the_moved_home(home):
    tr = Tracker(home)
    rid = tr.create_run("backbone", {}, status="finished")
    with tr._write() as conn:
        conn.execute("UPDATE runs SET run_dir = ? WHERE id = ?", (f"/gone/old-home/runs/{rid}", rid))
    assert Path(tr.get_run(rid)["run_dir"]) == tr.home / "runs" / str(rid)


# ---------------------------------------------------------------------------------------------- R4 --run N


def test_run_id_is_looked_up_in_the_home_not_the_working_directory(trained, tmp_path, monkeypatch):
    h, run_id = trained
    decoy = tmp_path / str(run_id)
    decoy.mkdir()
    (decoy / "model.safetensors").write_text("a different model")
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(str(run_id), h) == h / "runs" / str(run_id)
    assert resolve_run_dir(run_id, h) == h / "runs" / str(run_id)
    assert resolve_run_dir(f"./{run_id}", h) == Path(f"./{run_id}")  # a path is a path
    with pytest.raises(DactLabError, match="neither a run id"):
        resolve_run_dir("no-such-folder", h)


# ---------------------------------------------------------------------------------------------- R5 refused files


def test_a_refused_file_adds_no_dataset_row(home, tmp_path):
    csv = tmp_path / "few.csv"
    csv.write_text("text,label\n" + "".join(f"sentence {i},{'ab'[i % 2]}\n" for i in range(12)))
    cfg = tiny_cfg()
    cfg.data.path, cfg.data.max_rows = str(csv), None
    cfg.data.val_frac = cfg.data.test_frac = 0.05  # a split that cannot hold both classes
    tr = Tracker(home)
    with pytest.raises(DactLabError):
        train(cfg, tracker=tr, home=home)
    assert tr.list_datasets() == [] and tr.list_runs() == []


# ---------------------------------------------------------------------------------------------- R6 types


@pytest.mark.parametrize("path, value, match", [
    (("tag",), {"a": "b"}, r"tag = \{'a': 'b'\} is invalid: expected a string or a list"),
    (("name",), {"x": 1}, "name = .* expected a string"),
    (("name",), "n" * 500, "name is 500 characters long"),
    (("train", "epochs"), "3", "train.epochs = '3' is invalid: expected an integer"),
    (("train", "early_stopping", "enabled"), "yes", "expected true/false"),
    (("data", "columns"), {"text": 5}, "data.columns"),
    (("model", "head", "hidden_dims"), [1000000000], r"hidden_dims = \[1000000000\] is invalid"),
    (("init_from_run",), "../../x/runs/1", "init_from_run = '../../x/runs/1' is invalid: expected an integer"),
])
def test_every_field_is_type_checked(path, value, match):
    d = default_config("backbone").to_dict()
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(d)


def test_bad_tag_in_the_cli_is_exit_3_not_a_traceback(home, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("kind: backbone\nencoder: tiny\ntag: {a: b}\n")  # a list of tags is fine; a mapping is not
    assert main(["train", "--config", str(cfg), "--home", str(home)]) == 3
    err = capsys.readouterr().err
    assert "tag = {'a': 'b'} is invalid" in err and "Traceback" not in err
    assert Tracker(home).list_runs() == []


# ---------------------------------------------------------------------------------------------- S1 server files


def test_browser_configs_cannot_name_server_files(home, tmp_path):
    from dact_lib.jobs import JobManager

    secret = tmp_path / "secret.csv"
    secret.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(40)))
    jm = JobManager(home, untrusted_configs=True)
    try:
        for fld in ("path", "val_path", "test_path"):
            cfg = tiny_cfg()
            setattr(cfg.data, fld, str(secret))
            with pytest.raises(ConfigError, match=f"data.{fld} .* cannot read files of the server"):
                jm.submit("backbone", cfg)
        for bad in (str(tmp_path), str(secret), "../../etc"):  # a folder that is no model, a file, a path up
            cfg = tiny_cfg()
            cfg.encoder = bad
            with pytest.raises(ConfigError, match="not another server path"):
                jm.check("backbone", cfg)
        model_dir = tmp_path / "my-model"  # a saved model's folder works from the browser too
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
        cfg = tiny_cfg()
        cfg.encoder = str(model_dir)
        jm._validate("backbone", cfg)
        assert Tracker(home).list_runs() == [] and Tracker(home).list_datasets() == []
        # the CLI and the library (trusted) still read files
        cfg = tiny_cfg()
        cfg.data.path = str(secret)
        JobManager(home).check("backbone", cfg)
    finally:
        jm.shutdown() if hasattr(jm, "shutdown") else None


def test_init_from_run_cannot_leave_the_home():
    d = default_config("dact").to_dict()
    d["init_from_run"] = "../../x/runs/1"
    with pytest.raises(ConfigError, match="init_from_run"):
        RunConfig.from_dict(d)
    d["init_from_run"] = "7"  # a form or flag gives the id as text: it is the id 7
    assert RunConfig.from_dict(d).init_from_run == 7


def test_the_app_job_manager_is_untrusted():
    import inspect

    from ui import state

    assert "untrusted_configs=True" in inspect.getsource(state._jobs)


# ---------------------------------------------------------------------------------------------- S2 YAML bombs

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])


@pytest.mark.parametrize("text, suffix, match", [
    (BOMB, ".yaml", "anchors/aliases"),
    (BOMB, ".json", "anchors/aliases"),
    ("a: " + "[" * 40 + "]" * 40, ".yaml", "nested more than"),
    ("[" * 50000, ".json", "nested more than"),
    ("x: " + "y" * 300_000, ".yaml", "at most 256 KiB"),
])
def test_config_bombs_are_refused_at_once(text, suffix, match):
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        parse_mapping(text, suffix, "the uploaded config")
    assert time.perf_counter() - t < 2.0  # the bomb took 204 s and 5.7 GB before


def test_config_bomb_upload_on_a_page_is_refused(home, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_resource.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/backbone.py").run()
    at.file_uploader(key="backbone:upload").upload("bomb.yaml", BOMB.encode(), "application/x-yaml")
    at.run()
    assert not at.exception and any("anchors" in e.value for e in at.error)
    st.cache_resource.clear()


# ---------------------------------------------------------------------------------------------- S4 markdown


def test_user_text_is_shown_as_text():
    from ui.safe import plain

    assert plain("![x](http://evil.example/i.png)") == r"\!\[x\]\(http\:\/\/evil\.example\/i\.png\)".replace(
        r"\/", "/")
    assert plain(":red[boom] **b**") == r"\:red\[boom\] \*\*b\*\*"


def test_a_markdown_header_in_a_csv_error_is_not_rendered(home):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_resource.clear()
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/data.py").run()
    at.file_uploader(key="data:upload").upload("x.csv", b"![x](http://evil.example/i.png)\nhello\n", "text/csv")
    at.run()
    (err,) = [e.value for e in at.error]
    assert "![x](" not in err and r"\!\[x\]\(" in err
    st.cache_resource.clear()


# ---------------------------------------------------------------------------------------------- S5 formulas


def test_formula_cells_are_escaped_in_downloads():
    from dact_lib.data import read_csv, spreadsheet_safe_csv

    ds = read_csv(b"text,label\n\"=cmd|' /C calc'!A0\",-1\n@SUM(A1),+2\nplain text,3\n\"-2+3\",4\n")
    out = spreadsheet_safe_csv(ds.to_csv_bytes()).decode()
    rows = out.splitlines()
    assert rows[0] == "text,label"
    assert "'=cmd|' /C calc'!A0" in out and "'@SUM(A1)" in out and "'-2+3" in out
    assert ",-1" in out and ",+2" in out and "plain text,3" in out  # numbers and plain text untouched
    assert "=cmd" not in out.replace("'=cmd", "")


# ---------------------------------------------------------------------------------------------- S6 sizes


def test_heads_too_big_for_this_machine_are_refused_before_allocating():
    d = default_config("dact").to_dict()
    d["model"]["classifier"]["hidden_dims"] = [8192] * 8
    with pytest.raises(ConfigError, match="GiB .* smaller hidden_dims"):
        RunConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------- S7 terminal


def test_cli_output_strips_control_characters(home, capsys):
    tr = Tracker(home)
    rid = tr.create_run("backbone", {}, name="evil\x1b]0;owned\x07name", tag="t\x1b[2J", status="finished")
    assert main(["runs", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\ufffd" in out
    assert str(rid) in out


# ---------------------------------------------------------------------------------------------- S3 / R7 dashboard


def _request(port: int, method: str, path: str, host: str, origin: str | None = None) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host}
    if origin:
        headers["Origin"] = origin
    conn.request(method, path, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_optuna_dashboard_refuses_foreign_hosts_and_origins(home):
    import optuna

    from dact_lib.home import optuna_storage_url
    from dact_lib.tuning import dashboard_server

    optuna.create_study(study_name="keep-me", storage=optuna_storage_url(home))
    srv = dashboard_server.start_dashboard(home, wait_s=30)
    try:
        assert srv["up"], Path(srv["log"]).read_text()[-2000:]
        port = srv["port"]
        me = f"127.0.0.1:{port}"
        assert _request(port, "GET", "/api/studies", me) == 200
        assert _request(port, "GET", "/api/studies", f"localhost:{port}") == 200
        assert _request(port, "GET", "/api/studies", "evil.example") == 403  # DNS rebinding
        assert _request(port, "DELETE", "/api/studies/1", "evil.example") == 403
        assert _request(port, "DELETE", "/api/studies/1", me, origin="http://evil.example") == 403
        assert [s.study_name for s in optuna.get_all_study_summaries(optuna_storage_url(home))] == ["keep-me"]
    finally:
        dashboard_server.stop_dashboards()


def test_optuna_dashboard_stops_when_the_app_is_killed(home, tmp_path):
    """The app process is killed with -9 (no atexit): its dashboard server goes too."""
    import optuna

    from dact_lib.home import optuna_storage_url

    optuna.create_study(study_name="s", storage=optuna_storage_url(home))
    out = tmp_path / "child.txt"
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from dact_lib.tuning import dashboard_server
srv = dashboard_server.start_dashboard({str(home)!r}, wait_s=30)
open({str(out)!r}, "w").write(str(srv["proc"].pid) + " " + str(srv["up"]))
import time
time.sleep(120)
"""
    app = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and out.read_text()):
        time.sleep(0.2)
    pid, up = out.read_text().split()
    assert up == "True"
    app.kill()
    app.wait()
    from dact_lib.tracker import pid_alive

    deadline = time.time() + 10
    while time.time() < deadline and pid_alive(int(pid)):
        time.sleep(0.2)
    assert not pid_alive(int(pid)), "optuna-dashboard outlived the app"


def test_trials_left_running_by_a_killed_process_fail_on_resume(home):
    from optuna.trial import TrialState

    from dact_lib.tuning import studies

    tr = Tracker(home)
    parent = tr.create_run("dact-pipeline", {}, status="running")
    study = studies.create_study("p/stage2", directions=["minimize"], home=home,
                                 user_attrs={"parent_run_id": parent})
    linked, unlinked = study.ask(), study.ask()
    child = tr.create_run("dact", {}, parent_id=parent, status="running")
    studies.link_trial(linked, child, parent)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for rid in (parent, child):
        tr.update_run(rid, pid=dead.pid)  # the pipeline process was killed with -9
    # another process resumes: it takes over the parent, then reopens the stage's study
    again = Tracker(home)
    assert again.get_run(child)["status"] == "interrupted"
    again.set_status(parent, "running", pid=os.getpid())
    study = studies.create_study("p/stage2", directions=["minimize"], home=home)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {linked.number: TrialState.FAIL, unlinked.number: TrialState.FAIL}


def test_trials_of_a_live_process_stay_running(home):
    from optuna.trial import TrialState

    from dact_lib.tuning import studies

    tr = Tracker(home)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        parent = tr.create_run("dact-pipeline", {}, status="running")
        tr.update_run(parent, pid=alive.pid)
        study = studies.create_study("q/stage2", directions=["minimize"], home=home,
                                     user_attrs={"parent_run_id": parent})
        trial = study.ask()
        child = tr.create_run("dact", {}, parent_id=parent, status="running")
        tr.update_run(child, pid=alive.pid)
        studies.link_trial(trial, child, parent)
        study.ask()  # no run yet, but the parent's live process owns it
        study = studies.create_study("q/stage2", directions=["minimize"], home=home)
        assert {t.state for t in study.get_trials(deepcopy=False)} == {TrialState.RUNNING}
    finally:
        alive.kill()
        alive.wait()


def test_one_place_for_the_kind_defaults():
    """Bug (house): RunConfig(kind="backbone") froze 0 layers, default_config("backbone") 2."""
    for kind in ("backbone", "dact", "multitask"):
        assert RunConfig(kind=kind).to_dict() == default_config(kind).to_dict()
    assert RunConfig(kind="backbone").train.freeze_layers == 2
    assert RunConfig(kind="multitask").train.early_stopping.patience == 2


def test_html_report_keeps_units_apart_and_shows_dates(home, tmp_path):
    """Bug (dashboard issue): accuracy (0-1) and exit layer (1-6) shared one y-axis; events showed unix times."""
    import re

    import pandas as pd

    from dact_lib.report import curves_figure, write_report

    metrics = pd.DataFrame({"run_id": 1, "step": [1, 2, 1, 2, 1, 2], "epoch": 0, "time": 0.0,
                            "name": ["val_loss"] * 2 + ["val_accuracy"] * 2 + ["val_avg_exit_layer"] * 2,
                            "value": [1.0, 0.8, 0.5, 0.6, 5.0, 4.0]})
    fig = curves_figure(metrics)
    axis_of = {t.name: t.yaxis for t in fig.data}
    assert len({axis_of["val_loss"], axis_of["val_accuracy"], axis_of["val_avg_exit_layer"]}) == 3
    tr = Tracker(home)
    rid = tr.create_run("dact", {}, status="finished")
    tr.log_event(rid, "note", {"a": 1})
    page = write_report(rid, tmp_path / "r.html", home).read_text()
    assert re.search(r"<td>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d</td><td>note</td>", page)


def test_metrics_csv_counts_epochs_from_one(home):
    """Bug (dashboard issue): the metrics CSV's epoch column said 0 where the epoch metric said 1."""
    import io

    import pandas as pd

    tr = Tracker(home)
    rid = tr.create_run("backbone", {}, status="finished")
    tr.log_metrics(rid, {"epoch": 1.0, "val_loss": 0.5}, step=10, epoch=0)
    df = pd.read_csv(io.BytesIO(tr.metrics_csv([rid])))
    assert set(df["epoch"]) == {1} and df.loc[df["name"] == "epoch", "value"].item() == 1.0


def test_a_run_says_what_it_does_before_its_first_step(home):
    """Friction (dashboard issue): a cold first run sat at 'step 0 / 22, ETA ?' for a minute."""
    from dact_lib.progress import progress_eta

    tr = Tracker(home)
    rid = train(tiny_cfg(), tracker=tr, home=home).run_id
    phases = [e["payload"]["phase"] for e in tr.get_events(rid, kinds=["phase"])]
    assert phases[0] == "loading the encoder" and phases[1].startswith("tokenising ") and phases[2] == "training"
    # and after the last step: what follows it is named too (issue 28: "step 184/184 · running" for 19 minutes)
    assert phases[-1].startswith("evaluating the test split")
    assert 1 in set(tr.get_metrics(rid, names=["train_loss"])["step"])  # the first step is logged at once
    run = dict(tr.get_run(rid), status="running", summary={})
    text = progress_eta(run, None, [{"kind": "phase", "payload": {"phase": "tokenising 120 rows"}}],
                        steps_done=0)["text"]
    assert text.startswith("tokenising 120 rows… · step 0")


# ------------------------------------------------------------------ issue 27: no pickle is read from disk anywhere


class Plant:
    """A hostile pickle: loading it with an unrestricted unpickler creates ``marker`` (any code could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, how: str) -> None:
    """Write a hostile ``path``: a torch.save zip or a bare pickle of :class:`Plant`; or, for the safetensors
    readers, a foreign safetensors file and one whose header asks for an object array."""
    import pickle

    import torch
    from safetensors.torch import save_file

    from dact_lib.train import STATE_FORMAT

    if how == "torch.save":
        torch.save({"step": 1, "model": {}, "rng": Plant(marker)}, path)
    elif how == "pickle":
        path.write_bytes(pickle.dumps({"step": Plant(marker)}, protocol=2))
    elif how == "foreign safetensors":
        save_file({"weight": torch.zeros(2)}, str(path))
    elif how == "object array":
        state = {"rng": {"$ndarray": {"dtype": "|O", "shape": [1], "data": [str(marker)]}}}
        save_file({}, str(path), metadata={"format": STATE_FORMAT, "kind": "resume", "state": json.dumps(state)})
    else:
        raise AssertionError(how)


def test_the_planted_pickle_runs_code_on_an_unrestricted_reader(tmp_path):
    """The control: the plant below is live (torch.load(weights_only=False), what the code did before, runs it)."""
    import torch

    plant(tmp_path / "resume.pt", tmp_path / "marker", "torch.save")
    torch.load(tmp_path / "resume.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name, how", [("resume.safetensors", "torch.save"), ("resume.safetensors", "pickle"),
                                       ("resume.safetensors", "foreign safetensors"),
                                       ("resume.safetensors", "object array"),
                                       ("resume.pt", "torch.save"), ("resume.pt", "pickle")])
def test_a_planted_resume_checkpoint_runs_nothing_and_is_refused_by_name(home, tmp_path, capsys, name, how):
    """A crafted resume checkpoint in an interrupted run's folder — under today's name or an older DACT Lab's
    resume.pt — is refused when the run is resumed (CLI and library), naming the file; its code never runs."""
    tr = Tracker(home)
    rid = tr.create_run("backbone", tiny_cfg().to_dict(), status="interrupted")
    run_dir = tr.run_dir(rid)
    tr.update_run(rid, run_dir=str(run_dir))
    marker = tmp_path / "marker"
    path = run_dir / name
    plant(path, marker, how)
    assert main(["train", "--resume", str(rid), "--home", str(home)]) == 3
    err = capsys.readouterr().err
    assert str(path) in err and "nothing in it was run" in err and "Traceback" not in err, err
    assert "delete" in err.lower()
    with pytest.raises(DactLabError, match="nothing in it was run"):
        train(tiny_cfg(), tracker=tr, home=home, run_id=rid, resume=True)
    assert not marker.exists()
    assert tr.get_run(rid)["status"] == "interrupted"  # refused before anything changed


class DirCheckpoint:
    """A ``ray.tune.Checkpoint`` as :func:`read_member_state` uses it (a local folder), without starting Ray."""

    def __init__(self, folder: Path) -> None:
        self.path = str(folder)

    def as_directory(self):
        import contextlib

        return contextlib.nullcontext(self.path)


@pytest.mark.parametrize("name, how", [("member_state.safetensors", "torch.save"),
                                       ("member_state.safetensors", "pickle"),
                                       ("member_state.safetensors", "foreign safetensors"),
                                       ("member_state.pt", "torch.save")])
def test_a_planted_ray_member_checkpoint_runs_nothing_and_is_refused_by_name(tmp_path, name, how):
    from dact_lib.tuning.pbt_ray import STATE_FILE, read_member_state, restart_from

    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    marker = tmp_path / "marker"
    plant(folder / name, marker, how)
    named = str(folder / STATE_FILE) if name == STATE_FILE else str(folder)
    with pytest.raises(DactLabError) as err:
        read_member_state(DirCheckpoint(folder))
    assert named in str(err.value)
    with pytest.raises(DactLabError):
        restart_from({}, DirCheckpoint(folder), member=0)  # what a (re)started member's worker calls first
    assert not marker.exists()


def test_a_ray_member_checkpoint_round_trips_without_pickle(tmp_path):
    import torch

    from dact_lib.train import rng_state, save_state_file
    from dact_lib.tuning.pbt_ray import STATE_FILE, STATE_KIND, restart_from

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    loop = {"step": 5, "epoch": 1, "batch": 2, "stop": False, "stop_reason": None, "samples_seen": 80,
            "best_metric": 0.5, "best_epoch": 1, "best_step": 4, "best_metrics": {"val_loss": 0.5},
            "history": [{"step": 4, "val_loss": 0.5}], "micro_batch": 16,
            "stopper": {"raw": [0.5], "smoothed": [0.5], "best": 0.5, "best_index": 0, "bad": 0}}
    save_state_file(tmp_path / STATE_FILE, {"format": 1, "member": 0, "run_id": 3, "step": 5, "progress": 1.2,
                                            "score": float("nan"), "hp": {"lr": 1e-3}, "loop": loop,
                                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "rng": rng_state(), "best_model": None}, STATE_KIND)
    resume_state, best, info = restart_from({}, DirCheckpoint(tmp_path), member=0)
    assert info["how"] == "own" and info["step"] == 5
    assert {k: resume_state[k] for k in loop} == loop
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    again.load_state_dict(resume_state["optimizer"])
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_state_files_keep_what_a_resume_checkpoint_holds(tmp_path):
    """Tuples, int and tuple keys, NaN / inf, None, numpy arrays and scalars, tied tensors and views, an AdamW
    state and every RNG state come back as they were; the RNGs continue with the same draws."""
    import math
    import random

    import numpy as np
    import torch

    from dact_lib.train import load_state_file, rng_state, save_state_file, set_rng_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tied = torch.arange(6.0)
    state = {"step": 7, "stop": False, "reason": None, "nan": math.nan, "inf": -math.inf, "f32": np.float32(0.25),
             "model": model.state_dict(), "optimizer": opt.state_dict(), "tied": [tied, tied, tied[2:4]],
             "keys": {1: "a", (2, 3): "b", "$odd": [1, (2.5, "x")]}, "rng": rng_state()}
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    got = load_state_file(save_state_file(tmp_path / "resume.safetensors", state))
    set_rng_state(got["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws
    assert got["step"] == 7 and got["stop"] is False and got["reason"] is None
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf and got["f32"] == 0.25
    assert got["keys"] == {1: "a", (2, 3): "b", "$odd": [1, (2.5, "x")]}
    assert [t.tolist() for t in got["tied"]] == [tied.tolist(), tied.tolist(), [2.0, 3.0]]
    assert all(torch.equal(got["model"][k], v) for k, v in model.state_dict().items())
    want = opt.state_dict()
    assert got["optimizer"]["param_groups"] == want["param_groups"]  # betas stay a tuple
    assert all(torch.equal(got["optimizer"]["state"][i][k], v) for i, s in want["state"].items() for k, v in s.items())
    assert isinstance(got["rng"]["numpy"][1], np.ndarray) and got["rng"]["numpy"][1].dtype == np.uint32


def test_an_older_resume_pt_loads_only_tensors_numbers_text_and_numeric_arrays(tmp_path):
    import numpy as np
    import torch

    from dact_lib.train import load_legacy_resume

    ok = {"rng": {"numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0)}, "loss": np.float64(0.5),
          "model": {"w": torch.ones(2)}, "betas": (0.9, 0.999)}
    torch.save(ok, tmp_path / "resume.pt")
    got = load_legacy_resume(tmp_path / "resume.pt")
    assert got["rng"]["numpy"][1].tolist() == [0, 1, 2, 3] and got["loss"] == 0.5 and got["betas"] == (0.9, 0.999)
    marker = tmp_path / "marker"
    torch.save({"rng": np.array([Plant(marker)], dtype=object)}, tmp_path / "bad.pt")
    with pytest.raises(DactLabError, match="bad.pt .*nothing in it was run"):
        load_legacy_resume(tmp_path / "bad.pt")
    assert not marker.exists()


def test_no_library_code_reads_a_pickle():
    """The static side of the above: no unrestricted pickle reader anywhere in dact_lib; the one torch.load (an older
    DACT Lab's resume.pt) is weights_only=True."""
    import re

    root = Path(__file__).resolve().parent.parent / "dact_lib"
    banned = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|joblib\.load|"
                        r"read_pickle|torch\.jit\.load|shelve\.open|marshal\.loads?\(")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if banned.search(line)]
    assert offenders == []
    loads = [(p.name, line.strip()) for p in root.rglob("*.py")
             for line in p.read_text(encoding="utf-8").splitlines() if "torch.load(" in line]
    assert loads == [("train.py", 'state = torch.load(path, map_location="cpu", weights_only=True)')]


# ------------------------------------------------------------------------------------------------ a full disk
def test_a_full_disk_is_a_clear_error_and_nothing_is_half_written(tmp_path):
    """Issue 27: a full disk during a DACT run surfaced safetensors' raw "No space left on device"."""
    import errno as errno_mod

    from dact_lib.errors import DactLabError
    from dact_lib.files import atomic_write, atomic_write_bytes

    target = tmp_path / "model.safetensors"
    atomic_write_bytes(target, b"the earlier weights")

    def full_oserror(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno_mod.ENOSPC, "No space left on device")

    def full_library(tmp):  # how safetensors says it: not an OSError
        tmp.write_bytes(b"half")
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")

    for writer in (full_oserror, full_library):
        with pytest.raises(DactLabError) as exc:
            atomic_write(target, writer)
        msg = str(exc.value)
        assert "No space left" in msg and str(target) in msg and "free" in msg and "nothing was half-written" in msg
        assert target.read_bytes() == b"the earlier weights"  # the old file, whole
        assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left
    with pytest.raises(ValueError, match="other"):  # any other failure passes through as it is
        atomic_write(target, lambda tmp: (_ for _ in ()).throw(ValueError("other")))


def test_a_full_disk_during_training_fails_the_run_with_the_reason(home, monkeypatch):
    from dact_lib.config import default_config
    from dact_lib.errors import DactLabError
    from dact_lib.tracker import Tracker
    from dact_lib.train import train
    import dact_lib.models as models

    def no_space(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, message: \"No space left on device\" })")

    monkeypatch.setattr(models, "save_file", no_space)
    cfg = default_config("dact", encoder="tiny")
    cfg.data.max_rows, cfg.train.epochs, cfg.train.device = 120, 1, "cpu"
    tr = Tracker(home)
    with pytest.raises(DactLabError, match="No space left"):
        train(cfg.validate(), tracker=tr, home=home)
    (run,) = tr.list_runs()
    assert run["status"] == "failed" and "No space left on the device" in run["error"]
    assert not (Path(run["run_dir"]) / "model.safetensors").exists()
