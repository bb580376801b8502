"""Seed 000's backbone study: trials as child runs, pruning, cancellation, timeout, the final run, the space."""
from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState
from safetensors.torch import load_file

from dact_lib.callbacks import Callback, CancelToken
from dact_lib.config import default_config
from dact_lib.errors import Cancelled, ConfigError
from dact_lib.home import optuna_storage_url
from dact_lib.tracker import Tracker
from dact_lib.tuning.backbone import BackboneSpace, tune_backbone

FAST = dict(epochs=[1, 2], batch_size=[16, 32])


def tiny_cfg(kind="backbone"):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.device = "cpu"
    cfg.train.log_every_steps = 2
    return cfg.validate()


class PruneAfterFirstReport(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.last_step is not None and trial.last_step >= 0


def test_study_trials_final_run_and_dact_from_it(home):
    tracker = Tracker(home)
    seen = []
    res = tune_backbone(tiny_cfg(), trials=3, space=BackboneSpace(**FAST), home=home, tracker=tracker,
                        on_trial=seen.append)
    study = optuna.load_study(study_name=res.study_name, storage=optuna_storage_url(home))
    assert len(study.trials) == 3 and res.study_name == f"tune-backbone-{res.parent_run_id}"
    assert res.storage_url == optuna_storage_url(home)
    assert [r["number"] for r in seen] == [0, 1, 2] and res.trials == seen

    parent = tracker.get_run(res.parent_run_id)
    assert parent["kind"] == "tune-backbone" and parent["status"] == "finished"
    assert parent["config"]["study_name"] == res.study_name and parent["config"]["trials"] == 3
    assert parent["config"]["space"]["epochs"] == [1, 2] and parent["config"]["run"]["encoder"] == "tiny"
    states = [t.state.name.lower() for t in study.trials]  # the default MedianPruner may prune the third
    assert parent["summary"]["final_run_id"] == res.final_run_id
    assert parent["summary"]["trials"] == {s: states.count(s) for s in set(states)}
    assert study.user_attrs["parent_run_id"] == res.parent_run_id

    children = tracker.list_runs(parent_id=res.parent_run_id)
    trials = sorted((r for r in children if r["tag"] != "final"), key=lambda r: r["id"])
    assert [r["tag"] for r in trials] == ["trial 0", "trial 1", "trial 2"]
    assert [r["status"] for r in trials] == [{"complete": "finished", "pruned": "pruned"}[s] for s in states]
    assert all(r["kind"] == "backbone" for r in trials)
    assert [t.user_attrs["run_id"] for t in study.trials] == [r["id"] for r in trials]
    for t, r in zip(study.trials, trials):  # the trial's parameters are the child's config
        assert r["config"]["train"]["encoder_lr"] == pytest.approx(t.params["lr"])
        assert r["config"]["train"]["epochs"] == t.params["epochs"]
        assert "val_loss" in set(tracker.get_metrics(r["id"])["name"])
        assert not (home / "runs" / str(r["id"])).exists()  # trial weights are never written
    values = tracker.get_metrics(res.parent_run_id, names=["trial_value"])
    assert list(values["step"]) == [0, 1, 2]
    assert list(values["value"]) == pytest.approx([t.value for t in study.trials])
    assert [e["payload"]["number"] for e in tracker.get_events(res.parent_run_id, kinds=["trial"])] == [0, 1, 2]

    assert res.best_value == pytest.approx(study.best_value) and res.best_params == study.best_params
    final = tracker.get_run(res.final_run_id)
    assert final["tag"] == "final" and final["kind"] == "backbone" and final["status"] == "finished"
    assert final["parent_id"] == res.parent_run_id and final["dataset_id"] == parent["dataset_id"] is not None
    assert final["config"]["train"]["batch_size"] == res.best_params["batch_size"]
    exported = home / "runs" / str(res.final_run_id) / "encoder.safetensors"
    assert exported.exists()

    # a DACT run starts from the final run's encoder
    from dact_lib.models import build_model
    from dact_lib.train import train

    dcfg = tiny_cfg("dact")
    dcfg.init_from_run = str(res.final_run_id)
    dcfg.train.epochs = 1
    model, _ = build_model(dcfg, {"label": ["a", "b"]}, home)
    weights = load_file(str(exported))
    for name, tensor in model.encoder.state_dict().items():
        if name in weights:
            assert torch.equal(tensor, weights[name]), name
    out = train(dcfg, tracker=tracker, home=home)
    assert out.status == "finished" and tracker.get_run(out.run_id)["config"]["init_from_run"] == res.final_run_id  # "3" is the run id 3


def test_pruned_trials_are_recorded(home):
    tracker = Tracker(home)
    res = tune_backbone(tiny_cfg(), trials=2, space=BackboneSpace(epochs=[2, 2], batch_size=[32]), home=home,
                        tracker=tracker, pruner=PruneAfterFirstReport(), final=False)
    study = optuna.load_study(study_name=res.study_name, storage=optuna_storage_url(home))
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(t.intermediate_values.keys() == {0} for t in study.trials)  # stopped after epoch 1 of 2
    runs = tracker.list_runs(parent_id=res.parent_run_id)
    assert [r["status"] for r in runs] == ["pruned", "pruned"]
    assert res.best_params is None and res.final_run_id is None
    parent = tracker.get_run(res.parent_run_id)
    assert parent["status"] == "finished" and parent["summary"]["trials"] == {"pruned": 2}
    assert [e["payload"]["message"] for e in tracker.get_events(res.parent_run_id, kinds=["warning"])] == [
        "no trial completed"]


class CancelInSecondTrial(Callback):
    def __init__(self, token):
        self.token, self.starts = token, 0

    def on_start(self, state):
        self.starts += 1

    def on_step(self, state, logs):
        if self.starts == 2 and state.step >= 1:
            self.token.cancel("stop the study")


def test_cancellation_stops_the_trial_and_the_study(home):
    tracker = Tracker(home)
    token = CancelToken()
    with pytest.raises(Cancelled, match="stop the study"):
        tune_backbone(tiny_cfg(), trials=4, space=BackboneSpace(epochs=[2, 2], batch_size=[16]), home=home,
                      tracker=tracker, cancel=token, callbacks=[CancelInSecondTrial(token)])
    (parent,) = tracker.list_runs(kind="tune-backbone")
    assert parent["status"] == "cancelled" and "stop the study" in parent["error"]
    runs = sorted(tracker.list_runs(parent_id=parent["id"]), key=lambda r: r["id"])
    assert [r["status"] for r in runs] == ["finished", "cancelled"]  # no third trial, no final run
    study = optuna.load_study(study_name=parent["config"]["study_name"], storage=optuna_storage_url(home))
    ran = [t for t in study.trials if "skipped" not in t.user_attrs]
    assert [t.state for t in ran] == [TrialState.COMPLETE, TrialState.FAIL]
    # the budget's other slots are closed (FAIL, skipped: cancelled), so no worker runs them
    assert [(t.state, t.user_attrs["skipped"]) for t in study.trials[2:]] == [(TrialState.FAIL, "cancelled")] * 2


def test_timeout_ends_the_study_after_the_running_trial(home):
    res = tune_backbone(tiny_cfg(), trials=5, timeout_min=1e-6, space=BackboneSpace(epochs=[1, 1], batch_size=[32]),
                        home=home, final=False)
    assert len(res.trials) == 1 and res.stop_reason == "timeout"
    assert Tracker(home).get_run(res.parent_run_id)["summary"]["stop_reason"] == "timeout"


def test_an_existing_run_becomes_the_parent(home):
    from dact_lib.tracker import liveness

    tracker = Tracker(home)
    job = tracker.create_run("tune-backbone", {"queued": True}, status="queued")
    liveness.mark_live(job)  # as the job manager does
    try:
        res = tune_backbone(tiny_cfg(), trials=1, space=BackboneSpace(epochs=[1, 1], batch_size=[32]), home=home,
                            tracker=tracker, final=False, run_id=job)
        assert liveness.is_live(job)  # still the job manager's to release
    finally:
        liveness.mark_done(job)
    assert res.parent_run_id == job and res.study_name == f"tune-backbone-{job}"
    run = tracker.get_run(job)
    assert run["status"] == "finished" and run["config"]["trials"] == 1 and run["dataset_id"] is not None
    assert [r["id"] for r in tracker.list_runs(kind="tune-backbone")] == [job]
    assert len(tracker.list_runs(parent_id=job)) == 1


def test_study_name_reopens_the_study(home):
    space = BackboneSpace(epochs=[1, 1], batch_size=[32])
    a = tune_backbone(tiny_cfg(), trials=1, space=space, study_name="shared", home=home, final=False)
    b = tune_backbone(tiny_cfg(), trials=1, space=space, study_name="shared", home=home, final=False)
    assert a.parent_run_id != b.parent_run_id and b.trials[0]["number"] == 1
    study = optuna.load_study(study_name="shared", storage=optuna_storage_url(home))
    assert len(study.trials) == 2 and study.user_attrs["parent_run_id"] == b.parent_run_id


@pytest.mark.parametrize("bad, match", [
    (dict(lr=[1e-3, 1e-5]), "space.lr"),
    (dict(lr=[0.0, 1e-3]), "log-scale"),
    (dict(weight_decay=[0.0, 0.1]), "space.weight_decay"),
    (dict(batch_size=[]), "space.batch_size"),
    (dict(batch_size=[16, 16]), "space.batch_size"),
    (dict(epochs=[0, 2]), "space.epochs"),
    (dict(epochs=[1.5, 2]), "space.epochs"),
    (dict(dropout=[0.0, 1.0]), "space.dropout"),
])
def test_space_validation(bad, match):
    with pytest.raises(ConfigError, match=match):
        BackboneSpace(**bad).validate()


def test_space_round_trip_and_cross_checks(home):
    space = BackboneSpace.from_dict({"lr": [1e-4, 1e-3], "epochs": [1, 2], "val_frac": None})  # null: dropped
    assert "val_frac" not in space.to_dict() and BackboneSpace.from_dict(space.to_dict()) == space
    with pytest.raises(ConfigError, match="Unknown setting"):
        BackboneSpace.from_dict({"learning_rate": [1e-4, 1e-3]})
    with pytest.raises(ConfigError, match="trials"):
        tune_backbone(tiny_cfg(), trials=0, home=home)
    with pytest.raises(ConfigError, match="backbone"):
        tune_backbone(tiny_cfg("dact"), trials=1, home=home)
    applied = BackboneSpace.apply(tiny_cfg(), {"lr": 2e-4, "dropout": 0.3, "batch_size": 8})
    assert (applied.train.encoder_lr, applied.model.head.dropout, applied.train.batch_size) == (2e-4, 0.3, 8)
    assert Tracker(home).list_runs() == []  # bad settings are refused before any run is recorded


def test_a_space_naming_val_frac_is_refused_with_why_and_what_to_set():
    from dact_lib.tuning.backbone import BackboneTuneConfig

    assert "val_frac" not in BackboneSpace().to_dict() and BackboneSpace().epochs is None  # the defaults
    for refuse in (lambda: BackboneSpace.from_dict({"val_frac": [0.1, 0.3]}),
                   lambda: BackboneTuneConfig.from_dict({"trials": 2, "space": {"val_frac": [0.1, 0.3]}}),
                   lambda: BackboneSpace.apply(tiny_cfg(), {"val_frac": 0.2})):
        with pytest.raises(ConfigError) as err:
            refuse()
        msg = str(err.value)
        assert "space.val_frac" in msg and "same validation rows" in msg and "data.val_frac" in msg
    assert BackboneTuneConfig.from_dict({"space": {"val_frac": None}}).space == BackboneSpace()


def test_every_trial_is_scored_on_the_same_rows_and_keeps_the_config_epochs(home):
    """Issue 26, item 7: the validation split is the config's for every trial (not tuned), and the default space
    leaves train.epochs as the config says (it ran 4-epoch trials of an epochs: 1 config)."""
    tracker = Tracker(home)
    cfg = tiny_cfg()
    cfg.train.epochs = 1
    cfg.data.val_frac = 0.2
    res = tune_backbone(cfg, trials=2, space=BackboneSpace(batch_size=[32]), home=home, tracker=tracker,
                        final=False)
    runs = sorted(tracker.list_runs(parent_id=res.parent_run_id), key=lambda r: r["id"])
    assert len(runs) == 2 and all("val_frac" not in r["params"] and "epochs" not in r["params"] for r in res.trials)
    starts = [tracker.get_events(r["id"], kinds=["start"])[0]["payload"] for r in runs]
    assert starts[0]["val"] == starts[1]["val"] == 24 and starts[0]["train"] == starts[1]["train"]  # 20% of 120
    for r in runs:
        assert r["config"]["data"]["val_frac"] == 0.2 and r["config"]["data"]["split_seed"] == 0
        assert r["config"]["train"]["epochs"] == 1
        assert set(tracker.get_metrics(r["id"], names=["val_loss"])["step"]) == {starts[0]["steps"]}  # one epoch
