"""The staged DACT tuning pipeline (docs/dact_maths.md and README "Staged DACT tuning").

One module per concept: ``settings`` (PipelineConfig, PipelineResult), ``stage1`` … ``stage3``, ``single`` and
``final`` (one stage each, with its search space), ``guards`` (the majority-class checks), ``choice`` (choosing a stage-3 point
later), ``record`` (the parent run, stage files, resume, :func:`load_pipeline_result`) and ``runner``
(:func:`run_pipeline`). This package re-exports the public surface.

:func:`run_pipeline` runs five stages under one *parent* run (tracker kind ``"dact-pipeline"``, name =
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
   (:func:`dact_lib.halting.fit_halting`, seconds per trial; the trial's objectives, accuracy and exit are
   CROSS-FITTED — each of 2 stratified folds' units measured on the other fold — so the point is not chosen on
   the rows its units fitted; the in-sample numbers are ``seen_val_*``): λ log-uniform in [lambda_low, lambda_high] on the
   normalised scale (λ_spec = λ·NLL_ref/N); with ``stage3_thresholds`` a trial may instead set the units to a
   confidence threshold τ (:func:`dact_lib.halting.threshold_state`). The first trials are λ log-spaced over the
   range and the τ grid, then the seeded multi-objective TPE sampler. Each trial's halting weights are a small
   file (``runs/<parent>/halting/trial_<n>.safetensors``; user attr ``halting_file``); user attrs ``run_id`` (the
   stage-2 model), ``val_accuracy``, ``val_nll``, ``val_avg_exit_layer``, ``spec_lambda``. The default point is
   picked by ``choice_rule``; :func:`choose_point` / :func:`choose_for_prediction` pick another later.
4. **Single run** (``single``, child run tag ``single``; ``single_run=False`` skips it): the run config trained
   once as ``train --kind dact`` would (exit refit and cross-fitted halting fit included) on the same split — a
   candidate of the final choice, so the pipeline never returns a model this run beats on validation.
5. **Final** (child run kind ``dact``, tag ``final``, no training): :func:`single.final_choice` — stage 3's point
   or the single run, by the choice rule over both, recorded as a ``final_choice`` event (winner and why) — then
   the stage-2 weights with the chosen halting units (or the single run's model with its own), saved as a run with every stage-3 point's halting file beside it (``halting/``), evaluated on the
   validation and test splits; the exit-policy sweep on the validation split (DACT vs patience vs entropy vs fixed
   depth over the same weights) goes to a parent event and the summary. ``final_finetune`` also fine-tunes that
   model end to end at the chosen λ (child run ``finetune``) and records it against the fitted point.

**Guards.** Each stage compares its best model with the majority-class baseline (validation; the final model on
test) and with the stage before: ``guard`` events; a model not better than the baseline by max(``guard_margin``,
2 standard errors) records ``guard_failed`` and stops the pipeline with :class:`PipelineGuardError`, whose message
says what to change (``guards="warn"``: recorded, and it goes on). One criterion: stage 2's model, restored by its
early-stopping metric (``val_loss``), is judged by its validation NLL against answering the class frequencies; the
others by accuracy against always answering the largest class.

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

**Time budget.** ``timeout_min`` is a wall for one call: at the start of each stage the remaining time is split
over the stages still to run in the ratio stage1 : stage2 : stage3 : single : final = 1 : 8 : 1 : 3 : 1; the share
bounds the stage's trials (no trial starts after it) and every training in it runs under ``train.time_limit_min``
= what is left of it (it stops there with its best checkpoint; the exit refit starts no epoch after it). Stage 2
gives its trials half its share when the best parameters are trained again on every row; the refit gets the rest,
or is skipped — said in an event and the summary's ``warnings`` — when that is under a quarter of its estimate (the
best trial's own model is then the trunk). Past the wall the exit-policy sweep is simulated, not timed (said). **Cancellation**: the token is checked between trials, every stage-1 epoch and every
training step; the parent is then recorded 'cancelled' and :class:`~dact_lib.errors.Cancelled` is raised.
"""
from __future__ import annotations

from .choice import load_stage3, choose_for_prediction, choose_point  # noqa: F401
from .guards import PipelineGuardError, guard_margin, majority_baseline
from .record import load_pipeline_result
from .runner import as_dact_config, run_engine, run_pipeline  # noqa: F401
from .settings import (CHOICE_RULES, LAYOUT_CHOICES, OBJECTIVES3, PIPELINE_KIND, STAGES,  # noqa: F401
                       PipelineConfig, PipelineResult)
from .stage1 import FeatureDactHeads, HeadFit, fit_heads_on_features, model_from_params, suggest_architecture
from .stage2 import suggest_training, train_from_params
from .stage3 import point_record, apply_choice_rule, pareto_points, trial_points  # noqa: F401

__all__ = ["PipelineConfig", "PipelineResult", "run_pipeline", "choose_point", "choose_for_prediction",
           "load_pipeline_result", "pareto_points", "trial_points", "apply_choice_rule", "as_dact_config",
           "FeatureDactHeads", "fit_heads_on_features", "HeadFit", "model_from_params", "suggest_architecture",
           "suggest_training", "train_from_params", "PIPELINE_KIND", "STAGES", "CHOICE_RULES", "PipelineGuardError",
           "majority_baseline", "guard_margin"]
