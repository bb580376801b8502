"""Argument helpers shared by the CLI's commands (``cli.py``) and the tuning engines' commands (``tuning/cli.py``):
the common flags, the data flags, building a RunConfig (+ engine options) from them, and terminal-safe text.
Neither CLI module imports the other's internals through here, so there is no import cycle."""
from __future__ import annotations

import argparse
import re

from .errors import DactLabError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def term(text: object, keep_newlines: bool = False) -> str:
    """User text (labels, names, tags, sentences) for the terminal: control characters (escape sequences that
    could move the cursor, retitle the window or hide output) shown as U+FFFD; tabs and newlines as spaces."""
    out = _CONTROL.sub("\ufffd", str(text)).replace("\t", " ")
    return out if keep_newlines else out.replace("\n", " ")


def common_args(p: argparse.ArgumentParser, device: bool = True, tag: bool = True, run_name: bool = True) -> None:
    """--home and --verbosity everywhere; --device only where a model runs, --tag only where a run is created."""
    p.add_argument("--home", default=None, help="DACT Lab home (experiments.db, runs/); default $DACT_LAB_HOME or the project root")
    p.add_argument("--db", default=None, metavar="URL",
                   help="the tracker's and the studies' database, e.g. postgresql://user@host/dactlab (default "
                        "$DACT_LAB_DB, else the home's experiments.db)")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="where run folders (weights, reports) live: a directory every machine sees (default "
                        "$DACT_LAB_ARTIFACTS, else the home)")
    p.add_argument("--verbosity", type=int, choices=(0, 1, 2), default=1,
                   help="0: warnings only, 1: progress, 2: debug detail")
    if device:
        # default None: a --config file's train.device stays unless the flag is given
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                       help="where the model runs (default: the config's train.device, else auto)")
    if tag:
        p.add_argument("--tag", action="append", default=None, metavar="TAG[,TAG]",
                       help="a label stored with the run; repeat it or separate with commas for several")
        if run_name:  # not dact-pipeline: its --name names the pipeline and its run
            p.add_argument("--run-name", default=None, help="the run's name (the run table and the dashboard show it)")


def data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="data file: .csv, .tsv, .jsonl, .json (a list of records) or "
                   ".parquet (default: the bundled demo dataset)")
    p.add_argument("--columns", default=None, metavar="KEY=COLUMN[,KEY=COLUMN]",
                   help="which column of the file is which when they have other names: text=review,label=stars, or "
                        "sentence=…,class_label=…,sentiment_label=… (data.columns)")
    p.add_argument("--max-rows", type=int, default=None, help="use a stratified sample of this many rows")
    p.add_argument("--encoder", default=None, help="HF model name or local path (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--config", default=None, help="a RunConfig as JSON or YAML; flags override it")


def parse_columns(text: str) -> dict[str, str]:
    """``--columns text=review,label=stars`` → ``{"text": "review", "label": "stars"}`` (read_csv checks the keys
    and the columns against the file)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in str(text).split(",")):
        key, sep, col = part.partition("=")
        if not part or not sep or not key.strip() or not col.strip():
            raise DactLabError(f"--columns {text!r}: give KEY=COLUMN pairs separated by commas, e.g. "
                               "--columns text=review,label=stars.")
        out[key.strip()] = col.strip()
    return out


def _data_flags(cfg, args) -> None:
    """--data, --columns, --max-rows, --encoder."""
    if args.data:
        cfg.data.path = args.data
    if getattr(args, "columns", None):
        cfg.data.columns = parse_columns(args.columns)
    if args.max_rows:
        cfg.data.max_rows = args.max_rows
    if args.encoder:
        cfg.encoder = args.encoder


def _train_flags(cfg, args) -> None:
    """The training flags (epochs, batch, precision, limits, accumulation, trackers, evaluations, device) and
    ``--class-weighting`` (every kind's model config has it)."""
    for flag in ("epochs", "batch_size", "precision", "max_steps", "time_limit_min", "grad_accum_steps"):
        v = getattr(args, flag, None)
        if v is not None:
            setattr(cfg.train, flag, v)
    if getattr(args, "report_to", None) is not None:
        from .reporting import parse_report_to

        cfg.train.report_to = parse_report_to(args.report_to)
    per_epoch = getattr(args, "evals_per_epoch", None)
    if per_epoch is not None:
        cfg.train.evals_per_epoch = per_epoch if per_epoch == "auto" else \
            int(per_epoch) if str(per_epoch).isdigit() else per_epoch  # validate() names a bad value
    if getattr(args, "device", None):  # only when given: a config file's device is kept otherwise
        cfg.train.device = args.device
    if getattr(args, "class_weighting", None) is not None:
        cfg.model.class_weighting = args.class_weighting


#: flag -> (model field, value to set: None = the flag's own value) of the flags that only apply to --kind dact
DACT_FLAGS = {"ponder_lambda": ("ponder_lambda", None), "layer_loss_weight": ("layer_loss_weight", None),
              "distill_weight": ("distill_weight", None), "halting_input": ("halting_input", None),
              "halting_tolerance": ("halting_tolerance", None), "exit_refit_epochs": ("exit_refit_epochs", None),
              "exit_temperature": ("exit_temperature", True), "no_fit_halting": ("fit_halting", False)}


def _dact_flags(cfg, args) -> None:
    """The DACT model flags: refused (naming the flag) for another kind."""
    for flag, (field, value) in DACT_FLAGS.items():
        given = getattr(args, flag, None)
        if given is None or given is False:
            continue
        if cfg.kind != "dact":
            raise DactLabError(f"--{flag.replace('_', '-')} only applies to --kind dact.")
        setattr(cfg.model, field, given if value is None else value)


def _run_flags(cfg, args) -> None:
    """--init-from-run, --tag (repeatable / comma-separated), --run-name."""
    if getattr(args, "init_from_run", None):
        cfg.init_from_run = args.init_from_run
    if getattr(args, "tag", None):
        from .tags import tag_list

        tags = tag_list(args.tag)  # --tag a --tag b,c: three tags; one stays a string, as before
        cfg.tag = tags[0] if len(tags) == 1 else tags or None
    if getattr(args, "run_name", None):
        cfg.name = args.run_name


def config_and_options(args, kind_default: str = "backbone"):
    """``(RunConfig, engine options)`` from --config (a RunConfig file, or a dashboard download
    ``{"config": ..., "options": ...}``) with the command-line flags applied on top of the config; the engine
    commands apply their own flags on top of the options."""
    from .config import RunConfig, default_config, load_mapping, split_config_document

    kind = getattr(args, "kind", None)
    options: dict = {}
    if args.config:
        raw, options = split_config_document(load_mapping(args.config), str(args.config))
        raw = dict(raw)
        if kind:
            raw["kind"] = kind
        cfg = RunConfig.from_dict(raw)
    else:
        cfg = default_config(kind or kind_default)
    for apply in (_data_flags, _train_flags, _dact_flags, _run_flags):
        apply(cfg, args)
    cfg.validate()
    if cfg.train.report_to:
        from .reporting import require_tools

        require_tools(cfg.train.report_to)  # before anything starts: the pip install to run
    return cfg, options


def config_from_args(args, kind_default: str = "backbone"):
    """A RunConfig from --config (if given) with the command-line flags applied on top. A file with engine
    options (a Backbone-tuning, Pipeline or PBT download) is refused with the command that runs it."""
    cfg, options = config_and_options(args, kind_default)
    if options:
        raise DactLabError(f"{args.config} holds engine options ({', '.join(sorted(options))}) as downloaded from "
                           "an engine page: run it with the engine's command, e.g. `tune-backbone --config FILE`, "
                           "`dact-pipeline --config FILE` or `pbt --config FILE`.")
    return cfg


def refuse_flags_with_resume(args, what: str) -> None:
    """``--resume`` continues a run with the settings it was started with: any other setting flag is an error
    naming the flags to drop."""
    given = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
             if k not in ("resume", "home", "verbosity", "command") and v not in (None, False)]
    if given:
        raise DactLabError(f"--resume continues {what} with the settings it was started with: drop "
                           f"{', '.join(given)}.")
