"""DACT-BERT accuracy / compute trade-off on SST-2: the ponder penalty λ, the DACT halting rule vs patience
(PABEE), entropy (DeeBERT) and fixed-depth exits, with latency measured by real per-sample early exit.

For every λ in ``--lambdas`` one DactBert is trained (bundled all-MiniLM-L6-v2, 6 layers; mean pooling; heads at
lr 1e-3 and encoder at 5e-5 — the library defaults for kind "dact"; 1 epoch, batch 32, seed 0). Then on dev:

* accuracy and average exit layer of every exit policy on the full dev set (872): the DACT rule, patience
  t = 1..5, an entropy-threshold sweep and fixed depth k = 1..6. They come from one full forward pass with the
  policies simulated exactly on the per-layer outputs (``dact.run_policy_offline`` — the same code path that
  ``DactBert.infer`` runs online; the bench checks that both agree on the latency subset);
* batch-1 CPU latency per sentence on a fixed subset of dev sentences (``--latency-n``, seeded sample), measured
  with real early exit (``DactBert.infer``; halted samples skip the remaining layers). Reference: "full" = the
  same encoder run through all 6 layers and only the layer-6 classifier (no DACT units, no policy) — the plain
  6-layer model. Calls are interleaved per sentence (every policy on sentence i, in a rotating order, before
  sentence i+1) so load changes on the shared machine hit all policies alike; wall and process CPU time are both
  recorded;
* batched throughput (batch 64, file order, whole dev set) of the DACT rule vs the plain full model.

"At equal average exit layer": a patience or entropy accuracy is read off that policy family's Pareto front
(accuracy vs average exit layer) by linear interpolation at the DACT rule's average exit layer (the primary
comparison); the best point of the family that is not deeper than the DACT point is printed too. A family that
cannot exit that early (e.g. patience, whose earliest exit is layer 2) has no value there.

    .venv/bin/python bench/dact_tradeoff.py                       # λ in 0,1e-3,1e-2,5e-2,1e-1 (~20 min on 2 cores)
    .venv/bin/python bench/dact_tradeoff.py --max-rows 300 --latency-n 40   # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA_DIR, ROOT, Stopwatch, cpu_seconds, describe_machine, load_sst2, loadavg,  # noqa: E402
                    machine_info, markdown_table, require_data, save_json, set_threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ENTROPY_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.68, 0.69)
MAX_LEN = 128


def sweep_points(n_layers: int) -> list[tuple[str, float | int | None]]:
    pts: list[tuple[str, float | int | None]] = [("dact", None)]
    pts += [("patience", t) for t in range(1, n_layers)]
    pts += [("entropy", s) for s in ENTROPY_THRESHOLDS]
    pts += [("fixed", k) for k in range(1, n_layers + 1)]
    return pts


def point_key(name: str, value) -> str:
    return name if value is None else f"{name}:{value:g}"


# --- training ------------------------------------------------------------------------------------------------------
def train_dact(lam: float, train_ds, dev_ds, args):
    from dact_lib.config import default_config
    from dact_lib.data import DatasetSplit
    from dact_lib.models import build_model
    from dact_lib.train import train

    cfg = default_config("dact")
    cfg.model.pooling = args.pooling
    cfg.model.ponder_lambda = float(lam)
    if args.layer_loss_weight is not None:
        cfg.model.layer_loss_weight = float(args.layer_loss_weight)
    tc = cfg.train
    tc.epochs, tc.batch_size, tc.seed, tc.num_threads = args.epochs, 32, 0, args.threads
    tc.head_lr = args.head_lr
    tc.early_stopping.enabled = False
    cfg.data.max_seq_len = MAX_LEN
    cfg.validate()
    model, tok = build_model(cfg, train_ds.label_maps)
    if args.halting_bias is not None:  # lever: start every halting unit at h = sigmoid(bias)
        with torch.no_grad():
            for halter in model.halters:
                halter[-1].bias.fill_(args.halting_bias)
    sw = Stopwatch().start()
    res = train(cfg, data=DatasetSplit(train=train_ds, val=dev_ds, test=None), save=False, evaluate_test=False,
                model=model, tokenizer=tok)
    sw.stop()
    return res, sw, cfg


# --- measurement -------------------------------------------------------------------------------------------------
@torch.no_grad()
def plain_full(model, ids, am):
    """The same encoder through all N layers + the layer-N classifier only: no DACT units, no policy."""
    from dact_lib.heads import pool

    ad = model.adapter
    h = ad.embed(ids, am)
    m = ad.prepare_mask(am, h.dtype)
    for i in range(model.num_layers):
        h = ad.run_layer(i, h, m)
    clf = model.classifiers[0 if model.cfg.share_weights else model.num_layers - 1]
    return clf(pool(h, am, model.cfg.pooling)).float().softmax(-1)


def latency(model, enc_sub, points, warmup: int = 10):
    """Batch-1 latency per sentence for every point + the plain full model, interleaved per sentence."""
    from dact_lib import dact

    task = model.task
    policies = {point_key(n, v): dact.make_policy(n, v) for n, v in points}
    keys = list(policies) + ["full"]
    items = [(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in enc_sub.input_ids]
    targets = enc_sub.targets[task].numpy()
    wall = {k: 0.0 for k in keys}
    cpu = {k: 0.0 for k in keys}
    exits = {k: [] for k in policies}
    correct = {k: 0 for k in keys}

    def call(key, ids, am):
        if key == "full":
            return plain_full(model, ids, am), None
        out = model.infer(ids, am, policies[key])
        return out.probs, out.exit_layer

    for ids, am in items[:warmup]:
        for k in keys:
            call(k, ids, am)
    for i, (ids, am) in enumerate(items):
        r = i % len(keys)
        for k in keys[r:] + keys[:r]:
            c0, w0 = cpu_seconds(), time.perf_counter()
            probs, ex = call(k, ids, am)
            w1, c1 = time.perf_counter(), cpu_seconds()
            wall[k] += w1 - w0
            cpu[k] += c1 - c0
            correct[k] += int(int(probs.argmax(-1)[0]) == int(targets[i]))
            if ex is not None:
                exits[k].append(int(ex[0]))
    n = len(items)
    return {k: {"latency_ms": 1e3 * wall[k] / n, "cpu_ms": 1e3 * cpu[k] / n, "subset_accuracy": correct[k] / n,
                "subset_avg_exit": (float(np.mean(exits[k])) if k in exits else float(model.num_layers)),
                "subset_exits": exits.get(k)} for k in keys}


@torch.no_grad()
def online_offline_mismatches(model, enc_sub, points, lat) -> int:
    """Sentences (summed over policies) whose exit layer from the real early-exit pass (``infer``, batch 1)
    differs from the offline simulation (``run_policy_offline``) on the same unpadded sentence. Expected: 0."""
    from dact_lib import dact

    ys, hs = [], []
    for ids in enc_sub.input_ids:
        out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        ys.append(out.extras["y"])
        hs.append(out.extras["h"])
    y, h = torch.cat(ys), torch.cat(hs)
    bad = 0
    for name, value in points:
        sim = dact.run_policy_offline(dact.make_policy(name, value), y, h).exit_layer.tolist()
        bad += sum(int(a != b) for a, b in zip(sim, lat[point_key(name, value)]["subset_exits"]))
    return bad


def batched(model, enc_dev, batch_size: int = 64, passes: int = 3):
    """Sentences/s at ``batch_size`` (file order, whole dev set): DACT rule (real early exit), fixed k=N through
    infer, and the plain full model; ``passes`` interleaved passes, median."""
    from dact_lib import dact
    from dact_lib.data import iter_batches

    batches = [(b["input_ids"], b["attention_mask"]) for b in iter_batches(enc_dev, batch_size)]
    fns = {"dact": lambda i, a: model.infer(i, a, dact.DactPolicy()),
           "fixed:6": lambda i, a: model.infer(i, a, dact.FixedDepthPolicy(model.num_layers)),
           "full": lambda i, a: plain_full(model, i, a)}
    times = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    with torch.no_grad():
        fns["dact"](*batches[0])
        for _ in range(passes):
            for k, fn in fns.items():
                c0, w0 = cpu_seconds(), time.perf_counter()
                for ids, am in batches:
                    fn(ids, am)
                times[k].append(time.perf_counter() - w0)
                cpus[k].append(cpu_seconds() - c0)
    n = len(enc_dev)
    return {k: {"sent_per_s": n / statistics.median(times[k]), "sent_per_cpu_s": n / statistics.median(cpus[k]),
                "wall_s_passes": times[k]} for k in fns}


# --- comparisons -----------------------------------------------------------------------------------------------
def front(points: list[dict]) -> list[dict]:
    from dact_lib.evaluate import pareto_front

    return pareto_front(points, "avg_exit_layer", "accuracy")


def interp_at(points: list[dict], x: float) -> float | None:
    """Accuracy of the family's Pareto front at average exit layer x (linear interpolation; None when the family
    cannot exit that early; the deepest front point's accuracy when x is beyond it)."""
    f = front(points)
    if not f or x < f[0]["avg_exit_layer"] - 1e-9:
        return None
    for p, q in zip(f, f[1:]):
        if p["avg_exit_layer"] - 1e-9 <= x <= q["avg_exit_layer"] + 1e-9:
            dx = q["avg_exit_layer"] - p["avg_exit_layer"]
            if dx <= 1e-12:
                return max(p["accuracy"], q["accuracy"])
            return p["accuracy"] + (x - p["avg_exit_layer"]) / dx * (q["accuracy"] - p["accuracy"])
    return f[-1]["accuracy"]


def best_not_deeper(points: list[dict], x: float) -> dict | None:
    ok = [p for p in points if p["avg_exit_layer"] <= x + 1e-9]
    return max(ok, key=lambda p: (p["accuracy"], -p["avg_exit_layer"])) if ok else None


# --- main ------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", default="0,1e-3,1e-2,5e-2,1e-1", help="comma-separated ponder penalties")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--pooling", default="mean", choices=("mean", "cls"))
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--halting-bias", type=float, default=None,
                    help="[lever, non-default] initial bias of every halting unit's last layer")
    ap.add_argument("--layer-loss-weight", type=float, default=None,
                    help="weight of every internal classifier's own NLL in the loss (default: the library's, "
                         "DactModelConfig.layer_loss_weight)")
    ap.add_argument("--latency-n", type=int, default=300, help="dev sentences timed at batch 1")
    ap.add_argument("--max-rows", type=int, default=None, help="stratified sample of train (and dev) for a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and batched throughput")
    ap.add_argument("--latency-threads", type=int, default=1,
                    help="torch threads for the batch-1 latency (1: one request per core; with 2 threads on a busy "
                         "shared 2-core machine, OpenMP barriers make tiny batch-1 ops many times slower)")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--out", default="dact_tradeoff.json", help="JSON file name under bench/out/")
    args = ap.parse_args()

    require_data(args.data_dir)
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from dact_lib.data import encode
    from dact_lib.evaluate import exit_policy_sweep

    set_threads(args.threads)
    lambdas = [float(x) for x in args.lambdas.split(",") if x.strip()]
    info = machine_info(args.threads)
    print(f"# DACT trade-off — {describe_machine(info)}")
    settings = {"lambdas": lambdas, "epochs": args.epochs, "pooling": args.pooling, "head_lr": args.head_lr,
                "encoder_lr": 5e-5, "batch": 32, "seed": 0, "halting_bias": args.halting_bias,
                "layer_loss_weight": args.layer_loss_weight,
                "latency_n": args.latency_n, "latency_threads": args.latency_threads, "max_rows": args.max_rows, "threads": args.threads}
    print(f"settings: {settings}")
    train_ds, dev_ds = load_sst2(args.data_dir, args.max_rows)
    rng = np.random.default_rng(0)
    sub_idx = np.sort(rng.choice(len(dev_ds), size=min(args.latency_n, len(dev_ds)), replace=False))

    per_lambda = []
    for lam in lambdas:
        la0 = loadavg()
        res, sw, cfg = train_dact(lam, train_ds, dev_ds, args)
        model = res.model.eval()
        enc_dev = encode(dev_ds, res.tokenizer, MAX_LEN)
        enc_sub = enc_dev.subset(sub_idx)
        N = model.num_layers
        points = sweep_points(N)
        rows = exit_policy_sweep(model, enc_dev, points, batch_size=64, timed=False)
        set_threads(args.latency_threads)
        lat = latency(model, enc_sub, points)
        mismatch = online_offline_mismatches(model, enc_sub, points, lat)
        set_threads(args.threads)
        bat = batched(model, enc_dev)
        full = lat["full"]
        sim = {point_key(r["policy"], r["value"]): r for r in rows}
        for r in rows:
            k = point_key(r["policy"], r["value"])
            r.update(key=k, latency_ms=lat[k]["latency_ms"], cpu_ms=lat[k]["cpu_ms"],
                     speedup=full["latency_ms"] / lat[k]["latency_ms"], speedup_cpu=full["cpu_ms"] / lat[k]["cpu_ms"],
                     layer_speedup=N / r["avg_exit_layer"], subset_avg_exit=lat[k]["subset_avg_exit"],
                     subset_accuracy=lat[k]["subset_accuracy"], acc_pct=100 * r["accuracy"])
        full_row = {"key": "full (plain 6 layers, no DACT units)", "policy": "full", "value": None,
                    "avg_exit_layer": float(N), "accuracy": sim[f"fixed:{N}"]["accuracy"],
                    "acc_pct": 100 * sim[f"fixed:{N}"]["accuracy"], "latency_ms": full["latency_ms"],
                    "cpu_ms": full["cpu_ms"], "speedup": 1.0, "speedup_cpu": 1.0, "layer_speedup": 1.0,
                    "subset_avg_exit": float(N), "subset_accuracy": full["subset_accuracy"]}
        d = sim["dact"]
        entry = {"lambda": lam, "train_wall_s": sw.wall, "train_cpu_s": sw.cpu, "val_metrics": res.best_metrics,
                 "rows": rows, "full": full_row, "batched": bat, "online_offline_mismatches": mismatch,
                 "loadavg_before": la0, "loadavg_after": loadavg(),
                 "exit_histogram": {int(k): int(v) for k, v in zip(*np.unique(
                     np.asarray(lat["dact"]["subset_exits"]), return_counts=True))}}
        per_lambda.append(entry)
        print(f"\n## λ = {lam:g} — trained in {sw.wall:.0f} s wall / {sw.cpu:.0f} s CPU; dev: DACT rule "
              f"{100 * d['accuracy']:.2f}% at {d['avg_exit_layer']:.2f} layers; plain full model "
              f"{full_row['acc_pct']:.2f}% at {full['latency_ms']:.2f} ms/sentence ({args.latency_threads} thread); "
              f"online (infer) vs offline exit-layer mismatches on the subset, all policies: {mismatch}; load {la0} -> {entry['loadavg_after']}")
        print(f"DACT-rule exit histogram on the latency subset (layer: count): {entry['exit_histogram']}")
        print(markdown_table(rows + [full_row], [
            ("key", "policy"), ("avg_exit_layer", "avg exit layer (dev)", 2), ("acc_pct", "dev acc %", 2),
            ("latency_ms", "batch-1 ms/sent", 2), ("cpu_ms", "CPU ms/sent", 2),
            ("speedup", "latency speed-up vs full", 2), ("speedup_cpu", "CPU speed-up vs full", 2),
            ("layer_speedup", "6 / avg exit", 2)]))
        print(f"batched (batch 64, dev {len(dev_ds)}): DACT rule {bat['dact']['sent_per_s']:.1f} sent/s "
              f"({bat['dact']['sent_per_cpu_s']:.1f}/CPU-s), fixed-6 via infer {bat['fixed:6']['sent_per_s']:.1f}, "
              f"plain full {bat['full']['sent_per_s']:.1f} sent/s ({bat['full']['sent_per_cpu_s']:.1f}/CPU-s) -> "
              f"DACT {bat['dact']['sent_per_s'] / bat['full']['sent_per_s']:.2f}x", flush=True)
        del model, res

    # --- summary -------------------------------------------------------------------------------------------
    ref0 = next((e for e in per_lambda if e["lambda"] == 0.0), None)
    summary = []
    for e in per_lambda:
        rows = e["rows"]
        d = next(r for r in rows if r["policy"] == "dact")
        x = d["avg_exit_layer"]
        pat = [r for r in rows if r["policy"] == "patience"]
        ent = [r for r in rows if r["policy"] == "entropy"]
        pi, ei = interp_at(pat, x), interp_at(ent, x)
        pb, eb = best_not_deeper(pat, x), best_not_deeper(ent, x)
        own_full = e["full"]["accuracy"]
        s = {"lambda": e["lambda"], "dact_exit": x, "dact_acc": 100 * d["accuracy"], "own_full_acc": 100 * own_full,
             "loss_vs_own_full": 100 * (own_full - d["accuracy"]),
             "loss_vs_l0_full": (100 * (ref0["full"]["accuracy"] - d["accuracy"]) if ref0 else None),
             "latency_ms": d["latency_ms"], "speedup": d["speedup"], "speedup_cpu": d["speedup_cpu"],
             "batched_speedup": e["batched"]["dact"]["sent_per_s"] / e["batched"]["full"]["sent_per_s"],
             "pat_interp": None if pi is None else 100 * pi, "ent_interp": None if ei is None else 100 * ei,
             "pat_best": None if pb is None else f"t={pb['value']}: {100 * pb['accuracy']:.2f}% @ {pb['avg_exit_layer']:.2f}",
             "ent_best": None if eb is None else f"S={eb['value']:g}: {100 * eb['accuracy']:.2f}% @ {eb['avg_exit_layer']:.2f}",
             "pat_best_acc": None if pb is None else 100 * pb["accuracy"],
             "ent_best_acc": None if eb is None else 100 * eb["accuracy"]}
        summary.append(s)
    print("\n## Summary (DACT rule per λ; patience/entropy at the DACT rule's average exit layer)")
    print("interp = linear interpolation on that family's Pareto front at the DACT exit layer (— = the family cannot "
          "exit that early); best ≤ = its most accurate point that is not deeper than the DACT point.")
    table = markdown_table(summary, [
        ("lambda", "λ", 4), ("dact_exit", "DACT avg exit", 2), ("dact_acc", "DACT acc %", 2),
        ("own_full_acc", "same model, 6 layers %", 2), ("loss_vs_l0_full", "acc loss vs λ=0 full (pts)", 2),
        ("latency_ms", "batch-1 ms", 2), ("speedup", "latency speed-up", 2), ("speedup_cpu", "CPU speed-up", 2),
        ("batched_speedup", "batch-64 speed-up", 2), ("pat_interp", "patience interp %", 2),
        ("pat_best", "patience best ≤"), ("ent_interp", "entropy interp %", 2), ("ent_best", "entropy best ≤")])
    print(table)

    # --- targets -------------------------------------------------------------------------------------------
    print("\n## Targets")
    verdicts = {}
    exits = [s["dact_exit"] for s in summary]
    lams = [s["lambda"] for s in summary]
    order = np.argsort(lams)
    ex_sorted = [exits[i] for i in order]
    mono = all(b <= a + 1e-9 for a, b in zip(ex_sorted, ex_sorted[1:])) and ex_sorted[-1] < ex_sorted[0]
    verdicts["lambda_trend"] = mono
    print(f"1. larger λ -> lower average exit layer: {'PASS' if mono else 'FAIL'} — "
          + ", ".join(f"λ={lams[i]:g}: {exits[i]:.2f}" for i in order))
    ok2 = []
    for s in summary:
        loss = s["loss_vs_l0_full"] if s["loss_vs_l0_full"] is not None else s["loss_vs_own_full"]
        if s["speedup"] >= 2.0 and loss <= 1.0:
            ok2.append(s)
    verdicts["speedup_2x"] = bool(ok2)
    ref_txt = (f"the λ=0 model run to 6 layers ({ref0['full']['acc_pct']:.2f}%)" if ref0
               else "the same model run to 6 layers")
    print(f"2. >= 2x batch-1 latency speed-up at <= 1 point accuracy loss vs {ref_txt}: "
          f"{'PASS' if ok2 else 'FAIL'} — " + "; ".join(
        f"λ={s['lambda']:g}: {s['speedup']:.2f}x (CPU {s['speedup_cpu']:.2f}x), loss "
        f"{(s['loss_vs_l0_full'] if s['loss_vs_l0_full'] is not None else s['loss_vs_own_full']):+.2f} pts "
        f"(vs own 6 layers {s['loss_vs_own_full']:+.2f})" for s in summary))
    ok3 = []
    for s in summary:
        good = all(v is None or s["dact_acc"] >= v - 1e-9 for v in (s["pat_interp"], s["ent_interp"]))
        ok3.append(good)
    verdicts["dact_vs_baselines"] = all(ok3)
    print(f"3. DACT rule at least as accurate as patience and entropy at equal average exit layer (interpolated): "
          f"{'PASS' if all(ok3) else 'FAIL'} ({sum(ok3)}/{len(ok3)} λ) — " + "; ".join(
              f"λ={s['lambda']:g}: DACT {s['dact_acc']:.2f} vs patience "
              f"{'—' if s['pat_interp'] is None else format(s['pat_interp'], '.2f')}, entropy "
              f"{'—' if s['ent_interp'] is None else format(s['ent_interp'], '.2f')}" for s in summary))
    path = save_json(args.out, {"machine": info, "settings": settings, "latency_subset": sub_idx.tolist(),
                                "per_lambda": per_lambda, "summary": summary, "verdicts": verdicts,
                                "summary_table": table, "loadavg_end": loadavg()})
    print(f"\nJSON: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
