"""Early exit that pays? One table per dataset: a plain fine-tuned classifier vs DACT models under every policy.

For each dataset (from ``--data-dir``, default ../shared/data):

* SST-2 (train -> dev), AG News (its one file split 80/20 stratified, seed 0), TREC-6 (train -> test),
  SST-5 (train -> dev). The training file is split 90/10 (stratified, seed 0) into train / validation for every
  row; the evaluation split is never seen in training, nor by the halting fit.
* reference: kind "backbone" (library defaults), its accuracy and batch-1 latency;
* each DACT variant (``--variants``): ``today`` (the defaults before this change: no per-layer loss, halting MLP
  on the layer summary, no halting fit), ``default`` (the library defaults for kind "dact": ``train --kind dact``
  with no flags), ``nothr`` (defaults without the threshold halting units), ``thr`` (defaults with them: the
  default since they measured better), ``norefit`` (defaults without the exit refit, ``exit_refit.py``), ``temp`` (defaults + temperature-calibrated
  exits, ``model.exit_temperature``), ``kd`` (defaults + self-distillation, weight 1, T = 2), ``pabee``
  (defaults + PABEE depth weighting). Policies: the DACT rule at every fitted λ and every threshold τ (halting units fitted alone on the validation split,
  ``dact_lib.halting``), the entropy sweep (thresholds × ln K), patience t = 1..N-1, fixed depth 1..N;
* every point: average exit layer and accuracy on the whole evaluation split (offline simulation = the online
  loop), batch-1 latency on a seeded sample of ``--latency-rows`` sentences with real early exit
  (``DactBert.infer(..., trace=False)``), all points and the reference interleaved per sentence;
* the best point within 1 point of the reference per policy family, and the no-flags point (``default``'s
  installed halting units);
* overheads: fixed depth N through ``infer`` vs the plain model, and the DACT rule's own cost per layer.

    .venv/bin/python bench/early_exit_suite.py                                  # all four, ~1 h on 2 cores
    .venv/bin/python bench/early_exit_suite.py --datasets trec6 --max-rows 600  # smoke run
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATASETS = {  # name: (train file, eval file or None = split the train file 80/20)
    "sst2": ("sst2/train.csv", "sst2/dev.csv"),
    "ag_news": ("ag_news/test.csv", None),
    "trec6": ("trec6/train.csv", "trec6/test.csv"),
    "sst5": ("sst5/train.csv", "sst5/dev.csv"),
}
ENTROPY_FRACS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MAX_LEN = 128


def load(name, data_dir, max_rows):
    from dact_lib.data import read_csv, split_dataset

    tr, ev = DATASETS[name]
    base = read_csv(Path(data_dir) / tr, max_rows=max_rows, seed=0)
    if ev is None:
        parts = split_dataset(base, val_frac=0.2, test_frac=0.0, seed=0)
        train_all, eval_ds = parts.train, parts.val
    else:
        train_all = base
        eval_ds = read_csv(Path(data_dir) / ev, max_rows=max_rows, seed=0, label_maps=base.label_maps)
    parts = split_dataset(train_all, val_frac=0.1, test_frac=0.0, seed=0)
    return parts.train, parts.val, eval_ds


def variant_config(kind, variant, args):
    from dact_lib.config import default_config

    cfg = default_config(kind)
    if kind == "dact":
        m = cfg.model
        if variant == "today":
            m.layer_loss_weight, m.distill_weight, m.halting_input, m.fit_halting = 0.0, 0.0, "summary", False
            m.exit_refit_epochs = 0
        elif variant == "nothr":  # the defaults before halting_thresholds was on
            m.halting_thresholds = False
        elif variant == "kd":
            m.distill_weight, m.distill_temperature = 1.0, 2.0
        elif variant == "thr":
            m.halting_thresholds = True
        elif variant == "norefit":  # the defaults before exit_refit_epochs was on
            m.exit_refit_epochs = 0
        elif variant == "temp":  # defaults + temperature-calibrated exits
            m.exit_temperature = True
        elif variant == "pabee":
            m.depth_weighting = "pabee"
        elif variant != "default":
            raise SystemExit(f"unknown variant {variant}")
    tc = cfg.train
    tc.epochs, tc.seed, tc.num_threads = args.epochs, 0, args.threads
    tc.early_stopping.enabled = False
    cfg.data.max_seq_len = MAX_LEN
    return cfg.validate()


def train_one(kind, variant, train_ds, val_ds, args):
    from dact_lib.data import DatasetSplit
    from dact_lib.train import train

    cfg = variant_config(kind, variant, args)
    t0 = time.perf_counter()
    res = train(cfg, data=DatasetSplit(train=train_ds, val=val_ds, test=None), save=False, evaluate_test=False)
    total = time.perf_counter() - t0
    rep = res.report or {}
    fit_s = (rep.get("halting") or {}).get("seconds", 0.0)
    refit_s = (rep.get("exit_refit") or {}).get("seconds", 0.0) + \
        ((rep.get("exit_refit") or {}).get("temperature") or {}).get("seconds", 0.0)  # (variant temp)
    args.last_refit_s = refit_s
    return res.model.eval(), res.tokenizer, cfg, total - fit_s - refit_s, fit_s


@torch.no_grad()
def per_layer(model, enc):
    from dact_lib.halting import layer_cache

    return layer_cache(model, enc)


def offline(policy, y, t, h=None):
    from dact_lib import dact

    r = dact.run_policy_offline(policy, y, h)
    return dact.average_exit_layer(r.exit_layer), float((r.probs.argmax(-1) == t).float().mean())


@torch.no_grad()
def halting_h(model, halters, cache):
    from dact_lib import dact

    saved = model.halters
    model.halters = halters
    B, N, K = cache.y.shape
    a, p, hs = cache.y.new_zeros(B, K), cache.y.new_ones(B), []
    for n in range(1, N + 1):
        h_n = model.halt_prob(n, cache.base[:, n - 1], cache.y[:, n - 1], a)
        a, p = dact.accumulate_step(a, p, cache.y[:, n - 1], h_n)
        hs.append(h_n)
    model.halters = saved
    return torch.stack(hs, 1)


def plain_full(model, ids, am):
    ad = model.adapter
    h = ad.embed(ids, am)
    m = ad.prepare_mask(am, h.dtype)
    for i in range(model.num_layers):
        h = ad.run_layer(i, h, m)
    y, _ = model.classify(model.num_layers, h.mean(1))
    return y


@torch.no_grad()
def latencies(items, calls, reps=1):
    """ms per sentence of every call, interleaved per sentence in a rotating order."""
    keys = list(calls)
    wall = {k: 0.0 for k in keys}
    for ids, am in items[:10]:
        for k in keys:
            calls[k](ids, am)
    for i, (ids, am) in enumerate(items):
        r = i % len(keys)
        for k in keys[r:] + keys[:r]:
            w0 = time.perf_counter()
            calls[k](ids, am)
            wall[k] += time.perf_counter() - w0
    return {k: 1e3 * wall[k] / len(items) for k in keys}


@torch.no_grad()
def rule_cost(model, items):
    """(ms of one encoder layer, ms of the DACT unit + rule per layer) at batch 1, medians over sentences."""
    from dact_lib import dact

    ad, lay, rule = model.adapter, [], []
    for ids, am in items:
        h = ad.embed(ids, am)
        m = ad.prepare_mask(am, h.dtype)
        pol = dact.DactPolicy()
        st = pol.init_state(1, model.num_layers, model.num_classes)
        rows = torch.zeros(1, dtype=torch.long)
        for n in range(1, model.num_layers):
            t0 = time.perf_counter()
            h = ad.run_layer(n - 1, h, m)
            t1 = time.perf_counter()
            y_n, base = model.classify(n, h.mean(1))
            h_n = model.halt_prob(n, base, y_n, st["a"])
            halt, _ = pol.step(st, rows, n, y_n, h_n)
            bool(halt[0])
            t2 = time.perf_counter()
            lay.append(t1 - t0)
            rule.append(t2 - t1)
    return 1e3 * statistics.median(lay), 1e3 * statistics.median(rule)


from dact_tradeoff import front, interp_at  # noqa: E402  (bench/ is on sys.path; the same front and interpolation)


def gap_of(pts: list[dict], fam: str, within_pts: float | None = None) -> tuple[float, float] | None:
    """(min, mean) of the DACT rule's front points' accuracy minus ``fam``'s front interpolated at the same average
    exit layer, in points; ``within_pts``: only the DACT points at most that many points below the reference."""
    dpts = [p for p in pts if p["family"] == "dact" and p["key"] != "dact:installed"] or pts[:1]
    fp = [p for p in pts if p["family"] == fam]
    g = []
    for p in front(dpts):
        if within_pts is not None and p["loss_pts"] > within_pts + 1e-9:
            continue
        o = interp_at(fp, p["avg_exit_layer"])
        if o is not None:
            g.append(100 * (p["accuracy"] - o))
    return (min(g), statistics.mean(g)) if g else None


def run_dataset(name, args, out):
    from dact_lib import dact
    from dact_lib.data import encode
    from dact_lib.halting import fit_halting

    train_ds, val_ds, eval_ds = load(name, args.data_dir, args.max_rows)
    K = len(train_ds.label_maps["label"])
    print(f"\n## {name}: train {len(train_ds)} / val {len(val_ds)} / eval {len(eval_ds)}, {K} classes, "
          f"{args.epochs} epoch(s)", flush=True)
    ref, ref_tok, _, ref_s, _ = train_one("backbone", None, train_ds, val_ds, args)
    enc_eval = encode(eval_ds, ref_tok, MAX_LEN)
    t = torch.as_tensor(enc_eval.targets["label"]).long()
    with torch.no_grad():
        ref_acc = float(np.mean([int(ref(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long)).probs["label"]
                                     .argmax(-1)[0]) == int(tt) for i, tt in zip(enc_eval.input_ids, t)]))
    gen = np.random.default_rng(0)
    sub = gen.choice(len(enc_eval), size=min(args.latency_rows, len(enc_eval)), replace=False)
    items = [(torch.tensor([enc_eval.input_ids[i]]), torch.ones(1, len(enc_eval.input_ids[i]), dtype=torch.long))
             for i in sub]
    ds_out = {"name": name, "classes": K, "train": len(train_ds), "val": len(val_ds), "eval": len(eval_ds),
              "reference": {"accuracy": ref_acc, "train_s": ref_s}, "variants": {}}
    out["datasets"][name] = ds_out
    print(f"reference (backbone) trained in {ref_s:.0f} s; eval accuracy {100 * ref_acc:.2f}%", flush=True)
    for variant in args.variants.split(","):
        model, tok, cfg, train_s, fit_s = train_one("dact", variant, train_ds, val_ds, args)
        N = model.num_layers
        cache = per_layer(model, enc_eval)
        val_cache = per_layer(model, encode(val_ds, tok, MAX_LEN))
        pts = []
        installed = copy.deepcopy(model.halters)
        h_inst = halting_h(model, installed, cache)
        x, acc = offline(dact.DactPolicy(), cache.y, t, h_inst)
        calls = {"reference": lambda i, a: ref(i, a), "plain": lambda i, a: plain_full(model, i, a)}
        pts.append({"family": "dact", "point": "no flags" if variant != "today" else "today's rule",
                    "avg_exit_layer": x, "accuracy": acc, "key": "dact:installed"})
        calls["dact:installed"] = lambda i, a, hs=installed: _with(model, hs, i, a)
        if variant != "today" or args.fit_today:
            for hp in fit_halting(model, val_cache, cfg.model.halting_lambdas, epochs=cfg.model.halting_epochs):
                hs = copy.deepcopy(model.halters)
                hs.load_state_dict(hp.state)
                x, acc = offline(dact.DactPolicy(), cache.y, t, halting_h(model, hs, cache))
                key = f"dact:{hp.lam:g}"
                pts.append({"family": "dact", "point": f"λ={hp.lam:g}", "avg_exit_layer": x, "accuracy": acc,
                            "key": key})
                calls[key] = lambda i, a, hs=hs: _with(model, hs, i, a)
        if cfg.model.halting_thresholds and cfg.model.halting_input == "confidence":
            from dact_lib.halting import threshold_points

            for hp in threshold_points(model, val_cache):
                hs = copy.deepcopy(model.halters)
                hs.load_state_dict(hp.state)
                x, acc = offline(dact.DactPolicy(), cache.y, t, halting_h(model, hs, cache))
                key = f"dact:τ{hp.threshold:g}"
                pts.append({"family": "dact", "point": f"threshold τ={hp.threshold:g}", "avg_exit_layer": x,
                            "accuracy": acc, "key": key})
                calls[key] = lambda i, a, hs=hs: _with(model, hs, i, a)
        lnk = math.log(K)
        for f in ENTROPY_FRACS:
            pol = dact.EntropyPolicy(f * lnk)
            x, acc = offline(pol, cache.y, t)
            pts.append({"family": "entropy", "point": f"S={f:g}·lnK", "avg_exit_layer": x, "accuracy": acc,
                        "key": f"entropy:{f}"})
            calls[f"entropy:{f}"] = lambda i, a, pol=pol: model.infer(i, a, pol, trace=False)
        for k in range(1, N):
            pol = dact.PatiencePolicy(k)
            x, acc = offline(pol, cache.y, t)
            pts.append({"family": "patience", "point": f"t={k}", "avg_exit_layer": x, "accuracy": acc,
                        "key": f"patience:{k}"})
            calls[f"patience:{k}"] = lambda i, a, pol=pol: model.infer(i, a, pol, trace=False)
        for k in range(1, N + 1):
            pol = dact.FixedDepthPolicy(k)
            x, acc = offline(pol, cache.y, t)
            pts.append({"family": "fixed", "point": f"k={k}", "avg_exit_layer": x, "accuracy": acc,
                        "key": f"fixed:{k}"})
            calls[f"fixed:{k}"] = lambda i, a, pol=pol: model.infer(i, a, pol, trace=False)
        never = copy.deepcopy(model.halters)  # h_n = 1: the DACT rule runs at every layer and never halts early
        with torch.no_grad():
            for mlp in never:
                mlp[-1].weight.zero_()
                mlp[-1].bias.fill_(30.0)
        calls["dact:never"] = lambda i, a, hs=never: _with(model, hs, i, a)
        calls["entropy:never"] = lambda i, a, pol=dact.EntropyPolicy(0.0): model.infer(i, a, pol, trace=False)
        lat = latencies(items, calls)
        for p in pts:
            p["latency_ms"] = lat[p["key"]]
            p["speedup"] = lat["reference"] / lat[p["key"]]
            p["loss_pts"] = 100 * (ref_acc - p["accuracy"])
        layer_ms = lat["plain"] / N
        rule_ms = (lat["dact:never"] - lat["plain"]) / N
        ent_ms = (lat["entropy:never"] - lat["plain"]) / N
        v = {"train_s": train_s, "fit_halting_s": fit_s, "exit_refit_s": getattr(args, "last_refit_s", 0.0),
             "points": pts, "reference_ms": lat["reference"],
             "plain_ms": lat["plain"], "fixed_N_ms": lat[f"fixed:{N}"], "layer_ms": layer_ms, "rule_ms": rule_ms,
             "entropy_ms": ent_ms,
             "config": cfg.model.__dict__ | {"classifier": None, "halting": None}}
        best = {}
        for fam in ("dact", "entropy", "patience", "fixed"):
            ok = [p for p in pts if p["family"] == fam and p["loss_pts"] <= 1.0 + 1e-9]
            best[fam] = max(ok, key=lambda p: p["speedup"]) if ok else None
        v["best_within_1pt"] = best
        dpts = [p for p in pts if p["family"] == "dact" and p["key"] != "dact:installed"] or pts[:1]
        v["dact_vs"] = {fam: gap_of(pts, fam) for fam in ("entropy", "patience")}
        # the worst gap among the DACT front points within 1 point of the reference (the points a user would pick)
        v["dact_vs_within_1pt"] = {fam: gap_of(pts, fam, within_pts=1.0) for fam in ("entropy", "patience")}
        v["front_points_1.5_5.5"] = len([p for p in front(dpts) if 1.5 <= p["avg_exit_layer"] <= 5.5])
        ds_out["variants"][variant] = v
        print_variant(name, variant, v, ref_acc, lat["reference"], N)
        save_json(args.out, out)
        for spec_in in (("summary", "both") if variant == "default" and args.inputs else ()):
            m2 = copy.deepcopy(model)
            m2.cfg = copy.deepcopy(cfg.model)
            m2.cfg.halting_input = spec_in
            from dact_lib.heads import build_mlp
            m2.halters = torch.nn.ModuleList([build_mlp(m2.halting_in_dim(m2.cfg, m2.adapter.hidden_size), 1,
                                                        m2.cfg.halting) for _ in range(N)])
            rows = []
            for hp in fit_halting(m2, val_cache, cfg.model.halting_lambdas, epochs=cfg.model.halting_epochs):
                hs = copy.deepcopy(m2.halters)
                hs.load_state_dict(hp.state)
                x, acc = offline(dact.DactPolicy(), cache.y, t, halting_h(m2, hs, cache))
                rows.append({"family": "dact", "point": f"λ={hp.lam:g}", "avg_exit_layer": x, "accuracy": acc})
            f = front(rows)
            v.setdefault("halting_inputs", {})[spec_in] = rows
            print(f"halting_input={spec_in}: front " + ", ".join(
                f"{p['avg_exit_layer']:.2f}L {100 * p['accuracy']:.2f}%" for p in f), flush=True)
        save_json(args.out, out)


def _with(model, halters, ids, am):
    from dact_lib import dact

    saved = model.halters
    model.halters = halters
    try:
        return model.infer(ids, am, dact.DactPolicy(), trace=False)
    finally:
        model.halters = saved


def print_variant(name, variant, v, ref_acc, ref_ms, N):
    print(f"\n### {name} · DACT variant `{variant}` — trained in {v['train_s']:.0f} s (+ halting fit "
          f"{v['fit_halting_s']:.1f} s); reference {100 * ref_acc:.2f}% at {ref_ms:.2f} ms/sentence")
    print(f"fixed depth {N} through infer: {v['fixed_N_ms']:.2f} ms vs plain {v['plain_ms']:.2f} ms "
          f"({100 * (v['fixed_N_ms'] / v['plain_ms'] - 1):+.1f}%); a layer ≈ {v['layer_ms']:.3f} ms (plain / N); per layer, "
          f"DACT unit + rule {v['rule_ms']:.3f} ms ({100 * v['rule_ms'] / v['layer_ms']:.1f}% of a layer), "
          f"classifier + entropy test {v['entropy_ms']:.3f} ms ({100 * v['entropy_ms'] / v['layer_ms']:.1f}%)")
    cols = [("family", "policy"), ("point", "point"), ("avg_exit_layer", "avg exit"), ("accuracy", "acc"),
            ("loss_pts", "loss vs ref (pts)"), ("latency_ms", "batch-1 ms"), ("speedup", "speed-up")]
    rows = [{**p, "accuracy": 100 * p["accuracy"]} for p in v["points"]]
    print(markdown_table(rows, cols))
    print("best within 1 point: " + "; ".join(
        f"{f}: {p['point']} {p['speedup']:.2f}× ({100 * p['accuracy']:.2f}%, {p['avg_exit_layer']:.2f} L)"
        if p else f"{f}: none" for f, p in v["best_within_1pt"].items()))
    print(f"DACT front vs entropy/patience (min, mean gap in points at equal exit): {v['dact_vs']}; "
          f"front points with 1.5-5.5 layers: {v['front_points_1.5_5.5']}", flush=True)


def overhead(args) -> None:
    """Batch-1 cost of the fast path alone, on the bundled encoder with untrained heads (what is timed does not
    depend on the weights): plain N layers + layer-N classifier, fixed depth N through ``infer``, the DACT rule
    that never halts (h_n = 1) and the entropy rule that never exits (S = 0), interleaved per sentence."""
    from dact_lib import dact
    from dact_lib.config import default_config
    from dact_lib.data import encode, read_csv
    from dact_lib.models import build_model

    ds = read_csv(Path(args.data_dir) / "sst2" / "dev.csv")
    rows = []
    for how in ("confidence", "both", "summary"):
        cfg = default_config("dact")
        cfg.model.halting_input = how
        model, tok = build_model(cfg, ds.label_maps)
        model.eval()
        with torch.no_grad():
            for mlp in model.halters:
                mlp[-1].weight.zero_()
                mlp[-1].bias.fill_(30.0)
        enc = encode(ds, tok, MAX_LEN)
        gen = np.random.default_rng(0)
        idx = gen.choice(len(enc), size=min(args.latency_rows, len(enc)), replace=False)
        items = [(torch.tensor([enc.input_ids[i]]), torch.ones(1, len(enc.input_ids[i]), dtype=torch.long))
                 for i in idx]
        N = model.num_layers
        calls = {"plain": lambda i, a: plain_full(model, i, a),
                 "fixed": lambda i, a: model.infer(i, a, dact.FixedDepthPolicy(N), trace=False),
                 "dact": lambda i, a: model.infer(i, a, dact.DactPolicy(), trace=False),
                 "entropy": lambda i, a: model.infer(i, a, dact.EntropyPolicy(0.0), trace=False),
                 "traced dact": lambda i, a: model.infer(i, a, dact.DactPolicy(), trace=True)}
        lat = {k: [] for k in calls}
        for _ in range(args.overhead_reps):
            one = latencies(items, calls)
            for k, v in one.items():
                lat[k].append(v)
        med = {k: statistics.median(v) for k, v in lat.items()}
        layer = med["plain"] / N
        rows.append({"halting_input": how, "plain_ms": med["plain"],
                     "fixed_pct": 100 * (med["fixed"] / med["plain"] - 1),
                     "dact_layer_pct": 100 * (med["dact"] - med["plain"]) / N / layer,
                     "entropy_layer_pct": 100 * (med["entropy"] - med["plain"]) / N / layer,
                     # the rule's own cost: what the DACT rule adds on top of the per-layer classifier that every
                     # early-exit policy runs (the entropy rule that never exits runs exactly that classifier)
                     "rule_own_pct": 100 * (med["dact"] - med["entropy"]) / N / layer,
                     "traced_pct": 100 * (med["traced dact"] / med["plain"] - 1)})
    print(markdown_table(rows, [("halting_input", "halting input"), ("plain_ms", "plain 6 layers, ms"),
                                ("fixed_pct", "fixed 6 via infer vs plain, %"),
                                ("dact_layer_pct", "classifier + DACT unit + rule per layer, % of a layer"),
                                ("entropy_layer_pct", "classifier + entropy test per layer, %"),
                                ("rule_own_pct", "DACT unit + rule beyond the classifier, % of a layer"),
                                ("traced_pct", "traced (general) DACT path vs plain, %")]))


def summarize(results: list[dict]) -> str:
    """The cross-dataset table: reference, the no-flags point, the best point within 1 point per family, the DACT
    rule against entropy / patience at equal exit, training time."""
    rows = []
    for res in results:
        for name, ds in res["datasets"].items():
            for variant, v in ds.get("variants", {}).items():
                pts = v["points"]
                inst = next(p for p in pts if p["key"] == "dact:installed")
                best = v["best_within_1pt"]

                def b(f):
                    p = best.get(f)
                    return f"{p['point']} {p['speedup']:.2f}× ({p['loss_pts']:+.2f}, {p['avg_exit_layer']:.2f} L)" \
                        if p else "none"
                gap = v.get("dact_vs") or {}
                g = lambda f: (f"{gap[f][0]:+.2f} / {gap[f][1]:+.2f}" if gap.get(f) else "—")  # noqa: E731
                near = gap_of(pts, "entropy", within_pts=1.0)
                cal = " + halting_calibration" if (v.get("config") or {}).get("halting_calibration") else ""
                rows.append({"dataset": name, "variant": variant + cal,
                             "ref": f"{100 * ds['reference']['accuracy']:.2f}% · {v['reference_ms']:.1f} ms",
                             "installed": f"{inst['avg_exit_layer']:.2f} L, {100 * inst['accuracy']:.2f}% "
                                          f"({inst['loss_pts']:+.2f}), {inst['speedup']:.2f}×",
                             "dact": b("dact"), "entropy": b("entropy"), "patience": b("patience"),
                             "fixed": b("fixed"), "gap_e": g("entropy"), "gap_p": g("patience"),
                             "gap_near": f"{near[0]:+.2f}" if near else "—",
                             "front": v.get("front_points_1.5_5.5"),
                             "train": f"{v['train_s']:.0f} s (+{v.get('exit_refit_s', 0):.0f} s refit, "
                                      f"+{v['fit_halting_s']:.0f} s fit)",
                             "fixedN": f"{100 * (v['fixed_N_ms'] / v['plain_ms'] - 1):+.1f}%",
                             "rule": f"{100 * v['rule_ms'] / v['layer_ms']:.1f}%"})
    cols = [("dataset", "dataset"), ("variant", "DACT variant"), ("ref", "reference (backbone)"),
            ("installed", "the run's own DACT point (exit, acc, points below ref, speed-up)"),
            ("dact", "best DACT-rule λ ≤ 1 pt (speed-up, points below ref, exit)"), ("entropy", "best entropy ≤ 1 pt"),
            ("patience", "best patience ≤ 1 pt"), ("fixed", "best fixed depth ≤ 1 pt"),
            ("gap_e", "DACT − entropy at equal exit, min / mean (pts)"),
            ("gap_near", "DACT − entropy, worst front point ≤ 1 pt below ref"), ("gap_p", "DACT − patience (pts)"),
            ("front", "DACT front points in 1.5–5.5 L"), ("train", "train 1 epoch"),
            ("fixedN", "fixed N via infer vs plain"), ("rule", "DACT unit + rule per layer")]
    return markdown_table(rows, cols)


def train_time(args) -> None:
    """Training time of each variant, ``--epochs`` epochs, the variants of a dataset one after another in one
    process: the whole run (tokenising, epochs, validations, exit refit, halting fit, the last validation) per
    epoch, and each phase."""
    info = machine_info(args.threads)
    print(f"# Training time per epoch — {describe_machine(info)}; epochs {args.epochs}", flush=True)
    rows, out = [], {"machine": info, "args": vars(args), "runs": []}
    for name in args.datasets.split(","):
        train_ds, val_ds, _ = load(name, args.data_dir, args.max_rows)
        base = None
        for variant in args.variants.split(","):
            t0 = time.perf_counter()
            _, _, _, rest_s, fit_s = train_one("dact", variant, train_ds, val_ds, args)
            total = time.perf_counter() - t0
            refit_s = args.last_refit_s
            per_epoch = total / args.epochs
            base = base or per_epoch
            run = {"dataset": name, "variant": variant, "train_rows": len(train_ds), "epochs": args.epochs,
                   "total_s": total, "epochs_s": rest_s, "exit_refit_s": refit_s, "halting_fit_s": fit_s,
                   "per_epoch_s": per_epoch, "vs_first": per_epoch / base}
            out["runs"].append(run)
            rows.append([name, variant, f"{len(train_ds):,}", str(args.epochs), f"{total:.0f}",
                         f"{rest_s / args.epochs:.0f}", f"{refit_s:.0f}", f"{fit_s:.0f}", f"{per_epoch:.0f}",
                         f"{per_epoch / base:.2f}×"])
            print(rows[-1], flush=True)
            save_json(args.out, out)
    head = ["dataset", "variant", "train rows", "epochs", "whole run, s", "per epoch without refit and fit, s",
            "exit refit, s", "halting fit, s", "per epoch, all in, s", f"vs {args.variants.split(',')[0]}"]
    print("\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                    + ["| " + " | ".join(r) + " |" for r in rows]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="sst2,ag_news,trec6,sst5")
    ap.add_argument("--variants", default="default,today")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=None)
    ap.add_argument("--latency-rows", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inputs", action="store_true", help="also fit halting units reading summary / both")
    ap.add_argument("--fit-today", action="store_true", help="also fit halting units on the 'today' model")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--out", default="early_exit_suite.json")
    ap.add_argument("--summarize", nargs="*", default=None, help="print the summary table of these JSON files")
    ap.add_argument("--overhead", action="store_true", help="only time the fast path's own cost (see overhead())")
    ap.add_argument("--overhead-reps", type=int, default=3)
    ap.add_argument("--train-time", action="store_true",
                    help="only time training (every variant of --variants, --epochs each, early stopping off): "
                         "per-epoch time of the whole run, the exit refit and the halting fit included")
    args = ap.parse_args()
    if args.summarize:
        import json

        print(summarize([json.loads(Path(f).read_text()) for f in args.summarize]))
        return
    if not (Path(args.data_dir) / "sst2" / "train.csv").is_file():
        print(f"SKIPPED: {args.data_dir} has no datasets (pass --data-dir)", file=sys.stderr)
        return
    import warnings

    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    if args.overhead:
        overhead(args)
        return
    if args.train_time:
        train_time(args)
        return
    info = machine_info(args.threads)
    print(f"# Early-exit suite — {describe_machine(info)}; epochs {args.epochs}", flush=True)
    out = {"machine": info, "args": vars(args), "datasets": {}}
    for name in args.datasets.split(","):
        run_dataset(name, args, out)
    save_json(args.out, out)
    print("\n## Summary\n" + summarize([out]))


if __name__ == "__main__":
    main()
