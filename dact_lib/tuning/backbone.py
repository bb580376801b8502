"""Backbone tuning: an Optuna study over the backbone's training parameters, then one final training.

:func:`tune_backbone` records a parent run (kind ``tune-backbone``) with one child run per trial (kind ``backbone``,
tag ``trial <n>``, metrics only: trial weights are never written to disk) and, with ``final=True``, a child run
tagged ``final`` trained with the best parameters. The final run exports ``encoder.safetensors``, so a DACT run can
start from it (``cfg.init_from_run = result.final_run_id``). Every trial minimises the best validation loss; the
MedianPruner stops poor trials from the per-epoch ``val_loss`` (:class:`~dact_lib.tuning.studies.PruningCallback`).
Every trial is scored on the same validation rows (the base config's ``data.val_frac`` / ``val_path`` and
``data.split_seed``: a setting of the study, never a tuned parameter) and trains the base config's
``train.epochs`` unless the space names an ``epochs`` range.
"""
from __future__ import annotations

import copy
import logging
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, Any, Callable

import optuna
from optuna.trial import TrialState

from ..callbacks import Callback, CancelToken
from ..config import RunConfig, from_dict
from ..data import DatasetSplit, TextDataset
from ..errors import Cancelled, ConfigError, DactLabError
from ..tracker import Tracker, TrackerCallback
from ..train import load_source, train
from .studies import (PruningCallback, create_study, drop_slots, enqueue_slots, link_study, link_trial, live_run,
                      run_slots, running, shown_url, waiting)  # noqa: F401 (waiting, running: worker.py)
from .. import events as ev

ENGINE = "tune-backbone"
log = logging.getLogger(__name__)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


VAL_FRAC_REFUSED = (
    "space.val_frac is no longer a tuned parameter: trials are compared on their validation loss, which only means "
    "something when every trial is scored on the same validation rows. Remove val_frac from the space and set the "
    "split once for the whole study: data.val_frac with data.split_seed, or a validation file in data.val_path.")


@dataclass
class BackboneSpace:
    """The search space. Each entry is a ``[low, high]`` range (``batch_size``: a list of choices) or ``None`` to
    keep the base config's value. ``lr`` is the encoder's learning rate and ``head_lr`` the head's (both searched
    on a log scale, ``head_lr`` off by default); ``dropout`` is the head's dropout; ``epochs`` off by default (every
    trial trains the config's ``train.epochs``). The validation split is not in the space: trials compared on their
    validation loss must be scored on the same rows, so it is the config's ``data.val_frac`` (and
    ``data.split_seed``) for every trial — a space naming ``val_frac`` is refused (:meth:`from_dict`)."""

    #: the launch form's label and help of each setting (ui/fields.py settings_fields)
    FORM_TEXT: ClassVar[dict[str, tuple[str, str]]] = {
        "lr": ("Learning rate range",
                "Log-uniform."),
        "head_lr": ("Head learning rate range",
                     "Log-uniform."),
        "batch_size": ("Batch sizes to try (empty = the run's)",
                        "Comma-separated, e.g. 8, 16, 32."),
        "epochs": ("Epochs range",
                    ("Each trial trains for a whole number of epochs drawn from it; off: every "
                     "trial trains the form's Epochs. (Every trial is scored on the same "
                     "validation rows: the form's Validation fraction and Split seed.)")),
        "weight_decay": ("Weight decay range",
                          "Log-uniform."),
        "dropout": ("Dropout range",
                     "Sampled uniformly for each member or trial."),
    }


    lr: list[float] | None = field(default_factory=lambda: [1e-5, 1e-3])
    head_lr: list[float] | None = None
    batch_size: list[int] | None = field(default_factory=lambda: [8, 16, 32, 64])
    epochs: list[int] | None = None
    weight_decay: list[float] | None = field(default_factory=lambda: [1e-6, 1e-1])
    dropout: list[float] | None = field(default_factory=lambda: [0.0, 0.5])

    LOG = ("lr", "head_lr", "weight_decay")

    def validate(self) -> "BackboneSpace":
        """Raise ConfigError naming the first bad entry; returns self."""
        from ..config import check_types

        check_types(self, "space")
        limits = {"lr": (0.0, 1.0, False), "head_lr": (0.0, 1.0, False), "weight_decay": (0.0, 1.0, True),
                  "dropout": (0.0, 1.0, False), "epochs": (1, 1000, True)}
        for name, (lo_lim, hi_lim, hi_closed) in limits.items():
            rng = getattr(self, name)
            if rng is None:
                continue
            ok = (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(_is_num(v) for v in rng)
                  and rng[0] <= rng[1])
            if name == "epochs":
                ok = ok and all(isinstance(v, int) for v in rng)
            if not ok:
                raise ConfigError(f"space.{name} = {rng!r} is invalid: expected [low, high] with low <= high, or "
                                  "null to keep the base config's value.")
            lo, hi = rng
            positive = name in self.LOG
            lo_ok = lo > lo_lim if positive else lo >= lo_lim
            hi_ok = hi <= hi_lim if hi_closed else hi < hi_lim
            if not (lo_ok and hi_ok):
                left = "(" if positive else "["
                right = "]" if hi_closed else ")"
                raise ConfigError(f"space.{name} = {list(rng)!r} is invalid: both ends must lie in "
                                  f"{left}{lo_lim}, {hi_lim}{right}" + (" (a log-scale range)" if name in self.LOG
                                                                      else "") + ".")
            conv = int if name == "epochs" else float
            setattr(self, name, [conv(lo), conv(hi)])
        if self.batch_size is not None:
            bs = self.batch_size
            if not (isinstance(bs, (list, tuple)) and bs and all(
                    isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096 for b in bs)
                    and len(set(bs)) == len(bs)):
                raise ConfigError(f"space.batch_size = {bs!r} is invalid: expected a non-empty list of distinct "
                                  "integers in [1, 4096], e.g. [8, 16, 32, 64], or null.")
            self.batch_size = list(bs)
        return self

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one point (parameter name -> value) for ``trial``."""
        params: dict[str, Any] = {}
        for name in ("lr", "head_lr", "weight_decay", "dropout"):
            rng = getattr(self, name)
            if rng is not None:
                params[name] = trial.suggest_float(name, rng[0], rng[1], log=name in self.LOG)
        if self.batch_size is not None:
            params["batch_size"] = trial.suggest_categorical("batch_size", self.batch_size)
        if self.epochs is not None:
            params["epochs"] = trial.suggest_int("epochs", self.epochs[0], self.epochs[1])
        return params

    @staticmethod
    def apply(cfg: RunConfig, params: dict[str, Any]) -> RunConfig:
        """A validated copy of ``cfg`` with ``params`` (as produced by :meth:`suggest`) set."""
        out = copy.deepcopy(cfg)
        where = {"lr": (out.train, "encoder_lr"), "head_lr": (out.train, "head_lr"),
                 "weight_decay": (out.train, "weight_decay"), "batch_size": (out.train, "batch_size"),
                 "epochs": (out.train, "epochs"), "dropout": (out.model.head, "dropout")}
        for name, value in params.items():
            if name == "val_frac":
                raise ConfigError(VAL_FRAC_REFUSED)
            if name not in where:
                raise ConfigError(f"unknown backbone parameter {name!r}: expected one of {sorted(where)}.")
            obj, attr = where[name]
            setattr(obj, attr, value)
        return out.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "BackboneSpace":
        """A validated space from a mapping. ``val_frac`` (a range in DACT Lab before 0.3) is refused with why and
        what to set instead; ``val_frac: null`` (what a saved space of then says when it was off) is dropped."""
        data = dict(data or {})
        if "val_frac" in data:
            if data["val_frac"] is not None:
                raise ConfigError(VAL_FRAC_REFUSED)
            data.pop("val_frac")
        return from_dict(cls, data, "space").validate()


@dataclass
class BackboneTuneConfig:
    """The settings of one backbone study (the engine's settings object; :func:`tune_backbone` takes them as
    keywords). ``study_name`` None = ``tune-backbone-<parent run id>``; ``final``: train the best parameters as
    the final run."""

    #: the launch form's label and help of each setting (ui/fields.py settings_fields)
    FORM_TEXT: ClassVar[dict[str, tuple[str, str]]] = {
        "timeout_min": ("Time limit in minutes (0 = none)",
                         "Checked before each trial: no new trial starts after the limit."),
    }


    trials: int = 10
    timeout_min: float | None = None
    space: BackboneSpace = field(default_factory=BackboneSpace)
    study_name: str | None = None
    final: bool = True

    def validate(self) -> "BackboneTuneConfig":
        from ..config import check_types

        check_types(self)
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 1:
            raise ConfigError(f"trials = {self.trials!r} is invalid: expected an integer >= 1.")
        if self.timeout_min is not None and not (_is_num(self.timeout_min) and self.timeout_min > 0):
            raise ConfigError(f"timeout_min = {self.timeout_min!r} is invalid: expected a positive number of "
                              "minutes (or None).")
        self.space.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`tune_backbone` these settings stand for."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "BackboneTuneConfig":
        data = dict(data or {})
        if isinstance(data.get("space"), dict):  # BackboneSpace.from_dict's val_frac refusal
            data["space"] = BackboneSpace.from_dict(data["space"]).to_dict()
        return from_dict(cls, data, "").validate()


@dataclass
class TuneResult:
    parent_run_id: int
    study_name: str
    storage_url: str
    best_params: dict[str, Any] | None
    best_value: float | None
    final_run_id: int | None
    best_trial: int | None = None
    best_trial_run_id: int | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)  # this call's: number, state, value, params, run_id
    stop_reason: str | None = None  # 'timeout' when the time budget ended the study early

    def summary(self) -> dict[str, Any]:
        """What the job manager records in the parent run's summary."""
        return {"parent_run_id": self.parent_run_id, "final_run_id": self.final_run_id,
                "best_value": self.best_value, "best_params": self.best_params, "study_name": self.study_name}


def source_data(cfg: RunConfig, tracker: Tracker | None,
                data: DatasetSplit | TextDataset | None = None) -> tuple[TextDataset | DatasetSplit, int | None]:
    """The dataset a study's trials split (each the same way: the config's ``val_frac``, ``test_frac`` and
    ``split_seed``) and its tracker dataset id: read once, through the loop's own
    :func:`~dact_lib.train.load_source`, unsplit."""
    if isinstance(data, DatasetSplit):
        return data, cfg.data.dataset_id
    whole = load_source(cfg, tracker, data)
    dataset_id = cfg.data.dataset_id
    if dataset_id is None and tracker is not None:
        dataset_id = tracker.add_dataset(whole, name=whole.name)  # dedupes on content: cheap when already stored
    return whole, dataset_id


@dataclass
class StudyTrials:
    """What one trial of a backbone study needs, on the machine that runs the study or on a worker
    (:mod:`dact_lib.tuning.worker` rebuilds it from the study's parent run: config, space, stored dataset)."""

    cfg: RunConfig
    space: BackboneSpace
    source: Any  # TextDataset (each trial splits it) or DatasetSplit
    dataset_id: int | None
    parent: int
    study_name: str
    tracker: Tracker
    home: Any
    cancel: CancelToken
    callbacks: list[Callback] = field(default_factory=list)

    def train_trial(self, trial: optuna.Trial):
        """Train one trial as a child run of the parent (metrics only); returns the train() result. Raises
        ``optuna.TrialPruned`` when the pruner stops it (the run is recorded 'pruned')."""
        params = self.space.suggest(trial)
        tcfg = self.space.apply(self.cfg, params)
        tcfg.tag = f"trial {trial.number}"
        tr = self.tracker
        run_id = tr.create_run(tcfg.kind, tcfg.to_dict(), name=tcfg.name, tag=tcfg.tag, parent_id=self.parent,
                               dataset_id=self.dataset_id)
        tr.update_run(run_id, run_dir=None)  # metrics only: trial weights are never saved
        link_trial(trial, run_id, self.parent)
        tr.log_event(run_id, ev.TRIAL, {"study_name": self.study_name, "number": trial.number, "params": params})
        cbs = [TrackerCallback(tr, run_id), *self.callbacks, PruningCallback(trial, "val_loss")]
        with live_run(run_id):
            return train(tcfg, data=self.source, home=self.home, callbacks=cbs, cancel=self.cancel, run_id=run_id,
                         save=False, evaluate_test=False)

    def run_trial(self, trial: optuna.Trial) -> float:
        """:meth:`train_trial`; returns the trial's best validation loss (what the study minimises)."""
        return float(self.train_trial(trial).best_metrics.get("val_loss", math.nan))

    def record(self, study: optuna.Study, frozen, seconds: float | None = None) -> dict[str, Any]:
        """A finished trial on the parent run: a 'trial' event and the trial_value / best_value metrics."""
        value = frozen.value if frozen.values else None
        if seconds is None:
            seconds = frozen.duration.total_seconds() if frozen.duration is not None else 0.0
        row = {"number": frozen.number, "state": frozen.state.name.lower(), "value": value,
               "params": dict(frozen.params), "run_id": frozen.user_attrs.get("run_id"),
               "seconds": round(seconds, 3)}
        if frozen.user_attrs.get("worker"):
            row["worker"] = frozen.user_attrs["worker"]
        self.tracker.log_event(self.parent, ev.TRIAL, row)
        logs = {"trial_value": value} if value is not None and math.isfinite(value) else {}
        try:
            logs["best_value"] = study.best_value
        except ValueError:  # no complete trial yet
            pass
        self.tracker.log_metrics(self.parent, logs, step=frozen.number)
        return row


# complexity: the study's setup, resume and final run share the parent run's state
def tune_backbone(cfg: RunConfig, *, trials: int = 10, timeout_min: float | None = None,
                  space: BackboneSpace | None = None, study_name: str | None = None, home=None,
                  tracker: Tracker | None = None, cancel: CancelToken | None = None,
                  callbacks: list[Callback] | None = None, final: bool = True,
                  sampler: optuna.samplers.BaseSampler | None = None, pruner: optuna.pruners.BasePruner | None = None,
                  data: DatasetSplit | TextDataset | None = None,
                  on_trial: Callable[[dict[str, Any]], None] | None = None, run_id: int | None = None,
                  local_trials: int | None = None, poll_s: float = 2.0) -> TuneResult:
    """Run ``trials`` trials of a TPE study (seeded with ``cfg.train.seed``; MedianPruner(2, 0) unless ``pruner``
    is given) minimising the best validation loss; fewer when ``timeout_min`` has passed as the next one would
    start (at least one runs, as with ``optimize(timeout=...)``). Then, with ``final=True`` and at least one
    complete trial, train the best parameters as the final run. ``study_name`` (default
    ``tune-backbone-<parent run id>``) reopens an existing study and adds trials to it. ``callbacks`` go to every
    training (trials and final); ``on_trial(row)`` is called after each trial with its number, state, value,
    params, run_id and seconds. Cancelling ``cancel`` stops the current trial and the study: the parent run is
    recorded 'cancelled' and :class:`~dact_lib.errors.Cancelled` raised. ``run_id``: an existing run row (e.g. a
    queued job's) to use as the parent run instead of creating one; its config is replaced by the study's.

    Workers (``python -m dact_lib worker --study NAME``, other processes or machines on the same database) may
    run trials of the study too: the budget is ``trials`` slots (WAITING trials) that any process takes, so all
    together run exactly ``trials``; this process runs slots too — at most ``local_trials`` of them (None: no
    limit; 0: none, it only waits, polling every ``poll_s`` s) — and waits for the workers' running trials (a dead
    worker's trial is retried, :func:`studies.storage`) before the final run."""
    cfg = copy.deepcopy(cfg).validate()
    BackboneTuneConfig(trials=trials, timeout_min=timeout_min).validate()
    if cfg.kind != "backbone":
        raise ConfigError(f"kind = {cfg.kind!r}: tune_backbone tunes backbone runs; start from "
                          "default_config('backbone').")
    if local_trials is not None and (not isinstance(local_trials, int) or local_trials < 0):
        raise ConfigError(f"local_trials = {local_trials!r} is invalid: expected None or an integer >= 0.")
    space = copy.deepcopy(space) if space is not None else BackboneSpace()
    space.validate()
    tracker = tracker if tracker is not None else Tracker(home)
    home = tracker.home
    cancel = cancel or CancelToken()
    user_cbs = list(callbacks or [])

    source, dataset_id = source_data(cfg, tracker, data)

    if run_id is None:
        parent = tracker.open_run(ENGINE, None, dataset_id=dataset_id, name=cfg.name, tag=cfg.tag)
    else:  # a row a job manager queued: it has its name and tag already
        parent = tracker.open_run(ENGINE, None, run_id, dataset_id=dataset_id)
    name = study_name or f"{ENGINE}-{parent}"
    url = shown_url(home)
    tracker.update_run(parent, config={"run": cfg.to_dict(), "space": space.to_dict(), "trials": trials,
                                       "timeout_min": timeout_min, "final": final, "study_name": name,
                                       "storage_url": url}, run_dir=None)
    rows: list[dict[str, Any]] = []
    stop_reason: str | None = None
    with live_run(parent):
        try:
            study = create_study(name, directions=["minimize"], home=home,
                                 sampler=sampler or optuna.samplers.TPESampler(seed=cfg.train.seed),
                                 pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
                                 user_attrs={"engine": ENGINE, "metric": "val_loss", "space": space.to_dict()})
            if study.directions != [optuna.study.StudyDirection.MINIMIZE]:
                raise ConfigError(f"study {name!r} exists with directions {[d.name for d in study.directions]}: "
                                  "a backbone study minimises one value; choose another --study-name.")
            drop_slots(study, "left by an earlier run of the study")
            enqueue_slots(study, trials, parent)  # the budget; workers take slots too (tuning/worker.py) ...
            link_study(tracker, parent, study, home)  # ... once the study names its parent run
            deadline = time.monotonic() + 60.0 * timeout_min if timeout_min else None
            ctx = StudyTrials(cfg, space, source, dataset_id, parent, name, tracker, home, cancel, user_cbs)

            def run_trial(trial: optuna.Trial) -> dict[str, Any]:
                t0 = time.perf_counter()
                try:
                    res = ctx.train_trial(trial)
                except optuna.TrialPruned:
                    frozen = study.tell(trial, state=TrialState.PRUNED)
                except BaseException:
                    frozen = study.tell(trial, state=TrialState.FAIL)
                    rows.append(ctx.record(study, frozen, time.perf_counter() - t0))
                    raise
                else:
                    frozen = study.tell(trial, res.best_metrics.get("val_loss", math.nan))
                row = ctx.record(study, frozen, time.perf_counter() - t0)
                rows.append(row)
                if on_trial is not None:
                    on_trial(row)
                return row

            def timed_out() -> None:
                tracker.log_event(parent, ev.TIMEOUT, {"timeout_min": timeout_min, "trials_run": len(rows)})

            # run slots while there are any (at most local_trials of them here); then wait for the workers'
            # running trials — one whose process dies comes back as a retry (a slot), after its grace period
            stop_reason = run_slots(study, run_trial, local_trials=local_trials, deadline=deadline, cancel=cancel,
                                    server=tracker.dialect != "sqlite", poll_s=poll_s,
                                    timeout_why=f"time budget of {timeout_min or 0:g} min reached", on_timeout=timed_out)

            best = None
            if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                best = study.best_trial
            final_run_id = None
            if final and best is not None:
                fcfg = space.apply(cfg, best.params)
                fcfg.tag = "final"
                final_run_id = tracker.create_run(fcfg.kind, fcfg.to_dict(), name=fcfg.name, tag=fcfg.tag,
                                                  parent_id=parent, dataset_id=dataset_id)
                with live_run(final_run_id):
                    train(fcfg, data=data, home=home, tracker=tracker, callbacks=user_cbs, cancel=cancel,
                          run_id=final_run_id)
                if tracker.get_run(final_run_id).get("dataset_id") is None and dataset_id is not None:
                    tracker.update_run(final_run_id, dataset_id=dataset_id)  # train() drops it for given data
            rows = study_rows(study, rows, parent)
            result = TuneResult(
                parent_run_id=parent, study_name=name, storage_url=url,
                best_params=dict(best.params) if best else None, best_value=best.value if best else None,
                final_run_id=final_run_id, best_trial=best.number if best else None,
                best_trial_run_id=best.user_attrs.get("run_id") if best else None, trials=rows,
                stop_reason=stop_reason)
            if best is None:
                tracker.log_event(parent, ev.WARNING, {"message": "no trial completed"})
            _finish(tracker, parent, "finished", rows, result=result)
            return result
        except Cancelled as exc:
            _drop_slots_quietly(locals().get("study"), "cancelled")
            tracker.log_event(parent, ev.CANCELLED, {"reason": str(exc), "trials_run": len(rows)})
            _finish(tracker, parent, "cancelled", rows, error=str(exc))
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded then re-raised
            _drop_slots_quietly(locals().get("study"), f"the study failed: {type(exc).__name__}")
            _finish(tracker, parent, "failed", rows, error=f"{type(exc).__name__}: {exc}")
            raise


def _drop_slots_quietly(study, why: str) -> None:
    if study is None:
        return
    try:
        drop_slots(study, why)
    except Exception as exc:  # noqa: BLE001 - the original error is what the user needs
        log.warning("could not drop the study's remaining slots: %s", exc)


def study_rows(study: optuna.Study, own: list[dict[str, Any]], parent: int) -> list[dict[str, Any]]:
    """This process's trial rows plus the other finished trials of the study run for the same parent run (the
    workers'), by number."""
    mine = {r["number"]: r for r in own}
    for t in study.get_trials(deepcopy=False):
        if t.number in mine or t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) \
                or t.user_attrs.get("parent_run_id") != parent:
            continue
        mine[t.number] = {"number": t.number, "state": t.state.name.lower(), "value": t.value if t.values else None,
                          "params": dict(t.params), "run_id": t.user_attrs.get("run_id"),
                          "seconds": round(t.duration.total_seconds(), 3) if t.duration is not None else None,
                          **({"worker": t.user_attrs["worker"]} if t.user_attrs.get("worker") else {})}
    return [mine[k] for k in sorted(mine)]


def _finish(tracker: Tracker, parent: int, status: str, rows: list[dict], *, error: str | None = None,
            result: TuneResult | None = None) -> None:
    """The parent run's end: status, error, and a summary with the trial counts (and the result)."""
    summary = tracker.get_run(parent).get("summary") or {}
    summary["trials"] = {s: [r["state"] for r in rows].count(s) for s in dict.fromkeys(r["state"] for r in rows)}
    if result is not None:
        summary.update(best_value=result.best_value, best_params=result.best_params, best_trial=result.best_trial,
                       best_trial_run_id=result.best_trial_run_id, final_run_id=result.final_run_id,
                       stop_reason=result.stop_reason)
    tracker.set_status(parent, status, error, summary=summary)


def run_engine(cfg: RunConfig, settings: BackboneTuneConfig, ctx) -> TuneResult:
    """The engine interface (:mod:`dact_lib.engines`): :func:`tune_backbone` with ``settings``."""
    if ctx.resume:
        raise DactLabError("a backbone study cannot resume a run: start it again with the same study name to add "
                           "trials to the study.")
    return tune_backbone(cfg, **settings.as_kwargs(), home=ctx.home, tracker=ctx.tracker, cancel=ctx.cancel,
                         callbacks=ctx.callbacks, run_id=ctx.run_id)
