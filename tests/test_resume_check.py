"""One resume check (dact_lib.resume.resume_check) for the Runs page, the job manager and the CLI."""
from __future__ import annotations

import pytest

from dact_lib.cli import main as cli_main
from dact_lib.config import default_config
from dact_lib.errors import DactLabError
from dact_lib.jobs import JobManager
from dact_lib.resume import resume_check
from dact_lib.tracker import Tracker
from dact_lib.tuning.pbt import PBTConfig


def _pbt_parent(tr: Tracker, backend: str | None) -> int:
    conf = {"run": default_config("backbone").to_dict(), "pbt": PBTConfig().to_dict()}
    if backend:
        conf["backend"] = backend
    rid = tr.create_run("pbt", conf, status="running")
    tr.create_run("backbone", default_config("backbone").to_dict(), parent_id=rid, status="running")
    tr.set_status(rid, "failed", error="boom")
    return rid


def test_a_failed_ray_pbt_run_is_refused_with_the_reason_everywhere(tmp_path, capsys):
    """Issue 25 bug: a failed Ray PBT run was offered for Resume and the threaded engine took it over."""
    tr = Tracker(tmp_path)
    ray_run, threaded = _pbt_parent(tr, "ray"), _pbt_parent(tr, None)
    info = resume_check(tr, ray_run)
    assert not info["ok"] and "ran on Ray" in info["why"] and "start it again" in info["why"]
    assert resume_check(tr, threaded) == {"ok": True, "why": ""}
    jm = JobManager(tmp_path, processes=False)
    try:
        with pytest.raises(DactLabError, match="ran on Ray"):
            jm.resume(ray_run)
    finally:
        jm.shutdown()
    assert tr.get_run(ray_run)["status"] == "failed"  # not queued, not taken over
    code = cli_main(["pbt", "--home", str(tmp_path), "--resume", str(ray_run)])
    assert code != 0 and "ran on Ray" in capsys.readouterr().err


def test_engines_and_single_runs_say_why(tmp_path):
    tr = Tracker(tmp_path)
    study = tr.create_run("backbone-tuning", {}, status="running")
    tr.set_status(study, "failed", error="x")
    info = resume_check(tr, study)
    assert not info["ok"] and "start the study again" in info["why"]
    pipe = tr.create_run("dact-pipeline", {}, status="running")
    tr.set_status(pipe, "cancelled")
    assert "start the pipeline again under its name" in resume_check(tr, pipe)["why"]
    done = tr.create_run("dact", default_config("dact").to_dict(), status="running")
    tr.set_status(done, "finished")
    assert "only an interrupted, cancelled or failed run" in resume_check(tr, done)["why"]
    stub = tr.create_run("dact", default_config("dact").to_dict(), status="running")
    tr.set_status(stub, "cancelled")
    assert "no resume checkpoint" in resume_check(tr, stub)["why"]
