"""Soak test of the tracker under load: trainings and dashboard-style pollers on ONE home for ``--minutes``.

* ``--trainers`` (4) training **processes**, each a tiny-encoder backbone run (``default_config("backbone",
  encoder="tiny")``, bundled demo data, ``data.max_rows`` 400, ``max_seq_len`` 32, up to 1000 epochs, early
  stopping off, ``train.time_limit_min`` = the time left in the soak, 1 torch thread). A training that ends before
  the soak does is replaced by a new process. Every child wraps its tracker's ``_insert_metrics`` (the one path
  every metric row takes: ``TrackerCallback.flush``, ``log_metrics``, ``log_metrics_many``) and counts the rows it
  handed over and that committed, per run and per (step, name); it also counts every ``sqlite3.Error`` leaving a
  write transaction, every warning the library logs (``TrackerCallback`` logs and swallows database failures) and
  any exception out of ``train()``.
* ``--pollers`` (3) **threads** of this process, sharing one ``Tracker`` like the dashboard's server process
  (``st.cache_resource``), each doing once a second what the Runs page's live fragment does: ``list_runs()``, then
  for the running runs (at most 5, the page's default selection) ``get_run``, ``get_metrics(ids)`` (all rows),
  ``get_metrics(id, since_step=…)`` (the page's top-up), ``metric_names``, ``last_steps``, ``latest_metrics`` and
  ``get_events``. Every call is timed; every exception is counted and logged.

After the soak: metric rows in the database (``SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id``) against the
rows the trainers saw commit (lost / extra), duplicated ``(run_id, step, name)`` keys (and how many of those the
trainer itself logged twice), ``PRAGMA integrity_check``, run statuses. Prints a markdown table (with the exact
command and the date) for docs/benchmarks.md and writes a JSON of everything (``--json``, default
``bench/out/soak.json``).

    PYTHONPATH=. .venv/bin/python bench/soak.py                 # 10 minutes, 4 trainers + 3 pollers
    PYTHONPATH=. .venv/bin/python bench/soak.py --minutes 2     # a short check
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, ROOT, cpu_model, loadavg, markdown_table  # noqa: E402

MAX_LOGGED_ERRORS = 200
RESTART_MIN_LEFT_S = 20.0  # do not start a replacement training with less soak time than this left
POLL_CALLS = ("list_runs", "get_run", "get_metrics(ids)", "get_metrics(since_step)", "metric_names",
              "last_steps", "latest_metrics", "get_events", "refresh (whole cycle)")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _is_lock_error(exc_type: str, message: str) -> bool:
    m = message.lower()
    return "locked" in m or "busy" in m


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank-with-interpolation percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "n/a"


# ============================================================================================== child (a trainer)


def child_main(args) -> int:
    """One training process: train until the soak's deadline, write what it counted to ``args.child_out``."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    from dact_lib.config import default_config
    from dact_lib.tracker import Tracker
    from dact_lib.train import train

    report: dict[str, Any] = {
        "slot": args.slot, "generation": args.generation, "pid": os.getpid(), "started": time.time(),
        "run_ids": [], "status": None, "train_error": None, "errors": [], "warnings": [],
        "insert_calls_ok": 0, "insert_calls_failed": 0, "insert_ms": [], "write_errors": 0, "lock_errors": 0,
        "per_run": {},
    }
    committed: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    attempted: dict[int, set] = collections.defaultdict(set)
    seen_exc: set[int] = set()

    def record_error(where: str, exc: BaseException) -> None:
        if id(exc) in seen_exc:  # a nested write transaction re-raises the same exception object
            return
        seen_exc.add(id(exc))
        msg = str(exc)
        if isinstance(exc, sqlite3.Error):
            report["write_errors"] += 1
        if _is_lock_error(type(exc).__name__, msg):
            report["lock_errors"] += 1
        if len(report["errors"]) < MAX_LOGGED_ERRORS:
            report["errors"].append({"time": time.time(), "where": where, "type": type(exc).__name__,
                                     "message": msg[:500]})

    class CountingTracker(Tracker):
        @contextlib.contextmanager
        def _write(self):
            try:
                with super()._write() as conn:
                    yield conn
            except sqlite3.Error as exc:
                record_error("write transaction", exc)
                raise

        def _insert_metrics(self, tuples):
            tuples = list(tuples)
            for t in tuples:
                attempted[int(t[0])].add((int(t[1]), str(t[3])))
            t0 = time.perf_counter()
            try:
                super()._insert_metrics(tuples)
            except BaseException as exc:
                report["insert_calls_failed"] += 1
                record_error("_insert_metrics", exc)
                raise
            finally:
                report["insert_ms"].append(1000.0 * (time.perf_counter() - t0))
            report["insert_calls_ok"] += 1
            for t in tuples:
                committed[int(t[0])][(int(t[1]), str(t[3]))] += 1

        def create_run(self, *a, **kw):
            rid = super().create_run(*a, **kw)
            report["run_ids"].append(rid)
            return rid

    class WarningCollector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if len(report["warnings"]) < MAX_LOGGED_ERRORS:
                report["warnings"].append({"time": record.created, "logger": record.name,
                                           "level": record.levelname, "message": msg[:500]})
            if _is_lock_error("", msg):
                report.setdefault("lock_warnings", 0)
                report["lock_warnings"] += 1

    handler = WarningCollector(level=logging.WARNING)
    logging.getLogger("dact_lib").addHandler(handler)

    def write_report() -> None:
        for rid in set(committed) | set(attempted):
            c = committed.get(rid, collections.Counter())
            report["per_run"][str(rid)] = {
                "rows_committed": int(sum(c.values())),
                "keys_committed": len(c),
                "dup_rows_by_trainer": int(sum(n - 1 for n in c.values() if n > 1)),
                "dup_keys_by_trainer": [[s, n, k] for (s, n), k in c.items() if k > 1][:50],
                "rows_never_written": len(attempted.get(rid, set()) - set(c)),
                "max_step": max((s for s, _ in c), default=None),
            }
        report["ended"] = time.time()
        out = Path(args.child_out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report), encoding="utf-8")
        os.replace(tmp, out)

    try:
        left_s = args.deadline - time.time()
        if left_s <= 1:
            report["status"] = "skipped (no time left)"
            return 0
        tr = CountingTracker(args.home)
        cfg = default_config("backbone", encoder="tiny", name=f"soak-{args.slot}.{args.generation}", tag="soak")
        cfg.data.max_rows = args.max_rows
        cfg.data.max_seq_len = args.max_seq_len
        cfg.train.epochs = 1000
        cfg.train.early_stopping.enabled = False
        cfg.train.log_every_steps = args.log_every
        cfg.train.seed = args.slot * 100 + args.generation
        cfg.train.num_threads = 1
        cfg.train.device = "cpu"
        cfg.train.time_limit_min = max(0.01, (args.deadline - time.time()) / 60.0)
        res = train(cfg, tracker=tr, home=args.home)
        report["status"] = res.status
        report["stop_reason"] = res.stop_reason
        return 0
    except BaseException as exc:  # noqa: BLE001 - counted and reported
        report["status"] = "exception"
        report["train_error"] = {"type": type(exc).__name__, "message": str(exc)[:2000],
                                 "traceback": traceback.format_exc()[-4000:]}
        record_error("train()", exc)
        return 1
    finally:
        write_report()


# ============================================================================================== pollers


class Poller(threading.Thread):
    """One dashboard session: the Runs page's live refresh, once a second."""

    def __init__(self, index: int, tracker, stop: threading.Event, interval_s: float, log_errors) -> None:
        super().__init__(name=f"poller-{index}", daemon=True)
        self.index, self.tr, self.stop_event, self.interval_s = index, tracker, stop, interval_s
        self.log_errors = log_errors
        self.lat: dict[str, list[float]] = {k: [] for k in POLL_CALLS}
        self.errors: dict[str, int] = collections.Counter()
        self.lock_errors = 0
        self.ticks = 0
        self.late_ticks = 0
        self.held_last: dict[int, int] = {}

    def timed(self, what: str, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - counted and logged
            self.errors[what] += 1
            if _is_lock_error(type(exc).__name__, str(exc)):
                self.lock_errors += 1
            self.log_errors({"time": time.time(), "where": f"{self.name} {what}", "type": type(exc).__name__,
                             "message": str(exc)[:500]})
            return None
        finally:
            self.lat[what].append(1000.0 * (time.perf_counter() - t0))

    def tick(self) -> None:
        runs = self.timed("list_runs", self.tr.list_runs) or []
        active = [r["id"] for r in runs if r.get("status") in ("queued", "running")][:5]
        for i in active:
            self.timed("get_run", self.tr.get_run, i)
        if active:
            self.timed("get_metrics(ids)", self.tr.get_metrics, active)
            for i in active:
                last = self.held_last.get(i)
                df = self.timed("get_metrics(since_step)", self.tr.get_metrics, i,
                                since_step=None if last is None else last - 1)
                if df is not None and len(df):
                    self.held_last[i] = int(df["step"].max())
            self.timed("metric_names", self.tr.metric_names, active)
            self.timed("last_steps", self.tr.last_steps, active)
            for i in active:
                self.timed("latest_metrics", self.tr.latest_metrics, i)
                self.timed("get_events", self.tr.get_events, i)

    def run(self) -> None:
        nxt = time.monotonic()
        while not self.stop_event.is_set():
            t0 = time.perf_counter()
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - a bug in the poller itself
                self.errors["tick"] += 1
                self.log_errors({"time": time.time(), "where": f"{self.name} tick", "type": type(exc).__name__,
                                 "message": str(exc)[:500]})
            dt = time.perf_counter() - t0
            self.lat["refresh (whole cycle)"].append(1000.0 * dt)
            self.ticks += 1
            if dt > self.interval_s:
                self.late_ticks += 1
            nxt += self.interval_s
            now = time.monotonic()
            if nxt < now:  # behind: the next refresh is due now, do not try to catch up
                nxt = now
            self.stop_event.wait(nxt - now)
        with contextlib.suppress(Exception):
            self.tr.close()


# ============================================================================================== parent


class Trainers:
    """Keeps ``n`` training processes alive until the deadline."""

    def __init__(self, n: int, home: Path, logs: Path, deadline: float, args) -> None:
        self.n, self.home, self.logs, self.deadline, self.args = n, home, logs, deadline, args
        self.procs: dict[int, dict] = {}  # slot -> current process record
        self.done: list[dict] = []
        self.generation = collections.Counter()

    def start(self, slot: int) -> None:
        gen = self.generation[slot]
        self.generation[slot] += 1
        out = self.logs / f"trainer{slot}.{gen}.json"
        log = self.logs / f"trainer{slot}.{gen}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", "--home", str(self.home),
               "--_deadline", repr(self.deadline), "--_slot", str(slot), "--_generation", str(gen),
               "--_child-out", str(out), "--max-rows", str(self.args.max_rows),
               "--max-seq-len", str(self.args.max_seq_len), "--log-every", str(self.args.log_every)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        fh = open(log, "wb")
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        fh.close()
        self.procs[slot] = {"slot": slot, "generation": gen, "proc": p, "out": out, "log": log,
                            "started": time.time()}

    def start_all(self) -> None:
        for s in range(self.n):
            self.start(s)

    def reap(self, restart: bool) -> None:
        for slot, rec in list(self.procs.items()):
            rc = rec["proc"].poll()
            if rc is None:
                continue
            rec["rc"], rec["ended"] = rc, time.time()
            self.done.append(rec)
            del self.procs[slot]
            if restart and self.deadline - time.time() > RESTART_MIN_LEFT_S:
                self.start(slot)

    def alive(self) -> int:
        return len(self.procs)

    def kill_rest(self) -> None:
        for rec in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                rec["proc"].send_signal(signal.SIGKILL)
            rec["killed"] = True


def db_checks(db_path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(str(db_path), timeout=60)
    try:
        per_run = {int(r): int(n) for r, n in conn.execute(
            "SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id").fetchall()}
        dups = conn.execute(
            "SELECT run_id, step, name, COUNT(*) AS c FROM metrics GROUP BY run_id, step, name HAVING c > 1 "
            "ORDER BY run_id, step, name").fetchall()
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        runs = [dict(zip(("id", "status", "name", "error", "pid"), r)) for r in conn.execute(
            "SELECT id, status, name, error, pid FROM runs ORDER BY id").fetchall()]
        events = {int(r): int(n) for r, n in conn.execute(
            "SELECT run_id, COUNT(*) FROM events GROUP BY run_id").fetchall()}
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    return {"metrics_per_run": per_run, "duplicates": [list(d) for d in dups], "integrity_check": integrity,
            "runs": runs, "events_per_run": events, "journal_mode": journal}


def parent_main(args, argv: list[str]) -> int:
    from dact_lib.tracker import Tracker

    own_home = args.home is None
    home = Path(tempfile.mkdtemp(prefix="dact_soak_")) if own_home else Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "soak_logs"
    logs.mkdir(exist_ok=True)
    command = "PYTHONPATH=. .venv/bin/python bench/soak.py" + (" " + shlex.join(argv) if argv else "")
    t_start = time.time()
    info = {"date_start": _now_iso(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "loadavg_start": loadavg(), "python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers"), "sqlite": sqlite3.sqlite_version,
            "sqlite_utils": _version("sqlite-utils"), "home": str(home), "command": command}
    print(f"soak: {args.trainers} trainers + {args.pollers} pollers on {home} for {args.minutes:g} min "
          f"(started {info['date_start']} UTC)", flush=True)

    tracker = Tracker(home)  # creates the schema before anyone else opens the file
    pre_existing = {r["id"] for r in tracker.list_runs()}
    poll_errors: list[dict] = []
    poll_error_lock = threading.Lock()
    poll_error_count = [0]

    def log_poll_error(e: dict) -> None:
        with poll_error_lock:
            poll_error_count[0] += 1
            if len(poll_errors) < MAX_LOGGED_ERRORS:
                poll_errors.append(e)
        print(f"  poller error: {e['where']}: {e['type']}: {e['message']}", file=sys.stderr, flush=True)

    deadline = t_start + 60.0 * args.minutes
    trainers = Trainers(args.trainers, home, logs, deadline, args)
    stop = threading.Event()
    pollers = [Poller(i, tracker, stop, args.interval, log_poll_error) for i in range(args.pollers)]
    trainers.start_all()
    for p in pollers:
        p.start()
    last_report = time.time()
    try:
        while time.time() < deadline:
            trainers.reap(restart=True)
            time.sleep(0.5)
            if time.time() - last_report >= 30:
                last_report = time.time()
                ticks = sum(p.ticks for p in pollers)
                print(f"  {last_report - t_start:6.0f} s: {trainers.alive()} trainers alive, "
                      f"{len(trainers.done)} ended, {ticks} poll cycles, {poll_error_count[0]} poll errors",
                      flush=True)
        # the soak is over: the trainings stop at their time limit, then evaluate, save and record their end
        grace_end = time.time() + args.grace_s
        while trainers.alive() and time.time() < grace_end:
            trainers.reap(restart=False)
            time.sleep(0.5)
        if trainers.alive():
            print(f"  {trainers.alive()} trainer(s) still alive {args.grace_s:g} s after the deadline: killed",
                  file=sys.stderr)
            trainers.kill_rest()
            time.sleep(1)
            trainers.reap(restart=False)
    finally:
        stop.set()
        for p in pollers:
            p.join(timeout=30)
        trainers.kill_rest()
    t_end = time.time()
    info["date_end"] = _now_iso()
    info["loadavg_end"] = loadavg()
    info["wall_s"] = t_end - t_start
    tracker.close()

    # ------------------------------------------------------------------ collect
    children = []
    for rec in trainers.done + list(trainers.procs.values()):
        rep = None
        if rec["out"].is_file():
            with contextlib.suppress(ValueError, OSError):
                rep = json.loads(rec["out"].read_text(encoding="utf-8"))
        tail = ""
        with contextlib.suppress(OSError):
            tail = rec["log"].read_text(encoding="utf-8", errors="replace")[-3000:]
        children.append({"slot": rec["slot"], "generation": rec["generation"], "rc": rec.get("rc"),
                         "killed": rec.get("killed", False), "report": rep, "log": str(rec["log"]),
                         "log_tail": tail if (rec.get("rc") or rep is None or (rep or {}).get("errors")) else ""})
    db = db_checks(home / "experiments.db")

    expected: dict[int, dict] = {}
    unknown_runs: list[int] = []
    for c in children:
        rep = c["report"]
        if rep is None:
            continue
        for rid in rep["run_ids"]:
            expected.setdefault(int(rid), {"rows_committed": 0, "keys_committed": 0, "dup_rows_by_trainer": 0,
                                           "rows_never_written": 0, "max_step": None})
        for rid, pr in rep["per_run"].items():
            expected[int(rid)] = pr
    soak_runs = [r for r in db["runs"] if r["id"] not in pre_existing]
    for r in soak_runs:
        if r["id"] not in expected:
            unknown_runs.append(r["id"])

    dup_by_run: dict[int, int] = collections.Counter()
    for rid, _step, _name, c in db["duplicates"]:
        dup_by_run[int(rid)] += int(c) - 1
    per_run_rows = []
    tot = collections.Counter()
    for r in soak_runs:
        rid = r["id"]
        e = expected.get(rid)
        in_db = db["metrics_per_run"].get(rid, 0)
        row = {"run": rid, "name": r["name"], "status": r["status"], "in_db": in_db,
               "dup_db": dup_by_run.get(rid, 0), "events": db["events_per_run"].get(rid, 0)}
        if e is not None:
            row.update(expected=e["rows_committed"], lost=max(0, e["rows_committed"] - in_db),
                       extra=max(0, in_db - e["rows_committed"]), dup_trainer=e["dup_rows_by_trainer"],
                       never_written=e["rows_never_written"], steps=e["max_step"])
            row["dup_unexpected"] = max(0, row["dup_db"] - row["dup_trainer"])
            for k in ("expected", "lost", "extra", "dup_trainer", "never_written", "dup_unexpected"):
                tot[k] += row[k] or 0
            tot["steps"] += row["steps"] or 0
        tot["in_db"] += in_db
        tot["dup_db"] += row["dup_db"]
        per_run_rows.append(row)

    writer = collections.Counter()
    insert_ms: list[float] = []
    writer_errors: list[dict] = []
    statuses = collections.Counter()
    for c in children:
        rep = c["report"]
        if rep is None:
            writer["no_report"] += 1
            continue
        statuses[str(rep.get("status"))] += 1
        for k in ("write_errors", "lock_errors", "insert_calls_ok", "insert_calls_failed"):
            writer[k] += int(rep.get(k) or 0)
        writer["lock_warnings"] += int(rep.get("lock_warnings") or 0)
        writer["warnings"] += len(rep.get("warnings") or [])
        writer["exceptions"] += len(rep.get("errors") or [])
        writer["train_exceptions"] += int(rep.get("train_error") is not None)
        insert_ms += rep.get("insert_ms") or []
        for e in (rep.get("errors") or []) + (rep.get("warnings") or []):
            writer_errors.append({"trainer": f"{c['slot']}.{c['generation']}", **e})
        if c["rc"] not in (0, None) or c["killed"]:
            writer["bad_exit"] += 1
    poll_lock = sum(p.lock_errors for p in pollers)
    poll_exc = sum(sum(p.errors.values()) for p in pollers)
    ticks = sum(p.ticks for p in pollers)
    late = sum(p.late_ticks for p in pollers)

    lat_rows = []
    for what in POLL_CALLS:
        xs = [x for p in pollers for x in p.lat[what]]
        lat_rows.append({"call": f"`{what}`" if "whole" not in what else what, "calls": len(xs),
                         "p50": percentile(xs, 50), "p95": percentile(xs, 95), "max": max(xs) if xs else None,
                         "errors": sum(p.errors.get(what, 0) for p in pollers)})
    lat_rows.append({"call": "trainer `_insert_metrics` (one flush, write lock wait included)",
                     "calls": len(insert_ms), "p50": percentile(insert_ms, 50), "p95": percentile(insert_ms, 95),
                     "max": max(insert_ms) if insert_ms else None, "errors": writer["insert_calls_failed"]})

    integrity = ", ".join(db["integrity_check"])
    run_status = collections.Counter(r["status"] for r in soak_runs)
    summary_rows = [
        ("soak length", f"{args.minutes:g} min of load ({info['wall_s']:.0f} s wall incl. the trainings' ends)"),
        ("trainings (processes) started", f"{len(children)} ({args.trainers} at a time; "
                                          f"{sum(1 for c in children if c['generation'] > 0)} replacements)"),
        ("run statuses at the end", ", ".join(f"{k} {v}" for k, v in sorted(run_status.items())) or "—"),
        ("training steps (sum over runs)", f"{tot['steps']}"),
        ("metric rows handed to the tracker and committed (trainers' count)", f"{tot['expected']}"),
        ("metric rows in the database", f"{tot['in_db']}"),
        ("**lost rows** (committed per trainer, missing in the db)", f"**{tot['lost']}**"),
        ("extra rows (in the db, not counted by a trainer)", f"{tot['extra']}"),
        ("**duplicated rows** (same run_id, step, name twice)",
         f"**{tot['dup_db']}** (of which logged twice by the trainer itself: {tot['dup_trainer']})"),
        ("rows a trainer could not write (insert failed, not retried successfully)", f"{tot['never_written']}"),
        ("**lock errors** (\"database is locked\"/busy exceptions): trainers / pollers",
         f"**{writer['lock_errors']} / {poll_lock}**"
         + (f" (library warnings mentioning a lock in trainers: {writer['lock_warnings']})"
            if writer["lock_warnings"] else "")),
        ("other exceptions: trainers (write transactions, train()) / pollers",
         f"{writer['exceptions'] - writer['lock_errors']} / {poll_exc - poll_lock}"),
        ("library warnings logged in trainers", f"{writer['warnings']}"),
        ("metric flushes (trainers): ok / failed", f"{writer['insert_calls_ok']} / {writer['insert_calls_failed']}"),
        ("runs without a trainer report", f"{len(unknown_runs)}" + (f" ({unknown_runs})" if unknown_runs else "")),
        ("trainer processes that exited non-zero or were killed", f"{writer['bad_exit']}"),
        ("poll cycles (3 pollers, 1 s apart) / slower than 1 s".replace("3", str(args.pollers)),
         f"{ticks} / {late}"),
        ("`PRAGMA integrity_check`", integrity),
        ("journal mode", str(db["journal_mode"])),
    ]
    la0, la1 = info["loadavg_start"], info["loadavg_end"]
    la = (f"{la0[0]:.1f} → {la1[0]:.1f}" if la0 and la1 else "n/a")
    header = (f"Command ({info['date_start']}–{info['date_end'][11:]} UTC, load average {la}; {info['cpu']}, "
              f"{info['logical_cpus']} logical CPUs, shared; Python {info['python']}, torch {info['torch']}, "
              f"SQLite {info['sqlite']}, sqlite-utils {info['sqlite_utils']}):")
    lines = ["", "## Soak: trainings + dashboard pollers on one home (`bench/soak.py`)", "", header, "",
             f"    {command}", "",
             f"{args.trainers} training processes (tiny encoder, {args.max_rows} rows, max_seq_len "
             f"{args.max_seq_len}, log every {args.log_every} steps, early stopping off, up to 1000 epochs — the "
             f"config's maximum —, time limit = the soak left; one that ends is replaced by a new process) and "
             f"{args.pollers} poller threads (the Runs page's refresh every {args.interval:g} s) on one home.", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows]
    lines += ["", "Poll latency (ms), all pollers together:", "",
              markdown_table(lat_rows, [("call", "call"), ("calls", "calls"), ("p50", "p50 ms", 1),
                                        ("p95", "p95 ms", 1), ("max", "max ms", 1), ("errors", "errors")]),
              "", "Per run:", "",
              markdown_table(per_run_rows, [("run", "run"), ("name", "name"), ("status", "status"),
                                            ("steps", "steps"), ("expected", "rows committed"),
                                            ("in_db", "rows in db"), ("lost", "lost"), ("extra", "extra"),
                                            ("dup_db", "dup"), ("never_written", "never written"),
                                            ("events", "events")])]
    problems = (tot["lost"] or tot["extra"] or tot["dup_db"] or tot["never_written"] or writer["exceptions"]
                or writer["warnings"] or poll_exc or unknown_runs or writer["bad_exit"] or writer["no_report"]
                or integrity != "ok")
    if writer_errors or poll_errors:
        lines += ["", "Errors and warnings (first 20):", ""]
        for e in (writer_errors + [{"trainer": "-", **e} for e in poll_errors])[:20]:
            where = e.get("where") or e.get("logger")
            lines.append(f"- trainer {e['trainer']} {where}: {e.get('type') or e.get('level')}: "
                         f"{e['message'][:300]}")
    text = "\n".join(lines)
    print(text, flush=True)

    result = {"info": info, "args": vars(args), "summary": dict(summary_rows), "totals": dict(tot),
              "writer": dict(writer), "poll_latency_ms": lat_rows, "per_run": per_run_rows,
              "poll_errors": poll_errors, "poll_error_count": poll_error_count[0], "writer_errors": writer_errors,
              "db": {k: v for k, v in db.items() if k != "runs"}, "runs": db["runs"],
              "children": [{k: v for k, v in c.items() if k != "report"} |
                           {"report": {k: v for k, v in (c["report"] or {}).items() if k != "insert_ms"}}
                           for c in children],
              "poll_latency_raw_ms": {w: [x for p in pollers for x in p.lat[w]] for w in POLL_CALLS}
              if args.raw else None,
              "markdown": text, "problems": bool(problems)}
    out = Path(args.json) if args.json else OUT_DIR / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"\nsaved {out}")
    if own_home and not args.keep_home and not problems:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"home kept: {home}")
    return 1 if problems else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    ap.add_argument("--trainers", type=int, default=4, help="training processes at a time (default 4)")
    ap.add_argument("--pollers", type=int, default=3, help="dashboard-style poller threads (default 3)")
    ap.add_argument("--home", default=None, help="the home to use (default: a new temp dir, deleted after a clean "
                                                  "soak)")
    ap.add_argument("--json", default=None, help="write the results here (default bench/out/soak.json)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a poller's refreshes (default 1)")
    ap.add_argument("--max-rows", type=int, default=400, help="data.max_rows of each training (default 400)")
    ap.add_argument("--max-seq-len", type=int, default=32, help="data.max_seq_len (default 32)")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every_steps (default 10, the default)")
    ap.add_argument("--grace-s", type=float, default=180.0,
                    help="how long after the soak the trainings may take to finish before they are killed")
    ap.add_argument("--keep-home", action="store_true", help="keep the temp home after a clean soak")
    ap.add_argument("--raw", action="store_true", help="also store every poll latency in the JSON")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_deadline", dest="deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--_slot", dest="slot", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_generation", dest="generation", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_child-out", dest="child_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return child_main(args)
    if args.minutes <= 0 or args.trainers < 1 or args.pollers < 0 or args.interval <= 0:
        ap.error("--minutes and --interval must be > 0, --trainers >= 1, --pollers >= 0")
    return parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
