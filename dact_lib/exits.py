"""Per-sample exit layers of a trained DACT run on one split (the Early-exit page's data). No streamlit here.

:func:`per_sample_exits` rebuilds the split the run was trained on (same dataset, same split seed), runs
``DactBert.infer`` under the DACT rule (true per-sample early exit) and returns one row per sentence. The result
is cached in the run folder (``exits_<split>.parquet``, CSV when pyarrow is missing) keyed by the model file's
mtime and size, so a second call is a file read; retraining the run invalidates it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import DactLabError
from .files import atomic_write, atomic_write_json

COLUMNS = ["row", "text", "true_label", "pred_label", "correct", "exit_layer", "confidence"]
SPLITS = ("test", "val", "train")
CACHE_VERSION = 2  # 2: a row-limited run on a stored dataset is split from its own sample


def _model_key(run_dir: Path) -> str:
    from .models import model_version

    return f"v{CACHE_VERSION}-{model_version(run_dir)}"  # the weights and the user's halting choice


def _cache_paths(run_dir: Path, split: str) -> tuple[Path, Path]:
    return run_dir / f"exits_{split}.parquet", run_dir / f"exits_{split}.csv"


def _read_cache(run_dir: Path, split: str, key: str) -> pd.DataFrame | None:
    meta = run_dir / f"exits_{split}.json"
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("key") != key:
        return None
    pq, csv = _cache_paths(run_dir, split)
    try:
        if info.get("format") == "parquet" and pq.exists():
            df = pd.read_parquet(pq)
        elif info.get("format") == "csv" and csv.exists():
            df = pd.read_csv(csv, keep_default_na=False, dtype={"text": str, "true_label": str, "pred_label": str})
        else:
            return None
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    df.attrs.update({k: v for k, v in info.items() if k not in ("key", "format")})
    return df


def _write_cache(run_dir: Path, split: str, key: str, df: pd.DataFrame, extra: dict) -> None:
    pq, csv = _cache_paths(run_dir, split)
    fmt = "parquet"
    try:
        atomic_write(pq, lambda tmp: df.to_parquet(tmp, index=False))
    except Exception:  # noqa: BLE001 - no pyarrow / fastparquet, or a column it cannot write: CSV
        fmt = "csv"
        atomic_write(csv, lambda tmp: df.to_csv(tmp, index=False))
    atomic_write_json(run_dir / f"exits_{split}.json", {"key": key, "format": fmt, **extra})


def _dataset_of_run(run_dir: Path, home) -> tuple[Any, Any]:
    """(tracker, stored dataset) of the run when the home's tracker knows it, else (tracker or None, None)."""
    from .home import db_path

    try:
        run_id = int(run_dir.name)
    except ValueError:
        return None, None
    db = db_path(home) if home is not None else run_dir.parent.parent / "experiments.db"
    if not Path(db).exists():
        return None, None
    from .tracker import Tracker

    tracker = Tracker(Path(db).parent)
    try:
        run = tracker.get_run(run_id)
    except DactLabError:
        return tracker, None
    if Path(str(run.get("run_dir") or "")).resolve() != run_dir.resolve():
        return tracker, None  # a different home's run with the same id
    ds_id = run.get("dataset_id") or ((run.get("config") or {}).get("data") or {}).get("dataset_id")
    if ds_id is None:
        return tracker, None
    try:
        return tracker, tracker.load_dataset(int(ds_id))
    except DactLabError:
        return tracker, None


def split_of_run(loaded, split: str, home=None) -> tuple[Any, str]:
    """The TextDataset of ``split`` the run was trained with, and the split actually used (test -> val when the
    run had no test split)."""
    import copy

    from .train import load_split

    cfg = copy.deepcopy(loaded.config)
    tracker, stored = _dataset_of_run(Path(loaded.run_dir), home)
    if stored is not None and cfg.data.dataset_id is not None:
        # a dataset saved on the Data page: the run read it as train does (its max_rows sample, then the split);
        # splitting the whole stored dataset gave a row-limited run another, larger test split (227 rows, not 80)
        parts, _ = load_split(cfg, tracker)
    elif stored is not None:
        # a file or the demo data: the stored copy is the (max_rows-sampled) dataset the run split: split it again
        parts, _ = load_split(cfg, None, stored)
    else:
        parts, _ = load_split(cfg, None, None)
    order = [split] + [s for s in ("test", "val") if s != split]
    for name in order:
        ds = getattr(parts, name, None)
        if ds is not None and len(ds):
            return ds, name
    raise DactLabError(f"run {loaded.run_dir.name} has no {split!r} split (nor a validation split) to evaluate.")


@torch.no_grad()
def compute_exits(loaded, ds, batch_size: int = 64) -> pd.DataFrame:
    """Per-sample DACT exits of ``loaded`` (a DACT :class:`LoadedModel`) on the TextDataset ``ds``."""
    from . import dact
    from .data import encode, iter_batches

    model = loaded.model
    task = getattr(model, "task", None)
    if loaded.kind != "dact" or not hasattr(model, "infer"):
        raise DactLabError(f"run {loaded.run_dir.name} is a {loaded.kind!r} run: per-sample exit layers need a "
                           "DACT run (kind 'dact').")
    names = loaded.label_maps[task]
    enc = encode(ds, loaded.tokenizer, loaded.config.data.max_seq_len)
    n = len(enc)
    exit_layer = np.zeros(n, dtype=np.int64)
    pred = np.zeros(n, dtype=np.int64)
    conf = np.zeros(n, dtype=np.float64)
    model.eval()
    policy = model.default_policy or dact.DactPolicy()  # an exported folder answers with its own policy
    for batch in iter_batches(enc, batch_size, shuffle=False, group_by_length=True):  # placed by index
        res = model.infer(batch["input_ids"].to(loaded.device), batch["attention_mask"].to(loaded.device), policy)
        idx = batch["index"].numpy()
        probs = res.probs.float().cpu()
        exit_layer[idx] = res.exit_layer.cpu().numpy()
        pred[idx] = probs.argmax(-1).numpy()
        conf[idx] = probs.max(-1).values.numpy()
    y = np.asarray(ds.targets[task], dtype=np.int64)
    df = pd.DataFrame({
        "row": np.arange(n, dtype=np.int64),
        "text": [str(t) for t in ds.texts],
        "true_label": [str(names[i]) for i in y],
        "pred_label": [str(names[i]) for i in pred],
        "correct": pred == y,
        "exit_layer": exit_layer,
        "confidence": conf,
    })
    return df


def per_sample_exits(run_id_or_loaded, split: str = "test", home=None, *, use_cache: bool = True,
                     batch_size: int = 64) -> pd.DataFrame:
    """One row per sentence of ``split`` of a DACT run: ``row``, ``text``, ``true_label``, ``pred_label``,
    ``correct``, ``exit_layer`` (1-based: layers run under the DACT rule, from ``DactBert.infer``) and
    ``confidence`` (the answer's probability at the exit).

    ``run_id_or_loaded``: a run id (under ``home``), a run folder, or a :class:`~dact_lib.models.LoadedModel`.
    ``df.attrs`` holds ``split`` (the split used: a run without a test split falls back to 'val'),
    ``num_layers``, ``task`` and ``run_dir``. Cached in the run folder, keyed by the model file's mtime + size."""
    from .models import LoadedModel, load_model, resolve_run_dir

    if split not in SPLITS:
        raise DactLabError(f"split = {split!r} is invalid: choose one of {', '.join(SPLITS)}.")
    loaded = run_id_or_loaded if isinstance(run_id_or_loaded, LoadedModel) else None
    run_dir = Path(loaded.run_dir) if loaded is not None else resolve_run_dir(run_id_or_loaded, home)
    key = _model_key(run_dir)
    if use_cache:
        cached = _read_cache(run_dir, split, key)
        if cached is not None:
            return cached
    if loaded is None:
        loaded = load_model(run_dir, home, device="cpu")
    ds, used = split_of_run(loaded, split, home)
    df = compute_exits(loaded, ds, batch_size)
    extra = {"split": used, "num_layers": int(getattr(loaded.model, "num_layers", df["exit_layer"].max())),
             "task": getattr(loaded.model, "task", None), "run_dir": str(run_dir)}
    df.attrs.update(extra)
    if use_cache:
        try:
            _write_cache(run_dir, split, key, df, extra)
        except OSError:
            pass  # a read-only run folder: no cache
    return df


def filter_exits(df: pd.DataFrame, layers: tuple[int, int] | None = None, correct: str = "all",
                 search: str = "") -> pd.DataFrame:
    """Rows with ``layers[0] <= exit_layer <= layers[1]``, ``correct`` in 'all' / 'correct' / 'incorrect', and
    ``search`` (case-insensitive substring) in the text."""
    mask = np.ones(len(df), dtype=bool)
    if layers is not None:
        mask &= (df["exit_layer"] >= int(layers[0])).to_numpy() & (df["exit_layer"] <= int(layers[1])).to_numpy()
    if correct == "correct":
        mask &= df["correct"].to_numpy(dtype=bool)
    elif correct == "incorrect":
        mask &= ~df["correct"].to_numpy(dtype=bool)
    if search:
        mask &= df["text"].str.contains(search, case=False, regex=False, na=False).to_numpy()
    return df[mask]
