"""The per-layer feature cache: sentence summaries of every layer of a FROZEN pretrained encoder, computed once.

Tuning stage 1 (the DACT sub-model architecture study, ``tuning/dact_pipeline/stage1.py``) trains only the classifier and
halting MLPs. With the encoder frozen, their inputs — the per-layer summaries c_n (the [CLS] vector or the masked
mean, ``heads.pool``) — are the same in every trial, so they are computed once per
(dataset content, encoder weights, pooling, max_seq_len) and stored as safetensors::

    <cache_dir(home)>/features/<key>.safetensors      tensor "features": float32 [n, N, H]

``key`` is the sha256 (first 32 hex digits) of a JSON object holding: the sha256 of the dataset's canonical CSV
bytes (``ds.to_csv_bytes()``, the same content hash the tracker uses), ``encoders.encoder_fingerprint`` (for the
random ``"tiny"`` test encoder also its init seed; with ``encoder_weights`` — a backbone run's exported
``encoder.safetensors``, as ``RunConfig.init_from_run`` uses — also that file's sha256), the pooling,
``max_seq_len`` and a format version. Rows are in
dataset order. Files are written atomically (temporary file + ``os.replace``), so a crashed or concurrent writer
never leaves a half-written cache entry.

API:

* :func:`layer_features` -> ``torch.Tensor`` [n, N, H] (one pooling; the plain call);
* :func:`cached_features` -> ``dict[pooling, FeatureCache]``: several poolings from ONE encoder pass, each with
  its ``key``, ``path``, ``cache_hit`` (loaded from disk, nothing computed) and ``build_s`` (seconds spent
  computing it; 0.0 on a hit). Use it when you need to know whether the cache was hit (the pipeline does);
* :func:`cached_features_many` — the same for several datasets (train and val), loading the encoder at most once;
* :func:`feature_key` — the cache key without computing anything.

Storage is float32: MiniLM on 2,000 sentences is 2000 x 6 x 384 x 4 B = 18 MB per pooling, and loading it takes
milliseconds, so half precision would buy nothing measurable at the sizes DACT Lab tunes on.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import home as _home
from .config import POOLINGS
from .data import TextDataset, encode
from .encoders import encoder_fingerprint, is_tiny, layer_adapter, load_encoder
from .errors import ConfigError, DactLabError
from .heads import pool
from .files import atomic_write

__all__ = ["FeatureCache", "FORMAT_VERSION", "feature_key", "feature_path", "layer_features", "cached_features",
           "cached_features_many", "dataset_hash"]

FORMAT_VERSION = 1
TENSOR_NAME = "features"


@dataclass
class FeatureCache:
    """One cache entry: ``features`` float32 [n, N, H] (dataset order), where it lives and how it was obtained."""

    features: torch.Tensor
    key: str
    path: Path
    pooling: str
    cache_hit: bool  # True: loaded from disk; False: computed now (and written)
    build_s: float  # seconds spent computing this entry (encoder load + pass; 0.0 on a hit; split evenly over
    #                 the poolings computed in one pass)
    load_s: float = 0.0  # seconds spent reading the file (hits only)

    def info(self) -> dict:
        """A JSON-able summary (no tensor) for events and reports."""
        n, layers, hidden = self.features.shape
        return {"key": self.key, "path": str(self.path), "pooling": self.pooling, "cache_hit": self.cache_hit,
                "build_s": round(self.build_s, 4), "load_s": round(self.load_s, 4), "rows": n, "layers": layers,
                "hidden": hidden}


def dataset_hash(dataset: TextDataset) -> str:
    """sha256 of the dataset's canonical CSV bytes (rows, texts and labels: the same hash the tracker stores)."""
    return hashlib.sha256(bytes(dataset.to_csv_bytes())).hexdigest()


def _check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling = {pooling!r} is invalid: choose one of {POOLINGS}.")
    return pooling


_weights_hashes: dict[tuple[str, int, int], str] = {}


def _weights_hash(path: str | os.PathLike) -> str:
    """sha256 of an encoder weights file (memoised per path, size and mtime)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"encoder weights {str(p)!r} do not exist: give the encoder.safetensors of a finished "
                          "backbone run.")
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _weights_hashes:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _weights_hashes[memo] = digest.hexdigest()
    return _weights_hashes[memo]


def _encoder_id(encoder_name: str, home, seed: int, encoder_weights=None) -> str:
    fp = encoder_fingerprint(encoder_name, home)
    if is_tiny(encoder_name):  # the tiny test encoder is random: its weights are a function of the init seed
        fp = f"{fp}#seed{int(seed)}"
    if encoder_weights is not None:
        fp = f"{fp}+weights@{_weights_hash(encoder_weights)[:16]}"
    return fp


def feature_key(encoder_name: str, dataset: TextDataset, *, pooling: str, max_seq_len: int = 128, home=None,
                seed: int = 0, encoder_weights: str | os.PathLike | None = None,
                data_hash: str | None = None) -> str:
    """The cache key of (dataset content, encoder weights, pooling, max_seq_len). ``seed`` matters only for the
    random ``"tiny"`` encoder (its init seed, as ``load_encoder(..., seed=)``); ``encoder_weights`` is the
    ``encoder.safetensors`` of a backbone run loaded over the pretrained weights (``RunConfig.init_from_run``) —
    its content hash enters the key."""
    _check_pooling(pooling)
    ident = {"v": FORMAT_VERSION, "data": data_hash or dataset_hash(dataset),
             "encoder": _encoder_id(encoder_name, home, seed, encoder_weights), "pooling": pooling,
             "max_seq_len": int(max_seq_len)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def feature_path(key: str, home=None) -> Path:
    return _home.cache_dir(home) / "features" / f"{key}.safetensors"


def _load(path: Path) -> torch.Tensor | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))[TENSOR_NAME]
    except (OSError, KeyError, SafetensorError, RuntimeError):
        return None  # a damaged or foreign file: recompute (and overwrite) it


def _save(path: Path, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({TENSOR_NAME: tensor.contiguous()}, str(tmp), metadata=metadata))


@torch.no_grad()
def _compute(model, tokenizer, dataset: TextDataset, poolings: Sequence[str], max_seq_len: int, batch_size: int,
             device: str, on_rows=None) -> dict[str, torch.Tensor]:
    """Run the frozen encoder (eval mode, no grad) through its layer adapter once; pool every layer each way.
    ``on_rows(n)`` after each batch of n rows."""
    ad = layer_adapter(model)
    n, layers, hidden = len(dataset), ad.num_layers, ad.hidden_size
    out = {p: torch.zeros(n, layers, hidden, dtype=torch.float32) for p in poolings}

    def on_layer(rows, i, h, am):  # rows go back to dataset order
        for p in poolings:
            out[p][rows, i] = pool(h, am, p).float().cpu()

    ad.each_layer(encode(dataset, tokenizer, max_seq_len), batch_size, device, on_layer,
                  (lambda rows, h, am: on_rows(len(rows))) if on_rows is not None else None)
    return out


def cached_features_many(encoder_name: str, datasets: Mapping[str, TextDataset], *,
                         poolings: Sequence[str] = ("mean",), max_seq_len: int = 128, home=None,
                         batch_size: int = 64, device: str = "cpu", seed: int = 0,
                         encoder_weights: str | os.PathLike | None = None,
                         on_progress=None) -> dict[str, dict[str, FeatureCache]]:
    """:func:`cached_features` for several datasets (e.g. ``{"train": ..., "val": ...}``), loading the encoder at
    most once. Returns {dataset name: {pooling: FeatureCache}}. ``on_progress(rows_done, rows_to_compute)`` is
    called as the missing features are computed (not at all when every one is in the cache)."""
    poolings = list(dict.fromkeys(_check_pooling(p) for p in poolings))
    if not poolings:
        raise ConfigError("poolings is empty: give at least one of " + ", ".join(POOLINGS) + ".")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size!r} is invalid: give a positive whole number.")
    loaded: list = []  # the (model, tokenizer), loaded on the first cache miss

    def encoder():
        if not loaded:
            model, tokenizer = load_encoder(encoder_name, home, seed=seed)
            if encoder_weights is not None:
                from safetensors.torch import load_file

                missing, unexpected = model.load_state_dict(load_file(str(encoder_weights)), strict=False)
                if unexpected or [m for m in missing if "pooler" not in m]:
                    raise ConfigError(f"encoder weights {str(encoder_weights)!r} do not match {encoder_name!r} "
                                      f"(missing {missing[:3]}, unexpected {unexpected[:3]}): use the same encoder.")
            model.eval().to(device)
            loaded.append((model, tokenizer))
        return loaded[0]

    out: dict[str, dict[str, FeatureCache]] = {}
    to_compute = sum(len(d) for d in datasets.values())  # an upper bound: parts found in the cache are skipped
    progress = {"done": 0}

    def rows_done(n: int) -> None:
        progress["done"] += n
        if on_progress is not None:
            on_progress(progress["done"], to_compute)

    for part, dataset in datasets.items():
        if len(dataset) == 0:
            raise DactLabError(f"Cannot compute features of an empty dataset ({part!r}): give at least one row.")
        data_hash = dataset_hash(dataset)
        result: dict[str, FeatureCache] = {}
        missing: list[tuple[str, str, Path]] = []
        for p in poolings:
            key = feature_key(encoder_name, dataset, pooling=p, max_seq_len=max_seq_len, home=home, seed=seed,
                              encoder_weights=encoder_weights, data_hash=data_hash)
            path = feature_path(key, home)
            t0 = time.perf_counter()
            feats = _load(path) if path.is_file() else None
            if feats is not None and feats.dim() == 3 and feats.shape[0] == len(dataset):
                result[p] = FeatureCache(feats, key, path, p, cache_hit=True, build_s=0.0,
                                         load_s=time.perf_counter() - t0)
            else:
                missing.append((p, key, path))
        if missing:
            t0 = time.perf_counter()
            model, tokenizer = encoder()
            computed = _compute(model, tokenizer, dataset, [m[0] for m in missing], max_seq_len, batch_size, device,
                                rows_done)
            build_s = (time.perf_counter() - t0) / len(missing)
            for p, key, path in missing:
                _save(path, computed[p], {"encoder": _encoder_id(encoder_name, home, seed, encoder_weights),
                                          "pooling": p,
                                          "max_seq_len": str(int(max_seq_len)), "dataset_sha256": data_hash,
                                          "rows": str(len(dataset)), "format_version": str(FORMAT_VERSION)})
                result[p] = FeatureCache(computed[p], key, path, p, cache_hit=False, build_s=build_s)
        out[part] = {p: result[p] for p in poolings}
    return out


def cached_features(encoder_name: str, dataset: TextDataset, *, poolings: Sequence[str] = ("mean",),
                    max_seq_len: int = 128, home=None, batch_size: int = 64, device: str = "cpu",
                    seed: int = 0, encoder_weights: str | os.PathLike | None = None) -> dict[str, FeatureCache]:
    """Per-layer summaries of ``dataset`` for each pooling in ``poolings``, from the cache where present; the
    missing ones are computed in ONE encoder pass and written. Returns {pooling: FeatureCache}. ``build_s``
    includes loading the encoder (once per call, on the first miss)."""
    return cached_features_many(encoder_name, {"data": dataset}, poolings=poolings, max_seq_len=max_seq_len,
                                home=home, batch_size=batch_size, device=device, seed=seed,
                                encoder_weights=encoder_weights)["data"]


def layer_features(encoder_name: str, dataset: TextDataset, *, pooling: str = "mean", max_seq_len: int = 128,
                   home=None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
                   encoder_weights: str | os.PathLike | None = None) -> torch.Tensor:
    """float32 [n, N, H]: for every row of ``dataset`` (in order) and every encoder layer n = 1..N, the
    ``pooling`` summary ('cls' or 'mean', :func:`heads.pool`) of that layer's states, from the frozen pretrained
    encoder. Cached (see the module docstring); to learn whether the call hit the cache use
    :func:`cached_features`, which returns a :class:`FeatureCache` with ``cache_hit``."""
    return cached_features(encoder_name, dataset, poolings=(pooling,), max_seq_len=max_seq_len, home=home,
                           batch_size=batch_size, device=device, seed=seed,
                           encoder_weights=encoder_weights)[pooling].features
