"""Can this run be resumed? One answer for the Runs page, the job manager and the CLI.

A single, DACT or multi-task run resumes from its resume checkpoint (``train.resume_info``); a threaded PBT parent
from its members' checkpoints (``tuning.pbt.resumable_pbt``). A PBT run that ran on Ray cannot be resumed by the
threaded engine (Ray keeps its checkpoints only while it runs) and the other engines start again under their name.
"""
from __future__ import annotations

from .errors import DactLabError

#: the kinds a Resume button can be offered for (the others are started again)
RESUME_KINDS = ("backbone", "dact", "multitask", "pbt")


def resume_check(tracker, run_id: int) -> dict:
    """``{"ok": bool, "why": str}`` for run ``run_id``: ``why`` is a sentence a user can act on when not ok."""
    run = tracker.get_run(int(run_id))
    if run["kind"] == "pbt":
        from .tuning.pbt_ray import is_ray_run

        if is_ray_run(run):
            return {"ok": False, "why": f"PBT run {run_id} ran on Ray, which keeps its checkpoints only while it "
                                        "runs: start it again (the threaded engine cannot take a Ray run over)"}
        from .tuning.pbt import resumable_pbt

        try:
            resumable_pbt(tracker, int(run_id))
        except DactLabError as exc:
            return {"ok": False, "why": str(exc).removeprefix("Cannot resume: ").rstrip(".")}
        return {"ok": True, "why": ""}
    if run["kind"] not in RESUME_KINDS:
        how = ("start the pipeline again under its name" if run["kind"] == "dact-pipeline"
               else "start the study again with the same study name")
        return {"ok": False, "why": f"a {run['kind']} run is not resumed from a checkpoint: {how}"}
    from .train import resume_info

    return resume_info(tracker, int(run_id))


def require_resumable(tracker, run_id: int) -> None:
    """Raise a DactLabError saying why run ``run_id`` cannot be resumed (nothing when it can)."""
    info = resume_check(tracker, run_id)
    if not info["ok"]:
        raise DactLabError(f"Cannot resume: {info['why']}.")
