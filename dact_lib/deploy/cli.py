"""CLI commands of deployment: predict (sentences or a file), export, serve.

:func:`add_commands` is called by :func:`dact_lib.cli.build_parser` (as ``tuning.cli.add_commands`` is). The model
is given as ``--run N`` (a run id of the home, or a run folder) or ``--model DIR`` (a run folder or a folder written
by ``export``); ``--runtime torch|onnx`` and ``--int8`` pick the runtime (deploy.predictor), ``--policy`` or
``--latency-budget-ms`` the exit policy of a DACT model. Imports happen inside the handlers so ``--help`` stays
fast and a missing optional package fails only the command that needs it.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from ..cli_args import term
from ..errors import DactLabError

POLICY_HELP = "DACT: exit policy NAME[:VALUE] — dact (default), entropy:S, patience:T, fixed:K"


def _model_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default=None, help="a run id of the home (see `runs`), or a run folder")
    src.add_argument("--model", default=None, metavar="DIR",
                     help="a run folder, or a folder written by `export` (--format hf or onnx)")


def _runtime_args(p) -> None:
    p.add_argument("--runtime", choices=("torch", "onnx"), default=None,
                   help="torch (default; an ONNX export folder always runs on onnx) or onnx: ONNX Runtime on the "
                        "CPU (a run is exported once into <run>/deploy/)")
    p.add_argument("--int8", action="store_true", help="the int8-quantised ONNX graphs (implies --runtime onnx)")
    p.add_argument("--policy", default=None, help=POLICY_HELP)
    p.add_argument("--latency-budget-ms", type=float, default=None, metavar="MS",
                   help="DACT: use the most accurate measured exit point whose latency fits MS milliseconds per "
                        "text (an error when none fits); instead of --policy")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the model (default: the runtime's)")


def add_commands(sub, common: Callable, data_args: Callable, command: Callable) -> None:
    """Add predict, export and serve to ``sub`` and register their handlers with ``command(name)``.
    (``data_args`` is unused: the signature is the one ``tuning.cli.add_commands`` has.)"""
    p = sub.add_parser("predict", help="predict sentences, or a file of texts, with a saved run or an exported model")
    _model_args(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per sentence: label, probability, probabilities (a DACT model: "
                        "exit_layer; multi-task: tasks)")
    p.add_argument("--trace", action="store_true",
                   help="a DACT model: also every layer up to the exit: its answer y_n, halting probability h_n and "
                        "p_n (with --json: layers)")
    p.add_argument("--input", default=None, metavar="FILE",
                   help="predict every text of FILE (.csv/.tsv with a text column, .jsonl, .txt one per line)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="with --input: write the predictions here (.csv or .jsonl), atomically")
    p.add_argument("--batch-size", type=int, default=32, help="texts per model call (default 32)")
    _runtime_args(p)
    p.add_argument("text", nargs="*", help="the sentences (or --input FILE)")
    common(p, tag=False)
    command("predict")(cmd_predict)

    p = sub.add_parser("export", help="export a run for deployment: a transformers folder (hf) or ONNX graphs")
    p.add_argument("--run", required=True, help="a run id of the home (see `runs`), or a run folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--format", choices=("hf", "onnx"), default="hf",
                   help="hf: a transformers folder (default); onnx: per-layer ONNX graphs for ONNX Runtime")
    p.add_argument("--int8", action="store_true", help="with --format onnx: also int8-quantised graphs")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument("--policy", default=None, help=f"the export's default exit policy ({POLICY_HELP})")
    pol.add_argument("--point", type=int, default=None, metavar="K",
                     help="a DACT pipeline's stage-3 point K (its trial number; --run is the pipeline's run id): its "
                          "halting units are baked in, the pipeline's own choice is not changed")
    p.add_argument("--latency-budget-ms", type=float, default=None, metavar="MS",
                   help="DACT: the default policy is the most accurate measured point within MS milliseconds")
    common(p, device=False, tag=False)
    command("export")(cmd_export)

    p = sub.add_parser("serve", help="a REST service of a model: POST /predict, GET /model, GET /health")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    _runtime_args(p)
    p.add_argument("--max-texts", type=int, default=64, help="texts per request at most (default 64)")
    p.add_argument("--max-chars", type=int, default=2000, help="characters per text at most (default 2000)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # the dashboard's: stop with it
    common(p, tag=False)
    command("serve")(cmd_serve)


# --- helpers ----------------------------------------------------------------------------------------------------


def _check_runtime_flags(args) -> None:
    if args.policy is not None and args.latency_budget_ms is not None:
        raise DactLabError("--policy and --latency-budget-ms both choose the exit policy: give one of them.")
    if args.latency_budget_ms is not None and not args.latency_budget_ms > 0:
        raise DactLabError(f"--latency-budget-ms {args.latency_budget_ms:g}: give a number of milliseconds > 0.")
    if args.policy is not None:
        from .policy import parse_policy

        parse_policy(args.policy)  # a bad policy is refused before the model loads


def _budget_policy(args) -> str | None:
    """The policy chosen for ``--latency-budget-ms`` (its message printed on stderr), or an error when no measured
    point fits."""
    if args.latency_budget_ms is None:
        return args.policy
    source = args.run if args.run is not None else args.model
    if args.model is not None:
        from .predictor import folder_kind

        if folder_kind(args.model) != "run":
            raise DactLabError(f"--latency-budget-ms chooses among the measured exit points of a run, and {args.model} "
                               "is an export folder: give --run N (or the run folder), or choose with --policy.")
    from .budget import choose_for_budget

    runtime = "onnx" if args.int8 or args.runtime == "onnx" else "torch"
    got = choose_for_budget(source, args.latency_budget_ms, runtime=runtime, int8=bool(args.int8), home=args.home)
    if got.get("point") is None:
        raise DactLabError(got.get("message") or f"No measured exit point fits {args.latency_budget_ms:g} ms: "
                                                 "raise --latency-budget-ms.")
    print(term(got.get("message") or f"policy {got['policy']}"), file=sys.stderr)
    return got.get("policy")  # None: a model without exit policies whose full run fits


def _load(args):
    from .predictor import load_predictor

    _check_runtime_flags(args)
    policy = _budget_policy(args)
    return load_predictor(args.run, args.model, home=args.home, runtime=args.runtime or "torch", int8=args.int8,
                          policy=policy, device=args.device or "auto", threads=args.threads)


def _tqdm_progress(args):
    """A ``progress(done, total)`` callback drawing a tqdm bar on stderr (none at --verbosity 0), and its closer."""
    if args.verbosity < 1:
        return None, lambda: None
    from tqdm import tqdm

    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:  # made at the first call, when the number of texts is known
            bars.append(tqdm(total=total, unit="text", file=sys.stderr, dynamic_ncols=True, desc="predict"))
        bars[0].update(done - bars[0].n)

    return progress, lambda: [b.close() for b in bars]


# --- handlers ---------------------------------------------------------------------------------------------------


# complexity: one check per flag combination the predict command refuses, then the run
def cmd_predict(args) -> int:
    if args.input is None and args.output is not None:
        raise DactLabError("--output is where the predictions of --input FILE go: give --input too, or drop --output.")
    if args.input is not None:
        if args.text:
            raise DactLabError("Give sentences or --input FILE, not both.")
        if args.output is None:
            raise DactLabError("--input needs --output FILE (.csv or .jsonl) for the predictions.")
        if args.json:
            raise DactLabError("--json prints sentences' predictions; with --input the output format follows "
                               "--output's extension (.csv or .jsonl): drop --json.")
        if args.trace:
            raise DactLabError("--trace shows the layers of the sentences given on the command line; with --input "
                               "drop --trace (or give the sentences themselves).")
    elif not args.text:
        raise DactLabError("Nothing to predict: give one or more sentences, or --input FILE --output FILE.")
    if args.batch_size < 1:
        raise DactLabError(f"--batch-size {args.batch_size}: give a whole number >= 1.")
    if args.input is not None:
        from .predict_files import check_output, read_texts

        check_output(args.output, args.input)
        read_texts(args.input)  # a bad input file is refused before the model loads (predict_file checks again)
    predictor = _load(args)
    if args.input is not None:
        return _predict_file(args, predictor)
    if args.trace and predictor.kind != "dact":
        raise DactLabError(f"--trace shows a DACT model's layers up to its exit; this is a {predictor.kind} model "
                           "(it answers after its last layer): drop --trace.")
    if args.trace and not predictor.runtime.startswith("pytorch"):
        raise DactLabError("--trace comes from the PyTorch model (the ONNX runtime keeps no per-layer trace): drop "
                           "--runtime onnx / --int8, or --trace.")
    texts = list(args.text)
    for text, res in zip(texts, predictor.predict(texts, trace=args.trace, batch_size=args.batch_size)):
        if args.json:
            keep = {k: res[k] for k in ("label", "probability", "probabilities", "exit_layer", "tasks", "layers")
                    if k in res}
            print(json.dumps(keep))
        else:
            line = f"{term(res['label'])}  p={res['probability']:.3f}"
            if "exit_layer" in res:
                line += f"  exit layer {res['exit_layer']}/{res.get('num_layers', predictor.num_layers)}"
            for task, r in res.get("tasks", {}).items():
                line += f"  [{term(task)}: {term(r['label'])} {r['probability']:.3f}]"
            print(f"{line}  <- {term(text)}")
            for layer in res.get("layers", []):  # --trace
                print(f"    layer {layer['layer']}: {term(layer['label'])} {layer['y'][layer['label']]:.3f}  "
                      f"h={layer['h']:.3f}  p={layer['p']:.3f}")
    return 0


def _predict_file(args, predictor) -> int:
    from .predict_files import predict_file

    progress, close = _tqdm_progress(args)
    try:
        got = predict_file(predictor, args.input, args.output, batch_size=args.batch_size, progress=progress)
    finally:
        close()
    print(f"{got['rows']} rows in {got['seconds']:.2f} s ({got['rows_per_s']:.1f} rows/s; {predictor.runtime}"
          f"{', policy ' + predictor.policy if predictor.policy else ''}) -> {term(got['path'])}")
    return 0


def cmd_export(args) -> int:
    if args.int8 and args.format != "onnx":
        raise DactLabError("--int8 quantises ONNX graphs: add --format onnx, or drop --int8.")
    if args.policy is not None:
        if args.latency_budget_ms is not None:
            raise DactLabError("--policy and --latency-budget-ms both choose the exit policy: give one of them.")
        from .policy import parse_policy

        parse_policy(args.policy)
    if args.latency_budget_ms is not None and not args.latency_budget_ms > 0:
        raise DactLabError(f"--latency-budget-ms {args.latency_budget_ms:g}: give a number of milliseconds > 0.")
    from .export import export_model

    got = export_model(args.run, args.out, fmt=args.format, int8=args.int8, policy=args.policy, point=args.point,
                       latency_budget_ms=args.latency_budget_ms, home=args.home)
    budget = got.get("budget")
    if isinstance(budget, dict) and budget.get("message"):
        print(term(budget["message"]), file=sys.stderr)
    print(f"exported ({got.get('format', args.format)}{', int8' if args.int8 else ''}): {term(got['path'])}")
    print(f"policy: {got.get('policy') or '-'}")
    print(f"seconds: {float(got.get('seconds') or 0.0):.1f}")
    return 0


def cmd_serve(args) -> int:
    from .serve import bind_socket, serve

    for flag, value in (("--max-texts", args.max_texts), ("--max-chars", args.max_chars)):
        if value < 1:
            raise DactLabError(f"{flag} {value}: give a whole number >= 1.")
    if args.parent_pid:
        from ..tuning.dashboard_server import stop_with_parent

        if not stop_with_parent(args.parent_pid):  # a parent-pid poll: it may be started from a page's thread
            return 0
    sock = bind_socket(args.host, args.port)  # a busy port fails before the model loads
    try:
        predictor = _load(args)
        host, port = sock.getsockname()[:2]
        where = f"[{host}]" if ":" in str(host) else host
        print(f"serving the {predictor.kind} model {term(predictor.source)} ({predictor.runtime}"
              f"{', policy ' + predictor.policy if predictor.policy else ''}) on http://{where}:{port} — POST "
              "/predict, GET /model, GET /health; Ctrl-C stops", file=sys.stderr)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print("note: the service has no authentication: anyone who can reach this address can use the model.",
                  file=sys.stderr)
        level = {0: "warning", 1: "info", 2: "debug"}[args.verbosity]
        with _stop_on_sigterm():
            serve(predictor, args.host, args.port, max_texts=args.max_texts, max_chars=args.max_chars,
                  log_level=level, sock=sock)
    except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl-C / SIGTERM, then passed the signal on
        pass
    finally:
        sock.close()
    print("stopped", file=sys.stderr)
    return 0


class _stop_on_sigterm:
    """SIGTERM (a service manager's stop) ends ``serve`` like Ctrl-C: uvicorn shuts down gracefully and passes the
    signal on to the handler it found, which here raises KeyboardInterrupt (exit status 0, not killed by -15)."""

    def __enter__(self):
        import signal
        import threading

        self.old = None
        if threading.current_thread() is threading.main_thread():
            def stop(signum, frame):
                raise KeyboardInterrupt

            self.old = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            import signal

            signal.signal(signal.SIGTERM, self.old)
        return False
