"""Tracker records made by the real engines, once per test session, for the page and plot tests.

:func:`engine_records` runs, on the tiny random encoder and a small easy data set (``easydata.py``), into one
home in a session temporary folder:

* two DACT ``train`` runs (120 rows, 1 epoch, two ponder λ);
* a ``run_pbt`` population (3 members, ready every 2 steps, 2 epochs; its ready points take turns, see
  :class:`Lockstep`, so that it exploits on any machine load);
* a ``tune_backbone`` study (3 trials of 1 epoch);
* a ``run_pipeline`` DACT pipeline (3 / 2 / 6 trials; its three studies ``pipe/stage1`` … ``pipe/stage3``). Stage 3
  minimises the validation error (``objective3="error"``), a multiple of 1/48 like the average exit layer: its front
  is decided by exact counts, never by float noise in a loss (the tiny model's λ trials differ in the 7th digit of
  their NLL), so it holds several tied points — the rule's choice and others — on every machine.

About 15 s on two CPU cores. The result is built once per process (memoised here, so every test module that asks
gets the same home) and must be treated as read-only: a test that changes records (a choice on the Pareto
explorer, a cancelled run) works on :func:`copy_home`. Tests read the numbers they check from the tracker and the
Optuna storage of that home, never from literals copied from an engine's payload.
"""
from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from dact_lib.callbacks import Callback
from easydata import easy_csv

PIPELINE_NAME = "pipe"


@dataclass
class EngineRecords:
    home: Path
    csv: Path
    dact: list[int]  # the two trained DACT runs
    pbt: int  # PBT parent run
    members: list[int]  # its member runs, in member order
    tune: int  # tune-backbone parent run
    tune_study: str
    pipeline: int  # dact-pipeline parent run
    pipeline_final: int  # its final run
    studies: list[str] = field(default_factory=list)  # every study of the home


def tiny_cfg(kind: str, csv: Path, *, rows: int | None = 120, epochs: int = 1, seed: int = 0,
             lam: float | None = None):
    from dact_lib.config import default_config

    cfg = default_config(kind, encoder="tiny")
    cfg.data.path = str(csv)
    cfg.data.max_rows = rows
    cfg.data.val_frac, cfg.data.test_frac = 0.2, 0.2
    cfg.data.max_seq_len = 32
    cfg.train.epochs, cfg.train.seed, cfg.train.batch_size = epochs, seed, 16
    cfg.train.log_every_steps = 2
    cfg.train.device = "cpu"
    if lam is not None:
        cfg.model.ponder_lambda = lam
    return cfg.validate()


def build(home: Path) -> EngineRecords:
    """Run the four engines small into ``home`` (see the module docstring)."""
    from dact_lib.tracker import Tracker
    from dact_lib.train import train
    from dact_lib.tuning.backbone import BackboneSpace, tune_backbone
    from dact_lib.tuning.dact_pipeline import PipelineConfig, run_pipeline
    from dact_lib.tuning.pbt import PBTConfig, PBTSpace, run_pbt

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    home.mkdir(parents=True, exist_ok=True)
    csv = easy_csv(home.parent / "easy.csv", n=240)  # the pipeline's guards need a set the tiny model learns
    tr = Tracker(home)
    dact = [train(tiny_cfg("dact", csv, seed=0, lam=1e-3), tracker=tr, home=home).run_id,
            train(tiny_cfg("dact", csv, seed=1, lam=1e-2), tracker=tr, home=home).run_id]
    pbt = run_pbt(tiny_cfg("backbone", csv, epochs=2),
                  pbt=PBTConfig(population=3, ready_every_epochs=None, ready_every_steps=2, metric="val_loss",
                                quantile=0.34, seed=0, space=PBTSpace(batch_sizes=[16, 32])),
                  home=home, tracker=tr, callbacks=[Lockstep(3, 2, "val_loss")])
    tune = tune_backbone(tiny_cfg("backbone", csv), trials=3, space=BackboneSpace(epochs=[1, 1], batch_size=[16, 32]),
                         home=home, tracker=tr)
    pipe = run_pipeline(tiny_cfg("dact", csv, rows=None),
                        pipeline=PipelineConfig(name=PIPELINE_NAME, trials_stage1=3, trials_stage2=2,
                                                trials_stage3=6, objective3="error", epochs_range=(1, 2),
                                                batch_sizes=(16, 32), min_steps=80,
                                                head_lr_range=(2e-3, 6e-3),
                                                # the random tiny encoder's layer 1 exits with a shared head; the
                                                # pages read stage 3's points (no single-run candidate)
                                                search_share_weights=True, single_run=False).validate(),
                        home=home, tracker=tr)
    studies = sorted(s.study_name for s in optuna.get_all_study_summaries(
        storage=f"sqlite:///{home / 'experiments.db'}"))
    tr.close()
    return EngineRecords(home=home, csv=csv, dact=dact, pbt=pbt.parent_run_id,
                         members=[m["run_id"] for m in pbt.members], tune=tune.parent_run_id,
                         tune_study=tune.study_name, pipeline=pipe.parent_run_id, pipeline_final=pipe.final_run_id,
                         studies=studies)


class Lockstep(Callback):
    """Makes the ready points of a PBT population take turns: a member's k-th ready point (its k-th validation)
    waits until every member before it has passed its k-th one and every member after it its (k-1)-th; a member
    that has ended holds nobody up. The members still train concurrently between ready points, but PBT's rankings
    (and so its exploit / explore decisions) no longer depend on thread timing: on a loaded machine a member that
    races ahead would otherwise rank against stale scores, or none, and the population might never exploit."""

    def __init__(self, population: int, eval_every_steps: int, metric: str, timeout: float = 120.0) -> None:
        self.n, self.every, self.metric, self.timeout = population, eval_every_steps, metric, timeout
        self.cond = threading.Condition()
        self.passed = {i: 0 for i in range(population)}
        self.ended: set[int] = set()

    def on_step(self, state, logs) -> None:  # before the step's validation (train.py: on_step, then evaluate)
        if state.step % self.every:
            return
        me = state.extra["pbt_member"]
        with self.cond:
            k = self.passed[me]
            self.cond.wait_for(lambda: all(j in self.ended or self.passed[j] >= (k + 1 if j < me else k)
                                           for j in range(self.n) if j != me), timeout=self.timeout)

    def on_eval(self, state, logs) -> None:  # after PBTMemberCallback.on_eval (the member's ready point)
        if self.metric in logs:
            with self.cond:
                self.passed[state.extra["pbt_member"]] += 1
                self.cond.notify_all()

    def on_end(self, state, status) -> None:
        with self.cond:
            self.ended.add(state.extra.get("pbt_member"))
            self.cond.notify_all()


_BUILT: dict[str, EngineRecords] = {}


def engine_records(tmp_path_factory) -> EngineRecords:
    """The session's engine records (built on the first call; later calls, from any module, get the same)."""
    if "records" not in _BUILT:
        _BUILT["records"] = build(tmp_path_factory.mktemp("engine_records") / "home")
    return _BUILT["records"]


def copy_home(rec: EngineRecords, dest: Path) -> Path:
    """A private copy of the records' home (run folders are stored relative to the home, so the copy is whole)."""
    dest = Path(dest)
    shutil.copytree(rec.home, dest)
    return dest
