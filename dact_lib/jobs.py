"""Background jobs of one server process: a queue of training / tuning jobs run in worker threads.

The dashboard (one :class:`JobManager` per server process, see ``ui/state.py``) and the CLI submit jobs here.
Worker threads never touch the UI: everything a job reports goes to the tracker (experiments.db), which the pages
read. A job is one tracker run, created at :meth:`JobManager.submit` time with status ``'queued'``; for the engine
kinds (tuning, DACT pipeline, PBT) it is the engine's parent run.

* ``max_concurrent`` jobs run at a time; the others wait in submission order.
* :meth:`JobManager.cancel` of a queued job: it never starts (status ``'cancelled'``); of a running job: its
  :class:`~dact_lib.callbacks.CancelToken` is set and the loop stops at the next step.
* A job that raises is recorded ``'failed'`` with the error text (and the traceback as an ``job_error`` event).
* At start the manager marks runs left ``'running'``/``'queued'`` by a dead process as ``'interrupted'``.

This module never imports streamlit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from .tracker import liveness
from .callbacks import CancelToken
from .config import RunConfig
from .engines import ENGINE_KINDS, TRAIN_KINDS, EngineContext, get_engine
from .errors import Cancelled, ConfigError, DactLabError
from . import events as ev

log = logging.getLogger(__name__)

KINDS = TRAIN_KINDS + ENGINE_KINDS

JOB_STATES = ("queued", "running", "finished", "failed", "cancelled")
_ACTIVE = ("queued", "running")


@dataclass
class Job:
    run_id: int
    kind: str
    config: RunConfig
    options: dict
    name: str | None
    submitted: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    result: Any = None
    engine_run_id: int | None = None
    token: CancelToken = field(default_factory=CancelToken)
    resume: bool = False  # continue the run from its resume checkpoint (JobManager.resume)
    settings: Any = None  # an engine job's validated settings (dact_lib.engines)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "kind": self.kind, "name": self.name, "state": self.state,
                "submitted": self.submitted, "started": self.started, "ended": self.ended, "error": self.error,
                "engine_run_id": self.engine_run_id}


def check_untrusted(cfg: RunConfig) -> None:
    """What a config from a browser may name: datasets of the database (``data.dataset_id``) or the demo, runs of
    this home by id (``init_from_run``), encoders by model name (the bundled one, the tiny one, a Hugging Face
    name) or by the folder of a saved model (a directory holding ``config.json``, as ``save_pretrained`` writes
    it — what "a local path must work" needs). Other server paths are refused: a config must not read files of
    the machine the dashboard runs on."""
    from .config import DEFAULT_ENCODER, TINY_ENCODER

    for fld in ("path", "val_path", "test_path"):
        if getattr(cfg.data, fld):
            raise ConfigError(f"data.{fld} = {getattr(cfg.data, fld)!r}: a config from the dashboard cannot read "
                              "files of the server. Upload the CSV on the Data page and pick it as the dataset "
                              f"(data.dataset_id), and set data.{fld} to null.")
    if cfg.init_from_run is not None and not (isinstance(cfg.init_from_run, int) and cfg.init_from_run > 0):
        raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: give the id of a backbone run of this home.")
    enc = cfg.encoder
    if enc in (DEFAULT_ENCODER, TINY_ENCODER):
        return
    p = Path(enc).expanduser()
    looks_like_path = enc.startswith(("/", "~", ".", "\\")) or ".." in Path(enc).parts or p.exists()
    if looks_like_path:
        try:
            model_folder = p.is_dir() and (p / "config.json").is_file()
        except OSError:
            model_folder = False
        if not model_folder:
            raise ConfigError(f"encoder = {enc!r}: a config from the dashboard may name an encoder by its model name "
                              f"({DEFAULT_ENCODER!r}, {TINY_ENCODER!r} or a Hugging Face name such as "
                              "'bert-base-uncased') or a saved model's folder (holding config.json), not another "
                              "server path.")


class JobManager:
    """Runs training and tuning jobs in background threads of this process; see the module docstring."""

    def __init__(self, home=None, max_concurrent: int = 1, *, untrusted_configs: bool = False) -> None:
        """``untrusted_configs``: configs come from browsers (the dashboard): they may name only datasets stored in
        the database, runs of this home and encoders by name — no server file path (:func:`check_untrusted`)."""
        from .tracker import Tracker

        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) or max_concurrent < 1:
            raise ConfigError(f"max_concurrent = {max_concurrent!r} is invalid: expected an integer >= 1.")
        self.tracker = Tracker(home)
        self.home = self.tracker.home
        self.max_concurrent = max_concurrent
        self.untrusted_configs = bool(untrusted_configs)
        self._lock = threading.RLock()
        self._jobs: dict[int, Job] = {}
        self._queue: list[int] = []
        self._closed = False
        self.interrupted: list[int] = sorted(set(self.tracker.interrupted_at_open) | set(self._mark_interrupted()))

    def __repr__(self) -> str:
        return f"JobManager({str(self.home)!r}, max_concurrent={self.max_concurrent})"

    # ------------------------------------------------------------------ start-up
    def _mark_interrupted(self) -> list[int]:
        """Runs left active by a dead process -> 'interrupted'. Descendants of runs another job manager of this
        process is executing (study trials, PBT members) count as live too."""
        live = liveness.live_ids()
        extra: set[int] = set()
        frontier = set(live)
        try:
            while frontier:
                marks = ", ".join("?" for _ in frontier)
                rows = self.tracker.query(f"SELECT id FROM runs WHERE parent_id IN ({marks})",
                                          [int(i) for i in frontier])
                new = {int(r["id"]) for r in rows} - live - extra
                extra |= new
                frontier = new
            added = extra - live
            live |= added
            try:
                return self.tracker.mark_interrupted()
            finally:
                live -= added
        except Exception as exc:  # noqa: BLE001 - never stop the app from starting
            log.warning("could not mark interrupted runs in %s: %s", self.tracker.db_path, exc)
            return []

    # ------------------------------------------------------------------ submit
    def _validate(self, kind: str, config: RunConfig | dict) -> RunConfig:
        if kind not in KINDS:
            raise ConfigError(f"job kind {kind!r} is invalid: choose one of {KINDS}.")
        if isinstance(config, RunConfig):
            cfg = copy.deepcopy(config).validate()
        elif isinstance(config, dict):
            cfg = RunConfig.from_dict(copy.deepcopy(config))
        else:
            raise ConfigError(f"config must be a RunConfig or a dict, got {type(config).__name__}.")
        if kind in TRAIN_KINDS and cfg.kind != kind:
            raise ConfigError(f"kind = {cfg.kind!r} in the config does not match the job kind {kind!r}: set the "
                              f"config's kind to {kind!r}.")
        if kind in ENGINE_KINDS:
            get_engine(kind).check_config(cfg)
        if self.untrusted_configs:
            check_untrusted(cfg)
        if cfg.data.dataset_id is not None:
            try:
                self.tracker.get_dataset(int(cfg.data.dataset_id))
            except (DactLabError, TypeError, ValueError):
                raise ConfigError(f"data.dataset_id = {cfg.data.dataset_id!r} is not a stored dataset: pick one "
                                  "from the Data page (or list_datasets()).") from None
        if cfg.init_from_run is not None:
            path = self.home / "runs" / str(cfg.init_from_run) / "encoder.safetensors"
            if not path.exists():
                raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: run has no exported encoder ({path}); "
                                  "give the id of a finished backbone run.")
        return cfg

    def check(self, kind: str, config: RunConfig | dict, options: dict | None = None) -> tuple[RunConfig, Any]:
        """Every check :meth:`submit` makes, without creating anything: the validated config and, for engine
        kinds, the engine's validated settings object built from ``options`` (None for training kinds). Raises
        :class:`ConfigError` / :class:`DataError` with the message ``submit`` would give."""
        cfg = self._validate(kind, config)
        settings = None
        if kind in ENGINE_KINDS:
            settings = get_engine(kind).settings(options)  # raises ConfigError for bad options
        elif options:
            raise ConfigError(f"kind {kind!r} takes no options, got {sorted(options)}.")
        if kind == "multitask":
            # a one-task dataset is refused now, with the multi-task engine's message
            from .multitask import check_multitask_data

            check_multitask_data(cfg, self.tracker)
        return cfg, settings

    def submit(self, kind: str, config: RunConfig | dict, *, options: dict | None = None,
               name: str | None = None) -> int:
        """Validate ``config`` (and ``options`` for engine kinds) now, create the job's run (status 'queued') and
        return its id. Raises :class:`ConfigError` (or :class:`DataError` for a multi-task job on a one-task
        dataset) when the job cannot run; nothing is created then."""
        cfg, settings = self.check(kind, config, options)
        options = dict(options or {})
        record: dict = cfg.to_dict()
        if kind in ENGINE_KINDS:
            # the engines' own parent runs record {"run": RunConfig, <engine settings>}: so does the job's run
            record = {"run": record, **_jsonable(get_engine(kind).options(settings))}
            name = name or cfg.name or getattr(settings, "name", None)
        name = name or cfg.name
        with self._lock:
            if self._closed:
                raise DactLabError("the job manager is shut down: restart the app to run jobs.")
            run_id = self.tracker.create_run(kind, record, name=name, tag=cfg.tag, status="queued",
                                             dataset_id=cfg.data.dataset_id)
            liveness.mark_live(run_id)
            job = Job(run_id=run_id, kind=kind, config=cfg, options=options, name=name, settings=settings)
            self._jobs[run_id] = job
            self._queue.append(run_id)
        try:
            self.tracker.log_event(run_id, ev.JOB_SUBMITTED, {"kind": kind, "options": _jsonable(options)})
        except Exception as exc:  # noqa: BLE001 - the record is informative only
            log.warning("could not log the submission of job %s: %s", run_id, exc)
        self._schedule()
        return run_id

    def resume(self, run_id: int) -> int:
        """Queue an interrupted, cancelled or failed single / multi-task run — or PBT parent run — to continue from
        its last resume checkpoint(s) (the same run: metrics are appended). Raises DactLabError saying why when
        it cannot."""
        from .train import resume_config, resume_info

        run_id = int(run_id)
        run = self.tracker.get_run(run_id)
        options: dict = {}
        settings = None
        if run["kind"] in ENGINE_KINDS:
            if not get_engine(run["kind"]).resumable:
                raise DactLabError(f"Cannot resume a {run['kind']!r} run here: "
                                   + ("start the pipeline again under its name." if run["kind"] == "dact-pipeline"
                                      else "start the study again with the same study name."))
            from .tuning.pbt import resumable_pbt

            cfg, settings = resumable_pbt(self.tracker, run_id)
            options = get_engine("pbt").options(settings)
        else:
            info = resume_info(self.tracker, run_id)
            if not info["ok"]:
                raise DactLabError(f"Cannot resume: {info['why']}.")
            cfg = resume_config(self.tracker, run_id)
        with self._lock:
            if self._closed:
                raise DactLabError("the job manager is shut down: restart the app to run jobs.")
            if run_id in self._jobs and self._jobs[run_id].state in ("queued", "running"):
                raise DactLabError(f"run {run_id} is already queued or running.")
            self.tracker.set_status(run_id, "queued", pid=os.getpid(), host=socket.gethostname())
            liveness.mark_live(run_id)
            job = Job(run_id=run_id, kind=run["kind"], config=cfg, options=options, name=run.get("name"),
                      resume=True, settings=settings)
            self._jobs[run_id] = job
            self._queue.append(run_id)
        self.tracker.log_event(run_id, ev.JOB_SUBMITTED, {"kind": run["kind"], "resume": True})
        self._schedule()
        return run_id

    # ------------------------------------------------------------------ scheduling
    def _running(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state == "running")

    def _schedule(self) -> None:
        with self._lock:
            while self._queue and self._running() < self.max_concurrent and not self._closed:
                run_id = self._queue.pop(0)
                job = self._jobs[run_id]
                if job.state != "queued":
                    continue
                job.state, job.started = "running", time.time()
                job.thread = threading.Thread(target=self._worker, args=(job,), name=f"dact-job-{run_id}",
                                              daemon=True)
                job.thread.start()

    def _worker(self, job: Job) -> None:
        tr = self.tracker
        try:
            if job.token.cancelled:
                raise Cancelled(job.token.reason or "cancelled")
            if job.kind in TRAIN_KINDS:
                self._run_train(job)
            else:
                self._run_engine(job)
            final = self._final_status(job, "finished")
            job.state = final
        except Cancelled as exc:
            job.state = "cancelled"
            job.error = str(exc) or "cancelled"
            self._ensure_terminal(job, "cancelled", job.error)
        except BaseException as exc:  # noqa: BLE001 - a job never kills the server
            job.state = "failed"
            job.error = f"{type(exc).__name__}: {exc}"
            self._ensure_terminal(job, "failed", job.error)
            try:
                tr.log_event(job.run_id, ev.JOB_ERROR, {"error": job.error, "traceback": traceback.format_exc()})
            except Exception:  # noqa: BLE001
                pass
            log.warning("job %s (%s) failed: %s", job.run_id, job.kind, job.error)
        finally:
            job.ended = time.time()
            with self._lock:
                liveness.mark_done(job.run_id)
                job.done.set()
                self._schedule()
            try:
                tr.close()  # this thread's connection
            except Exception:  # noqa: BLE001
                pass

    def _final_status(self, job: Job, default: str) -> str:
        """After a job returned: its run's terminal status (set by the loop/engine, else ``default``)."""
        run = self.tracker.get_run(job.run_id)
        status = run["status"]
        if status in _ACTIVE:
            status = "cancelled" if job.token.cancelled else default
            self.tracker.set_status(job.run_id, status, "cancelled by user" if status == "cancelled" else None)
        if status == "failed":
            job.error = run.get("error") or job.error
        if status not in JOB_STATES:  # interrupted / pruned
            job.error = run.get("error") or status
            return "failed"
        return status

    def _ensure_terminal(self, job: Job, status: str, error: str) -> None:
        """Record ``status`` + ``error`` unless the loop already did (it records failures inside training)."""
        try:
            run = self.tracker.get_run(job.run_id)
            if run["status"] in _ACTIVE:
                self.tracker.set_status(job.run_id, status, error)
            elif not run.get("error") and status != "finished":
                self.tracker.update_run(job.run_id, error=error)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not record the end of job %s: %s", job.run_id, exc)

    def _mark_running(self, job: Job) -> None:
        self.tracker.set_status(job.run_id, "running", pid=os.getpid(), host=socket.gethostname())

    def _run_train(self, job: Job) -> None:
        from .train import train

        self._mark_running(job)
        train(job.config, tracker=self.tracker, home=self.home, run_id=job.run_id, cancel=job.token,
              resume=job.resume)

    def _run_engine(self, job: Job) -> None:
        engine = get_engine(job.kind)
        ctx = EngineContext(tracker=self.tracker, cancel=job.token, run_id=job.run_id, resume=job.resume)
        self._mark_running(job)
        job.result = engine.run(job.config, job.settings, ctx)  # validated when the job was submitted
        self._record_result(job, job.result.summary())
        job.token.check()

    def _record_result(self, job: Job, result: dict[str, Any]) -> None:
        """The engine result's ids and best values in the job's run summary (the engine's own summary wins)."""
        summary = {k: v for k, v in result.items() if v is not None and isinstance(v, (int, float, str, dict, list))}
        parent = summary.get("parent_run_id")
        if parent is not None and int(parent) != job.run_id:  # e.g. a pipeline that resumed an earlier run
            job.engine_run_id = int(parent)
            summary["engine_run_id"] = int(parent)
        if not summary:
            return
        current = self.tracker.get_run(job.run_id).get("summary") or {}
        if not isinstance(current, dict):
            current = {"previous": current}
        self.tracker.update_run(job.run_id, summary={**summary, **current})

    # ------------------------------------------------------------------ control
    def cancel(self, run_id: int) -> bool:
        """Cancel a job: a queued one never starts (status 'cancelled'); a running one gets its token set.
        Returns False when the job is unknown or already ended."""
        run_id = int(run_id)
        with self._lock:
            job = self._jobs.get(run_id)
            if job is None or job.state not in _ACTIVE:
                return False
            if job.state == "queued":
                job.token.cancel("cancelled by user before it started")
                if run_id in self._queue:
                    self._queue.remove(run_id)
                job.state, job.ended, job.error = "cancelled", time.time(), "cancelled by user before it started"
                liveness.mark_done(run_id)
                try:
                    self.tracker.set_status(run_id, "cancelled", job.error)
                finally:
                    job.done.set()
                return True
            job.token.cancel("cancelled by user")
            return True

    def owner(self, run_id: int) -> int | None:
        """The run id of this manager's active job that runs ``run_id``: the run itself when it is a job, else
        its nearest ancestor that is (a PBT member, a tuning trial or a pipeline's child belongs to the engine
        job that created it). None when no active job of this process owns it."""
        rid: int | None = int(run_id)
        seen: set[int] = set()
        while rid is not None and rid not in seen:
            seen.add(rid)
            job = self._jobs.get(rid)
            if job is not None and job.state in _ACTIVE:
                return rid
            try:
                parent = self.tracker.get_run(rid).get("parent_id")
            except DactLabError:
                return None
            rid = int(parent) if parent is not None else None
        return None

    def cancel_owner(self, run_id: int) -> int | None:
        """Cancel the job that runs ``run_id`` (see :meth:`owner`); returns that job's run id, or None."""
        owner = self.owner(run_id)
        if owner is not None and self.cancel(owner):
            return owner
        return None

    def status(self, run_id: int) -> str | None:
        """The job's state, else the tracker status of that run, else None."""
        job = self._jobs.get(int(run_id))
        if job is not None:
            return job.state
        try:
            return self.tracker.get_run(int(run_id))["status"]
        except DactLabError:
            return None

    def ahead(self, run_id: int) -> int | None:
        """How many jobs run or wait before queued job ``run_id`` starts (the running ones plus those queued
        before it); None when it is not queued."""
        with self._lock:
            job = self._jobs.get(int(run_id))
            if job is None or job.state != "queued" or int(run_id) not in self._queue:
                return None
            return self._running() + self._queue.index(int(run_id))

    def jobs(self) -> list[dict]:
        """All jobs of this manager, newest first: run_id, kind, name, state, submitted, started, ended, error."""
        with self._lock:
            return [j.as_dict() for j in sorted(self._jobs.values(), key=lambda j: -j.run_id)]

    def get(self, run_id: int) -> dict | None:
        job = self._jobs.get(int(run_id))
        return None if job is None else job.as_dict()

    def result(self, run_id: int) -> Any:
        """The engine's return value of a finished job (None for train kinds or unknown jobs)."""
        job = self._jobs.get(int(run_id))
        return None if job is None else job.result

    def wait(self, run_id: int, timeout: float | None = None) -> str:
        """Block until the job ends (or ``timeout`` seconds pass); returns its state."""
        job = self._jobs.get(int(run_id))
        if job is None:
            raise DactLabError(f"run {run_id} is not a job of this manager.")
        job.done.wait(timeout)
        return job.state

    def active_count(self) -> int:
        """Queued + running jobs."""
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.state in _ACTIVE)

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {s: 0 for s in JOB_STATES}
            for j in self._jobs.values():
                out[j.state] = out.get(j.state, 0) + 1
            return out

    def shutdown(self, cancel: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting jobs; with ``cancel`` cancel the queued and running ones; wait up to ``timeout`` s for
        the running ones to end."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for j in jobs:
            if j.state == "queued" or (cancel and j.state == "running"):
                self.cancel(j.run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        for j in jobs:
            t = j.thread
            if t is not None and t.is_alive():
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return _jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
