"""MultiTaskModel: one shared encoder, one MLP head per task, task-weighted cross-entropy."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import MultiTaskModelConfig
from .heads import EncoderModel, ModelOutput, balanced_class_weights, build_mlp, pool

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class MultiTaskModel(EncoderModel):
    def __init__(self, encoder: PreTrainedModel, cfg: MultiTaskModelConfig, label_maps: dict[str, list[str]]) -> None:
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
        for t, names in label_maps.items():  # per-class loss weights (1 = plain cross-entropy); not saved
            self.register_buffer(f"class_weight_{t}", torch.ones(len(names)), persistent=False)
        self.class_weighted = False

    def set_class_counts(self, counts: dict[str, "torch.Tensor | list[int]"]) -> None:
        """Balanced class weights from the training split's class counts: w_k = n / (K · n_k), clipped to
        [0.1, 10] (a class absent from the split gets the largest weight)."""
        for t in self.tasks:
            getattr(self, f"class_weight_{t}").copy_(balanced_class_weights(counts[t]))
        self.class_weighted = True

    def forward(self, input_ids, attention_mask, targets: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sentence = pool(hidden, attention_mask, self.cfg.pooling)
        if self.cfg.normalize:
            sentence = F.normalize(sentence, dim=-1)
        probs, task_losses = {}, {}
        loss: torch.Tensor | None = None
        for task, head in self.heads.items():
            logits = head(sentence).float()
            probs[task] = logits.softmax(-1)
            if targets is not None:
                weight = getattr(self, f"class_weight_{task}") if self.class_weighted else None
                task_losses[task] = F.cross_entropy(logits, targets[task], weight=weight)
        if targets is not None:
            for t in self.tasks:
                term = self.task_weights[t] * task_losses[t]
                loss = term if loss is None else loss + term
        return ModelOutput(loss=loss, probs=probs, task_losses=task_losses)
