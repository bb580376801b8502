"""The one training loop. Every mode — backbone, DACT, multi-task, each Optuna trial, each PBT member — runs here.

Read it top to bottom in :func:`train`: data → model → optimizer/schedule → epochs of steps (with evaluation,
early stopping and best-epoch checkpoints) → restore the best weights → test evaluation → save.
Everything it reports goes through the callbacks (``callbacks.py``): tracker, progress bar, Optuna, PBT, UI.
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .callbacks import Callback, CallbackList, CancelToken, LoopState
from .config import EarlyStoppingConfig, RunConfig, TrainConfig, evals_per_epoch
from .data import DatasetSplit, TextDataset, encode, iter_batches, load_demo_dataset, num_batches, read_csv, split_dataset
from .errors import Cancelled, DactLabError
from .heads import EncoderModel
from .evaluate import autocast_for, evaluate_encoded, full_report, metrics_of
from .models import build_model, pick_device, restore_weights, save_model, ENCODER_FILE
from . import events as ev

# --- data ------------------------------------------------------------------------------------------------------


def load_source(cfg: RunConfig, tracker=None, data: TextDataset | None = None) -> TextDataset:
    """The whole dataset a run splits: ``data`` when given, else ``cfg.data.dataset_id`` (stored in
    experiments.db), else ``cfg.data.path``, else the bundled demo dataset; ``cfg.data.max_rows`` samples it."""
    d = cfg.data
    if data is not None:
        return data
    if d.dataset_id is not None:
        if tracker is None:
            raise DactLabError("data.dataset_id needs the experiment database: pass a tracker / --home.")
        source = tracker.load_dataset(int(d.dataset_id))
        if d.max_rows:
            source = read_csv(source.to_csv_bytes(), max_rows=d.max_rows, name=source.name, seed=d.split_seed)
        return source
    if d.path:
        return read_csv(d.path, columns=d.columns, max_rows=d.max_rows, seed=d.split_seed)
    source = load_demo_dataset()
    if d.max_rows:
        source = read_csv(source.to_csv_bytes(), max_rows=d.max_rows, name=source.name, seed=d.split_seed)
    return source


def load_split(cfg: RunConfig, tracker=None,
               data: DatasetSplit | TextDataset | None = None) -> tuple[DatasetSplit, int | None]:
    """The (train, val, test) split a run uses, and the tracker's dataset id of its source (or None).

    The source is :func:`load_source`'s; ``val_path``/``test_path`` replace the split-off parts. A split always
    has validation data (``val_frac`` > 0 or ``val_path``, as ``RunConfig.validate`` requires)."""
    d = cfg.data
    dataset_id = d.dataset_id
    if isinstance(data, DatasetSplit):
        return data, dataset_id
    source = load_source(cfg, tracker, data)
    val_frac = 0.0 if d.val_path else d.val_frac
    test_frac = 0.0 if d.test_path else d.test_frac
    if val_frac or test_frac:
        split = split_dataset(source, val_frac=val_frac or 0.0, test_frac=test_frac or 0.0, seed=d.split_seed)
        if d.val_path:
            split.val = read_csv(d.val_path, columns=d.columns, label_maps=source.label_maps)
    elif d.val_path:
        split = DatasetSplit(train=source, val=read_csv(d.val_path, columns=d.columns, label_maps=source.label_maps),
                             test=None)
    else:
        raise DactLabError("No validation data: set data.val_frac > 0 or give data.val_path.")
    if d.test_path:
        split.test = read_csv(d.test_path, columns=d.columns, label_maps=source.label_maps)
    if tracker is not None and dataset_id is None:
        # stored only once the data has been accepted (split, held-out files read): a refused file adds nothing
        dataset_id = tracker.add_dataset(source, name=source.name)  # dedupes on content: cheap when already stored
    return split, dataset_id


# --- optimisation ------------------------------------------------------------------------------------------


def unfrozen_later(model: EncoderModel, tc: TrainConfig) -> list[nn.Parameter]:
    """With ``gradual_unfreeze``: the parameters of the frozen layers that later epochs release. They are in the
    optimizer from the start (AdamW skips a parameter whose grad is None), so releasing a layer needs no new
    optimizer: the learning-rate schedule and the moments of the parameters already training carry on."""
    if not (tc.gradual_unfreeze and tc.freeze_layers):
        return []
    from .encoders import layer_adapter

    layers = layer_adapter(model.encoder).layers()[:tc.freeze_layers]
    return [p for layer in layers for p in layer.parameters()]


def param_groups(model: EncoderModel, tc: TrainConfig) -> list[dict]:
    """Four AdamW groups: (encoder | heads) × (decay | no decay). Biases and LayerNorm weights (every parameter
    with fewer than 2 dimensions) get no weight decay; the encoder gets ``encoder_lr``, the heads ``head_lr``.
    Frozen parameters are left out, except those that gradual unfreezing releases later (:func:`unfrozen_later`)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(e, d): [] for e in (True, False) for d in (True, False)}
    later = {id(p) for p in unfrozen_later(model, tc)}
    for name, p in model.named_parameters():
        if not p.requires_grad and id(p) not in later:
            continue
        groups[(name.startswith("encoder."), p.ndim >= 2)].append(p)
    out = []
    for (is_enc, decay), params in groups.items():
        if params:
            out.append({"params": params, "lr": tc.encoder_lr if is_enc else tc.head_lr,
                        "weight_decay": tc.weight_decay if decay else 0.0, "group": ("encoder" if is_enc else "head"),
                        "decay": decay})
    return out


def make_optimizer(model: EncoderModel, tc: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, tc)
    for g in groups:
        g["initial_lr"] = g["lr"]
    try:  # fused AdamW runs on CPU and CUDA in torch >= 2.4: one kernel per step instead of a Python loop
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True)


def warmup_linear(total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The logged learning rates: ``lr`` (the encoder's; the first group's when the encoder is fully frozen) and
    ``lr_head`` when the heads train at their own rate."""
    by: dict[str | None, float] = {}
    for g in optimizer.param_groups:
        by.setdefault(g.get("group"), g["lr"])
    out = {"lr": by.get("encoder", optimizer.param_groups[0]["lr"])}
    if "head" in by and "encoder" in by:
        out["lr_head"] = by["head"]
    return out


def train_stats(stats: dict, samples: int, per_task: bool) -> dict[str, float]:
    """Training accuracy (``train_accuracy``; per task ``train_accuracy/<task>`` for several tasks) and, for DACT,
    ``train_avg_exit_layer`` over the ``samples`` seen since the last log, from :func:`train_step`'s stats."""
    if not samples:
        return {}
    out: dict[str, float] = {}
    accs = {k.split("/", 1)[1]: float(v) / samples for k, v in stats.items() if k.startswith("correct/")}
    if per_task:
        out.update({f"train_accuracy/{t}": a for t, a in accs.items()})
    elif accs:
        out["train_accuracy"] = next(iter(accs.values()))
    if "exit_sum" in stats:
        out["train_avg_exit_layer"] = float(stats["exit_sum"]) / samples
    return out


def phase_progress(cbs, state, min_interval_s: float = 1.0):
    """``progress(what, done, total)`` for the phases after the last step: a 'phase' event with the phase's own
    count (rows cached, epochs of the exit refit, epochs of each halting fit), at most one per ``min_interval_s``
    and always the last of each phase — the page shows "refitting … 12/30", not "step 184/184" for 19 minutes."""
    last_t: float = float("-inf")
    last_what: str | None = None

    def report(what: str, done: int, total: int) -> None:
        nonlocal last_t, last_what
        now = time.monotonic()
        if what == last_what and done < total and now - last_t < min_interval_s:
            return
        last_t, last_what = now, what
        cbs.on_event(state, ev.PHASE, {"phase": what, "done": int(done), "total": int(total)})

    return report


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor


def apply_freezing(model: EncoderModel, tc: TrainConfig, epoch: int) -> int:
    """Freeze the embeddings (``freeze_embeddings``) and the lowest ``freeze_layers`` layers; with
    ``gradual_unfreeze`` one more frozen layer (from the top) is released at each epoch. Returns #frozen layers."""
    from .encoders import layer_adapter

    ad = layer_adapter(model.encoder)
    emb = ad.embedding_module()
    for p in emb.parameters():
        p.requires_grad = not tc.freeze_embeddings
    frozen = tc.freeze_layers
    if tc.gradual_unfreeze:
        frozen = max(0, frozen - epoch)
    frozen = min(frozen, ad.num_layers)
    for i, layer in enumerate(ad.layers()):
        for p in layer.parameters():
            p.requires_grad = i >= frozen
    if frozen > 0 and not tc.freeze_embeddings:
        for p in emb.parameters():  # layers above frozen ones can't backprop into the embeddings anyway
            p.requires_grad = False
    return frozen


# --- early stopping ------------------------------------------------------------------------------------------


_LOWER_IS_BETTER = ("loss", "nll", "ponder", "exit_layer", "error")


def lower_is_better(metric: str) -> bool:
    """Direction of a validation metric: losses (``val_loss``, ``val_loss/<task>``, ``val_nll``), the ponder cost,
    the average exit layer and error rates are minimised; accuracy, F1 and the rest maximised."""
    return str(metric).split("/", 1)[0].endswith(_LOWER_IS_BETTER)


class EarlyStopping:
    """Seed 002's rules on one metric (minimised or maximised by :func:`lower_is_better`), after smoothing:
    patience without improvement > ``min_delta``; regression ≥ ``regression`` (relative) worse than the best;
    a negative trend (every one of the last ``trend_window`` values worse than the one before). Never stops
    before ``min_epochs`` evaluations have been made."""

    def __init__(self, cfg: EarlyStoppingConfig, per_epoch: int = 1) -> None:
        """``per_epoch`` validations per epoch: patience, trend window and min_epochs count epochs, so they are
        multiplied by it."""
        if per_epoch > 1:
            cfg = dataclasses.replace(cfg, patience=cfg.patience * per_epoch,
                                      trend_window=cfg.trend_window * per_epoch,
                                      min_epochs=cfg.min_epochs * per_epoch)
        self.cfg = cfg
        self.per_epoch = per_epoch
        self.minimise = lower_is_better(cfg.metric)
        self.raw: list[float] = []
        self.smoothed: list[float] = []
        self.best: float | None = None
        self.best_index: int | None = None
        self.bad = 0

    def _better(self, a: float, b: float, delta: float = 0.0) -> bool:
        return a < b - delta if self.minimise else a > b + delta

    def update(self, value: float) -> tuple[bool, str | None]:
        """Record one evaluation; returns (is the raw value the best so far, reason to stop or None)."""
        c = self.cfg
        self.raw.append(value)
        window = self.raw[-c.smoothing:]
        s = float(np.mean(window))
        self.smoothed.append(s)
        improved_raw = self.best_index is None or self._better(value, self.raw[self.best_index])
        if improved_raw:
            self.best_index = len(self.raw) - 1
        if self.best is None or self._better(s, self.best, c.min_delta):
            self.best, self.bad = s, 0
        else:
            self.bad += 1
        if not c.enabled or len(self.raw) < max(1, c.min_epochs):
            return improved_raw, None
        if self.bad >= c.patience:
            return improved_raw, f"no improvement of {c.metric} for {self.bad} evaluations (patience {c.patience})"
        scale = abs(self.best) if self.best else 1.0
        worse_by = (s - self.best) if self.minimise else (self.best - s)
        if worse_by >= c.regression * scale:
            return improved_raw, f"{c.metric} regressed {worse_by / scale:.0%} from the best ({self.best:.4g})"
        tail = self.smoothed[-(c.trend_window + 1):]
        if len(tail) == c.trend_window + 1 and all(self._better(tail[i], tail[i + 1]) for i in range(len(tail) - 1)):
            return improved_raw, f"{c.metric} got worse {c.trend_window} evaluations in a row"
        return improved_raw, None


# --- out-of-memory handling ------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class BatchSizeManager:
    """Seed 002's MemoryManager: on out-of-memory the micro-batch is halved (not below ``min_size``) and the step
    retried as gradient accumulation over micro-batches, so the optimisation batch stays the same.
    ``grad_accum_steps`` (``train.grad_accum_steps``) starts with every batch split in that many micro-batches:
    the micro-batch is ``ceil(batch_size / grad_accum_steps)`` rows (and at most ``max_size``)."""

    def __init__(self, batch_size: int, min_size: int = 8, max_size: int = 64, grad_accum_steps: int = 1) -> None:
        self.min_size, self.max_size = min_size, max_size
        self.micro = min(-(-batch_size // max(1, grad_accum_steps)), max_size)

    def shrink(self) -> int:
        if self.micro <= self.min_size:
            raise DactLabError(f"Out of memory even at a micro-batch of {self.micro}: lower data.max_seq_len, use "
                               "a smaller encoder, or free memory.")
        self.micro = max(self.min_size, self.micro // 2)
        return self.micro


# --- the loop ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_id: Any
    status: str
    history: list[dict]
    best_metrics: dict[str, float]
    test_metrics: dict[str, float]
    model: EncoderModel
    tokenizer: Any
    label_maps: dict[str, list[str]]
    run_dir: Path | None
    best_epoch: int | None
    report: dict = field(default_factory=dict)
    stop_reason: str | None = None


RESUME_FILE = "resume.safetensors"
#: the resume checkpoint of DACT Lab before the safetensors format (a torch pickle): read with the restricted
#: unpickler only (:func:`load_legacy_resume`), never written
LEGACY_RESUME_FILE = "resume.pt"
RESUMABLE = ("interrupted", "cancelled", "failed")
#: ``format`` in the header of a state file (:func:`save_state_file`)
STATE_FORMAT = "dact-lab-state/1"


def rng_state() -> dict:
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --- state files: checkpoints without pickle ----------------------------------------------------------------------
# A resume checkpoint (and a Ray PBT member checkpoint) is ONE safetensors file: every tensor of the state (weights,
# optimizer moments, RNG states) is a tensor of the file, named t0, t1, …; everything else (step, epoch, schedule,
# early stopping, history, best metrics, Python / numpy RNG states, hyperparameters) is JSON in the file's header
# metadata ("state"), with each tensor replaced by {"$tensor": name}. JSON cannot say tuple, non-string dict keys
# or numpy arrays, so those are {"$tuple": [...]}, {"$items": [[k, v], ...]} and {"$ndarray": {dtype, shape, data}}
# (numeric dtypes only). Reading it runs no code: safetensors parses a length-prefixed JSON header and raw bytes.

_NUMERIC_KINDS = "biuf"  # numpy dtype kinds a state may hold: bool, int, uint, float


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], seen: dict, storages: set, where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel():
            sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if sig in seen:  # the same tensor twice (tied weights): stored once, both places point to it
                return {"$tensor": seen[sig]}
            ptr = sig[0]
            if ptr in storages:  # a view of a stored tensor's memory: safetensors wants it on its own
                t = t.clone()
                sig = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            storages.add(sig[0])
        else:
            sig = None
        name = f"t{len(tensors)}"
        tensors[name] = t
        if sig is not None:
            seen[sig] = name
        return {"$tensor": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{where}: a numpy array of dtype {obj.dtype} cannot be stored in a state file")
        return {"$ndarray": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, np.generic):
        return _encode_state(obj.item(), tensors, seen, storages, where)
    if isinstance(obj, tuple):
        return {"$tuple": [_encode_state(v, tensors, seen, storages, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode_state(v, tensors, seen, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode_state(v, tensors, seen, storages, f"{where}.{k}") for k, v in obj.items()}
        return {"$items": [[_encode_state(k, tensors, seen, storages, f"{where} key"),
                            _encode_state(v, tensors, seen, storages, f"{where}[{k!r}]")] for k, v in obj.items()]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a state file (tensors, numbers, text, "
                    "lists, tuples, dicts and numeric numpy arrays only)")


def _decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "$tensor":
            if value not in tensors:
                raise ValueError(f"the header names a tensor {str(value)[:40]!r} the file does not hold")
            return tensors[value]
        if key == "$tuple":
            return tuple(_decode_state(v, tensors) for v in value)
        if key == "$items":
            return {_decode_state(k, tensors): _decode_state(v, tensors) for k, v in value}
        if key == "$ndarray":
            dtype = np.dtype(str(value["dtype"]))
            if dtype.kind not in _NUMERIC_KINDS:
                raise ValueError(f"an array of dtype {dtype} is not allowed in a state file")
            return np.asarray(value["data"], dtype=dtype).reshape([int(n) for n in value["shape"]])
    if any(k.startswith("$") for k in obj):
        raise ValueError(f"unknown markers {sorted(k for k in obj if k.startswith('$'))[:3]} in the header")
    return {k: _decode_state(v, tensors) for k, v in obj.items()}


def save_state_file(path: str | Path, state: dict, kind: str = "resume") -> Path:
    """Write ``state`` (a dict of tensors, numbers, text, lists, tuples, dicts, numeric numpy arrays) as one
    safetensors file — tensors as tensors, the rest as JSON in its header — atomically (a kill while it is written
    leaves the previous file). ``kind`` is recorded in the header and checked by :func:`load_state_file`."""
    import json

    from safetensors.torch import save_file

    from .files import atomic_write

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode_state(state, tensors, {}, set(), "state")
    meta = {"format": STATE_FORMAT, "kind": str(kind), "state": json.dumps(skeleton)}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_state_file(path: str | Path, kind: str = "resume", fix: str = "") -> dict:
    """The state :func:`save_state_file` wrote to ``path`` (tensors on the CPU). Nothing in the file is executed:
    it is parsed as safetensors + JSON. A file that is not one (damaged, foreign, another ``kind``, a pickle) raises
    :class:`DactLabError` naming it, followed by ``fix`` (what the user should do)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != STATE_FORMAT or meta.get("kind") != kind or "state" not in meta:
                raise ValueError(f"its header says format {str(meta.get('format'))[:40]!r}, kind "
                                 f"{str(meta.get('kind'))[:40]!r}; expected {STATE_FORMAT!r}, {kind!r}")
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        state = _decode_state(json.loads(meta["state"]), tensors)
        if not isinstance(state, dict):
            raise ValueError("its state is not a mapping")
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, one clear refusal
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DactLabError(f"{path} is not a readable DACT Lab {kind} checkpoint ({reason}); nothing in it was run."
                           + (f" {fix}" if fix else "")) from None
    return state


def _numpy_pickle_globals() -> list:
    """What a numpy RNG state (a uint32 array) and numpy scalars in an old ``resume.pt`` pickle refer to: array
    reconstruction and the numeric dtypes — nothing that calls code of the file's choosing."""
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    reconstruct, scalar = getattr(multiarray, "_reconstruct"), getattr(multiarray, "scalar")
    out: list = [np.ndarray, np.dtype]
    for name in ("multiarray", "_multiarray_umath"):  # pickles name the module of the numpy that wrote them
        for pkg in ("numpy.core", "numpy._core"):
            out += [(reconstruct, f"{pkg}.{name}._reconstruct"), (scalar, f"{pkg}.{name}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles a dtype with its class
        out += [type(np.dtype(t)) for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                             "uint32", "uint64", "float16", "float32", "float64")]
    return out


def load_legacy_resume(path: Path) -> dict:
    """An old ``resume.pt`` (a torch pickle) read with torch's restricted unpickler (``weights_only=True``) and an
    explicit allowlist of numpy's array and dtype reconstruction (its numpy RNG state): tensors, numbers, text and
    containers load, anything else is refused before it is built — nothing of the file's choosing runs."""
    try:
        with torch.serialization.safe_globals(_numpy_pickle_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("it does not hold a mapping")
    except Exception as exc:  # noqa: BLE001 - refused (a foreign object) or damaged: one clear refusal
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DactLabError(
            f"{path} is a resume checkpoint in the pickle format of an older DACT Lab, and it holds more than "
            f"weights, numbers and text, or is damaged ({reason}): resume is refused and nothing in it was run. "
            f"Delete {path} and train the run again.") from None
    return state


def write_resume_state(run_dir: Path, state: dict) -> None:
    """``<run>/resume.safetensors`` (:func:`save_state_file`), atomically (a kill while it is written leaves the
    previous one)."""
    save_state_file(Path(run_dir) / RESUME_FILE, state, "resume")
    (Path(run_dir) / LEGACY_RESUME_FILE).unlink(missing_ok=True)  # an older DACT Lab's, superseded


def resume_path(run_dir: str | Path) -> Path | None:
    """The resume checkpoint of a run folder: ``resume.safetensors``, else an older DACT Lab's ``resume.pt``."""
    for name in (RESUME_FILE, LEGACY_RESUME_FILE):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def resume_info(tracker, run_id, check_status: bool = True) -> dict:
    """Whether run ``run_id`` can be resumed: ``{"ok": bool, "why": str}`` (``check_status``: it must be
    interrupted, cancelled or failed — the job manager has already queued it when train() checks)."""
    run = tracker.get_run(int(run_id))
    run_dir = Path(run.get("run_dir") or tracker.run_dir(run_id))
    if check_status and run["kind"] not in ("backbone", "dact", "multitask"):
        return {"ok": False, "why": f"a {run['kind']} run is resumed by running its engine again"}
    if check_status and run["status"] not in RESUMABLE:
        return {"ok": False, "why": f"run {run_id} is {run['status']}: only an interrupted, cancelled or failed run "
                                    "can be resumed"}
    if resume_path(run_dir) is None:
        return {"ok": False, "why": f"run {run_id} has no resume checkpoint ({run_dir / RESUME_FILE}): it stopped "
                                    "before its first evaluation, or was trained with train.resume_checkpoints = "
                                    "false; train it again"}
    return {"ok": True, "why": ""}


#: what a resume checkpoint must hold (the loop reads each of these)
RESUME_KEYS = ("step", "epoch", "batch", "stop", "stop_reason", "samples_seen", "best_metric", "best_epoch",
               "best_step", "best_metrics", "history", "stopper", "micro_batch", "model", "optimizer", "rng")


def load_resume_state(tracker, run_id) -> dict:
    if tracker is None or run_id is None:
        raise DactLabError("resume=True needs the run id and the tracker of the run to resume.")
    info = resume_info(tracker, run_id, check_status=False)
    if not info["ok"]:
        raise DactLabError(f"Cannot resume: {info['why']}.")
    run = tracker.get_run(int(run_id))
    path = resume_path(run.get("run_dir") or tracker.run_dir(run_id))
    assert path is not None  # resume_info said ok: there is a checkpoint
    fix = f"The run cannot be resumed: delete {path} and train the run again."
    if path.name == LEGACY_RESUME_FILE:
        state = load_legacy_resume(path)
    else:
        state = load_state_file(path, "resume", fix)
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise DactLabError(f"{path} is not a complete resume checkpoint (no {', '.join(missing[:5])}). {fix}")
    return state


def resume_config(tracker, run_id) -> RunConfig:
    """The config a run was trained with (its run folder's config.json, else the tracker's copy)."""
    from .files import read_json

    run = tracker.get_run(int(run_id))
    path = Path(run.get("run_dir") or tracker.run_dir(run_id)) / "config.json"
    raw = read_json(path, "config") if path.is_file() else run.get("config")
    if not raw or "kind" not in raw:
        raise DactLabError(f"run {run_id} has no training config to resume from.")
    return RunConfig.from_dict(raw)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_run(cfg: RunConfig, cbs: CallbackList, *, tracker, home, run_id, parent_id, dataset_id, save: bool,
             resumed: dict | None) -> tuple[Any, Path | None]:
    """The run this training records into: created (or adopted, given ``run_id``) in the tracker, marked live, its
    folder cleaned of a killed writer's temp files, the metrics logged after a resume checkpoint dropped; the
    tracker's callback (and the ``train.report_to`` reporters) first in ``cbs``. Without a tracker, a local folder
    under ``home`` when saving. Returns ``(run_id, run_dir)``."""
    run_dir = None
    if tracker is not None:
        from .tracker import TrackerCallback, liveness

        if run_id is None:
            run_id = tracker.create_run(cfg.kind, cfg.to_dict(), name=cfg.name, tag=cfg.tag, parent_id=parent_id,
                                        dataset_id=dataset_id, status="running")
        else:
            fields = {"config": cfg.to_dict()}
            if dataset_id is not None:
                fields["dataset_id"] = dataset_id
            tracker.update_run(run_id, **fields)
            tracker.set_status(run_id, "running")
        liveness.mark_live(run_id)  # this process runs it: the dashboard must not mark it 'interrupted'
        if save:
            run_dir = tracker.run_dir(run_id)
            tracker.update_run(run_id, run_dir=str(run_dir))
            from .files import clean_stale_temp

            clean_stale_temp(run_dir)  # temp files a killed writer left behind
        if resumed is not None:
            dropped = tracker.delete_metrics_after(run_id, resumed["step"])
            tracker.update_run(run_id, error=None, ended=None)
            tracker.log_event(run_id, ev.RESUMED, {"step": resumed["step"], "epoch": resumed["epoch"] + 1,
                                                  "batch": resumed["batch"], "metrics_dropped": dropped})
        cbs.callbacks.insert(0, TrackerCallback(tracker, run_id))
        from .reporting import build_reporters  # train.report_to: MLflow, W&B, TensorBoard too
        cbs.callbacks[1:1] = build_reporters(cfg, run_id, run_dir, tracker)
    elif save and home is not None:
        from .home import run_dir as make_run_dir

        run_dir = make_run_dir(run_id or f"local-{int(time.time())}", home)

    return run_id, run_dir


def write_run_files(run_dir: Path, model, cfg: RunConfig, tracker, run_id, report: dict) -> None:
    """A finished run's files: the backbone's encoder alone (what a DACT run starts from), ``report.json``, and
    each file registered as an artefact of the run."""
    from .files import atomic_write_json

    if cfg.kind == "backbone":
        model.export_encoder(run_dir / ENCODER_FILE)
    atomic_write_json(run_dir / "report.json", report)
    if tracker is not None:
        for name, kind in (("model.safetensors", "model"), ("config.json", "config"), ("label_maps.json", "label_map"),
                           ("report.json", "report"), (ENCODER_FILE, "encoder")):
            if (run_dir / name).exists():
                tracker.add_artifact(run_id, str(run_dir / name), kind)


class TrainingWindow:
    """The training metrics since the last log: loss (and per-task losses), rows, and the right answers / exit
    layers of :func:`train_step` — summed on the device, so a step costs no host sync; read when logged."""

    def __init__(self, device, running: dict | None = None) -> None:
        self.loss = torch.zeros((), device=device)
        self.task: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.n, self.rows, self.since = 0, 0, time.perf_counter()
        if running:  # the sums an interrupted run had gathered since its last log
            self.loss += running["loss"]
            self.n, self.rows = int(running["n"]), int(running["samples"])
            self.task = {t: torch.tensor(v, device=device) for t, v in running["task"].items()}
            self.stats = {k: torch.tensor(v, device=device) for k, v in running["stats"].items()}

    def add(self, loss: torch.Tensor, task_losses: dict[str, torch.Tensor], rows: int) -> None:
        self.loss += loss
        if len(task_losses) > 1:
            for t, v in task_losses.items():
                self.task[t] = self.task.get(t, 0) + v
        self.n += 1
        self.rows += rows

    def logs(self, optimizer, epoch: int, multi_task: bool) -> dict[str, float]:
        """The step log (train_loss, learning rates, samples/s, epoch, training accuracy …); starts a new window."""
        now = time.perf_counter()
        logs = {"train_loss": float(self.loss) / self.n, **group_lrs(optimizer),
                "samples_per_s": self.rows / max(now - self.since, 1e-9), "epoch": epoch + 1}
        for t, v in self.task.items():
            logs[f"train_loss/{t}"] = float(v) / self.n
        logs.update(train_stats(self.stats, self.rows, multi_task))
        self.task.clear()
        self.stats.clear()
        self.loss.zero_()
        self.n, self.rows, self.since = 0, 0, now
        return logs

    def to_dict(self) -> dict:
        return {"loss": float(self.loss), "n": self.n, "samples": self.rows,
                "task": {t: float(v) for t, v in self.task.items()},
                "stats": {k: float(v) for k, v in self.stats.items()}}


@dataclass
class Loop:
    """The steps of one training run: its epochs of batches, the validations, the checkpoints. Built by
    :func:`train` once the model, optimizer and data are ready; :meth:`run` trains until the last epoch, an early
    stop, ``max_steps`` or the time limit."""

    cfg: RunConfig
    state: LoopState
    cbs: CallbackList
    cancel: CancelToken
    device: torch.device
    tokenizer: Any
    run_dir: Path | None
    enc_train: Any
    enc_val: Any
    memory: BatchSizeManager
    mid_evals: set[int]
    deadline: float | None
    window: TrainingWindow
    last_resume: float = field(default_factory=time.monotonic)
    scaler: Any = None  # torch.amp.GradScaler of an fp16 training on CUDA (evaluate.grad_scaler_for), else None

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    def evaluate(self) -> bool:
        """Validation, callbacks, early stopping, best checkpoint. Returns True when training should stop."""
        s, tc = self.state, self.tc
        res = evaluate_encoded(s.model, self.enc_val, max(tc.batch_size, 64), self.device, tc.precision)
        logs = metrics_of(res, "val_")
        logs["epoch"] = s.epoch + 1
        s.history.append({"step": s.step, **logs})
        metric = tc.early_stopping.metric
        if metric not in logs:
            raise DactLabError(f"train.early_stopping.metric = {metric!r} is not measured: choose one of "
                               f"{sorted(k for k in logs if k.startswith('val_'))}.")
        improved, reason = s.stopper.update(logs[metric])
        if improved:
            s.best_metrics = dict(logs)
            s.best_metric, s.best_epoch, s.best_step = logs[metric], s.epoch + 1, s.step
            if self.run_dir is not None:
                save_model(self.run_dir, s.model, self.tokenizer, self.cfg, s.label_maps)
            else:
                s.best_state = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
            self.cbs.on_event(s, ev.CHECKPOINT, {"epoch": s.epoch + 1, "step": s.step, metric: logs[metric]})
        self.cbs.on_eval(s, logs)
        if reason:
            s.stop_reason = reason
            self.cbs.on_event(s, ev.EARLY_STOP, {"reason": reason, "epoch": s.epoch + 1, "step": s.step})
            return True
        return False

    def save_resume(self, epoch: int, batch: int, stopping: bool) -> None:
        """The resume checkpoint: what the loop needs to go on with batch ``batch`` of epoch ``epoch``."""
        if self.run_dir is None or not self.tc.resume_checkpoints:
            return
        self.last_resume = time.monotonic()
        s = self.state
        write_resume_state(self.run_dir, {
            **s.resume_dict(epoch=epoch, batch=batch, stop=stopping),
            "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "callbacks": copy.deepcopy(s.callback_state),  # PBT: the member's hyperparameters and schedule
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),  # fp16: the loss scale
            # the training metrics' running sums since the last log: the resumed run logs the same train_loss
            "running": self.window.to_dict()})

    def step(self, batch: dict, epoch: int) -> None:
        """One optimisation step and its log (every ``log_every_steps``, the last step and step 1)."""
        s, tc = self.state, self.tc
        loss, task_losses = train_step(s.model, s.optimizer, batch, self.device, tc, self.memory, self.cbs, s,
                                       self.window.stats, scaler=self.scaler)
        rows = batch["input_ids"].shape[0]
        self.window.add(loss, task_losses, rows)
        s.step += 1
        s.samples_seen += rows
        s.micro_batch = self.memory.micro
        set_lr_factor(s.optimizer, s.lr_schedule(s.step))
        if s.step % tc.log_every_steps == 0 or s.step == s.total_steps or s.step == 1:  # 1: feedback at once
            self.cbs.on_step(s, self.window.logs(s.optimizer, epoch, len(task_losses) > 1))
        else:
            self.cbs.on_step(s, {})

    def run(self, start_epoch: int, skip_batches: int) -> bool:
        """Train from batch ``skip_batches`` of epoch ``start_epoch``; returns whether the time limit ended it."""
        s, tc, cbs = self.state, self.tc, self.cbs
        out_of_time = False
        s.model.train()
        for epoch in range(start_epoch, tc.epochs if not s.stop else start_epoch):
            s.epoch = epoch
            if epoch > start_epoch and tc.gradual_unfreeze and tc.freeze_layers:
                frozen = apply_freezing(s.model, tc, epoch)  # the released layers are already in the optimizer
                cbs.on_event(s, ev.UNFREEZE, {"epoch": epoch + 1, "frozen_layers": frozen})
            skip = skip_batches if epoch == start_epoch else 0
            done_in_epoch = 0
            for batch in iter_batches(self.enc_train, tc.batch_size, shuffle=True, seed=tc.seed, epoch=epoch,
                                      group_by_length=tc.group_by_length, pad_to=tc.pad_to):
                done_in_epoch += 1
                if done_in_epoch <= skip:  # resumed: these batches were trained before the interruption
                    continue
                self.cancel.check()
                self.step(batch, epoch)
                evaluated = bool(tc.eval_every_steps and s.step % tc.eval_every_steps == 0) or \
                    done_in_epoch in self.mid_evals
                if evaluated:
                    s.stop = self.evaluate()
                    self.save_resume(epoch, done_in_epoch, s.stop)
                elif tc.resume_every_min and time.monotonic() - self.last_resume >= 60.0 * tc.resume_every_min:
                    self.save_resume(epoch, done_in_epoch, False)  # between evaluations: lose at most that much
                if self.deadline is not None and not s.stop and time.monotonic() >= self.deadline:
                    out_of_time = True
                    if not evaluated:
                        s.stop = self.evaluate()
                    s.stop_reason = s.stop_reason or f"time limit of {tc.time_limit_min:g} min reached"
                    cbs.on_event(s, ev.TIME_LIMIT, {"step": s.step, "minutes": tc.time_limit_min})
                    break
                if s.stop or (tc.max_steps and s.step >= tc.max_steps):
                    break
            if not s.stop and not out_of_time and not tc.eval_every_steps:
                s.stop = self.evaluate()
            cbs.on_epoch_end(s, s.history[-1] if s.history else {})
            last = s.stop or out_of_time or bool(tc.max_steps and s.step >= tc.max_steps) or epoch + 1 == tc.epochs
            if not tc.eval_every_steps or last:
                self.save_resume(epoch + 1, 0, last)
            if s.stop or out_of_time or (tc.max_steps and s.step >= tc.max_steps):
                break
        return out_of_time


    def finish(self, enc_test) -> tuple[dict, dict, dict | None, dict | None]:
        """After the last step: the best weights back, the kind's own after-training steps (:data:`AFTER_TRAINING`)
        with the validation metrics of the model as then saved, and the test split (``enc_test``; None: not
        evaluated). Returns ``(test metrics, test report, exit_refit report, halting report)``."""
        s, tc, cbs, model = self.state, self.tc, self.cbs, self.state.model
        if self.run_dir is not None and (self.run_dir / "model.safetensors").exists():
            restore_weights(model, self.run_dir)
        elif s.best_state is not None:
            model.load_state_dict(s.best_state)
        cbs.on_event(s, ev.RESTORED_BEST, {"epoch": s.best_epoch, "step": s.best_step})
        hook = AFTER_TRAINING.get(self.cfg.kind)
        exit_report, halting_report = hook(model, self.cfg, self.enc_train, self.enc_val, cancel=self.cancel,
                                           deadline=self.deadline, cbs=cbs, state=s, run_dir=self.run_dir) \
            if hook is not None else (None, None)
        if exit_report is not None or halting_report is not None:
            # the validation metrics of the model as it is now saved (the DACT answer a_N and the exits depend on
            # the classifiers and the halting units): recorded at the last step and kept as the run's best metrics
            res = evaluate_encoded(model, self.enc_val, max(tc.batch_size, 64), self.device, tc.precision)
            refit = metrics_of(res, "val_")
            s.best_metrics = {**s.best_metrics, **refit}
            cbs.on_eval(s, refit)
            if self.run_dir is not None:
                save_model(self.run_dir, model, self.tokenizer, self.cfg, s.label_maps)
        test_metrics: dict = {}
        report: dict = {}
        if enc_test is not None:
            cbs.on_event(s, ev.PHASE, {"phase": f"evaluating the test split ({len(enc_test):,} rows)"})
            res = evaluate_encoded(model, enc_test, max(tc.batch_size, 64), self.device, tc.precision)
            test_metrics = metrics_of(res, "test_")
            report = full_report(res, s.label_maps)
            cbs.on_eval(s, test_metrics)
        return test_metrics, report, exit_report, halting_report


def prepare_model(cfg: RunConfig, split: DatasetSplit, state: LoopState, cbs: CallbackList, device, home,
                  model, tokenizer):
    """Before the first step, each part a named phase: the model built (unless given), class counts for a
    balanced loss (``model.class_weighting``), the splits tokenised. Returns ``(model, tokenizer, enc_train, enc_val, enc_test)``."""
    label_maps = split.train.label_maps
    n_rows = len(split.train) + len(split.val) + (len(split.test) if split.test is not None else 0)
    if model is None:
        cbs.on_event(state, ev.PHASE, {"phase": "loading the encoder", "encoder": cfg.encoder})
        model, tokenizer = build_model(cfg, label_maps, home)
    if getattr(cfg.model, "class_weighting", "none") == "balanced":  # every kind: model.set_class_counts
        model.set_class_counts({t: np.bincount(y, minlength=len(label_maps[t]))
                                for t, y in split.train.targets.items() if t in label_maps})
    model.to(device)
    cbs.on_event(state, ev.PHASE, {"phase": f"tokenising {n_rows:,} rows", "rows": n_rows,
                                  "train_rows": len(split.train)})
    enc_train = encode(split.train, tokenizer, cfg.data.max_seq_len)
    enc_val = encode(split.val, tokenizer, cfg.data.max_seq_len)
    enc_test = encode(split.test, tokenizer, cfg.data.max_seq_len) if split.test is not None else None
    cbs.on_event(state, ev.PHASE, {"phase": "training"})
    return model, tokenizer, enc_train, enc_val, enc_test


def train(cfg: RunConfig, *, data: DatasetSplit | TextDataset | None = None, home=None, tracker=None,
          callbacks: Sequence[Callback] | None = None, cancel: CancelToken | None = None, run_id: Any = None,
          parent_id: Any = None, save: bool = True, evaluate_test: bool = True, model: EncoderModel | None = None,
          tokenizer=None, resume: bool = False, resume_state: dict | None = None) -> TrainResult:
    """Train one model described by ``cfg``; see the module docstring. With a ``tracker`` the run, its metrics,
    events and artefacts are recorded (a run row is created unless ``run_id`` is given). Raises
    :class:`Cancelled` when ``cancel`` is set (after recording status 'cancelled').

    ``resume=True`` (with the ``run_id`` of an interrupted, cancelled or failed run and its tracker) continues
    that run from its last resume checkpoint (:data:`RESUME_FILE`, written at every evaluation): weights, optimizer,
    step, epoch, early-stopping state, best metrics and RNG state are restored, the metrics it logged after that
    checkpoint are dropped, and training carries on as if it had not stopped (same batches, same dropout masks).

    ``resume_state`` (a dict in the :data:`RESUME_FILE` format, held in memory) continues from that state instead
    of a run's resume checkpoint, with or without a tracker: PBT on Ray (``tuning/pbt_ray.py``) restores a member
    from a Ray checkpoint this way — its own, or a donor's weights and optimizer at the member's own step."""
    # --- setup: config, data, the run record
    cfg.validate()
    tc = cfg.train
    cancel = cancel or CancelToken()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    from .evaluate import check_precision, grad_scaler_for, resolve_precision

    check_precision(tc.precision, device)  # fp16 off CUDA: refused before anything is recorded
    split, dataset_id = load_split(cfg, tracker, data)
    if split.val is None:
        raise DactLabError("No validation data: set data.val_frac > 0 or give data.val_path.")
    cbs = CallbackList(list(callbacks or []))
    resumed = resume_state if resume_state is not None else load_resume_state(tracker, run_id) if resume else None
    run_id, run_dir = open_run(cfg, cbs, tracker=tracker, home=home, run_id=run_id, parent_id=parent_id,
                               dataset_id=dataset_id, save=save, resumed=resumed)
    state = LoopState(run_id=run_id, epochs=tc.epochs, batch_size=tc.batch_size, config=cfg,
                      label_maps=split.train.label_maps)
    status = "failed"
    test_metrics: dict[str, Any] = {}
    report: dict[str, Any] = {}
    try:
        # --- the model, the optimizer and the schedule
        model, tokenizer, enc_train, enc_val, enc_test = prepare_model(cfg, split, state, cbs, device, home, model,
                                                                       tokenizer)
        if run_dir is not None:
            cfg.save(run_dir / "config.json")
        apply_freezing(model, tc, epoch=0)
        optimizer = make_optimizer(model, tc)
        steps_per_epoch = num_batches(enc_train, tc.batch_size)
        total = min(steps_per_epoch * tc.epochs, tc.max_steps or steps_per_epoch * tc.epochs)
        set_lr_factor(optimizer, warmup_linear(total, tc.warmup_ratio)(0))
        state.total_steps, state.train_size = total, len(enc_train)
        state.model, state.optimizer = model, optimizer
        state.set_lr_schedule(warmup_linear(total, tc.warmup_ratio))
        per_epoch = evals_per_epoch(tc, steps_per_epoch)
        state.stopper = EarlyStopping(tc.early_stopping, per_epoch)
        memory = BatchSizeManager(tc.batch_size, tc.min_batch_size, tc.max_batch_size, tc.grad_accum_steps)
        state.micro_batch = memory.micro
        scaler = grad_scaler_for(device, tc.precision)  # fp16 on CUDA only
        start_epoch, skip_batches = 0, 0
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            if scaler is not None and resumed.get("scaler"):
                scaler.load_state_dict(resumed["scaler"])
            start_epoch, skip_batches = state.restore(resumed)
            memory.micro = state.micro_batch
            apply_freezing(model, tc, epoch=start_epoch)
        cbs.on_start(state)
        cbs.on_event(state, ev.START, {"train": len(enc_train), "val": len(enc_val),
                                      "test": len(enc_test) if enc_test is not None else 0, "device": str(device),
                                      "precision": resolve_precision(tc.precision, device),
                                      "steps": total, "steps_per_epoch": steps_per_epoch,
                                      "labels": state.label_maps, "evals_per_epoch": per_epoch})
        # mid-epoch validations (evals_per_epoch > 1): after these batches of every epoch; the last is its end
        mid_evals = {round(j * steps_per_epoch / per_epoch) for j in range(1, per_epoch)}
        deadline = time.monotonic() + 60.0 * tc.time_limit_min if tc.time_limit_min else None
        loop = Loop(cfg, state, cbs, cancel, device, tokenizer, run_dir, enc_train, enc_val, memory, mid_evals,
                    deadline, TrainingWindow(device, (resumed or {}).get("running")), scaler=scaler)
        if resumed is not None:
            set_rng_state(resumed["rng"])  # last: building the model above drew from the RNG

        # --- the steps
        loop.run(start_epoch, skip_batches)

        # --- the end: the best weights back, the kind's own after-training steps, the test split, the files
        test_metrics, report, exit_report, halting_report = loop.finish(enc_test if evaluate_test else None)
        if run_dir is not None:
            write_run_files(run_dir, model, cfg, tracker, run_id, {
                "best": state.best_metrics, "test": test_metrics, "report": report, "history": state.history,
                "stop_reason": state.stop_reason, "halting": halting_report, "exit_refit": exit_report})
            for name in (RESUME_FILE, LEGACY_RESUME_FILE):  # a finished run needs no resume checkpoint
                (run_dir / name).unlink(missing_ok=True)
        status = "finished"
        state.summary = {"best": state.best_metrics, "test": test_metrics, "best_epoch": state.best_epoch,
                         "precision": resolve_precision(tc.precision, device), "stop_reason": state.stop_reason,
                         "halting": halting_report, "exit_refit": exit_report}
        report = {**report, "halting": halting_report} if halting_report else report
        report = {**report, "exit_refit": exit_report} if exit_report else report
    except Cancelled as exc:
        status, state.error = "cancelled", str(exc)
        raise
    except BaseException as exc:  # noqa: BLE001 - recorded then re-raised
        status = "pruned" if type(exc).__name__ == "TrialPruned" else "failed"
        state.error = f"{type(exc).__name__}: {exc}"
        state.traceback = traceback.format_exc()
        raise
    finally:
        cbs.on_end(state, status)
        state.best_state = None
        if tracker is not None:
            from .tracker import liveness

            liveness.mark_done(run_id)
    return TrainResult(run_id=run_id, status=status, history=state.history, best_metrics=state.best_metrics,
                       test_metrics=test_metrics, model=model, tokenizer=tokenizer, label_maps=state.label_maps,
                       run_dir=run_dir, best_epoch=state.best_epoch, report=report, stop_reason=state.stop_reason)


def train_step(model, optimizer, batch, device, tc: TrainConfig, memory: BatchSizeManager, cbs, state,
               stats: dict | None = None, scaler=None):
    """One optimisation step on ``batch``, in micro-batches of ``memory.micro`` rows (``train.grad_accum_steps``,
    halved again after an out-of-memory): each micro-batch's loss, weighted by its share of the rows, is
    backpropagated, then one optimizer step — the gradient of the whole batch. Returns the loss and the per-task
    losses as 0-dim tensors on the device (no host sync). With ``stats`` (a dict), adds to it, as device tensors:
    ``correct/<task>`` (right answers in the batch) and, for DACT, ``exit_sum`` (sum of the exit layers the DACT
    rule would take) — the training accuracy and average exit layer, synced only when logged. ``scaler`` (a
    ``torch.amp.GradScaler``, fp16 on CUDA): the loss is scaled before backward, the gradients unscaled before
    clipping, and a step with inf / NaN gradients skipped (the scale then lowered)."""
    ids, am = batch["input_ids"].to(device, non_blocking=True), batch["attention_mask"].to(device, non_blocking=True)
    targets = {t: v.to(device, non_blocking=True) for t, v in batch["targets"].items()}
    n = ids.shape[0]
    while True:
        try:
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            per_task: dict[str, torch.Tensor] = {}
            step_stats: dict[str, torch.Tensor] = {}
            for start in range(0, n, memory.micro):
                sl = slice(start, start + memory.micro)
                with autocast_for(device, tc.precision):
                    out = model(ids[sl], am[sl], {t: v[sl] for t, v in targets.items()})
                if stats is not None:
                    with torch.no_grad():
                        for t, probs in out.probs.items():
                            if t in targets:
                                hit = (probs.argmax(-1) == targets[t][sl]).sum()
                                step_stats[f"correct/{t}"] = step_stats.get(f"correct/{t}", 0) + hit
                        if "exit_layer" in out.extras:
                            step_stats["exit_sum"] = step_stats.get("exit_sum", 0) + out.extras["exit_layer"].sum()
                share = ids[sl].shape[0] / n
                part = out.loss * share
                (scaler.scale(part) if scaler is not None else part).backward()
                total += part.detach()
                for t, v in out.task_losses.items():
                    per_task[t] = per_task.get(t, 0) + v.detach() * share
            break
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            old = memory.micro
            new = memory.shrink()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cbs.on_event(state, ev.OOM_RETRY, {"step": state.step, "micro_batch": new, "was": old})
    if stats is not None:
        for k, v in step_stats.items():
            stats[k] = stats.get(k, 0) + v
    optimizer_step(optimizer, tc, scaler)
    return total, per_task


def optimizer_step(optimizer, tc: TrainConfig, scaler=None) -> None:
    """The step after the gradients of a batch: clipped to ``train.max_grad_norm``, then the optimizer's step. With
    an fp16 ``scaler`` the gradients are unscaled before clipping, and ``scaler.step`` skips a step whose gradients
    hold inf / NaN (the scale is lowered by ``update``)."""
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping sees the true gradients
    if tc.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], tc.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def dact_after_training(model, cfg: RunConfig, enc_train, enc_val, *, cancel, deadline, cbs, state, run_dir
                        ) -> tuple[dict | None, dict | None]:
    """Kind 'dact' after its last step, on the restored best weights: the exit classifiers refitted on cached
    layer summaries, the optional temperatures, then the halting units fitted on the validation split (every front
    point's weights kept in the run folder). Each phase is named with its own progress. Returns
    ``(exit_refit report, halting report)`` (None for a phase that did not run)."""
    halting_report = exit_report = val_cache = None
    if cfg.model.exit_refit_epochs > 0 and not cfg.model.share_weights:
        from .exit_refit import refit_after_training

        cbs.on_event(state, ev.PHASE, {"phase": f"refitting the exit classifiers of layers 1–{model.num_layers - 1}"
                                                f" ({cfg.model.exit_refit_epochs} epochs on cached summaries)"})
        exit_report = refit_after_training(model, cfg, enc_train, enc_val, cancel, deadline=deadline,
                                           progress=phase_progress(cbs, state))
    elif cfg.model.exit_refit_epochs > 0:  # said, not silent
        exit_report = {"skipped": "share_weights: the one classifier is also the deepest one"}
    if cfg.model.exit_temperature:
        from .exit_refit import temperatures_after_training

        temp_report, val_cache = temperatures_after_training(model, cfg, enc_val)  # + the calibrated cache
        exit_report = {**(exit_report or {}), "temperature": temp_report}
    if exit_report is not None:
        cbs.on_event(state, ev.EXIT_REFIT, exit_report)
    if cfg.model.fit_halting:
        from .halting import fit_after_training, save_front_states

        cbs.on_event(state, ev.PHASE, {"phase": f"fitting the halting units ({len(cfg.model.halting_lambdas)} λ, "
                                                "cross-fitted on the validation split)"})
        kept: list = []
        halting_report = fit_after_training(model, cfg, enc_val, cancel, cache=val_cache,
                                            progress=phase_progress(cbs, state), keep=kept)
        if run_dir is not None and kept:
            save_front_states(run_dir, kept)  # every front point usable later, without a refit
        cbs.on_event(state, ev.HALTING_FIT, halting_report)
    return exit_report, halting_report


#: per kind, what runs after the last step on the restored best weights (the generic loop knows no kind's steps)
AFTER_TRAINING = {"dact": dact_after_training}
