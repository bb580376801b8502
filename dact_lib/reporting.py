"""A run reported to the practitioner's own experiment trackers as well: ``train.report_to`` (CLI ``--report-to
mlflow,wandb,tensorboard``, the training form's "Also report to").

DACT Lab's embedded tracker (experiments.db) records every run and stays what the dashboard reads; a reporter is
one more :class:`~dact_lib.callbacks.Callback` of the one loop, added by :func:`build_reporters` right after the
tracker's (so a run reports only where it is recorded: ``train(..., tracker=...)``, as the CLI, the dashboard's jobs
and every engine train). Each one records:

* **params** — the run config flattened to dotted keys (``train.encoder_lr``; lists as JSON), once;
* **step metrics** — what the loop's step logs have: ``train_loss`` (per task ``train_loss/<task>``), ``lr``
  (``lr_head``), ``samples_per_s``, ``train_accuracy``, ``epoch`` … at the loop's optimisation step;
* **eval metrics** — every validation (``val_*``), the post-training refit's and the test split's (``test_*``), at
  the step they were measured;
* **the exit front** (DACT runs whose halting units are fitted after training: the ``halting_fit`` event) — every
  fitted point (λ, calibrated λ, confidence threshold τ) with its cross-fitted accuracy and average exit layer,
  whether it is on the front and which one the run kept, plus ``halting/chosen_accuracy`` and
  ``halting/chosen_avg_exit_layer`` as metrics;
* **the model folder** as an artefact when the run finishes (the run folder without its resume checkpoint, job
  files, deploy exports and TensorBoard logs): MLflow artefacts under ``model/``, a W&B ``model`` Artifact named
  ``dact-lab-run-<id>``. ``$DACT_LAB_REPORT_MODEL=0`` leaves it out (a MiniLM run is ~90 MB);
* the end: status, best and test metrics, the stop reason.

Where each tool writes follows the tool's own settings:

* ``mlflow`` — ``MlflowClient`` at ``mlflow.get_tracking_uri()``: ``$MLFLOW_TRACKING_URI`` (a server, ``sqlite:///
  …``, or a ``file:`` store, which MLflow 3 accepts with ``MLFLOW_ALLOW_FILE_STORE=true``), else MLflow's default
  (MLflow 3: ``sqlite:///mlflow.db`` in the working directory). Experiment ``$MLFLOW_EXPERIMENT_ID`` or
  ``$MLFLOW_EXPERIMENT_NAME``, else ``dact-lab``. Run tags ``dact_lab.run_id``, ``dact_lab.kind``,
  ``dact_lab.tags``, ``dact_lab.parent_run_id`` and ``mlflow.source.git.commit``. ``pip install mlflow-skinny`` (or
  ``mlflow``) is enough.
* ``wandb`` — ``wandb.init`` as W&B configures it: ``$WANDB_MODE`` (``offline`` writes ``<WANDB_DIR>/wandb/
  offline-run-*/`` for a later ``wandb sync``), ``$WANDB_DIR`` (default the working directory), ``$WANDB_PROJECT``
  (default ``dact-lab``), ``$WANDB_ENTITY``, the API key of ``wandb login``. Metrics are plotted against
  ``train/global_step`` (the loop's step); engine members are grouped by their parent run.
* ``tensorboard`` — ``torch.utils.tensorboard.SummaryWriter`` event files in ``$DACT_LAB_TENSORBOARD_DIR/<run id>``
  when that is set, else **the run folder's** ``tensorboard/`` (``tensorboard --logdir <home>/runs`` shows every
  run; the logs go with the run when it is deleted or the home is moved), else — a run without a folder (backbone
  tuning's trials) — ``<home>/tensorboard/<run id>``. Scalars under the same names, the config as text and as
  HParams, the exit front as a text table.

A resumed run (``train --resume``) continues the same MLflow run, W&B run (``resume="allow"``; offline W&B starts
a new folder with the same id) and TensorBoard folder (events past the checkpoint purged): where each reporter
reported is recorded as a ``reported_to`` event of the run.

Failures: a name not in :data:`~dact_lib.config.REPORT_TOOLS` is refused when the config is validated; a tool that
is not installed is a :class:`~dact_lib.errors.DactLabError` naming the ``pip install`` (the CLI says so before
anything starts, :func:`require_tools`; a run started otherwise fails at its start with that message). A tool that
fails while the run trains (a tracking server down, a full disk) is logged once as a warning and as a ``warning``
event of the run, that reporter is switched off for the rest of the run, and training goes on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import events as ev
from .callbacks import Callback, LoopState
from .config import REPORT_TOOLS, RunConfig
from .errors import DactLabError
from .front import report_chosen, report_points
from .tags import tag_list, tag_text

log = logging.getLogger(__name__)

#: tool -> (the module it needs, what to install); extras of dact-lab: pip install 'dact-lab[mlflow]'
REQUIREMENTS = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb"),
                "tensorboard": ("tensorboard", "tensorboard")}
TENSORBOARD_ENV = "DACT_LAB_TENSORBOARD_DIR"
REPORT_MODEL_ENV = "DACT_LAB_REPORT_MODEL"
DEFAULT_PROJECT = "dact-lab"
#: what of a run folder is not the model (train.RESUME_FILE, train.LEGACY_RESUME_FILE, jobs' and exports' folders,
#: the reporters' own logs)
NOT_MODEL = {"resume.safetensors", "resume.pt", "job", "deploy", "tensorboard", "wandb", "mlruns"}
STEP_KEY = "train/global_step"  # W&B's x-axis: the loop's step (as transformers' WandbCallback names it)


def missing_tools(tools) -> list[str]:
    """The tools of ``tools`` whose library is not installed (found without importing it)."""
    return [t for t in tools if t in REQUIREMENTS and importlib.util.find_spec(REQUIREMENTS[t][0]) is None]


def install_hint(tools) -> str:
    return (f"pip install {' '.join(REQUIREMENTS[t][1] for t in tools)} (or pip install -e '.[{','.join(tools)}]' "
            "in a DACT Lab checkout)")


def require_tools(tools) -> None:
    """Raise a :class:`DactLabError` naming the ``pip install`` when a tool of ``tools`` is not installed."""
    missing = missing_tools(tools)
    if missing:
        raise DactLabError(f"train.report_to asks for {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
                           f" not installed in this Python ({sys.executable}): {install_hint(missing)}, or drop "
                           f"{'it' if len(missing) == 1 else 'them'} from report_to / --report-to.")


def parse_report_to(text: str | None) -> list[str]:
    """``--report-to mlflow,wandb`` → ``["mlflow", "wandb"]`` (names checked by the config's validation)."""
    return [t.strip().lower() for t in (text or "").split(",") if t.strip()]


def build_reporters(cfg: RunConfig, run_id: Any, run_dir: str | Path | None = None, tracker=None) -> list[Callback]:
    """The reporters of ``cfg.train.report_to`` for run ``run_id`` (its folder ``run_dir`` — None for a run that
    saves nothing — and its tracker), in that order; ``[]`` when it is empty. A tool that is not installed gives a
    callback that fails the run at its first event with the ``pip install`` to run."""
    tools = list(cfg.train.report_to or [])
    if not tools:
        return []
    missing = missing_tools(tools)
    if missing:
        return [MissingTools(missing)]
    classes = {"mlflow": MlflowReporter, "wandb": WandbReporter, "tensorboard": TensorBoardReporter}
    return [classes[t](cfg, run_id, run_dir, tracker) for t in tools if t in REPORT_TOOLS]


class MissingTools(Callback):
    """Fails the run at its first event (recorded by the tracker as the run's error): a tool is not installed."""

    def __init__(self, tools: list[str]) -> None:
        self.tools = tools

    def on_start(self, state: LoopState) -> None:
        require_tools(self.tools)

    def on_event(self, state: LoopState, kind: str, payload: dict[str, Any]) -> None:
        require_tools(self.tools)


# ------------------------------------------------------------------------------------------------ shared helpers

def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_text(value: Any, limit: int = 6000) -> str:
    """A config value as a tool's parameter text (lists and mappings as JSON), at most ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def numeric(logs: dict) -> dict[str, float]:
    """The numbers of a loop's logs as floats (bools, text and None left out)."""
    out = {}
    for k, v in (logs or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v)  # numpy / torch scalars
            except (TypeError, ValueError):
                continue
        out[str(k)] = float(v)
    return out


FRONT_COLUMNS = ("family", "lambda", "threshold", "scale", "shift", "avg_exit_layer", "accuracy", "on_front",
                 "chosen")


def exit_front_rows(halting: dict) -> list[dict]:
    """The points of a ``halting_fit`` payload (λ, calibrated λ, threshold τ) as rows of :data:`FRONT_COLUMNS`:
    ``on_front`` = no other point exits earlier (or as early) with a higher accuracy; ``chosen`` = the run kept it."""
    family = {"λ": "lambda", "calibrated λ": "calibrated", "threshold τ": "threshold"}
    pts = [p for p in report_points(halting) if p.val_avg_exit_layer is not None and p.val_accuracy is not None]
    chosen = report_chosen(halting)
    rows: list[dict[str, Any]] = [
        {"family": family[str(p.family)], "lambda": p.front_lambda, "threshold": p.threshold, "scale": p.scale,
         "shift": p.shift, "avg_exit_layer": p.val_avg_exit_layer, "accuracy": p.val_accuracy} for p in pts]
    for r, p in zip(rows, pts):
        r["on_front"] = not any(o is not r and o["avg_exit_layer"] <= r["avg_exit_layer"] and o["accuracy"] >
                                r["accuracy"] for o in rows)
        r["chosen"] = chosen is not None and p.same_point(chosen)
    return rows


def chosen_metrics(halting: dict) -> dict[str, float]:
    chosen = report_chosen(halting)
    if chosen is None:
        return {}
    values = {"accuracy": chosen.val_accuracy, "avg_exit_layer": chosen.val_avg_exit_layer}
    return {f"halting/chosen_{k}": float(v) for k, v in values.items() if v is not None}


def model_files(run_dir: str | Path | None) -> list[tuple[Path, str]]:
    """``(file, its path in the artefact)`` of the model in a run folder (:data:`NOT_MODEL` and temp files left
    out); ``[]`` when ``$DACT_LAB_REPORT_MODEL`` is 0 or there is no folder."""
    if run_dir is None or os.environ.get(REPORT_MODEL_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    root = Path(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or rel.parts[0] in NOT_MODEL or p.name.endswith(".tmp"):
            continue
        out.append((p, rel.as_posix()))
    return out


class Reporter(Callback):
    """One tool's reporter. Subclasses implement ``start`` / ``step`` / ``eval`` / ``front`` / ``end``; every call
    goes through :meth:`_guard`, so a failing tool warns once, is switched off and never stops the run."""

    tool = ""
    label = ""

    def __init__(self, cfg: RunConfig, run_id: Any, run_dir: str | Path | None = None, tracker=None) -> None:
        self.cfg, self.run_id, self.tracker = cfg, run_id, tracker
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.started = False
        self.disabled = False

    # what a run is called in the tools
    @property
    def run_name(self) -> str:
        return self.cfg.name or f"dact-lab run {self.run_id}"

    def parent_id(self) -> Any:
        if self.tracker is None or self.run_id is None:
            return None
        try:
            return self.tracker.get_run(int(self.run_id)).get("parent_id")
        except Exception:  # noqa: BLE001 - a label, not worth failing for
            return None

    def previous(self, state: LoopState, same: dict) -> dict | None:
        """Where this tool reported this run before it was interrupted (a resumed run, ``state.step > 0``): the
        last ``reported_to`` event of this tool whose ``same`` fields match, else None."""
        if not state.step or self.tracker is None or self.run_id is None:
            return None
        try:
            found = [e["payload"] for e in self.tracker.get_events(int(self.run_id), [ev.REPORTED_TO])]
        except Exception:  # noqa: BLE001
            return None
        found = [p for p in found if p.get("tool") == self.tool and all(p.get(k) == v for k, v in same.items())]
        return found[-1] if found else None

    def record(self, where: dict) -> None:
        """Record where this tool reports the run (a ``reported_to`` event: the Runs page, a resume)."""
        log.info("run %s reports to %s: %s", self.run_id, self.label, where)
        if self.tracker is not None and self.run_id is not None:
            try:
                self.tracker.log_event(int(self.run_id), ev.REPORTED_TO, {"tool": self.tool, **where})
            except Exception as exc:  # noqa: BLE001
                log.warning("could not record where run %s reports to %s: %s", self.run_id, self.label, exc)

    def _guard(self, what: str, fn, *args) -> None:
        if self.disabled:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a reporter never stops training
            self.disabled = True
            msg = (f"reporting run {self.run_id} to {self.label} failed while {what} ({type(exc).__name__}: "
                   f"{str(exc)[:500]}); {self.label} reporting is off for the rest of this run, which goes on "
                   "(DACT Lab's own tracker records everything)")
            log.warning(msg)
            if self.tracker is not None and self.run_id is not None:
                with contextlib.suppress(Exception):  # the warning is logged above
                    self.tracker.log_event(int(self.run_id), ev.WARNING, {"message": msg, "tool": self.tool})
            with contextlib.suppress(Exception):  # best effort
                self.abort()

    # the Callback interface -------------------------------------------------------------------------------
    def on_start(self, state: LoopState) -> None:
        self._guard("starting", self._start, state)

    def _start(self, state: LoopState) -> None:
        self.start(state)
        self.started = True

    def on_step(self, state: LoopState, logs: dict[str, float]) -> None:
        if self.started and logs:
            self._guard("logging step metrics", self.step, state, numeric(logs))

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None:
        if self.started and logs:
            self._guard("logging evaluation metrics", self.eval, state, numeric(logs))

    def on_event(self, state: LoopState, kind: str, payload: dict[str, Any]) -> None:
        if self.started and kind == ev.HALTING_FIT and isinstance(payload, dict):
            self._guard("logging the exit front", self.front, state, payload)

    def on_end(self, state: LoopState, status: str) -> None:
        if self.started:
            self._guard("ending the run", self.end, state, status)

    # what a tool implements ------------------------------------------------------------------------------
    def start(self, state: LoopState) -> None: ...

    def step(self, state: LoopState, logs: dict[str, float]) -> None: ...

    def eval(self, state: LoopState, logs: dict[str, float]) -> None:
        self.step(state, logs)

    def front(self, state: LoopState, halting: dict) -> None: ...

    def end(self, state: LoopState, status: str) -> None: ...

    def abort(self) -> None:
        """Release what is open after a failure (best effort, errors ignored)."""

    @staticmethod
    def results(state: LoopState) -> dict:
        """The run's best / test metrics and stop reason at its end (the loop's ``state.summary``)."""
        s = state.summary or {}
        return {"best": numeric(s.get("best") or {}), "test": numeric(s.get("test") or {}),
                "stop_reason": s.get("stop_reason")}


# ------------------------------------------------------------------------------------------------------ MLflow

def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking server that does not accept a connection fails at once (MLflow's own retries would hold
    the run's start for minutes)."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https") or not u.hostname:
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    with socket.create_connection((u.hostname, port), timeout=timeout_s):
        pass


class MlflowReporter(Reporter):
    tool, label = "mlflow", "MLflow"
    flush_every_s = 5.0
    batch = 1000  # MLflow's limit of metrics per log_batch

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.client: Any = None  # mlflow's MlflowClient once started
        self.mlflow_run_id: str | None = None
        self._buffer: list = []
        self._last_flush = time.monotonic()

    def experiment_id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, state: LoopState) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = mlflow.get_tracking_uri()
        check_reachable(uri)
        self.client = MlflowClient(tracking_uri=uri)
        before = self.previous(state, {"tracking_uri": uri})
        if before:
            self.mlflow_run_id = before["run_id"]
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        else:
            from .sysinfo import environment

            git = environment().get("git") or {}
            tags = {"dact_lab.run_id": str(self.run_id), "dact_lab.kind": self.cfg.kind,
                    "dact_lab.encoder": self.cfg.encoder, "dact_lab.tags": tag_text(self.cfg.tag) or "",
                    "mlflow.source.git.commit": git.get("commit") or "",
                    "dact_lab.parent_run_id": str(self.parent_id() or "")}
            run = self.client.create_run(self.experiment_id(), run_name=self.run_name,
                                         tags={k: v for k, v in tags.items() if v})
            self.mlflow_run_id = run.info.run_id
            params = [Param(k, param_text(v)) for k, v in flatten(self.cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow's limit of params per log_batch
                self.client.log_batch(self.mlflow_run_id, params=params[i:i + 100])
        self.record({"tracking_uri": uri, "run_id": self.mlflow_run_id,
                     "experiment_id": self.client.get_run(self.mlflow_run_id).info.experiment_id})

    def _add(self, state: LoopState, logs: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms, step = int(time.time() * 1000), int(state.step)
        self._buffer += [Metric(k, v, ms, step) for k, v in logs.items() if math.isfinite(v)]

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        rows, self._buffer = self._buffer, []
        for i in range(0, len(rows), self.batch):
            self.client.log_batch(self.mlflow_run_id, metrics=rows[i:i + self.batch])

    def step(self, state, logs):
        self._add(state, logs)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def eval(self, state, logs):
        self._add(state, logs)
        self.flush()

    def front(self, state, halting):
        self._add(state, chosen_metrics(halting))
        self.flush()
        self.client.log_dict(self.mlflow_run_id, {"points": exit_front_rows(halting), "chosen": halting.get("chosen"),
                                                  "cross_fitted": halting.get("cross_fitted"),
                                                  "rows": halting.get("rows")}, "exit_front.json")

    def end(self, state, status):
        self.flush()
        res = self.results(state)
        if res["stop_reason"]:
            self.client.set_tag(self.mlflow_run_id, "dact_lab.stop_reason", str(res["stop_reason"])[:5000])
        if status == "finished":
            for path, rel in model_files(self.run_dir):
                parent = Path("model", rel).parent.as_posix()
                self.client.log_artifact(self.mlflow_run_id, str(path), parent)
        self.client.set_terminated(self.mlflow_run_id, "FINISHED" if status == "finished" else
                                   "FAILED" if status == "failed" else "KILLED")

    def abort(self):
        if self.client is not None and self.mlflow_run_id is not None:
            self.client.set_terminated(self.mlflow_run_id, "FAILED")


# ------------------------------------------------------------------------------------------------- W&B

class WandbReporter(Reporter):
    tool, label = "wandb", "W&B"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run: Any = None  # the wandb Run once started

    def start(self, state: LoopState) -> None:
        import wandb

        project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        mode = os.environ.get("WANDB_MODE") or "online"
        parent = self.parent_id()
        kwargs: dict[str, Any] = {
            "project": project, "name": self.run_name, "config": self.cfg.to_dict(), "job_type": self.cfg.kind,
            "tags": [t[:64] for t in ["dact-lab", self.cfg.kind, *tag_list(self.cfg.tag)]][:20],
            "group": f"dact-lab run {parent}" if parent is not None else None, "reinit": "create_new"}
        before = self.previous(state, {"project": project})
        if before and before.get("id"):
            kwargs.update(id=before["id"], resume="allow")
        self.run = wandb.init(**kwargs)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY, step_sync=True)
        self.run.summary["dact_lab_run_id"] = self.run_id
        self.record({"project": project, "id": self.run.id, "mode": mode, "dir": str(self.run.dir),
                     "url": getattr(self.run, "url", None)})

    def step(self, state, logs):
        self.run.log({**logs, STEP_KEY: int(state.step)})

    def front(self, state, halting):
        import wandb

        rows = exit_front_rows(halting)
        table = wandb.Table(columns=list(FRONT_COLUMNS), data=[[r.get(c) for c in FRONT_COLUMNS] for r in rows])
        self.run.log({"exit_front": table, **chosen_metrics(halting), STEP_KEY: int(state.step)})

    def end(self, state, status):
        import wandb

        res = self.results(state)
        self.run.summary.update({"status": status, "best": res["best"], "test": res["test"],
                                 "stop_reason": res["stop_reason"]})
        files = model_files(self.run_dir) if status == "finished" else []
        if files:
            art = wandb.Artifact(f"dact-lab-run-{self.run_id}", type="model",
                                 metadata={"dact_lab_run_id": self.run_id, "kind": self.cfg.kind,
                                           "encoder": self.cfg.encoder, "best": res["best"], "test": res["test"]})
            for path, rel in files:
                art.add_file(str(path), name=rel, policy="immutable")  # the run's files are final: no staging copy
            self.run.log_artifact(art)
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.run = None

    def abort(self):
        if self.run is not None:
            self.run.finish(exit_code=1)
            self.run = None


# -------------------------------------------------------------------------------------------- TensorBoard

class TensorBoardReporter(Reporter):
    tool, label = "tensorboard", "TensorBoard"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writer: Any = None  # torch's SummaryWriter once started

    def log_dir(self) -> Path:
        """``$DACT_LAB_TENSORBOARD_DIR/<run id>``, else the run folder's ``tensorboard/``, else ``<home>/
        tensorboard/<run id>`` (a run without a folder)."""
        if os.environ.get(TENSORBOARD_ENV):
            return Path(os.environ[TENSORBOARD_ENV]).expanduser() / str(self.run_id)
        if self.run_dir is not None:
            return self.run_dir / "tensorboard"
        home = getattr(self.tracker, "home", None)
        if home is None:
            from .home import resolve_home

            home = resolve_home(None)
        return Path(home) / "tensorboard" / str(self.run_id)

    def start(self, state: LoopState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = self.log_dir()
        # a resumed run: what the interrupted one logged after its checkpoint is hidden, as the tracker drops it
        self.writer = SummaryWriter(log_dir=str(path), purge_step=int(state.step) + 1 if state.step else None)
        if not state.step:
            self.writer.add_text("config", "    " + self.cfg.to_json().replace("\n", "\n    "), 0)
            self.hparams()
        self.record({"log_dir": str(path)})

    def hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = {k: (v if isinstance(v, (int, float, str, bool)) else param_text(v, 250))
                  for k, v in flatten(self.cfg.to_dict()).items()}
        metrics = {m: 0.0 for m in ("val_accuracy", "val_loss", "val_macro_f1")}
        if self.cfg.kind == "dact":
            metrics["val_avg_exit_layer"] = 0.0
        exp, ssi, sei = hparams(params, metrics)
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def step(self, state, logs):
        for k, v in logs.items():
            self.writer.add_scalar(k, v, int(state.step))

    def eval(self, state, logs):
        self.step(state, logs)
        self.writer.flush()

    def front(self, state, halting):
        self.step(state, chosen_metrics(halting))
        rows = exit_front_rows(halting)
        head = "| " + " | ".join(FRONT_COLUMNS) + " |\n|" + "---|" * len(FRONT_COLUMNS) + "\n"
        body = "".join("| " + " | ".join("" if r.get(c) is None else f"{r[c]:.4g}" if isinstance(r[c], float)
                                         else str(r[c]) for c in FRONT_COLUMNS) + " |\n" for r in rows)
        self.writer.add_text("exit_front", head + body, int(state.step))

    def end(self, state, status):
        res = self.results(state)
        self.writer.add_text("result", f"status: {status}\n\nstop reason: {res['stop_reason']}\n\n    best: "
                             f"{json.dumps(res['best'])}\n    test: {json.dumps(res['test'])}", int(state.step))
        self.writer.close()
        self.writer = None

    def abort(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
