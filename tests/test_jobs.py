"""JobManager: queue limit, cancellation (queued and running), failures recorded, interrupted runs at start."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import dataclasses
from dataclasses import dataclass

import pytest

from dact_lib import jobs as jobs_mod
from dact_lib import tracker as tracker_mod
from dact_lib.config import default_config
from dact_lib.errors import Cancelled, ConfigError
from dact_lib.jobs import JobManager
from dact_lib.tracker import Tracker


def tiny_cfg(kind="backbone", epochs=1, max_rows=120):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows = max_rows
    cfg.data.max_seq_len = 32
    cfg.train.epochs = epochs
    cfg.train.batch_size = 16
    cfg.train.device = "cpu"
    cfg.train.early_stopping.enabled = False
    return cfg.validate()


@pytest.fixture
def manager(home):
    managers = []

    def make(**kw):
        m = JobManager(home, **kw)
        managers.append(m)
        return m

    yield make
    for m in managers:
        m.shutdown(cancel=True, timeout=30)


class Gate:
    """A fake ``train`` that blocks until released (or cancelled), recording which runs started."""

    def __init__(self):
        self.started: list[int] = []
        self.release = threading.Event()
        self.running = threading.Event()

    def __call__(self, cfg, *, tracker, run_id, cancel, home=None, **kw):
        self.started.append(run_id)
        tracker.set_status(run_id, "running")
        self.running.set()
        while not self.release.wait(0.02):
            if cancel.cancelled:
                tracker.set_status(run_id, "cancelled", cancel.reason)
                raise Cancelled(cancel.reason)
        tracker.set_status(run_id, "finished", summary={"best": {"val_accuracy": 1.0}})


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_tiny_job_runs_to_the_end(home, manager):
    jm = manager()
    rid = jm.submit("dact", tiny_cfg("dact"), name="tiny-dact")
    assert tracker_mod.liveness.is_live(rid)
    assert jm.wait(rid, timeout=120) == "finished"
    run = Tracker(home).get_run(rid)
    assert run["status"] == "finished" and run["kind"] == "dact" and run["name"] == "tiny-dact"
    assert (home / "runs" / str(rid) / "model.safetensors").exists()
    assert "val_accuracy" in run["summary"]["best"]
    assert not tracker_mod.liveness.is_live(rid)
    assert jm.active_count() == 0
    (job,) = jm.jobs()
    assert job["run_id"] == rid and job["state"] == "finished" and job["started"] and job["ended"]


def test_queue_limit_second_job_waits(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(max_concurrent=1)
    a = jm.submit("backbone", tiny_cfg())
    b = jm.submit("backbone", tiny_cfg().to_dict())  # a dict config is accepted too
    assert gate.running.wait(10)
    tr = Tracker(home)
    # no sleep needed: the scheduler sets a job's state when it is submitted and when a job ends (not in a thread
    # later), so b's state already says whether it was started next to a
    assert jm.status(a) == "running" and jm.status(b) == "queued"
    assert tr.get_run(b)["status"] == "queued" and gate.started == [a]
    assert jm.active_count() == 2
    gate.release.set()
    assert jm.wait(a, 10) == "finished"
    assert jm.wait(b, 10) == "finished"
    assert gate.started == [a, b]
    assert tr.get_run(b)["status"] == "finished"


def test_max_concurrent_two_runs_both(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(max_concurrent=2)
    ids = [jm.submit("backbone", tiny_cfg()) for _ in range(3)]
    assert wait_for(lambda: len(gate.started) == 2)  # the condition itself, with a deadline (no fixed sleep)
    assert [jm.status(i) for i in ids] == ["running", "running", "queued"]
    assert sorted(gate.started) == ids[:2]
    gate.release.set()
    assert [jm.wait(i, 10) for i in ids] == ["finished"] * 3


def test_cancel_queued_and_running(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(max_concurrent=1)
    a = jm.submit("backbone", tiny_cfg())
    b = jm.submit("backbone", tiny_cfg())
    assert gate.running.wait(10)
    assert jm.cancel(b) is True
    tr = Tracker(home)
    assert jm.status(b) == "cancelled" and tr.get_run(b)["status"] == "cancelled"
    assert jm.cancel(a) is True
    assert jm.wait(a, 10) == "cancelled"
    assert tr.get_run(a)["status"] == "cancelled"
    assert gate.started == [a]  # the cancelled queued job never started
    assert jm.cancel(a) is False and jm.cancel(12345) is False
    assert not tracker_mod.liveness.is_live(a) and not tracker_mod.liveness.is_live(b)


def test_cancel_running_real_training(home, manager):
    jm = manager()
    rid = jm.submit("backbone", tiny_cfg(epochs=200, max_rows=400))
    tr = Tracker(home)
    assert wait_for(lambda: tr.get_run(rid)["status"] == "running", 60)
    assert jm.cancel(rid)
    assert jm.wait(rid, 60) == "cancelled"
    run = tr.get_run(rid)
    assert run["status"] == "cancelled" and run["ended"] is not None


def test_cancel_owner_finds_the_job_that_runs_a_child_run(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(max_concurrent=1)
    job = jm.submit("backbone", tiny_cfg())
    assert gate.running.wait(10)
    tr = Tracker(home)
    child = tr.create_run("pbt-member", {}, parent_id=job, status="running")
    grandchild = tr.create_run("backbone", {}, parent_id=child, status="running")
    stranger = tr.create_run("backbone", {}, status="running")  # e.g. started by the CLI
    assert jm.owner(grandchild) == job and jm.owner(child) == job and jm.owner(job) == job
    assert jm.owner(stranger) is None and jm.owner(99999) is None
    assert jm.cancel_owner(stranger) is None
    assert jm.cancel_owner(grandchild) == job
    assert jm.wait(job, 10) == "cancelled"
    assert jm.owner(child) is None and jm.cancel_owner(child) is None  # the job has ended


def test_check_validates_engine_options_without_creating_runs(home, manager):
    jm = manager()
    cfg, settings = jm.check("pbt", tiny_cfg(), {"population": 2})
    assert cfg.kind == "backbone" and settings.population == 2
    with pytest.raises(ConfigError, match="population"):
        jm.check("pbt", tiny_cfg(), {"population": 0})
    with pytest.raises(ConfigError, match="takes no options"):
        jm.check("backbone", tiny_cfg(), {"population": 2})
    assert Tracker(home).list_runs() == []


def test_failed_job_records_error(home, manager):
    jm = manager()
    # 60 demo rows cannot be split stratified over 9 strata: the loop fails before training starts.
    rid = jm.submit("dact", tiny_cfg("dact", max_rows=60))
    assert jm.wait(rid, 60) == "failed"
    run = Tracker(home).get_run(rid)
    assert run["status"] == "failed" and "DataError" in run["error"] and "stratified" in run["error"]
    assert "stratified" in jm.jobs()[0]["error"]
    assert any(e["kind"] == "job_error" for e in Tracker(home).get_events(rid))


def test_submit_validates_now(home, manager):
    jm = manager()
    with pytest.raises(ConfigError):
        jm.submit("nonsense", tiny_cfg())
    with pytest.raises(ConfigError, match="does not match"):
        jm.submit("dact", tiny_cfg("backbone"))
    bad = tiny_cfg().to_dict()
    bad["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match="train.epochs"):
        jm.submit("backbone", bad)
    cfg = tiny_cfg()
    cfg.data.dataset_id = 99
    with pytest.raises(ConfigError, match="dataset_id"):
        jm.submit("backbone", cfg)
    with pytest.raises(ConfigError, match="options"):
        jm.submit("backbone", tiny_cfg(), options={"trials": 3})
    assert Tracker(home).list_runs() == [] and jm.jobs() == []


def test_mark_interrupted_at_start(home):
    tr = Tracker(home)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    r_dead = tr.create_run("backbone", {}, status="running")
    tr.update_run(r_dead, pid=dead.pid)
    r_lost = tr.create_run("dact", {}, status="queued")  # this process, but no job manager runs it
    r_done = tr.create_run("dact", {}, status="finished")
    jm = JobManager(home)
    try:
        assert set(jm.interrupted) == {r_dead, r_lost}
        assert tr.get_run(r_dead)["status"] == "interrupted" and tr.get_run(r_lost)["status"] == "interrupted"
        assert "interrupted" in tr.get_run(r_dead)["error"]
        assert tr.get_run(r_done)["status"] == "finished"
    finally:
        jm.shutdown()


# --- engine kinds (fake engines: the real ones are tested in their own files) ----------------------------------


@dataclass
class FakePBTConfig:
    population: int = 2
    generations: int = 1

    def validate(self):
        if self.population < 2:
            raise ConfigError("pbt.population must be >= 2")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data).validate()


@dataclass
class FakeResult:
    parent_run_id: int
    best_run_id: int

    def summary(self):
        return {"parent_run_id": self.parent_run_id, "best_run_id": self.best_run_id}


def _fake_engine(monkeypatch, adopt: bool, fail: bool = False):
    """A fake engine module behind the real engine interface: it adopts the job's run as its parent (as every
    engine does), or — as a pipeline resuming an earlier run of its name — records another parent run."""
    import types

    from dact_lib import engines

    calls = {}

    def run_engine(cfg, settings, ctx):
        calls.update(pbt=settings, run_id=ctx.run_id)
        tracker = ctx.tracker
        parent = ctx.run_id if adopt else tracker.create_run("pbt", cfg.to_dict(), status="running")
        child = tracker.create_run(cfg.kind, cfg.to_dict(), parent_id=parent, status="finished")
        if fail:
            raise RuntimeError("member exploded")
        if not adopt:
            tracker.set_status(parent, "finished")
        return FakeResult(parent_run_id=parent, best_run_id=child)

    module = types.ModuleType("fake_pbt_engine")
    module.run_engine, module.FakePBTConfig = run_engine, FakePBTConfig
    monkeypatch.setitem(sys.modules, "fake_pbt_engine", module)
    monkeypatch.setitem(engines.ENGINES, "pbt", dataclasses.replace(
        engines.ENGINES["pbt"], module="fake_pbt_engine", settings_class="FakePBTConfig"))
    return calls


@pytest.mark.parametrize("adopt", [True, False])
def test_engine_job_links_runs(home, manager, monkeypatch, adopt):
    calls = _fake_engine(monkeypatch, adopt)
    jm = manager()
    with pytest.raises(ConfigError, match="population"):
        jm.submit("pbt", tiny_cfg(), options={"population": 1})
    with pytest.raises(ConfigError, match="Unknown option"):
        jm.submit("pbt", tiny_cfg(), options={"bogus": 1})
    rid = jm.submit("pbt", tiny_cfg(), options={"population": 3})
    assert jm.wait(rid, 10) == "finished"
    assert calls["pbt"] == FakePBTConfig(population=3, generations=1) and calls["run_id"] == rid
    run = Tracker(home).get_run(rid)
    assert run["status"] == "finished" and run["kind"] == "pbt"
    assert run["config"]["pbt"] == {"population": 3, "generations": 1} and run["config"]["run"]["kind"] == "backbone"
    if adopt:
        assert run["summary"]["best_run_id"] == rid + 1 and "engine_run_id" not in run["summary"]
    else:
        assert run["summary"]["engine_run_id"] == rid + 1 and run["summary"]["best_run_id"] == rid + 2


@pytest.mark.parametrize("adopt", [True, False])
def test_engine_failure_is_recorded(home, manager, monkeypatch, adopt):
    _fake_engine(monkeypatch, adopt, fail=True)
    jm = manager()
    rid = jm.submit("pbt", tiny_cfg())
    assert jm.wait(rid, 10) == "failed"
    run = Tracker(home).get_run(rid)
    assert run["status"] == "failed" and "member exploded" in run["error"]
