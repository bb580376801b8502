"""A single DACT run's fitted halting front, for the Pareto explorer: the points of its halting sweep (report.json
``halting``: λ points, calibrated points, confidence thresholds τ — accuracy and average exit layer cross-fitted on
the validation split), their front and the point the run kept (``chosen``), in the shape of a pipeline's stage-3
points (``plots.normalize_point``) so the same chart and table show them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plots.pareto import front_mask, normalize_point


def _same(a: dict, b: dict) -> bool:
    keys = ("lambda", "threshold", "scale", "shift", "avg_exit_layer", "accuracy")
    return all(a.get(k) == b.get(k) for k in keys)


def run_front(run_dir) -> dict[str, Any] | None:
    """``{"points", "front", "chosen", "rows", "cross_fitted", "tolerance_points"}`` of the run in ``run_dir``, or
    None when its report has no halting sweep (halting not fitted, or not a DACT run). A point has ``trial`` (its
    index, for the chart's selection), ``lambda``, ``tau`` (a threshold point), ``val_accuracy``,
    ``val_avg_exit_layer`` and ``family`` (λ, calibrated λ or threshold)."""
    try:
        rep = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    halting = rep.get("halting") if isinstance(rep, dict) else None
    if not isinstance(halting, dict):
        return None
    raw: list[tuple[str, dict]] = []
    for family, key in (("λ", "points"), ("calibrated λ", "calibrated_front"), ("threshold τ", "threshold_points")):
        raw += [(family, p) for p in halting.get(key) or [] if isinstance(p, dict)]
    if not raw:
        return None
    chosen_raw = halting.get("chosen") or {}
    points, chosen = [], None
    for i, (family, p) in enumerate(raw):
        pt = normalize_point({**p, "trial": i, "run_id": None})
        pt.update(tau=p.get("threshold"), family=family,
                  **({"lambda": None} if p.get("threshold") is not None else {}))
        points.append(pt)
        if chosen is None and chosen_raw and _same(p, chosen_raw):
            chosen = pt
    front = [p for p, on in zip(points, front_mask(points)) if on]
    return {"points": points, "front": front, "chosen": chosen, "rows": halting.get("rows"),
            "cross_fitted": bool(halting.get("cross_fitted")), "tolerance_points": halting.get("tolerance_points")}


def choose_run_point(tracker, run_id: int, trial: int | None) -> dict | None:
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
    own = (rf["chosen"] or {}).get("trial")
    if trial is None or int(trial) == own:
        set_halting_choice(run_dir, None)
        tracker.log_event(int(run_id), ev.USER_POINT_CHOICE, {"point": None, "by": "user", "own": True})
        return None
    by = {p["trial"]: p for p in rf["points"]}
    if int(trial) not in by:
        raise DactLabError(f"Run #{run_id} has no point {trial}: choose one of {sorted(by)}.")
    point = by[int(trial)]
    state = front_state(run_dir, int(trial))
    if state is None:
        raise DactLabError(f"Run #{run_id} was trained before the halting weights of every front point were kept "
                           f"({HALTING_DIR}/run_front.safetensors is missing): retrain it to choose among its points, "
                           "or use the point it kept.")
    path = save_halting_file(run_dir, f"point_{int(trial)}", state)
    info = {"file": f"{HALTING_DIR}/{path.name}", "trial": int(trial), "lambda": point.get("lambda"),
            "tau": point.get("tau"), "val_avg_exit_layer": point.get("val_avg_exit_layer"),
            "val_accuracy": point.get("val_accuracy"), "source": "run front"}
    set_halting_choice(run_dir, info)
    tracker.log_event(int(run_id), ev.USER_POINT_CHOICE, {"point": info, "by": "user"})
    return info
