"""Beyond one machine: a backbone study on PostgreSQL whose trials run in worker processes (``python -m dact_lib
worker``), one of them killed mid-trial; the tracker rows of both workers in the server database; the Runs page.

Needs a real PostgreSQL server (tests/pg_server.py starts a throw-away cluster; the test skips with the reason on a
machine without PostgreSQL, never in CI)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dact_lib.config import default_config
from dact_lib.tracker import Tracker
from dact_lib.tuning.backbone import BackboneSpace, tune_backbone

ROOT = Path(__file__).resolve().parent.parent

# a worker that completes its first trial, then stalls in the first step of its second one (so it can be killed
# mid-trial); the stall is the test's own callback, not library code
STALLING_WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from dact_lib.callbacks import Callback
    from dact_lib.tuning.worker import run_worker

    class StallInSecondTrial(Callback):
        trials = 0
        def on_start(self, state):
            StallInSecondTrial.trials += 1
        def on_step(self, state, logs):
            if StallInSecondTrial.trials >= 2:
                time.sleep(600)

    run_worker(sys.argv[1], home=sys.argv[2], callbacks=[StallInSecondTrial()], wait_s=120)
""")


def tiny_cfg():
    cfg = default_config("backbone", encoder="tiny")
    cfg.data.max_rows = 160
    cfg.data.max_seq_len = 32
    cfg.train.device = "cpu"
    cfg.train.log_every_steps = 1
    cfg.name = "scale-out"
    return cfg.validate()


def _env(url: str, home: Path) -> dict:
    return {**os.environ, "DACT_LAB_DB": url, "DACT_LAB_HOME": str(home), "DACT_LAB_HEARTBEAT_S": "1",
            "DACT_LAB_GRACE_S": "3", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.timeout(420)
def test_two_workers_share_a_study_on_postgresql_and_a_killed_trial_is_retried(pg_url, home, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("DACT_LAB_HEARTBEAT_S", "1")
    monkeypatch.setenv("DACT_LAB_GRACE_S", "3")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, n_trials = "scale-out-6", 6
    result: dict = {}

    def driver():  # starts the study and its parent run, runs no trial itself, waits for the workers
        try:
            result["res"] = tune_backbone(tiny_cfg(), trials=n_trials, study_name=name, home=home, final=False,
                                          space=BackboneSpace(epochs=[2, 2], batch_size=[16, 32]),
                                          local_trials=0, poll_s=0.3)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    drv = threading.Thread(target=driver, daemon=True)
    drv.start()
    script = tmp_path / "stalling_worker.py"
    script.write_text(STALLING_WORKER.format(root=str(ROOT)))
    env = _env(pg_url, home)
    stalling = subprocess.Popen([sys.executable, str(script), name, str(home)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = subprocess.Popen([sys.executable, "-m", "dact_lib", "worker", "--study", name, "--home", str(home),
                               "--db", pg_url, "--wait-s", "120"], env={**env, "DACT_LAB_DB": ""}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        study = _wait(lambda: _study(name), 120, "the study")
        tag = f":{stalling.pid}"

        def stalled_trial():
            done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                    if str(t.user_attrs.get("worker", "")).endswith(tag)]
            running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if str(t.user_attrs.get("worker", "")).endswith(tag)]
            return running[0] if done and running and running[0].user_attrs.get("run_id") else None

        victim = _wait(stalled_trial, 240, "the stalling worker's second trial")
        os.kill(stalling.pid, signal.SIGKILL)  # killed mid-trial
        stalling.wait(30)
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        drv.join(120)
        assert not drv.is_alive() and "error" not in result, result.get("error")
    finally:
        for p in (stalling, worker):
            if p.poll() is None:
                p.kill()

    res = result["res"]
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    finished = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    # the killed trial failed (its heartbeat stopped) and came back as a retry with the same parameters
    assert [t.number for t in by_state[TrialState.FAIL]] == [victim.number]
    retries = [t for t in finished if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    # every trial ran exactly once: one tracker run per trial, each finished by exactly one worker
    tracker = Tracker(home)  # opening it marks the killed worker's run interrupted (its process is gone)
    assert tracker.dialect == "postgresql"
    runs = {r["id"]: r for r in tracker.list_runs(parent_id=res.parent_run_id)}
    run_of = [t.user_attrs["run_id"] for t in finished]
    assert len(set(run_of)) == n_trials and all(runs[r]["status"] in ("finished", "pruned") for r in run_of)
    assert runs[victim.user_attrs["run_id"]]["status"] == "interrupted"
    trial_numbers = [e["payload"]["number"] for r in runs.values() for e in tracker.get_events(r["id"], ["trial"])]
    assert sorted(trial_numbers) == sorted(t.number for t in finished + [victim])
    # both workers' rows are in PostgreSQL: each ran trials, recorded with its pid
    workers = {str(t.user_attrs["worker"]).rsplit(":", 1)[1] for t in finished}
    assert workers == {str(stalling.pid), str(worker.pid)}
    pids = {int(r["pid"]) for r in runs.values()}
    assert {stalling.pid, worker.pid} <= pids
    assert len(tracker.get_metrics(run_of)) > 0
    # the driver's result lists every trial of its study (the workers'), and the parent run finished
    assert sorted(r["number"] for r in res.trials) == sorted(t.number for t in trials)
    assert tracker.get_run(res.parent_run_id)["status"] == "finished"
    assert res.best_value == pytest.approx(min(t.value for t in by_state[TrialState.COMPLETE]))

    # the Runs page, on the same server database, shows the workers' runs
    from streamlit.testing.v1 import AppTest
    import streamlit as st

    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("app_pages/runs.py").run()
    assert not at.exception, at.exception
    shown = set()
    for df in at.dataframe:
        if "id" in df.value.columns:
            shown |= set(int(i) for i in df.value["id"])
    assert set(run_of) <= shown, (sorted(run_of), sorted(shown))
    st.cache_resource.clear()


def _study(name: str):
    from dact_lib.tuning import studies

    try:
        study = optuna.load_study(study_name=name, storage=studies.storage())
    except KeyError:
        return None
    return study if study.user_attrs.get("parent_run_id") else None


def test_worker_refuses_an_unknown_study_and_a_pipeline_stage_it_does_not_run(home, pg_url):
    from dact_lib.errors import DactLabError
    from dact_lib.tuning import studies
    from dact_lib.tuning.worker import run_worker

    with pytest.raises(DactLabError, match="no study named 'nope'"):
        run_worker("nope", home=home)
    studies.create_study("p-stage1", directions=["minimize"], home=home, user_attrs={"stage": "stage1"})
    with pytest.raises(DactLabError, match="workers run the trials of tune-backbone, dact-pipeline/stage2, "
                                           "dact-pipeline/stage3 studies"):
        run_worker("p-stage1", home=home)


@pytest.mark.timeout(420)
def test_workers_run_the_pipelines_stage2_and_stage3_trials_on_postgresql(pg_url, home, monkeypatch):
    """The DACT pipeline with stage2_local_trials = stage3_local_trials = 0: its process runs stage 1 and the final
    model, worker processes run every stage-2 and stage-3 trial (each exactly once), and the pipeline builds on
    the workers' results (stage 2's best trial as the trunk, stage 3's front and choice)."""
    from test_dact_pipeline import tiny_cfg as pipe_cfg, tiny_pipe

    from dact_lib.tuning import studies
    from dact_lib.tuning.dact_pipeline import run_pipeline, stage2, stage3

    monkeypatch.setattr(stage2, "POLL_S", 0.3)
    monkeypatch.setattr(stage3, "POLL_S", 0.3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, n2, n3 = "spread-pipe", 3, 5
    result: dict = {}

    def driver():
        try:
            result["res"] = run_pipeline(pipe_cfg(), pipeline=tiny_pipe(name, trials=(2, n2, n3),
                                                                        stage2_local_trials=0,
                                                                        stage3_local_trials=0), home=home)
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc

    drv = threading.Thread(target=driver, daemon=True)
    drv.start()
    env = _env(pg_url, home)
    workers = {stage: subprocess.Popen([sys.executable, "-m", "dact_lib", "worker", "--study", f"{name}/{stage}",
                                        "--home", str(home), "--db", pg_url, "--wait-s", "300"], env=env, cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for stage in ("stage2", "stage3")}
    try:
        for p in workers.values():
            out, err = p.communicate(timeout=360)
            assert p.returncode == 0, err[-3000:]
        drv.join(240)
        assert not drv.is_alive() and "error" not in result, result.get("error")
    finally:
        for p in workers.values():
            if p.poll() is None:
                p.kill()
    res = result["res"]
    tracker = Tracker(home)
    for stage, n in (("stage2", n2), ("stage3", n3)):
        study = optuna.load_study(study_name=f"{name}/{stage}", storage=studies.storage())
        done = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == n and not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
        assert {str(t.user_attrs.get("worker", "")).rsplit(":", 1)[-1] for t in done} == {str(workers[stage].pid)}
        # the pipeline's record names the worker's trials (one 'trial' event each)
        events = [e["payload"] for e in tracker.get_events(res.parent_run_id, ["trial"])
                  if e["payload"].get("stage") == stage]
        assert sorted(e["number"] for e in events) == sorted(t.number for t in done)
        if stage == "stage2":
            assert done[0].user_attrs.get("start") == "run config"  # trial 0: the run config's own values
            runs = {r["id"]: r for r in tracker.list_runs(parent_id=res.parent_run_id)}
            assert all(runs[t.user_attrs["run_id"]]["pid"] == workers[stage].pid for t in done)
            st2 = json.loads((tracker.run_dir(res.parent_run_id) / "stage2.json").read_text())
            assert st2["best_trial"] == study.best_trial.number
            assert st2["best_run_id"] == study.best_trial.user_attrs["run_id"]
        else:  # the grid's λ points first (fitted by the worker on its own cache of the trunk's outputs)
            assert [t.params["halting"] for t in done[:3]] == ["fitted"] * 3
            assert {t.user_attrs["run_id"] for t in done} == {st2["best_run_id"]}
            assert res.pareto and res.chosen.trial in {t.number for t in done}
    assert tracker.get_run(res.parent_run_id)["status"] == "finished" and res.final_run_id is not None


def test_unsupported_database_url_names_the_supported_ones(home):
    from dact_lib.errors import DactLabError

    with pytest.raises(DactLabError, match="postgresql://user@host"):
        Tracker(home, db="mysql://u@h/db")
    masked = Tracker(home, db=str(home / "other.db"))
    assert masked.dialect == "sqlite" and masked.db_path == (home / "other.db").resolve()


def test_server_url_without_the_server_says_what_to_check(home):
    from dact_lib.errors import DactLabError

    pytest.importorskip("psycopg")
    with pytest.raises(DactLabError, match="is the server running"):
        Tracker(home, db="postgresql://nobody:secret@127.0.0.1:1/none")
    try:
        Tracker(home, db="postgresql://nobody:secret@127.0.0.1:1/none")
    except DactLabError as exc:
        assert "secret" not in str(exc)  # the password is never shown


def test_database_url_resolution_masking_and_types(home, monkeypatch):
    from dact_lib.tracker import db

    monkeypatch.delenv("DACT_LAB_DB", raising=False)
    from dact_lib import home as home_mod

    assert db.resolve_url(None, home) == f"sqlite:///{home_mod.db_path(home)}"  # the same file the home names
    assert db.DB_NAME == home_mod.DB_NAME
    monkeypatch.setenv("DACT_LAB_DB", "postgresql://u:pw@h:5433/x")
    assert db.resolve_url(None, home) == "postgresql://u:pw@h:5433/x"
    assert db.resolve_url("postgres://u@h/x", home) == "postgres://u@h/x" and db.dialect("postgres://u@h/x") == "postgresql"
    assert db.mask("postgresql://u:pw@h:5433/x") == "postgresql://u:***@h:5433/x"
    assert db.optuna_url("postgresql://u@h/x") == "postgresql+psycopg://u@h/x"
    assert db.libpq_url("postgresql+psycopg://u@h/x") == "postgresql://u@h/x"
    assert db.column_type("INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql") == "BIGSERIAL PRIMARY KEY"
    assert db.column_type("REAL", "postgresql") == "DOUBLE PRECISION"  # not float4: timestamps keep their µs
    assert db.column_type("TEXT UNIQUE", "postgresql") == "TEXT UNIQUE" and db.column_type("BLOB", "postgresql") == "BYTEA"
    assert db.column_type("REAL", "sqlite") == "REAL"


def test_home_studies_and_artifacts_follow_the_database(home, pg_url, tmp_path, monkeypatch):
    from dact_lib import home as home_mod
    from dact_lib.tuning import studies

    assert home_mod.optuna_storage_url(home).startswith("postgresql+psycopg://")
    assert not studies.has_studies(home)
    studies.create_study("s1", directions=["minimize"], home=home)
    assert studies.has_studies(home) and [r["name"] for r in studies.list_studies(home)] == ["s1"]
    shared = tmp_path / "shared-artifacts"
    monkeypatch.setenv("DACT_LAB_ARTIFACTS", str(shared))
    tr = Tracker(home)
    rid = tr.create_run("backbone", None)
    assert tr.run_dir(rid) == shared / "runs" / str(rid) and tr.get_run(rid)["run_dir"] == str(shared / "runs" / str(rid))
    tr.delete_run(rid, force=True)
    assert not (shared / "runs" / str(rid)).exists()


def test_cli_db_command_on_postgresql(home, pg_url, capsys):
    from dact_lib.cli import main

    assert main(["db", "--home", str(home), "--db", pg_url, "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["dialect"] == "postgresql" and info["tables"]["runs"] == 0
    assert main(["db", "--home", str(home), "--db", "mysql://x/y"]) == 3
    assert "postgresql://user@host" in capsys.readouterr().err
