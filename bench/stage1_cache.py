"""Stage-1 cost: one DACT head-architecture trial on CACHED per-layer features vs trials that run the encoder.

Setting: SST-2 train (``--rows`` stratified sample, default 2,000; split 90/10 into train/val with the library's
stratified split), the bundled all-MiniLM-L6-v2 encoder FROZEN, max_seq_len 128. The head training is the
pipeline's own (``dact_pipeline.fit_heads_on_features`` / ``FeatureDactHeads``: DactBert's unit code,
``dact.accumulate`` + ``dact.dact_loss`` at λ = 1e-3) with the library's default DACT heads (mean pooling,
classifier MLP [128] GELU, halting MLP [64]), 15 epochs (``--epochs``), AdamW lr 1e-3, batch 64.

Threads: the encoder runs with ``--threads`` (2) torch threads. The heads train with ``--heads-threads`` (1, the
pipeline's ``PipelineConfig.stage1_threads`` default) in every row that trains heads, so all rows do the SAME
head training: the heads are small matmuls and on this shared 2-core machine two threads made them ~10-20x
slower (spin-waiting for a descheduled sibling thread); one row shows the cached trial at 2 threads.

Rows:
  cache build     — ONE frozen-encoder pass over train + val, both poolings (cls and mean), written to the cache
                    (the one-time cost the pipeline pays; forced to be a miss by deleting the entries first);
  cache load      — the same entries read back (a hit);
  cached trial    — one stage-1 trial on the cached features (median of ``--repeats``);
  cached trial, 2 threads — the same with 2 threads for the heads (``--loop-epochs`` epochs measured, scaled);
  encoder once    — a trial without the cache that runs the frozen encoder once per trial (train + val) and then
                    trains the same heads. Its encoder pass is exactly the cache build's work, so by default it is
                    reported as build + cached trial (``--measure-once`` measures it: one more encoder pass);
  encoder in loop — a trial that runs the frozen encoder on every batch of every epoch (train + val), as a
                    DactBert ``train()`` with a frozen encoder would. Measured over ``--loop-epochs`` epochs and
                    scaled linearly to ``--epochs`` (every epoch does the same work), unless --full.

Wall time is noisy on a shared machine (load average printed); user CPU s (all threads of this process) is printed
next to it.

    .venv/bin/python bench/stage1_cache.py                 # ~4 min on 2 shared cores
    .venv/bin/python bench/stage1_cache.py --rows 300 --epochs 3 --repeats 1   # smoke run
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa: E402


def user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


class Timer:
    wall = cpu = 0.0

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), user_cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w0, user_cpu() - self.c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--loop-epochs", type=int, default=1, help="epochs measured for the scaled rows")
    ap.add_argument("--full", action="store_true", help="run 'encoder in loop' for all --epochs (slow)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measure-once", action="store_true", help="measure 'encoder once' instead of deriving it")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the encoder")
    ap.add_argument("--heads-threads", type=int, default=1, help="torch threads of the head training")
    args = ap.parse_args()

    train_csv = Path(args.data_dir) / "sst2" / "train.csv"
    if not train_csv.is_file():
        print(f"SKIPPED: {train_csv} not found (developers and CI have ../shared/data); pass --data-dir DIR.")
        return
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from dact_lib import dact
    from dact_lib.config import DactModelConfig
    from dact_lib.data import encode, iter_batches, read_csv, split_dataset
    from dact_lib.encoders import layer_adapter, load_encoder
    from dact_lib.features import cached_features_many, feature_key, feature_path
    from dact_lib.heads import pool
    from dact_lib.tuning.dact_pipeline import FeatureDactHeads, fit_heads_on_features

    info = machine_info(args.threads)
    enc_name, L, lam, lr, bs, ht = "all-MiniLM-L6-v2", args.max_seq_len, 1e-3, 1e-3, 64, args.heads_threads
    ds = read_csv(train_csv, max_rows=args.rows, seed=0, name="sst2")
    split = split_dataset(ds, val_frac=0.1, test_frac=0.0, seed=0)
    parts = {"train": split.train, "val": split.val}
    task = ds.tasks[0]
    K = ds.num_classes(task)
    y_tr = torch.as_tensor(split.train.targets[task])
    y_va = torch.as_tensor(split.val.targets[task])
    cfg = DactModelConfig(ponder_lambda=lam)  # defaults: mean pooling, classifier [128], halting [64]
    model, tok = load_encoder(enc_name)  # extract/verify the bundled checkpoint outside the timings
    model.eval()
    ad = layer_adapter(model)

    # --- cache build (forced miss) and load (hit) ------------------------------------------------------------
    for part in parts.values():
        for p in ("cls", "mean"):
            feature_path(feature_key(enc_name, part, pooling=p, max_seq_len=L)).unlink(missing_ok=True)
    with Timer() as t_build:
        built = cached_features_many(enc_name, parts, poolings=("cls", "mean"), max_seq_len=L)
    assert not any(c.cache_hit for v in built.values() for c in v.values()), "another process wrote the cache"
    with Timer() as t_load:
        got = cached_features_many(enc_name, parts, poolings=("cls", "mean"), max_seq_len=L)
    assert all(c.cache_hit for v in got.values() for c in v.values())
    x_tr, x_va = got["train"][cfg.pooling].features, got["val"][cfg.pooling].features

    # --- trials on cached features ------------------------------------------------------------------------------
    fit_heads_on_features(cfg, K, x_tr[:256], y_tr[:256], x_va, y_va, epochs=1, num_threads=ht)  # warm-up
    times = []
    for r in range(args.repeats):
        with Timer() as t:
            fit = fit_heads_on_features(cfg, K, x_tr, y_tr, x_va, y_va, epochs=args.epochs, lr=lr, batch_size=bs,
                                        seed=r, num_threads=ht)
        times.append(t)
    cached = sorted(times, key=lambda t: t.wall)[len(times) // 2]
    few = args.epochs if args.full else min(args.loop_epochs, args.epochs)
    scale = args.epochs / few
    with Timer() as t2:
        fit_heads_on_features(cfg, K, x_tr, y_tr, x_va, y_va, epochs=few, lr=lr, batch_size=bs, seed=0,
                              num_threads=args.threads)

    # --- without the cache ---------------------------------------------------------------------------------------
    enc = {k: encode(v, tok, L) for k, v in parts.items()}

    @torch.no_grad()
    def feats_of(batch) -> torch.Tensor:  # encoder threads
        am = batch["attention_mask"]
        h = ad.embed(batch["input_ids"], am)
        mask = ad.prepare_mask(am, h.dtype)
        out = []
        for i in range(ad.num_layers):
            h = ad.run_layer(i, h, mask)
            out.append(pool(h, am, cfg.pooling))
        return torch.stack(out, 1)

    if args.measure_once:
        def all_feats(e) -> torch.Tensor:
            x = torch.zeros(len(e), ad.num_layers, ad.hidden_size)
            for b in iter_batches(e, bs, group_by_length=True):
                x[b["index"]] = feats_of(b)
            return x

        with Timer() as t_once:
            xo_tr, xo_va = all_feats(enc["train"]), all_feats(enc["val"])
            fit_heads_on_features(cfg, K, xo_tr, y_tr, xo_va, y_va, epochs=args.epochs, lr=lr, batch_size=bs,
                                  seed=0, num_threads=ht)
    else:
        t_once = Timer()
        t_once.wall, t_once.cpu = t_build.wall + cached.wall, t_build.cpu + cached.cpu

    with Timer() as t_loop:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            heads = FeatureDactHeads(cfg, ad.num_layers, ad.hidden_size, K)
            opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
            for epoch in range(few):
                heads.train()
                for b in iter_batches(enc["train"], bs, shuffle=True, seed=0, epoch=epoch, group_by_length=True):
                    x = feats_of(b)
                    torch.set_num_threads(ht)  # the same head training as the cached trial
                    y, h = heads(x)
                    a, p = dact.accumulate(y, h)
                    loss = dact.dact_loss(a[:, -1], p, b["targets"][task], lam).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    torch.set_num_threads(args.threads)
                heads.eval()
                with torch.no_grad():
                    for b in iter_batches(enc["val"], bs, group_by_length=True):
                        y, h = heads(feats_of(b))
                        a, p = dact.accumulate(y, h)
                        dact.dact_loss(a[:, -1], p, b["targets"][task], lam)

    note = "" if scale == 1 else f" (measured {few}, x{scale:g})"
    rows = [
        {"what": f"cache build: 1 encoder pass, train+val, cls+mean (one-time; {args.threads} threads)",
         "wall": t_build.wall, "cpu": t_build.cpu},
        {"what": "cache load (hit): train+val, cls+mean", "wall": t_load.wall, "cpu": t_load.cpu},
        {"what": f"stage-1 trial on cached features ({args.epochs} epochs; heads {ht} thread(s); median of "
                 f"{args.repeats})", "wall": cached.wall, "cpu": cached.cpu},
        {"what": f"same, heads on {args.threads} threads{note}", "wall": t2.wall * scale, "cpu": t2.cpu * scale},
        {"what": "trial without cache: encoder once per trial, then the same head training"
                 + ("" if args.measure_once else " (= build + cached trial)"), "wall": t_once.wall, "cpu": t_once.cpu},
        {"what": f"trial without cache: encoder in the loop, every batch of {args.epochs} epochs{note}",
         "wall": t_loop.wall * scale, "cpu": t_loop.cpu * scale},
    ]
    for r in rows:
        r["x"] = r["wall"] / cached.wall
        r["xc"] = r["cpu"] / max(cached.cpu, 1e-9)
    print(describe_machine(info))
    print(f"SST-2 train sample: {len(ds)} rows -> train {len(split.train)} / val {len(split.val)}; encoder {enc_name} "
          f"(frozen, {ad.num_layers} layers, hidden {ad.hidden_size}); max_seq_len {L}; heads: pooling "
          f"{cfg.pooling}, classifier {cfg.classifier.resolved_dims()}, halting {cfg.halting.resolved_dims()}; "
          f"λ {lam}; lr {lr}; batch {bs}; cached trial: val loss {fit.val_loss:.4f}, val acc "
          f"{fit.metrics['val_accuracy']:.3f}, avg exit layer {fit.metrics['val_avg_exit_layer']:.2f}")
    print()
    print(markdown_table(rows, [("what", "what"), ("wall", "wall s", 2), ("cpu", "user CPU s", 2),
                                ("x", "÷ cached trial (wall)", 1), ("xc", "÷ cached trial (CPU)", 1)]))
    print()
    print(f"A cached stage-1 trial is {rows[5]['x']:.0f}x (wall) / {rows[5]['xc']:.0f}x (CPU) cheaper than a trial "
          f"with the encoder in the loop and {rows[4]['x']:.1f}x / {rows[4]['xc']:.1f}x cheaper than one that runs "
          f"the encoder once; {args.repeats} cached trials took {', '.join(f'{t.wall:.1f}' for t in times)} s. "
          f"Load average now: {os.getloadavg()[0]:.2f}.")
    save_json("stage1_cache.json", {"machine": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
