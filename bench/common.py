"""Helpers shared by the benchmark scripts in bench/: data, machine facts, timers, matmul peak, tables, JSON.

Nothing here changes dact_lib; every number a bench prints is measured in that bench's own process(es).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data"
OUT_DIR = ROOT / "bench" / "out"


# --- data --------------------------------------------------------------------------------------------------------
def sst2_paths(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    d = Path(data_dir) / "sst2"
    return d / "train.csv", d / "dev.csv"


def require_data(data_dir: str | os.PathLike) -> tuple[Path, Path]:
    """The SST-2 train/dev paths, or a clean exit (status 0, message on stderr) when they are absent."""
    train, dev = sst2_paths(data_dir)
    missing = [str(p) for p in (train, dev) if not p.is_file()]
    if missing:
        print(f"SKIPPED: SST-2 data not found ({', '.join(missing)}). These benches need "
              f"<data-dir>/sst2/train.csv and dev.csv (developers and CI have them under ../shared/data); "
              f"pass --data-dir DIR.", file=sys.stderr)
        sys.exit(0)
    return train, dev


def load_sst2(data_dir: str | os.PathLike, max_rows: int | None = None, seed: int = 0):
    """(train, dev) TextDatasets; ``max_rows`` keeps a stratified sample of each (dev: at most that many)."""
    from dact_lib.data import read_csv

    train_p, dev_p = require_data(data_dir)
    train = read_csv(train_p, max_rows=max_rows, seed=seed)
    dev = read_csv(dev_p, max_rows=max_rows, seed=seed, label_maps=train.label_maps)
    return train, dev


# --- machine -----------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    flags = cpu_flags()
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_isa": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
        "loadavg_start": loadavg(),
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        info["accelerate"] = None
    return info


def describe_machine(info: dict[str, Any]) -> str:
    la = info.get("loadavg_start")
    la_s = "/".join(f"{x:.2f}" for x in la) if la else "n/a"
    return (f"{info['date']} · {info['cpu']} · {info['logical_cpus']} logical CPUs (shared) · torch "
            f"{info['torch']} ({info['torch_threads']} threads, capability {info['cpu_capability']}) · "
            f"transformers {info['transformers']} · accelerate {info.get('accelerate')} · bf16 ISA: "
            f"{', '.join(info['bf16_isa']) or 'none'} · load avg at start {la_s}")


# --- timing ------------------------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system): ``time.process_time`` (CLOCK_PROCESS_CPUTIME_ID,
    ns resolution, unlike getrusage's tick accounting on some kernels)."""
    return time.process_time()


def rusage_cpu_seconds() -> float:
    """The same from getrusage (user + system), for cross-checking."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class Stopwatch:
    """Wall (perf_counter) and process CPU time between start() and stop()."""

    wall0: float = 0.0
    cpu0: float = 0.0
    wall: float = 0.0
    cpu: float = 0.0

    def start(self) -> "Stopwatch":
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()
        return self

    def stop(self) -> "Stopwatch":
        self.wall, self.cpu = time.perf_counter() - self.wall0, cpu_seconds() - self.cpu0
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --- matmul peak -------------------------------------------------------------------------------------------------
def matmul_peak(dtype_name: str, sizes: Sequence[int] = (1024, 1536, 2048), repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of square matmuls (2 n^3 FLOPs each) at the current torch thread count."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    best, per_size = 0.0, {}
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        a @ b  # warm-up
        t_best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            t_best = min(t_best, time.perf_counter() - t)
        gf = 2 * n ** 3 / t_best / 1e9
        per_size[n] = round(gf, 1)
        best = max(best, gf)
    return {"dtype": dtype_name, "gflops": best, "per_size": per_size}


def bf16_check(threads: int) -> tuple[bool, str, dict[str, Any]]:
    """Whether bf16 autocast is worth benchmarking here: the CPU has a native bf16 dot-product ISA (avx512_bf16 or
    amx_bf16) AND a bf16 matmul is measured faster than fp32. Returns (ok, reason, peaks)."""
    import torch

    torch.set_num_threads(threads)
    flags = cpu_flags()
    isa = sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile"))
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    ratio = peaks["bf16"]["gflops"] / max(peaks["fp32"]["gflops"], 1e-9)
    if not isa:
        return False, (f"no native bf16 ISA (avx512_bf16/amx_bf16 absent from /proc/cpuinfo); bf16 matmul is "
                       f"{ratio:.2f}x fp32"), peaks
    if ratio < 1.0:
        return False, f"bf16 ISA present ({', '.join(isa)}) but bf16 matmul is only {ratio:.2f}x fp32", peaks
    return True, f"bf16 ISA {', '.join(isa)}; bf16 matmul peak {ratio:.2f}x fp32", peaks


# --- output ------------------------------------------------------------------------------------------------------
def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]] | Sequence[tuple[str, str, int]]) -> str:
    """``columns``: (key, header[, decimals]). Missing keys print as an em dash."""
    cols = [(c[0], c[1], c[2] if len(c) > 2 else 2) for c in columns]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), nd) for k, _, nd in cols) + " |")
    return "\n".join(lines)


def save_json(name: str, obj: Any) -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / name
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")
    return path


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
