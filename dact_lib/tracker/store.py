"""The experiment tracker's database: ``experiments.db`` in the home (SQLite, through sqlite-utils), or a server
database given by ``--db URL`` / ``$DACT_LAB_DB`` (PostgreSQL) — one code path, see :mod:`dact_lib.tracker.db`.

Tables: ``datasets`` (with the canonical CSV bytes), ``runs``, ``metrics`` (long format), ``events`` and
``artifacts``. Optuna's RDB storage lives in the same database (see :func:`dact_lib.home.optuna_storage_url`);
its tables have different names. Run folders (weights, reports) are files under the artifacts root (the home, or
``--artifacts DIR`` / ``$DACT_LAB_ARTIFACTS``: a directory every machine of a study sees).

Concurrency model
-----------------
* SQLite is in WAL mode: readers never block writers and vice versa; writers are serialised by SQLite.
  PostgreSQL: many writers, row locks.
* One connection **per thread** (and per process: a forked child opens its own), busy timeout 30 s.
* Every write runs in one transaction that takes the write lock up front (SQLite ``BEGIN IMMEDIATE``), so a
  transaction never has to upgrade a read snapshot to a write (the upgrade is what fails at once with
  "database is locked" whatever the busy timeout). Multi-row writes are therefore all-or-nothing.
* Reads are single statements, fetched completely, so no read snapshot is held open.

Timestamps are float unix seconds. JSON columns (``config``, ``summary``, ``payload``, ``columns``, ``tasks``,
``label_maps``, ``class_counts``) are decoded by the getters.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import threading
import time as _time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import home as _home
from ..errors import DactLabError
from ..sysinfo import environment
from ..tags import tag_list, tag_text
from . import db as _db
from . import liveness
from .liveness import hostname, pid_alive
from .schema import (DATASET_COLS, DATASET_JSON, INDEXES, RUN_JSON, SCHEMA, config_to_dict, count_classes, dumps,
                     encode_field, loads, quote, to_float)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = _db.BUSY_TIMEOUT_S

STATUSES = ("queued", "running", "finished", "failed", "cancelled", "interrupted", "pruned")
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("finished", "failed", "cancelled", "interrupted", "pruned")
METRIC_COLUMNS = ["run_id", "step", "epoch", "name", "value", "time"]


class Tracker:
    """Experiments database of one home. Safe to share between threads (each thread gets its own connection)."""

    def __init__(self, home=None, db: str | os.PathLike | None = None) -> None:
        self.home: Path = _home.resolve_home(home)
        self.db_url: str = _db.resolve_url(db, self.home)
        self.dialect: str = _db.dialect(self.db_url)
        # where the database is, for messages: the SQLite file, or the server URL without its password
        self.db_path = _db.sqlite_path(self.db_url) if self.dialect == "sqlite" else _db.mask(self.db_url)
        self.artifacts: Path = _home.artifacts_root(self.home)
        self.errors = _db.db_errors()
        self._local = threading.local()
        self._ensure_schema()
        # Any process that opens the tracker (CLI, dashboard, engines) marks runs whose process died — a CLI run
        # killed with -9 does not stay 'running' for ever. This process's own runs are the job manager's call.
        self.interrupted_at_open: list[int] = []
        try:
            self.interrupted_at_open = self.mark_interrupted(other_processes_only=True)
        except self.errors as exc:  # a busy or read-only database must not stop a reader
            log.warning("could not mark interrupted runs in %s: %s", self.db_path, exc)

    def __repr__(self) -> str:
        return f"Tracker({str(self.home)!r})" if self.db_url == _db.resolve_url(None, self.home) and \
            self.dialect == "sqlite" else f"Tracker({str(self.home)!r}, db={_db.mask(self.db_url)!r})"

    # ------------------------------------------------------------------ connections
    @property
    def conn(self) -> _db.Connection:
        """This thread's connection (opened on first use; a forked child process opens its own)."""
        loc = self._local
        conn = getattr(loc, "conn", None)
        if conn is None or getattr(loc, "pid", None) != os.getpid():
            conn = _db.Connection(self.db_url)
            loc.conn = conn
            loc.pid = os.getpid()
        return conn

    @property
    def db(self):
        """The embedded database as a ``sqlite_utils.Database`` (this thread's connection), for ad-hoc use."""
        conn = self.conn
        if conn.sqlite_utils is None:
            raise DactLabError(f"tracker.db is the embedded SQLite database; {self.db_path} is a {self.dialect} "
                               "database: use tracker.query(sql, params) instead.")
        return conn.sqlite_utils

    def close(self) -> None:
        """Close this thread's connection (other threads' connections close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[_db.Connection]:
        """One write transaction on this thread's connection (the write lock up front; nested calls: savepoints)."""
        with self.conn.transaction() as conn:
            yield conn

    def query(self, sql: str, params: Iterable | dict = ()) -> list[dict]:
        """Rows of one statement as dicts (``?`` placeholders on every database)."""
        return self.conn.query(sql, params)

    # ------------------------------------------------------------------ schema
    def _missing_schema(self) -> tuple[dict[str, list[str]], list[str]]:
        conn = self.conn
        missing_cols: dict[str, list[str]] = {}
        for table, cols in self._schema().items():
            have = conn.table_columns(table)
            if not have:
                missing_cols[table] = list(cols)  # the whole table
            else:
                lacking = [c for c in cols if c not in have]
                if lacking:
                    missing_cols[table] = lacking
        have_idx = conn.index_names()
        missing_idx = [i for i in INDEXES if i not in have_idx]
        return missing_cols, missing_idx

    def _schema(self) -> dict[str, dict[str, str]]:
        """SCHEMA in this database's column types (PostgreSQL: ``metrics`` also gets its insertion-order column)."""
        out = {t: {c: _db.column_type(d, self.dialect) for c, d in cols.items()} for t, cols in SCHEMA.items()}
        if self.dialect != "sqlite":
            out["metrics"][self.conn.order_column] = "BIGSERIAL"
        return out

    def _ensure_schema(self) -> None:
        """The migration step: create what is missing — tables, columns an older version lacked, indexes — on any
        database (run by every Tracker(); idempotent)."""
        missing_cols, missing_idx = self._missing_schema()
        if not missing_cols and not missing_idx:
            return
        with self._write() as conn:
            for table, cols in self._schema().items():
                have = conn.table_columns(table)
                if not have:
                    body = ", ".join(f"{quote(c)} {decl}" for c, decl in cols.items())
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {quote(table)} ({body})")
                    continue
                for col, decl in cols.items():
                    if col not in have:  # forward compatibility: add the column without its constraints
                        conn.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(col)} {decl.split()[0]}")
            for idx, (table, idx_cols) in INDEXES.items():
                conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {quote(idx)} ON {quote(table)} "
                    f"({', '.join(quote(c) for c in idx_cols)})"
                )

    def journal_mode(self) -> str:
        """SQLite's journal mode (``wal``); ``"server"`` on a server database."""
        if self.dialect != "sqlite":
            return "server"
        return str(self.conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    # ------------------------------------------------------------------ datasets
    def add_dataset(self, ds, name: str | None = None) -> int:
        """Store a dataset (its canonical CSV bytes + metadata) and return its id.

        Deduplicated on ``content_hash``, which the tracker defines as the sha256 of the canonical CSV bytes it
        stores (``ds.to_csv_bytes()``): equal content -> the existing id is returned and nothing is updated.
        (Not ``ds.content_hash``, the hash of the *uploaded file*: a ``max_rows`` sample or a split carries its
        source file's hash, and a file with extra columns or CRLF line ends stores the same canonical rows.)
        A dataset read back with :meth:`load_dataset` has ``content_hash`` equal to the stored one."""
        import hashlib

        csv_bytes = bytes(ds.to_csv_bytes())
        content_hash = hashlib.sha256(csv_bytes).hexdigest()
        existing = self.query("SELECT id FROM datasets WHERE content_hash = ?", (content_hash,))
        if existing:
            return int(existing[0]["id"])
        tasks = getattr(ds, "tasks", None)
        if callable(tasks):
            tasks = tasks()
        if tasks is None:
            tasks = list(getattr(ds, "targets", {}) or {})
        label_maps = {str(k): [str(x) for x in v] for k, v in (getattr(ds, "label_maps", {}) or {}).items()}
        columns = getattr(ds, "columns", None)
        row = {
            "name": name or getattr(ds, "name", None) or f"dataset-{content_hash[:8]}",
            "content_hash": content_hash,
            "rows": int(len(ds)),
            "columns": dumps(columns if isinstance(columns, dict) else list(columns or [])),
            "tasks": dumps(list(tasks)),
            "label_maps": dumps(label_maps),
            "class_counts": dumps(count_classes(getattr(ds, "targets", {}) or {}, label_maps)),
            "created": _time.time(),
            "csv": self.conn.binary(csv_bytes),
        }
        cols = list(row)
        with self._write() as conn:
            found = conn.execute("SELECT id FROM datasets WHERE content_hash = ?", (content_hash,)).fetchone()
            if found:  # added by another writer meanwhile
                return int(found[0])
            cur = conn.execute(
                f"INSERT INTO datasets ({', '.join(quote(c) for c in cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                "RETURNING id",
                [row[c] for c in cols],
            )
            return int(cur.fetchone()[0])

    @staticmethod
    def _decode_dataset(row: dict) -> dict:
        for c in DATASET_JSON:
            if c in row:
                row[c] = loads(row[c], [] if c == "tasks" else {})
        return row

    def list_datasets(self) -> list[dict]:
        """All datasets, newest first, without the CSV blob."""
        cols = ", ".join(quote(c) for c in DATASET_COLS)
        return [self._decode_dataset(r) for r in self.query(f"SELECT {cols} FROM datasets ORDER BY id DESC")]

    def get_dataset(self, dataset_id: int) -> dict:
        cols = ", ".join(quote(c) for c in DATASET_COLS)
        rows = self.query(f"SELECT {cols} FROM datasets WHERE id = ?", (int(dataset_id),))
        if not rows:
            raise DactLabError(
                f"dataset {dataset_id} is not in {self.db_path}; list the stored ones with list_datasets()."
            )
        return self._decode_dataset(rows[0])

    def get_dataset_csv(self, dataset_id: int) -> bytes:
        """The stored canonical CSV bytes of a dataset."""
        rows = self.query("SELECT csv FROM datasets WHERE id = ?", (int(dataset_id),))
        if not rows:
            raise DactLabError(
                f"dataset {dataset_id} is not in {self.db_path}; list the stored ones with list_datasets()."
            )
        return bytes(rows[0]["csv"] or b"")

    def load_dataset(self, dataset_id: int):
        """The stored dataset as a ``data.TextDataset`` (parsed back from its stored CSV copy)."""
        meta = self.get_dataset(dataset_id)
        blob = self.get_dataset_csv(dataset_id)
        from ..data import read_csv

        return read_csv(blob, name=meta["name"])

    def delete_dataset(self, dataset_id: int) -> None:
        """Delete a stored dataset. Refused while a queued or running run uses it. Finished runs keep their
        ``dataset_id`` (ids are never reused), :meth:`get_dataset` then reports it as missing."""
        dataset_id = int(dataset_id)
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)).fetchone():
                raise DactLabError(
                    f"dataset {dataset_id} is not in {self.db_path}; list the stored ones with list_datasets()."
                )
            busy = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM runs WHERE dataset_id = ? AND status IN ('queued', 'running') ORDER BY id",
                    (dataset_id,),
                ).fetchall()
            ]
            if busy:
                raise DactLabError(
                    f"dataset {dataset_id} is used by active run(s) {busy}; wait for them to finish or cancel "
                    "them before deleting the dataset."
                )
            conn.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))

    # ------------------------------------------------------------------ runs
    def create_run(
        self,
        kind: str,
        config: dict | None = None,
        *,
        name: str | None = None,
        tag: str | list[str] | None = None,
        parent_id: int | None = None,
        dataset_id: int | None = None,
        status: str = "running",
    ) -> int:
        """A new run row; records this process's pid and host; ``started`` = now when created 'running' (and the
        process's environment in its summary, see :meth:`_with_environment`). ``tag``: one tag or a list
        (``tags.tag_list``), stored joined (``tags.tag_text``)."""
        self._check_status(status)
        now = _time.time()
        row = {
            "kind": str(kind),
            "name": name,
            "tag": tag_text(tag),
            "status": status,
            "config": None if config is None else dumps(config_to_dict(config)),
            "dataset_id": None if dataset_id is None else int(dataset_id),
            "parent_id": None if parent_id is None else int(parent_id),
            "created": now,
            "started": now if status == "running" else None,
            "ended": now if status in TERMINAL_STATUSES else None,
            "pid": os.getpid(),
            "host": hostname(),
        }
        cols = list(row)
        with self._write() as conn:
            cur = conn.execute(
                f"INSERT INTO runs ({', '.join(quote(c) for c in cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                "RETURNING id",
                [row[c] for c in cols],
            )
            run_id = int(cur.fetchone()[0])
            conn.execute("UPDATE runs SET run_dir = ? WHERE id = ?", (f"runs/{run_id}", run_id))
            if status == "running":
                self._update(conn, run_id, {"status": status})  # its environment (_with_environment)
        return run_id

    def open_run(self, kind: str, config: dict | None, run_id: int | None = None, *, name: str | None = None,
                 tag: str | list[str] | None = None, dataset_id: int | None = None) -> int:
        """An engine's parent run, 'running': a new row, or — with ``run_id`` (a row a job manager queued) — that
        row, given this config, name, tag and dataset. Returns its id."""
        if run_id is None:
            return self.create_run(kind, config, name=name, tag=tag, dataset_id=dataset_id, status="running")
        fields = {k: v for k, v in (("config", config), ("name", name), ("tag", tag), ("dataset_id", dataset_id))
                  if v is not None}
        self.update_run(int(run_id), **fields)
        self.set_status(int(run_id), "running")
        return int(run_id)

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise DactLabError(f"run status {status!r} is invalid: expected one of {', '.join(STATUSES)}.")

    def _update(self, conn: _db.Connection, run_id: int, fields: dict) -> None:
        allowed = set(SCHEMA["runs"]) - {"id"}
        bad = [k for k in fields if k not in allowed]
        if bad:
            raise DactLabError(f"unknown run field(s) {bad}; allowed: {', '.join(sorted(allowed))}.")
        if "status" in fields:
            self._check_status(fields["status"])
        if "config" in fields and fields["config"] is not None:
            fields = dict(fields, config=config_to_dict(fields["config"]))
        if fields.get("run_dir"):
            fields = dict(fields, run_dir=self.rel_path(fields["run_dir"]))
        if "tag" in fields:
            fields = dict(fields, tag=tag_text(fields["tag"]))
        fields = self._with_environment(conn, run_id, fields)
        if not fields:
            if not conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise self._missing_run(run_id)
            return
        sets = ", ".join(f"{quote(k)} = ?" for k in fields)
        cur = conn.execute(
            f"UPDATE runs SET {sets} WHERE id = ?", [encode_field(v) for v in fields.values()] + [run_id]
        )
        if cur.rowcount == 0:
            raise self._missing_run(run_id)

    @staticmethod
    def _with_environment(conn: _db.Connection, run_id: int, fields: dict) -> dict:
        """The one place a run's environment enters its summary: when a run becomes 'running' (started, adopted
        by a job's process, resumed), ``summary["environment"]`` = :func:`dact_lib.sysinfo.environment` of the
        process that runs it (package versions, git commit, command line); a different earlier one (a run resumed
        by another command) is kept in ``summary["earlier_environments"]`` (the last 10). A summary written whole
        (an engine's parent run rewrites its summary) keeps the stored environment."""
        starting = fields.get("status") == "running"
        replacing = isinstance(fields.get("summary"), dict) and "environment" not in fields["summary"]
        if not (starting or replacing):
            return fields
        row = conn.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()
        stored = loads(row[0], {}) if row is not None else {}
        stored = stored if isinstance(stored, dict) else {}
        summary = dict(fields["summary"]) if isinstance(fields.get("summary"), dict) else dict(stored)
        for key in ("environment", "earlier_environments"):
            if key in stored:
                summary.setdefault(key, stored[key])
        if starting:
            env, old = environment(), summary.get("environment")
            if old is not None and old != env:
                summary["earlier_environments"] = [*(summary.get("earlier_environments") or [])[-9:], old]
            summary["environment"] = env
        if summary == stored and "summary" not in fields:
            return fields
        return {**fields, "summary": summary}

    def _missing_run(self, run_id) -> DactLabError:
        return DactLabError(f"run {run_id} is not in {self.db_path}; list the existing ones with list_runs().")

    def update_run(self, run_id: int, **fields) -> None:
        """Set columns of a run; dict/list values are stored as JSON."""
        with self._write() as conn:
            self._update(conn, int(run_id), fields)

    def set_status(self, run_id: int, status: str, error: str | None = None, **fields) -> None:
        """Change a run's status: 'running' sets ``started`` (when not yet set); a terminal status
        (finished/failed/cancelled/interrupted/pruned) sets ``ended``. ``error`` is stored when given.
        Extra ``fields`` are written in the same transaction."""
        self._check_status(status)
        run_id = int(run_id)
        now = _time.time()
        with self._write() as conn:
            row = conn.execute("SELECT started FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._missing_run(run_id)
            upd: dict[str, Any] = {"status": status}
            if status == "running":
                if row[0] is None:
                    upd["started"] = now
                upd["ended"] = None
            elif status in TERMINAL_STATUSES:
                upd["ended"] = now
            if error is not None:
                upd["error"] = str(error)
            upd.update(fields)
            self._update(conn, run_id, upd)

    def end_run(self, run_id: int, status: str, error: str | None, summary_update: dict) -> None:
        """A run's end in one transaction: ``summary_update`` merged into its summary, then :meth:`set_status`."""
        with self._write() as conn:
            row = conn.execute("SELECT summary FROM runs WHERE id = ?", (int(run_id),)).fetchone()
            if row is None:
                raise self._missing_run(run_id)
            summary = loads(row[0], {}) or {}
            if not isinstance(summary, dict):
                summary = {"previous": summary}
            summary.update(summary_update)
            self.set_status(run_id, status, error, summary=summary)

    def _decode_run(self, row: dict) -> dict:
        for c in RUN_JSON:
            if c in row:
                row[c] = loads(row[c], {})
        if row.get("run_dir"):
            row["run_dir"] = str(self.abs_path(row["run_dir"], row.get("id")))
        if "tag" in row:
            row["tags"] = tag_list(row["tag"])  # the column: "a, b" (one tag: as older runs stored it)
        return row

    # ------------------------------------------------------------------ paths (stored relative to the home)
    def rel_path(self, path: Any) -> str:
        """How a path is stored: relative to the home when inside it (``runs/5``), so a moved or copied home
        serves its own models; absolute otherwise."""
        p = Path(str(path))
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.resolve().relative_to(self.artifacts).as_posix()
        except ValueError:
            return str(p)

    def abs_path(self, stored: Any, run_id: Any = None) -> Path:
        """A stored path as an absolute one. Relative ones are under this home; an absolute ``…/runs/<id>[/…]``
        written by an older version in another (moved) home maps to this home's ``runs/<id>``."""
        p = Path(str(stored))
        if not p.is_absolute():
            return self.artifacts / p
        if p.exists() or "runs" not in p.parts:
            return p
        i = len(p.parts) - 1 - p.parts[::-1].index("runs")
        return self.artifacts.joinpath(*p.parts[i:]) if i < len(p.parts) - 1 else p

    def get_run(self, run_id: int) -> dict:
        rows = self.query("SELECT * FROM runs WHERE id = ?", (int(run_id),))
        if not rows:
            raise self._missing_run(run_id)
        return self._decode_run(rows[0])

    def list_runs(
        self,
        *,
        kind: str | list[str] | None = None,
        status: str | list[str] | None = None,
        parent_id: int | None = None,
        tag: str | list[str] | None = None,
        limit: int | None = None,
        top_level: bool = False,
    ) -> list[dict]:
        """Runs, newest first. ``kind``/``status`` take one value or a list; ``top_level=True`` keeps only runs
        without a parent; ``tag`` (one tag, a list, or "a, b") keeps the runs that have every tag given (a run's
        ``tags``, exact match)."""
        where: list[str] = []
        params: list[str | int] = []
        for col, val in (("kind", kind), ("status", status)):
            if val is None:
                continue
            vals = [val] if isinstance(val, str) else list(val)
            where.append(f"{quote(col)} IN ({', '.join('?' for _ in vals)})")
            params += vals
        if parent_id is not None:
            where.append("parent_id = ?")
            params.append(int(parent_id))
        if top_level:
            where.append("parent_id IS NULL")
        wanted = tag_list(tag)
        for t in wanted:  # narrowed in SQL (LIKE ignores case in SQLite), decided exactly below
            where.append("tag LIKE ? ESCAPE '!'")
            params.append("%" + t.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%")
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None and not wanted:
            sql += " LIMIT ?"
            params.append(int(limit))
        runs = [self._decode_run(r) for r in self.query(sql, params)]
        if wanted:
            runs = [r for r in runs if set(wanted) <= set(r["tags"])][:limit]
        return runs

    def organise(self, run_id: int, *, name: Any = None, tag: Any = None, note: Any = None) -> None:
        """Rename, tag and annotate a run (``""`` clears a field; None leaves it). The note is kept in the run's
        summary (``note``). Bad types or over-long text are a DactLabError saying so."""
        run_id = int(run_id)
        fields: dict[str, Any] = {}
        for label, value, limit in (("name", name, 200), ("tag", tag, 200), ("note", note, 5000)):
            if value is None:
                continue
            if not isinstance(value, str):
                raise DactLabError(f"{label} = {value!r} is invalid: expected text.")
            if len(value) > limit:
                raise DactLabError(f"the {label} is {len(value)} characters long: keep it under {limit}.")
            if label != "note":
                fields[label] = value.strip() or None
        with self._write() as conn:
            if note is not None:
                row = conn.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    raise self._missing_run(run_id)
                summary = loads(row[0], {}) or {}
                if note.strip():
                    summary["note"] = note.strip()
                else:
                    summary.pop("note", None)
                fields["summary"] = summary
            self._update(conn, run_id, fields)

    def run_dir(self, run_id: int) -> Path:
        """``<home>/runs/<id>/`` (created)."""
        return _home.run_dir(str(int(run_id)), self.home)

    def delete_run(self, run_id: int, *, force: bool = False) -> None:
        """Delete a run, its child runs (study trials, PBT members — recursively), their metrics, events and
        artifact rows, and their run directories. An active (queued/running) run is refused unless ``force``."""
        run_id = int(run_id)
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise self._missing_run(run_id)
            ids = [
                r[0]
                for r in conn.execute(
                    "WITH RECURSIVE tree(id) AS (SELECT CAST(? AS BIGINT) UNION SELECT runs.id FROM runs JOIN tree "
                    "ON runs.parent_id = tree.id) SELECT id FROM tree",
                    (run_id,),
                ).fetchall()
            ]
            marks = ", ".join("?" for _ in ids)
            active = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM runs WHERE id IN ({marks}) AND status IN ('queued', 'running') ORDER BY id",
                    ids,
                ).fetchall()
            ]
            if active and not force:
                raise DactLabError(
                    f"run(s) {active} still queued/running; cancel them first (or call mark_interrupted() if "
                    "their process died), or pass force=True to delete anyway."
                )
            for table in ("metrics", "events", "artifacts"):
                conn.execute(f"DELETE FROM {table} WHERE run_id IN ({marks})", ids)
            conn.execute(f"DELETE FROM runs WHERE id IN ({marks})", ids)
        runs_root = self.artifacts / "runs"
        for i in ids:
            shutil.rmtree(runs_root / str(i), ignore_errors=True)

    def mark_interrupted(self, *, grace_s: float = 0.0, other_processes_only: bool = False) -> list[int]:
        """Mark 'running'/'queued' runs of this host whose process is gone as 'interrupted'.

        A run is dead when its pid is not alive (or a zombie), or when its pid is *this* process but its id is not
        in :func:`liveness.live_ids` (the job manager of this process does not run it). ``grace_s`` spares this
        process's runs created less than that many seconds ago (the window between ``create_run`` and
        registering the id with ``liveness.mark_live``); ``other_processes_only`` leaves this process's runs alone (what
        every Tracker() does when it opens the database). Returns the ids marked."""
        host, me, now = hostname(), os.getpid(), _time.time()
        live = liveness.live_ids()
        rows = self.query(
            "SELECT id, pid, status, created FROM runs WHERE status IN ('queued', 'running') AND host = ? "
            "AND pid IS NOT NULL ORDER BY id",
            (host,),
        )
        dead: list[tuple[int, str]] = []
        for r in rows:
            pid = int(r["pid"])
            if pid == me:
                if other_processes_only or r["id"] in live or now - (r["created"] or 0) < grace_s:
                    continue
                dead.append((r["id"], f"this process ({pid}) no longer runs it (the job was lost)"))
            elif not pid_alive(pid):
                dead.append((r["id"], f"its process {pid} on {host} is gone"))
        marked: list[int] = []
        if not dead:
            return marked
        with self._write() as conn:
            for run_id, why in dead:
                cur = conn.execute(
                    "UPDATE runs SET status = 'interrupted', ended = ?, error = COALESCE(error, ?) "
                    "WHERE id = ? AND status IN ('queued', 'running')",
                    (now, f"interrupted: {why} while the run was active", run_id),
                )
                if cur.rowcount:
                    marked.append(run_id)
        return marked

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def _metric_tuples(run_id, metrics: dict, step, epoch, t) -> list[tuple]:
        out = []
        for name, value in metrics.items():
            v = to_float(value)
            if v is not None:
                out.append((int(run_id), int(step), None if epoch is None else int(epoch), str(name), v, t))
        return out

    def delete_metrics_after(self, run_id: int, step: int) -> int:
        """Drop a run's metric rows logged after ``step`` (a resumed run logs them again). Returns how many."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", (int(run_id), int(step)))
            return int(cur.rowcount or 0)

    def insert_metric_rows(self, tuples: list[tuple]) -> None:
        if not tuples:
            return
        with self._write() as conn:
            conn.executemany(
                'INSERT INTO metrics ("run_id", "step", "epoch", "name", "value", "time") VALUES (?, ?, ?, ?, ?, ?)',
                tuples,
            )

    def log_metrics(
        self,
        run_id: int,
        metrics: dict[str, float],
        *,
        step: int,
        epoch: int | None = None,
        time: float | None = None,
    ) -> None:
        """One row per metric name at ``step``. Non-numeric values are skipped; NaN is stored as NULL."""
        t = _time.time() if time is None else float(time)
        self.insert_metric_rows(self._metric_tuples(run_id, metrics, step, epoch, t))

    def log_metrics_many(self, rows: list[dict]) -> None:
        """Insert many metric rows (dicts with run_id, step, epoch, name, value, time) in one transaction."""
        now = _time.time()
        tuples = []
        for r in rows:
            v = to_float(r.get("value"))
            if v is None:
                continue
            epoch = r.get("epoch")
            t = r.get("time")
            tuples.append(
                (
                    int(r["run_id"]),
                    int(r.get("step") or 0),
                    None if epoch is None else int(epoch),
                    str(r["name"]),
                    v,
                    now if t is None else float(t),
                )
            )
        self.insert_metric_rows(tuples)

    def get_metrics(
        self,
        run_id: int | list[int],
        names: list[str] | None = None,
        since_step: int | None = None,
    ):
        """Metrics in long format (columns run_id, step, epoch, name, value, time), ordered by run, step, insertion.
        ``since_step`` keeps rows with ``step > since_step`` (pass the last step you already have)."""
        import pandas as pd

        if isinstance(run_id, (int, str)) or not isinstance(run_id, Iterable):
            ids = [int(run_id)]
        else:
            ids = [int(i) for i in run_id]
        if isinstance(names, str):
            names = [names]
        where = [f"run_id IN ({', '.join('?' for _ in ids)})"] if ids else ["1 = 0"]
        params: list[Any] = list(ids)
        if names is not None:
            where.append(f"name IN ({', '.join('?' for _ in names)})" if names else "1 = 0")
            params += list(names)
        if since_step is not None:
            where.append("step > ?")
            params.append(int(since_step))
        cur = self.conn.execute(
            'SELECT "run_id", "step", "epoch", "name", "value", "time" FROM metrics WHERE '
            + " AND ".join(where)
            + f" ORDER BY run_id, step, {self.conn.order_column}",
            params,
        )
        data = cur.fetchall()
        df = pd.DataFrame.from_records(data, columns=METRIC_COLUMNS)
        return df.astype(
            {"run_id": "int64", "step": "int64", "epoch": "Int64", "value": "float64", "time": "float64"}
        )

    def metrics_csv(self, run_ids: list[int]) -> bytes:
        """The metrics of runs as CSV for download: run_id, step, epoch (1-based, as the ``epoch`` metric and the
        progress bar count it), name, value, time."""
        df = self.get_metrics(list(run_ids))
        if len(df):
            df["epoch"] = df["epoch"] + 1
        return df.to_csv(index=False).encode("utf-8")

    def metric_names(self, run_ids: list[int]) -> list[str]:
        """The distinct metric names logged by any of ``run_ids``, sorted."""
        ids = [int(i) for i in run_ids]
        if not ids:
            return []
        rows = self.conn.execute(
            f"SELECT DISTINCT name FROM metrics WHERE run_id IN ({', '.join('?' for _ in ids)})", ids).fetchall()
        return sorted(n for (n,) in rows)

    def last_steps(self, run_ids: list[int]) -> dict[int, int]:
        """{run id: highest step with a metric} for those of ``run_ids`` that logged any."""
        ids = [int(i) for i in run_ids]
        if not ids:
            return {}
        rows = self.conn.execute(
            f"SELECT run_id, MAX(step) FROM metrics WHERE run_id IN ({', '.join('?' for _ in ids)}) GROUP BY run_id",
            ids).fetchall()
        return {int(r): int(st) for r, st in rows}

    def latest_metrics(self, run_id: int) -> dict[str, float]:
        """The last logged value (highest step, then latest insert) of each metric name of a run."""
        rows = self.conn.execute(
            "SELECT name, value FROM (SELECT name, value, ROW_NUMBER() OVER (PARTITION BY name "
            f"ORDER BY step DESC, {self.conn.order_column} DESC) AS rn FROM metrics WHERE run_id = ?) AS latest "
            "WHERE rn = 1 ORDER BY name",
            (int(run_id),),
        ).fetchall()
        return {n: (math.nan if v is None else float(v)) for n, v in rows}

    # ------------------------------------------------------------------ events / artifacts
    def log_event(self, run_id: int, kind: str, payload: dict | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                'INSERT INTO events ("run_id", "time", "kind", "payload") VALUES (?, ?, ?, ?)',
                (int(run_id), _time.time(), str(kind), dumps(payload if payload is not None else {})),
            )

    def get_events(self, run_id: int, kinds: list[str] | None = None) -> list[dict]:
        """A run's events in the order logged, payload decoded."""
        if isinstance(kinds, str):
            kinds = [kinds]
        sql = "SELECT * FROM events WHERE run_id = ?"
        params: list[str | int] = [int(run_id)]
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' for _ in kinds)})" if kinds else " AND 1 = 0"
            params += list(kinds)
        rows = self.query(sql + " ORDER BY id", params)
        for r in rows:
            r["payload"] = loads(r["payload"], {})
        return rows

    def add_artifact(self, run_id: int, path, kind: str) -> None:
        with self._write() as conn:
            conn.execute(
                'INSERT INTO artifacts ("run_id", "path", "kind", "created") VALUES (?, ?, ?, ?)',
                (int(run_id), self.rel_path(path), str(kind), _time.time()),
            )

    def get_artifacts(self, run_id: int) -> list[dict]:
        rows = self.query("SELECT * FROM artifacts WHERE run_id = ? ORDER BY id", (int(run_id),))
        for r in rows:
            r["path"] = str(self.abs_path(r["path"], run_id))
        return rows


# --------------------------------------------------------------------------------------------- callback


# --- what a run table shows of a run's scores ----------------------------------------------------------------------
SCORE_KEYS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")


def run_scores(run: dict) -> dict[str, float | None]:
    """The scores a run table shows, from the run's summary (best checkpoint, then test): ``val_accuracy``,
    ``val_macro_f1``, ``test_accuracy``, ``test_macro_f1`` and, for a multi-task run, the same per task
    (``val_accuracy/<task>`` …). A multi-task run's plain keys are the mean over its tasks: they are returned as
    ``<key> (mean of tasks)``, so no table shows a mean under a single task's name."""
    s = run.get("summary")
    if not isinstance(s, dict):  # none yet, or a summary that is not a JSON object
        s = {}
    parts: list[dict[str, Any]] = [d for d in (s.get("best"), s.get("test")) if isinstance(d, dict)]
    multi = run.get("kind") == "multitask"
    out: dict[str, float | None] = {}
    for key in SCORE_KEYS:
        value = next((d[key] for d in parts if d.get(key) is not None), None)
        out[f"{key} (mean of tasks)" if multi else key] = value
    per_task = sorted({k for d in parts for k in d if "/" in k and k.split("/", 1)[0] in SCORE_KEYS},
                      key=lambda k: (k.split("/", 1)[1], SCORE_KEYS.index(k.split("/", 1)[0])))
    for k in per_task:
        out[k] = next((d[k] for d in parts if d.get(k) is not None), None)
    return out


#: the settings a run table shows as columns (and a search can match as ``key=value``): from the run's config
PARAM_KEYS = (("encoder", ("encoder",)), ("epochs", ("train", "epochs")), ("batch_size", ("train", "batch_size")),
              ("encoder_lr", ("train", "encoder_lr")), ("head_lr", ("train", "head_lr")),
              ("seed", ("train", "seed")), ("ponder_lambda", ("model", "ponder_lambda")))


def run_params(run: dict) -> dict[str, object]:
    """The main settings of a run from its config (missing ones are None): encoder, epochs, batch size, learning
    rates, seed and, for DACT, the ponder λ; an engine parent's run config sits under ``config["run"]``."""
    cfg = run.get("config") or {}
    if isinstance(cfg, dict) and isinstance(cfg.get("run"), dict):
        cfg = cfg["run"]
    out: dict[str, object] = {}
    for name, path in PARAM_KEYS:
        v = cfg
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        out[name] = v
    return out
