"""Mutants behind issue 12's "tests that cannot fail" items on early exits, the tracker callback, the bundled
encoder's marker and the job scheduler, and the tests that must kill them. Not a benchmark and not collected by
pytest; run it by hand:

    .venv/bin/python bench/mutate_exits.py [--only NAME ...] [--against DIR]

Each mutant is applied to a private copy of the working tree (the tree itself is never touched); the listed tests
run there; a mutant is *killed* when they fail. ``--against DIR``: run the tests of another tests folder in the
copy (e.g. an older one: ``git archive <commit> tests | tar -x -C DIR``, then ``--against DIR/tests``), to see
which mutants those let through. Prints a table; exit status 1 when a mutant survives, 2 when the unmutated copy
already fails the tests. About 3 minutes (the pipeline fixture runs 5 times, the first on the unmutated copy).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EXITS = "tests/test_exits.py"
TRAIN_KINDS = "tests/test_train.py::test_each_kind_trains_and_records"
PIPE_SWEEP = "tests/test_dact_pipeline.py::test_parent_run_events_metrics_and_stage_files"
PIPE_STAGE3 = "tests/test_dact_pipeline.py::test_stage3_fits_halting_points_on_the_best_stage2_model"
PIPE_RELOAD = "tests/test_dact_pipeline.py::test_every_stage3_point_reloads_as_a_model_that_reproduces_it"
ON_STEP = "tests/test_tracker.py::test_tracker_callback_on_step_only_buffers_and_flushes_once_per_interval"
MARKER = "tests/test_encoders.py::test_bundled_second_call_reads_only_the_marker"
QUEUE = ["tests/test_jobs.py::test_queue_limit_second_job_waits",
         "tests/test_jobs.py::test_max_concurrent_two_runs_both"]
ON_STEP_FLUSH = "        if _time.monotonic() - self._last_flush >= self.flush_every_s:\n            self.flush()\n"

#: name -> (file, original text, mutated text, tests that must fail)
MUTANTS: dict[str, tuple[str, str, str, list[str]]] = {
    "infer-records-every-exit-at-N": (
        "dact_lib/modeling_dact.py", "                exit_layer[done] = n\n", "                exit_layer[done] = N\n",
        [EXITS]),
    "dact-rule-halts-the-batch-together": (
        "dact_lib/dact.py", "        halt = should_halt(a_n, p_n, n_layers - int(n))  # d = N - n",
        "        halt = should_halt(a_n, p_n, n_layers - int(n)).all().expand(rows.shape[0])  # d = N - n",
        [EXITS, PIPE_STAGE3, PIPE_RELOAD]),
    "exits-page-data-every-row-at-the-last-layer": (
        "dact_lib/exits.py", "        exit_layer[idx] = res.exit_layer.cpu().numpy()\n",
        "        exit_layer[idx] = model.num_layers\n", [EXITS]),
    "forward-reports-every-exit-at-N": (
        "dact_lib/modeling_dact.py",
        "            exit_layer = dact.run_policy_offline(dact.DactPolicy(), y.detach(), h.detach()).exit_layer\n",
        "            exit_layer = torch.full((y.shape[0],), y.shape[1], dtype=torch.long)\n", [TRAIN_KINDS, EXITS]),
    "test-metrics-measured-on-the-validation-split": (
        "dact_lib/train.py",
        "            res = evaluate_encoded(model, enc_test, max(tc.batch_size, 64), device, tc.precision)\n"
        "            test_metrics",
        "            res = evaluate_encoded(model, enc_val, max(tc.batch_size, 64), device, tc.precision)\n"
        "            test_metrics", [TRAIN_KINDS]),
    "backbone-encoder-not-exported": (
        "dact_lib/train.py", '            if cfg.kind == "backbone":\n                model.export_encoder(',
        "            if False:\n                model.export_encoder(", [TRAIN_KINDS]),
    "stage3-lambda-grid-stops-short-of-the-top": (
        "dact_lib/tuning/dact_pipeline/stage3.py", "lo + (hi - lo) * i / (k - 1)", "lo + (hi - lo) * i / k",
        [PIPE_STAGE3]),
    "stage3-points-measured-without-their-halting-units": (
        "dact_lib/halting.py", "    avg, acc = evaluate_halting(cache.y, h, cache.targets)\n    a_N",
        "    avg, acc = evaluate_halting(cache.y, torch.ones_like(h), cache.targets)\n    a_N", [PIPE_STAGE3]),
    "entropy-policy-on-the-normalised-entropy": (
        "dact_lib/dact.py", "        halt = entropy(y_n) < self.threshold\n",
        "        halt = entropy(y_n) / math.log(y_n.shape[-1]) < self.threshold\n", [PIPE_SWEEP]),
    "sweep-exit-layer-rounded": (
        "dact_lib/evaluate.py", '"avg_exit_layer": float(res.exit_layer.float().mean()),',
        '"avg_exit_layer": float(res.exit_layer.float().mean().round()),', [PIPE_SWEEP]),
    "tracker-callback-writes-every-step": (
        "dact_lib/tracker.py", ON_STEP_FLUSH, "        if True:\n            self.flush()\n", [ON_STEP]),
    "tracker-callback-never-writes-between-evals": (
        "dact_lib/tracker.py", ON_STEP_FLUSH, "        if False:\n            self.flush()\n", [ON_STEP]),
    "bundled-encoder-rehashed-every-call": (
        "dact_lib/encoders.py",
        "    if _marker_ok(target, BUNDLED_SHA256):\n        return target\n    with _extract_lock:\n"
        "        if _marker_ok(target, BUNDLED_SHA256):",
        "    with _extract_lock:\n        if False:", [MARKER]),
    "scheduler-ignores-max-concurrent": (
        "dact_lib/jobs.py", "while self._queue and self._running() < self.max_concurrent and not self._closed:",
        "while self._queue and not self._closed:", QUEUE),
}


def copy_tree(dst: Path) -> None:
    skip = {".venv", ".dact_cache", ".git", "out"}

    def ignore(folder, names):
        return [n for n in names if n in skip or n == "__pycache__"]

    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def run_mutant(copy: Path, name: str) -> tuple[bool, str]:
    path, old, new, tests = MUTANTS[name]
    target = copy / path
    text = target.read_text(encoding="utf-8")
    if text.count(old) != 1:
        return False, f"the original text is not found exactly once in {path}: update this mutant"
    target.write_text(text.replace(old, new), encoding="utf-8")
    try:
        env = dict(os.environ, DACT_LAB_CACHE=os.environ.get("DACT_LAB_CACHE", str(ROOT / ".dact_cache")))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=900)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED") or " passed" in ln or " failed" in ln]
        if r.returncode == 4 or "no tests ran" in r.stdout:
            return False, "tests not found: " + (lines[-1] if lines else r.stdout[-200:])
        return r.returncode != 0, (lines[-1] if lines else "")
    finally:
        target.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(MUTANTS), help="run only these mutants")
    ap.add_argument("--against", type=Path, help="a tests folder to use instead of the tree's tests/")
    args = ap.parse_args(argv)
    names = args.only or list(MUTANTS)
    survived = 0
    with tempfile.TemporaryDirectory(prefix="dact_mutants_") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        if args.against:
            shutil.rmtree(copy / "tests")
            shutil.copytree(args.against, copy / "tests")
        tests = sorted({t for n in names for t in MUTANTS[n][3]})
        env = dict(os.environ, DACT_LAB_CACHE=os.environ.get("DACT_LAB_CACHE", str(ROOT / ".dact_cache")))
        base = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=1800)
        if base.returncode != 0:  # a mutant only counts as killed when the unmutated tree passes
            print("the unmutated copy fails these tests already:\n" + base.stdout[-3000:])
            return 2
        print("| mutant | killed | tests |\n|---|---|---|")
        for name in names:
            killed, detail = run_mutant(copy, name)
            survived += not killed
            print(f"| {name} | {'yes' if killed else 'NO'} | {detail} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
