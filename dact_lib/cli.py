"""``python -m dact_lib`` — everything the dashboard does, without a browser.

Commands: train, evaluate, runs, report, worker, db (+ the tuning engines: tune-backbone, dact-pipeline, pbt,
multitask, studies; + deployment, ``deploy/cli.py``: predict, export, serve). Every command takes ``--home`` and
``--verbosity 0|1|2``; commands that run a model take ``--device auto|cpu|cuda`` and those that create a run take
``--tag`` (a flag is accepted only where it does something).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from typing import Callable

from .cli_args import refuse_flags_with_resume
from .cli_args import common_args as _common, config_and_options, config_from_args, data_args as _data_args, term  # noqa: F401 - re-exported
from .errors import DactLabError

COMMANDS: dict[str, Callable] = {}

#: exit statuses of every command (the --help epilog and the README list them)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_PIPE = 0, 1, 2, 3, 130, 141
EXIT_STATUS_HELP = f"""exit status:
  {EXIT_OK:<4} done
  {EXIT_FAILED:<4} the command failed: a run failed or an unexpected error (its traceback is printed)
  {EXIT_USAGE:<4} usage error: an unknown command or flag, a flag value of the wrong type
  {EXIT_REFUSED:<4} refused input: data, a config, a run id, flags that do not go together (the message
       names the problem and the fix)
  {EXIT_INTERRUPTED:<4} interrupted (Ctrl-C); an interrupted run can be resumed (train --resume RUN)
  {EXIT_PIPE:<4} the reader of the output went away (e.g. `dact-lab runs --json | head`), quietly"""

#: the kinds of run a home holds: trainings, engine parents, PBT members
RUN_KINDS = ("backbone", "dact", "multitask", "tune-backbone", "dact-pipeline", "pbt", "pbt-member")

def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def build_parser() -> argparse.ArgumentParser:
    prog = "dact-lab" if os.path.basename(sys.argv[0]) == "dact-lab" else "python -m dact_lib"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"dact-lab {_version()}",
                        help="print the installed dact-lab version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model (backbone, dact or multitask)")
    p.add_argument("--kind", choices=("backbone", "dact", "multitask"), default=None)
    _data_args(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--evals-per-epoch", default=None, metavar="N|auto",
                   help="validations per epoch (default auto: one more per 500 steps of a long epoch)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--ponder-lambda", type=float, default=None, help="DACT ponder penalty λ")
    p.add_argument("--layer-loss-weight", type=float, default=None,
                   help="DACT: weight of every layer's own classifier loss added to the DACT loss (default 1; 0 = the "
                        "paper's loss; see docs/benchmarks.md)")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="DACT: weight of the self-distillation of every exit from the deepest one (default 0)")
    p.add_argument("--halting-input", choices=("summary", "confidence", "both"), default=None,
                   help="DACT: what the halting units read (default confidence: max, margin, entropy, agreement)")
    p.add_argument("--halting-tolerance", type=float, default=None,
                   help="DACT: after training, keep the fastest fitted halting point within this many accuracy "
                        "points of the most accurate one on the validation split (default 0.5)")
    p.add_argument("--exit-refit-epochs", type=int, default=None,
                   help="DACT: after training, train the classifiers of layers 1..N-1 again on cached layer "
                        "summaries for this many epochs (default 30; 0 = off)")
    p.add_argument("--exit-temperature", action="store_true",
                   help="DACT: after training, calibrate every exit with a temperature fitted on the validation "
                        "split, before the halting fit (model.exit_temperature; off by default)")
    p.add_argument("--no-fit-halting", action="store_true",
                   help="DACT: keep the jointly trained halting units (no halting fit after training)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default=None,
                   help="auto: bf16 where the hardware has native bf16, else fp32; fp16: CUDA only (autocast fp16 + "
                        "a gradient scaler, for GPUs without bf16), refused on a CPU")
    p.add_argument("--grad-accum-steps", type=int, default=None, metavar="N",
                   help="split every batch into N micro-batches (gradients accumulated, one optimizer step): the "
                        "same optimisation batch in about 1/N of the activation memory (train.grad_accum_steps, "
                        "default 1)")
    p.add_argument("--class-weighting", choices=("none", "balanced"), default=None,
                   help="balanced: weight class k of the loss by n / (K · n_k) on the training split, for imbalanced "
                        "labels (model.class_weighting; default none)")
    p.add_argument("--init-from-run", type=int, default=None, help="start the encoder from this backbone run's weights")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop training after this many minutes, keeping the best checkpoint (train.time_limit_min)")
    p.add_argument("--report-to", default=None, metavar="TOOL[,TOOL]",
                   help="also report the run to mlflow, wandb and/or tensorboard, comma-separated (train.report_to; "
                        "where each writes: their own environment variables, see dact_lib/reporting.py)")
    p.add_argument("--resume", type=int, default=None, metavar="RUN",
                   help="continue interrupted (or cancelled / failed) run RUN from its last checkpoint, appending "
                        "to its metrics; no other setting may be given")
    _common(p)

    p = sub.add_parser("evaluate", help="accuracy, macro-F1, confusion matrix (and exit layers) of a run")
    p.add_argument("--run", required=True)
    p.add_argument("--data", default=None, help="data file to evaluate on: .csv, .tsv, .jsonl, .json or .parquet "
                   "(default: the run's test split)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--policies", action="store_true", help="DACT: also sweep the exit policies (accuracy, exit)")
    p.add_argument("--timed", action="store_true",
                   help="with --policies: each policy's batch-1 latency, all policies interleaved per sentence")
    p.add_argument("--latency-rows", type=int, default=100, metavar="N",
                   help="with --timed: sentences timed per policy (a seeded sample of the split; default 100)")
    _common(p, tag=False)

    p = sub.add_parser("runs", help="the run table")
    p.add_argument("--kind", default=None, metavar="KIND[,KIND]",
                   help=f"only the runs of these kinds ({', '.join(RUN_KINDS)})")
    p.add_argument("--tag", action="append", default=None, metavar="TAG[,TAG]",
                   help="only the runs with this tag (repeat it or separate with commas: runs with every one)")
    p.add_argument("--json", action="store_true")
    _common(p, device=False, tag=False)

    p = sub.add_parser("report", help="a self-contained HTML page of a run's curves and config")
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plotly-cdn", action="store_true",
                   help="link plotly.js from its CDN (a small file that needs the internet to draw) instead of "
                        "inlining it (a self-contained file of about 5 MB)")
    _common(p, device=False, tag=False)

    p = sub.add_parser("worker", help="join a running study (on the same --db) and run its trials")
    p.add_argument("--study", required=True, metavar="NAME", help="the study's name (see the studies command)")
    p.add_argument("--max-trials", type=int, default=None, help="stop after this many trials of this worker")
    p.add_argument("--wait-s", type=float, default=60.0,
                   help="wait this long for the study to appear (a worker started before the study; default 60)")
    _common(p, device=False, tag=False)

    p = sub.add_parser("db", help="the tracker's database: where it is, its schema (migrated when needed)")
    p.add_argument("--json", action="store_true")
    _common(p, device=False, tag=False)

    from .tuning import cli as tuning_cli

    tuning_cli.add_commands(sub, _common, _data_args, command)
    from .deploy import cli as deploy_cli

    deploy_cli.add_commands(sub, _common, _data_args, command)  # predict, export, serve
    return parser


def _version() -> str:
    from .version import version

    return version()


def _run_kinds(tracker, given: str) -> list[str]:
    """``runs --kind a,b`` as a list; an unknown kind is refused with the kinds there are."""
    kinds = [k.strip() for k in given.split(",") if k.strip()]
    present = sorted({r["kind"] for r in tracker.list_runs()})
    unknown = [k for k in kinds if k not in RUN_KINDS and k not in present]
    if unknown or not kinds:
        here = f"; this home has runs of kind {', '.join(present)}" if present else "; this home has no runs yet"
        what = f"unknown kind {', '.join(map(repr, unknown))}" if unknown else "no kind given"
        raise DactLabError(f"--kind {given!r}: {what}. The kinds of run are {', '.join(RUN_KINDS)}{here}: give one "
                           "or several, comma-separated.")
    return kinds


def _setup(args) -> None:
    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}[args.verbosity]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbosity < 2:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.home:
        os.environ["DACT_LAB_HOME"] = str(args.home)


def _setup_db(args) -> None:
    """``--db URL`` / ``--artifacts DIR``: for every tracker and study of this process (as $DACT_LAB_DB /
    $DACT_LAB_ARTIFACTS)."""
    if getattr(args, "db", None):  # every tracker and study of this process: one database
        from .tracker.db import ENV_VAR, dialect

        if "://" in args.db:
            dialect(args.db)  # an unsupported URL is refused here, with the supported forms
        os.environ[ENV_VAR] = str(args.db)
    if getattr(args, "artifacts", None):
        from .home import ARTIFACTS_ENV

        os.environ[ARTIFACTS_ENV] = str(args.artifacts)


@command("train")
def cmd_train(args) -> int:
    from .callbacks import ProgressPrinter
    from .tracker import Tracker
    from .train import train

    tracker = Tracker(args.home)
    if args.resume is not None:
        from .resume import require_resumable
        from .train import resume_config

        refuse_flags_with_resume(args, f"run {args.resume}")
        require_resumable(tracker, args.resume)
        cfg = resume_config(tracker, args.resume)
        result = train(cfg, tracker=tracker, home=args.home, run_id=args.resume, resume=True,
                       callbacks=[ProgressPrinter(args.verbosity)])
    else:
        cfg = config_from_args(args)
        result = train(cfg, tracker=tracker, home=args.home, callbacks=[ProgressPrinter(args.verbosity)])
    best = {k: round(v, 4) for k, v in result.best_metrics.items() if isinstance(v, float)}
    test = {k: round(v, 4) for k, v in result.test_metrics.items()}
    if args.verbosity >= 1:
        print(f"best validation: {best}", file=sys.stderr)
        if test:
            print(f"test: {test}", file=sys.stderr)
    print(f"run id: {result.run_id}")
    return 0


@command("evaluate")
def cmd_evaluate(args) -> int:
    from .data import encode, read_csv
    from .evaluate import evaluate_encoded, exit_policy_sweep, full_report
    from .models import load_model
    from .train import load_split

    loaded = load_model(args.run, args.home, args.device or "auto")
    if args.data:
        ds = read_csv(args.data, columns=loaded.config.data.columns, label_maps=loaded.label_maps)
    else:
        from .tracker import Tracker

        split, _ = load_split(loaded.config, Tracker(args.home))
        ds = split.test or split.val
    enc = encode(ds, loaded.tokenizer, loaded.config.data.max_seq_len)
    res = evaluate_encoded(loaded.model, enc, 64, loaded.device)
    rep = full_report(res, loaded.label_maps)
    if args.timed and not args.policies:
        raise DactLabError("--timed times the exit policies: give it with --policies.")
    if args.latency_rows < 1:
        raise DactLabError(f"--latency-rows {args.latency_rows}: give a whole number >= 1.")
    if args.policies and loaded.kind == "dact":
        rep["exit_policies"] = exit_policy_sweep(loaded.model, enc, timed=args.timed, latency_rows=args.latency_rows)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"run {term(args.run)} on {len(ds)} rows")
    for task, r in rep["tasks"].items():
        print(f"[{task}] accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}")
        names = [term(n) for n in r["labels"]]
        width = max(len(n) for n in names) + 2
        print("confusion matrix (rows: true, columns: predicted)")
        print(" " * width + "".join(n[:8].rjust(9) for n in names))
        for n, row in zip(names, r["confusion_matrix"]):
            print(n.ljust(width) + "".join(str(v).rjust(9) for v in row))
    if "avg_exit_layer" in rep:
        print(f"average exit layer {rep['avg_exit_layer']:.3f}; histogram {rep['exit_histogram']}")
    sweep = rep.get("exit_policies", [])
    full = next((r["latency_ms_p50"] for r in sweep if r["policy"] == "fixed" and "latency_ms_p50" in r
                 and r["value"] == max(x["value"] for x in sweep if x["policy"] == "fixed")), None)
    for row in sweep:
        line = f"  {row['policy']:>9} {str(row['value']):>6}: exit {row['avg_exit_layer']:.2f}  acc {row['accuracy']:.4f}"
        if "latency_ms_p50" in row:
            line += f"  batch-1 {row['latency_ms_p50']:.2f} ms (p90 {row['latency_ms_p90']:.2f})"
            if full:
                line += f"  {full / row['latency_ms_p50']:.2f}× vs full depth"
        print(line)
    if sweep and "latency_ms_p50" in sweep[0]:
        print(f"  (latency: {sweep[0]['latency_rows']} sentences at batch 1, every policy interleaved per sentence)")
    return 0


@command("runs")
def cmd_runs(args) -> int:
    from .tracker import Tracker, run_scores

    if args.kind is not None:
        args.kind = _run_kinds(Tracker(args.home), args.kind)
    runs = Tracker(args.home).list_runs(kind=args.kind, tag=args.tag)
    if args.json:
        print(json.dumps(runs, indent=2, default=str))
        return 0
    if not runs:
        every = Tracker(args.home).list_runs() if args.kind or getattr(args, "tag", None) else []
        if every:  # "no runs yet" only for a home without runs
            print(f"no runs match; this home's {len(every)} run(s) are of kind "
                  f"{', '.join(sorted({r['kind'] for r in every}))}")
        else:
            print("no runs yet: try `python -m dact_lib train --kind dact --epochs 1`")
        return 0
    import datetime as dt

    width = min(32, max([4] + [len(term(r.get("name") or "")) for r in runs]))
    print(f"{'id':>4}  {'name':<{width}}  {'kind':<14}{'status':<12}{'started':<17}{'best val acc':>13}"
          f"{'val F1':>8}  tag / per task")
    for r in runs:
        sc = run_scores(r)
        multi = r["kind"] == "multitask"
        best = sc["val_accuracy (mean of tasks)" if multi else "val_accuracy"]
        f1 = sc["val_macro_f1 (mean of tasks)" if multi else "val_macro_f1"]
        started = dt.datetime.fromtimestamp(r["started"]).strftime("%Y-%m-%d %H:%M") if r.get("started") else "-"
        name = term(r.get("name") or "-")
        name = name if len(name) <= width else name[:width - 1] + "…"
        # a multi-task run: its columns are the mean over tasks (marked *), each task's accuracy / F1 follows
        tasks = sorted({k.split("/", 1)[1] for k in sc if k.startswith("val_accuracy/")})
        per_task = "; ".join(f"{term(t)} {_f(sc.get(f'val_accuracy/{t}'))} / F1 {_f(sc.get(f'val_macro_f1/{t}'))}"
                             for t in tasks)
        extra = "  ".join(x for x in (term(r.get("tag") or ""), per_task) if x)
        print(f"{r['id']:>4}  {name:<{width}}  {r['kind']:<14}{r['status']:<12}{started:<17}"
              f"{_f(best) + ('*' if multi and best is not None else ''):>13}{_f(f1):>8}  {extra}")
    if any(r["kind"] == "multitask" for r in runs):
        print("* multi-task: the mean over its tasks (each task's accuracy / macro-F1 on the right)")
    return 0


def _f(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


@command("worker")
def cmd_worker(args) -> int:
    from .tuning.worker import run_worker

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING if args.verbosity < 2 else optuna.logging.INFO)
    res = run_worker(args.study, home=args.home, max_trials=args.max_trials, wait_s=args.wait_s)
    for r in res["trials"]:
        v = r["value"]  # one value, or a two-objective study's pair (pipeline stage 3)
        value = "-" if v is None else (", ".join(f"{x:.5g}" for x in v) if isinstance(v, list) else f"{v:.5g}")
        print(f"trial {r['number']}: {r['state']} value {value} run {r['run_id']} ({r['seconds']:.1f} s)")
    print(f"worker {res['worker']} on study {res['study_name']}: {len(res['trials'])} trial(s); stopped: "
          f"{res['stop_reason']}", file=sys.stderr)
    return 0


@command("db")
def cmd_db(args) -> int:
    from .tracker import Tracker

    tr = Tracker(args.home)  # opening it creates what is missing (the migration step)
    tables = {t: int(tr.query(f'SELECT COUNT(*) AS n FROM "{t}"')[0]["n"])
              for t in ("datasets", "runs", "metrics", "events", "artifacts")}
    info = {"url": str(tr.db_path), "dialect": tr.dialect, "artifacts": str(tr.artifacts), "tables": tables}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"database: {info['url']} ({info['dialect']}); run folders under {info['artifacts']}")
        for t, n in tables.items():
            print(f"  {t:<10}{n:>10} rows")
    return 0


@command("report")
def cmd_report(args) -> int:
    from .report import write_report

    try:
        run_id = int(args.run)
    except ValueError:
        raise DactLabError(f"--run {args.run!r} is not a run id: give the number shown by "
                           "`python -m dact_lib runs`.") from None
    out = write_report(run_id, args.out, args.home, plotly_cdn=args.plotly_cdn)
    print(f"wrote {out}")
    return 0


#: library hints that name a Python call, and what a CLI user does instead (the library's Python callers keep
#: theirs; the CLI shows these)
CLI_FIXES = (
    ("list the existing ones with list_runs()", "list them with `python -m dact_lib runs`"),
    ("list the stored ones with list_datasets()", "the dashboard's Data page lists them (store a file there, or give "
                                                  "--data FILE)"),
    ("(or list_datasets())", "(or give --data FILE)"),
)


def cli_message(exc: BaseException) -> str:
    """An error's message as a CLI user needs it: a column that is not found points at ``--columns`` (the
    library's fix is a ``columns=`` argument), a hint naming a Python call names the command instead."""
    from .data import ColumnError

    if isinstance(exc, ColumnError):
        text = (f"{exc.problem} Rename the column, or say which column is which with --columns, e.g. "
                "--columns text=review,label=stars (two tasks: sentence=…,class_label=…,sentiment_label=…).")
    else:
        text = str(exc)
    for python_hint, cli_hint in CLI_FIXES:
        text = text.replace(python_hint, cli_hint)
    return term(text, keep_newlines=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status (:data:`EXIT_STATUS_HELP`). A closed standard output (``| head``)
    ends the command quietly, as the Python docs recommend for SIGPIPE: the rest of the output goes to devnull."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor (captured): nothing to flush
            pass
        return EXIT_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args)
    try:
        _setup_db(args)
        return COMMANDS[args.command](args)
    except DactLabError as exc:
        print(f"error: {cli_message(exc)}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed run: its traceback, then one line that says so
        import traceback

        traceback.print_exc()
        print(f"error: the command failed: {type(exc).__name__}: {term(exc)}", file=sys.stderr)
        return EXIT_FAILED
