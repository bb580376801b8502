"""Population Based Training on Ray Tune: the same members, search space and perturbation rules as the threaded
engine (:mod:`dact_lib.tuning.pbt`), each member a Ray Tune trial that runs the ONE training loop
(:func:`dact_lib.train.train`), scheduled by Ray's ``PopulationBasedTraining`` (or ``PB2``) on a local Ray or a
cluster. Ray is imported lazily (inside the functions here): the library imports without it.

How it runs
-----------
* :func:`run_pbt_ray` loads the split once, draws the population with the threaded engine's
  :func:`~dact_lib.tuning.pbt.draw_population` (the architecture once for everyone, per member ``lr``/
  ``weight_decay``/``dropout``/``warmup_ratio`` from :class:`~dact_lib.tuning.pbt.PBTSpace` and a batch size
  fixed for its life: one seed, one population whatever the backend), records a
  parent run (kind ``"pbt"``, config and summary with ``backend: "ray"`` and the ``address``) and one child run
  per member (kind ``"pbt-member"``), then starts one Tune trial per member (``tune.grid_search`` over the member
  index; the scheduler writes the member's drawn hyperparameters into the trial config when the trial is added).
* The trial function (:func:`ray_member`, in a Ray worker) builds the member's model and runs ``train()`` with
  ``save=False`` and no tracker, plus a :class:`RayMemberCallback`. A member is *ready* at every evaluation of
  its loop (``eval_every_steps`` from ``ready_every_steps`` / ``ready_every_epochs``, as in the threaded engine).
  At a ready point the callback writes a checkpoint — ``member_state.safetensors`` (tensors as safetensors, the
  rest as JSON in its header; read back without pickle): the weights, the optimizer state, the
  RNG, the hyperparameters, the step, the loop's own resume state (epoch, batch, history, early-stopping state,
  best metrics) and the member's best weights when they are not the current ones — and calls
  ``ray.tune.report(metrics, checkpoint=...)``. A Tune function trial blocks inside ``report`` until the driver
  has processed the result, so Ray's decision (go on, or exploit) is taken while the loop waits.
* Time is ``ready_points`` (ready points passed, in the member's own steps) with ``perturbation_interval = 1``:
  every ready point is a perturbation point, like the threaded engine's. The metric is ``PBTConfig.metric``
  (``mode`` min for losses). Ray's quantiles are replaced by :func:`~dact_lib.tuning.pbt.select_quantiles`
  (``quantile`` of PBTConfig, ties and NaN handled alike; no exploit at a member's last ready point), its explore
  by :func:`~dact_lib.tuning.pbt.explore` (``perturb_factors`` 0.8/1.2, ``resample_prob``, clipped to the space)
  given to Ray as its ``custom_explore_fn`` (:class:`Explorer`). With ``scheduler="pb2"`` Ray's PB2 (a GP bandit, needs scikit-learn) proposes the new values inside the
  space's ranges (linear scale, ranges with low == high left out); they are clipped to the space as well.
* **Exploit → restore.** Ray's exploit pauses the recipient and restarts it from the donor's latest checkpoint with
  a new config. The scheduler here (a subclass of Ray's, :func:`ray_classes`) overrides ``_exploit``: the
  recipient's new config is its OWN (member index, hence batch size) with the explored values and
  ``pbt_restart = {own_checkpoint, step, donor}`` — the recipient's own checkpoint of that ready point. On restart
  ``ray_member`` reads ``tune.get_checkpoint()``: a checkpoint of another member is a donor's, so it takes the
  donor's weights and optimizer state, its own loop state (step, epoch, batch, history, best) and best weights from
  ``own_checkpoint``, and continues at its OWN step (as the threaded engine's exploit does) through
  ``train(resume_state=...)``; :class:`RayMemberCallback` then applies the new hyperparameters
  (:func:`~dact_lib.tuning.pbt.apply_hparams`: every param group's lr / initial_lr with the encoder/head ratio,
  weight decay, Dropout rates, a new warm-up/decay schedule) — the restored optimizer state would otherwise keep the
  donor's. A checkpoint of its own (Ray paused and resumed it, e.g. more members than slots) is a plain resume.
  The scheduler also keeps the recipient's own clock (Ray copies the donor's).
* **Recording.** The worker has no tracker: its loop's metric rows and events (a :class:`~dact_lib.tracker.
  TrackerCallback` over an in-memory buffer) travel in each report. On the driver, a Ray Tune ``Callback``
  (:class:`RayBook` behind it) writes them into the member's run; everything else is the threaded engine's
  record, written by the same :class:`~dact_lib.tuning.pbt_book.PopulationBook`: ``hp/lr`` … at every ready
  point, the ``pbt_exploit`` / ``pbt_explore`` events of the scheduler's ``_exploit`` (plus ``donor_checkpoint``),
  member outcomes, the winner and the parent's summary, each event and member summary tagged ``backend: "ray"``.
  After training the worker saves the model
  (its lifetime-best weights, then the test split, as ``train()`` does) into a final checkpoint; the driver copies
  it into the member's run folder.

Differences from the threaded engine: a finished member is no longer a donor (Ray ranks live trials only);
``train.time_limit_min`` counts from each (re)start of a member; a PBT run on Ray cannot be resumed (run it again).
Checkpoints live in Ray's storage (``storage_path``; default a temporary folder, removed at the end unless
``keep_ray_results``); a cluster of several machines needs a ``storage_path`` every node sees (NFS, S3 …).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

from ..callbacks import Callback, CancelToken, LoopState
from ..config import RunConfig, check
from ..errors import Cancelled, ConfigError, DactLabError
from .. import events as ev
from .pbt import PBTConfig, apply_hparams, draw_population, explore, select_quantiles
from .pbt_book import ENDED, EXPLORED, PBTResult, PopulationBook, best_step

if TYPE_CHECKING:
    from ..tracker import Tracker

log = logging.getLogger(__name__)

BACKEND = "ray"
TESTED_RAY = "2.60."  # the Ray minor the scheduler subclass is tested with (pyproject's ray extra)
SCHEDULERS = ("pbt", "pb2")
INSTALL_HINT = 'pip install "ray[tune]>=2.60,<2.61"'
#: the file of a member checkpoint (safetensors + JSON header, no pickle: :func:`dact_lib.train.save_state_file`)
STATE_FILE = "member_state.safetensors"
#: the ``kind`` in a member checkpoint's header
STATE_KIND = "pbt-member"
#: Tune's time attribute: ready points passed, in the member's own steps
TIME_ATTR = "ready_points"
#: what a Tune result names its checkpoint folder by (ray.train.constants.CHECKPOINT_DIR_NAME)
CHECKPOINT_DIR_KEY = "checkpoint_dir_name"
#: where the explore step (:class:`Explorer`) leaves its changes in the config it returns, for the exploit record
EXPLORE_KEY = "pbt_explore"
#: keys of a report that only the driver's recorder reads (popped before Ray's own loggers see the result)
_PRIVATE_KEYS = ("dact_rows", "dact_events", "dact_end")


def require_ray():
    """The ``ray`` module, with Tune; a DactLabError naming the install command when it is missing."""
    try:
        import ray
        import ray.tune  # noqa: F401 - Tune is the optional part of Ray
    except ImportError as exc:
        raise DactLabError(f"PBT on Ray needs Ray Tune, which cannot be imported here ({exc}): install it with "
                           f"{INSTALL_HINT} (or pip install -e '.[ray]'), or use the threaded engine "
                           "(--backend threads).") from None
    if not str(getattr(ray, "__version__", "")).startswith(TESTED_RAY):
        raise DactLabError(f"PBT on Ray is tested with Ray {TESTED_RAY}x and this is Ray {ray.__version__}: its "
                           "scheduler subclasses parts of Ray Tune's PBT that change between releases. Install "
                           f"{INSTALL_HINT}, or use the threaded engine (backend 'threads').")
    return ray


def pb2_scheduler_class():
    """Ray's PB2 scheduler class; a DactLabError naming what to install when it cannot be used."""
    require_ray()
    try:
        from ray.tune.schedulers.pb2 import PB2, import_pb2_dependencies
    except ImportError as exc:
        raise DactLabError(f"scheduler 'pb2' is not available in this Ray ({exc}): upgrade with {INSTALL_HINT}, "
                           "or use scheduler 'pbt'.") from None
    if not import_pb2_dependencies():
        raise DactLabError("scheduler 'pb2' needs scikit-learn (its Gaussian process): pip install scikit-learn, "
                           "or use scheduler 'pbt'.")
    return PB2


# --- the worker side: one member's trial ----------------------------------------------------------------------


class BufferTracker:
    """What the loop's :class:`~dact_lib.tracker.TrackerCallback` writes to in a Ray worker: metric rows and
    events kept in memory until the next report carries them to the driver (which owns the run records). It has
    every method TrackerCallback calls on a Tracker (hence the ``cast`` where one is given to it)."""

    errors: tuple = ()

    def __init__(self) -> None:
        self.rows: list[list] = []
        self.events: list[list] = []
        self.end: dict | None = None

    def insert_metric_rows(self, tuples) -> None:
        self.rows.extend(list(t) for t in tuples)

    def log_event(self, run_id, kind: str, payload: dict | None = None) -> None:
        self.events.append([str(kind), copy.deepcopy(payload or {})])

    def set_status(self, *args, **kwargs) -> None:  # the driver records the status
        return None

    def end_run(self, run_id, status: str, error, summary_update: dict) -> None:
        self.end = {"status": status, "error": error, "summary": copy.deepcopy(summary_update)}

    def take(self) -> tuple[list, list]:
        rows, events = self.rows, self.events
        self.rows, self.events = [], []
        return rows, events


#: what a member checkpoint must hold (:func:`restart_from` reads each of these)
STATE_KEYS = ("member", "step", "loop", "model", "optimizer", "rng")


def read_member_state(checkpoint) -> dict:
    """The ``member_state.safetensors`` of a member checkpoint (a ``ray.tune.Checkpoint``), on the CPU. Read without
    pickle (:func:`dact_lib.train.load_state_file`): a damaged or foreign file is a DactLabError naming it."""
    from ..train import load_state_file

    with checkpoint.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.is_file():
            raise DactLabError(f"{checkpoint.path} holds no {STATE_FILE}: not a checkpoint of a DACT Lab PBT member "
                               "(or one written by an older DACT Lab): run the PBT again.")
        fix = "The member cannot restart from it: run the PBT again (a Ray PBT run cannot be resumed)."
        state = load_state_file(path, STATE_KIND, fix)
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise DactLabError(f"{path} is not a complete PBT member checkpoint (no {', '.join(missing)}). {fix}")
        return state


def restart_from(config: dict, checkpoint, member: int):
    """How a (re)started member continues: None for a fresh start; else ``(resume_state, best_state, info)``.

    A checkpoint of this member (Ray paused and resumed it) is a plain resume. A checkpoint of another member is
    an exploit's donor: its weights, optimizer state and RNG, with this member's own loop state and best weights
    from ``config['pbt_restart']['own_checkpoint']`` (this member's checkpoint at the exploit's ready point)."""
    if checkpoint is None:
        return None
    got = read_member_state(checkpoint)
    if int(got["member"]) == member:
        own, how = got, "own"
    else:
        restart = config.get("pbt_restart") or {}
        if not restart.get("own_checkpoint"):
            raise DactLabError(f"member {member} was restarted from member {got['member']}'s checkpoint without "
                               "its own (config 'pbt_restart'): the scheduler is not DACT Lab's.")
        from ray.tune import Checkpoint

        own = read_member_state(Checkpoint(restart["own_checkpoint"], filesystem=checkpoint.filesystem))
        how = "exploit"
    loop = dict(own["loop"])
    resume_state = {**loop, "model": got["model"], "optimizer": got["optimizer"], "rng": got["rng"],
                    "callbacks": {}}
    best = own.get("best_model")
    best_state = best if best is not None else own["model"]
    own_path = (config.get("pbt_restart") or {}).get("own_checkpoint") if how == "exploit" else checkpoint.path
    info = {"how": how, "step": int(loop["step"]), "donor": int(got["member"]), "donor_step": int(got["step"]),
            "donor_checkpoint": checkpoint.path, "own_checkpoint": own_path}
    return resume_state, best_state, info


class RayMemberCallback(Callback):
    """Turns one member's training loop into a Ray Tune PBT trial: at every evaluation (a ready point) a
    checkpoint and ``tune.report``; at the start the member's hyperparameters (from the trial config) applied to
    the optimizer and Dropouts; after a restore its best weights put back where the loop keeps its best state.
    ``state.extra['pbt_ray']`` tells later callbacks how this start came about (``restart``: None or the info of
    :func:`restart_from`)."""

    def __init__(self, *, member: int, hp: dict[str, Any], metric: str, encoder_lr_ratio: float, dropout_scope: str,
                 eval_every: int, buffer: BufferTracker, restart=None) -> None:
        self.member = int(member)
        self.hp = {k: float(hp[k]) for k in EXPLORED}
        self.metric = metric
        self.ratio = encoder_lr_ratio
        self.scope = dropout_scope
        self.eval_every = max(1, int(eval_every))
        self.buffer = buffer
        self.restart_info = None
        self.best_state = None
        raw: list = []
        if restart is not None:
            resume_state, self.best_state, self.restart_info = restart
            raw = list((resume_state.get("stopper") or {}).get("raw") or [])
        self.report_restart = self.restart_info is not None  # the first report tells the driver
        self.improved_step: int | None = None
        self.loop_over = False
        self.last_score: float | None = raw[-1] if raw else None
        self.steps_per_epoch = 1
        self.total_steps = 0
        self.step, self.epoch = 0, 0

    def on_start(self, state: LoopState) -> None:
        state.extra["pbt_member"] = self.member
        model, optimizer = state.model, state.optimizer
        state.set_lr_schedule(apply_hparams(model, optimizer, self.hp, total_steps=state.total_steps,
                                            step=state.step, encoder_lr_ratio=self.ratio, dropout_scope=self.scope))
        if self.best_state is not None and state.best_state is None:
            state.best_state = self.best_state  # the loop restores it at the end unless it finds better
        self.best_state = None
        self.steps_per_epoch = max(1, math.ceil(int(state.train_size or 1) / max(1, state.batch_size)))
        self.total_steps = int(state.total_steps)
        self.step, self.epoch = int(state.step), int(state.epoch)
        state.extra["pbt_ray"] = {"member": self.member, "hp": dict(self.hp), "restart": self.restart_info}

    def on_step(self, state: LoopState, logs: dict[str, float]) -> None:
        self.step, self.epoch = int(state.step), int(state.epoch)

    def on_event(self, state: LoopState, kind: str, payload: dict[str, Any]) -> None:
        if kind == ev.CHECKPOINT:
            self.improved_step = state.step
        elif kind == ev.RESTORED_BEST:
            self.loop_over = True  # evaluations from here on (refit, test) are no ready points

    def progress(self, step: int) -> float:
        return step / self.steps_per_epoch

    def base_metrics(self) -> dict[str, Any]:
        """What every report carries: time, step, the loop's rows and events since the last report."""
        rows, events = self.buffer.take()
        out = {TIME_ATTR: self.step // self.eval_every, "step": self.step, "epoch": self.epoch,
               "progress": self.progress(self.step), "total_steps": self.total_steps, "member": self.member,
               "dact_rows": rows, "dact_events": events}
        if self.report_restart and self.restart_info is not None:
            out["dact_restart_step"] = int(self.restart_info["step"])
            out["dact_restart"] = dict(self.restart_info)
            self.report_restart = False
        return out

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None:
        if self.loop_over or self.metric not in logs:  # the final refit / test evaluations: no ready points
            return
        from ray import tune

        from ..train import rng_state, save_state_file

        score = float(logs[self.metric])
        self.last_score = score
        self.step, self.epoch = int(state.step), int(state.epoch)
        improved = self.improved_step == state.step
        model, optimizer = state.model, state.optimizer
        # the loop's own state (history, stopper, best metrics are updated before on_eval), as a resume checkpoint
        loop = {**state.resume_dict(epoch=int(state.epoch),
                                    batch=int(state.step - state.epoch * self.steps_per_epoch), stop=False),
                "stop_reason": None}
        best = None if improved else state.best_state
        payload = {"format": 1, "member": self.member, "run_id": state.run_id, "step": int(state.step),
                   "progress": self.progress(state.step), "score": score, "hp": dict(self.hp), "loop": loop,
                   "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                   "best_model": best}
        tmp = tempfile.mkdtemp(prefix="dact-pbt-ckpt-")
        try:
            save_state_file(Path(tmp) / STATE_FILE, payload, STATE_KIND)
            metrics = {self.metric: score, **self.base_metrics(), "dact_ready": 1}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _worker_home(home: str | None) -> str | None:
    """The driver's home when this machine sees it (its encoder cache), else None (this install's default)."""
    return home if home and Path(home).is_dir() else None


def ray_member(config: dict, split=None, setup: dict | None = None) -> None:
    """One PBT member as a Ray Tune function trial (see the module docstring): build, (re)start, train, report."""
    import torch
    from ray import tune

    from ..files import atomic_write_json
    from ..modeling_backbone import BackboneClassifier
    from ..models import ENCODER_FILE, build_model, save_model
    from ..tracker import TrackerCallback
    from ..train import train

    setup = setup or {}
    member = int(config["member"])
    torch.set_num_threads(max(1, int(setup.get("threads", 1))))
    mc = RunConfig.from_dict(setup["member_configs"][member])
    run_id = setup["run_ids"][member]
    metric = setup["metric"]
    hp = {k: float(config[k]) for k in EXPLORED}
    eval_every = mc.train.eval_every_steps
    if eval_every is None:
        raise DactLabError(f"member {member}'s config has no train.eval_every_steps (its ready interval): it is not "
                           "a PBT member's config (member_config).")
    restart = restart_from(config, tune.get_checkpoint(), member)
    buffer = BufferTracker()
    cb = RayMemberCallback(member=member, hp=hp, metric=metric, encoder_lr_ratio=setup["encoder_lr_ratio"],
                           dropout_scope=setup["dropout_scope"], eval_every=eval_every, buffer=buffer,
                           restart=restart)
    home = _worker_home(setup.get("home"))
    model, tokenizer = build_model(mc, split.train.label_maps, home)
    res = train(mc, data=split, home=None, tracker=None, run_id=run_id, save=False, model=model,
                tokenizer=tokenizer, callbacks=[TrackerCallback(cast("Tracker", buffer), run_id), cb, *(setup.get("callbacks") or [])],
                resume_state=restart[0] if restart is not None else None)
    best = res.best_metrics.get(metric)
    final = Path(tempfile.mkdtemp(prefix="dact-pbt-final-"))
    try:
        save_model(final, res.model, res.tokenizer, mc, res.label_maps)
        if isinstance(res.model, BackboneClassifier):  # the encoder alone, as train() writes it
            res.model.export_encoder(final / ENCODER_FILE)
        atomic_write_json(final / "report.json",
                          {"best": res.best_metrics, "test": res.test_metrics, "report": res.report,
                           "history": res.history, "stop_reason": res.stop_reason,
                           "halting": (res.report or {}).get("halting"),
                           "exit_refit": (res.report or {}).get("exit_refit")})
        metrics = {**cb.base_metrics(), metric: cb.last_score if cb.last_score is not None else math.nan,
                   "dact_final": 1, "dact_end": buffer.end, "best_score": best,
                   "best_step": best_step(res.history, metric, best)}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(final)))
    finally:
        shutil.rmtree(final, ignore_errors=True)


# --- the driver side: the population's records -----------------------------------------------------------------


class RayBook(PopulationBook):
    """The population's book (:class:`~dact_lib.tuning.pbt_book.PopulationBook`) on Ray's driver. A member's worker
    has no tracker, so the book also records what ``train()`` records itself in the threaded engine: the member
    run's status, the metric rows and events its loop buffered (each report carries them) and its final model
    (copied from the final checkpoint into its run folder). Ray-free: the Ray Tune callback of
    :func:`ray_classes` calls it, in the driver's thread."""

    def __init__(self, tracker, parent_id, metric: str, members: list[dict], *,
                 progress: Callable[[str], None] | None = None) -> None:
        super().__init__(tracker, parent_id, metric, members, tags={"backend": BACKEND}, name="PBT on Ray",
                         progress=progress)

    def started(self, member: int) -> None:
        if self.members[member].status == "queued":
            self.members[member].status = "running"
            self.tracker.set_status(self.run_id(member), "running", pid=os.getpid())

    def result(self, member: int, result: dict, final_checkpoint=None) -> None:
        """One report of a member (after the scheduler's decision on it): its loop's rows and events, then at a
        ready point its score and the ``hp/...`` in force from it on; the final model of a finished member."""
        self.started(member)
        rid = self.run_id(member)
        rows = result.pop("dact_rows", None) or []
        events = result.pop("dact_events", None) or []
        end = result.pop("dact_end", None)
        restart = result.get("dact_restart_step")
        if restart is not None:  # a (re)start from a checkpoint: what was logged after it is logged again
            self.tracker.delete_metrics_after(rid, int(restart))
            info = dict(result.get("dact_restart") or {})
            if info.get("how") == "own":
                self.tracker.log_event(rid, ev.RESUMED, {"step": int(restart), "backend": BACKEND, **info})
        self.tracker.insert_metric_rows([tuple([rid, *r[1:]]) for r in rows])
        for kind, payload in events:
            self.tracker.log_event(rid, kind, payload)
        if result.get("dact_ready"):
            self.ready(member, step=int(result["step"]), epoch=int(result["epoch"]), score=float(result[self.metric]))
        if result.get("dact_final"):
            self.finished(member, end or {}, final_checkpoint, best_score=result.get("best_score"),
                          best_step=result.get("best_step"))

    def finished(self, member: int, end: dict, final_checkpoint, *, best_score: float | None,
                 best_step: int | None) -> None:
        from ..models import ENCODER_FILE
        from ..tracker import liveness

        rid = self.run_id(member)
        run_dir = self.tracker.run_dir(rid)
        if final_checkpoint is not None:
            final_checkpoint.to_directory(str(run_dir))
            (run_dir / STATE_FILE).unlink(missing_ok=True)
            for name, kind in (("model.safetensors", "model"), ("config.json", "config"),
                               ("label_maps.json", "label_map"), ("report.json", "report"), (ENCODER_FILE, "encoder")):
                if (run_dir / name).exists():
                    self.tracker.add_artifact(rid, str(run_dir / name), kind)
        self.tracker.update_run(rid, run_dir=str(run_dir))
        self.tracker.end_run(rid, "finished", None, {**(end.get("summary") or {}), **self.member_summary(member)})
        liveness.mark_done(rid)
        self.ended(member, "finished", best_score=best_score, best_step=best_step, run_dir=str(run_dir))

    def failed(self, member: int, error: str, status: str = "failed") -> None:
        from ..tracker import liveness

        if self.members[member].status in ENDED:
            return
        rid = self.run_id(member)
        self.tracker.set_status(rid, status, error)
        liveness.mark_done(rid)
        self.ended(member, status, error)


class Explorer:
    """The explore step of Ray's scheduler, given to it as its public ``custom_explore_fn``: Ray calls it with a
    copy of the donor's config (with PB2, holding the values its Gaussian process proposes) and trains the
    recipient with what it returns. Here: PBTConfig's rules (:func:`~dact_lib.tuning.pbt.explore`) for ``pbt``;
    PB2's values clipped to the space for ``pb2``. The returned config carries the changes under
    :data:`EXPLORE_KEY` for the scheduler's exploit record, which removes them."""

    def __init__(self, kind: str, pbt: PBTConfig, rng: random.Random) -> None:
        self.kind, self.pbt, self.rng = kind, pbt, rng

    def __call__(self, config: dict) -> dict:
        space = self.pbt.space
        values = {k: float(config[k]) for k in EXPLORED}
        if self.kind == "pb2":
            new = {k: space.clip(k, v) for k, v in values.items()}
            changes = {k: {"how": "pb2", "factor": None, "clipped": new[k] != v, "new": new[k]}
                       for k, v in values.items()}
        else:
            new, changes = explore(values, space, self.rng, resample_prob=self.pbt.resample_prob,
                                   perturb_factors=self.pbt.perturb_factors)
        return {**config, **new, EXPLORE_KEY: changes}


def at_last_ready_point(result: dict | None) -> bool:
    """Whether a member's latest report is its last ready point (nothing left to train after an exploit)."""
    res = result or {}
    return int(res.get("step", 0)) >= int(res.get("total_steps", 0) or 0)


# --- the Ray classes (built when Ray is imported) --------------------------------------------------------------

_CLASSES: dict[str, type] = {}


# complexity: Ray's classes are defined inside it so Ray is imported only when used
def ray_classes() -> dict[str, type]:
    """``{"pbt", "pb2" (when importable), "recorder", "stopper"}``: DACT Lab's subclasses of Ray Tune's
    PopulationBasedTraining / PB2, the driver's Tune callback and the cancel stopper. Built once, on first use."""
    if _CLASSES:
        return _CLASSES
    require_ray()
    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
    from ray.tune.stopper import Stopper

    class DactPBTMixin:
        """Ray's PBT with this engine's rules (see the module docstring). Public hooks where Ray has them: the
        initial values in ``on_trial_add``, the explore step as ``custom_explore_fn`` (:class:`Explorer`), the
        pause decision in ``on_trial_result``. Two private methods are overridden because Ray offers no public
        hook for what they decide (tests/test_pbt_ray.py checks their signatures against the tested Ray):
        ``_quantiles`` (who is bottom and top: Ray rounds up, breaks ties by order and lets a member exploit at
        its last ready point) and ``_exploit`` (Ray gives the recipient the donor's config and clock, and tells
        no one of an exploit: here the recipient keeps its member index and clock, and the book records it)."""

        dact_book: RayBook | None = None
        dact_pbt: PBTConfig | None = None
        dact_initial: list[dict] = []
        dact_restarting: set | None = None  # exploited trials waiting for their restart

        def on_trial_result(self, tune_controller, trial, result):
            waiting = self.dact_restarting if self.dact_restarting is not None else set()
            waiting.discard(trial)
            self.dact_restarting = waiting
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.PAUSE and trial.status != Trial.PAUSED:
                # Ray pauses a member whenever another one waits (time-multiplexing); a recipient waiting for its
                # restart after an exploit needs no turn: its own resources were just freed
                others = [t for t in tune_controller.get_trials()
                          if t is not trial and t.status in (Trial.PENDING, Trial.PAUSED)]
                if others and all(t in waiting for t in others):
                    decision = TrialScheduler.CONTINUE
            return decision

        def on_trial_add(self, tune_controller, trial):
            m = int(trial.config["member"])
            for k, v in self.dact_initial[m].items():
                trial.config.setdefault(k, float(v))
                trial.evaluated_params[k] = trial.config[k]
            return super().on_trial_add(tune_controller, trial)

        def _quantiles(self):
            """(bottom, top) of the live trials by :func:`~dact_lib.tuning.pbt.select_quantiles`; a trial at its
            last ready point is never in the bottom."""
            states = self._trial_state
            scores = {t: st.last_score for t, st in states.items()
                      if st.last_score is not None and not t.is_finished()}
            bottom, top = select_quantiles(scores, self.dact_pbt.quantile)
            return [t for t in bottom if not at_last_ready_point(states[t].last_result)], top

        def _exploit(self, tune_controller, trial, trial_to_clone):
            rec, don = self._trial_state[trial], self._trial_state[trial_to_clone]
            rec_result, donor_result = dict(rec.last_result or {}), dict(don.last_result or {})
            own_clock = (rec.last_train_time, rec.last_perturbation_time)
            own_config = copy.deepcopy(trial.config)
            checkpoint = don.last_checkpoint
            old = {k: float(own_config[k]) for k in EXPLORED}
            donor_hp = {k: float(trial_to_clone.config[k]) for k in EXPLORED}
            super()._exploit(tune_controller, trial, trial_to_clone)  # pauses it, explores, gives it the checkpoint
            rec.last_train_time, rec.last_perturbation_time = own_clock  # it continues at its own step
            explored = dict(trial.config)
            changes = {k: {**c, "old": donor_hp[k]} for k, c in explored.pop(EXPLORE_KEY).items()}
            new = {k: float(explored[k]) for k in EXPLORED}
            own = rec_result.get(CHECKPOINT_DIR_KEY)
            trial.set_config({**own_config, **new, "pbt_restart": {
                "own_checkpoint": Path(trial.path, own).as_posix() if own else None,
                "step": int(rec_result.get("step", 0)), "donor": int(trial_to_clone.config["member"])}})
            if self.dact_restarting is None:
                self.dact_restarting = set()
            self.dact_restarting.add(trial)
            if self.dact_book is not None:
                self.dact_book.exploited(
                    recipient=int(own_config["member"]), donor=int(trial_to_clone.config["member"]),
                    step=int(rec_result.get("step", 0)), epoch=int(rec_result.get("epoch", 0)),
                    score=_score(rec_result, self.dact_book.metric), donor_step=int(donor_result.get("step", 0)),
                    donor_progress=float(donor_result.get("progress", 0.0)),
                    donor_score=_score(donor_result, self.dact_book.metric), old=old, donor_hp=donor_hp, new=new,
                    changes=changes, donor_checkpoint=getattr(checkpoint, "path", None))

    class DactPBT(DactPBTMixin, PopulationBasedTraining):
        pass

    _CLASSES["pbt"] = DactPBT
    try:
        from ray.tune.schedulers.pb2 import PB2

        class DactPB2(DactPBTMixin, PB2):
            pass

        _CLASSES["pb2"] = DactPB2
    except ImportError:  # pragma: no cover - every Ray >= 2.0 has it
        pass

    class Recorder(tune.Callback):
        """The driver's Tune callback: every member result, start, error and end into the tracker (through the
        :class:`RayBook`)."""

        def __init__(self, book: RayBook) -> None:
            self.book = book

        def __getstate__(self):
            return {"book": self.book}

        @staticmethod
        def member(trial) -> int:
            return int(trial.config["member"])

        def on_trial_start(self, iteration, trials, trial, **info):
            self.book.started(self.member(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            final = None
            if result.get("dact_final") and result.get(CHECKPOINT_DIR_KEY):
                final = tune.Checkpoint(Path(trial.path, result[CHECKPOINT_DIR_KEY]).as_posix(),
                                        filesystem=trial.storage.storage_filesystem)
            try:
                self.book.result(self.member(trial), result, final)
            finally:
                for key in _PRIVATE_KEYS:  # Ray's own loggers (CSV, JSON) need not see the rows
                    result.pop(key, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.book.failed(self.member(trial), trial_error(trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            m = self.member(trial)
            if self.book.members[m].status not in ENDED:
                self.book.failed(m, "the trial ended without its final report (stopped by Ray)")

    class CancelStopper(Stopper):
        """Stops every trial when the CancelToken is set."""

        def __init__(self, token: CancelToken | None) -> None:
            self.token = token

        def __getstate__(self):
            return {"token": None}

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return bool(self.token is not None and self.token.cancelled)

    _CLASSES.update(recorder=Recorder, stopper=CancelStopper)
    return _CLASSES


def _score(result: dict, metric: str) -> float | None:
    return float(result[metric]) if metric in result else None


def trial_error(trial) -> str:
    """The last line of a failed trial's error (Ray's text), or a generic one."""
    for get in ("get_error", "get_pickled_error"):
        try:
            err = getattr(trial, get)()
        except Exception:  # noqa: BLE001 - Ray's error files are best effort
            err = None
        if err is not None:
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            if lines:
                return lines[-1][:500]
    return "the trial failed (see Ray's logs)"


def make_scheduler(kind: str, pbt: PBTConfig, *, book: RayBook | None, initial: list[dict], rng: random.Random,
                   synch: bool = False):
    """The Tune scheduler for ``kind`` ('pbt' | 'pb2') with PBTConfig's rules (see the module docstring); ``rng``
    draws its explore steps."""
    from ..train import lower_is_better

    check(kind in SCHEDULERS, "scheduler", kind, f"choose one of {list(SCHEDULERS)}")
    if kind == "pb2":
        pb2_scheduler_class()
    classes = ray_classes()
    common = dict(time_attr=TIME_ATTR, metric=pbt.metric, mode="min" if lower_is_better(pbt.metric) else "max",
                  perturbation_interval=1, quantile_fraction=float(pbt.quantile), log_config=True,
                  require_attrs=True, synch=bool(synch), custom_explore_fn=Explorer(kind, pbt, rng))
    if kind == "pb2":
        bounds = {k: [lo, hi] for k in EXPLORED for lo, hi in [pbt.space.bounds(k)] if lo < hi}
        if not bounds:
            raise ConfigError("scheduler 'pb2' needs at least one hyperparameter range with low < high in "
                              "pbt.space (lr, weight_decay, dropout, warmup_ratio).")
        sched = classes["pb2"](hyperparam_bounds=bounds, **common)
    else:  # no hyperparam_mutations: the Explorer is the whole explore step
        sched = classes["pbt"](**common)
    sched.dact_book, sched.dact_pbt, sched.dact_initial = book, pbt, [dict(h) for h in initial]
    return sched


# --- run_pbt_ray -------------------------------------------------------------------------------------------------


def _ray_env() -> dict[str, str]:
    """The environment a local Ray's workers need from the driver's (encoder cache, offline flags, home)."""
    keys = ("DACT_LAB_HOME", "DACT_LAB_CACHE", "DACT_LAB_DB", "DACT_LAB_ARTIFACTS", "HF_HOME", "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


# complexity: the checks of its arguments, Tune's setup and the failure records share the parent run's state
def run_pbt_ray(cfg: RunConfig, *, pbt: PBTConfig | None = None, home=None, tracker=None, address: str | None = None,
                scheduler: str = "pbt", data=None, cpus_per_member: float = 1, gpus_per_member: float = 0,
                num_cpus: int | None = None, storage_path: str | None = None, keep_ray_results: bool = False,
                keep_checkpoints: int | None = None, synch: bool = False, callbacks: list[Callback] | None = None,
                cancel: CancelToken | None = None, run_id: int | None = None,
                progress: Callable[[str], None] | None = None) -> PBTResult:
    """Population Based Training of ``cfg`` on Ray Tune (see the module docstring); returns what
    :func:`~dact_lib.tuning.pbt.run_pbt` returns, and records the same runs and events.

    ``address``: a running Ray cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts a local
    Ray (with ``num_cpus``) unless this process already has one (``ray.init`` before: it is used and left running).
    ``scheduler``: ``"pbt"`` (Ray's PopulationBasedTraining) or ``"pb2"`` (Ray's PB2, needs scikit-learn).
    ``cpus_per_member`` / ``gpus_per_member``: each trial's Ray resources (torch threads = the CPUs); Ray runs as
    many members at once as fit and time-multiplexes the others (pausing and resuming them from checkpoints).
    ``storage_path``: Ray's checkpoints and logs (default a temporary folder; a cluster needs one that every node
    sees), removed at the end unless ``keep_ray_results``. ``keep_checkpoints``: how many checkpoints per member
    Ray keeps (the best-scoring ones and the latest; default all). ``synch``: Ray's synchronous PBT (every member
    waits at each ready point until all have reached it; exploits then never miss a member that is behind). ``callbacks`` go to every member's loop in its
    Ray worker (they must pickle). ``progress``: called on the driver with one line per ready point / exploit.
    ``cancel`` stops every member (the parent is recorded 'cancelled' and :class:`Cancelled` raised)."""
    ray = require_ray()
    from ray import tune

    from ..models import build_model  # noqa: F401 - fail here, not in every worker, when the library is broken
    from ..tracker import Tracker, liveness
    from ..train import load_split, lower_is_better

    pbt = (pbt or PBTConfig()).validate()
    cfg.validate()
    check(scheduler in SCHEDULERS, "scheduler", scheduler, f"choose one of {list(SCHEDULERS)}")
    if scheduler == "pb2":
        pb2_scheduler_class()
    check(not (cfg.train.gradual_unfreeze and cfg.train.freeze_layers), "train.gradual_unfreeze",
          cfg.train.gradual_unfreeze, "PBT copies optimizer state between members, which needs the same trainable "
          "parameters in every member at every step: set gradual_unfreeze false (or freeze_layers 0) for PBT")
    check(isinstance(cpus_per_member, (int, float)) and cpus_per_member > 0, "cpus_per_member", cpus_per_member,
          "expected a positive number of CPUs per member")
    check(isinstance(gpus_per_member, (int, float)) and gpus_per_member >= 0, "gpus_per_member", gpus_per_member,
          "expected a number of GPUs per member >= 0")
    if keep_checkpoints is not None:
        check(isinstance(keep_checkpoints, int) and keep_checkpoints >= 3, "keep_checkpoints", keep_checkpoints,
              "expected None (keep all) or an integer >= 3 (fewer lets Ray delete a checkpoint a member is about "
              "to restore)")
    if tracker is None:
        tracker = Tracker(home)
    home = Path(home) if home is not None else Path(tracker.home)
    cancel = cancel or CancelToken()
    n = pbt.population

    split, dataset_id = load_split(cfg, tracker, data)
    if split.val is None:
        raise DactLabError("PBT ranks members on validation data: set data.val_frac > 0 or give data.val_path.")
    train_size = len(split.train)
    pop = draw_population(cfg, pbt)  # the threaded engine's draws: one seed, one population whatever the backend
    ratio = cfg.train.encoder_lr / cfg.train.head_lr
    ray_info = {"address": address or "local", "scheduler": scheduler, "cpus_per_member": cpus_per_member,
                "gpus_per_member": gpus_per_member, "ray_version": ray.__version__}
    parent_config = {"run": cfg.to_dict(), "pbt": pbt.to_dict(), "backend": BACKEND, "address": address or "local",
                     "ray": ray_info}
    parent_id = tracker.open_run("pbt", parent_config, run_id, dataset_id=dataset_id,
                                 **({"name": cfg.name or "pbt", "tag": cfg.tag} if run_id is None else {}))
    member_ids: list[Any] = []
    started_ray = False
    temp_storage = None
    try:
        cfgs = pop.configs(cfg, pbt, train_size=train_size)
        for mc in cfgs:
            member_ids.append(tracker.create_run("pbt-member", mc.to_dict(), name=mc.name, tag=cfg.tag,
                                                 parent_id=parent_id, dataset_id=dataset_id, status="queued"))
        for rid in member_ids:
            liveness.mark_live(rid)
        book = RayBook(tracker, parent_id, pbt.metric, pop.members(member_ids, train_size=train_size),
                       progress=progress)
        for i in range(n):
            book.begin(i)
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                      "runtime_env": {"env_vars": _ray_env()}}
            if address is None and num_cpus is not None:
                kwargs["num_cpus"] = int(num_cpus)
            ray.init(address=address, **kwargs)
            started_ray = True
        resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
        ray_info.update(cluster_resources=resources, gcs_address=_gcs_address(ray))
        book.start(pop.architecture, [mc.train.eval_every_steps for mc in cfgs], backend=BACKEND,
                   address=address or "local", ray=ray_info)
        sched = make_scheduler(scheduler, pbt, book=book, initial=pop.hp, rng=random.Random(pop.seed * 1000 + 7),
                               synch=synch)
        classes = ray_classes()
        setup = {"member_configs": [mc.to_dict() for mc in cfgs], "run_ids": member_ids, "metric": pbt.metric,
                 "encoder_lr_ratio": ratio, "dropout_scope": pbt.dropout_scope, "home": str(home.resolve()),
                 "threads": max(1, int(cpus_per_member)), "callbacks": list(callbacks or [])}
        trainable = tune.with_resources(tune.with_parameters(ray_member, split=split, setup=setup),
                                        {"cpu": cpus_per_member, "gpu": gpus_per_member})
        if storage_path is None:
            temp_storage = tempfile.mkdtemp(prefix="dact-pbt-ray-")
            storage_path = temp_storage
        mode = "min" if lower_is_better(pbt.metric) else "max"
        run_config = tune.RunConfig(
            name=f"dact-pbt-{parent_id}", storage_path=str(storage_path), callbacks=[classes["recorder"](book)],
            stop=classes["stopper"](cancel), verbose=0, failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute=pbt.metric if keep_checkpoints else None,
                checkpoint_score_order=mode))
        ray_info["storage_path"] = str(Path(storage_path) / f"dact-pbt-{parent_id}")
        tuner = tune.Tuner(trainable, param_space={"member": tune.grid_search(list(range(n)))},
                           tune_config=tune.TuneConfig(scheduler=sched, num_samples=1, reuse_actors=True),
                           run_config=run_config)
        tuner.fit()
    except BaseException as exc:
        for i, rid in enumerate(member_ids):
            try:
                if tracker.get_run(rid)["status"] in ("queued", "running"):
                    tracker.set_status(rid, "cancelled" if isinstance(exc, (Cancelled, KeyboardInterrupt))
                                       else "failed", f"PBT on Ray: {type(exc).__name__}: {exc}")
            finally:
                liveness.mark_done(rid)
        tracker.set_status(parent_id, "cancelled" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "failed",
                           f"{type(exc).__name__}: {exc}")
        if started_ray:
            ray.shutdown()
        raise
    finally:
        if temp_storage is not None and not keep_ray_results:
            shutil.rmtree(temp_storage, ignore_errors=True)
    if started_ray:
        ray.shutdown()

    for i in range(n):  # members Ray stopped (cancel) or never started
        if book.members[i].status not in ENDED:
            book.failed(i, (cancel.reason or "cancelled") if cancel.cancelled else "the member did not finish",
                        status="cancelled" if cancel.cancelled else "failed")
    return book.finish(architecture=pop.architecture, configs=[mc.to_dict() for mc in cfgs],
                       dropout_scope=pbt.dropout_scope, cancel=cancel,
                       summary={"backend": BACKEND, "address": address or "local", "ray": ray_info})


def _gcs_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - informative only
        return None


def is_ray_run(run: dict) -> bool:
    """Whether a tracker run row is a PBT parent that ran on Ray (it cannot be resumed by the threaded engine)."""
    return (run.get("config") or {}).get("backend") == BACKEND


__all__ = ["run_pbt_ray", "require_ray", "pb2_scheduler_class", "ray_member", "RayMemberCallback", "RayBook", "Explorer",
           "make_scheduler", "ray_classes", "restart_from", "read_member_state", "is_ray_run"]
