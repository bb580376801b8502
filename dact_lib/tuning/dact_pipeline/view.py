"""What the pages show of a DACT pipeline, read from its parent run's summary and events: the stage-3 points,
the front, the pipeline's (rule) choice and the user's choice for prediction, the exit-policy sweep."""
from __future__ import annotations

from typing import Any, Sequence

from ... import events as ev
from ...plots.pareto import normalize_point
from .settings import front_lambda


def pipeline_view(run: dict, events: Sequence[dict]) -> dict[str, Any]:
    """What the Pareto explorer shows of a ``dact-pipeline`` parent run, from its summary and events:

    * ``trials`` — every finished stage-3 trial (``trial`` events of stage 'stage3', state complete) as points
      (trial, lambda, val_avg_exit_layer, val_accuracy, val_nll / val_error, val_loss, run_id, params);
    * ``front`` — the stage-3 Pareto front (summary ``front``, else the last ``pareto_front`` event), or None;
    * ``pipeline_choice`` — the point the pipeline's choice rule (or ``choose_point``) picked;
    * ``sweep`` / ``num_layers`` — the final model's exit-policy sweep rows (summary, else the last
      ``exit_policy_sweep`` event);
    * ``final_run_id``; ``chosen_run_id`` — the model chosen for prediction in the dashboard (last ``chosen``
      event), or None; ``user_choice`` — that choice's payload (trial, λ) when it is another point than the
      pipeline's own choice, else None; ``fitted`` — the points share one model (stage 3 fitted halting units per
      point), so a choice swaps halting files instead of runs.
    """
    summary = run.get("summary") or {}
    trials, front, choice, sweep, num_layers, chosen, final_id = [], None, None, None, None, None, None
    user = None
    for e in events:
        kind, p = e.get("kind"), e.get("payload") or {}
        if kind == ev.TRIAL and p.get("stage") == "stage3" and p.get("state", "complete") == "complete":
            ua = p.get("user_attrs") or {}
            values = p.get("values") or []
            params = p.get("params") or {}
            pt = {"trial": p.get("number"), "lambda": front_lambda(params) if front_lambda(params) is not None else p.get("lambda"),
                  "val_avg_exit_layer": ua.get("val_avg_exit_layer", values[1] if len(values) > 1 else None),
                  "val_accuracy": ua.get("val_accuracy"), "val_nll": ua.get("val_nll"),
                  "val_loss": ua.get("val_loss"), "run_id": ua.get("run_id"), "params": params,
                  "tau": params.get("tau"), **{k: ua[k] for k in ("halting_file", "spec_lambda") if k in ua}}
            if pt["val_accuracy"] is not None:
                pt["val_error"] = 1.0 - float(pt["val_accuracy"])
            trials.append(pt)
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
    if not trials and front:
        trials = list(front)
    return {"trials": [normalize_point(t) for t in trials],
            "front": [normalize_point(p) for p in front] if front is not None else None,
            "pipeline_choice": normalize_point(choice) if choice else None, "sweep": sweep or [],
            "num_layers": num_layers, "final_run_id": final_id, "chosen_run_id": chosen,
            "user_choice": user if user and user.get("trial") != (choice or {}).get("trial") else None,
            "fitted": any(p.get("halting_file") for p in trials + list(front or []))}


def point_name(p: dict | None) -> str:
    """How a stage-3 point is named on the pages: ``threshold τ = …``, ``λ = …`` or ``trial n``."""
    if not p:
        return "?"
    if p.get("source") == "single run":
        return "the single run"
    if p.get("tau") is not None:
        return f"threshold τ = {p['tau']:.3g}"
    return f"λ = {p['lambda']:.3g}" if p.get("lambda") is not None else f"trial {p.get('trial')}"


def prediction_trial(view: dict, current_run_id: Any) -> Any:
    """The stage-3 trial whose halting units the model ``current_run_id`` predicts with, for a pipeline whose
    points share one model (``view["fitted"]``): the user's choice if any, else the pipeline's; None when
    ``current_run_id`` is not the pipeline's final run."""
    final = view.get("final_run_id")
    if current_run_id is None or final is None or int(current_run_id) != int(final):
        return None
    chosen = view.get("user_choice") or view.get("pipeline_choice") or {}
    return chosen.get("trial")


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
