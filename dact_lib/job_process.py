"""The worker process of one job: ``python -m dact_lib.job_process <home>/runs/<id>/job/spec.json``.

:class:`dact_lib.jobs.JobManager` starts one per job and only supervises it; this process does the work and writes
to the tracker exactly as the CLI does (the run's status, metrics, events, artefacts). The spec is JSON written by
the manager: ``home``, ``run_id``, ``kind``, ``config`` (a RunConfig as a dict), ``options`` (an engine's
settings), ``resume``, ``parent_pid`` (the server) and ``threads`` (torch threads).

* **Cancel**: SIGTERM (or SIGINT) sets the job's cancel token — the loop stops at its next step and records
  'cancelled'; a second one raises :class:`~dact_lib.errors.Cancelled` in the loop where it is (only while the
  work runs, never while its end is recorded). The manager kills the process if it is still alive a few seconds
  later and records 'cancelled' itself.
* **Heartbeat**: ``process.json`` next to the spec holds this pid and the time of the last beat, rewritten every
  :data:`~dact_lib.jobs.HEARTBEAT_S` seconds: a manager started later (a server restarted in place) finds the live
  worker by pid and heartbeat.
* **It outlives a server restart, not the server**: the parent pid is polled every second (not the parent-death
  signal, which fires when the starting *thread* ends). When the server is gone the job goes on for
  ``orphan_grace_s`` (the spec's; ``DACT_LAB_ORPHAN_GRACE_S``, default 120 s): a server started again in that time
  adopts it (its job manager writes ``adopt.json`` with its pid into the job folder) and the worker then watches that
  process instead. Not adopted in time, the job is cancelled, interrupted if it does not stop within a few seconds,
  and its run recorded 'interrupted' (Resume continues it from its last checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .callbacks import CancelToken
from .errors import Cancelled

PARENT_POLL_S = 1.0
PARENT_GONE_INTERRUPT_S = 3.0  # after the server died: interrupt the loop if it has not stopped by then
PARENT_GONE_EXIT_S = 15.0  # and leave, recording 'interrupted', if it is still not done


class _Worker:
    def __init__(self, spec: dict, spec_path: Path) -> None:
        self.spec = spec
        self.folder = spec_path.parent
        self.run_id = int(spec["run_id"])
        self.parent_pid = int(spec["parent_pid"])
        self.token = CancelToken()
        self.started = time.time()
        self.parent_gone = threading.Event()
        self.done = threading.Event()
        self.interruptible = threading.Event()  # the work runs: a second signal may interrupt it

    # ---------------------------------------------------------------- signals
    def on_signal(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if self.token.cancelled:
            if self.interruptible.is_set():
                self.interruptible.clear()
                raise Cancelled(self.token.reason or "cancelled by user")
            return
        self.token.cancel("cancelled by user")

    @contextmanager
    def work(self):
        self.interruptible.set()
        try:
            yield
        finally:
            self.interruptible.clear()

    # ---------------------------------------------------------------- heartbeat + parent watch
    def beat(self, **extra) -> None:
        data = {"pid": os.getpid(), "parent_pid": self.parent_pid, "run_id": self.run_id, "started": self.started,
                "time": time.time(), **extra}
        path = self.folder / "process.json"
        tmp = self.folder / f".process.json.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass

    def watch(self) -> None:
        from .jobs import HEARTBEAT_S

        last_beat = 0.0
        watching = self.parent_pid  # the server that started it, then the one that adopted it
        orphan_since: float | None = None
        grace = float(self.spec.get("orphan_grace_s") or 0.0)
        while not self.done.is_set():
            alive = os.getppid() == self.parent_pid if watching == self.parent_pid else _pid_alive(watching)
            if not alive:
                adopter = self.adopter(exclude=watching)
                if adopter is not None:
                    watching, orphan_since = adopter, None
                    print(f"adopted by the job manager of process {adopter}", file=sys.stderr)
                    self.beat(watched_by=watching)
                    last_beat = time.monotonic()
                else:
                    if orphan_since is None:
                        orphan_since = time.monotonic()
                        print(f"the server (pid {watching}) is gone: waiting {grace:g} s for a new one to adopt this "
                              "job", file=sys.stderr)
                    if time.monotonic() - orphan_since >= grace:
                        self.parent_pid = watching
                        self.on_parent_gone()
                        return
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                self.beat(watched_by=watching, orphaned=orphan_since is not None)
                last_beat = time.monotonic()
            self.done.wait(PARENT_POLL_S)

    def adopter(self, exclude: int) -> int | None:
        """The pid of a live job manager that adopted this job after ``exclude`` died (``adopt.json``), or None."""
        from .jobs import ADOPT_FILE

        try:
            pid = int(json.loads((self.folder / ADOPT_FILE).read_text(encoding="utf-8"))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid if pid != exclude and pid != os.getpid() and _pid_alive(pid) else None

    def on_parent_gone(self) -> None:
        self.parent_gone.set()
        self.token.cancel(f"the dashboard server (pid {self.parent_pid}) stopped")
        if self.done.wait(PARENT_GONE_INTERRUPT_S):
            return
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the token is set: this interrupts the loop where it is
        except OSError:
            pass
        if self.done.wait(PARENT_GONE_EXIT_S):
            return
        self.record_interrupted()
        os._exit(3)

    def record_interrupted(self) -> None:
        try:
            from .tracker import Tracker

            tr = Tracker(self.spec["home"])
            run = tr.get_run(self.run_id)
            if run["status"] in ("queued", "running", "cancelled"):
                tr.set_status(self.run_id, "interrupted",
                              f"interrupted: the dashboard server (pid {self.parent_pid}) stopped while the run was "
                              "active; Resume continues it from its last checkpoint")
        except Exception as exc:  # noqa: BLE001 - the next Tracker() marks it interrupted anyway
            print(f"could not record run {self.run_id} as interrupted: {exc}", file=sys.stderr)

    # ---------------------------------------------------------------- the job
    def run(self) -> int:
        from . import events as ev
        from .jobs import RESULT_FILE, Job, ensure_terminal, jsonable, log_job_error, run_job
        from .tracker import Tracker

        spec = self.spec
        threads = max(1, int(spec.get("threads") or 1))
        import torch

        torch.set_num_threads(threads)
        tracker = Tracker(spec["home"])
        job = Job(run_id=self.run_id, kind=str(spec["kind"]), config=None, options=dict(spec.get("options") or {}),
                  name=spec.get("name"), resume=bool(spec.get("resume")), token=self.token, state="running")
        try:
            from .config import RunConfig
            from .engines import ENGINE_KINDS, get_engine

            job.config = RunConfig.from_dict(spec["config"])
            if job.kind in ENGINE_KINDS:
                job.settings = get_engine(job.kind).settings(job.options)
        except Exception as exc:  # noqa: BLE001 - recorded like any failure of the job
            import traceback

            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            ensure_terminal(tracker, job, "failed", job.error)
            log_job_error(tracker, job, traceback.format_exc())
            return 0
        try:
            tracker.log_event(self.run_id, ev.JOB_PROCESS, {"pid": os.getpid(), "threads": threads,
                                                            "log": str(self.folder / "log.txt")})
        except Exception:  # noqa: BLE001 - informative only
            pass
        state = run_job(tracker, spec["home"], job, around=self.work())
        if job.result is not None and hasattr(job.result, "summary"):
            try:
                (self.folder / RESULT_FILE).write_text(json.dumps(jsonable(job.result.summary()), default=str),
                                                       encoding="utf-8")
            except (OSError, TypeError, ValueError) as exc:
                print(f"could not write the engine's result: {exc}", file=sys.stderr)
        if self.parent_gone.is_set():
            self.record_interrupted()
        print(f"job {self.run_id} ({job.kind}) ended: {state}" + (f" — {job.error}" if job.error else ""),
              file=sys.stderr)
        return 0


def _pid_alive(pid: int) -> bool:
    from .tracker.liveness import pid_alive

    return pid_alive(pid)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dact_lib.job_process <home>/runs/<id>/job/spec.json (the job manager starts this; "
              "to train from a shell use python -m dact_lib train)", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        for key in ("home", "run_id", "kind", "config", "parent_pid"):
            if key not in spec:
                raise ValueError(f"the key {key!r} is missing")
    except (OSError, ValueError) as exc:
        print(f"cannot read the job spec {spec_path}: {exc}. It is written by the job manager when it starts a "
              "job; start the job again from the dashboard.", file=sys.stderr)
        return 2
    worker = _Worker(spec, spec_path)
    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, worker.on_signal)
    if os.getppid() != worker.parent_pid:  # the server died before this process got here
        worker.record_interrupted()
        return 0
    worker.beat()
    threading.Thread(target=worker.watch, name="parent-watch", daemon=True).start()
    code = 1
    try:
        code = worker.run()
    finally:
        worker.done.set()
        worker.beat(ended=time.time())
        # everything is recorded (the tracker commits every write): leave now, without the interpreter's teardown
        # of torch and transformers (about a second) — a cancel is over when the process is gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
