"""The pipeline run: :func:`run_pipeline` drives the stages of :class:`_Pipeline` in order, with cancellation and
status."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import studies
from ...callbacks import Callback, CancelToken
from ...config import DactModelConfig, RunConfig, TrainConfig, from_dict
from ...errors import Cancelled, ConfigError, DactLabError
from ...front import FrontPoint
from . import final, guards, record, single, stage1, stage2, stage3
from .record import Budget, counted, jsonable, n_complete, write_json
from .settings import PipelineConfig, PipelineResult, STAGES
from .stage2 import train_from_params
from ... import events as ev


class _Pipeline:
    def __init__(self, cfg: RunConfig, pipe: PipelineConfig, tracker, cancel: CancelToken,
                 callbacks: list[Callback], data) -> None:
        from ...models import model_task, pick_device
        from ...train import load_split

        self.cfg, self.pipe, self.tracker = cfg, pipe, tracker
        self.home = tracker.home
        self.cancel = cancel
        self.callbacks = list(callbacks)
        self.names = pipe.study_names()
        self.budget = Budget(pipe.timeout_min, skip=() if pipe.single_run else ("single",))
        self.single_cfg = copy.deepcopy(cfg)  # the run config as a single run trains it (single.py)
        self.split, self.dataset_id = load_split(cfg, tracker, data)
        if self.split.val is None or len(self.split.val) == 0:
            raise DactLabError("The pipeline needs validation data: set data.val_frac > 0 or give data.val_path.")
        self.label_maps = self.split.train.label_maps
        self.task = model_task(cfg, self.label_maps)
        self.num_classes = len(self.label_maps[self.task])
        self.device = pick_device(cfg.train.device)
        self.parent: int | None = None
        self.already_finished = False  # set by open_parent: a finished pipeline of this name exists
        self.state: dict[str, dict] = {}  # stage -> its saved JSON
        self.summary: dict[str, Any] = {}
        self.resumed: list[str] = []

    # -- parent run and resume ------------------------------------------------------------------------------
    def open_parent(self, run_id: int | None = None) -> None:
        record.open_parent(self, run_id)

    @property
    def parent_run_id(self) -> int:
        """The parent run's id, once :meth:`open_parent` has created or found it."""
        if self.parent is None:
            raise DactLabError("the pipeline's parent run is not open: call open_parent() first")
        return self.parent

    def finish_stage(self, stage: str, data: dict, seconds: float) -> None:
        data = jsonable({"stage": stage, "seconds": round(seconds, 3), "finished": time.time(), **data})
        self.state[stage] = data
        write_json(self.tracker.run_dir(self.parent) / f"{stage}.json", data)
        self.summary.setdefault("stages_done", [])
        if stage not in self.summary["stages_done"]:
            self.summary["stages_done"].append(stage)
        if "best_params" in data:
            self.summary.setdefault("stage_best", {})[stage] = data["best_params"]
        self.tracker.update_run(self.parent, summary=self.summary)
        self.tracker.log_event(self.parent, ev.STAGE_END, {k: v for k, v in data.items() if k != "trials_detail"})

    def start_stage(self, stage: str, trials: int | None, budget: float | None) -> None:
        self.tracker.log_event(self.parent, ev.STAGE_START, {"stage": stage, "trials": trials,
                                                            "budget_s": None if budget is None else round(budget, 1)})

    def guard(self, stage: str, accuracy: float | None, *, split: str = "val", previous: tuple[str, float] | None
              = None, metrics: dict | None = None, metric: str | None = None) -> guards.GuardInfo:
        return guards.check(self, stage, accuracy, split=split, previous=previous, metrics=metrics, metric=metric)

    # -- optuna helpers -------------------------------------------------------------------------------------
    def trial_logger(self, stage: str) -> Callable[[optuna.Study, FrozenTrial], None]:
        def log(study: optuna.Study, t: FrozenTrial) -> None:
            payload = {"stage": stage, "number": t.number, "state": t.state.name.lower(), "params": t.params,
                       "values": t.values, "user_attrs": t.user_attrs,
                       "duration_s": t.duration.total_seconds() if t.duration else None}
            self.tracker.log_event(self.parent, ev.TRIAL, jsonable(payload))
            if t.state != TrialState.COMPLETE:
                return
            if stage == "stage3":
                metrics = {"stage3_objective": t.values[0], "stage3_avg_exit_layer": t.values[1],
                           "stage3_lambda": stage3.trial_point(t.number, t.params, t.values, t.user_attrs).front_lambda,
                           "stage3_val_accuracy": t.user_attrs.get("val_accuracy")}
            else:
                metrics = {f"{stage}_value": t.value,
                           f"{stage}_val_accuracy": t.user_attrs.get("val_accuracy")}
            self.tracker.log_metrics(self.parent, metrics, step=t.number)
        return log

    def optimize(self, study: optuna.Study, objective, n_total: int, budget: float | None, stage: str) -> None:
        start = time.monotonic()
        todo = n_total - counted(study)
        if todo > 0:
            self.cancel.check()
            study.optimize(objective, n_trials=todo, timeout=budget, callbacks=[self.trial_logger(stage)])
        while n_complete(study) == 0 and counted(study) < n_total + 3:
            # the budget ran out (or every trial was pruned) before any trial completed: a stage needs one result
            self.cancel.check()
            study.optimize(objective, n_trials=1, callbacks=[self.trial_logger(stage)])
        if n_complete(study) == 0:
            raise DactLabError(f"{stage}: no trial completed (all pruned); raise the trials or the time budget.")
        self.tracker.log_event(self.parent, ev.STAGE_TRIALS, {"stage": stage, "trials": counted(study),
                                                             "seconds": round(time.monotonic() - start, 3)})

    def slots_to_add(self, study: optuna.Study, n_total: int) -> int:
        """How many new slots a slotted stage still needs for ``n_total`` trials. A resumed stage keeps the slots an
        earlier run left waiting (they are still the budget) and first enqueues again the grid points dropped when
        it stopped (:func:`studies.requeue_dropped`)."""
        studies.requeue_dropped(study, self.parent_run_id, record.STOPPED)
        return max(0, n_total - counted(study) - len(studies.waiting(study)))

    def run_slotted(self, study: optuna.Study, stage: str, ctx, local_trials: int | None, budget: float | None,
                    poll_s: float) -> None:
        """Run a slotted stage's trials (stages 2 and 3): slots here via ``ctx.run_trial`` (one value, or the two of
        stage 3) while any wait — at most ``local_trials`` — then wait for the workers' (:func:`studies.run_slots`);
        at most 3 more trials when none completed (a stage needs one result); the slots left are dropped when the
        pipeline stops, so no worker goes on with the stage (a resume enqueues their grid points again)."""
        import math

        def run_trial(trial: optuna.Trial) -> None:
            try:
                value = ctx.run_trial(trial)
            except optuna.TrialPruned:
                frozen = study.tell(trial, state=TrialState.PRUNED)
            except BaseException:
                ctx.record(study, study.tell(trial, state=TrialState.FAIL))
                raise
            else:
                if isinstance(value, (tuple, list)):
                    frozen = study.tell(trial, list(value))
                else:
                    ok = math.isfinite(value)
                    frozen = study.tell(trial, value if ok else None, state=None if ok else TrialState.FAIL)
            ctx.record(study, frozen)

        start = time.monotonic()
        try:
            studies.run_slots(study, run_trial, local_trials=local_trials,
                              deadline=None if budget is None else start + budget, cancel=self.cancel,
                              server=self.tracker.dialect != "sqlite", poll_s=poll_s,
                              timeout_why="the stage's time budget is used up")
            extra = len(study.trials) + 3  # at most 3 more trials (every one may diverge or be pruned)
            while n_complete(study) == 0 and len(study.trials) < extra:
                self.cancel.check()
                studies.enqueue_slots(study, 1, self.parent_run_id)
                run_trial(study.ask())
        except BaseException:
            studies.drop_slots(study, record.STOPPED)
            raise
        self.tracker.log_event(self.parent, ev.STAGE_TRIALS, {"stage": stage, "trials": counted(study),
                                                             "seconds": round(time.monotonic() - start, 3)})

    def child_config(self, model_cfg: DactModelConfig, train_cfg: TrainConfig, name: str, tag: str) -> RunConfig:
        c = copy.deepcopy(self.cfg)
        c.model, c.train = copy.deepcopy(model_cfg), copy.deepcopy(train_cfg)
        c.name, c.tag = name, tag
        return c.validate()

    def train_child(self, run_cfg: RunConfig, extra_callbacks: list[Callback], trial: optuna.Trial | None = None,
                    save: bool = True, model=None, tokenizer=None, data=None, evaluate_test: bool = True):
        from ...train import train

        run_id = self.tracker.create_run("dact", run_cfg.to_dict(), name=run_cfg.name, tag=run_cfg.tag,
                                         parent_id=self.parent, dataset_id=self.dataset_id, status="queued")
        if trial is not None:
            studies.link_trial(trial, run_id, self.parent)
        run_cfg.train.resume_checkpoints = False  # a trial is re-run, not resumed (the pipeline resumes by stage)
        try:
            with studies.live_run(run_id):
                return train(run_cfg, data=data or self.split, home=self.home, tracker=self.tracker,
                             callbacks=[*extra_callbacks, *self.callbacks], cancel=self.cancel, run_id=run_id,
                             parent_id=self.parent, save=save, model=model, tokenizer=tokenizer,
                             evaluate_test=evaluate_test)
        finally:  # train() takes the dataset id from the config; this run's data is the pipeline's split
            self.tracker.update_run(run_id, dataset_id=self.dataset_id)

    # -- stages ---------------------------------------------------------------------------------------------
    def stage1(self) -> None:
        stage1.run(self)

    def model_cfg(self) -> DactModelConfig:
        return from_dict(DactModelConfig, self.state["stage1"]["model"], "model")

    def train_cfg(self) -> TrainConfig:
        """How the trunk (the model stages 3 and final build on) was trained."""
        st2 = self.state["stage2"]
        if isinstance(st2.get("train"), dict):
            tc = from_dict(TrainConfig, st2["train"], "train")
            tc.validate()
            return tc
        return self.trial_train_cfg(st2["best_params"])

    def trial_train_cfg(self, params: dict[str, Any], n_train: int | None = None) -> TrainConfig:
        return train_from_params(params, self.cfg.train, n_train=n_train or len(self.split.train),
                                 min_steps=self.pipe.min_steps, max_epochs=self.pipe.max_epochs)

    def keep_if_best(self, study: optuna.Study, trial: optuna.Trial, value: float, res, run_cfg: RunConfig) -> None:
        stage2.keep_if_best(self, study, trial, value, res, run_cfg)

    def stage2(self) -> None:
        stage2.run(self)

    def trunk(self):
        """The best stage-2 model (encoder + classifiers trained; the halting units get fitted in stage 3)."""
        from ...models import load_model

        rid = self.state["stage2"].get("best_run_id")
        if rid is None or not (self.tracker.run_dir(int(rid)) / "model.safetensors").is_file():
            raise DactLabError(f"The best stage-2 model (run {rid}) has no saved weights: stage 3 needs them. Start "
                               "the pipeline again under a new name.")
        return int(rid), load_model(self.tracker.run_dir(int(rid)), device=str(self.device))

    def stage3(self) -> None:
        stage3.run(self)

    def single(self) -> None:
        single.run(self)

    def final(self) -> None:
        final.run(self)

    def finetune(self, model, loaded, chosen: FrontPoint, enc_val) -> dict:
        return final.finetune(self, model, loaded, chosen, enc_val)

    def result(self, status: str = "finished") -> PipelineResult:
        return record.result_of(self.parent_run_id, self.state, self.names, status, self.resumed)


def as_dact_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` validated, as a 'dact' config: a 'backbone' config keeps its encoder, data, training settings,
    ``init_from_run`` and pooling, with default DACT heads (stage 1 searches them anyway)."""
    cfg.validate()
    if cfg.kind == "dact":
        return cfg
    if cfg.kind != "backbone":
        raise ConfigError(f"kind = {cfg.kind!r} is invalid for the DACT pipeline: it tunes single-task DACT models; "
                          "use a config of kind 'dact' (or 'backbone').")
    out = copy.deepcopy(cfg)
    out.kind = "dact"
    out.model = DactModelConfig(pooling=cfg.model.pooling)
    return out.validate()


def run_pipeline(cfg: RunConfig, *, pipeline: PipelineConfig, home=None, tracker=None,
                 cancel: CancelToken | None = None, callbacks: list[Callback] | None = None,
                 data=None, run_id: int | None = None) -> PipelineResult:
    """Run (or resume) the staged DACT tuning of ``cfg`` (kind 'dact'; a 'backbone' config is converted by
    :func:`as_dact_config`); see the module docstring. ``data``: an
    optional ``TextDataset``/``DatasetSplit`` instead of ``cfg.data`` (as for ``train()``); ``callbacks`` are
    passed to every ``train()`` the pipeline runs. Raises :class:`Cancelled` (parent 'cancelled') when ``cancel``
    is set. ``run_id``: a pre-created parent run (the dashboard's job manager) to use for a new pipeline."""
    from ...tracker import Tracker

    pipeline.validate()
    cfg = copy.deepcopy(as_dact_config(cfg))
    if cfg.model.exit_temperature:
        raise ConfigError("model.exit_temperature is not used by the DACT pipeline: stage 3 fits the halting units on "
                          "the stage-2 model's own exits. Turn it off for the pipeline (it applies to single DACT "
                          "runs).")
    single_cfg = copy.deepcopy(cfg)  # the single-run candidate: the config as `train --kind dact` runs it
    # stage 3 fits the halting units per λ on the best stage-2 model itself: its trials skip train()'s own
    # post-training halting fit (kind 'dact', model.fit_halting)
    cfg.model.fit_halting = False
    tracker = tracker or Tracker(home)
    cancel = cancel or CancelToken()
    run = _Pipeline(cfg, pipeline, tracker, cancel, callbacks or [], data)
    run.single_cfg = single_cfg
    run.open_parent(run_id)
    if run.already_finished:
        return run.result()
    with studies.live_run(run.parent_run_id):
        try:
            for stage in STAGES:
                if stage not in run.state:
                    cancel.check()
                    getattr(run, stage)()
        except Cancelled as exc:
            tracker.set_status(run.parent, "cancelled", error=str(exc) or "cancelled", summary=run.summary)
            tracker.log_event(run.parent, ev.CANCELLED, {"reason": str(exc), "stages_done": list(run.state)})
            raise
        except KeyboardInterrupt:
            tracker.set_status(run.parent, "interrupted", error="KeyboardInterrupt", summary=run.summary)
            raise
        except BaseException as exc:
            tracker.set_status(run.parent, "failed", error=f"{type(exc).__name__}: {exc}", summary=run.summary)
            raise
    tracker.set_status(run.parent, "finished", summary=run.summary)
    tracker.log_event(run.parent, ev.PIPELINE_END, {"final_run_id": run.state["final"]["final_run_id"]})
    return run.result()


def worker_trials(study: optuna.Study, tracker, cancel, callbacks):
    """The :class:`~.stage2.Stage2Trials` or :class:`~.stage3.Stage3Trials` of a pipeline's stage-2 / stage-3
    study, rebuilt from the pipeline's parent run: its run and pipeline configs, its stored dataset (the same rows
    and split on every machine) and the earlier stages' records in the parent's run folder (on another machine:
    the shared ``--artifacts DIR``; stage 3 also loads the trunk from stage 2's run folder there)."""
    parent = int(study.user_attrs["parent_run_id"])
    run = tracker.get_run(parent)
    conf = run.get("config") or {}
    if not isinstance(conf, dict) or not isinstance(conf.get("run"), dict) or not isinstance(conf.get("pipeline"),
                                                                                               dict):
        raise DactLabError(f"run {parent} (the parent of study {study.study_name!r}) records no pipeline config.")
    cfg = RunConfig.from_dict(conf["run"]).validate()
    pipe = PipelineConfig.from_dict(conf["pipeline"]).validate()
    if run.get("dataset_id") is not None:  # the stored copy: the same rows (and max_rows sample) everywhere
        cfg.data.path, cfg.data.dataset_id = None, int(run["dataset_id"])
    pl = _Pipeline(cfg, pipe, tracker, cancel, list(callbacks or []), None)
    pl.parent = parent
    pl.state = record.read_stages(tracker.run_dir(parent))
    stage = study.user_attrs.get("stage", "stage2")
    needed = ["stage1"] if stage == "stage2" else ["stage1", "stage2"]
    for s in needed:
        if s not in pl.state:
            raise DactLabError(f"{s}'s record ({s}.json) of pipeline {pipe.name!r} is not in "
                               f"{tracker.run_dir(parent)}: on another machine, give the workers the pipeline's "
                               f"artifacts directory (--artifacts DIR, shared), or wait until {s} has finished.")
    sizes = study.user_attrs.get("split")
    mine = [len(pl.split.train), len(pl.split.val)]
    if sizes is not None and list(sizes) != mine:
        raise DactLabError(f"this worker's split of pipeline {pipe.name!r} has {mine[0]} training / {mine[1]} "
                           f"validation rows, the pipeline's has {sizes[0]} / {sizes[1]}: its data was not "
                           "stored as one dataset (e.g. given in memory or with a separate validation file); "
                           f"run that pipeline's {stage} in its own process ({stage}_local_trials = None).")
    if stage == "stage2":  # load_study gives Optuna's default pruner: the stage's own one, as in the pipeline
        study.pruner = stage2.pruner_of(pipe)
    return stage2.Stage2Trials(pl, study) if stage == "stage2" else stage3.Stage3Trials(pl, study)


def run_engine(cfg: RunConfig, settings: PipelineConfig, ctx) -> PipelineResult:
    """The engine interface (:mod:`dact_lib.engines`): :func:`run_pipeline` with ``settings``. A pipeline resumes
    by its name (run it again under the same name), not by ``resume``."""
    if ctx.resume:
        raise DactLabError(f"a DACT pipeline resumes by its name: start it again with name {settings.name!r}.")
    return run_pipeline(cfg, pipeline=settings, home=ctx.home, tracker=ctx.tracker, cancel=ctx.cancel,
                        callbacks=ctx.callbacks, run_id=ctx.run_id)
