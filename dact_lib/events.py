"""The kinds of the events a run records (``Tracker.log_event`` / ``Callback.on_event``), one named constant
each. The values are what experiments.db stores: never change one (old records would no longer be read)."""
from __future__ import annotations

# --- the training loop (every run) -------------------------------------------------------------------------------
PHASE = "phase"  # what a run does before its first step: loading the encoder, tokenising N rows, training
START = "start"  # the loop starts: rows, steps planned
CHECKPOINT = "checkpoint"  # a new best validation metric, weights saved
EARLY_STOP = "early_stop"
TIME_LIMIT = "time_limit"
RESTORED_BEST = "restored_best"
UNFREEZE = "unfreeze"  # gradual unfreezing opened more encoder layers
OOM_RETRY = "oom_retry"  # the batch-size manager halved the batch after running out of memory
WARNING = "warning"
RESUMED = "resumed"  # a run (or pipeline, PBT population) continued from its checkpoints / stage files
CANCELLED = "cancelled"
HALTING_FIT = "halting_fit"  # halting units fitted per λ after a DACT training
EXIT_REFIT = "exit_refit"  # the classifiers of layers 1..N-1 trained again on cached summaries after a DACT training
BUILT_FROM_PIPELINE = "built_from_pipeline"
REPORTED_TO = "reported_to"  # where a train.report_to tool (MLflow, W&B, TensorBoard) reports the run

# --- jobs ---------------------------------------------------------------------------------------------------------
JOB_SUBMITTED = "job_submitted"
JOB_ERROR = "job_error"
JOB_PROCESS = "job_process"  # the worker process that runs a job started: pid, torch threads, its log file

# --- Optuna studies (backbone tuning, the pipeline's stages) ---------------------------------------------------------
STUDY = "study"  # a run linked to its Optuna study
TRIAL = "trial"  # one finished trial: number, state, params, values
TIMEOUT = "timeout"  # the time budget ended a study early

# --- the DACT pipeline ----------------------------------------------------------------------------------------------
PIPELINE_START = "pipeline_start"
PIPELINE_END = "pipeline_end"
RESUMES = "resumes"  # a job's run that continues an earlier pipeline of the same name
STAGE_START = "stage_start"
STAGE_END = "stage_end"
STAGE_TRIALS = "stage_trials"
STAGE1_FEATURES = "stage1_features"  # the feature cache stage 1 trained on
STAGE2_REFIT = "stage2_refit"  # the best stage-2 parameters trained on every row
GUARD = "guard"
GUARD_FAILED = "guard_failed"
PARETO_FRONT = "pareto_front"
EXIT_POLICY_SWEEP = "exit_policy_sweep"
FINETUNE_COMPARED = "finetune_compared"
# three kinds of "a point was chosen", which must not be confused:
FINAL_CHOICE = "final_choice"  # the final model: stage 3's point or the single run, which won and why
RULE_CHOICE = "chosen_point"  # the pipeline's choice rule picked this stage-3 point (never the user's)
USER_POINT_CHOICE = "point_chosen"  # a user chose a front point (choose_point)
PREDICTION_CHOICE = "chosen"  # the model (run, halting file) a user chose for prediction on the Pareto explorer

# --- PBT --------------------------------------------------------------------------------------------------------------
PBT_START = "pbt_start"
PBT_THREADS = "pbt_threads"
PBT_SCHEDULE = "pbt_schedule"
PBT_EXPLOIT = "pbt_exploit"
PBT_EXPLORE = "pbt_explore"
PBT_MEMBER_FAILED = "pbt_member_failed"
PBT_REPLAY_CHANGE = "pbt_replay_change"

#: every kind above
ALL = tuple(v for k, v in sorted(globals().items()) if k.isupper() and isinstance(v, str))
