"""Training options of issue 26 (item 7), each measured once against the defaults on two shared datasets.

Variants (everything else = ``default_config(--kind)`` with the bundled encoder):

* ``default`` — the defaults (batch 32, fp32, no class weighting);
* ``accum4`` — ``train.grad_accum_steps = 4``: each batch of 32 in four micro-batches of 8 (the same gradient:
  only the time and the memory should differ);
* ``balanced`` — ``model.class_weighting = "balanced"`` (class k of the loss weighs n / (K · n_k));
* ``fp16`` — ``train.precision = "fp16"`` (autocast fp16 + GradScaler): CUDA only, a "skipped" row elsewhere.

Data: ``sms_spam`` (ham / spam, 87 / 13 %) and ``trec6`` (6 question types, the smallest 1.6 %), a stratified
``--max-rows`` sample of each (default 2,000), split 80/10/10 stratified with seed 0; ``--epochs`` (default 2)
under early stopping; one seed (0), so a difference of a point or two is within the seed-to-seed spread — and
``accum4`` differs from ``default`` only by its dropout masks (drawn per micro-batch); test-split accuracy and macro-F1 of the best validation checkpoint; wall seconds of the
whole run (tokenising, training, validation, test).

    .venv/bin/python bench/training_options.py                                   # ~12 min on 2 cores
    .venv/bin/python bench/training_options.py --max-rows 200 --variants default,accum4   # smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa

SETS = {"sms_spam": "sms_spam/sms.csv", "trec6": "trec6/train.csv", "sst2": "sst2/train.csv"}
VARIANTS = {
    "default": {},
    "accum4": {"train": {"grad_accum_steps": 4}},
    "balanced": {"model": {"class_weighting": "balanced"}},
    "fp16": {"train": {"precision": "fp16"}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--sets", default="sms_spam,trec6")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--kind", default="backbone", choices=("backbone", "dact"))
    ap.add_argument("--max-rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="training_options.json")
    args = ap.parse_args()
    set_threads(args.threads)
    import torch

    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker
    from dact_lib.train import train

    home = Path(tempfile.mkdtemp(prefix="dact_options_bench_"))
    tr = Tracker(home)
    print(describe_machine(machine_info(args.threads)), flush=True)
    warm = default_config(args.kind)  # a few steps first, so the first variant pays no one-time start-up cost
    warm.train.max_steps, warm.train.num_threads, warm.data.max_rows = 3, args.threads, 300
    train(warm.validate(), home=home, save=False)
    rows, out = [], {"machine": machine_info(args.threads), "args": vars(args), "runs": []}
    for name in args.sets.split(","):
        path = Path(args.data_dir) / SETS[name]
        if not path.is_file():
            print(f"{path} is absent: skipped.", file=sys.stderr)
            continue
        base = None
        for variant in args.variants.split(","):
            row = {"set": name, "variant": variant}
            if variant == "fp16" and not torch.cuda.is_available():
                rows.append({**row, "note": "skipped: fp16 is CUDA only"})
                print(f"{name} {variant}: skipped (no CUDA)", flush=True)
                continue
            cfg = default_config(args.kind)
            cfg.data.path = str(path)
            cfg.data.max_rows = args.max_rows
            cfg.train.epochs = args.epochs
            cfg.train.num_threads = args.threads
            for section, values in VARIANTS[variant].items():
                for k, v in values.items():
                    setattr(getattr(cfg, section), k, v)
            cfg.name = f"{name}/{variant}"
            t0 = time.perf_counter()
            res = train(cfg.validate(), home=home, tracker=tr)
            seconds = time.perf_counter() - t0
            t = res.test_metrics
            row.update(acc=t.get("test_accuracy"), f1=t.get("test_macro_f1"), seconds=seconds, note="")
            if variant == "default":
                base = row
            if base is not None and variant != "default":
                row.update(d_acc=row["acc"] - base["acc"], d_f1=row["f1"] - base["f1"],
                           time_ratio=seconds / base["seconds"])
            rows.append(row)
            out["runs"].append({**row, "config": cfg.to_dict(), "test": t})
            save_json(args.out, out)
            print(f"{name} {variant}: {row}", flush=True)

    def pct(v, signed=False):
        return "—" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")

    table = [{"set": r["set"], "variant": r["variant"], "acc": pct(r.get("acc")), "f1": pct(r.get("f1")),
              "d_acc": pct(r.get("d_acc"), True), "d_f1": pct(r.get("d_f1"), True),
              "seconds": f"{r['seconds']:.0f}" if "seconds" in r else "—",
              "time_ratio": f"{r['time_ratio']:.2f}×" if "time_ratio" in r else "—", "note": r.get("note", "")}
             for r in rows]
    print(markdown_table(table, [("set", "set"), ("variant", "variant"), ("acc", "test acc %"),
                                 ("f1", "test macro-F1 %"), ("d_acc", "Δ acc (pts)"), ("d_f1", "Δ macro-F1 (pts)"),
                                 ("seconds", "wall s"), ("time_ratio", "time vs default"), ("note", "note")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
