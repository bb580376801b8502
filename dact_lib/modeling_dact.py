"""DactBert: an encoder with a DACT unit (classifier MLP + halting MLP) after every layer.

The maths (accumulation, loss, halting rule, other exit policies) is ``dact.py``'s, wired here to the encoder;
the batch-1 fast path (``_infer_one``) restates the rule on Python floats, for speed (docs/dact_maths.md, "Where
the formulas are computed"). Two forward paths:

* ``forward`` — every layer runs; differentiable accumulation gives a_N and the loss (training and validation).
  The exit layer each sample *would* take under the DACT rule is computed from the same y_n, h_n (no grad).
* ``infer`` — per-sample early exit: after each layer the policy decides which samples halt; halted samples keep
  their answer and are dropped from the batch, so the remaining layers really are skipped for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch
from scipy.special import erf as _erf
from torch import nn

from . import dact
from .config import DactModelConfig
from .encoders import layer_adapter
from .heads import ClassWeighted, ModelOutput, build_mlp, pool

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class InferenceResult:
    probs: torch.Tensor  # [B, K] the answer of each sample at its exit
    exit_layer: torch.Tensor  # [B] 1-based number of layers each sample ran
    y: torch.Tensor | None  # [B, N, K] per-layer probabilities (NaN after a sample's exit); None with trace=False
    h: torch.Tensor | None  # [B, N] per-layer halting probabilities (NaN after exit / not computed); None likewise


_NP_ACTS = {
    nn.ReLU: lambda x: np.maximum(x, 0.0),
    nn.Tanh: np.tanh,
    nn.SiLU: lambda x: x / (1.0 + np.exp(-x)),
    nn.GELU: lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
}


def _numpy_steps(steps):
    """The halting MLP's steps as numpy views of the CPU float32 parameters (they share memory, so in-place
    weight loads are seen); None when that is not possible (GPU, other dtypes or activations)."""
    out = []
    for w, b, act in steps:
        if w.device.type != "cpu" or w.dtype != torch.float32 or (act is not None and type(act) not in _NP_ACTS):
            return None
        if isinstance(act, nn.GELU) and act.approximate != "none":
            return None
        out.append((w.detach().numpy(), b.detach().numpy(), _NP_ACTS[type(act)] if act is not None else None))
    return out


def _numpy_mlp(steps, x):
    for w, b, act in steps:
        x = w @ x + b
        if act is not None:
            x = act(x)
    return x


def mlp_at(units: nn.ModuleList, i: int) -> nn.Sequential:
    """Unit ``i`` of a list of MLP units (each one ``heads.build_mlp`` made: an ``nn.Sequential``)."""
    mlp = units[i]
    if not isinstance(mlp, nn.Sequential):
        raise TypeError(f"unit {i} is a {type(mlp).__name__}, not the nn.Sequential that heads.build_mlp builds")
    return mlp


def out_linear(mlp: nn.Sequential) -> nn.Linear:
    """The output layer of a ``heads.build_mlp`` MLP (its last module)."""
    last = mlp[-1]
    if not isinstance(last, nn.Linear):
        raise TypeError(f"the MLP ends in a {type(last).__name__}, not the nn.Linear that heads.build_mlp puts last")
    return last


class DactUnits(nn.Module):
    """The DACT units (one classifier MLP and one halting MLP per layer, or one of each when ``share_weights``) and
    the code that runs them on a layer summary. Shared by :class:`DactBert` and the pipeline's feature-cache heads.

    Halting input (``cfg.halting_input``): the summary c_n (or, with ``cfg.shared_trunk``, the classifier trunk's
    output), the confidence features of y_n and a_{n-1} (``dact.confidence_features``), or both concatenated
    (docs/dact_maths.md, "Per-layer outputs: y_n and h_n")."""

    # what the units read and hold (set by the subclass and _build_units; declared for the type checker, which
    # otherwise sees nn.Module's attribute lookup: Tensor | Module)
    cfg: DactModelConfig
    classifiers: nn.ModuleList
    halters: nn.ModuleList
    num_layers: int
    num_classes: int

    def _build_units(self, cfg: DactModelConfig, hidden: int, num_classes: int, num_layers: int) -> None:
        units = 1 if cfg.share_weights else num_layers
        self.classifiers = nn.ModuleList([build_mlp(hidden, num_classes, cfg.classifier) for _ in range(units)])
        self.halters = nn.ModuleList([build_mlp(self.halting_in_dim(cfg, hidden), 1, cfg.halting)
                                      for _ in range(units)])
        init_halting_bias(self.halters, cfg.halting_bias_init)

    @staticmethod
    def halting_in_dim(cfg: DactModelConfig, hidden: int) -> int:
        base = cfg.classifier.resolved_dims()[-1] if cfg.shared_trunk else hidden
        conf = len(dact.CONFIDENCE_FEATURES)
        return {"summary": base, "confidence": conf, "both": base + conf}[cfg.halting_input]

    @property
    def needs_a_prev(self) -> bool:
        return self.cfg.halting_input != "summary"

    def _index(self, n: int) -> int:
        return 0 if self.cfg.share_weights else n - 1

    def classify(self, n: int, summary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y_n [B,K] probabilities, halting base [B,*]: the summary, or the trunk output with a shared trunk)."""
        if self.cfg.shared_trunk:  # the trunk is the MLP's layers before its last (Dropout, Linear)
            mlp = mlp_at(self.classifiers, self._index(n))
            trunk = mlp[:-2](summary)
            return mlp[-2:](trunk).float().softmax(-1), trunk
        return self.classifiers[self._index(n)](summary).float().softmax(-1), summary

    def halt_prob(self, n: int, base: torch.Tensor, y_n: torch.Tensor, a_prev: torch.Tensor | None) -> torch.Tensor:
        """h_n [B] from the halting base vector and (for 'confidence'/'both') the confidence features."""
        how = self.cfg.halting_input
        if how == "summary":
            x = base
        else:
            if a_prev is None:
                raise ValueError(f"halting_input={how!r} needs a_(n-1), the accumulated answer before layer {n}")
            conf = dact.confidence_features(y_n, a_prev).to(base.dtype)
            x = conf if how == "confidence" else torch.cat([base, conf], dim=-1)
        return torch.sigmoid(self.halters[self._index(n)](x).float()).squeeze(-1)

    def unit(self, n: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
             a_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DACT unit after layer ``n`` (1-based): (y_n [B,K] class probabilities, h_n [B] halting probability).
        ``a_prev`` = a_{n-1} [B,K] is needed when the halting unit reads confidence features."""
        y_n, base = self.classify(n, pool(hidden, attention_mask, self.cfg.pooling))
        return y_n, self.halt_prob(n, base, y_n, a_prev)

    def run_units(self, summaries_fn, num_layers: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor, torch.Tensor]:
        """Every layer's unit with the differentiable accumulation inline (a_{n-1} feeds the halting unit).
        ``summaries_fn(n)`` gives layer n's (hidden, mask). Returns y [B,N,K], h [B,N], a [B,N,K], p [B,N]."""
        a_n = torch.zeros(batch, self.num_classes, device=device)
        p_n = torch.ones(batch, device=device)
        ys, hs, a_list, p_list = [], [], [], []
        for n in range(1, num_layers + 1):
            hidden, mask = summaries_fn(n)
            y_n, h_n = self.unit(n, hidden, mask, a_n)
            a_n, p_n = dact.accumulate_step(a_n, p_n, y_n, h_n)
            ys.append(y_n)
            hs.append(h_n)
            a_list.append(a_n)
            p_list.append(p_n)
        return torch.stack(ys, 1), torch.stack(hs, 1), torch.stack(a_list, 1), torch.stack(p_list, 1)


def init_halting_bias(halters: nn.ModuleList, bias: float) -> None:
    """Set the output bias of every halting MLP (``DactModelConfig.halting_bias_init``; 0 → h_n ≈ 0.5)."""
    with torch.no_grad():
        for i in range(len(halters)):
            out_linear(mlp_at(halters, i)).bias.fill_(float(bias))


def loss_terms(cfg: DactModelConfig) -> dict:
    """The keyword arguments of ``dact.dact_loss`` that come from the model config."""
    return {"ponder_lambda": cfg.ponder_lambda, "start_at_one": cfg.ponder_start_at_one,
            "layer_loss_weight": cfg.layer_loss_weight, "distill_weight": cfg.distill_weight,
            "distill_temperature": cfg.distill_temperature, "depth_weighting": cfg.depth_weighting}


class DactBert(ClassWeighted, DactUnits):
    def __init__(self, encoder: PreTrainedModel, cfg: DactModelConfig, num_classes: int, task: str = "label") -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.encoder = encoder
        self.adapter = layer_adapter(encoder)
        self.num_layers = self.adapter.num_layers
        self.num_classes = num_classes
        self._build_units(cfg, self.adapter.hidden_size, num_classes, self.num_layers)
        self._init_class_weight(num_classes)  # model.class_weighting: set by train's prepare_model
        # the policy infer() uses when none is given (None: the DACT rule); an exported folder sets its own
        self.default_policy: dact.ExitPolicy | None = None

    def forward(self, input_ids, attention_mask, targets: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        ad = self.adapter
        hidden = ad.embed(input_ids, attention_mask)
        mask = ad.prepare_mask(attention_mask, hidden.dtype)
        state = {"hidden": hidden}

        def layer(n):
            state["hidden"] = ad.run_layer(n - 1, state["hidden"], mask)
            return state["hidden"], attention_mask

        y, h, a, p = self.run_units(layer, self.num_layers, input_ids.shape[0], hidden.device)
        a_N = a[:, -1]
        answer = a_N
        with torch.no_grad():
            if self.default_policy is not None and not self.training:  # an export's policy: its exits and answers
                res = dact.run_policy_offline(self.default_policy, y.detach(), h.detach())
                exit_layer, answer = res.exit_layer, res.probs
            else:
                exit_layer = dact.run_policy_offline(dact.DactPolicy(), y.detach(), h.detach()).exit_layer
        extras = {"exit_layer": exit_layer, "ponder": dact.ponder_cost(p.detach(), self.cfg.ponder_start_at_one),
                  "y": y.detach(), "h": h.detach(), "p": p.detach()}
        loss, task_losses = None, {}
        if targets is not None:
            terms = loss_terms(self.cfg)
            out = dact.dact_loss(a_N, p, targets[self.task], terms.pop("ponder_lambda"), terms.pop("start_at_one"),
                                 y=y, class_weight=self.loss_weight(), **terms)
            loss = out.loss
            task_losses = {self.task: out.nll}
            extras["nll"] = out.nll.detach()
            if out.layer_nll is not None:
                extras["layer_nll"] = out.layer_nll.detach()
            if out.distill is not None:
                extras["distill"] = out.distill.detach()
        return ModelOutput(loss=loss, probs={self.task: answer}, task_losses=task_losses, extras=extras)

    @torch.no_grad()
    def infer(self, input_ids, attention_mask, policy: dact.ExitPolicy | None = None,
              trace: bool = True) -> InferenceResult:
        """Per-sample early exit under ``policy`` (default: the DACT rule). Halted rows leave the batch.

        ``trace=False`` (or batch size 1 without padding with ``trace=False``) takes the fast path: no per-layer
        bookkeeping, h_n only when the policy reads it, classifiers only where the policy reads them (fixed depth
        k runs k layers and one classifier). Exit layers and answers equal the traced path's."""
        policy = policy or self.default_policy or dact.DactPolicy()
        if not trace and input_ids.shape[0] == 1:
            return self._infer_one(input_ids, attention_mask, policy)
        ad, N, K = self.adapter, self.num_layers, self.num_classes
        B = input_ids.shape[0]
        hidden = ad.embed(input_ids, attention_mask)
        dev = hidden.device
        state = policy.init_state(B, N, K, dev, torch.float32)
        probs = torch.zeros(B, K, device=dev)
        exit_layer = torch.full((B,), N, dtype=torch.long, device=dev)
        y_all = torch.full((B, N, K), float("nan"), device=dev) if trace else None
        h_all = torch.full((B, N), float("nan"), device=dev) if trace else None
        needs_h = policy.needs_halting or trace
        rows = torch.arange(B, device=dev)  # rows of the full batch still running
        am = attention_mask
        mask = ad.prepare_mask(am, hidden.dtype)
        # a_{n-1} for confidence-reading halting units: the DACT policy's own accumulation, else our own
        own_a = torch.zeros(B, K, device=dev) if (needs_h and self.needs_a_prev and "a" not in state) else None
        own_p = torch.ones(B, device=dev) if own_a is not None else None
        for n in range(1, N + 1):
            hidden = ad.run_layer(n - 1, hidden, mask)
            if isinstance(policy, dact.FixedDepthPolicy) and not trace and n < min(policy.k, N):
                continue
            y_n, base = self.classify(n, pool(hidden, am, self.cfg.pooling))
            h_n = None
            if needs_h:
                a_prev = None
                if self.needs_a_prev:
                    if "a" in state:
                        a_prev = state["a"][rows]
                    elif own_a is not None:
                        a_prev = own_a[rows]
                h_n = self.halt_prob(n, base, y_n, a_prev)
                if own_a is not None and own_p is not None:
                    own_a[rows], own_p[rows] = dact.accumulate_step(own_a[rows], own_p[rows], y_n, h_n)
            if y_all is not None and h_all is not None:  # trace (which implies needs_h: h_n is set)
                y_all[rows, n - 1] = y_n
                if h_n is not None:
                    h_all[rows, n - 1] = h_n
            halt, answer = policy.step(state, rows, n, y_n, h_n)
            if halt.any():
                done = rows[halt]
                probs[done] = answer[halt].float()
                exit_layer[done] = n
                keep = ~halt
                if not keep.any():
                    break
                rows, hidden, am = rows[keep], hidden[keep], am[keep]
                mask = ad.prepare_mask(am, hidden.dtype)
        return InferenceResult(probs=probs, exit_layer=exit_layer, y=y_all, h=h_all)

    def _fast_mlp(self, mlp: Iterable[nn.Module]) -> list[list[Any]]:
        """The eval-mode MLP as plain (weight, bias, activation) steps: no Dropout module calls."""
        steps: list[list[Any]] = []  # [weight, bias, activation or None] per Linear
        mods = [m for m in mlp if not isinstance(m, nn.Dropout)]
        for m in mods:
            if isinstance(m, nn.Linear):
                steps.append([m.weight, m.bias, None])
            else:
                steps[-1][2] = m
        return steps

    @staticmethod
    def _run_fast(steps, x):
        for w, b, act in steps:
            x = torch.nn.functional.linear(x, w, b)
            if act is not None:
                x = act(x)
        return x

    # complexity: batch-1 fast path inlined on purpose: one host sync per layer (measured, docs/benchmarks.md)
    def _infer_one(self, input_ids, attention_mask, policy: dact.ExitPolicy) -> InferenceResult:
        """Batch-1 fast path (eval mode): the sentence's layers; its classifier only where the policy reads it, its
        halting unit only for the DACT rule; the policy's decision on the K class probabilities as Python floats
        (one host sync per layer, no per-exit bookkeeping): for one sentence the batched path's tensor bookkeeping
        costs more than the arithmetic on K numbers. Same formulas as ``dact.py`` (docs/dact_maths.md, "The halting
        rule", "Confidence features", "Exit policies"), in float64, so exit layers and answers equal the traced
        path's except at ties within float32 rounding (tests/test_early_exit.py)."""
        if self.training or type(policy) not in (dact.DactPolicy, dact.EntropyPolicy, dact.PatiencePolicy,
                                                 dact.FixedDepthPolicy):
            return self.infer(input_ids, attention_mask, policy, trace=True)
        ad, N, K = self.adapter, self.num_layers, self.num_classes
        hidden = ad.embed(input_ids, attention_mask)
        mask = ad.prepare_mask(attention_mask, hidden.dtype)
        dev = hidden.device
        mean_pool = self.cfg.pooling == "mean" and bool(attention_mask.all())

        def summary(h):
            return h.mean(1) if mean_pool else pool(h, attention_mask, self.cfg.pooling)

        def done(n, probs):
            t = torch.tensor([probs], dtype=torch.float32, device=dev) if isinstance(probs, list) else probs
            return InferenceResult(probs=t, exit_layer=torch.tensor([n], device=dev), y=None, h=None)

        if isinstance(policy, dact.FixedDepthPolicy):
            if policy.k > N:
                policy.init_state(1, N, K)  # raises the policy's own error for k > N
            for i in range(policy.k):
                hidden = ad.run_layer(i, hidden, mask)
            y_n, _ = self.classify(policy.k, summary(hidden))
            return done(policy.k, y_n)
        shared = self.cfg.shared_trunk
        how = self.cfg.halting_input
        a, p = [0.0] * K, 1.0  # a_{n-1}, p_{n-1}
        prev, count = -1, 0
        for n in range(1, N + 1):
            hidden = ad.run_layer(n - 1, hidden, mask)
            steps = self._fast_cache(self._index(n))
            s = summary(hidden)
            np_ok = "np" in steps and s.device.type == "cpu"  # the small heads in numpy (no torch dispatch per op)
            if np_ok:
                st = steps["np"]
                x0 = s[0].detach().numpy()
                base = _numpy_mlp(st["trunk"], x0) if shared else x0
                logits = _numpy_mlp(st["out"] if shared else st["clf"], base).astype(np.float64)
                e = np.exp(logits - logits.max())
                y = (e / e.sum()).tolist()
            else:
                if shared:
                    base = self._run_fast(steps["trunk"], s)
                    logits = self._run_fast(steps["out"], base)
                else:
                    base, logits = s, self._run_fast(steps["clf"], s)
                y = logits.float().softmax(-1)[0].tolist()
            if n == N and not isinstance(policy, dact.DactPolicy):
                return done(n, y)
            if isinstance(policy, dact.EntropyPolicy):
                if dact.entropy_scalar(y) < policy.threshold:
                    return done(n, y)
                continue
            if isinstance(policy, dact.PatiencePolicy):
                pred = max(range(K), key=y.__getitem__)
                count = count + 1 if pred == prev else 0
                prev = pred
                if count >= policy.patience:
                    return done(n, y)
                continue
            # the DACT rule: h_n, then a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}, p_n = h_n p_{n-1}, halting test
            feats = dact.confidence_features_scalar(y, a) if how != "summary" else None
            if np_ok:
                if how == "summary":
                    x = base
                else:
                    f = np.asarray(feats, dtype=np.float32)
                    x = f if how == "confidence" else np.concatenate([base, f])
                z = float(_numpy_mlp(steps["np"]["halt"], x)[0])
                h = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
            else:
                if how == "summary":
                    x = base
                else:
                    conf = torch.tensor([feats], dtype=base.dtype, device=dev)
                    x = conf if how == "confidence" else torch.cat([base, conf], dim=-1)
                h = float(torch.sigmoid(self._run_fast(steps["halt"], x).float()))
            a, p = dact.accumulate_step_scalar(a, p, y, h)
            if dact.should_halt_scalar(a, p, N - n):
                return done(n, a)
        raise AssertionError("unreachable: every policy halts at n = N")

    def _fast_cache(self, i: int) -> dict:
        cache = self.__dict__.setdefault("_fast", {})
        clf, halt = mlp_at(self.classifiers, i), mlp_at(self.halters, i)
        # modules swapped in (e.g. fitted halting units) and parameters moved or cast (new storage) get a new entry
        key = (i, id(clf), id(halt), out_linear(clf).weight.data_ptr(), out_linear(halt).weight.data_ptr())
        if key not in cache:
            cache[key] = {"clf": self._fast_mlp(clf), "halt": self._fast_mlp(halt)}
            if self.cfg.shared_trunk:
                cache[key]["trunk"] = self._fast_mlp(list(clf)[:-2]) if len(clf) > 2 else []
                cache[key]["out"] = self._fast_mlp(list(clf)[-2:])
            np_steps = {k: _numpy_steps(v) for k, v in cache[key].items()}
            if all(v is not None for v in np_steps.values()):
                cache[key]["np"] = np_steps
        return cache[key]

    def load_state_dict(self, *args, **kwargs):  # the fast path holds references to the parameter tensors
        self.__dict__.pop("_fast", None)
        return super().load_state_dict(*args, **kwargs)
