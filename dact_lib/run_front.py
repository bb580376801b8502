"""A single DACT run's fitted halting front, for the Pareto explorer: the points of its halting sweep (report.json
``halting``: λ points, calibrated points, confidence thresholds τ — accuracy and average exit layer cross-fitted on
the validation split), their front and the point the run kept (``chosen``), as :class:`~dact_lib.front.FrontPoint`
records like a pipeline's stage-3 points, so the same chart and table show them."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .front import FrontPoint, front_mask, report_chosen, report_points


def run_front(run_dir) -> dict[str, Any] | None:
    """``{"points", "front", "chosen", "rows", "cross_fitted", "tolerance_points"}`` of the run in ``run_dir``, or
    None when its report has no halting sweep (halting not fitted, or not a DACT run). The points are
    :class:`FrontPoint` records with ``trial`` set to their index (for the chart's selection) and ``family`` (λ,
    calibrated λ or threshold τ); ``chosen`` is the one the run kept (or None)."""
    try:
        rep = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    halting = rep.get("halting") if isinstance(rep, dict) else None
    if not isinstance(halting, dict):
        return None
    points = [replace(p, trial=i, run_id=None) for i, p in enumerate(report_points(halting))]
    if not points:
        return None
    kept = report_chosen(halting)
    chosen = next((p for p in points if p.same_point(kept)), None) if kept is not None else None
    front = [p for p, on in zip(points, front_mask(points)) if on]
    return {"points": points, "front": front, "chosen": chosen, "rows": halting.get("rows"),
            "cross_fitted": bool(halting.get("cross_fitted")), "tolerance_points": halting.get("tolerance_points")}


def choose_run_point(tracker, run_id: int, trial: int | None) -> FrontPoint | None:
    """Use point ``trial`` (its index in :func:`run_front`'s points) of single DACT run ``run_id`` for prediction,
    without retraining: its halting weights (kept at training time in ``halting/run_front.safetensors``) are written
    as the run's halting choice, which every loader applies. ``trial`` None, or the run's own point, clears the
    choice. Returns the choice now in effect (None: the run's own point). Recorded as a ``point_chosen`` event."""
    from . import events as ev
    from .errors import DactLabError
    from .halting import front_state
    from .models import HALTING_DIR, save_halting_file, set_halting_choice

    run_dir = Path(tracker.run_dir(int(run_id)))
    rf = run_front(run_dir)
    if rf is None:
        raise DactLabError(f"Run #{run_id} has no fitted halting front (its halting units were not fitted after "
                           "training): nothing to choose.")
    own = rf["chosen"].trial if rf["chosen"] is not None else None
    if trial is None or int(trial) == own:
        set_halting_choice(run_dir, None)
        tracker.log_event(int(run_id), ev.USER_POINT_CHOICE, {"point": None, "by": "user", "own": True})
        return None
    by = {p.trial: p for p in rf["points"]}
    if int(trial) not in by:
        raise DactLabError(f"Run #{run_id} has no point {trial}: choose one of {sorted(by)}.")
    point = by[int(trial)]
    state = front_state(run_dir, int(trial))
    if state is None:
        raise DactLabError(f"Run #{run_id} was trained before the halting weights of every front point were kept "
                           f"({HALTING_DIR}/run_front.safetensors is missing): retrain it to choose among its points, "
                           "or use the point it kept.")
    path = save_halting_file(run_dir, f"point_{int(trial)}", state)
    info = {"file": f"{HALTING_DIR}/{path.name}", **point.brief().to_dict(), "source": "run front"}
    set_halting_choice(run_dir, info)
    tracker.log_event(int(run_id), ev.USER_POINT_CHOICE, {"point": info, "by": "user"})
    return point.brief()
