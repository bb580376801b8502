"""DactBert: an encoder with a DACT unit (classifier MLP + halting MLP) after every layer.

The maths (accumulation, loss, halting rule, other exit policies) lives in ``dact.py``; this file only wires it
to the encoder. Two forward paths:

* ``forward`` — every layer runs; differentiable accumulation gives a_N and the loss (training and validation).
  The exit layer each sample *would* take under the DACT rule is computed from the same y_n, h_n (no grad).
* ``infer`` — per-sample early exit: after each layer the policy decides which samples halt; halted samples keep
  their answer and are dropped from the batch, so the remaining layers really are skipped for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import dact
from .config import DactModelConfig
from .encoders import layer_adapter
from .heads import ModelOutput, build_mlp, pool


@dataclass
class InferenceResult:
    probs: torch.Tensor  # [B, K] the answer of each sample at its exit
    exit_layer: torch.Tensor  # [B] 1-based number of layers each sample ran
    y: torch.Tensor  # [B, N, K] per-layer probabilities (NaN after a sample's exit)
    h: torch.Tensor  # [B, N] per-layer halting probabilities (NaN after exit)


class DactBert(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: DactModelConfig, num_classes: int, task: str = "label") -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.encoder = encoder
        self.adapter = layer_adapter(encoder)
        self.num_layers = self.adapter.num_layers
        self.num_classes = num_classes
        hidden = self.adapter.hidden_size
        units = 1 if cfg.share_weights else self.num_layers
        self.classifiers = nn.ModuleList([build_mlp(hidden, num_classes, cfg.classifier) for _ in range(units)])
        self.halters = nn.ModuleList([build_mlp(hidden, 1, cfg.halting) for _ in range(units)])

    def unit(self, n: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DACT unit after layer ``n`` (1-based): (y_n [B,K] class probabilities, h_n [B] halting probability)."""
        i = 0 if self.cfg.share_weights else n - 1
        summary = pool(hidden, attention_mask, self.cfg.pooling)
        y_n = self.classifiers[i](summary).float().softmax(-1)
        h_n = torch.sigmoid(self.halters[i](summary).float()).squeeze(-1)
        return y_n, h_n

    def forward(self, input_ids, attention_mask, targets: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        ad = self.adapter
        hidden = ad.embed(input_ids, attention_mask)
        mask = ad.prepare_mask(attention_mask, hidden.dtype)
        ys, hs = [], []
        for i in range(self.num_layers):
            hidden = ad.run_layer(i, hidden, mask)
            y_n, h_n = self.unit(i + 1, hidden, attention_mask)
            ys.append(y_n)
            hs.append(h_n)
        y, h = torch.stack(ys, 1), torch.stack(hs, 1)
        a, p = dact.accumulate(y, h)
        a_N = a[:, -1]
        with torch.no_grad():
            exit_layer = dact.run_policy_offline(dact.DactPolicy(), y.detach(), h.detach()).exit_layer
        extras = {"exit_layer": exit_layer, "ponder": dact.ponder_cost(p.detach(), self.cfg.ponder_start_at_one),
                  "y": y.detach(), "h": h.detach(), "p": p.detach()}
        loss, task_losses = None, {}
        if targets is not None:
            out = dact.dact_loss(a_N, p, targets[self.task], self.cfg.ponder_lambda, self.cfg.ponder_start_at_one,
                                 y=y, layer_loss_weight=self.cfg.layer_loss_weight)
            loss = out.loss
            task_losses = {self.task: out.nll}
            extras["nll"] = out.nll.detach()
            if out.layer_nll is not None:
                extras["layer_nll"] = out.layer_nll.detach()
        return ModelOutput(loss=loss, probs={self.task: a_N}, task_losses=task_losses, extras=extras)

    @torch.no_grad()
    def infer(self, input_ids, attention_mask, policy: dact.ExitPolicy | None = None) -> InferenceResult:
        """Per-sample early exit under ``policy`` (default: the DACT rule)."""
        policy = policy or dact.DactPolicy()
        ad, N, K = self.adapter, self.num_layers, self.num_classes
        B = input_ids.shape[0]
        hidden = ad.embed(input_ids, attention_mask)
        dev = hidden.device
        state = policy.init_state(B, N, K, dev, torch.float32)
        probs = torch.zeros(B, K, device=dev)
        exit_layer = torch.full((B,), N, dtype=torch.long, device=dev)
        y_all = torch.full((B, N, K), float("nan"), device=dev)
        h_all = torch.full((B, N), float("nan"), device=dev)
        rows = torch.arange(B, device=dev)  # rows of the full batch still running
        am = attention_mask
        mask = ad.prepare_mask(am, hidden.dtype)
        for n in range(1, N + 1):
            hidden = ad.run_layer(n - 1, hidden, mask)
            y_n, h_n = self.unit(n, hidden, am)
            y_all[rows, n - 1] = y_n
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
