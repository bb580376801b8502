"""The training loop's link to the tracker: metrics buffered and written in batches, system metrics sampled every
few seconds, events, the run's end."""
from __future__ import annotations

import logging
import os
import time as _time
from typing import Any

from ..callbacks import Callback, LoopState
from ..sysinfo import SystemSampler
from .liveness import hostname
from .schema import to_float
from .store import STATUSES, Tracker

log = logging.getLogger(__name__)


class TrackerCallback(Callback):
    """Records a training loop into the tracker.

    ``on_step`` only appends to an in-memory buffer (a few microseconds); the buffer is written in one
    transaction once ``flush_every_s`` has passed, and at every eval / epoch end / the end. A database
    failure while flushing is logged and the rows are kept for the next flush — it never stops training.

    Progress every step: a step without logs (the loop logs every ``log_every_steps``) is remembered, and a flush
    whose rows stop before it adds one ``samples_seen`` row at that step — the pages' step count and progress bar
    move with the training, at the flush's pace, at the cost of one row per flush. The first logged step is
    written at once (the page shows the run's first step without waiting for the timer).

    Every ``sys_metrics_every_s`` seconds of the run (default ``$DACT_LAB_SYS_METRICS_S``, else 15; 0 = never) a
    step or an evaluation also records the process's system metrics at that step (:class:`~dact_lib.sysinfo.
    SystemSampler`: ``sys/cpu_percent``, ``sys/rss_mb``, the GPU's where CUDA is in use) — at most one sample a
    step, none before the first interval has passed."""

    def __init__(self, tracker: Tracker, run_id: int, flush_every_s: float = 2.0,
                 sys_metrics_every_s: float | None = None) -> None:
        self.tracker = tracker
        self.run_id = int(run_id)
        self._epoch_step: int | None = None
        self.flush_every_s = float(flush_every_s)
        self._buffer: list[tuple] = []
        self._last_flush = _time.monotonic()
        self.sampler = SystemSampler(sys_metrics_every_s)
        self._sampled_step: int | None = None
        self._latest: tuple[int, int | None, int] | None = None  # (step, epoch, samples seen) of the last step
        self._written_step = -1  # the highest step written so far
        self._first_written = False

    # buffering -----------------------------------------------------------
    def _buffer_logs(self, state: LoopState, logs: dict) -> None:
        if not logs:
            return
        t = _time.time()
        step, epoch, rid, buf = int(state.step), state.epoch, self.run_id, self._buffer
        epoch = None if epoch is None else int(epoch)
        for name, value in logs.items():
            if name == "epoch":  # step logs and eval logs both carry it: one row per step
                if self._epoch_step == step:
                    continue
                self._epoch_step = step
            if type(value) is not float:
                value = to_float(value)
                if value is None:
                    continue
            buf.append((rid, step, epoch, name, value, t))

    def _sample_system(self, state: LoopState) -> None:
        if not self.sampler.due() or self._sampled_step == int(state.step):
            return
        self._sampled_step = int(state.step)
        try:
            sample = self.sampler.sample()
        except Exception as exc:  # noqa: BLE001 - a metric of the machine must never stop training
            log.warning("tracker: sampling the system metrics of run %s failed: %s", self.run_id, exc)
            self.sampler.every_s = 0.0
            return
        self._buffer_logs(state, sample)

    def flush(self) -> bool:
        """Write the buffered rows now. Returns False (rows kept) when the database could not be written."""
        self._last_flush = _time.monotonic()
        latest = self._latest
        if latest is not None and latest[0] > max([self._written_step] + [r[1] for r in self._buffer]):
            step, epoch, seen = latest  # steps since the last log: the step count moves on every flush
            self._buffer.append((self.run_id, step, epoch, "samples_seen", float(seen), _time.time()))
        if not self._buffer:
            return True
        rows, self._buffer = self._buffer, []
        try:
            self.tracker.insert_metric_rows(rows)
            self._written_step = max([self._written_step] + [r[1] for r in rows])
        except self.tracker.errors as exc:
            self._buffer = rows + self._buffer
            log.warning("tracker: could not write %d metric rows of run %s (will retry): %s", len(rows), self.run_id, exc)
            return False
        return True

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except self.tracker.errors as exc:
            log.warning("tracker: %s of run %s failed: %s", what, self.run_id, exc)

    # Callback interface --------------------------------------------------
    def on_start(self, state: LoopState) -> None:
        self._last_flush = _time.monotonic()
        self.sampler.reset()
        self._safe(
            "marking the start", self.tracker.set_status, self.run_id, "running", pid=os.getpid(), host=hostname()
        )

    def on_step(self, state: LoopState, logs: dict[str, float]) -> None:
        self._buffer_logs(state, logs)
        self._latest = (int(state.step), None if state.epoch is None else int(state.epoch), int(state.samples_seen))
        self._sample_system(state)
        if (logs and not self._first_written) or _time.monotonic() - self._last_flush >= self.flush_every_s:
            self._first_written = self._first_written or bool(logs)
            self.flush()

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None:
        self._buffer_logs(state, logs)
        self._sample_system(state)
        self.flush()

    def on_epoch_end(self, state: LoopState, logs: dict[str, float]) -> None:
        self.flush()  # the epoch's validation metrics already came through on_eval

    def on_event(self, state: LoopState, kind: str, payload: dict[str, Any]) -> None:
        self._safe(f"event {kind!r}", self.tracker.log_event, self.run_id, kind, payload)

    def on_end(self, state: LoopState, status: str) -> None:
        if not self.flush():
            self.flush()  # one retry; the rows are lost only if that fails too
        error = state.error if status != "finished" else None
        update = {"best_metric": state.best_metric, "best_epoch": state.best_epoch, "steps": state.step,
                  "samples_seen": state.samples_seen, **(state.summary or {})}
        self._safe("recording the end", self.tracker.end_run, self.run_id, status if status in STATUSES else "failed",
                   None if error is None else str(error), update)
