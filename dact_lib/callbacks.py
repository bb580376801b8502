"""The one reporting interface of the training loop, and the cancellation token.

Every consumer — the tracker, the CLI progress bar, Optuna pruning, PBT, the dashboard — is a
:class:`Callback`. The loop calls, in order: ``on_start(state)``; per optimisation step ``on_step(state, logs)``;
after every evaluation ``on_eval(state, logs)``; at epoch end ``on_epoch_end(state, logs)``; for anything
notable ``on_event(state, kind, payload)``; finally ``on_end(state, status)``. ``state`` is the loop's
:class:`LoopState` (step, epoch, total_steps, run_id …). A callback may raise :class:`~dact_lib.errors.Cancelled`
(or ``optuna.TrialPruned``) to stop the run; the loop records why.
"""
from __future__ import annotations

import copy
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import events as ev
from .errors import Cancelled


class CancelToken:
    """Thread-safe flag checked by the loop at every step. ``cancel()`` from any thread stops the run."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled by user") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason or "cancelled")


#: the keys of a resume checkpoint the loop itself writes and reads back (train.RESUME_KEYS adds the tensors)
LOOP_KEYS = ("step", "epoch", "batch", "stop", "stop_reason", "samples_seen", "best_metric", "best_epoch",
             "best_step", "best_metrics", "history", "stopper", "micro_batch")
STOPPER_KEYS = ("raw", "smoothed", "best", "best_index", "bad")


@dataclass
class LoopState:
    """Everything a training run owns, in one place: where it is, what it measured and decided, the objects it
    trains, and how it ended. The loop writes it; callbacks read it (they change the optimisation only through
    :meth:`set_lr_schedule`, the model and optimizer only in place). :meth:`resume_dict` / :meth:`restore` are the
    run's resume checkpoint without its tensors."""

    run_id: Any = None
    step: int = 0  # optimisation steps done
    epoch: int = 0  # 0-based epoch in progress
    total_steps: int = 0
    epochs: int = 0
    samples_seen: int = 0
    start_time: float = field(default_factory=time.time)
    batch_size: int = 0
    #: step -> learning-rate factor (warm-up then linear decay); replace it with :meth:`set_lr_schedule` only
    lr_schedule: Any = None
    # the loop's objects (read-only for callbacks)
    model: Any = None
    optimizer: Any = None
    config: Any = None
    label_maps: dict[str, list[str]] = field(default_factory=dict)
    train_size: int = 0
    stopper: Any = None  # train.EarlyStopping
    micro_batch: int | None = None  # the micro-batch after out-of-memory retries (the batch stays batch_size)
    # what it measured and decided
    history: list[dict] = field(default_factory=list)  # one row per validation: step + the val_ metrics
    best_metric: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_state: dict | None = None  # the best weights, when there is no run folder to hold them
    stop: bool = False
    stop_reason: str | None = None
    #: what callbacks keep across a resume, by callback (PBT: the member's hyperparameters and schedule) ...
    callback_state: dict[str, Any] = field(default_factory=dict)
    #: ... and what they kept, given back to them in on_start of a resumed run
    resumed_callback_state: dict[str, Any] = field(default_factory=dict)
    # how it ended (for on_end)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    #: a plug-in's own keys (PBT: "pbt_member", "pbt_ray"), nothing the loop reads
    extra: dict[str, Any] = field(default_factory=dict)

    def set_lr_schedule(self, schedule) -> None:
        """Replace the learning-rate factor schedule from the next step on — the one way a callback changes the
        loop's optimisation (PBT's explore sets a new warm-up). The model and optimizer are the loop's own
        objects: a callback changes their state in place (``load_state_dict``), never swaps them."""
        self.lr_schedule = schedule

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def resume_dict(self, *, epoch: int, batch: int, stop: bool | None = None) -> dict[str, Any]:
        """The loop's part of a resume checkpoint (:data:`LOOP_KEYS`): go on with batch ``batch`` of epoch
        ``epoch``. Copies, so the checkpoint does not change with the run."""
        stopper = self.stopper
        return {"step": int(self.step), "epoch": int(epoch), "batch": int(batch),
                "stop": bool(self.stop if stop is None else stop), "stop_reason": self.stop_reason,
                "samples_seen": int(self.samples_seen), "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "best_step": self.best_step, "best_metrics": dict(self.best_metrics),
                "history": [dict(h) for h in self.history],
                "stopper": {k: copy.deepcopy(getattr(stopper, k)) for k in STOPPER_KEYS} if stopper else {},
                "micro_batch": self.micro_batch}

    def restore(self, resumed: dict[str, Any]) -> tuple[int, int]:
        """Take a resume checkpoint's loop part back (the stopper must be set first); returns ``(epoch, batch)``
        to go on from. The callbacks' kept state is offered to them as :attr:`resumed_callback_state`."""
        self.step, self.samples_seen = int(resumed["step"]), int(resumed["samples_seen"])
        self.best_metric, self.best_epoch = resumed["best_metric"], resumed["best_epoch"]
        self.best_step = resumed["best_step"]
        self.best_metrics = dict(resumed["best_metrics"])
        self.history = [dict(h) for h in resumed["history"]]
        self.stop, self.stop_reason = bool(resumed["stop"]), resumed["stop_reason"]
        self.micro_batch = resumed["micro_batch"]
        if self.stopper is not None:
            for k, v in resumed["stopper"].items():
                setattr(self.stopper, k, v)
        self.resumed_callback_state = dict(resumed.get("callbacks") or {})
        return int(resumed["epoch"]), int(resumed["batch"])


class Callback:
    def on_start(self, state: LoopState) -> None: ...

    def on_step(self, state: LoopState, logs: dict[str, float]) -> None: ...

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None: ...

    def on_epoch_end(self, state: LoopState, logs: dict[str, float]) -> None: ...

    def on_event(self, state: LoopState, kind: str, payload: dict[str, Any]) -> None: ...

    def on_end(self, state: LoopState, status: str) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = [c for c in (callbacks or []) if c is not None]

    def on_start(self, state):
        for c in self.callbacks:
            c.on_start(state)

    def on_step(self, state, logs):
        for c in self.callbacks:
            c.on_step(state, logs)

    def on_eval(self, state, logs):
        for c in self.callbacks:
            c.on_eval(state, logs)

    def on_epoch_end(self, state, logs):
        for c in self.callbacks:
            c.on_epoch_end(state, logs)

    def on_event(self, state, kind, payload):
        for c in self.callbacks:
            c.on_event(state, kind, payload)

    def on_end(self, state, status):
        for c in self.callbacks:
            c.on_end(state, status)


class ProgressPrinter(Callback):
    """A plain-text progress bar for the CLI (verbosity 1) plus per-step detail (verbosity 2)."""

    def __init__(self, verbosity: int = 1, stream=None) -> None:
        self.verbosity = verbosity
        self.stream = stream or sys.stderr
        self._bar = None

    def on_start(self, state):
        if self.verbosity >= 1:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.total_steps, file=self.stream, unit="step", dynamic_ncols=True)

    def on_step(self, state, logs):
        if self._bar is not None:
            self._bar.update(state.step - self._bar.n)
            if "train_loss" in logs:
                self._bar.set_postfix(loss=f"{logs['train_loss']:.4f}", ep=state.epoch + 1)
        if self.verbosity >= 2:
            print(f"step {state.step}: " + ", ".join(f"{k}={v:.5g}" for k, v in logs.items()), file=self.stream)

    def on_eval(self, state, logs):
        if self.verbosity >= 1:
            msg = ", ".join(f"{k}={v:.4f}" for k, v in logs.items())
            (self._bar.write if self._bar is not None else print)(f"[eval epoch {state.epoch + 1}] {msg}")

    def on_event(self, state, kind, payload):
        if self.verbosity >= 2 or (self.verbosity >= 1 and kind in (ev.EARLY_STOP, ev.OOM_RETRY, ev.RESTORED_BEST)):
            text = f"[{kind}] {payload}"
            (self._bar.write if self._bar is not None else print)(text)

    def on_end(self, state, status):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
