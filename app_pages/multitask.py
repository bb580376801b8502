"""Multi-task: one encoder, one head per task, on a two-task dataset (sentence, class_label, sentiment_label)."""
from __future__ import annotations

import streamlit as st

from ui.forms import Mode, launch_page

st.title("Multi-task")
st.markdown("Train **one encoder with two heads** — topic (`class_label`) and sentiment (`sentiment_label`) — on "
            "a two-task dataset such as the bundled demo data. The loss is the task-weighted sum of both heads' "
            "cross-entropies; validation curves are recorded per task.")

launch_page("multitask", kinds=("multitask",), modes=[Mode("Single run", None)])
