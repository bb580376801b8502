"""The staged DACT tuning pipeline (the original project's ``TuningEngine``; spec "Staged tuning").

:func:`run_pipeline` runs four stages under one *parent* run (tracker kind ``"dact-pipeline"``, name =
``PipelineConfig.name``); every real training is a child run of it:

1. **Architecture** (study ``<name>/stage1``, minimise): the classifier and halting MLPs (depth 0-3, width,
   layout, activation, dropout), the pooling ('cls'/'mean') and weight sharing, by the validation DACT loss at a
   fixed small λ (``stage1_lambda``). The encoder is FROZEN here, so the heads train on cached per-layer summaries
   (:mod:`dact_lib.features`) with the same unit code as :class:`~dact_lib.modeling_dact.DactBert`
   (``DactBert.unit``, heads built by ``heads.build_mlp``) and ``dact.accumulate`` + ``dact.dact_loss``: a trial
   takes seconds and no child run (the heads train with ``stage1_threads`` torch threads, default 1). The parent
   gets a ``stage1_features`` event (cache keys, hit or not, the time to build the cache) so the dashboard can say
   that cached features were used. With ``RunConfig.init_from_run`` the features come from that backbone run's
   encoder weights.
2. **Training parameters** (``<name>/stage2``, minimise validation loss; successive halving over epochs by
   default, ``stage2_pruner``): encoder lr, head lr (both log; the head-lr range holds the single runs' 1e-3),
   batch size, epochs, weight decay, warmup ratio; each trial is a real :func:`dact_lib.train.train` of DactBert
   with the stage-1 heads (child run, tag ``stage2``) of at least ``min_steps`` optimizer steps (small data: more
   epochs, at most ``max_epochs``). Only the best trial's weights are kept (its run folder); stage 3 and the final
   model are built on them.
3. **λ** (``<name>/stage3``, TWO objectives, both minimised: validation NLL of a_N — or 1 − accuracy with
   ``objective3="error"`` — and the validation average exit layer; names set with ``study.set_metric_names``).
   On ONE model — the best stage-2 model, encoder and classifiers frozen — each trial fits fresh halting units
   with the unchanged DACT loss on cached per-layer outputs of the validation split
   (:func:`dact_lib.halting.fit_halting`, seconds per trial): λ log-uniform in [lambda_low, lambda_high] on the
   normalised scale (λ_spec = λ·NLL_ref/N); with ``stage3_thresholds`` a trial may instead set the units to a
   confidence threshold τ (:func:`dact_lib.halting.threshold_state`). The first trials are λ log-spaced over the
   range and the τ grid, then the seeded multi-objective TPE sampler. Each trial's halting weights are a small
   file (``runs/<parent>/halting/trial_<n>.safetensors``; user attr ``halting_file``); user attrs ``run_id`` (the
   stage-2 model), ``val_accuracy``, ``val_nll``, ``val_avg_exit_layer``, ``spec_lambda``. The default point is
   picked by ``choice_rule``; :func:`choose_point` / :func:`choose_for_prediction` pick another later.
4. **Final** (child run kind ``dact``, tag ``final``, no training): the stage-2 weights with the chosen halting
   units, saved as a run with every stage-3 point's halting file beside it (``halting/``), evaluated on the
   validation and test splits; the exit-policy sweep on the validation split (DACT vs patience vs entropy vs fixed
   depth over the same weights) goes to a parent event and the summary. ``final_finetune`` also fine-tunes that
   model end to end at the chosen λ (child run ``finetune``) and records it against the fitted point.

**Guards.** Each stage compares its best model's accuracy with the majority-class baseline (validation; the final
model on test) and with the stage before: ``guard`` events; a model not better than the baseline by
max(``guard_margin``, 2 standard errors) records ``guard_failed`` and stops the pipeline with
:class:`PipelineGuardError`, whose message says what to change (``guards="warn"``: recorded, and it goes on).

Records (all on the parent run): events ``pipeline_start``, ``stage_start``/``stage_end`` (payload ``stage``),
``trial`` (one per finished trial: stage, number, state, params, values, user_attrs), ``stage_trials``,
``stage1_features``, ``guard`` / ``guard_failed``, ``pareto_front``, ``chosen_point`` (the rule's choice),
``exit_policy_sweep``, ``pipeline_end``, and ``resumed`` / ``cancelled`` / ``point_chosen`` / ``chosen`` (a
user's choice) / ``finetune_compared`` when they happen;
metric rows at step = trial number: ``stage1_value``, ``stage2_value``, ``stage3_objective``,
``stage3_avg_exit_layer``, ``stage3_lambda``, ``stage3_val_accuracy``; one JSON file per finished stage in the
parent's run dir (``stage1.json`` … ``final.json``); the summary holds ``study_names``, ``stages_done``,
``stage_best``, ``feature_cache``, ``front``, ``chosen``, ``final_run_id``, ``final_test``, ``exit_policy_sweep``.
The parent's config is ``{"run": RunConfig dict, "pipeline": PipelineConfig dict}``.

**Resume.** Calling :func:`run_pipeline` again with the same ``name`` reopens the newest parent run of that name
(its RunConfig must be the same), reloads the stage JSON files and goes on after the last finished stage; a stage
that was interrupted continues its Optuna study (``load_if_exists``): only the missing trials are run (COMPLETE
and PRUNED trials count, FAIL ones — e.g. a cancelled trial — do not). A finished pipeline returns its stored
result and trains nothing. To search again, use a new name.

**Time budget.** ``timeout_min`` bounds one call: at the start of each stage the remaining time is split over the
stages still to run in the ratio stage1 : stage2 : stage3 : final = 1 : 8 : 1 : 1, and the stage's share is the
``timeout`` of its ``optimize`` call (trials are not interrupted; each stage runs at least one trial, and the final
training always runs). **Cancellation**: the token is checked between trials, every stage-1 epoch and every
training step; the parent is then recorded 'cancelled' and :class:`~dact_lib.errors.Cancelled` is raised.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from .. import dact
from ..callbacks import Callback, CancelToken
from ..config import ACTIVATIONS, POOLINGS, DactModelConfig, MLPConfig, RunConfig, TrainConfig, from_dict
from ..errors import Cancelled, ConfigError, DactLabError
from ..modeling_dact import DactBert, DactUnits, loss_terms
from . import studies

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "choose_point", "load_pipeline_result",
           "pareto_points", "trial_points", "apply_choice_rule", "as_dact_config", "FeatureDactHeads",
           "fit_heads_on_features", "HeadFit", "model_from_params", "train_from_params", "PIPELINE_KIND", "STAGES",
           "CHOICE_RULES", "PipelineGuardError", "majority_baseline", "guard_margin"]

PIPELINE_KIND = "dact-pipeline"
STAGES = ("stage1", "stage2", "stage3", "final")
OBJECTIVES3 = ("loss", "error")
CHOICE_RULES = ("lowest_exit_within_1pt", "best_objective")
LAYOUT_CHOICES = ("constant", "pyramidal", "inverted", "bowtie")  # "constant" = explicit [width] * depth
_STAGE_WEIGHTS = {"stage1": 1.0, "stage2": 8.0, "stage3": 1.0, "final": 1.0}
_PREFIX = {"classifier": "cls", "halting": "halt"}


# ----------------------------------------------------------------------------------------------------------------
# configuration and result
# ----------------------------------------------------------------------------------------------------------------
def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class PipelineConfig:
    """Settings of one staged tuning pipeline. The study names derive from ``name``: ``f"{name}/stage1"`` …

    ``choice_rule``: ``"lowest_exit_within_1pt"`` — among the stage-3 trials, the lowest validation average
    exit layer whose validation accuracy is within ``choice_tolerance`` (0.01 = 1 point) of the best validation
    accuracy of any trial (ties: higher accuracy, then lower trial number) — a point of the accuracy/exit front,
    which with ``objective3="loss"`` need not be on the NLL/exit front; ``"best_objective"`` — the front point
    with the lowest first objective (validation NLL or error)."""

    name: str
    trials_stage1: int = 20
    trials_stage2: int = 6
    trials_stage3: int = 32  # halting fits on one trained model: seconds each
    timeout_min: float | None = None  # the whole pipeline (one call); None = no limit
    stage1_epochs: int = 15  # epochs of head training over the cached features, per stage-1 trial
    # stage 3's λ range, on the normalised scale of dact.spec_lambda (λ_spec = λ · NLL_ref / N): one range for
    # every dataset; λ = 1 means "running all N layers costs as much as the deepest classifier's NLL"
    lambda_low: float = 1e-2
    lambda_high: float = 10.0
    # stage 3 also tries halting units set to a confidence threshold τ (halting.threshold_state; models with
    # halting_input "confidence"): the exact DACT rule then exits like the entropy policy (docs/benchmarks.md)
    stage3_thresholds: bool = True
    objective3: str = "loss"  # first objective of stage 3: "loss" (validation NLL) or "error" (1 - accuracy)
    choice_rule: str = "lowest_exit_within_1pt"
    choice_tolerance: float = 0.01
    seed: int = 0
    # stage 1: fixed training of the heads on cached features, and the architecture search space
    stage1_lambda: float = 1e-3
    stage1_lr: float = 1e-3
    stage1_batch_size: int = 64
    # torch threads while the heads train on cached features (restored after each trial). The heads are small
    # matmuls: on a shared 2-core machine one thread measured ~10x cheaper than two (bench/stage1_cache.py).
    # None = leave the process setting alone.
    stage1_threads: int | None = 1
    max_depth: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    poolings: tuple[str, ...] = ("cls", "mean")
    search_share_weights: bool = True
    # stage 2 search space
    encoder_lr_range: tuple[float, float] = (1e-5, 1e-4)
    # contains the single runs' head lr (1e-3); the seed's (1e-4, 1e-2) drew 1e-4-4e-4 heads that, on a few
    # hundred rows and one epoch, never left the majority class
    head_lr_range: tuple[float, float] = (3e-4, 3e-3)
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    epochs_range: tuple[int, int] = (1, 3)
    weight_decay_range: tuple[float, float] = (0.0, 0.1)
    warmup_range: tuple[float, float] = (0.0, 0.2)
    # a stage-2 trial runs at least this many optimizer steps: on small data its epochs are raised (at most
    # max_epochs) so that 1 epoch of 400 rows at batch 64 (7 steps) cannot be a trial
    min_steps: int = 150
    # multi-fidelity stage 2: "halving" = successive halving over epochs (a trial goes on after epoch 1, 3, … only
    # when it is in the best third of the trials at that epoch), "median" = MedianPruner, "none"
    stage2_pruner: Literal["halving", "median", "none"] = "halving"
    max_epochs: int = 50
    # guards: a stage's best model must beat the majority-class baseline by max(guard_margin, 2 standard errors
    # of the baseline on the validation rows), or the pipeline stops and says what to change
    guard_margin: float = 0.02
    guards: Literal["stop", "warn"] = "stop"  # "warn": record the failed guard (event, log) and go on
    # optionally fine-tune the final model end to end at the chosen point's λ (measured against the fitted point)
    final_finetune: bool = False
    finetune_epochs: int = 1
    # final model: time the exit-policy sweep (real early-exit passes) or only simulate it
    sweep_timed: bool = True

    def validate(self) -> "PipelineConfig":
        def bad(fld: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"pipeline.{fld} = {value!r} is invalid: {allowed}.")

        if not isinstance(self.name, str) or not self.name.strip():
            raise bad("name", self.name, "give a non-empty name (the studies are called <name>/stage1 ...)")
        for fld in ("trials_stage1", "trials_stage2", "trials_stage3", "stage1_epochs", "stage1_batch_size",
                    "max_epochs", "finetune_epochs"):
            v = getattr(self, fld)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(fld, v, "expected an integer >= 1")
        if self.timeout_min is not None and not (_num(self.timeout_min) and self.timeout_min > 0):
            raise bad("timeout_min", self.timeout_min, "expected a positive number of minutes or None")
        if not (_num(self.lambda_low) and _num(self.lambda_high) and 0 < self.lambda_low < self.lambda_high):
            raise bad("lambda_low/lambda_high", (self.lambda_low, self.lambda_high),
                      "λ is searched on a log scale: need 0 < lambda_low < lambda_high")
        if self.stage2_pruner not in ("halving", "median", "none"):
            raise bad("stage2_pruner", self.stage2_pruner, "choose 'halving', 'median' or 'none'")
        if self.guards not in ("stop", "warn"):
            raise bad("guards", self.guards, "choose 'stop' (the default) or 'warn'")
        if not isinstance(self.min_steps, int) or isinstance(self.min_steps, bool) or self.min_steps < 0:
            raise bad("min_steps", self.min_steps, "expected an integer >= 0 (0 = no minimum)")
        if not (_num(self.guard_margin) and 0 <= self.guard_margin < 1):
            raise bad("guard_margin", self.guard_margin, "expected an accuracy margin in [0, 1)")
        for fld in ("final_finetune", "sweep_timed", "search_share_weights", "stage3_thresholds"):
            if not isinstance(getattr(self, fld), bool):
                raise bad(fld, getattr(self, fld), "expected true or false")
        if self.objective3 not in OBJECTIVES3:
            raise bad("objective3", self.objective3, f"choose one of {OBJECTIVES3}")
        if self.choice_rule not in CHOICE_RULES:
            raise bad("choice_rule", self.choice_rule, f"choose one of {CHOICE_RULES}")
        if not (_num(self.choice_tolerance) and 0 <= self.choice_tolerance < 1):
            raise bad("choice_tolerance", self.choice_tolerance, "expected an accuracy difference in [0, 1)")
        if self.stage1_threads is not None and (not isinstance(self.stage1_threads, int)
                                                or isinstance(self.stage1_threads, bool) or self.stage1_threads < 1):
            raise bad("stage1_threads", self.stage1_threads, "expected an integer >= 1 or None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise bad("seed", self.seed, "expected an integer >= 0")
        for fld in ("stage1_lambda", "stage1_lr"):
            v = getattr(self, fld)
            if not (_num(v) and v >= 0 and (fld != "stage1_lr" or 0 < v < 1)):
                raise bad(fld, v, "expected a non-negative number (a learning rate in (0, 1))")
        if not isinstance(self.max_depth, int) or isinstance(self.max_depth, bool) or not 0 <= self.max_depth <= 8:
            raise bad("max_depth", self.max_depth, "expected an integer in 0..8")
        if not self.widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1
                                      for w in self.widths):
            raise bad("widths", self.widths, "expected a non-empty list of positive integers")
        if not self.poolings or not all(p in POOLINGS for p in self.poolings):
            raise bad("poolings", self.poolings, f"expected a non-empty subset of {POOLINGS}")
        for fld in ("encoder_lr_range", "head_lr_range"):
            lo, hi = self._pair(fld)
            if not (0 < lo <= hi < 1):
                raise bad(fld, getattr(self, fld), "expected (low, high) with 0 < low <= high < 1 (log scale)")
        for fld in ("weight_decay_range", "warmup_range"):
            lo, hi = self._pair(fld)
            if not (0 <= lo <= hi and (fld != "warmup_range" or hi < 1)):
                raise bad(fld, getattr(self, fld), "expected (low, high) with 0 <= low <= high"
                          + (" < 1" if fld == "warmup_range" else ""))
        lo, hi = self._pair("epochs_range")
        if not (float(lo).is_integer() and float(hi).is_integer() and 1 <= lo <= hi <= 1000):
            raise bad("epochs_range", self.epochs_range, "expected integers (low, high) with 1 <= low <= high")
        if not self.batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                           for b in self.batch_sizes):
            raise bad("batch_sizes", self.batch_sizes, "expected a non-empty list of positive integers")
        return self

    def _pair(self, fld: str) -> tuple[float, float]:
        v = getattr(self, fld)
        if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_num(x) for x in v)):
            raise ConfigError(f"pipeline.{fld} = {v!r} is invalid: expected a pair of numbers (low, high).")
        return float(v[0]), float(v[1])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown pipeline setting(s) {unknown}: allowed are {sorted(names)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs).validate()

    def study_names(self) -> dict[str, str]:
        return {s: f"{self.name}/{s}" for s in STAGES[:3]}


@dataclass
class PipelineResult:
    parent_run_id: int
    final_run_id: int | None
    stage_best: dict[str, dict]  # stage -> its best params (stage3: the chosen point's params)
    pareto: list[dict]  # the stage-3 front, sorted by average exit layer
    chosen: dict  # the front point picked by the choice rule
    study_names: dict[str, str]
    status: str = "finished"
    resumed_stages: list[str] = field(default_factory=list)  # stages taken from an earlier call (not re-run)
    feature_cache: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    exit_policy_sweep: list[dict] = field(default_factory=list)
    model_config: dict = field(default_factory=dict)  # the final DactModelConfig
    train_config: dict = field(default_factory=dict)  # the final TrainConfig


# ----------------------------------------------------------------------------------------------------------------
# stage 1: DACT heads on cached per-layer features
# ----------------------------------------------------------------------------------------------------------------
class FeatureDactHeads(DactUnits):
    """The DACT units of :class:`DactBert` without the encoder: ``classifiers`` and ``halters`` built and run by
    the same :class:`~dact_lib.modeling_dact.DactUnits` code as DactBert's, on cached per-layer summaries. The
    parameter names equal DactBert's head parameter names."""

    def __init__(self, cfg: DactModelConfig, num_layers: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_layers = int(num_layers)
        self.num_classes = int(num_classes)
        self._build_units(cfg, hidden_size, self.num_classes, self.num_layers)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, N, H] (already pooled) -> (y [B, N, K], h [B, N]). Each summary is passed to ``unit`` as a
        one-token sequence with mask 1, which both poolings return unchanged."""
        if feats.dim() != 3 or feats.shape[1] != self.num_layers:
            raise ValueError(f"features must be [B, {self.num_layers}, H], got {tuple(feats.shape)}")
        ones = feats.new_ones(feats.shape[0], 1, dtype=torch.long)
        y, h, _, _ = self.run_units(lambda n: (feats[:, n - 1:n], ones), self.num_layers, feats.shape[0],
                                    feats.device)
        return y, h


@dataclass
class HeadFit:
    val_loss: float  # best validation DACT loss over the epochs (the stage-1 objective)
    best_epoch: int  # 1-based
    metrics: dict[str, float]  # validation metrics at the best epoch: val_loss, val_nll, val_accuracy, ...
    history: list[dict[str, float]]
    heads: FeatureDactHeads


@torch.no_grad()
def _eval_heads(heads: FeatureDactHeads, x: torch.Tensor, y: torch.Tensor, lam: float) -> dict[str, float]:
    heads.eval()
    yy, hh = heads(x)
    a, p = dact.accumulate(yy, hh)
    terms = {k: v for k, v in loss_terms(heads.cfg).items() if k not in ("ponder_lambda", "start_at_one")}
    out = dact.dact_loss(a[:, -1], p, y, lam, heads.cfg.ponder_start_at_one, y=yy, **terms)
    exit_layer = dact.run_policy_offline(dact.DactPolicy(), yy, hh).exit_layer
    return {"val_loss": float(out.loss), "val_nll": float(out.nll), "val_ponder": float(out.ponder),
            "val_accuracy": float((a[:, -1].argmax(-1) == y).float().mean()),
            "val_avg_exit_layer": dact.average_exit_layer(exit_layer)}


def fit_heads_on_features(cfg: DactModelConfig, num_classes: int, train_x: torch.Tensor, train_y: torch.Tensor,
                          val_x: torch.Tensor, val_y: torch.Tensor, *, epochs: int, lr: float = 1e-3,
                          batch_size: int = 64, weight_decay: float = 0.0, ponder_lambda: float | None = None,
                          seed: int = 0, report: Callable[[int, float], None] | None = None,
                          cancel: CancelToken | None = None, num_threads: int | None = None) -> HeadFit:
    """Train fresh DACT heads (``cfg``) on per-layer features train_x [n, N, H] with the DACT loss
    (``dact.accumulate`` + ``dact.dact_loss`` at ``ponder_lambda``, default ``cfg.ponder_lambda``); evaluate on
    val_x after every epoch; ``report(epoch_index, val_loss)`` may raise (Optuna pruning). Deterministic per
    ``seed``; the global RNG is left untouched. ``num_threads``: torch threads during the call (restored after;
    None = unchanged)."""
    if num_threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return fit_heads_on_features(cfg, num_classes, train_x, train_y, val_x, val_y, epochs=epochs, lr=lr,
                                         batch_size=batch_size, weight_decay=weight_decay,
                                         ponder_lambda=ponder_lambda, seed=seed, report=report, cancel=cancel)
        finally:
            torch.set_num_threads(previous)
    lam = cfg.ponder_lambda if ponder_lambda is None else float(ponder_lambda)
    train_y, val_y = train_y.long().to(train_x.device), val_y.long().to(val_x.device)
    n = train_x.shape[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = FeatureDactHeads(cfg, train_x.shape[1], train_x.shape[2], num_classes).to(train_x.device)
        opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history: list[dict[str, float]] = []
        best: dict[str, float] | None = None
        best_epoch = 0
        best_state = None
        for epoch in range(epochs):
            if cancel is not None:
                cancel.check()
            heads.train()
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                idx = idx.to(train_x.device)
                yy, hh = heads(train_x[idx])
                a, p = dact.accumulate(yy, hh)
                terms = {k: v for k, v in loss_terms(cfg).items() if k not in ("ponder_lambda", "start_at_one")}
                loss = dact.dact_loss(a[:, -1], p, train_y[idx], lam, cfg.ponder_start_at_one, y=yy, **terms).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            logs = _eval_heads(heads, val_x, val_y, lam)
            history.append({"epoch": epoch + 1, **logs})
            if best is None or logs["val_loss"] < best["val_loss"]:
                best, best_epoch = logs, epoch + 1
                best_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
            if report is not None:
                report(epoch, logs["val_loss"])
        if best_state is not None:
            heads.load_state_dict(best_state)
    assert best is not None
    return HeadFit(val_loss=best["val_loss"], best_epoch=best_epoch, metrics=best, history=history, heads=heads)


def _suggest_mlp(trial: optuna.Trial, which: str, pipe: PipelineConfig) -> None:
    pre = _PREFIX[which]
    depth = trial.suggest_int(f"{pre}_depth", 0, pipe.max_depth)
    if depth >= 1:
        trial.suggest_categorical(f"{pre}_width", list(pipe.widths))
        trial.suggest_categorical(f"{pre}_activation", list(ACTIVATIONS))
    if depth >= 2:  # the layouts only differ from depth 2 on
        trial.suggest_categorical(f"{pre}_layout", list(LAYOUT_CHOICES))
    trial.suggest_float(f"{pre}_dropout", 0.0, 0.3)


def suggest_architecture(trial: optuna.Trial, pipe: PipelineConfig) -> dict[str, Any]:
    """Stage 1's define-by-run search space; returns the trial's params."""
    trial.suggest_categorical("pooling", list(pipe.poolings))
    if pipe.search_share_weights:
        trial.suggest_categorical("share_weights", [False, True])
    _suggest_mlp(trial, "classifier", pipe)
    _suggest_mlp(trial, "halting", pipe)
    return dict(trial.params)


def _mlp_from_params(params: dict[str, Any], which: str, base: MLPConfig) -> MLPConfig:
    pre = _PREFIX[which]
    depth = int(params[f"{pre}_depth"])
    width = int(params.get(f"{pre}_width", base.width))
    layout = params.get(f"{pre}_layout", "constant")
    mlp = MLPConfig(activation=params.get(f"{pre}_activation", base.activation),
                    dropout=float(params.get(f"{pre}_dropout", base.dropout)), depth=depth, width=width)
    if layout == "constant" or depth < 2:
        mlp.layout, mlp.hidden_dims = "explicit", [width] * depth
    else:
        mlp.layout = layout
        mlp.hidden_dims = mlp.resolved_dims()
    return mlp


def model_from_params(params: dict[str, Any], base: DactModelConfig, ponder_lambda: float | None = None
                      ) -> DactModelConfig:
    """The DactModelConfig of stage-1 ``params`` (missing keys keep ``base``'s values)."""
    m = copy.deepcopy(base)
    m.pooling = params.get("pooling", base.pooling)
    m.share_weights = bool(params.get("share_weights", base.share_weights))
    if "cls_depth" in params:
        m.classifier = _mlp_from_params(params, "classifier", base.classifier)
    if "halt_depth" in params:
        m.halting = _mlp_from_params(params, "halting", base.halting)
    if ponder_lambda is not None:
        m.ponder_lambda = float(ponder_lambda)
    m.validate()
    return m


def suggest_training(trial: optuna.Trial, pipe: PipelineConfig) -> dict[str, Any]:
    """Stage 2's search space; returns the trial's params (TrainConfig field names)."""
    lo, hi = pipe._pair("encoder_lr_range")
    trial.suggest_float("encoder_lr", lo, hi, log=True)
    lo, hi = pipe._pair("head_lr_range")
    trial.suggest_float("head_lr", lo, hi, log=True)
    trial.suggest_categorical("batch_size", list(pipe.batch_sizes))
    lo, hi = pipe._pair("epochs_range")
    trial.suggest_int("epochs", int(lo), int(hi))
    lo, hi = pipe._pair("weight_decay_range")
    trial.suggest_float("weight_decay", lo, hi)
    lo, hi = pipe._pair("warmup_range")
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


def majority_baseline(targets) -> float:
    """The accuracy of always answering the most frequent class of ``targets``."""
    t = torch.as_tensor(targets).long()
    return float(torch.bincount(t).max()) / max(1, int(t.numel()))


def guard_margin(baseline: float, n: int, margin: float) -> float:
    """How much a stage's accuracy must exceed the majority baseline: max(margin, 2 standard errors of the
    baseline's accuracy on n rows)."""
    return max(float(margin), 2.0 * math.sqrt(max(baseline * (1.0 - baseline), 0.0) / max(1, n)))


class PipelineGuardError(DactLabError):
    """A stage's best model is not clearly better than always answering the majority class."""


_GUARD_ADVICE = {
    "stage1": ("the heads on the frozen encoder's features learned nothing: check that the labels match the texts "
               "(Data page preview), give more rows, or raise pipeline.stage1_epochs / stage1_lr"),
    "stage2": ("no training-parameter trial trained a useful model: raise pipeline.min_steps (optimizer steps per "
               "trial) or pipeline.epochs_range, widen pipeline.head_lr_range towards 1e-3 (the single runs' "
               "value), or give more rows"),
    "stage3": ("every fitted halting point answers no better than the majority class: the stage-2 model itself "
               "is too weak — see its accuracy on the Runs page"),
    "final": ("the final model answers no better than the majority class on the test split: the validation "
              "split may be too small to select on; give more rows or a larger data.val_frac"),
}


# ----------------------------------------------------------------------------------------------------------------
# the Pareto front and the choice rule
# ----------------------------------------------------------------------------------------------------------------
def _point(t: FrozenTrial, objective3: str) -> dict[str, Any]:
    ua = t.user_attrs
    first = f"val_{'nll' if objective3 == 'loss' else 'error'}"
    lam = t.params.get("ponder_lambda")
    return {"trial": t.number, "lambda": None if lam is None else float(lam), "objective": first,
            first: float(t.values[0]), "val_avg_exit_layer": float(t.values[1]),
            "val_accuracy": float(ua.get("val_accuracy", float("nan"))),
            "val_nll": float(ua.get("val_nll", float("nan"))), "run_id": ua.get("run_id"),
            "halting": t.params.get("halting", "fitted"), "tau": t.params.get("tau"),
            **{k: ua[k] for k in ("spec_lambda", "halting_file") if k in ua}}


def pareto_points(study: optuna.Study) -> list[dict[str, Any]]:
    """The stage-3 Pareto front (``study.best_trials``) as dicts, sorted by average exit layer then trial."""
    objective3 = study.user_attrs.get("objective3", "loss")
    pts = [_point(t, objective3) for t in study.best_trials]
    return sorted(pts, key=lambda p: (p["val_avg_exit_layer"], p["trial"]))


def trial_points(study: optuna.Study) -> list[dict[str, Any]]:
    """Every complete stage-3 trial as a point (the same dicts as :func:`pareto_points`), by trial number."""
    objective3 = study.user_attrs.get("objective3", "loss")
    return [_point(t, objective3) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def apply_choice_rule(front: list[dict[str, Any]], rule: str = "lowest_exit_within_1pt",
                      tolerance: float = 0.01, *, trials: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Pick one point (see :class:`PipelineConfig` for the rules). ``trials``: every complete trial — the
    accuracy rule then measures "within 1 point" from the best accuracy of ANY trial and picks among all of them
    (with the NLL objective the most accurate trial can be off the NLL/exit front); without it, the front only."""
    if not front:
        raise DactLabError("The Pareto front is empty: stage 3 finished no trial (raise timeout_min or "
                           "trials_stage3).")
    if rule == "lowest_exit_within_1pt":
        pool = [p for p in (trials or front) if p["val_accuracy"] == p["val_accuracy"]] or front  # drop NaN
        best_acc = max(p["val_accuracy"] for p in pool)
        ok = [p for p in pool if p["val_accuracy"] >= best_acc - tolerance - 1e-12]
        return dict(min(ok, key=lambda p: (p["val_avg_exit_layer"], -p["val_accuracy"], p["trial"])))
    if rule == "best_objective":
        return dict(min(front, key=lambda p: (p[p["objective"]], p["val_avg_exit_layer"], p["trial"])))
    raise ConfigError(f"choice_rule = {rule!r} is invalid: choose one of {CHOICE_RULES}.")


def _load_stage3(target: Any, home=None, tracker=None) -> tuple[optuna.Study, int | None, Any]:
    if isinstance(target, optuna.Study):
        parent = target.user_attrs.get("parent_run_id")
        return target, (int(parent) if parent is not None else None), tracker
    from ..tracker import Tracker

    tracker = tracker or Tracker(home)
    run = tracker.get_run(int(target))
    if run["kind"] != PIPELINE_KIND:
        raise DactLabError(f"run {target} is a {run['kind']!r} run, not a DACT pipeline ({PIPELINE_KIND!r}): give "
                           "the pipeline's parent run id.")
    names = (run.get("summary") or {}).get("study_names") or {"stage3": f"{run['name']}/stage3"}
    try:
        study = optuna.load_study(study_name=names["stage3"], storage=studies.storage(tracker.home))
    except KeyError:
        raise DactLabError(f"pipeline run {target} has no stage-3 study yet ({names['stage3']!r}): let stage 3 "
                           "finish (or resume the pipeline) first.") from None
    return study, int(target), tracker


def choose_point(parent_or_study: int | optuna.Study, trial_number: int, *, home=None, tracker=None
                 ) -> dict[str, Any]:
    """Pick another Pareto-front point of a pipeline's stage 3 (by trial number); returns its point dict
    (``trial``, ``lambda``, objectives, ``val_accuracy``, ``run_id``) plus ``params`` (the trial's params, i.e.
    ``{"ponder_lambda": λ}``). The trial's run (``run_id``) holds a trained model of that point. Given a parent run
    id, the choice is recorded as a ``point_chosen`` event on it. Raises DactLabError for a point not on the
    front."""
    study, parent, tracker = _load_stage3(parent_or_study, home, tracker)
    front = {p["trial"]: p for p in pareto_points(study)}
    if int(trial_number) not in front:
        raise DactLabError(f"trial {trial_number} is not on the Pareto front of study {study.study_name!r}: pick "
                           f"one of trials {sorted(front)}.")
    point = dict(front[int(trial_number)])
    point["params"] = dict(study.trials[int(trial_number)].params)
    if parent is not None and tracker is not None:
        final = (tracker.get_run(parent).get("summary") or {}).get("final_run_id")
        if final is not None and point.get("halting_file"):  # fitted points: the final run + this halting file
            point["run_id"] = int(final)
        tracker.log_event(parent, "point_chosen", {"point": point, "by": "user"})
    return point


def choose_for_prediction(parent_id: int, point: dict[str, Any], *, tracker, by: str = "dashboard"
                          ) -> dict[str, Any]:
    """Make a pipeline point the one used for prediction, at once and without training. ``point`` is a point of
    the Pareto explorer (``trial``, ``lambda``, ``run_id``, ``source``: "front" or "final").

    A pipeline whose stage 3 fitted halting units on one model (points carry ``halting_file``): the point's
    halting weights are copied into the final run (or, before the final stage, the stage-2 model's run) and named
    in its ``halting_choice.json`` — the run's own halting units (the pipeline's rule choice) stay in its
    model.safetensors; choosing the pipeline's own point (or "final") clears the user's choice. Older pipelines
    (one trained run per λ): the point's run becomes the prediction model.

    Every choice is recorded as a ``point_chosen`` (front points) and a ``chosen`` event on the pipeline run; the
    pipeline's recorded choice (``chosen_point``, summary ``chosen``) is never changed. Returns ``run_id``,
    ``has_model`` and ``halting`` (the user's halting choice now in effect, or None)."""
    import shutil

    from ..models import HALTING_DIR, MODEL_FILE, set_halting_choice

    rid = point.get("run_id")
    if rid is None:
        raise DactLabError(f"Trial {point.get('trial')} has no trained run to predict with: choose another point.")
    rid = int(rid)
    parent = tracker.get_run(int(parent_id))
    summary = parent.get("summary") or {}
    rule = summary.get("chosen") or {}
    trial = point.get("trial")
    fitted = bool(point.get("halting_file") or rule.get("halting_file"))
    if trial is not None and point.get("source") != "final":
        try:
            choose_point(parent_id, int(trial), tracker=tracker)
        except (DactLabError, KeyError, ValueError):  # an older run without a stage-3 study: 'chosen' still records it
            pass
    halting = None
    if fitted:
        rid = int(summary.get("final_run_id") or rid)
        run_dir = tracker.run_dir(rid)
        if point.get("source") == "final" or trial is None or trial == rule.get("trial"):
            set_halting_choice(run_dir, None)
        else:
            name = f"{HALTING_DIR}/trial_{int(trial)}.safetensors"
            if not (run_dir / name).is_file():
                src = tracker.home / str(point.get("halting_file") or "")
                if not src.is_file():
                    raise DactLabError(f"Trial {trial}'s halting weights ({src}) are missing: choose another point.")
                (run_dir / HALTING_DIR).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, run_dir / name)
            halting = {"file": name, "trial": int(trial), "lambda": point.get("lambda"), "tau": point.get("tau"),
                       "val_avg_exit_layer": point.get("val_avg_exit_layer"),
                       "val_accuracy": point.get("val_accuracy"), "by": by, "at": time.time()}
            set_halting_choice(run_dir, halting)
    else:
        run_dir = Path(tracker.get_run(rid).get("run_dir") or tracker.run_dir(rid))
    tracker.log_event(parent_id, "chosen", {"run_id": rid, "trial": trial, "lambda": point.get("lambda"),
                                            "source": point.get("source", "front"), "by": by,
                                            "halting": halting is not None})
    return {"run_id": rid, "has_model": (run_dir / MODEL_FILE).is_file(), "halting": halting}


# ----------------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------------
class _Budget:
    def __init__(self, minutes: float | None) -> None:
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * float(minutes)

    def share(self, stage: str) -> float | None:
        """Seconds for ``stage``: the remaining time split over the stages still to run."""
        if self.deadline is None:
            return None
        rest = STAGES[STAGES.index(stage):]
        remaining = self.deadline - time.monotonic()
        return max(0.0, remaining * _STAGE_WEIGHTS[stage] / sum(_STAGE_WEIGHTS[s] for s in rest))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _counted(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def _n_complete(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)


def _parent_runs(tracker, name: str) -> list[dict]:
    """This engine's parent runs named ``name``, newest first (not a job manager's run of the same kind and name:
    only parents carry the ``{"run", "pipeline"}`` config)."""
    out = []
    for r in tracker.list_runs(kind=PIPELINE_KIND):
        conf = r.get("config") or {}
        if r["name"] == name and isinstance(conf, dict) and isinstance(conf.get("pipeline"), dict) \
                and conf["pipeline"].get("name") == name:
            out.append(r)
    return out


def _run_config_key(cfg: RunConfig) -> dict:
    d = _jsonable(cfg.to_dict())
    d.pop("name", None)
    d.pop("tag", None)
    return d


class _Pipeline:
    def __init__(self, cfg: RunConfig, pipe: PipelineConfig, tracker, cancel: CancelToken,
                 callbacks: list[Callback], data) -> None:
        from ..models import model_task, pick_device
        from ..train import load_split

        self.cfg, self.pipe, self.tracker = cfg, pipe, tracker
        self.home = tracker.home
        self.cancel = cancel
        self.callbacks = list(callbacks)
        self.names = pipe.study_names()
        self.budget = _Budget(pipe.timeout_min)
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
        """Create the parent run (or adopt ``run_id``, pre-created by a job manager), or find the earlier run of
        this pipeline name to resume (then ``run_id``, if given, records a link to it)."""
        tr, pipe = self.tracker, self.pipe
        previous = [r for r in _parent_runs(tr, pipe.name) if r["id"] != run_id]
        config = {"run": _jsonable(self.cfg.to_dict()), "pipeline": pipe.to_dict()}
        if previous and run_id is not None:
            tr.update_run(run_id, summary={"engine_run_id": int(previous[0]["id"]), "resumes": pipe.name})
            tr.log_event(run_id, "resumes", {"pipeline": pipe.name, "run_id": int(previous[0]["id"])})
        if not previous:
            if run_id is None:
                self.parent = tr.create_run(PIPELINE_KIND, config, name=pipe.name, tag="pipeline",
                                            dataset_id=self.dataset_id, status="running")
            else:
                self.parent = int(run_id)
                tr.update_run(self.parent, config=config, name=pipe.name, tag="pipeline", dataset_id=self.dataset_id)
                tr.set_status(self.parent, "running")
            self.summary = {"pipeline": pipe.name, "study_names": self.names, "stages_done": [], "stage_best": {},
                            "study_name": self.names["stage3"], "storage_url": studies.storage_url(self.home)}
            tr.update_run(self.parent, summary=self.summary)
            tr.log_event(self.parent, "pipeline_start", {"name": pipe.name, "study_names": self.names,
                                                         "pipeline": pipe.to_dict()})
            return
        run = previous[0]
        stored = (run.get("config") or {}).get("run")
        if isinstance(stored, dict):
            stored = dict(stored)
            stored.pop("name", None)
            stored.pop("tag", None)
        if stored != _run_config_key(self.cfg):
            raise ConfigError(f"A DACT pipeline named {pipe.name!r} already exists (run {run['id']}) with a different "
                              "run config; resuming needs the same config. Use a new pipeline name, or delete run "
                              f"{run['id']} first.")
        from ..tracker import _pid_alive

        if run["status"] in ("queued", "running") and run.get("pid") not in (None, os.getpid()) \
                and _pid_alive(int(run["pid"])):
            raise DactLabError(f"Pipeline {pipe.name!r} (run {run['id']}) is running in process {run['pid']}: wait "
                               "for it or cancel it before resuming.")
        from ..tracker import live_run_ids

        if run["status"] in ("queued", "running") and run.get("pid") == os.getpid() and run["id"] in live_run_ids:
            raise DactLabError(f"Pipeline {pipe.name!r} (run {run['id']}) is already running in this process: wait "
                               "for it or cancel it before resuming.")
        self.parent = int(run["id"])
        self.summary = dict(run.get("summary") or {})
        rd = tr.run_dir(self.parent)
        for stage in STAGES:
            path = rd / f"{stage}.json"
            if not path.is_file():
                break
            self.state[stage] = json.loads(path.read_text(encoding="utf-8"))
            self.resumed.append(stage)
        self.summary.update(study_names=self.names, stages_done=list(self.resumed))
        self.already_finished = len(self.resumed) == len(STAGES) and run["status"] == "finished"
        if not self.already_finished:
            from ..tracker import _hostname

            tr.set_status(self.parent, "running", pid=os.getpid(), host=_hostname(), summary=self.summary)
            tr.update_run(self.parent, error=None)
            tr.log_event(self.parent, "resumed", {"stages_done": list(self.resumed),
                                                  "previous_status": run["status"]})

    def finish_stage(self, stage: str, data: dict, seconds: float) -> None:
        data = _jsonable({"stage": stage, "seconds": round(seconds, 3), "finished": time.time(), **data})
        self.state[stage] = data
        _write_json(self.tracker.run_dir(self.parent) / f"{stage}.json", data)
        self.summary.setdefault("stages_done", [])
        if stage not in self.summary["stages_done"]:
            self.summary["stages_done"].append(stage)
        if "best_params" in data:
            self.summary.setdefault("stage_best", {})[stage] = data["best_params"]
        self.tracker.update_run(self.parent, summary=self.summary)
        self.tracker.log_event(self.parent, "stage_end", {k: v for k, v in data.items() if k != "trials_detail"})

    def start_stage(self, stage: str, trials: int | None, budget: float | None) -> None:
        self.tracker.log_event(self.parent, "stage_start", {"stage": stage, "trials": trials,
                                                            "budget_s": None if budget is None else round(budget, 1)})

    def guard(self, stage: str, accuracy: float | None, *, split: str = "val", previous: tuple[str, float] | None
              = None) -> dict:
        """Compare ``stage``'s best accuracy with the majority-class baseline of ``split`` (and with the stage
        before, ``previous`` = (stage, accuracy)): a ``guard`` event either way; raises PipelineGuardError (after a
        ``guard_failed`` event) when the model is not clearly better than the baseline."""
        part = self.split.val if split == "val" else self.split.test
        targets = part.targets[self.task]
        base = majority_baseline(targets)
        need = guard_margin(base, len(targets), self.pipe.guard_margin)
        acc = float("nan") if accuracy is None else float(accuracy)
        info = {"stage": stage, "split": split, "accuracy": acc, "majority_baseline": base, "margin": need,
                "rows": len(targets), "passed": bool(acc == acc and acc >= base + need)}
        if previous is not None and previous[1] is not None and previous[1] == previous[1]:
            info["previous"] = {"stage": previous[0], "accuracy": float(previous[1]),
                                "change": acc - float(previous[1])}
            if acc < float(previous[1]) - need:
                info["warning"] = (f"{stage}'s best {split} accuracy {acc:.3f} is below {previous[0]}'s "
                                   f"{float(previous[1]):.3f}")
        self.tracker.log_event(self.parent, "guard", info)
        if not info["passed"]:
            msg = (f"Pipeline stopped after {stage}: its best model reaches {acc:.1%} {split} accuracy, not clearly "
                   f"better than always answering the largest class ({base:.1%}; needed ≥ {base + need:.1%} on "
                   f"{len(targets)} rows). What to change: {_GUARD_ADVICE[stage]}.")
            info["message"] = msg
            self.tracker.log_event(self.parent, "guard_failed", info)
            if self.pipe.guards == "stop":
                raise PipelineGuardError(msg)
            import logging

            logging.getLogger(__name__).warning("%s (pipeline.guards = 'warn': going on)", msg)
            self.summary.setdefault("guard_warnings", []).append(msg)
        return info

    # -- optuna helpers -------------------------------------------------------------------------------------
    def trial_logger(self, stage: str) -> Callable[[optuna.Study, FrozenTrial], None]:
        def log(study: optuna.Study, t: FrozenTrial) -> None:
            payload = {"stage": stage, "number": t.number, "state": t.state.name.lower(), "params": t.params,
                       "values": t.values, "user_attrs": t.user_attrs,
                       "duration_s": t.duration.total_seconds() if t.duration else None}
            self.tracker.log_event(self.parent, "trial", _jsonable(payload))
            if t.state != TrialState.COMPLETE:
                return
            if stage == "stage3":
                metrics = {"stage3_objective": t.values[0], "stage3_avg_exit_layer": t.values[1],
                           "stage3_lambda": t.params.get("ponder_lambda"),
                           "stage3_val_accuracy": t.user_attrs.get("val_accuracy")}
            else:
                metrics = {f"{stage}_value": t.value,
                           f"{stage}_val_accuracy": t.user_attrs.get("val_accuracy")}
            self.tracker.log_metrics(self.parent, metrics, step=t.number)
        return log

    def optimize(self, study: optuna.Study, objective, n_total: int, budget: float | None, stage: str) -> None:
        start = time.monotonic()
        todo = n_total - _counted(study)
        if todo > 0:
            self.cancel.check()
            study.optimize(objective, n_trials=todo, timeout=budget, callbacks=[self.trial_logger(stage)])
        while _n_complete(study) == 0 and _counted(study) < n_total + 3:
            # the budget ran out (or every trial was pruned) before any trial completed: a stage needs one result
            self.cancel.check()
            study.optimize(objective, n_trials=1, callbacks=[self.trial_logger(stage)])
        if _n_complete(study) == 0:
            raise DactLabError(f"{stage}: no trial completed (all pruned); raise the trials or the time budget.")
        self.tracker.log_event(self.parent, "stage_trials", {"stage": stage, "trials": _counted(study),
                                                             "seconds": round(time.monotonic() - start, 3)})

    def child_config(self, model_cfg: DactModelConfig, train_cfg: TrainConfig, name: str, tag: str) -> RunConfig:
        c = copy.deepcopy(self.cfg)
        c.model, c.train = copy.deepcopy(model_cfg), copy.deepcopy(train_cfg)
        c.name, c.tag = name, tag
        return c.validate()

    def train_child(self, run_cfg: RunConfig, extra_callbacks: list[Callback], trial: optuna.Trial | None = None,
                    save: bool = True, model=None, tokenizer=None):
        from ..train import train

        run_id = self.tracker.create_run("dact", run_cfg.to_dict(), name=run_cfg.name, tag=run_cfg.tag,
                                         parent_id=self.parent, dataset_id=self.dataset_id, status="queued")
        if trial is not None:
            studies.link_trial(trial, run_id, self.parent)
        try:
            with studies.live_run(run_id):
                return train(run_cfg, data=self.split, home=self.home, tracker=self.tracker,
                             callbacks=[*extra_callbacks, *self.callbacks], cancel=self.cancel, run_id=run_id,
                             parent_id=self.parent, save=save, model=model, tokenizer=tokenizer)
        finally:  # train() takes the dataset id from the config; this run's data is the pipeline's split
            self.tracker.update_run(run_id, dataset_id=self.dataset_id)

    # -- stages ---------------------------------------------------------------------------------------------
    def stage1(self) -> None:
        from ..features import cached_features_many

        t0 = time.monotonic()
        budget = self.budget.share("stage1")
        pipe, cfg = self.pipe, self.cfg
        self.start_stage("stage1", pipe.trials_stage1, budget)
        previous_threads = torch.get_num_threads()
        weights = None
        if cfg.init_from_run is not None:  # the features of the encoder the DACT runs start from
            from ..home import runs_dir
            from ..models import ENCODER_FILE

            weights = runs_dir(self.home) / str(cfg.init_from_run) / ENCODER_FILE
            if not weights.is_file():
                raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: {weights} does not exist. Give the id of "
                                  "a finished backbone run.")
        if cfg.train.num_threads:  # the one encoder pass runs at the run's thread count; restored after it
            torch.set_num_threads(cfg.train.num_threads)
        try:
            got_all = cached_features_many(cfg.encoder, {"train": self.split.train, "val": self.split.val},
                                           poolings=pipe.poolings, max_seq_len=cfg.data.max_seq_len, home=self.home,
                                           device=str(self.device), seed=cfg.train.seed, encoder_weights=weights)
        finally:
            torch.set_num_threads(previous_threads)
        feats = {part: {p: c.features.to(self.device) for p, c in got.items()} for part, got in got_all.items()}
        info = {part: {p: c.info() for p, c in got.items()} for part, got in got_all.items()}
        build_s = sum(c.build_s for got in got_all.values() for c in got.values())
        hits = [i["cache_hit"] for part in info.values() for i in part.values()]
        cache = {"used_cached_features": True, "encoder": cfg.encoder, "frozen_encoder": True,
                 "init_from_run": cfg.init_from_run,
                 "cache_hit": all(hits), "build_s": round(build_s, 3),
                 "keys": {part: {p: i["key"] for p, i in v.items()} for part, v in info.items()},
                 "splits": info, "seconds": round(time.monotonic() - t0, 3),
                 "message": ("Stage 1 trained the DACT heads on cached per-layer features of the frozen encoder "
                             + ("(loaded from the cache)" if all(hits) else
                                f"(computed once in {build_s:.1f} s, then reused by every trial)"))}
        self.tracker.log_event(self.parent, "stage1_features", cache)
        self.summary["feature_cache"] = {k: v for k, v in cache.items() if k != "splits"}
        y_tr = torch.as_tensor(self.split.train.targets[self.task]).to(self.device)
        y_va = torch.as_tensor(self.split.val.targets[self.task]).to(self.device)

        study = studies.create_study(
            self.names["stage1"], directions=["minimize"], home=self.home,
            sampler=optuna.samplers.TPESampler(seed=pipe.seed + 1,
                                               n_startup_trials=min(10, max(2, pipe.trials_stage1 // 2))),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, pipe.stage1_epochs // 3)),
            user_attrs={"pipeline": pipe.name, "stage": "stage1", "parent_run_id": self.parent,
                        "objective": "val_loss (DACT loss at stage1_lambda, heads on cached features)"})

        # at least pipe.min_steps optimizer steps per trial (small data: more epochs over the cached features)
        per_epoch = max(1, math.ceil(len(self.split.train) / pipe.stage1_batch_size))
        epochs1 = max(pipe.stage1_epochs, min(max(pipe.max_epochs, pipe.stage1_epochs),
                                              math.ceil(pipe.min_steps / per_epoch)))

        def objective(trial: optuna.Trial) -> float:
            self.cancel.check()
            params = suggest_architecture(trial, pipe)
            model_cfg = model_from_params(params, cfg.model, ponder_lambda=pipe.stage1_lambda)

            def report(step: int, value: float) -> None:
                trial.report(value if math.isfinite(value) else math.inf, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {step + 1} (val_loss = {value:.5g})")

            fit = fit_heads_on_features(model_cfg, self.num_classes, feats["train"][model_cfg.pooling], y_tr,
                                        feats["val"][model_cfg.pooling], y_va, epochs=epochs1,
                                        lr=pipe.stage1_lr, batch_size=pipe.stage1_batch_size,
                                        weight_decay=cfg.train.weight_decay, seed=pipe.seed + trial.number,
                                        report=report, cancel=self.cancel, num_threads=pipe.stage1_threads)
            for k in ("val_accuracy", "val_nll", "val_avg_exit_layer"):
                trial.set_user_attr(k, fit.metrics[k])
            trial.set_user_attr("best_epoch", fit.best_epoch)
            return fit.val_loss

        self.optimize(study, objective, pipe.trials_stage1, None if budget is None else
                      max(0.0, budget - (time.monotonic() - t0)), "stage1")
        best = study.best_trial
        self.guard("stage1", best.user_attrs.get("val_accuracy"))
        model_cfg = model_from_params(best.params, cfg.model, ponder_lambda=pipe.stage1_lambda)
        self.finish_stage("stage1", {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                                     "best_user_attrs": best.user_attrs, "model": dataclasses.asdict(model_cfg),
                                     "feature_cache": self.summary["feature_cache"], "n_trials": _counted(study)},
                          time.monotonic() - t0)

    def model_cfg(self) -> DactModelConfig:
        return from_dict(DactModelConfig, self.state["stage1"]["model"], "model")

    def train_cfg(self) -> TrainConfig:
        return self.trial_train_cfg(self.state["stage2"]["best_params"])

    def trial_train_cfg(self, params: dict[str, Any]) -> TrainConfig:
        return train_from_params(params, self.cfg.train, n_train=len(self.split.train),
                                 min_steps=self.pipe.min_steps, max_epochs=self.pipe.max_epochs)

    def keep_if_best(self, study: optuna.Study, trial: optuna.Trial, value: float, res, run_cfg: RunConfig) -> None:
        """Stage 2 keeps the weights of its best trial only (stage 3 and the final model are built on them): a
        trial better than every complete one so far is saved in its run folder and the previous best's model file
        is removed (its run keeps config, metrics and events)."""
        from ..models import MODEL_FILE, save_model

        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if done and min(t.value for t in done) <= value:
            return
        run_dir = self.tracker.run_dir(res.run_id)
        save_model(run_dir, res.model, res.tokenizer, run_cfg, res.label_maps)
        (run_dir / "report.json").write_text(json.dumps(_jsonable({"best": res.best_metrics, "test": {},
                                                                   "stop_reason": res.stop_reason})),
                                             encoding="utf-8")
        self.tracker.update_run(res.run_id, run_dir=str(run_dir))
        self.tracker.add_artifact(res.run_id, str(run_dir / MODEL_FILE), "model")
        trial.set_user_attr("model_saved", True)
        for t in done:
            rid = t.user_attrs.get("run_id")
            if t.user_attrs.get("model_saved") and rid is not None:
                old = self.tracker.run_dir(int(rid)) / MODEL_FILE
                old.unlink(missing_ok=True)
                self.tracker.update_run(int(rid), summary={"model_removed": f"stage-2 trial {trial.number} is "
                                                           "better; only the best trial's weights are kept"})

    def stage2(self) -> None:
        t0 = time.monotonic()
        budget = self.budget.share("stage2")
        pipe = self.pipe
        self.start_stage("stage2", pipe.trials_stage2, budget)
        model_cfg = self.model_cfg()
        study = studies.create_study(
            self.names["stage2"], directions=["minimize"], home=self.home,
            sampler=optuna.samplers.TPESampler(seed=pipe.seed + 2,
                                               n_startup_trials=min(10, max(2, pipe.trials_stage2 // 2))),
            pruner={"halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
                    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
                    "none": optuna.pruners.NopPruner}[pipe.stage2_pruner](),
            user_attrs={"pipeline": pipe.name, "stage": "stage2", "parent_run_id": self.parent,
                        "objective": "val_loss", "pruner": pipe.stage2_pruner})

        def objective(trial: optuna.Trial) -> float:
            self.cancel.check()
            params = suggest_training(trial, pipe)
            tc = self.trial_train_cfg(params)
            trial.set_user_attr("epochs_run", tc.epochs)
            run_cfg = self.child_config(model_cfg, tc, f"{pipe.name}/stage2/trial{trial.number}", "stage2")
            res = self.train_child(run_cfg, [studies.PruningCallback(trial, "val_loss")], trial, save=False)
            for k in ("val_accuracy", "val_nll", "val_avg_exit_layer"):
                if k in res.best_metrics:
                    trial.set_user_attr(k, res.best_metrics[k])
            value = float(res.best_metrics["val_loss"])
            if math.isfinite(value):
                self.keep_if_best(study, trial, value, res, run_cfg)
            return value

        self.optimize(study, objective, pipe.trials_stage2, budget, "stage2")
        best = study.best_trial
        s1 = self.state["stage1"].get("best_user_attrs", {}).get("val_accuracy")
        guard = self.guard("stage2", best.user_attrs.get("val_accuracy"), previous=("stage1", s1))
        self.finish_stage("stage2", {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                                     "best_run_id": best.user_attrs.get("run_id"),
                                     "best_user_attrs": best.user_attrs, "guard": guard,
                                     "train": dataclasses.asdict(self.trial_train_cfg(best.params)),
                                     "n_trials": _counted(study)}, time.monotonic() - t0)

    def trunk(self):
        """The best stage-2 model (encoder + classifiers trained; the halting units get fitted in stage 3)."""
        from ..models import load_model

        rid = self.state["stage2"].get("best_run_id")
        if rid is None or not (self.tracker.run_dir(int(rid)) / "model.safetensors").is_file():
            raise DactLabError(f"The best stage-2 model (run {rid}) has no saved weights: stage 3 needs them. Start "
                               "the pipeline again under a new name.")
        return int(rid), load_model(self.tracker.run_dir(int(rid)), device=str(self.device))

    def stage3(self) -> None:
        from safetensors.torch import load_file

        from ..data import encode
        from ..halting import THRESHOLDS, fit_halting, layer_cache, nll_ref_of, point_metrics, threshold_state
        from ..models import save_halting_file

        t0 = time.monotonic()
        budget = self.budget.share("stage3")
        pipe = self.pipe
        self.start_stage("stage3", pipe.trials_stage3, budget)
        trunk_id, loaded = self.trunk()
        model = loaded.model
        mc = model.cfg
        cache = layer_cache(model, encode(self.split.val, loaded.tokenizer, self.cfg.data.max_seq_len))
        nll_ref = nll_ref_of(cache)
        first = "val_nll" if pipe.objective3 == "loss" else "val_error"
        study = studies.create_study(
            self.names["stage3"], directions=["minimize", "minimize"], home=self.home,
            sampler=optuna.samplers.TPESampler(seed=pipe.seed + 3,
                                               n_startup_trials=min(pipe.trials_stage3, 8)),
            user_attrs={"pipeline": pipe.name, "stage": "stage3", "parent_run_id": self.parent,
                        "objectives": [first, "val_avg_exit_layer"], "objective3": pipe.objective3,
                        "trunk_run_id": trunk_id, "nll_ref": nll_ref, "num_layers": model.num_layers,
                        "lambda_scale": "normalised: λ_spec = λ · nll_ref / N (dact.spec_lambda)",
                        "method": "halting units fitted alone per λ on the validation split (halting.fit_halting)"})
        with warnings.catch_warnings():  # experimental in Optuna, read by optuna-dashboard
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([first, "val_avg_exit_layer"])
        kinds = ["fitted", "threshold"] if pipe.stage3_thresholds and mc.halting_input == "confidence" else ["fitted"]
        if not study.trials:  # a fresh study: λ log-spaced over the range (and the τ grid), then TPE fills the front
            k = min(pipe.trials_stage3, 12)
            lo, hi = math.log(pipe.lambda_low), math.log(pipe.lambda_high)
            for i in range(k):
                x = (lo + hi) / 2 if k == 1 else lo + (hi - lo) * i / (k - 1)
                lam = min(max(float(f"{math.exp(x):.4g}"), pipe.lambda_low), pipe.lambda_high)
                study.enqueue_trial({"halting": "fitted", "ponder_lambda": lam})
            if "threshold" in kinds:
                for tau in THRESHOLDS[:max(0, min(len(THRESHOLDS), pipe.trials_stage3 - k))]:
                    study.enqueue_trial({"halting": "threshold", "tau": tau})
        parent_dir = self.tracker.run_dir(self.parent)

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            self.cancel.check()
            kind = trial.suggest_categorical("halting", kinds)
            if kind == "fitted":
                lam = trial.suggest_float("ponder_lambda", pipe.lambda_low, pipe.lambda_high, log=True)
                [pt] = fit_halting(model, cache, [lam], epochs=mc.halting_epochs, seed=pipe.seed,
                                   cancel=self.cancel)
                state, spec, fit_s = pt.state, pt.spec_lambda, pt.fit_s
            else:  # halting units set to a confidence threshold τ: the DACT rule exits like entropy at τ·ln K
                tau = trial.suggest_float("tau", 0.05, 0.99)
                state, spec, fit_s = threshold_state(model, tau), None, 0.0
            m = point_metrics(model, cache, state)
            path = save_halting_file(parent_dir, f"trial_{trial.number}", state)
            attrs = {"val_accuracy": m["accuracy"], "val_nll": m["nll"], "val_avg_exit_layer": m["avg_exit_layer"],
                     "spec_lambda": spec, "fit_s": round(fit_s, 3), "run_id": trunk_id,
                     "halting_file": str(path.relative_to(self.home))}
            for k, v in attrs.items():
                trial.set_user_attr(k, v)
            obj = m["nll"] if pipe.objective3 == "loss" else 1.0 - m["accuracy"]
            return obj, m["avg_exit_layer"]

        self.optimize(study, objective, pipe.trials_stage3, budget, "stage3")
        front = pareto_points(study)
        chosen = apply_choice_rule(front, pipe.choice_rule, pipe.choice_tolerance, trials=trial_points(study))
        s2 = self.state["stage2"].get("best_user_attrs", {}).get("val_accuracy")
        guard = self.guard("stage3", chosen.get("val_accuracy"), previous=("stage2", s2))
        # the chosen point's weights must load back (a damaged file fails here, not in the final stage)
        load_file(str(self.home / chosen["halting_file"]))
        self.tracker.log_event(self.parent, "pareto_front", {"objectives": [first, "val_avg_exit_layer"],
                                                             "front": front, "study_name": self.names["stage3"]})
        self.tracker.log_event(self.parent, "chosen_point", {"rule": pipe.choice_rule,
                                                             "tolerance": pipe.choice_tolerance, "point": chosen})
        self.summary.update(front=front, chosen=chosen)
        self.finish_stage("stage3", {"best_params": {"ponder_lambda": chosen["lambda"]}, "front": front,
                                     "chosen": chosen, "objectives": [first, "val_avg_exit_layer"],
                                     "trunk_run_id": trunk_id, "nll_ref": nll_ref, "guard": guard,
                                     "n_trials": _counted(study)}, time.monotonic() - t0)

    def final(self) -> None:
        """The final model: the stage-2 weights with the chosen stage-3 halting units, saved as its own run (every
        stage-3 point's halting file beside it, so any point can be chosen later without training), evaluated on
        the validation and test splits; optionally fine-tuned end to end at the chosen λ and compared."""
        import shutil

        from safetensors.torch import load_file

        from ..data import encode
        from ..evaluate import evaluate_encoded, exit_policy_sweep, full_report, metrics_of
        from ..models import HALTING_DIR, MODEL_FILE, save_model

        t0 = time.monotonic()
        self.start_stage("final", None, self.budget.share("final"))
        st3 = self.state["stage3"]
        chosen = st3["chosen"]
        trunk_id, loaded = self.trunk()
        model = loaded.model
        model.halters.load_state_dict(load_file(str(self.home / chosen["halting_file"])))
        m = copy.deepcopy(model.cfg)
        if chosen.get("spec_lambda") is not None:  # a fitted λ point (a threshold point keeps the training λ)
            m.ponder_lambda = float(chosen["spec_lambda"])
        run_cfg = self.child_config(m, self.train_cfg(), f"{self.pipe.name}/final", "final")
        tr = self.tracker
        rid = tr.create_run("dact", run_cfg.to_dict(), name=run_cfg.name, tag="final", parent_id=self.parent,
                            dataset_id=self.dataset_id, status="running")
        run_dir = tr.run_dir(rid)
        tr.update_run(rid, run_dir=str(run_dir))
        save_model(run_dir, model, loaded.tokenizer, run_cfg, loaded.label_maps)
        study = optuna.load_study(study_name=self.names["stage3"], storage=studies.storage(self.home))
        points = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            src = t.user_attrs.get("halting_file")
            if src and (self.home / src).is_file():
                (run_dir / HALTING_DIR).mkdir(exist_ok=True)
                shutil.copyfile(self.home / src, run_dir / HALTING_DIR / f"trial_{t.number}.safetensors")
                points.append({"trial": t.number, "lambda": t.params.get("ponder_lambda"),
                               "threshold": t.params.get("tau"),
                               "spec_lambda": t.user_attrs.get("spec_lambda"),
                               "avg_exit_layer": t.user_attrs.get("val_avg_exit_layer"),
                               "accuracy": t.user_attrs.get("val_accuracy"),
                               "file": f"{HALTING_DIR}/trial_{t.number}.safetensors"})
        bs = max(run_cfg.train.batch_size, 64)
        enc_val = encode(self.split.val, loaded.tokenizer, run_cfg.data.max_seq_len)
        val = metrics_of(evaluate_encoded(model, enc_val, bs, self.device, run_cfg.train.precision), "val_")
        test, report = {}, {}
        if self.split.test is not None and len(self.split.test):
            enc_test = encode(self.split.test, loaded.tokenizer, run_cfg.data.max_seq_len)
            res = evaluate_encoded(model, enc_test, bs, self.device, run_cfg.train.precision)
            test, report = metrics_of(res, "test_"), full_report(res, loaded.label_maps)
        halting = {"chosen": {"lambda": chosen["lambda"], "spec_lambda": chosen.get("spec_lambda"),
                              "threshold": chosen.get("tau"),
                              "avg_exit_layer": chosen["val_avg_exit_layer"], "accuracy": chosen["val_accuracy"],
                              "trial": chosen["trial"]},
                   "points": points, "rows": len(self.split.val), "split": "val", "source": "pipeline stage 3",
                   "tolerance_points": 100 * self.pipe.choice_tolerance, "trunk_run_id": trunk_id}
        (run_dir / "report.json").write_text(json.dumps(_jsonable(
            {"best": val, "test": test, "report": report, "history": [], "stop_reason": None,
             "halting": halting, "built_from": {"trunk_run_id": trunk_id, "stage3_trial": chosen["trial"]}}),
            indent=2), encoding="utf-8")
        tr.log_metrics(rid, {**val, **test}, step=0)
        for name, kind in ((MODEL_FILE, "model"), ("config.json", "config"), ("label_maps.json", "label_map"),
                           ("report.json", "report")):
            tr.add_artifact(rid, str(run_dir / name), kind)
        tr.set_status(rid, "finished", summary={"best": val, "test": test, "halting": halting,
                                                "built_from": {"trunk_run_id": trunk_id,
                                                               "stage3_trial": chosen["trial"]}})
        tr.log_event(rid, "built_from_pipeline", {"parent": self.parent, "trunk_run_id": trunk_id,
                                                  "stage3_trial": chosen["trial"], "points": len(points)})
        if test:
            guard = self.guard("final", test.get("test_accuracy"), split="test")
        else:
            guard = None
        finetune = self.finetune(model, loaded, chosen, enc_val) if self.pipe.final_finetune else None
        sweep = exit_policy_sweep(model, enc_val, batch_size=bs, timed=self.pipe.sweep_timed)
        payload = {"split": "val", "timed": self.pipe.sweep_timed, "num_layers": model.num_layers,
                   "rows": sweep, "final_run_id": rid}
        tr.log_event(self.parent, "exit_policy_sweep", payload)
        tr.log_event(rid, "exit_policy_sweep", payload)
        front = [dict(p, run_id=rid) for p in st3["front"]]  # every front point is the final run + its halting file
        self.summary.update(final_run_id=rid, final_test=test, exit_policy_sweep=sweep, front=front,
                            chosen=dict(chosen, run_id=rid))
        self.finish_stage("final", {"final_run_id": rid, "test_metrics": test, "best_metrics": val,
                                    "exit_policy_sweep": sweep, "guard": guard, "finetune": finetune,
                                    "front": front, "chosen": dict(chosen, run_id=rid), "model": dataclasses.asdict(m),
                                    "train": dataclasses.asdict(run_cfg.train)}, time.monotonic() - t0)

    def finetune(self, model, loaded, chosen: dict, enc_val) -> dict:
        """End-to-end fine-tuning of the final model at the chosen point's λ (spec scale), as a child run, measured
        against the fitted point on the validation split. The final model stays the fitted one."""
        m = copy.deepcopy(model.cfg)
        if chosen.get("spec_lambda") is not None:
            m.ponder_lambda = float(chosen["spec_lambda"])
        m.fit_halting = False
        tc = copy.deepcopy(self.train_cfg())
        tc.epochs = self.pipe.finetune_epochs
        run_cfg = self.child_config(m, tc, f"{self.pipe.name}/finetune", "finetune")
        t0 = time.monotonic()
        res = self.train_child(run_cfg, [], model=copy.deepcopy(model), tokenizer=loaded.tokenizer)
        out = {"run_id": res.run_id, "seconds": round(time.monotonic() - t0, 3),
               "fitted": {"val_accuracy": chosen["val_accuracy"], "val_avg_exit_layer": chosen["val_avg_exit_layer"]},
               "finetuned": {k: res.best_metrics.get(k) for k in ("val_accuracy", "val_avg_exit_layer", "val_nll")}}
        self.tracker.log_event(self.parent, "finetune_compared", out)
        return out

    def result(self, status: str = "finished") -> PipelineResult:
        st = self.state
        stage_best = {s: st[s]["best_params"] for s in ("stage1", "stage2", "stage3") if s in st}
        fin = st.get("final", {})
        return PipelineResult(
            parent_run_id=int(self.parent), final_run_id=fin.get("final_run_id"), stage_best=stage_best,
            pareto=fin.get("front") or st.get("stage3", {}).get("front", []),
            chosen=fin.get("chosen") or st.get("stage3", {}).get("chosen", {}), study_names=dict(self.names), status=status, resumed_stages=list(self.resumed),
            feature_cache=st.get("stage1", {}).get("feature_cache", {}), test_metrics=fin.get("test_metrics", {}),
            exit_policy_sweep=fin.get("exit_policy_sweep", []), model_config=fin.get("model", {}),
            train_config=fin.get("train", {}))


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
    from ..tracker import Tracker

    pipeline.validate()
    cfg = copy.deepcopy(as_dact_config(cfg))
    # stage 3 fits the halting units per λ on the best stage-2 model itself: its trials skip train()'s own
    # post-training halting fit (kind 'dact', model.fit_halting)
    cfg.model.fit_halting = False
    tracker = tracker or Tracker(home)
    cancel = cancel or CancelToken()
    run = _Pipeline(cfg, pipeline, tracker, cancel, callbacks or [], data)
    run.open_parent(run_id)
    if run.already_finished:
        return run.result()
    with studies.live_run(run.parent):
        try:
            for stage in STAGES:
                if stage not in run.state:
                    cancel.check()
                    getattr(run, stage)()
        except Cancelled as exc:
            tracker.set_status(run.parent, "cancelled", error=str(exc) or "cancelled", summary=run.summary)
            tracker.log_event(run.parent, "cancelled", {"reason": str(exc), "stages_done": list(run.state)})
            raise
        except KeyboardInterrupt:
            tracker.set_status(run.parent, "interrupted", error="KeyboardInterrupt", summary=run.summary)
            raise
        except BaseException as exc:
            tracker.set_status(run.parent, "failed", error=f"{type(exc).__name__}: {exc}", summary=run.summary)
            raise
    tracker.set_status(run.parent, "finished", summary=run.summary)
    tracker.log_event(run.parent, "pipeline_end", {"final_run_id": run.state["final"]["final_run_id"]})
    return run.result()


def load_pipeline_result(parent_or_name: int | str, *, home=None, tracker=None) -> PipelineResult:
    """The stored result of a pipeline (by parent run id or pipeline name) from its stage JSON files; stages not
    finished yet are missing from it. Trains nothing."""
    from ..tracker import Tracker

    tracker = tracker or Tracker(home)
    if isinstance(parent_or_name, str) and not parent_or_name.isdigit():
        runs = _parent_runs(tracker, parent_or_name)
        if not runs:
            raise DactLabError(f"No DACT pipeline named {parent_or_name!r} in {tracker.db_path}.")
        run = runs[0]
    else:
        run = tracker.get_run(int(parent_or_name))
    if run["kind"] != PIPELINE_KIND:
        raise DactLabError(f"run {run['id']} is not a DACT pipeline run (kind {run['kind']!r}).")
    rd = tracker.run_dir(run["id"])
    state = {s: json.loads((rd / f"{s}.json").read_text(encoding="utf-8")) for s in STAGES
             if (rd / f"{s}.json").is_file()}
    names = (run.get("summary") or {}).get("study_names") or {s: f"{run['name']}/{s}" for s in STAGES[:3]}
    fin = state.get("final", {})
    return PipelineResult(
        parent_run_id=int(run["id"]), final_run_id=fin.get("final_run_id"),
        stage_best={s: state[s]["best_params"] for s in ("stage1", "stage2", "stage3") if s in state},
        pareto=fin.get("front") or state.get("stage3", {}).get("front", []),
        chosen=fin.get("chosen") or state.get("stage3", {}).get("chosen", {}), study_names=names, status=run["status"], resumed_stages=list(state),
        feature_cache=state.get("stage1", {}).get("feature_cache", {}), test_metrics=fin.get("test_metrics", {}),
        exit_policy_sweep=fin.get("exit_policy_sweep", []), model_config=fin.get("model", {}),
        train_config=fin.get("train", {}))
