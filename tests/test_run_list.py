"""The run list behind the Runs page (dact_lib.run_list): column order, exit rule, search, default selection,
test report, the ended-runs store."""
from __future__ import annotations

import json

import pandas as pd

from dact_lib.run_list import (EndedStore, default_selection, exit_rule, filter_runs, read_test_report,
                               runs_table)


def _run(i, kind="dact", status="finished", summary=None, config=None, dataset_id=1, **kw):
    return {"id": i, "kind": kind, "name": kw.get("name", ""), "tag": kw.get("tag"), "status": status,
            "parent_id": kw.get("parent_id"), "created": 0, "dataset_id": dataset_id,
            "summary": summary or {}, "config": config or {"kind": kind, "model": {"ponder_lambda": 0.001},
                                                         "train": {"epochs": 3}}}


def test_columns_keep_their_order_when_a_multitask_run_is_listed():
    """Issue 28: once a multi-task run existed the single-task scores moved to the far right."""
    multi = _run(2, "multitask", summary={"test": {"test_accuracy": 0.7, "test_accuracy/topic": 0.8}})
    single = _run(1, "backbone", summary={"test": {"test_accuracy": 0.9, "test_macro_f1": 0.88}})
    t = runs_table([multi, single], {1: "sst2"})
    cols = list(t.columns)
    assert cols[:14] == ["id", "kind", "name", "dataset", "tag", "status", "parent", "created", "val_accuracy",
                         "val_macro_f1", "test_accuracy", "test_macro_f1", "val_avg_exit_layer",
                         "test_avg_exit_layer"]
    assert cols.index("test_accuracy (mean of tasks)") > cols.index("exits")
    assert t.loc[t["id"] == 1, "test_accuracy"].item() == 0.9 and t.loc[t["id"] == 1, "dataset"].item() == "sst2"
    assert t.loc[t["id"] == 2, "test_accuracy/topic"].item() == 0.8


def test_exit_rule_and_the_training_lambda_only_where_it_decides():
    """Issue 28: ponder λ was shown for a run whose exits a threshold unit chose."""
    tau = _run(1, summary={"halting": {"chosen": {"lambda": float("nan"), "threshold": 0.4}},
                           "test": {"test_avg_exit_layer": 1.52}})
    fitted = _run(2, summary={"halting": {"chosen": {"lambda": 0.05, "threshold": None}}})
    trained = _run(3)
    assert exit_rule(tau) == "threshold τ 0.40"
    assert exit_rule(fitted) == "fitted units, front λ 0.05"
    assert exit_rule(trained) == "trained units, ponder λ 0.001"
    assert exit_rule(_run(4, "backbone")) == ""
    t = runs_table([tau, fitted, trained]).set_index("id")
    assert pd.isna(t.loc[1, "ponder_lambda"]) and pd.isna(t.loc[2, "ponder_lambda"])
    assert t.loc[3, "ponder_lambda"] == 0.001 and t.loc[1, "test_avg_exit_layer"] == 1.52


def test_search_words_and_settings():
    runs = [_run(1, name="alpha", tag="x"), _run(2, "backbone", config={"train": {"epochs": 30}}, dataset_id=2)]
    ds = {1: "sst2", 2: "trec6"}
    assert [r["id"] for r in filter_runs(runs, ["trec6"], datasets=ds)] == [2]
    assert [r["id"] for r in filter_runs(runs, ["epochs=3"], datasets=ds)] == [1]  # not 30
    assert [r["id"] for r in filter_runs(runs, ["dact", "alpha"], datasets=ds)] == [1]
    assert filter_runs(runs, [], kinds=["backbone"], statuses=["running"]) == []


def test_default_selection_skips_a_cancelled_stub():
    """Issue 28: the default selection was the newest run even when it was a stub cancelled before any step."""
    stub, done, older = _run(3, status="cancelled"), _run(2), _run(1, status="failed")
    assert default_selection([stub, done, older], {2: 40, 1: 10}) == [2]
    assert default_selection([stub, older], {1: 10}) == [1]  # nothing finished: the newest with curves
    assert default_selection([stub], {}) == [3]
    running = _run(4, status="running")
    assert default_selection([running, stub, done], {2: 40}) == [4]
    assert default_selection([_run(5, "pbt", status="running"), done], {2: 40}) == [2]  # engine parents: no curves


def test_read_test_report(tmp_path):
    assert read_test_report(tmp_path) == {}
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    assert read_test_report(tmp_path) == {}
    rep = {"report": {"tasks": {"label": {"labels": ["neg", "pos"], "accuracy": 0.75, "macro_f1": 0.7,
                                          "confusion_matrix": [[1, 1], [0, 2]],
                                          "per_class": {"neg": {"precision": 1.0, "recall": 0.5, "f1-score": 0.67,
                                                                "support": 2}}}}}}
    (tmp_path / "report.json").write_text(json.dumps(rep), encoding="utf-8")
    got = read_test_report(tmp_path)["label"]
    assert got["accuracy"] == 0.75 and got["confusion"].loc["true neg", "predicted pos"] == 1
    assert got["per_class"].to_dict("records") == [{"class": "neg", "precision": 1.0, "recall": 0.5, "f1": 0.67,
                                                    "rows": 2}]


def test_ended_store_drops_the_least_recently_used():
    s = EndedStore(2)
    s.put("a", 1)
    s.put("b", 2)
    assert s.get("a") == 1  # a is now the most recent
    s.put("c", 3)
    assert "b" not in s and s.get("a") == 1 and s.get("c") == 3 and len(s) == 2


def test_choosing_a_point_of_a_run_trained_before_the_weights_were_kept_says_what_to_do(tmp_path):
    import pytest

    from dact_lib.errors import DactLabError
    from dact_lib.run_front import choose_run_point
    from dact_lib.tracker import Tracker

    tr = Tracker(tmp_path)
    rid = tr.create_run("dact", {"kind": "dact"}, status="finished")
    pts = [{"lambda": 0.1, "threshold": None, "avg_exit_layer": 2.0, "accuracy": 0.8, "scale": 1.0, "shift": 0.0},
           {"lambda": 1.0, "threshold": None, "avg_exit_layer": 1.0, "accuracy": 0.7, "scale": 1.0, "shift": 0.0}]
    tr.run_dir(rid).mkdir(parents=True, exist_ok=True)
    (tr.run_dir(rid) / "report.json").write_text(json.dumps({"halting": {"points": pts, "chosen": pts[0]}}))
    with pytest.raises(DactLabError, match="retrain it to choose among its points"):
        choose_run_point(tr, rid, 1)
    with pytest.raises(DactLabError, match="has no point 7"):
        choose_run_point(tr, rid, 7)
    assert choose_run_point(tr, rid, 0) is None  # its own point: nothing to copy
    assert [e["payload"]["own"] for e in tr.get_events(rid, kinds=["point_chosen"])] == [True]


def test_environment_rows_and_deep_links():
    from dact_lib.run_list import environment_rows, ids_from_query

    run = {"summary": {"environment": {"argv": ["dact-lab", "train", "--epochs", "2"],
                                       "git": {"commit": "0123456789abcdef", "dirty": True},
                                       "packages": {"python": "3.11.7", "torch": "2.13.0"}, "cpus": 2,
                                       "torch": {"cuda": None, "gpus": []}}}}
    rows = {r["what"]: r["value"] for r in environment_rows(run)}
    assert rows["command line"] == "dact-lab train --epochs 2"
    assert rows["git commit"] == "0123456789ab (with uncommitted changes)"
    assert rows["torch"] == "2.13.0" and rows["cpus"] == "2" and rows["CUDA"] == "build CPU only; GPUs: none"
    assert environment_rows({"summary": {}}) == []
    known = {3, 4, 7}
    assert ids_from_query({"run": "3"}, known) == ([3], 3)
    assert ids_from_query({"runs": "4, #7,99,x"}, known) == ([4, 7], 4)
    assert ids_from_query({"run": "7", "runs": "3,4"}, known) == ([3, 4], 7)
    assert ids_from_query({}, known) == ([], None) and ids_from_query({"run": "99"}, known) == ([], None)
