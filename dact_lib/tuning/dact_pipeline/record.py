"""The pipeline's record: the parent run, its stage files, resume (``open_parent``) and :func:`load_pipeline_result` —
the one reader of a stored pipeline."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .. import studies
from ...config import RunConfig
from ...errors import ConfigError, DactLabError
from ...front import FrontPoint
from ..pipeline_runs import resumed_run_of
from .settings import PIPELINE_KIND, PipelineResult, STAGES, STAGE_WEIGHTS
from ... import events as ev


STOPPED = "the pipeline stopped"  # why a stage's slots left are dropped when the pipeline stops (cancel, failure)


class Budget:
    """``timeout_min`` as a wall: every phase gets a share of what is left when it starts, and every training in
    it (stage-2 trials, the stage-2 refit, the single run) runs under ``train.time_limit_min`` = that share, so it
    stops at its share with its best checkpoint (:meth:`limit_min`). ``skip``: stages that take no time here
    (``single`` when ``pipeline.single_run`` is off)."""

    FLOOR_S = 1.0  # a training given no time left still makes one step and one evaluation (a model to go on with)
    # a training's steps get this share of its time; the rest is for what follows its last step (evaluation, exit
    # refit, halting fit): measured on a loaded 2-core machine they took 35-75 s after a 30-160 s limit
    TRAIN_SHARE = 0.6

    def __init__(self, minutes: float | None, skip=()) -> None:
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * float(minutes)
        self.skip = set(skip)

    def left(self) -> float | None:
        """Seconds until the wall (0 once past it), None without a timeout."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def share(self, stage: str) -> float | None:
        """Seconds for ``stage``: the remaining time split over the stages still to run."""
        if self.deadline is None:
            return None
        rest = [s for s in STAGES[STAGES.index(stage):] if s not in self.skip or s == stage]
        return (self.left() or 0.0) * STAGE_WEIGHTS[stage] / sum(STAGE_WEIGHTS[s] for s in rest)

    @classmethod
    def limit_min(cls, seconds: float | None, existing: float | None = None) -> float | None:
        """``train.time_limit_min`` for a training that may take ``seconds``, its post-training phases included
        (:data:`TRAIN_SHARE` of them for the steps; the smaller of that and the config's own limit ``existing``)."""
        if seconds is None:
            return existing
        mins = max(float(seconds) * cls.TRAIN_SHARE, cls.FLOOR_S) / 60.0
        return mins if existing is None else min(mins, float(existing))


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def write_json(path: Path, data: Any) -> None:
    from ...files import atomic_write_json

    atomic_write_json(path, jsonable(data))


def counted(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED))


def n_complete(study: optuna.Study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)


def _run_config_key(cfg: RunConfig) -> dict:
    d = jsonable(cfg.to_dict())
    d.pop("name", None)
    d.pop("tag", None)
    return d


def load_pipeline_result(parent_or_name: int | str, *, home=None, tracker=None) -> PipelineResult:
    """The stored result of a pipeline (by parent run id or pipeline name) from its stage JSON files; stages not
    finished yet are missing from it. Trains nothing."""
    from ...tracker import Tracker

    tracker = tracker or Tracker(home)
    if isinstance(parent_or_name, str) and not parent_or_name.isdigit():
        from ..pipeline_runs import parent_runs

        runs = [r for r in parent_runs(tracker, parent_or_name) if resumed_run_of(r) is None]
        if not runs:
            raise DactLabError(f"No DACT pipeline named {parent_or_name!r} in {tracker.db_path}.")
        run = runs[0]
    else:
        run = tracker.get_run(int(parent_or_name))
    if run["kind"] != PIPELINE_KIND:
        raise DactLabError(f"run {run['id']} is not a DACT pipeline run (kind {run['kind']!r}).")
    state = read_stages(tracker.run_dir(run["id"]))
    names = (run.get("summary") or {}).get("study_names") or {s: f"{run['name']}/{s}" for s in STAGES[:3]}
    return result_of(int(run["id"]), state, names, run["status"], resumed=list(state))


def read_stages(run_dir) -> dict[str, dict]:
    """The stage JSON files of a pipeline's parent run folder: stage -> its saved record (finished stages only)."""
    return {s: json.loads((run_dir / f"{s}.json").read_text(encoding="utf-8")) for s in STAGES
            if (run_dir / f"{s}.json").is_file()}


def result_of(parent: int, state: dict[str, dict], study_names: dict[str, str], status: str,
              resumed: list[str]) -> PipelineResult:
    """The one reading of a pipeline's stage records as a :class:`PipelineResult` (a running pipeline's and a
    stored one's alike)."""
    fin = state.get("final", {})
    st3 = state.get("stage3", {})
    chosen = fin.get("chosen") or st3.get("chosen")
    return PipelineResult(
        parent_run_id=int(parent), final_run_id=fin.get("final_run_id"),
        stage_best={s: state[s]["best_params"] for s in ("stage1", "stage2", "stage3") if s in state},
        pareto=[FrontPoint.from_dict(p) for p in fin.get("front") or st3.get("front", [])],
        chosen=FrontPoint.from_dict(chosen) if chosen else None,
        study_names=dict(study_names), status=status, resumed_stages=list(resumed),
        feature_cache=state.get("stage1", {}).get("feature_cache", {}), test_metrics=fin.get("test_metrics", {}),
        exit_policy_sweep=fin.get("exit_policy_sweep", []), model_config=fin.get("model", {}),
        train_config=fin.get("train", {}))


def open_parent(pl, run_id: int | None = None) -> None:
    """Create the parent run (or adopt ``run_id``, pre-created by a job manager), or find the earlier run of
    this pipeline name to resume (then ``run_id``, if given, records a link to it)."""
    tr, pipe = pl.tracker, pl.pipe
    from ..pipeline_runs import parent_runs

    # the newest earlier run of this name that holds its own stages: an earlier job's run that only resumed another
    # holds none (resuming it would start over) — the rule the pages use too (pipeline_runs.pipeline_to_resume)
    previous = [r for r in parent_runs(tr, pipe.name) if r["id"] != run_id and resumed_run_of(r) is None]
    config = {"run": jsonable(pl.cfg.to_dict()), "pipeline": pipe.to_dict()}
    if previous and run_id is not None:
        tr.update_run(run_id, summary={"engine_run_id": int(previous[0]["id"]), "resumes": pipe.name})
        tr.log_event(run_id, ev.RESUMES, {"pipeline": pipe.name, "run_id": int(previous[0]["id"])})
    if not previous:
        pl.parent = tr.open_run(PIPELINE_KIND, config, run_id, name=pipe.name, tag="pipeline",
                                dataset_id=pl.dataset_id)
        pl.summary = {"pipeline": pipe.name, "study_names": pl.names, "stages_done": [], "stage_best": {},
                        "study_name": pl.names["stage3"], "storage_url": studies.shown_url(pl.home)}
        tr.update_run(pl.parent, summary=pl.summary)
        tr.log_event(pl.parent, ev.PIPELINE_START, {"name": pipe.name, "study_names": pl.names,
                                                     "pipeline": pipe.to_dict()})
        return
    run = previous[0]
    stored = (run.get("config") or {}).get("run")
    if isinstance(stored, dict):
        stored = dict(stored)
        stored.pop("name", None)
        stored.pop("tag", None)
    if stored != _run_config_key(pl.cfg):
        raise ConfigError(f"A DACT pipeline named {pipe.name!r} already exists (run {run['id']}) with a different "
                          "run config; resuming needs the same config. Use a new pipeline name, or delete run "
                          f"{run['id']} first.")
    from ...tracker import pid_alive

    if run["status"] in ("queued", "running") and run.get("pid") not in (None, os.getpid()) \
            and pid_alive(int(run["pid"])):
        raise DactLabError(f"Pipeline {pipe.name!r} (run {run['id']}) is running in process {run['pid']}: wait "
                           "for it or cancel it before resuming.")
    from ...tracker import liveness

    if run["status"] in ("queued", "running") and run.get("pid") == os.getpid() and liveness.is_live(run["id"]):
        raise DactLabError(f"Pipeline {pipe.name!r} (run {run['id']}) is already running in this process: wait "
                           "for it or cancel it before resuming.")
    pl.parent = int(run["id"])
    pl.summary = dict(run.get("summary") or {})
    stored = read_stages(tr.run_dir(pl.parent))
    if "final" in stored and "single" not in stored:  # finished before the single-run stage existed
        stored["single"] = {"stage": "single", "skipped": "recorded before the pipeline had a single-run stage"}
    for stage in STAGES:  # the finished stages in order (a later file without the one before it is not used)
        if stage not in stored:
            break
        pl.state[stage] = stored[stage]
        pl.resumed.append(stage)
    pl.summary.update(study_names=pl.names, stages_done=list(pl.resumed))
    pl.already_finished = len(pl.resumed) == len(STAGES) and run["status"] == "finished"
    if not pl.already_finished:
        from ...tracker import hostname

        tr.set_status(pl.parent, "running", pid=os.getpid(), host=hostname(), summary=pl.summary)
        tr.update_run(pl.parent, error=None)
        tr.log_event(pl.parent, ev.RESUMED, {"stages_done": list(pl.resumed),
                                              "previous_status": run["status"]})
