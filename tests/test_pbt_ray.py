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
    """Issue 25 (one PBT): the backend is a PBTConfig setting dispatched by the engine interface — the dashboard's
    job manager, which only knows engines.py, starts Ray PBT too; a Ray run is not resumed."""
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
