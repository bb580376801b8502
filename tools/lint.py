"""The project's lint gate, run by `.ci/run` (and `make lint`):

1. ruff (the rules in pyproject.toml's [tool.ruff]) — clean, no baseline;
2. complexity: no function of dact_lib over McCabe complexity 15 unless its ``def`` line (or the line above it)
   carries a ``# complexity: <why>`` comment;
3. mypy (pyproject.toml's [tool.mypy], where the strictness is stated): dact_lib clean — no error in it, whatever
   the baseline says; the rest (dashboard, tools, benches, examples) a per-file ratchet: a file that
   `.ci/mypy_baseline.json` does not list must have no error (every new file); a listed file may not have more
   errors than its count. A file with fewer is reported so the baseline can be lowered
   (`python tools/lint.py --update-baseline`), which only ever lowers it: it refuses while any file is over its
   count, so a clean file cannot be recorded back into the baseline.

Exit status 0 when all pass, 1 otherwise; each failure is printed with what to do."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".ci" / "mypy_baseline.json"
MAX_COMPLEXITY = 15


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def ruff() -> list[str]:
    p = run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."])
    return [] if p.returncode == 0 else [p.stdout.strip() or p.stderr.strip(), "fix them (`ruff check --fix .` "
                                         "fixes the marked ones)"]


def complexity() -> list[str]:
    p = run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--config",
             f"lint.mccabe.max-complexity={MAX_COMPLEXITY}", "--output-format", "concise", "dact_lib"])
    bad = []
    for line in p.stdout.splitlines():
        m = re.match(r"(.+?):(\d+):\d+: C901 (.*)", line)
        if not m:
            continue
        path, lineno = ROOT / m.group(1), int(m.group(2))
        src = path.read_text(encoding="utf-8").splitlines()
        near = " ".join(src[max(0, lineno - 4):lineno])  # the def line or the three lines above it
        if "# complexity:" not in near:
            bad.append(f"{m.group(1)}:{lineno}: {m.group(3)} — split it, or say why on its def line "
                       "(`# complexity: <why>`)")
    return bad


def mypy_counts() -> Counter:
    p = run([sys.executable, "-m", "mypy", "--no-error-summary"])
    counts: Counter = Counter()
    for line in p.stdout.splitlines():
        m = re.match(r"([^:]+\.py):\d+: error:", line)
        if m:
            counts[m.group(1)] += 1
    if p.returncode not in (0, 1):
        raise SystemExit(f"mypy did not run: {p.stderr.strip() or p.stdout.strip()}")
    return counts


#: the package that must be mypy-clean (the rest is ratcheted)
CLEAN = "dact_lib/"


def mypy_ratchet(update: bool) -> list[str]:
    counts = mypy_counts()
    base = json.loads(BASELINE.read_text(encoding="utf-8")) if BASELINE.is_file() else {}
    base = {f: n for f, n in base.items() if not f.startswith(CLEAN)}  # no allowance in the clean package
    worse = [f"{f}: {n} mypy errors, " + (f"{CLEAN} must have none" if f.startswith(CLEAN) else
                                          f"the baseline allows {base.get(f, 0)}") + f" — fix them (`mypy {f}`)"
             for f, n in sorted(counts.items()) if n > base.get(f, 0)]
    if update:
        if worse:
            print("mypy baseline not written: it is only lowered, and some files are over their count",
                  file=sys.stderr)
            return worse
        BASELINE.write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n", encoding="utf-8")
        print(f"mypy baseline written: {sum(counts.values())} errors in {len(counts)} files")
        return []
    better = [f for f, n in base.items() if counts.get(f, 0) < n]
    if better and not worse:
        print(f"mypy: fewer errors than the baseline in {len(better)} files: lower it with "
              "`python tools/lint.py --update-baseline`")
    print(f"mypy: {sum(counts.values())} errors (baseline {sum(base.values())})")
    return worse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update-baseline", action="store_true",
                    help="lower the mypy baseline to today's counts (refused while a file is over its count)")
    ap.add_argument("--no-mypy", action="store_true", help="ruff and complexity only (fast)")
    args = ap.parse_args(argv)
    failures = ruff() + complexity()
    if not args.no_mypy:
        failures += mypy_ratchet(args.update_baseline)
    for f in failures:
        print(f"lint: {f}", file=sys.stderr)
    print("lint: ok" if not failures else f"lint: {len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
