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
