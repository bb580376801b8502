"""The front-point record (dact_lib/front.py): one spelling written, every older spelling read at one boundary."""
from __future__ import annotations

import json
import math

import pytest

from dact_lib.front import FrontPoint, LEGACY_KEYS, front_mask, report_chosen, report_points
from dact_lib.halting import HaltingPoint

NEW_KEYS = {f for f in FrontPoint.__dataclass_fields__}
OLD_KEYS = {k for keys in LEGACY_KEYS.values() for k in keys}


def test_a_point_round_trips_through_its_stored_form():
    p = FrontPoint(val_accuracy=0.875, val_avg_exit_layer=2.25, front_lambda=0.1, train_lambda=0.004,
                   scale=2.0, shift=-0.5, val_nll=0.31, objective="val_nll", trial=7, run_id=12,
                   halting_file="runs/3/halting/trial_7.safetensors", cross_fitted=True, seen_val_accuracy=0.9,
                   seen_val_avg_exit_layer=2.0, fit_s=0.5, params={"halting": "fitted", "front_lambda": 0.1})
    stored = json.loads(json.dumps(p.to_dict()))
    assert FrontPoint.from_dict(stored) == p
    threshold = FrontPoint(val_accuracy=0.8, val_avg_exit_layer=1.5, threshold=0.3, trial=2)
    assert FrontPoint.from_dict(json.loads(json.dumps(threshold.to_dict()))) == threshold
    assert threshold.to_dict() == {"val_accuracy": 0.8, "val_avg_exit_layer": 1.5, "threshold": 0.3, "trial": 2}
    assert threshold.kind == "threshold" and p.kind == "fitted"
    assert p.val_error == pytest.approx(0.125) and p.objective_value() == 0.31


LEGACY_CASES = [
    ({"accuracy": 0.9}, "val_accuracy", 0.9),
    ({"val_error": 0.25}, "val_accuracy", 0.75),
    ({"error": 0.25}, "val_accuracy", 0.75),
    ({"avg_exit_layer": 2.5}, "val_avg_exit_layer", 2.5),
    ({"exit_layer": 2.5}, "val_avg_exit_layer", 2.5),
    ({"lambda": 0.1}, "front_lambda", 0.1),
    ({"ponder_lambda": 0.1}, "front_lambda", 0.1),
    ({"lam": 0.1}, "front_lambda", 0.1),
    ({"params": {"front_lambda": 0.1}}, "front_lambda", 0.1),
    ({"params": {"ponder_lambda": 0.1}}, "front_lambda", 0.1),
    ({"params": {"model.ponder_lambda": 0.1}}, "front_lambda", 0.1),
    ({"params": {"lambda": 0.1}}, "front_lambda", 0.1),
    ({"params": {"lam": 0.1}}, "front_lambda", 0.1),
    ({"spec_lambda": 0.004}, "train_lambda", 0.004),
    ({"tau": 0.3}, "threshold", 0.3),
    ({"params": {"halting": "threshold", "tau": 0.3}}, "threshold", 0.3),
    ({"nll": 0.4}, "val_nll", 0.4),
    ({"loss": 0.4}, "val_loss", 0.4),
    ({"number": 4}, "trial", 4),
    ({"trial_number": 4}, "trial", 4),
    ({"file": "halting/trial_4.safetensors"}, "halting_file", "halting/trial_4.safetensors"),
    ({"seen_accuracy": 0.95}, "seen_val_accuracy", 0.95),
    ({"seen_avg_exit_layer": 1.5}, "seen_val_avg_exit_layer", 1.5),
]


@pytest.mark.parametrize("old, field, value", LEGACY_CASES)
def test_each_older_spelling_reads(old, field, value):
    assert getattr(FrontPoint.from_dict(old), field) == pytest.approx(value)


def test_every_legacy_key_has_a_case_above():
    covered = {k for old, _, _ in LEGACY_CASES for k in old}
    assert OLD_KEYS <= covered


def test_older_records_as_stored_read_the_same():
    # a single run's halting report before the record: a threshold point's λ was NaN, calibrated points kept
    # their scale and shift
    old_report = {"points": [{"lambda": 0.5, "spec_lambda": 0.02, "avg_exit_layer": 2.0, "accuracy": 0.9,
                              "fit_s": 0.1, "scale": 1.0, "shift": 0.0, "threshold": None}],
                  "threshold_points": [{"lambda": math.nan, "spec_lambda": math.nan, "avg_exit_layer": 1.5,
                                        "accuracy": 0.85, "scale": 1.0, "shift": 0.0, "threshold": 0.4}],
                  "chosen": {"lambda": math.nan, "spec_lambda": math.nan, "avg_exit_layer": 1.5, "accuracy": 0.85,
                             "scale": 1.0, "shift": 0.0, "threshold": 0.4}}
    stored = json.loads(json.dumps(old_report))
    pts = report_points(stored)
    assert [(p.family, p.front_lambda, p.threshold) for p in pts] == [("λ", 0.5, None), ("threshold τ", None, 0.4)]
    assert pts[0].train_lambda == 0.02 and pts[1].train_lambda is None
    assert report_chosen(stored).same_point(pts[1])
    # a stage-3 point before the record
    old = {"trial": 3, "lambda": 0.01, "objective": "val_error", "val_error": 0.2, "val_avg_exit_layer": 1.4,
           "val_accuracy": 0.8, "val_nll": math.nan, "run_id": "5", "halting": "fitted", "tau": None,
           "spec_lambda": 0.001, "halting_file": "runs/1/halting/trial_3.safetensors"}
    p = FrontPoint.from_dict(old)
    assert (p.trial, p.front_lambda, p.train_lambda, p.run_id, p.val_nll) == (3, 0.01, 0.001, 5, None)
    assert p.objective_value() == pytest.approx(0.2)


def _assert_new_spelling(d: dict) -> None:
    assert set(d) <= NEW_KEYS, set(d) - NEW_KEYS
    assert not set(d) & (OLD_KEYS - NEW_KEYS)


def test_the_halting_fit_writes_only_the_new_spelling():
    fitted = HaltingPoint(lam=0.5, spec_lambda=0.02, avg_exit_layer=2.0, accuracy=0.9, fit_s=0.1,
                          seen_avg_exit_layer=1.9, seen_accuracy=0.92, nll=0.3)
    threshold = HaltingPoint(lam=math.nan, spec_lambda=math.nan, avg_exit_layer=1.5, accuracy=0.85, threshold=0.4)
    for p in (fitted, threshold):
        _assert_new_spelling(p.record().to_dict())
    assert fitted.record().to_dict() == {"val_accuracy": 0.9, "val_avg_exit_layer": 2.0, "front_lambda": 0.5,
                                         "train_lambda": 0.02, "val_nll": 0.3, "seen_val_accuracy": 0.92,
                                         "seen_val_avg_exit_layer": 1.9, "fit_s": 0.1}
    assert threshold.record().front_lambda is None and threshold.record().train_lambda is None


def test_stage3_and_the_single_run_write_only_the_new_spelling():
    from dact_lib.tuning.dact_pipeline.single import final_choice, single_point
    from dact_lib.tuning.dact_pipeline.stage3 import trial_point

    p = trial_point(2, {"halting": "fitted", "front_lambda": 0.1}, [0.3, 2.0],
                    {"val_accuracy": 0.9, "val_nll": 0.3, "val_avg_exit_layer": 2.0, "train_lambda": 0.004,
                     "run_id": 4, "halting_file": "runs/1/halting/trial_2.safetensors", "cross_fitted": True},
                    "val_nll")
    _assert_new_spelling(p.to_dict())
    halting = {"chosen": FrontPoint(val_accuracy=0.91, val_avg_exit_layer=1.5, front_lambda=0.2).to_dict(),
               "cross_fitted": True}
    s = single_point(9, {}, halting)
    _assert_new_spelling(s.to_dict())
    d = final_choice(p, s, [p], "lowest_exit_within_1pt", 0.01)
    _assert_new_spelling(d["pipeline"])
    _assert_new_spelling(d["single"])


def test_front_mask_of_points():
    pts = [FrontPoint(val_avg_exit_layer=3.0, val_accuracy=0.9), FrontPoint(val_avg_exit_layer=2.0,
                                                                             val_accuracy=0.8),
           FrontPoint(val_avg_exit_layer=3.5, val_accuracy=0.85), FrontPoint(val_accuracy=0.99)]
    assert front_mask(pts) == [True, True, False, False]
