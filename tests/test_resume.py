"""Resume: a run killed with -9 (during an epoch, at an epoch's end, during a checkpoint write) continues from its
last resume checkpoint and ends with the same metrics as the same run trained without interruption."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dact_lib.cli import main
from dact_lib.config import default_config
from dact_lib.errors import DactLabError
from dact_lib.models import load_model
from dact_lib.tracker import Tracker
from dact_lib.train import RESUME_FILE, train

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5  # same seed, same batches, same dropout masks: equal up to float summation order


def cfg_for(kind: str = "backbone", epochs: int = 4):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len = 120, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device, cfg.train.num_threads = epochs, 16, "cpu", 1
    cfg.train.early_stopping.enabled = False
    if kind == "dact":
        cfg.model.fit_halting = False
    return cfg.validate()


KILLER = """
import sys, time, json
sys.path.insert(0, {root!r})
from dact_lib.callbacks import Callback
from dact_lib.config import RunConfig
from dact_lib.tracker import Tracker
from dact_lib.train import train

where, at = {where!r}, {at!r}
class Pause(Callback):
    def on_step(self, state, logs):
        if where == "step" and state.step == at:
            print("ready", flush=True); time.sleep(120)
    def on_epoch_end(self, state, logs):
        if where == "epoch" and state.epoch == at:
            print("ready", flush=True); time.sleep(120)
cfg = RunConfig.from_dict(json.loads({cfg!r}))
tr = Tracker({home!r})
train(cfg, tracker=tr, home={home!r}, callbacks=[Pause()])
"""


def kill_during(home: Path, cfg, where: str, at: int) -> int:
    """Start the training in a child process, kill -9 it at ``where`` (step/epoch) ``at``; returns the run id."""
    script = KILLER.format(root=str(ROOT), where=where, at=at, cfg=json.dumps(cfg.to_dict()), home=str(home))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    (run,) = Tracker(home).list_runs()
    return run["id"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs, one per kind."""
    out = {}
    for kind in ("backbone", "dact", "multitask"):
        h = tmp_path_factory.mktemp(f"ref-{kind}")
        res = train(cfg_for(kind), tracker=Tracker(h), home=h)
        out[kind] = (h, res)
    return out


def val_losses(tr: Tracker, run_id: int) -> list[tuple[int, float]]:
    df = tr.get_metrics(run_id, names=["val_loss"])
    return [(int(s), float(v)) for s, v in zip(df["step"], df["value"])]


@pytest.mark.parametrize("kind, where, at", [("backbone", "epoch", 1), ("backbone", "step", 12), ("dact", "step", 20),
                                                ("multitask", "epoch", 2)])
def test_a_killed_run_resumes_to_the_same_metrics(reference, home, kind, where, at, capsys):
    ref_home, ref = reference[kind]
    cfg = cfg_for(kind)
    rid = kill_during(home, cfg, where, at)
    tr = Tracker(home)  # opening the tracker marks the dead run
    run = tr.get_run(rid)
    assert run["status"] == "interrupted"
    assert (Path(run["run_dir"]) / RESUME_FILE).is_file()
    # the interrupted run's best checkpoint is usable for prediction
    assert load_model(rid, home).model is not None

    assert main(["train", "--resume", str(rid), "--home", str(home)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"run id: {rid}"
    run = tr.get_run(rid)
    assert run["status"] == "finished" and not run.get("error")
    got, want = val_losses(tr, rid), val_losses(Tracker(ref_home), ref.run_id)
    assert [s for s, _ in got] == [s for s, _ in want]  # no step twice, none missing
    assert all(abs(a - b) <= TOL for (_, a), (_, b) in zip(got, want)), (got, want)
    best = run["summary"]["best"]
    for k, v in ref.best_metrics.items():
        if isinstance(v, float):
            assert abs(best[k] - v) <= TOL, k
    assert any(e["kind"] == "resumed" for e in tr.get_events(rid))
    assert not (Path(run["run_dir"]) / RESUME_FILE).exists()  # a finished run keeps no resume checkpoint


def test_a_resume_pt_of_an_older_dact_lab_still_resumes_to_the_same_metrics(reference, home, capsys):
    """An interrupted run of an older DACT Lab holds resume.pt (a torch pickle of the same state): it resumes —
    read by torch's restricted unpickler with numpy's arrays allowed — to the uninterrupted run's metrics, and the
    run then writes (and finally removes) resume.safetensors only."""
    import numpy as np
    import torch

    from dact_lib.train import LEGACY_RESUME_FILE, load_state_file

    ref_home, ref = reference["backbone"]
    rid = kill_during(home, cfg_for("backbone"), "epoch", 1)
    run_dir = Path(Tracker(home).get_run(rid)["run_dir"])
    state = load_state_file(run_dir / RESUME_FILE)
    assert isinstance(state["rng"]["numpy"][1], np.ndarray)  # what an older DACT Lab pickled, numpy array included
    torch.save(state, run_dir / LEGACY_RESUME_FILE)
    (run_dir / RESUME_FILE).unlink()

    assert main(["train", "--resume", str(rid), "--home", str(home)]) == 0
    capsys.readouterr()
    tr = Tracker(home)
    assert tr.get_run(rid)["status"] == "finished"
    got, want = val_losses(tr, rid), val_losses(Tracker(ref_home), ref.run_id)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) <= TOL for (_, a), (_, b) in zip(got, want)), (got, want)
    assert not (run_dir / LEGACY_RESUME_FILE).exists() and not (run_dir / RESUME_FILE).exists()


def test_resume_refuses_what_it_cannot_do(reference, home, capsys):
    ref_home, ref = reference["backbone"]
    assert main(["train", "--resume", str(ref.run_id), "--home", str(ref_home)]) == 3
    assert "is finished: only an interrupted" in capsys.readouterr().err
    tr = Tracker(home)
    rid = tr.create_run("backbone", cfg_for().to_dict(), status="interrupted")
    assert main(["train", "--resume", str(rid), "--home", str(home)]) == 3
    assert "no resume checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", str(rid), "--epochs", "9", "--home", str(home)]) == 3
    assert "drop --epochs" in capsys.readouterr().err


def test_job_manager_resumes_a_cancelled_run(home):
    from dact_lib.jobs import JobManager

    tr = Tracker(home)
    jm = JobManager(home)
    cfg = cfg_for(epochs=30)
    rid = jm.submit("backbone", cfg)
    import time

    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the first resume checkpoint
        run = tr.get_run(rid)
        if (Path(run["run_dir"]) / RESUME_FILE).is_file():
            break
        time.sleep(0.05)
    jm.cancel(rid)
    assert jm.wait(rid, 60) == "cancelled"
    steps_before = tr.last_steps([rid])[rid]
    assert jm.resume(rid) == rid
    assert jm.wait(rid, 120) == "finished"
    assert tr.get_run(rid)["status"] == "finished"
    assert tr.last_steps([rid])[rid] > steps_before
    with pytest.raises(DactLabError, match="is finished"):
        jm.resume(rid)


def test_resume_button_on_the_runs_page_and_predict_from_an_interrupted_run(home):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    rid = kill_during(home, cfg_for(), "epoch", 1)
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        at.run()
        # Predict offers the interrupted run's best checkpoint
        at.switch_page("app_pages/predict.py").run()
        assert not at.exception
        pick = at.selectbox(key="predict:run")
        assert any(f"#{rid}" in str(o) and "interrupted: its best checkpoint" in str(o) for o in pick.options), \
            pick.options
        at.switch_page("app_pages/runs.py").run()
        assert not at.exception
        at.selectbox(key="runs_focus").set_value(rid).run()
        at.button(key=f"runs_resume_{rid}").click().run()
        assert not at.exception and any("queued to resume" in s.value for s in at.success)
        from ui import state

        assert state.jobs().wait(rid, 120) == "finished"
        assert Tracker(home).get_run(rid)["status"] == "finished"
        at.run()
        assert not any(b.key == f"runs_resume_{rid}" for b in at.button)  # a finished run offers no resume
    finally:
        from ui import state

        try:
            state.jobs().shutdown()
        except Exception:  # noqa: BLE001
            pass
        st.cache_resource.clear()


def integrity_ok(home: Path) -> bool:
    import sqlite3

    con = sqlite3.connect(str(home / "experiments.db"))
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


def test_kill_during_a_dataset_insert_leaves_the_database_whole(home):
    """kill -9 while a process stores datasets in a loop: every stored dataset reads back whole, and the
    database passes its integrity check."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from dact_lib.data import read_csv
from dact_lib.tracker import Tracker
tr = Tracker({str(home)!r})
rows = "".join(f"sentence number {{i}} with some words,{{'abc'[i % 3]}}\\n" for i in range(20000))
i = 0
while True:
    tr.add_dataset(read_csv(("text,label\\n" + rows + f"last {{i}},a\\n").encode()), name=f"d{{i}}")
    if i == 1:
        print("ready", flush=True)
    i += 1
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(0.3)  # somewhere inside the next inserts
    finally:
        proc.kill()
        proc.wait()
    assert integrity_ok(home)
    tr = Tracker(home)
    stored = tr.list_datasets()
    assert len(stored) >= 2
    for d in stored:
        ds = tr.load_dataset(d["id"])
        assert len(ds) == 20001  # whole, never half a dataset


def test_a_pipeline_killed_between_stages_resumes_and_finishes(home, capsys):
    from optuna.trial import TrialState

    from dact_lib.tuning import studies

    argv = ["dact-pipeline", "--encoder", "tiny", "--max-rows", "150", "--trials", "2", "--lambdas-trials", "3",
            "--min-steps", "10", "--guards", "warn", "--name", "kp", "--device", "cpu", "--home", str(home)]
    proc = subprocess.Popen([sys.executable, "-m", "dact_lib", *argv], cwd=str(ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 300
    try:
        while time.time() < deadline and not list((home / "runs").glob("*/stage1.json")):
            assert proc.poll() is None, "the pipeline ended before stage 1 was recorded"
            time.sleep(0.05)
        assert list((home / "runs").glob("*/stage1.json")), "stage 1 never finished"
    finally:
        proc.kill()  # right after stage 1: inside stage 2's first trial, or between the stages
        proc.wait()
    assert integrity_ok(home)
    assert main(argv) == 0
    out = capsys.readouterr()
    tr = Tracker(home)
    (parent,) = tr.list_runs(kind="dact-pipeline")
    assert parent["status"] == "finished"
    resumed = [e["payload"] for e in tr.get_events(parent["id"]) if e["kind"] == "resumed"]
    assert resumed and "stage1" in resumed[-1]["stages_done"]  # stage 1 was not run again
    for stage in ("stage2", "stage3"):
        import optuna

        study = optuna.load_study(study_name=f"kp/{stage}", storage=studies.storage(home))
        assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    assert not [r for r in tr.list_runs() if r["status"] in ("running", "queued")]
    assert "run id: " in out.out


def test_a_killed_pbt_run_resumes_its_members(home, capsys):
    """kill -9 a PBT run once members have checkpoints; `pbt --resume P` finishes every member, continuing the
    checkpointed ones (their steps go on from the checkpoint: no metric step twice), and records the lineage."""
    argv = ["pbt", "--encoder", "tiny", "--max-rows", "160", "--population", "2", "--epochs", "6",
            "--device", "cpu", "--home", str(home)]
    proc = subprocess.Popen([sys.executable, "-m", "dact_lib", *argv], cwd=str(ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(list((home / "runs").glob(f"*/{RESUME_FILE}"))) < 2:
            assert proc.poll() is None, "PBT ended before its members wrote checkpoints"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    tr = Tracker(home)
    (parent,) = tr.list_runs(kind="pbt")
    assert parent["status"] == "interrupted"
    members = tr.list_runs(parent_id=parent["id"])
    checkpoints = {m["id"]: torch_load_step(Path(m["run_dir"]) / RESUME_FILE) for m in members
                   if (Path(m["run_dir"]) / RESUME_FILE).is_file()}
    assert checkpoints and all(s > 0 for s in checkpoints.values())

    assert main(["pbt", "--resume", str(parent["id"]), "--home", str(home)]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[0] == f"parent run id: {parent['id']}"
    assert tr.get_run(parent["id"])["status"] == "finished"
    for m in tr.list_runs(parent_id=parent["id"]):
        assert m["status"] == "finished"
        df = tr.get_metrics(m["id"])
        assert not df.duplicated(["step", "name"]).any()  # continued, not logged twice
        if m["id"] in checkpoints:
            ev = [e["payload"] for e in tr.get_events(m["id"]) if e["kind"] == "resumed"]
            assert ev and ev[0]["step"] == checkpoints[m["id"]]
    assert main(["pbt", "--resume", str(parent["id"]), "--home", str(home)]) == 3
    assert "is finished" in capsys.readouterr().err


def torch_load_step(path: Path) -> int:
    from dact_lib.train import load_state_file

    return int(load_state_file(path)["step"])


def test_a_run_killed_before_its_first_evaluation_resumes_from_a_timed_checkpoint(reference, home, capsys):
    """Issue 27: a run killed before its first evaluation could not resume ("train it again"): on a long first epoch
    that was the whole epoch lost. train.resume_every_min writes a resume checkpoint between evaluations; with the
    training metrics' running sums, so the resumed run logs the same train_loss rows as the uninterrupted one."""
    ref_home, ref = reference["backbone"]
    cfg = cfg_for("backbone")
    cfg.train.resume_every_min = 1e-9  # after every step (the reference: never between evaluations)
    rid = kill_during(home, cfg, "step", 4)  # an epoch is 6 steps: before the first evaluation
    tr = Tracker(home)
    run = tr.get_run(rid)
    assert run["status"] == "interrupted" and (Path(run["run_dir"]) / RESUME_FILE).is_file()
    assert val_losses(tr, rid) == []  # no evaluation yet
    assert main(["train", "--resume", str(rid), "--home", str(home)]) == 0
    capsys.readouterr()
    run = tr.get_run(rid)
    assert run["status"] == "finished"
    got, want = val_losses(tr, rid), val_losses(Tracker(ref_home), ref.run_id)
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(a - b) <= TOL for (_, a), (_, b) in zip(got, want)), (got, want)

    def train_losses(t, r):
        df = t.get_metrics(r, names=["train_loss"])
        return [(int(s), float(v)) for s, v in zip(df["step"], df["value"])]

    # rows logged after the interruption (the killed process's step-1 row may not have reached the database)
    got = [(s, v) for s, v in train_losses(tr, rid) if s > 4]
    want = [(s, v) for s, v in train_losses(Tracker(ref_home), ref.run_id) if s > 4]
    assert [s for s, _ in got] == [s for s, _ in want] and got
    assert all(abs(a - b) <= TOL for (_, a), (_, b) in zip(got, want)), (got, want)


def test_resume_every_min_is_validated():
    from dact_lib.errors import ConfigError

    cfg = cfg_for("backbone")
    cfg.train.resume_every_min = -1
    with pytest.raises(ConfigError, match="resume_every_min"):
        cfg.validate()
