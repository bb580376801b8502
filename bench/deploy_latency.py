"""Take the cheap model out: what a user gets once the model leaves DACT Lab — one table per dataset.

For SST-2 (train -> dev) and AG News (its one file split 80/20 stratified, seed 0, as in early_exit_suite.py):

1. ``--train``: a plain reference (kind "backbone") and a DACT model (kind "dact"), each with the library's defaults
   — ``dact-lab train --kind K --data TRAIN`` with the evaluation file as the run's test split and the same
   ``--epochs`` for both — into ``--home`` (default bench/out/deploy_home); the run ids go to runs.json there.
2. measure (the default): every row exported the way a user would (``dact-lab export --format onnx [--int8]``),
   in one process:

   * reference — PyTorch eager fp32 / ONNX Runtime fp32 / ONNX Runtime int8 (one graph);
   * DACT at the run's chosen point (its installed halting units, the DACT rule) — PyTorch (``DactBert.infer``,
     the batch-1 fast path) / exported fp32 / exported int8 (per-layer graphs, the torch-free runtime);
   * columns: accuracy and average exit on the whole evaluation split, batch-1 latency (1 thread, every row
     interleaved per sentence on a seeded sample, median and p90), batch-32 throughput (sentences/s over the
     sample, 1 thread), export time, load-to-first-answer time (a fresh runtime object: load + one sentence);
   * ratios: speed-up vs PyTorch eager fp32 and vs ONNX Runtime int8 (the thing a user would pick instead).

    .venv/bin/python bench/deploy_latency.py --train --epochs 1            # trains 4 models (~15 min on 2 cores)
    .venv/bin/python bench/deploy_latency.py --latency-rows 300            # the table (docs/benchmarks.md)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {"sst2": ("sst2/train.csv", "sst2/dev.csv"), "ag_news": ("ag_news/test.csv", None)}
KINDS = ("backbone", "dact")


def data_files(name: str, data_dir: Path, home: Path) -> tuple[Path, Path]:
    """(train CSV, evaluation CSV); AG News is split 80/20 (stratified, seed 0) into the bench home."""
    tr, ev = DATASETS[name]
    if ev is not None:
        return data_dir / tr, data_dir / ev
    from dact_lib.data import read_csv, split_dataset

    out = home / "data" / name
    train_csv, eval_csv = out / "train.csv", out / "eval.csv"
    if not (train_csv.is_file() and eval_csv.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        parts = split_dataset(read_csv(data_dir / tr, seed=0), val_frac=0.2, test_frac=0.0, seed=0)
        train_csv.write_bytes(parts.train.to_csv_bytes())
        eval_csv.write_bytes(parts.val.to_csv_bytes())
    return train_csv, eval_csv


def train_all(args) -> None:
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    runs_file = home / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    for name in args.datasets:
        train_csv, eval_csv = data_files(name, Path(args.data_dir), home)
        for kind in KINDS:
            key = f"{name}/{kind}"
            if key in runs and not args.retrain:
                continue
            cfg = {"kind": kind, "data": {"path": str(train_csv), "test_path": str(eval_csv), "test_frac": 0.0},
                   "train": {"epochs": args.epochs}}
            cfg_file = home / f"{name}_{kind}.json"
            cfg_file.write_text(json.dumps(cfg))
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "dact_lib", "train", "--config", str(cfg_file),
                                  "--home", str(home), "--verbosity", "0", "--run-name", key],
                                 cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"training {key} failed:\n{out.stderr[-3000:]}")
            run_id = int(out.stdout.strip().splitlines()[-1].split(":")[-1])
            runs[key] = {"run": run_id, "train_s": time.perf_counter() - t0, "epochs": args.epochs}
            runs_file.write_text(json.dumps(runs, indent=1))
            print(f"{key}: run {run_id} in {runs[key]['train_s']:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------- measuring
def pct(xs: list[float], q: float) -> float:
    from dact_lib.evaluate import quantile_of  # the library's percentile (the latency budget uses it too)

    return quantile_of(xs, q)


class Row:
    """One thing measured: ``one(text)`` answers one sentence, ``many(texts)`` a batch, ``full(texts)`` the whole
    evaluation split (labels, exit layers)."""

    def __init__(self, name, one, many, export_s=None, first_s=None):
        self.name, self.one, self.many = name, one, many
        self.export_s, self.first_s = export_s, first_s
        self.lat: list[float] = []


def torch_rows(run_dir: Path, kind: str, args):
    import torch

    from dact_lib.models import load_model

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loaded = load_model(run_dir, device="cpu")
    tok, model = loaded.tokenizer, loaded.model
    max_len = loaded.config.data.max_seq_len

    @torch.no_grad()
    def one(text):
        enc = tok([text], truncation=True, max_length=max_len, return_tensors="pt")
        if kind == "dact":
            return int(model.infer(enc["input_ids"], enc["attention_mask"], trace=False).exit_layer[0])
        model(enc["input_ids"], enc["attention_mask"])
        return model_layers(loaded)

    one(args.probe_text)
    first = time.perf_counter() - t0

    from dact_lib.deploy.predictor import from_loaded

    pred = from_loaded(loaded)

    def many(texts):  # batches of 32 sorted by length, the untraced early-exit path
        return pred.predict(texts, batch_size=32)

    return Row("PyTorch eager fp32", one, many, None, first), loaded


def model_layers(loaded) -> int:
    from dact_lib.encoders import layer_adapter

    return layer_adapter(loaded.model.encoder).num_layers


def onnx_row(run_dir: Path, out_dir: Path, int8: bool, args, policy: str | None = None, label: str = ""):
    from dact_lib.deploy.export import export_model
    from dact_lib.deploy.runtime import OnnxModel

    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    export_model(str(run_dir), out_dir, fmt="onnx", int8=int8, policy=policy)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = OnnxModel(out_dir, int8=int8, threads=1)
    m.predict([args.probe_text])
    first = time.perf_counter() - t0

    def one(text):
        return m.predict([text])[0].get("exit_layer")

    def many(texts):
        return m.predict(texts, batch_size=32)

    return Row(f"ONNX Runtime {'int8' if int8 else 'fp32'}{label}", one, many, export_s, first), m


def accuracy_of(preds: list[dict], gold: list[str]) -> tuple[float, float | None]:
    acc = sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold)
    exits = [p["exit_layer"] for p in preds if "exit_layer" in p]
    return acc, (sum(exits) / len(exits) if exits else None)


def measure(name: str, args) -> list[dict]:
    from dact_lib.data import read_csv

    home = Path(args.home)
    runs = json.loads((home / "runs.json").read_text())
    _, eval_csv = data_files(name, Path(args.data_dir), home)
    ev = read_csv(eval_csv)
    task = ev.tasks[0]
    gold = [ev.label_maps[task][int(t)] for t in ev.targets[task]]
    texts = list(ev.texts)
    rng = random.Random(0)
    sample = rng.sample(texts, min(args.latency_rows, len(texts)))
    rows: list[tuple[str, Row]] = []
    for kind in KINDS:
        run_dir = home / "runs" / str(runs[f"{name}/{kind}"]["run"])
        tr, _ = torch_rows(run_dir, kind, args)
        rows.append((kind, tr))
        for int8 in (False, True):
            r, _ = onnx_row(run_dir, home / "export" / f"{name}_{kind}_{'int8' if int8 else 'fp32'}", int8, args)
            rows.append((kind, r))
    # the fastest exit point within 1 point of the reference on the VALIDATION split, measured on int8 (the
    # latency budget's front: deploy/budget.py), exported with that policy — chosen without the evaluation split
    from dact_lib.deploy.budget import measure_front

    dact_dir = home / "runs" / str(runs[f"{name}/dact"]["run"])
    ref_val = json.loads((home / "runs" / str(runs[f"{name}/backbone"]["run"]) / "report.json").read_text())[
        "best"]["val_accuracy"]
    front = measure_front(dact_dir, runtime="onnx", int8=True, latency_rows=60)
    ok = [p for p in front if p["accuracy"] >= ref_val - 0.01]
    tol = min(ok, key=lambda p: p["latency_ms_p50"]) if ok else max(front, key=lambda p: p["accuracy"])
    print(f"{name}: reference val {ref_val:.4f}; fastest int8 point within 1 pt on validation: {tol}", flush=True)
    r, _ = onnx_row(dact_dir, home / "export" / f"{name}_dact_int8_tol", True, args, policy=tol["policy"],
                    label=f", {tol['policy']} (fastest ≤1 pt on val)")
    rows.append(("dact-tol", r))
    # accuracy and exits on the whole evaluation split
    results = []
    for kind, r in rows:
        preds = r.many(texts)
        acc, avg_exit = accuracy_of(preds, gold)
        results.append({"kind": kind, "row": r, "accuracy": acc, "avg_exit": avg_exit})
    # batch-1 latency: every row interleaved per sentence (the order rotated per sentence)
    for r in rows:
        r[1].one(sample[0])
    for i, text in enumerate(sample):
        order = rows[i % len(rows):] + rows[:i % len(rows)]
        for _, r in order:
            t0 = time.perf_counter()
            r.one(text)
            r.lat.append(time.perf_counter() - t0)
    # batch-32 throughput over the sample (sorted into batches by the runtime itself)
    for res in results:
        r = res["row"]
        t0 = time.perf_counter()
        r.many(sample)
        res["throughput"] = len(sample) / (time.perf_counter() - t0)
    ref_torch = next(x for x in results if x["kind"] == "backbone" and x["row"].name.startswith("PyTorch"))
    ref_int8 = next(x for x in results if x["kind"] == "backbone" and x["row"].name.endswith("int8"))
    out = []
    for res in results:
        res["p50"] = statistics.median(res["row"].lat) * 1e3
    for res in results:
        r = res["row"]
        out.append({
            "dataset": name, "model": {"backbone": "reference (backbone)", "dact": "DACT, the run's own point",
                                       "dact-tol": "DACT, val-chosen point"}[res["kind"]],
            "runtime": r.name, "accuracy": res["accuracy"],
            "vs_ref_pts": 100 * (res["accuracy"] - ref_torch["accuracy"]),
            "avg_exit": res["avg_exit"], "p50_ms": res["p50"], "p90_ms": pct(r.lat, 0.9) * 1e3,
            "x_eager": ref_torch["p50"] / res["p50"], "x_int8_ref": ref_int8["p50"] / res["p50"],
            "b32_per_s": res["throughput"], "b32_vs_int8_ref": res["throughput"] / ref_int8["throughput"],
            "export_s": r.export_s, "first_answer_s": r.first_s})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", action="store_true", help="train the reference and the DACT model per dataset")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--datasets", default="sst2,ag_news")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--home", default=str(ROOT / "bench" / "out" / "deploy_home"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--latency-rows", type=int, default=300)
    ap.add_argument("--out", default="deploy_latency.json")
    ap.add_argument("--table", default=None, help="print the table of a saved result (bench/out/…json) and stop")
    args = ap.parse_args()
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.probe_text = "a gorgeous, moving film"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not Path(args.data_dir).is_dir():
        raise SystemExit(f"{args.data_dir} does not exist: give --data-dir (../shared/data)")
    if args.train:
        train_all(args)
        return
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(describe_machine(saved["machine"]))
        print_table(saved["rows"])
        return
    info = machine_info(1)
    print(describe_machine(info))
    table = []
    for name in args.datasets:
        table += measure(name, args)
    print_table(table)
    save_json(args.out, {"machine": info, "rows": table, "runs": json.loads((Path(args.home) / "runs.json")
                                                                             .read_text())})


def print_table(table: list[dict]) -> None:
    table = [{**r, "accuracy": 100 * r["accuracy"]} for r in table]
    cols = [("dataset", "dataset"), ("model", "model"), ("runtime", "runtime"), ("accuracy", "accuracy %"),
            ("vs_ref_pts", "pts vs ref (eager)"), ("avg_exit", "avg exit"), ("p50_ms", "batch-1 p50 ms"),
            ("p90_ms", "p90 ms"), ("x_eager", "× vs eager ref"), ("x_int8_ref", "× vs int8 ref"),
            ("b32_per_s", "batch-32 sent/s", 0), ("b32_vs_int8_ref", "b32 × int8 ref"), ("export_s", "export s", 1),
            ("first_answer_s", "load→first answer s")]
    print(markdown_table(table, cols))


if __name__ == "__main__":
    main()
