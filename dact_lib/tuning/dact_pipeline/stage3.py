"""Stage 3 — the λ / τ front on ONE model: halting units fitted alone per trial on cached per-layer outputs; the front
and the choice rule."""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from .. import studies
from ...errors import ConfigError, DactLabError
from ...front import FrontPoint
from .record import counted
from .settings import CHOICE_RULES, FRONT_LAMBDA
from ... import events as ev


def trial_point(number: int | None, params: dict[str, Any], values: Sequence[float] | None,
                user_attrs: dict[str, Any], objective: str | None = None) -> FrontPoint:
    """A stage-3 trial as a front point: its λ or τ from its parameters, its numbers from its user attributes
    (the average exit layer from its second objective when they lack it); ``objective``: the first objective's
    name ("val_nll" or "val_error")."""
    got: dict[str, Any] = {**user_attrs, "trial": number, "params": dict(params), "objective": objective}
    if user_attrs.get("val_avg_exit_layer") is None and values is not None and len(values) > 1:
        got["val_avg_exit_layer"] = values[1]
    return FrontPoint.from_dict(got)


def point_record(t: FrozenTrial, objective3: str) -> FrontPoint:
    first = f"val_{'nll' if objective3 == 'loss' else 'error'}"
    return trial_point(t.number, t.params, t.values, t.user_attrs, first)


def _exit(p: FrontPoint) -> float:
    return p.val_avg_exit_layer if p.val_avg_exit_layer is not None else math.inf


def pareto_points(study: optuna.Study) -> list[FrontPoint]:
    """The stage-3 Pareto front (``study.best_trials``) as points, sorted by average exit layer then trial."""
    objective3 = study.user_attrs.get("objective3", "loss")
    pts = [point_record(t, objective3) for t in study.best_trials]
    return sorted(pts, key=lambda p: (_exit(p), p.trial))


def trial_points(study: optuna.Study) -> list[FrontPoint]:
    """Every complete stage-3 trial as a point (as :func:`pareto_points` makes them), by trial number."""
    objective3 = study.user_attrs.get("objective3", "loss")
    return [point_record(t, objective3) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def apply_choice_rule(front: list[FrontPoint], rule: str = "lowest_exit_within_1pt",
                      tolerance: float = 0.01, *, trials: list[FrontPoint] | None = None) -> FrontPoint:
    """Pick one point (see :class:`PipelineConfig` for the rules). ``trials``: every complete trial — the
    accuracy rule then measures "within 1 point" from the best accuracy of ANY trial and picks among all of them
    (with the NLL objective the most accurate trial can be off the NLL/exit front); without it, the front only."""
    if not front:
        raise DactLabError("The Pareto front is empty: stage 3 finished no trial (raise timeout_min or "
                           "trials_stage3).")
    if rule == "lowest_exit_within_1pt":
        pool = [p for p in (trials or front) if p.val_accuracy is not None] or front
        best_acc = max(p.val_accuracy if p.val_accuracy is not None else math.nan for p in pool)
        ok = [p for p in pool if p.val_accuracy is not None and p.val_accuracy >= best_acc - tolerance - 1e-12]
        return min(ok, key=lambda p: (_exit(p), -(p.val_accuracy or 0.0), p.trial))
    if rule == "best_objective":
        return min(front, key=lambda p: (_objective(p), _exit(p), p.trial))
    raise ConfigError(f"choice_rule = {rule!r} is invalid: choose one of {CHOICE_RULES}.")


def _objective(p: FrontPoint) -> float:
    v = p.objective_value()
    return v if v is not None else math.inf


ENGINE = "dact-pipeline/stage3"  # the study's "engine" attribute: what a worker (tuning/worker.py) runs
POLL_S = 2.0  # how often the pipeline looks at the trials other processes run


class Stage3Trials:
    """What one stage-3 trial needs, in the pipeline's process or in a worker's (``runner.worker_trials``
    rebuilds it from the pipeline's parent run): the best stage-2 model (the trunk, from its run folder), the
    cached per-layer outputs of the validation split, the halting kinds tried."""

    def __init__(self, pl, study: optuna.Study | None = None) -> None:
        from ...data import encode
        from ...halting import layer_cache, nll_ref_of

        self.pl, self.study, self.parent = pl, study, pl.parent
        self.trunk_id, loaded = pl.trunk()
        self.model = loaded.model
        self.cache = layer_cache(self.model, encode(pl.split.val, loaded.tokenizer, pl.cfg.data.max_seq_len))
        self.nll_ref = nll_ref_of(self.cache)
        self.kinds = ["fitted", "threshold"] if pl.pipe.stage3_thresholds and \
            self.model.cfg.halting_input == "confidence" else ["fitted"]
        self.parent_dir = pl.tracker.run_dir(pl.parent)
        self.logger = pl.trial_logger("stage3")

    def run_trial(self, trial: optuna.Trial) -> tuple[float, float]:
        """Fit (or set) one trial's halting units on the cached outputs; returns (objective, average exit)."""
        from ...halting import cross_fit_halting, point_metrics, threshold_state
        from ...models import save_halting_file

        pl, pipe, model = self.pl, self.pl.pipe, self.model
        pl.cancel.check()
        kind = trial.suggest_categorical("halting", self.kinds)
        crossed = False
        if kind == "fitted":
            # the units kept are fitted on every validation row; the numbers the choice reads are cross-fitted
            # (each fold's units measured on the rows they were not fitted on): the exit point is not chosen on
            # the noise the units fitted (docs/dact_maths.md, "Cross-fitting the halting points"). The parameter
            # is the halting fit's normalised λ (FRONT_LAMBDA), not the training λ
            fixed = (getattr(trial, "system_attrs", None) or {}).get("fixed_params") or {}
            name = "ponder_lambda" if "ponder_lambda" in fixed else FRONT_LAMBDA  # a slot of an older study
            lam = trial.suggest_float(name, pipe.lambda_low, pipe.lambda_high, log=True)
            [pt], crossed = cross_fit_halting(model, self.cache, [lam], epochs=model.cfg.halting_epochs,
                                              seed=pipe.seed, cancel=pl.cancel, nll=True)
            state, spec, fit_s = pt.state, pt.spec_lambda, pt.fit_s
        else:  # units set to a threshold τ: the DACT rule exits like entropy at τ·ln K (docs/dact_maths.md,
            # "Threshold units τ")
            tau = trial.suggest_float("tau", 0.01, 0.99)  # contains every τ of halting.THRESHOLDS
            state, spec, fit_s = threshold_state(model, tau), None, 0.0
        m = point_metrics(model, self.cache, state)
        seen = {}
        if crossed:
            seen = {"seen_val_accuracy": m["accuracy"], "seen_val_avg_exit_layer": m["avg_exit_layer"]}
            m = {"accuracy": pt.accuracy, "avg_exit_layer": pt.avg_exit_layer,
                 "nll": pt.nll if pt.nll is not None else m["nll"]}
        path = save_halting_file(self.parent_dir, f"trial_{trial.number}", state)
        attrs = {"val_accuracy": m["accuracy"], "val_nll": m["nll"], "val_avg_exit_layer": m["avg_exit_layer"],
                 "cross_fitted": crossed, **seen,
                 "train_lambda": spec, "fit_s": round(fit_s, 3), "run_id": self.trunk_id,
                 "halting_file": pl.tracker.rel_path(path)}  # under the artifacts root (runs/<parent>/…)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        obj = m["nll"] if pipe.objective3 == "loss" else 1.0 - m["accuracy"]
        return obj, m["avg_exit_layer"]

    def record(self, study: optuna.Study, frozen) -> dict[str, Any]:
        """A finished trial on the parent run (the pipeline's 'trial' event and stage-3 metrics)."""
        self.logger(study, frozen)
        return {"number": frozen.number, "state": frozen.state.name.lower(),
                "value": list(frozen.values) if frozen.values else None, "params": dict(frozen.params),
                "run_id": frozen.user_attrs.get("run_id"), "worker": frozen.user_attrs.get("worker"),
                "seconds": round(frozen.duration.total_seconds(), 3) if frozen.duration is not None else 0.0}


def run(pl) -> None:
    from safetensors.torch import load_file

    from ...halting import THRESHOLDS

    t0 = time.monotonic()
    budget = pl.budget.share("stage3")
    pipe = pl.pipe
    pl.start_stage("stage3", pipe.trials_stage3, budget)
    ctx = Stage3Trials(pl)
    trunk_id, nll_ref, kinds, model = ctx.trunk_id, ctx.nll_ref, ctx.kinds, ctx.model
    first = "val_nll" if pipe.objective3 == "loss" else "val_error"
    study = studies.create_study(
        pl.names["stage3"], directions=["minimize", "minimize"], home=pl.home,
        sampler=optuna.samplers.TPESampler(seed=pipe.seed + 3,
                                           n_startup_trials=min(pipe.trials_stage3, 8)),
        user_attrs={"pipeline": pipe.name, "stage": "stage3", "engine": ENGINE, "parent_run_id": pl.parent,
                    "objectives": [first, "val_avg_exit_layer"], "objective3": pipe.objective3,
                    "trunk_run_id": trunk_id, "nll_ref": nll_ref, "num_layers": model.num_layers,
                    "split": [len(pl.split.train), len(pl.split.val)],
                    "lambda_scale": "normalised: λ_spec = λ · nll_ref / N (dact.spec_lambda)",
                    "method": "halting units fitted alone per λ on the validation split (halting.fit_halting); "
                              "the objectives cross-fitted (halting.cross_fit_halting)"})
    ctx.study = study
    with warnings.catch_warnings():  # experimental in Optuna, read by optuna-dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([first, "val_avg_exit_layer"])
    # the budget as slots that this process and workers take (tuning/worker.py): a fresh study's first slots are
    # λ log-spaced over the range and the τ grid, the rest TPE's; a resumed stage adds the ones still missing
    fresh = not study.trials
    todo = pl.slots_to_add(study, pipe.trials_stage3)
    if fresh:
        k = min(pipe.trials_stage3, 12)
        lo, hi = math.log(pipe.lambda_low), math.log(pipe.lambda_high)
        for i in range(k):
            x = (lo + hi) / 2 if k == 1 else lo + (hi - lo) * i / (k - 1)
            lam = min(max(float(f"{math.exp(x):.4g}"), pipe.lambda_low), pipe.lambda_high)
            studies.enqueue_slots(study, 1, pl.parent, params={"halting": "fitted", FRONT_LAMBDA: lam})
        todo -= k
        if "threshold" in kinds:
            taus = THRESHOLDS[:max(0, min(len(THRESHOLDS), pipe.trials_stage3 - k))]
            for tau in taus:
                studies.enqueue_slots(study, 1, pl.parent, params={"halting": "threshold", "tau": tau})
            todo -= len(taus)
    studies.enqueue_slots(study, max(0, todo), pl.parent)

    pl.run_slotted(study, "stage3", ctx, pipe.stage3_local_trials, budget, POLL_S)
    front = pareto_points(study)
    chosen = apply_choice_rule(front, pipe.choice_rule, pipe.choice_tolerance, trials=trial_points(study))
    st2 = pl.state["stage2"]
    s2 = st2.get("trunk_val_accuracy", st2.get("best_user_attrs", {}).get("val_accuracy"))
    # one criterion with stage 2's: a loss objective judges the chosen point's (cross-fitted) NLL of a_N against
    # answering the class frequencies, the error objective its accuracy against the largest class
    guard = pl.guard("stage3", chosen.val_accuracy, previous=("stage2", s2), metrics={"val_nll": chosen.val_nll},
                     metric="val_nll" if pipe.objective3 == "loss" else "val_accuracy")
    # the chosen point's weights must load back (a damaged file fails here, not in the final stage)
    load_file(str(pl.tracker.abs_path(str(chosen.halting_file))))
    stored_front, stored_chosen = [p.to_dict() for p in front], chosen.to_dict()
    pl.tracker.log_event(pl.parent, ev.PARETO_FRONT, {"objectives": [first, "val_avg_exit_layer"],
                                                         "front": stored_front, "study_name": pl.names["stage3"]})
    pl.tracker.log_event(pl.parent, ev.RULE_CHOICE, {"rule": pipe.choice_rule,
                                                         "tolerance": pipe.choice_tolerance, "point": stored_chosen})
    pl.summary.update(front=stored_front, chosen=stored_chosen)
    pl.finish_stage("stage3", {"best_params": {FRONT_LAMBDA: chosen.front_lambda}, "front": stored_front,
                                 "chosen": stored_chosen, "objectives": [first, "val_avg_exit_layer"],
                                 "trunk_run_id": trunk_id, "nll_ref": nll_ref, "guard": guard,
                                 "n_trials": counted(study)}, time.monotonic() - t0)
