"""Pieces every model shares: the MLP head builder, pooling, and the model output type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import MLPConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def build_mlp(in_dim: int, out_dim: int, cfg: MLPConfig) -> nn.Sequential:
    """[Dropout → Linear → activation] per hidden width, then Dropout → Linear to ``out_dim``."""
    layers: list[nn.Module] = []
    width = in_dim
    for hidden in cfg.resolved_dims():
        layers += [nn.Dropout(cfg.dropout), nn.Linear(width, hidden), _ACTIVATIONS[cfg.activation]()]
        width = hidden
    layers += [nn.Dropout(cfg.dropout), nn.Linear(width, out_dim)]
    return nn.Sequential(*layers)


def balanced_class_weights(counts) -> torch.Tensor:
    """``model.class_weighting = "balanced"``: w_k = n / (K · n_k) from the training split's class counts, clipped
    to [0.1, 10] (a class absent from the split gets the largest weight)."""
    c = torch.as_tensor(counts, dtype=torch.float32)
    return (c.sum() / (len(c) * c.clamp(min=1.0))).clamp(0.1, 10.0)


class EncoderModel(nn.Module):
    """A task model over one pretrained Hugging Face encoder: the backbone, DACT and multi-task models. The loop,
    the savers and the exporters reach the encoder as ``model.encoder``."""

    encoder: PreTrainedModel


class ClassWeighted(EncoderModel):
    """The class weights of a single-task model's loss (``model.class_weighting``): a ``class_weight`` buffer (not
    saved: ones until :meth:`set_class_counts`), None in :meth:`loss_weight` while unset (plain cross-entropy)."""

    task: str
    class_weight: torch.Tensor
    class_weighted: bool

    def _init_class_weight(self, num_classes: int) -> None:
        self.register_buffer("class_weight", torch.ones(num_classes), persistent=False)
        self.class_weighted = False

    def set_class_counts(self, counts: dict) -> None:
        """Balanced weights (:func:`balanced_class_weights`) from ``{task: class counts}`` of the training split."""
        self.class_weight.copy_(balanced_class_weights(counts[self.task]))
        self.class_weighted = True

    def loss_weight(self) -> torch.Tensor | None:
        return self.class_weight if self.class_weighted else None


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vector of a layer's states: the [CLS] (first) vector or the mean over real (unmasked) tokens."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def set_dropout(module: nn.Module, p: float) -> int:
    """Set the rate of every Dropout module (used by PBT's exploit/explore). Returns how many were changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)
            n += 1
    return n


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    probs: dict[str, torch.Tensor]
    task_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
