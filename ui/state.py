"""Per-server-process singletons: the tracker and the job manager (``st.cache_resource``)."""
from __future__ import annotations

import streamlit as st

from dact_lib.home import resolve_home
from dact_lib.jobs import JobManager, default_max_jobs
from dact_lib.tracker import Tracker

# transformers' lazy top-level module is not safe to use for the first time from two threads at once (a page's
# script thread and a job's, or two sessions): "cannot import name 'AutoTokenizer' from 'transformers'" (seen on
# Early exit in a fresh server). The names the library uses are resolved once, when the app starts.
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402,F401


#: the CPU niceness of the server's threads (event loop, page scripts, fragments): above the worker processes' 0, so
#: on 2 cores a watched Runs page yields to the training it shows (it took 0.3 core per tab at equal priority).
#: 5, measured (docs/benchmarks.md, "The dashboard never slows the work", runs 5-6): at 10 a third Runs tab did not draw within 60 s; at 5 three
#: tabs cost the training 0.35x instead of 0.10x. $DACT_LAB_PAGE_NICE changes it, 0 = the server's own priority
PAGE_NICE = 5


def page_nice() -> int:
    import os

    try:
        return max(0, min(19, int(os.environ.get("DACT_LAB_PAGE_NICE", PAGE_NICE))))
    except ValueError:
        return PAGE_NICE


def lower_this_thread(nice: int | None = None) -> bool:
    """Raise this thread's niceness to ``nice`` (Linux: per thread, no privilege needed to lower a priority).
    False where the platform does not allow it (nothing changes)."""
    import os
    import threading

    nice = page_nice() if nice is None else nice
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except (AttributeError, OSError):
        return False


def yield_to_jobs() -> None:
    """Run the dashboard below the jobs' CPU priority: the server's main thread (Streamlit's event loop, which
    serialises and sends every page update: most of the server's CPU) and this thread go to PAGE_NICE, and every
    thread the main thread starts later — each page rerun, each fragment timer — inherits it. The jobs' worker
    processes are started from the job spawner thread (dact_lib.jobs.Spawner), created here first at the server's
    own priority, so they keep it. Linux: niceness is per thread and raising it needs no privilege. Idempotent;
    $DACT_LAB_PAGE_NICE = 0 leaves every priority alone."""
    import os

    from dact_lib.jobs import start_spawner

    start_spawner()
    nice = page_nice()
    if nice <= 0:
        return
    lower_this_thread(nice)
    try:
        if os.getpriority(os.PRIO_PROCESS, os.getpid()) < nice:  # the main thread's id is the process id
            os.setpriority(os.PRIO_PROCESS, os.getpid(), nice)
    except (AttributeError, OSError):
        pass


def home() -> str:
    return str(resolve_home())


@st.cache_resource(show_spinner=False)
def _tracker(home_dir: str) -> Tracker:
    return Tracker(home_dir)


@st.cache_resource(show_spinner=False)
def _jobs(home_dir: str) -> JobManager:
    # One job manager per server process: marks runs left 'running' by a dead process as 'interrupted'. Each job
    # runs in its own worker process (the pages never compete with it); DACT_LAB_MAX_JOBS of them at once.
    return JobManager(home_dir, max_concurrent=default_max_jobs(),
                      untrusted_configs=True)  # configs come from browsers: no server file paths


def tracker() -> Tracker:
    return _tracker(home())


def jobs() -> JobManager:
    return _jobs(home())


#: seconds between re-reads of what shows a status (run tables, live curves, progress): every such part of a page
#: uses this one timer, so they change together. ACTIVE_REFRESH_S while a run is starting (queued, or no step
#: logged yet: the first step shows at once), CALM_REFRESH_S once every active run trains (each tab's redraw costs
#: the training CPU on a small machine: docs/benchmarks.md, "The dashboard never slows the work"), IDLE_REFRESH_S
#: while nothing runs (a run started from another tab or the CLI still appears without a reload)
ACTIVE_REFRESH_S = 2.0
CALM_REFRESH_S = 5.0
IDLE_REFRESH_S = 10.0
PERIODS = {"starting": ACTIVE_REFRESH_S, "training": CALM_REFRESH_S, "idle": IDLE_REFRESH_S}


#: session key: whether this page's timers were set up for active work (refresh_every's answer at the last full
#: rerun, or a job submitted since): the sidebar's watch compares it with now
TIMERS_ACTIVE = "status_timers_active"


def anything_active() -> bool:
    """A job of this server or any run of the home is queued or running."""
    from dact_lib.tracker import ACTIVE_STATUSES

    try:
        return jobs().active_count() > 0 or bool(tracker().list_runs(status=list(ACTIVE_STATUSES), limit=1))
    except Exception:  # noqa: BLE001 - a busy database must not break a page
        return False


def status_mode() -> str:
    """``"idle"`` (nothing queued or running), ``"starting"`` (a job is queued, or an active training run has not
    logged a step yet) or ``"training"``."""
    from dact_lib.engines import ENGINE_KINDS
    from dact_lib.tracker import ACTIVE_STATUSES

    try:
        counts = jobs().counts()
        runs = tracker().list_runs(status=list(ACTIVE_STATUSES), limit=50)
        if not runs and not counts.get("running") and not counts.get("queued"):
            return "idle"
        if counts.get("queued") or any(r["status"] == "queued" for r in runs):
            return "starting"
        trained = [r["id"] for r in runs if r["kind"] not in ENGINE_KINDS]
        stepped = tracker().last_steps(trained) if trained else {}
        return "starting" if any(i not in stepped for i in trained) else "training"
    except Exception:  # noqa: BLE001 - a busy database must not break a page
        return "idle"


def refresh_every() -> float:
    """The status timer of this rerun, by :func:`status_mode` (:data:`PERIODS`). Recorded for
    :func:`watch_status`."""
    mode = status_mode()
    st.session_state[TIMERS_ACTIVE] = mode
    return PERIODS[mode]


def watch_status() -> None:
    """Called every ACTIVE_REFRESH_S by the sidebar: when work started, got past its first step or ended since the
    page set up its timers (a job submitted on another page or tab, a run started from the CLI, the last job
    finished), rerun the whole page, so every part that shows a status — run tables, pickers, progress, counts —
    switches together, on the timer the new state asks for."""
    mode = status_mode()
    if mode != st.session_state.get(TIMERS_ACTIVE, mode):
        st.session_state[TIMERS_ACTIVE] = mode
        st.rerun()
