"""BackboneClassifier: a pretrained encoder plus an MLP head on the pooled sentence vector.

Its encoder weights can be exported (safetensors) to initialise a DACT model (``RunConfig.init_from_run``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .config import BackboneModelConfig
from .heads import ClassWeighted, ModelOutput, build_mlp, pool

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class BackboneClassifier(ClassWeighted):
    def __init__(self, encoder: PreTrainedModel, cfg: BackboneModelConfig, num_classes: int, task: str = "label") -> None:
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.encoder = encoder
        self.head = build_mlp(encoder.config.hidden_size, num_classes, cfg.head)
        self._init_class_weight(num_classes)  # model.class_weighting: set by train's prepare_model

    def forward(self, input_ids, attention_mask, targets: dict[str, torch.Tensor] | None = None) -> ModelOutput:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(pool(hidden, attention_mask, self.cfg.pooling)).float()
        loss, task_losses = None, {}
        if targets is not None:
            loss = F.cross_entropy(logits, targets[self.task], weight=self.loss_weight())
            task_losses = {self.task: loss}
        return ModelOutput(loss=loss, probs={self.task: logits.softmax(-1)}, task_losses=task_losses)

    def export_encoder(self, path: str | Path) -> Path:
        """Write the encoder's weights as safetensors (what a DACT run starts from)."""
        path = Path(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.encoder.state_dict().items()}
        from .files import atomic_write

        return atomic_write(path, lambda tmp: save_file(state, str(tmp)))
