# A DACT Lab model for Hugging Face `transformers` (`trust_remote_code=True`).
#
# This file is self-contained: it imports torch, transformers and the standard library only, never `dact_lib`, so an
# exported folder loads anywhere `transformers` is installed:
#
#     from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
#     model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
#     clf = pipeline("text-classification", model=folder, trust_remote_code=True, top_k=None)
#
# It holds the three kinds of DACT Lab runs (config.kind):
#
# * "backbone"  — a pretrained encoder and an MLP head on the pooled sentence vector;
# * "dact"      — DACT-BERT: after every encoder layer n a classifier MLP gives y_n (class probabilities) and a
#                 halting MLP gives h_n (the probability of going on); each sentence leaves the batch at its own exit
#                 layer under the exit policy (config.exit_policy: "dact", "entropy:S", "patience:T", "fixed:K");
# * "multitask" — one encoder and one MLP head per task (config.tasks); `logits` are the first task's.
#
# `logits` are the log of the answer probabilities, so softmax(logits) is the answer (for DACT the accumulated
# answer a_n at the DACT exit, y_n at the exit of the other policies). The module names and the MLP layouts are
# DACT Lab's own, so the weights file holds exactly the keys of the trained run.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

KINDS = ("backbone", "dact", "multitask")
POLICY_NAMES = ("dact", "entropy", "patience", "fixed")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
# encoder model_type -> how its layers are run one at a time
ENCODER_FAMILIES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
                    "distilbert": "distilbert", "deberta": "deberta", "deberta-v2": "deberta"}
# model types whose AutoModel builds a pooler unless told not to (DACT Lab models pool the hidden states themselves)
POOLER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
# what the halting units read besides the layer summary (DACT Lab's confidence features)
CONFIDENCE_FEATURES = ("max", "margin", "entropy", "agree")


def parse_exit_policy(text: str | None) -> tuple[str, float | int | None]:
    """``"entropy:0.4"`` -> ``("entropy", 0.4)``; ``"dact"`` / None / "" -> ``("dact", None)``."""
    if text is None or not str(text).strip():
        return "dact", None
    name, sep, value = str(text).strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_NAMES:
        raise ValueError(f"exit policy {text!r}: unknown name {name!r}; write one of dact, entropy:0.35, "
                         "patience:2 or fixed:3.")
    if name == "dact":
        if sep and value.strip():
            raise ValueError(f"exit policy {text!r}: the DACT rule takes no value; write just 'dact'.")
        return "dact", None
    try:
        num = float(value)
    except ValueError:
        raise ValueError(f"exit policy {text!r}: {name} needs a number after ':', e.g. {name}:2.") from None
    if not math.isfinite(num) or num < 0:
        raise ValueError(f"exit policy {text!r}: the value must be a finite number >= 0.")
    if name == "entropy":
        return "entropy", num
    if not num.is_integer() or num < 1:
        raise ValueError(f"exit policy {text!r}: {name} needs a whole number >= 1, e.g. {name}:2.")
    return name, int(num)


class DactLabConfig(PretrainedConfig):
    r"""Configuration of a DACT Lab model.

    Args:
        kind: "backbone", "dact" or "multitask".
        encoder: the encoder's own config as a dict (with its ``model_type``); the encoder is rebuilt from it with
            ``AutoModel.from_config`` (no download) and its weights come from this folder's weights file.
        pooling: the sentence vector of a layer's states, "mean" (over real tokens) or "cls" (the first token).
        head, classifier, halting: MLP shapes ``{"hidden_dims": [...], "activation": ..., "dropout": ...}`` — the
            head (backbone, multitask), the DACT classifier and halting units.
        share_weights: DACT: one classifier and one halting unit for every layer instead of one per layer.
        shared_trunk: DACT: the halting unit reads the classifier's hidden layers' output instead of the summary.
        halting_input: DACT: what the halting unit reads — "summary", "confidence" (max, margin, entropy / ln K and
            argmax agreement of y_n with a_{n-1}) or "both".
        num_layers: the encoder's number of layers.
        tasks, task_labels: the task names in order and each task's class names (index = class id).
        max_seq_len: the maximum length in tokens the model was trained with.
        exit_policy: DACT: the exit policy text, "dact", "entropy:S", "patience:T" or "fixed:K".
        normalize: multitask: the sentence vector is L2-normalised before the heads.
    """

    model_type = "dact_lab"

    def __init__(self, kind="backbone", encoder=None, pooling="mean", head=None, classifier=None, halting=None,
                 share_weights=False, shared_trunk=False, halting_input="summary", num_layers=None, tasks=None,
                 task_labels=None, max_seq_len=128, exit_policy="dact", normalize=False, **kwargs):
        self.kind = kind
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        self.head = head
        self.classifier = classifier
        self.halting = halting
        self.share_weights = bool(share_weights)
        self.shared_trunk = bool(shared_trunk)
        self.halting_input = halting_input
        self.num_layers = num_layers
        self.tasks = list(tasks or [])
        self.task_labels = {t: list(v) for t, v in (task_labels or {}).items()}
        self.max_seq_len = max_seq_len
        self.exit_policy = exit_policy
        self.normalize = bool(normalize)
        if self.tasks and "id2label" not in kwargs:
            names = self.task_labels[self.tasks[0]]
            kwargs["id2label"] = {i: name for i, name in enumerate(names)}
            kwargs["label2id"] = {name: i for i, name in enumerate(names)}
        super().__init__(**kwargs)


@dataclass
class DactLabOutput(SequenceClassifierOutput):
    """``logits`` [B, K]: log of the answer probabilities (of the first task for multitask models);
    ``exit_layer`` [B] (DACT): the 1-based number of layers each sentence ran; ``task_logits`` (multitask): one
    [B, K_t] tensor per task, in ``config.tasks`` order."""

    exit_layer: torch.LongTensor | None = None
    task_logits: tuple[torch.Tensor, ...] | None = None


def build_mlp(in_dim: int, out_dim: int, spec: dict) -> nn.Sequential:
    """[Dropout -> Linear -> activation] per hidden width, then Dropout -> Linear to ``out_dim`` (DACT Lab's layout:
    the module indices are those of the trained run's weights)."""
    layers: list[nn.Module] = []
    width, dropout = in_dim, float(spec.get("dropout", 0.0))
    for hidden in spec.get("hidden_dims", []):
        layers += [nn.Dropout(dropout), nn.Linear(width, hidden), ACTIVATIONS[spec.get("activation", "gelu")]()]
        width = hidden
    layers += [nn.Dropout(dropout), nn.Linear(width, out_dim)]
    return nn.Sequential(*layers)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """The [CLS] (first) vector or the mean over real (unmasked) tokens."""
    if how == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dim (0 log 0 = 0)."""
    return torch.special.entr(probs).sum(dim=-1)


def top2(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best, runner-up) over the last dim; runner-up = 0 with one class."""
    if probs.shape[-1] >= 2:
        top = torch.topk(probs, k=2, dim=-1).values
        return top[..., 0], top[..., 1]
    best = probs[..., 0]
    return best, torch.zeros_like(best)


def accumulate_step(a_prev, p_prev, y_n, h_n):
    """One DACT step: a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}, p_n = h_n p_{n-1}."""
    w = p_prev.unsqueeze(-1)
    return w * y_n + (1.0 - w) * a_prev, h_n * p_prev


def should_halt(a_n, p_n, remaining: int):
    """The DACT halting rule with d = N - n layers left: halt iff best (1 - p_n)^d > runner-up + p_n d, i.e. the
    remaining layers cannot change the argmax of a_n (d = 0 always halts)."""
    d = torch.as_tensor(remaining, device=a_n.device).to(a_n.dtype)
    best, runner_up = top2(a_n)
    return (best * (1.0 - p_n) ** d > runner_up + p_n * d) | (d == 0)


def confidence_features(y_n, a_prev):
    """[B, 4]: max of y_n, its margin over the runner-up, entropy(y_n) / ln K, and 1.0 where argmax y_n equals
    argmax a_{n-1} (0 at n = 1, where a_0 = 0)."""
    y_n, a_prev = y_n.detach(), a_prev.detach()
    k = y_n.shape[-1]
    best, runner_up = top2(y_n)
    ent = entropy(y_n) / math.log(k) if k > 1 else torch.zeros_like(best)
    started = a_prev.sum(-1) > 0
    agree = ((y_n.argmax(-1) == a_prev.argmax(-1)) & started).to(y_n.dtype)
    return torch.stack([best, best - runner_up, ent, agree], dim=-1)


class DactLabPreTrainedModel(PreTrainedModel):
    config_class = DactLabConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = False
    _supports_sdpa = True


class DactLabForSequenceClassification(DactLabPreTrainedModel):
    def __init__(self, config: DactLabConfig):
        super().__init__(config)
        if config.kind not in KINDS:
            raise ValueError(f"DactLabConfig.kind = {config.kind!r}: choose one of {KINDS}.")
        encoder_config = AutoConfig.for_model(**config.encoder)
        model_type = encoder_config.model_type
        if model_type not in ENCODER_FAMILIES:
            raise ValueError(f"encoder model_type {model_type!r} is not supported: one of {list(ENCODER_FAMILIES)}.")
        self.family = ENCODER_FAMILIES[model_type]
        extra = {"add_pooling_layer": False} if model_type in POOLER_TYPES else {}
        self.encoder = AutoModel.from_config(encoder_config, **extra)
        hidden = int(getattr(encoder_config, "hidden_size", None) or encoder_config.dim)
        labels = [config.task_labels[t] for t in config.tasks]
        if config.kind == "backbone":
            self.head = build_mlp(hidden, len(labels[0]), config.head)
        elif config.kind == "multitask":
            self.heads = nn.ModuleDict({t: build_mlp(hidden, len(n), config.head) for t, n in zip(config.tasks, labels)})
        else:
            self.num_classes = len(labels[0])
            units = 1 if config.share_weights else config.num_layers
            clf_dims = config.classifier.get("hidden_dims", [])
            base = clf_dims[-1] if config.shared_trunk and clf_dims else hidden
            halt_in = {"summary": base, "confidence": len(CONFIDENCE_FEATURES),
                       "both": base + len(CONFIDENCE_FEATURES)}[config.halting_input]
            self.classifiers = nn.ModuleList([build_mlp(hidden, self.num_classes, config.classifier)
                                              for _ in range(units)])
            self.halters = nn.ModuleList([build_mlp(halt_in, 1, config.halting) for _ in range(units)])
        self.post_init()

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.encoder.set_input_embeddings(value)

    # ------------------------------------------------------------------------------------------------------------
    # the encoder one layer at a time (BERT, RoBERTa, DistilBERT; DeBERTa and DeBERTa-v2/v3)
    # ------------------------------------------------------------------------------------------------------------
    def embed(self, input_ids, attention_mask):
        embeddings = self.encoder.embeddings
        if self.family == "distilbert":
            return embeddings(input_ids)
        if self.family == "deberta":
            return embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), mask=attention_mask)
        return embeddings(input_ids=input_ids)

    def layer_mask(self, attention_mask, dtype):
        """What every layer needs of the padding mask, for the rows still running."""
        if self.family == "deberta":
            enc = self.encoder.encoder
            mask2d = attention_mask.long() if attention_mask.dtype == torch.bool else attention_mask
            probe = torch.empty((1, attention_mask.shape[1], 0), device=attention_mask.device)
            return mask2d, enc.get_attention_mask(mask2d), enc.get_rel_pos(probe)
        from transformers.masking_utils import create_bidirectional_mask

        b, t = attention_mask.shape
        probe = torch.empty((b, t, 0), dtype=dtype, device=attention_mask.device)
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=probe,
                                         attention_mask=attention_mask)

    def run_layer(self, i, hidden, mask):
        """Encoder layer ``i`` (0-based) on ``hidden``."""
        if self.family == "deberta":
            enc = self.encoder.encoder
            mask2d, mask4d, relative_pos = mask
            out = enc.layer[i](hidden, mask4d, query_states=None, relative_pos=relative_pos,
                               rel_embeddings=enc.get_rel_embedding(), output_attentions=False)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if i == 0 and getattr(enc, "conv", None) is not None:
                out = enc.conv(hidden, out, mask2d)
            return out
        stack = self.encoder.transformer.layer if self.family == "distilbert" else self.encoder.encoder.layer
        out = stack[i](hidden, mask)
        return out[0] if isinstance(out, (tuple, list)) else out

    # ------------------------------------------------------------------------------------------------------------
    # the DACT units
    # ------------------------------------------------------------------------------------------------------------
    def unit_index(self, n: int) -> int:
        return 0 if self.config.share_weights else n - 1

    def classify(self, n, summary):
        """(y_n [B, K] class probabilities, what the halting unit reads besides the confidence features)."""
        clf = self.classifiers[self.unit_index(n)]
        if self.config.shared_trunk:
            trunk = clf[:-2](summary)
            return clf[-2:](trunk).float().softmax(-1), trunk
        return clf(summary).float().softmax(-1), summary

    def halt_prob(self, n, base, y_n, a_prev):
        """h_n [B], the probability of going on after layer n."""
        how = self.config.halting_input
        if how == "summary":
            x = base
        else:
            conf = confidence_features(y_n, a_prev).to(base.dtype)
            x = conf if how == "confidence" else torch.cat([base, conf], dim=-1)
        return torch.sigmoid(self.halters[self.unit_index(n)](x).float()).squeeze(-1)

    def early_exit(self, input_ids, attention_mask, policy: str | None):
        """Per-sentence early exit: after each layer the policy decides which rows halt; a halted row keeps its
        answer and leaves the batch, so the remaining layers are skipped for it. Returns (probs [B, K],
        exit_layer [B], 1-based)."""
        name, value = parse_exit_policy(policy)
        limit = 0 if value is None else value  # the policy's number; "dact", the one without, never reads it
        n_layers, k = int(self.config.num_layers), self.num_classes
        if name == "fixed" and limit > n_layers:
            raise ValueError(f"exit policy fixed:{value}: the model has {n_layers} layers; use fixed:1..{n_layers}.")
        batch = input_ids.shape[0]
        hidden = self.embed(input_ids, attention_mask)
        dev = hidden.device
        probs = torch.zeros(batch, k, device=dev)
        exit_layer = torch.full((batch,), n_layers, dtype=torch.long, device=dev)
        rows = torch.arange(batch, device=dev)  # the rows of the batch still running
        mask_2d = attention_mask
        mask = self.layer_mask(mask_2d, hidden.dtype)
        a = torch.zeros(batch, k, device=dev)  # DACT: the accumulated answer a_n and p_n of every row
        p = torch.ones(batch, device=dev)
        prev = torch.full((batch,), -1, dtype=torch.long, device=dev)  # patience: last argmax and its run length
        count = torch.zeros(batch, dtype=torch.long, device=dev)
        for n in range(1, n_layers + 1):
            hidden = self.run_layer(n - 1, hidden, mask)
            if name == "fixed" and n < limit:
                continue
            y_n, base = self.classify(n, pool(hidden, mask_2d, self.config.pooling))
            if name == "dact":
                h_n = self.halt_prob(n, base, y_n, a[rows])
                a_n, p_n = accumulate_step(a[rows], p[rows], y_n, h_n)
                a[rows], p[rows] = a_n, p_n
                halt, answer = should_halt(a_n, p_n, n_layers - n), a_n
            elif name == "entropy":
                halt, answer = entropy(y_n) < limit, y_n
            elif name == "patience":
                pred = y_n.argmax(-1)
                same = (pred == prev[rows]) & (prev[rows] >= 0)
                run = torch.where(same, count[rows] + 1, torch.zeros_like(pred))
                prev[rows], count[rows] = pred, run
                halt, answer = run >= limit, y_n
            else:  # fixed depth: every row exits at layer K
                halt, answer = torch.full((rows.shape[0],), n >= limit, dtype=torch.bool, device=dev), y_n
            if n >= n_layers:
                halt = torch.ones_like(halt)
            if halt.any():
                done = rows[halt]
                probs[done] = answer[halt].float()
                exit_layer[done] = n
                keep = ~halt
                if not keep.any():
                    break
                rows, hidden, mask_2d = rows[keep], hidden[keep], mask_2d[keep]
                mask = self.layer_mask(mask_2d, hidden.dtype)
        return probs, exit_layer

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, return_dict=None,
                exit_policy: str | None = None, **kwargs):
        r"""
        input_ids, attention_mask: the tokenised sentences ([B, T]); ``token_type_ids`` is accepted and ignored (the
            model was trained on single sentences, segment 0).
        labels: class ids [B] of the (first) task — or [B, n_tasks] for a multitask model — for a cross-entropy loss.
        exit_policy: DACT only, this call's exit policy text instead of ``config.exit_policy``.
        """
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        exit_layer, task_logits = None, None
        if self.config.kind == "dact":
            policy = exit_policy if exit_policy is not None else self.config.exit_policy
            probs, exit_layer = self.early_exit(input_ids, attention_mask, policy)
            task_probs = [probs]
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            sentence = pool(hidden, attention_mask, self.config.pooling)
            if self.config.kind == "backbone":
                task_probs = [self.head(sentence).float().softmax(-1)]
            else:
                if self.config.normalize:
                    sentence = F.normalize(sentence, dim=-1)
                task_probs = [self.heads[t](sentence).float().softmax(-1) for t in self.config.tasks]
        tiny = torch.finfo(torch.float32).tiny
        all_logits = tuple(torch.log(pr.clamp_min(tiny)) for pr in task_probs)
        if self.config.kind == "multitask":
            task_logits = all_logits
        logits = all_logits[0]
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if labels.dim() == 2 and self.config.kind == "multitask":
                for i, lg in enumerate(all_logits):
                    term = F.cross_entropy(lg, labels[:, i])
                    loss = term if loss is None else loss + term
            else:
                loss = F.cross_entropy(logits, labels.view(-1))
        out = DactLabOutput(loss=loss, logits=logits, exit_layer=exit_layer, task_logits=task_logits)
        return out if return_dict else out.to_tuple()


__all__ = ["DactLabConfig", "DactLabForSequenceClassification", "DactLabOutput", "DactLabPreTrainedModel"]
