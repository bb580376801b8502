"""The run list as a dashboard (or a notebook) shows it: a table in a fixed column order, search words, the run
selected by default, a run's test report, and a bounded store of the curves of runs that have ended.

The Runs page is a view over these; nothing here imports streamlit.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any, Hashable

import pandas as pd

from .engines import ENGINE_KINDS
from .front import FrontPoint
from .tracker import ACTIVE_STATUSES, run_params, run_scores
from .tracker.store import PARAM_KEYS, SCORE_KEYS

#: the table's first columns, in this order for every mix of runs (the single-task scores stay in front when a
#: multi-task run, with per-task columns of its own, is listed)
LEAD = ("id", "kind", "name", "dataset", "tag", "status", "parent", "created")
SCORES = (*SCORE_KEYS, "val_avg_exit_layer", "test_avg_exit_layer", "exits")
PARAM_NAMES = {name for name, _ in PARAM_KEYS}


def _ts(t) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _summary_value(run: dict, key: str):
    s = run.get("summary") or {}
    for part in ("best", "test"):
        d = s.get(part) or {}
        if isinstance(d, dict) and key in d:
            return d[key]
    return None


def _number(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def exit_rule(run: dict) -> str:
    """What decides a DACT run's exits, in words: a confidence threshold τ fitted after training, halting units
    refitted after training at a normalised λ of the front, or the units trained with the ponder λ. '' otherwise."""
    cfg = run.get("config") or {}
    if isinstance(cfg.get("run"), dict):
        cfg = cfg["run"]
    if run.get("kind") != "dact" and cfg.get("kind") != "dact":
        return ""
    chosen = FrontPoint.from_dict(((run.get("summary") or {}).get("halting") or {}).get("chosen") or {})
    tau, lam = chosen.threshold, chosen.front_lambda
    if tau is not None:
        return f"threshold τ {tau:.2f}"
    if lam is not None:
        return f"fitted units, front λ {lam:g}"
    trained = _number(((cfg.get("model") or {}).get("ponder_lambda")))
    return f"trained units, ponder λ {trained:g}" if trained is not None else ""


def runs_table(runs: list[dict], datasets: dict[int, str] | None = None) -> pd.DataFrame:
    """One row per run, columns in :data:`LEAD`, :data:`SCORES`, multi-task scores, settings, error order. The
    training ponder λ is shown only where the trained units decide the exits (see :func:`exit_rule`)."""
    datasets = datasets or {}
    rows, extra_scores = [], []
    for r in runs:
        ds = r.get("dataset_id")
        row: dict[str, Any] = {"id": r["id"], "kind": r["kind"], "name": r.get("name") or "",
                               "dataset": (datasets.get(ds) or f"#{ds}") if ds is not None else "",
                               "tag": r.get("tag") or "", "status": r["status"], "parent": r.get("parent_id"),
                               "created": _ts(r.get("created"))}
        scores = run_scores(r)
        for k, v in scores.items():
            row[k] = v
            if k not in SCORE_KEYS and k not in extra_scores:
                extra_scores.append(k)
        row["val_avg_exit_layer"] = _summary_value(r, "val_avg_exit_layer")
        row["test_avg_exit_layer"] = _summary_value(r, "test_avg_exit_layer")
        row["exits"] = exit_rule(r)
        params = run_params(r)
        if row["exits"] and not row["exits"].startswith("trained"):
            params["ponder_lambda"] = None  # it did not decide the exits
        row.update(params)
        row["error"] = (r.get("error") or "")[:120]
        rows.append(row)
    cols = [*LEAD, *SCORES, *extra_scores, *(n for n, _ in PARAM_KEYS), "error"]
    return pd.DataFrame(rows, columns=cols)


# ------------------------------------------------------------------------------------------------------- search


def matches(run: dict, words: list[str], datasets: dict[int, str] | None = None) -> bool:
    """Every word matches: ``setting=value`` that setting only (``epochs=3`` is not ``epochs=30``; numbers compared
    as numbers, ``head_lr=1e-3`` matches 0.001); any other word a substring of id, name, kind, tag, status or
    dataset."""
    ds_id = run.get("dataset_id")
    ds_name = (datasets or {}).get(ds_id, "") if ds_id is not None else ""
    hay = " ".join(str(x) for x in (f"#{run['id']}", run["id"], run.get("name") or "", run["kind"],
                                    run.get("tag") or "", run["status"], f"dataset:{ds_id}", ds_name)).lower()
    params = {k: v for k, v in run_params(run).items() if v is not None}
    return all(param_match(w, params) if w.partition("=")[0] in PARAM_NAMES else w in hay for w in words)


def param_match(word: str, params: dict) -> bool:
    key, sep, want = word.partition("=")
    if not sep or key not in params:
        return False
    try:
        return float(params[key]) == float(want)
    except (TypeError, ValueError):
        return str(params[key]).lower() == want


def filter_runs(runs: list[dict], words: list[str], *, kinds=(), statuses=None, top_only: bool = False,
                datasets: dict[int, str] | None = None) -> list[dict]:
    return [r for r in runs if (not kinds or r["kind"] in kinds) and (statuses is None or r["status"] in statuses)
            and (not top_only or r.get("parent_id") is None) and matches(r, words, datasets)]


# ---------------------------------------------------------------------------------------------- default pick


def default_selection(runs: list[dict], last_steps: dict[int, int], limit: int = 5) -> list[int]:
    """The runs shown when nothing is chosen: the active training runs; else the newest finished training run;
    else the newest that logged a step — never a stub cancelled before its first step while a run with curves
    exists (``last_steps``: run id → last logged step, as ``Tracker.last_steps``)."""
    trained = [r for r in runs if r["kind"] not in ENGINE_KINDS]
    active = [r["id"] for r in trained if r["status"] in ACTIVE_STATUSES]
    if active:
        return active[:limit]
    for pick in (lambda r: r["status"] == "finished" and last_steps.get(r["id"]) is not None,
                 lambda r: last_steps.get(r["id"]) is not None, lambda r: True):
        hit = [r["id"] for r in trained if pick(r)]
        if hit:
            return hit[:1]
    return [r["id"] for r in runs[:1]]


# ---------------------------------------------------------------------------------------------- test report


def read_test_report(run_dir: str | Path) -> dict:
    """Per task of a run's ``report.json``: accuracy, macro-F1, labels, confusion matrix, per-class rows
    (``{"task": {"accuracy", "macro_f1", "confusion": DataFrame, "per_class": DataFrame}}``); {} when absent or
    unreadable."""
    path = Path(run_dir) / "report.json"
    try:
        rep = json.loads(path.read_text(encoding="utf-8")).get("report") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for task, r in (rep.get("tasks") or {}).items():
        try:
            names = [str(n) for n in r["labels"]]
            cm = pd.DataFrame(r["confusion_matrix"], index=[f"true {n}" for n in names],
                              columns=[f"predicted {n}" for n in names])
            per = r.get("per_class") or {}
            rows = [{"class": n, "precision": per[n]["precision"], "recall": per[n]["recall"],
                     "f1": per[n]["f1-score"], "rows": int(per[n]["support"])} for n in names if n in per]
            out[str(task)] = {"accuracy": float(r["accuracy"]), "macro_f1": float(r["macro_f1"]), "confusion": cm,
                              "per_class": pd.DataFrame(rows)}
        except (KeyError, TypeError, ValueError):
            continue
    return out


# --------------------------------------------------------------------------------------- ended runs' curves


class EndedStore:
    """At most ``max_runs`` entries, least recently used dropped first: the curves of runs that have ended (they
    no longer change), keyed by (home, run id, ended time) so a run resumed and ended again is read afresh."""

    def __init__(self, max_runs: int = 500) -> None:
        self.max_runs = int(max_runs)
        self._d: OrderedDict = OrderedDict()

    def get(self, key: Hashable):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key: Hashable, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_runs:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d


# ------------------------------------------------------------------------------------------------- environment


def environment_rows(run: dict) -> list[dict[str, str]]:
    """What a run recorded about where it ran (``summary["environment"]``), as rows ``{"what", "value"}``: the
    command line, the git commit (and whether tracked files were changed), python and the package versions, the
    machine and torch's CUDA. [] for a run recorded before environments were kept."""
    env = (run.get("summary") or {}).get("environment")
    if not isinstance(env, dict):
        return []
    rows = []
    if env.get("argv"):
        rows.append({"what": "command line", "value": " ".join(str(a) for a in env["argv"])})
    git = env.get("git")
    if isinstance(git, dict) and git.get("commit"):
        rows.append({"what": "git commit", "value": str(git["commit"])[:12] + (" (with uncommitted changes)"
                                                                              if git.get("dirty") else "")})
    for name, version in (env.get("packages") or {}).items():
        rows.append({"what": str(name), "value": str(version)})
    for key in ("platform", "machine", "cpus"):
        if env.get(key) is not None:
            rows.append({"what": key, "value": str(env[key])})
    torch_env = env.get("torch")
    if isinstance(torch_env, dict):
        gpus = ", ".join(torch_env.get("gpus") or []) or "none"
        rows.append({"what": "CUDA", "value": f"build {torch_env.get('cuda') or 'CPU only'}; GPUs: {gpus}"})
    return rows


# -------------------------------------------------------------------------------------------------- deep links


def ids_from_query(params: dict[str, Any], known: set[int]) -> tuple[list[int], int | None]:
    """``?run=3`` (one run, shown and in detail) or ``?runs=3,4`` (compared) of a Runs page address → (the runs to
    show, the run in detail); ids not in ``known`` are dropped; ([], None) when the address names none."""
    def ids(text: Any) -> list[int]:
        out = []
        for part in str(text or "").replace(";", ",").split(","):
            part = part.strip().lstrip("#")
            if part.isdigit() and int(part) in known and int(part) not in out:
                out.append(int(part))
        return out

    one = ids(params.get("run"))[:1]
    many = ids(params.get("runs"))
    shown = many or one
    return shown, (one[0] if one else shown[0] if shown else None)
