"""Population Based Training: a population of members trained side by side, the weak ones copying the
strong ones (*exploit*) and then perturbing the copied hyperparameters (*explore*).

How it runs
-----------
* :func:`run_pbt` loads the data split once (``train.load_split``), creates a parent run (kind ``"pbt"``) and one
  child run per member (kind ``"pbt-member"``, ``parent_id`` = the parent), builds every member's model in the
  calling thread (sequentially: deterministic initialisation, no concurrent encoder extraction) and then runs each
  member's :func:`dact_lib.train.train` — the ONE training loop — in its own Python thread, all at once, with
  ``data=split`` and a :class:`PBTMemberCallback`.
* A member is *ready* at every evaluation of its loop (``train.eval_every_steps`` is set from
  ``PBTConfig.ready_every_steps`` or ``ready_every_epochs``; with ``ready_every_epochs`` every member is ready at
  the same fractions of an epoch whatever its batch size). At a ready point (``on_eval``) it snapshots its state
  (deep copies of the model's ``state_dict`` and the optimizer's ``state_dict`` + its hyperparameters + its
  schedule) and reports its score to the shared, lock-protected :class:`PBTController`.
* PBT here is **asynchronous**: the controller ranks the member against the *latest known* scores of the others and
  never waits for anyone (a failed member is dropped from the ranking, a finished one keeps its last snapshot as a
  possible donor). If the member is in the bottom ``quantile`` (at least one member) and a top-``quantile`` member
  scores strictly better, it *exploits*: it loads a random such donor's latest snapshot — weights AND optimizer
  state — into its own model and optimizer, then *explores*: ``lr``, ``weight_decay``, ``dropout`` and
  ``warmup_ratio`` are each multiplied by one of ``perturb_factors`` (0.8 or 1.2) or, with probability
  ``resample_prob``, resampled from the space; always clipped to the space. The new values are then *applied*
  (:func:`apply_hparams`) — the restored optimizer state otherwise silently keeps the donor's values: every param
  group's ``initial_lr`` and current ``lr`` (the encoder/head ratio of the base config is kept), the weight decay of
  the decay groups (no-decay groups stay at 0), the rate of every head Dropout module and a new warm-up/linear-decay
  schedule (``state.set_lr_schedule``) for the new warm-up ratio (over the member's own total steps).
* Every exploit and explore is an event (``pbt_exploit``, ``pbt_explore``) on the parent run AND the recipient's
  run, with time, step, recipient, donor, old → new hyperparameters and both scores: the lineage. Each member logs
  its hyperparameters as metrics ``hp/lr``, ``hp/weight_decay``, ``hp/dropout``, ``hp/warmup_ratio`` at its start
  and at every ready point (the values in force from that step on). These records, the members' outcomes and the
  winner are written by :class:`~dact_lib.tuning.pbt_book.PopulationBook`, the one record of both backends.

Hyperparameters
---------------
``lr`` is the **head** learning rate; the encoder learns at ``lr × encoder_lr / head_lr`` of the base config (the
ratio is kept through every exploit/explore). ``dropout`` is the rate of the head MLP's Dropout modules
(``dropout_scope="head"``: backbone ``head``, multi-task ``heads``, DACT ``classifiers`` — not the DACT halting
MLPs, not the encoder), or of every Dropout in the model including the encoder (``dropout_scope="all"``).

**Architecture is sampled once for the whole population**: the head's number of hidden layers (each as wide as the
base config's first hidden layer, else its ``width``) and its activation are drawn once from the space and shared
by every member, so a donor's weights and optimizer state always fit the recipient in place (same model and
optimizer objects; the training loop's best-checkpoint save/restore stays valid). The batch size is sampled per
member and fixed for its life: it is not a weight shape, an exploit keeps the recipient's own batch size. Members
do not early-stop (PBT replaces weak members instead); their best checkpoint follows ``PBTConfig.metric``, so the
best member's saved ``model.safetensors`` is its best-scoring state.

Threads
-------
``torch.set_num_threads`` is process-global. All members run concurrently, so the intra-op threads are split:
``max(1, total // population)`` per member, ``total`` = ``PBTConfig.num_threads``, else the run config's
``train.num_threads``, else the CPU cores available to the process. On a 2-core machine with 4 members that is 1
thread each — members overlap through Python threads (torch releases the GIL inside its kernels); more intra-op
threads than cores would only oversubscribe. Measured on the 2-core development machine, 4 concurrent
all-MiniLM-L6-v2 members (batch 16, 64 tokens): 1 thread each 1.5 steps/s in all, 2 threads each 0.95 steps/s. The
choice is recorded as a ``pbt_threads`` event on the parent run; the previous setting is restored afterwards.
Asynchronous threads make a PBT run not bit-reproducible (the interleaving decides who copies whom), though the
initial population is a function of the seed.

Schedule and replay
-------------------
Each member carries its hyperparameter *schedule*: ``[{step, lr, weight_decay, dropout, warmup_ratio, ...}]``
starting at step 0; an exploit replaces it with the donor's (up to the recipient's progress) plus the explored
values at the recipient's step — the lineage. The winner's schedule (steps converted to the winner's batch size
through epoch progress) is recorded in the parent's summary and a ``pbt_schedule`` event, and
:func:`replay_schedule` re-runs it as one plain training run.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Any, Literal

import torch
from torch import nn

from ..callbacks import Callback, CancelToken, LoopState
from ..config import ACTIVATIONS, RunConfig, check, check_frac, check_int, from_dict
from ..errors import Cancelled, ConfigError, DactLabError
from ..heads import set_dropout
from .. import events as ev
from .pbt_book import EXPLORED, PBTResult, PopulationBook, best_step, hp_metrics, hp_public

log = logging.getLogger(__name__)

#: Of the hyperparameters that exploit/explore change (:data:`EXPLORED`), those sampled and perturbed on a log scale.
LOG_SCALE = ("lr", "weight_decay")
METRICS = ("val_accuracy", "val_macro_f1", "val_loss")
DROPOUT_SCOPES = ("head", "all")
BACKENDS = ("threads", "ray")  # where the members train: this process's threads, or Ray Tune


# --- configuration ---------------------------------------------------------------------------------------------


def _check_range(name: str, value: Any, lo: float, hi: float, *, positive: bool = False, integer: bool = False) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok:
        a, b = value
        kinds = (int,) if integer else (int, float)
        ok = all(isinstance(x, kinds) and not isinstance(x, bool) and math.isfinite(x) for x in (a, b))
        ok = ok and lo <= a <= b <= hi and (not positive or a > 0)
    what = "integers" if integer else ("positive numbers" if positive else "numbers")
    check(ok, name, value, f"expected [low, high] {what} with {lo} <= low <= high <= {hi}")


@dataclass
class PBTSpace:
    """The seed's search space (the default). Ranges are ``[low, high]`` (inclusive); ``lr`` and ``weight_decay``
    are sampled log-uniformly, the others uniformly. A range with ``low == high`` fixes that value."""

    #: the launch form's label and help of each setting (ui/fields.py settings_fields)
    FORM_TEXT: ClassVar[dict[str, tuple[str, str]]] = {
        "batch_sizes": ("Batch sizes to try",
                         "Comma-separated, e.g. 16, 32, 64."),
        "hidden_layers": ("Hidden layers of the head (range)",
                           "Drawn once for the whole population."),
        "dropout": ("Dropout range",
                     "Sampled uniformly for each member or trial."),
        "lr": ("Learning rate range",
                "Log-uniform."),
        "weight_decay": ("Weight decay range",
                          "Log-uniform."),
        "warmup_ratio": ("Warm-up fraction range",
                          "Share of the steps with a rising learning rate."),
        "activations": ("Activations to try",
                         "Of the head's hidden layers, drawn once for the whole population."),
    }


    batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    hidden_layers: list[int] = field(default_factory=lambda: [1, 4])
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.6])
    lr: list[float] = field(default_factory=lambda: [1e-6, 5e-3])
    weight_decay: list[float] = field(default_factory=lambda: [1e-8, 1e-2])
    warmup_ratio: list[float] = field(default_factory=lambda: [0.0, 0.3])
    activations: list[str] = field(default_factory=lambda: list(ACTIVATIONS))

    def validate(self, name: str = "pbt.space") -> "PBTSpace":
        bs = self.batch_sizes
        check(isinstance(bs, (list, tuple)) and len(bs) > 0 and all(
            isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 4096 for b in bs),
            f"{name}.batch_sizes", bs,
            "expected a non-empty list of batch sizes (integers 1..4096), e.g. [8, 16, 32, 64]")
        _check_range(f"{name}.hidden_layers", self.hidden_layers, 0, 8, integer=True)
        _check_range(f"{name}.dropout", self.dropout, 0.0, 0.95)
        _check_range(f"{name}.lr", self.lr, 0.0, 0.5, positive=True)
        _check_range(f"{name}.weight_decay", self.weight_decay, 0.0, 1.0, positive=True)
        _check_range(f"{name}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        acts = self.activations
        check(isinstance(acts, (list, tuple)) and len(acts) > 0 and all(a in ACTIVATIONS for a in acts),
               f"{name}.activations", acts, f"expected a non-empty list from {list(ACTIVATIONS)}")
        return self

    def bounds(self, name: str) -> tuple[float, float]:
        lo, hi = getattr(self, name)
        return float(lo), float(hi)

    def clip(self, name: str, value: float) -> float:
        lo, hi = self.bounds(name)
        return float(min(hi, max(lo, value)))

    def sample_value(self, name: str, rng: random.Random) -> float:
        lo, hi = self.bounds(name)
        if name in LOG_SCALE:
            return self.clip(name, math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return self.clip(name, rng.uniform(lo, hi))

    def sample(self, rng: random.Random) -> dict[str, float]:
        """One member's explored hyperparameters, drawn from the space."""
        return {k: self.sample_value(k, rng) for k in EXPLORED}

    def sample_architecture(self, rng: random.Random) -> dict[str, Any]:
        lo, hi = self.hidden_layers
        return {"hidden_layers": rng.randint(int(lo), int(hi)), "activation": rng.choice(list(self.activations))}

    def contains(self, hp: dict[str, float]) -> bool:
        return all(self.bounds(k)[0] <= hp[k] <= self.bounds(k)[1] for k in EXPLORED)


@dataclass
class PBTConfig:
    """Settings of one PBT run. ``ready_every_steps`` (per member, in its own steps) or ``ready_every_epochs``
    (a fraction of an epoch, the same data progress for every batch size) — exactly one of them. ``epochs`` and
    ``seed`` default to the run config's. ``num_threads``: total torch threads to split among the members
    (default: the CPU cores available). ``backend``: "threads" (the members side by side in this process, resumable)
    or "ray" (Ray Tune's PopulationBasedTraining, or PB2 with ``ray_scheduler``; ``pip install 'dact-lab[ray]'``) —
    the one engine dispatches on it, so the dashboard and the CLI start either."""

    #: the launch form's label and help of each setting (ui/fields.py settings_fields)
    FORM_TEXT: ClassVar[dict[str, tuple[str, str]]] = {
        "population": ("Population size",
                        "Members trained side by side."),
        "ready_every_steps": ("Ready every N steps (0 = use epochs)",
                               "How often a member may exploit / explore."),
        "ready_every_epochs": ("Ready every fraction of an epoch (0 = use steps)",
                                "The same data progress for every batch size."),
        "quantile": ("Bottom / top fraction",
                      "The bottom fraction copies a member of the top fraction."),
        "metric": ("Metric members are ranked by",
                    "Their latest validation value; the bottom fraction copies the top."),
        "resample_prob": ("Chance of resampling a value",
                           "Instead of perturbing it ×0.8 / ×1.2."),
        "perturb_factors": ("Perturbation factors",
                             "Explore multiplies a value by one of these, e.g. 0.8, 1.2."),
        "epochs": ("Epochs",
                    "Of every member (empty: the run config's epochs)."),
        "seed": ("Seed",
                  ("Seeds PBT's draws (architecture, explore); empty: the run config's "
                   "train.seed.")),
        "num_threads": ("Torch threads in all (0 = the CPU cores)",
                         "Split among the members."),
        "dropout_scope": ("Dropout that PBT explores",
                           "head: the heads' dropout; all: every dropout, encoder included."),
        "backend": ("Where the members train",
                     ("threads: side by side in the job's process (resumable); ray: each member a "
                      "Ray Tune trial on a local Ray (needs the ray extra; not resumable).")),
        "ray_scheduler": ("Ray scheduler",
                           "With Ray: its PopulationBasedTraining (pbt) or PB2 (a GP bandit)."),
    }


    population: int = 4
    ready_every_steps: int | None = None
    ready_every_epochs: float | None = 0.5
    quantile: float = 0.2
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = "val_accuracy"
    resample_prob: float = 0.25
    perturb_factors: tuple[float, ...] = (0.8, 1.2)
    epochs: int | None = None
    seed: int | None = None
    space: PBTSpace = field(default_factory=PBTSpace)
    num_threads: int | None = None
    dropout_scope: Literal["head", "all"] = "head"
    backend: Literal["threads", "ray"] = "threads"
    ray_scheduler: Literal["pbt", "pb2"] = "pbt"

    def validate(self, name: str = "pbt") -> "PBTConfig":
        from ..config import check_types

        check_types(self, name)
        p = self.population
        check(isinstance(p, int) and not isinstance(p, bool) and 2 <= p <= 64, f"{name}.population", p,
              "expected 2 to 64 members: each ready point the bottom max(1, floor(population × quantile)) members "
              "copy a top one, so 2 is the smallest population that exploits (one each side); 4 (the default) "
              "gives the search room")
        check(self.ready_every_steps is not None or self.ready_every_epochs is not None, f"{name}.ready_every_steps",
               None, "set ready_every_steps (an integer >= 1) or ready_every_epochs (a fraction of an epoch > 0)")
        check(self.ready_every_steps is None or self.ready_every_epochs is None, f"{name}.ready_every_epochs",
               self.ready_every_epochs,
               "set either ready_every_steps or ready_every_epochs, not both (set one to None)")
        if self.ready_every_steps is not None:
            check_int(f"{name}.ready_every_steps", self.ready_every_steps, 1)
        if self.ready_every_epochs is not None:
            r = self.ready_every_epochs
            check(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and 0 < r <= 100,
                   f"{name}.ready_every_epochs", r, "expected a number of epochs in (0, 100], e.g. 0.5")
        q = self.quantile
        check(isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 0.5, f"{name}.quantile", q,
               "expected a fraction in (0, 0.5]: the bottom and top quantiles must not overlap")
        check(self.metric in METRICS, f"{name}.metric", self.metric, f"choose one of {list(METRICS)}")
        check_frac(f"{name}.resample_prob", self.resample_prob, 0.0, 1.0, hi_open=False)
        pf = self.perturb_factors
        check(isinstance(pf, (list, tuple)) and len(pf) > 0 and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and f > 0 for f in pf),
            f"{name}.perturb_factors", pf, "expected a non-empty list of positive factors, e.g. [0.8, 1.2]")
        if self.epochs is not None:
            check_int(f"{name}.epochs", self.epochs, 1, 1000)
        if self.seed is not None:
            check_int(f"{name}.seed", self.seed, 0)
        check(isinstance(self.space, PBTSpace), f"{name}.space", type(self.space).__name__, "expected a PBTSpace")
        self.space.validate(f"{name}.space")
        if self.num_threads is not None:
            check_int(f"{name}.num_threads", self.num_threads, 1, 512)
        check(self.dropout_scope in DROPOUT_SCOPES, f"{name}.dropout_scope", self.dropout_scope,
               f"choose one of {list(DROPOUT_SCOPES)}")
        check(self.backend in BACKENDS, f"{name}.backend", self.backend, f"choose one of {list(BACKENDS)}")
        check(self.ray_scheduler in ("pbt", "pb2"), f"{name}.ray_scheduler", self.ray_scheduler,
              "choose 'pbt' or 'pb2' (PB2 needs the ray extra's GPy / sklearn parts)")
        check(self.backend == "ray" or self.ray_scheduler == "pbt", f"{name}.ray_scheduler", self.ray_scheduler,
              "a scheduler of Ray Tune: set backend 'ray' too, or leave it 'pbt'")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["perturb_factors"] = list(self.perturb_factors)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PBTConfig":
        cfg = from_dict(cls, data, "pbt")
        if isinstance(cfg.perturb_factors, list):
            cfg.perturb_factors = tuple(cfg.perturb_factors)
        return cfg.validate()


# --- quantiles, explore, exploit, apply ----------------------------------------------------------------------


def _key(score: float) -> float:
    return -math.inf if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)


def select_quantiles(scores: dict[Any, float], quantile: float) -> tuple[list, list]:
    """``(bottom, top)`` members of ``scores`` (higher = better; NaN counts as the worst).

    ``k = max(1, floor(n × quantile))`` (at most ``n // 2``) members each side; members tied with the k-th worst
    (best) score are all included on that side. A member is kept in the bottom only if it scores strictly below
    every top member — a tie with the top has nothing better to copy (all equal → no bottom). Fewer than two
    members → ``([], [])``."""
    n = len(scores)
    if n < 2:
        return [], []
    k = max(1, min(n // 2, int(math.floor(n * quantile + 1e-9))))
    order = sorted(scores, key=lambda m: (_key(scores[m]), str(m)))
    low_cut, high_cut = _key(scores[order[k - 1]]), _key(scores[order[n - k]])
    top = [m for m in order if _key(scores[m]) >= high_cut]
    top_min = min(_key(scores[m]) for m in top)
    bottom = [m for m in order if _key(scores[m]) <= low_cut and _key(scores[m]) < top_min]
    return bottom, top


def explore(hp: dict[str, Any], space: PBTSpace, rng: random.Random, *, resample_prob: float = 0.25,
            perturb_factors=(0.8, 1.2)) -> tuple[dict[str, Any], dict[str, dict]]:
    """New hyperparameters from ``hp``: each of :data:`EXPLORED` is resampled from ``space`` with probability
    ``resample_prob``, else multiplied by a random one of ``perturb_factors``; always clipped to the space. Other
    keys are copied. Returns ``(new, changes)``; ``changes[name]`` = ``{how: 'perturb'|'resample', factor,
    clipped, old, new}``."""
    new = dict(hp)
    changes: dict[str, dict] = {}
    for name in EXPLORED:
        old = float(hp[name])
        if rng.random() < resample_prob:
            value = space.sample_value(name, rng)
            changes[name] = {"how": "resample", "factor": None, "clipped": False, "old": old, "new": value}
        else:
            f = float(rng.choice(list(perturb_factors)))
            raw = old * f
            value = space.clip(name, raw)
            changes[name] = {"how": "perturb", "factor": f, "clipped": value != raw, "old": old, "new": value}
        new[name] = value
    return new, changes


@dataclass
class Snapshot:
    """A member's state at a ready point. Immutable once made (the tensors are private copies)."""

    member: int
    run_id: Any
    step: int
    progress: float  # epochs of data seen (step / steps per epoch)
    score: float  # raw metric value
    hparams: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    schedule: list[dict]
    time: float = field(default_factory=time.time)


def take_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, hparams: dict, *, member: int = 0,
                  run_id: Any = None, step: int = 0, progress: float = 0.0, score: float = math.nan,
                  schedule: list[dict] | None = None) -> Snapshot:
    """Deep copies of the model's and the optimizer's state dicts plus the hyperparameters and schedule."""
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Snapshot(member=member, run_id=run_id, step=int(step), progress=float(progress), score=float(score),
                    hparams=dict(hparams), model_state=model_state,
                    optimizer_state=copy.deepcopy(optimizer.state_dict()),
                    schedule=copy.deepcopy(schedule or []))


def exploit(model: nn.Module, optimizer: torch.optim.Optimizer, snap: Snapshot) -> None:
    """Load a donor snapshot's weights AND optimizer state into ``model``/``optimizer`` in place. The optimizer's
    param groups then carry the donor's lr/weight decay: call :func:`apply_hparams` next. Needs the same
    architecture (and trainable parameters) as the donor."""
    model.load_state_dict(snap.model_state)  # copies into the recipient's own tensors
    # a private copy: Optimizer.load_state_dict may keep the given tensors, and the snapshot must stay intact
    optimizer.load_state_dict(copy.deepcopy(snap.optimizer_state))


def dropout_targets(model: nn.Module, scope: str = "head") -> list[nn.Module]:
    """The modules whose Dropout rates the ``dropout`` hyperparameter sets (see the module docstring)."""
    if scope == "all":
        return [model]
    for name in ("head", "heads", "classifiers"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            return [mod]
    return [m for n, m in model.named_children() if n not in ("encoder", "halters")]


def apply_hparams(model: nn.Module, optimizer: torch.optim.Optimizer, hp: dict[str, Any], *, total_steps: int,
                  step: int, encoder_lr_ratio: float, dropout_scope: str = "head"):
    """Make ``hp`` take effect now: on EVERY param group ``initial_lr`` = lr (× ``encoder_lr_ratio`` on encoder
    groups) and the current ``lr`` = that × the new schedule's factor at ``step``; ``weight_decay`` = the new
    value on decay groups, 0 on no-decay groups; every Dropout's rate (of :func:`dropout_targets`). Returns the
    new warm-up/linear-decay factor function, to be given to ``state.set_lr_schedule``."""
    from ..train import warmup_linear

    factor = warmup_linear(int(total_steps), float(hp["warmup_ratio"]))
    f = factor(int(step))
    for g in optimizer.param_groups:
        base = float(hp["lr"]) * (encoder_lr_ratio if g.get("group") == "encoder" else 1.0)
        g["initial_lr"] = base
        g["lr"] = base * f
        g["weight_decay"] = float(hp["weight_decay"]) if g.get("decay", True) else 0.0
    for mod in dropout_targets(model, dropout_scope):
        set_dropout(mod, float(hp["dropout"]))
    return factor


def _tuplify(v: Any) -> Any:
    """random.Random state back from a checkpoint (lists where tuples were)."""
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


# --- the population's draws ------------------------------------------------------------------------------------


@dataclass
class Population:
    """What a PBT run draws before any member trains, on every backend: the architecture once for everyone, then
    each member's explored hyperparameters, then each member's batch size (fixed for its life). A function of the
    seed alone, so a resume draws the same population again."""

    seed: int
    architecture: dict[str, Any]
    hp: list[dict[str, float]]
    batch_sizes: list[int]

    def configs(self, cfg: RunConfig, pbt: "PBTConfig", *, train_size: int) -> list[RunConfig]:
        """Every member's RunConfig (:func:`member_config`)."""
        return [member_config(cfg, pbt, i, hp, self.batch_sizes[i], self.architecture, train_size=train_size)
                for i, hp in enumerate(self.hp)]

    def members(self, run_ids: list[Any], *, train_size: int) -> list[dict[str, Any]]:
        """The members as :class:`~dact_lib.tuning.pbt_book.PopulationBook` takes them."""
        return [{"run_id": run_ids[i], "hp": hp, "batch_size": self.batch_sizes[i],
                 "steps_per_epoch": max(1, math.ceil(train_size / self.batch_sizes[i]))}
                for i, hp in enumerate(self.hp)]


def draw_population(cfg: RunConfig, pbt: "PBTConfig") -> Population:
    """The population of ``pbt`` for ``cfg``, drawn from ``pbt.seed`` (else the run config's ``train.seed``)."""
    seed = pbt.seed if pbt.seed is not None else cfg.train.seed
    rng = random.Random(seed)
    architecture = {**pbt.space.sample_architecture(rng), "shared_by_population": True}
    hp = [pbt.space.sample(rng) for _ in range(pbt.population)]
    batch_sizes = [int(rng.choice(list(pbt.space.batch_sizes))) for _ in range(pbt.population)]
    return Population(seed=seed, architecture=architecture, hp=hp, batch_sizes=batch_sizes)


# --- the controller --------------------------------------------------------------------------------------------


class PBTController:
    """The threaded population's shared state: each member's latest snapshot and who is alive. Lock-protected,
    asynchronous: :meth:`ready` ranks against the latest known scores and never waits. What happened is written
    to the population's :class:`~dact_lib.tuning.pbt_book.PopulationBook`."""

    def __init__(self, pbt: PBTConfig, book: PopulationBook) -> None:
        self.pbt = pbt
        self.book = book
        self.lock = threading.Lock()
        self.latest: dict[int, Snapshot] = {}
        self.dead: set[int] = set()

    def ready(self, snap: Snapshot, rng: random.Random, allow_exploit: bool = True) -> Snapshot | None:
        """Record ``snap`` as its member's latest; return a donor snapshot when the member should exploit."""
        m = snap.member
        with self.lock:
            self.latest[m] = snap
            if not allow_exploit:
                return None
            scores = {i: self.book.oriented(sn.score) for i, sn in self.latest.items() if i not in self.dead}
            bottom, top = select_quantiles(scores, self.pbt.quantile)
            if m not in bottom:
                return None
            donors = [i for i in top if i != m and _key(scores[i]) > _key(scores[m])]
            if not donors:
                return None
            return self.latest[rng.choice(sorted(donors))]

    def mark_dead(self, member: int) -> None:
        with self.lock:
            self.dead.add(member)


# --- the member callback ---------------------------------------------------------------------------------------


class PBTMemberCallback(Callback):
    """Turns one member's training loop into a PBT member: ready at every validation (``on_eval``). Its
    hyperparameters, schedule and latest score are the book's (``controller.book``)."""

    def __init__(self, controller: PBTController, member: int, *, space: PBTSpace, encoder_lr_ratio: float,
                 rng: random.Random, dataset_id=None) -> None:
        self.c = controller
        self.book = controller.book
        self.member = member
        self.space = space
        self.ratio = encoder_lr_ratio
        self.rng = rng
        self.dataset_id = dataset_id

    def on_start(self, state: LoopState) -> None:
        state.extra["pbt_member"] = self.member
        kept = state.resumed_callback_state.get("pbt")
        if kept:  # a resumed member: its hyperparameters, schedule and RNG as at its last checkpoint
            self.book.restore(self.member, kept["hp"], kept["schedule"], kept["last_score"])
            self.rng.setstate(_tuplify(kept["rng"]))
            state.set_lr_schedule(apply_hparams(state.model, state.optimizer, self.book.members[self.member].hp,
                                                total_steps=state.total_steps, step=state.step,
                                                encoder_lr_ratio=self.ratio, dropout_scope=self.c.pbt.dropout_scope))
        self._keep(state)
        if not kept:  # (resumed: logged already)
            if self.dataset_id is not None:
                self.book.tracker.update_run(state.run_id, dataset_id=self.dataset_id)
            self.book.begin(self.member, step=state.step, epoch=state.epoch)

    def on_eval(self, state: LoopState, logs: dict[str, float]) -> None:
        if self.c.pbt.metric not in logs:  # the final test evaluation, not a ready point
            return
        score = float(logs[self.c.pbt.metric])
        me = self.book.members[self.member]
        snap = take_snapshot(state.model, state.optimizer, me.hp, member=self.member, run_id=state.run_id,
                             step=state.step, progress=self.book.progress(self.member, state.step), score=score,
                             schedule=me.schedule)
        donor = self.c.ready(snap, self.rng, allow_exploit=state.step < state.total_steps)
        if donor is not None:
            self._exploit_explore(state, donor, score)
        self.book.ready(self.member, step=state.step, epoch=state.epoch, score=score)
        self._keep(state)

    def _keep(self, state: LoopState) -> None:
        """What the member's resume checkpoint must hold besides the loop's own state."""
        me = self.book.members[self.member]
        state.callback_state["pbt"] = {"hp": dict(me.hp), "schedule": [dict(e) for e in me.schedule],
                                       "last_score": me.last_score, "rng": self.rng.getstate()}

    def _exploit_explore(self, state: LoopState, donor: Snapshot, score: float) -> None:
        old = dict(self.book.members[self.member].hp)
        exploit(state.model, state.optimizer, donor)
        new, changes = explore(donor.hparams, self.space, self.rng, resample_prob=self.c.pbt.resample_prob,
                               perturb_factors=self.c.pbt.perturb_factors)
        state.set_lr_schedule(apply_hparams(state.model, state.optimizer, new, total_steps=state.total_steps,
                                            step=state.step, encoder_lr_ratio=self.ratio,
                                            dropout_scope=self.c.pbt.dropout_scope))
        self.book.exploited(recipient=self.member, donor=donor.member, step=state.step, epoch=state.epoch,
                            score=score, donor_step=donor.step, donor_progress=donor.progress,
                            donor_score=donor.score, old=old, donor_hp=donor.hparams, new=new, changes=changes,
                            donor_schedule=donor.schedule)

    def on_end(self, state: LoopState, status: str) -> None:
        if status != "finished":
            self.c.mark_dead(self.member)
            return
        tracker = self.book.tracker
        try:  # what a resumed PBT reads of a finished member
            summary = tracker.get_run(state.run_id).get("summary") or {}
            tracker.update_run(state.run_id, summary={**summary, **self.book.member_summary(self.member)})
        except Exception as exc:  # noqa: BLE001 - informative only
            log.warning("could not record member %s's schedule: %s", self.member, exc)


# --- run_pbt ---------------------------------------------------------------------------------------------------


def resumable_pbt(tracker, run_id: int) -> tuple[RunConfig, "PBTConfig"]:
    """The base config and PBT settings of PBT parent run ``run_id`` when it can be resumed (interrupted, cancelled
    or failed, with its members recorded); else a DactLabError saying why."""
    from ..train import RESUMABLE

    run = tracker.get_run(int(run_id))
    if run["kind"] != "pbt":
        raise DactLabError(f"run {run_id} is a {run['kind']} run, not a PBT run: resume it with `train --resume`.")
    if run["status"] not in RESUMABLE:
        raise DactLabError(f"Cannot resume: PBT run {run_id} is {run['status']}: only an interrupted, cancelled or "
                           "failed PBT run can be resumed.")
    conf = run.get("config") or {}
    if "run" not in conf or "pbt" not in conf:
        raise DactLabError(f"Cannot resume: PBT run {run_id} has no recorded config (it failed before it started).")
    if not tracker.list_runs(parent_id=int(run_id)):
        raise DactLabError(f"Cannot resume: PBT run {run_id} has no members yet; start a new PBT run.")
    return RunConfig.from_dict(conf["run"]), PBTConfig.from_dict(conf["pbt"])


def _finished_member(tracker, book: PopulationBook, member: int) -> dict[str, Any]:
    """A member that finished before a PBT run was interrupted: its final hyperparameters, schedule and latest
    score back into the book, and its end as :meth:`PopulationBook.ended` takes it (loop best, run folder)."""
    from ..files import read_json

    run = tracker.get_run(book.run_id(member))
    summary = run.get("summary") or {}
    run_dir = Path(run["run_dir"]) if run.get("run_dir") else None
    report = read_json(run_dir / "report.json", "report") if run_dir and (run_dir / "report.json").is_file() else {}
    book.restore(member, summary.get("pbt_hp") or {}, summary.get("pbt_schedule") or book.members[member].schedule,
                 summary.get("pbt_last_score"))
    best = (summary.get("best") or {}).get(book.metric)
    return {"best_score": best, "best_step": best_step(report.get("history") or [], book.metric, best),
            "run_dir": run_dir}


def head_mlp_config(cfg: RunConfig):
    """The MLPConfig that the PBT ``hidden_layers``/``activation``/``dropout`` describe for ``cfg.kind``."""
    return cfg.model.classifier if cfg.kind == "dact" else cfg.model.head


def member_config(cfg: RunConfig, pbt: PBTConfig, member: int, hp: dict[str, Any], batch_size: int,
                  architecture: dict[str, Any], *, train_size: int) -> RunConfig:
    """The RunConfig of one member: the base config with the member's hyperparameters, the shared architecture,
    its batch size, the ready interval as ``eval_every_steps``, no early stopping, checkpoints on the PBT metric."""
    mc = copy.deepcopy(cfg)
    tc = mc.train
    ratio = cfg.train.encoder_lr / cfg.train.head_lr
    tc.epochs = pbt.epochs or cfg.train.epochs
    tc.seed = (pbt.seed if pbt.seed is not None else cfg.train.seed) + member
    tc.batch_size = int(batch_size)
    tc.head_lr = float(hp["lr"])
    tc.encoder_lr = float(hp["lr"]) * ratio
    tc.weight_decay = float(hp["weight_decay"])
    tc.warmup_ratio = float(hp["warmup_ratio"])
    tc.num_threads = None  # run_pbt sets torch's (process-global) threads once for all members
    spe = max(1, math.ceil(train_size / tc.batch_size))
    if pbt.ready_every_steps is not None:
        tc.eval_every_steps = pbt.ready_every_steps
    elif pbt.ready_every_epochs is not None:  # (validate(): exactly one of the two is set)
        tc.eval_every_steps = max(1, int(round(spe * pbt.ready_every_epochs)))
    tc.early_stopping.metric = pbt.metric
    tc.early_stopping.enabled = False
    head = head_mlp_config(mc)
    dims = head.resolved_dims()
    width = dims[0] if dims else head.width
    head.layout = "explicit"
    head.hidden_dims = [int(width)] * int(architecture["hidden_layers"])
    head.activation = architecture["activation"]
    head.dropout = float(hp["dropout"])
    if pbt.dropout_scope == "all":
        tc.encoder_dropout = float(hp["dropout"])
    mc.name = f"{cfg.name or 'pbt'} · member {member}"
    return mc.validate()


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# complexity: population setup, resume and the threaded members share the parent run's state
def run_pbt(cfg: RunConfig, *, pbt: PBTConfig | None = None, home=None, tracker=None,
            cancel: CancelToken | None = None, callbacks: list[Callback] | None = None,
            run_id: int | None = None, resume: bool = False) -> PBTResult:
    """Population Based Training of ``cfg`` (see the module docstring). ``run_id``: a pre-created parent run
    (e.g. queued by the dashboard's job manager) to use instead of creating one. Records a parent run (kind ``pbt``) and a
    child run per member (kind ``pbt-member``); returns the winner, its schedule and a summary of every member.
    ``callbacks`` are given to EVERY member's loop (shared across threads: they must be thread-safe;
    ``state.run_id`` / ``state.extra['pbt_member']`` tell the members apart). Raises :class:`Cancelled` (after
    recording the parent 'cancelled') when ``cancel`` is set; a failing member is recorded 'failed' and the others
    go on; when no member finishes the parent is 'failed' and a :class:`DactLabError` is raised.

    ``resume=True`` with ``run_id`` = an interrupted (or cancelled / failed) PBT parent run continues it: the same
    population (the seed draws the same architecture, hyperparameters and batch sizes), finished members are kept,
    members with a resume checkpoint continue from it (weights, optimizer, step, their explored hyperparameters,
    schedule and RNG), the others start again. The population's latest scores are rebuilt as members reach their
    next ready point."""
    from ..models import build_model
    from ..tracker import Tracker
    from ..train import load_split, resume_path, train

    pbt = (pbt or PBTConfig()).validate()
    cfg.validate()
    check(not (cfg.train.gradual_unfreeze and cfg.train.freeze_layers), "train.gradual_unfreeze",
           cfg.train.gradual_unfreeze, "PBT copies optimizer state between members, which needs the same trainable "
           "parameters in every member at every step: set gradual_unfreeze false (or freeze_layers 0) for PBT")
    if tracker is None:
        tracker = Tracker(home)
    home = home if home is not None else tracker.home
    cancel = cancel or CancelToken()
    n = pbt.population

    split, dataset_id = load_split(cfg, tracker)
    if split.val is None:
        raise DactLabError("PBT ranks members on validation data: set data.val_frac > 0 or give data.val_path.")
    train_size = len(split.train)
    pop = draw_population(cfg, pbt)
    ratio = cfg.train.encoder_lr / cfg.train.head_lr

    parent_config = {"run": cfg.to_dict(), "pbt": pbt.to_dict()}
    previous: list[dict] = []
    if resume:
        if run_id is None:
            raise DactLabError("resume=True needs run_id: the PBT parent run to continue.")
        previous = sorted(tracker.list_runs(parent_id=run_id), key=lambda r: r["id"])
        if len(previous) != n:
            raise DactLabError(f"PBT run {run_id} has {len(previous)} members, this config {n}: resume it with the "
                               "settings it was started with (python -m dact_lib pbt --resume RUN).")
        tracker.log_event(run_id, ev.RESUMED, {"members": {r["id"]: r["status"] for r in previous}})
    parent_id = tracker.open_run("pbt", parent_config, run_id, dataset_id=dataset_id,
                                 **({"name": cfg.name or "pbt", "tag": cfg.tag} if run_id is None else {}))
    member_ids: list[Any] = []
    prev_threads = torch.get_num_threads()
    try:
        cfgs = pop.configs(cfg, pbt, train_size=train_size)
        member_ids = [r["id"] for r in previous] or [
            tracker.create_run("pbt-member", mc.to_dict(), name=mc.name, tag=cfg.tag, parent_id=parent_id,
                               dataset_id=dataset_id, status="queued") for mc in cfgs]
        kept = {i for i in range(n) if previous and previous[i]["status"] == "finished"}
        resumable = {i for i in range(n) if previous and i not in kept
                     and resume_path(Path(previous[i]["run_dir"] or tracker.run_dir(member_ids[i]))) is not None}
        book = PopulationBook(tracker, parent_id, pbt.metric, pop.members(member_ids, train_size=train_size))
        total_threads = pbt.num_threads or cfg.train.num_threads or _default_threads()
        per_member = max(1, total_threads // n)
        threads_info = {"total_threads": total_threads, "torch_threads": per_member, "population": n,
                        "concurrent_members": n, "cpu_cores": _default_threads(),
                        "policy": "members run concurrently in Python threads; torch.set_num_threads is "
                                  "process-global, so the total is split: max(1, total // population) each"}
        tracker.log_event(parent_id, ev.PBT_THREADS, threads_info)
        book.start(pop.architecture, [mc.train.eval_every_steps for mc in cfgs])
        # models are built here, one after the other: deterministic initialisation, no concurrent extraction
        built = [build_model(mc, split.train.label_maps, home) if i not in kept else (None, None)
                 for i, mc in enumerate(cfgs)]
    except BaseException as exc:
        for rid in member_ids:
            tracker.set_status(rid, "failed", f"PBT setup failed: {type(exc).__name__}: {exc}")
        tracker.set_status(parent_id, "cancelled" if isinstance(exc, Cancelled) else "failed",
                           f"{type(exc).__name__}: {exc}")
        raise

    controller = PBTController(pbt, book)
    if previous:
        book.recount_exploits()
    member_cbs = [PBTMemberCallback(controller, i, space=pbt.space, encoder_lr_ratio=ratio,
                                    rng=random.Random(pop.seed * 1000 + 1 + i), dataset_id=dataset_id)
                  for i in range(n)]

    def work(i: int) -> None:
        model, tokenizer = built[i]
        if i in kept:  # finished before the interruption: its record stands
            book.ended(i, "finished", **_finished_member(tracker, book, i))
            return
        if previous and i not in resumable:
            tracker.delete_metrics_after(member_ids[i], -1)  # starts again: its old curve goes
        try:
            res = train(cfgs[i], data=split, home=home, tracker=tracker, run_id=member_ids[i],
                        callbacks=[member_cbs[i], *(callbacks or [])], cancel=cancel, model=model,
                        tokenizer=tokenizer, resume=i in resumable)
            best = res.best_metrics.get(pbt.metric)
            book.ended(i, res.status, best_score=best, best_step=best_step(res.history, pbt.metric, best),
                       run_dir=res.run_dir)
        except Cancelled as exc:
            book.ended(i, "cancelled", str(exc))
        except BaseException as exc:  # noqa: BLE001 - recorded by train(); the other members go on
            book.ended(i, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            if book.members[i].status != "finished":
                controller.mark_dead(i)
            built[i] = (None, None)  # the TrainResult keeps the model; drop this reference

    torch.set_num_threads(per_member)
    threads = [threading.Thread(target=work, args=(i,), name=f"pbt-member-{i}", daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:  # e.g. KeyboardInterrupt in the caller's thread: stop every member, then record
        cancel.cancel("PBT interrupted")
        for t in threads:
            t.join()
        tracker.set_status(parent_id, "cancelled", "PBT interrupted")
        raise
    finally:
        torch.set_num_threads(prev_threads)

    return book.finish(architecture=pop.architecture, configs=[mc.to_dict() for mc in cfgs],
                       dropout_scope=pbt.dropout_scope, cancel=cancel, summary={"threads": threads_info})


# --- replay ----------------------------------------------------------------------------------------------------


class ScheduleCallback(Callback):
    """Applies a PBT schedule's changes in a plain training run: entry ``step = s`` takes effect after ``s``
    optimisation steps (the same point a PBT member applies an exploit made at its evaluation after step ``s``)."""

    def __init__(self, schedule: list[dict], *, encoder_lr_ratio: float, dropout_scope: str = "head",
                 tracker=None) -> None:
        self.changes = sorted((dict(e) for e in schedule), key=lambda e: e["step"])
        self.ratio = encoder_lr_ratio
        self.scope = dropout_scope
        self.tracker = tracker
        self.applied: list[dict] = []
        self._next = 0

    def on_start(self, state: LoopState) -> None:
        self._apply_due(state)

    def on_step(self, state: LoopState, logs: dict[str, float]) -> None:
        self._apply_due(state)

    def _apply_due(self, state: LoopState) -> None:
        while self._next < len(self.changes) and self.changes[self._next]["step"] <= state.step:
            e = self.changes[self._next]
            self._next += 1
            state.set_lr_schedule(apply_hparams(
                state.model, state.optimizer, e, total_steps=state.total_steps, step=state.step,
                encoder_lr_ratio=self.ratio, dropout_scope=self.scope))
            self.applied.append({"step": state.step, **hp_public(e)})
            if self.tracker is not None and state.run_id is not None:
                self.tracker.log_event(state.run_id, ev.PBT_REPLAY_CHANGE, {"step": state.step, **hp_public(e)})
                self.tracker.log_metrics(state.run_id, hp_metrics(e), step=state.step, epoch=state.epoch)


def replay_schedule(cfg: RunConfig | dict, schedule: list[dict], *, home=None, tracker=None, data=None,
                    callbacks: list[Callback] | None = None, cancel: CancelToken | None = None, save: bool = True,
                    parent_id: Any = None, dropout_scope: str = "head"):
    """Re-run a PBT schedule as one plain training run of ``cfg`` (normally ``PBTResult.best_config``: the
    winner's architecture and batch size). The first entry (step 0) sets the starting hyperparameters in the
    config; later entries are applied at their steps by a :class:`ScheduleCallback`. Returns the TrainResult."""
    from ..train import train

    if isinstance(cfg, dict):
        cfg = RunConfig.from_dict(cfg)
    if not schedule:
        raise ConfigError("schedule = [] is invalid: give the list of {step, lr, weight_decay, dropout, "
                          "warmup_ratio} changes of a PBT run (PBTResult.schedule).")
    for i, e in enumerate(schedule):
        missing = [k for k in ("step", *EXPLORED) if k not in e]
        check(not missing, f"schedule[{i}]", e, f"each change needs the keys step, {', '.join(EXPLORED)}")
    check(dropout_scope in DROPOUT_SCOPES, "dropout_scope", dropout_scope, f"choose one of {list(DROPOUT_SCOPES)}")
    cfg = copy.deepcopy(cfg)
    ratio = cfg.train.encoder_lr / cfg.train.head_lr
    changes = sorted(schedule, key=lambda e: e["step"])
    first = changes[0]
    if first["step"] <= 0:
        cfg.train.head_lr = float(first["lr"])
        cfg.train.encoder_lr = float(first["lr"]) * ratio
        cfg.train.weight_decay = float(first["weight_decay"])
        cfg.train.warmup_ratio = float(first["warmup_ratio"])
        head_mlp_config(cfg).dropout = float(first["dropout"])
        if dropout_scope == "all":
            cfg.train.encoder_dropout = float(first["dropout"])
        changes = changes[1:]
    cfg.name = cfg.name if cfg.name and "replay" in cfg.name else f"{cfg.name or 'pbt'} · replay"
    cfg.validate()
    cb = ScheduleCallback(changes, encoder_lr_ratio=ratio, dropout_scope=dropout_scope, tracker=tracker)
    return train(cfg, data=data, home=home, tracker=tracker, callbacks=[cb, *(callbacks or [])], cancel=cancel,
                 save=save, parent_id=parent_id)
