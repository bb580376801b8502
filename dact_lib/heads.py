"""Pieces every model shares: the MLP head builder, pooling, and the model output type."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MLPConfig

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
