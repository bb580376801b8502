"""Export a trained run as a Hugging Face ``transformers`` folder (the "hf" format).

The folder loads with ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` and
``pipeline("text-classification", model=folder, trust_remote_code=True)`` where only torch and transformers are
installed (no dact_lib), and with ``models.load_model(folder)`` in DACT Lab. It holds:

* ``config.json`` — a ``DactLabConfig`` (``model_type`` "dact_lab", ``auto_map`` naming the classes of
  ``modeling_dact_lab.py``): the kind, the encoder's own config, the heads' shapes, the tasks and labels, the exit
  policy (DACT);
* ``model.safetensors`` — the loaded model's whole state dict, under the run's own keys (a DACT export bakes in the
  halting units the loaded model has: ``load_model`` applied the user's halting choice);
* ``modeling_dact_lab.py`` — the model code (a copy of ``deploy/modeling_dact_lab.py``, which imports no dact_lib);
* the tokenizer files (its ``model_max_length`` = the run's ``max_seq_len``);
* ``encoder/`` — the fine-tuned encoder alone, for ``AutoModel.from_pretrained(folder + "/encoder")`` (where the
  family has a pooler it is an untrained identity layer: DACT Lab models pool the hidden states themselves);
* ``dact_lab_run.json`` — ``{"format": "dact-lab-hf", "version": 1, "config": RunConfig, "label_maps", "policy",
  "source_run", "halting"}``: what ``load_model`` reads back;
* ``report.json`` — the run's test report (when it has one), and ``README.md`` — the model card (``deploy/card.py``).

Everything is written into a hidden temporary folder next to the target and renamed into place at the end, so an
interrupted export leaves no half-written folder (and a previous export at the target stays whole until then).
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..encoders import layer_adapter
from ..errors import DactLabError
from ..files import atomic_write_json, check_replaceable_dir, replace_dir
from ..heads import ClassWeighted
from ..modeling_dact import DactBert
from ..models import HF_FORMAT, HF_RUN_FILE, MODEL_FILE, LoadedModel, hf_export_manifest
from .card import card_info, model_card, source_run
from .modeling_dact_lab import DactLabConfig, DactLabForSequenceClassification
from .policy import format_policy, parse_policy

TEMPLATE = Path(__file__).with_name("modeling_dact_lab.py")
MODELING_FILE = "modeling_dact_lab.py"
FORMAT_VERSION = 1
AUTO_MAP = {"AutoConfig": "modeling_dact_lab.DactLabConfig",
            "AutoModelForSequenceClassification": "modeling_dact_lab.DactLabForSequenceClassification"}
ARCHITECTURES = ["DactLabForSequenceClassification"]
_PARTIAL = ".partial-"


def export_policy(loaded: LoadedModel, policy: str | None) -> str | None:
    """The canonical exit policy text an export of ``loaded`` runs by default (None for a non-DACT run)."""
    model = loaded.model
    if loaded.kind != "dact" or not isinstance(model, DactBert):
        if policy is not None and str(policy).strip():
            raise DactLabError(f"exit policy {policy!r}: a {loaded.kind} run has no early exit, so it takes no exit "
                               "policy; export it without one.")
        return None
    if policy is None:
        policy = loaded.policy  # re-exporting an export keeps its default
    name, value = parse_policy(policy)  # ConfigError (a DactLabError) names the fix
    n_layers = int(model.num_layers)
    if name == "fixed" and value is not None and value > n_layers:
        raise DactLabError(f"exit policy {policy!r}: the model has {n_layers} layers; use fixed:1 … "
                           f"fixed:{n_layers}.")
    return format_policy(name, value)


def _mlp(cfg) -> dict:
    return {"hidden_dims": list(cfg.resolved_dims()), "activation": cfg.activation, "dropout": cfg.dropout}


def hf_config(loaded: LoadedModel, policy: str | None) -> DactLabConfig:
    """The ``DactLabConfig`` of ``loaded`` (``policy``: the canonical default exit policy, DACT only)."""
    cfg, model = loaded.config, loaded.model
    enc_cfg = model.encoder.config
    encoder = {k: v for k, v in enc_cfg.to_diff_dict().items()
               if k not in ("_name_or_path", "transformers_version", "architectures")}
    encoder["model_type"] = enc_cfg.model_type
    tasks = [model.task] if isinstance(model, ClassWeighted) else list(loaded.label_maps)  # multitask: every task
    kwargs = {"kind": cfg.kind, "encoder": encoder, "pooling": cfg.model.pooling, "tasks": tasks,
              "task_labels": {t: list(loaded.label_maps[t]) for t in tasks}, "max_seq_len": cfg.data.max_seq_len,
              "num_layers": layer_adapter(model.encoder).num_layers, "exit_policy": policy}
    m = cfg.model
    if cfg.kind == "dact":
        kwargs.update(classifier=_mlp(m.classifier), halting=_mlp(m.halting), share_weights=m.share_weights,
                      shared_trunk=m.shared_trunk, halting_input=m.halting_input)
    else:
        kwargs["head"] = _mlp(m.head)
        if cfg.kind == "multitask":
            kwargs["normalize"] = m.normalize
    hf = DactLabConfig(**kwargs)
    hf.architectures = list(ARCHITECTURES)
    hf.auto_map = dict(AUTO_MAP)
    return hf


def _clean_stale_partials(parent: Path, name: str) -> None:
    """Remove the temporary folders that exports to ``name`` by dead processes left behind."""
    from ..tracker.liveness import pid_alive

    for p in parent.glob(f".{name}{_PARTIAL}*"):
        pid = p.name[len(f".{name}{_PARTIAL}"):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _write_encoder(loaded: LoadedModel, folder: Path, tokenizer) -> None:
    """The encoder alone, loadable by ``AutoModel.from_pretrained(folder)`` with no missing weight: DACT Lab drops
    the pooler of BERT-like encoders, so an identity pooler (untrained) is written for them."""
    from transformers import AutoModel

    src = loaded.model.encoder
    full = AutoModel.from_config(copy.deepcopy(src.config))
    missing, unexpected = full.load_state_dict(src.state_dict(), strict=False)
    if unexpected or any("pooler" not in k for k in missing):
        raise DactLabError(f"The run's encoder does not match its own config (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}): the run folder is damaged; retrain the run.")
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name in missing and name.endswith("weight") and param.dim() == 2 and param.shape[0] == param.shape[1]:
                param.copy_(torch.eye(param.shape[0], dtype=param.dtype))
            elif name in missing:
                param.zero_()
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars on a CLI user's terminal
    try:
        full.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def _check_keys(hf: DactLabConfig, state: dict) -> None:
    """The template's modules must hold exactly the run's weights (same keys, same shapes)."""
    with torch.device("meta"):
        probe = DactLabForSequenceClassification(hf)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:3]
        unexpected = sorted(set(have) - set(want))[:3]
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:3]
        raise DactLabError(f"The exported model code does not fit this run's weights (missing {missing}, unexpected "
                           f"{unexpected}, other shapes {shapes}): this kind of model cannot be exported as 'hf'.")


def export_hf(loaded: LoadedModel, out_dir: str | Path, *, policy: str | None = None,
              card: dict | None = None) -> Path:
    """Write ``loaded`` (a ``models.load_model`` result) as a Hugging Face folder ``out_dir`` (see the module doc).

    ``policy``: the default exit policy text of a DACT export (``dact``, ``entropy:S``, ``patience:T``,
    ``fixed:K``; default ``dact``); ``card``: keys merged over :func:`card.card_info` for the model card (e.g.
    ``{"language": "en", "license": "mit", "front": [...]}``). ``out_dir`` must be new, empty or a previous export
    (replaced). Returns ``out_dir``."""
    policy_text = export_policy(loaded, policy)
    out_dir = Path(out_dir).expanduser().absolute()
    check_replaceable_dir(out_dir, hf_export_manifest, "DACT Lab export")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_partials(out_dir.parent, out_dir.name)
    model, cfg = loaded.model, loaded.config
    hf = hf_config(loaded, policy_text)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _check_keys(hf, state)
    info = card_info(loaded, policy_text)
    info.update(card or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_PARTIAL}{os.getpid()}-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt", "dact_lab_kind": cfg.kind})
        (tmp / "config.json").write_text(hf.to_json_string(use_diff=True), encoding="utf-8")
        shutil.copyfile(TEMPLATE, tmp / MODELING_FILE)
        tokenizer = copy.deepcopy(loaded.tokenizer)
        tokenizer.model_max_length = cfg.data.max_seq_len
        tokenizer.save_pretrained(tmp)
        _write_encoder(loaded, tmp / "encoder", tokenizer)
        report = Path(loaded.run_dir) / "report.json"
        if report.is_file():
            shutil.copyfile(report, tmp / "report.json")
        atomic_write_json(tmp / HF_RUN_FILE, {
            "format": HF_FORMAT, "version": FORMAT_VERSION, "kind": cfg.kind, "config": cfg.to_dict(),
            "label_maps": loaded.label_maps, "policy": policy_text, "source_run": source_run(loaded),
            "halting": loaded.halting})
        (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
