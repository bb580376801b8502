"""Does choosing the exit point on cross-fitted numbers pay on held-out rows? (issue 27)

For each trained DACT run given (``HOME:RUN`` pairs): its validation split (where the halting units are fitted) and
its test split (never seen by the fit nor the choice), the library's default halting sweep (``model.halting_lambdas``,
threshold units, the run's own settings), and the installed point chosen two ways with the run's tolerance:

* in-sample — every point measured on the rows its units were fitted on (what ``fit_after_training`` did before);
* cross-fitted — each point measured out of fold (2 stratified folds), the weights still fitted on every row
  (``halting.cross_fit_halting``, the default now);

each chosen point's TEST accuracy and average exit layer, against full depth (the deepest classifier) on the same
test rows: "drop" = full-depth test accuracy − the point's, in points.

    .venv/bin/python bench/halting_crossfit.py bench/out/deploy_home:2 bench/out/deploy_home:4 ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="HOME:RUN_ID of trained DACT runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    from dact_lib.config import RunConfig
    from dact_lib.data import encode
    from dact_lib.halting import (choose_point, cross_fit_halting, fit_halting, layer_cache, point_metrics,
                                  threshold_points)
    from dact_lib.models import load_model
    from dact_lib.tracker import Tracker
    from dact_lib.train import load_split

    print(describe_machine(machine_info(args.threads)), flush=True)
    rows = []
    for spec in args.runs:
        home, rid = spec.rsplit(":", 1)
        tr = Tracker(home)
        run = tr.get_run(int(rid))
        cfg = RunConfig.from_dict(run["config"])
        split, _ = load_split(cfg, tr, None)
        loaded = load_model(tr.run_dir(int(rid)), device="cpu")
        model, mc = loaded.model, cfg.model
        val = layer_cache(model, encode(split.val, loaded.tokenizer, cfg.data.max_seq_len))
        test = layer_cache(model, encode(split.test, loaded.tokenizer, cfg.data.max_seq_len))
        thr = threshold_points(model, val) if mc.halting_thresholds and mc.halting_input == "confidence" else []
        full = float((test.y[:, -1].argmax(-1) == test.targets).float().mean())
        inside = fit_halting(model, val, mc.halting_lambdas, epochs=mc.halting_epochs, seed=cfg.train.seed)
        crossed, ok = cross_fit_halting(model, val, mc.halting_lambdas, epochs=mc.halting_epochs,
                                        seed=cfg.train.seed)
        name = Path(str(cfg.data.path or run["name"])).parent.name or run["name"]
        for how, points in (("in-sample", inside), ("cross-fitted", crossed)):
            p = choose_point(points + thr, mc.halting_tolerance)
            m = point_metrics(model, test, p.state)
            kind = f"τ {p.threshold:g}" if p.threshold is not None else f"λ {p.lam:g}"
            rows.append({"dataset": name, "run": spec, "val_rows": len(val), "test_rows": len(test), "choice": how,
                         "point": kind, "val_acc": round(100 * p.accuracy, 2), "val_exit": round(p.avg_exit_layer, 2),
                         "test_acc": round(100 * m["accuracy"], 2), "test_exit": round(m["avg_exit_layer"], 2),
                         "full_depth_acc": round(100 * full, 2), "drop": round(100 * (full - m["accuracy"]), 2),
                         "layers": model.num_layers})
            print(rows[-1], flush=True)
        tr.close()
    print(markdown_table(rows, [("dataset", "dataset"), ("val_rows", "val rows"), ("test_rows", "test rows"),
                                ("choice", "choice on"), ("point", "point"), ("val_acc", "val acc (as judged)"),
                                ("val_exit", "val exit"), ("test_acc", "test acc"), ("test_exit", "test exit"),
                                ("full_depth_acc", "full depth test acc"), ("drop", "drop (pts)")]))
    save_json("halting_crossfit.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
