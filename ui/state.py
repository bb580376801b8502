"""Per-server-process singletons: the tracker and the job manager (``st.cache_resource``)."""
from __future__ import annotations

import os

import streamlit as st

from dact_lib.home import resolve_home
from dact_lib.jobs import JobManager
from dact_lib.tracker import Tracker


def home() -> str:
    return str(resolve_home())


@st.cache_resource(show_spinner=False)
def _tracker(home_dir: str) -> Tracker:
    return Tracker(home_dir)


@st.cache_resource(show_spinner=False)
def _jobs(home_dir: str) -> JobManager:
    # One job manager per server process: marks runs left 'running' by a dead process as 'interrupted'.
    return JobManager(home_dir, max_concurrent=int(os.environ.get("DACT_LAB_MAX_JOBS", "1")),
                      untrusted_configs=True)  # configs come from browsers: no server file paths


def tracker() -> Tracker:
    return _tracker(home())


def jobs() -> JobManager:
    return _jobs(home())
