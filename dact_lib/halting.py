"""Halting units fitted on their own: one trained DactBert, its encoder and classifiers frozen, fresh halting units
trained per λ with the unchanged DACT loss on cached per-layer outputs.

The classifiers y_n of a trained model do not depend on λ; only the halting units h_n do. So the whole λ front of
one model comes from caching, once, every layer's summary (or trunk output) and y_n for rows the classifiers were
not trained on (the validation split), and then training only the small halting MLPs for each λ — seconds per λ
instead of a training run per λ:

    cache = layer_cache(model, enc_val)                       # one forward pass over the rows
    points = fit_halting(model, cache, lambdas=[0, 0.1, 1])   # one HaltingPoint per λ (normalised scale)
    install_halting(model, choose_point(points, tolerance=0.5))

λ is on the normalised scale of :func:`dact_lib.dact.spec_lambda`: the loss is the DACT loss of docs/dact_maths.md
``NLL(log a_N) + λ_spec · mean(rho)`` with ``λ_spec = λ · nll_ref / N`` and ``nll_ref`` the deepest classifier's
NLL on the cached rows, so λ = 1 means "running every layer costs as much as the full model's NLL", whatever the
task or N. Encoder and classifier weights are never touched (only new modules are optimised; ``install_halting``
copies halting weights into ``model.halters``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dact
from .errors import DactLabError
from .front import FrontPoint, report_chosen, report_points
from .heads import pool
from .modeling_dact import DactUnits, init_halting_bias

__all__ = ["LayerCache", "HaltingPoint", "layer_cache", "fit_halting", "cross_fit_halting", "fold_indices",
           "choose_point", "install_halting",
           "evaluate_halting", "point_metrics", "exit_advice", "fit_after_training"]


@dataclass
class LayerCache:
    base: torch.Tensor  # [n, N, D] what the halting MLP reads besides confidence: summary c_n or trunk output
    y: torch.Tensor  # [n, N, K] per-layer class probabilities
    targets: torch.Tensor  # [n] class indices

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, idx: torch.Tensor) -> "LayerCache":
        return LayerCache(self.base[idx], self.y[idx], self.targets[idx])


@dataclass
class HaltingPoint:
    lam: float  # λ on the normalised scale
    spec_lambda: float  # the same λ on the training loss's scale (λ · nll_ref / N)
    avg_exit_layer: float  # under the DACT rule, on the evaluation rows
    accuracy: float  # of the DACT rule's answer, on the evaluation rows (0..1)
    state: dict = field(repr=False, default_factory=dict)  # halting weights: load into model.halters
    fit_s: float = 0.0
    scale: float = 1.0  # z -> scale * z + shift of the halting logit: 1, 0 (older runs also tried calibrated variants)
    shift: float = 0.0
    threshold: float | None = None  # set by hand: h_n = sigmoid(s·(g(entropy_n / ln K) − g(τ))), not fitted
    # cross-fitted (:func:`cross_fit_halting`): avg_exit_layer / accuracy (and nll) above are measured on rows the
    # units of each fold were not fitted on; these are the same numbers on the rows they were fitted on
    seen_avg_exit_layer: float | None = None
    seen_accuracy: float | None = None
    nll: float | None = None  # out of fold, when asked for (cross_fit_halting(..., nll=True))

    def record(self) -> FrontPoint:
        """The point as a front records it (a threshold point has no λ)."""
        fitted = self.threshold is None
        return FrontPoint(val_accuracy=self.accuracy, val_avg_exit_layer=self.avg_exit_layer,
                          front_lambda=self.lam if fitted else None, train_lambda=self.spec_lambda if fitted else None,
                          threshold=self.threshold, scale=self.scale, shift=self.shift, val_nll=self.nll,
                          seen_val_accuracy=self.seen_accuracy, seen_val_avg_exit_layer=self.seen_avg_exit_layer,
                          fit_s=self.fit_s)


@torch.no_grad()
def layer_cache(model, enc, batch_size: int = 64, device=None, progress=None) -> LayerCache:
    """Per-layer halting base vectors and y_n of every row of ``enc`` (an EncodedDataset), model in eval mode.
    ``progress(done, total)`` after every batch (rows done)."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ad, N = model.adapter, model.num_layers
    base_dim = model.cfg.classifier.resolved_dims()[-1] if model.cfg.shared_trunk else ad.hidden_size
    n = len(enc)
    base = torch.zeros(n, N, base_dim)
    y = torch.zeros(n, N, model.num_classes)
    done = [0]

    def on_layer(idx, i, hid, am):
        y_n, bv = model.classify(i + 1, pool(hid, am, model.cfg.pooling))
        base[idx, i] = bv.float().cpu()
        y[idx, i] = y_n.float().cpu()

    def on_batch(idx, hid, am):
        done[0] += len(idx)
        if progress is not None:
            progress(done[0], n)

    ad.each_layer(enc, batch_size, device, on_layer, on_batch)
    model.train(was)
    return LayerCache(base=base, y=y, targets=torch.as_tensor(enc.targets[model.task]).long().clone())


class _Halters(DactUnits):
    """Fresh halting units with the model's shape, run the model's way (``DactUnits.halt_prob``)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.halters = copy.deepcopy(model.halters)
        for mlp in self.halters:
            for m in mlp.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        init_halting_bias(self.halters, model.cfg.halting_bias_init)

    def forward(self, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [B,N], a [B,N,K], p [B,N]) with a_{n-1} fed to the halting unit as in the model."""
        B, N, K = cache.y.shape
        a_n, p_n = cache.y.new_zeros(B, K), cache.y.new_ones(B)
        hs, a_list, p_list = [], [], []
        for n in range(1, N + 1):
            y_n = cache.y[:, n - 1]
            h_n = self.halt_prob(n, cache.base[:, n - 1], y_n, a_n)
            a_n, p_n = dact.accumulate_step(a_n, p_n, y_n, h_n)
            hs.append(h_n)
            a_list.append(a_n)
            p_list.append(p_n)
        return torch.stack(hs, 1), torch.stack(a_list, 1), torch.stack(p_list, 1)


@torch.no_grad()
def evaluate_halting(y: torch.Tensor, h: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(average exit layer, accuracy) of the DACT rule on stored y [B,N,K], h [B,N] (the online loop, simulated)."""
    res = dact.run_policy_offline(dact.DactPolicy(), y, h)
    return dact.average_exit_layer(res.exit_layer), float((res.probs.argmax(-1) == targets).float().mean())


@torch.no_grad()
def point_metrics(model, cache: LayerCache, state: dict) -> dict[str, float]:
    """The DACT rule with the halting weights ``state`` on the cached rows: average exit layer, accuracy of its
    answer, and the NLL of a_N (the quantity the DACT loss trains) — measured exactly as :func:`fit_halting` does."""
    units = _Halters(model).eval()
    units.halters.load_state_dict(state)
    h, a, _ = units(cache)
    avg, acc = evaluate_halting(cache.y, h, cache.targets)
    a_N = a[:, -1].clamp(min=1e-8)
    nll = float(torch.nn.functional.nll_loss(torch.log(a_N), cache.targets))
    return {"avg_exit_layer": avg, "accuracy": acc, "nll": nll}


def nll_ref_of(cache: LayerCache) -> float:
    """The deepest classifier's mean NLL on the cached rows (the normalised λ scale's unit; floored at 0.01)."""
    y_N = cache.y[:, -1].clamp(min=1e-8)
    return max(float(torch.nn.functional.nll_loss(torch.log(y_N), cache.targets)), 0.01)


def train_halting_units(model, cache: LayerCache, spec_lambdas, *, epochs: int, lr: float = 3e-3,
                        batch_size: int = 64, seed: int = 0, cancel=None, batched: bool = True,
                        progress=None) -> list[dict]:
    """Fresh halting units of ``model``'s shape trained with the DACT loss (λ on the training loss's scale, one set
    of units per λ in ``spec_lambdas``) on the cached rows; returns one halting state dict per λ.

    Every set starts from the same seeded initialisation and sees the same seeded batches, each with its own
    AdamW (weight decay 0). ``batched`` trains them side by side as one stacked model (``torch.func.vmap`` over
    the sets, the summed loss: the sets share no parameter, and AdamW's update is elementwise, so each set gets
    exactly its own loss's update) — one Python step per batch for all λ instead of one per λ: the same result as
    ``batched=False`` (the sets one after another) up to float rounding, ~10× faster for the default 15 λ.
    ``progress(done, total)`` after every epoch (of every set when they run one after another)."""
    from torch.func import functional_call, stack_module_state, vmap

    def fresh() -> _Halters:
        torch.manual_seed(seed)
        return _Halters(model)

    lams = [float(x) for x in spec_lambdas]
    states = []

    def fit(parameters, loss_of) -> None:
        """AdamW (no weight decay) on ``loss_of(batch)`` over the same seeded shuffled batches for every set."""
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(seed)
        for ep in range(epochs):
            for idx in torch.randperm(len(cache), generator=gen).split(batch_size):
                if cancel is not None:
                    cancel.check()
                loss = loss_of(cache.subset(idx))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            fits[0] += 1
            if progress is not None:
                progress(fits[0], fits[1])

    fits = [0, epochs * (len(lams) if not batched or len(lams) <= 1 else 1)]  # epochs done, in all
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        if not batched or len(lams) <= 1:
            for lam in lams:
                units = fresh().train()

                def loss_of(part, units=units, lam=lam):
                    _, a, p = units(part)
                    return dact.dact_loss(a[:, -1], p, part.targets, lam).loss

                fit(units.parameters(), loss_of)
                states.append({k: v.detach().clone() for k, v in units.halters.state_dict().items()})
            return states
        copies = [fresh().train() for _ in lams]
        params, buffers = stack_module_state(copies)
        runner = copies[0]
        lam_t = torch.tensor(lams)

        def terms(prm, buf, base, y, targets):
            _, a, p = functional_call(runner, (prm, buf), (LayerCache(base, y, targets),))
            out = dact.dact_loss(a[:, -1], p, targets, 0.0)  # the DACT loss without its ponder term; λ · ponder added per set below
            return out.nll, out.ponder

        per_set = vmap(terms, in_dims=(0, 0, None, None, None), randomness="different")

        def summed_loss(part):
            nll, ponder = per_set(params, buffers, part.base, part.y, part.targets)
            return (nll + lam_t * ponder).sum()

        fit(list(params.values()), summed_loss)
        prefix = "halters."
        for j in range(len(lams)):
            states.append({k[len(prefix):]: v[j].detach().clone() for k, v in params.items()
                           if k.startswith(prefix)})
    return states


def fit_halting(model, data, lambdas, *, eval_data: LayerCache | None = None, epochs: int | None = None,
                lr: float = 3e-3, batch_size: int = 64, seed: int = 0, cancel=None,
                progress=None) -> list[HaltingPoint]:
    """Train only fresh halting units of ``model``'s shape for every λ in ``lambdas`` (normalised scale) with the
    DACT loss on ``data`` (a :class:`LayerCache`, or an EncodedDataset that is cached first). The model is
    not changed. Each point is measured under the DACT rule on ``eval_data`` (default: ``data``)."""
    cache = data if isinstance(data, LayerCache) else layer_cache(model, data)
    if len(cache) == 0:
        raise DactLabError("fit_halting: no rows to fit the halting units on (the validation split is empty).")
    ev = eval_data if eval_data is not None else cache
    n_epochs = int(epochs) if epochs else int(getattr(model.cfg, "halting_epochs", 40))
    N = cache.y.shape[1]
    nll_ref = nll_ref_of(cache)
    lam_specs = [dact.spec_lambda(lam, N, nll_ref) for lam in lambdas]
    t0 = time.perf_counter()
    states = train_halting_units(model, cache, lam_specs, epochs=n_epochs, lr=lr, batch_size=batch_size, seed=seed,
                                 cancel=cancel, progress=progress)
    fit_s = (time.perf_counter() - t0) / max(len(lam_specs), 1)  # side by side: each λ's share of the fit
    units = _Halters(model)
    points = []
    for lam, lam_spec, state in zip(lambdas, lam_specs, states):
        units.halters.load_state_dict(state)
        units.eval()
        with torch.no_grad():
            h, _, _ = units(ev)
        avg, acc = evaluate_halting(ev.y, h, ev.targets)
        points.append(HaltingPoint(lam=float(lam), spec_lambda=lam_spec, avg_exit_layer=avg, accuracy=acc,
                                   state=state, fit_s=fit_s))
    return points


# below this many validation rows the halting points are measured on the rows they were fitted on (each fold of a
# 2-fold cross-fit would hold fewer than 20 rows: one row = 5 accuracy points); the report says which
CROSS_FIT_MIN_ROWS = 40
CROSS_FIT_FOLDS = 2


def fold_indices(targets: torch.Tensor, folds: int, seed: int = 0) -> list[torch.Tensor]:
    """``folds`` disjoint index sets covering every row, stratified: each class's rows (in a seeded order) are dealt
    to the folds in turn, the dealing continuing from class to class so the folds' sizes differ by at most one."""
    gen = torch.Generator().manual_seed(int(seed))
    parts: list[list[int]] = [[] for _ in range(folds)]
    k = 0
    t = torch.as_tensor(targets).long()
    for c in torch.unique(t).tolist():
        idx = (t == c).nonzero().flatten()
        for i in idx[torch.randperm(len(idx), generator=gen)].tolist():
            parts[k % folds].append(i)
            k += 1
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def cross_fit_halting(model, cache: LayerCache, lambdas, *, epochs: int | None = None, seed: int = 0, cancel=None,
                      folds: int = CROSS_FIT_FOLDS, nll: bool = False, progress=None
                      ) -> tuple[list[HaltingPoint], bool]:
    """:func:`fit_halting` on every row of ``cache`` (the halting weights the points carry), each point's average
    exit layer and accuracy (and, with ``nll``, the NLL of a_N) measured **out of fold**: for each of ``folds``
    stratified folds, the same λ fitted on the other folds and run on this one; the folds' numbers
    pooled by rows. Choosing a point on these numbers does not reward units that fit the choosing rows' noise (the
    in-sample numbers are kept as ``seen_*``). Returns ``(points, cross_fitted)``; with fewer than
    :data:`CROSS_FIT_MIN_ROWS` rows the points keep their in-sample numbers and ``cross_fitted`` is False.
    ``progress(what, done, total)``: each fit's epochs, named "fit k of K"."""
    n = len(cache)
    fits = 1 + (folds if n >= CROSS_FIT_MIN_ROWS and folds >= 2 else 0)

    def step(k):
        if progress is None:
            return None
        return lambda done, total: progress(f"fitting the halting units, fit {k} of {fits} (epoch)", done, total)

    points = fit_halting(model, cache, lambdas, epochs=epochs, seed=seed, cancel=cancel, progress=step(1))
    if n < CROSS_FIT_MIN_ROWS or folds < 2:
        return points, False
    sums = [[0.0, 0.0, 0.0] for _ in points]  # exit, accuracy, nll summed over rows
    for k, held in enumerate(parts := fold_indices(cache.targets, folds, seed)):
        rest = torch.cat([q for j, q in enumerate(parts) if j != k])
        held_cache = cache.subset(held)
        fold_points = fit_halting(model, cache.subset(rest), lambdas, eval_data=held_cache, epochs=epochs,
                                  seed=seed, cancel=cancel, progress=step(k + 2))
        for acc_sum, p in zip(sums, fold_points):
            acc_sum[0] += p.avg_exit_layer * len(held)
            acc_sum[1] += p.accuracy * len(held)
            if nll:
                acc_sum[2] += point_metrics(model, held_cache, p.state)["nll"] * len(held)
    for p, (ex, acc, ll) in zip(points, sums):
        p.seen_avg_exit_layer, p.seen_accuracy = p.avg_exit_layer, p.accuracy
        p.avg_exit_layer, p.accuracy = ex / n, acc / n
        if nll:
            p.nll = ll / n
    return points, True


# the normalised-entropy thresholds τ tried after every DACT training (and by stage 3, in this order while its trial
# budget lasts): every 0.1, then the entropy sweep's low end (0.02, 0.05) and the midpoints, so the DACT rule has a
# point wherever the entropy sweep has one and between (measured: docs/benchmarks.md, run M)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.02, 0.05, 0.15, 0.25, 0.35, 0.45)
# the slope of the threshold units' output logit: h_n is 0 or 1 to float32 except where the normalised entropy lies
# within ~1e-3 of τ, so under the DACT rule the answer is the exit layer's y_n and the exit the entropy policy's.
# A gentler slope (60 measured) leaves h_n between 0 and 1 for entropies within ~0.1 of τ: the rule goes on mixing
# y_n into a_n and its earliest points sat up to 0.9 point below entropy's at equal exit (measured:
# docs/benchmarks.md, run O).
THRESHOLD_SHARPNESS = 1.0e4


def threshold_state(model, tau: float, sharpness: float = THRESHOLD_SHARPNESS) -> dict:
    """Halting weights (``halting_input = "confidence"``) that read only the normalised entropy feature:
    h_n = sigmoid(s · (g(entropy_n / ln K) − g(τ))) with g the MLP's activation (monotone on [0, 1]), so a sample
    goes on while y_n is less certain than τ and stops (h_n ≈ 0) once it is more certain. Under the DACT rule, which
    stays exact with respect to a_N, these units make it exit like the entropy policy at S = τ·ln K."""
    if model.cfg.halting_input != "confidence":
        raise DactLabError("threshold halting units need model.halting_input = 'confidence'.")
    ent = list(dact.CONFIDENCE_FEATURES).index("entropy")
    units = copy.deepcopy(model.halters)
    with torch.no_grad():
        for mlp in units:
            lins = [m for m in mlp if isinstance(m, nn.Linear)]
            acts = [m for m in mlp if not isinstance(m, (nn.Linear, nn.Dropout))]
            for lin in lins:
                lin.weight.zero_()
                lin.bias.zero_()
            if len(lins) == 1:
                lins[0].weight[0, ent] = sharpness
                lins[0].bias[0] = -sharpness * tau
                continue
            lins[0].weight[0, ent] = 1.0  # hidden unit 0 carries the entropy feature through the hidden layers
            g = torch.tensor([float(tau)])
            for lin, act in zip(lins[1:-1], acts):
                lin.weight[0, 0] = 1.0
                g = act(g)
            g = acts[len(lins) - 2](g) if len(lins) >= 2 else g
            lins[-1].weight[0, 0] = sharpness
            lins[-1].bias[0] = -sharpness * float(g[0])
    return {k: v.detach().clone() for k, v in units.state_dict().items()}


def threshold_points(model, cache: LayerCache, thresholds=THRESHOLDS) -> list[HaltingPoint]:
    """One point per τ: :func:`threshold_state` measured exactly under the DACT rule on ``cache``."""
    units = _Halters(model).eval()
    out = []
    for tau in thresholds:
        state = threshold_state(model, tau)
        units.halters.load_state_dict(state)
        with torch.no_grad():
            h, _, _ = units(cache)
        avg, acc = evaluate_halting(cache.y, h, cache.targets)
        out.append(HaltingPoint(lam=float("nan"), spec_lambda=float("nan"), avg_exit_layer=avg, accuracy=acc,
                                state=state, threshold=float(tau)))
    return out


def front_of(points: list[HaltingPoint]) -> list[HaltingPoint]:
    """The points no other point beats on both average exit layer (lower) and accuracy (higher), by exit."""
    out = [p for p in points if not any(q.avg_exit_layer <= p.avg_exit_layer and q.accuracy >= p.accuracy and
                                        (q.avg_exit_layer < p.avg_exit_layer or q.accuracy > p.accuracy)
                                        for q in points)]
    return sorted(out, key=lambda p: p.avg_exit_layer)


def choose_point(points: list[HaltingPoint], tolerance: float = 0.5) -> HaltingPoint:
    """The point with the lowest average exit layer whose accuracy is within ``tolerance`` accuracy points of the
    most accurate point (ties: the more accurate, then the smaller λ)."""
    if not points:
        raise DactLabError("choose_point: no fitted halting points to choose from.")
    best = max(p.accuracy for p in points)
    ok = [p for p in points if p.accuracy >= best - tolerance / 100.0 - 1e-12]
    return min(ok, key=lambda p: (round(p.avg_exit_layer, 9), -p.accuracy, p.threshold is not None,
                                  p.lam if p.lam == p.lam else 0.0, p.scale, -p.shift))


def install_halting(model, point: HaltingPoint) -> None:
    """Load the halting weights of ``point`` into ``model.halters`` (nothing else changes)."""
    if not point.state:
        raise DactLabError("install_halting: this point carries no halting weights.")
    model.halters.load_state_dict({k: v.to(next(model.halters.parameters()).device) for k, v in point.state.items()})


def exit_advice(run_dir, num_layers: int | None = None, late: float = 0.8) -> str | None:
    """A sentence for the Runs and Early-exit pages when a DACT run exits late (average exit layer on its
    validation split above ``late`` · N): which setting trades accuracy for layers, with the sweep's measured
    numbers. None when the run exits early enough or is not a DACT run with a report."""
    import json
    from pathlib import Path

    try:
        rep = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    halting = rep.get("halting")
    best = rep.get("best") or {}
    if not halting:
        avg = best.get("val_avg_exit_layer")
        n = num_layers or 6
        if avg is None or avg <= late * n:
            return None
        return (f"This run exits after {avg:.2f} of {n} layers on average (validation): its halting units were "
                "trained with the model only (model.fit_halting off). Retrain with model.fit_halting on (the "
                "default; CLI without --no-fit-halting): the halting units are then fitted per λ on the validation "
                "split and the fastest point within model.halting_tolerance points is kept.")
    pts = report_points(halting)
    n = num_layers or (len(halting.get("layer_accuracy") or []) or 6)
    chosen = report_chosen(halting)
    chosen_exit = chosen.val_avg_exit_layer if chosen is not None else None
    if not pts or chosen_exit is None or chosen_exit <= late * n:
        return None
    top = max(p.val_accuracy or 0.0 for p in pts)
    faster = sorted((p for p in pts if (p.val_avg_exit_layer or 0.0) < chosen_exit - 0.25),
                    key=lambda p: -(p.val_accuracy or 0.0))[:3]
    if not faster:
        return (f"This run exits after {chosen_exit:.2f} of {n} layers on average: no fitted λ exits "
                "earlier on its validation split (its early classifiers are not confident enough). More epochs or "
                "model.distill_weight > 0 make them stronger.")

    def name(p: FrontPoint) -> str:
        return f"τ = {p.threshold:g}" if p.threshold is not None else \
            f"λ = {p.front_lambda:g}" if p.front_lambda is not None else "?"

    def line(p: FrontPoint) -> str:
        acc = p.val_accuracy or 0.0
        return f"{name(p)}: {p.val_avg_exit_layer:.2f} layers at {100 * acc:.1f}% ({100 * (acc - top):+.1f} points)"

    opts = "; ".join(line(p) for p in sorted(faster, key=lambda p: p.val_avg_exit_layer or 0.0))
    need = max(100 * (top - (p.val_accuracy or 0.0)) for p in faster[:1]) + 0.05
    msg = (f"This run exits after {chosen_exit:.2f} of {n} layers on average: within its tolerance of "
           f"{halting.get('tolerance_points', 0.5):g} points no fitted λ exits earlier. Measured on its validation "
           f"split ({halting.get('rows', '?')} rows): {opts}. Retrain with model.halting_tolerance ≥ {need:.1f} "
           f"(CLI --halting-tolerance) to take {name(faster[0])}.")
    ent = [p for p in halting.get("entropy_points") or [] if p["accuracy"] >= top - 0.01]
    if ent:
        e = min(ent, key=lambda p: p["avg_exit_layer"])
        if e["avg_exit_layer"] < chosen_exit - 0.25:
            msg += (f" The same classifiers under the entropy exit (S = {e['threshold']:.3g} nats) measured "
                    f"{e['avg_exit_layer']:.2f} layers at {100 * e['accuracy']:.1f}%: use it with `predict --policy "
                    f"entropy:{e['threshold']:.3g}` (compare every policy with `evaluate --policies`).")
    return msg


#: the halting weights of every point of a run's fitted front (``<run>/halting/run_front.safetensors``): keys
#: ``"<point index>/<parameter>"``; a point chosen on the Pareto explorer is copied out of it
FRONT_STATES = "run_front"


def save_front_states(run_dir, points: list[HaltingPoint]):
    """Keep the halting weights of every point of the run's front, in one file, so any point can be used later
    without a refit (the Pareto explorer's "use for prediction" of a single run)."""
    from .models import save_halting_file

    return save_halting_file(run_dir, FRONT_STATES, {f"{i}/{k}": v for i, p in enumerate(points)
                                                     for k, v in p.state.items()})


def front_state(run_dir, index: int) -> dict | None:
    """Point ``index``'s halting weights from :func:`save_front_states`' file; None when the run has none (trained
    before the file was kept) or no such point."""
    from pathlib import Path

    from safetensors.torch import load_file

    from .models import HALTING_DIR

    path = Path(run_dir) / HALTING_DIR / f"{FRONT_STATES}.safetensors"
    if not path.is_file():
        return None
    pre = f"{int(index)}/"
    got = {k[len(pre):]: v for k, v in load_file(str(path)).items() if k.startswith(pre)}
    return got or None


def fit_after_training(model, cfg, enc_val, cancel=None, cache: LayerCache | None = None, progress=None,
                       keep: list | None = None) -> dict:
    """Kind 'dact' with ``model.fit_halting``: fit the halting units alone on the validation split for every λ of
    ``model.halting_lambdas`` (encoder and classifiers frozen, see halting.py), install the fastest point within
    ``model.halting_tolerance`` accuracy points of the most accurate one, and return the sweep for the report.
    ``cache``: the validation split's per-layer cache of the model as it is now, when the caller has it.
    ``progress(what, done, total)``: caching the validation rows, then every fit's epochs. ``keep``: a list that
    gets every reported point (λ points, calibrated front, thresholds — the report's order, which is the order of
    ``run_front``'s points) with its halting weights, for :func:`save_front_states`."""
    mc = cfg.model
    t0 = time.perf_counter()
    if cache is None:
        cache = layer_cache(model, enc_val, progress=None if progress is None else
                            (lambda d, t: progress("caching the validation rows' layer outputs", d, t)))
    # the point is chosen on out-of-fold numbers: units fitted and chosen on the same rows overfit them
    points, crossed = cross_fit_halting(model, cache, mc.halting_lambdas, epochs=mc.halting_epochs,
                                        seed=cfg.train.seed, cancel=cancel, progress=progress)
    thresholds = threshold_points(model, cache) if mc.halting_thresholds and mc.halting_input == "confidence" \
        else []
    chosen = choose_point(points + thresholds, mc.halting_tolerance)
    plain = [p for p in points if p.scale == 1.0 and p.shift == 0.0]
    calibrated_front = [p for p in front_of(points) if (p.scale, p.shift) != (1.0, 0.0)]
    install_halting(model, chosen)
    if keep is not None:
        keep.extend(plain + calibrated_front + thresholds)
    layer_acc = [float((cache.y[:, n].argmax(-1) == cache.targets).float().mean()) for n in range(cache.y.shape[1])]
    from .evaluate import entropy_thresholds

    entropy_points = []  # the same classifiers under the entropy exit, for the pages' late-exit advice
    for s in entropy_thresholds(cache.y.shape[2]):
        r = dact.run_policy_offline(dact.EntropyPolicy(s), cache.y)
        entropy_points.append({"threshold": s, "avg_exit_layer": dact.average_exit_layer(r.exit_layer),
                               "accuracy": float((r.probs.argmax(-1) == cache.targets).float().mean())})
    return {"chosen": chosen.record().to_dict(), "points": [p.record().to_dict() for p in plain],
            "calibrated_front": [p.record().to_dict() for p in calibrated_front],
            "threshold_points": [p.record().to_dict() for p in thresholds], "rows": len(cache),
            "entropy_points": entropy_points,
            "split": "val", "nll_ref": nll_ref_of(cache), "tolerance_points": mc.halting_tolerance,
            "cross_fitted": crossed, "folds": CROSS_FIT_FOLDS if crossed else 1,
            "layer_accuracy": layer_acc, "seconds": time.perf_counter() - t0}
