"""Two small costs that unit tests used to time with thresholds (tests/test_tracker.py, tests/test_encoders.py):

* ``TrackerCallback.on_step`` — the training loop calls it every step; it only appends to a buffer and writes the
  buffer in one transaction every ``flush_every_s``. Rows: per-step cost (µs) of the buffered path, flushes
  included, at a few flush intervals; and, for scale, a flush after every step (one transaction per step).
* ``encoders.bundled_model_dir()`` on an already extracted, verified folder — it reads the ``.verified`` marker
  only. Rows: that call (µs), and for scale one full re-hash of the 90 MB weights (what a missing marker costs).

The tests now check the behaviour (buffering and one write per interval; no hash / no zip on a verified folder);
this script prints the times, on this machine, in a table. Nothing is asserted: wall time is noisy on a shared
machine (load average printed).

    .venv/bin/python bench/tracker_encoder_timing.py              # ~5 s (+ ~2 s for the encoder's first extraction)
    .venv/bin/python bench/tracker_encoder_timing.py --steps 500  # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine_info, markdown_table, save_json, set_threads  # noqa: E402


def time_on_step(home: Path, steps: int, flush_every_s: float, repeats: int) -> dict:
    from dact_lib.callbacks import LoopState
    from dact_lib.tracker import Tracker, TrackerCallback

    tr = Tracker(home)
    logs = {"train_loss": 0.5, "lr": 1e-4, "grad_norm": 1.2, "ponder": 0.3}
    per_step = []
    for _ in range(repeats):
        rid = tr.create_run("backbone")
        cb = TrackerCallback(tr, rid, flush_every_s=flush_every_s)
        state = LoopState(run_id=rid)
        t0 = time.perf_counter()
        for i in range(steps):
            state.step = i + 1
            cb.on_step(state, logs)
        per_step.append((time.perf_counter() - t0) / steps)
        cb.flush()
        assert len(tr.get_metrics(rid)) == steps * len(logs)
    med = statistics.median(per_step)
    return {"what": "TrackerCallback.on_step", "setting": f"flush_every_s = {flush_every_s:g}",
            "calls": steps, "median_us": 1e6 * med, "best_us": 1e6 * min(per_step),
            "share_of_100ms_step_pct": 100 * med / 0.1}


def time_bundled(calls: int, repeats: int) -> list[dict]:
    from dact_lib import encoders as E

    d = E.bundled_model_dir()  # extracts once into the cache when needed (not timed)
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            E.bundled_model_dir()
        per_call.append((time.perf_counter() - t0) / calls)
    t0 = time.perf_counter()
    E.sha256_file(d / E.WEIGHTS_FILE)
    rehash = time.perf_counter() - t0
    med = statistics.median(per_call)
    return [{"what": "bundled_model_dir()", "setting": "verified folder (marker read)", "calls": calls,
             "median_us": 1e6 * med, "best_us": 1e6 * min(per_call)},
            {"what": "sha256 of the weights", "setting": "what a folder without a marker costs", "calls": 1,
             "median_us": 1e6 * rehash, "best_us": 1e6 * rehash}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000, help="on_step calls per measurement (default 3000)")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per row; the median is printed")
    ap.add_argument("--calls", type=int, default=200, help="bundled_model_dir() calls per measurement")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine_info(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dact_bench_tracker_") as tmp:
        home = Path(tmp)
        for every in (2.0, 0.05):  # the default interval, and the one the unit test used
            rows.append(time_on_step(home, args.steps, every, args.repeats))
        per_step_flush = time_on_step(home, max(50, args.steps // 10), 0.0, args.repeats)
        per_step_flush["setting"] = "flush_every_s = 0 (one transaction per step)"
        rows.append(per_step_flush)
    rows += time_bundled(args.calls, args.repeats)
    print(describe_machine(info))
    print()
    print(markdown_table(rows, [("what", "what"), ("setting", "setting"), ("calls", "calls per run"),
                                ("median_us", "median µs / call", 1), ("best_us", "best µs / call", 1),
                                ("share_of_100ms_step_pct", "% of a 0.1 s step", 3)]))
    path = save_json("tracker_encoder_timing.json", {"machine": info, "args": vars(args), "rows": rows})
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
