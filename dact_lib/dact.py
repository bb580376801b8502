"""All DACT maths of DACT Lab: accumulation, ponder cost, loss, the halting rule and the exit policies.

Pure tensor functions (no model code, no I/O). Notation of docs/dact_spec.md:

* ``y`` — per-layer class probabilities y_n (softmax already applied), shape [B, N, K];
* ``h`` — per-layer halting probabilities h_n in (0, 1), the probability of *going on*, shape [B, N];
* layer index n is 1-based in the maths and in every reported exit layer (1..N).

Accumulation (p_0 = 1, a_0 = 0)::

    a_n = p_{n-1} * y_n + (1 - p_{n-1}) * a_{n-1}
    p_n = h_n * p_{n-1}

Loss: ``NLL(log(clamp(a_N, eps)), target) + lambda * mean(rho)`` with ``rho = sum_n p_n`` (+1 when
``start_at_one``, as in the reference code; the constant changes the reported value, never the gradients).

Halting (per sample) at layer n with d = N - n layers remaining, best / runner_up the top-2 entries of a_n::

    best * (1 - p_n) ** d  >  runner_up + p_n * d          (d == 0: always halt)

The six mistakes of the project this is modelled on (spec, "Six mistakes") are avoided here, and each has a
unit test in tests/test_dact.py that fails on the mistaken version: d = N - n (not N - 1); ``p_n * d`` (not
``p_n ** d``); rho = sum p_n (not sum h_n); NLL of log a_N (not cross-entropy on a_N); halting per sample (not
``all()`` over the batch); exit layers 1-based.

Exit policies (:class:`DactPolicy`, :class:`PatiencePolicy`, :class:`EntropyPolicy`, :class:`FixedDepthPolicy`)
run ONLINE inside a model (layer by layer, halted rows dropped from the batch) or OFFLINE from stored per-layer
outputs via :func:`run_policy_offline`, which simulates exactly that online loop, so both share one code path.
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

    It is the sum of the *accumulated* p_n, never of the raw halting probabilities h_n.
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

    ``loss == nll + ponder_lambda * ponder + layer_loss_weight * layer_nll``."""

    loss: Tensor
    nll: Tensor  # mean over the batch of -log a_N[target]
    ponder: Tensor  # mean over the batch of rho (includes the +1 when start_at_one)
    layer_nll: Tensor | None = None  # mean over layers and batch of -log y_n[target]; None when not computed


def layer_nll(y: Tensor, targets: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over layers n = 1..N and the batch of ``-log y_n[target]`` — every internal classifier's own NLL.

    y [B,N,K] holds probability vectors (softmax already applied), so like a_N their log goes into NLL.
    """
    if y.dim() != 3:
        raise ValueError(f"layer_nll: y must have shape [B, N, K], got {tuple(y.shape)}")
    if targets.shape != y.shape[:1]:
        raise ValueError(f"layer_nll: targets must have shape [{y.shape[0]}], got {tuple(targets.shape)}")
    log_y = torch.log(y.clamp(min=eps))  # [B,N,K]
    picked = log_y.gather(2, targets.long().view(-1, 1, 1).expand(-1, y.shape[1], 1)).squeeze(2)  # [B,N]
    return -picked.mean()


def dact_loss(
    a_N: Tensor,
    p: Tensor,
    targets: Tensor,
    ponder_lambda: float,
    start_at_one: bool = False,
    eps: float = 1e-8,
    y: Tensor | None = None,
    layer_loss_weight: float = 0.0,
) -> DactLoss:
    """``loss = NLL(log(clamp(a_N, eps)), targets) + ponder_lambda * mean(rho)``  (the spec's loss)
    ``       + layer_loss_weight * mean_n NLL(log(clamp(y_n, eps)), targets)``  (optional, off by default).

    a_N [B,K] is already a probability vector: its log goes into NLL (cross-entropy on a_N would apply softmax a
    second time). ``start_at_one`` adds the reference code's constant 1 to rho: it shifts the reported ``ponder``
    (and hence ``loss``) by a constant and leaves every gradient unchanged.

    The third term is not in the DACT paper. It trains every internal classifier y_n with its own NLL, as PABEE
    and DeeBERT train theirs: under the DACT loss alone a classifier gets gradient only in proportion to its
    weight p_{n-1} in a_N, so with a small λ the early classifiers stay weak. It needs ``y`` [B,N,K] when the
    weight is > 0; with weight 0 the loss is exactly the spec's.
    """
    if a_N.dim() != 2:
        raise ValueError(f"dact_loss: a_N must have shape [B, K], got {tuple(a_N.shape)}")
    if p.dim() != 2 or p.shape[0] != a_N.shape[0]:
        raise ValueError(f"dact_loss: p must have shape [B={a_N.shape[0]}, N], got {tuple(p.shape)}")
    if targets.shape != a_N.shape[:1]:
        raise ValueError(f"dact_loss: targets must have shape [{a_N.shape[0]}], got {tuple(targets.shape)}")
    if layer_loss_weight < 0:
        raise ValueError(f"dact_loss: layer_loss_weight must be >= 0, got {layer_loss_weight}")
    log_a = torch.log(a_N.clamp(min=eps))
    nll = torch.nn.functional.nll_loss(log_a, targets.long(), reduction="mean")
    ponder = ponder_cost(p, start_at_one=start_at_one).mean()
    loss = nll + float(ponder_lambda) * ponder
    lnll = None
    if layer_loss_weight > 0:
        if y is None:
            raise ValueError("dact_loss: layer_loss_weight > 0 needs the per-layer probabilities y [B, N, K]")
        if y.shape[0] != a_N.shape[0] or y.shape[2] != a_N.shape[1] or y.shape[1] != p.shape[1]:
            raise ValueError(f"dact_loss: y must have shape [B={a_N.shape[0]}, N={p.shape[1]}, "
                             f"K={a_N.shape[1]}], got {tuple(y.shape)}")
        lnll = layer_nll(y, targets, eps)
        loss = loss + float(layer_loss_weight) * lnll
    return DactLoss(loss=loss, nll=nll, ponder=ponder, layer_nll=lnll)


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
    remaining d layers cannot change the argmax. d == 0 (the last layer) always halts. Returns Bool[B].
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
        return int(value)
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
