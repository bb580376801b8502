"""Choosing a stage-3 point later: :func:`choose_point`, :func:`choose_for_prediction` (the user's halting choice,
next to the pipeline's)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from .. import studies
from ...errors import DactLabError
from ...front import FrontPoint
from .settings import PIPELINE_KIND
from .stage3 import pareto_points
from ... import events as ev


def load_stage3(target: Any, home=None, tracker=None) -> tuple[optuna.Study, int | None, Any]:
    if isinstance(target, optuna.Study):
        parent = target.user_attrs.get("parent_run_id")
        return target, (int(parent) if parent is not None else None), tracker
    from ...tracker import Tracker

    tracker = tracker or Tracker(home)
    run = tracker.get_run(int(target))
    if run["kind"] != PIPELINE_KIND:
        raise DactLabError(f"run {target} is a {run['kind']!r} run, not a DACT pipeline ({PIPELINE_KIND!r}): give "
                           "the pipeline's parent run id.")
    names = (run.get("summary") or {}).get("study_names") or {"stage3": f"{run['name']}/stage3"}
    try:
        study = optuna.load_study(study_name=names["stage3"], storage=studies.storage(tracker.home))
    except KeyError:
        raise DactLabError(f"pipeline run {target} has no stage-3 study yet ({names['stage3']!r}): let stage 3 "
                           "finish (or resume the pipeline) first.") from None
    return study, int(target), tracker


def choose_point(parent_or_study: int | optuna.Study, trial_number: int, *, home=None, tracker=None
                 ) -> FrontPoint:
    """Pick another Pareto-front point of a pipeline's stage 3 (by trial number); returns it, ``params`` the
    trial's parameters and ``run_id`` the run that holds its model (the final run, once there is one, for points
    with a halting file). Given a parent run id, the choice is recorded as a ``point_chosen`` event on it. Raises
    DactLabError for a point not on the front."""
    study, parent, tracker = load_stage3(parent_or_study, home, tracker)
    front = {p.trial: p for p in pareto_points(study)}
    if int(trial_number) not in front:
        raise DactLabError(f"trial {trial_number} is not on the Pareto front of study {study.study_name!r}: pick "
                           f"one of trials {sorted(t for t in front if t is not None)}.")
    point = replace(front[int(trial_number)], params=dict(study.trials[int(trial_number)].params))
    if parent is not None and tracker is not None:
        final = (tracker.get_run(parent).get("summary") or {}).get("final_run_id")
        if final is not None and point.halting_file:  # fitted points: the final run + this halting file
            point = replace(point, run_id=int(final))
        tracker.log_event(parent, ev.USER_POINT_CHOICE, {"point": point.to_dict(), "by": "user"})
    return point


def choose_for_prediction(parent_id: int, point: FrontPoint, *, tracker, source: str = "front",
                          by: str = "dashboard") -> dict[str, Any]:
    """Make a pipeline point the one used for prediction, at once and without training. ``point`` is a point of
    the Pareto explorer; ``source``: "front" (a point of the front) or "final" (the final model as the pipeline
    chose it).

    A pipeline whose stage 3 fitted halting units on one model (points carry ``halting_file``): the point's
    halting weights are copied into the final run (or, before the final stage, the stage-2 model's run) and named
    in its ``halting_choice.json`` — the run's own halting units (the pipeline's rule choice) stay in its
    model.safetensors; choosing the pipeline's own point (or "final") clears the user's choice. A pipeline whose
    points carry no halting file (one trained run per λ, as a home may still hold): the point's run becomes the
    prediction model.

    Every choice is recorded as a ``point_chosen`` (front points) and a ``chosen`` event on the pipeline run; the
    pipeline's recorded choice (``chosen_point``, summary ``chosen``) is never changed. Returns ``run_id``,
    ``has_model`` and ``halting`` (the user's halting choice now in effect, or None)."""
    import shutil

    from ...models import HALTING_DIR, MODEL_FILE, set_halting_choice

    if point.run_id is None:
        raise DactLabError(f"Trial {point.trial} has no trained run to predict with: choose another point.")
    rid = int(point.run_id)
    parent = tracker.get_run(int(parent_id))
    summary = parent.get("summary") or {}
    rule = FrontPoint.from_dict(summary.get("chosen") or {})
    trial = point.trial
    from .single import refuse_stage3_point

    refuse_stage3_point(summary, point, source)
    fitted = bool(point.halting_file or rule.halting_file)
    if trial is not None and source != "final":
        try:
            choose_point(parent_id, int(trial), tracker=tracker)
        except (DactLabError, KeyError, ValueError):  # a run without a stage-3 study: 'chosen' still records it
            pass
    halting = None
    if fitted:
        rid = int(summary.get("final_run_id") or rid)
        run_dir = tracker.run_dir(rid)
        if source == "final" or trial is None or trial == rule.trial:
            set_halting_choice(run_dir, None)
        else:
            name = f"{HALTING_DIR}/trial_{int(trial)}.safetensors"
            if not (run_dir / name).is_file():
                src = tracker.abs_path(str(point.halting_file or ""))
                if not src.is_file():
                    raise DactLabError(f"Trial {trial}'s halting weights ({src}) are missing: choose another point.")
                (run_dir / HALTING_DIR).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, run_dir / name)
            halting = {"file": name, **point.brief().to_dict(), "by": by, "at": time.time()}
            set_halting_choice(run_dir, halting)
    else:
        run_dir = Path(tracker.get_run(rid).get("run_dir") or tracker.run_dir(rid))
    tracker.log_event(parent_id, ev.PREDICTION_CHOICE, {"run_id": rid, "trial": trial,
                                                        "front_lambda": point.front_lambda, "source": source,
                                                        "by": by, "halting": halting is not None})
    return {"run_id": rid, "has_model": (run_dir / MODEL_FILE).is_file(), "halting": halting}
