"""Multi-task training: one encoder, a head per task, on a two-task CSV (sentence, class_label,
sentiment_label).

The training loop does the work (best-epoch checkpoint on validation loss, early stopping, per-task validation
curves ``val_loss/<task>``, ``val_accuracy/<task>``, ``val_macro_f1/<task>``); :func:`train_multitask` is the
entry point the CLI and the dashboard call: it checks the data and the settings first, with clear errors, then
trains. The defaults come from ``default_config("multitask")``: encoder lr 5e-5, head lr 1e-3 (measured on both
two-task sets, bench/multitask_defaults.py; lower rates, 1e-5 / 1e-4, left classes unpredicted), early-stopping
patience 2; ``model.class_weighting = "balanced"`` weights rare classes up (an option: it measured worse on the
imbalanced airline sentiment); ``model.pooling`` ('cls' or 'mean'), ``model.normalize`` (L2-normalise the sentence vector) and
``model.task_weights`` ({task: weight}, default 1 each) shape the model.
"""
from __future__ import annotations

import copy

from .callbacks import Callback, CancelToken
from .config import RunConfig, default_config
from .data import DatasetSplit, TextDataset
from .errors import ConfigError, DataError
from .tracker import Tracker
from .train import TrainResult, load_split, train

TASKS = ("class_label", "sentiment_label")


def check_multitask_data(cfg: RunConfig, tracker: Tracker | None = None,
                         data: DatasetSplit | TextDataset | None = None) -> list[str]:
    """The tasks of the run's dataset; DataError unless it has exactly two, ConfigError when ``task_weights``
    name another task."""
    # the tracker is only needed to read a stored dataset; a file is not stored before it passed the check
    split, _ = load_split(cfg, tracker if cfg.data.dataset_id is not None else None, data)
    tasks = list(split.train.label_maps)
    name = split.train.name or cfg.data.path or "the dataset"
    if len(tasks) != 2:
        raise DataError(f"Multi-task training needs a two-task CSV with columns sentence,{','.join(TASKS)}; "
                        f"{name} has {len(tasks)} task(s) {tasks}. Add the second label column, or train a "
                        "single-task model (kind 'backbone' or 'dact').")
    weights = cfg.model.task_weights or {}
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ConfigError(f"model.task_weights names unknown task(s) {unknown}: the tasks of {name} are {tasks}.")
    return tasks


def parse_task_weights(text: str) -> dict[str, float]:
    """``"class_label=1,sentiment_label=0.5"`` -> ``{"class_label": 1.0, "sentiment_label": 0.5}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, value = part.partition("=")
        try:
            if not sep or not task.strip():
                raise ValueError
            out[task.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"task weights {text!r} are invalid at {part!r}: write task=weight pairs separated by "
                              "commas, e.g. class_label=1,sentiment_label=0.5.") from None
        if out[task.strip()] < 0:
            raise ConfigError(f"task weight {part!r} is negative: weights must be >= 0.")
    if not out:
        raise ConfigError(f"task weights {text!r} are empty: e.g. class_label=1,sentiment_label=0.5.")
    return out


def train_multitask(cfg: RunConfig | None = None, *, home=None, tracker: Tracker | None = None,
                    cancel: CancelToken | None = None, callbacks: list[Callback] | None = None,
                    data: DatasetSplit | TextDataset | None = None) -> TrainResult:
    """Train one multi-task model (``cfg`` defaults to ``default_config('multitask')`` on the bundled demo data)
    and record it in the home's tracker (a new Tracker unless one is given). Returns the loop's TrainResult;
    raises Cancelled when ``cancel`` is set (the run is recorded 'cancelled')."""
    cfg = copy.deepcopy(cfg) if cfg is not None else default_config("multitask")
    if cfg.kind != "multitask":
        raise ConfigError(f"kind = {cfg.kind!r}: train_multitask trains kind 'multitask'; start from "
                          "default_config('multitask').")
    cfg.validate()
    tracker = tracker if tracker is not None else Tracker(home)
    check_multitask_data(cfg, tracker, data)
    return train(cfg, data=data, home=home if home is not None else tracker.home, tracker=tracker,
                 callbacks=callbacks, cancel=cancel)
