"""DACT pipeline: DACT-BERT early-exit models — one run, or the full pipeline (``run_pipeline``)."""
from __future__ import annotations

import datetime as _dt

import streamlit as st

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


launch_page("dact", kinds=("dact",), modes=[
    Mode("Single DACT run", None),
    Mode("Full pipeline", "dact-pipeline", _fields, _defaults, prepare_options=_name_from_run,
         help="Give the pipeline a run name to resume it later by that name."),
])
