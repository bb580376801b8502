"""Where run-time state lives: the *home* directory.

The home holds ``experiments.db`` (the tracker and, in the same file, Optuna's studies), ``runs/<id>/``
(weights, configs, label maps) and ``.dact_cache/`` (the extracted bundled encoder, cached features).
Resolution order: explicit argument > ``$DACT_LAB_HOME`` > the project root (the folder holding ``dact_lib``).

Beyond one machine: ``$DACT_LAB_DB`` (``--db URL``) puts the tracker and the studies in a server database instead
of experiments.db (:mod:`dact_lib.tracker.db`), and ``$DACT_LAB_ARTIFACTS`` (``--artifacts DIR``) puts the run
folders (``runs/<id>/``) in a directory every machine sees (default: the home).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DB_NAME = "experiments.db"  # = tracker.db.DB_NAME (tests/test_scale_out.py checks they agree)


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    if home is None or str(home) == "":
        home = os.environ.get("DACT_LAB_HOME") or PROJECT_ROOT
    path = Path(home).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def db_path(home: str | os.PathLike | None = None) -> Path:
    return resolve_home(home) / DB_NAME


ARTIFACTS_ENV = "DACT_LAB_ARTIFACTS"


def artifacts_root(home: str | os.PathLike | None = None) -> Path:
    """Where run folders live: ``$DACT_LAB_ARTIFACTS`` (``--artifacts DIR``) or the home."""
    shared = os.environ.get(ARTIFACTS_ENV)
    if shared:
        path = Path(shared).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return resolve_home(home)


def runs_dir(home: str | os.PathLike | None = None) -> Path:
    path = artifacts_root(home) / "runs"
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


def db_url(home: str | os.PathLike | None = None) -> str:
    """The tracker's database: ``$DACT_LAB_DB`` (``--db URL``) or ``sqlite:///<home>/experiments.db``."""
    from .tracker.db import resolve_url

    return resolve_url(None, resolve_home(home))


def optuna_storage_url(home: str | os.PathLike | None = None) -> str:
    """Optuna RDB storage URL of the home: the tracker's database (the same SQLite file, or the same server
    database through SQLAlchemy's psycopg driver)."""
    from .tracker.db import optuna_url

    return optuna_url(db_url(home))
