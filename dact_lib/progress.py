"""Progress and ETA of a run: steps of a training run, trials / members / stages of an engine's parent run.
Plain dicts in, plain dicts out (the Runs page and the CLI show them)."""
from __future__ import annotations

import time as _time
from typing import Any, Iterable

import numpy as np
import pandas as pd

from .engines import ENGINE_KINDS
from . import events as ev


def _cfg_total_steps(config: dict | None) -> int | None:
    tc = (config or {}).get("train") or {}
    max_steps = tc.get("max_steps")
    return int(max_steps) if max_steps else None


# complexity: flat fallbacks for each field a run may lack (start event, config, summary, phase)
def progress_eta(run: dict, metrics: pd.DataFrame | None = None, events: Iterable[dict] | None = None,
                 now: float | None = None, steps_done: int | None = None) -> dict[str, Any]:
    """Progress of a run: ``steps_done`` (the highest logged step, or the given ``steps_done``; the summary's
    ``steps`` once ended), ``total_steps`` (from the 'start' event's ``steps``; else the config's
    ``train.max_steps``; else None), ``fraction`` (0..1 or None), ``elapsed_s`` and ``eta_s`` (seconds left at
    the pace measured between the first and the last logged step — not since the start, which holds loading and
    tokenising; None until two steps are logged; 0 once the run has ended) and a short ``text`` (with the latest
    phase before the first step and after the last one: the exit refit, the halting fit, the test split)."""
    now = _time.time() if now is None else float(now)
    status = run.get("status")
    summary = run.get("summary")
    if not isinstance(summary, dict):  # none yet, or a summary that is not a JSON object
        summary = {}
    total: int | None = None
    for e in events or []:
        if e.get("kind") == ev.START and isinstance(e.get("payload"), dict) and e["payload"].get("steps"):
            total = int(e["payload"]["steps"])  # the last start wins (a restarted run)
    if total is None:
        total = _cfg_total_steps(run.get("config"))
    done = 0
    first_t = last_t = None
    pace = None  # seconds per step, measured between the first and the last logged step
    if metrics is not None and len(metrics):
        done = int(metrics["step"].max())
        t = metrics["time"].to_numpy(dtype=np.float64)
        first_t, last_t = float(np.nanmin(t)), float(np.nanmax(t))
        by_step = metrics.groupby("step")["time"].min()
        if len(by_step) >= 2:
            s0, s1 = int(by_step.index.min()), int(by_step.index.max())
            t0, t1 = float(by_step.loc[s0]), float(by_step.loc[s1])
            if s1 > s0 and t1 >= t0:
                pace = (t1 - t0) / (s1 - s0)
    if steps_done is not None:
        done = max(done, int(steps_done))
    if summary.get("steps") is not None and status not in ("running", "queued"):
        done = max(done, int(summary["steps"]))
    started = run.get("started") if run.get("started") is not None else first_t
    ended = run.get("ended") if status not in ("running", "queued") else None
    elapsed = ((ended if ended is not None else now) - started) if started is not None else None
    fraction = min(1.0, done / total) if total else None
    if status == "finished":
        fraction = 1.0 if total or done else fraction
    eta = None
    if status in ("running", "queued"):
        # the pace of the steps themselves: loading the encoder and tokenising before step 1 took minutes, and
        # elapsed / steps done read 21 h, 51 h, 58 h where minutes were left. No ETA before the pace is measured
        if total and done and pace is not None:
            eta = max(0.0, pace * (total - done))
    elif status is not None:
        eta = 0.0
    phase, phase_eta = phase_of(events, now)
    if total:
        text = f"step {done:,} / {total:,}"
    else:
        text = f"step {done:,}"
    in_phase = status == "running" and phase and phase != "training" and (not done or (total and done >= total))
    if in_phase:
        text = f"{phase}… · " + text  # before the first step or after the last: say what it is doing
        if phase_eta is not None:
            text += f" · this phase ETA {format_seconds(phase_eta)}"
    elif eta is not None and status in ("running", "queued"):
        text += f" · ETA {format_seconds(eta)}"
    if elapsed is not None:
        text += f" · elapsed {format_seconds(elapsed)}"
    return {"steps_done": done, "total_steps": total, "fraction": fraction, "elapsed_s": elapsed, "eta_s": eta,
            "text": text, "last_metric_time": last_t}


def phase_of(events: Iterable[dict] | None, now: float | None = None) -> tuple[str | None, float | None]:
    """The latest 'phase' event as text ("refitting the exit classifiers (epoch) 12/30") and the seconds left in
    it at the pace between its first and latest count (None until two counts of that phase are logged)."""
    now = _time.time() if now is None else float(now)
    phases = [e for e in events or [] if e.get("kind") == ev.PHASE and isinstance(e.get("payload"), dict)]
    if not phases:
        return None, None
    last = phases[-1]["payload"]
    name, done, total = last.get("phase"), last.get("done"), last.get("total")
    if done is None or not total:
        return name, None
    text = f"{name} {int(done):,}/{int(total):,}"
    same = [e for e in phases if e["payload"].get("phase") == name and e["payload"].get("done") is not None]
    first = same[0]
    d0, t0, t1 = float(first["payload"]["done"]), float(first.get("time") or 0), float(phases[-1].get("time") or 0)
    if float(done) > d0 and t1 > t0:
        pace = (t1 - t0) / (float(done) - d0)
        return text, max(0.0, pace * (float(total) - float(done)) - max(0.0, now - t1))
    return text, None


_STAGES = ("stage1", "stage2", "stage3")


# complexity: one branch per engine kind (PBT, backbone study, DACT pipeline), each short
def engine_progress(run: dict, events: Iterable[dict] | None = None, members: Iterable[dict] | None = None,
                    now: float | None = None) -> dict[str, Any]:
    """Progress of a tuning engine's parent run (kinds in :data:`ENGINE_KINDS`), which logs no training steps of
    its own, in the shape of :func:`progress_eta`.

    * ``pbt``: ``members`` are the :func:`progress_eta` results of its member runs (they train side by side):
      fraction = steps of all members / their planned steps; ETA at the population's pace.
    * ``tune-backbone``: trials done (its 'trial' events) + the final run, out of the configured trials (+ 1 when
      a final training is asked for); ETA at the average trial time (trials cost about the same).
    * ``dact-pipeline``: trials done per stage out of ``trials_stage1..3`` + the final run. No ETA: a stage-1 trial
      on cached features takes seconds, a stage-2 trial minutes, so an average would mislead; the text names the
      stage instead.

    Ended runs report fraction 1.0 when finished (their last value otherwise) and ETA 0."""
    now = _time.time() if now is None else float(now)
    kind, status = run.get("kind"), run.get("status")
    cfg = run.get("config") or {}
    events = list(events or [])
    active = status in ("running", "queued")
    started = run.get("started")
    ended = run.get("ended") if not active else None
    elapsed = ((ended if ended is not None else now) - started) if started is not None else None
    done: int | None = None
    total: int | None = None
    eta: float | None = None
    text = ""
    if kind == "pbt":
        ms = list(members or [])
        totals = [int(t) for t in (m.get("total_steps") for m in ms) if t]
        done = sum(int(m.get("steps_done") or 0) for m in ms)
        pop = ((cfg.get("pbt") or {}).get("population"))
        if ms and len(totals) == len(ms):  # every member's planned steps known
            total = sum(totals)
        text = f"{len(ms) or pop or '?'} members · step {done:,}" + (f" / {total:,}" if total else "")
        if active and total and done and elapsed:
            eta = max(0.0, elapsed / done * (total - done))
    elif kind == "tune-backbone":
        trials = cfg.get("trials")
        finals = 1 if cfg.get("final") else 0
        n_trials = sum(1 for e in events if e.get("kind") == ev.TRIAL)
        stopped = any(e.get("kind") == ev.TIMEOUT for e in events)
        done = n_trials
        if isinstance(trials, int) and trials > 0:
            total = (n_trials if stopped else trials) + finals
        text = f"trial {n_trials}" + (f" / {trials}" if isinstance(trials, int) else "")
        if finals and active and total is not None and n_trials >= total - finals:
            text += " · final training"
        if active and total and done and elapsed:
            eta = max(0.0, elapsed / done * (total - done))
    elif kind == "dact-pipeline":
        pipe = cfg.get("pipeline") or {}
        planned = {s: int(pipe.get(f"trials_{s}") or 0) for s in _STAGES}
        per_stage = {s: 0 for s in _STAGES}
        current = None
        for e in events:
            pl = e.get("payload")
            if not isinstance(pl, dict):
                pl = {}
            if e.get("kind") == ev.TRIAL and pl.get("stage") in per_stage:
                per_stage[pl["stage"]] += 1
            elif e.get("kind") == ev.STAGE_START:
                current = pl.get("stage")
            elif e.get("kind") == ev.STAGE_END and pl.get("stage") in planned:
                per_stage[pl["stage"]] = max(per_stage[pl["stage"]], planned[pl["stage"]])  # a timeout ends it early
            elif e.get("kind") == ev.RESUMED:
                for s in pl.get("stages_done") or []:
                    if s in planned:
                        per_stage[s] = max(per_stage[s], planned[s])
        final_done = any(e.get("kind") == ev.PIPELINE_END or (e.get("kind") == ev.STAGE_END and isinstance(
            e.get("payload"), dict) and e["payload"].get("stage") == "final") for e in events)
        done = sum(min(per_stage[s], planned[s]) for s in _STAGES) + int(final_done)
        total = sum(planned.values()) + 1 if any(planned.values()) else None
        phase = next((e["payload"].get("phase") for e in reversed(events) if e.get("kind") == ev.PHASE
                      and isinstance(e.get("payload"), dict)), None)
        if current == "stage1" and per_stage["stage1"] == 0 and phase and active:
            text = f"stage1: {phase}"  # before its first trial: the feature cache (rows done)
        elif current in planned:
            text = f"{current}: trial {per_stage[current]} / {planned[current]}"
        elif current == "single":
            text = "single run (the candidate the pipeline is compared with)"
        elif current == "final":
            text = "final model"
        else:
            text = "starting"
    fraction = min(1.0, done / total) if total and done is not None else None
    if status == "finished":
        fraction, eta = 1.0, 0.0
    elif not active and status is not None:
        eta = 0.0
    if eta is not None and active:
        text += f" · ETA {format_seconds(eta)}"
    if elapsed is not None:
        text += f" · elapsed {format_seconds(elapsed)}"
    return {"steps_done": done or 0, "total_steps": total, "fraction": fraction, "elapsed_s": elapsed,
            "eta_s": eta, "text": text.strip(" ·"), "last_metric_time": None}


def run_progress(tracker, run: dict, metrics: pd.DataFrame | None = None, events: Iterable[dict] | None = None,
                 steps_done: int | None = None, now: float | None = None) -> dict[str, Any]:
    """:func:`progress_eta` for a training run, :func:`engine_progress` for an engine's parent run (reading its
    PBT members' steps and events from ``tracker``)."""
    events = tracker.get_events(run["id"]) if events is None else events
    if run.get("kind") not in ENGINE_KINDS:
        if steps_done is None and metrics is None:
            steps_done = tracker.last_steps([run["id"]]).get(run["id"])
        return progress_eta(run, metrics, events, now=now, steps_done=steps_done)
    members = None
    if run.get("kind") == "pbt":
        kids = tracker.list_runs(parent_id=run["id"])
        steps = tracker.last_steps([k["id"] for k in kids])
        members = [progress_eta(k, None, tracker.get_events(k["id"]), now=now, steps_done=steps.get(k["id"]))
                   for k in kids]
    return engine_progress(run, events, members, now=now)


def format_seconds(s: float | None) -> str:
    if s is None or not np.isfinite(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def steps_per_epoch(run: dict, events: Iterable[dict]) -> float | None:
    """Optimizer steps per epoch of a training run: its 'start' event's (runs of this version), else its planned
    steps / epochs (older runs without ``train.max_steps``), else None."""
    for e in reversed(list(events or [])):
        p = e.get("payload") if e.get("kind") == ev.START else None
        if isinstance(p, dict):
            if p.get("steps_per_epoch"):
                return float(p["steps_per_epoch"])
            tc = (run.get("config") or {}).get("train") or {}
            if p.get("steps") and tc.get("epochs") and not tc.get("max_steps"):
                return float(p["steps"]) / float(tc["epochs"])
    return None
