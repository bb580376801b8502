"""The latency budget (deploy/budget.py), export's argument checks (deploy/export.py) and the policy text."""
from __future__ import annotations

import math

import pytest

from dact_lib.deploy import budget
from dact_lib.deploy.export import export_model
from dact_lib.deploy.policy import canonical, parse_policy
from dact_lib.errors import ConfigError


def _pt(policy, acc, ms, exit_=None):
    return {"policy": policy, "accuracy": acc, "avg_exit_layer": exit_, "latency_ms_p50": ms,
            "latency_ms_p90": ms * 1.2, "runtime": "onnxruntime-int8"}


FRONT = [_pt("fixed:6", 0.91, 9.0, 6.0), _pt("dact", 0.905, 4.0, 2.1), _pt("entropy:0.2", 0.905, 3.5, 2.0),
         _pt("entropy:0.4", 0.88, 2.0, 1.4), _pt("entropy:0.6", 0.80, 1.2, 1.0)]


def test_pick_takes_the_most_accurate_point_that_fits():
    assert budget.pick(FRONT, 100)["policy"] == "fixed:6"
    assert budget.pick(FRONT, 9.0)["policy"] == "fixed:6"  # on the budget = fits
    assert budget.pick(FRONT, 8.99)["policy"] == "entropy:0.2"  # equal accuracy: the faster of the two
    assert budget.pick(FRONT, 3.9)["policy"] == "entropy:0.2"
    assert budget.pick(FRONT, 3.4)["policy"] == "entropy:0.4"
    assert budget.pick(FRONT, 1.2)["policy"] == "entropy:0.6"
    assert budget.pick(FRONT, 1.0) is None


def test_budget_message_names_the_point_or_the_fastest():
    chosen = budget.pick(FRONT, 3.9)
    msg = budget.message_for(chosen, FRONT, 3.9)
    assert "entropy:0.2" in msg and "90.50%" in msg and "3.50 ms" in msg
    none = budget.message_for(None, FRONT, 1.0)
    assert "no point fits" in none and "entropy:0.6" in none and "1.20 ms" in none


@pytest.mark.parametrize("bad", [0, -1, "fast", math.inf, None])
def test_bad_budgets_are_refused_with_the_fix(bad):
    with pytest.raises(ConfigError, match="milliseconds"):
        budget.pick(FRONT, bad)


def test_candidates_are_the_rule_the_entropy_sweep_and_full_depth():
    c = budget.candidate_policies(6, 2)
    assert c[0] == "dact" and c[-1] == "fixed:6"
    assert all(p.startswith("entropy:") for p in c[1:-1]) and len(c) == 2 + 12


@pytest.mark.parametrize("text,want", [(None, ("dact", None)), ("", ("dact", None)), ("DACT", ("dact", None)),
                                       ("entropy:0.40", ("entropy", 0.4)), ("patience:2", ("patience", 2)),
                                       ("fixed:3.0", ("fixed", 3))])
def test_policy_text(text, want):
    assert parse_policy(text) == want


@pytest.mark.parametrize("text,match", [("entropy", "needs a value"), ("fixed:2.5", "whole number"),
                                        ("patience:0", "whole number"), ("foo:1", "unknown name"),
                                        ("entropy:x", "must be a number"), ("dact:1", "takes no value"),
                                        ("entropy:-1", ">= 0")])
def test_bad_policy_text_names_the_fix(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_policy(text)


def test_canonical_spelling():
    assert canonical("Entropy:0.400") == "entropy:0.4" and canonical("fixed:3") == "fixed:3"


@pytest.mark.parametrize("kwargs,match", [
    ({"fmt": "tflite"}, "--format hf"),
    ({"fmt": "hf", "int8": True}, "with --format onnx"),
    ({"policy": "dact", "point": 3}, "only one of them"),
    ({"policy": "dact", "latency_budget_ms": 5}, "only one of them"),
])
def test_export_refuses_contradictory_options_before_loading_anything(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        export_model("does-not-matter", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- measured on a real (tiny) run
@pytest.fixture(scope="module")
def tiny_dact(tmp_path_factory):
    from dact_lib.cli import main

    home = tmp_path_factory.mktemp("budget_home")
    assert main(["train", "--kind", "dact", "--encoder", "tiny", "--max-rows", "120", "--device", "cpu",
                 "--epochs", "1", "--home", str(home), "--verbosity", "0"]) == 0
    return home, home / "runs" / "1"


def test_measured_front_on_pytorch_and_the_choice(tiny_dact):
    from dact_lib.models import load_model

    home, run_dir = tiny_dact
    points = budget.measure_front(run_dir, runtime="torch", latency_rows=6)
    n = load_model(run_dir).model.num_layers
    assert [p["policy"] for p in points] == budget.candidate_policies(n, 3)
    for p in points:
        assert 0.0 <= p["accuracy"] <= 1.0 and 1.0 <= p["avg_exit_layer"] <= n
        assert 0 < p["latency_ms_p50"] <= p["latency_ms_p90"] and p["runtime"] == "pytorch"
    full = next(p for p in points if p["policy"] == f"fixed:{n}")
    assert full["avg_exit_layer"] == n
    # a budget everything fits: the most accurate point; a budget nothing fits: None and the fastest named
    res = budget.choose_for_budget(run_dir, 1e6, runtime="torch", latency_rows=4)
    assert res["point"]["accuracy"] == max(p["accuracy"] for p in res["points"])
    assert res["policy"] == res["point"]["policy"] and "most accurate point that fits" in res["message"]
    res = budget.choose_for_budget(run_dir, 1e-6, runtime="torch", latency_rows=4)
    assert res["point"] is None and res["policy"] is None and "no point fits" in res["message"]


def test_measured_front_on_the_int8_runtime_reads_its_own_answers(tiny_dact):
    """On ONNX Runtime int8 the points' accuracy and exits are the runtime's own (quantisation moves answers)."""
    from dact_lib.deploy.predictor import onnx_cache
    from dact_lib.deploy.runtime import OnnxModel
    from dact_lib.exits import split_of_run
    from dact_lib.models import load_model

    home, run_dir = tiny_dact
    points = budget.measure_front(run_dir, runtime="onnx", int8=True, latency_rows=4)
    assert {p["runtime"] for p in points} == {"onnxruntime-int8"}
    ds, _ = split_of_run(load_model(run_dir), "val")
    model = OnnxModel(onnx_cache(run_dir), int8=True)
    loaded = load_model(run_dir)
    gold = [loaded.label_maps[model.tasks[0]][int(t)] for t in ds.targets[model.tasks[0]]]
    for p in points:
        preds = model.predict(list(ds.texts), policy=p["policy"])
        assert p["accuracy"] == sum(x["label"] == g for x, g in zip(preds, gold)) / len(gold)
        assert p["avg_exit_layer"] == pytest.approx(sum(x["exit_layer"] for x in preds) / len(preds))
