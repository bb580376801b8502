"""Crash-safe files of a run folder: every write goes to a temporary file in the same folder, is fsynced, then
renamed over the target (and the folder fsynced), so a kill at any moment leaves either the old file or the new one,
never an empty or half-written one. :func:`read_json` turns a damaged file into an error that says what to do.

Temporary files are named ``.<name>.<pid>.tmp``; :func:`clean_stale_temp` removes those left by a dead process.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .errors import DactLabError

TMP_SUFFIX = ".tmp"


def _tmp_path(path: Path) -> Path:
    # the writing thread and process in the name: two writers of one file (two jobs, two threads) never share it
    return path.with_name(f".{path.name}.{threading.get_ident()}-{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, fsync it and rename it onto ``path``.
    On any error the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and disk_full(exc):
            raise DactLabError(disk_full_message(path)) from None
        raise
    _fsync_dir(path.parent)
    return path


def disk_full(exc: BaseException) -> bool:
    """A write that failed for want of space: OSError ENOSPC / EDQUOT, or a library's own error saying so (safetensors
    raises "No space left on device" as a SafetensorError, not an OSError)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "no space left on device" in str(exc).lower() or "disk quota exceeded" in str(exc).lower()


def disk_full_message(path: Path) -> str:
    try:
        free = shutil.disk_usage(path.parent).free
        where = f"{free / 2**20:,.1f} MiB free on the file system of {path.parent}"
    except OSError:
        where = f"the file system of {path.parent}"
    return (f"No space left on the device while writing {path} ({where}): nothing was half-written — the earlier "
            f"{path.name}, if any, is unchanged. Free some space (or move the home with DACT_LAB_HOME) and resume or "
            "start the run again.")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dump_kwargs: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, **{"indent": 2, **dump_kwargs}))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file of a run folder; a missing, empty or damaged one raises :class:`DactLabError` naming the
    file and the fix (not a JSONDecodeError traceback)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DactLabError(f"{path} is missing: the run folder {path.parent} is incomplete (the run did not "
                           f"finish writing its {what}). Retrain it, or resume it if it was interrupted.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DactLabError(f"{path} cannot be read ({exc}): the run folder is damaged; retrain the run.") from None
    try:
        return json.loads(text)
    except ValueError:
        state = "empty" if not text.strip() else "damaged (not JSON)"
        raise DactLabError(f"{path} is {state}: the run's {what} was not written completely (a crash or kill while "
                           f"it was saved). Retrain the run, or resume it if it was interrupted.") from None


def _pid_of_tmp(name: str) -> int | None:
    parts = name[: -len(TMP_SUFFIX)].rsplit(".", 1)
    try:
        return int(parts[1].rsplit("-", 1)[-1]) if len(parts) == 2 else None
    except ValueError:
        return None


def clean_stale_temp(folder: str | Path) -> list[Path]:
    """Remove temporary files (``.<name>.<pid>.tmp``, and the older ``<name>.tmp``) that no live process of this
    host is writing, in ``folder`` and its subfolders. Returns the removed paths."""
    from .tracker import pid_alive

    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(f"*{TMP_SUFFIX}"):
        if not p.is_file():
            continue
        pid = _pid_of_tmp(p.name) if p.name.startswith(".") else None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        if pid == os.getpid():
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def check_replaceable_dir(out: Path, recognise, what: str) -> None:
    """``out`` may receive a new ``what`` (e.g. "DACT Lab export"): it does not exist, is an empty folder, or holds
    an earlier one — ``recognise(out)`` returns something true and raises no DactLabError. Anything else is refused:
    other files are never overwritten."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DactLabError(f"{out} is a file: give the path of a new or empty folder for the {what}.")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = bool(recognise(out))
        except DactLabError:
            earlier = False
        if not earlier:
            raise DactLabError(f"{out} is not empty and holds no earlier {what}: choose a new or empty folder, or "
                               f"delete this one first (an earlier {what} there is replaced; other files are never "
                               "overwritten).")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (beside it, same file system). An earlier ``out`` is renamed aside
    first, put back if the move fails, and removed after: at every moment ``out`` is the old folder or the new one."""
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
