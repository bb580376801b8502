"""The record of a PBT population, one for both backends (the threads of :mod:`dact_lib.tuning.pbt` and Ray Tune in
:mod:`dact_lib.tuning.pbt_ray`): what the tracker holds of a population and what a PBT run returns.

:class:`PopulationBook` keeps each member's hyperparameters in force, its schedule (the lineage: inherited entries
plus its own changes), its latest score, its exploits and its outcome, and writes the records the PBT page reads:

* the parent's ``pbt_start`` event (the shared architecture and every member's drawn values); each member's
  starting ``hp/...`` and ``hp/batch_size`` metrics;
* at every ready point the member's ``hp/lr``, ``hp/weight_decay``, ``hp/dropout``, ``hp/warmup_ratio`` metrics
  (the values in force from that step on);
* every exploit + explore as a ``pbt_exploit`` and a ``pbt_explore`` event on the parent AND the recipient's run
  (time, step, progress, recipient, donor, their run ids and scores, old → new hyperparameters, ``changes``);
* a failed member's ``pbt_member_failed`` event; a finished member's ``pbt_hp`` / ``pbt_schedule`` /
  ``pbt_last_score`` in its summary (what a resumed PBT reads back);
* at the end (:meth:`PopulationBook.finish`) the winner, its schedule in its own steps (``pbt_schedule`` event),
  the parent's summary and status, and the :class:`PBTResult`.

A backend adds its ``tags`` (Ray: ``{"backend": "ray"}``) to every event payload and member summary the book
writes. Ray is not imported here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import events as ev
from ..callbacks import CancelToken
from ..errors import Cancelled, DactLabError
from ..train import lower_is_better

#: The hyperparameters that exploit/explore change during training.
EXPLORED = ("lr", "weight_decay", "dropout", "warmup_ratio")
#: The statuses a member ends with.
ENDED = ("finished", "failed", "cancelled")


def hp_public(hp: dict[str, Any]) -> dict[str, float]:
    """A member's explored hyperparameters as floats (how every record names them)."""
    return {k: float(hp[k]) for k in EXPLORED}


def hp_metrics(hp: dict[str, Any]) -> dict[str, float]:
    """A member's explored hyperparameters as its ``hp/...`` metrics."""
    return {f"hp/{k}": float(hp[k]) for k in EXPLORED}


def normalise_schedule(schedule: list[dict]) -> list[dict]:
    """Sorted by step; of several changes at one step the last wins; no-op changes dropped."""
    out: list[dict] = []
    for e in sorted(schedule, key=lambda e: e["step"]):
        if out and out[-1]["step"] == e["step"]:
            out[-1] = e
        elif out and all(out[-1][k] == e[k] for k in EXPLORED):
            continue
        else:
            out.append(e)
    return out


def best_step(history: list[dict], metric: str, best: float | None) -> int | None:
    """The step of the loop's evaluation that scored ``best`` (the loop's best checkpoint), or None."""
    return next((int(h["step"]) for h in history if h.get(metric) == best), None) if best is not None else None


@dataclass
class PBTResult:
    parent_run_id: Any
    best_run_id: Any
    best_member: int | None
    best_score: float | None
    schedule: list[dict]
    members: list[dict]
    architecture: dict[str, Any] = field(default_factory=dict)  # shared by the population
    best_config: dict[str, Any] | None = None  # the winner's RunConfig as a dict (for replay_schedule)
    status: str = "finished"

    def summary(self) -> dict[str, Any]:
        """What the job manager records in the parent run's summary."""
        return {"parent_run_id": self.parent_run_id, "best_run_id": self.best_run_id,
                "best_value": self.best_score}


@dataclass
class Member:
    """One member as the book sees it: drawn once (run, hyperparameters, batch size), then updated as it trains."""

    run_id: Any
    initial: dict[str, float]
    batch_size: int
    steps_per_epoch: int
    hp: dict[str, float] = field(default_factory=dict)
    schedule: list[dict] = field(default_factory=list)
    status: str = "queued"
    error: str | None = None
    last_score: float | None = None
    best_score: float | None = None
    best_step: int | None = None
    exploits: int = 0
    run_dir: str | None = None


class PopulationBook:
    """The records of one PBT population (see the module docstring). ``members``: per member its ``run_id``, drawn
    ``hp``, ``batch_size`` and ``steps_per_epoch``. ``name`` begins the error of a population where no member
    finished; ``progress`` gets one line per ready point, exploit and member end.

    Threads: a member's entries are written only from that member's thread (its ready points, exploits and end)
    and read by others only through the tracker, so the book needs no lock; Ray calls it from the driver's
    thread only."""

    def __init__(self, tracker, parent_id, metric: str, members: list[dict], *, tags: dict[str, Any] | None = None,
                 name: str = "PBT", progress: Callable[[str], None] | None = None) -> None:
        self.tracker = tracker
        self.parent_id = parent_id
        self.metric = metric
        self.sign = -1.0 if lower_is_better(metric) else 1.0
        self.tags = dict(tags or {})
        self.name = name
        self.progress_fn = progress
        self.members = [Member(run_id=m["run_id"], initial=hp_public(m["hp"]), batch_size=int(m["batch_size"]),
                               steps_per_epoch=max(1, int(m["steps_per_epoch"])), hp=hp_public(m["hp"]),
                               schedule=[{"step": 0, "progress": 0.0, **hp_public(m["hp"]), "member": i,
                                          "via": "init"}])
                        for i, m in enumerate(members)]

    def __getstate__(self) -> dict:  # Ray pickles its scheduler and callbacks: no tracker, no printer in there
        return {k: (None if k in ("tracker", "progress_fn") else v) for k, v in self.__dict__.items()}

    # --- reading ---------------------------------------------------------------------------------------------

    def oriented(self, score: float | None) -> float:
        """``score`` with higher = better; None and NaN are the worst."""
        if score is None or (isinstance(score, float) and math.isnan(score)):
            return -math.inf
        return self.sign * float(score)

    def run_id(self, member: int) -> Any:
        return self.members[member].run_id

    def progress(self, member: int, step: int) -> float:
        """Epochs of data that ``member`` has seen after ``step`` of its own steps."""
        return step / self.members[member].steps_per_epoch

    def say(self, text: str) -> None:
        if self.progress_fn is not None:
            try:
                self.progress_fn(text)
            except Exception:  # noqa: BLE001 - printing never stops the population
                pass

    def log_event(self, kind: str, payload: dict, run_id: Any = None) -> None:
        """``payload`` (with the backend's tags) on the parent run and on ``run_id``'s."""
        for rid in (self.parent_id, run_id):
            if rid is not None:
                self.tracker.log_event(rid, kind, {**payload, **self.tags})

    # --- writing -----------------------------------------------------------------------------------------------

    def start(self, architecture: dict[str, Any], eval_every_steps: list[int | None], **extra: Any) -> None:
        """The parent's ``pbt_start`` event: the shared architecture and every member's drawn values."""
        self.tracker.log_event(self.parent_id, ev.PBT_START, {
            "architecture": architecture, "metric": self.metric, **extra,
            "members": [{"member": i, "run_id": m.run_id, "batch_size": m.batch_size, **m.initial,
                         "eval_every_steps": eval_every_steps[i]} for i, m in enumerate(self.members)]})

    def begin(self, member: int, *, step: int = 0, epoch: int = 0) -> None:
        """A member's first ``hp/...`` metrics and its ``hp/batch_size``: the values it starts with."""
        m = self.members[member]
        self.tracker.log_metrics(m.run_id, {**hp_metrics(m.hp), "hp/batch_size": m.batch_size}, step=step,
                                 epoch=epoch)

    def restore(self, member: int, hp: dict[str, Any], schedule: list[dict], last_score: float | None) -> None:
        """A member's hyperparameters, schedule and latest score as a resumed run recorded them."""
        m = self.members[member]
        m.hp, m.schedule, m.last_score = hp_public({**m.hp, **hp}), [dict(e) for e in schedule], last_score

    def recount_exploits(self) -> None:
        """Each member's exploits so far, from the lineage on the parent run (a resumed population)."""
        for e in self.tracker.get_events(self.parent_id, kinds=[ev.PBT_EXPLOIT]):
            r = e["payload"].get("recipient")
            if isinstance(r, int) and 0 <= r < len(self.members):
                self.members[r].exploits += 1

    def ready(self, member: int, *, step: int, epoch: int, score: float) -> None:
        """A ready point of ``member`` after the exploit decision: its score and the ``hp/...`` in force now."""
        m = self.members[member]
        m.last_score = float(score)
        self.tracker.log_metrics(m.run_id, hp_metrics(m.hp), step=step, epoch=epoch)
        self.say(f"[member {member} · run {m.run_id}] step {step}: {self.metric}={score:.4f}")

    def exploited(self, *, recipient: int, donor: int, step: int, epoch: int, score: float | None, donor_step: int,
                  donor_progress: float, donor_score: float | None, old: dict, donor_hp: dict, new: dict,
                  changes: dict, donor_schedule: list[dict] | None = None, **extra: Any) -> None:
        """One exploit + explore of ``recipient`` at its ``step``: the two events, its new hyperparameters and its
        schedule (the donor's entries up to the recipient's progress, then the explored values).
        ``donor_schedule``: the donor's schedule as of the state copied (default: its current one); ``extra`` goes
        into both events."""
        rec = self.members[recipient]
        progress = self.progress(recipient, step)
        common = {"time": time.time(), "step": int(step), "epoch": int(epoch), "progress": progress,
                  "recipient": recipient, "recipient_run_id": rec.run_id, "donor": donor,
                  "donor_run_id": self.run_id(donor), "donor_step": int(donor_step),
                  "donor_progress": float(donor_progress), "metric": self.metric, "score": score,
                  "donor_score": donor_score, **extra}
        self.log_event(ev.PBT_EXPLOIT, {**common, "old": hp_public(old), "new": hp_public(donor_hp)}, rec.run_id)
        self.log_event(ev.PBT_EXPLORE, {**common, "old": hp_public(donor_hp), "new": hp_public(new),
                                        "recipient_old": hp_public(old), "changes": changes}, rec.run_id)
        lineage = self.members[donor].schedule if donor_schedule is None else donor_schedule
        rec.schedule = [dict(e) for e in lineage if e["progress"] <= progress + 1e-9] + [
            {"step": int(step), "progress": progress, **hp_public(new), "member": recipient, "via": "exploit",
             "donor": donor}]
        rec.hp = hp_public(new)
        rec.exploits += 1
        self.say(f"[exploit] member {recipient} <- member {donor} at step {step}: "
                 + ", ".join(f"{k} {float(old[k]):.3g} -> {float(new[k]):.3g}" for k in EXPLORED))

    def member_summary(self, member: int) -> dict[str, Any]:
        """What a finished member's run summary gets: its final hyperparameters, schedule and latest score."""
        m = self.members[member]
        return {"pbt_hp": dict(m.hp), "pbt_schedule": [dict(e) for e in m.schedule], "pbt_last_score": m.last_score,
                **self.tags}

    def ended(self, member: int, status: str, error: str | None = None, *, best_score: float | None = None,
              best_step: int | None = None, run_dir: str | Path | None = None) -> bool:
        """``member`` ended with ``status`` (one of :data:`ENDED`); ``best_score`` / ``best_step`` are its loop's
        best (the score of the model it saved). A failure is a ``pbt_member_failed`` event. False (and nothing
        recorded) when the member had ended already."""
        m = self.members[member]
        if m.status in ENDED:
            return False
        m.status, m.error, m.best_score, m.best_step = status, error, best_score, best_step
        m.run_dir = str(run_dir) if run_dir is not None else None
        if status == "failed":
            self.log_event(ev.PBT_MEMBER_FAILED, {"member": member, "run_id": m.run_id, "error": error})
        self.say(f"[member {member} · run {m.run_id}] {status}" + (f": {error}" if error else ""))
        return True

    def finish(self, *, architecture: dict[str, Any], configs: list[dict], dropout_scope: str,
               cancel: CancelToken | None = None, summary: dict[str, Any] | None = None) -> PBTResult:
        """The end of the population: the parent recorded 'cancelled' (then :class:`Cancelled` raised), 'failed'
        when no member finished (then a DactLabError), else 'finished' with the winner — the best loop score, ties
        to the lower member index — and its schedule with every step in the winner's own steps (inherited entries
        were recorded in their member's steps; converted through epoch progress). ``configs``: every member's
        RunConfig as a dict; ``dropout_scope``: PBTConfig's (the winner's replay needs it); ``summary``: what the
        backend adds to the parent's summary."""
        members = [{"member": i, "run_id": m.run_id, "status": m.status, "error": m.error,
                    "batch_size": m.batch_size, "initial": dict(m.initial), "final": dict(m.hp),
                    "best_score": m.best_score, "last_score": m.last_score, "best_step": m.best_step,
                    "exploits": m.exploits, "run_dir": m.run_dir} for i, m in enumerate(self.members)]
        base = {"members": members, "architecture": architecture, **(summary or {})}
        if cancel is not None and cancel.cancelled:
            self.tracker.set_status(self.parent_id, "cancelled", cancel.reason or "cancelled", summary=base)
            raise Cancelled(cancel.reason or "cancelled")
        finished = [m for m in members if m["status"] == "finished" and m["best_score"] is not None]
        if not finished:
            errors = "; ".join(f"member {m['member']}: {m['error']}" for m in members if m["error"])
            self.tracker.set_status(self.parent_id, "failed", f"no PBT member finished ({errors})", summary=base)
            raise DactLabError(f"{self.name}: no member finished ({errors}). Fix the first error and run again.")
        winner = max(finished, key=lambda m: (self.oriented(m["best_score"]), -m["member"]))
        w = winner["member"]
        spe_w = self.members[w].steps_per_epoch
        schedule = normalise_schedule([
            {**e, "member_step": int(e["step"]),
             "step": int(e["step"]) if e["member"] == w else int(round(e["progress"] * spe_w))}
            for e in self.members[w].schedule])
        best_config = configs[w]
        self.tracker.log_event(self.parent_id, ev.PBT_SCHEDULE, {"member": w, "run_id": self.run_id(w),
                                                                 "schedule": schedule})
        self.tracker.set_status(self.parent_id, "finished", summary={
            **base, "metric": self.metric, "best_member": w, "best_run_id": self.run_id(w),
            "best_score": winner["best_score"], "schedule": schedule, "dropout_scope": dropout_scope,
            "best_config": best_config})
        return PBTResult(parent_run_id=self.parent_id, best_run_id=self.run_id(w), best_member=w,
                         best_score=winner["best_score"], schedule=schedule, members=members,
                         architecture=architecture, best_config=best_config, status="finished")
