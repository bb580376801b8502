"""One point of an accuracy-vs-exit-layer front, as every producer writes it and every reader gets it.

A :class:`FrontPoint` is made by the halting fit after a DACT run (``halting.HaltingPoint.record``, stored in the
run's report.json), by stage 3 of the DACT pipeline (one per trial, stored in the stage records, events and the
parent run's summary) and by the final stage (its report's points); the Pareto explorer, the plots, the reporters
and the model card read it. Stored, it is :meth:`FrontPoint.to_dict` (the field names below, fields at their
default left out); it is read back only through :meth:`FrontPoint.from_dict`, which also reads the spellings that
runs and pipelines recorded before this record existed (:data:`LEGACY_KEYS`).

Two λ never share a name: ``front_lambda`` is the halting fit's normalised λ̃ (``model.halting_lambdas``, stage 3's
``front_lambda`` parameter) and ``train_lambda`` the same λ on the training loss's scale (λ̃ · nll_ref / N, what
``model.ponder_lambda`` would be set to: docs/dact_maths.md, "Two scales of λ").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

__all__ = ["FrontPoint", "LEGACY_KEYS", "REPORT_FAMILIES", "front_mask", "report_chosen", "report_points"]


@dataclass(frozen=True)
class FrontPoint:
    """A point of a front: its validation numbers and what sets its exits (a fitted λ or a threshold τ)."""

    val_accuracy: float | None = None  # 0..1, under the DACT rule on the validation rows
    val_avg_exit_layer: float | None = None  # 1..N
    front_lambda: float | None = None  # the normalised λ̃ of fitted halting units; None for a threshold point
    train_lambda: float | None = None  # front_lambda on the training loss's scale
    threshold: float | None = None  # τ of threshold halting units (halting.threshold_state)
    scale: float = 1.0  # z -> scale · z + shift of the halting logit (calibrated points of older runs)
    shift: float = 0.0
    val_nll: float | None = None  # NLL of a_N (stage 3, cross-fitted)
    val_loss: float | None = None
    objective: str | None = None  # stage 3's first objective: "val_nll" or "val_error"
    trial: int | None = None  # stage 3: the trial number; a single run's front: the point's index
    run_id: int | None = None  # the run whose model the point's halting units belong to
    # the point's halting weights: under the artifacts root for a stage-3 point, in the run folder for the points
    # of a run's report
    halting_file: str | None = None
    family: str | None = None  # a run's front: "λ", "calibrated λ" or "threshold τ"
    cross_fitted: bool | None = None  # the validation numbers are out of fold (halting.cross_fit_halting)
    seen_val_accuracy: float | None = None  # cross-fitted points: the numbers on the rows the units were fitted on
    seen_val_avg_exit_layer: float | None = None
    fit_s: float | None = None
    source: str | None = None  # "single run": the pipeline's single run (tuning.dact_pipeline.single)
    measured: str | None = None  # how a single run's point was measured
    params: Mapping[str, Any] = field(default_factory=dict)  # stage 3: the trial's Optuna parameters

    @property
    def val_error(self) -> float | None:
        return None if self.val_accuracy is None else 1.0 - self.val_accuracy

    @property
    def kind(self) -> str:
        """"threshold" (threshold units τ) or "fitted" (halting units fitted at a λ)."""
        return "threshold" if self.threshold is not None else "fitted"

    def objective_value(self) -> float | None:
        """The value of stage 3's first objective (``objective``) at this point."""
        return {"val_nll": self.val_nll, "val_error": self.val_error}.get(self.objective or "")

    def brief(self) -> FrontPoint:
        """The point as a halting choice names it: trial, λ or τ and its validation numbers."""
        return FrontPoint(val_accuracy=self.val_accuracy, val_avg_exit_layer=self.val_avg_exit_layer,
                          front_lambda=self.front_lambda, threshold=self.threshold, trial=self.trial)

    def same_point(self, other: FrontPoint) -> bool:
        """The same point of one run's front: the same λ or τ, calibration and validation numbers."""
        keys = ("front_lambda", "threshold", "scale", "shift", "val_avg_exit_layer", "val_accuracy")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: every field not at its default, under its own name."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "params":
                if v:
                    out["params"] = dict(v)
            elif v != f.default:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrontPoint:
        """A stored point, in this record's spelling or an older one (:data:`LEGACY_KEYS`; an older stage-3 point's
        λ may sit in its ``params``). Numbers that are missing, not numbers or not finite read as None."""
        raw_params = d.get("params")
        params: Mapping[str, Any] = raw_params if isinstance(raw_params, Mapping) else {}
        got: dict[str, Any] = {"params": dict(params)}
        for f in fields(cls):
            if f.name == "params":
                continue
            keys = (f.name, *LEGACY_KEYS.get(f.name, ()))
            raw = next((d[k] for k in keys if d.get(k) is not None), None)
            if raw is None and f.name in _IN_PARAMS:
                raw = next((params[k] for k in _IN_PARAMS[f.name] if params.get(k) is not None), None)
            got[f.name] = _convert(f.name, raw)
        if got["val_accuracy"] is None:
            err = finite_number(next((d[k] for k in ("val_error", "error") if d.get(k) is not None), None))
            got["val_accuracy"] = None if err is None else 1.0 - err
        for name in ("scale", "shift"):
            if got[name] is None:
                got[name] = 1.0 if name == "scale" else 0.0
        return cls(**got)


#: the older spellings :meth:`FrontPoint.from_dict` reads, by field (the first one found wins)
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "val_accuracy": ("accuracy",),
    "val_avg_exit_layer": ("avg_exit_layer", "exit_layer"),
    "front_lambda": ("lambda", "ponder_lambda", "lam"),
    "train_lambda": ("spec_lambda",),
    "threshold": ("tau",),
    "val_nll": ("nll",),
    "val_loss": ("loss",),
    "trial": ("number", "trial_number"),
    "halting_file": ("file",),
    "seen_val_accuracy": ("seen_accuracy",),
    "seen_val_avg_exit_layer": ("seen_avg_exit_layer",),
}
# where an older stage-3 point kept its λ or τ: in the trial's parameters
_IN_PARAMS: dict[str, tuple[str, ...]] = {
    "front_lambda": ("front_lambda", "lambda", "ponder_lambda", "model.ponder_lambda", "lam"),
    "threshold": ("tau",),
}
_TEXT = {"objective", "halting_file", "family", "source", "measured"}


def finite_number(v: Any) -> float | None:
    """``v`` as a finite float; None for missing, non-numeric, NaN or infinite values (how a stored record says "no
    number")."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _convert(name: str, raw: Any) -> Any:
    if raw is None:
        return None
    if name in _TEXT:
        return str(raw)
    if name == "cross_fitted":
        return bool(raw)
    if name in ("trial", "run_id"):
        return int(raw) if str(raw).lstrip("-").isdigit() else None
    return finite_number(raw)


#: the lists of a run's halting report (report.json "halting", halting.fit_after_training) that hold front points,
#: with the family each one's points belong to
REPORT_FAMILIES = (("λ", "points"), ("calibrated λ", "calibrated_front"), ("threshold τ", "threshold_points"))


def report_points(halting: Mapping[str, Any]) -> list[FrontPoint]:
    """Every point of a halting report, its ``family`` set, in the report's order (λ, calibrated λ, threshold τ)."""
    return [replace(FrontPoint.from_dict(p), family=family) for family, key in REPORT_FAMILIES
            for p in halting.get(key) or [] if isinstance(p, Mapping)]


def report_chosen(halting: Mapping[str, Any]) -> FrontPoint | None:
    """The point a halting report says its run kept, or None."""
    chosen = halting.get("chosen")
    return FrontPoint.from_dict(chosen) if isinstance(chosen, Mapping) and chosen else None


def front_mask(points: Sequence[FrontPoint]) -> list[bool]:
    """Non-dominated points (lower average exit layer, higher accuracy is better); points missing either are never
    on it."""
    ok = [p.val_avg_exit_layer is not None and p.val_accuracy is not None for p in points]
    out = []
    for i, p in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        px, py = float(p.val_avg_exit_layer or 0.0), float(p.val_accuracy or 0.0)
        dominated = False
        for j, q in enumerate(points):
            if j == i or not ok[j]:
                continue
            qx, qy = float(q.val_avg_exit_layer or 0.0), float(q.val_accuracy or 0.0)
            if qx <= px and qy >= py and (qx < px or qy > py):
                dominated = True
                break
        out.append(not dominated)
    return out
