"""Is the DACT rule's trade-off limited by training, or by the rule? Halting units trained alone on a fixed model.

``bench/dact_tradeoff.py`` trains encoder, classifiers and halting units together, one model per λ, so the DACT
rule and the patience/entropy exits it is compared with read different classifiers. Here everything but the halting
units is fixed, so every exit policy reads the SAME per-layer classifiers y_n:

1. train one DactBert on SST-2 train (bundled all-MiniLM-L6-v2, library defaults for kind "dact", λ = 0 and the
   per-layer loss ``layer_loss_weight`` = 1 so every y_n is a trained classifier; 1 epoch, batch 32, seed 0);
2. compute its per-layer summaries c_n (masked mean) and y_n once for train and dev (frozen model, eval mode);
3. for every λ: fresh halting MLPs (the default shape) trained on the cached c_n with the DACT loss
   ``NLL(log a_N) + λ·mean Σ p_n`` (``dact.accumulate`` + ``dact.dact_loss``; y_n fixed), AdamW lr 1e-3, batch 64;
4. on dev, the DACT rule with those h_n vs patience t = 1..5 and an entropy sweep on the same y_n (offline
   simulation, ``dact.run_policy_offline`` — the code ``DactBert.infer`` runs online).

The entropy and patience fronts do not depend on λ (they never read h_n), so any gap between the DACT rule and them
at equal average exit layer is the rule's, not a difference in training.

    .venv/bin/python bench/dact_halting_only.py                  # ~5 min on 2 cores
    .venv/bin/python bench/dact_halting_only.py --max-rows 300   # smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DEFAULT_DATA_DIR, ROOT, describe_machine, load_sst2, machine_info, markdown_table,  # noqa: E402
                    require_data, save_json, set_threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ENTROPY = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.68)
MAX_LEN = 128


def train_base(train_ds, dev_ds, args):
    from dact_lib.config import default_config
    from dact_lib.data import DatasetSplit
    from dact_lib.models import build_model
    from dact_lib.train import train

    cfg = default_config("dact")
    cfg.model.ponder_lambda = 0.0
    cfg.model.layer_loss_weight = args.layer_loss_weight
    tc = cfg.train
    tc.epochs, tc.batch_size, tc.seed, tc.num_threads = args.epochs, 32, 0, args.threads
    tc.early_stopping.enabled = False
    cfg.data.max_seq_len = MAX_LEN
    cfg.validate()
    model, tok = build_model(cfg, train_ds.label_maps)
    t0 = time.perf_counter()
    res = train(cfg, data=DatasetSplit(train=train_ds, val=dev_ds, test=None), save=False, evaluate_test=False,
                model=model, tokenizer=tok)
    return res.model.eval(), res.tokenizer, cfg, time.perf_counter() - t0


@torch.no_grad()
def layer_outputs(model, tok, ds):
    """(c [n, N, H] masked-mean summaries, y [n, N, K] per-layer class probabilities, targets [n])."""
    from dact_lib.data import encode, iter_batches
    from dact_lib.heads import pool

    enc = encode(ds, tok, MAX_LEN)
    ad, N = model.adapter, model.num_layers
    c = torch.zeros(len(enc), N, ad.hidden_size)
    y = torch.zeros(len(enc), N, model.num_classes)
    for b in iter_batches(enc, 64, shuffle=False):
        am = b["attention_mask"]
        hid = ad.embed(b["input_ids"], am)
        mask = ad.prepare_mask(am, hid.dtype)
        for i in range(N):
            hid = ad.run_layer(i, hid, mask)
            s = pool(hid, am, model.cfg.pooling)
            c[b["index"], i] = s
            y[b["index"], i] = model.classifiers[0 if model.cfg.share_weights else i](s).float().softmax(-1)
    return c, y, torch.as_tensor(np.asarray(ds.targets[model.task]), dtype=torch.long)


def fit_halters(cfg, c, y, t, lam: float, epochs: int, seed: int = 0):
    from dact_lib import dact
    from dact_lib.heads import build_mlp

    torch.manual_seed(seed)
    N, H = c.shape[1], c.shape[2]
    halters = torch.nn.ModuleList([build_mlp(H, 1, cfg.model.halting) for _ in range(N)])
    opt = torch.optim.AdamW(halters.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(c), generator=gen).split(64):
            h = torch.stack([torch.sigmoid(halters[n](c[idx, n])).squeeze(-1) for n in range(N)], 1)
            a, p = dact.accumulate(y[idx], h)
            loss = dact.dact_loss(a[:, -1], p, t[idx], lam).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    halters.eval()
    return halters


def run_policy(policy, y, t, h=None):
    from dact_lib import dact

    r = dact.run_policy_offline(policy, y, h)
    return {"accuracy": float((r.probs.argmax(-1) == t).float().mean()),
            "avg_exit_layer": dact.average_exit_layer(r.exit_layer)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambdas", default="0.01,0.02,0.05,0.1,0.2,0.3")
    ap.add_argument("--epochs", type=int, default=1, help="epochs of the base model")
    ap.add_argument("--halting-epochs", type=int, default=10, help="epochs of the halting units on cached features")
    ap.add_argument("--layer-loss-weight", type=float, default=1.0)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--out", default="dact_halting_only.json")
    args = ap.parse_args()

    require_data(args.data_dir)
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from dact_lib import dact
    from dact_lib.evaluate import pareto_front

    from dact_tradeoff import interp_at  # bench/ is on sys.path (top of this file)

    set_threads(args.threads)
    info = machine_info(args.threads)
    print(f"# DACT halting units trained alone — {describe_machine(info)}")
    train_ds, dev_ds = load_sst2(args.data_dir, args.max_rows)
    model, tok, cfg, train_s = train_base(train_ds, dev_ds, args)
    t0 = time.perf_counter()
    c_tr, y_tr, t_tr = layer_outputs(model, tok, train_ds)
    c_dv, y_dv, t_dv = layer_outputs(model, tok, dev_ds)
    feat_s = time.perf_counter() - t0
    N = model.num_layers
    layer_acc = [100 * float((y_dv[:, n].argmax(-1) == t_dv).float().mean()) for n in range(N)]
    print(f"base model trained in {train_s:.0f} s; features in {feat_s:.0f} s; dev accuracy of y_1..y_{N}: "
          + " / ".join(f"{a:.2f}" for a in layer_acc))

    ent = [{"policy": "entropy", "value": s, **run_policy(dact.EntropyPolicy(s), y_dv, t_dv)} for s in ENTROPY]
    pat = [{"policy": "patience", "value": k, **run_policy(dact.PatiencePolicy(k), y_dv, t_dv)} for k in range(1, N)]
    baselines = ent + pat
    set_threads(1)  # the halting MLPs are tiny matmuls: one thread is faster on a shared 2-core machine
    rows = []
    for lam in [float(x) for x in args.lambdas.split(",") if x.strip()]:
        t1 = time.perf_counter()
        halters = fit_halters(cfg, c_tr, y_tr, t_tr, lam, args.halting_epochs)
        with torch.no_grad():
            h = torch.stack([torch.sigmoid(halters[n](c_dv[:, n])).squeeze(-1) for n in range(N)], 1)
        d = run_policy(dact.DactPolicy(), y_dv, t_dv, h)
        x = d["avg_exit_layer"]
        pi, ei = interp_at(pat, x), interp_at(ent, x)
        rows.append({"lambda": lam, "dact_exit": x, "dact_acc": 100 * d["accuracy"],
                     "ent_interp": None if ei is None else 100 * ei, "pat_interp": None if pi is None else 100 * pi,
                     "gap_vs_entropy": None if ei is None else 100 * (d["accuracy"] - ei),
                     "fit_s": time.perf_counter() - t1})
        print(f"λ = {lam:g}: DACT rule {100 * d['accuracy']:.2f}% at {x:.2f} layers ({rows[-1]['fit_s']:.0f} s)",
              flush=True)

    print("\n## Baselines on the same classifiers (dev)")
    print(markdown_table([{**r, "acc_pct": 100 * r["accuracy"]} for r in baselines], [
        ("policy", "policy"), ("value", "t / S"), ("avg_exit_layer", "avg exit layer", 2),
        ("acc_pct", "dev acc %", 2)]))
    print("\n## DACT rule with halting units trained alone, per λ (patience / entropy interpolated at its exit layer)")
    table = markdown_table(rows, [
        ("lambda", "λ", 3), ("dact_exit", "DACT avg exit", 2), ("dact_acc", "DACT acc %", 2),
        ("pat_interp", "patience %", 2), ("ent_interp", "entropy %", 2),
        ("gap_vs_entropy", "DACT − entropy (pts)", 2)])
    print(table)
    front = pareto_front([{"avg_exit_layer": r["dact_exit"], "accuracy": r["dact_acc"]} for r in rows],
                         "avg_exit_layer", "accuracy")
    print(f"\nDACT-rule front: {[(round(p['avg_exit_layer'], 2), round(p['accuracy'], 2)) for p in front]}")
    path = save_json(args.out, {"machine": info, "settings": vars(args), "layer_accuracy": layer_acc,
                                "base_train_s": train_s, "baselines": baselines, "rows": rows, "table": table})
    print(f"JSON: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
