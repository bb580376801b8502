"""A worker: another process — on this machine or another one — that joins a running study and runs its trials.

``python -m dact_lib worker --db postgresql://user@host/dactlab --study NAME`` (or :func:`run_worker`) is Optuna's
own RDB distribution: ``load_study`` + ``optimize`` on the shared database. Everything a trial needs comes from the
database — the study's parent run holds the run config and the search space, its dataset is stored in the tracker
— so a worker needs no files from the machine that started the study, only the same encoder (the bundled one, or
the same model name/path) and, for runs that write weights, the shared ``--artifacts DIR``. Each trial is a child
run of the study's parent run (tracker rows in the same database, so the dashboard on any machine shows every
worker's runs live), recorded with the worker's host and pid.

On a server database the storage sends a heartbeat for every running trial (:func:`studies.storage`): when a
worker dies mid-trial, the next trial any process of the study starts fails the silent trial and enqueues its
retry (``RetryFailedTrialCallback``), which the next free worker runs with the same parameters. The dead worker's
tracker run becomes 'interrupted' when a tracker on its host next opens the database.

The study's budget is a number of slots (WAITING trials the engine enqueued; :func:`studies.enqueue_slots`): every
process takes slots until none is left, so together they run exactly that many trials. A worker stops when no
slot is left and no other process's trial is still running (one that dies comes back as a retry), when the parent
run is no longer running (finished, cancelled, failed), after
``max_trials`` of its own, or when cancelled. Studies that can be spread this way: the backbone study
(``tune-backbone``) and the DACT pipeline's stages 2 and 3 (``<pipeline name>/stage2``: real trainings of DactBert,
the pipeline's expensive stage; ``<pipeline name>/stage3``: halting fits of about a second each on the trunk's
cached outputs, which a worker computes once). Stage 1 (heads on cached features, seconds per trial, one feature
cache) runs in the pipeline's process.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from ..callbacks import CancelToken
from ..config import RunConfig
from ..errors import Cancelled, DactLabError
from . import studies
from .backbone import ENGINE as BACKBONE, BackboneSpace, StudyTrials
from .studies import running, waiting

# dact_pipeline.stage2.ENGINE / stage3.ENGINE (imported lazily: the pipeline imports studies)
STAGE2, STAGE3 = "dact-pipeline/stage2", "dact-pipeline/stage3"
SUPPORTED = (BACKBONE, STAGE2, STAGE3)


class _NoSlot(Exception):
    """A trial asked for when every slot of the study was already taken (recorded FAIL, ``skipped``)."""


def _load(study_name: str, home) -> optuna.Study:
    st = studies.storage(home)
    names = [s.study_name for s in st.get_all_studies()]
    if study_name not in names:
        shown = ", ".join(names[-10:]) or "none"
        raise DactLabError(f"no study named {study_name!r} in {studies.shown_url(home)} (studies there: {shown}); "
                           "start it first (e.g. tune-backbone --study-name NAME on the same --db), or check --db.")
    return optuna.load_study(study_name=study_name, storage=st)


def study_trials(study: optuna.Study, tracker, home, cancel: CancelToken, callbacks=None):
    """What runs one trial of the study (``run_trial(trial) -> value``, ``record(study, frozen) -> row``,
    ``parent``), rebuilt from its parent run in the tracker: a backbone study's :class:`StudyTrials`, or a DACT
    pipeline's stage-2 or stage-3 trials (:func:`dact_pipeline.runner.worker_trials`)."""
    from .backbone import source_data

    engine = study.user_attrs.get("engine")
    if engine not in SUPPORTED:
        raise DactLabError(f"study {study.study_name!r} belongs to {engine or 'an unknown engine'!r}: workers run "
                           f"the trials of {', '.join(SUPPORTED)} studies (a DACT pipeline's stages 2 and 3 are "
                           "'<name>/stage2' and '<name>/stage3'; its stage 1 runs in the pipeline's process).")
    parent = study.user_attrs.get("parent_run_id")
    if parent is None:
        raise DactLabError(f"study {study.study_name!r} has no parent run yet: wait until its engine has started.")
    if engine in (STAGE2, STAGE3):
        from .dact_pipeline.runner import worker_trials

        return worker_trials(study, tracker, cancel, callbacks)
    run = tracker.get_run(int(parent))
    conf = run.get("config") or {}
    if not isinstance(conf, dict) or "run" not in conf:
        raise DactLabError(f"run {parent} (the parent of study {study.study_name!r}) records no run config: it was "
                           "started by an older version; start the study again.")
    cfg = RunConfig.from_dict(conf["run"]).validate()
    space = BackboneSpace.from_dict(conf.get("space"))
    if run.get("dataset_id") is not None:  # the stored copy: the same rows on every machine
        source = tracker.load_dataset(int(run["dataset_id"]))
        cfg.data.dataset_id = int(run["dataset_id"])
        cfg.data.path = None
        source, _ = source_data(cfg, tracker, source)
    else:
        source, _ = source_data(cfg, tracker)
    return StudyTrials(cfg, space, source, run.get("dataset_id"), int(parent), study.study_name, tracker, home,
                       cancel, list(callbacks or []))


# complexity: the worker's poll loop: wait, claim, run, retry a dead worker's trial, stop
def run_worker(study_name: str, *, home=None, tracker=None, max_trials: int | None = None,
               cancel: CancelToken | None = None, callbacks=None, wait_s: float = 0.0,
               poll_s: float = 1.0) -> dict[str, Any]:
    """Run trials of the study ``study_name`` until its budget is reached (see the module docstring). ``wait_s``:
    how long to wait for the study to appear (a worker started before the study). Returns what this worker did:
    ``trials`` (rows: number, state, value, params, run_id, seconds) and ``stop_reason``."""
    from ..tracker import Tracker

    tracker = tracker if tracker is not None else Tracker(home)
    home = tracker.home
    cancel = cancel or CancelToken()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            study = _load(study_name, home)
            ctx = study_trials(study, tracker, home, cancel, callbacks)
            break
        except DactLabError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
    me = f"{socket.gethostname()}:{os.getpid()}"
    rows: list[dict[str, Any]] = []
    reason: dict[str, str | None] = {"why": None}

    def parent_running() -> bool:
        return tracker.get_run(ctx.parent)["status"] in ("queued", "running")

    def should_stop() -> str | None:
        """None while there is work: a slot (or a retry) is waiting, or another process's trial is still running
        (it may die and come back as a retry: wait for it, polling)."""
        settled = False
        while True:
            if cancel.cancelled:
                return "cancelled"
            if not parent_running():
                return "the study's parent run is no longer running"
            if max_trials is not None and len(rows) >= max_trials:
                return f"{max_trials} trial(s) run by this worker"
            studies.fail_dead_trials(study)  # a dead process's trial -> FAIL + its retry (WAITING)
            if waiting(study):
                return None
            if not running(study):
                # another process may have just failed a dead trial and not yet enqueued its retry (two
                # writes): done only when a second look, a poll later, agrees
                if settled:
                    return "every trial of the study has run"
                settled = True
            else:
                settled = False
            time.sleep(poll_s)

    def objective(trial: optuna.Trial) -> float:
        if "slot_of" not in trial.user_attrs:  # another process took the last slot between our check and ask()
            trial.set_user_attr("skipped", "no slot left")
            raise _NoSlot("no slot left: the study's budget is taken")
        trial.set_user_attr("worker", me)
        return ctx.run_trial(trial)

    def after(study: optuna.Study, frozen) -> None:
        if not frozen.user_attrs.get("skipped"):
            rows.append(ctx.record(study, frozen))
        why = should_stop()
        if why:
            reason["why"] = why
            study.stop()

    reason["why"] = should_stop()
    if reason["why"] is None:
        try:
            # catch: a failing trial is recorded FAIL and the worker goes on with the next one
            study.optimize(objective, callbacks=[after], catch=(Exception,), gc_after_trial=True)
        except Cancelled:
            reason["why"] = "cancelled"
    states = [r["state"] for r in rows]
    return {"study_name": study_name, "parent_run_id": ctx.parent, "worker": me, "trials": rows,
            "counts": {s: states.count(s) for s in dict.fromkeys(states)}, "stop_reason": reason["why"],
            "complete": sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)}
