"""Where run-time state lives: the *home* directory.

The home holds ``experiments.db`` (the tracker and, in the same file, Optuna's studies), ``runs/<id>/``
(weights, configs, label maps) and ``.dact_cache/`` (the extracted bundled encoder, cached features).
Resolution order: explicit argument > ``$DACT_LAB_HOME`` > the project root (the folder holding ``dact_lib``).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "experiments.db"


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    if home is None or str(home) == "":
        home = os.environ.get("DACT_LAB_HOME") or PROJECT_ROOT
    path = Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path(home: str | os.PathLike | None = None) -> Path:
    return resolve_home(home) / DB_NAME


def runs_dir(home: str | os.PathLike | None = None) -> Path:
    path = resolve_home(home) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(run_id: str, home: str | os.PathLike | None = None) -> Path:
    path = runs_dir(home) / str(run_id)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(home: str | os.PathLike | None = None) -> Path:
    """``<home>/.dact_cache`` unless ``$DACT_LAB_CACHE`` names a cache shared between homes (tests use one)."""
    shared = os.environ.get("DACT_LAB_CACHE")
    path = Path(shared).expanduser().resolve() if shared else resolve_home(home) / ".dact_cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def optuna_storage_url(home: str | os.PathLike | None = None) -> str:
    """Optuna RDB storage URL of the home (the same SQLite file as the tracker)."""
    return f"sqlite:///{db_path(home)}"
