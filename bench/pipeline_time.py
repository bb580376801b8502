"""How long does the default staged DACT pipeline take on SST-2, and what does it buy?

One process, in this order (2 torch threads, bundled encoder, library defaults):

1. the default pipeline (``run_pipeline`` with ``PipelineConfig(name=...)`` and nothing else) on SST-2 train
   (6,920 rows; the pipeline splits validation and test off as it always does: 10 % each, stratified, seed 0):
   wall time per stage and in total, the final model's test accuracy and average exit layer, the λ front;
2. beside it, the seed's way, from the per-trial times measured in step 1: stage 1 with the encoder in the loop
   (every trial and epoch runs the frozen encoder over train + validation = the measured feature-cache build time
   per pass), stage 2 without pruning (each pruned trial's remaining epochs at its own measured epoch time), stage 3
   as one full training per λ (the seed's 10 trials) and one more final training (each = the best stage-2 trial's
   measured time);
3. a single default DACT run (``train --kind dact``, no flags) on the same split: test accuracy, average exit.

    .venv/bin/python bench/pipeline_time.py                    # ~30 min on 2 cores
    .venv/bin/python bench/pipeline_time.py --max-rows 800     # smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa


def non_dominated(points):
    pts = {(round(p.val_avg_exit_layer, 6), round(p.val_accuracy, 6)) for p in points}
    return sorted(p for p in pts if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in pts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--home", default=None, help="DACT Lab home for the runs (default: a temporary folder)")
    ap.add_argument("--out", default="pipeline_time.json")
    ap.add_argument("--skip-single", action="store_true")
    args = ap.parse_args()
    train_csv = Path(args.data_dir) / "sst2" / "train.csv"
    if not train_csv.is_file():
        print(f"{train_csv} is absent: nothing to measure.", file=sys.stderr)
        return 0
    set_threads(args.threads)
    import optuna

    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker
    from dact_lib.train import train
    from dact_lib.tuning.dact_pipeline import PipelineConfig, run_pipeline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    home = Path(args.home or tempfile.mkdtemp(prefix="dact_pipeline_bench_"))
    print(describe_machine(machine_info(args.threads)), flush=True)
    cfg = default_config("dact")
    cfg.data.path = str(train_csv)
    cfg.data.max_rows = args.max_rows
    cfg.train.num_threads = args.threads
    cfg.validate()
    pipe = PipelineConfig(name=f"bench-{int(time.time())}").validate()
    tr = Tracker(home)
    t0 = time.perf_counter()
    res = run_pipeline(cfg, pipeline=pipe, home=home, tracker=tr)
    total = time.perf_counter() - t0
    events = tr.get_events(res.parent_run_id)
    stage_s = {e["payload"]["stage"]: e["payload"]["seconds"] for e in events if e["kind"] == "stage_end"}
    trials = [e["payload"] for e in events if e["kind"] == "trial"]
    feat = next(e["payload"] for e in events if e["kind"] == "stage1_features")
    s2 = [t for t in trials if t["stage"] == "stage2"]
    print(f"pipeline {total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_s.items()), flush=True)

    # the seed's way, from the measured times
    splits = feat["splits"]
    pass_s = sum(i["build_s"] for part in splits.values() for i in part.values()) / max(1, len(pipe.poolings))
    seed_stage1 = stage_s["stage1"] + pipe.trials_stage1 * pipe.stage1_epochs * pass_s
    children = {r["id"]: r for r in tr.list_runs(parent_id=res.parent_run_id)}
    per_epoch, unpruned = [], 0.0
    for t in s2:
        rid = (t.get("user_attrs") or {}).get("run_id")
        run = children.get(rid)
        dur = t.get("duration_s") or 0.0
        m = tr.get_metrics(rid) if rid is not None else None
        done_epochs = int(m[m.name == "val_loss"].shape[0]) if m is not None and len(m) else 1
        want = (t.get("user_attrs") or {}).get("epochs_run") or t["params"].get("epochs", 1)
        ep = dur / max(1, done_epochs)
        per_epoch.append(ep)
        unpruned += ep * max(want, done_epochs) if t["state"] == "pruned" else dur
        t["done_epochs"], t["run_status"] = done_epochs, (run or {}).get("status")
    st2 = json.loads((tr.run_dir(res.parent_run_id) / "stage2.json").read_text())
    # trials on a fraction of the rows: the seed trained every trial on all of them (time ∝ rows × epochs)
    scale = st2.get("train_rows", 1) / max(1, st2.get("trial_rows") or st2.get("train_rows", 1))
    unpruned *= scale
    best_s2 = next((t for t in s2 if t["number"] == st2["best_trial"]), s2[0])
    refit = st2.get("refit")
    # one full training at the best parameters: the refit when there is one (measured), else the best trial
    full_training = refit["seconds"] if refit else (best_s2.get("duration_s") or 0.0)
    seed_stage3 = 10 * full_training
    seed_final = full_training
    seed_total = seed_stage1 + unpruned + seed_stage3 + seed_final
    front = non_dominated(res.pareto)
    out = {"machine": machine_info(args.threads), "rows": args.max_rows or 6920, "total_s": total,
           "stage_s": stage_s, "stage2": st2, "seed": {"stage1_s": seed_stage1, "stage2_unpruned_s": unpruned,
                                         "stage3_s": seed_stage3, "final_s": seed_final, "total_s": seed_total},
           "stage2_trials": s2, "test": res.test_metrics, "chosen": res.chosen.to_dict() if res.chosen else None,
           "front": [p.to_dict() for p in res.pareto],
           "front_non_dominated": front, "pipeline": pipe.to_dict()}
    save_json(args.out, out)

    single = None
    if not args.skip_single:
        c = default_config("dact")
        c.data.path, c.data.max_rows, c.train.num_threads = str(train_csv), args.max_rows, args.threads
        t1 = time.perf_counter()
        r = train(c.validate(), home=home, tracker=tr)
        single = {"seconds": time.perf_counter() - t1, "test": r.test_metrics, "run_id": r.run_id}
        out["single"] = single
        save_json(args.out, out)

    rows = [{"what": "stage 1 (cached features)", "this": f"{stage_s['stage1']:.0f} s",
             "seed": f"{seed_stage1:.0f} s (encoder in the loop: {pipe.trials_stage1}×{pipe.stage1_epochs} passes "
                     f"of {pass_s:.1f} s)"},
            {"what": f"stage 2 ({len(s2)} trials on {st2.get('trial_rows')} of {st2.get('train_rows')} rows, pruner "
                     f"{pipe.stage2_pruner}" + (f", then the best params on all rows: {refit['seconds']:.0f} s)"
                                                 if refit else ")"),
             "this": f"{stage_s['stage2']:.0f} s",
             "seed": f"{unpruned:.0f} s (every trial on all rows (×{scale:.2f} the measured trial time), no "
                     f"pruning: {sum(t['state'] == 'pruned' for t in s2)} pruned trials run out)"},
            {"what": f"stage 3 ({pipe.trials_stage3} halting fits on one model)", "this": f"{stage_s['stage3']:.0f} s",
             "seed": f"{seed_stage3:.0f} s (10 trainings of {full_training:.0f} s)"},
            {"what": "final", "this": f"{stage_s['final']:.0f} s", "seed": f"{seed_final:.0f} s (one more training)"},
            {"what": "**total**", "this": f"**{total:.0f} s = {total / 60:.1f} min**",
             "seed": f"**{seed_total:.0f} s = {seed_total / 60:.1f} min** ({seed_total / total:.1f}× this)"}]
    print(markdown_table(rows, [("what", "stage"), ("this", "this pipeline (measured)"),
                                ("seed", "the seed's way (from measured per-trial times)")]))
    t = res.test_metrics
    print(f"\nfinal model: test accuracy {100 * t.get('test_accuracy', float('nan')):.2f}%, average exit "
          f"{t.get('test_avg_exit_layer', float('nan')):.2f} layers; chosen point trial {res.chosen.trial} "
          f"({'τ = %s' % res.chosen.threshold if res.chosen.threshold is not None else 'λ̃ = %s' % res.chosen.front_lambda}); "
          f"{len(front)} distinct non-dominated points on the validation front")
    if single:
        st = single["test"]
        print(f"single default DACT run: test accuracy {100 * st.get('test_accuracy', float('nan')):.2f}%, average "
              f"exit {st.get('test_avg_exit_layer', float('nan')):.2f} layers, {single['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
