"""The one engine interface (dact_lib.engines): settings built and validated one way, the same run signature for
every engine, a summary on every result, and the parent run created or adopted in one place."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from dact_lib.config import default_config
from dact_lib.engines import ENGINES, EngineContext, get_engine
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.tracker import Tracker


def test_every_engine_runs_through_the_same_signature_and_settings_round_trip():
    for kind, engine in ENGINES.items():
        module = engine._module()
        assert list(inspect.signature(module.run_engine).parameters) == ["cfg", "settings", "ctx"], kind
        opts = {"pipeline": {"name": "p"}} if kind == "dact-pipeline" else {}
        s = engine.settings(opts)
        assert isinstance(s, engine.settings_type)
        assert engine.settings(engine.options(s)) == s  # what a job records gives the same settings back


def test_settings_from_nested_or_flat_options_and_clear_errors():
    pbt = get_engine("pbt")
    assert pbt.settings({"population": 3}).population == 3
    assert pbt.settings({"pbt": {"population": 3, "quantile": 0.5}, "population": 5}).population == 5  # flat wins
    with pytest.raises(ConfigError, match=r"Unknown option 'bogus' for pbt: allowed are \[.*'population'"):
        pbt.settings({"bogus": 1})
    with pytest.raises(ConfigError, match="population"):
        pbt.settings({"population": 1})
    with pytest.raises(ConfigError, match="set by the job manager"):
        pbt.settings({"tracker": 1})
    tb = get_engine("tune-backbone")
    s = tb.settings({"trials": 3, "space": {"epochs": [1, 2]}})
    assert (s.trials, s.space.epochs, s.final) == (3, [1, 2], True)
    assert tb.options(s)["trials"] == 3 and "tuning" not in tb.options(s)  # the backbone's options are flat
    with pytest.raises(ConfigError, match="trials = 0 is invalid"):
        tb.settings({"trials": 0})
    with pytest.raises(ConfigError, match="trials = '3' is invalid"):
        tb.settings({"trials": "3"})
    with pytest.raises(ConfigError, match="space.epochs"):
        tb.settings({"space": {"epochs": [3, 1]}})
    with pytest.raises(ConfigError, match="name"):
        get_engine("dact-pipeline").settings({})  # a pipeline needs its name
    with pytest.raises(DactLabError, match="unknown engine 'nope'"):
        get_engine("nope")


def test_engine_kinds_and_resume_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="cannot run as 'tune-backbone'.*'backbone'"):
        get_engine("tune-backbone").check_config(default_config("dact", encoder="tiny"))
    get_engine("pbt").check_config(default_config("multitask", encoder="tiny"))
    ctx = EngineContext(tracker=Tracker(tmp_path), resume=True)
    with pytest.raises(DactLabError, match="cannot resume"):
        get_engine("tune-backbone").run(default_config("backbone", encoder="tiny"),
                                        get_engine("tune-backbone").settings({}), ctx)
    assert Tracker(tmp_path).list_runs() == []


def test_every_result_type_has_a_summary_of_its_ids():
    from dact_lib.tuning.backbone import TuneResult
    from dact_lib.tuning.dact_pipeline import PipelineResult
    from dact_lib.tuning.pbt import PBTResult

    tune = TuneResult(parent_run_id=1, study_name="s", storage_url="u", best_params={"lr": 1e-3}, best_value=0.5,
                      final_run_id=7)
    assert tune.summary() == {"parent_run_id": 1, "final_run_id": 7, "best_value": 0.5,
                              "best_params": {"lr": 1e-3}, "study_name": "s"}
    pipe = PipelineResult(parent_run_id=2, final_run_id=9, stage_best={}, pareto=[], chosen={},
                          study_names={"stage3": "p/stage3"})
    assert pipe.summary() == {"parent_run_id": 2, "final_run_id": 9, "study_name": "p/stage3"}
    pbt = PBTResult(parent_run_id=3, best_run_id=5, best_member=1, best_score=0.9, schedule=[], members=[])
    assert pbt.summary() == {"parent_run_id": 3, "best_run_id": 5, "best_value": 0.9}
    for cls in (TuneResult, PipelineResult, PBTResult):
        assert dataclasses.is_dataclass(cls)


def test_open_run_creates_or_adopts_the_parent_run(tmp_path):
    tr = Tracker(tmp_path)
    new = tr.open_run("pbt", {"pbt": {"population": 2}}, name="p", tag="t", dataset_id=None)
    run = tr.get_run(new)
    assert (run["kind"], run["status"], run["name"], run["tag"], run["config"]) == \
        ("pbt", "running", "p", "t", {"pbt": {"population": 2}})
    queued = tr.create_run("pbt", {"run": {}}, name="job name", status="queued")
    assert tr.open_run("pbt", {"pbt": {"population": 4}}, queued) == queued
    run = tr.get_run(queued)
    assert (run["status"], run["name"], run["config"]) == ("running", "job name", {"pbt": {"population": 4}})
    assert run["started"] is not None
