"""PBT: Population Based Training of a population of members trained side by side (``run_pbt``)."""
from __future__ import annotations

import streamlit as st

from ui.forms import Mode, dataclass_fields, dataclass_values, launch_page

st.title("Population Based Training")
st.markdown("Train a **population** of models at once: at every ready point the weakest members copy the weights "
            "of the strongest (*exploit*) and perturb the copied learning rate, weight decay, dropout and warm-up "
            "(*explore*). The head architecture is drawn once for the whole population. Follow the lineage on the "
            "PBT view page.")


def _cfg_cls():
    from dact_lib.tuning.pbt import PBTConfig

    return PBTConfig


def _fields():
    # epochs: the run settings' Epochs (one field, not two)
    return dataclass_fields(_cfg_cls(), "pbt", skip=("epochs",))


def _defaults() -> dict:
    return {"pbt": dataclass_values(_cfg_cls()())}


launch_page("pbt", kinds=("backbone", "dact", "multitask"), kind_label="Member model kind",
            modes=[Mode("PBT", "pbt", _fields, _defaults)])
