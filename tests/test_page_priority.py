"""The pages yield to the work (issue 28): page threads run below the jobs' worker processes, whose spawner thread
keeps the server's priority — a child process inherits the niceness of the thread that starts it (Linux)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread niceness is a Linux/POSIX feature")


def _nice_of_thread_named(name: str, work) -> int:
    out = {}

    def body():
        out["value"] = work()

    t = threading.Thread(target=body, name=name)
    t.start()
    t.join()
    return out["value"]


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _child_nice() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True,
                              text=True, check=True).stdout)


def test_page_threads_run_below_the_workers_which_keep_the_servers_priority(monkeypatch):
    from dact_lib import jobs
    from ui import state

    monkeypatch.setenv("DACT_LAB_PAGE_NICE", "7")
    base = _own_nice()
    spawner = jobs.start_spawner()  # started here, at the server's priority
    try:
        state.yield_to_jobs()
        page = _nice_of_thread_named("ScriptRunner.scriptThread", _own_nice)
        other = _nice_of_thread_named("some-other-thread", _own_nice)
        assert page == max(base, 7) and other == base
        # a worker started from a page thread: directly it would inherit the page's priority, via the spawner not
        direct = _nice_of_thread_named("ScriptRunner.scriptThread", _child_nice)
        spawned = _nice_of_thread_named("ScriptRunner.scriptThread", lambda: spawner.call(_child_nice))
        assert direct == max(base, 7) and spawned == base
    finally:
        threading.setprofile(None)


def test_errors_in_the_spawner_reach_the_caller():
    from dact_lib import jobs

    def boom():
        raise ValueError("no such program")

    with pytest.raises(ValueError, match="no such program"):
        jobs.start_spawner().call(boom)


def test_page_nice_zero_leaves_the_threads_alone(monkeypatch):
    from ui import state

    monkeypatch.setenv("DACT_LAB_PAGE_NICE", "0")
    base = _own_nice()
    state.yield_to_jobs()
    assert _nice_of_thread_named("ScriptRunner.scriptThread", _own_nice) == base
    monkeypatch.setenv("DACT_LAB_PAGE_NICE", "x")
    assert state.page_nice() == state.PAGE_NICE
