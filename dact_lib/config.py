"""Typed, validated configuration of every run.

A run is described by one :class:`RunConfig` (``kind`` + encoder + data + model + train). Configs round-trip
through plain dicts, JSON and YAML; unknown keys and bad values raise :class:`~dact_lib.errors.ConfigError` with
the dotted field name, the bad value and what is allowed. The config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import ConfigError
from .tags import MAX_TAGS

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # the bundled checkpoint (see encoders.py)
TINY_ENCODER = "tiny"  # a tiny randomly initialised BERT with the bundled tokenizer, for tests

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
POOLINGS = ("mean", "cls")
LAYOUTS = ("explicit", "pyramidal", "inverted", "bowtie")
KINDS = ("backbone", "dact", "multitask")
# auto: bf16 where the hardware has native bf16, else fp32; fp16: CUDA only (autocast fp16 + a GradScaler, for GPUs
# without bf16: T4, V100), refused for a CPU run (evaluate.check_precision)
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: how a single-task or multi-task loss weights the classes (``model.class_weighting``)
CLASS_WEIGHTINGS = ("none", "balanced")
DEVICES = ("auto", "cpu", "cuda")
#: the experiment trackers a run can also report to (``train.report_to``; dact_lib/reporting.py), besides the
#: embedded tracker, which always records it
REPORT_TOOLS = ("mlflow", "wandb", "tensorboard")


def check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name} = {value!r} is invalid: {allowed}.")


def check_frac(name: str, value: float, lo: float = 0.0, hi: float = 1.0, *, lo_open=False, hi_open=True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    lo_b = "(" if lo_open else "["
    hi_b = ")" if hi_open else "]"
    check(ok, name, value, f"expected a number in {lo_b}{lo}, {hi}{hi_b}")


def check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    check(ok, name, value, f"expected an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


def check_pos(name: str, value: Any, *, allow_zero=False, hi: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (hi is None or value <= hi)
    check(ok, name, value, "expected a " + ("non-negative" if allow_zero else "positive") + " number"
          + (f" <= {hi:g}" if hi is not None else ""))


#: the largest count a step / row / patience field takes (beyond it a value is a typo, and some reach numpy / SQLite
#: as 64-bit integers: 2**64 was accepted and failed later)
MAX_COUNT = 10**9
#: the largest loss weight, temperature or λ (larger ones overflow the loss to inf, then NaN)
MAX_WEIGHT = 1e4
#: the largest time in minutes (a year)
MAX_MINUTES = 60 * 24 * 366


#: seeds reach numpy's RNG, which takes 0 … 2**32 − 1 (2**64 was a raw "ValueError: Seed must be between …")
MAX_SEED = 2**32 - 1
#: run and dataset ids are SQLite INTEGERs (64-bit signed): a larger one was a raw OverflowError
MAX_ID = 2**63 - 1

#: bounds on a head's shape: wider than the widest encoders' hidden size (8192) only wastes memory
MAX_HEAD_WIDTH = 8192
MAX_HEAD_LAYERS = 8
#: the encoder width and depth assumed by the memory estimate before the encoder is loaded (BERT-large's)
ESTIMATE_HIDDEN, ESTIMATE_LAYERS = 1024, 24


def mlp_params(dims: list[int], d_in: int, d_out: int) -> int:
    """Weights + biases of an MLP d_in -> dims... -> d_out."""
    sizes = [d_in, *dims, d_out]
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class FormField:
    """How a launch form shows one setting: its dotted path (under ``model`` in a model config's ``FORM``, from the
    run config in ``RunConfig.FORM``), label, widget kind (text | bool | int | optint | float | optfloat | sci |
    dims | json | select | multiselect | dataset), help, and for a select its choices. The launch forms are
    generated from these (ui/forms.py ``run_fields`` / ``model_fields``); dact_lib stays streamlit-free."""

    path: str
    label: str
    kind: str
    help: str = ""
    choices: tuple = ()


@dataclass
class MLPConfig:
    """Shape of a small MLP head. ``layout='explicit'`` uses ``hidden_dims`` as given (``[]`` = one linear
    layer); the named layouts build ``depth`` hidden layers from ``width``: *pyramidal* narrows (w, w/2, w/4…),
    *inverted* widens (…, w/2, w), *bowtie* narrows then widens again (w, w/2, …, w/2, w)."""

    hidden_dims: list[int] = field(default_factory=lambda: [256])
    layout: str = "explicit"
    depth: int = 1
    width: int = 256
    activation: str = "gelu"
    dropout: float = 0.1

    def resolved_dims(self) -> list[int]:
        if self.layout == "explicit":
            return list(self.hidden_dims)
        d, w = self.depth, self.width
        if d == 0:
            return []
        if self.layout == "pyramidal":
            return [max(8, w >> i) for i in range(d)]
        if self.layout == "inverted":
            return [max(8, w >> (d - 1 - i)) for i in range(d)]
        # bowtie: narrow towards the middle, symmetric
        half = [max(8, w >> min(i, d - 1 - i)) for i in range(d)]
        return half

    def validate(self, name: str = "mlp") -> None:
        check(self.layout in LAYOUTS, f"{name}.layout", self.layout, f"choose one of {LAYOUTS}")
        check(isinstance(self.hidden_dims, list) and len(self.hidden_dims) <= MAX_HEAD_LAYERS and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 < x <= MAX_HEAD_WIDTH for x in self.hidden_dims),
            f"{name}.hidden_dims", self.hidden_dims, f"expected at most {MAX_HEAD_LAYERS} integers in "
            f"[1, {MAX_HEAD_WIDTH}], e.g. [256, 64]")
        check_int(f"{name}.depth", self.depth, 0, 8)
        check_int(f"{name}.width", self.width, 1, MAX_HEAD_WIDTH)
        check(self.activation in ACTIVATIONS, f"{name}.activation", self.activation, f"choose one of {ACTIVATIONS}")
        check_frac(f"{name}.dropout", self.dropout, 0.0, 1.0)


def check_class_weighting(name: str, value: Any) -> None:
    check(value in CLASS_WEIGHTINGS, name, value, "choose 'none' or 'balanced' (rare classes weigh as much in "
          "total as frequent ones)")


@dataclass
class DataConfig:
    """Where the data comes from and how it is split. ``path=None`` and ``dataset_id=None`` use the bundled demo
    dataset. ``val_path``/``test_path`` give explicit held-out files instead of splitting them off."""

    path: str | None = None
    dataset_id: int | None = None
    columns: dict[str, str] | None = None
    max_rows: int | None = None
    val_frac: float = 0.1
    test_frac: float = 0.1
    val_path: str | None = None
    test_path: str | None = None
    split_seed: int = 0
    max_seq_len: int = 128
    task: str | None = None  # which task a single-task model learns from a two-task file (default: the first)

    def validate(self, name: str = "data") -> None:
        if self.max_rows is not None:
            check_int(f"{name}.max_rows", self.max_rows, 10, MAX_COUNT)
        check_frac(f"{name}.val_frac", self.val_frac, 0.0, 0.9)
        check_frac(f"{name}.test_frac", self.test_frac, 0.0, 0.9)
        check(self.val_frac + self.test_frac < 0.95, f"{name}.val_frac + test_frac",
               self.val_frac + self.test_frac, "the held-out fractions must leave data to train on (sum < 0.95)")
        check(self.val_frac > 0 or self.val_path is not None, f"{name}.val_frac", self.val_frac,
               "a validation set is needed: use val_frac > 0 or give val_path")
        check_int(f"{name}.split_seed", self.split_seed, 0, MAX_SEED)
        check_int(f"{name}.max_seq_len", self.max_seq_len, 8, 4096)
        if self.columns is not None:
            check(isinstance(self.columns, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in self.columns.items()),
                   f"{name}.columns", self.columns, "expected a mapping like {'text': 'review', 'label': 'stars'}")


@dataclass
class BackboneModelConfig:
    """Encoder + MLP head on the pooled sentence vector ([CLS] or masked mean)."""

    #: what the launch form shows of this config, in order (ui/forms.py model_fields)
    FORM: ClassVar[tuple[FormField, ...]] = (
        FormField("pooling", "Pooling", "select", choices=POOLINGS,
                  help=("How a layer's token vectors become one sentence vector: their mean (masked) or "
                        "the [CLS] token's.")),
        FormField("head.hidden_dims", "Head hidden layers", "dims",
                  help="e.g. 256, 64 (empty = linear)."),
        FormField("head.activation", "Head activation", "select", choices=ACTIVATIONS,
                  help="Between the head's hidden layers."),
        FormField("head.dropout", "Head dropout", "float",
                  help="Dropout rate before each of the head's layers (0 to 1)."),
        FormField("class_weighting", "Class weighting of the loss", "select", choices=CLASS_WEIGHTINGS,
                  help=("balanced: class k of the loss weighs n / (K · n_k) on the training split, so "
                        "rare classes weigh as much in total as frequent ones (for imbalanced labels); "
                        "none: plain cross-entropy.")),
    )


    pooling: str = "mean"
    head: MLPConfig = field(default_factory=MLPConfig)
    # "balanced": the cross-entropy weights class k by n / (K · n_k) on the training split (clipped to [0.1, 10]),
    # as multi-task's; "none": plain cross-entropy. Off by default (docs/benchmarks.md, "Training options")
    class_weighting: Literal["none", "balanced"] = "none"

    def validate(self, name: str = "model") -> None:
        check(self.pooling in POOLINGS, f"{name}.pooling", self.pooling, f"choose one of {POOLINGS}")
        check_class_weighting(f"{name}.class_weighting", self.class_weighting)
        self.head.validate(f"{name}.head")


HALTING_INPUTS = ("summary", "confidence", "both")
DEPTH_WEIGHTINGS = ("uniform", "pabee")
# λ on the normalised scale (dact.spec_lambda): log-spaced, wide enough for a front from ~N layers down to ~1
DEFAULT_HALTING_LAMBDAS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]


@dataclass
class DactModelConfig:
    """DACT-BERT: after every encoder layer a classifier MLP and a halting MLP read the layer summary.

    * ``halting_input`` — what the halting MLP reads: the layer ``summary`` c_n (the paper), the ``confidence``
      features of y_n and a_{n-1} (``dact.confidence_features``: max, margin, entropy / ln K, argmax agreement), or
      ``both`` concatenated.
    * ``shared_trunk`` — DACT-BERT's diagram: the classifier MLP's hidden layers are one trunk feeding both the
      class output (y_n) and the halting MLP (h_n), instead of the halting MLP reading c_n on its own.
    * ``halting_bias_init`` — the bias of every halting MLP's output: 0 gives h_n ≈ 0.5 at the start, as in the
      reference (a single linear gate with zero bias); larger values start with "go on" (sigmoid(2) ≈ 0.88).
    * ``layer_loss_weight``, ``distill_weight`` / ``distill_temperature``, ``depth_weighting`` — extra terms that
      train the internal classifiers (``dact.dact_loss``); they leave the DACT part of the loss as the spec's.
    * ``fit_halting`` — after training, fit the halting units alone on the validation split for every λ of
      ``halting_lambdas`` (normalised scale, ``dact.spec_lambda``) and keep the fastest fitted point whose
      validation accuracy is within ``halting_tolerance`` points of the most accurate one (``halting.py``).
    """

    #: what the launch form shows of this config, in order (ui/forms.py model_fields)
    FORM: ClassVar[tuple[FormField, ...]] = (
        FormField("pooling", "Pooling", "select", choices=POOLINGS,
                  help=("How a layer's token vectors become one sentence vector: their mean (masked) or "
                        "the [CLS] token's.")),
        FormField("classifier.hidden_dims", "Classifier hidden layers", "dims",
                  help="Widths of the per-layer classifier MLP, e.g. 128 (empty = linear)."),
        FormField("halting.hidden_dims", "Halting hidden layers", "dims",
                  help="Widths of the per-layer halting MLP that gives h_n, e.g. 64 (empty = linear)."),
        FormField("ponder_lambda", "Ponder cost λ (training)", "sci",
                  help=("Weight of the ponder (computation) cost while training. It decides the exits "
                        "only with 'Fit the halting units after training' off (then larger = earlier "
                        "exits). With it on (the default) the halting units are refitted after training "
                        "and the halting tolerance below picks the exit point; this λ then only shapes "
                        "the training.")),
        FormField("layer_loss_weight", "Per-layer classifier loss weight", "float",
                  help=("0 = the DACT paper's loss. > 0 also trains every layer's classifier on its own "
                        "(as PABEE/DeeBERT do): much better early-layer classifiers, which the patience "
                        "and entropy exits and the per-layer charts use.")),
        FormField("distill_weight", "Self-distillation weight", "float",
                  help=("> 0 distils every exit from the deepest one (KL, temperature "
                        "model.distill_temperature).")),
        FormField("halting_input", "Halting units read", "select", choices=('confidence', 'summary', 'both'),
                  help=("confidence: max, margin, entropy of y_n and agreement with a_(n-1); summary: the"
                        " layer summary (the paper); both: concatenated.")),
        FormField("exit_refit_epochs", "Refit the early exits after training (epochs, 0 = off)", "int",
                  help=("Trains the classifiers of layers 1..N-1 again on their layers' cached summaries "
                        "of the training rows (encoder and last classifier unchanged): after a short "
                        "training the shallow exits are far from what their layers give. Takes about a "
                        "third of an epoch.")),
        FormField("exit_temperature", "Calibrate exits (temperature)", "bool",
                  help=("Scales each layer's logits by a temperature fitted on the validation split "
                        "before the halting fit: same answers per layer, confidences that match each "
                        "layer's accuracy, so the entropy and DACT exits compare layers fairly. Off by "
                        "default: it measured mixed (docs/benchmarks.md).")),
        FormField("fit_halting", "Fit the halting units after training (λ sweep on validation)", "bool",
                  help=("Encoder and classifiers stay as trained; the halting units are refitted per λ "
                        "and the fastest point within the tolerance below is kept.")),
        FormField("halting_tolerance", "Halting tolerance (accuracy points)", "float",
                  help=("Keep the fastest fitted λ whose validation accuracy is within this many points "
                        "of the best one: larger = earlier exits.")),
        FormField("share_weights", "Share classifier/halting weights across layers", "bool",
                  help="One classifier and one halting unit for every layer instead of one per layer."),
        FormField("class_weighting", "Class weighting of the loss", "select", choices=CLASS_WEIGHTINGS,
                  help=("balanced: class k of the loss weighs n / (K · n_k) on the training split, so "
                        "rare classes weigh as much in total as frequent ones (for imbalanced labels); "
                        "none: plain cross-entropy.")),
    )


    pooling: str = "mean"
    classifier: MLPConfig = field(default_factory=lambda: MLPConfig(hidden_dims=[128], dropout=0.1))
    halting: MLPConfig = field(default_factory=lambda: MLPConfig(hidden_dims=[64], dropout=0.0))
    share_weights: bool = False
    ponder_lambda: float = 1e-3
    ponder_start_at_one: bool = False  # report rho = 1 + sum p_n (the reference code) instead of sum p_n
    # weight of every internal classifier's own NLL added to the DACT loss (0 = the paper's loss; see dact.dact_loss)
    layer_loss_weight: float = 1.0
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    depth_weighting: str = "uniform"
    halting_input: str = "confidence"
    shared_trunk: bool = False
    halting_bias_init: float = 0.0
    fit_halting: bool = True
    halting_lambdas: list[float] = field(default_factory=lambda: list(DEFAULT_HALTING_LAMBDAS))
    halting_tolerance: float = 0.5  # accuracy points on the validation split
    halting_epochs: int = 40
    # also try halting units set by hand to a confidence threshold τ (halting.threshold_state), measured exactly
    # under the DACT rule like every fitted λ: the rule then exits like the entropy policy. On by default: on all
    # four sets of bench/early_exit_suite.py it gave the faster no-flags point (docs/benchmarks.md). Only used with
    # halting_input "confidence" (the units read the entropy feature); ignored otherwise.
    halting_thresholds: bool = True
    # after training, train the classifiers of layers 1..N-1 again on their layers' cached summaries of the training
    # rows (encoder and deepest classifier unchanged; exit_refit.py), this many epochs (0 = off), before the halting
    # fit. On by default: the shallow exits of a short training are far from what their layers give
    # (docs/benchmarks.md, "exit refit").
    exit_refit_epochs: int = 30
    exit_refit_lr: float = 1e-3
    exit_refit_max_rows: int = 20000  # a seeded sample of the training rows above this (memory: rows × N × hidden)
    # after the refit and before the halting fit, scale every exit's logits by a temperature fitted on the validation
    # split (exit_refit.temperatures_after_training: argmax unchanged, confidence calibrated per layer, folded into
    # the classifiers). Needs fit_halting. Off by default: docs/benchmarks.md, runs Q/R.
    exit_temperature: bool = False
    # "balanced": the NLL of a_N and of every exit (layer_loss_weight) weight class k by n / (K · n_k) on the
    # training split (clipped to [0.1, 10]), as multi-task's; the ponder cost and self-distillation are unweighted.
    # "none" (default): the spec's loss. docs/benchmarks.md, "Training options"
    class_weighting: Literal["none", "balanced"] = "none"

    def validate(self, name: str = "model") -> None:
        check(self.pooling in POOLINGS, f"{name}.pooling", self.pooling, f"choose one of {POOLINGS}")
        check_class_weighting(f"{name}.class_weighting", self.class_weighting)
        self.classifier.validate(f"{name}.classifier")
        self.halting.validate(f"{name}.halting")
        check(isinstance(self.share_weights, bool), f"{name}.share_weights", self.share_weights, "expected true/false")
        check_pos(f"{name}.ponder_lambda", self.ponder_lambda, allow_zero=True, hi=MAX_WEIGHT)
        check_pos(f"{name}.layer_loss_weight", self.layer_loss_weight, allow_zero=True, hi=MAX_WEIGHT)
        check_pos(f"{name}.distill_weight", self.distill_weight, allow_zero=True, hi=MAX_WEIGHT)
        check_pos(f"{name}.distill_temperature", self.distill_temperature, hi=MAX_WEIGHT)
        check(self.depth_weighting in DEPTH_WEIGHTINGS, f"{name}.depth_weighting", self.depth_weighting,
               f"choose one of {DEPTH_WEIGHTINGS}")
        check(self.halting_input in HALTING_INPUTS, f"{name}.halting_input", self.halting_input,
               f"choose one of {HALTING_INPUTS}")
        check(isinstance(self.shared_trunk, bool), f"{name}.shared_trunk", self.shared_trunk, "expected true/false")
        check(not (self.shared_trunk and not self.classifier.resolved_dims()), f"{name}.shared_trunk",
               self.shared_trunk, "a shared trunk needs a classifier with at least one hidden layer "
               "(classifier.hidden_dims non-empty)")
        ok = isinstance(self.halting_bias_init, (int, float)) and not isinstance(self.halting_bias_init, bool) \
            and math.isfinite(self.halting_bias_init) and abs(self.halting_bias_init) <= 20
        check(ok, f"{name}.halting_bias_init", self.halting_bias_init, "expected a number in [-20, 20]")
        check(isinstance(self.fit_halting, bool), f"{name}.fit_halting", self.fit_halting, "expected true/false")
        check(isinstance(self.halting_lambdas, list) and len(self.halting_lambdas) > 0 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
            for x in self.halting_lambdas), f"{name}.halting_lambdas", self.halting_lambdas,
            "expected a non-empty list of numbers >= 0, e.g. [0, 0.1, 0.5, 1, 2]")
        check_pos(f"{name}.halting_tolerance", self.halting_tolerance, allow_zero=True, hi=100.0)
        check_int(f"{name}.halting_epochs", self.halting_epochs, 1, 10000)
        check_int(f"{name}.exit_refit_epochs", self.exit_refit_epochs, 0, 1000)
        check_pos(f"{name}.exit_refit_lr", self.exit_refit_lr)
        check(self.exit_refit_lr < 1, f"{name}.exit_refit_lr", self.exit_refit_lr, "expected a learning rate < 1")
        check_int(f"{name}.exit_refit_max_rows", self.exit_refit_max_rows, 100, MAX_COUNT)
        check(isinstance(self.halting_thresholds, bool), f"{name}.halting_thresholds", self.halting_thresholds,
               "expected true/false")
        check(isinstance(self.exit_temperature, bool), f"{name}.exit_temperature", self.exit_temperature,
               "expected true/false")
        check(not (self.exit_temperature and not self.fit_halting), f"{name}.exit_temperature", self.exit_temperature,
               "calibrated exits need halting units fitted on them: turn model.fit_halting on (or exit_temperature "
               "off) — units trained on the uncalibrated exits would read shifted confidences")


@dataclass
class MultiTaskModelConfig:
    """One encoder, one head per task; task-weighted cross-entropy."""

    #: what the launch form shows of this config, in order (ui/forms.py model_fields)
    FORM: ClassVar[tuple[FormField, ...]] = (
        FormField("pooling", "Pooling", "select", choices=POOLINGS,
                  help=("How a layer's token vectors become one sentence vector: their mean (masked) or "
                        "the [CLS] token's.")),
        FormField("normalize", "L2-normalise the sentence vector", "bool",
                  help="As sentence-transformers does for all-MiniLM; the heads then see unit vectors."),
        FormField("head.hidden_dims", "Head hidden layers", "dims",
                  help="Widths of each task head's MLP, e.g. 256 (empty = linear)."),
        FormField("head.activation", "Head activation", "select", choices=ACTIVATIONS,
                  help="Between the head's hidden layers."),
        FormField("head.dropout", "Head dropout", "float",
                  help="Dropout rate before each of the head's layers (0 to 1)."),
        FormField("task_weights", "Task weights (JSON; null = 1 each)", "json",
                  help="e.g. {\"class_label\": 1.0, \"sentiment_label\": 0.5}"),
        FormField("class_weighting", "Class weighting of each task's loss", "select", choices=CLASS_WEIGHTINGS,
                  help=("balanced: rare classes weigh as much in total as frequent ones (for imbalanced "
                        "tasks).")),
    )


    pooling: str = "mean"
    normalize: bool = False
    head: MLPConfig = field(default_factory=lambda: MLPConfig(hidden_dims=[256]))
    task_weights: dict[str, float] | None = None  # None = 1.0 for every task
    # "balanced": each task's cross-entropy weights class k by n / (K · n_k) on the training split (clipped to
    # [0.1, 10]), so a rare class costs as much in total as a frequent one; "none": plain cross-entropy
    class_weighting: Literal["none", "balanced"] = "none"

    def validate(self, name: str = "model") -> None:
        check(self.pooling in POOLINGS, f"{name}.pooling", self.pooling, f"choose one of {POOLINGS}")
        check_class_weighting(f"{name}.class_weighting", self.class_weighting)
        self.head.validate(f"{name}.head")
        if self.task_weights is not None:
            check(isinstance(self.task_weights, dict) and all(
                isinstance(v, (int, float)) and v >= 0 for v in self.task_weights.values()),
                f"{name}.task_weights", self.task_weights, "expected {task: non-negative weight}")


@dataclass
class EarlyStoppingConfig:
    """Seed 002's rules. Checked once per evaluation on ``metric`` (``val_loss`` minimised, anything else
    maximised), after ``smoothing``-point moving average: stop after ``patience`` evaluations without an
    improvement larger than ``min_delta``; stop when the value is ``regression`` (20%) worse than the best; stop
    when the last ``trend_window`` values all got worse. Never before ``min_epochs``."""

    enabled: bool = True
    metric: str = "val_loss"
    patience: int = 3
    min_delta: float = 1e-4
    regression: float = 0.2
    trend_window: int = 3
    smoothing: int = 1
    min_epochs: int = 1

    def validate(self, name: str = "train.early_stopping") -> None:
        check_int(f"{name}.patience", self.patience, 1, MAX_COUNT)
        check_pos(f"{name}.min_delta", self.min_delta, allow_zero=True, hi=MAX_COUNT)
        check_pos(f"{name}.regression", self.regression, hi=MAX_COUNT)
        check_int(f"{name}.trend_window", self.trend_window, 2, MAX_COUNT)
        check_int(f"{name}.smoothing", self.smoothing, 1, MAX_COUNT)
        check_int(f"{name}.min_epochs", self.min_epochs, 0, MAX_COUNT)


@dataclass
class TrainConfig:
    """The one training loop's settings (see train.py)."""

    epochs: int = 3
    batch_size: int = 32
    encoder_lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    freeze_embeddings: bool = True  # keep the whole embeddings module (word, position, token-type, LayerNorm) fixed: cheaper, same accuracy
    freeze_layers: int = 0  # freeze the lowest k encoder layers ...
    gradual_unfreeze: bool = False  # ... and unfreeze one more (top-down) at the start of every epoch
    # "bf16" autocast, or "auto" (evaluate.resolve_precision: bf16 on hardware with native bf16 — CUDA with bf16,
    # CPUs with AVX-512 BF16 / AMX — else fp32). Stays fp32 by default: bf16 was measured on SST-2 only.
    # "fp16": CUDA only — autocast fp16 with a GradScaler (torch.amp), for GPUs without bf16 (T4, V100); a CPU run
    # is refused (evaluate.check_precision), evaluation on a CPU of an fp16-trained model runs in fp32.
    precision: str = "fp32"
    # split every batch into this many micro-batches, each backpropagated before the one optimizer step: the
    # optimisation batch stays batch_size (same gradient up to float rounding), the activation memory is that of
    # batch_size / grad_accum_steps rows. 1 = off. (An out-of-memory also splits the batch: BatchSizeManager.)
    grad_accum_steps: int = 1
    encoder_dropout: float | None = None  # override the encoder's dropout rates (None: the checkpoint's)
    group_by_length: bool = True
    pad_to: int | None = None  # pad every batch to this many tokens (the seed's way; only for comparisons)
    max_steps: int | None = None
    # stop after this many minutes of training (checked after every step): the run evaluates once more, keeps its
    # best checkpoint and finishes with stop_reason "time limit". PBT members and multi-task runs use it as their
    # timeout. None = no limit.
    time_limit_min: float | None = None
    eval_every_steps: int | None = None  # every this many steps instead of per epoch (PBT's ready interval)
    # without eval_every_steps: validation this many times per epoch, evenly spaced, the last at the epoch's end.
    # "auto" = once per epoch up to AUTO_EVAL_STEPS steps per epoch, then one more per AUTO_EVAL_STEPS steps (at
    # most 10): long epochs show validation points early. Early stopping's patience, trend window and
    # min_epochs stay counted in epochs (× the evaluations per epoch).
    evals_per_epoch: int | str = "auto"
    log_every_steps: int = 10
    # a resume checkpoint (weights, optimizer, step, early stopping, RNG) at every evaluation of a saved run:
    # ``train --resume RUN`` continues an interrupted run from it; deleted when the run finishes
    resume_checkpoints: bool = True
    # ... and between evaluations once this many minutes of training have passed since the last one (0 = only at
    # evaluations): a run killed during a long first epoch loses at most this much, not the whole epoch
    resume_every_min: float = 10.0
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    min_batch_size: int = 8
    max_batch_size: int = 64
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # also report the run to these tools (REPORT_TOOLS: params, step and eval metrics, the DACT exit front, the model
    # folder; see dact_lib/reporting.py). The embedded tracker records every run whatever this says.
    report_to: list[str] = field(default_factory=list)

    def validate(self, name: str = "train") -> None:
        check_int(f"{name}.epochs", self.epochs, 1, 1000)
        check_int(f"{name}.batch_size", self.batch_size, 1, 4096)
        check_pos(f"{name}.encoder_lr", self.encoder_lr, allow_zero=True)
        check_pos(f"{name}.head_lr", self.head_lr)
        check(self.encoder_lr < 1, f"{name}.encoder_lr", self.encoder_lr, "learning rates must be below 1")
        check(self.head_lr < 1, f"{name}.head_lr", self.head_lr, "learning rates must be below 1")
        check_pos(f"{name}.weight_decay", self.weight_decay, allow_zero=True, hi=10.0)
        check_frac(f"{name}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_pos(f"{name}.max_grad_norm", self.max_grad_norm, allow_zero=True, hi=MAX_WEIGHT)
        check_int(f"{name}.freeze_layers", self.freeze_layers, 0, 1000)
        check(self.precision in PRECISIONS, f"{name}.precision", self.precision, f"choose one of {PRECISIONS}")
        check(not (self.precision == "fp16" and self.device == "cpu"), f"{name}.precision", self.precision,
              "fp16 training needs a CUDA GPU (autocast fp16 + a gradient scaler); on a CPU use 'fp32', or "
              "'bf16' / 'auto' where the CPU has native bf16")
        check_int(f"{name}.grad_accum_steps", self.grad_accum_steps, 1, 4096)
        check(self.grad_accum_steps <= self.batch_size, f"{name}.grad_accum_steps", self.grad_accum_steps,
              f"at most train.batch_size ({self.batch_size}): every micro-batch needs a row")
        if self.encoder_dropout is not None:
            check_frac(f"{name}.encoder_dropout", self.encoder_dropout, 0.0, 1.0)
        if self.pad_to is not None:
            check_int(f"{name}.pad_to", self.pad_to, 8, 4096)
        if self.max_steps is not None:
            check_int(f"{name}.max_steps", self.max_steps, 1, MAX_COUNT)
        if self.time_limit_min is not None:
            check_pos(f"{name}.time_limit_min", self.time_limit_min, hi=MAX_MINUTES)
        if self.eval_every_steps is not None:
            check_int(f"{name}.eval_every_steps", self.eval_every_steps, 1, MAX_COUNT)
        v = self.evals_per_epoch
        check(v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 100),
              f"{name}.evals_per_epoch", v, "expected 'auto' or a whole number from 1 to 100")
        check_int(f"{name}.log_every_steps", self.log_every_steps, 1, MAX_COUNT)
        check_pos(f"{name}.resume_every_min", self.resume_every_min, allow_zero=True, hi=MAX_MINUTES)
        check_int(f"{name}.seed", self.seed, 0, MAX_SEED)
        check(self.device in DEVICES, f"{name}.device", self.device, f"choose one of {DEVICES}")
        if self.num_threads is not None:
            check_int(f"{name}.num_threads", self.num_threads, 1, 512)
        check_int(f"{name}.min_batch_size", self.min_batch_size, 1, 4096)
        check_int(f"{name}.max_batch_size", self.max_batch_size, self.min_batch_size, 65536)
        self.early_stopping.validate(f"{name}.early_stopping")
        check_report_to(f"{name}.report_to", self.report_to)


def check_report_to(name: str, value: Any) -> None:
    """``train.report_to``: a list of distinct names among :data:`REPORT_TOOLS` (whether the tools are installed is
    checked when a run starts, ``reporting.require_tools``: a saved config stays loadable without them)."""
    allowed = ", ".join(repr(t) for t in REPORT_TOOLS)
    fix = (f"choose among {allowed} (a config: report_to: [mlflow, tensorboard]; the command line: --report-to "
           "mlflow,tensorboard), or leave it empty to record the run in DACT Lab's own tracker only")
    check(isinstance(value, list) and all(isinstance(v, str) for v in value), name, value, f"expected a list: {fix}")
    unknown = [v for v in value if v not in REPORT_TOOLS]
    check(not unknown, name, value, f"unknown {', '.join(repr(v) for v in unknown)}: {fix}")
    check(len(set(value)) == len(value), name, value, f"each tool once: {fix}")


# Per-kind training defaults (seed 003 for multi-task), applied under whatever a config file gives.
# backbone: the lowest 2 encoder layers stay frozen — 1.2-1.3x faster training on a CPU than training every layer,
# SST-2 dev accuracy within the seed-to-seed spread (docs/benchmarks.md, "Training throughput"); set
# freeze_layers 0 to train every layer.
KIND_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "backbone": {"freeze_layers": 2},
    # multi-task: the single-task learning rates (5e-5 / 1e-3), measured better on both two-task sets than seed
    # 003's 1e-5 / 1e-4 (bench/multitask_defaults.py, docs/benchmarks.md)
    "multitask": {"early_stopping": {"patience": 2}},
}

def train_defaults(kind: str) -> TrainConfig:
    """The training settings a run of ``kind`` starts from: TrainConfig's defaults with KIND_TRAIN_DEFAULTS."""
    extra = dict(KIND_TRAIN_DEFAULTS.get(kind, {}))
    es = extra.pop("early_stopping", {})
    tc = TrainConfig(**extra)
    tc.early_stopping = dataclasses.replace(tc.early_stopping, **es)
    return tc


MODEL_CONFIGS = {"backbone": BackboneModelConfig, "dact": DactModelConfig, "multitask": MultiTaskModelConfig}


class _KindTrainDefaults(TrainConfig):
    """What ``RunConfig.train`` holds when none is given, until ``RunConfig.__post_init__`` replaces it with the
    kind's training defaults (:func:`train_defaults`)."""


@dataclass
class RunConfig:
    """Everything one training run needs. ``init_from_run``: id of a backbone run whose exported encoder
    weights initialise this run's encoder."""

    #: the run settings every launch form shows, in order (ui/forms.py run_fields; the model's own: its FORM)
    FORM: ClassVar[tuple[FormField, ...]] = (
        FormField("encoder", "Encoder", "text",
                  help=(f"'{DEFAULT_ENCODER}' (bundled, no download), '{TINY_ENCODER}' (a tiny random encoder for "
                        "quick checks), a Hugging Face model name or a local folder.")),
        FormField("data.dataset_id", "Dataset", "dataset",
                  help="A dataset saved on the Data page, or the bundled demo data."),
        FormField("data.max_rows", "Max rows (0 = all)", "optint",
                  help="Train on a stratified sample of this many rows."),
        FormField("data.val_frac", "Validation fraction", "float",
                  help=("Share of the rows held out (stratified) to pick the best checkpoint and stop "
                        "early.")),
        FormField("data.test_frac", "Test fraction", "float",
                  help=("Share of the rows never trained on nor used for choices: the run's final test "
                        "scores.")),
        FormField("data.split_seed", "Split seed", "int",
                  help="The same seed gives the same train / validation / test rows."),
        FormField("data.max_seq_len", "Max tokens per text", "int",
                  help="Longer texts are cut; shorter ones are not padded beyond their batch's longest."),
        FormField("train.epochs", "Epochs", "int",
                  help="Passes over the training rows (at most: early stopping may end sooner)."),
        FormField("train.batch_size", "Batch size", "int",
                  help="Rows per optimizer step (halved automatically when memory runs out)."),
        FormField("train.grad_accum_steps", "Gradient accumulation (micro-batches per batch)", "int",
                  help=("Each batch of 'Batch size' rows is cut into this many micro-batches whose "
                        "gradients add up before the one optimizer step: the same training (same "
                        "gradient) in about 1/N of the activation memory, a little slower. 1 = off.")),
        FormField("train.encoder_lr", "Encoder learning rate", "sci",
                  help="Of the pretrained encoder's weights (small: 1e-5 to 1e-4)."),
        FormField("train.head_lr", "Head learning rate", "sci",
                  help="Of the new heads (classifiers, halting units): larger than the encoder's."),
        FormField("train.weight_decay", "Weight decay", "sci",
                  help="AdamW's decoupled weight decay (not applied to biases and LayerNorms)."),
        FormField("train.seed", "Seed", "int",
                  help="Seeds the heads' initialisation, dropout and the batch order."),
        FormField("train.time_limit_min", "Time limit in minutes (0 = none)", "optfloat",
                  help=("Stop after this long, keep the best checkpoint (PBT: every member; multi-task: "
                        "the run).")),
        FormField("train.report_to", "Also report to", "multiselect", choices=REPORT_TOOLS,
                  help=("Besides DACT Lab's own tracker: params, curves, the exit front and the model, to"
                        " MLflow ($MLFLOW_TRACKING_URI), Weights & Biases ($WANDB_MODE, $WANDB_DIR) or "
                        "TensorBoard (the run folder's tensorboard/), installed in the app's Python (pip "
                        "install mlflow-skinny / wandb / tensorboard).")),
        FormField("train.evals_per_epoch", "Validations per epoch", "select", choices=('auto', 1, 2, 3, 4, 5, 10),
                  help=("How often the validation split is scored within an epoch (curves, best "
                        "checkpoint, early stopping). 'auto': once per epoch, plus one per 500 training "
                        "steps on long epochs.")),
        FormField("train.early_stopping.enabled", "Early stopping", "bool",
                  help=("Stop when the validation metric has not improved for a while; the best "
                        "checkpoint is kept.")),
        FormField("train.device", "Device", "select", choices=DEVICES,
                  help="auto: a GPU when there is one, else the CPU."),
    )


    kind: str = "backbone"
    encoder: str = DEFAULT_ENCODER
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None  # BackboneModelConfig | DactModelConfig | MultiTaskModelConfig, chosen by kind
    train: TrainConfig = field(default_factory=_KindTrainDefaults)  # the kind's defaults: see __post_init__
    name: str | None = None
    # one tag (text) or several (a list; "a, b" is two tags too): see tags.tag_list. The run row's ``tag`` column
    # holds them joined (tags.tag_text), so a run of an older DACT Lab (one string) reads the same way.
    tag: str | list[str] | None = None
    init_from_run: int | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.kind in MODEL_CONFIGS:
            self.model = MODEL_CONFIGS[self.kind]()
        # one place for the per-kind defaults: RunConfig(kind=k) == default_config(k); None (a caller's "the
        # defaults") likewise
        if self.train is None or type(self.train) is _KindTrainDefaults:
            self.train = train_defaults(self.kind)

    def validate(self) -> "RunConfig":
        for id_field, holder in (("init_from_run", self), ("dataset_id", self.data)):
            v = getattr(holder, id_field)
            if isinstance(v, str) and v.strip().isdigit():  # "3" from a flag or a form: the id 3
                setattr(holder, id_field, int(v))
        check_types(self)
        for id_field, holder in (("init_from_run", self), ("dataset_id", self.data)):
            v = getattr(holder, id_field)
            if v is not None:
                check_int(f"{'data.' if holder is self.data else ''}{id_field}", v, 1, MAX_ID)
        check(self.kind in KINDS, "kind", self.kind, f"choose one of {KINDS}")
        check(isinstance(self.encoder, str) and self.encoder.strip() != "", "encoder", self.encoder,
               f"give a Hugging Face model name, a local directory, '{DEFAULT_ENCODER}' or '{TINY_ENCODER}'")
        expected = MODEL_CONFIGS[self.kind]
        check(isinstance(self.model, expected), "model", type(self.model).__name__,
               f"kind {self.kind!r} needs a {expected.__name__}")
        self.data.validate()
        self.model.validate()
        self.train.validate()
        self._check_head_memory()
        return self

    def estimated_head_params(self, hidden: int = ESTIMATE_HIDDEN, layers: int = ESTIMATE_LAYERS,
                              classes: int = 64) -> int:
        """Parameters of the heads on a ``hidden``-wide, ``layers``-deep encoder (DACT: one classifier and one
        halting unit per layer unless shared)."""
        m = self.model
        if self.kind == "dact":
            copies = 1 if m.share_weights else layers
            return copies * (mlp_params(m.classifier.resolved_dims(), hidden, classes)
                             + mlp_params(m.halting.resolved_dims(), hidden + 8, 1))
        return mlp_params(m.head.resolved_dims(), hidden, classes) * (2 if self.kind == "multitask" else 1)

    def _check_head_memory(self) -> None:
        """Refuse heads whose weights, gradients and AdamW moments (16 bytes a parameter) would need more than
        half of this machine's memory, before anything is allocated."""
        ram = physical_memory_bytes()
        need = 16 * self.estimated_head_params()
        if ram and need > ram // 2:
            raise ConfigError(f"The heads of this config need about {need / 2**30:.1f} GiB for weights, gradients "
                              f"and optimizer state (more than half of this machine's {ram / 2**30:.0f} GiB): use "
                              "smaller hidden_dims / width / depth.")

    # -- round trips -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"A run config must be a mapping, got {type(data).__name__}: write it as a JSON object.")
        kind = data.get("kind", "backbone")
        check(kind in KINDS, "kind", kind, f"choose one of {KINDS}")
        data = dict(data)
        defaults = dataclasses.asdict(train_defaults(kind))  # a file's train settings go over the kind's defaults
        if not isinstance(data.get("train") or {}, dict):
            raise ConfigError(f"train must be a mapping, got {data.get('train')!r}.")
        given = dict(data.get("train") or {})
        es = {**defaults.pop("early_stopping"), **(given.get("early_stopping") or {})}
        data["train"] = {**defaults, **given, "early_stopping": es}
        model = data.pop("model", None)
        cfg = from_dict(cls, data, "")
        cfg.model = from_dict(MODEL_CONFIGS[kind], model or {}, "model")
        return cfg.validate()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = self.to_yaml() if path.suffix in (".yaml", ".yml") else self.to_json()
        from .files import atomic_write_text

        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_mapping(path))


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML file into a dict, with a clear error when it is neither."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist: check the path.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {path.stat().st_size / 1024:.0f} KiB: a config is at most "
                          f"{MAX_CONFIG_BYTES // 1024} KiB. Check that this is the right file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: a config is a JSON or YAML text file.") from None
    return parse_mapping(text, path.suffix.lower(), str(path))


#: limits on a config document, checked before anything expands it (a few KB is a big config)
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 16


def _check_yaml_events(text: str, where: str) -> None:
    """Refuse YAML aliases/anchors (the "billion laughs" expansion) and over-deep nesting by reading the event
    stream, which costs O(size) and expands nothing."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError(f"{where} uses YAML anchors/aliases (&name / *name): write every value out instead.")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep: a config is a few "
                                  "levels of settings; fix the file.")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _depth(value: Any, limit: int) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_mapping(text: str, suffix: str = ".json", where: str = "config") -> dict[str, Any]:
    """Parse a JSON or YAML config document, refusing oversized (> MAX_CONFIG_BYTES), over-deep and YAML-alias
    documents before anything expands them."""
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is {size / 1024:.0f} KiB: a config is at most {MAX_CONFIG_BYTES // 1024} KiB. "
                          "Check that this is the right file.")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            _check_yaml_events(text, where)
            data = yaml.safe_load(text)
        else:
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                import yaml

                _check_yaml_events(text, where)
                data = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - both parsers' errors become one ConfigError
        raise ConfigError(f"{where} is neither valid JSON nor YAML ({str(exc)[:300]}): fix the syntax.") from None
    if _depth(data, MAX_CONFIG_DEPTH) > MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_CONFIG_DEPTH} levels deep: a config is a few levels of "
                          "settings; fix the file.")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of settings (a JSON object), not {type(data).__name__}.")
    return data


def split_config_document(data: dict[str, Any], where: str = "the config") -> tuple[dict[str, Any], dict[str, Any]]:
    """A config download is the RunConfig mapping alone, or ``{"config": ..., "options": ...}`` for the engines
    (tuning, pipeline, PBT): return ``(config mapping, engine options)`` — ``{}`` options for a plain config."""
    if not ("config" in data and isinstance(data.get("config"), dict)):
        return data, {}
    unknown = sorted(set(data) - {"config", "options"})
    if unknown:
        raise ConfigError(f"Unknown top-level key(s) {unknown} in {where}: expected 'config' and 'options'.")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"'options' in {where} must be a mapping of engine settings.")
    return data["config"], options


#: settings retired because they measured no better: name -> (the value that did nothing, where the numbers stay).
#: A saved config with that value still loads (the key is dropped); another value is refused with why.
RETIRED = {
    "DactModelConfig": {
        "halting_calibration": (False, "calibrated halting logits gave a deeper default point on SST-2 (5.77 vs "
                                       "5.52 layers): docs/benchmarks.md, \"Early exit that pays\""),
        "exit_refit_distill": (0.0, "distilling the refitted exits from the deepest one made their entropy front "
                                    "less aggressive: docs/benchmarks.md, \"Retired settings\""),
    },
}


def _drop_retired(cls: type, data: dict, path: str) -> dict:
    retired = RETIRED.get(cls.__name__) or {}
    if not retired or not set(data) & set(retired):
        return data
    for key in set(data) & set(retired):
        off, why = retired[key]
        if data[key] != off and data[key] is not None:
            raise ConfigError(f"{path + '.' if path else ''}{key} = {data[key]!r}: this setting was retired ({why}); "
                              "remove it from the config.")
    return {k: v for k, v in data.items() if k not in retired}


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from ``data`` recursively; unknown keys raise ConfigError naming them."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = _drop_retired(cls, data, path)
    unknown = sorted(set(data) - names)
    if unknown:
        where = path or "the run config"
        raise ConfigError(f"Unknown setting(s) {unknown} in {where}: allowed are {sorted(names)}.")
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        sub = f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kwargs[key] = from_dict(hint, value, sub)
        else:
            kwargs[key] = _coerce(value, hint, sub)
    return cls(**kwargs)


#: bounds on free-form strings of a config (a name or tag is a label, not a document)
MAX_TEXT_FIELD = 200
MAX_LIST_ITEMS = 64


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        (arg,) = typing.get_args(hint) or (Any,)
        plural = {str: "strings", int: "integers", float: "numbers", bool: "true/false values"}
        return f"a list of at most {MAX_LIST_ITEMS} {plural.get(arg, 'items')}"
    if origin is dict:
        return "a mapping"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(hint, getattr(
        hint, "__name__", str(hint)))


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any or hint is None:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if origin is list:
        (arg,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and len(value) <= MAX_LIST_ITEMS and all(_type_ok(v, arg) for v in value)
    if origin is dict:
        args = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, args[0]) and _type_ok(v, args[1])
                                               for k, v in value.items())
    if origin is tuple:
        return isinstance(value, (tuple, list))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and len(value) <= 4096
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_types(obj: Any, path: str = "") -> None:
    """Every field of config dataclass ``obj`` (recursively) has a value of its annotated type: a wrong type
    (``name: [a, b]``, ``epochs: "3"``) raises :class:`ConfigError` naming the field, the value and the type,
    before anything uses it. ``name`` and every tag are at most MAX_TEXT_FIELD characters, at most MAX_TAGS tags."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        sub = f"{path}.{f.name}" if path else f.name
        hint = hints.get(f.name, Any)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, sub)
            continue
        if not _type_ok(value, hint):
            raise ConfigError(f"{sub} = {_short(value)} is invalid: expected {_type_name(hint)}.")
        if f.name in ("name", "tag") and isinstance(value, str) and len(value) > MAX_TEXT_FIELD:
            raise ConfigError(f"{sub} is {len(value)} characters long: keep it under {MAX_TEXT_FIELD}.")
        if f.name == "tag" and isinstance(value, list):
            long = [t for t in value if len(t) > MAX_TEXT_FIELD]
            if long or len(value) > MAX_TAGS:
                raise ConfigError(f"{sub} has {len(value)} tags" + (f", one {len(long[0])} characters long" if long
                                  else "") + f": give at most {MAX_TAGS} tags of at most {MAX_TEXT_FIELD} characters.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(value: Any, hint: Any, path: str) -> Any:
    # YAML/JSON give ints for floats ("1" for 1.0) and strings for scientific notation in YAML 1.1 ("1e-5").
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path} = {value!r} is invalid: expected a number.") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args == (float,) and isinstance(value, list):
        return [_coerce(v, float, f"{path}[{i}]") for i, v in enumerate(value)]
    if float in args and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path} = {value!r} is invalid: expected a number.") from None
    return value


AUTO_EVAL_STEPS = 500  # train.evals_per_epoch = "auto": one validation per this many steps of a long epoch


def evals_per_epoch(tc: "TrainConfig", steps_per_epoch: int) -> int:
    """How many validations an epoch of ``steps_per_epoch`` steps gets (1 with ``eval_every_steps``)."""
    if tc.eval_every_steps:
        return 1
    if tc.evals_per_epoch == "auto":
        return int(min(10, max(1, math.ceil(steps_per_epoch / AUTO_EVAL_STEPS))))
    return int(min(tc.evals_per_epoch, max(1, steps_per_epoch)))


def default_config(kind: str = "backbone", **overrides: Any) -> RunConfig:
    """A validated default config for ``kind``; ``overrides`` set top-level fields (e.g. ``encoder='tiny'``)."""
    check(kind in KINDS, "kind", kind, f"choose one of {KINDS}")
    cfg = RunConfig.from_dict({"kind": kind})
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ConfigError(f"Unknown setting {key!r}: allowed are {[f.name for f in dataclasses.fields(cfg)]}.")
        setattr(cfg, key, value)
    return cfg.validate()
