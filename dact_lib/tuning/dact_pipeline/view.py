"""What the pages show of a DACT pipeline, read from its parent run's summary and events: the stage-3 points,
the front, the pipeline's (rule) choice and the user's choice for prediction, the exit-policy sweep."""
from __future__ import annotations

from typing import Any, Sequence

from ... import events as ev
from ...front import FrontPoint
from .single import SINGLE
from .stage3 import trial_point


def pipeline_view(run: dict, events: Sequence[dict]) -> dict[str, Any]:
    """What the Pareto explorer shows of a ``dact-pipeline`` parent run, from its summary and events:

    * ``trials`` — every finished stage-3 trial (``trial`` events of stage 'stage3', state complete) as
      :class:`FrontPoint` records;
    * ``front`` — the stage-3 Pareto front (summary ``front``, else the last ``pareto_front`` event), or None;
    * ``pipeline_choice`` — the point the pipeline's choice rule (or ``choose_point``) picked;
    * ``sweep`` / ``num_layers`` — the final model's exit-policy sweep rows (summary, else the last
      ``exit_policy_sweep`` event);
    * ``final_run_id``; ``chosen_run_id`` — the model chosen for prediction in the dashboard (last ``chosen``
      event), or None; ``user_choice`` — that choice's payload (trial, front λ) when it is another point than the
      pipeline's own choice, else None; ``fitted`` — the points share one model (stage 3 fitted halting units per
      point), so a choice swaps halting files instead of runs.
    """
    summary = run.get("summary") or {}
    trials: list[FrontPoint] = []
    front: list[dict] | None = None
    choice: dict | None = None
    sweep, num_layers, chosen, final_id, user = None, None, None, None, None
    for e in events:
        kind, p = e.get("kind"), e.get("payload") or {}
        if kind == ev.TRIAL and p.get("stage") == "stage3" and p.get("state", "complete") == "complete":
            trials.append(trial_point(p.get("number"), p.get("params") or {}, p.get("values"),
                                      p.get("user_attrs") or {}))
        elif kind == ev.PARETO_FRONT and isinstance(p.get("front"), list):
            front = p["front"]
        elif kind == ev.RULE_CHOICE and isinstance(p.get("point"), dict):  # the pipeline's rule (never the user's)
            choice = p["point"]
        elif kind == ev.EXIT_POLICY_SWEEP and isinstance(p.get("rows"), list):
            sweep, num_layers = p["rows"], p.get("num_layers")
            final_id = p.get("final_run_id", final_id)
        elif kind == ev.PREDICTION_CHOICE and p.get("run_id") is not None:
            chosen = p["run_id"]
            user = dict(p) if p.get("source") != "final" else None
    if isinstance(summary.get("front"), list):
        front = summary["front"]
    if choice is None and isinstance(summary.get("chosen"), dict):
        choice = summary["chosen"]
    if isinstance(summary.get("exit_policy_sweep"), list) and summary["exit_policy_sweep"]:
        sweep = summary["exit_policy_sweep"]
    final_id = summary.get("final_run_id", final_id)
    front_pts = [FrontPoint.from_dict(p) for p in front] if front is not None else None
    if not trials and front_pts:
        trials = list(front_pts)
    pipeline_choice = FrontPoint.from_dict(choice) if choice else None
    return {"trials": trials, "front": front_pts, "pipeline_choice": pipeline_choice, "sweep": sweep or [],
            "num_layers": num_layers, "final_run_id": final_id, "chosen_run_id": chosen,
            "user_choice": user if user and user.get("trial") != (pipeline_choice.trial if pipeline_choice
                                                                  else None) else None,
            "fitted": any(p.halting_file for p in trials + list(front_pts or []))}


def point_name(p: FrontPoint | None) -> str:
    """How a front point is named on the pages: ``the single run``, ``threshold τ = …``, ``λ = …`` or
    ``trial n``."""
    if p is None:
        return "?"
    if p.source == SINGLE:
        return "the single run"
    if p.threshold is not None:
        return f"threshold τ = {p.threshold:.3g}"
    return f"λ = {p.front_lambda:.3g}" if p.front_lambda is not None else f"trial {p.trial}"


def prediction_trial(view: dict, current_run_id: Any) -> Any:
    """The stage-3 trial whose halting units the model ``current_run_id`` predicts with, for a pipeline whose
    points share one model (``view["fitted"]``): the user's choice if any, else the pipeline's; None when
    ``current_run_id`` is not the pipeline's final run."""
    final = view.get("final_run_id")
    if current_run_id is None or final is None or int(current_run_id) != int(final):
        return None
    user, rule = view.get("user_choice"), view.get("pipeline_choice")
    return user.get("trial") if user else rule.trial if rule is not None else None


def chosen_prediction_run(tracker, parent_id: int | None = None) -> int | None:
    """The run id last chosen for prediction on the Pareto explorer (a ``chosen`` event on a ``dact-pipeline``
    run: ``parent_id``'s, else the newest over all pipelines), or None. Lets a page restore the choice after a
    reload."""
    parents = [parent_id] if parent_id is not None else [r["id"] for r in tracker.list_runs(kind="dact-pipeline")]
    best = None
    for pid in parents:
        for e in tracker.get_events(pid, kinds=[ev.PREDICTION_CHOICE]):
            rid = (e.get("payload") or {}).get("run_id")
            if rid is not None and (best is None or e["id"] > best[0]):
                best = (e["id"], int(rid))
    return None if best is None else best[1]
