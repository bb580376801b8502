"""What a run ran on: the process's environment, recorded once when a run starts (:func:`environment`: package
versions, the project's git commit, the command line), and the system metrics sampled while it trains
(:class:`SystemSampler`: the process's CPU share and resident memory, the GPU's utilisation and memory where torch
uses CUDA). Standard library only (psutil when it is installed, else ``/proc``); nothing here imports torch."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

#: the distributions whose versions a run records (``python`` is the interpreter's)
PACKAGES = ("torch", "transformers", "dact-lab", "optuna", "onnxruntime")
#: seconds between two samples of the system metrics (``$DACT_LAB_SYS_METRICS_S``; 0 = none)
SYS_METRICS_ENV = "DACT_LAB_SYS_METRICS_S"
DEFAULT_SYS_METRICS_S = 15.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str | None]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ...}``: None for a package that is not installed."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(root: Path = PROJECT_ROOT, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool | None}`` of the git checkout at ``root``, None when it is none (an installed
    package). ``git`` answers when it is installed (``dirty``: tracked files changed); without it the commit is read
    from ``.git`` itself and ``dirty`` is None. Never raises."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if commit.returncode == 0:
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=timeout_s, check=False)
            return {"commit": commit.stdout.strip(),
                    "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        pass
    sha = _read_git_head(root / ".git")
    return {"commit": sha, "dirty": None} if sha else None


def _read_git_head(git_dir: Path) -> str | None:
    """HEAD's commit from the files of a ``.git`` folder (a ref, a packed ref or a detached sha), or None."""
    try:
        if git_dir.is_file():  # a worktree / submodule: "gitdir: <path>"
            git_dir = (git_dir.parent / git_dir.read_text().split(":", 1)[1].strip()).resolve()
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = git_dir / "commondir"
        base = (git_dir / common.read_text().strip()).resolve() if common.is_file() else git_dir
        for d in (git_dir, base):
            if (d / ref).is_file():
                return (d / ref).read_text().strip()
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except (OSError, IndexError, ValueError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    return {"packages": package_versions(), "git": git_state(), "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count()}


def environment() -> dict[str, Any]:
    """The environment of this process, as a run records it in its summary (``summary["environment"]``) when it
    starts: ``packages`` (:data:`PACKAGES` and python), ``git`` (:func:`git_state` of the project, None outside a
    checkout), ``argv`` (the command line), ``executable``, ``platform``, ``machine``, ``cpus`` and — where this
    process has imported torch — ``torch`` (its CUDA build and the GPUs it sees). Versions and git are read once per
    process; never raises."""
    env = dict(_static_environment())
    env["argv"] = [str(a) for a in sys.argv]
    env["executable"] = sys.executable
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            cuda = torch.cuda.is_available()
            env["torch"] = {"cuda": getattr(torch.version, "cuda", None), "cuda_available": bool(cuda),
                            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                            if cuda else []}
        except Exception:  # noqa: BLE001 - a broken CUDA set-up must not stop a run from starting
            env["torch"] = {"cuda": getattr(getattr(torch, "version", None), "cuda", None)}
    return env


# ------------------------------------------------------------------------------------------------- system metrics

def sys_metrics_interval() -> float:
    """Seconds between system-metric samples: ``$DACT_LAB_SYS_METRICS_S`` (0 = off), else 15."""
    raw = os.environ.get(SYS_METRICS_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_SYS_METRICS_S
    except ValueError:
        return DEFAULT_SYS_METRICS_S
    return value if value >= 0 else DEFAULT_SYS_METRICS_S


def rss_mb() -> float | None:
    """This process's resident memory in MiB (psutil, else /proc/self/statm), None where neither is there."""
    with contextlib.suppress(Exception):  # psutil absent or refused: /proc
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class SystemSampler:
    """Samples the system metrics of this process: ``sys/cpu_percent`` (CPU time of every thread of the process
    over wall time since the previous sample, ×100: 400 = four cores busy), ``sys/rss_mb`` and, where torch has
    initialised CUDA, ``sys/gpu_util_percent`` (needs pynvml; left out without it), ``sys/gpu_mem_allocated_mb``,
    ``sys/gpu_mem_reserved_mb`` and ``sys/gpu_mem_peak_mb`` of the current device. :meth:`due` says whether
    ``every_s`` has passed since the previous sample (or since the sampler was made)."""

    def __init__(self, every_s: float | None = None) -> None:
        self.every_s = sys_metrics_interval() if every_s is None else float(every_s)
        self.reset()

    def reset(self) -> None:
        self._wall, self._cpu = time.monotonic(), time.process_time()

    def due(self) -> bool:
        return self.every_s > 0 and time.monotonic() - self._wall >= self.every_s

    def sample(self) -> dict[str, float]:
        wall, cpu = time.monotonic(), time.process_time()
        out: dict[str, float] = {}
        if wall > self._wall:
            out["sys/cpu_percent"] = 100.0 * (cpu - self._cpu) / (wall - self._wall)
        self._wall, self._cpu = wall, cpu
        rss = rss_mb()
        if rss is not None:
            out["sys/rss_mb"] = rss
        out.update(gpu_metrics())
        return out


def gpu_metrics() -> dict[str, float]:
    """The current CUDA device's utilisation and memory, where this process has imported torch and initialised
    CUDA (never initialises it); ``{}`` otherwise."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return {}
        out = {"sys/gpu_mem_allocated_mb": torch.cuda.memory_allocated() / 2**20,
               "sys/gpu_mem_reserved_mb": torch.cuda.memory_reserved() / 2**20,
               "sys/gpu_mem_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU metrics
        return {}
    with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml
        out["sys/gpu_util_percent"] = float(torch.cuda.utilization())
    return out
