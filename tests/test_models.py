"""The three models, saving/loading a run, prediction, and the MLP head shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dact_lib import dact
from dact_lib.config import MLPConfig, default_config
from dact_lib.data import encode, iter_batches, load_demo_dataset
from dact_lib.encoders import tiny_encoder
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.heads import build_mlp, pool
from dact_lib.models import build_model, load_model, predict, save_model
from dact_lib.modeling_dact import DactBert


def test_mlp_layouts():
    assert MLPConfig(hidden_dims=[64, 16]).resolved_dims() == [64, 16]
    assert MLPConfig(layout="pyramidal", depth=3, width=256).resolved_dims() == [256, 128, 64]
    assert MLPConfig(layout="inverted", depth=3, width=256).resolved_dims() == [64, 128, 256]
    assert MLPConfig(layout="bowtie", depth=5, width=256).resolved_dims() == [256, 128, 64, 128, 256]
    mlp = build_mlp(10, 3, MLPConfig(hidden_dims=[8, 4], activation="tanh", dropout=0.2))
    linears = [m for m in mlp if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(10, 8), (8, 4), (4, 3)]
    assert any(isinstance(m, torch.nn.Tanh) for m in mlp)
    assert all(m.p == 0.2 for m in mlp if isinstance(m, torch.nn.Dropout))


def test_masked_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))


def tiny_dact(share=False, pooling="mean", layers=3):
    torch.manual_seed(0)  # the DACT units are initialised from the global RNG: same model whatever ran before
    cfg = default_config("dact", encoder="tiny")
    cfg.model.share_weights = share
    cfg.model.pooling = pooling
    enc, tok = tiny_encoder(num_layers=layers)
    model = DactBert(enc, cfg.model, num_classes=3).eval()
    return model, tok, cfg


def demo_batch(tok, n=12):
    enc = encode(load_demo_dataset().subset(list(range(n))), tok, 32)
    return next(iter_batches(enc, n))


def test_dact_units_per_layer_or_shared():
    m, _, _ = tiny_dact(share=False)
    assert len(m.classifiers) == 3 and len(m.halters) == 3
    m, _, _ = tiny_dact(share=True)
    assert len(m.classifiers) == 1 and len(m.halters) == 1


def test_dact_forward_matches_maths_and_infer_matches_offline_rule():
    model, tok, _ = tiny_dact()
    with torch.no_grad():  # make halting decisive for some samples so exits vary
        for h in model.halters:
            h[-1].bias.fill_(-3.0)
    b = demo_batch(tok)
    out = model(b["input_ids"], b["attention_mask"], {"label": b["targets"]["class_label"]})
    a, p = dact.accumulate(out.extras["y"], out.extras["h"])
    assert torch.allclose(out.probs["label"], a[:, -1], atol=1e-6)
    assert torch.allclose(out.probs["label"].sum(-1), torch.ones(12), atol=1e-5)
    inf = model.infer(b["input_ids"], b["attention_mask"])
    assert torch.equal(inf.exit_layer, out.extras["exit_layer"])
    assert inf.exit_layer.min() >= 1 and inf.exit_layer.max() <= 3
    offline = dact.run_policy_offline(dact.DactPolicy(), out.extras["y"], out.extras["h"])
    assert torch.allclose(inf.probs, offline.probs, atol=1e-5)


def test_dact_layer_loss_weight_adds_every_layers_nll():
    model, tok, cfg = tiny_dact()
    b = demo_batch(tok)
    t = {"label": b["targets"]["class_label"]}
    model.cfg.layer_loss_weight = 0.0  # the paper's loss (the library default is 1)
    spec = model(b["input_ids"], b["attention_mask"], t)
    assert "layer_nll" not in spec.extras
    model.cfg.layer_loss_weight = 0.7
    aux = model(b["input_ids"], b["attention_mask"], t)
    y, target = aux.extras["y"], t["label"]
    by_hand = -torch.log(y.gather(2, target.view(-1, 1, 1).expand(-1, 3, 1))).mean()
    assert torch.allclose(aux.extras["layer_nll"], by_hand, atol=1e-6)
    assert torch.allclose(aux.loss, spec.loss + 0.7 * by_hand, atol=1e-5)
    cfg.model.layer_loss_weight = -1.0
    with pytest.raises(ConfigError, match="layer_loss_weight"):
        cfg.validate()


def test_infer_really_skips_layers_for_halted_samples():
    model, tok, _ = tiny_dact()
    with torch.no_grad():
        for h in model.halters:
            # h_n ~ 1e-13: p_1 ~ 0, so every sample halts after layer 1 unless y_1's top two tie to ~1e-13 (with
            # a milder bias like -8 a near-uniform y_1 from a random tiny model can fail the rule's margin)
            h[-1].bias.fill_(-30.0)
    rows_seen = []
    hooks = [layer.register_forward_hook(lambda mod, inp, outp: rows_seen.append(inp[0].shape[0]))
             for layer in model.adapter.layers()]
    b = demo_batch(tok)
    inf = model.infer(b["input_ids"], b["attention_mask"])
    for hk in hooks:
        hk.remove()
    assert (inf.exit_layer == 1).all()
    assert rows_seen == [12]  # layers 2 and 3 never ran
    # other policies share the same skipping path
    rows_seen.clear()
    hooks = [layer.register_forward_hook(lambda mod, inp, outp: rows_seen.append(inp[0].shape[0]))
             for layer in model.adapter.layers()]
    model.infer(b["input_ids"], b["attention_mask"], dact.make_policy("fixed", 2))
    for hk in hooks:
        hk.remove()
    assert rows_seen == [12, 12]


class _LeadClassifier(nn.Module):
    """Layer-1 classifier whose confidence grows with the first feature's distance from ``c``: in one batch some
    samples are sure after layer 1 and others are not, so their DACT exits differ."""

    def __init__(self, c: float, k: float) -> None:
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        z = self.k * (x[:, 0] - self.c)
        return torch.stack([z, -z, torch.zeros_like(z)], -1)


def _mixed_exit_model():
    model, tok, cfg = tiny_dact()
    b = demo_batch(tok)
    with torch.no_grad():
        ad, am = model.adapter, b["attention_mask"]
        hid = ad.embed(b["input_ids"], am)
        s0 = pool(ad.run_layer(0, hid, ad.prepare_mask(am, hid.dtype)), am, "mean")[:, 0]
        for h in model.halters:  # h_n = sigmoid(-3) ~ 0.047 for every sample: the exit depends on y_n only
            h[-1].weight.zero_()
            h[-1].bias.fill_(-3.0)
    model.classifiers[0] = _LeadClassifier(float(s0.median()), 1.0 / float(s0.std()))
    return model, b, cfg


def test_infer_halts_per_sample_in_a_mixed_batch_and_drops_halted_rows():
    model, b, _ = _mixed_exit_model()
    out = model(b["input_ids"], b["attention_mask"])
    rows_seen = []
    hooks = [layer.register_forward_hook(lambda mod, inp, outp: rows_seen.append(inp[0].shape[0]))
             for layer in model.adapter.layers()]
    inf = model.infer(b["input_ids"], b["attention_mask"])
    for hk in hooks:
        hk.remove()
    exits = inf.exit_layer
    assert len(set(exits.tolist())) >= 2  # a batch whose samples halt at different layers (not all() per batch)
    assert torch.equal(exits, out.extras["exit_layer"])  # the rule from the full forward pass agrees
    # layer n ran only for the samples that had not halted before it
    assert rows_seen == [int((exits >= n).sum()) for n in range(1, 4) if int((exits >= n).sum())]
    # each answer is a_n at that sample's own exit layer, and does not depend on the rest of the batch
    a, _ = dact.accumulate(out.extras["y"], out.extras["h"])
    for i in range(len(exits)):
        assert torch.allclose(inf.probs[i], a[i, exits[i] - 1], atol=1e-5)
        n_i = int(b["attention_mask"][i].sum())
        alone = model.infer(b["input_ids"][i:i + 1, :n_i], b["attention_mask"][i:i + 1, :n_i])
        assert int(alone.exit_layer[0]) == int(exits[i])
        assert torch.allclose(alone.probs[0], inf.probs[i], atol=1e-4)
        assert torch.isnan(inf.h[i, exits[i]:]).all() and not torch.isnan(inf.h[i, :exits[i]]).any()


@pytest.mark.parametrize("start_at_one", [False, True])
def test_dact_model_loss_is_nll_of_log_a_N_plus_lambda_mean_sum_p(start_at_one):
    model, b, _ = _mixed_exit_model()
    model.cfg.ponder_lambda = 0.3
    model.cfg.ponder_start_at_one = start_at_one
    model.cfg.layer_loss_weight = 0.0  # exactly the spec's loss
    target = b["targets"]["class_label"]
    out = model(b["input_ids"], b["attention_mask"], {"label": target})
    y, h = out.extras["y"], out.extras["h"]
    # by hand from y_n and h_n: a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1}, p_n = h_n p_{n-1}
    a_n, p_prev, ps = torch.zeros_like(y[:, 0]), torch.ones(y.shape[0]), []
    for n in range(y.shape[1]):
        a_n = p_prev[:, None] * y[:, n] + (1 - p_prev[:, None]) * a_n
        p_prev = h[:, n] * p_prev
        ps.append(p_prev)
    nll = -torch.log(a_n[torch.arange(len(target)), target]).mean()
    rho = torch.stack(ps, 1).sum(1) + (1.0 if start_at_one else 0.0)  # sum of p_n, not of h_n
    assert torch.allclose(out.extras["nll"], nll, atol=1e-6)
    assert torch.allclose(out.loss, nll + 0.3 * rho.mean(), atol=1e-6)
    assert not torch.allclose(out.loss, nll + 0.3 * h.sum(1).mean(), atol=1e-4)  # mistake 3 would differ here


def test_backbone_and_multitask_shapes():
    ds = load_demo_dataset()
    cfg = default_config("multitask", encoder="tiny")
    cfg.model.normalize = True
    cfg.model.task_weights = {"class_label": 2.0, "sentiment_label": 0.5}
    model, tok = build_model(cfg, ds.label_maps)
    b = demo_batch(tok, 8)
    out = model(b["input_ids"], b["attention_mask"], b["targets"])
    assert set(out.probs) == {"class_label", "sentiment_label"}
    expected = 2.0 * out.task_losses["class_label"] + 0.5 * out.task_losses["sentiment_label"]
    assert torch.allclose(out.loss, expected)
    cfg.model.task_weights = {"topic": 1.0}
    with pytest.raises(ConfigError, match="topic"):
        build_model(cfg, ds.label_maps)
    bb = default_config("backbone", encoder="tiny")
    model, _ = build_model(bb, ds.label_maps)
    out = model(b["input_ids"], b["attention_mask"])
    assert out.probs["class_label"].shape == (8, 3)


def test_multitask_needs_two_tasks():
    cfg = default_config("multitask", encoder="tiny")
    with pytest.raises(ConfigError, match="two-task"):
        build_model(cfg, {"label": ["a", "b"]})


def test_save_load_predict_round_trip(home):
    ds = load_demo_dataset()
    cfg = default_config("dact", encoder="tiny")
    model, tok = build_model(cfg, ds.label_maps)
    model.eval()
    save_model(home / "r1", model, tok, cfg, ds.label_maps)
    loaded = load_model(home / "r1", device="cpu")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    res = predict(loaded, ["The striker scored twice in the final.", "This phone battery dies fast."])
    assert len(res) == 2
    for r in res:
        assert r["label"] in ds.label_maps["class_label"]
        assert 1 <= r["exit_layer"] <= 2
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert len(r["layers"]) == r["exit_layer"]
        assert r["probability"] == max(r["probabilities"].values())
    with pytest.raises(DactLabError, match="non-empty"):
        predict(loaded, ["  "])
    with pytest.raises(DactLabError, match="neither a run id .* nor a run folder"):
        load_model(home / "nope")


def test_init_from_backbone_run(home):
    ds = load_demo_dataset()
    bb = default_config("backbone", encoder="tiny")
    model, tok = build_model(bb, ds.label_maps)
    with torch.no_grad():
        model.encoder.encoder.layer[0].output.dense.weight.fill_(0.123)
    rd = home / "runs" / "7"
    rd.mkdir(parents=True)
    model.export_encoder(rd / "encoder.safetensors")
    dc = default_config("dact", encoder="tiny", init_from_run="7")
    dmodel, _ = build_model(dc, ds.label_maps, home)
    assert torch.all(dmodel.encoder.encoder.layer[0].output.dense.weight == 0.123)
    dc.init_from_run = "8"
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(dc, ds.label_maps, home)


def test_evaluation_batches_rows_of_similar_length_and_answers_in_file_order():
    """evaluate_encoded, the exits of a split and the halting / refit caches cut batches from rows of similar
    length (much less padding); every output must still belong to its own row, in file order."""
    import numpy as np

    from dact_lib import exit_refit, halting
    from dact_lib.data import TextDataset
    from dact_lib.evaluate import evaluate_encoded

    model, tok, _ = tiny_dact()
    with torch.no_grad():
        for h in model.halters:
            h[-1].bias.fill_(-3.0)  # exits vary between rows
    words = "the quick brown fox jumps over a lazy dog and runs away".split()
    lengths = [30, 1, 25, 2, 18, 3, 12, 28, 4, 9, 22, 5, 16, 7]  # long and short rows interleaved
    texts = [" ".join(words[(i + j) % len(words)] for j in range(n)) for i, n in enumerate(lengths)]
    ds = TextDataset(texts=texts, targets={"label": np.arange(len(texts)) % 3}, label_maps={"label": ["a", "b", "c"]})
    enc = encode(ds, tok, 64)
    res = evaluate_encoded(model, enc, batch_size=4)
    summ, _, _ = exit_refit.summary_cache(model, enc, batch_size=4)
    cache = halting.layer_cache(model, enc, batch_size=4)
    for i in range(len(texts)):  # each row alone: no padding at all
        one = next(iter_batches(enc.subset([i]), 1))
        with torch.no_grad():
            out = model(one["input_ids"], one["attention_mask"])
        np.testing.assert_allclose(res.probs["label"][i], out.probs["label"][0].numpy(), atol=1e-5)
        assert res.exit_layer[i] == int(out.extras["exit_layer"][0])
        np.testing.assert_allclose(cache.y[i].numpy(), out.extras["y"][0].numpy(), atol=1e-5)
        with torch.no_grad():
            hid = model.adapter.embed(one["input_ids"], one["attention_mask"])
            mask = model.adapter.prepare_mask(one["attention_mask"], hid.dtype)
            for layer in range(model.num_layers):
                hid = model.adapter.run_layer(layer, hid, mask)
        np.testing.assert_allclose(summ[i, -1].numpy(), pool(hid, one["attention_mask"], model.cfg.pooling)[0].numpy(),
                                   atol=1e-5)
