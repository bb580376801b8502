"""Pareto explorer: a DACT pipeline's stage-3 λ trade-off, the exit-policy comparison of its final model, and the
choice of the model used for prediction (``st.session_state["predict_run_id"]``, persisted as a ``chosen`` event
on the pipeline run so it survives reloads)."""
from __future__ import annotations

import functools
from pathlib import Path


import pandas as pd
import streamlit as st

from dact_lib import events as ev, plots
from dact_lib.front import FrontPoint
from dact_lib.tracker import ACTIVE_STATUSES
from dact_lib.models import halting_choice
from dact_lib.run_front import choose_run_point, run_front
from dact_lib.tuning.dact_pipeline.view import chosen_prediction_run, pipeline_view, point_name, prediction_trial
from dact_lib.tuning.pipeline_runs import explorer_runs, since_last_resume
from ui.deploy import latency_budget_panel
from ui.forms import form_words
from ui.safe import plain
from ui import state
from ui.state import tracker

def _use_run_point(rid: int, options: dict) -> None:
    """The chosen point of a single run's front becomes the one its model predicts with (nothing retrained)."""
    from dact_lib.errors import DactLabError

    label = st.session_state.get(f"pareto_single_pick_{rid}")
    if label not in options:
        return
    try:
        got = choose_run_point(tr, rid, options[label])
    except DactLabError as exc:
        st.session_state["_pareto_msg"] = ("error", str(exc))
        return
    st.session_state["predict_run_id"] = rid
    st.session_state["_pareto_msg"] = ("success", f"Run #{rid} now predicts with " + (
        f"{point_name(got)} (its halting units swapped in, nothing retrained)." if got else "its own point."))


def single_run_explorer(tr, singles: list[dict]) -> None:
    """A single DACT run's fitted halting front (report.json): the same chart and table as a pipeline's; any point
    can be used for prediction (its halting weights were kept at training time)."""
    by_run = {r["id"]: r for r in singles}
    rid = st.selectbox("Single DACT run", list(by_run), key="pareto_single",
                       format_func=lambda i: f"#{i} {by_run[i].get('name') or 'dact'}"
                       + (f" · {by_run[i]['tag']}" if by_run[i].get("tag") else ""))
    rf = run_front(tr.run_dir(rid))
    if rf is None:  # its report changed since the list was read
        st.info(f"Run #{rid} has no fitted halting front.")
        return
    chosen = rf["chosen"]
    in_use = halting_choice(tr.run_dir(rid))
    own = chosen.trial if chosen is not None else None
    using = in_use.get("trial") if in_use and in_use.get("source") == "run front" else own
    msg = st.session_state.pop("_pareto_msg", None)
    if msg:
        getattr(st, msg[0])(msg[1])
    st.caption(f"Halting fit on the validation split ({rf['rows'] or '?'} rows"
               + (", accuracy and exit layer cross-fitted: measured on rows the units were not fitted on"
                  if rf["cross_fitted"] else "") + ")"
               + (f" · the run kept {point_name(chosen)}, the fastest point within "
                  f"{rf['tolerance_points']:g} accuracy points of the best" if chosen and
                  rf["tolerance_points"] is not None else ""))
    fig = plots.lambda_pareto_figure(rf["points"], rf["front"], pipeline_trial=own)
    for trace in fig.data:  # the ring marks the run's own choice here
        if trace.name == "pipeline's choice":
            trace.name = "the run's choice"
    st.plotly_chart(fig, key=f"pareto_single_chart_{rid}")
    rows = sorted(rf["front"], key=lambda p: p.val_avg_exit_layer or 0)
    if chosen is not None and all(p.trial != own for p in rows):
        rows.append(chosen)
    st.subheader("Pareto front")
    st.dataframe(pd.DataFrame([{
        "point": point_name(p), "kind": p.family, "λ": p.front_lambda, "τ": p.threshold,
        "val accuracy": p.val_accuracy, "val avg exit layer": p.val_avg_exit_layer,
        "run's choice": chosen is not None and p.trial == own,
        "for prediction": p.trial == using} for p in rows]), hide_index=True,
        column_config={"λ": st.column_config.NumberColumn(format="%.3g"),
                       "τ": st.column_config.NumberColumn(format="%.3g")})
    options = {f"the run's own point ({point_name(chosen)})" if chosen else "the run's own point": None}
    for p in rows:
        if chosen is None or p.trial != own:
            options[f"{point_name(p)} · exit {p.val_avg_exit_layer:.2f} · acc {p.val_accuracy:.3f}"] = p.trial
    st.selectbox("Use for prediction", list(options), index=None, placeholder="choose a front point…",
                 key=f"pareto_single_pick_{rid}", on_change=_use_run_point, args=(rid, options),
                 help="The run's model then predicts (Predict page, export, serve) with this point's halting units; "
                      "nothing is retrained. The run's own point stays recorded.")
    if using is not None and chosen is not None and using != own:
        st.info(f"Run #{rid} predicts with point {using} (your choice); its own point is {point_name(chosen)}.")


st.title("Pareto explorer")
tr = tracker()
# a job started again under a pipeline's name resumes the earlier run: that run holds the stages, not the job's
pipes = explorer_runs(tr)
singles = [r for r in tr.list_runs(kind="dact") if r["status"] == "finished" and r.get("parent_id") is None
           and run_front(tr.run_dir(r["id"])) is not None]
if not pipes and not singles:
    st.info("No DACT pipeline runs yet. Run the staged DACT tuning (DACT pipeline page or "
            "`python -m dact_lib dact-pipeline --name NAME`); its λ trade-off and exit-policy comparison show up here.")
    state.stop()

if st.session_state.get("predict_run_id") is None:  # a reload: restore the persisted choice
    restored = chosen_prediction_run(tr)
    if restored is not None:
        st.session_state["predict_run_id"] = restored

SINGLE = "Single DACT run"
source = "DACT pipeline" if pipes else SINGLE
if pipes and singles:
    source = st.radio("Explore", ["DACT pipeline", SINGLE], horizontal=True, key="pareto_source",
                      help="A single DACT run's front: the λ and τ points its halting fit measured.")
if source == SINGLE:
    single_run_explorer(tr, singles)
    state.stop()

by_id = {r["id"]: r for r in pipes}
asked = st.session_state.get("pareto_parent")
if asked is not None and asked not in by_id:  # e.g. a job's run that resumed another: open the one it resumed
    target = next((r["id"] for r in pipes if asked in r["resumed_by"]), None)
    st.session_state["pareto_parent"] = target if target is not None else pipes[0]["id"]


def _pipe_label(i: int) -> str:
    r = by_id[i]
    jobs = ", ".join(f"#{j}" for j in r["resumed_by"])
    return (f"#{i} {r.get('name') or 'pipeline'} · {r['status']}"
            + (f" · resumed by job {jobs}" if jobs else ""))


pid = st.selectbox("DACT pipeline run", list(by_id), key="pareto_parent", format_func=_pipe_label)
active = by_id[pid]["status"] in ACTIVE_STATUSES


def choose(parent_id: int, pick: tuple[FrontPoint, str] | None) -> None:
    """Make a point's model the prediction model: session state + the pipeline's record of the choice. ``pick``:
    the point and where it was chosen ("front", or "final": the final model as the pipeline chose it)."""
    if pick is None:
        return
    point, source = pick
    from dact_lib.errors import DactLabError
    from dact_lib.tuning.dact_pipeline import choose_for_prediction

    try:
        got = choose_for_prediction(parent_id, point, tracker=tr, source=source)
    except DactLabError as exc:
        st.session_state["_pareto_msg"] = ("error", str(exc))
        return
    rid = got["run_id"]
    st.session_state["predict_run_id"] = rid
    what = point_name(point)
    if got.get("halting"):
        text = (f"Trial {point.trial} ({what}) is now used for prediction: run #{rid} with that point's "
                "halting units (swapped in, nothing retrained). The pipeline's own choice stays recorded.")
    elif point.halting_file or source == "final":
        text = f"Run #{rid} with the pipeline's own choice of halting units is now used for prediction."
    else:
        text = f"Run #{rid} (trial {point.trial}, {what}) is now the model used on the Predict page."
    st.session_state["_pareto_msg"] = (
        "success" if got["has_model"] else "warning",
        text + ("" if got["has_model"] else " Its model file is missing, so prediction will fail: choose another."))


def _on_select_box(parent_id: int, options: dict) -> None:
    choose(parent_id, options.get(st.session_state.get(f"pareto_pick_{parent_id}")))


def _on_chart_select(parent_id: int, key: str, by_trial: dict, by_run: dict) -> None:
    state = st.session_state.get(key)
    points = (state or {}).get("selection", {}).get("points", []) if isinstance(state, dict) else \
        getattr(getattr(state, "selection", None), "points", None) or []
    for p in points:
        cd = p.get("customdata") if isinstance(p, dict) else None
        if not cd:
            continue
        trial, rid = cd[0], cd[1] if len(cd) > 1 else None
        pt = by_trial.get(trial) or by_run.get(rid)
        if pt is not None:
            choose(parent_id, (pt, "front"))
            return


def _same_point(p: FrontPoint, q: FrontPoint | None) -> bool:
    """The same stage-3 point: its trial number when both have one, else its λ / τ and source."""
    if q is None:
        return False
    if p.trial is not None and q.trial is not None:
        return p.trial == q.trial
    return (p.front_lambda, p.threshold, p.source) == (q.front_lambda, q.threshold, q.source)


def explorer(parent_id: int) -> None:
    run = tr.get_run(parent_id)
    view = pipeline_view(run, tr.get_events(parent_id))
    summary = run.get("summary") or {}
    done = ", ".join(summary.get("stages_done") or []) or "none"
    pc = view["pipeline_choice"]
    st.caption(f"status **{run['status']}** · stages done: {done}"
               + (f" · pipeline's choice: trial {pc.trial} ({point_name(pc)})" if pc else "")
               + (f" · final model: run #{view['final_run_id']}" if view["final_run_id"] else ""))
    decision = summary.get("final_choice")
    if decision:  # which model the pipeline returned: stage 3's point or its single run, and why
        who = "its single run" if decision.get("winner") == "single run" else "stage 3's point"
        st.caption(f"Final model = {who}: {plain(decision.get('why'))}.")
    for w in summary.get("warnings") or []:
        st.warning(plain(w))
    def guard_text(g: dict) -> str:
        return (plain(form_words(g["message"])) if g.get("message") else
                f"{g.get('stage')}: the model is no better than the majority class.")

    # a resumed pipeline: the guard that stopped an earlier attempt is history, not this attempt's error
    earlier, now = since_last_resume(tr.get_events(parent_id, kinds=[ev.GUARD_FAILED, ev.RESUMED]))
    for g in (e["payload"] for e in now if e["kind"] == ev.GUARD_FAILED):
        st.error(guard_text(g))
    old = [e["payload"] for e in earlier if e["kind"] == ev.GUARD_FAILED]
    if old:
        with st.expander(f"An earlier attempt stopped ({len(old)} guard message{'s' if len(old) > 1 else ''}); "
                         "the pipeline was resumed since"):
            for g in old:
                st.caption(guard_text(g))
    current = st.session_state.get("predict_run_id")
    fitted, uc = view["fitted"], view["user_choice"]
    active = prediction_trial(view, current)
    if current is None:
        st.info("No model chosen for prediction yet: pick a front point below (or click one on the chart).")
    elif fitted and active is not None:
        st.info(f"Model used for prediction: **run #{current}** with the halting units of **trial {active}**"
                + (" (your choice; the pipeline's choice is trial "
                   f"{pc.trial if pc else '?'})" if uc else " (the pipeline's choice)"))
    else:
        st.info(f"Model used for prediction: **run #{current}**")
    msg = st.session_state.pop("_pareto_msg", None)
    if msg:
        getattr(st, msg[0])(msg[1])

    trials, front = view["trials"], view["front"]
    front_pts = front if front is not None else [p for p, on in zip(trials, plots.front_mask(trials)) if on]
    by_trial = {p.trial: p for p in trials + (front or []) if p.trial is not None}
    by_run = {p.run_id: p for p in trials + (front or []) if p.run_id is not None}

    key = f"pareto_chart_{parent_id}"
    fig = plots.lambda_pareto_figure(trials, front, chosen_run_id=None if fitted else current,
                                     chosen_trial=active if fitted else None,
                                     pipeline_trial=pc.trial if fitted and pc else None,
                                     sweep=view["sweep"] if fitted else None)
    st.plotly_chart(fig, key=key, on_select=functools.partial(_on_chart_select, parent_id, key, by_trial, by_run),
                    selection_mode="points")
    if front is None and trials:
        st.caption("Stage 3 is still running: the highlighted points are the current non-dominated trials.")

    options: dict[str, tuple[FrontPoint, str]] = {}
    if view["final_run_id"] is not None:
        final = FrontPoint(run_id=view["final_run_id"], trial=pc.trial if pc else None,
                           front_lambda=pc.front_lambda if pc else None)
        options[f"final model · run #{view['final_run_id']} · the pipeline's choice ({point_name(pc)})"] = (
            final, "final")
    for p in sorted(front_pts, key=lambda p: p.val_avg_exit_layer or 0):
        label = (f"trial {p.trial} · {point_name(p)} · exit {p.val_avg_exit_layer:.2f} · "
                 f"acc {p.val_accuracy:.3f}" if p.val_avg_exit_layer is not None else f"trial {p.trial}")
        if not fitted:
            label += f" · run #{p.run_id}" if p.run_id is not None else " · no run"
        options[label] = (p, "front")
    if options:
        st.selectbox("Use for prediction", list(options), index=None, placeholder="choose a front point…",
                     key=f"pareto_pick_{parent_id}", on_change=_on_select_box, args=(parent_id, options))

    table_pts = sorted(front_pts, key=lambda p: p.val_avg_exit_layer or 0)
    if pc and not any(_same_point(p, pc) for p in table_pts):  # the pipeline's choice is always in the table
        table_pts.append(pc)
    if table_pts:
        st.subheader("Pareto front")
        if pc and not any(_same_point(p, pc) for p in front_pts):
            st.caption(f"The last row is the pipeline's choice ({point_name(pc)}): it is not on the front above "
                       "(e.g. the single run, or a point chosen within the accuracy tolerance on other rows).")
        st.dataframe(pd.DataFrame([{
            "trial": p.trial, "λ": p.front_lambda, "τ": p.threshold, "val NLL": p.val_nll,
            "val error": p.val_error,
            "val accuracy": p.val_accuracy, "val avg exit layer": p.val_avg_exit_layer, "run": p.run_id,
            "pipeline's choice": bool(pc and _same_point(p, pc)),
            "for prediction": (p.trial is not None and p.trial == active) if fitted else
            (current is not None and p.run_id is not None and int(p.run_id) == int(current)),
        } for p in table_pts]), hide_index=True,
            column_config={"λ": st.column_config.NumberColumn(format="%.3g")})

    st.subheader("Exit policies on the final model")
    if view["sweep"] and fitted:
        st.caption("Every λ / τ point above and the entropy, patience and fixed-depth curves on the chart run the "
                   "same weights (the final model): only the exit rule differs.")
        with st.expander("Sweep rows"):
            st.dataframe(pd.DataFrame(view["sweep"]), hide_index=True)
    elif view["sweep"]:
        st.plotly_chart(plots.exit_policy_figure(view["sweep"], view["num_layers"]), key=f"pareto_sweep_{parent_id}")
        with st.expander("Sweep rows"):
            st.dataframe(pd.DataFrame(view["sweep"]), hide_index=True)
    else:
        st.caption("The exit-policy sweep is recorded when the final training has finished.")

    st.subheader("Latency budget")
    model_run = current if current is not None else view["final_run_id"]
    if model_run is None:
        st.caption("Once the pipeline has a final model: the most accurate exit point within a latency budget, "
                   "measured on this machine with the runtime that will serve it.")
    else:
        st.caption(f"On run #{model_run} (the model used for prediction): the most accurate exit point whose "
                   "batch-1 latency, measured on this machine with the runtime that will serve it, fits the budget.")
        latency_budget_panel(int(model_run), Path(tr.run_dir(int(model_run))), key="pareto")


# on the status timer while the pipeline is active; it carries the page's status watch (ui.state.live_part)
state.live_part(explorer, active)(pid)
