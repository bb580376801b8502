"""PBT on Ray Tune (dact_lib/tuning/pbt_ray.py): a local Ray runtime (2 CPUs) runs population 2 on the tiny
encoder; every exploit restarts the recipient from the donor's checkpoint (its weights, read back from the
member's own loop) with the explored hyperparameters (read back from the member's optimizer), and the tracker
holds the members, their metrics and the exploit / explore events the PBT view reads."""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from dact_lib.callbacks import Callback
from dact_lib.errors import DactLabError
from dact_lib.tracker import Tracker

sys.path.insert(0, str(Path(__file__).parent))
from test_pbt import tiny_cfg, tiny_pbt  # noqa: E402


def _ray_or_skip():
    try:
        import ray  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError as exc:
        if os.environ.get("DACT_LAB_REQUIRE_SERVERS"):
            pytest.fail(f"CI must run the Ray tests: {exc}")
        pytest.skip(f"Ray Tune is not installed ({exc}): pip install 'ray[tune]'")
    return ray


def weights_hash(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordStarts(Callback):
    """In the Ray worker, after the engine's own callback set the member up: how this start came about, a hash
    of the weights the loop starts from, and the optimizer's hyperparameters (one JSON line per start)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_start(self, state) -> None:  # after the resume state is loaded and the member's values applied
        model, opt = state.model, state.optimizer
        info = state.extra.get("pbt_ray") or {}
        rec = {"member": info.get("member"), "restart": info.get("restart"), "step": int(state.step),
               "weights": weights_hash(model.state_dict()),
               "initial_lr": sorted({round(float(g["initial_lr"]), 12) for g in opt.param_groups}),
               "weight_decay": sorted({round(float(g["weight_decay"]), 12) for g in opt.param_groups})}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


@pytest.fixture(scope="module")
def ray_runtime():
    ray = _ray_or_skip()
    import ray.cloudpickle as rcp

    rcp.register_pickle_by_value(sys.modules[__name__])  # RecordStarts travels to the workers by value
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_pbt_on_ray_exploits_restore_the_donor_weights_with_new_hyperparameters(ray_runtime, home, tmp_path):
    from dact_lib.tuning.pbt import EXPLORED
    from dact_lib.train import load_state_file
    from dact_lib.tuning.pbt_ray import STATE_FILE, STATE_KIND, run_pbt_ray

    tracker = Tracker(home)
    starts = tmp_path / "starts.jsonl"
    storage = tmp_path / "ray"
    res = run_pbt_ray(tiny_cfg(epochs=2), pbt=tiny_pbt(population=2, quantile=0.5), home=home, tracker=tracker,
                      synch=True, storage_path=str(storage), keep_ray_results=True,
                      callbacks=[RecordStarts(str(starts))])
    assert res.status == "finished" and len(res.members) == 2
    assert all(m["status"] == "finished" for m in res.members)
    parent = tracker.get_run(res.parent_run_id)
    assert parent["status"] == "finished" and parent["config"]["backend"] == "ray"
    events = tracker.get_events(res.parent_run_id)
    exploits = [e["payload"] for e in events if e["kind"] == "pbt_exploit"]
    explores = [e["payload"] for e in events if e["kind"] == "pbt_explore"]
    assert exploits and len(explores) == len(exploits)
    records = [json.loads(line) for line in starts.read_text().splitlines()]
    restarted = [r for r in records if (r["restart"] or {}).get("how") == "exploit"]
    assert len(restarted) == len(exploits)  # every exploit restarted its recipient once
    for ex, xp in zip(exploits, explores):
        assert ex["recipient"] != ex["donor"] and ex["backend"] == "ray"
        rec = next(r for r in restarted if r["restart"]["donor_checkpoint"] == ex["donor_checkpoint"]
                   and r["member"] == ex["recipient"])
        # the donor's weights: the recipient's loop starts from exactly the donor checkpoint's model
        donor = load_state_file(Path(ex["donor_checkpoint"]) / STATE_FILE, STATE_KIND)
        assert int(donor["member"]) == ex["donor"]
        assert rec["weights"] == weights_hash(donor["model"])
        # at its own step, with the explored values in its optimizer (lr on the head group, encoder × ratio)
        assert rec["step"] == ex["step"] == rec["restart"]["step"]
        new = xp["new"]
        assert set(new) == set(EXPLORED) and xp["old"] == ex["new"]  # explore starts from the donor's values
        assert round(new["lr"], 12) in rec["initial_lr"]
        assert round(new["weight_decay"], 12) in rec["weight_decay"]
        for k, ch in xp["changes"].items():
            assert ch["new"] == pytest.approx(new[k])
    # the tracker: both members' runs with metrics (hp/lr from the exploit on), events on the recipient's run too
    members = tracker.list_runs(parent_id=res.parent_run_id)
    assert sorted(r["id"] for r in members) == sorted(m["run_id"] for m in res.members)
    for r in members:
        assert r["status"] == "finished" and r["kind"] == "pbt-member"
        m = tracker.get_metrics(r["id"])
        assert {"train_loss", "val_loss", "hp/lr"} <= set(m["name"])
        assert (Path(tracker.run_dir(r["id"])) / "model.safetensors").exists()
    rid = exploits[0]["recipient_run_id"]
    assert any(e["kind"] == "pbt_exploit" for e in tracker.get_events(rid))
    step0 = exploits[0]["step"]  # noqa: F841 (read by the query below as @step0)
    lr_after = tracker.get_metrics(rid).query("name == 'hp/lr' and step >= @step0")["value"]
    assert any(v == pytest.approx(explores[0]["new"]["lr"]) for v in lr_after)  # hp/lr shows the explored value

    # one record whatever the backend: a threaded run of the same config writes the same shapes (through the one
    # PopulationBook); Ray adds where it ran, the threaded engine its thread split
    from dact_lib.tuning.pbt import run_pbt

    threaded = run_pbt(tiny_cfg(epochs=2), pbt=tiny_pbt(), home=home, tracker=tracker)
    ray_shape, thread_shape = record_shapes(tracker, res), record_shapes(tracker, threaded)
    ray_only = {"summary": {"backend", "address", "ray"}, "start": {"backend", "address", "ray"},
                "exploit": {"backend", "donor_checkpoint"}, "explore": {"backend", "donor_checkpoint"},
                "member_summary": {"backend"}}
    thread_only = {"summary": {"threads"}}
    assert ray_shape.keys() == thread_shape.keys()
    for part in ray_shape:
        assert ray_shape[part] - ray_only.get(part, set()) == thread_shape[part] - thread_only.get(part, set()), part


def record_shapes(tracker, res) -> dict[str, set]:
    """The keys of every record a PBT run writes (what the pages and a resume read)."""
    parent = tracker.get_run(res.parent_run_id)
    events = tracker.get_events(res.parent_run_id)
    first = {}
    for e in events:
        first.setdefault(e["kind"], e["payload"])
    member = tracker.get_run(res.best_run_id)
    lineage: dict[str, set] = {}  # every member's schedule entries, by how they came about (init, exploit)
    for m in res.members:
        for e in tracker.get_run(m["run_id"])["summary"]["pbt_schedule"]:
            lineage.setdefault(f"lineage_{e['via']}", set()).update(e)
    return {**lineage, "summary": set(parent["summary"]), "members": set(parent["summary"]["members"][0]),
            "result_members": set(res.members[0]), "start": set(first["pbt_start"]),
            "start_members": set(first["pbt_start"]["members"][0]), "exploit": set(first["pbt_exploit"]),
            "explore": set(first["pbt_explore"]), "schedule": set(first["pbt_schedule"]),
            "winner_schedule": set(res.schedule[0]),
            "member_summary": {k for k in member["summary"] if k.startswith("pbt_")} | (
                {"backend"} if "backend" in member["summary"] else set()),
            "hp_metrics": {n for n in tracker.get_metrics(res.best_run_id)["name"] if n.startswith("hp/")}}


def test_pbt_cli_refuses_ray_flags_without_ray_backend(home, capsys):
    from dact_lib.cli import main

    rc = main(["pbt", "--home", str(home), "--encoder", "tiny", "--address", "auto"])
    assert rc != 0
    assert "--address only apply to PBT on Ray: add --backend ray" in capsys.readouterr().err
    rc = main(["pbt", "--home", str(home), "--backend", "ray", "--resume", "1"])
    assert rc != 0 and "cannot be resumed" in capsys.readouterr().err


def test_pb2_and_bad_settings_are_refused_clearly(home):
    _ray_or_skip()
    from dact_lib.tuning.pbt_ray import run_pbt_ray

    with pytest.raises(DactLabError, match="scheduler"):
        run_pbt_ray(tiny_cfg(), pbt=tiny_pbt(population=2), home=home, scheduler="hyperband")
    with pytest.raises(DactLabError, match="cpus_per_member"):
        run_pbt_ray(tiny_cfg(), pbt=tiny_pbt(population=2), home=home, cpus_per_member=0)


def test_the_one_pbt_engine_dispatches_on_the_backend_setting(home, monkeypatch):
    """The backend is a PBTConfig setting dispatched by the engine interface — the dashboard's job manager, which
    only knows engines.py, starts Ray PBT too; a Ray run is not resumed."""
    from dact_lib.config import ConfigError
    from dact_lib.engines import EngineContext, get_engine
    from dact_lib.errors import DactLabError
    from dact_lib.tuning import pbt_ray
    from dact_lib.tuning.pbt import PBTConfig

    calls = []
    monkeypatch.setattr(pbt_ray, "run_pbt_ray", lambda cfg, **kw: calls.append(kw) or "ray result")
    engine = get_engine("pbt")
    settings = engine.settings({"pbt": {"backend": "ray", "ray_scheduler": "pb2", "population": 2}})
    assert settings.backend == "ray" and settings.ray_scheduler == "pb2"
    tracker = Tracker(home)
    ctx = EngineContext(tracker=tracker, callbacks=[], run_id=7, resume=False)
    assert engine.run(tiny_cfg(), settings, ctx) == "ray result"
    assert calls[0]["scheduler"] == "pb2" and calls[0]["run_id"] == 7 and calls[0]["pbt"] is settings
    with pytest.raises(DactLabError, match="cannot be resumed"):
        engine.run(tiny_cfg(), settings, EngineContext(tracker=tracker, callbacks=[], run_id=7, resume=True))
    with pytest.raises(ConfigError, match="backend"):
        PBTConfig(backend="dask").validate()
    with pytest.raises(ConfigError, match="set backend 'ray' too"):
        PBTConfig(ray_scheduler="pb2").validate()


def test_a_ray_release_other_than_the_tested_one_is_refused(monkeypatch):
    _ray_or_skip()
    import ray

    from dact_lib.tuning.pbt_ray import require_ray

    monkeypatch.setattr(ray, "__version__", "2.70.0")
    with pytest.raises(DactLabError, match=r"tested with Ray 2\.60\.x and this is Ray 2\.70\.0"):
        require_ray()


# --- the scheduler's hooks into Ray ------------------------------------------------------------------------------


def test_only_the_private_ray_methods_without_a_public_hook_are_overridden_and_they_still_fit():
    """Ray has no public hook for the quantiles or for an exploit (the recipient keeps its member index and clock,
    the book records it): those two private methods are overridden, everything else goes through public hooks.
    A Ray release that renames them, changes their arguments or the per-trial state they read fails here."""
    _ray_or_skip()
    import inspect
    import types

    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2
    from ray.tune.schedulers.pbt import _PBTTrialState

    from dact_lib.tuning.pbt_ray import ray_classes

    mixin = ray_classes()["pbt"].__mro__[1]
    assert sorted(n for n in vars(mixin) if n.startswith("_") and not n.startswith("__")) == ["_exploit", "_quantiles"]
    assert str(inspect.signature(PopulationBasedTraining._quantiles)) == "(self) -> Tuple[List[ray.tune.experiment.trial.Trial], List[ray.tune.experiment.trial.Trial]]"
    assert list(inspect.signature(PopulationBasedTraining._exploit).parameters) == [
        "self", "tune_controller", "trial", "trial_to_clone"]
    assert "_quantiles" not in vars(PB2) and "_exploit" not in vars(PB2)  # PB2 uses the ones overridden
    for cls in (PopulationBasedTraining, PB2):
        assert "custom_explore_fn" in inspect.signature(cls.__init__).parameters
    state = _PBTTrialState(types.SimpleNamespace(experiment_tag="t"))
    for attr in ("last_score", "last_result", "last_checkpoint", "last_train_time", "last_perturbation_time"):
        assert hasattr(state, attr), attr
    assert "_trial_state" in vars(PopulationBasedTraining(metric="m", mode="max", custom_explore_fn=dict))


def test_the_explorer_applies_the_engines_rules_and_clips_pb2(home):
    _ray_or_skip()
    import random

    from dact_lib.tuning.pbt import explore
    from dact_lib.tuning.pbt_ray import EXPLORE_KEY, Explorer

    pbt = tiny_pbt(population=2)
    donor = {"member": 0, "lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.3, "warmup_ratio": 0.1}
    out = Explorer("pbt", pbt, random.Random(5))(dict(donor))
    want, changes = explore(donor, pbt.space, random.Random(5), resample_prob=pbt.resample_prob,
                            perturb_factors=pbt.perturb_factors)
    assert out == {**want, EXPLORE_KEY: changes}
    proposed = {**donor, "lr": 1.0, "dropout": 0.0}  # PB2's proposal outside the space: clipped
    out = Explorer("pb2", pbt, random.Random(5))(proposed)
    assert out["lr"] == pbt.space.bounds("lr")[1] and out["dropout"] == pbt.space.bounds("dropout")[0]
    assert out[EXPLORE_KEY]["lr"] == {"how": "pb2", "factor": None, "clipped": True, "new": out["lr"]}
    assert out[EXPLORE_KEY]["weight_decay"]["clipped"] is False


class FakeTrial:
    """What Ray's PBT reads and writes of a trial in an exploit."""

    def __init__(self, member: int, path: Path):
        path.mkdir(parents=True, exist_ok=True)  # Ray logs the exploit's policy there
        self.config = {"member": member}
        self.evaluated_params: dict = {}
        self.experiment_tag = self.trial_id = f"member{member}"
        self.status = "RUNNING"
        self.path = self.local_experiment_path = self.local_dir = str(path)
        self.last_result: dict = {}
        self.run_metadata = types_ns(checkpoint_manager=types_ns(checkpoint_config=types_ns(num_to_keep=None)))

    def set_config(self, config):
        self.config = config

    def set_experiment_tag(self, tag):
        self.experiment_tag = tag

    def is_finished(self):
        return False


def types_ns(**kw):
    import types

    return types.SimpleNamespace(**kw)


def test_an_exploit_keeps_the_recipients_identity_and_clock_and_is_recorded(home, tmp_path):
    """The scheduler's exploit on two fake trials (no Ray runtime): the recipient is paused and given the donor's
    checkpoint by Ray, but keeps its member index, its clock and a pointer to its own checkpoint, trains on with the
    explored values, and the book holds the exploit / explore record of the threaded engine."""
    _ray_or_skip()
    import random

    from dact_lib.tuning.pbt import draw_population
    from dact_lib.tuning.pbt_ray import EXPLORE_KEY, RayBook, make_scheduler

    pbt = tiny_pbt(population=2, quantile=0.5)
    pop = draw_population(tiny_cfg(), pbt)
    tracker = Tracker(home)
    parent = tracker.create_run("pbt", {}, status="running")
    ids = [tracker.create_run("pbt-member", {}, parent_id=parent) for _ in range(2)]
    book = RayBook(tracker, parent, pbt.metric, pop.members(ids, train_size=96))
    sched = make_scheduler("pbt", pbt, book=book, initial=pop.hp, rng=random.Random(1))
    paused = []
    controller = types_ns(search_alg=None, pause_trial=lambda t, should_checkpoint: paused.append(t),
                          get_trials=lambda: trials)
    trials = [FakeTrial(i, tmp_path / f"t{i}") for i in range(2)]
    for t in trials:
        sched.on_trial_add(controller, t)
    donor, rec = trials
    assert {k: rec.config[k] for k in pop.hp[1]} == pop.hp[1]  # the drawn values, not Ray's
    states = sched._trial_state
    results = [{"step": 6, "epoch": 1, "progress": 1.0, "total_steps": 12, "val_loss": 0.4,
                "checkpoint_dir_name": "checkpoint_000002"},
               {"step": 4, "epoch": 1, "progress": 1.0, "total_steps": 8, "val_loss": 0.9,
                "checkpoint_dir_name": "checkpoint_000001"}]
    for t, res, clock in ((donor, results[0], 3), (rec, results[1], 2)):
        st = states[t]
        st.last_result, st.last_score, st.last_train_time, st.last_perturbation_time = res, -res["val_loss"], clock, clock
    states[donor].last_checkpoint = types_ns(path="/ray/donor/checkpoint_000002")

    assert sched._quantiles() == ([rec], [donor])
    sched._exploit(controller, rec, donor)

    assert paused == [rec] and (states[rec].last_train_time, states[rec].last_perturbation_time) == (2, 2)
    (xp,) = [e["payload"] for e in tracker.get_events(parent, kinds=["pbt_explore"])]
    (ex,) = [e["payload"] for e in tracker.get_events(parent, kinds=["pbt_exploit"])]
    assert rec.config == {"member": 1, **xp["new"], "pbt_restart": {
        "own_checkpoint": f"{tmp_path / 't1'}/checkpoint_000001", "step": 4, "donor": 0}}
    assert EXPLORE_KEY not in rec.config and donor.config["member"] == 0
    assert ex["old"] == pop.hp[1] and ex["new"] == xp["old"] == pop.hp[0] and xp["recipient_old"] == pop.hp[1]
    assert all(c["old"] == pop.hp[0][k] and c["new"] == xp["new"][k] for k, c in xp["changes"].items())
    assert (ex["recipient"], ex["donor"], ex["step"], ex["donor_step"], ex["score"], ex["donor_score"]) == (
        1, 0, 4, 6, 0.9, 0.4)
    assert ex["backend"] == "ray" and ex["donor_checkpoint"] == "/ray/donor/checkpoint_000002"
    assert book.members[1].hp == xp["new"] and book.members[1].schedule[-1]["via"] == "exploit"
    assert [e["payload"]["recipient"] for e in tracker.get_events(ids[1], kinds=["pbt_exploit"])] == [1]

    results[1]["step"] = results[1]["total_steps"]  # at its last ready point: nothing left to train after a copy
    assert sched._quantiles() == ([], [donor])
