"""The Hugging Face model card (``README.md``) of an exported run.

:func:`card_info` gathers what the card says from the loaded run (its ``config.json`` / RunConfig, label maps and
``report.json``: the test metrics ``test`` and ``report``, the halting fit ``halting``), exactly as recorded — no
number is recomputed or rounded there. :func:`model_card` writes the card from that dict: a YAML metadata block
(library, pipeline tag, tags, ``base_model`` when the encoder is a hub model, ``model-index`` with the test metrics at
full precision), then what the model is, its data, its test results, its exit policy and measured front, intended use
and limits, training settings and how to load it (``transformers`` or the ONNX runtime). Both exporters (``hf`` and
``onnx``) call ``model_card(card_info(...))``; extra keys given by the caller (e.g. ``{"language": "en"}``) are merged
over the info dict before the card is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..encoders import BUNDLED_NAME, is_bundled, is_tiny
from ..front import FrontPoint

BUNDLED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_KIND_TEXT = {
    "backbone": "a pretrained encoder with an MLP classification head on the pooled sentence vector",
    "dact": "a DACT-BERT early-exit classifier: after every encoder layer a classifier MLP gives the class "
            "probabilities y_n and a halting MLP the probability h_n of going on; each sentence stops at its own "
            "exit layer, so easy sentences run fewer layers",
    "multitask": "one pretrained encoder with one MLP classification head per task",
}


def hub_name(encoder: str) -> str | None:
    """The Hugging Face hub name of a run's encoder (``base_model``), or None (tiny test encoder, local folder)."""
    if not isinstance(encoder, str) or not encoder.strip() or is_tiny(encoder):
        return None
    if is_bundled(encoder):
        return BUNDLED_HUB_NAME
    name = encoder.strip()
    if not _HUB_NAME.match(name) or Path(name).expanduser().exists():
        return None
    return name


def _report(run_dir: Path) -> dict:
    try:
        got = json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def source_run(loaded) -> int | str:
    """Where a loaded model comes from: its run id (a folder ``<home>/runs/<id>``), the source an export it was
    loaded from names, or its folder."""
    from ..models import hf_export_manifest

    manifest = hf_export_manifest(loaded.run_dir) or {}
    if manifest.get("source_run") is not None:
        return manifest["source_run"]
    run_dir = Path(loaded.run_dir)
    return int(run_dir.name) if run_dir.name.isdigit() and run_dir.parent.name == "runs" else str(run_dir)


def card_info(loaded, policy: str | None = None, front: list[dict] | None = None,
              runtime: str = "transformers") -> dict:
    """What the model card of ``loaded`` (a ``models.LoadedModel`` of a run folder or an export) says, as a plain
    dict. ``policy``: the exit policy text the export runs by default (DACT); ``front``: measured points
    ``{"policy", "avg_exit_layer", "accuracy", "latency_ms_p50" (optional)}``; ``runtime``: "transformers" or
    "onnx" (which loading code the card shows). The metrics are report.json's own values."""
    cfg, model = loaded.config, loaded.model
    rep = _report(loaded.run_dir)
    test, report = rep.get("test") or {}, rep.get("report") or {}
    kind = cfg.kind
    tasks = list(loaded.label_maps) if kind == "multitask" else [getattr(model, "task", None) or
                                                               next(iter(loaded.label_maps))]
    enc_cfg = getattr(getattr(model, "encoder", None), "config", None)
    metrics: dict[str, Any] = {}
    for key in ("accuracy", "macro_f1", "avg_exit_layer"):
        if f"test_{key}" in test:
            metrics[key] = test[f"test_{key}"]
        elif key == "avg_exit_layer" and "avg_exit_layer" in report:
            metrics[key] = report["avg_exit_layer"]
        elif key != "avg_exit_layer" and len(tasks) == 1 and key in (report.get("tasks") or {}).get(tasks[0], {}):
            metrics[key] = report["tasks"][tasks[0]][key]
    per_task, counts = {}, {}
    for t in tasks:
        tr = (report.get("tasks") or {}).get(t) or {}
        per_task[t] = {k: tr[k] for k in ("accuracy", "macro_f1") if k in tr}
        labels, matrix = tr.get("labels"), tr.get("confusion_matrix")
        if labels and matrix:
            counts[t] = {name: int(sum(row)) for name, row in zip(labels, matrix)}
    if report.get("exit_histogram"):
        metrics["exit_histogram"] = report["exit_histogram"]
    data = cfg.data
    if data.path:
        ds_name = Path(data.path).name
    elif data.dataset_id is not None:
        ds_name = f"dataset {data.dataset_id} of the DACT Lab home"
    else:
        ds_name = "the DACT Lab demo dataset"
    tc = cfg.train
    training = {"epochs": tc.epochs, "batch_size": tc.batch_size, "encoder_lr": tc.encoder_lr, "head_lr": tc.head_lr,
                "weight_decay": tc.weight_decay, "warmup_ratio": tc.warmup_ratio, "seed": tc.seed,
                "precision": tc.precision, "max_seq_len": data.max_seq_len, "pooling": cfg.model.pooling}
    if kind == "dact":
        m = cfg.model
        training.update(ponder_lambda=m.ponder_lambda, layer_loss_weight=m.layer_loss_weight,
                        halting_input=m.halting_input, fit_halting=m.fit_halting)
    if kind == "multitask" and cfg.model.task_weights:
        training["task_weights"] = dict(cfg.model.task_weights)
    halting = None
    if kind == "dact":
        chosen = (rep.get("halting") or {}).get("chosen")
        halting = {"chosen": chosen, "user_choice": loaded.halting}
    n_layers = getattr(model, "num_layers", None) or getattr(enc_cfg, "num_hidden_layers", None) or \
        getattr(enc_cfg, "n_layers", None)
    return {
        "name": cfg.name,
        "kind": kind,
        "encoder": cfg.encoder,
        "encoder_type": getattr(enc_cfg, "model_type", None),
        "base_model": hub_name(cfg.encoder),
        "num_layers": n_layers,
        "tasks": {t: list(loaded.label_maps[t]) for t in tasks},
        "max_seq_len": data.max_seq_len,
        "dataset": {"name": ds_name, "path": data.path, "dataset_id": data.dataset_id, "max_rows": data.max_rows,
                    "val_frac": data.val_frac, "test_frac": data.test_frac, "test_label_counts": counts},
        "metrics": metrics,
        "task_metrics": per_task,
        "policy": (policy or loaded.policy or "dact") if kind == "dact" else None,
        "front": [dict(p) for p in (front or [])],
        "runtime": runtime,
        "training": training,
        "halting": halting,
        "source_run": source_run(loaded),
    }


# ----------------------------------------------------------------------------------------------------------------
# the card
# ----------------------------------------------------------------------------------------------------------------
def _y(value: Any) -> str:
    """A YAML scalar: JSON's spelling (a double-quoted string, a number that reads back exactly, true/false/null)."""
    return json.dumps(value)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _title(info: dict) -> str:
    if info.get("name"):
        return str(info["name"])
    src = info.get("source_run")
    run = f" (run {src})" if isinstance(src, int) else ""
    return f"DACT Lab {info.get('kind', 'model')} model{run}"


def _yaml_block(info: dict) -> list[str]:
    kind = info.get("kind")
    tags = ["dact-lab", "text-classification"]
    if kind == "dact":
        tags += ["early-exit", "dact", "adaptive-computation"]
    elif kind == "multitask":
        tags.append("multi-task")
    onnx = info.get("runtime") == "onnx"
    if onnx:
        tags.append("onnx")
    tags += [t for t in info.get("tags", []) if t not in tags]
    lines = ["---", f"library_name: {'onnx' if onnx else 'transformers'}", "pipeline_tag: text-classification",
             "tags:"]
    lines += [f"- {_y(t)}" for t in tags]
    if info.get("base_model"):
        lines.append(f"base_model: {_y(info['base_model'])}")
    if info.get("language"):
        langs = info["language"] if isinstance(info["language"], list) else [info["language"]]
        lines += ["language:"] + [f"- {_y(lang)}" for lang in langs]
    if info.get("license"):
        lines.append(f"license: {_y(info['license'])}")
    metrics = info.get("metrics") or {}
    rows: list[tuple[str, Any, str, str | None]] = []  # (type, value, name, average)
    if "accuracy" in metrics:
        rows.append(("accuracy", metrics["accuracy"], "Test accuracy", None))
    if "macro_f1" in metrics:
        rows.append(("f1", metrics["macro_f1"], "Test macro-F1", "macro"))
    if "avg_exit_layer" in metrics:
        rows.append(("avg_exit_layer", metrics["avg_exit_layer"], "Average exit layer (test)", None))
    if rows:
        ds = info.get("dataset") or {}
        lines += ["model-index:", f"- name: {_y(_title(info))}", "  results:", "  - task:",
                  "      type: text-classification", "      name: Text Classification", "    dataset:",
                  f"      name: {_y(ds.get('name') or 'unknown')}", "      type: custom", "      split: test",
                  "    metrics:"]
        for typ, value, name, avg in rows:
            lines += [f"    - type: {typ}", f"      value: {_y(value)}", f"      name: {_y(name)}"]
            if avg:
                lines += ["      args:", f"        average: {avg}"]
    lines.append("---")
    return lines


def _usage(info: dict) -> list[str]:
    if info.get("usage"):
        return [str(info["usage"]).rstrip()]
    folder = info.get("folder") or "path/to/this/folder"
    max_len = info.get("max_seq_len") or 128
    if info.get("runtime") == "onnx":
        return [
            "This folder holds the model as ONNX graphs (a DACT model: the embeddings and one graph per encoder "
            "layer with its exit) run by DACT Lab's torch-free early-exit runtime, which needs `onnxruntime`, "
            "`numpy` and `tokenizers` only (no torch, no transformers):",
            "",
            "```python",
            "from dact_lib.deploy.runtime import OnnxModel",
            "",
            f"model = OnnxModel({json.dumps(folder)})  # the int8 graphs when the folder has them; int8=False: fp32",
            "for row in model.predict([\"The soup was cold.\"]):  # label, probabilities (and exit layer) per text",
            "    print(row)",
            "```",
        ]
    lines = [
        "The model code ships in this folder (`modeling_dact_lab.py`, needs `torch` and `transformers` only), so "
        "load it with `trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline",
        "",
        f"folder = {json.dumps(folder)}",
        "tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)",
        "model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)",
        f"batch = tokenizer([\"The soup was cold.\"], padding=True, truncation=True, max_length={max_len}, "
        "return_tensors=\"pt\")",
        "out = model(**batch)",
        "probs = out.logits.softmax(-1)  # logits are the log of the answer probabilities",
    ]
    if info.get("kind") == "dact":
        lines += ["print(out.exit_layer)  # the 1-based layer each sentence left at",
                  "out = model(**batch, exit_policy=\"entropy:0.3\")  # another exit policy for one call"]
    if info.get("kind") == "multitask":
        lines += ["task_probs = [t.softmax(-1) for t in out.task_logits]  # one per task, in config.tasks order"]
    lines += [
        "",
        "classifier = pipeline(\"text-classification\", model=folder, trust_remote_code=True, top_k=None)",
        "print(classifier(\"The soup was cold.\", truncation=True))",
        "```",
    ]
    if info.get("kind") == "multitask":
        lines += ["", "The pipeline reports the first task; `out.task_logits` has every task."]
    lines += ["", "`encoder/` holds the encoder alone (`AutoModel.from_pretrained(folder + \"/encoder\")`, no custom "
                  "code); its `last_hidden_state` is the fine-tuned encoder's. Its pooler layer was not trained "
                  "(DACT Lab pools the hidden states itself): do not use `pooler_output`."]
    return lines


# complexity: one optional section per record the run has (tasks, metrics, exits, dataset, runtime)
def model_card(info: dict) -> str:
    """The model card (README.md text) from :func:`card_info`'s dict (plus any keys a caller added)."""
    kind = info.get("kind", "backbone")
    tasks: dict[str, list[str]] = info.get("tasks") or {}
    metrics = info.get("metrics") or {}
    ds = info.get("dataset") or {}
    out = _yaml_block(info)
    out += ["", f"# {_title(info)}", ""]
    if info.get("description"):
        out += [str(info["description"]), ""]
    # -- the model
    enc = info.get("encoder")
    base = info.get("base_model")
    enc_text = f"`{enc}`" + (f" ([{base}](https://huggingface.co/{base}))" if base and base != enc else "")
    if enc and str(enc).strip().lower() == "tiny":
        enc_text += " (a tiny randomly initialised BERT for tests: its predictions mean nothing)"
    elif enc and is_bundled(str(enc)):
        enc_text = f"`{BUNDLED_NAME}` ([{BUNDLED_HUB_NAME}](https://huggingface.co/{BUNDLED_HUB_NAME}))"
    out += ["## Model", "",
            f"Trained with DACT Lab as {_KIND_TEXT.get(kind, kind)}.", "",
            f"* kind: `{kind}`",
            f"* encoder: {enc_text}, model type `{info.get('encoder_type')}`, {info.get('num_layers')} layers",
            f"* maximum input length: {info.get('max_seq_len')} tokens (longer texts are truncated)"]
    for t, labels in tasks.items():
        out.append(f"* task `{t}`: {len(labels)} labels — " + ", ".join(f"`{n}`" for n in labels))
    if info.get("source_run") is not None:
        out.append(f"* source run: `{info['source_run']}`")
    out.append("")
    # -- the data
    out += ["## Data", "", f"* dataset: {ds.get('name') or 'unknown'}"]
    if ds.get("max_rows"):
        out.append(f"* rows used: at most {ds['max_rows']}")
    if ds.get("val_frac") is not None:
        out.append(f"* held out: {ds.get('val_frac'):g} validation, {ds.get('test_frac'):g} test (stratified)")
    for t, counts in (ds.get("test_label_counts") or {}).items():
        total = sum(counts.values())
        out.append(f"* test split, `{t}`: {total} rows — " + ", ".join(f"{n}: {c}" for n, c in counts.items()))
    if ds.get("rows"):
        out.append(f"* rows: {ds['rows']}")
    for t, counts in (ds.get("label_counts") or {}).items():
        out.append(f"* label counts, `{t}`: " + ", ".join(f"{n}: {c}" for n, c in counts.items()))
    out.append("")
    # -- results
    out += ["## Results on the test split", ""]
    if metrics:
        out += ["| metric | value |", "|---|---|"]
        if "accuracy" in metrics:
            out.append(f"| accuracy | {_num(metrics['accuracy'])} |")
        if "macro_f1" in metrics:
            out.append(f"| macro-F1 | {_num(metrics['macro_f1'])} |")
        if "avg_exit_layer" in metrics:
            out.append(f"| average exit layer | {_num(metrics['avg_exit_layer'])} of {info.get('num_layers')} |")
        task_metrics = info.get("task_metrics") or {}
        if len(task_metrics) > 1:
            for t, m in task_metrics.items():
                for k, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
                    if k in m:
                        out.append(f"| `{t}` {label} | {_num(m[k])} |")
        out.append("")
        if metrics.get("exit_histogram"):
            hist = ", ".join(f"layer {k}: {v}" for k, v in sorted(metrics["exit_histogram"].items(),
                                                                     key=lambda kv: int(kv[0])))
            out += [f"Exit layers on the test split: {hist}.", ""]
        out += ["These are the run's own records (`report.json`), measured on its held-out test split.", ""]
    else:
        out += ["Not recorded: the run has no test report.", ""]
    # -- exit policy
    if kind == "dact":
        policy = info.get("policy") or "dact"
        where = ("the manifest's; per call: `predict(texts, policy=...)`" if info.get("runtime") == "onnx" else
                 "`config.exit_policy`; change it there or per call with `exit_policy=`")
        out += ["## Exit policy", "",
                f"Default: `{policy}` ({where}). "
                "Policies: `dact` (the DACT halting rule: stop when the remaining layers cannot change the "
                "accumulated answer's argmax), `entropy:S` (stop at the first layer whose prediction entropy is "
                "below S nats), `patience:T` (stop after T consecutive layers agree), `fixed:K` (every sentence "
                "runs K layers)."]
        halting = info.get("halting") or {}
        chosen, user = halting.get("chosen"), halting.get("user_choice")
        if user:
            out += ["", "The halting units are a point chosen by the user among the fitted ones "
                    f"({', '.join(f'{k} = {v}' for k, v in user.items() if k != 'file')}); the test metrics above "
                    "were measured with the run's own halting units."]
        elif chosen:
            kept = FrontPoint.from_dict(chosen)
            out += ["", f"The halting units were fitted after training (λ = {_num(kept.front_lambda, 3)}; "
                    f"validation: average exit layer {_num(kept.val_avg_exit_layer, 2)}, accuracy "
                    f"{_num(kept.val_accuracy)})."]
        front = info.get("front") or []
        if front:
            latency = any(p.get("latency_ms_p50") is not None for p in front)
            out += ["", "Measured trade-off of the policies:", "",
                    "| policy | average exit layer | accuracy |" + (" latency p50 (ms) |" if latency else ""),
                    "|---|---|---|" + ("---|" if latency else "")]
            for p in front:
                row = f"| `{p.get('policy')}` | {_num(p.get('avg_exit_layer'), 2)} | {_num(p.get('accuracy'))} |"
                if latency:
                    row += f" {_num(p.get('latency_ms_p50'), 2)} |"
                out.append(row)
        out.append("")
    # -- intended use and limits
    out += ["## Intended use and limits", "",
            f"Classifying short texts into the labels above, as in the training data ({ds.get('name') or 'unknown'})."
            " It knows only these labels and the kind of text it was trained on; expect lower accuracy on other "
            "domains. The test split is small when the dataset is small: read the metrics with that in mind."]
    if kind == "dact":
        out += ["", "Early exit saves encoder layers per sentence; the wall-clock gain depends on the hardware and "
                "the batch (rows leave the batch when they exit). A sentence that exits early gets the answer of a "
                "shallower classifier."]
    if info.get("limitations"):
        out += ["", str(info["limitations"])]
    out.append("")
    # -- training
    tr = info.get("training") or {}
    out += ["## Training", ""]
    names = {"epochs": "epochs", "batch_size": "batch size", "encoder_lr": "encoder learning rate",
             "head_lr": "head learning rate", "weight_decay": "weight decay", "warmup_ratio": "warm-up ratio",
             "seed": "seed", "precision": "precision", "max_seq_len": "max sequence length", "pooling": "pooling",
             "ponder_lambda": "ponder λ", "layer_loss_weight": "per-layer loss weight",
             "halting_input": "halting input", "fit_halting": "halting units fitted after training",
             "task_weights": "task weights"}
    for k, v in tr.items():
        out.append(f"* {names.get(k, k)}: {v:g}" if isinstance(v, float) else f"* {names.get(k, k)}: {v}")
    out.append("")
    # -- how to use
    out += ["## How to use", ""] + _usage(info) + [""]
    return "\n".join(out)
