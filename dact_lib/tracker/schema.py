"""The tables of experiments.db (columns, indexes) and how values are stored: JSON columns, metric values as
floats. The migration that adds what an older database lacks is ``Tracker._ensure_schema``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import DactLabError

# table -> ordered {column: declaration}; the first column's declaration carries the primary key.
SCHEMA: dict[str, dict[str, str]] = {
    "datasets": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "name": "TEXT",
        "content_hash": "TEXT UNIQUE",
        "rows": "INTEGER",
        "columns": "TEXT",
        "tasks": "TEXT",
        "label_maps": "TEXT",
        "class_counts": "TEXT",
        "created": "REAL",
        "csv": "BLOB",
    },
    "runs": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "kind": "TEXT",
        "name": "TEXT",
        "tag": "TEXT",
        "status": "TEXT",
        "config": "TEXT",
        "dataset_id": "INTEGER",
        "parent_id": "INTEGER",
        "created": "REAL",
        "started": "REAL",
        "ended": "REAL",
        "error": "TEXT",
        "pid": "INTEGER",
        "host": "TEXT",
        "summary": "TEXT",
        "run_dir": "TEXT",
    },
    "metrics": {
        "run_id": "INTEGER",
        "step": "INTEGER",
        "epoch": "INTEGER",
        "name": "TEXT",
        "value": "REAL",
        "time": "REAL",
    },
    "events": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "run_id": "INTEGER",
        "time": "REAL",
        "kind": "TEXT",
        "payload": "TEXT",
    },
    "artifacts": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "run_id": "INTEGER",
        "path": "TEXT",
        "kind": "TEXT",
        "created": "REAL",
    },
}

INDEXES = {
    "idx_metrics_run_name_step": ("metrics", ("run_id", "name", "step")),
    "idx_events_run": ("events", ("run_id",)),
    "idx_artifacts_run": ("artifacts", ("run_id",)),
    "idx_runs_parent": ("runs", ("parent_id",)),
    "idx_runs_status": ("runs", ("status",)),
    "idx_runs_dataset": ("runs", ("dataset_id",)),
}

RUN_JSON = ("config", "summary")
DATASET_JSON = ("columns", "tasks", "label_maps", "class_counts")
DATASET_COLS = [c for c in SCHEMA["datasets"] if c != "csv"]
METRIC_COLUMNS = ["run_id", "step", "epoch", "name", "value", "time"]


# --------------------------------------------------------------------------------------------- helpers


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "tolist"):  # numpy arrays / scalars, torch tensors
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def dumps(value: Any) -> str:
    return json.dumps(value, default=json_default)


def loads(text: Any, empty: Any = None) -> Any:
    if text is None or text == "":
        return empty
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def to_float(value: Any) -> float | None:
    """A metric value as float, or None when it is not a number (such values are skipped)."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    try:
        if hasattr(value, "item"):
            value = value.item()
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def config_to_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return config
    for attr in ("to_dict", "as_dict"):
        fn = getattr(config, attr, None)
        if callable(fn):
            return fn()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise DactLabError(f"run config must be a dict or a config dataclass, got {type(config).__name__}.")


def encode_field(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple, set, frozenset)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        return dumps(value)
    if isinstance(value, Path):
        return str(value)
    return value


def count_classes(targets: dict, label_maps: dict) -> dict:
    out: dict[str, dict[str, int]] = {}
    for task, arr in (targets or {}).items():
        names = list((label_maps or {}).get(task, []))
        counts: dict[str, int] = {str(n): 0 for n in names}
        values = arr.tolist() if hasattr(arr, "tolist") else list(arr)
        for v in values:
            v = int(v)
            key = str(names[v]) if 0 <= v < len(names) else str(v)
            counts[key] = counts.get(key, 0) + 1
        out[task] = counts
    return out
