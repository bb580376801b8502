"""The DACT formulas as pure tensor functions: accumulation, ponder cost, loss, the halting rule, the exit policies.

No model code, no I/O. The maths, why it has this form and where else it is computed: docs/dact_maths.md (the
section each function cites by title). Notation:

* ``y`` — per-layer class probabilities y_n (softmax already applied), shape [B, N, K];
* ``h`` — per-layer halting probabilities h_n in (0, 1), the probability of *going on*, shape [B, N];
* layer index n is 1-based in the maths and in every reported exit layer (1..N).

Accumulation (p_0 = 1, a_0 = 0; docs/dact_maths.md, "Accumulation: a_n and p_n")::

    a_n = p_{n-1} * y_n + (1 - p_{n-1}) * a_{n-1}
    p_n = h_n * p_{n-1}

Loss: ``NLL(log(clamp(a_N, eps)), target) + lambda * mean(rho)`` with ``rho = sum_n p_n`` (+1 when
``start_at_one``: a minimum cost of one step; the constant changes the reported value, never the gradients), plus
the optional per-exit terms (docs/dact_maths.md, "The training loss").

Halting (per sample) at layer n with d = N - n layers remaining, best / runner_up the top-2 entries of a_n::

    best * (1 - p_n) ** d  >  runner_up + p_n * d          (d == 0: always halt)

Six easy misreadings of these formulas each have a unit test in tests/test_dact.py that fails on the misread
version (docs/dact_maths.md, "The halting rule"): d = N - n (not N - 1); ``p_n * d`` (not ``p_n ** d``);
rho = sum p_n (not sum h_n); NLL of log a_N (not cross-entropy on a_N); halting per sample (not ``all()`` over the
batch); exit layers 1-based.

Exit policies (:class:`DactPolicy`, :class:`PatiencePolicy`, :class:`EntropyPolicy`, :class:`FixedDepthPolicy`)
run ONLINE inside a model (layer by layer, halted rows dropped from the batch) or OFFLINE from stored per-layer
outputs via :func:`run_policy_offline`, which simulates exactly that online loop, so both share one code path
(docs/dact_maths.md, "Exit policies").
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor

from dact_lib.errors import ConfigError

__all__ = [
    "accumulate_step",
    "accumulate",
    "ponder_cost",
    "layer_nll",
    "depth_weights",
    "distillation_loss",
    "confidence_features",
    "CONFIDENCE_FEATURES",
    "spec_lambda",
    "DactLoss",
    "dact_loss",
    "should_halt",
    "entropy",
    "ExitPolicy",
    "DactPolicy",
    "PatiencePolicy",
    "EntropyPolicy",
    "FixedDepthPolicy",
    "POLICY_NAMES",
    "make_policy",
    "ExitResult",
    "run_policy_offline",
    "average_exit_layer",
]


# --------------------------------------------------------------------------------------------------------------
# Accumulation, ponder cost, loss
# --------------------------------------------------------------------------------------------------------------
def accumulate_step(a_prev: Tensor, p_prev: Tensor, y_n: Tensor, h_n: Tensor) -> tuple[Tensor, Tensor]:
    """One DACT step: ``a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}``, ``p_n = h_n p_{n-1}``.

    Shapes: a_prev [B,K], p_prev [B], y_n [B,K], h_n [B] -> (a_n [B,K], p_n [B]). Differentiable.
    """
    if a_prev.shape != y_n.shape:
        raise ValueError(f"accumulate_step: a_prev {tuple(a_prev.shape)} and y_n {tuple(y_n.shape)} must match")
    if p_prev.shape != h_n.shape or p_prev.shape != y_n.shape[:-1]:
        raise ValueError(
            f"accumulate_step: p_prev {tuple(p_prev.shape)} and h_n {tuple(h_n.shape)} must both have shape "
            f"{tuple(y_n.shape[:-1])} (the batch shape of y_n)"
        )
    w = p_prev.unsqueeze(-1)
    a_n = w * y_n + (1.0 - w) * a_prev
    p_n = h_n * p_prev
    return a_n, p_n


def accumulate(y: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """Run :func:`accumulate_step` over all layers from a_0 = 0, p_0 = 1.

    y [B,N,K], h [B,N] -> (a [B,N,K] holding a_1..a_N, p [B,N] holding p_1..p_N). Differentiable in y and h.
    The model's answer is ``a[:, -1]`` (a convex mix of the y_n, so a probability vector).
    """
    if y.dim() != 3:
        raise ValueError(f"accumulate: y must have shape [B, N, K], got {tuple(y.shape)}")
    if h.shape != y.shape[:2]:
        raise ValueError(f"accumulate: h must have shape {tuple(y.shape[:2])} (= y's [B, N]), got {tuple(h.shape)}")
    bsz, n_layers, n_classes = y.shape
    if n_layers < 1:
        raise ValueError("accumulate: need at least one layer (N >= 1)")
    a_n = y.new_zeros(bsz, n_classes)
    p_n = y.new_ones(bsz)
    a_list, p_list = [], []
    for i in range(n_layers):
        a_n, p_n = accumulate_step(a_n, p_n, y[:, i], h[:, i])
        a_list.append(a_n)
        p_list.append(p_n)
    return torch.stack(a_list, dim=1), torch.stack(p_list, dim=1)


def ponder_cost(p: Tensor, start_at_one: bool = False) -> Tensor:
    """Per-sample ponder cost ``rho = sum_{n=1..N} p_n`` (+1 when ``start_at_one``). p [B,N] -> [B].

    It is the sum of the *accumulated* p_n, never of the raw halting probabilities h_n: p_n is the probability of
    still running after layer n, so rho is a soft count of the layers run (docs/dact_maths.md, "Ponder cost").
    """
    if p.dim() != 2:
        raise ValueError(f"ponder_cost: p must have shape [B, N], got {tuple(p.shape)}")
    rho = p.sum(dim=1)
    if start_at_one:
        rho = rho + 1.0
    return rho


@dataclass
class DactLoss:
    """The DACT training loss and its parts (all scalars).

    ``loss == nll + ponder_lambda * ponder + layer_loss_weight * layer_nll + distill_weight * distill``."""

    loss: Tensor
    nll: Tensor  # mean over the batch of -log a_N[target]
    ponder: Tensor  # mean over the batch of rho (includes the +1 when start_at_one)
    layer_nll: Tensor | None = None  # mean over layers and batch of -log y_n[target]; None when not computed
    distill: Tensor | None = None  # the self-distillation term (before its weight); None when not computed


def depth_weights(num_layers: int, scheme: str = "uniform") -> Tensor:
    """Weights w_1..w_N (summing to 1) of the per-layer terms: ``"uniform"`` w_n = 1/N; ``"pabee"`` w_n = n / sum n
    (PABEE's weighted average: deeper classifiers count more). docs/dact_maths.md, "Depth weights"."""
    n_layers = int(num_layers)
    if n_layers < 1:
        raise ValueError(f"depth_weights: num_layers must be >= 1, got {num_layers}")
    if scheme == "uniform":
        w = torch.ones(n_layers, dtype=torch.float64)
    elif scheme == "pabee":
        w = torch.arange(1, n_layers + 1, dtype=torch.float64)
    else:
        raise ConfigError(f"depth weighting {scheme!r} is unknown: choose 'uniform' or 'pabee'")
    return (w / w.sum()).float()


def layer_nll(y: Tensor, targets: Tensor, eps: float = 1e-8, weights: Tensor | None = None,
              class_weight: Tensor | None = None) -> Tensor:
    """``sum_n w_n * mean_batch(-log y_n[target])`` — every internal classifier's own NLL, weighted over layers
    (default w_n = 1/N: the plain mean over layers and batch; see :func:`depth_weights`).

    y [B,N,K] holds probability vectors (softmax already applied), so like a_N their log goes into NLL.
    ``class_weight`` [K] (``model.class_weighting``): the batch mean becomes the class-weighted mean
    ``sum_i c_{t_i} (-log y_n[t_i]) / sum_i c_{t_i}``, as ``nll_loss(weight=)`` computes it.
    """
    if y.dim() != 3:
        raise ValueError(f"layer_nll: y must have shape [B, N, K], got {tuple(y.shape)}")
    if targets.shape != y.shape[:1]:
        raise ValueError(f"layer_nll: targets must have shape [{y.shape[0]}], got {tuple(targets.shape)}")
    log_y = torch.log(y.clamp(min=eps))  # [B,N,K]
    picked = log_y.gather(2, targets.long().view(-1, 1, 1).expand(-1, y.shape[1], 1)).squeeze(2)  # [B,N]
    if class_weight is not None:
        c = class_weight.to(picked.dtype)[targets.long()]  # [B]
        per_layer = (picked * c[:, None]).sum(0) / c.sum()
        return -per_layer.mean() if weights is None else -(per_layer * weights.to(picked.dtype)).sum()
    if weights is None:
        return -picked.mean()
    return -(picked.mean(0) * weights.to(picked.dtype)).sum()


def distillation_loss(y: Tensor, temperature: float = 1.0, eps: float = 1e-8, weights: Tensor | None = None) -> Tensor:
    """Self-distillation of every exit from the deepest one::

        T^2 * sum_{n<N} w_n * mean_batch KL(y_n^T || stopgrad(y_N^T)),   KL(P || Q) = sum_k P_k (log P_k - log Q_k)

    where y_n^T = softmax(log y_n / T) (= softmax(logits_n / T): the log-probabilities differ from the logits by a
    per-row constant) and w_n = 1/(N-1) by default (``weights`` [N-1] otherwise, renormalised to sum 1). The
    deepest exit is the teacher and gets no gradient from this term; T^2 keeps the gradient scale independent of
    T (Hinton et al.). y [B,N,K] probabilities. Returns 0 for N = 1. docs/dact_maths.md, "The training loss".
    """
    if y.dim() != 3:
        raise ValueError(f"distillation_loss: y must have shape [B, N, K], got {tuple(y.shape)}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"distillation_loss: temperature must be > 0, got {temperature}")
    n_layers = y.shape[1]
    if n_layers < 2:
        return y.new_zeros(())
    log_y = torch.log(y.clamp(min=eps)) / t
    log_s = torch.log_softmax(log_y[:, :-1], dim=-1)  # students y_1..y_{N-1}
    log_t = torch.log_softmax(log_y[:, -1:].detach(), dim=-1)  # teacher y_N, no gradient
    kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean(0)  # [N-1]
    if weights is None:
        w = kl.new_full((n_layers - 1,), 1.0 / (n_layers - 1))
    else:
        w = weights.to(kl.dtype)[: n_layers - 1]
        w = w / w.sum()
    return (t * t) * (kl * w).sum()


CONFIDENCE_FEATURES = ("max", "margin", "entropy", "agree")


def confidence_features(y_n: Tensor, a_prev: Tensor) -> Tensor:
    """What a halting unit with ``halting_input`` 'confidence'/'both' sees of layer n, [B, 4]:

    * ``max`` — the largest entry of y_n;
    * ``margin`` — largest minus second-largest entry of y_n (the largest when K = 1);
    * ``entropy`` — entropy(y_n) / ln K (0 = certain, 1 = uniform; 0 when K = 1);
    * ``agree`` — 1.0 when argmax y_n == argmax a_{n-1}, else 0.0 (always 0 at n = 1, where a_0 = 0).

    Computed without gradient (inputs are detached): the halting unit reads the classifier's confidence, it does
    not train the classifier through it. docs/dact_maths.md, "Confidence features".
    """
    if y_n.dim() != 2 or a_prev.shape != y_n.shape:
        raise ValueError(f"confidence_features: y_n [B, K] and a_prev [B, K] must match, got {tuple(y_n.shape)} "
                         f"and {tuple(a_prev.shape)}")
    y_n, a_prev = y_n.detach(), a_prev.detach()
    k = y_n.shape[-1]
    best, runner_up = _top2(y_n)
    ent = entropy(y_n) / math.log(k) if k > 1 else torch.zeros_like(best)
    started = a_prev.sum(-1) > 0
    agree = ((y_n.argmax(-1) == a_prev.argmax(-1)) & started).to(y_n.dtype)
    return torch.stack([best, best - runner_up, ent, agree], dim=-1)


def spec_lambda(normalized_lambda: float, num_layers: int, nll_ref: float = 1.0) -> float:
    """The λ on the loss's own scale (the weight of mean(rho) in :func:`dact_loss`, the scale the formulas are
    written in, hence ``spec``) for a λ on the normalised scale of the halting fit: ``λ_spec = λ_norm · nll_ref / N``.

    With it, ``λ_spec · mean(rho) = λ_norm · nll_ref · mean(rho / N)``: λ_norm = 1 means that running every layer
    for every sample (rho = N) costs as much as the full model's own held-out NLL ``nll_ref``. The loss is
    unchanged, only λ is rescaled, so one λ_norm range fits any N and any task's NLL (docs/dact_maths.md, "Two
    scales of λ")."""
    lam = float(normalized_lambda)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"spec_lambda: λ must be a finite number >= 0, got {normalized_lambda}")
    if int(num_layers) < 1:
        raise ValueError(f"spec_lambda: num_layers must be >= 1, got {num_layers}")
    return lam * max(float(nll_ref), 0.0) / int(num_layers)


def dact_loss(
    a_N: Tensor,
    p: Tensor,
    targets: Tensor,
    ponder_lambda: float,
    start_at_one: bool = False,
    eps: float = 1e-8,
    y: Tensor | None = None,
    layer_loss_weight: float = 0.0,
    distill_weight: float = 0.0,
    distill_temperature: float = 1.0,
    depth_weighting: str = "uniform",
    class_weight: Tensor | None = None,
) -> DactLoss:
    """``loss = NLL(log(clamp(a_N, eps)), targets) + ponder_lambda * mean(rho)``  (DACT's loss)
    ``       + layer_loss_weight * mean_n NLL(log(clamp(y_n, eps)), targets)``  (every exit's own NLL).

    The maths and why: docs/dact_maths.md, "The training loss". a_N [B,K] is already a probability vector: its
    log goes into NLL (cross-entropy on a_N would apply softmax a second time). ``start_at_one`` adds a constant 1
    to rho (a minimum cost of one step): it shifts the reported ``ponder`` (and hence ``loss``) by a constant and
    leaves every gradient unchanged.

    The third term is not in the DACT paper. It trains every internal classifier y_n with its own NLL, as PABEE
    and DeeBERT train theirs: under the DACT loss alone a classifier gets gradient only in proportion to its
    weight p_{n-1} in a_N, so with a small λ the early classifiers stay weak. This function's default weight is 0
    (exactly DACT's loss); the run config's default ``model.layer_loss_weight`` is 1.0, so a DACT run trains with
    it. It needs ``y`` [B,N,K] when the weight is > 0.

    The fourth term, ``distill_weight * distillation_loss(y, distill_temperature)``, distils every exit from the
    deepest one (FastBERT-style self-distillation). ``depth_weighting`` ('uniform' | 'pabee') weights the layers
    of both extra terms (:func:`depth_weights`). Both extra terms only train the classifiers; the DACT part of the
    loss is unchanged.

    ``class_weight`` [K] (``model.class_weighting = "balanced"``): the NLL of a_N and of every exit become
    class-weighted means (``nll_loss(weight=)``: ``sum_i c_{t_i} l_i / sum_i c_{t_i}``); the ponder cost and the
    distillation stay plain means. None: the terms above as written.
    """
    if a_N.dim() != 2:
        raise ValueError(f"dact_loss: a_N must have shape [B, K], got {tuple(a_N.shape)}")
    if p.dim() != 2 or p.shape[0] != a_N.shape[0]:
        raise ValueError(f"dact_loss: p must have shape [B={a_N.shape[0]}, N], got {tuple(p.shape)}")
    if targets.shape != a_N.shape[:1]:
        raise ValueError(f"dact_loss: targets must have shape [{a_N.shape[0]}], got {tuple(targets.shape)}")
    if layer_loss_weight < 0 or distill_weight < 0:
        raise ValueError(f"dact_loss: layer_loss_weight and distill_weight must be >= 0, got {layer_loss_weight}, "
                         f"{distill_weight}")
    log_a = torch.log(a_N.clamp(min=eps))
    nll = torch.nn.functional.nll_loss(log_a, targets.long(), weight=None if class_weight is None else
                                       class_weight.to(log_a.dtype), reduction="mean")
    ponder = ponder_cost(p, start_at_one=start_at_one).mean()
    loss = nll + float(ponder_lambda) * ponder
    lnll = dist = None
    if layer_loss_weight > 0 or distill_weight > 0:
        if y is None:
            raise ValueError("dact_loss: layer_loss_weight / distill_weight > 0 needs the per-layer probabilities "
                             "y [B, N, K]")
        if y.shape[0] != a_N.shape[0] or y.shape[2] != a_N.shape[1] or y.shape[1] != p.shape[1]:
            raise ValueError(f"dact_loss: y must have shape [B={a_N.shape[0]}, N={p.shape[1]}, "
                             f"K={a_N.shape[1]}], got {tuple(y.shape)}")
        w = None if depth_weighting == "uniform" else depth_weights(y.shape[1], depth_weighting).to(y.device)
        if layer_loss_weight > 0:
            lnll = layer_nll(y, targets, eps, w, class_weight)
            loss = loss + float(layer_loss_weight) * lnll
        if distill_weight > 0:
            dist = distillation_loss(y, distill_temperature, eps, None if w is None else w[:-1])
            loss = loss + float(distill_weight) * dist
    return DactLoss(loss=loss, nll=nll, ponder=ponder, layer_nll=lnll, distill=dist)


# --------------------------------------------------------------------------------------------------------------
# Halting rule
# --------------------------------------------------------------------------------------------------------------
def _top2(a_n: Tensor) -> tuple[Tensor, Tensor]:
    """(best, runner_up) over the last dim; runner_up = 0 when there is only one class."""
    if a_n.shape[-1] >= 2:
        top = torch.topk(a_n, k=2, dim=-1).values
        return top[..., 0], top[..., 1]
    best = a_n[..., 0]
    return best, torch.zeros_like(best)


def should_halt(a_n: Tensor, p_n: Tensor, remaining: int | Tensor) -> Tensor:
    """Per-sample DACT halting decision after layer n. a_n [B,K], p_n [B], remaining d = N - n (int or [B]).

    Halt iff ``best * (1 - p_n) ** d > runner_up + p_n * d`` (best, runner_up = top-2 of a_n), i.e. the
    remaining d layers cannot change the argmax (the bound: docs/dact_maths.md, "The halting rule"). d == 0 (the
    last layer) always halts. Returns Bool[B].
    """
    if a_n.dim() != 2 or p_n.shape != a_n.shape[:1]:
        raise ValueError(
            f"should_halt: a_n must be [B, K] and p_n [B]; got {tuple(a_n.shape)} and {tuple(p_n.shape)}"
        )
    d = torch.as_tensor(remaining, device=a_n.device)
    if bool((d < 0).any()):
        raise ValueError(f"should_halt: remaining layers d = N - n must be >= 0, got {remaining}")
    d = d.to(a_n.dtype)
    best, runner_up = _top2(a_n)
    halt = best * (1.0 - p_n) ** d > runner_up + p_n * d
    return halt | (d == 0)


# --------------------------------------------------------------------------------------------------------------
# The same rule on one sentence's K numbers (Python floats): the batch-1 fast path (modeling_dact.DactBert.
# _infer_one) calls these, because for one sentence tensor bookkeeping costs more than the arithmetic; each is
# tested equal to its tensor form above (tests/test_dact.py)
# --------------------------------------------------------------------------------------------------------------
def accumulate_step_scalar(a_prev: list[float], p_prev: float, y_n: list[float], h_n: float
                           ) -> tuple[list[float], float]:
    """:func:`accumulate_step` for one sentence: ``a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}``, ``p_n = h_n p_{n-1}``."""
    return [p_prev * y + (1.0 - p_prev) * a for y, a in zip(y_n, a_prev)], h_n * p_prev


def should_halt_scalar(a_n: list[float], p_n: float, remaining: int) -> bool:
    """:func:`should_halt` for one sentence: ``best · (1 − p_n)^d > runner_up + p_n · d``, or d == 0."""
    top = sorted(a_n, reverse=True)
    best, runner_up = top[0], (top[1] if len(top) > 1 else 0.0)
    return remaining == 0 or best * (1.0 - p_n) ** remaining > runner_up + p_n * remaining


def entropy_scalar(probs: list[float]) -> float:
    """:func:`entropy` of one probability vector, in nats (0 · log 0 = 0)."""
    return -sum(v * math.log(v) for v in probs if v > 0.0)


def confidence_features_scalar(y_n: list[float], a_prev: list[float]) -> list[float]:
    """:func:`confidence_features` for one sentence: [max, margin, entropy / ln K, agree]."""
    k = len(y_n)
    top = sorted(y_n, reverse=True)
    best, second = top[0], (top[1] if k > 1 else 0.0)
    ent = entropy_scalar(y_n) / math.log(k) if k > 1 else 0.0
    agree = 1.0 if sum(a_prev) > 0 and max(range(k), key=y_n.__getitem__) == max(range(k), key=a_prev.__getitem__) \
        else 0.0
    return [best, best - second, ent, agree]


# --------------------------------------------------------------------------------------------------------------
# Exit policies
# --------------------------------------------------------------------------------------------------------------
def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim; 0 * log 0 is taken as 0 (no NaN for one-hot vectors)."""
    return torch.special.entr(probs).sum(dim=-1)


def _num_layers(state: dict) -> int:
    return int(state["num_layers"])


class ExitPolicy(ABC):
    """An early-exit rule over the per-layer outputs of one model.

    The policy object itself holds only its parameter; everything per-sample lives in the ``state`` dict made by
    :meth:`init_state`, so one policy object can run many batches. Online use (inside a model)::

        state = policy.init_state(B, N, K, device, dtype)
        rows = torch.arange(B)
        for n in range(1, N + 1):
            y_n, h_n = ...            # layer n, computed for `rows` only
            halt, answer = policy.step(state, rows, n, y_n, h_n)
            record exit_layer[rows[halt]] = n and probs[rows[halt]] = answer[halt]
            rows = rows[~halt]        # halted rows are dropped from further layers
    """

    name: str = ""
    needs_halting: bool = False  # True when step() needs the halting probabilities h_n

    def init_state(self, batch_size: int, num_layers: int, num_classes: int, device=None, dtype=None) -> dict:
        if int(num_layers) < 1:
            raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
        return {"num_layers": torch.tensor(int(num_layers), dtype=torch.long)}

    @abstractmethod
    def step(self, state: dict, rows: Tensor, n: int, y_n: Tensor, h_n: Tensor | None) -> tuple[Tensor, Tensor]:
        """Layer ``n`` (1-based) for the still-running ``rows``: (halt [b] bool, answer [b, K]); see the class doc."""

    # shared checks / helpers for subclasses
    def _check_step(self, state: dict, rows: Tensor, n: int, y_n: Tensor) -> int:
        n_layers = _num_layers(state)
        if not 1 <= int(n) <= n_layers:
            raise ValueError(f"{self.name} policy: layer n must be in 1..{n_layers} (1-based), got {n}")
        if y_n.dim() != 2 or y_n.shape[0] != rows.shape[0]:
            raise ValueError(
                f"{self.name} policy: y_n must be [b, K] with b = len(rows) = {rows.shape[0]}, got {tuple(y_n.shape)}"
            )
        return n_layers

    @staticmethod
    def _at_last(halt: Tensor, n: int, n_layers: int) -> Tensor:
        """Every row halts at n == N."""
        if int(n) >= n_layers:
            return torch.ones_like(halt, dtype=torch.bool)
        return halt

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DactPolicy(ExitPolicy):
    """The DACT rule: keep a_n, p_n per row; answer a_n; halt by :func:`should_halt` with d = N - n."""

    name = "dact"
    needs_halting = True

    def init_state(self, batch_size: int, num_layers: int, num_classes: int, device=None, dtype=None) -> dict:
        state = super().init_state(batch_size, num_layers, num_classes, device, dtype)
        dtype = dtype or torch.get_default_dtype()
        state["a"] = torch.zeros(batch_size, num_classes, device=device, dtype=dtype)
        state["p"] = torch.ones(batch_size, device=device, dtype=dtype)
        return state

    def step(self, state: dict, rows: Tensor, n: int, y_n: Tensor, h_n: Tensor | None) -> tuple[Tensor, Tensor]:
        n_layers = self._check_step(state, rows, n, y_n)
        if h_n is None:
            raise ValueError("dact policy needs the halting probabilities h_n (the model must have halting units)")
        a_n, p_n = accumulate_step(state["a"][rows], state["p"][rows], y_n, h_n)
        state["a"][rows] = a_n.detach()
        state["p"][rows] = p_n.detach()
        halt = should_halt(a_n, p_n, n_layers - int(n))  # d = N - n, never a constant N - 1
        return self._at_last(halt, n, n_layers), a_n


class PatiencePolicy(ExitPolicy):
    """PABEE patience t >= 1: a counter of consecutive layers whose argmax y_n equals argmax y_{n-1} (reset to 0
    on a change); exit when it reaches t; answer y_n. With t = 1 the earliest exit is layer 2."""

    name = "patience"

    def __init__(self, patience: int):
        self.patience = int(patience)
        if self.patience < 1:
            raise ConfigError(f"patience policy: t must be an integer >= 1, got {patience}")

    def init_state(self, batch_size: int, num_layers: int, num_classes: int, device=None, dtype=None) -> dict:
        state = super().init_state(batch_size, num_layers, num_classes, device, dtype)
        state["prev"] = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        state["count"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def step(self, state: dict, rows: Tensor, n: int, y_n: Tensor, h_n: Tensor | None) -> tuple[Tensor, Tensor]:
        n_layers = self._check_step(state, rows, n, y_n)
        pred = y_n.argmax(dim=-1)
        prev = state["prev"][rows]
        same = (pred == prev) & (prev >= 0)
        count = torch.where(same, state["count"][rows] + 1, torch.zeros_like(pred))
        state["prev"][rows] = pred
        state["count"][rows] = count
        halt = count >= self.patience
        return self._at_last(halt, n, n_layers), y_n

    def __repr__(self) -> str:
        return f"PatiencePolicy(patience={self.patience})"


class EntropyPolicy(ExitPolicy):
    """DeeBERT: exit at the first layer n with entropy(y_n) < S (nats); answer y_n."""

    name = "entropy"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(f"entropy policy: threshold S must be a finite number >= 0 (nats), got {threshold}")

    def step(self, state: dict, rows: Tensor, n: int, y_n: Tensor, h_n: Tensor | None) -> tuple[Tensor, Tensor]:
        n_layers = self._check_step(state, rows, n, y_n)
        halt = entropy(y_n) < self.threshold
        return self._at_last(halt, n, n_layers), y_n

    def __repr__(self) -> str:
        return f"EntropyPolicy(threshold={self.threshold})"


class FixedDepthPolicy(ExitPolicy):
    """Truncation baseline: every sample exits at layer k (1..N); answer y_k."""

    name = "fixed"

    def __init__(self, k: int):
        self.k = int(k)
        if self.k < 1:
            raise ConfigError(f"fixed policy: depth k must be an integer >= 1, got {k}")

    def init_state(self, batch_size: int, num_layers: int, num_classes: int, device=None, dtype=None) -> dict:
        if self.k > int(num_layers):
            raise ConfigError(f"fixed policy: depth k={self.k} exceeds the model's {num_layers} layers; use 1..{num_layers}")
        return super().init_state(batch_size, num_layers, num_classes, device, dtype)

    def step(self, state: dict, rows: Tensor, n: int, y_n: Tensor, h_n: Tensor | None) -> tuple[Tensor, Tensor]:
        n_layers = self._check_step(state, rows, n, y_n)
        halt = torch.full((rows.shape[0],), int(n) >= self.k, dtype=torch.bool, device=y_n.device)
        return self._at_last(halt, n, n_layers), y_n

    def __repr__(self) -> str:
        return f"FixedDepthPolicy(k={self.k})"


POLICY_NAMES = ("dact", "patience", "entropy", "fixed")


def _as_int(name: str, what: str, value) -> int:
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{name} policy needs {what} (an integer >= 1), got {value!r}")
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(float(value))
    raise ConfigError(f"{name} policy needs {what} as an integer >= 1, got {value!r}")


def make_policy(name: str, value: float | int | None = None) -> ExitPolicy:
    """Build an exit policy by name: ``"dact"`` (no value), ``"patience"`` (t >= 1), ``"entropy"`` (S >= 0 nats),
    ``"fixed"`` (k >= 1; checked against N when the policy starts). Raises ConfigError for a bad name or value."""
    key = str(name).strip().lower() if isinstance(name, str) else None
    if key == "dact":
        if value is not None:
            raise ConfigError(f"dact policy takes no value (its rule has no parameter), got {value!r}; pass None")
        return DactPolicy()
    if key == "patience":
        t = _as_int("patience", "patience t", value)
        if t < 1:
            raise ConfigError(f"patience policy needs patience t >= 1, got {value!r}")
        return PatiencePolicy(t)
    if key == "entropy":
        if isinstance(value, bool) or not isinstance(value, Real):
            raise ConfigError(f"entropy policy needs a threshold S (a number >= 0, in nats), got {value!r}")
        s = float(value)
        if not math.isfinite(s) or s < 0:
            raise ConfigError(f"entropy policy needs a finite threshold S >= 0 (nats), got {value!r}")
        return EntropyPolicy(s)
    if key == "fixed":
        k = _as_int("fixed", "depth k", value)
        if k < 1:
            raise ConfigError(f"fixed policy needs depth k in 1..N, got {value!r}")
        return FixedDepthPolicy(k)
    raise ConfigError(f"unknown exit policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


# --------------------------------------------------------------------------------------------------------------
# Running a policy
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ExitResult:
    exit_layer: Tensor  # Long[B], 1-based: the number of layers the sample ran (1..N)
    probs: Tensor  # [B, K] the answer reported at the exit layer


def run_policy_offline(policy: ExitPolicy, y: Tensor, h: Tensor | None = None) -> ExitResult:
    """Apply ``policy`` to stored per-layer outputs y [B,N,K] (and h [B,N] for DACT).

    Simulates the online loop exactly: layer by layer, only the rows still running are passed to ``step`` and
    halted rows are dropped, so offline and online evaluation share one implementation.
    """
    if y.dim() != 3:
        raise ValueError(f"run_policy_offline: y must have shape [B, N, K], got {tuple(y.shape)}")
    bsz, n_layers, n_classes = y.shape
    if h is not None and h.shape != y.shape[:2]:
        raise ValueError(f"run_policy_offline: h must have shape {tuple(y.shape[:2])}, got {tuple(h.shape)}")
    if policy.needs_halting and h is None:
        raise ValueError(f"the {policy.name} policy needs halting probabilities h [B, N]; pass h")
    state = policy.init_state(bsz, n_layers, n_classes, y.device, y.dtype)
    exit_layer = torch.zeros(bsz, dtype=torch.long, device=y.device)
    probs = torch.zeros(bsz, n_classes, dtype=y.dtype, device=y.device)
    rows = torch.arange(bsz, device=y.device)
    for n in range(1, n_layers + 1):
        if rows.numel() == 0:
            break
        y_n = y[rows, n - 1]
        h_n = h[rows, n - 1] if h is not None else None
        halt, answer = policy.step(state, rows, n, y_n, h_n)
        if n == n_layers and not bool(halt.all()):
            raise RuntimeError(f"{policy!r} did not halt every row at the last layer n = N = {n_layers}")
        done = rows[halt]
        exit_layer[done] = n  # 1-based: the number of layers run
        probs[done] = answer[halt].to(probs.dtype)
        rows = rows[~halt]
    return ExitResult(exit_layer=exit_layer, probs=probs)


def average_exit_layer(exit_layer: Tensor) -> float:
    """Mean of the 1-based exit layers (relative compute = this / N; layer speed-up = N / this)."""
    if exit_layer.numel() == 0:
        raise ValueError("average_exit_layer: no samples (empty exit_layer tensor)")
    return float(exit_layer.double().mean())
