"""The Python API for notebooks (issue 26, item 4): ``dact_lib.train(data, kind=..., **overrides)``,
``dact_lib.load(run)``, a light ``import dact_lib``, and examples/quickstart.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import dact_lib
from dact_lib.api import apply_overrides, setting_keys
from dact_lib.config import ConfigError, RunConfig, default_config
from dact_lib.errors import DataError
from dact_lib.tracker import Tracker

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(encoder="tiny", max_rows=120, epochs=1, device="cpu", max_seq_len=32)


def test_import_is_light_and_the_names_resolve():
    code = ("import sys, time; t = time.perf_counter(); import dact_lib; dt = time.perf_counter() - t; "
            "print(sorted(m for m in ('torch', 'pandas', 'transformers', 'numpy') if m in sys.modules), dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    heavy, seconds = out.stdout.rsplit(" ", 1)
    assert heavy == "[]" and float(seconds) < 0.5
    for name in dact_lib.__all__:
        assert getattr(dact_lib, name) is not None, name
    assert dact_lib.RunConfig is RunConfig and dact_lib.default_config is default_config
    # dact_lib.train is the training-loop module (its functions, monkeypatch targets) and callable as the API
    from dact_lib.train import train as loop

    assert callable(dact_lib.train) and dact_lib.train.train is loop


def test_overrides_bare_dotted_and_nested_are_the_same_config():
    base = default_config("dact")
    bare = apply_overrides(base, {"epochs": 2, "max_rows": 100, "ponder_lambda": 0.02, "encoder": "tiny"})
    dotted = apply_overrides(base, {"train.epochs": 2, "data.max_rows": 100, "model.ponder_lambda": 0.02,
                                    "encoder": "tiny"})
    nested = apply_overrides(base, {"train": {"epochs": 2}, "data": {"max_rows": 100},
                                    "model": {"ponder_lambda": 0.02}, "encoder": "tiny"})
    assert bare.to_dict() == dotted.to_dict() == nested.to_dict()
    assert (bare.train.epochs, bare.data.max_rows, bare.model.ponder_lambda, bare.encoder) == (2, 100, 0.02, "tiny")
    assert base.train.epochs == 3  # the starting config is not changed
    deep = apply_overrides(base, {"train": {"early_stopping": {"patience": 1}}, "columns": {"text": "review"}})
    assert deep.train.early_stopping.patience == 1 and deep.data.columns == {"text": "review"}
    assert apply_overrides(base, {"early_stopping": {"min_delta": 0.5}}).train.early_stopping.min_delta == 0.5
    assert apply_overrides(base, {"train.early_stopping.patience": 4}).train.early_stopping.patience == 4
    assert setting_keys("dact")["epochs"] == "train.epochs" and "ponder_lambda" not in setting_keys("backbone")


def test_an_unknown_or_bad_setting_is_refused_with_the_valid_keys():
    base = default_config("backbone")
    with pytest.raises(ConfigError) as info:
        apply_overrides(base, {"epoch": 2})
    msg = str(info.value)
    assert msg.startswith("Unknown setting 'epoch' for a backbone run. Did you mean 'epochs'? Valid keys: ")
    valid = msg.split("Valid keys: ", 1)[1].split("; dotted: ")[0].split(", ")
    assert {"epochs", "max_rows", "encoder", "batch_size", "pooling", "columns"} <= set(valid)
    assert "ponder_lambda" not in valid  # a DACT setting is no key of a backbone run
    assert "train.early_stopping.patience" in msg.split("; dotted: ", 1)[1]
    assert msg.endswith("Give a setting bare (epochs=2), dotted (**{'train.epochs': 2}) or nested "
                        "(train={'epochs': 2}).")
    with pytest.raises(ConfigError, match=r"Unknown setting 'train.epoch' .* Did you mean 'train.epochs'\?"):
        apply_overrides(base, {"train": {"epoch": 2}})
    with pytest.raises(ConfigError, match=r"Unknown setting 'ponder_lambda' for a backbone run"):
        dact_lib.train(None, kind="backbone", ponder_lambda=0.1, track=False)
    with pytest.raises(ConfigError, match=r"train.epochs"):  # the config's own type check names the field
        apply_overrides(base, {"epochs": "two"})


def test_a_dataframe_run_is_recorded_in_the_home_and_loads_back(home):
    df = dact_lib.load_demo_dataset().to_frame()
    run = dact_lib.train(df, kind="dact", home=home, tag="notebook", **TINY)
    assert run.status == "finished" and run.kind == "dact" and run.run_dir == home / "runs" / str(run.run_id)
    assert {"val_accuracy", "test_accuracy", "test_avg_exit_layer"} <= set(run.metrics)
    tr = Tracker(home)  # the tracker the CLI and the dashboard read
    row = tr.get_run(run.run_id)
    assert row["status"] == "finished" and row["kind"] == "dact" and row["tag"] == "notebook"
    assert row["config"]["train"]["epochs"] == 1 and row["config"]["data"]["max_rows"] == 120
    (ds,) = tr.list_datasets()
    assert ds["rows"] == 120 and ds["tasks"] == ["class_label", "sentiment_label"]
    texts = ["the food was lovely", "a dull football match"]
    got = run.predict(texts)
    assert got == dact_lib.load(run.run_id, home=home).predict(texts) == dact_lib.load(run.run_dir).predict(texts)
    assert all(1 <= g["exit_layer"] <= 2 and "layers" not in g for g in got)
    assert [lay["layer"] for lay in run.predict(texts[0], trace=True)[0]["layers"]][0] == 1
    out = subprocess.run([sys.executable, "-m", "dact_lib", "runs", "--json", "--home", str(home)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert [r["id"] for r in json.loads(out.stdout)] == [run.run_id]


def test_track_false_records_nothing_and_a_file_path_works(home, tmp_path):
    path = tmp_path / "reviews.jsonl"
    dact_lib.load_demo_dataset().to_frame().to_json(path, orient="records", lines=True)
    run = dact_lib.train(path, kind="backbone", home=home, track=False, **TINY)
    assert run.run_id is None and run.run_dir.is_dir() and run.config.data.path == str(path)
    assert Tracker(home).list_runs() == [] and Tracker(home).list_datasets() == []
    assert run.predict("the soup was cold")[0]["label"] in {"food", "sports", "technology"}


def test_bad_data_is_refused_as_a_file_would_be(home, tmp_path):
    df = pd.DataFrame({"review": ["a", "b"], "stars": ["1", "2"]})
    path = tmp_path / "odd.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as from_frame:
        dact_lib.train(df, home=home, **TINY)
    with pytest.raises(DataError) as from_file:
        dact_lib.train(path, home=home, **TINY)
    assert str(from_frame.value) == str(from_file.value)
    assert str(from_frame.value).startswith("No text column found. The file's columns are 'review', 'stars'")
    with pytest.raises(dact_lib.DactLabError, match="Give the data once"):
        dact_lib.train(df, data=df, home=home)
    with pytest.raises(dact_lib.DactLabError, match="data = int: give a pandas DataFrame"):
        dact_lib.train(3, home=home)
    assert Tracker(home).list_runs() == []


@pytest.mark.slow
def test_the_quickstart_example_runs(home):
    """examples/quickstart.py as a user runs it: the bundled encoder, 200 demo rows, one epoch."""
    example = ROOT / "examples" / "quickstart.py"
    assert len(example.read_text().splitlines()) <= 25
    env = {**os.environ, "DACT_LAB_HOME": str(home)}
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, env=env, cwd=home,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if not line.startswith("[")]  # progress=True: [eval …]
    assert lines[0].startswith("run 1 (") and "test accuracy" in lines[0]
    assert len(lines) == 3 and all(" exit layer " in line for line in lines[1:])
    run = Tracker(home).get_run(1)
    assert run["status"] == "finished" and run["config"]["encoder"] == "all-MiniLM-L6-v2"
