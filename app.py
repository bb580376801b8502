"""DACT Lab — the dashboard entry point: ``streamlit run app.py``.

Builds the navigation (pages grouped as Start / Train / Watch & explore) and the sidebar (the home folder and the
job queue). Every page is a thin view over ``dact_lib``; training runs in background jobs (``dact_lib.jobs``).
The page scripts live in ``app_pages/`` (not ``app_pages/``, which Streamlit would also run on its own as a
folder-based app): every page, deep links included, runs inside this navigation.
"""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="DACT Lab", page_icon=":material/neurology:", layout="wide")

from ui import state  # noqa: E402 - after set_page_config

state.yield_to_jobs()  # the pages run below the jobs' priority: watching never slows the work

#: section -> [(path, title, icon)]
PAGES: dict[str, list[tuple[str, str, str]]] = {
    "Start": [
        ("app_pages/home.py", "Home", ":material/home:"),
        ("app_pages/data.py", "Data", ":material/table:"),
    ],
    "Train": [
        ("app_pages/backbone.py", "Backbone", ":material/model_training:"),
        ("app_pages/dact_pipeline.py", "DACT pipeline", ":material/alt_route:"),
        ("app_pages/pbt.py", "PBT", ":material/groups:"),
        ("app_pages/multitask.py", "Multi-task", ":material/call_split:"),
    ],
    "Watch & explore": [
        ("app_pages/runs.py", "Runs", ":material/monitoring:"),
        ("app_pages/pbt_view.py", "PBT view", ":material/account_tree:"),
        ("app_pages/pareto.py", "Pareto explorer", ":material/scatter_plot:"),
        ("app_pages/early_exit.py", "Early exit", ":material/exit_to_app:"),
        ("app_pages/studies.py", "Studies", ":material/science:"),
        ("app_pages/predict.py", "Predict", ":material/psychology:"),
    ],
}


def build_navigation() -> dict[str, list]:
    nav: dict[str, list] = {}
    for section, pages in PAGES.items():
        nav[section] = [st.Page(path, title=title, icon=icon, default=(path == "app_pages/home.py"))
                        for path, title, icon in pages]
    return nav


def job_counts(watch: bool = True) -> None:
    try:
        counts = state.jobs().counts()
    except Exception as exc:  # noqa: BLE001 - the sidebar never breaks a page
        st.caption(f"Jobs: unavailable ({exc})")
        return
    running, queued = counts.get("running", 0), counts.get("queued", 0)
    st.caption(f"Jobs: **{running}** running, **{queued}** queued")
    if watch:
        state.watch_status()


def sidebar(page_path: str) -> None:
    with st.sidebar:
        st.caption(f"Home: `{state.home()}`")
        if page_path in state.LIVE_PAGES:  # the page's live part carries the status watch: one timer, not two
            job_counts(watch=False)
            return
        # the status watch, on the status timer (ui.state.refresh_every: 2 s while work starts, 10 s per watching tab
        # while runs train, 2 s idle): when a run is queued, gets past its first step, ends or is deleted, the
        # whole page reruns so that every status on it — tables, pickers, progress, these counts — changes together
        st.fragment(job_counts, run_every=state.refresh_every())()


page = st.navigation(build_navigation())
sidebar(page.url_path)
page.run()
