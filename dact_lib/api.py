"""The Python API for notebooks: ``dact_lib.train(data, kind=..., **overrides)`` and ``dact_lib.load(run)``.

``train`` runs exactly what ``dact-lab train`` runs — a :class:`~dact_lib.config.RunConfig` through the one
training loop (:func:`dact_lib.train.train`), recorded in the home's tracker unless ``track=False`` — and returns a
:class:`TrainedRun` (run id, run folder, metrics, ``predict``). ``load`` returns the same
:class:`~dact_lib.deploy.predictor.Predictor` that ``dact-lab predict`` uses.

Overrides name config settings three ways: bare (``epochs=2`` → ``train.epochs``; a name that two sections share
must be dotted), dotted (``**{"train.epochs": 2}``) or nested (``train={"epochs": 2}``). An unknown key is refused
with the keys there are.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, DactLabError

#: the config sections a bare override name is looked up in, in this order
SECTIONS = ("data", "model", "train")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}


def setting_keys(kind: str) -> dict[str, str]:
    """Every override key of a ``kind`` run → the dotted config path it sets: top-level settings (``encoder``,
    ``name``, ``tag``, ``init_from_run``), every dotted path (``train.early_stopping.patience``) and the bare names
    of the sections' own settings that only one section has (``epochs`` → ``train.epochs``)."""
    from .config import MODEL_CONFIGS, RunConfig, TrainConfig, DataConfig

    classes = {"data": DataConfig, "model": MODEL_CONFIGS[kind], "train": TrainConfig}
    keys: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, hint in _fields(cls).items():
            path = f"{prefix}.{name}"
            keys[path] = path
            if dataclasses.is_dataclass(hint) and isinstance(hint, type):
                walk(hint, path)

    for name in _fields(RunConfig):
        if name not in SECTIONS and name != "kind":
            keys[name] = name
    owners: dict[str, list[str]] = {}
    for section, cls in classes.items():
        walk(cls, section)
        for name in _fields(cls):
            owners.setdefault(name, []).append(section)
    for name, sections in owners.items():
        if len(sections) == 1 and name not in keys:
            keys[name] = f"{sections[0]}.{name}"
    return keys


def _ambiguous(kind: str) -> dict[str, list[str]]:
    """Bare names that several sections have (they must be dotted): name → the dotted paths."""
    from .config import MODEL_CONFIGS, TrainConfig, DataConfig

    owners: dict[str, list[str]] = {}
    for section, cls in (("data", DataConfig), ("model", MODEL_CONFIGS[kind]), ("train", TrainConfig)):
        for name in _fields(cls):
            owners.setdefault(name, []).append(f"{section}.{name}")
    return {n: p for n, p in owners.items() if len(p) > 1}


def _flatten(overrides: dict[str, Any], keys: dict[str, str]) -> list[tuple[str, Any]]:
    """``train={"epochs": 2, "early_stopping": {"patience": 1}}`` → ``[("train.epochs", 2),
    ("train.early_stopping.patience", 1)]``: a mapping under a section or a nested settings group is opened; under a
    plain setting (``data={"columns": {...}}``) it is that setting's value."""
    out: list[tuple[str, Any]] = []

    def opens(path: str) -> bool:  # a section or a settings group (it has settings below it)
        return any(k.startswith(path + ".") for k in keys)

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict) and opens(path):
            for sub, v in value.items():
                walk(f"{path}.{sub}", v)
        else:
            out.append((path, value))

    for key, value in overrides.items():
        walk(key, value) if key in SECTIONS else out.append((key, value))
    return out


def apply_overrides(cfg, overrides: dict[str, Any]):
    """A new, validated RunConfig: ``cfg`` with ``overrides`` (bare, dotted or nested keys) set."""
    from .config import RunConfig

    kind = cfg.kind
    keys = setting_keys(kind)
    doc = cfg.to_dict()
    for key, value in _flatten(dict(overrides), keys):
        path = keys.get(key)
        if path is None or any(k.startswith(path + ".") for k in keys):  # unknown, or a whole group set bare
            if path is not None and isinstance(value, dict):
                for sub, v in value.items():  # early_stopping={"patience": 1}
                    apply_path = keys.get(f"{path}.{sub}")
                    if apply_path is None:
                        raise ConfigError(_unknown_key_message(f"{path}.{sub}", kind, keys, _ambiguous(kind)))
                    _set(doc, apply_path, v)
                continue
            raise ConfigError(_unknown_key_message(key, kind, keys, _ambiguous(kind)))
        _set(doc, path, value)
    return RunConfig.from_dict(doc)


def _set(doc: dict, path: str, value: Any) -> None:
    node = doc
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _unknown_key_message(key: str, kind: str, keys: dict[str, str], ambiguous: dict[str, list[str]]) -> str:
    if key in ambiguous:
        return (f"Setting {key!r} is in several sections of a {kind} config: give it dotted, as one of "
                f"{', '.join(ambiguous[key])} (e.g. **{{{ambiguous[key][0]!r}: ...}}).")
    close = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.75)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    bare = sorted(k for k, v in keys.items() if "." not in k)
    dotted = sorted(k for k in keys if "." in k and not any(k == keys[b] for b in bare))
    return (f"Unknown setting {key!r} for a {kind} run.{hint} Valid keys: {', '.join(bare)}; dotted: "
            f"{', '.join(dotted)}. Give a setting bare (epochs=2), dotted (**{{'train.epochs': 2}}) or nested "
            "(train={'epochs': 2}).")


# ------------------------------------------------------------------------------------------------------- results
@dataclass
class TrainedRun:
    """What :func:`train` returns: the run's id (None with ``track=False``), folder, status and metrics (the best
    validation and the test split's), the config it ran and ``predict`` with its saved model."""

    run_id: int | None
    run_dir: Path | None
    kind: str
    status: str
    metrics: dict[str, float]
    config: Any = field(repr=False)
    home: Path = field(repr=False)
    history: list[dict] = field(default_factory=list, repr=False)
    stop_reason: str | None = None
    _predictor: Any = field(default=None, repr=False, compare=False)

    @property
    def predictor(self):
        """The run's saved model as ``dact-lab predict`` loads it (loaded once)."""
        if self._predictor is None:
            if self.run_dir is None or not Path(self.run_dir).is_dir():
                raise DactLabError("This run saved no model folder, so there is nothing to predict with.")
            self._predictor = load(self.run_dir, device="cpu")
        return self._predictor

    def predict(self, texts: str | Sequence[str], *, trace: bool = False) -> list[dict]:
        """One dict per text: ``label``, ``probability``, ``probabilities``; DACT: ``exit_layer`` (and with
        ``trace=True`` the per-layer ``layers``); multi-task: ``tasks``."""
        return self.predictor.predict([texts] if isinstance(texts, str) else list(texts), trace=trace)


def _config(kind: str | None, config: Any) -> Any:
    from .config import RunConfig, default_config

    if config is None:
        return default_config(kind or "backbone")
    if isinstance(config, RunConfig):
        cfg = RunConfig.from_dict(config.to_dict())
    elif isinstance(config, dict):
        cfg = RunConfig.from_dict({**config, **({"kind": kind} if kind else {})})
    elif isinstance(config, (str, Path)):
        cfg = RunConfig.load(config)
    else:
        raise ConfigError(f"config = {type(config).__name__}: give a RunConfig, a mapping or the path of a JSON / "
                          "YAML config file.")
    if kind and cfg.kind != kind:
        doc = cfg.to_dict()
        doc["kind"] = kind
        doc.pop("model", None)  # another kind's model settings do not apply
        cfg = RunConfig.from_dict(doc)
    return cfg


def train(data: Any = None, /, kind: str = "backbone", *, config: Any = None, home: str | Path | None = None,
          track: bool = True, progress: bool = False, **overrides: Any) -> TrainedRun:
    """Train one model, as ``dact-lab train --kind KIND`` does, and return a :class:`TrainedRun`.

    ``data`` (the first argument; ``data=`` works too, and ``data={...}`` sets the data settings): a pandas
    DataFrame, a data file (CSV, TSV, JSON Lines, JSON, Parquet; see ``data.read_csv``), a
    :class:`~dact_lib.data.TextDataset`, or None for the bundled demo dataset. ``kind``: ``"backbone"``,
    ``"dact"`` or ``"multitask"``. ``config``: a starting RunConfig (object, mapping or file), default the kind's
    defaults. ``overrides``: config settings, bare (``epochs=2``), dotted (``**{"train.epochs": 2}``) or nested
    (``train={"epochs": 2}``). ``home``: where the run is recorded (default ``$DACT_LAB_HOME`` or the project
    root) — the home the dashboard shows; ``track=False`` records nothing in its database (the model folder is
    still written under ``home/runs``). ``progress``: the CLI's progress bar on stderr.
    """
    from .callbacks import ProgressPrinter
    from .data import TextDataset, read_csv
    from .home import resolve_home
    from .train import train as run_training

    import pandas as pd

    if "data" in overrides and not isinstance(overrides["data"], dict):  # train(data=df)
        if data is not None:
            raise DactLabError("Give the data once: as the first argument or as data=, not both.")
        data = overrides.pop("data")
    cfg = _config(kind, config)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    dataset = None
    if isinstance(data, pd.DataFrame):
        d = cfg.data
        dataset = read_csv(data, columns=d.columns, max_rows=d.max_rows, seed=d.split_seed)
    elif isinstance(data, TextDataset):
        dataset = data if not cfg.data.max_rows else read_csv(data.to_csv_bytes(), max_rows=cfg.data.max_rows,
                                                                name=data.name, seed=cfg.data.split_seed)
    elif isinstance(data, (str, Path)):
        cfg.data.path = str(Path(data).expanduser())
    elif data is not None:
        raise DactLabError(f"data = {type(data).__name__}: give a pandas DataFrame, the path of a data file (CSV, "
                           "TSV, JSON Lines, JSON, Parquet), a TextDataset, or None for the demo dataset.")
    cfg.validate()
    root = resolve_home(home)
    tracker = None
    if track:
        from .tracker import Tracker

        tracker = Tracker(root)
    callbacks = [ProgressPrinter(1)] if progress else []
    result = run_training(cfg, data=dataset, tracker=tracker, home=root, callbacks=callbacks)
    metrics = {k: float(v) for k, v in {**result.best_metrics, **result.test_metrics}.items()
               if isinstance(v, (int, float))}
    return TrainedRun(run_id=result.run_id, run_dir=Path(result.run_dir) if result.run_dir else None, kind=cfg.kind,
                      status=result.status, metrics=metrics, config=cfg, home=root, history=list(result.history),
                      stop_reason=result.stop_reason)


def load(run: int | str | Path, *, home: str | Path | None = None, runtime: str = "torch", int8: bool = False,
         policy: str | None = None, device: str = "cpu"):
    """A trained model for prediction: ``run`` is a run id of ``home`` (default ``$DACT_LAB_HOME`` or the project
    root), a run folder, or a folder written by ``dact-lab export``. Returns the
    :class:`~dact_lib.deploy.predictor.Predictor` ``dact-lab predict`` uses: ``.predict(texts)``, ``.labels``,
    ``.describe()``. ``runtime`` / ``int8`` / ``policy`` as the CLI's ``--runtime`` / ``--int8`` / ``--policy``."""
    from .deploy.predictor import load_predictor

    if isinstance(run, (str, Path)) and not str(run).strip().isdigit():
        return load_predictor(model_dir=Path(run).expanduser(), home=home, runtime=runtime, int8=int8, policy=policy,
                              device=device)
    return load_predictor(run=int(str(run).strip()) if not isinstance(run, int) else run, home=home,
                          runtime=runtime, int8=int8, policy=policy, device=device)
