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
2. **Training parameters** (``<name>/stage2``, minimise validation loss, MedianPruner via
   :class:`~dact_lib.tuning.studies.PruningCallback`): encoder lr, head lr (both log), batch size, epochs, weight
   decay, warmup ratio; each trial is a real :func:`dact_lib.train.train` of DactBert with the stage-1 heads
   (child run, tag ``stage2``).
3. **λ** (``<name>/stage3``, TWO objectives, both minimised: validation NLL — or 1 − accuracy with
   ``objective3="error"`` — and the validation average exit layer). λ is log-uniform in [lambda_low, lambda_high]
   (the first min(n, 4) trials are log-spaced over the range, then the seeded multi-objective TPE sampler). Each
   trial is a real ``train()`` (tag ``stage3``); user attrs ``run_id``, ``val_accuracy``, ``val_nll``,
   ``val_avg_exit_layer``. The Pareto front is ``study.best_trials``; the default point is picked by
   ``choice_rule``; :func:`choose_point` picks another later.
4. **Final** training with everything chosen (child run kind ``dact``, tag ``final``): ``train()`` evaluates the
   test split and saves config + weights + metrics; the exit-policy sweep of the final model on the validation
   split (DACT vs patience vs entropy vs fixed depth, timed) goes to a parent event and the parent summary.

Records (all on the parent run): events ``pipeline_start``, ``stage_start``/``stage_end`` (payload ``stage``),
``trial`` (one per finished trial: stage, number, state, params, values, user_attrs), ``stage_trials``,
``stage1_features``, ``pareto_front``, ``chosen_point``, ``exit_policy_sweep``, ``pipeline_end``, and
``resumed`` / ``cancelled`` / ``point_chosen`` (:func:`choose_point`) when they happen;
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
stages still to run in the ratio stage1 : stage2 : stage3 : final = 1 : 4 : 4 : 1, and the stage's share is the
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
           "CHOICE_RULES"]

PIPELINE_KIND = "dact-pipeline"
STAGES = ("stage1", "stage2", "stage3", "final")
OBJECTIVES3 = ("loss", "error")
CHOICE_RULES = ("lowest_exit_within_1pt", "best_objective")
LAYOUT_CHOICES = ("constant", "pyramidal", "inverted", "bowtie")  # "constant" = explicit [width] * depth
_STAGE_WEIGHTS = {"stage1": 1.0, "stage2": 4.0, "stage3": 4.0, "final": 1.0}
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
    trials_stage3: int = 10
    timeout_min: float | None = None  # the whole pipeline (one call); None = no limit
    stage1_epochs: int = 15  # epochs of head training over the cached features, per stage-1 trial
    lambda_low: float = 1e-5
    lambda_high: float = 1e-1
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
    head_lr_range: tuple[float, float] = (1e-4, 1e-2)
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    epochs_range: tuple[int, int] = (1, 4)
    weight_decay_range: tuple[float, float] = (0.0, 0.1)
    warmup_range: tuple[float, float] = (0.0, 0.2)
    # final model: time the exit-policy sweep (real early-exit passes) or only simulate it
    sweep_timed: bool = True

    def validate(self) -> "PipelineConfig":
        def bad(fld: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"pipeline.{fld} = {value!r} is invalid: {allowed}.")

        if not isinstance(self.name, str) or not self.name.strip():
            raise bad("name", self.name, "give a non-empty name (the studies are called <name>/stage1 ...)")
        for fld in ("trials_stage1", "trials_stage2", "trials_stage3", "stage1_epochs", "stage1_batch_size"):
            v = getattr(self, fld)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(fld, v, "expected an integer >= 1")
        if self.timeout_min is not None and not (_num(self.timeout_min) and self.timeout_min > 0):
            raise bad("timeout_min", self.timeout_min, "expected a positive number of minutes or None")
        if not (_num(self.lambda_low) and _num(self.lambda_high) and 0 < self.lambda_low < self.lambda_high):
            raise bad("lambda_low/lambda_high", (self.lambda_low, self.lambda_high),
                      "λ is searched on a log scale: need 0 < lambda_low < lambda_high")
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


def train_from_params(params: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """The TrainConfig of stage-2 ``params`` (missing keys keep ``base``'s values)."""
    t = copy.deepcopy(base)
    for k in _TRAIN_KEYS:
        if k in params:
            setattr(t, k, type(getattr(base, k))(params[k]))
    if t.batch_size > t.max_batch_size:
        t.max_batch_size = t.batch_size
    t.validate()
    return t


# ----------------------------------------------------------------------------------------------------------------
# the Pareto front and the choice rule
# ----------------------------------------------------------------------------------------------------------------
def _point(t: FrozenTrial, objective3: str) -> dict[str, Any]:
    ua = t.user_attrs
    first = f"val_{'nll' if objective3 == 'loss' else 'error'}"
    return {"trial": t.number, "lambda": float(t.params["ponder_lambda"]), "objective": first,
            first: float(t.values[0]), "val_avg_exit_layer": float(t.values[1]),
            "val_accuracy": float(ua.get("val_accuracy", float("nan"))),
            "val_nll": float(ua.get("val_nll", float("nan"))), "run_id": ua.get("run_id")}


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
        tracker.log_event(parent, "point_chosen", {"point": point, "by": "user"})
    return point


def choose_for_prediction(parent_id: int, point: dict[str, Any], *, tracker, by: str = "dashboard"
                          ) -> dict[str, Any]:
    """Make a pipeline point's model the one used for prediction: ``point`` is a point of the Pareto explorer
    (``run_id``, ``trial``, ``lambda``, ``source``: "front" or "final"). A stage-3 front point is validated and
    recorded by :func:`choose_point` (``point_chosen``) when the pipeline has its study; every choice is recorded as
    a ``chosen`` event on the pipeline run (what :func:`dact_lib.plots.chosen_prediction_run` reads back after a
    reload). Returns ``run_id`` and ``has_model`` (False when the run's model file is missing). Raises DactLabError
    for a point without a trained run."""
    rid = point.get("run_id")
    if rid is None:
        raise DactLabError(f"Trial {point.get('trial')} has no trained run to predict with: choose another point.")
    rid = int(rid)
    if point.get("trial") is not None and point.get("source") != "final":
        try:
            choose_point(parent_id, int(point["trial"]), tracker=tracker)
        except (DactLabError, KeyError, ValueError):  # an older run without a stage-3 study: 'chosen' still records it
            pass
    tracker.log_event(parent_id, "chosen", {"run_id": rid, "trial": point.get("trial"), "lambda": point.get("lambda"),
                                            "source": point.get("source", "front"), "by": by})
    run_dir = Path(tracker.get_run(rid).get("run_dir") or tracker.run_dir(rid))
    return {"run_id": rid, "has_model": (run_dir / "model.safetensors").is_file()}


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
                           "stage3_lambda": t.params["ponder_lambda"],
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
                    save: bool = True):
        from ..train import train

        run_id = self.tracker.create_run("dact", run_cfg.to_dict(), name=run_cfg.name, tag=run_cfg.tag,
                                         parent_id=self.parent, dataset_id=self.dataset_id, status="queued")
        if trial is not None:
            studies.link_trial(trial, run_id, self.parent)
        try:
            with studies.live_run(run_id):
                return train(run_cfg, data=self.split, home=self.home, tracker=self.tracker,
                             callbacks=[*extra_callbacks, *self.callbacks], cancel=self.cancel, run_id=run_id,
                             parent_id=self.parent, save=save)
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

        def objective(trial: optuna.Trial) -> float:
            self.cancel.check()
            params = suggest_architecture(trial, pipe)
            model_cfg = model_from_params(params, cfg.model, ponder_lambda=pipe.stage1_lambda)

            def report(step: int, value: float) -> None:
                trial.report(value if math.isfinite(value) else math.inf, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {step + 1} (val_loss = {value:.5g})")

            fit = fit_heads_on_features(model_cfg, self.num_classes, feats["train"][model_cfg.pooling], y_tr,
                                        feats["val"][model_cfg.pooling], y_va, epochs=pipe.stage1_epochs,
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
        model_cfg = model_from_params(best.params, cfg.model, ponder_lambda=pipe.stage1_lambda)
        self.finish_stage("stage1", {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                                     "best_user_attrs": best.user_attrs, "model": dataclasses.asdict(model_cfg),
                                     "feature_cache": self.summary["feature_cache"], "n_trials": _counted(study)},
                          time.monotonic() - t0)

    def model_cfg(self) -> DactModelConfig:
        return from_dict(DactModelConfig, self.state["stage1"]["model"], "model")

    def train_cfg(self) -> TrainConfig:
        return train_from_params(self.state["stage2"]["best_params"], self.cfg.train)

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
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            user_attrs={"pipeline": pipe.name, "stage": "stage2", "parent_run_id": self.parent,
                        "objective": "val_loss"})

        def objective(trial: optuna.Trial) -> float:
            self.cancel.check()
            params = suggest_training(trial, pipe)
            run_cfg = self.child_config(model_cfg, train_from_params(params, self.cfg.train),
                                        f"{pipe.name}/stage2/trial{trial.number}", "stage2")
            # stage-2 trials only score training parameters: their weights are not kept
            res = self.train_child(run_cfg, [studies.PruningCallback(trial, "val_loss")], trial, save=False)
            for k in ("val_accuracy", "val_nll", "val_avg_exit_layer"):
                if k in res.best_metrics:
                    trial.set_user_attr(k, res.best_metrics[k])
            return float(res.best_metrics["val_loss"])

        self.optimize(study, objective, pipe.trials_stage2, budget, "stage2")
        best = study.best_trial
        self.finish_stage("stage2", {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                                     "best_run_id": best.user_attrs.get("run_id"),
                                     "train": dataclasses.asdict(train_from_params(best.params, self.cfg.train)),
                                     "n_trials": _counted(study)}, time.monotonic() - t0)

    def stage3(self) -> None:
        t0 = time.monotonic()
        budget = self.budget.share("stage3")
        pipe = self.pipe
        self.start_stage("stage3", pipe.trials_stage3, budget)
        model_cfg, train_cfg = self.model_cfg(), self.train_cfg()
        first = "val_nll" if pipe.objective3 == "loss" else "val_error"
        study = studies.create_study(
            self.names["stage3"], directions=["minimize", "minimize"], home=self.home,
            sampler=optuna.samplers.TPESampler(seed=pipe.seed + 3,
                                               n_startup_trials=min(pipe.trials_stage3, 4)),
            user_attrs={"pipeline": pipe.name, "stage": "stage3", "parent_run_id": self.parent,
                        "objectives": [first, "val_avg_exit_layer"], "objective3": pipe.objective3})
        if not study.trials:  # a fresh study: start with λ log-spaced over the range (the reference's sweep)
            k = min(pipe.trials_stage3, 4)
            lo, hi = math.log(pipe.lambda_low), math.log(pipe.lambda_high)
            for i in range(k):
                x = (lo + hi) / 2 if k == 1 else lo + (hi - lo) * i / (k - 1)
                lam = min(max(float(f"{math.exp(x):.4g}"), pipe.lambda_low), pipe.lambda_high)
                study.enqueue_trial({"ponder_lambda": lam})

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            self.cancel.check()
            lam = trial.suggest_float("ponder_lambda", pipe.lambda_low, pipe.lambda_high, log=True)
            m = copy.deepcopy(model_cfg)
            m.ponder_lambda = lam
            run_cfg = self.child_config(m, train_cfg, f"{pipe.name}/stage3/trial{trial.number}", "stage3")
            res = self.train_child(run_cfg, [], trial)
            bm = res.best_metrics
            for k in ("val_accuracy", "val_nll", "val_avg_exit_layer", "val_loss"):
                trial.set_user_attr(k, float(bm[k]))
            obj = float(bm["val_nll"]) if pipe.objective3 == "loss" else 1.0 - float(bm["val_accuracy"])
            return obj, float(bm["val_avg_exit_layer"])

        self.optimize(study, objective, pipe.trials_stage3, budget, "stage3")
        front = pareto_points(study)
        chosen = apply_choice_rule(front, pipe.choice_rule, pipe.choice_tolerance, trials=trial_points(study))
        self.tracker.log_event(self.parent, "pareto_front", {"objectives": [first, "val_avg_exit_layer"],
                                                             "front": front, "study_name": self.names["stage3"]})
        self.tracker.log_event(self.parent, "chosen_point", {"rule": pipe.choice_rule,
                                                             "tolerance": pipe.choice_tolerance, "point": chosen})
        self.summary.update(front=front, chosen=chosen)
        self.finish_stage("stage3", {"best_params": {"ponder_lambda": chosen["lambda"]}, "front": front,
                                     "chosen": chosen, "objectives": [first, "val_avg_exit_layer"],
                                     "n_trials": _counted(study)}, time.monotonic() - t0)

    def final(self) -> None:
        from ..data import encode
        from ..evaluate import exit_policy_sweep

        t0 = time.monotonic()
        self.start_stage("final", None, self.budget.share("final"))
        m = self.model_cfg()
        m.ponder_lambda = float(self.state["stage3"]["chosen"]["lambda"])
        run_cfg = self.child_config(m, self.train_cfg(), f"{self.pipe.name}/final", "final")
        res = self.train_child(run_cfg, [])
        enc_val = encode(self.split.val, res.tokenizer, run_cfg.data.max_seq_len)
        sweep = exit_policy_sweep(res.model, enc_val, batch_size=max(run_cfg.train.batch_size, 64),
                                  timed=self.pipe.sweep_timed)
        payload = {"split": "val", "timed": self.pipe.sweep_timed, "num_layers": res.model.num_layers,
                   "rows": sweep, "final_run_id": res.run_id}
        self.tracker.log_event(self.parent, "exit_policy_sweep", payload)
        self.tracker.log_event(res.run_id, "exit_policy_sweep", payload)
        self.summary.update(final_run_id=res.run_id, final_test=res.test_metrics, exit_policy_sweep=sweep)
        self.finish_stage("final", {"final_run_id": res.run_id, "test_metrics": res.test_metrics,
                                    "best_metrics": res.best_metrics, "exit_policy_sweep": sweep,
                                    "model": dataclasses.asdict(m), "train": dataclasses.asdict(run_cfg.train)},
                          time.monotonic() - t0)

    def result(self, status: str = "finished") -> PipelineResult:
        st = self.state
        stage_best = {s: st[s]["best_params"] for s in ("stage1", "stage2", "stage3") if s in st}
        fin = st.get("final", {})
        return PipelineResult(
            parent_run_id=int(self.parent), final_run_id=fin.get("final_run_id"), stage_best=stage_best,
            pareto=st.get("stage3", {}).get("front", []), chosen=st.get("stage3", {}).get("chosen", {}),
            study_names=dict(self.names), status=status, resumed_stages=list(self.resumed),
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
    # stage 3 tunes λ by training one model per λ: the post-training halting fit (train() for kind 'dact') would
    # replace exactly what that study measures, so the pipeline's runs keep their jointly trained halting units
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
        pareto=state.get("stage3", {}).get("front", []), chosen=state.get("stage3", {}).get("chosen", {}),
        study_names=names, status=run["status"], resumed_stages=list(state),
        feature_cache=state.get("stage1", {}).get("feature_cache", {}), test_metrics=fin.get("test_metrics", {}),
        exit_policy_sweep=fin.get("exit_policy_sweep", []), model_config=fin.get("model", {}),
        train_config=fin.get("train", {}))
