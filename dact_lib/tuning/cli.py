"""CLI commands of the tuning engines: tune-backbone, dact-pipeline, pbt, multitask, studies.

:func:`add_commands` is called by :func:`dact_lib.cli.build_parser`. Every engine command prints progress on stderr
(a progress bar per training, one line per trial; PBT: one line per member evaluation) and ends stdout with
``run id: N``: the run that holds the resulting model (tune-backbone: the final run — the parent when no trial
completed or with --no-final; dact-pipeline: the final run; pbt: the best member; multitask: the run), preceded by
``parent run id: P`` for the engines that record a parent run. Engine imports happen inside the
handlers so ``python -m dact_lib --help`` stays fast.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable

from ..callbacks import Callback
from ..errors import DactLabError


def add_commands(sub, common: Callable, data_args: Callable, command: Callable) -> None:
    """Add the tuning subcommands to ``sub`` and register their handlers with ``command(name)``."""
    p = sub.add_parser("tune-backbone", help="Optuna study of the backbone's training parameters, then a final run")
    data_args(p)
    p.add_argument("--trials", type=int, default=None, help="number of trials (default 10)")
    p.add_argument("--timeout-min", type=float, default=None, help="start no trial after this many minutes")
    p.add_argument("--study-name", default=None, help="study name (an existing one gets more trials)")
    p.add_argument("--space", default=None, help="search space as JSON/YAML (see BackboneSpace); default the seed's")
    p.add_argument("--no-final", action="store_true", help="skip the final training with the best parameters")
    p.add_argument("--local-trials", type=int, default=None, metavar="N",
                   help="run at most N of the trials in this process (0: only workers run them, see `worker`); "
                        "default all that no worker has taken")
    common(p)
    command("tune-backbone")(cmd_tune_backbone)

    p = sub.add_parser("dact-pipeline", help="staged DACT tuning: heads, training parameters, λ (Pareto), final run")
    data_args(p)
    p.add_argument("--trials", type=int, default=None, help="trials of stages 1 and 2")
    p.add_argument("--lambdas-trials", type=int, default=None,
                   help="trials of the λ stage (halting fits on one model, seconds each; default 32)")
    p.add_argument("--min-steps", type=int, default=None, help="optimizer steps per stage-2 trial at least (150)")
    p.add_argument("--guards", choices=("stop", "warn"), default=None,
                   help="a stage no better than the majority class stops the pipeline (stop, default) or not")
    p.add_argument("--final-finetune", action="store_true",
                   help="also fine-tune the final model end to end at the chosen λ and compare")
    p.add_argument("--no-single-run", action="store_true",
                   help="do not also train the config as one single run (by default the pipeline does, and returns "
                        "it when its validation point beats stage 3's)")
    p.add_argument("--choose", type=int, default=None, metavar="TRIAL",
                   help="with --name of a finished pipeline: use stage-3 trial TRIAL's halting units for "
                        "prediction (nothing is trained; the pipeline's own choice stays recorded)")
    p.add_argument("--timeout-min", type=float, default=None,
                   help="time budget of the whole pipeline: a wall (every training in it stops at its share)")
    p.add_argument("--stage2-local-trials", type=int, default=None, metavar="N",
                   help="run at most N of the stage-2 trials in this process (0: only workers run them: `worker "
                        "--study NAME/stage2`); default all that no worker has taken")
    p.add_argument("--stage3-local-trials", type=int, default=None, metavar="N",
                   help="the same for stage 3 (`worker --study NAME/stage3`)")
    p.add_argument("--name", default=None, help="name of the pipeline (and prefix of its studies)")
    common(p, run_name=False)
    command("dact-pipeline")(cmd_dact_pipeline)

    p = sub.add_parser("pbt", help="population-based training")
    p.add_argument("--kind", choices=("backbone", "dact", "multitask"), default=None)
    data_args(p)
    p.add_argument("--population", type=int, default=None, help="population size (default 4)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--timeout-min", dest="time_limit_min", type=float, default=None,
                   help="stop every member after this many minutes (each keeps its best checkpoint)")
    p.add_argument("--resume", type=int, default=None, metavar="RUN",
                   help="continue interrupted PBT run RUN (its parent run id): finished members kept, the others "
                        "continue from their last checkpoint")
    p.add_argument("--backend", choices=("threads", "ray"), default=None,
                   help="threads: the members side by side in this process (default); ray: each member a Ray Tune "
                        "trial under Ray's PopulationBasedTraining, on a local Ray or the cluster at --address")
    p.add_argument("--address", default=None,
                   help="with --backend ray: a running Ray cluster ('auto', host:6379, ray://host:10001); default "
                        "a local Ray started for this run")
    p.add_argument("--scheduler", choices=("pbt", "pb2"), default=None,
                   help="with --backend ray: Ray's PopulationBasedTraining (pbt) or PB2 (a GP bandit, needs "
                        "scikit-learn)")
    p.add_argument("--cpus-per-member", type=float, default=None,
                   help="with --backend ray: the CPUs (torch threads) each member gets")
    p.add_argument("--storage-path", default=None,
                   help="with --backend ray: where Ray keeps the members' checkpoints (a cluster of several "
                        "machines needs a folder every node sees); default a temporary folder")
    common(p)
    command("pbt")(cmd_pbt)

    p = sub.add_parser("multitask", help="train one multi-task model on a two-task CSV (one encoder, a head per task)")
    data_args(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--pooling", choices=("cls", "mean"), default=None)
    p.add_argument("--normalize", action="store_true", help="L2-normalise the sentence vector")
    p.add_argument("--task-weights", default=None, help="e.g. class_label=1,sentiment_label=0.5")
    p.add_argument("--timeout-min", dest="time_limit_min", type=float, default=None,
                   help="stop training after this many minutes, keeping the best checkpoint")
    common(p)
    command("multitask")(cmd_multitask)

    p = sub.add_parser("studies", help="every Optuna study of the home")
    p.add_argument("--json", action="store_true")
    common(p, device=False, tag=False)
    command("studies")(cmd_studies)


# --- helpers ----------------------------------------------------------------------------------------------------


def _err(args, text: str) -> None:
    if args.verbosity >= 1:
        print(text, file=sys.stderr)


def _quiet_optuna(args) -> None:
    """Optuna's own INFO lines repeat our per-trial line: keep them for --verbosity 2 only."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if args.verbosity >= 2 else optuna.logging.WARNING)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _trial_printer(args) -> Callable[[dict], None]:
    def show(row: dict) -> None:
        value = row.get("value")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in (row.get("params") or {}).items())
        _err(args, f"trial {row['number']}: {row['state']}"
                   + (f" value={value:.5g}" if isinstance(value, float) else "")
                   + f"  [{params}]  run {row.get('run_id')}  {row.get('seconds', 0):.1f}s")

    return show


def _base_config(args, kind: str):
    from ..cli_args import config_from_args

    args.kind = kind
    return config_from_args(args, kind)


def _engine_call(args, kind: str, run_kind: str | None,
                 base: dict[str, dict] | None = None) -> tuple[Any, Any]:
    """``(RunConfig, the engine's validated settings)``: --config may be a dashboard download with engine options;
    they become the settings exactly as the job manager builds them (:meth:`dact_lib.engines.Engine.settings`).
    The handler then applies the flags that were given on top."""
    from ..cli_args import config_and_options
    from ..engines import get_engine

    if run_kind is not None:
        args.kind = run_kind
    cfg, options = config_and_options(args, run_kind or "backbone")
    for key, defaults in (base or {}).items():  # defaults under a settings object the file may hold
        given = options.get(key)
        if given is None or isinstance(given, dict):
            options[key] = {**defaults, **(given or {})}
    return cfg, get_engine(kind).settings(options)


def _with_flags(settings: Any, **flags: Any) -> Any:
    """A copy of settings dataclass with the given (not None) flag values, validated."""
    import dataclasses

    given = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(settings, **given).validate() if given else settings


class MemberPrinter(Callback):
    """One stderr line per evaluation of any run, tagged with its run id; thread-safe (PBT members train side by
    side in threads, so a shared progress bar would mix their steps)."""

    def __init__(self, verbosity: int = 1) -> None:
        self.verbosity = verbosity
        self._lock = threading.Lock()

    def on_eval(self, state, logs):
        if self.verbosity >= 1 and any(k.startswith("val_") for k in logs):
            msg = ", ".join(f"{k}={v:.4f}" for k, v in logs.items() if k in ("val_loss", "val_accuracy"))
            with self._lock:
                print(f"[run {state.run_id}] step {state.step}: {msg}", file=sys.stderr)

    def on_end(self, state, status):
        if self.verbosity >= 1:
            with self._lock:
                print(f"[run {state.run_id}] {status}", file=sys.stderr)


def _engine(module: str):
    """The engine module (imported here, not at the top: ``--help`` stays fast)."""
    import importlib

    return importlib.import_module(f"dact_lib.tuning.{module}")


def _print_ids(parent: Any, run: Any) -> None:
    if parent is not None:
        print(f"parent run id: {parent}")
    print(f"run id: {run if run is not None else parent}")


# --- handlers ---------------------------------------------------------------------------------------------------


def backbone_arguments(args) -> tuple[Any, Any]:
    """``(RunConfig, BackboneTuneConfig)`` from the parsed flags (and a --config download)."""
    from ..config import load_mapping
    from .backbone import BackboneSpace

    cfg, settings = _engine_call(args, "tune-backbone", "backbone")
    flags = {flag: getattr(args, flag) for flag in ("trials", "timeout_min", "study_name")}
    if args.space:
        flags["space"] = BackboneSpace.from_dict(load_mapping(args.space))
    if args.no_final:
        flags["final"] = False
    return cfg, _with_flags(settings, **flags)


def cmd_tune_backbone(args) -> int:
    from ..callbacks import ProgressPrinter
    from ..tracker import Tracker
    from .backbone import tune_backbone

    _quiet_optuna(args)
    cfg, settings = backbone_arguments(args)
    from ..tracker.db import mask

    res = tune_backbone(cfg, **settings.as_kwargs(), home=args.home, tracker=Tracker(args.home),
                        callbacks=[ProgressPrinter(args.verbosity)], on_trial=_trial_printer(args),
                        local_trials=args.local_trials)
    _err(args, f"study {res.study_name} ({mask(res.storage_url)})")
    if res.stop_reason:
        _err(args, f"stopped early: {res.stop_reason}")
    if res.best_params is None:
        _err(args, "no trial completed: no best parameters and no final run")
    else:
        _err(args, f"best value (val_loss) {res.best_value:.5g} in trial {res.best_trial} with "
                   + ", ".join(f"{k}={_fmt(v)}" for k, v in res.best_params.items()))
    if res.final_run_id is not None:
        _err(args, f"final run {res.final_run_id}: start a DACT run from it with --init-from-run {res.final_run_id}")
    _print_ids(res.parent_run_id, res.final_run_id)
    return 0


def pipeline_arguments(args) -> tuple[Any, Any]:
    """``(RunConfig, PipelineConfig)`` from the parsed flags (and a --config download, which keeps its pipeline
    name unless --name is given; otherwise a new pipeline is named by the time)."""
    fresh = {"name": time.strftime("dact-pipeline-%Y%m%d-%H%M%S")}
    cfg, pipeline = _engine_call(args, "dact-pipeline", "dact", base={"pipeline": fresh})
    settings: dict[str, Any] = {"name": args.name}
    if args.trials is not None:
        settings.update(trials_stage1=args.trials, trials_stage2=args.trials)
    if args.min_steps is not None:
        settings["min_steps"] = args.min_steps
    if args.guards is not None:
        settings["guards"] = args.guards
    if args.final_finetune:
        settings["final_finetune"] = True
    if getattr(args, "no_single_run", False):
        settings["single_run"] = False
    if args.lambdas_trials is not None:
        settings["trials_stage3"] = args.lambdas_trials
    if args.timeout_min is not None:
        settings["timeout_min"] = args.timeout_min
    if args.stage2_local_trials is not None:
        settings["stage2_local_trials"] = args.stage2_local_trials
    if args.stage3_local_trials is not None:
        settings["stage3_local_trials"] = args.stage3_local_trials
    return cfg, _with_flags(pipeline, **settings)


def cmd_dact_pipeline(args) -> int:
    from ..callbacks import ProgressPrinter
    from ..tracker import Tracker

    dp = _engine("dact_pipeline")
    _quiet_optuna(args)
    if args.choose is not None:
        if not args.name:
            raise DactLabError("--choose needs --name NAME of the pipeline whose stage-3 point to use.")
        tr = Tracker(args.home)
        parent = dp.load_pipeline_result(args.name, tracker=tr).parent_run_id
        point = dp.choose_point(parent, args.choose, tracker=tr)
        got = dp.choose_for_prediction(parent, point, tracker=tr, by="cli")
        what = "its own (the pipeline's choice)" if got["halting"] is None else f"trial {args.choose}'s"
        _err(args, f"run {got['run_id']} now predicts with {what} halting units: validation exit "
                   f"{_fmt(point.val_avg_exit_layer)} layers, accuracy {_fmt(point.val_accuracy)}")
        _print_ids(parent, got["run_id"])
        return 0
    cfg, pipeline = pipeline_arguments(args)
    _err(args, f"pipeline {pipeline.name} (run it again with --name {pipeline.name} to resume it)")
    res = dp.run_pipeline(cfg, pipeline=pipeline, home=args.home, tracker=Tracker(args.home),
                          callbacks=[ProgressPrinter(args.verbosity)])
    chosen = res.chosen
    if chosen is not None:
        what = "the single run's point" if chosen.source == "single run" else \
            f"threshold τ {_fmt(chosen.threshold)}" if chosen.threshold is not None else f"λ {_fmt(chosen.front_lambda)}"
        _err(args, f"chosen {what} (trial {chosen.trial}): val accuracy "
                   f"{_fmt(chosen.val_accuracy)}, average exit layer {_fmt(chosen.val_avg_exit_layer)}; "
                   f"{len(res.pareto)} Pareto-optimal points")
    decision = (Tracker(args.home).get_run(res.parent_run_id).get("summary") or {}).get("final_choice")
    if decision:
        _err(args, f"final model: {'the single run' if decision['winner'] == 'single run' else 'stage 3'}'s — "
                   f"{decision['why']}")
    if res.test_metrics:
        _err(args, "final test: " + str({k: round(v, 4) for k, v in res.test_metrics.items()
                                         if isinstance(v, float)}))
    _print_ids(res.parent_run_id, res.final_run_id)
    return 0


def pbt_arguments(args) -> tuple[Any, Any]:
    """``(RunConfig, PBTConfig)`` from the parsed flags (and a --config download)."""
    cfg, settings = _engine_call(args, "pbt", None)
    return cfg, _with_flags(settings, population=args.population, epochs=args.epochs)


def _report_pbt(args, res, settings) -> None:
    for m in res.members:
        _err(args, f"member {m['member']} (run {m['run_id']}): {m['status']}, best {settings.metric} "
                   f"{_fmt(m.get('best_score'))}, {m.get('exploits', 0)} exploit(s)")
    _err(args, f"best member {res.best_member}: {settings.metric} {_fmt(res.best_score)}")
    _print_ids(res.parent_run_id, res.best_run_id)


def cmd_pbt(args) -> int:
    from ..tracker import Tracker

    pbt = _engine("pbt")
    tracker = Tracker(args.home)
    ray_flags = [f for f, given in (("--address", args.address is not None),
                                     ("--scheduler", args.scheduler is not None),
                                     ("--cpus-per-member", args.cpus_per_member is not None),
                                     ("--storage-path", args.storage_path is not None)) if given]
    if args.resume is not None:
        if args.backend == "ray":
            raise DactLabError("a PBT run on Ray cannot be resumed (Ray keeps its own checkpoints only while it "
                               "runs): start it again, or drop --backend ray to resume a threaded PBT run.")
        if ray_flags:
            raise DactLabError(f"{', '.join(ray_flags)} only apply to PBT on Ray: add --backend ray, or drop them.")
        from ..cli_args import refuse_flags_with_resume

        refuse_flags_with_resume(args, f"PBT run {args.resume}")
        from ..resume import require_resumable

        require_resumable(tracker, args.resume)  # a Ray run is refused with the reason, not taken over
        cfg, settings = pbt.resumable_pbt(tracker, args.resume)
        res = pbt.run_pbt(cfg, pbt=settings, home=args.home, tracker=tracker, run_id=args.resume, resume=True,
                          callbacks=[MemberPrinter(args.verbosity)])
        _report_pbt(args, res, settings)
        return 0
    cfg, settings = pbt_arguments(args)  # the backend: --backend, else the settings' (a --config download)
    if args.backend is not None:
        settings.backend = args.backend
    if args.scheduler is not None:
        settings.ray_scheduler = args.scheduler
    settings.validate()
    if settings.backend != "ray" and ray_flags:
        raise DactLabError(f"{', '.join(ray_flags)} only apply to PBT on Ray: add --backend ray, or drop them.")
    if settings.backend == "ray":
        from .pbt_ray import run_pbt_ray

        res = run_pbt_ray(cfg, pbt=settings, home=args.home, tracker=tracker, address=args.address,
                          scheduler=settings.ray_scheduler, cpus_per_member=args.cpus_per_member or 1.0,
                          storage_path=args.storage_path,
                          progress=(lambda line: _err(args, line)) if args.verbosity else None)
    else:
        res = pbt.run_pbt(cfg, pbt=settings, home=args.home, tracker=tracker,
                          callbacks=[MemberPrinter(args.verbosity)])
    _report_pbt(args, res, settings)
    return 0


def cmd_multitask(args) -> int:
    from ..callbacks import ProgressPrinter
    from ..tracker import Tracker
    from ..multitask import parse_task_weights, train_multitask

    cfg = _base_config(args, "multitask")
    if args.pooling:
        cfg.model.pooling = args.pooling
    if args.normalize:
        cfg.model.normalize = True
    if args.task_weights:
        cfg.model.task_weights = parse_task_weights(args.task_weights)
    cfg.validate()
    res = train_multitask(cfg, home=args.home, tracker=Tracker(args.home), callbacks=[ProgressPrinter(args.verbosity)])
    per_task = {k: round(v, 4) for k, v in res.best_metrics.items() if "/" in k and isinstance(v, float)}
    val_loss = res.best_metrics.get("val_loss", float("nan"))
    _err(args, f"best epoch {res.best_epoch}: val_loss {val_loss:.4f}  {per_task}")
    if res.test_metrics:
        _err(args, "test: " + str({k: round(v, 4) for k, v in res.test_metrics.items()}))
    print(f"run id: {res.run_id}")
    return 0


def cmd_studies(args) -> int:
    from .studies import dashboard_hint, list_studies, shown_url

    rows = list_studies(args.home)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        print(dashboard_hint(args.home), file=sys.stderr)
        return 0
    if not rows:
        print("no studies yet: try `python -m dact_lib tune-backbone --trials 5`")
    else:
        print(f"{'study':<32}{'directions':<20}{'trials (done/pruned/failed/running)':<38}{'best':<26}parent run")
        for r in rows:
            t = r["trials"]
            counts = f"{r['n_trials']} ({t['complete']}/{t['pruned']}/{t['fail']}/{t['running']})"
            if len(r["directions"]) == 1:
                best = "-" if r["best_value"] is None else f"{r['best_value']:.5g} (trial {r['best_trial']})"
            else:
                best = "-" if r["n_pareto"] is None else f"{r['n_pareto']} Pareto-optimal"
            print(f"{r['name']:<32}{','.join(r['directions']):<20}{counts:<38}{best:<26}"
                  f"{r['parent_run_id'] if r['parent_run_id'] is not None else '-'}")
            for t in r.get("pareto") or []:  # a two-objective study: its front, one line per trial
                values = ", ".join("nan" if v is None else f"{v:.5g}" for v in t["values"])
                print(f"{'':<4}trial {t['number']}: ({values}) {t['params']}")
        print(f"storage: {shown_url(args.home)}")
    print(dashboard_hint(args.home))
    return 0
