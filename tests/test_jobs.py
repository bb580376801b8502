"""JobManager: queue limit, cancellation (queued and running), failures recorded, interrupted runs at start; jobs
run in worker processes (a pid of their own, a fast cancel, a killed worker recorded, ending with the server,
adopted by a later manager). Tests that patch the loop in-process use ``processes=False``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import dataclasses
from pathlib import Path
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
    """A fake ``train`` that blocks until released (or cancelled), recording which runs started (it lives in this
    process: the tests that use it run ``JobManager(processes=False)``)."""

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
    # it ran in a worker process of its own, given its job as JSON, which wrote the run as the CLI does
    assert run["pid"] != os.getpid() and jm.get(rid)["pid"] == run["pid"]
    spec = json.loads((home / "runs" / str(rid) / "job" / "spec.json").read_text())
    assert spec["run_id"] == rid and spec["kind"] == "dact" and spec["parent_pid"] == os.getpid()
    assert spec["config"]["encoder"] == "tiny" and spec["threads"] >= 1
    (started,) = [e for e in Tracker(home).get_events(rid) if e["kind"] == "job_process"]
    assert started["payload"]["pid"] == run["pid"]
    assert (home / "runs" / str(rid) / "model.safetensors").exists()
    assert "val_accuracy" in run["summary"]["best"]
    assert not tracker_mod.liveness.is_live(rid)
    assert jm.active_count() == 0
    (job,) = jm.jobs()
    assert job["run_id"] == rid and job["state"] == "finished" and job["started"] and job["ended"]


def test_queue_limit_second_job_waits(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(processes=False, max_concurrent=1)
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
    jm = manager(processes=False, max_concurrent=2)
    ids = [jm.submit("backbone", tiny_cfg()) for _ in range(3)]
    assert wait_for(lambda: len(gate.started) == 2)  # the condition itself, with a deadline (no fixed sleep)
    assert [jm.status(i) for i in ids] == ["running", "running", "queued"]
    assert sorted(gate.started) == ids[:2]
    gate.release.set()
    assert [jm.wait(i, 10) for i in ids] == ["finished"] * 3


def test_cancel_queued_and_running(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(processes=False, max_concurrent=1)
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
    queued = jm.submit("backbone", tiny_cfg())  # behind it: starts once the cancelled job has stopped
    tr = Tracker(home)
    assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
    assert jm.status(queued) == "queued" and jm.ahead(queued) == 1
    pid = jm.get(rid)["pid"]
    assert jm.cancel(rid)
    assert jm.cancelling(rid) or jm.status(rid) == "cancelled"  # shown at once, before the worker has stopped
    assert jm.wait(rid, 60) == "cancelled"
    run = tr.get_run(rid)
    assert run["status"] == "cancelled" and run["ended"] is not None and run["error"] == "cancelled by user"
    assert not tracker_mod.liveness.pid_alive(pid) and not jm.cancelling(rid)
    assert jm.wait(queued, 120) == "finished"


def test_cancel_kills_a_worker_that_does_not_stop(home, manager):
    # a worker that cannot react (stopped with SIGSTOP; in life: a step of minutes inside native code) is killed
    # once cancel_grace_s has passed, and its run is recorded cancelled
    jm = manager(cancel_grace_s=1.0)
    rid = jm.submit("backbone", tiny_cfg(epochs=200, max_rows=400))
    tr = Tracker(home)
    assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
    pid = jm.get(rid)["pid"]
    os.kill(pid, signal.SIGSTOP)
    assert jm.cancel(rid)
    assert jm.wait(rid, 60) == "cancelled"
    run = tr.get_run(rid)
    assert run["status"] == "cancelled"
    assert "did not stop within 1 s and was ended" in run["error"]
    assert not tracker_mod.liveness.pid_alive(pid)


def test_a_killed_worker_is_recorded_failed_with_how_it_died(home, manager):
    jm = manager()
    rid = jm.submit("backbone", tiny_cfg(epochs=200, max_rows=400))
    tr = Tracker(home)
    assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
    pid = jm.get(rid)["pid"]
    os.kill(pid, signal.SIGKILL)  # the out-of-memory killer, a user's kill -9
    assert jm.wait(rid, 60) == "failed"
    run = tr.get_run(rid)
    assert run["status"] == "failed"
    assert f"worker process (pid {pid}) was ended by SIGKILL" in run["error"]
    assert "out-of-memory" in run["error"] and "Resume" in run["error"]
    assert jm.get(rid)["error"] == run["error"]
    assert any(e["kind"] == "job_error" for e in tr.get_events(rid))


_SERVER = """
import sys, time
from dact_lib.jobs import JobManager
sys.path.insert(0, {tests!r})
from test_jobs import tiny_cfg
jm = JobManager({home!r})
rid = jm.submit("backbone", tiny_cfg(epochs=200, max_rows=400))
print(rid, flush=True)
time.sleep(600)
"""


def _start_server(home, grace_s: float) -> subprocess.Popen:
    code = _SERVER.format(tests=str(Path(__file__).parent), home=str(home))
    env = {**os.environ, "DACT_LAB_ORPHAN_GRACE_S": str(grace_s)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_the_worker_ends_when_the_server_dies(home):
    # a server (here: a process holding a JobManager) killed with -9 and not started again leaves no worker behind:
    # the worker notices its parent is gone, waits the orphan grace (1 s here) for a new server to adopt it, then
    # stops and records its run 'interrupted' (resumable)
    server = _start_server(home, 1)
    try:
        rid = int(server.stdout.readline())
        tr = Tracker(home)
        assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
        worker = tr.get_run(rid)["pid"]
        assert worker != server.pid and tracker_mod.liveness.pid_alive(worker)
    finally:
        server.kill()
        server.wait()
    assert wait_for(lambda: not tracker_mod.liveness.pid_alive(worker), 60)
    run = tr.get_run(rid)
    assert run["status"] == "interrupted" and f"dashboard server (pid {server.pid}) stopped" in run["error"]


def test_a_job_survives_a_server_restart(home, manager):
    """Issue 28: a job survives a server restart — the server killed with -9, a new one (its job manager) started
    within the orphan grace adopts the worker, which goes on training and watches the new server; its cancel
    reaches it."""
    server = _start_server(home, 120)
    try:
        rid = int(server.stdout.readline())
        tr = Tracker(home)
        assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
        worker = tr.get_run(rid)["pid"]
    finally:
        server.kill()
        server.wait()
    assert wait_for(lambda: (jobs_mod.read_heartbeat(home, rid) or {}).get("orphaned") is True, 30)
    later = manager()  # the restarted server's job manager
    assert later.adopted == [rid] and rid not in later.interrupted
    assert wait_for(lambda: (jobs_mod.read_heartbeat(home, rid) or {}).get("watched_by") == os.getpid(), 30)
    at = tr.last_steps([rid])[rid]
    assert wait_for(lambda: tr.last_steps([rid])[rid] > at, 120)  # still training after the restart
    assert tracker_mod.liveness.pid_alive(worker) and tr.get_run(rid)["status"] == "running"
    assert later.cancel(rid)
    assert later.wait(rid, 60) == "cancelled"
    assert wait_for(lambda: not tracker_mod.liveness.pid_alive(worker), 60)


def test_the_orphan_grace_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DACT_LAB_ORPHAN_GRACE_S", raising=False)
    assert jobs_mod.orphan_grace_s() == 120.0
    monkeypatch.setenv("DACT_LAB_ORPHAN_GRACE_S", "0")
    assert jobs_mod.orphan_grace_s() == 0.0
    monkeypatch.setenv("DACT_LAB_ORPHAN_GRACE_S", "forever")
    with pytest.raises(ConfigError, match="DACT_LAB_ORPHAN_GRACE_S = 'forever' is invalid"):
        jobs_mod.orphan_grace_s()


def test_a_later_manager_adopts_a_live_worker_and_can_cancel_it(home, manager):
    first = manager()
    rid = first.submit("backbone", tiny_cfg(epochs=200, max_rows=400))
    tr = Tracker(home)
    assert wait_for(lambda: tr.last_steps([rid]).get(rid, 0) >= 1, 120)
    assert wait_for(lambda: (jobs_mod.read_heartbeat(home, rid) or {}).get("pid") == first.get(rid)["pid"], 30)
    # e.g. the dashboard's cached manager re-created in the same server: the live worker is found by pid and
    # heartbeat — shown running, not marked interrupted
    later = manager()
    assert later.adopted == [rid] and rid not in later.interrupted
    assert later.status(rid) == "running" and later.active_count() == 1
    assert tr.get_run(rid)["status"] == "running"
    assert later.cancel(rid)
    assert later.wait(rid, 60) == "cancelled"
    assert first.wait(rid, 60) == "cancelled"
    assert tr.get_run(rid)["status"] == "cancelled"


def test_max_jobs_from_the_environment(monkeypatch):
    monkeypatch.delenv("DACT_LAB_MAX_JOBS", raising=False)
    assert jobs_mod.default_max_jobs() == 1
    monkeypatch.setenv("DACT_LAB_MAX_JOBS", "3")
    assert jobs_mod.default_max_jobs() == 3
    monkeypatch.setenv("DACT_LAB_MAX_JOBS", "many")
    with pytest.raises(ConfigError, match="DACT_LAB_MAX_JOBS = 'many' is invalid: set it to a whole number"):
        jobs_mod.default_max_jobs()
    assert jobs_mod.job_threads(1) == jobs_mod.cpu_count() and jobs_mod.job_threads(10 ** 6) == 1


def test_an_unreadable_job_spec_is_refused_with_the_fix(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "dact_lib.job_process", str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "cannot read the job spec" in out.stderr and "start the job again" in out.stderr


def test_cancel_owner_finds_the_job_that_runs_a_child_run(home, manager, monkeypatch):
    gate = Gate()
    monkeypatch.setattr("dact_lib.train.train", gate)
    jm = manager(processes=False, max_concurrent=1)
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
    jm = manager(processes=False)  # the fake engine lives in this process
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
    jm = manager(processes=False)  # the fake engine lives in this process
    rid = jm.submit("pbt", tiny_cfg())
    assert jm.wait(rid, 10) == "failed"
    run = Tracker(home).get_run(rid)
    assert run["status"] == "failed" and "member exploded" in run["error"]


def test_a_worker_stays_in_the_servers_session_but_not_its_process_group(tmp_path):
    """Linux shares the CPU between sessions (autogroups) whatever their niceness: a worker in a session of its own
    got as much CPU as three watching tabs' server. It shares the server's session (so it runs above the lowered
    page threads) in a process group of its own (a Ctrl-C in the server's terminal does not reach it)."""
    import os
    import sys

    import pytest

    if sys.version_info < (3, 11):
        pytest.skip("Popen(process_group=) is Python 3.11+ (3.10: a session of its own)")
    from dact_lib.config import default_config
    from dact_lib.jobs import JobManager

    m = JobManager(tmp_path / "home")
    try:
        cfg = default_config("dact", encoder="tiny")
        cfg.train.epochs = 1
        cfg.train.device = "cpu"
        job = m._jobs.get(m.submit("dact", cfg)) if hasattr(m, "_jobs") else None
        import time

        proc, until = None, time.monotonic() + 300  # a condition, with a bound far above any machine's load
        while proc is None and time.monotonic() < until:
            proc = getattr(job, "process", None)
            time.sleep(0.05)
        assert proc is not None
        try:
            assert os.getsid(proc.pid) == os.getsid(0)
            assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
        except ProcessLookupError:
            pytest.skip("the worker ended before it could be looked at")
    finally:
        m.shutdown(cancel=True, timeout=60)
