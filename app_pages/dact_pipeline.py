"""DACT pipeline: DACT-BERT early-exit models — one run, or the full pipeline (``run_pipeline``)."""
from __future__ import annotations

import datetime as _dt

import streamlit as st

from ui import state
from ui.forms import Mode, dataclass_fields, dataclass_values, launch_page

st.title("DACT pipeline")
st.markdown("**DACT-BERT** adds a classifier and a halting unit after every encoder layer; at inference a text "
            "leaves the encoder as soon as the accumulated answer can no longer change — fewer layers for easy "
            "texts. Train one DACT model with the settings below, or run the **staged pipeline**: (1) the heads' "
            "architecture on cached features of the frozen encoder, (2) the training parameters, (3) the ponder "
            "cost λ as a two-objective study (validation loss vs average exit layer — see the Pareto explorer), "
            "then (4) the final model. Starting a pipeline again with the same name resumes it.")


def _cfg_cls():
    from dact_lib.tuning.dact_pipeline import PipelineConfig

    return PipelineConfig


def _fields():
    # the pipeline's name is the run name field (one name: Jobs, Runs and the resume key agree)
    return dataclass_fields(_cfg_cls(), "pipeline", skip=("name",))


def _name_from_run(cfg, options: dict) -> dict:
    """The pipeline is named by the form's run name (starting a pipeline again with the same name resumes it);
    without one, the loaded config's pipeline name, else a fresh name for this session."""
    pipe = dict(options.get("pipeline") or {})
    pipe["name"] = cfg.name or pipe.get("name") or st.session_state["dact:pipeline-name"]
    return {**options, "pipeline": pipe}


def _defaults() -> dict:
    # A pipeline is resumed by its name: a new session suggests a fresh one.
    name = st.session_state.setdefault("dact:pipeline-name", f"pipeline-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    return {"pipeline": dataclass_values(_cfg_cls()(name=name))}


def _resume_notice(cfg, options: dict | None, run_id: int | None) -> None:
    """Say which earlier run a pipeline of this name resumes (its stages go on there, not in the job's run), and
    open the Pareto explorer on it."""
    from dact_lib.tuning.pipeline_runs import pipeline_to_resume

    name = ((options or {}).get("pipeline") or {}).get("name")
    try:
        prev = pipeline_to_resume(state.tracker(), name, new_run_id=run_id)
    except Exception:  # noqa: BLE001 - a notice never breaks the page
        return
    if prev is None:
        return
    n = prev["id"]
    done = ", ".join((prev.get("summary") or {}).get("stages_done") or []) or "none"
    if run_id is None:
        st.info(f"A pipeline named “{name}” exists: run #{n} ({prev['status']}; stages done: {done}). Start resumes "
                f"run #{n} — with the same run settings (other settings are refused: give a new run name to start "
                "afresh).")
        return
    st.session_state["pareto_parent"] = n
    st.info(f"Job #{run_id} resumes pipeline “{name}”, run #{n} ({prev['status']}; stages done: {done}): its "
            f"stages, trials and final model are recorded on run #{n}, which the Pareto explorer shows.")


launch_page("dact", kinds=("dact",), modes=[
    Mode("Single DACT run", None),
    Mode("Full pipeline", "dact-pipeline", _fields, _defaults, prepare_options=_name_from_run, notice=_resume_notice,
         help="Give the pipeline a run name to resume it later by that name."),
])
