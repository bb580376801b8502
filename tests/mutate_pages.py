"""Mutants of the Watch & explore pages and of the plot helpers they use, and the tests that must kill them
(issue 12: "tests that catch what they claim to"). Not collected by pytest; run it by hand:

    .venv/bin/python tests/mutate_pages.py [--only NAME ...] [--against DIR]

Each mutant is applied to a private copy of the working tree (the tree itself is never touched); the listed tests
run there; a mutant is *killed* when they fail. ``--against DIR``: run the tests of another tests folder (e.g. an
older copy of tests/) in the copy, to see which mutants those let through. Exit status 1 when a mutant survives.
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

EXPLORE = "tests/test_explore_pages.py"
PLOTS = "tests/test_plots.py"

#: name -> (file, original text, mutated text, tests that must fail)
MUTANTS: dict[str, tuple[str, str, str, list[str]]] = {
    "runs-cancel-does-nothing": (
        "app_pages/runs.py", "owner = jobs().cancel_owner(focus)", "owner = None",
        [f"{EXPLORE}::test_runs_page_cancels_a_running_job_of_this_process"]),
    "runs-cancel-only-looks-up-the-owner": (
        "app_pages/runs.py", "owner = jobs().cancel_owner(focus)", "owner = jobs().owner(focus)",
        [f"{EXPLORE}::test_runs_page_cancels_the_engine_job_that_runs_a_member"]),
    "runs-other-process-run-reported-cancelled": (
        "app_pages/runs.py", "            else:\n                st.warning(f\"Run {focus} is not a job",
        "            else:\n                st.success(f\"Run {focus} is not a job",
        [f"{EXPLORE}::test_runs_page_cancel_of_another_process_run_says_where_to_stop_it"]),
    "runs-table-val-accuracy-from-test": (
        "dact_lib/tracker/store.py", 'value = next((d[key] for d in parts if d.get(key) is not None), None)',
        'value = next((d[key.replace("val_", "test_")] for d in parts '
        'if d.get(key.replace("val_", "test_")) is not None), None)',
        [f"{EXPLORE}::test_runs_page_lists_every_engine_run_with_its_recorded_scores"]),
    "pbt-view-donor-column-shows-recipient": (
        "app_pages/pbt_view.py", '"donor": labels.get(e["donor"], e["donor"])',
        '"donor": labels.get(e["recipient"], e["recipient"])',
        [f"{EXPLORE}::test_pbt_view_shows_the_population_its_exploits_and_lineage"]),
    "pbt-view-exploits-column-shows-member-index": (
        "app_pages/pbt_view.py", '"exploits": (summ.get(m["id"]) or {}).get("exploits")',
        '"exploits": (summ.get(m["id"]) or {}).get("member")',
        [f"{EXPLORE}::test_pbt_view_shows_the_population_its_exploits_and_lineage"]),
    "plots-explored-not-matched": (
        "dact_lib/plots/pbt.py", 'explored[(ref(p, "recipient"), p.get("step"))] = p.get("new")',
        'explored[(ref(p, "donor"), p.get("step"))] = p.get("new")',
        [f"{PLOTS}::test_exploit_edges_of_a_real_population_resolve_members_and_drop_duplicates",
         f"{EXPLORE}::test_pbt_view_shows_the_population_its_exploits_and_lineage"]),
    "plots-lineage-arrow-from-recipient": (
        "dact_lib/plots/pbt.py", "fig.add_annotation(x=s, y=r, ax=s, ay=d,", "fig.add_annotation(x=s, y=d, ax=s, ay=r,",
        [f"{PLOTS}::test_lineage_figure_of_a_real_population_rows_and_arrows",
         f"{EXPLORE}::test_pbt_view_shows_the_population_its_exploits_and_lineage"]),
    "plots-pipeline-view-takes-every-stage": (
        "dact_lib/tuning/dact_pipeline/view.py", 'if kind == ev.TRIAL and p.get("stage") == "stage3" and',
        'if kind == ev.TRIAL and p.get("stage") in ("stage1", "stage2", "stage3") and',
        [f"{PLOTS}::test_pipeline_view_of_a_real_pipeline_reads_its_events_and_summary",
         f"{EXPLORE}::test_pareto_explorer_shows_the_pipelines_front_choice_and_sweep"]),
    "pareto-choice-column-always-false": (
        "app_pages/pareto.py", "\"pipeline's choice\": bool(pc and _same_point(p, pc))",
        "\"pipeline's choice\": bool(pc and not _same_point(p, pc))",
        [f"{EXPLORE}::test_pareto_explorer_shows_the_pipelines_front_choice_and_sweep"]),
    "early-exit-all-layers-button-resets": (
        "app_pages/early_exit.py", 'st.session_state["early_layers"] = (n_layers, n_layers)',
        'st.session_state["early_layers"] = (1, n_layers)',
        [f"{EXPLORE}::test_early_exit_shows_the_final_models_recorded_test_metrics_and_filters_by_layer"]),
    "early-exit-accuracy-of-the-shown-rows-only": (
        "app_pages/early_exit.py", "m2.metric(\"accuracy\", f\"{df['correct'].mean():.1%}\")",
        "m2.metric(\"accuracy\", f\"{df['correct'].head(10).mean():.1%}\")",
        [f"{EXPLORE}::test_early_exit_shows_the_final_models_recorded_test_metrics_and_filters_by_layer"]),
    "studies-pruned-column-shows-failed": (
        "app_pages/studies.py", '"pruned": (r.get("trials") or {}).get("pruned")',
        '"pruned": (r.get("trials") or {}).get("fail")',
        [f"{EXPLORE}::test_studies_page_lists_the_engines_studies_with_trial_counts_and_best_values"]),
    "studies-best-value-rounded": (
        "app_pages/studies.py", "return f\"{r['best_value']:.5g}\"", "return f\"{r['best_value']:.2g}\"",
        [f"{EXPLORE}::test_studies_page_lists_the_engines_studies_with_trial_counts_and_best_values"]),
}


def run(names: list[str], against: Path | None) -> int:
    survived = []
    with tempfile.TemporaryDirectory(prefix="dact_mutants_") as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", ".dact_cache", "__pycache__", "out"))
        if (ROOT / ".dact_cache").exists():
            (tree / ".dact_cache").symlink_to(ROOT / ".dact_cache")
        if against is not None:
            shutil.rmtree(tree / "tests")
            shutil.copytree(against, tree / "tests")
        for name in names:
            path, old, new, tests = MUTANTS[name]
            target = tree / path
            original = target.read_text(encoding="utf-8")
            if original.count(old) != 1:  # the code changed since the mutant was written: update MUTANTS
                print(f"{name:48s} STALE (its text is not once in {path})", flush=True)
                survived.append(name)
                continue
            target.write_text(original.replace(old, new), encoding="utf-8")
            try:
                # --against: the older folder's tests have other names: run the whole files
                selected = tests if against is None else sorted({t.split("::")[0] for t in tests})
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                       *selected], cwd=tree, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
            finally:
                target.write_text(original, encoding="utf-8")
            verdict = {1: "killed", 0: "SURVIVED"}.get(proc.returncode, f"error rc={proc.returncode}")
            if proc.returncode != 1:
                survived.append(name)
            print(f"{name:48s} {verdict}", flush=True)
            if proc.returncode not in (0, 1):
                print(proc.stdout[-3000:], proc.stderr[-3000:])
    return 1 if survived else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutant names (default: all)")
    ap.add_argument("--against", type=Path, default=None, help="another tests folder to run instead of tests/")
    args = ap.parse_args()
    names = args.only or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutants {unknown}: choose from {list(MUTANTS)}")
    return run(names, args.against)


if __name__ == "__main__":
    sys.exit(main())
