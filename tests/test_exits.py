"""Tests of dact_lib.exits: per-sample exit layers of a trained DACT run, the run-folder cache, filtering."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from dact_lib import exits
from dact_lib.config import default_config
from dact_lib.data import encode
from dact_lib.errors import DactLabError
from dact_lib.evaluate import evaluate_encoded
from dact_lib.models import load_model
from dact_lib.tracker import Tracker
from dact_lib.train import load_split, train


@pytest.fixture(scope="module")
def dact_run(tmp_path_factory):
    h = tmp_path_factory.mktemp("exits") / "home"
    h.mkdir()
    cfg = default_config("dact", encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs = 120, 32, 1
    tr = Tracker(h)
    res = train(cfg, tracker=tr, home=h)
    return h, res.run_id, cfg, tr


def test_per_sample_exits_matches_the_run(dact_run):
    h, rid, cfg, tr = dact_run
    df = exits.per_sample_exits(rid, home=h, use_cache=False)
    assert list(df.columns) == exits.COLUMNS
    split, _ = load_split(cfg, None, None)
    assert list(df["text"]) == list(split.test.texts)  # the run's own test split, in order
    n_layers = df.attrs["num_layers"]
    assert df.attrs["split"] == "test" and n_layers == 2
    assert df["exit_layer"].between(1, n_layers).all()  # 1-based
    assert df["confidence"].between(0, 1).all()
    assert (df["correct"] == (df["true_label"] == df["pred_label"])).all()
    test = tr.get_run(rid)["summary"]["test"]
    assert df["correct"].mean() == pytest.approx(test["test_accuracy"])
    assert df["exit_layer"].mean() == pytest.approx(test["test_avg_exit_layer"])


def test_online_exits_equal_the_offline_dact_rule(dact_run):
    h, rid, cfg, _ = dact_run
    loaded = load_model(rid, h, device="cpu")
    df = exits.per_sample_exits(loaded, home=h, use_cache=False)
    split, _ = load_split(cfg, None, None)
    res = evaluate_encoded(loaded.model, encode(split.test, loaded.tokenizer, cfg.data.max_seq_len))
    np.testing.assert_array_equal(df["exit_layer"].to_numpy(), res.exit_layer)


def test_cache_is_used_and_invalidated_by_a_new_model(dact_run, monkeypatch):
    h, rid, _, _ = dact_run
    first = exits.per_sample_exits(rid, home=h)
    run_dir = h / "runs" / str(rid)
    assert (run_dir / "exits_test.json").is_file()
    calls = []
    real = exits.compute_exits
    monkeypatch.setattr(exits, "compute_exits", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = exits.per_sample_exits(rid, home=h)
    assert not calls and again.equals(first) and again.attrs["num_layers"] == first.attrs["num_layers"]
    model = run_dir / "model.safetensors"
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "retrained"
    exits.per_sample_exits(rid, home=h)
    assert calls == [1]


def test_val_split_and_bad_split(dact_run):
    h, rid, _, _ = dact_run
    df = exits.per_sample_exits(rid, split="val", home=h)
    assert df.attrs["split"] == "val" and len(df) == 12
    with pytest.raises(DactLabError, match="split"):
        exits.per_sample_exits(rid, split="dev", home=h)


def test_non_dact_run_is_refused(dact_run):
    h, rid, _, _ = dact_run
    loaded = load_model(rid, h, device="cpu")
    other = copy.copy(loaded)
    other.config = copy.deepcopy(loaded.config)
    other.config.kind = "backbone"
    with pytest.raises(DactLabError, match="DACT run"):
        exits.compute_exits(other, load_split(loaded.config, None, None)[0].test)


def test_filter_exits():
    import pandas as pd

    df = pd.DataFrame({"row": range(4), "text": ["Good food", "bad GAME", "fine", "good game"],
                       "true_label": list("abab"), "pred_label": list("abba"), "correct": [True, True, False, False],
                       "exit_layer": [1, 6, 6, 3], "confidence": [0.9, 0.5, 0.4, 0.6]})
    assert list(exits.filter_exits(df, (6, 6))["row"]) == [1, 2]
    assert list(exits.filter_exits(df, (1, 6), "incorrect")["row"]) == [2, 3]
    assert list(exits.filter_exits(df, None, "correct", "game")["row"]) == [1]
    assert list(exits.filter_exits(df, (2, 6), "all", "GOOD")["row"]) == [3]
