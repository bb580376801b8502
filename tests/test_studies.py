"""Shared Optuna plumbing: storage in the home, listing studies, the pruning callback, trial <-> run links."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from dact_lib.callbacks import LoopState
from dact_lib.home import optuna_storage_url
from dact_lib.tracker import Tracker
from dact_lib.tuning.studies import (PruningCallback, create_study, link_study, link_trial, list_studies, storage,
                                     study_of_run, trial_runs)


class PruneAfterFirstReport(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= 0


def test_storage_is_the_home_database(home):
    st = storage(home)
    assert st.url == optuna_storage_url(home) == f"sqlite:///{home / 'experiments.db'}"
    assert storage(home) is st  # one per process and URL
    Tracker(home)  # the tracker's tables live in the same file
    assert (home / "experiments.db").exists()
    assert list_studies(home) == []


def test_list_single_objective_study(home):
    study = create_study("single", directions=["minimize"], home=home, user_attrs={"parent_run_id": 7})
    study.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2, n_trials=4)
    t = study.ask()
    t.report(5.0, 0)
    study.tell(t, state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)
    again = create_study("single", directions=["minimize"], home=home)  # load_if_exists
    again.ask()  # left running (reopening the study now would fail it: its parent run 7 is not active)
    assert len(again.trials) == 7

    (row,) = list_studies(home)
    assert row["name"] == "single" and row["storage_url"] == optuna_storage_url(home)
    assert row["directions"] == ["minimize"] and row["n_trials"] == 7
    assert row["trials"] == {"complete": 4, "pruned": 1, "fail": 1, "running": 1, "waiting": 0}
    assert row["best_value"] == pytest.approx(study.best_value)
    assert row["best_params"] == study.best_params and row["best_trial"] == study.best_trial.number
    assert row["parent_run_id"] == 7 and row["user_attrs"]["parent_run_id"] == 7
    assert row["n_pareto"] is None and row["pareto"] is None


def test_list_multi_objective_study(home):
    study = optuna.create_study(study_name="multi", storage=optuna_storage_url(home),
                                directions=["minimize", "minimize"])
    for x in (0.0, 0.5, 0.8, 1.0):  # (x, |x - 0.8|): x = 1 is dominated by x = 0.8
        study.enqueue_trial({"x": x})
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), abs(t.params["x"] - 0.8)), n_trials=4)
    create_study("empty", directions=["maximize"], home=home)

    rows = {r["name"]: r for r in list_studies(home)}
    multi = rows["multi"]
    assert multi["directions"] == ["minimize", "minimize"] and multi["best_value"] is None
    assert multi["n_pareto"] == len(study.best_trials) == 3
    assert sorted(p["params"]["x"] for p in multi["pareto"]) == [0.0, 0.5, 0.8]
    assert sorted(tuple(p["values"]) for p in multi["pareto"]) == sorted(tuple(t.values) for t in study.best_trials)
    assert all(set(p) == {"number", "values", "params", "run_id"} for p in multi["pareto"])
    empty = rows["empty"]
    assert empty["n_trials"] == 0 and empty["best_value"] is None and empty["directions"] == ["maximize"]


def test_pruning_callback_reports_val_metric_and_prunes(home):
    study = create_study("prune", directions=["minimize"], home=home, pruner=PruneAfterFirstReport())
    trial = study.ask()
    cb = PruningCallback(trial, "val_loss")
    cb.on_eval(LoopState(), {"test_loss": 0.1, "test_accuracy": 0.9})  # test evaluation: ignored
    assert study.trials[0].intermediate_values == {}
    with pytest.raises(optuna.TrialPruned):
        cb.on_eval(LoopState(epoch=0), {"val_loss": 0.7, "val_accuracy": 0.5})
    assert study.trials[0].intermediate_values == {0: 0.7} and cb.pruned_at == 0


def test_pruning_callback_steps_are_evaluation_indices(home):
    study = create_study("noprune", directions=["minimize"], home=home, pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    cb = PruningCallback(trial, "val_accuracy")
    for epoch, acc in enumerate((0.5, 0.6, float("nan"))):
        cb.on_eval(LoopState(epoch=epoch), {"val_loss": 1.0, "val_accuracy": acc})
    assert study.trials[0].intermediate_values == {0: 0.5, 1: 0.6, 2: float("inf")}  # NaN reported as the worst
    multi = create_study("multi", directions=["minimize", "minimize"], home=home)
    PruningCallback(multi.ask()).on_eval(LoopState(), {"val_loss": 1.0})  # multi-objective: nothing to prune


def test_pruned_trial_through_the_loop_is_recorded_pruned(home):
    from dact_lib.config import default_config
    from dact_lib.train import train

    cfg = default_config("backbone", encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs, cfg.train.device = 120, 32, 2, "cpu"
    tracker = Tracker(home)
    study = create_study("loop", directions=["minimize"], home=home, pruner=PruneAfterFirstReport())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        train(cfg, tracker=tracker, home=home, callbacks=[PruningCallback(trial)])
    run = tracker.list_runs()[0]
    assert run["status"] == "pruned" and "TrialPruned" in run["error"]
    assert set(tracker.get_metrics(run["id"])["epoch"].dropna()) == {0}  # stopped after the first epoch


def test_trial_and_study_links(home):
    tracker = Tracker(home)
    parent = tracker.create_run("tune-backbone", {"x": 1})
    child = tracker.create_run("backbone", {}, parent_id=parent)
    study = create_study("links", directions=["minimize"], home=home)
    link_study(tracker, parent, study, home)
    trial = study.ask()
    link_trial(trial, child, parent)
    study.tell(trial, 1.0)
    assert trial_runs("links", home) == {0: child} == trial_runs(study)
    assert study.trials[0].user_attrs == {"run_id": child, "parent_run_id": parent}
    assert study.user_attrs["parent_run_id"] == parent
    assert tracker.get_run(parent)["summary"]["study_name"] == "links"
    assert study_of_run(tracker, parent) == study_of_run(tracker, child) == "links"
    assert [e["payload"]["study_name"] for e in tracker.get_events(parent, kinds=["study"])] == ["links"]


def test_has_studies_is_read_only_and_start_dashboard_serves_the_home(home):
    import urllib.request

    from dact_lib.home import db_path
    from dact_lib.tuning import dashboard_server, studies

    assert not studies.has_studies(home) and not db_path(home).exists()  # asking created nothing
    studies.create_study("probe", directions=["minimize"], home=home)
    assert studies.has_studies(home)
    srv = dashboard_server.start_dashboard(home, wait_s=30)
    try:
        assert srv["up"], open(srv["log"]).read()[-2000:]
        # its log is kept in the home (it used to be written to the working directory, the project root)
        assert Path(srv["log"]) == Path(home) / ".optuna_dashboard.log" and Path(srv["log"]).is_file()
        assert dashboard_server.start_dashboard(home)["proc"] is srv["proc"]  # one server per process and storage
        assert dashboard_server.dashboard(home) is srv
        with urllib.request.urlopen(f"http://127.0.0.1:{srv['port']}/api/studies", timeout=10) as r:
            assert b"probe" in r.read()
    finally:
        srv["proc"].terminate()
        srv["proc"].wait(timeout=10)
    assert dashboard_server.dashboard(home) is None


# --- the studies the tiny engines made (tests/records.py, built once per session) --------------------------------


def test_engine_studies_are_listed_with_their_counts_best_values_and_runs(tmp_path_factory):
    from records import engine_records

    rec = engine_records(tmp_path_factory)
    tracker = Tracker(rec.home)
    url = optuna_storage_url(rec.home)
    rows = {r["name"]: r for r in list_studies(rec.home)}
    assert sorted(rows) == rec.studies == sorted([rec.tune_study, "pipe/stage1", "pipe/stage2", "pipe/stage3"])
    for name, row in rows.items():
        study = optuna.load_study(study_name=name, storage=url)
        states = [t.state.name.lower() for t in study.trials]
        assert row["n_trials"] == len(study.trials) > 0
        assert {k: v for k, v in row["trials"].items() if v} == {s: states.count(s) for s in set(states)}
        assert row["parent_run_id"] == (rec.tune if name == rec.tune_study else rec.pipeline)

    # backbone tuning: one objective; every trial is a child run of the tuning run, tagged with its number
    study = optuna.load_study(study_name=rec.tune_study, storage=url)
    tune = rows[rec.tune_study]
    assert tune["best_value"] == pytest.approx(study.best_value) and tune["best_trial"] == study.best_trial.number
    assert tune["best_run_id"] == study.best_trial.user_attrs["run_id"] and tune["best_params"] == study.best_params
    links = trial_runs(rec.tune_study, rec.home)
    children = {r["id"]: r for r in tracker.list_runs(parent_id=rec.tune)}
    assert sorted(links) == [t.number for t in study.trials]
    assert {n: (children[rid]["tag"], children[rid]["status"]) for n, rid in links.items()} == {
        t.number: (f"trial {t.number}", {"COMPLETE": "finished", "PRUNED": "pruned"}[t.state.name])
        for t in study.trials}
    assert study_of_run(tracker, rec.tune) == rec.tune_study == study_of_run(tracker, links[0])

    # the pipeline's stage 3: two objectives, its Pareto-optimal trials (they share the stage-2 model's run)
    stage3 = optuna.load_study(study_name="pipe/stage3", storage=url)
    s3 = rows["pipe/stage3"]
    assert s3["directions"] == ["minimize", "minimize"] and s3["best_value"] is None
    assert s3["n_pareto"] == len(stage3.best_trials) >= 1
    assert [(p["number"], p["values"], p["run_id"]) for p in s3["pareto"]] == [
        (t.number, t.values, t.user_attrs["run_id"]) for t in sorted(stage3.best_trials, key=lambda t: t.number)]
    assert study_of_run(tracker, rec.pipeline) == "pipe/stage3"


def test_run_slots_waits_for_foreign_trials_at_timeout_and_never_runs_an_unslotted_trial(monkeypatch):
    """The engine side of a slotted study (studies.run_slots): past the deadline the slots left are dropped and the
    trials other processes still run are waited for (a late result could otherwise land after the stage chose its
    best); a trial ask() creates because a worker took the last slot first is recorded FAIL, not run."""
    import threading
    import time

    from dact_lib.callbacks import CancelToken
    from dact_lib.tuning import studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    studies.enqueue_slots(study, 2, parent=1)
    foreign = study.ask()  # a worker's trial, running
    threading.Timer(0.6, lambda: study.tell(foreign, 0.5)).start()
    ran = []
    why = studies.run_slots(study, lambda t: ran.append(t.number), local_trials=0, deadline=time.monotonic() - 1,
                            cancel=CancelToken(), server=False, poll_s=0.05)
    assert why == "timeout" and ran == []
    states = {t.number: t.state for t in study.trials}
    assert states[foreign.number] == TrialState.COMPLETE  # waited for, not abandoned
    assert [t.user_attrs.get("skipped") for t in study.trials if t.number != foreign.number] == ["time budget reached"]

    # the race: waiting() said a slot was there, a worker took it before ask()
    study = optuna.create_study()
    real = studies.waiting
    looks = iter([[object()], [object()]])  # the two looks of one round
    monkeypatch.setattr(studies, "waiting", lambda s: next(looks, None) or real(s))
    studies.run_slots(study, lambda t: ran.append(t.number), local_trials=None, deadline=None,
                      cancel=CancelToken(), server=False, poll_s=0.01)
    assert ran == [] and [(t.state, t.user_attrs.get("skipped")) for t in study.trials] == [
        (TrialState.FAIL, "no slot left")]


def test_the_dashboard_survives_the_end_of_the_thread_that_started_it(home):
    """Defect (issue 28): "Open in optuna-dashboard" was a dead link — the server had Linux's parent-death signal,
    which fires when the *thread* that started it ends (a Streamlit page's script thread ends with every rerun).
    Started from a thread that then ends, the server still answers after its parent-pid poll has run."""
    import threading
    import time
    import urllib.request

    from dact_lib.tuning import dashboard_server, studies

    studies.create_study("probe", directions=["minimize"], home=home)
    started: dict = {}
    t = threading.Thread(target=lambda: started.update(srv=dashboard_server.start_dashboard(home, wait_s=60)))
    t.start()
    t.join()
    srv = started["srv"]
    try:
        assert srv["up"], open(srv["log"]).read()[-2000:]
        # the death signal is sent at once when the thread ends; the server's parent poll runs every second:
        # several of its rounds later the server still runs and answers
        time.sleep(3 * 1.0 + 0.5)
        assert srv["proc"].poll() is None, open(srv["log"]).read()[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{srv['port']}/api/studies", timeout=30) as r:
            assert b"probe" in r.read()
    finally:
        srv["proc"].terminate()
        srv["proc"].wait(timeout=30)
