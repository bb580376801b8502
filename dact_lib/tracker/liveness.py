"""Which runs are alive: the runs this process executes (a registry, not a global others edit) and whether a
recorded process still exists. :meth:`Tracker.mark_interrupted` uses both to mark the runs of dead processes."""
from __future__ import annotations

import os
import socket
import threading

_lock = threading.Lock()
_live: set[int] = set()


def mark_live(run_id: int) -> bool:
    """Record that this process executes ``run_id``; False when it already was (the caller does not own it)."""
    with _lock:
        new = int(run_id) not in _live
        _live.add(int(run_id))
        return new


def mark_done(run_id: int) -> None:
    with _lock:
        _live.discard(int(run_id))


def is_live(run_id: int) -> bool:
    with _lock:
        return int(run_id) in _live


def live_ids() -> set[int]:
    """A copy of the ids this process executes now."""
    with _lock:
        return set(_live)


def restore(ids: set[int]) -> None:
    """Replace the registry (tests restore it around each test)."""
    with _lock:
        _live.clear()
        _live.update(int(i) for i in ids)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host and is not a zombie."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    try:  # Linux: an exited but unreaped child is a zombie — dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        if state in (b"Z", b"X"):
            return False
    except OSError:
        pass
    return True


def hostname() -> str:
    return socket.gethostname()
