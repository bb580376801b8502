"""The single run — the run config trained once as ``train --kind dact`` would train it (its exit refit and its
halting fit included), on the pipeline's split: a candidate of the final choice, so the pipeline never hands back
a model that the single default run beats on the validation split.

Why: on a held-out 77-class set the staged pipeline once returned 90.21 % at 3.82 layers where the single run on
the same data gave 90.42 % at 1.63 (docs/benchmarks.md, "Results you can trust"). :func:`final_choice` compares the two by the pipeline's own choice
rule, on numbers measured the same way (validation rows, cross-fitted halting points), and says which won and why.
"""
from __future__ import annotations

import copy
import json
import math
import time
from typing import Any

from ...errors import DactLabError
from ...front import FrontPoint, finite_number, report_chosen

SINGLE = "single run"
PIPELINE = "pipeline"


def run(pl) -> None:
    """Train the single run (child run, tag ``single``) within the stage's share of the time budget and record its
    installed point (cross-fitted validation accuracy and average exit layer) as ``single.json``."""
    t0 = time.monotonic()
    pipe = pl.pipe
    budget = pl.budget.share("single")
    pl.start_stage("single", None, budget)
    if not pipe.single_run:
        pl.finish_stage("single", {"skipped": "pipeline.single_run = False"}, 0.0)
        return
    run_cfg = copy.deepcopy(pl.single_cfg)
    run_cfg.name, run_cfg.tag = f"{pipe.name}/single", "single"
    if budget is not None:
        run_cfg.train.time_limit_min = pl.budget.limit_min(budget, run_cfg.train.time_limit_min)
    res = pl.train_child(run_cfg.validate(), [], save=True)
    point = single_point(res.run_id, res.best_metrics, _halting_report(pl, res))
    pl.finish_stage("single", {"run_id": res.run_id, "point": point.to_dict(), "best_metrics": res.best_metrics,
                               "stop_reason": res.stop_reason}, time.monotonic() - t0)


def _halting_report(pl, res) -> dict | None:
    if res.report and isinstance(res.report.get("halting"), dict):
        return res.report["halting"]
    path = pl.tracker.run_dir(res.run_id) / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("halting")
    except (OSError, ValueError):
        return None


def single_point(run_id: int, best_metrics: dict, halting: dict | None) -> FrontPoint:
    """The single run as a point of the final choice: its installed halting point's validation accuracy and average
    exit layer — the cross-fitted numbers of its halting report when it has them (what stage 3's points carry
    too), else the validation metrics of the saved model."""
    chosen = report_chosen(halting or {}) or FrontPoint()
    acc: float | None
    exit_layer: float | None
    if chosen.val_accuracy is not None and chosen.val_avg_exit_layer is not None:
        acc, exit_layer = chosen.val_accuracy, chosen.val_avg_exit_layer
        how = "cross-fitted halting point" if (halting or {}).get("cross_fitted") else "halting point"
    else:
        acc = finite_number(best_metrics.get("val_accuracy"))
        exit_layer = finite_number(best_metrics.get("val_avg_exit_layer"))
        how = "validation metrics"
    return FrontPoint(source=SINGLE, run_id=int(run_id), val_accuracy=acc, val_avg_exit_layer=exit_layer,
                      measured=how, front_lambda=chosen.front_lambda, threshold=chosen.threshold)


def final_choice(chosen: FrontPoint, single: FrontPoint | None, trials: list[FrontPoint], rule: str,
                 tolerance: float) -> dict[str, Any]:
    """Which model the pipeline returns: stage 3's ``chosen`` point (on the stage-2 model) or the ``single`` run's
    point. ``lowest_exit_within_1pt``: the rule applied to every stage-3 trial and the single run together (the
    lowest validation exit within ``tolerance`` of the best accuracy of any of them; ties: the more accurate, then
    the pipeline). ``best_objective``: the pipeline's point unless the single run dominates it (at least as
    accurate, exits no later, better on one). Returns ``winner`` (:data:`PIPELINE` or :data:`SINGLE`), ``why``
    (a sentence) and both points (stored form)."""
    out = {"rule": rule, "tolerance": tolerance, "pipeline": chosen.to_dict(),
           "single": single.to_dict() if single is not None else None}
    if single is None or single.val_accuracy is None or single.val_avg_exit_layer is None:
        return {**out, "winner": PIPELINE, "why": "no single run to compare with" if single is None else
                "the single run has no validation point"}
    pa, pe = _value(chosen.val_accuracy), _value(chosen.val_avg_exit_layer)
    sa, se = single.val_accuracy, single.val_avg_exit_layer
    nums = (f"pipeline {100 * pa:.2f} % at {pe:.2f} layers, single run {100 * sa:.2f} % at {se:.2f} layers "
            "(validation)")
    if sa >= pa and se <= pe and (sa > pa or se < pe):
        return {**out, "winner": SINGLE, "why": f"the single run is at least as accurate and exits no later: {nums}"}
    if rule == "lowest_exit_within_1pt":
        pool = [p for p in trials if p.val_accuracy is not None] or [chosen]
        best = max([_value(p.val_accuracy) for p in pool] + [sa])
        floor = best - tolerance - 1e-12
        if sa >= floor and (pa < floor or se < pe or (se == pe and sa > pa)):
            why = (f"within {100 * tolerance:g} point(s) of the best accuracy ({100 * best:.2f} %) the single run "
                   f"exits earlier" if pa >= floor else
                   f"the pipeline's point is more than {100 * tolerance:g} point(s) below the best accuracy")
            return {**out, "winner": SINGLE, "why": f"{why}: {nums}"}
    return {**out, "winner": PIPELINE, "why": f"the single run does not beat the pipeline's point by the rule "
                                               f"{rule!r}: {nums}"}



def _value(x: float | None) -> float:
    return math.nan if x is None else x


def refuse_stage3_point(summary: dict, point: FrontPoint, source: str) -> None:
    """When the single run won the final choice, stage 3's halting files fit the stage-2 model, not the final one:
    using one of them (``source`` "front"; "final" is the final model's own) for prediction is refused with what
    to do instead."""
    if summary.get("final_source") == SINGLE and source != "final" and point.trial is not None:
        raise DactLabError(f"Trial {point.trial}'s halting units were fitted on the stage-2 model "
                           f"(run #{summary.get('trunk_run_id')}), but this pipeline's final model is its single run "
                           "(it beat stage 3's points on the validation split): choose the final model, or predict "
                           f"with run #{summary.get('trunk_run_id')} on the Predict page.")


__all__ = ["run", "final_choice", "single_point", "SINGLE", "PIPELINE", "refuse_stage3_point"]
