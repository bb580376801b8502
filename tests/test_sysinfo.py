"""What a run ran on (issue 26, 5a/5b): the environment recorded in its summary when it starts, and the system
metrics the tracker's callback samples while it trains."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata

import pytest

from dact_lib import sysinfo
from dact_lib.callbacks import LoopState
from dact_lib.tracker import Tracker, TrackerCallback


def test_environment_has_the_versions_the_git_commit_and_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dact-lab", "train", "--kind", "dact"])
    env = sysinfo.environment()
    assert env["argv"] == ["dact-lab", "train", "--kind", "dact"] and env["executable"] == sys.executable
    pk = env["packages"]
    assert set(pk) == {"python", "torch", "transformers", "dact-lab", "optuna", "onnxruntime"}
    assert pk["python"] == platform.python_version() and pk["torch"] == metadata.version("torch")
    assert env["torch"]["cuda_available"] in (True, False)  # torch is imported here
    if (sysinfo.PROJECT_ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(sysinfo.PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
        assert env["git"]["commit"] == head and env["git"]["dirty"] in (True, False)
    else:
        assert env["git"] is None


def test_git_state_outside_a_checkout_and_without_git(tmp_path, monkeypatch):
    assert sysinfo.git_state(tmp_path) is None  # an installed package: no .git, no error
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(sysinfo.subprocess, "run", no_git)
    assert sysinfo.git_state(tmp_path / "repo") == {"commit": sha, "dirty": None}  # read from .git's files
    (git / "refs" / "heads" / "main").write_text(sha[::-1] + "\n")  # a loose ref wins over the packed one
    assert sysinfo.git_state(tmp_path / "repo")["commit"] == sha[::-1]


def test_a_run_records_its_environment_when_it_starts_and_keeps_it(home, monkeypatch):
    tr = Tracker(home)
    queued = tr.create_run("dact", status="queued")
    assert tr.get_run(queued)["summary"] == {}  # the server queued it: not this process's environment
    monkeypatch.setattr(sys, "argv", ["python", "-m", "dact_lib.job_process", "spec.json"])
    tr.set_status(queued, "running")  # the job's process takes it
    env = tr.get_run(queued)["summary"]["environment"]
    assert env["argv"][-2:] == ["dact_lib.job_process", "spec.json"]
    tr.set_status(queued, "running", pid=1)  # the loop's start, same process: nothing new
    tr.update_run(queued, summary={"members": [1, 2]})  # an engine rewrites its summary whole: kept
    tr.end_run(queued, "interrupted", None, {"best": {}})
    assert tr.get_run(queued)["summary"] == {"members": [1, 2], "best": {}, "environment": env}
    monkeypatch.setattr(sys, "argv", ["dact-lab", "train", "--resume", str(queued)])
    tr.set_status(queued, "running")  # resumed by another command: the first one kept
    summary = tr.get_run(queued)["summary"]
    assert summary["environment"]["argv"] == ["dact-lab", "train", "--resume", str(queued)]
    assert summary["earlier_environments"] == [env]
    direct = tr.create_run("backbone")  # created running (the CLI, train())
    assert tr.get_run(direct)["summary"]["environment"]["packages"]["torch"] == metadata.version("torch")


def test_the_tracker_callback_samples_system_metrics_every_interval(home):
    tr = Tracker(home)
    rid = tr.create_run("dact")
    cb = TrackerCallback(tr, rid, sys_metrics_every_s=0.05)
    state = LoopState(run_id=rid)
    cb.on_start(state)
    state.step = 1
    cb.on_step(state, {"train_loss": 1.0})  # before the first interval: no sample
    time.sleep(0.06)
    sum(i * i for i in range(200_000))  # some CPU time
    state.step = 2
    cb.on_step(state, {})  # a step without logs still samples
    cb.on_eval(state, {"val_loss": 0.5})  # the same step: not twice
    state.step = 3
    cb.on_step(state, {})  # the interval has not passed again
    cb.on_end(state, "finished")
    df = tr.get_metrics(rid)
    sys_rows = df[df["name"].str.startswith("sys/")]
    assert set(sys_rows["step"]) == {2}
    values = dict(zip(sys_rows["name"], sys_rows["value"]))
    assert set(values) >= {"sys/cpu_percent", "sys/rss_mb"}
    assert 0 < values["sys/cpu_percent"] < 100 * (sysinfo.os.cpu_count() or 1) + 50
    assert 10 < values["sys/rss_mb"] < 1_000_000
    assert not any(n.startswith("sys/gpu") for n in values)  # CUDA not in use here


def test_the_interval_comes_from_the_environment_and_0_is_off(home, monkeypatch):
    monkeypatch.setenv(sysinfo.SYS_METRICS_ENV, "0")
    assert TrackerCallback(Tracker(home), 1).sampler.every_s == 0 and not sysinfo.SystemSampler().due()
    monkeypatch.setenv(sysinfo.SYS_METRICS_ENV, "nonsense")
    assert sysinfo.sys_metrics_interval() == sysinfo.DEFAULT_SYS_METRICS_S == 15.0
    monkeypatch.delenv(sysinfo.SYS_METRICS_ENV)
    assert TrackerCallback(Tracker(home), 1).sampler.every_s == 15.0


def test_rss_without_psutil_reads_proc(monkeypatch):
    if not sysinfo.Path("/proc/self/statm").exists():
        pytest.skip("no /proc here")
    with_psutil = sysinfo.rss_mb()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil fails
    without = sysinfo.rss_mb()
    assert without is not None and abs(without - with_psutil) < max(50.0, 0.2 * with_psutil)


def test_a_training_records_system_metrics(home, monkeypatch):
    from dact_lib.config import default_config
    from dact_lib.train import train

    monkeypatch.setenv(sysinfo.SYS_METRICS_ENV, "0.01")
    cfg = default_config("backbone", encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs, cfg.train.device = 120, 32, 1, "cpu"
    tr = Tracker(home)
    res = train(cfg.validate(), tracker=tr, home=home)
    df = tr.get_metrics(res.run_id)
    assert {"sys/cpu_percent", "sys/rss_mb"} <= set(df["name"])
    assert not df.duplicated(["step", "name"]).any()
    assert tr.get_run(res.run_id)["summary"]["environment"]["argv"] == sys.argv
