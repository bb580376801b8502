"""Background jobs of one server process: a queue of training / tuning jobs, each run in its own worker process.

The dashboard (one :class:`JobManager` per server process, see ``ui/state.py``) submits jobs here. The manager's
queue lives in the server process; each job executes in a child process (``python -m dact_lib.job_process``,
:mod:`dact_lib.job_process`) that writes to the tracker (experiments.db) exactly as the CLI does, so the pages —
which only read the tracker — never compete with the work for the server's interpreter. A job is one tracker run,
created at :meth:`JobManager.submit` time with status ``'queued'``; for the engine kinds (tuning, DACT pipeline,
PBT) it is the engine's parent run.

* ``max_concurrent`` jobs run at a time (the dashboard: ``DACT_LAB_MAX_JOBS``, default 1); the others wait in
  submission order. Each worker gets ``cpus // max_concurrent`` torch threads unless the config sets
  ``train.num_threads``.
* The worker is given its job as JSON (``runs/<id>/job/spec.json``: the home, the run id, the kind, the config,
  the engine options — never pickle), logs to ``runs/<id>/job/log.txt`` and writes its pid and a heartbeat to
  ``runs/<id>/job/process.json`` every few seconds. It ends when the server process dies (it polls its parent
  pid) and records its run ``'interrupted'`` then (Resume continues it).
* :meth:`JobManager.cancel` of a queued job: it never starts (status ``'cancelled'``); of a running job: the worker
  gets SIGTERM at once (its cancel token is set: the loop stops at its next step), a second SIGTERM after half of
  ``cancel_grace_s`` (the loop is interrupted where it is), and SIGKILL once ``cancel_grace_s`` has passed; the run
  is recorded ``'cancelled'`` in every case. :meth:`JobManager.cancelling` says a cancel is under way.
* A job that raises is recorded ``'failed'`` with the error text (and the traceback as a ``job_error`` event); a
  worker that dies without recording an end (killed, out of memory, a crash in native code) is recorded
  ``'failed'`` with how it died and the end of its log.
* At start the manager marks runs left ``'running'``/``'queued'`` by a dead process as ``'interrupted'``, and
  adopts the live workers of this host that another manager started (found by pid and a fresh heartbeat): they
  show as running and can be cancelled.
* ``processes=False`` runs jobs in threads of this process instead (unit tests that patch the training function
  in-process use it); nothing else should.

This module never imports streamlit.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
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


class Spawner:
    """Starts worker processes from one long-lived thread. On Linux a new thread and a child process inherit the CPU
    priority (niceness) of the thread that creates them, and an unprivileged process can only lower it; the
    dashboard runs its page threads at a lower priority than the work (``ui.state.yield_to_jobs``), so workers
    started from a page's thread would be lowered too. This thread, started before the pages lower theirs, keeps
    the server's own priority for every worker it starts."""

    def __init__(self) -> None:
        import queue

        self._q: "queue.Queue" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="dact-job-spawner", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            fn, args, box, done = self._q.get()
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def call(self, fn, *args):
        """``fn(*args)`` in the spawner's thread (at once when called from it); its result or its exception."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        box: dict = {}
        done = threading.Event()
        self._q.put((fn, args, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]


_spawner: Spawner | None = None
_spawner_lock = threading.Lock()


def start_spawner() -> Spawner:
    """The process's :class:`Spawner` (started on the first call, in the calling thread's priority)."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = Spawner()
        return _spawner

KINDS = TRAIN_KINDS + ENGINE_KINDS

JOB_STATES = ("queued", "running", "finished", "failed", "cancelled")
_ACTIVE = ("queued", "running")

#: a job's files in its run folder: runs/<id>/job/{spec.json, process.json, log.txt, result.json}
JOB_DIR = "job"
SPEC_FILE, BEAT_FILE, LOG_FILE, RESULT_FILE = "spec.json", "process.json", "log.txt", "result.json"
HEARTBEAT_S = 2.0  # how often a worker rewrites its process.json
STALE_AFTER_S = 30.0  # a heartbeat older than this does not make a worker adoptable
ADOPT_FILE = "adopt.json"  # a later manager's pid in a job folder: the worker watches that process from then on
ORPHAN_GRACE_S = 120.0  # a worker whose server died waits this long for a new server to adopt it


def orphan_grace_s() -> float:
    """``DACT_LAB_ORPHAN_GRACE_S`` (seconds a job outlives its server, waiting to be adopted; 0 = it stops with it),
    default :data:`ORPHAN_GRACE_S`."""
    raw = os.environ.get("DACT_LAB_ORPHAN_GRACE_S")
    if raw is None or raw.strip() == "":
        return ORPHAN_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 86400:
        raise ConfigError(f"DACT_LAB_ORPHAN_GRACE_S = {raw!r} is invalid: set it to the seconds a job may outlive "
                          "its server (0-86400; 0 = it stops with the server), or unset it for 120.")
    return value
CANCEL_GRACE_S = 3.0  # a cancelled worker still alive after this long is killed


def default_max_jobs() -> int:
    """How many jobs run at once: ``$DACT_LAB_MAX_JOBS`` (default 1)."""
    raw = os.environ.get("DACT_LAB_MAX_JOBS", "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"DACT_LAB_MAX_JOBS = {raw!r} is invalid: set it to a whole number >= 1 (how many jobs "
                          "run at once), or unset it for 1.")
    return value


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def job_threads(max_concurrent: int) -> int:
    """Torch threads of one worker: the CPUs this process may use, shared by the jobs that run at once."""
    return max(1, cpu_count() // max(1, int(max_concurrent)))


def job_folder(home, run_id: int) -> Path:
    return Path(home) / "runs" / str(int(run_id)) / JOB_DIR


def read_heartbeat(home, run_id: int) -> dict | None:
    """The worker's ``process.json`` of a run (pid, parent_pid, time of the last beat), or None."""
    try:
        data = json.loads((job_folder(home, run_id) / BEAT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def death_message(pid: int, returncode: int | None, log_path: Path | None) -> str:
    """Why a worker that ended without recording an end failed, and what to do."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"was ended by {name}"
        if -returncode == signal.SIGKILL:
            how += (" (on Linux usually the out-of-memory killer: lower train.batch_size, data.max_rows or "
                    "data.max_seq_len, or run fewer jobs at once with DACT_LAB_MAX_JOBS)")
    elif returncode is None:
        how = "ended"
    else:
        how = f"exited with code {returncode}"
    msg = (f"the job's worker process (pid {pid}) {how} before it recorded an end of the run; Resume continues "
           "the run from its last checkpoint, if it has one")
    tail = log_tail(log_path) if log_path is not None else ""
    if tail:
        last = [ln for ln in tail.splitlines() if ln.strip()][-3:]
        msg += f". The end of its log ({log_path}): " + " | ".join(last)
    return msg


@dataclass
class Job:
    run_id: int
    kind: str
    config: RunConfig | None
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
    # the worker process (JobManager(processes=True))
    process: subprocess.Popen | None = None
    pid: int | None = None
    adopted: bool = False  # a live worker another manager started (found by pid and heartbeat)
    cancel_sent: float | None = None  # time.monotonic() of the first SIGTERM
    interrupt_sent: bool = False  # the second SIGTERM (interrupt the loop where it is)
    killed: bool = False  # SIGKILL after cancel_grace_s
    wake: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelling(self) -> bool:
        return self.state == "running" and self.token.cancelled

    def run_config(self) -> RunConfig:
        """The job's config; a job adopted from another manager's worker has none (that worker has it)."""
        if self.config is None:
            raise DactLabError(f"job {self.run_id} has no config: its worker was started by another manager")
        return self.config

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "kind": self.kind, "name": self.name, "state": self.state,
                "submitted": self.submitted, "started": self.started, "ended": self.ended, "error": self.error,
                "engine_run_id": self.engine_run_id, "pid": self.pid, "cancelling": self.cancelling}


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
    """Runs training and tuning jobs, each in its own worker process; see the module docstring."""

    def __init__(self, home=None, max_concurrent: int = 1, *, untrusted_configs: bool = False,
                 processes: bool = True, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        """``untrusted_configs``: configs come from browsers (the dashboard): they may name only datasets stored in
        the database, runs of this home and encoders by name — no server file path (:func:`check_untrusted`).
        ``processes=False``: run jobs in threads of this process (for unit tests that patch the loop in-process).
        ``cancel_grace_s``: how long a cancelled worker may take to stop before it is killed."""
        from .tracker import Tracker

        if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) or max_concurrent < 1:
            raise ConfigError(f"max_concurrent = {max_concurrent!r} is invalid: expected an integer >= 1.")
        if not cancel_grace_s > 0:
            raise ConfigError(f"cancel_grace_s = {cancel_grace_s!r} is invalid: expected seconds > 0.")
        self.tracker = Tracker(home)
        self.home = self.tracker.home
        self.max_concurrent = max_concurrent
        self.untrusted_configs = bool(untrusted_configs)
        self.processes = bool(processes)
        self.cancel_grace_s = float(cancel_grace_s)
        self._lock = threading.RLock()
        self._jobs: dict[int, Job] = {}
        self._queue: list[int] = []
        self._closed = False
        self.interrupted: list[int] = sorted(set(self.tracker.interrupted_at_open) | set(self._mark_interrupted()))
        self.adopted: list[int] = self._adopt_workers() if self.processes else []

    def __repr__(self) -> str:
        return (f"JobManager({str(self.home)!r}, max_concurrent={self.max_concurrent}"
                + ("" if self.processes else ", processes=False") + ")")

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

    def _adopt_workers(self) -> list[int]:
        """Live workers of this host that another manager started (a server restarted in place, a cleared cache):
        a job's run still active, its recorded pid alive and the pid of a heartbeat younger than STALE_AFTER_S.
        They are shown as running jobs of this manager and can be cancelled; their end is read from the tracker."""
        adopted: list[int] = []
        try:
            rows = self.tracker.query(
                "SELECT id, kind, name, pid, created, started FROM runs WHERE status IN ('queued', 'running') "
                "AND host = ? AND pid IS NOT NULL AND parent_id IS NULL ORDER BY id", (liveness.hostname(),))
        except Exception as exc:  # noqa: BLE001 - never stop the app from starting
            log.warning("could not look for running job workers in %s: %s", self.tracker.db_path, exc)
            return adopted
        now = time.time()
        for r in rows:
            pid, run_id = int(r["pid"]), int(r["id"])
            if pid == os.getpid() or not liveness.pid_alive(pid):
                continue
            beat = read_heartbeat(self.home, run_id)
            if not beat or beat.get("pid") != pid or now - float(beat.get("time") or 0) > STALE_AFTER_S:
                continue
            job = Job(run_id=run_id, kind=str(r["kind"]), config=None, options={}, name=r.get("name"),
                      state="running", started=r.get("started") or now, pid=pid, adopted=True)
            with self._lock:
                if run_id in self._jobs:
                    continue
                self._jobs[run_id] = job
            try:  # the worker watches this process from now on (it outlives a server restart, not the server)
                from .files import atomic_write_json

                atomic_write_json(job_folder(self.home, run_id) / ADOPT_FILE, {"pid": os.getpid(), "time": now})
            except OSError as exc:
                log.warning("could not tell the worker of run %s it is adopted: %s", run_id, exc)
            job.thread = threading.Thread(target=self._supervise, args=(job,), name=f"dact-job-{run_id}",
                                          daemon=True)
            job.thread.start()
            adopted.append(run_id)
        return adopted

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
            record = {"run": record, **jsonable(get_engine(kind).options(settings))}
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
            self.tracker.log_event(run_id, ev.JOB_SUBMITTED, {"kind": kind, "options": jsonable(options)})
        except Exception as exc:  # noqa: BLE001 - the record is informative only
            log.warning("could not log the submission of job %s: %s", run_id, exc)
        self._schedule()
        return run_id

    def resume(self, run_id: int) -> int:
        """Queue an interrupted, cancelled or failed single / multi-task run — or PBT parent run — to continue from
        its last resume checkpoint(s) (the same run: metrics are appended). Raises DactLabError saying why when
        it cannot."""
        from .resume import require_resumable
        from .train import resume_config

        run_id = int(run_id)
        run = self.tracker.get_run(run_id)
        options: dict = {}
        settings = None
        require_resumable(self.tracker, run_id)  # the one check (the Runs page and the CLI ask it too)
        if run["kind"] == "pbt":
            from .tuning.pbt import resumable_pbt

            cfg, settings = resumable_pbt(self.tracker, run_id)
            options = get_engine("pbt").options(settings)
        else:
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
                target = self._supervise if self.processes else self._worker
                job.thread = threading.Thread(target=target, args=(job,), name=f"dact-job-{run_id}", daemon=True)
                job.thread.start()

    def _job_ended(self, job: Job) -> None:
        job.ended = time.time()
        with self._lock:
            liveness.mark_done(job.run_id)
            job.done.set()
            self._schedule()
        try:
            self.tracker.close()  # this thread's connection
        except Exception:  # noqa: BLE001
            pass

    def _worker(self, job: Job) -> None:
        """``processes=False``: run the job in this thread."""
        try:
            run_job(self.tracker, self.home, job)
        finally:
            self._job_ended(job)

    # ------------------------------------------------------------------ worker processes
    def _spec(self, job: Job) -> dict:
        """What the worker needs, as JSON: never pickle."""
        options = jsonable(get_engine(job.kind).options(job.settings)) if job.kind in ENGINE_KINDS else {}
        return {"version": 1, "home": str(self.home), "run_id": job.run_id, "kind": job.kind, "name": job.name,
                "config": job.run_config().to_dict(), "options": options, "resume": bool(job.resume),
                "parent_pid": os.getpid(), "threads": job_threads(self.max_concurrent),
                "orphan_grace_s": orphan_grace_s()}

    def _spawn(self, job: Job) -> subprocess.Popen:
        if _spawner is not None:  # the workers keep the server's priority, whichever thread asks (Spawner)
            return _spawner.call(self._spawn_here, job)
        return self._spawn_here(job)

    def _spawn_here(self, job: Job) -> subprocess.Popen:
        from .files import atomic_write_json

        folder = job_folder(self.home, job.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (BEAT_FILE, RESULT_FILE):  # an earlier attempt's (a resumed run)
            (folder / stale).unlink(missing_ok=True)
        spec = atomic_write_json(folder / SPEC_FILE, self._spec(job))
        threads = str(job_threads(self.max_concurrent))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(folder / LOG_FILE, "ab") as fh:
            # its own process group: a Ctrl-C in the server's terminal reaches the server, which then ends the
            # workers. Not its own session: Linux shares the CPU between sessions (autogroups) whatever their
            # niceness, and the worker must stay in the server's to run above its lowered page threads
            # (ui.state.yield_to_jobs; measured: in its own session it got 48 of 120 CPU-s against 3 watching tabs)
            group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
            return subprocess.Popen([sys.executable, "-m", "dact_lib.job_process", str(spec)], stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, env=env, **group)

    def _signal(self, job: Job, sig: int) -> None:
        pid = job.pid
        if pid is None:
            return
        try:
            if job.process is not None:
                if job.process.poll() is None:
                    job.process.send_signal(sig)
            elif liveness.pid_alive(pid):
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError, OSError) as exc:
            log.debug("could not signal job %s (pid %s): %s", job.run_id, pid, exc)

    def _alive(self, job: Job) -> bool:
        if job.process is not None:
            return job.process.poll() is None
        return job.pid is not None and liveness.pid_alive(job.pid)

    def _supervise(self, job: Job) -> None:
        """``processes=True``: start the job's worker (unless adopted), wait for its end, escalate a cancel, and
        record how it ended when the worker could not."""
        try:
            if not job.adopted:
                if job.token.cancelled:
                    raise Cancelled(job.token.reason or "cancelled")
                # 'running' from now, as the job's state says (the worker takes seconds to start; it records its
                # own pid then): the pages show what the manager does, and a status that changes only once
                _mark_running(self.tracker, job)
                proc = self._spawn(job)
                with self._lock:
                    job.process, job.pid = proc, proc.pid
                if job.token.cancelled:  # cancelled while it was being started
                    self._start_cancel(job)
            while self._alive(job):
                sent = job.cancel_sent
                if sent is not None:
                    waited = time.monotonic() - sent
                    if waited >= self.cancel_grace_s and not job.killed:
                        job.killed = True
                        self._signal(job, signal.SIGKILL)
                    elif waited >= self.cancel_grace_s / 2 and not job.interrupt_sent:
                        job.interrupt_sent = True  # the second SIGTERM interrupts the loop where it is
                        self._signal(job, signal.SIGTERM)
                job.wake.wait(0.1 if sent is not None else 0.5)
                job.wake.clear()
            self._after_exit(job)
        except Cancelled as exc:
            job.state, job.error = "cancelled", str(exc) or "cancelled"
            ensure_terminal(self.tracker, job, "cancelled", job.error)
        except BaseException as exc:  # noqa: BLE001 - a job never kills the server
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            ensure_terminal(self.tracker, job, "failed", job.error)
            log_job_error(self.tracker, job, traceback.format_exc())
        finally:
            self._job_ended(job)

    def _after_exit(self, job: Job) -> None:
        """The worker is gone: its job's state from the run it recorded, or — when it died without recording an
        end — 'cancelled' (a cancel was under way) or 'failed' with how it died."""
        tr = self.tracker
        rc = job.process.returncode if job.process is not None else None
        log_path = job_folder(self.home, job.run_id) / LOG_FILE
        run = tr.get_run(job.run_id)
        status = run["status"]
        # 'interrupted' here was written by a Tracker that saw the worker's pid gone before this thread reaped it
        # (a worker records 'interrupted' itself only when the server died — and then this thread is gone too)
        if status in _ACTIVE or (status == "interrupted" and str(run.get("error") or "").startswith(
                f"interrupted: its process {job.pid} ")):
            if job.cancel_sent is not None:
                status = "cancelled"
                error = job.token.reason or "cancelled by user"
                if job.killed:
                    error += f" (its worker process did not stop within {self.cancel_grace_s:g} s and was ended)"
            else:
                status, error = "failed", death_message(job.pid or 0, rc, log_path)
                log_job_error(tr, job, log_tail(log_path, 6000))
                log.warning("job %s (%s) failed: %s", job.run_id, job.kind, error)
            tr.set_status(job.run_id, status, error)
            _end_descendants(tr, job.run_id, job.pid, status, error)
            run = tr.get_run(job.run_id)
        summary = run.get("summary")
        if not isinstance(summary, dict):
            summary = {}
        if summary.get("engine_run_id") is not None:
            job.engine_run_id = int(summary["engine_run_id"])
        try:
            job.result = json.loads((job_folder(self.home, job.run_id) / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            job.result = None
        status = run["status"]
        if status in ("finished", "cancelled"):
            job.state, job.error = status, run.get("error") if status == "cancelled" else None
        else:  # failed, interrupted, pruned
            job.state, job.error = "failed", run.get("error") or status

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
            if self.processes:
                self._start_cancel(job)
            return True

    def _start_cancel(self, job: Job) -> None:
        """SIGTERM the worker now (it sets its cancel token); the supervisor escalates (see the module docstring)."""
        with self._lock:
            if job.cancel_sent is not None or job.pid is None:
                return  # already under way, or not started yet (the supervisor sends it once started)
            job.cancel_sent = time.monotonic()
        self._signal(job, signal.SIGTERM)
        job.wake.set()

    def cancelling(self, run_id: int) -> bool:
        """True while a cancel of the job that runs ``run_id`` (see :meth:`owner`) is under way: the run may still
        say 'running' in the tracker for up to ``cancel_grace_s`` seconds."""
        owner = self.owner(run_id)
        job = self._jobs.get(owner) if owner is not None else None
        return bool(job is not None and job.cancelling)

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


# ---------------------------------------------------------------------------------------------------- running a job
def _mark_running(tracker, job: Job) -> None:
    tracker.set_status(job.run_id, "running", pid=os.getpid(), host=socket.gethostname())


def _run_train(tracker, home, job: Job) -> None:
    from .train import train

    _mark_running(tracker, job)
    train(job.run_config(), tracker=tracker, home=home, run_id=job.run_id, cancel=job.token, resume=job.resume)


def _run_engine(tracker, job: Job) -> None:
    engine = get_engine(job.kind)
    ctx = EngineContext(tracker=tracker, cancel=job.token, run_id=job.run_id, resume=job.resume)
    _mark_running(tracker, job)
    job.result = engine.run(job.run_config(), job.settings, ctx)  # validated when the job was submitted
    _record_result(tracker, job, job.result.summary())
    job.token.check()


def _record_result(tracker, job: Job, result: dict[str, Any]) -> None:
    """The engine result's ids and best values in the job's run summary (the engine's own summary wins)."""
    summary = {k: v for k, v in result.items() if v is not None and isinstance(v, (int, float, str, dict, list))}
    parent = summary.get("parent_run_id")
    if isinstance(parent, (int, float, str)) and int(parent) != job.run_id:  # e.g. a pipeline that resumed an earlier run
        job.engine_run_id = int(parent)
        summary["engine_run_id"] = int(parent)
    if not summary:
        return
    current = tracker.get_run(job.run_id).get("summary") or {}
    if not isinstance(current, dict):
        current = {"previous": current}
    tracker.update_run(job.run_id, summary={**summary, **current})


def _final_status(tracker, job: Job, default: str) -> str:
    """After a job returned: its run's terminal status (set by the loop/engine, else ``default``)."""
    run = tracker.get_run(job.run_id)
    status = run["status"]
    if status in _ACTIVE:
        status = "cancelled" if job.token.cancelled else default
        tracker.set_status(job.run_id, status, "cancelled by user" if status == "cancelled" else None)
    if status == "failed":
        job.error = run.get("error") or job.error
    if status not in JOB_STATES:  # interrupted / pruned
        job.error = run.get("error") or status
        return "failed"
    return status


def ensure_terminal(tracker, job: Job, status: str, error: str) -> None:
    """Record ``status`` + ``error`` unless the loop already did (it records failures inside training)."""
    try:
        run = tracker.get_run(job.run_id)
        if run["status"] in _ACTIVE:
            tracker.set_status(job.run_id, status, error)
        elif not run.get("error") and status != "finished":
            tracker.update_run(job.run_id, error=error)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record the end of job %s: %s", job.run_id, exc)


def log_job_error(tracker, job: Job, detail: str) -> None:
    """A ``job_error`` event with the job's error and ``detail`` (a traceback, the end of a worker's log)."""
    try:
        tracker.log_event(job.run_id, ev.JOB_ERROR, {"error": job.error, "traceback": detail})
    except Exception:  # noqa: BLE001 - the record is informative only
        pass


def _end_descendants(tracker, run_id: int, pid: int | None, status: str, error: str) -> None:
    """The runs a dead worker created under ``run_id`` (trials, members) and left active: ``status`` too."""
    if pid is None:
        return
    try:
        frontier = [int(run_id)]
        while frontier:
            marks = ", ".join("?" for _ in frontier)
            rows = tracker.query(f"SELECT id, status, pid FROM runs WHERE parent_id IN ({marks})", frontier)
            frontier = [int(r["id"]) for r in rows]
            for r in rows:
                if r["status"] in _ACTIVE and r["pid"] is not None and int(r["pid"]) == int(pid):
                    tracker.set_status(int(r["id"]), status, error)
    except Exception as exc:  # noqa: BLE001 - informative only
        log.warning("could not end the child runs of job %s: %s", run_id, exc)


def run_job(tracker, home, job: Job, around=None) -> str:
    """Run ``job`` in this thread and record its end: the run's terminal status (set by the loop / engine, else
    'finished'), 'cancelled' with the reason, or 'failed' with the error text and the traceback as a ``job_error``
    event. Returns (and sets) the job's state. Used by worker processes (:mod:`dact_lib.job_process`) and by
    ``JobManager(processes=False)``. ``around``: a context manager around the work itself, not the recording of
    its end (a worker allows a cancel to interrupt the loop only inside it)."""
    try:
        job.token.check()
        with around if around is not None else contextlib.nullcontext():
            if job.kind in TRAIN_KINDS:
                _run_train(tracker, home, job)
            else:
                _run_engine(tracker, job)
        job.state = _final_status(tracker, job, "finished")
    except Cancelled as exc:
        job.state = "cancelled"
        job.error = str(exc) or "cancelled"
        ensure_terminal(tracker, job, "cancelled", job.error)
    except BaseException as exc:  # noqa: BLE001 - a job never kills the server
        job.state = "failed"
        job.error = f"{type(exc).__name__}: {exc}"
        ensure_terminal(tracker, job, "failed", job.error)
        log_job_error(tracker, job, traceback.format_exc())
        log.warning("job %s (%s) failed: %s", job.run_id, job.kind, job.error)
    return job.state


def jsonable(value: Any) -> Any:
    """``value`` with dataclasses (settings) turned into dicts and tuples into lists: what json.dumps takes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
