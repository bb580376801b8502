"""Tests of dact_lib.exits: per-sample exit layers of a trained DACT run, the run-folder cache, filtering."""
from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dact_lib import dact, exits
from dact_lib.config import default_config
from dact_lib.data import encode, iter_batches
from dact_lib.errors import DactLabError
from dact_lib.evaluate import evaluate_encoded
from dact_lib.models import build_model, load_model
from dact_lib.tracker import Tracker
from dact_lib.train import load_split, train


MAX = list(dact.CONFIDENCE_FEATURES).index("max")  # the halting units read the confidence features of y_n


@torch.no_grad()
def layer1_confidence(model, ds, tokenizer, max_seq_len) -> np.ndarray:
    """max_k y_1[k] per row of ``ds`` (file order): the layer-1 classifier's confidence, in eval mode."""
    model.eval()
    enc = encode(ds, tokenizer, max_seq_len)
    out = np.zeros(len(enc))
    for batch in iter_batches(enc, 64, shuffle=False):
        y = model(batch["input_ids"], batch["attention_mask"]).extras["y"]
        out[batch["index"].numpy()] = y[:, 0].max(-1).values.double().numpy()
    return out


@pytest.fixture(scope="module")
def dact_run(tmp_path_factory):
    """A trained 2-layer DACT run whose rows exit at layer 1 or 2, known in advance.

    Everything that decides the exit is frozen: the embeddings and encoder layer 1 (``freeze_layers = 1``), the
    layer-1 classifier, and the halting units, set by hand (one Linear each, ``fit_halting`` off):
    h_1 = sigmoid(S · (τ − max y_1)). At n = 1 (d = N − n = 1, a_1 = y_1, p_1 = h_1) the rule halts iff
    best · (1 − p_1) > runner-up + p_1: for max y_1 > τ, h_1 ≈ 0 and it halts (exit 1); for max y_1 < τ, h_1 ≈ 1
    and it goes on (exit 2, the last layer always halts). τ splits the test rows' confidences at a wide gap, and S
    makes h_1 ≈ 0 or ≈ 1 for every test and validation row. Encoder layer 2 and its classifier still train."""
    h = tmp_path_factory.mktemp("exits") / "home"
    h.mkdir()
    cfg = default_config("dact", encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs = 120, 32, 1
    cfg.train.freeze_layers = 1
    cfg.model.fit_halting = False
    cfg.model.exit_refit_epochs = 0  # the refit after training would retrain the frozen layer-1 classifier
    cfg.model.halting.hidden_dims = []
    cfg.validate()
    split, _ = load_split(cfg, None, None)
    model, tok = build_model(cfg, split.train.label_maps, h)
    conf = {name: layer1_confidence(model, getattr(split, name), tok, 32) for name in ("test", "val")}
    # τ: the midpoint of the widest gap between neighbouring test confidences in the middle half of the rows
    srt = np.sort(conf["test"])
    n = len(srt)
    k = max(range(n // 4, n - n // 4), key=lambda i: srt[i] - srt[i - 1])
    tau = float(srt[k - 1] + srt[k]) / 2
    margin = float(np.abs(np.concatenate(list(conf.values())) - tau).min())
    assert margin > 1e-4, "no row may sit at the threshold"
    sharp = 60.0 / margin
    with torch.no_grad():
        for unit in model.halters:
            assert len(unit) == 2  # Dropout, Linear: no hidden layer
            unit[-1].weight.zero_()
            unit[-1].bias.zero_()
        model.halters[0][-1].weight[0, MAX] = -sharp
        model.halters[0][-1].bias[0] = sharp * tau
    for p in list(model.halters.parameters()) + list(model.classifiers[0].parameters()):
        p.requires_grad_(False)
    expected = {name: np.where(c > tau, 1, 2) for name, c in conf.items()}
    assert set(expected["test"]) == {1, 2}  # a real mix of early and late exits
    tr = Tracker(h)
    res = train(cfg, tracker=tr, home=h, model=model, tokenizer=tok)
    return SimpleNamespace(home=h, run_id=res.run_id, cfg=cfg, tracker=tr, tau=tau, expected=expected, conf=conf)


def test_per_sample_exits_matches_the_run(dact_run):
    h, rid, cfg, tr, expected, conf = (dact_run.home, dact_run.run_id, dact_run.cfg, dact_run.tracker,
                                       dact_run.expected, dact_run.conf)
    df = exits.per_sample_exits(rid, home=h, use_cache=False)
    assert list(df.columns) == exits.COLUMNS
    split, _ = load_split(cfg, None, None)
    assert list(df["text"]) == list(split.test.texts)  # the run's own test split, in order
    assert df.attrs["split"] == "test" and df.attrs["num_layers"] == 2
    np.testing.assert_array_equal(df["exit_layer"].to_numpy(), expected["test"])  # 1-based, row by row
    # a row that exits at layer 1 answers a_1 = y_1: its confidence is the layer-1 classifier's
    early = df["exit_layer"].to_numpy() == 1
    np.testing.assert_allclose(df["confidence"].to_numpy()[early], conf["test"][early], atol=1e-5)
    assert df["confidence"].between(0, 1).all()
    assert (df["correct"] == (df["true_label"] == df["pred_label"])).all()
    test = tr.get_run(rid)["summary"]["test"]
    assert df["correct"].mean() == pytest.approx(test["test_accuracy"])
    assert df["exit_layer"].mean() == pytest.approx(test["test_avg_exit_layer"])
    assert test["test_avg_exit_layer"] == pytest.approx(expected["test"].mean())


def test_online_exits_equal_the_offline_dact_rule(dact_run):
    h, rid, cfg, expected = dact_run.home, dact_run.run_id, dact_run.cfg, dact_run.expected
    loaded = load_model(rid, h, device="cpu")
    df = exits.per_sample_exits(loaded, home=h, use_cache=False)  # online: DactBert.infer, halted rows dropped
    split, _ = load_split(cfg, None, None)
    res = evaluate_encoded(loaded.model, encode(split.test, loaded.tokenizer, cfg.data.max_seq_len))  # offline
    np.testing.assert_array_equal(df["exit_layer"].to_numpy(), res.exit_layer)
    np.testing.assert_array_equal(res.exit_layer, expected["test"])
    # the answers agree too: the online answer at the exit is the offline a_n of that layer
    names = loaded.label_maps[loaded.model.task]
    assert list(df["pred_label"]) == [names[i] for i in res.probs[loaded.model.task].argmax(-1)]


def test_cache_is_used_and_invalidated_by_a_new_model(dact_run, monkeypatch):
    h, rid = dact_run.home, dact_run.run_id
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
    h, rid, expected = dact_run.home, dact_run.run_id, dact_run.expected
    df = exits.per_sample_exits(rid, split="val", home=h)
    assert df.attrs["split"] == "val" and len(df) == 12
    np.testing.assert_array_equal(df["exit_layer"].to_numpy(), expected["val"])
    with pytest.raises(DactLabError, match="split"):
        exits.per_sample_exits(rid, split="dev", home=h)


def test_non_dact_run_is_refused(dact_run):
    h, rid = dact_run.home, dact_run.run_id
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
