"""The final model: the stage-2 weights with the chosen halting units — or the single run, when its point beats
stage 3's (single.py) — saved as its own run; optional end-to-end fine-tune."""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import cast

import optuna

from .. import studies
from . import single
from .record import jsonable
from ...config import DactModelConfig
from ...front import FrontPoint
from ... import events as ev


def run(pl) -> None:
    """The final model: the stage-2 weights with the chosen stage-3 halting units, saved as its own run (every
    stage-3 point's halting file beside it, so any point can be chosen later without training) — or, when the
    single run's validation point beats the stage-3 choice by the choice rule (:func:`single.final_choice`, a
    ``final_choice`` event saying which won and why), the single run's model with its own halting units —
    evaluated on the validation and test splits; optionally fine-tuned end to end at the chosen λ and compared."""
    import shutil

    from safetensors.torch import load_file

    from ...data import encode
    from ...evaluate import evaluate_encoded, exit_policy_sweep, full_report, metrics_of
    from ...models import HALTING_DIR, MODEL_FILE, load_model, save_model
    from .stage3 import trial_points

    t0 = time.monotonic()
    pl.start_stage("final", None, pl.budget.share("final"))
    st3 = pl.state["stage3"]
    tr = pl.tracker
    study = optuna.load_study(study_name=pl.names["stage3"], storage=studies.storage(pl.home))
    # stage 3's point on the stage-2 model, or the single run when its point beats it by the rule (single.py)
    st_single = pl.state.get("single") or {}
    single_point = FrontPoint.from_dict(st_single["point"]) if st_single.get("point") else None
    decision = single.final_choice(FrontPoint.from_dict(st3["chosen"]), single_point, trial_points(study),
                                   pl.pipe.choice_rule, pl.pipe.choice_tolerance)
    tr.log_event(pl.parent, ev.FINAL_CHOICE, decision)
    from_single = decision["winner"] == single.SINGLE
    chosen: FrontPoint
    m: DactModelConfig
    if from_single and single_point is not None:  # the stage-2 model is not loaded: only its run id is recorded
        trunk_id = int(st3["trunk_run_id"])
        source_id = int(st_single["run_id"])
        loaded = load_model(tr.run_dir(source_id), device=str(pl.device))  # its own cross-fitted halting point
        model = loaded.model
        chosen = single_point
        m = copy.deepcopy(cast(DactModelConfig, model.cfg))
        train_cfg = copy.deepcopy(pl.single_cfg.train)
    else:
        trunk_id, loaded = pl.trunk()
        source_id = trunk_id
        chosen = FrontPoint.from_dict(st3["chosen"])
        model = loaded.model
        model.halters.load_state_dict(load_file(str(pl.tracker.abs_path(str(chosen.halting_file)))))
        m = copy.deepcopy(cast(DactModelConfig, model.cfg))
        # a fitted λ point's λ on the loss's scale becomes the run's training λ (docs/dact_maths.md, "Two scales of
        # λ"); a threshold point has none and keeps the training λ
        if chosen.train_lambda is not None:
            m.ponder_lambda = chosen.train_lambda
        train_cfg = pl.train_cfg()
    run_cfg = pl.child_config(m, train_cfg, f"{pl.pipe.name}/final", "final")
    rid = tr.create_run("dact", run_cfg.to_dict(), name=run_cfg.name, tag="final", parent_id=pl.parent,
                        dataset_id=pl.dataset_id, status="running")
    run_dir = tr.run_dir(rid)
    tr.update_run(rid, run_dir=str(run_dir))
    save_model(run_dir, model, loaded.tokenizer, run_cfg, loaded.label_maps)
    points = []
    for p in ([] if from_single else trial_points(study)):
        src = p.halting_file
        if src and pl.tracker.abs_path(src).is_file():
            (run_dir / HALTING_DIR).mkdir(exist_ok=True)
            name = f"{HALTING_DIR}/trial_{p.trial}.safetensors"
            shutil.copyfile(pl.tracker.abs_path(src), run_dir / name)
            points.append(FrontPoint(trial=p.trial, front_lambda=p.front_lambda, threshold=p.threshold,
                                     train_lambda=p.train_lambda, val_avg_exit_layer=p.val_avg_exit_layer,
                                     val_accuracy=p.val_accuracy, halting_file=name).to_dict())
    bs = max(run_cfg.train.batch_size, 64)
    enc_val = encode(pl.split.val, loaded.tokenizer, run_cfg.data.max_seq_len)
    val = metrics_of(evaluate_encoded(model, enc_val, bs, pl.device, run_cfg.train.precision), "val_")
    test, report = {}, {}
    if pl.split.test is not None and len(pl.split.test):
        enc_test = encode(pl.split.test, loaded.tokenizer, run_cfg.data.max_seq_len)
        res = evaluate_encoded(model, enc_test, bs, pl.device, run_cfg.train.precision)
        test, report = metrics_of(res, "test_"), full_report(res, loaded.label_maps)
    halting = {"chosen": dataclasses.replace(chosen.brief(), train_lambda=chosen.train_lambda).to_dict(),
               "points": points, "rows": len(pl.split.val), "split": "val",
               "source": "the pipeline's single run" if from_single else "pipeline stage 3",
               "tolerance_points": 100 * pl.pipe.choice_tolerance, "trunk_run_id": trunk_id,
               "final_choice": {k: decision[k] for k in ("winner", "why")}}
    built_from = {"single_run_id": source_id} if from_single else {"trunk_run_id": trunk_id,
                                                                   "stage3_trial": chosen.trial}
    from ...files import atomic_write_json

    atomic_write_json(run_dir / "report.json", jsonable(
        {"best": val, "test": test, "report": report, "history": [], "stop_reason": None,
         "halting": halting, "built_from": built_from}))
    tr.log_metrics(rid, {**val, **test}, step=0)
    for name, kind in ((MODEL_FILE, "model"), ("config.json", "config"), ("label_maps.json", "label_map"),
                       ("report.json", "report")):
        tr.add_artifact(rid, str(run_dir / name), kind)
    tr.set_status(rid, "finished", summary={"best": val, "test": test, "halting": halting,
                                            "built_from": built_from})
    tr.log_event(rid, ev.BUILT_FROM_PIPELINE, {"parent": pl.parent, **built_from, "points": len(points)})
    if test:
        guard = pl.guard("final", test.get("test_accuracy"), split="test", metrics=test,
                         metric=train_cfg.early_stopping.metric)  # the criterion the checkpoint was kept by
    else:
        guard = None
    finetune = pl.finetune(model, loaded, chosen, enc_val) if pl.pipe.final_finetune else None
    # timing runs every policy for real: only while the time budget lasts (else simulated, and said)
    timed = pl.pipe.sweep_timed and (pl.budget.left() is None or pl.budget.left() > 0)
    sweep = exit_policy_sweep(model, enc_val, batch_size=bs, timed=timed, deadline=pl.budget.deadline)
    payload = {"split": "val", "timed": timed, "num_layers": model.num_layers,
               "rows": sweep, "final_run_id": rid}
    if pl.pipe.sweep_timed and not timed:
        payload["untimed_because"] = "the pipeline's time budget (timeout_min) was used up"
    tr.log_event(pl.parent, ev.EXIT_POLICY_SWEEP, payload)
    tr.log_event(rid, ev.EXIT_POLICY_SWEEP, payload)
    # every front point is the final run + its halting file; when the single run won, they are stage 3's points on
    # the stage-2 model (its run), and the final model is the single run's
    front = [dataclasses.replace(FrontPoint.from_dict(p), run_id=trunk_id if from_single else rid).to_dict()
             for p in st3["front"]]
    final_chosen = dataclasses.replace(chosen, run_id=rid).to_dict()
    pl.summary.update(final_run_id=rid, final_test=test, exit_policy_sweep=sweep, front=front,
                      chosen=final_chosen, trunk_run_id=trunk_id,
                      final_source=decision["winner"], final_choice={k: decision[k] for k in ("winner", "why")})
    pl.finish_stage("final", {"final_run_id": rid, "test_metrics": test, "best_metrics": val,
                                "exit_policy_sweep": sweep, "guard": guard, "finetune": finetune,
                                "front": front, "chosen": final_chosen, "model": dataclasses.asdict(m),
                                "final_choice": decision,
                                "train": dataclasses.asdict(run_cfg.train)}, time.monotonic() - t0)


def finetune(pl, model, loaded, chosen: FrontPoint, enc_val) -> dict:
    """End-to-end fine-tuning of the final model at the chosen point's λ (on the loss's scale: docs/dact_maths.md,
    "Two scales of λ"), as a child run, measured
    against the fitted point on the validation split. The final model stays the fitted one."""
    m = copy.deepcopy(model.cfg)
    if chosen.train_lambda is not None:
        m.ponder_lambda = chosen.train_lambda
    m.fit_halting = False
    tc = copy.deepcopy(pl.train_cfg())
    tc.epochs = pl.pipe.finetune_epochs
    run_cfg = pl.child_config(m, tc, f"{pl.pipe.name}/finetune", "finetune")
    t0 = time.monotonic()
    res = pl.train_child(run_cfg, [], model=copy.deepcopy(model), tokenizer=loaded.tokenizer)
    out = {"run_id": res.run_id, "seconds": round(time.monotonic() - t0, 3),
           "fitted": {"val_accuracy": chosen.val_accuracy, "val_avg_exit_layer": chosen.val_avg_exit_layer},
           "finetuned": {k: res.best_metrics.get(k) for k in ("val_accuracy", "val_avg_exit_layer", "val_nll")}}
    pl.tracker.log_event(pl.parent, ev.FINETUNE_COMPARED, out)
    return out
