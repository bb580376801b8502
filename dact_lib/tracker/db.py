"""Which database the tracker (and Optuna's studies) use, and the one connection type the store runs its SQL on.

The URL: an explicit ``db=`` > ``$DACT_LAB_DB`` (what ``--db URL`` sets) > ``sqlite:///<home>/experiments.db``
(the embedded default: nothing to install or start). Two dialects, one code path:

* ``sqlite`` — the home's experiments.db through sqlite-utils (``Connection.sqlite_utils``: users can still open
  the file with the ``sqlite-utils`` CLI), WAL mode, busy timeout 30 s, writes in ``BEGIN IMMEDIATE``.
* ``postgresql`` — ``postgresql://user[:password]@host[:port]/dbname`` through psycopg 3 (``pip install
  "psycopg[binary]"``), autocommit reads, writes in ``BEGIN`` … ``COMMIT``. Optuna reaches the same database
  through SQLAlchemy (``postgresql+psycopg://…``, :func:`optuna_url`).

The store writes its SQL once, with ``?`` placeholders; :class:`Connection` passes them to sqlite3 as they are and
to psycopg as ``%s``. What differs between the dialects is here and only here: column types of the schema
(:func:`column_type`), the insertion-order column of ``metrics`` (``rowid`` / ``seq``), schema introspection, and
the error classes (:func:`db_errors`).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Union
from urllib.parse import urlsplit, urlunsplit

from ..errors import DactLabError

if TYPE_CHECKING:
    import psycopg
    import sqlite_utils

#: the driver's connection: sqlite3's for the ``sqlite`` dialect, psycopg's for ``postgresql``
RawConnection = Union[sqlite3.Connection, "psycopg.Connection[Any]"]

ENV_VAR = "DACT_LAB_DB"
DB_NAME = "experiments.db"  # the home's database file (dact_lib.home.DB_NAME is this name)
DIALECTS = ("sqlite", "postgresql")
BUSY_TIMEOUT_S = 30.0


def resolve_url(db: str | os.PathLike | None, home: Path) -> str:
    """The database URL: ``db`` > ``$DACT_LAB_DB`` > the home's experiments.db. A bare file path means SQLite."""
    raw = str(db) if db not in (None, "") else os.environ.get(ENV_VAR, "")
    if not raw:
        return f"sqlite:///{Path(home) / DB_NAME}"
    if "://" not in raw:  # a path to a SQLite file
        return f"sqlite:///{Path(raw).expanduser().resolve()}"
    dialect(raw)  # refuses what it cannot serve
    return raw


def dialect(url: str) -> str:
    scheme = url.split("://", 1)[0].lower()
    base = scheme.split("+", 1)[0]
    if base == "postgres":
        base = "postgresql"
    if base not in DIALECTS:
        raise DactLabError(f"database URL {mask(url)!r} is not supported: use sqlite:///path/to/experiments.db or "
                           "postgresql://user@host[:port]/dbname (--db or $DACT_LAB_DB).")
    return base


def sqlite_path(url: str) -> Path:
    """The file of a ``sqlite:///…`` URL."""
    return Path(url.split(":///", 1)[1]) if ":///" in url else Path(url.split("://", 1)[1])


def mask(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and the UI)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def libpq_url(url: str) -> str:
    """``postgresql+psycopg://…`` / ``postgres://…`` → ``postgresql://…`` (what psycopg connects to)."""
    return re.sub(r"^[A-Za-z0-9+]+://", "postgresql://", url, count=1)


def optuna_url(url: str) -> str:
    """The SQLAlchemy URL Optuna's RDB storage opens for the same database (the psycopg 3 driver on PostgreSQL)."""
    if dialect(url) == "postgresql":
        return re.sub(r"^[A-Za-z0-9+]+://", "postgresql+psycopg://", url, count=1)
    return url


def db_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a failed database call raises (what callers that must not stop catch)."""
    errs: list[type[BaseException]] = [sqlite3.Error]
    try:
        import psycopg

        errs.append(psycopg.Error)
    except ImportError:
        pass
    return tuple(errs)


def column_type(decl: str, which: str) -> str:
    """A schema declaration (written in SQLite's terms) in ``which`` dialect's terms."""
    if which == "sqlite":
        return decl
    words = decl.split()
    if decl.startswith("INTEGER PRIMARY KEY"):
        return "BIGSERIAL PRIMARY KEY"
    base = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": "TEXT", "BLOB": "BYTEA"}[words[0]]
    return " ".join([base] + words[1:])


class Connection:
    """One thread's connection to the tracker's database, for either dialect: ``execute`` / ``executemany``
    with ``?`` placeholders, ``in_transaction``, :meth:`transaction` (outermost: the write lock up front; nested:
    a savepoint)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect = dialect(url)
        self.sqlite_utils: sqlite_utils.Database | None = None  # the sqlite dialect's
        self.raw: RawConnection
        self._savepoints = itertools.count()
        if self.dialect == "sqlite":
            import sqlite_utils

            path = sqlite_path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S)
            raw.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                raw.execute("PRAGMA journal_mode = WAL")
            raw.execute("PRAGMA synchronous = NORMAL")
            self.raw = raw
            self.sqlite_utils = sqlite_utils.Database(raw)
        else:
            try:
                import psycopg
            except ImportError as exc:
                raise DactLabError(f"{mask(url)} is a PostgreSQL database: install its driver with "
                                   "pip install \"psycopg[binary]\" (or pip install -e '.[postgres]').") from exc
            try:
                self.raw = psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=int(BUSY_TIMEOUT_S))
            except psycopg.OperationalError as exc:
                raise DactLabError(f"could not connect to {mask(url)}: {str(exc).strip()} — is the server running "
                                   "and the database created (createdb)?") from exc

    # ---------------------------------------------------------------- statements
    def _sql(self, sql: str) -> str:
        if self.dialect == "sqlite":
            return sql
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Iterable | dict = ()):
        params = tuple(params) if not isinstance(params, dict) else params
        if self.dialect == "postgresql" and not params:
            return self.raw.execute(sql)
        return self.raw.execute(self._sql(sql), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if isinstance(self.raw, sqlite3.Connection):  # the sqlite dialect
            self.raw.executemany(sql, rows)
        else:
            with self.raw.cursor() as cur:
                cur.executemany(self._sql(sql), rows)

    def query(self, sql: str, params: Iterable | dict = ()) -> list[dict]:
        cur = self.execute(sql, params)
        keys = [d[0] for d in cur.description]
        return [dict(zip(keys, r)) for r in cur.fetchall()]

    def close(self) -> None:
        self.raw.close()

    # ---------------------------------------------------------------- transactions
    @property
    def in_transaction(self) -> bool:
        if isinstance(self.raw, sqlite3.Connection):  # the sqlite dialect
            return self.raw.in_transaction
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Connection"]:
        """All-or-nothing: the outermost call takes the write lock up front (SQLite ``BEGIN IMMEDIATE``, so a
        read snapshot never has to be upgraded; PostgreSQL ``BEGIN``); nested calls are savepoints."""
        if self.in_transaction:
            name = f"sp_{next(self._savepoints)}"
            self.raw.execute(f"SAVEPOINT {name}")
            try:
                yield self
            except BaseException:
                self.raw.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self.raw.execute(f"RELEASE SAVEPOINT {name}")
                raise
            else:
                self.raw.execute(f"RELEASE SAVEPOINT {name}")
            return
        self.raw.execute("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
        try:
            yield self
        except BaseException:
            if self.in_transaction:
                self.raw.execute("ROLLBACK")
            raise
        else:
            try:
                self.raw.execute("COMMIT")
            except BaseException:
                if self.in_transaction:
                    self.raw.execute("ROLLBACK")
                raise

    # ---------------------------------------------------------------- dialect details
    @property
    def order_column(self) -> str:
        """The column that orders ``metrics`` rows by insertion (SQLite's rowid; a ``seq`` column on PostgreSQL)."""
        return "rowid" if self.dialect == "sqlite" else "seq"

    def table_columns(self, table: str) -> set[str]:
        if self.dialect == "sqlite":
            return {r[1] for r in self.raw.execute(f"PRAGMA table_info(\"{table}\")").fetchall()}
        rows = self.raw.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                "current_schema() AND table_name = %s", (table,)).fetchall()
        return {r[0] for r in rows}

    def index_names(self) -> set[str]:
        if self.dialect == "sqlite":
            return {r[0] for r in self.raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()}
        rows = self.raw.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()").fetchall()
        return {r[0] for r in rows}

    def has_table(self, table: str) -> bool:
        return bool(self.table_columns(table))

    def binary(self, data: bytes) -> Any:
        return sqlite3.Binary(data) if self.dialect == "sqlite" else bytes(data)
