"""Stage 2 — the training parameters: real trainings of DactBert with the stage-1 heads (min steps, successive
halving); only the best trial's weights are kept."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import studies
from ...config import RunConfig, TrainConfig
from ...errors import DactLabError
from .record import counted, jsonable, n_complete
from .settings import PipelineConfig
from ... import events as ev


def suggest_training(trial: optuna.Trial, pipe: PipelineConfig) -> dict[str, Any]:
    """Stage 2's search space; returns the trial's params (TrainConfig field names)."""
    lo, hi = pipe.pair("encoder_lr_range")
    trial.suggest_float("encoder_lr", lo, hi, log=True)
    lo, hi = pipe.pair("head_lr_range")
    trial.suggest_float("head_lr", lo, hi, log=True)
    trial.suggest_categorical("batch_size", list(pipe.batch_sizes))
    lo, hi = pipe.pair("epochs_range")
    trial.suggest_int("epochs", int(lo), int(hi))
    lo, hi = pipe.pair("weight_decay_range")
    trial.suggest_float("weight_decay", lo, hi)
    lo, hi = pipe.pair("warmup_range")
    trial.suggest_float("warmup_ratio", lo, hi)
    return dict(trial.params)


_TRAIN_KEYS = ("encoder_lr", "head_lr", "batch_size", "epochs", "weight_decay", "warmup_ratio")


def train_from_params(params: dict[str, Any], base: TrainConfig, *, n_train: int | None = None,
                      min_steps: int = 0, max_epochs: int = 50) -> TrainConfig:
    """The TrainConfig of stage-2 ``params`` (missing keys keep ``base``'s values). With ``n_train`` (training
    rows) and ``min_steps``, the epochs are raised (to at most ``max_epochs``) until the run makes at least
    ``min_steps`` optimizer steps: a trial on a few hundred rows is then still a real training."""
    t = copy.deepcopy(base)
    for k in _TRAIN_KEYS:
        if k in params:
            setattr(t, k, type(getattr(base, k))(params[k]))
    if t.batch_size > t.max_batch_size:
        t.max_batch_size = t.batch_size
    if n_train and min_steps:
        per_epoch = max(1, math.ceil(n_train / t.batch_size))
        t.epochs = max(t.epochs, min(int(max_epochs), math.ceil(min_steps / per_epoch)))
    t.validate()
    return t


def trial_row_count(counts: list[int], fraction: float, min_rows: int, min_per_class: int) -> int:
    """How many training rows a stage-2 trial trains on, given the rows per class (``counts``): ``fraction`` of
    them, at least ``min_rows``, and enough that the stratified sample holds ``min_per_class`` rows of the smallest
    class (every row when a class has fewer): a 77-class set at 34 % gave its trials ≈35 rows per class, and
    the trials' validation accuracy (8.6 % to 76.6 %) said more about the sample than about the parameters."""
    n = int(sum(counts))
    if n == 0:
        return 0
    smallest = min(c for c in counts if c > 0)
    per_class = math.ceil(n * min(int(min_per_class), smallest) / smallest)
    return min(n, max(int(min_rows), math.ceil(fraction * n), per_class))


def trial_rows(pl):
    """The split stage-2 trials train on: a stratified subset of the training rows (:func:`trial_row_count`;
    validation and test unchanged), or the pipeline's own split when that is every row."""
    import numpy as np

    from ...data import DatasetSplit, stratified_subset

    pipe, n = pl.pipe, len(pl.split.train)
    counts = np.bincount(np.asarray(pl.split.train.targets[pl.task], dtype=np.int64)).tolist()
    k = trial_row_count(counts, pipe.stage2_fraction, pipe.stage2_min_rows, pipe.stage2_min_per_class)
    if k >= n:
        return pl.split
    return DatasetSplit(train=stratified_subset(pl.split.train, k, pipe.seed), val=pl.split.val,
                        test=pl.split.test)


def start_params(pipe: PipelineConfig, base: TrainConfig) -> dict[str, Any]:
    """The run config's own training values as a stage-2 trial (each clipped to its search range)."""
    def clip(v, rng):
        lo, hi = rng
        return min(max(v, lo), hi)

    sizes = list(pipe.batch_sizes)
    lo, hi = pipe.pair("epochs_range")
    return {"encoder_lr": clip(base.encoder_lr, pipe.pair("encoder_lr_range")),
            "head_lr": clip(base.head_lr, pipe.pair("head_lr_range")),
            "batch_size": min(sizes, key=lambda b: (abs(b - base.batch_size), b)),
            "epochs": int(clip(base.epochs, (int(lo), int(hi)))),
            "weight_decay": clip(base.weight_decay, pipe.pair("weight_decay_range")),
            "warmup_ratio": clip(base.warmup_ratio, pipe.pair("warmup_range"))}


# with a refit on every row, the trials get this share of stage 2's time and the refit the rest; the refit is
# skipped (the best trial's model is the trunk) when what is left is under REFIT_MIN_SHARE of its estimate
REFIT_TRIALS_SHARE = 0.5
REFIT_MIN_SHARE = 0.25


def refit_estimate(trial_attrs: dict, trial_rows: int, rows: int, epochs: int) -> float | None:
    """Seconds the refit may take: the best trial's own time scaled by rows and epochs (None: not measured)."""
    secs, ran = trial_attrs.get("seconds"), trial_attrs.get("epochs_run")
    if not secs or not ran or not trial_rows:
        return None
    return float(secs) * (rows / trial_rows) * (epochs / float(ran))


ENGINE = "dact-pipeline/stage2"  # the study's "engine" attribute: what a worker (tuning/worker.py) runs
POLL_S = 2.0  # how often the pipeline looks at the trials other processes run


def pruner_of(pipe: PipelineConfig) -> optuna.pruners.BasePruner:
    """Stage 2's pruner (``pipeline.stage2_pruner``), in the pipeline's process and in a worker's."""
    return {"halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "none": optuna.pruners.NopPruner}[pipe.stage2_pruner]()


class Stage2Trials:
    """What one stage-2 trial needs, in the pipeline's process or in a worker's (``runner.worker_trials``
    rebuilds it from the pipeline's parent run): the pipeline (config, split, stage-1 heads), the trial rows and
    the model config of the trials."""

    def __init__(self, pl, study: optuna.Study) -> None:
        self.pl, self.study, self.parent = pl, study, pl.parent
        self.rows = trial_rows(pl)
        self.n_rows = len(self.rows.train)
        self.refit = self.n_rows < len(pl.split.train)
        # trials on a fraction of the rows skip train()'s exit refit (exit_refit.py): only the trunk, trained on
        # every row, keeps its refitted shallow classifiers; when every row is used, a trial can be the trunk
        self.model_cfg = copy.deepcopy(pl.model_cfg())
        if self.refit:
            self.model_cfg.exit_refit_epochs = 0
        self.logger = pl.trial_logger("stage2")
        self.deadline: float | None = None  # monotonic time the trials of this process end by (run() sets it)

    def run_trial(self, trial: optuna.Trial) -> float:
        """Train one trial as a child run of the parent; returns its best validation loss (raises
        ``optuna.TrialPruned`` when the pruner stops it)."""
        pl, pipe = self.pl, self.pl.pipe
        pl.cancel.check()
        t0 = time.monotonic()
        params = suggest_training(trial, pipe)
        tc = pl.trial_train_cfg(params, n_train=self.n_rows)
        if self.deadline is not None:  # the wall: a trial stops at the trials' share with its best checkpoint
            tc.time_limit_min = pl.budget.limit_min(self.deadline - time.monotonic(), tc.time_limit_min)
        trial.set_user_attr("epochs_run", tc.epochs)
        trial.set_user_attr("train_rows", self.n_rows)
        run_cfg = pl.child_config(self.model_cfg, tc, f"{pipe.name}/stage2/trial{trial.number}", "stage2")
        # no test split: a trial is judged on validation only (and the final model is evaluated on test)
        res = pl.train_child(run_cfg, [studies.PruningCallback(trial, "val_loss")], trial, save=False,
                             data=self.rows, evaluate_test=False)
        for k in ("val_accuracy", "val_nll", "val_avg_exit_layer"):
            if k in res.best_metrics:
                trial.set_user_attr(k, res.best_metrics[k])
        value = float(res.best_metrics["val_loss"])
        trial.set_user_attr("seconds", round(time.monotonic() - t0, 3))
        if math.isfinite(value):  # with a refit too: the trunk when the time left cannot pay for the refit
            pl.keep_if_best(self.study, trial, value, res, run_cfg)
        return value

    def record(self, study: optuna.Study, frozen) -> dict[str, Any]:
        """A finished trial on the parent run (the pipeline's 'trial' event and stage-2 metrics)."""
        self.logger(study, frozen)
        return {"number": frozen.number, "state": frozen.state.name.lower(),
                "value": frozen.value if frozen.values else None, "params": dict(frozen.params),
                "run_id": frozen.user_attrs.get("run_id"), "worker": frozen.user_attrs.get("worker"),
                "seconds": round(frozen.duration.total_seconds(), 3) if frozen.duration is not None else 0.0}


def run(pl) -> None:
    t0 = time.monotonic()
    budget = pl.budget.share("stage2")
    pipe = pl.pipe
    pl.start_stage("stage2", pipe.trials_stage2, budget)
    model_cfg = pl.model_cfg()
    study = studies.create_study(
        pl.names["stage2"], directions=["minimize"], home=pl.home,
        sampler=optuna.samplers.TPESampler(seed=pipe.seed + 2,
                                           n_startup_trials=min(10, max(2, pipe.trials_stage2 // 2))),
        pruner=pruner_of(pipe),
        user_attrs={"pipeline": pipe.name, "stage": "stage2", "engine": ENGINE, "parent_run_id": pl.parent,
                    "objective": "val_loss", "pruner": pipe.stage2_pruner, "train_rows": len(trial_rows(pl).train),
                    "split": [len(pl.split.train), len(pl.split.val)]})
    ctx = Stage2Trials(pl, study)
    n_rows, refit = ctx.n_rows, ctx.refit
    # the budget as slots that this process and workers take (tuning/worker.py): together they run exactly
    # trials_stage2 (a resumed stage: the ones still missing)
    fresh = not study.trials
    todo = pl.slots_to_add(study, pipe.trials_stage2)
    if fresh and todo and pipe.stage2_start_from_config:
        studies.enqueue_slots(study, 1, pl.parent, params=start_params(pipe, pl.cfg.train),
                              user_attrs={"start": "run config"})
        todo -= 1
    studies.enqueue_slots(study, todo, pl.parent)

    # the trials get the stage's share, or half of it when the best parameters are trained again on every row (the
    # refit gets what is left: the stage ends by its share, the refit included — or the refit is skipped, and said)
    trials_budget = None if budget is None else budget * (REFIT_TRIALS_SHARE if refit else 1.0)
    ctx.deadline = None if trials_budget is None else time.monotonic() + trials_budget
    pl.run_slotted(study, "stage2", ctx, pipe.stage2_local_trials, trials_budget, POLL_S)
    if n_complete(study) == 0:
        raise DactLabError("stage2: no trial completed (all pruned); raise the trials or the time budget.")
    best = study.best_trial
    s1 = pl.state["stage1"].get("best_user_attrs", {}).get("val_accuracy")
    out = {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
           "best_run_id": best.user_attrs.get("run_id"), "best_user_attrs": best.user_attrs,
           "trial_rows": n_rows, "train_rows": len(pl.split.train)}
    trunk_acc = best.user_attrs.get("val_accuracy")
    trunk_train = pl.trial_train_cfg(best.params)
    trunk_metrics = dict(best.user_attrs)
    if refit:  # the best parameters, trained once on every training row: the trunk of stages 3 and final
        t1 = time.monotonic()
        params = dict(best.params)
        if pipe.stage2_refit_epochs == "max":
            params["epochs"] = max(int(params.get("epochs", 1)), int(pipe.pair("epochs_range")[1]))
        tc = pl.trial_train_cfg(params)
        left = None if budget is None else max(0.0, budget - (time.monotonic() - t0))
        need = refit_estimate(best.user_attrs, n_rows, len(pl.split.train), tc.epochs)
        if left is not None and need is not None and left < REFIT_MIN_SHARE * need:
            why = (f"the time budget left for stage 2 ({left:.0f} s) is under {REFIT_MIN_SHARE:.0%} of the refit's "
                   f"estimated {need:.0f} s: the best trial's own model (trained on {n_rows} rows) is the trunk")
            pl.tracker.log_event(pl.parent, ev.STAGE2_REFIT, {"trial": best.number, "skipped": why})
            pl.summary.setdefault("warnings", []).append(f"stage 2 refit skipped: {why}")
            out["refit"] = {"skipped": why}
        else:
            trunk_train = tc
            if left is not None:
                tc.time_limit_min = pl.budget.limit_min(left, tc.time_limit_min)
            run_cfg = pl.child_config(model_cfg, tc, f"{pipe.name}/stage2/refit", "stage2")
            pl.tracker.log_event(pl.parent, ev.STAGE2_REFIT, {"trial": best.number, "rows": len(pl.split.train),
                                                             "trial_rows": n_rows, "epochs": tc.epochs,
                                                             "time_limit_min": tc.time_limit_min})
            res = pl.train_child(run_cfg, [], save=False, evaluate_test=False)
            save_trunk(pl, res, run_cfg)
            trunk_acc, trunk_metrics = res.best_metrics.get("val_accuracy"), dict(res.best_metrics)
            out.update(best_run_id=res.run_id, refit={"run_id": res.run_id,
                                                      "seconds": round(time.monotonic() - t1, 3),
                                                      "epochs": tc.epochs, "best_metrics": res.best_metrics,
                                                      "stop_reason": res.stop_reason})
    out["trunk_val_accuracy"] = trunk_acc
    out["guard"] = pl.guard("stage2", trunk_acc, previous=("stage1", s1), metrics=trunk_metrics,
                            metric=trunk_train.early_stopping.metric)
    out["train"] = dataclasses.asdict(trunk_train)  # how the trunk of stages 3 and final was trained
    out["n_trials"] = counted(study)
    pl.finish_stage("stage2", out, time.monotonic() - t0)


def save_trunk(pl, res, run_cfg: RunConfig) -> None:
    """Save a stage-2 model in its run folder (stage 3 and the final model load it from there)."""
    from ...files import atomic_write_json
    from ...models import MODEL_FILE, save_model

    run_dir = pl.tracker.run_dir(res.run_id)
    save_model(run_dir, res.model, res.tokenizer, run_cfg, res.label_maps)
    atomic_write_json(run_dir / "report.json", jsonable({"best": res.best_metrics, "test": {},
                                                          "stop_reason": res.stop_reason}))
    pl.tracker.update_run(res.run_id, run_dir=str(run_dir))
    pl.tracker.add_artifact(res.run_id, str(run_dir / MODEL_FILE), "model")


def keep_if_best(pl, study: optuna.Study, trial: optuna.Trial, value: float, res, run_cfg: RunConfig) -> None:
    """Stage 2 keeps the weights of its best trial only (stage 3 and the final model are built on them): a
    trial better than every complete one so far is saved in its run folder and the previous best's model file
    is removed (its run keeps config, metrics and events)."""
    from ...models import MODEL_FILE

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    values = [t.value for t in done if t.value is not None]  # a complete trial of one objective has its value
    if values and min(values) <= value:
        return
    save_trunk(pl, res, run_cfg)
    trial.set_user_attr("model_saved", True)
    for t in done:
        rid = t.user_attrs.get("run_id")
        if t.user_attrs.get("model_saved") and rid is not None:
            old = pl.tracker.run_dir(int(rid)) / MODEL_FILE
            old.unlink(missing_ok=True)
            # the run keeps its recorded summary (metrics): only the note is added
            kept = dict(pl.tracker.get_run(int(rid)).get("summary") or {})
            pl.tracker.update_run(int(rid), summary={**kept, "model_removed": f"stage-2 trial {trial.number} is "
                                                       "better; only the best trial's weights are kept"})
