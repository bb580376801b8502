"""MultiTaskModel: one shared encoder, one MLP head per task, task-weighted cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MultiTaskModelConfig
from .heads import ModelOutput, build_mlp, pool


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: nn.Module, cfg: MultiTaskModelConfig, label_maps: dict[str, list[str]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.tasks = list(label_maps)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: build_mlp(hidden, len(names), cfg.head) for t, names in label_maps.items()})
        weights = cfg.task_weights or {}
        unknown = set(weights) - set(self.tasks)
        if unknown:
            from .errors import ConfigError

            raise ConfigError(f"model.task_weights names unknown task(s) {sorted(unknown)}: the tasks are {self.tasks}.")
        self.task_weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}

    def forward(self, input_ids, attention_mask, targets: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sentence = pool(hidden, attention_mask, self.cfg.pooling)
        if self.cfg.normalize:
            sentence = F.normalize(sentence, dim=-1)
        probs, task_losses = {}, {}
        loss = None
        for task, head in self.heads.items():
            logits = head(sentence).float()
            probs[task] = logits.softmax(-1)
            if targets is not None:
                task_losses[task] = F.cross_entropy(logits, targets[task])
        if targets is not None:
            loss = sum(self.task_weights[t] * task_losses[t] for t in self.tasks)
        return ModelOutput(loss=loss, probs=probs, task_losses=task_losses)
