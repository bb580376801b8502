"""Backbone: fine-tune a BERT-style encoder with an MLP head — one run, or an Optuna study (``tune_backbone``)."""
from __future__ import annotations

import streamlit as st

from ui.fields import Field
from ui.forms import Mode, make_field, dataclass_fields, dataclass_values, launch_page

st.title("Backbone")
st.markdown("Fine-tune an encoder with an MLP classification head on a dataset — a single run with the settings "
            "below, or an **Optuna study** that searches learning rate, batch size, weight decay and "
            "dropout (and epochs when its range is switched on) and then trains the best settings as the final run. "
            "Every trial is scored on the same validation rows (Validation fraction, Split seed). A finished "
            "backbone run can initialise the encoder of a DACT model.")


def _space_cls():
    from dact_lib.tuning.backbone import BackboneSpace

    return BackboneSpace


def _tune_fields() -> list[Field]:
    return [
        make_field("trials", "Trials", "int", help="Number of Optuna trials (each is one training run)."),
        make_field("timeout_min", "Time limit in minutes (0 = none)", "optfloat",
              help="Checked before each trial: no new trial starts after the limit."),
        make_field("study_name", "Study name (optional; an existing study gets more trials)", "text"),
        make_field("final", "Train the best settings as a final run", "bool"),
    ] + dataclass_fields(_space_cls(), "space")


def _tune_defaults() -> dict:
    return {"trials": 10, "timeout_min": None, "study_name": None, "final": True,
            "space": dataclass_values(_space_cls()())}


launch_page("backbone", kinds=("backbone",), modes=[
    Mode("Single run", None),
    Mode("Optuna tuning", "tune-backbone", _tune_fields, _tune_defaults,
         help="Optuna tuning runs several trials (TPE sampler, median pruner) and records them as a study."),
])
