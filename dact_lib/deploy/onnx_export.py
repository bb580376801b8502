"""Export a trained run as ONNX graphs for the torch-free runtime (``deploy/runtime.py``), optionally int8.

A DACT model becomes ``embed.onnx`` (input_ids, attention_mask → hidden) and one graph per layer,
``layer_{n}.onnx`` (hidden, attention_mask[, a_prev] → hidden_out, y, h): the encoder layer WITH its exit
classifier and halting unit, so the runtime can stop after any layer. The last layer's graph gives only y (the
DACT rule always halts there, so h_N is never read). Halting units that read confidence features get them inside
the graph (:func:`confidence_features_onnx`, the ONNX-friendly twin of ``dact.confidence_features``); their
a_{n-1} is an input. A backbone or multitask model is one ``model.onnx`` (input_ids, attention_mask → the
probabilities of each task). Batch and sequence axes are dynamic.

The encoder is traced with the eager attention implementation (transformers' sdpa mask builder returns None for
an unpadded batch, which a tracer would bake in) on a padded batch of two rows; a layer graph of a BERT-like encoder
builds its additive [B, 1, 1, T] mask itself (:func:`layer_mask`: 4 nodes instead of transformers' ~40, which every
layer graph would repeat). The graphs are then checked with ONNX Runtime against the PyTorch model (in its own
attention implementation) on a padded batch of three sentences and on each sentence alone.

The folder (written into a temp folder beside it and renamed into place at the end: never half an export):
``dact_lab_onnx.json`` (the manifest, layout in ``runtime.py``), the graphs, ``int8/`` (with ``int8=True``), the
tokenizer files (``tokenizer.json`` is what the runtime reads) and the model card ``README.md``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dact
from ..encoders import layer_adapter
from ..errors import ConfigError, DactLabError
from ..files import check_replaceable_dir, replace_dir
from ..heads import pool
from ..modeling_dact import DactBert
from .policy import canonical, parse_policy
from .runtime import FORMAT, FORMAT_VERSION, MANIFEST_FILE, read_manifest

DEFAULT_OPSET = 17
INT8_DIR = "int8"
# quantize_dynamic settings, measured on the bundled MiniLM (DACT, SST-2 dev, 2 cores with AVX-512 VNNI): MatMul only
# (the encoder's weight matrices; the small exit heads are Gemm and stay fp32); QInt8 weights (QUInt8 was ~40% slower
# at batch 1); per-channel (98.6% of the answers equal fp32's at full depth, 94.7% per-tensor, same speed).
INT8_OP_TYPES = ("MatMul",)
INT8_PER_CHANNEL = True
INT8_WEIGHT_TYPE = "QInt8"
QUANTIZE_EMBED = False  # the embeddings graph holds no weight MatMul: nothing to gain
CHECK_TOLERANCE = 1e-4
_TRACE_TEXTS = ("a short one", "a somewhat longer sentence, so that the first row of the trace batch is padded")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_CHECK_TEXTS = ("fine", "the plot was thin, but the actors carried it to a warm and funny ending", "not good")


# ----------------------------------------------------------------------------------------------------------------
# the graphs
# ----------------------------------------------------------------------------------------------------------------
def confidence_features_onnx(y_n: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """``dact.confidence_features`` in operators every ONNX exporter knows (TopK, ArgMax, Log, Where): [B, 4] =
    max, margin, entropy / ln K (0·log 0 = 0), agree (argmax y_n == argmax a_{n-1}, only once a_{n-1} has started,
    i.e. sums to more than 0). Equal to the torch function (tests/test_export_onnx.py)."""
    k = y_n.shape[-1]
    if k >= 2:
        top = torch.topk(y_n, 2, dim=-1).values
        best, runner_up = top[..., 0], top[..., 1]
        safe = torch.where(y_n > 0, y_n, torch.ones_like(y_n))
        ent = (-(y_n * torch.log(safe))).sum(-1) / math.log(k)
    else:
        best = y_n[..., 0]
        runner_up = torch.zeros_like(best)
        ent = torch.zeros_like(best)
    started = a_prev.sum(-1) > 0
    agree = ((y_n.argmax(-1) == a_prev.argmax(-1)) & started).to(y_n.dtype)
    return torch.stack([best, best - runner_up, ent, agree], dim=-1)


def halting_probability(model: DactBert, n: int, base: torch.Tensor, y_n: torch.Tensor,
                        a_prev: torch.Tensor | None) -> torch.Tensor:
    """h_n [B] as ``DactUnits.halt_prob`` computes it, with :func:`confidence_features_onnx`."""
    how = model.cfg.halting_input
    if how == "summary":
        x = base
    else:
        if a_prev is None:
            raise ValueError(f"halting_input={how!r} needs a_(n-1), the accumulated answer before layer {n}")
        conf = confidence_features_onnx(y_n, a_prev).to(base.dtype)
        x = conf if how == "confidence" else torch.cat([base, conf], dim=-1)
    mlp = model.halters[0 if model.cfg.share_weights else n - 1]
    return torch.sigmoid(mlp(x).float()).squeeze(-1)


# families whose eager attention adds the mask to the scores (``attn_weights + attention_mask``): a [B, 1, 1, T]
# additive mask is what transformers' eager mask builder gives ([B, 1, T, T], 0 / the dtype's minimum), broadcast,
# in 4 graph nodes instead of ~40 — every layer graph builds its own, so this is most of the cost of splitting.
ADDITIVE_MASK_FAMILIES = ("bert", "roberta", "distilbert")


def layer_mask(adapter, attention_mask: torch.Tensor, dtype: torch.dtype):
    """The mask a layer of ``adapter`` takes, from the [B, T] padding mask (eager attention)."""
    if adapter.family in ADDITIVE_MASK_FAMILIES:
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return adapter.prepare_mask(attention_mask, dtype)


class EmbedGraph(nn.Module):
    """input_ids, attention_mask → hidden [B, T, H] (the encoder's embeddings)."""

    def __init__(self, model: DactBert) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.adapter.embed(input_ids, attention_mask)


class LayerGraph(nn.Module):
    """Layer ``n`` (1-based) with its exit: hidden, attention_mask[, a_prev] → hidden_out, y [B, K], h [B]; the last
    layer → y only."""

    def __init__(self, model: DactBert, n: int) -> None:
        super().__init__()
        self.model = model
        self.n = n
        self.last = n == model.num_layers

    def forward(self, hidden, attention_mask, a_prev=None):
        m = self.model
        ad = m.adapter
        hidden = ad.run_layer(self.n - 1, hidden, layer_mask(ad, attention_mask, hidden.dtype))
        y_n, base = m.classify(self.n, pool(hidden, attention_mask, m.cfg.pooling))
        if self.last:
            return y_n
        return hidden, y_n, halting_probability(m, self.n, base, y_n, a_prev)


class WholeGraph(nn.Module):
    """A backbone or multitask model: input_ids, attention_mask → the probabilities of each task, in ``tasks`` order."""

    def __init__(self, model: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids, attention_mask)
        return tuple(out.probs[t] for t in self.tasks)


def graph_specs(model: nn.Module, tasks: list[str]) -> dict[str, dict]:
    """role → {"file", "inputs", "outputs"} of every graph of an export (the manifest's ``graphs``)."""
    if isinstance(model, DactBert):
        specs = {"embed": {"file": "embed.onnx", "inputs": ["input_ids", "attention_mask"], "outputs": ["hidden"]}}
        for n in range(1, model.num_layers + 1):
            last = n == model.num_layers
            inputs = ["hidden", "attention_mask"] + (["a_prev"] if model.needs_a_prev and not last else [])
            outputs = ["y"] if last else ["hidden_out", "y", "h"]
            specs[f"layer_{n}"] = {"file": f"layer_{n}.onnx", "inputs": inputs, "outputs": outputs}
        return specs
    return {"model": {"file": "model.onnx", "inputs": ["input_ids", "attention_mask"],
                      "outputs": [f"probs_{i}" for i in range(len(tasks))]}}


_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
         "hidden": {0: "batch", 1: "seq"}, "hidden_out": {0: "batch", 1: "seq"}, "a_prev": {0: "batch"},
         "y": {0: "batch"}, "h": {0: "batch"}}


def _export_one(module: nn.Module, args: tuple, path: Path, spec: dict, opset: int) -> None:
    axes = {name: _AXES.get(name, {0: "batch"}) for name in spec["inputs"] + spec["outputs"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python ints taken from shapes (dynamic axes cover them)
        torch.onnx.export(module, args, str(path), input_names=spec["inputs"], output_names=spec["outputs"],
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
    import onnx

    # the tracer drops an input the graph does not read (BERT's embeddings ignore the attention mask): put it back,
    # unused, so every embed graph takes (input_ids, attention_mask) whatever the encoder family
    proto = onnx.load(str(path))
    have = {i.name for i in proto.graph.input}
    missing = [name for name in spec["inputs"] if name not in have]
    if missing:
        for name in missing:
            elem = onnx.TensorProto.INT64 if name in ("input_ids", "attention_mask") else onnx.TensorProto.FLOAT
            dims = ["batch", "seq"] if name in ("input_ids", "attention_mask") else None
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, dims))
        order = {name: i for i, name in enumerate(spec["inputs"])}
        inputs = sorted(proto.graph.input, key=lambda v: order.get(v.name, len(order)))
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        onnx.save(proto, str(path))


class _EagerAttention:
    """The encoder config's attention implementation set to "eager" for the export, restored afterwards."""

    def __init__(self, config) -> None:
        self.config = config
        self.saved = getattr(config, "_attn_implementation", None)

    def __enter__(self):
        self.config._attn_implementation = "eager"
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved
        return False


# ----------------------------------------------------------------------------------------------------------------
# the folder
# ----------------------------------------------------------------------------------------------------------------
def _policy_text(model: nn.Module, policy: str | None, default: str | None = None) -> str | None:
    """The export's default exit policy, canonical: ``policy``, else the loaded export's own (``default``), else
    ``dact``; None for a model that does not exit early."""
    if not isinstance(model, DactBert):
        if policy is not None and str(policy).strip():
            raise ConfigError(f"exit policy {policy!r}: only a DACT model exits early; export this model without one.")
        return None
    if policy is None or not str(policy).strip():
        policy = default
    name, value = parse_policy(policy)
    if name == "fixed" and value is not None and value > model.num_layers:
        raise ConfigError(f"exit policy {policy!r}: the model has {model.num_layers} layers; use fixed:1 to "
                          f"fixed:{model.num_layers}.")
    return canonical(policy)


def _tokenizer_info(tokenizer, max_len: int) -> dict:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise DactLabError("The run's tokenizer has no padding token: the ONNX runtime pads batches with it. Set "
                           "tokenizer.pad_token before exporting.")
    return {"file": "tokenizer.json", "max_length": int(max_len), "pad_id": int(pad_id),
            "pad_token": str(tokenizer.pad_token), "padding_side": str(getattr(tokenizer, "padding_side", "right")),
            "truncation_side": str(getattr(tokenizer, "truncation_side", "right"))}


def _import_checked():
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
        import onnxruntime
    except ImportError as exc:
        raise DactLabError(f"ONNX export needs the onnx and onnxruntime packages ({exc}): pip install onnx "
                           "onnxruntime") from None
    return onnxruntime


def export_onnx(loaded, out_dir: str | Path, *, int8: bool = False, policy: str | None = None,
                opset: int | None = None) -> Path:
    """Write ``loaded`` (a :class:`dact_lib.models.LoadedModel`) as an ONNX export into ``out_dir`` (see the module
    doc); ``int8`` adds the dynamically quantized graphs under ``int8/``; ``policy`` is the default exit policy the
    runtime uses (text, ``deploy.policy``; DACT only; default ``dact``). Returns the folder."""
    ort = _import_checked()
    model = loaded.model
    tasks = [model.task] if hasattr(model, "task") else list(model.tasks)
    policy_text = _policy_text(model, policy, getattr(loaded, "policy", None))
    opset = int(opset or DEFAULT_OPSET)
    out = Path(out_dir).expanduser().resolve()
    check_replaceable_dir(out, read_manifest, "ONNX export of DACT Lab")
    max_len = int(loaded.config.data.max_seq_len)
    tok_info = _tokenizer_info(loaded.tokenizer, max_len)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.onnx-tmp-", dir=out.parent))
    device = loaded.device
    t0 = time.perf_counter()
    try:
        model.to("cpu")
        specs = graph_specs(model, tasks)
        with torch.no_grad(), _EagerAttention(model.encoder.config):
            _trace(model, loaded.tokenizer, max_len, tasks, specs, tmp, opset)
        check = _verify(model, loaded.tokenizer, max_len, tasks, specs, tmp, ort)
        loaded.tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").is_file():
            raise DactLabError("The run's tokenizer is not a fast tokenizer (save_pretrained wrote no "
                               "tokenizer.json): the ONNX runtime reads tokenizer.json with the `tokenizers` library.")
        variants = {"fp32": {role: s["file"] for role, s in specs.items()}}
        quant = None
        if int8:
            variants["int8"], quant = _quantize(tmp, specs)
            _smoke(tmp, specs, variants["int8"], ort, loaded.tokenizer, max_len, getattr(model, "num_classes", 0))
        manifest = _manifest(loaded, model, tasks, specs, variants, quant, policy_text, tok_info, opset, check,
                             time.perf_counter() - t0)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _write_card(loaded, policy_text, tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp made it 0700
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.to(device)
    return out


def _batch(tokenizer, texts, max_len):
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _trace(model, tokenizer, max_len, tasks, specs, folder: Path, opset: int) -> None:
    ids, am = _batch(tokenizer, _TRACE_TEXTS, max_len)
    if bool(am.all()):  # a tiny max_seq_len truncated both rows to one length: pad them by one token
        ids = torch.cat([ids, torch.full_like(ids[:, :1], int(tokenizer.pad_token_id))], 1)
        am = torch.cat([am, torch.zeros_like(am[:, :1])], 1)
    if not isinstance(model, DactBert):
        _export_one(WholeGraph(model, tasks).eval(), (ids, am), folder / specs["model"]["file"], specs["model"], opset)
        return
    _export_one(EmbedGraph(model).eval(), (ids, am), folder / specs["embed"]["file"], specs["embed"], opset)
    hidden = model.adapter.embed(ids, am)
    a_prev = torch.zeros(ids.shape[0], model.num_classes)
    a_prev[0, 0] = 1.0  # a started row and a fresh one: both branches of the agree feature are real data
    for n in range(1, model.num_layers + 1):
        spec = specs[f"layer_{n}"]
        args = (hidden, am, a_prev) if "a_prev" in spec["inputs"] else (hidden, am)
        _export_one(LayerGraph(model, n).eval(), args, folder / spec["file"], spec, opset)
        mask = model.adapter.prepare_mask(am, hidden.dtype)
        hidden = model.adapter.run_layer(n - 1, hidden, mask)


# ----------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------
def _session(ort, path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _torch_reference(model, ids, am):
    """Per-layer (y_n, h_n, a_{n-1}) of a DACT model on the whole padded batch, in its own attention
    implementation; probabilities per task for the others."""
    if not isinstance(model, DactBert):
        return model(ids, am).probs
    ad = model.adapter
    hidden = ad.embed(ids, am)
    mask = ad.prepare_mask(am, hidden.dtype)
    a = torch.zeros(ids.shape[0], model.num_classes)
    p = torch.ones(ids.shape[0])
    out = []
    for n in range(1, model.num_layers + 1):
        hidden = ad.run_layer(n - 1, hidden, mask)
        y_n, h_n = model.unit(n, hidden, am, a)
        out.append((y_n, h_n, a))
        a, p = dact.accumulate_step(a, p, y_n, h_n)
    return out


def _run_dact_graphs(sessions, specs, ids, am, a_prevs):
    hidden = sessions["embed"].run(None, _feed(specs["embed"], input_ids=ids, attention_mask=am))[0]
    got = []
    for n in range(1, len(sessions)):
        spec = specs[f"layer_{n}"]
        res = sessions[f"layer_{n}"].run(None, _feed(spec, hidden=hidden, attention_mask=am, a_prev=a_prevs[n - 1]))
        if len(res) == 1:
            got.append((res[0], None))
        else:
            hidden = res[0]
            got.append((res[1], res[2]))
    return got


def _feed(spec, **arrays):
    return {name: arrays[name] for name in spec["inputs"]}


def _verify(model, tokenizer, max_len, tasks, specs, folder: Path, ort) -> dict:
    """The fp32 graphs against the PyTorch model: a padded batch of three sentences, and each sentence alone
    (padded rows must give what unpadded ones give). Raises DactLabError beyond :data:`CHECK_TOLERANCE`."""
    sessions = {role: _session(ort, folder / s["file"]) for role, s in specs.items()}
    ids, am = _batch(tokenizer, _CHECK_TEXTS, max_len)
    worst = 0.0
    with torch.no_grad():
        ref = _torch_reference(model, ids, am)
    np_ids, np_am = ids.numpy(), am.numpy()
    for rows in [list(range(len(_CHECK_TEXTS)))] + [[i] for i in range(len(_CHECK_TEXTS))]:
        length = int(am[rows].sum(1).max())
        sub_ids, sub_am = np_ids[rows, :length], np_am[rows, :length]
        if isinstance(model, DactBert):
            a_prevs = [r[2][rows].numpy() for r in ref]
            got = _run_dact_graphs(sessions, specs, sub_ids, sub_am, a_prevs)
            for (y_ref, h_ref, _), (y, h) in zip(ref, got):
                worst = max(worst, float(np.abs(y - y_ref[rows].numpy()).max()))
                if h is not None:
                    worst = max(worst, float(np.abs(h - h_ref[rows].numpy()).max()))
        else:
            got = sessions["model"].run(None, {"input_ids": sub_ids, "attention_mask": sub_am})
            for t, probs in zip(tasks, got):
                worst = max(worst, float(np.abs(probs - ref[t][rows].numpy()).max()))
    if not worst <= CHECK_TOLERANCE:
        raise DactLabError(f"The exported graphs do not reproduce the PyTorch model (largest difference {worst:.2e} > "
                           f"{CHECK_TOLERANCE:g}): this encoder does not trace cleanly to ONNX; use the transformers "
                           "export of the run instead.")
    return {"texts": len(_CHECK_TEXTS), "max_abs_diff": worst, "tolerance": CHECK_TOLERANCE}


class _QuietQuantizer(logging.Filter):
    """quantize_dynamic warns through the root logger that the graph was not pre-processed (measured: pre-processing
    changes neither the accuracy nor the speed here, and costs seconds). Drop that one message, and keep the module-level
    ``logging.warning`` from configuring the caller's root logger (it calls ``basicConfig`` when root has no
    handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # and its INFO lines through the root logger, one per tensor ("Quantization parameters for tensor … not
        # specified"): noise on a CLI user's terminal at --verbosity 1
        return record.levelno > logging.INFO and "pre-processing before quantization" not in record.getMessage()

    def __enter__(self):
        root = logging.getLogger()
        self.null = logging.NullHandler() if not root.handlers else None
        if self.null is not None:
            root.addHandler(self.null)
        root.addFilter(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeFilter(self)
        if self.null is not None:
            root.removeHandler(self.null)
        return False


def _quantize(folder: Path, specs: dict) -> tuple[dict, dict]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (folder / INT8_DIR).mkdir()
    files = {}
    with _QuietQuantizer():
        for role, spec in specs.items():
            if role == "embed" and not QUANTIZE_EMBED:
                files[role] = spec["file"]
                continue
            rel = f"{INT8_DIR}/{spec['file']}"
            quantize_dynamic(str(folder / spec["file"]), str(folder / rel), op_types_to_quantize=list(INT8_OP_TYPES),
                             per_channel=INT8_PER_CHANNEL, weight_type=getattr(QuantType, INT8_WEIGHT_TYPE))
            files[role] = rel
    quant = {"method": "onnxruntime.quantization.quantize_dynamic", "op_types": list(INT8_OP_TYPES),
             "per_channel": INT8_PER_CHANNEL, "weight_type": INT8_WEIGHT_TYPE, "embed_quantized": QUANTIZE_EMBED}
    return files, quant


def _smoke(folder: Path, specs: dict, files: dict, ort, tokenizer, max_len: int, num_classes: int) -> None:
    """The int8 graphs load and give finite probabilities on the check batch."""
    ids, am = (t.numpy() for t in _batch(tokenizer, _CHECK_TEXTS, max_len))
    sessions = {role: _session(ort, folder / f) for role, f in files.items()}
    if "model" in sessions:
        outs = sessions["model"].run(None, {"input_ids": ids, "attention_mask": am})
    else:
        a_prevs = [np.zeros((ids.shape[0], num_classes), np.float32)] * (len(sessions) - 1)
        outs = [y for y, _ in _run_dact_graphs(sessions, specs, ids, am, a_prevs)]
    if not all(np.isfinite(o).all() for o in outs):
        raise DactLabError("The int8 graphs give non-finite outputs: export without int8.")  # pragma: no cover


def _manifest(loaded, model, tasks, specs, variants, quant, policy_text, tok_info, opset, check, seconds) -> dict:
    import onnx
    import onnxruntime
    import transformers

    from ..version import version

    man = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": loaded.kind,
        "tasks": tasks,
        "labels": {t: list(loaded.label_maps[t]) for t in tasks},
        "max_seq_len": int(loaded.config.data.max_seq_len),
        "pooling": model.cfg.pooling,
        "tokenizer": tok_info,
        "graphs": {role: {"inputs": s["inputs"], "outputs": s["outputs"]} for role, s in specs.items()},
        "variants": variants,
        "quantization": quant,
        "opset": opset,
        "config": loaded.config.to_dict(),
        "source_run": {"run_dir": str(loaded.run_dir), "run": _run_id(Path(loaded.run_dir)),
                       "halting_choice": loaded.halting},
        "check": check,
        "exported_with": {"dact_lib": version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "onnx": onnx.__version__,
                          "onnxruntime": onnxruntime.__version__},
        "export_seconds": round(seconds, 2),
    }
    if isinstance(model, DactBert):
        man.update({"num_layers": model.num_layers, "num_classes": model.num_classes, "policy": policy_text,
                    "halting_input": model.cfg.halting_input})
    else:
        man.update({"num_layers": layer_adapter(model.encoder).num_layers, "policy": None,
                    "outputs": {t: f"probs_{i}" for i, t in enumerate(tasks)}})
    return man


def _run_id(run_dir: Path) -> int | str:
    return int(run_dir.name) if run_dir.name.isdigit() and run_dir.parent.name == "runs" else str(run_dir)


def _write_card(loaded, policy_text, folder: Path) -> None:
    try:
        from .card import card_info, model_card
    except ImportError:  # deploy/card.py arrives with the transformers export; until then, no card
        return
    text = model_card(card_info(loaded, policy=policy_text, front=None, runtime="onnx"))
    (folder / "README.md").write_text(text, encoding="utf-8")
