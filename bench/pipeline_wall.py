"""Is ``--timeout-min`` a wall? The issue's bar-sized pipeline, timed from outside (issue 27).

``dact-lab dact-pipeline --data <SST-2 train> --max-rows 300 --trials 2 --timeout-min T`` in a fresh home, once
per T, as a subprocess: its wall time against T (target: within T + 1 min), whether it finished with a model, the
stage-2 refit (trained under its share, or skipped and why) and whether the exit-policy sweep was timed.

    .venv/bin/python bench/pipeline_wall.py --timeouts 5 2 1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA_DIR, ROOT, describe_machine, machine_info, markdown_table, save_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    ap.add_argument("--timeouts", type=float, nargs="+", default=[5.0, 2.0, 1.0])
    ap.add_argument("--max-rows", type=int, default=300)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    data = Path(args.data_dir) / "sst2" / "train.csv"
    if not data.is_file():
        print(f"{data} is absent: nothing to measure.", file=sys.stderr)
        return 0
    print(describe_machine(machine_info(2)), flush=True)
    rows = []
    for t in args.timeouts:
        home = Path(tempfile.mkdtemp(prefix="dact_wall_"))
        cmd = [sys.executable, "-m", "dact_lib", "dact-pipeline", "--data", str(data), "--max-rows",
               str(args.max_rows), "--trials", str(args.trials), "--timeout-min", str(t), "--home", str(home),
               "--name", "wall", "--verbosity", "0"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = (time.monotonic() - t0) / 60
        from dact_lib.tracker import Tracker

        tr = Tracker(home)
        parents = tr.list_runs(kind="dact-pipeline")
        parent = parents[0] if parents else {}
        rd = tr.run_dir(parent["id"]) if parent else None
        st2 = json.loads((rd / "stage2.json").read_text()) if rd and (rd / "stage2.json").is_file() else {}
        sweep = [e["payload"] for e in tr.get_events(parent["id"], kinds=["exit_policy_sweep"])] if parent else []
        refit = st2.get("refit") or {}
        rows.append({"timeout_min": t, "wall_min": round(wall, 2), "over_min": round(wall - t, 2),
                     "within": "yes" if wall <= t + 1.0 else "NO", "status": parent.get("status"),
                     "exit": proc.returncode,
                     "final": (parent.get("summary") or {}).get("final_run_id"),
                     "winner": (parent.get("summary") or {}).get("final_source"),
                     "refit": "skipped" if "skipped" in refit else (refit.get("stop_reason") or
                                                                     ("trained" if refit else "none (all rows)")),
                     "sweep_timed": sweep[0]["timed"] if sweep else None})
        print(rows[-1], flush=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
    print(markdown_table(rows, [("timeout_min", "timeout min"), ("wall_min", "wall min"), ("over_min", "over"),
                                ("within", "≤ timeout + 1"), ("status", "status"), ("exit", "exit code"),
                                ("final", "final run"), ("winner", "final from"), ("refit", "stage-2 refit"),
                                ("sweep_timed", "sweep timed")]))
    save_json("pipeline_wall.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
