"""Multi-task defaults: per-task accuracy and macro-F1 of candidate defaults on both two-task sets.

Candidates (everything else = ``default_config("multitask")``):

* ``before`` — the defaults before this comparison: encoder lr 1e-5, head lr 1e-4, 3 epochs, patience 2;
* ``lr`` — the single-task learning rates: encoder 5e-5, head 1e-3;
* ``lr+balanced`` — ``lr`` with ``model.class_weighting = "balanced"`` (each task's loss weights class k by
  n / (K · n_k));
* ``lr+5ep`` — ``lr`` with 5 epochs under early stopping (patience 2).

Data: ``reviews_multitask`` (3,000 rows: 3 sources × 2 polarities) and ``airline_multitask`` (14,640 tweets:
6 airlines × 3 sentiments, imbalanced; ``--airline-rows`` stratified rows of it, default 4,000, to fit 2 cores),
each split 80/10/10 stratified with seed 0; bundled encoder; test-split metrics of the best validation checkpoint.

    .venv/bin/python bench/multitask_defaults.py                        # ~25 min on 2 cores
    .venv/bin/python bench/multitask_defaults.py --variants before,lr --max-rows 600   # smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa

SETS = {"reviews": "reviews_multitask/reviews.csv", "airline": "airline_multitask/tweets.csv"}
VARIANTS = {
    "before": {"train": {"encoder_lr": 1e-5, "head_lr": 1e-4, "epochs": 3}},
    "lr": {"train": {"encoder_lr": 5e-5, "head_lr": 1e-3, "epochs": 3}},
    "lr+balanced": {"train": {"encoder_lr": 5e-5, "head_lr": 1e-3, "epochs": 3},
                    "model": {"class_weighting": "balanced"}},
    "lr+5ep": {"train": {"encoder_lr": 5e-5, "head_lr": 1e-3, "epochs": 5}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--sets", default="reviews,airline")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--airline-rows", type=int, default=4000)
    ap.add_argument("--max-rows", type=int, default=None, help="rows of every set (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="multitask_defaults.json")
    args = ap.parse_args()
    set_threads(args.threads)
    from dact_lib.config import default_config
    from dact_lib.multitask import train_multitask
    from dact_lib.tracker import Tracker

    home = Path(tempfile.mkdtemp(prefix="dact_mt_bench_"))
    tr = Tracker(home)
    print(describe_machine(machine_info(args.threads)), flush=True)
    rows, out = [], {"machine": machine_info(args.threads), "runs": []}
    for name in args.sets.split(","):
        path = Path(args.data_dir) / SETS[name]
        if not path.is_file():
            print(f"{path} is absent: skipped.", file=sys.stderr)
            continue
        for variant in args.variants.split(","):
            cfg = default_config("multitask")
            cfg.data.path = str(path)
            cfg.data.max_rows = args.max_rows or (args.airline_rows if name == "airline" else None)
            cfg.train.num_threads = args.threads
            for section, values in VARIANTS[variant].items():
                for k, v in values.items():
                    setattr(getattr(cfg, section), k, v)
            cfg.name = f"{name}/{variant}"
            t0 = time.perf_counter()
            res = train_multitask(cfg.validate(), home=home, tracker=tr)
            seconds = time.perf_counter() - t0
            t = res.test_metrics
            epochs = max((h.get("epoch", 0) for h in res.history), default=0)
            row = {"set": name, "variant": variant, "seconds": seconds, "epochs": epochs,
                   "s_per_epoch": seconds / max(1, epochs)}
            for task, short in (("class_label", "class"), ("sentiment_label", "sentiment")):
                row[f"{short}_acc"] = t.get(f"test_accuracy/{task}")
                row[f"{short}_f1"] = t.get(f"test_macro_f1/{task}")
            rows.append(row)
            out["runs"].append({**row, "config": cfg.to_dict(), "test": t})
            save_json(args.out, out)
            print(f"{name} {variant}: {row}", flush=True)

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    table = [{**r, **{k: pct(r[k]) for k in ("class_acc", "class_f1", "sentiment_acc", "sentiment_f1")},
              "seconds": f"{r['seconds']:.0f}", "s_per_epoch": f"{r['s_per_epoch']:.0f}"} for r in rows]
    print(markdown_table(table, [("set", "set"), ("variant", "variant"), ("class_acc", "class acc %"),
                                 ("class_f1", "class macro-F1 %"), ("sentiment_acc", "sentiment acc %"),
                                 ("sentiment_f1", "sentiment macro-F1 %"), ("epochs", "epochs run"),
                                 ("s_per_epoch", "s / epoch"), ("seconds", "total s")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
