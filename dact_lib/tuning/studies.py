"""Optuna plumbing shared by the tuning engines (backbone study, DACT pipeline, PBT).

Studies live in the tracker's database next to its tables (:func:`dact_lib.home.optuna_storage_url`): the home's
``experiments.db``, so ``optuna-dashboard sqlite:///<home>/experiments.db`` shows them, or the server database of
``--db URL`` / ``$DACT_LAB_DB``. On a server database the storage runs Optuna's heartbeat and retries a trial whose
process died (``RetryHeartbeatStaleTrialCallback``): workers on other machines (``python -m dact_lib worker``) share a study. Trials and tracker runs are linked both ways: a
trial's user attr ``run_id`` names its tracker run, the study's user attr ``parent_run_id`` names the engine's
parent run, and the parent run's summary carries ``study_name`` (:func:`link_study`).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from typing import Any, Iterator, Literal, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import home as _home
from ..callbacks import Callback, LoopState
from .. import events as ev

#: SQLite busy timeout / server connect timeout of the Optuna connections (seconds), the same as the tracker's.
STORAGE_TIMEOUT_S = 30
#: On a server database: seconds between a running trial's heartbeats, and how long without one before another
#: process fails the trial and enqueues its retry ($DACT_LAB_HEARTBEAT_S / $DACT_LAB_GRACE_S override them).
HEARTBEAT_S = 10
GRACE_S = 60
#: How often a trial whose process died is retried.
MAX_RETRY = 2

_storages: dict[tuple[int, str], optuna.storages.RDBStorage] = {}
_storages_lock = threading.Lock()


def storage_url(home=None) -> str:
    """Optuna's URL of the tracker's database: ``sqlite:///<home>/experiments.db`` or ``postgresql+psycopg://…``."""
    return _home.optuna_storage_url(home)


def shown_url(home=None) -> str:
    """:func:`storage_url` without a password: what is recorded and shown."""
    from ..tracker.db import mask

    return mask(storage_url(home))


def is_server(url: str) -> bool:
    return not url.startswith("sqlite")


def storage(home=None) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage of the tracker's database; one per process and URL. SQLite: 30 s busy timeout.
    A server database: heartbeats every ``HEARTBEAT_S`` s, a trial silent for ``GRACE_S`` s is failed and retried
    up to ``MAX_RETRY`` times (by whichever process of the study starts its next trial)."""
    url = shown_url(home)
    key = (os.getpid(), url)  # an SQLAlchemy engine must not cross a fork
    with _storages_lock:
        st = _storages.get(key)
        if st is None:
            if is_server(url):
                hb = int(os.environ.get("DACT_LAB_HEARTBEAT_S", HEARTBEAT_S))
                grace = int(os.environ.get("DACT_LAB_GRACE_S", GRACE_S))
                with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna (since 2.8)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                    st = optuna.storages.RDBStorage(
                        url, engine_kwargs={"pool_pre_ping": True,
                                            "connect_args": {"connect_timeout": STORAGE_TIMEOUT_S}},
                        heartbeat_interval=hb, grace_period=grace, heartbeat_stale_trial_callback=retry)
            else:
                st = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": STORAGE_TIMEOUT_S}})
            _storages[key] = st
        return st


def create_study(name: str, *, directions: Sequence[Literal["minimize", "maximize"]], home=None, sampler: optuna.samplers.BaseSampler | None = None,
                 pruner: optuna.pruners.BasePruner | None = None, load_if_exists: bool = True,
                 user_attrs: dict[str, Any] | None = None) -> optuna.Study:
    """Create (or, with ``load_if_exists``, reopen) the study ``name`` in the home and set ``user_attrs`` on it."""
    study = optuna.create_study(study_name=name, storage=storage(home), directions=list(directions), sampler=sampler,
                                pruner=pruner, load_if_exists=load_if_exists)
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    fail_stale_trials(study, home)
    return study


def fail_stale_trials(study: optuna.Study, home=None) -> list[int]:
    """Trials left RUNNING by a killed process become FAIL, so a resumed study does not count or wait on them:
    a RUNNING trial whose tracker run (user attr ``run_id``) is no longer queued/running — opening the tracker
    marks runs of dead processes 'interrupted' first — or, with no run, whose study's parent run is not active
    (only the process running the parent adds trials to its studies). Returns the trial numbers failed."""
    from ..tracker import Tracker

    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if not running:
        return []
    tracker = Tracker(home)

    def active(run_id: Any) -> bool:
        if run_id is None:
            return False
        try:
            return tracker.get_run(int(run_id))["status"] in ("queued", "running") and \
                int(run_id) not in tracker.interrupted_at_open
        except Exception:  # noqa: BLE001 - a deleted run: not active
            return False

    parent_active = active(study.user_attrs.get("parent_run_id"))
    failed = []
    for t in running:
        run_id = t.user_attrs.get("run_id")
        alive = active(run_id) if run_id is not None else parent_active and _owned_by_other_process(tracker, study)
        if not alive:
            study.tell(t.number, state=TrialState.FAIL)  # its process died while the trial was running
            failed.append(t.number)
    return failed


def _owned_by_other_process(tracker, study: optuna.Study) -> bool:
    """True when the study's parent run is run by another live process (then its RUNNING trials are that
    process's); False when it is this process resuming it (its RUNNING trials are leftovers)."""
    parent = study.user_attrs.get("parent_run_id")
    if parent is None:
        return False
    try:
        pid = tracker.get_run(int(parent)).get("pid")
    except Exception:  # noqa: BLE001
        return False
    return pid is not None and int(pid) != os.getpid()


class PruningCallback(Callback):
    """Feeds an Optuna trial from the training loop: at every evaluation that measured ``metric`` (test-split
    evaluations are skipped) ``trial.report(value, step=<0-based evaluation index>)`` — the epoch index when the
    loop evaluates once per epoch — then raises ``optuna.TrialPruned`` when the pruner says so. The loop records
    the run as 'pruned'. Multi-objective trials cannot be pruned by Optuna: there it does nothing."""

    def __init__(self, trial: optuna.Trial, metric: str = "val_loss") -> None:
        self.trial = trial
        self.metric = metric
        self.evals = 0
        self.pruned_at: int | None = None

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None:
        if self.metric not in logs:
            return
        step = self.evals
        self.evals += 1
        if len(self.trial.study.directions) > 1:
            return
        value = float(logs[self.metric])
        if not math.isfinite(value):
            value = math.inf  # a diverged run is the worst possible value, not an error of the study
        self.trial.report(value, step=step)
        if self.trial.should_prune():
            self.pruned_at = step
            raise optuna.TrialPruned(f"pruned at evaluation {step} ({self.metric} = {value:.5g})")


# --- trial <-> run links ----------------------------------------------------------------------------------------


def link_trial(trial: optuna.Trial, run_id: int, parent_run_id: int | None = None) -> None:
    """Record the tracker run of a trial (user attrs ``run_id`` and ``parent_run_id``)."""
    trial.set_user_attr("run_id", int(run_id))
    if parent_run_id is not None:
        trial.set_user_attr("parent_run_id", int(parent_run_id))


def link_study(tracker, parent_run_id: int, study: optuna.Study, home=None) -> None:
    """Record the study on the engine's parent run (summary ``study_name``/``storage_url`` + a 'study' event) and the
    parent run on the study (user attr ``parent_run_id``)."""
    url = shown_url(home if home is not None else tracker.home)
    study.set_user_attr("parent_run_id", int(parent_run_id))
    summary = tracker.get_run(parent_run_id).get("summary") or {}
    summary.update(study_name=study.study_name, storage_url=url)
    tracker.update_run(parent_run_id, summary=summary)
    tracker.log_event(parent_run_id, ev.STUDY, {"study_name": study.study_name, "storage_url": url})


def trial_runs(study: optuna.Study | str, home=None) -> dict[int, int]:
    """Trial number -> tracker run id, for the trials that recorded one."""
    if isinstance(study, str):
        study = optuna.load_study(study_name=study, storage=storage(home))
    return {t.number: int(t.user_attrs["run_id"]) for t in study.get_trials(deepcopy=False)
            if "run_id" in t.user_attrs}


def study_of_run(tracker, run_id: int) -> str | None:
    """The study name recorded on an engine's parent run (or on its parent, for a trial run), else None."""
    run = tracker.get_run(run_id)
    for source in (run.get("summary") or {}, run.get("config") or {}):
        if isinstance(source, dict) and source.get("study_name"):
            return str(source["study_name"])
    if run.get("parent_id") is not None:
        return study_of_run(tracker, run["parent_id"])
    return None


@contextlib.contextmanager
def live_run(run_id: int) -> Iterator[int]:
    """Mark a run this process creates and executes as alive (``tracker.liveness``), so that
    ``Tracker.mark_interrupted`` in the same process (the dashboard) does not take it for a lost job. A run that
    was already marked (by the job manager) stays marked afterwards."""
    from ..tracker import liveness

    run_id = int(run_id)
    owner = liveness.mark_live(run_id)
    try:
        yield run_id
    finally:
        if owner:
            liveness.mark_done(run_id)


# --- listing ----------------------------------------------------------------------------------------------------


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _trial_row(t: FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "values": [_finite(v) for v in (t.values or [])], "params": dict(t.params),
            "run_id": t.user_attrs.get("run_id")}


def describe_study(study: optuna.Study, url: str) -> dict[str, Any]:
    """One row of :func:`list_studies` for ``study``."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: 0 for s in ("complete", "pruned", "fail", "running", "waiting")}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    directions = [d.name.lower() for d in study.directions]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    row: dict[str, Any] = {
        "name": study.study_name, "storage_url": url, "directions": directions, "n_trials": len(trials),
        "trials": counts, "user_attrs": dict(study.user_attrs),
        "parent_run_id": study.user_attrs.get("parent_run_id"),
        "best_value": None, "best_params": None, "best_trial": None, "best_run_id": None,
        "n_pareto": None, "pareto": None,
        "datetime_start": min((t.datetime_start for t in trials if t.datetime_start), default=None),
    }
    if row["datetime_start"] is not None:
        row["datetime_start"] = row["datetime_start"].isoformat(timespec="seconds")
    if len(directions) == 1:
        if complete:
            best = study.best_trial
            row.update(best_value=_finite(best.value), best_params=dict(best.params), best_trial=best.number,
                       best_run_id=best.user_attrs.get("run_id"))
    elif complete:
        front = study.best_trials
        row.update(n_pareto=len(front), pareto=[_trial_row(t) for t in sorted(front, key=lambda t: t.number)])
    return row


def list_studies(home=None) -> list[dict[str, Any]]:
    """Every study of the home, oldest first: name, storage URL, directions, trial counts by state (complete, pruned,
    fail, running, waiting), the best value/params/trial/run (single objective) or the Pareto-optimal trials
    (``n_pareto``, ``pareto``: number, values, params, run_id), user attrs and ``parent_run_id``."""
    st = storage(home)
    url = shown_url(home)
    out = []
    for frozen in st.get_all_studies():
        study = optuna.load_study(study_name=frozen.study_name, storage=st)
        out.append(describe_study(study, url))
    return out


def dashboard_hint(home=None) -> str:
    """The command that opens the home's studies in optuna-dashboard."""
    return f"optuna-dashboard {shown_url(home)}"


def has_studies(home=None) -> bool:
    """True when the tracker's database holds Optuna's tables — checked read-only on SQLite, so asking never
    creates them (:func:`list_studies` would, through the storage)."""
    import sqlite3

    url = _home.db_url(home)
    if is_server(url):
        from ..tracker.db import Connection, db_errors

        try:
            con = Connection(url)
        except Exception:  # noqa: BLE001 - an unreachable server: no studies to show
            return False
        try:
            return con.has_table("studies")
        except db_errors():
            return False
        finally:
            con.close()
    from ..tracker.db import sqlite_path

    db = sqlite_path(url)
    try:
        lite = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return lite.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='studies'").fetchone() \
                is not None
        finally:
            lite.close()
    except sqlite3.Error:
        return False


def fail_dead_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check (``optuna.storages.fail_stale_trials``): RUNNING trials of a heartbeat storage
    whose process has been silent for the grace period -> FAIL, and their retries enqueued. No-op on SQLite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# --- slots: a study's budget as WAITING trials that any process takes (the engine's, workers') -----------------
def waiting(study: optuna.Study) -> list:
    """The study's trials still to run: the slots its engine enqueued and the retries of dead processes' trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def running(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def enqueue_slots(study: optuna.Study, n: int, parent: int, params: dict[str, Any] | None = None,
                  user_attrs: dict[str, Any] | None = None) -> None:
    """The study's budget as ``n`` WAITING trials (no parameters fixed unless ``params``: the sampler chooses
    them when a process takes one). Whoever runs trials — this process, workers — takes a slot (``study.ask()``
    pops them atomically on the database), so together they run exactly ``n``."""
    for _ in range(n):
        study.enqueue_trial(dict(params or {}), user_attrs={"slot_of": int(parent), **(user_attrs or {})})


def drop_slots(study: optuna.Study, why: str) -> int:
    """The slots no process has taken yet become FAIL (``skipped``: why), so no worker runs them. Returns how
    many."""
    n = 0
    for _ in waiting(study):
        trial = study.ask()
        trial.set_user_attr("skipped", why)
        study.tell(trial, state=TrialState.FAIL)
        n += 1
    return n


def run_slots(study: optuna.Study, run_trial, *, local_trials: int | None, deadline: float | None, cancel,
              server: bool, poll_s: float = 2.0, timeout_why: str = "time budget reached",
              on_timeout=None) -> str | None:
    """The engine's side of a slotted study: run slots here with ``run_trial(study.ask())`` while any are
    waiting (at most ``local_trials``; None: no limit, 0: none), then wait, polling every ``poll_s`` s, for the
    trials other processes are running; a dead worker's trial comes back as a retry slot
    (:func:`fail_dead_trials`). Past ``deadline`` (``time.monotonic()``; checked before each new trial, at least
    one having run here or ``local_trials`` being 0) the slots left are dropped, the trials other processes are
    running are waited for, ``on_timeout()`` is called and "timeout" returned; otherwise None once no trial is
    waiting or running. A trial ``ask()`` creates because a worker took the last slot first is recorded FAIL
    (skipped), not run."""
    import time

    local, settled = 0, False
    while True:
        if not (waiting(study) or running(study)):
            # on a server database another process may have just failed a dead worker's trial and not yet
            # enqueued its retry (two writes): done only when a second look, a poll later, agrees
            if settled or not server:
                return None
            settled = True
            time.sleep(poll_s)
            fail_dead_trials(study)
            continue
        settled = False
        cancel.check()
        if (local or local_trials == 0) and deadline is not None and time.monotonic() >= deadline:
            drop_slots(study, timeout_why)  # like optimize(timeout=...): no new trial after the budget
            while running(study):  # the trials other processes run still count: wait for their results
                time.sleep(poll_s)
                fail_dead_trials(study)
            if on_timeout is not None:
                on_timeout()
            return "timeout"
        if waiting(study) and (local_trials is None or local < local_trials):
            trial = study.ask()
            if "slot_of" not in trial.user_attrs:  # a worker took the last slot between the look and ask()
                trial.set_user_attr("skipped", "no slot left")
                study.tell(trial, state=TrialState.FAIL)
                continue
            run_trial(trial)
            local += 1
            continue
        time.sleep(poll_s)
        fail_dead_trials(study)  # a dead worker's trial -> FAIL + its retry


def requeue_dropped(study: optuna.Study, parent: int, why: str) -> int:
    """The slots dropped with ``why`` (:func:`drop_slots`) whose parameters were fixed — a grid point, the run
    config's own trial — are enqueued again, once each (a resumed stage keeps its grid). Returns how many."""
    again = {t.user_attrs.get("requeues") for t in study.get_trials(deepcopy=False)}
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        fixed = t.system_attrs.get("fixed_params")
        if t.user_attrs.get("skipped") == why and fixed and t.number not in again:
            keep = {k: v for k, v in t.user_attrs.items() if k not in ("skipped", "slot_of", "requeues")}
            enqueue_slots(study, 1, parent, params=fixed, user_attrs={**keep, "requeues": t.number})
            n += 1
    return n
