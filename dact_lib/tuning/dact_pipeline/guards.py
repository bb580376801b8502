"""Guards: every stage's best model against the majority-class baseline and the stage before."""
from __future__ import annotations

import math
from typing import Required, TypedDict

import torch

from ...errors import DactLabError
from ... import events as ev


def majority_baseline(targets) -> float:
    """The accuracy of always answering the most frequent class of ``targets``."""
    t = torch.as_tensor(targets).long()
    return float(torch.bincount(t).max()) / max(1, int(t.numel()))


def guard_margin(baseline: float, n: int, margin: float) -> float:
    """How much a stage's accuracy must exceed the majority baseline: max(margin, 2 standard errors of the
    baseline's accuracy on n rows)."""
    return max(float(margin), 2.0 * math.sqrt(max(baseline * (1.0 - baseline), 0.0) / max(1, n)))


class PreviousStage(TypedDict):
    """The stage before, in a guard's record: its name, its accuracy and the change to this stage's."""
    stage: str
    accuracy: float
    change: float


class GuardInfo(TypedDict, total=False):
    """A stage's guard: the payload of its ``guard`` (and ``guard_failed``) event and what :func:`check` returns.
    ``criterion`` is ``"accuracy"``, or ``"nll"`` for a model restored by a loss (then the ``nll`` keys are set)."""
    stage: Required[str]
    split: Required[str]
    accuracy: Required[float]
    majority_baseline: Required[float]
    margin: Required[float]
    rows: Required[int]
    criterion: Required[str]
    passed: Required[bool]
    checkpoint_metric: str | None
    nll: float
    prior_nll: float
    nll_margin: float
    previous: PreviousStage
    warning: str
    message: str


class PipelineGuardError(DactLabError):
    """A stage's best model is not clearly better than always answering the majority class."""


_GUARD_ADVICE = {
    "stage1": ("the heads on the frozen encoder's features learned nothing: check that the labels match the texts "
               "(Data page preview), give more rows, or raise pipeline.stage1_epochs / stage1_lr"),
    "stage2": ("no training-parameter trial trained a useful model: raise pipeline.min_steps (optimizer steps per "
               "trial) or pipeline.epochs_range{head_lr}, or give more rows"),
    "stage3": ("every fitted halting point answers no better than the majority class: the stage-2 model itself "
               "is too weak — see its accuracy on the Runs page"),
    "final": ("the final model answers no better than the majority class on the test split: the validation "
              "split may be too small to select on; give more rows or a larger data.val_frac"),
}


def advice(stage: str, pipe) -> str:
    """What to change when ``stage``'s guard fails, for these pipeline settings (stage 2 advises widening the
    head learning-rate range only when it does not hold the single runs' 1e-3)."""
    text = _GUARD_ADVICE[stage]
    lo, hi = pipe.pair("head_lr_range")
    text = text.replace("{head_lr}", "" if lo <= 1e-3 <= hi else
                        ", widen pipeline.head_lr_range towards 1e-3 (the single runs' value)")
    if pipe.timeout_min is not None and stage in ("stage2", "stage3", "final"):
        # under a wall the trainings stop at their share: the first thing to give is time
        text = (f"raise pipeline.timeout_min ({pipe.timeout_min:g} min: every training stopped at its share of it) "
                f"— or {text}")
    return text


def prior_nll(train_targets, targets, num_classes: int | None = None) -> tuple[float, float]:
    """(mean, standard error) of the NLL on ``targets`` of always answering the training class frequencies (add-one
    smoothed): the loss-side majority-class baseline — a model that learned nothing from the text scores this."""
    tr = torch.as_tensor(train_targets).long()
    t = torch.as_tensor(targets).long()
    k = int(max(num_classes or 0, int(tr.max()) + 1 if tr.numel() else 0, int(t.max()) + 1 if t.numel() else 0))
    freq = (torch.bincount(tr, minlength=k).double() + 1.0) / (tr.numel() + k)
    per_row = -freq.log()[t]
    n = max(1, int(t.numel()))
    return float(per_row.mean()), float(per_row.std(unbiased=False)) / math.sqrt(n)


def is_loss_metric(metric: str | None) -> bool:
    """Whether a checkpoint metric is a loss (lower is better): the restore and the guard then read the NLL."""
    return bool(metric) and any(w in str(metric) for w in ("loss", "nll"))


def check(pl, stage: str, accuracy: float | None, *, split: str = "val", previous: tuple[str, float] | None
          = None, metrics: dict | None = None, metric: str | None = None) -> GuardInfo:
    """Compare ``stage``'s best model with the majority-class baseline of ``split`` (and with the stage before,
    ``previous`` = (stage, accuracy)): a ``guard`` event either way; raises PipelineGuardError (after a
    ``guard_failed`` event) when the model is not clearly better than the baseline.

    One criterion: a model whose checkpoint was restored by a loss (``metric`` = ``val_loss``, the stage-2
    default) is judged by the same side — its validation NLL (``metrics["val_nll"]``) against the NLL of answering
    the training class frequencies, by max(``guard_margin`` × that NLL, 2 standard errors). (Reading accuracy there
    refused a model whose best-loss epoch was at 67.7 % while a later, discarded epoch reached 74.2 %.) Otherwise
    the accuracy against always answering the largest class, by max(``guard_margin``, 2 standard errors)."""
    part = pl.split.val if split == "val" else pl.split.test
    targets = part.targets[pl.task]
    base = majority_baseline(targets)
    need = guard_margin(base, len(targets), pl.pipe.guard_margin)
    acc = float("nan") if accuracy is None else float(accuracy)
    info: GuardInfo = {"stage": stage, "split": split, "accuracy": acc, "majority_baseline": base, "margin": need,
                       "rows": len(targets), "criterion": "accuracy",
                       "passed": bool(acc == acc and acc >= base + need)}
    nll = (metrics or {}).get(f"{split}_nll")
    if is_loss_metric(metric) and nll is not None and nll == nll:
        ref, se = prior_nll(pl.split.train.targets[pl.task], targets, getattr(pl, "num_classes", None))
        need_nll = max(pl.pipe.guard_margin * ref, 2.0 * se)
        info["criterion"], info["checkpoint_metric"] = "nll", metric
        info["nll"], info["prior_nll"], info["nll_margin"] = float(nll), ref, need_nll
        info["passed"] = bool(float(nll) <= ref - need_nll)
    if previous is not None and previous[1] is not None and previous[1] == previous[1]:
        info["previous"] = {"stage": previous[0], "accuracy": float(previous[1]),
                            "change": acc - float(previous[1])}
        if acc < float(previous[1]) - need:
            info["warning"] = (f"{stage}'s best {split} accuracy {acc:.3f} is below {previous[0]}'s "
                               f"{float(previous[1]):.3f}")
    pl.tracker.log_event(pl.parent, ev.GUARD, info)
    if not info["passed"]:
        if info["criterion"] == "nll":
            msg = (f"Pipeline stopped after {stage}: its best model (restored by {metric}) has a {split} NLL of "
                   f"{info['nll']:.4f}, not clearly better than answering the class frequencies "
                   f"({info['prior_nll']:.4f}; needed ≤ {info['prior_nll'] - info['nll_margin']:.4f} on "
                   f"{len(targets)} rows; accuracy {acc:.1%}). What to change: {advice(stage, pl.pipe)}.")
        else:
            msg = (f"Pipeline stopped after {stage}: its best model reaches {acc:.1%} {split} accuracy, not clearly "
                   f"better than always answering the largest class ({base:.1%}; needed ≥ {base + need:.1%} on "
                   f"{len(targets)} rows). What to change: {advice(stage, pl.pipe)}.")
        info["message"] = msg
        pl.tracker.log_event(pl.parent, ev.GUARD_FAILED, info)
        if pl.pipe.guards == "stop":
            raise PipelineGuardError(msg)
        import logging

        logging.getLogger(__name__).warning("%s (pipeline.guards = 'warn': going on)", msg)
        pl.summary.setdefault("guard_warnings", []).append(msg)
    return info
