"""Is the staged pipeline ever worse than one single run? (issue 27: never a model the single default run beats.)

For each dataset (TREC-6: 6 classes; SST-2: 2), one process, bundled encoder, library defaults:

1. the default pipeline (``run_pipeline`` with ``PipelineConfig(name=...)``: the single-run
   candidate on, cross-fitted halting points, the per-class row floor of stage 2) on the training file (at most
   ``--max-rows``, a stratified sample; the pipeline splits validation and test off as a single run does);
2. read back, all on the SAME test rows: the single run it trained (= ``train --kind dact`` with no flags on that
   split), stage 3's own point (the stage-2 model with the halting units stage 3's rule chose — what the pipeline
   returned before the single run was a candidate), and the pipeline's final model (whichever won, and why);
3. whether the final model is dominated by the single run on test (less accurate AND later exits), and the wall
   time against ``timeout_min``.

    .venv/bin/python bench/pipeline_vs_single.py --max-rows 2000   # ~60 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, OUT_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa

DATASETS = {"trec6": "trec6/train.csv", "sst2": "sst2/train.csv"}


def test_point(tracker, run_id: int, halting_file: str | None = None) -> dict:
    """Test accuracy and average exit layer of a run's model (with another halting file swapped in)."""
    from safetensors.torch import load_file

    from dact_lib.data import encode
    from dact_lib.evaluate import evaluate_encoded, metrics_of
    from dact_lib.models import load_model
    from dact_lib.train import load_split
    from dact_lib.config import RunConfig

    run = tracker.get_run(run_id)
    loaded = load_model(tracker.run_dir(run_id), device="cpu")
    if halting_file:
        loaded.model.halters.load_state_dict(load_file(str(tracker.abs_path(halting_file))))
    cfg = RunConfig.from_dict(run["config"])
    split, _ = load_split(cfg, tracker, None)
    res = evaluate_encoded(loaded.model, encode(split.test, loaded.tokenizer, cfg.data.max_seq_len), 64, "cpu")
    m = metrics_of(res, "test_")
    return {"test_accuracy": m["test_accuracy"], "test_avg_exit_layer": m.get("test_avg_exit_layer"),
            "rows": len(split.test)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--timeout-min", type=float, default=None, help="default: none (the pipeline's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--home", default=str(OUT_DIR / "pipeline_vs_single_home"))
    args = ap.parse_args()
    set_threads(args.threads)
    import optuna

    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker
    from dact_lib.tuning.dact_pipeline import PipelineConfig, run_pipeline

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(describe_machine(machine_info(args.threads)), flush=True)
    tracker = Tracker(args.home)
    rows, out = [], {}
    for name in args.datasets:
        path = Path(args.data_dir) / DATASETS[name]
        if not path.is_file():
            print(f"{path} is absent: {name} skipped.", file=sys.stderr)
            continue
        cfg = default_config("dact")
        cfg.data.path, cfg.data.max_rows = str(path), args.max_rows
        cfg.validate()
        pipe = PipelineConfig(name=f"vs-single-{name}-{int(time.time())}", timeout_min=args.timeout_min).validate()
        t0 = time.monotonic()
        res = run_pipeline(cfg, pipeline=pipe, tracker=tracker)
        wall = time.monotonic() - t0
        parent = tracker.get_run(res.parent_run_id)
        summ = parent["summary"]
        rd = tracker.run_dir(res.parent_run_id)
        single = json.loads((rd / "single.json").read_text())
        st3 = json.loads((rd / "stage3.json").read_text())
        st2 = json.loads((rd / "stage2.json").read_text())
        s_test = test_point(tracker, int(single["run_id"]))
        p_test = test_point(tracker, int(st3["trunk_run_id"]), st3["chosen"]["halting_file"])
        f_test = test_point(tracker, int(res.final_run_id))
        dominated = (s_test["test_accuracy"] > f_test["test_accuracy"]
                     and s_test["test_avg_exit_layer"] < f_test["test_avg_exit_layer"])
        stage3_dominated = (s_test["test_accuracy"] > p_test["test_accuracy"]
                            and s_test["test_avg_exit_layer"] < p_test["test_avg_exit_layer"])
        row = {"dataset": name, "rows": args.max_rows, "test_rows": f_test["rows"],
               "single": f"{100 * s_test['test_accuracy']:.2f} % @ {s_test['test_avg_exit_layer']:.2f}",
               "stage3": f"{100 * p_test['test_accuracy']:.2f} % @ {p_test['test_avg_exit_layer']:.2f}",
               "final": f"{100 * f_test['test_accuracy']:.2f} % @ {f_test['test_avg_exit_layer']:.2f}",
               "winner": summ.get("final_source"), "dominated": "yes" if dominated else "no",
               "stage3_dominated": "yes" if stage3_dominated else "no",
               "trial_rows": f"{st2.get('trial_rows')}/{st2.get('train_rows')}",
               "wall_min": round(wall / 60, 1), "timeout_min": args.timeout_min}
        rows.append(row)
        out[name] = {"row": row, "why": summ.get("final_choice"), "single": s_test, "stage3": p_test,
                     "final": f_test, "parent_run_id": res.parent_run_id, "warnings": summ.get("warnings", [])}
        print(f"{name}: {row}", flush=True)
    cols = [("dataset", "dataset"), ("rows", "rows"), ("test_rows", "test rows"),
            ("single", "single run (test acc @ exit)"), ("stage3", "stage 3's point"),
            ("final", "pipeline's final"), ("winner", "winner (validation)"),
            ("dominated", "final dominated by single?"), ("stage3_dominated", "stage 3 dominated?"),
            ("trial_rows", "stage-2 trial rows"), ("wall_min", "wall min"), ("timeout_min", "timeout min")]
    print(markdown_table(rows, cols))
    for name, o in out.items():
        print(f"{name}: {o['why']}")
    save_json("pipeline_vs_single.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
