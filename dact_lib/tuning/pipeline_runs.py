"""Which DACT pipeline run holds a pipeline's stages, for the pages.

A pipeline resumes by its name: a job started again under the same name gets its own run (the job's), which
records ``summary.engine_run_id`` / a ``resumes`` event, while the stages, trials and final model go on in the
earlier run (``dact_pipeline.record.open_parent``). The pages use these to say which run a new job resumes and to
open the run that holds the stages, not the job's empty one."""
from __future__ import annotations

from typing import Any

from .. import events as ev

PIPELINE_KIND = "dact-pipeline"


def resumed_run_of(run: dict) -> int | None:
    """The earlier pipeline run that the job's run ``run`` resumes (its ``summary.engine_run_id``), or None when
    ``run`` holds its own stages."""
    target = (run.get("summary") or {}).get("engine_run_id")
    if target is None or int(target) == int(run["id"]):
        return None
    return int(target)


def parent_runs(tracker, name: str) -> list[dict]:
    """The pipeline runs named ``name``, newest first: those whose config is a pipeline's ``{"run", "pipeline"}``
    with that name (the rule of ``dact_pipeline.record``; a job's run for a pipeline records the same)."""
    out = []
    for r in tracker.list_runs(kind=PIPELINE_KIND):
        conf = r.get("config") or {}
        if r["name"] == name and isinstance(conf, dict) and isinstance(conf.get("pipeline"), dict) \
                and conf["pipeline"].get("name") == name:
            out.append(r)
    return out


def pipeline_to_resume(tracker, name: str | None, *, new_run_id: int | None = None) -> dict | None:
    """The pipeline run that starting a pipeline named ``name`` resumes: the newest earlier parent of that name
    that holds its own stages (``new_run_id`` — the job's run — and earlier jobs' runs that only resumed another
    are passed over), or None when it starts afresh."""
    if not name:
        return None
    previous = [r for r in parent_runs(tracker, name)
                if (new_run_id is None or r["id"] != new_run_id) and resumed_run_of(r) is None]
    return previous[0] if previous else None


def explorer_runs(tracker) -> list[dict[str, Any]]:
    """The pipeline runs that hold stages (newest first), each with ``resumed_by``: the ids of the job runs that
    resumed it. A job's run that only resumed another is left out (it holds no stage)."""
    runs = tracker.list_runs(kind=PIPELINE_KIND)
    by_id = {r["id"]: dict(r, resumed_by=[]) for r in runs}
    out = []
    for r in runs:
        target = resumed_run_of(r)
        if target is not None and target in by_id:
            by_id[target]["resumed_by"].append(r["id"])
        else:
            out.append(r["id"])
    return [by_id[i] for i in out]


def since_last_resume(events: list[dict]) -> tuple[list[dict], list[dict]]:
    """``events`` split at the last ``resumed`` event: (earlier attempts', this attempt's)."""
    cut = max((i for i, e in enumerate(events) if e.get("kind") == ev.RESUMED), default=-1)
    return events[:cut + 1], events[cut + 1:]
