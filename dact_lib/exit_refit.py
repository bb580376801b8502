"""Refitting the internal classifiers after training (kind 'dact', ``model.exit_refit_epochs``).

One or a few epochs of joint training leave the shallow classifiers far from what their layers can give: the
encoder moves under them and they see each training row once or twice. Measured on TREC-6 after 1 epoch
(docs/benchmarks.md, "exit refit"): layer 1 at 58 % test accuracy, layer 2 at 73 %; the same layers' summaries read
by classifiers trained to convergence give 88 % and 92 %. So after training, every classifier of layers 1..N-1 is
trained again — on its layer's cached summaries of the training rows (encoder frozen, one forward pass in eval
mode), cross-entropy on the labels, AdamW, the epoch with the best mean validation accuracy of those layers kept.
The deepest classifier is left as trained (the model's full-depth answer and its accuracy do not change) and the
encoder is not touched; the halting units are fitted afterwards on the refitted classifiers (``halting.py``).
This is FastBERT's second phase (student classifiers trained with the backbone fixed) without its distillation
term: measured, distilling from y_N made the entropy front of the refitted exits less aggressive (the option was
retired; docs/benchmarks.md, "Early exit that pays", keeps its numbers).
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .heads import pool

__all__ = ["summary_cache", "refit_exits", "refit_after_training", "fit_temperatures", "apply_temperatures",
           "temperatures_after_training", "TEMPERATURE_GRID"]


@torch.no_grad()
def summary_cache(model, enc, batch_size: int = 64, rows: np.ndarray | None = None, progress=None):
    """(summaries [n, N, D] of every layer, deepest-classifier probabilities [n, K], targets [n]) of the rows of
    ``enc`` (an EncodedDataset; ``rows`` a subset of its indices), model in eval mode. ``progress(done, total)``
    after every batch (rows done)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    ad, N = model.adapter, model.num_layers
    enc = enc.subset(rows) if rows is not None else enc
    n = len(enc)
    summ = torch.zeros(n, N, ad.hidden_size)
    y_deep = torch.zeros(n, model.num_classes)
    done = [0]

    def on_layer(idx, i, hid, am):
        summ[idx, i] = pool(hid, am, model.cfg.pooling).float().cpu()

    def on_batch(idx, hid, am):
        y_deep[idx] = model.classify(N, summ[idx, N - 1].to(device).to(hid.dtype))[0].float().cpu()
        done[0] += len(idx)
        if progress is not None:
            progress(done[0], n)

    ad.each_layer(enc, batch_size, device, on_layer, on_batch)
    model.train(was)
    return summ, y_deep, torch.as_tensor(enc.targets[model.task]).long().clone()


# complexity: one training loop (epochs x batches) with cancel, deadline, distillation and best-epoch keeping
def refit_exits(model, train_cache, val_cache, *, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64,
                weight_decay: float = 0.01, seed: int = 0,
                cancel=None, deadline: float | None = None, progress=None) -> dict:
    """Train the classifiers of layers 1..N-1 of ``model`` again on cached summaries (:func:`summary_cache` of
    the training rows; ``val_cache`` of the validation rows picks the epoch), in place. The deepest classifier,
    the encoder and the halting units stay bit-identical. With ``share_weights`` (one classifier for every layer)
    there is nothing to refit without changing the deepest answer: returns ``{"skipped": ...}``.
    ``progress(epoch, epochs)`` after every epoch."""
    if model.cfg.share_weights:
        return {"skipped": "share_weights: the one classifier is also the deepest one"}
    N = model.num_layers
    layers = list(range(N - 1))
    summ, y_deep, targets = train_cache
    v_summ, _, v_targets = val_cache
    clfs = [copy.deepcopy(model.classifiers[i]).float() for i in layers]
    params = [p for c in clfs for p in c.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def val_acc() -> list[float]:
        with torch.no_grad():
            return [float((c(v_summ[:, i]).argmax(-1) == v_targets).float().mean()) for c, i in zip(clfs, layers)]

    for c in clfs:
        c.eval()
    before = val_acc()
    best, best_epoch, best_state = float(np.mean(before)), 0, [copy.deepcopy(c.state_dict()) for c in clfs]
    n = len(targets)
    stopped = None
    history = []  # mean validation accuracy of the refitted layers after every epoch
    t0 = time.perf_counter()
    with torch.enable_grad():
        for epoch in range(1, epochs + 1):
            for c in clfs:
                c.train()
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, batch_size):
                if cancel is not None:
                    cancel.check()
                idx = perm[s:s + batch_size]
                loss = summ.new_zeros(())
                for c, i in zip(clfs, layers):
                    logits = c(summ[idx, i])
                    loss = loss + F.cross_entropy(logits, targets[idx])
                opt.zero_grad(set_to_none=True)
                (loss / len(layers)).backward()
                opt.step()
            for c in clfs:
                c.eval()
            acc = float(np.mean(val_acc()))
            history.append(acc)
            if progress is not None:
                progress(epoch, epochs)
            if acc > best:
                best, best_epoch, best_state = acc, epoch, [copy.deepcopy(c.state_dict()) for c in clfs]
            if deadline is not None and time.monotonic() >= deadline and epoch < epochs:
                stopped = f"time limit reached after epoch {epoch} of {epochs}"  # the best epoch so far is kept
                break
    with torch.no_grad():
        for c, i, state in zip(clfs, layers, best_state):
            c.load_state_dict(state)
            target = model.classifiers[i]
            for dst, src in zip(target.parameters(), c.parameters()):
                dst.copy_(src.to(dst.dtype))
    after = val_acc()
    model.__dict__.pop("_fast", None)  # the fast inference path's copies of the classifier weights
    out = {"layers": [i + 1 for i in layers], "rows": n, "epochs": epochs, "best_epoch": best_epoch,
           "val_history": history, "val_accuracy_before": before, "val_accuracy_after": after,
           "seconds": time.perf_counter() - t0}
    return {**out, "stopped": stopped} if stopped else out


def refit_after_training(model, cfg, enc_train, enc_val, cancel=None, deadline: float | None = None,
                         progress=None) -> dict:
    """Kind 'dact' with ``model.exit_refit_epochs`` > 0: :func:`refit_exits` on the training rows (at most
    ``model.exit_refit_max_rows``, a seeded sample) and the validation split; returns the report. ``deadline``
    (``time.monotonic()``, the run's ``train.time_limit_min``): no new epoch starts after it. ``progress(what,
    done, total)``: the phase's own progress (caching the summaries, then the refit's epochs)."""
    def step(what):
        return None if progress is None else (lambda done, total: progress(what, done, total))

    mc = cfg.model
    if mc.share_weights:  # before the caches (a pass over the training rows) that it would not use
        return {"skipped": "share_weights: the one classifier is also the deepest one", "seconds": 0.0}
    t0 = time.perf_counter()
    rows = None
    if len(enc_train) > mc.exit_refit_max_rows:
        rows = np.sort(np.random.default_rng(cfg.train.seed).choice(len(enc_train), mc.exit_refit_max_rows,
                                                                    replace=False))
    train_cache = summary_cache(model, enc_train, rows=rows, progress=step("caching the layer summaries (train rows)"))
    val_cache = summary_cache(model, enc_val, progress=step("caching the layer summaries (validation rows)"))
    cache_s = time.perf_counter() - t0
    out = refit_exits(model, train_cache, val_cache, epochs=mc.exit_refit_epochs, lr=mc.exit_refit_lr,
                      seed=cfg.train.seed,
                      cancel=cancel, deadline=deadline, progress=step("refitting the exit classifiers (epoch)"))
    return {**out, "cache_s": cache_s, "seconds": time.perf_counter() - t0}


# --- temperature-calibrated exits (``model.exit_temperature``) --------------------------------------------------
# the temperatures tried per layer: 161 log-spaced values from 0.2 to 5, T = 1 among them (the validation NLL is
# minimised on it: deterministic, exact to ±1 % of T, never worse than no scaling). Bounded: a layer that is right on
# every validation row would otherwise sharpen without limit (the NLL falls as T -> 0)
TEMPERATURE_GRID = torch.logspace(math.log10(0.2), math.log10(5.0), 161, dtype=torch.float64)


def _scaled(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """softmax(log y / T) for probabilities y [..., K] (= softmax(logits / T)); T broadcasts over y[..., 0]."""
    return (y.double().clamp_min(1e-30).log() / t.unsqueeze(-1)).softmax(-1)


def fit_temperatures(y: torch.Tensor, targets: torch.Tensor, shared: bool = False) -> list[float]:
    """Per layer n, the temperature T_n in :data:`TEMPERATURE_GRID` that minimises the NLL of softmax(log y_n / T_n)
    on the rows (y [rows, N, K] the layers' class probabilities, targets [rows]); ``shared``: one T for every layer
    (one classifier shared by all layers). Temperature scaling (Guo et al. 2017) never changes a layer's argmax."""
    logy = y.double().clamp_min(1e-30).log()  # = logits up to a per-row constant
    own = logy.gather(-1, targets.view(-1, 1, 1).expand(-1, y.shape[1], 1)).squeeze(-1)  # [rows, N]
    grid = TEMPERATURE_GRID
    # validation NLL of every (T, layer), [T, N]: −mean(logit_target / T − logsumexp(logits / T)), one T at a time
    nll = torch.stack([-(own / t - torch.logsumexp(logy / t, -1)).mean(0) for t in grid])
    if shared:
        return [round(float(grid[int(nll.mean(1).argmin())]), 6)] * y.shape[1]
    return [round(float(grid[int(i)]), 6) for i in nll.argmin(0)]


@torch.no_grad()
def apply_temperatures(model, temperatures: list[float]) -> None:
    """Fold T_n into layer n's classifier: its output layer's weight and bias divided by T_n, so y_n =
    softmax(logits_n / T_n) on every path (training, ``infer``, the batch-1 fast path, saved models) at no cost."""
    from torch import nn

    units = model.classifiers
    temps = temperatures[:1] if model.cfg.share_weights else temperatures
    if len(temps) != len(units):
        raise ValueError(f"apply_temperatures: {len(temperatures)} temperatures for {len(units)} classifiers")
    for clf, t in zip(units, temps):
        last = [m for m in clf if isinstance(m, nn.Linear)][-1]
        last.weight.div_(float(t))  # in place: the batch-1 fast path's numpy views share this memory
        last.bias.div_(float(t))


def temperatures_after_training(model, cfg, enc_val):
    """Kind 'dact' with ``model.exit_temperature``: fit one temperature per exit on the validation split
    (:func:`fit_temperatures`), fold them into the classifiers (:func:`apply_temperatures`). Returns the report —
    the temperatures and every layer's validation NLL before and after (accuracy per layer is unchanged) — and the
    validation split's per-layer cache with the calibrated y_n, for the halting fit that follows (no second pass)."""
    from .halting import LayerCache, layer_cache

    t0 = time.perf_counter()
    cache = layer_cache(model, enc_val)
    temps = fit_temperatures(cache.y, cache.targets, shared=model.cfg.share_weights)
    t = torch.tensor(temps, dtype=torch.float64)

    def nll(y):
        return [float(-y[:, n].clamp_min(1e-300).log().gather(-1, cache.targets.view(-1, 1)).mean())
                for n in range(y.shape[1])]

    scaled = _scaled(cache.y, t)
    before, after = nll(cache.y.double()), nll(scaled)
    apply_temperatures(model, temps)
    report = {"temperatures": temps, "val_nll_before": before, "val_nll_after": after, "rows": len(cache),
              "seconds": time.perf_counter() - t0}
    return report, LayerCache(base=cache.base, y=scaled.to(cache.y.dtype), targets=cache.targets)
