"""Tiny trained runs for the deployment tests (predictor, predict_files, serve), trained once per test session and
kept in one temporary home: ``tiny_run("dact")`` → ``(home, run_id)``. Tests that change a run folder work on a copy
(:func:`run_copy`)."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from easydata import easy_csv

_HOME: Path | None = None
_RUNS: dict[str, int] = {}


def _home() -> Path:
    global _HOME
    if _HOME is None:
        _HOME = Path(tempfile.mkdtemp(prefix="dact-deploy-tests-"))
        atexit.register(shutil.rmtree, _HOME, True)
    return _HOME


def tiny_run(kind: str) -> tuple[Path, int]:
    """A finished tiny-encoder run of ``kind`` ("dact", "backbone", "multitask"): DACT and backbone on easy keyword
    data (a model that learns, so its labels vary), multitask on 120 rows of the demo set (two tasks)."""
    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker
    from dact_lib.train import train

    home = _home()
    if kind not in _RUNS:
        cfg = default_config(kind, encoder="tiny")
        if kind != "multitask":
            cfg.data.path = str(easy_csv(home / "easy.csv", n=150))
        cfg.data.max_rows = 120 if kind == "multitask" else None
        cfg.data.max_seq_len = 32
        cfg.train.epochs = 2 if kind != "multitask" else 1
        cfg.train.batch_size = 16
        cfg.train.device = "cpu"
        tr = Tracker(home)
        try:
            _RUNS[kind] = train(cfg.validate(), tracker=tr, home=home).run_id
        finally:
            tr.close()
    return home, _RUNS[kind]


def run_copy(kind: str, dest: Path) -> Path:
    """A copy of the tiny run's folder at ``dest`` (a run folder: ``--model DIR`` / ``run=DIR``)."""
    home, run = tiny_run(kind)
    shutil.copytree(home / "runs" / str(run), dest)
    return dest
