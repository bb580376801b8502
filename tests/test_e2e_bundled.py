"""End to end with the real bundled encoder (all-MiniLM-L6-v2): the CLI trains, records and predicts."""
from __future__ import annotations

import json

import pytest

from dact_lib.cli import main
from dact_lib.tracker import Tracker

pytestmark = pytest.mark.slow


def last_run_id(out: str) -> int:
    line = out.strip().splitlines()[-1]
    assert line.startswith("run id: "), out
    return int(line.split(": ")[1])


def test_cli_dact_on_sst2_with_bundled_encoder(home, shared_data, capsys):
    code = main(["train", "--kind", "dact", "--data", str(shared_data / "sst2" / "train.csv"), "--max-rows", "400",
                 "--epochs", "1", "--home", str(home), "--verbosity", "0", "--device", "cpu", "--tag", "e2e"])
    assert code == 0
    run_id = last_run_id(capsys.readouterr().out)
    tracker = Tracker(home)
    run = tracker.get_run(run_id)
    assert run["status"] == "finished" and run["tag"] == "e2e"
    assert run["config"]["encoder"] == "all-MiniLM-L6-v2"
    metrics = tracker.get_metrics(run_id)
    assert {"train_loss", "val_accuracy", "val_avg_exit_layer"} <= set(metrics["name"])
    assert main(["predict", "--run", str(run_id), "--json", "--trace", "--home", str(home), "--verbosity", "0",
                 "a gorgeous, witty, moving film"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"label", "probability", "probabilities", "exit_layer", "layers"}
    assert res["label"] in ("negative", "positive")
    assert 1 <= res["exit_layer"] <= 6
    assert [layer["layer"] for layer in res["layers"]] == list(range(1, res["exit_layer"] + 1))  # the trace to the exit
    assert abs(sum(res["probabilities"].values()) - 1) < 1e-4


def test_backbone_on_demo_data_learns_with_bundled_encoder(home, capsys):
    code = main(["train", "--kind", "backbone", "--epochs", "2", "--home", str(home), "--verbosity", "0",
                 "--device", "cpu"])
    assert code == 0
    run_id = last_run_id(capsys.readouterr().out)
    summary = Tracker(home).get_run(run_id)["summary"]
    # 3 balanced topics: chance is 0.33; the pretrained encoder separates sports/technology/food easily
    assert summary["best"]["val_accuracy"] >= 0.8


def test_staged_dact_pipeline_with_bundled_encoder(home):
    """The engine on the real encoder: stage 1 on its cached per-layer features, stages 2-3 and the final run
    train it; every stage's study loads back from the home's storage."""
    import optuna

    from dact_lib.config import default_config
    from dact_lib.home import optuna_storage_url
    from dact_lib.tuning.dact_pipeline import PipelineConfig, run_pipeline

    cfg = default_config("dact")
    cfg.data.max_rows = 150
    cfg.data.max_seq_len = 32
    cfg.train.device = "cpu"
    cfg.train.batch_size = 32
    cfg.validate()
    pipe = PipelineConfig(name="bundled", trials_stage1=2, trials_stage2=1, trials_stage3=2, stage1_epochs=3,
                          epochs_range=(1, 1), batch_sizes=(32,), sweep_timed=False).validate()
    res = run_pipeline(cfg, pipeline=pipe, home=home)
    tracker = Tracker(home)
    final = tracker.get_run(res.final_run_id)
    assert res.status == "finished" and final["status"] == "finished" and final["config"]["encoder"] == cfg.encoder
    assert res.feature_cache and tracker.get_events(res.parent_run_id, kinds=["stage1_features"])
    for stage, name in res.study_names.items():
        study = optuna.load_study(study_name=name, storage=optuna_storage_url(home))
        assert study.trials, stage
    assert res.pareto and 1.0 <= res.chosen.val_avg_exit_layer <= 6.0
    sweep = {r["policy"] for r in res.exit_policy_sweep}
    assert sweep == {"dact", "patience", "entropy", "fixed"}
