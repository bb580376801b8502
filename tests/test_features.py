"""The per-layer feature cache (dact_lib/features.py): keys, miss then hit, shapes, values equal to the encoder."""
from __future__ import annotations

import pytest
import torch

from dact_lib.data import load_demo_dataset, read_csv
from dact_lib.encoders import load_encoder
from dact_lib.errors import ConfigError
from dact_lib.features import cached_features, cached_features_many, feature_key, feature_path, layer_features
from dact_lib.heads import pool


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private feature cache, so that hits and misses do not depend on other test sessions."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DACT_LAB_CACHE", str(path))
    return path


def small(rows=40, seed=0):
    demo = load_demo_dataset()
    return read_csv(demo.to_csv_bytes(), max_rows=rows, name="demo", seed=seed)


def test_miss_then_hit_same_tensor(cache, home):
    ds = small()
    first = cached_features("tiny", ds, poolings=("mean",), max_seq_len=32, home=home)["mean"]
    assert not first.cache_hit and first.build_s > 0
    assert first.path.is_file() and first.path.parent == cache / "features"
    assert first.path.name == f"{first.key}.safetensors"
    assert not [p for p in first.path.parent.iterdir() if p.suffix == ".tmp"]  # atomic write left no temp file
    second = cached_features("tiny", ds, poolings=("mean",), max_seq_len=32, home=home)["mean"]
    assert second.cache_hit and second.build_s == 0.0 and second.key == first.key
    assert torch.equal(first.features, second.features)
    assert torch.equal(layer_features("tiny", ds, pooling="mean", max_seq_len=32, home=home), first.features)
    info = second.info()
    assert info["cache_hit"] is True and info["rows"] == len(ds) and info["key"] == first.key


def test_shapes_and_values_equal_the_encoder(cache, home):
    ds = small(24)
    got = cached_features("tiny", ds, poolings=("cls", "mean"), max_seq_len=32, home=home, batch_size=8)
    model, tok = load_encoder("tiny", home, seed=0)
    n_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    for p in ("cls", "mean"):
        assert got[p].features.shape == (len(ds), n_layers, hidden) and got[p].features.dtype == torch.float32
    # reference: each sentence alone (no padding), straight through the HF model's hidden states
    with torch.no_grad():
        for i in (0, 5, 23):
            t = tok([ds.texts[i]], truncation=True, max_length=32, return_tensors="pt")
            states = model(t["input_ids"], t["attention_mask"], output_hidden_states=True).hidden_states
            for p in ("cls", "mean"):
                ref = torch.stack([pool(states[n + 1], t["attention_mask"], p)[0] for n in range(n_layers)])
                assert torch.allclose(got[p].features[i], ref, atol=1e-5), (i, p)
    assert not torch.allclose(got["cls"].features, got["mean"].features)


def test_key_changes_with_pooling_dataset_length_and_tiny_seed(home):
    a, b = small(40, seed=0), small(40, seed=1)
    assert a.to_csv_bytes() != b.to_csv_bytes()
    k = feature_key("tiny", a, pooling="mean", max_seq_len=32, home=home)
    assert k == feature_key("tiny", small(40, seed=0), pooling="mean", max_seq_len=32, home=home)  # content, not object
    assert k != feature_key("tiny", a, pooling="cls", max_seq_len=32, home=home)
    assert k != feature_key("tiny", b, pooling="mean", max_seq_len=32, home=home)
    assert k != feature_key("tiny", a, pooling="mean", max_seq_len=64, home=home)
    assert k != feature_key("tiny", a, pooling="mean", max_seq_len=32, home=home, seed=1)  # random tiny weights
    assert feature_path(k, home).name == f"{k}.safetensors"
    with pytest.raises(ConfigError, match="pooling"):
        feature_key("tiny", a, pooling="max", home=home)


def test_many_datasets_one_encoder_load_and_damaged_file_recomputed(cache, home):
    parts = {"train": small(30, seed=0), "val": small(12, seed=2)}
    got = cached_features_many("tiny", parts, poolings=("cls", "mean"), max_seq_len=32, home=home)
    assert {k: sorted(v) for k, v in got.items()} == {"train": ["cls", "mean"], "val": ["cls", "mean"]}
    assert got["val"]["mean"].features.shape[0] == 12
    path = got["train"]["cls"].path
    path.write_bytes(b"not a safetensors file")
    again = cached_features("tiny", parts["train"], poolings=("cls", "mean"), max_seq_len=32, home=home)
    assert not again["cls"].cache_hit and again["mean"].cache_hit
    assert torch.allclose(again["cls"].features, got["train"]["cls"].features, atol=1e-6)


def test_encoder_weights_of_a_backbone_run_enter_key_and_values(cache, home, tmp_path):
    from safetensors.torch import save_file

    ds = small(16)
    model, tok = load_encoder("tiny", home, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer = "encoder.layer.1.output.dense.bias"
    state[layer] += torch.linspace(-1.0, 1.0, state[layer].numel())  # a "fine-tuned" encoder (not a constant
    # shift: the LayerNorm after it would cancel that)
    weights = tmp_path / "encoder.safetensors"
    save_file(state, str(weights))
    plain = cached_features("tiny", ds, poolings=("mean",), max_seq_len=32, home=home)["mean"]
    tuned = cached_features("tiny", ds, poolings=("mean",), max_seq_len=32, home=home, encoder_weights=weights)["mean"]
    assert tuned.key != plain.key and not tuned.cache_hit
    assert torch.allclose(tuned.features[:, 0], plain.features[:, 0], atol=1e-6)  # layer 1 unchanged
    assert not torch.allclose(tuned.features[:, 1], plain.features[:, 1])
    model.load_state_dict(state)
    with torch.no_grad():
        t = tok([ds.texts[3]], truncation=True, max_length=32, return_tensors="pt")
        ref = pool(model(t["input_ids"], t["attention_mask"]).last_hidden_state, t["attention_mask"], "mean")[0]
    assert torch.allclose(tuned.features[3, 1], ref, atol=1e-5)
    with pytest.raises(ConfigError, match="do not exist"):
        feature_key("tiny", ds, pooling="mean", home=home, encoder_weights=tmp_path / "missing.safetensors")
