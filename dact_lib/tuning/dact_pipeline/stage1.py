"""Stage 1 — the DACT heads' architecture, trained on cached per-layer features of the frozen encoder."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna
import torch

from .. import studies
from ... import dact
from ...callbacks import CancelToken
from ...config import ACTIVATIONS, DactModelConfig, MLPConfig
from ...errors import ConfigError
from ...modeling_dact import DactUnits, loss_terms
from .record import counted
from .settings import LAYOUT_CHOICES, PipelineConfig, STUDY_PREFIX
from ... import events as ev


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
    pre = STUDY_PREFIX[which]
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
    pre = STUDY_PREFIX[which]
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


def run(pl) -> None:
    from ...features import cached_features_many

    t0 = time.monotonic()
    budget = pl.budget.share("stage1")
    pipe, cfg = pl.pipe, pl.cfg
    pl.start_stage("stage1", pipe.trials_stage1, budget)
    previous_threads = torch.get_num_threads()
    weights = None
    if cfg.init_from_run is not None:  # the features of the encoder the DACT runs start from
        from ...home import runs_dir
        from ...models import ENCODER_FILE

        weights = runs_dir(pl.home) / str(cfg.init_from_run) / ENCODER_FILE
        if not weights.is_file():
            raise ConfigError(f"init_from_run = {cfg.init_from_run!r}: {weights} does not exist. Give the id of "
                              "a finished backbone run.")
    if cfg.train.num_threads:  # the one encoder pass runs at the run's thread count; restored after it
        torch.set_num_threads(cfg.train.num_threads)
    n_rows = len(pl.split.train) + len(pl.split.val)
    shown = {"tenth": -1}

    def on_progress(done: int, total: int) -> None:  # a phase event per tenth of the rows (the Runs page shows it)
        tenth = 10 * done // max(total, 1)
        if tenth > shown["tenth"]:
            shown["tenth"] = tenth
            pl.tracker.log_event(pl.parent, ev.PHASE, {"phase": f"caching features: {done:,} / {total:,} rows",
                                                       "rows_done": done, "rows": total})

    pl.tracker.log_event(pl.parent, ev.PHASE, {"phase": f"caching features of {n_rows:,} rows (once per encoder "
                                                         "and data)", "rows_done": 0, "rows": n_rows})
    try:
        got_all = cached_features_many(cfg.encoder, {"train": pl.split.train, "val": pl.split.val},
                                       poolings=pipe.poolings, max_seq_len=cfg.data.max_seq_len, home=pl.home,
                                       device=str(pl.device), seed=cfg.train.seed, encoder_weights=weights,
                                       on_progress=on_progress)
    finally:
        torch.set_num_threads(previous_threads)
    pl.tracker.log_event(pl.parent, ev.PHASE, {"phase": "stage 1: training heads on the cached features"})
    feats = {part: {p: c.features.to(pl.device) for p, c in got.items()} for part, got in got_all.items()}
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
    pl.tracker.log_event(pl.parent, ev.STAGE1_FEATURES, cache)
    pl.summary["feature_cache"] = {k: v for k, v in cache.items() if k != "splits"}
    y_tr = torch.as_tensor(pl.split.train.targets[pl.task]).to(pl.device)
    y_va = torch.as_tensor(pl.split.val.targets[pl.task]).to(pl.device)

    study = studies.create_study(
        pl.names["stage1"], directions=["minimize"], home=pl.home,
        sampler=optuna.samplers.TPESampler(seed=pipe.seed + 1,
                                           n_startup_trials=min(10, max(2, pipe.trials_stage1 // 2))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, pipe.stage1_epochs // 3)),
        user_attrs={"pipeline": pipe.name, "stage": "stage1", "parent_run_id": pl.parent,
                    "objective": "val_loss (DACT loss at stage1_lambda, heads on cached features)"})

    # at least pipe.min_steps optimizer steps per trial (small data: more epochs over the cached features)
    per_epoch = max(1, math.ceil(len(pl.split.train) / pipe.stage1_batch_size))
    epochs1 = max(pipe.stage1_epochs, min(max(pipe.max_epochs, pipe.stage1_epochs),
                                          math.ceil(pipe.min_steps / per_epoch)))

    def objective(trial: optuna.Trial) -> float:
        pl.cancel.check()
        params = suggest_architecture(trial, pipe)
        model_cfg = model_from_params(params, cfg.model, ponder_lambda=pipe.stage1_lambda)

        def report(step: int, value: float) -> None:
            trial.report(value if math.isfinite(value) else math.inf, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step + 1} (val_loss = {value:.5g})")

        fit = fit_heads_on_features(model_cfg, pl.num_classes, feats["train"][model_cfg.pooling], y_tr,
                                    feats["val"][model_cfg.pooling], y_va, epochs=epochs1,
                                    lr=pipe.stage1_lr, batch_size=pipe.stage1_batch_size,
                                    weight_decay=cfg.train.weight_decay, seed=pipe.seed + trial.number,
                                    report=report, cancel=pl.cancel, num_threads=pipe.stage1_threads)
        for k in ("val_accuracy", "val_nll", "val_avg_exit_layer"):
            trial.set_user_attr(k, fit.metrics[k])
        trial.set_user_attr("best_epoch", fit.best_epoch)
        return fit.val_loss

    pl.optimize(study, objective, pipe.trials_stage1, None if budget is None else
                  max(0.0, budget - (time.monotonic() - t0)), "stage1")
    best = study.best_trial
    pl.guard("stage1", best.user_attrs.get("val_accuracy"))
    model_cfg = model_from_params(best.params, cfg.model, ponder_lambda=pipe.stage1_lambda)
    if model_cfg.share_weights and model_cfg.exit_refit_epochs > 0:  # said, never silent
        msg = ("stage 1 chose one head shared by every layer: the exit refit (model.exit_refit_epochs) has no "
               "shallow classifier of its own to retrain and is skipped for this pipeline's models; set "
               "pipeline.search_share_weights = False to keep it")
        pl.tracker.log_event(pl.parent, ev.WARNING, {"stage": "stage1", "message": msg})
        pl.summary.setdefault("warnings", []).append(msg)
    pl.finish_stage("stage1", {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                                 "best_user_attrs": best.user_attrs, "model": dataclasses.asdict(model_cfg),
                                 "feature_cache": pl.summary["feature_cache"], "n_trials": counted(study)},
                      time.monotonic() - t0)
