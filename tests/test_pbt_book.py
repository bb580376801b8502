"""The one record of a PBT population (dact_lib/tuning/pbt_book.py), without training: what an exploit + explore
writes (events, hyperparameters, the lineage), a ready point's ``hp/...`` metrics, member ends and the winner."""
from __future__ import annotations

import pytest

from dact_lib.errors import Cancelled, DactLabError
from dact_lib.callbacks import CancelToken
from dact_lib.tracker import Tracker
from dact_lib.tuning.pbt_book import EXPLORED, PopulationBook, best_step

HP = [{"lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.1, "warmup_ratio": 0.0},
      {"lr": 2e-3, "weight_decay": 2e-4, "dropout": 0.2, "warmup_ratio": 0.1},
      {"lr": 3e-3, "weight_decay": 3e-4, "dropout": 0.3, "warmup_ratio": 0.2}]


def make_book(home, *, metric="val_loss", tags=None, batch_sizes=(16, 32, 16), steps_per_epoch=(6, 3, 6)):
    tracker = Tracker(home)
    parent = tracker.create_run("pbt", {}, status="running")
    members = [{"run_id": tracker.create_run("pbt-member", {}, parent_id=parent, status="queued"), "hp": HP[i],
                "batch_size": batch_sizes[i], "steps_per_epoch": steps_per_epoch[i]} for i in range(3)]
    return tracker, parent, PopulationBook(tracker, parent, metric, members, tags=tags)


def exploit_1_from_0(book, **extra):
    new = {"lr": 1.2e-3, "weight_decay": 0.8e-4, "dropout": 0.12, "warmup_ratio": 0.0}
    changes = {k: {"how": "perturb", "factor": 1.2, "clipped": False, "old": HP[0][k], "new": new[k]}
               for k in EXPLORED}
    book.exploited(recipient=1, donor=0, step=3, epoch=1, score=0.9, donor_step=6, donor_progress=1.0,
                   donor_score=0.5, old=HP[1], donor_hp=HP[0], new=new, changes=changes, **extra)
    return new


def test_an_exploit_records_who_copied_whom_and_the_explored_values(home):
    tracker, parent, book = make_book(home, tags={"backend": "test"})
    book.exploited(recipient=0, donor=2, step=2, epoch=0, score=0.8, donor_step=2, donor_progress=1 / 3,
                   donor_score=0.4, old=HP[0], donor_hp=HP[2], new=HP[2],
                   changes={k: {"how": "perturb", "factor": 1.0, "clipped": False, "old": HP[2][k], "new": HP[2][k]}
                            for k in EXPLORED})  # the donor's own lineage grows: member 0 took 2's values at 2/6
    new = exploit_1_from_0(book, donor_checkpoint="/ckpt/0")

    rid = book.run_id(1)
    for run in (parent, rid):  # on the parent and on the recipient's run
        (ex,) = [e["payload"] for e in tracker.get_events(run, kinds=["pbt_exploit"]) if e["payload"]["recipient"] == 1]
        (xp,) = [e["payload"] for e in tracker.get_events(run, kinds=["pbt_explore"]) if e["payload"]["recipient"] == 1]
        # exploit: the recipient's own values -> the donor's it copied; explore: the donor's -> the explored ones
        assert ex["old"] == HP[1] and ex["new"] == HP[0]
        assert xp["old"] == HP[0] and xp["new"] == new and xp["recipient_old"] == HP[1]
        assert all(xp["changes"][k]["old"] == xp["old"][k] and xp["changes"][k]["new"] == xp["new"][k]
                   for k in EXPLORED)
        for p in (ex, xp):
            assert (p["recipient"], p["donor"], p["recipient_run_id"], p["donor_run_id"]) == (1, 0, rid, book.run_id(0))
            assert (p["step"], p["progress"], p["score"], p["donor_score"]) == (3, 1.0, 0.9, 0.5)  # its epoch is 3 steps
            assert p["backend"] == "test" and p["donor_checkpoint"] == "/ckpt/0" and p["metric"] == "val_loss"
    assert [e["payload"]["recipient"] for e in tracker.get_events(book.run_id(2), kinds=["pbt_exploit"])] == []

    me = book.members[1]
    assert me.hp == new and me.exploits == 1 and book.members[0].exploits == 1
    # the lineage: the donor's entries up to the recipient's progress (1 epoch), then the explored values
    assert [(e["member"], e["via"], e["step"]) for e in me.schedule] == [(2, "init", 0), (0, "exploit", 2),
                                                                          (1, "exploit", 3)]
    assert me.schedule[-1]["donor"] == 0 and {k: me.schedule[-1][k] for k in EXPLORED} == new

    book.ready(1, step=3, epoch=1, score=0.9)  # after the exploit decision: the explored values are in force
    hp = tracker.get_metrics(rid, names=[f"hp/{k}" for k in EXPLORED])
    assert {r.name: r.value for r in hp.itertuples() if r.step == 3} == {f"hp/{k}": v for k, v in new.items()}
    assert me.last_score == 0.9
    assert book.member_summary(1) == {"pbt_hp": new, "pbt_schedule": me.schedule, "pbt_last_score": 0.9,
                                      "backend": "test"}


def test_the_donor_schedule_of_the_copied_state_is_inherited_not_its_current_one(home):
    _, _, book = make_book(home)
    copied = [{"step": 0, "progress": 0.0, **HP[2], "member": 0, "via": "init"}]
    exploit_1_from_0(book, donor_schedule=copied)
    assert [e["member"] for e in book.members[1].schedule] == [0, 1]
    assert {k: book.members[1].schedule[0][k] for k in EXPLORED} == HP[2]


def test_the_winner_its_schedule_in_its_own_steps_and_the_parent_summary(home):
    tracker, parent, book = make_book(home)
    exploit_1_from_0(book)
    book.ended(0, "finished", best_score=0.5, best_step=6, run_dir=home / "m0")
    book.ended(1, "finished", best_score=0.3, best_step=3)
    book.ended(2, "failed", "RuntimeError: boom")
    assert not book.ended(2, "cancelled")  # ended once
    res = book.finish(architecture={"hidden_layers": 1}, configs=[{"c": i} for i in range(3)], dropout_scope="head",
                      summary={"threads": {"torch_threads": 1}})
    assert (res.best_member, res.best_run_id, res.best_score, res.best_config) == (1, book.run_id(1), 0.3, {"c": 1})
    # member 0's init entry at progress 0 and the exploit at member 1's own step 3
    assert [(e["step"], e["member_step"], e["member"]) for e in res.schedule] == [(0, 0, 0), (3, 3, 1)]
    run = tracker.get_run(parent)
    assert run["status"] == "finished"
    assert set(run["summary"]) - {"environment"} == {"members", "architecture", "threads", "metric", "best_member",
                                                     "best_run_id", "best_score", "schedule", "dropout_scope",
                                                     "best_config"}  # (the tracker adds the environment)
    assert [m["status"] for m in run["summary"]["members"]] == ["finished", "finished", "failed"]
    assert run["summary"]["members"][0]["run_dir"] == str(home / "m0")
    assert run["summary"]["members"][1]["exploits"] == 1 and run["summary"]["members"][1]["final"] != HP[1]
    (failed,) = tracker.get_events(parent, kinds=["pbt_member_failed"])
    assert failed["payload"] == {"member": 2, "run_id": book.run_id(2), "error": "RuntimeError: boom"}
    assert tracker.get_events(parent, kinds=["pbt_schedule"])[0]["payload"]["schedule"] == res.schedule


def test_ties_go_to_the_lower_member_and_higher_is_better_for_accuracy(home):
    _, _, book = make_book(home, metric="val_accuracy")
    for i, score in enumerate([0.7, 0.9, 0.9]):
        book.ended(i, "finished", best_score=score)
    assert book.finish(architecture={}, configs=[{}] * 3, dropout_scope="head").best_member == 1


def test_a_population_without_a_finished_member_or_cancelled_is_recorded_so(home):
    tracker, parent, book = make_book(home)
    book.ended(0, "failed", "boom")
    with pytest.raises(DactLabError, match="PBT: no member finished .member 0: boom"):
        book.finish(architecture={}, configs=[{}] * 3, dropout_scope="head")
    assert tracker.get_run(parent)["status"] == "failed"
    tracker, parent, book = make_book(home)
    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(Cancelled, match="stop"):
        book.finish(architecture={}, configs=[{}] * 3, dropout_scope="head", cancel=token)
    assert tracker.get_run(parent)["status"] == "cancelled"


def test_best_step_is_the_step_of_the_loops_best_evaluation():
    history = [{"step": 2, "val_loss": 0.9}, {"step": 4, "val_loss": 0.5}, {"step": 6, "val_loss": 0.6}]
    assert best_step(history, "val_loss", 0.5) == 4
    assert best_step(history, "val_loss", None) is None
