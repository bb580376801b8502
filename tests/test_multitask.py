"""Seed 003's multi-task training entry point."""
from __future__ import annotations

import pytest
import torch

from dact_lib.config import default_config
from dact_lib.errors import ConfigError, DataError
from dact_lib.tracker import Tracker
from dact_lib.multitask import parse_task_weights, train_multitask


def tiny_cfg(epochs=2, **model_kw):
    cfg = default_config("multitask", encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.epochs = epochs
    cfg.train.batch_size = 16
    cfg.train.device = "cpu"
    for k, v in model_kw.items():
        setattr(cfg.model, k, v)
    return cfg.validate()


def test_demo_dataset_end_to_end_with_per_task_curves(home):
    tracker = Tracker(home)
    res = train_multitask(tiny_cfg(), home=home, tracker=tracker)
    run = tracker.get_run(res.run_id)
    assert run["kind"] == "multitask" and run["status"] == "finished" and run["dataset_id"] is not None
    train_cfg = run["config"]["train"]  # the measured defaults (bench/multitask_defaults.py)
    assert (train_cfg["encoder_lr"], train_cfg["head_lr"], train_cfg["early_stopping"]["patience"]) == (5e-5, 1e-3, 2)
    names = set(tracker.get_metrics(res.run_id)["name"])
    for task in ("class_label", "sentiment_label"):
        assert {f"val_loss/{task}", f"val_accuracy/{task}", f"val_macro_f1/{task}"} <= names
        assert f"test_accuracy/{task}" in res.test_metrics
    per_epoch = tracker.get_metrics(res.run_id, names=["val_loss/class_label"])
    assert per_epoch["step"].nunique() == 2  # one point per epoch: a curve
    assert res.best_epoch in (1, 2) and res.best_metrics["val_loss"] == min(h["val_loss"] for h in res.history)
    assert (res.run_dir / "model.safetensors").exists()
    assert set(res.label_maps) == {"class_label", "sentiment_label"}


def test_single_task_csv_is_refused_clearly(home, tmp_path):
    csv = tmp_path / "single.csv"
    rows = [f"sentence number {i} is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = tiny_cfg()
    cfg.data.path = str(csv)
    tracker = Tracker(home)
    with pytest.raises(DataError, match="two-task CSV.*sentence,class_label,sentiment_label"):
        train_multitask(cfg, home=home, tracker=tracker)
    assert tracker.list_runs() == [] and tracker.list_datasets() == []  # nothing recorded


def test_wrong_kind_and_unknown_task_weight(home):
    with pytest.raises(ConfigError, match="multitask"):
        train_multitask(default_config("backbone", encoder="tiny"), home=home)
    with pytest.raises(ConfigError, match="topic"):
        train_multitask(tiny_cfg(task_weights={"topic": 1.0}), home=home)
    assert Tracker(home).list_runs() == []


@pytest.mark.parametrize("pooling, normalize", [("cls", True), ("mean", False)])
def test_pooling_normalize_and_weights_reach_the_model(home, pooling, normalize):
    weights = {"class_label": 1.0, "sentiment_label": 0.5}
    res = train_multitask(tiny_cfg(epochs=1, pooling=pooling, normalize=normalize, task_weights=weights), home=home)
    model = res.model
    assert model.cfg.pooling == pooling and model.cfg.normalize is normalize and model.task_weights == weights
    seen = []
    hook = model.heads["class_label"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    tok = res.tokenizer(["the soup was cold", "great service"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        hidden = model.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        model(tok["input_ids"], tok["attention_mask"])
    hook.remove()
    from dact_lib.heads import pool

    expected = pool(hidden, tok["attention_mask"], pooling)
    if normalize:
        expected = torch.nn.functional.normalize(expected, dim=-1)
        assert torch.allclose(seen[0].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(seen[0], expected, atol=1e-5)
    saved = Tracker(home).get_run(res.run_id)["config"]["model"]
    assert (saved["pooling"], saved["normalize"], saved["task_weights"]) == (pooling, normalize, weights)


def test_parse_task_weights():
    assert parse_task_weights("class_label=1, sentiment_label=0.5") == {"class_label": 1.0, "sentiment_label": 0.5}
    for bad in ("class_label", "=1", "class_label=x", "", "a=-1"):
        with pytest.raises(ConfigError):
            parse_task_weights(bad)


def test_balanced_class_weighting_weights_each_class_by_its_inverse_frequency():
    """w_k = n / (K · n_k) on the training counts (clipped to [0.1, 10]); the loss is the weighted mean of the
    per-row cross-entropies; unweighted by default, and the weights are not saved with the model."""
    from dact_lib.config import MultiTaskModelConfig
    from dact_lib.encoders import load_encoder
    from dact_lib.modeling_multitask import MultiTaskModel

    enc, _ = load_encoder("tiny")
    maps = {"class_label": ["a", "b", "c"], "sentiment_label": ["neg", "pos"]}
    model = MultiTaskModel(enc, MultiTaskModelConfig(class_weighting="balanced"), maps).eval()
    ids = torch.randint(5, 100, (4, 7))
    mask = torch.ones_like(ids)
    y = {"class_label": torch.tensor([0, 0, 1, 2]), "sentiment_label": torch.tensor([0, 1, 1, 1])}
    plain = model(ids, mask, y)
    model.set_class_counts({"class_label": [6, 3, 1], "sentiment_label": [1000, 1]})
    torch.testing.assert_close(model.class_weight_class_label, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    torch.testing.assert_close(model.class_weight_sentiment_label, torch.tensor([0.5005, 10.0]))  # 500.5 → 10
    out = model(ids, mask, y)
    logp = torch.log(plain.probs["class_label"])
    w = torch.tensor([10 / 18, 10 / 18, 10 / 9, 10 / 3])
    per_row = -logp[torch.arange(4), y["class_label"]]
    torch.testing.assert_close(out.task_losses["class_label"], (w * per_row).sum() / w.sum())
    torch.testing.assert_close(plain.task_losses["class_label"], per_row.mean())
    assert not any("class_weight" in k for k in model.state_dict())
