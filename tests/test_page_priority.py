"""The pages yield to the work (issue 28): the dashboard's threads run below the jobs' worker processes, whose
spawner thread keeps the server's priority — a thread or child process inherits the niceness of the thread that
starts it (Linux). Checked in a separate interpreter: lowering this test process's main thread would slow every
later test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread niceness is a Linux/POSIX feature")

PROBE = r"""
import json, os, subprocess, sys, threading
from dact_lib import jobs
from ui import state

def own():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

def child():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True,
                              text=True, check=True).stdout)

def in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("v", fn()))
    t.start(); t.join()
    return box["v"]

base = own()
out = {"base": base}
def first_page_run():  # Streamlit runs app.py in a thread the main (event loop) thread started
    state.yield_to_jobs()
    out["page"] = own()
in_thread(first_page_run)
out["main"] = own()
out["later_page"] = in_thread(own)  # a later rerun: a thread the main thread starts
out["direct_child"] = in_thread(child)
out["spawned_child"] = in_thread(lambda: jobs.start_spawner().call(child))
print(json.dumps(out))
"""


def _probe(nice: str) -> dict:
    env = {**os.environ, "DACT_LAB_PAGE_NICE": nice, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_dashboard_runs_below_the_workers_which_keep_the_servers_priority():
    got = _probe("7")
    low = max(got["base"], 7)
    assert got["page"] == got["main"] == got["later_page"] == low  # the event loop and every page run
    assert got["direct_child"] == low  # a worker started from a page thread would be lowered too ...
    assert got["spawned_child"] == got["base"]  # ... the spawner's keep the server's priority


def test_page_nice_zero_leaves_every_priority_alone():
    got = _probe("0")
    assert got["page"] == got["main"] == got["later_page"] == got["spawned_child"] == got["base"]


def test_errors_in_the_spawner_reach_the_caller():
    from dact_lib import jobs

    def boom():
        raise ValueError("no such program")

    with pytest.raises(ValueError, match="no such program"):
        jobs.start_spawner().call(boom)


def test_a_bad_page_nice_falls_back_to_the_default(monkeypatch):
    from ui import state

    monkeypatch.setenv("DACT_LAB_PAGE_NICE", "x")
    assert state.page_nice() == state.PAGE_NICE
