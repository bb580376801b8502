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
    assert main(["predict", "--run", str(run_id), "--json", "--home", str(home), "--verbosity", "0",
                 "a gorgeous, witty, moving film"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"label", "probability", "probabilities", "exit_layer"}
    assert res["label"] in ("negative", "positive")
    assert 1 <= res["exit_layer"] <= 6
    assert abs(sum(res["probabilities"].values()) - 1) < 1e-4


def test_backbone_on_demo_data_learns_with_bundled_encoder(home, capsys):
    code = main(["train", "--kind", "backbone", "--epochs", "2", "--home", str(home), "--verbosity", "0",
                 "--device", "cpu"])
    assert code == 0
    run_id = last_run_id(capsys.readouterr().out)
    summary = Tracker(home).get_run(run_id)["summary"]
    # 3 balanced topics: chance is 0.33; the pretrained encoder separates sports/technology/food easily
    assert summary["best"]["val_accuracy"] >= 0.8
