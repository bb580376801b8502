"""Settings and result of the staged DACT pipeline: :class:`PipelineConfig` (validated once), :class:`PipelineResult`,
the stage names."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar, Any, Literal

from ...config import POOLINGS
from ...errors import ConfigError
from ...front import FrontPoint

#: stage 3's Optuna parameter: the halting fit's normalised λ of the front (docs/dact_maths.md, "Two scales of λ"),
#: named apart from the training λ (``model.ponder_lambda``); stage-3 studies before the rename called it
#: "ponder_lambda", which ``FrontPoint.from_dict`` still reads
FRONT_LAMBDA = "front_lambda"


PIPELINE_KIND = "dact-pipeline"


STAGES = ("stage1", "stage2", "stage3", "single", "final")


OBJECTIVES3 = ("loss", "error")


CHOICE_RULES = ("lowest_exit_within_1pt", "best_objective")


LAYOUT_CHOICES = ("constant", "pyramidal", "inverted", "bowtie")  # "constant" = explicit [width] * depth


STAGE_WEIGHTS = {"stage1": 1.0, "stage2": 8.0, "stage3": 1.0, "single": 3.0, "final": 1.0}


STUDY_PREFIX = {"classifier": "cls", "halting": "halt"}


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

    #: the launch form's label and help of each setting (ui/fields.py settings_fields)
    FORM_TEXT: ClassVar[dict[str, tuple[str, str]]] = {
        "trials_stage1": ("Stage 1 trials (head architecture)",
                           "Architectures tried on cached features (cheap)."),
        "trials_stage2": ("Stage 2 trials (training settings)",
                           "Each is one training of the whole model."),
        "trials_stage3": ("Stage 3 trials (λ / threshold)",
                           "Halting fits on the stage-2 model: seconds each."),
        "timeout_min": ("Time limit in minutes (0 = none)",
                         "The whole pipeline stops starting new trials after it."),
        "stage1_epochs": ("Stage 1 epochs per trial",
                           "Epochs of head training over the cached features."),
        "lambda_low": ("Smallest ponder cost λ",
                        ("On the normalised scale: λ = 1 means running all layers costs as much as the"
                         " deepest classifier's loss.")),
        "lambda_high": ("Largest ponder cost λ",
                         "Larger λ = earlier exits, lower accuracy."),
        "stage3_thresholds": ("Also try confidence thresholds",
                               ("Halting units set to a confidence threshold τ, measured under the same DACT "
                                "rule.")),
        "objective3": ("Stage 3 objective",
                        "What stage 3 trades against the exit layer: validation loss or error."),
        "choice_rule": ("How the final point is chosen",
                         ("lowest_exit_within_1pt: the fastest point within the tolerance of the most "
                          "accurate; best_objective: the best first objective.")),
        "choice_tolerance": ("Accuracy you give up for speed (0.01 = 1 point)",
                              "Used by the choice rule."),
        "seed": ("Seed",
                  "Seeds the samplers of the stages' studies."),
        "stage1_lambda": ("Stage 1 ponder cost λ",
                           "Fixed while architectures are compared."),
        "stage1_lr": ("Stage 1 learning rate",
                       "Of the heads on cached features."),
        "stage1_batch_size": ("Stage 1 batch size",
                               "Rows per step of the heads on cached features."),
        "stage1_threads": ("Stage 1 torch threads (0 = leave as is)",
                            "One thread measured fastest for the small heads."),
        "max_depth": ("Deepest head MLP",
                       "Hidden layers stage 1 may try."),
        "widths": ("Head widths to try",
                    "Comma-separated, e.g. 32, 64, 128."),
        "poolings": ("Poolings to try",
                      "How a layer's tokens become one vector."),
        "search_share_weights": ("Also try one head shared by all layers",
                                  "Stage 1 then also tries one classifier and one halting unit for every layer."),
        "encoder_lr_range": ("Encoder learning rate range",
                              "Stage 2 samples it log-uniformly."),
        "head_lr_range": ("Head learning rate range",
                           "Stage 2 samples it log-uniformly; contains the single runs' 1e-3."),
        "batch_sizes": ("Batch sizes to try",
                         "Comma-separated, e.g. 16, 32, 64."),
        "epochs_range": ("Epochs range",
                          ("Stage 2's epochs per trial (raised on small data to reach the minimum "
                           "steps).")),
        "weight_decay_range": ("Weight decay range",
                                "Stage 2 samples AdamW's weight decay uniformly in it."),
        "warmup_range": ("Warm-up fraction range",
                          "Share of the steps with a rising learning rate; stage 2 samples it."),
        "min_steps": ("Minimum optimizer steps per trial",
                       "On small data a trial's epochs are raised to reach this."),
        "stage2_pruner": ("Stage 2 pruning",
                           "halving: successive halving over epochs; median: Optuna's median pruner."),
        "stage2_fraction": ("Stage 2: fraction of the training rows per trial",
                             ("Trials train on this stratified share (at least the minimum rows); the best "
                              "parameters then train once on every row.")),
        "stage2_min_rows": ("Stage 2: minimum rows per trial",
                             "Smaller training sets use every row in every trial."),
        "stage2_min_per_class": ("Stage 2: minimum rows of the smallest class per trial",
                                  ("The trials' share is raised until the smallest class has this many rows "
                                   "(every row when it has fewer).")),
        "stage2_refit_epochs": ("Stage 2: epochs of the refit on every row",
                                 ("max: the top of the epochs range (best validation checkpoint kept); trial: "
                                  "the best trial's own.")),
        "stage2_start_from_config": ("Stage 2: first trial = this form's training values",
                                      "The search starts from what a single run would do."),
        "max_epochs": ("Most epochs a trial may be raised to",
                        "A cap on the epochs added to reach the minimum steps."),
        "guard_margin": ("Guard margin over the majority class",
                          ("A stage's best model must beat always answering the largest class by this "
                           "much (or 2 standard errors).")),
        "guards": ("When a stage is no better than the majority class",
                    "stop: stop and say what to change; warn: record it and go on."),
        "final_finetune": ("Also fine-tune the final model end to end",
                            "At the chosen λ, compared with the fitted point."),
        "finetune_epochs": ("Fine-tuning epochs",
                             "Of the optional end-to-end fine-tuning at the chosen λ."),
        "single_run": ("Compare with a single DACT run",
                        ("Also train this form's settings as one single run and keep it when its point"
                         " is better: the pipeline never returns a model a single run beats.")),
        "sweep_timed": ("Time the exit-policy sweep",
                         "Real early-exit passes (slower) instead of a simulation."),
    }


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
    objective3: Literal["loss", "error"] = "loss"  # stage 3: validation NLL or 1 - accuracy
    choice_rule: Literal["lowest_exit_within_1pt", "best_objective"] = "lowest_exit_within_1pt"
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
    # one classifier shared by every layer leaves nothing for the exit refit to retrain (exit_refit.py): stage 1
    # scores frozen features, where sharing looks as good, and picked it on a 77-class set whose single run the
    # refit lifts from 52 % to 88 % at layer 1 — so it is tried only when asked for (and the skipped refit is said)
    search_share_weights: bool = False
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
    # multi-fidelity over rows: stage-2 trials train on this fraction of the training rows (stratified, at least
    # stage2_min_rows), then the best trial's parameters train once on all of them — the model stages 3 and final
    # build on. 1.0 = trials on every row, the best trial's own model is kept (bench/pipeline_time.py)
    stage2_fraction: float = 0.34
    stage2_min_rows: int = 1500
    # … and enough rows that the smallest class has this many in the trials' sample (every row when it has fewer)
    stage2_min_per_class: int = 100
    # epochs of that refit: "trial" = the best trial's own; "max" = the top of epochs_range, the best validation
    # checkpoint kept (early stopping on) — the trunk trains as long as a single run would
    stage2_refit_epochs: Literal["trial", "max"] = "max"
    # trial 0 of stage 2 = the run config's own training values (the single-run defaults, clipped to the ranges):
    # the search starts from what a single run would do
    stage2_start_from_config: bool = True
    # workers (``python -m dact_lib worker --study <name>/stage2``, other processes or machines on the same
    # database) take stage-2 trials too: the budget is trials_stage2 slots any process takes. This process runs
    # at most this many of them (None: no limit; 0: none, it waits for the workers)
    stage2_local_trials: int | None = None
    # the same for stage 3's trials (``worker --study <name>/stage3``): halting fits of about a second each on the
    # trunk's cached outputs, which every worker computes once (one pass over the validation split)
    stage3_local_trials: int | None = None
    max_epochs: int = 50
    # guards: a stage's best model must beat the majority-class baseline by max(guard_margin, 2 standard errors
    # of the baseline on the validation rows), or the pipeline stops and says what to change
    guard_margin: float = 0.02
    guards: Literal["stop", "warn"] = "stop"  # "warn": record the failed guard (event, log) and go on
    # optionally fine-tune the final model end to end at the chosen point's λ (measured against the fitted point)
    final_finetune: bool = False
    finetune_epochs: int = 1
    # also train the run config as one single DACT run (what `train --kind dact` gives) and return it instead when
    # its validation point beats the pipeline's by the choice rule (single.py): never a model a single run beats
    single_run: bool = True
    # final model: time the exit-policy sweep (real early-exit passes) or only simulate it
    sweep_timed: bool = True

    # complexity: one check per setting, each with its own message: flat, read top to bottom
    def validate(self) -> "PipelineConfig":
        def bad(fld: str, value: Any, allowed: str) -> ConfigError:
            return ConfigError(f"pipeline.{fld} = {value!r} is invalid: {allowed}.")

        from ...config import check_types

        check_types(self, "pipeline")
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
        if not (_num(self.stage2_fraction) and 0 < self.stage2_fraction <= 1):
            raise bad("stage2_fraction", self.stage2_fraction, "expected a fraction of the training rows in (0, 1]")
        if self.stage2_refit_epochs not in ("trial", "max"):
            raise bad("stage2_refit_epochs", self.stage2_refit_epochs, "choose 'trial' or 'max'")
        for fld in ("stage2_local_trials", "stage3_local_trials"):
            v = getattr(self, fld)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise bad(fld, v, f"expected None (no limit) or an integer >= 0 (0: workers run every "
                                  f"stage-{fld[5]} trial)")
        if not isinstance(self.stage2_min_rows, int) or isinstance(self.stage2_min_rows, bool) \
                or self.stage2_min_rows < 1:
            raise bad("stage2_min_rows", self.stage2_min_rows, "expected an integer >= 1")
        from ...config import MAX_HEAD_WIDTH, MAX_SEED, check_int

        # ranges the code can take (a seed beyond 32 bits, a width of 10**9 ... were tracebacks, not messages)
        from ...config import MAX_COUNT, MAX_WEIGHT

        check_int("pipeline.stage2_min_per_class", self.stage2_min_per_class, 1, MAX_COUNT)
        if self.stage1_threads is not None:
            check_int("pipeline.stage1_threads", self.stage1_threads, 1, 512)
        for fld in ("lambda_high", "stage1_lambda"):
            if _num(getattr(self, fld)) and getattr(self, fld) > MAX_WEIGHT:
                raise bad(fld, getattr(self, fld), f"expected at most {MAX_WEIGHT:g}")
        check_int("pipeline.seed", self.seed, 0, MAX_SEED - 16)  # the stages' samplers take seed + 1 … + 3
        for fld in ("trials_stage1", "trials_stage2", "trials_stage3"):
            check_int(f"pipeline.{fld}", getattr(self, fld), 1, 100_000)
        for fld in ("stage1_epochs", "max_epochs", "finetune_epochs"):
            check_int(f"pipeline.{fld}", getattr(self, fld), 1, 10_000)
        check_int("pipeline.stage1_batch_size", self.stage1_batch_size, 1, 65_536)
        check_int("pipeline.min_steps", self.min_steps, 0, 10_000_000)
        check_int("pipeline.stage2_min_rows", self.stage2_min_rows, 1, MAX_COUNT)
        for w in self.widths:
            check_int("pipeline.widths", w, 1, MAX_HEAD_WIDTH)
        for b in self.batch_sizes:
            check_int("pipeline.batch_sizes", b, 1, 65_536)
        if self.timeout_min is not None and self.timeout_min > 60 * 24 * 366:
            raise bad("timeout_min", self.timeout_min, "expected at most a year of minutes (or None: no limit)")
        for fld in ("final_finetune", "sweep_timed", "search_share_weights", "stage3_thresholds", "single_run",
                    "stage2_start_from_config"):
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
            lo, hi = self.pair(fld)
            if not (0 < lo <= hi < 1):
                raise bad(fld, getattr(self, fld), "expected (low, high) with 0 < low <= high < 1 (log scale)")
        for fld in ("weight_decay_range", "warmup_range"):
            lo, hi = self.pair(fld)
            if not (0 <= lo <= hi and (fld != "warmup_range" or hi < 1)):
                raise bad(fld, getattr(self, fld), "expected (low, high) with 0 <= low <= high"
                          + (" < 1" if fld == "warmup_range" else ""))
        lo, hi = self.pair("epochs_range")
        if not (float(lo).is_integer() and float(hi).is_integer() and 1 <= lo <= hi <= 1000):
            raise bad("epochs_range", self.epochs_range, "expected integers (low, high) with 1 <= low <= high")
        if not self.batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                           for b in self.batch_sizes):
            raise bad("batch_sizes", self.batch_sizes, "expected a non-empty list of positive integers")
        return self

    def pair(self, fld: str) -> tuple[float, float]:
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
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs).validate()

    def study_names(self) -> dict[str, str]:
        return {s: f"{self.name}/{s}" for s in STAGES[:3]}


@dataclass
class PipelineResult:
    parent_run_id: int
    final_run_id: int | None
    stage_best: dict[str, dict]  # stage -> its best params (stage3: the chosen point's params)
    pareto: list[FrontPoint]  # the stage-3 front, sorted by average exit layer
    chosen: FrontPoint | None  # the front point picked by the choice rule (None before stage 3 has finished)
    study_names: dict[str, str]
    status: str = "finished"
    resumed_stages: list[str] = field(default_factory=list)  # stages taken from an earlier call (not re-run)
    feature_cache: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    exit_policy_sweep: list[dict] = field(default_factory=list)
    model_config: dict = field(default_factory=dict)  # the final DactModelConfig
    train_config: dict = field(default_factory=dict)  # the final TrainConfig

    def summary(self) -> dict[str, Any]:
        """What the job manager records in the parent run's summary."""
        return {"parent_run_id": self.parent_run_id, "final_run_id": self.final_run_id,
                "study_name": self.study_names.get("stage3")}
