"""DACT Lab — the dashboard entry point: ``streamlit run app.py``.

Builds the navigation (pages grouped as Start / Train / Watch & explore) and the sidebar (the home folder and the
job queue). Every page is a thin view over ``dact_lib``; training runs in background jobs (``dact_lib.jobs``).
A page whose file is missing is skipped, so the app runs while pages are still being written.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="DACT Lab", page_icon=":material/neurology:", layout="wide")

from ui import state  # noqa: E402

#: section -> [(path, title, icon)]
PAGES: dict[str, list[tuple[str, str, str]]] = {
    "Start": [
        ("pages/home.py", "Home", ":material/home:"),
        ("pages/data.py", "Data", ":material/table:"),
    ],
    "Train": [
        ("pages/backbone.py", "Backbone", ":material/model_training:"),
        ("pages/dact_pipeline.py", "DACT pipeline", ":material/alt_route:"),
        ("pages/pbt.py", "PBT", ":material/groups:"),
        ("pages/multitask.py", "Multi-task", ":material/call_split:"),
    ],
    "Watch & explore": [
        ("pages/runs.py", "Runs", ":material/monitoring:"),
        ("pages/pbt_view.py", "PBT view", ":material/account_tree:"),
        ("pages/pareto.py", "Pareto explorer", ":material/scatter_plot:"),
        ("pages/early_exit.py", "Early exit", ":material/exit_to_app:"),
        ("pages/studies.py", "Studies", ":material/science:"),
        ("pages/predict.py", "Predict", ":material/psychology:"),
    ],
}


def build_navigation() -> dict[str, list]:
    nav: dict[str, list] = {}
    for section, pages in PAGES.items():
        entries = [st.Page(path, title=title, icon=icon, default=(path == "pages/home.py"))
                   for path, title, icon in pages if (ROOT / path).is_file()]
        if entries:
            nav[section] = entries
    return nav


def sidebar() -> None:
    with st.sidebar:
        st.caption(f"Home: `{state.home()}`")
        try:
            counts = state.jobs().counts()
        except Exception as exc:  # noqa: BLE001 - the sidebar never breaks a page
            st.caption(f"Jobs: unavailable ({exc})")
            return
        running, queued = counts.get("running", 0), counts.get("queued", 0)
        st.caption(f"Jobs: **{running}** running, **{queued}** queued")


page = st.navigation(build_navigation())
sidebar()
page.run()
