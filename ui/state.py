"""Per-server-process singletons: the tracker and the job manager (``st.cache_resource``)."""
from __future__ import annotations

import threading

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


#: seconds between re-reads of what shows a status live (the Runs page's progress; its curves: CHARTS_REFRESH_S)
#: and of the page's status watch (the sidebar's, or a live page's live part: LIVE_PAGES), which reruns the whole
#: page when the runs a page lists change (so run tables and job panels need no timer of their own):
#: ACTIVE_REFRESH_S while nothing trains (a run queued from another tab or the CLI appears at once) or a run is
#: changing state (queued, no step logged yet: the first step shows at once; or being cancelled:
#: 'cancelled' shows at once), CALM_REFRESH_S once
#: every active run trains. Each redraw costs the watching tab's browser and the server CPU, the training's on a
#: small machine (docs/benchmarks.md, "The dashboard never slows the work"), so while runs train the period grows
#: with the number of tabs watching: all of them together redraw as often as one. Besides its redraws, each open
#: tab pays a fixed cost in Chromium — the garbage collections of its own ~30 MB JS heap (Plotly's code most of it)
#: that follow each burst of work — so three tabs cost more than one on the same number of redraws: at 10 s (it
#: was 5 s) three Runs tabs took 2.09 browser CPU-s a minute instead of 2.96 (bench/ui_tab_cost.py; docs/
#: benchmarks.md, runs 16-17). $DACT_LAB_REFRESH_S changes it (seconds, ACTIVE_REFRESH_S..MAX_REFRESH_S:
#: :func:`calm_refresh_s`).
ACTIVE_REFRESH_S = 2.0
CALM_REFRESH_S = 10.0
MAX_REFRESH_S = 30.0
PERIODS = {"starting": ACTIVE_REFRESH_S, "training": CALM_REFRESH_S, "idle": ACTIVE_REFRESH_S}
#: a tab whose status watch has not run for this long is closed (it stops counting among the watching tabs)
WATCH_GONE_S = MAX_REFRESH_S + 10.0


#: session key: whether this page's timers were set up for active work (refresh_every's answer at the last full
#: rerun, or a job submitted since): the status watch compares it with now
TIMERS_ACTIVE = "status_timers_active"
#: session keys: the period this page's timers were set up with, and the status signature they were set up for
TIMERS_PERIOD = "status_timers_period"
TIMERS_SIGNATURE = "status_timers_signature"
#: session key: this browser session's id in the server's count of watching tabs
SESSION_ID = "status_session_id"

_watch_lock = threading.Lock()
_last_watch: dict[str, float] = {}  # session id -> time of its last status watch, for every session of this server
_runtime_ids: dict[str, str] = {}  # session id -> Streamlit's id of that browser session, where known


def note_watch(now: float | None = None) -> None:
    """Count this session among the tabs watching this server (its page's status watch just ran)."""
    import time
    import uuid

    from streamlit.runtime.scriptrunner import get_script_run_ctx

    sid = st.session_state.setdefault(SESSION_ID, uuid.uuid4().hex)
    ctx = get_script_run_ctx()
    with _watch_lock:
        _last_watch[sid] = time.monotonic() if now is None else now
        if ctx is not None:
            _runtime_ids[sid] = ctx.session_id


def _session_alive(runtime_id: str) -> bool:
    """Whether Streamlit still holds that browser session connected (True where it cannot tell)."""
    try:
        from streamlit.runtime import Runtime

        return not Runtime.exists() or Runtime.instance().is_active_session(runtime_id)
    except Exception:  # noqa: BLE001 - never break a page over a count
        return True


def watching_tabs(now: float | None = None) -> int:
    """How many browser sessions of this server ran their status watch within the last WATCH_GONE_S and are still
    connected: a tab closed or reloaded stops counting at once (its old session disconnected; the first progress
    after reloading Runs waited two tabs' period while it counted), one that went away unseen after WATCH_GONE_S."""
    import time

    now = time.monotonic() if now is None else now
    with _watch_lock:
        for sid in [k for k, t in _last_watch.items()
                    if now - t > WATCH_GONE_S or (k in _runtime_ids and not _session_alive(_runtime_ids[k]))]:
            del _last_watch[sid]
            _runtime_ids.pop(sid, None)
        return len(_last_watch)


def per_tab(base: float, cap: float, tabs: int | None = None) -> float:
    """``base`` seconds per watching tab (``tabs``, default :func:`watching_tabs`), at most ``cap``: a timer on this
    period in every tab redraws, all tabs together, as often as one tab on ``base``."""
    return min(cap, base * max(1, watching_tabs() if tabs is None else tabs))


def _seconds_setting(name: str, default: float, low: float) -> float:
    """``$name`` as a number of seconds, at least ``low``; ``default`` where unset or not a number (a page never
    breaks on it)."""
    import os

    try:
        return max(low, float(os.environ.get(name, default)))
    except ValueError:
        return default


def calm_refresh_s() -> float:
    """The status period while runs train, per watching tab: CALM_REFRESH_S, or $DACT_LAB_REFRESH_S where set to a
    number of seconds, kept within ACTIVE_REFRESH_S..MAX_REFRESH_S (a tab that waited longer would stop counting
    among the watching tabs: WATCH_GONE_S)."""
    return min(MAX_REFRESH_S, _seconds_setting("DACT_LAB_REFRESH_S", CALM_REFRESH_S, ACTIVE_REFRESH_S))


def period_for(mode: str, tabs: int) -> float:
    """The status timers' period in ``mode`` with ``tabs`` tabs watching: while runs train, :func:`calm_refresh_s`
    per tab (capped at MAX_REFRESH_S), so all the tabs together redraw as often as one; starting and idle stay as
    they are (a first step shows at once; while idle nothing is slowed)."""
    if mode == "training":
        return per_tab(calm_refresh_s(), MAX_REFRESH_S, tabs)
    return PERIODS[mode]


def status_now() -> tuple[str, tuple]:
    """``(mode, signature)``: the mode — ``"idle"`` (nothing queued or running), ``"starting"`` (a job is queued or
    being cancelled, or an active training run has not logged a step yet) or ``"training"`` — and a signature of the
    runs a page lists (the active ones, the newest, how many): when it changes, a run was queued or started, ended,
    or was deleted."""
    from dact_lib.engines import ENGINE_KINDS
    from dact_lib.tracker import ACTIVE_STATUSES

    try:
        mine = jobs().jobs()  # this server's jobs: their states, and whether one is being cancelled
        counts = {state: sum(1 for j in mine if j["state"] == state) for state in ("running", "queued")}
        runs = tracker().list_runs(status=list(ACTIVE_STATUSES), limit=50)
        newest = tracker().list_runs(limit=1)
        n_runs = tracker().query("SELECT COUNT(*) AS n FROM runs")[0]["n"]
        # not each status: a queued run that starts changes the mode only at its first step, as before
        signature = (tuple(sorted(r["id"] for r in runs)), newest[0]["id"] if newest else None, n_runs)
        if not runs and not counts.get("running") and not counts.get("queued"):
            return "idle", signature
        if counts.get("queued") or any(r["status"] == "queued" for r in runs):
            return "starting", signature
        if any(j["cancelling"] for j in mine):  # it ends within seconds: show it then, not a period later
            return "starting", signature
        trained = [r["id"] for r in runs if r["kind"] not in ENGINE_KINDS]
        stepped = tracker().last_steps(trained) if trained else {}
        return ("starting" if any(i not in stepped for i in trained) else "training"), signature
    except Exception:  # noqa: BLE001 - a busy database must not break a page
        return "idle", ()


def refresh_every() -> float:
    """The status timers' period for this rerun (:func:`period_for` the mode now and the tabs watching). Records
    what the timers were set up for, for :func:`watch_status` — also after a job was submitted from this page,
    which then already shows it (no rerun to announce it). This session counts among the watching tabs from here
    (a new tab's first watch does not rerun its page to count itself)."""
    note_watch()
    mode, signature = status_now()
    return _timers_set_for(mode, signature)


def _timers_set_for(mode: str, signature: tuple) -> float:
    period = period_for(mode, watching_tabs())
    st.session_state[TIMERS_ACTIVE] = mode
    st.session_state[TIMERS_PERIOD] = period
    st.session_state[TIMERS_SIGNATURE] = signature
    return period


#: seconds between redraws of a live part's charts (the Runs page's training curves, the PBT view's member curves,
#: hyperparameters and lineage) per watching tab, at most MAX_CHARTS_REFRESH_S; between them a live part re-sends
#: the figure it drew last, which the browser does not redraw (:func:`held`), while progress, status and ETA move
#: on the status period. A chart redraw was most of a watching tab's cost: ~0.17 browser CPU-s each, 2.0 of one
#: tab's 3.4 CPU-s a minute at the 5-s status period of then, taken from a training on the same 2 cores (bench/
#: ui_tab_cost.py; docs/benchmarks.md, "The dashboard never slows the work", runs 14-15). What changes a chart's
#: meaning — a new evaluation, a run that ends, a setting — redraws it at once (the ``signature`` given to held).
#: $DACT_LAB_CHARTS_REFRESH_S changes it (seconds; 0 = a redraw on every rerun of the live part).
CHARTS_REFRESH_S = 15.0
MAX_CHARTS_REFRESH_S = 60.0


def charts_refresh_s() -> float:
    """CHARTS_REFRESH_S, or $DACT_LAB_CHARTS_REFRESH_S where set to a number of seconds >= 0."""
    return _seconds_setting("DACT_LAB_CHARTS_REFRESH_S", CHARTS_REFRESH_S, 0.0)


def _clock() -> float:
    import time

    return time.monotonic()


def held(key: str, signature, build, every: float | None = None):
    """What ``build()`` returns, kept in this session under ``key``: rebuilt when ``signature`` differs from the
    one it was built for or it is ``every`` seconds old (default :func:`charts_refresh_s` per watching tab,
    :func:`per_tab`, at most MAX_CHARTS_REFRESH_S or the setting itself); otherwise the very object built last — a
    figure drawn again from it sends the browser the same spec, which it does not redraw."""
    if every is None:
        base = charts_refresh_s()
        every = per_tab(base, max(base, MAX_CHARTS_REFRESH_S))
    now = _clock()
    got = st.session_state.get(key)
    if got is not None and got[1] == signature and now - got[0] < every:
        return got[2]
    value = build()
    st.session_state[key] = (now, signature, value)
    return value


#: pages (``st.Page`` url paths) whose live part carries the status watch: while it redraws, the watch runs at the
#: end of each of its reruns, so the page has one timer, not the sidebar's and the live part's (each rerun costs the
#: tab's browser CPU, whatever it draws; a chart redrawn in it costs most: CHARTS_REFRESH_S. docs/benchmarks.md,
#: "The dashboard never slows the work", runs 11-15). Such a page calls :func:`live_part` for its live part and
#: :func:`stop` instead of ``st.stop()``.
LIVE_PAGES = frozenset({"runs", "pbt_view", "pareto"})


def live_part(body, active: bool):
    """A live page's live part (``body``, a function drawing it) as a fragment: while ``active``, on the status
    timer (:func:`refresh_every`), each rerun drawing ``body`` and then running the status watch; otherwise drawn
    once (its widgets rerun only it) and the watch on a timer of its own in the sidebar (:func:`watch_alone`).
    Returns the fragment, to be called with ``body``'s arguments."""
    import functools

    if not active:
        watch_alone()
        return st.fragment(body)

    @functools.wraps(body)
    def part(*args, **kwargs):
        body(*args, **kwargs)  # an early return still reaches the watch
        watch_status()

    return st.fragment(part, run_every=refresh_every())


def watch_alone() -> None:
    """The status watch as a fragment of its own in the sidebar, on the status timer: where a live page's live part
    does not carry it (nothing active, or the page stopped before it)."""
    with st.sidebar:
        st.fragment(watch_status, run_every=refresh_every())()


def stop():
    """``st.stop()`` for a live page (:data:`LIVE_PAGES`): the status watch first, so that the page still reruns
    when a run appears or changes status."""
    watch_alone()
    st.stop()


def watch_status() -> None:
    """The page's status watch, on the status timer (in the sidebar, or at the end of a live page's live part):
    when any status changed since the page was drawn (a run
    started — on another page or tab, or from the CLI —, got past its first step, ended or was deleted; a job was
    queued or started) or the number of watching tabs changed the timers' period, rerun the whole page, so every
    part that shows a status — run tables, job panels, pickers, progress, counts — changes together, on the period
    the new state asks for."""
    note_watch()
    mode, signature = status_now()
    period = period_for(mode, watching_tabs())
    was = (st.session_state.get(TIMERS_ACTIVE, mode), st.session_state.get(TIMERS_SIGNATURE, signature),
           st.session_state.get(TIMERS_PERIOD, period))
    if (mode, signature, period) != was:
        _timers_set_for(mode, signature)
        st.rerun()
