"""Early exit that pays: self-distillation, depth weighting, confidence features, the normalised λ scale, halting
units fitted on their own, the batch-1 fast inference path, and a default DACT run that exits early."""
import math

import numpy as np
import pytest
import torch

from dact_lib import dact
from dact_lib.config import RunConfig, default_config
from dact_lib.data import TextDataset, encode
from dact_lib.errors import ConfigError, DactLabError
from dact_lib.evaluate import entropy_thresholds
from dact_lib.halting import LayerCache, choose_point, fit_halting, install_halting, layer_cache, nll_ref_of
from dact_lib.models import build_model


# --- pure functions, hand-computed ------------------------------------------------------------------------------
def test_distillation_loss_matches_hand_computed_kl_at_t1_and_t2():
    y = torch.tensor([[[0.5, 0.5], [0.8, 0.2]]])
    kl1 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)  # KL(y_1 || y_2)
    assert float(dact.distillation_loss(y, 1.0)) == pytest.approx(kl1, rel=1e-5)
    # T = 2: y_1^T = [1/2, 1/2]; y_2^T ∝ [sqrt(.8), sqrt(.2)] = [2/3, 1/3]; times T^2 = 4
    kl2 = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert float(dact.distillation_loss(y, 2.0)) == pytest.approx(4 * kl2, rel=1e-5)


def test_distillation_averages_students_and_gives_the_teacher_no_gradient():
    y = torch.tensor([[[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]], requires_grad=True)
    kl = lambda p, q: p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))  # noqa: E731
    want = (kl(0.6, 0.7) + kl(0.9, 0.7)) / 2
    out = dact.distillation_loss(y, 1.0)
    assert float(out.detach()) == pytest.approx(want, rel=1e-5)
    out.backward()
    assert torch.all(y.grad[:, -1] == 0) and torch.any(y.grad[:, 0] != 0)


def test_depth_weights_and_weighted_layer_nll():
    assert dact.depth_weights(3, "pabee").tolist() == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert dact.depth_weights(4).tolist() == pytest.approx([0.25] * 4)
    with pytest.raises(ConfigError, match="uniform"):
        dact.depth_weights(3, "deep")
    y = torch.tensor([[[0.5, 0.5], [0.8, 0.2], [0.9, 0.1]]])
    t = torch.tensor([0])
    want = -(1 * math.log(0.5) + 2 * math.log(0.8) + 3 * math.log(0.9)) / 6
    assert float(dact.layer_nll(y, t, weights=dact.depth_weights(3, "pabee"))) == pytest.approx(want, rel=1e-5)
    # the DACT loss with PABEE weighting adds exactly that term
    a_N, p = y[:, -1], torch.tensor([[0.5, 0.25, 0.0]])
    out = dact.dact_loss(a_N, p, t, 0.1, y=y, layer_loss_weight=2.0, depth_weighting="pabee")
    assert float(out.loss) == pytest.approx(-math.log(0.9) + 0.1 * 0.75 + 2 * want, rel=1e-5)


def test_dact_loss_distill_term_is_added_with_its_weight():
    y = torch.tensor([[[0.5, 0.5], [0.8, 0.2]]])
    p = torch.tensor([[0.5, 0.0]])
    t = torch.tensor([1])
    base = dact.dact_loss(y[:, -1], p, t, 0.0)
    out = dact.dact_loss(y[:, -1], p, t, 0.0, y=y, distill_weight=0.5, distill_temperature=1.0)
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert float(out.loss - base.loss) == pytest.approx(0.5 * kl, rel=1e-5)
    assert float(out.distill) == pytest.approx(kl, rel=1e-5)


def test_confidence_features_by_hand():
    y = torch.tensor([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    a_prev = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.0, 0.0, 0.0]])
    f = dact.confidence_features(y, a_prev)
    ent = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    assert f[0].tolist() == pytest.approx([0.7, 0.5, ent, 0.0], rel=1e-5)
    assert f[1].tolist() == pytest.approx([0.7, 0.5, ent, 1.0], rel=1e-5)  # argmax agrees with a_{n-1}
    assert f[2].tolist() == pytest.approx([1 / 3, 0.0, 1.0, 0.0], abs=1e-5)  # a_0 = 0: never "agrees"


def test_spec_lambda_normalisation():
    assert dact.spec_lambda(1.0, 6, 0.3) == pytest.approx(0.05)  # λ_norm · nll_ref / N
    assert dact.spec_lambda(0.0, 6, 0.3) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        dact.spec_lambda(-1, 6)
    # λ_norm = 1 makes ρ = N (every layer run) cost exactly nll_ref
    lam = dact.spec_lambda(1.0, 4, 0.7)
    assert lam * 4 == pytest.approx(0.7)


def test_nll_ref_is_the_deepest_classifiers_nll():
    y = torch.tensor([[[0.5, 0.5], [0.8, 0.2]], [[0.5, 0.5], [0.4, 0.6]]])
    cache = LayerCache(base=torch.zeros(2, 2, 3), y=y, targets=torch.tensor([0, 1]))
    assert nll_ref_of(cache) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, rel=1e-5)


def test_entropy_sweep_scales_with_ln_k():
    s2, s4 = entropy_thresholds(2), entropy_thresholds(4)
    assert max(s2) < math.log(2) and max(s4) < math.log(4)
    assert max(s4) > 1.2  # AG News' 4 classes: the sweep reaches past the old 0.65-nat ceiling
    assert s4[3] == pytest.approx(2 * s2[3], rel=1e-4)


def test_config_checks_new_fields():
    cfg = default_config("dact")
    assert cfg.model.halting_input == "confidence" and cfg.model.fit_halting
    with pytest.raises(ConfigError, match="halting_input"):
        RunConfig.from_dict({"kind": "dact", "model": {"halting_input": "logits"}})
    with pytest.raises(ConfigError, match="halting_lambdas"):
        RunConfig.from_dict({"kind": "dact", "model": {"halting_lambdas": []}})
    with pytest.raises(ConfigError, match="shared_trunk"):
        RunConfig.from_dict({"kind": "dact", "model": {"shared_trunk": True, "classifier": {"hidden_dims": []}}})
    c = RunConfig.from_dict({"kind": "dact", "model": {"halting_lambdas": ["1e-2", 1]}})
    assert c.model.halting_lambdas == [0.01, 1.0]


# --- models -----------------------------------------------------------------------------------------------------
def tiny_dact(**model):
    cfg = default_config("dact", encoder="tiny")
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.validate()
    m, tok = build_model(cfg, {"label": ["a", "b", "c"]})
    return m.eval(), tok, cfg


def mixed_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 900, (8, 14), generator=g)
    am = torch.ones_like(ids)
    for b, L in enumerate([14, 9, 14, 6, 11, 14, 7, 12]):
        am[b, L:] = 0
    return ids, am


def saturate_halting(model, scale=60.0, seed=0):
    """Large random halting weights, the layer-1 bias centred on the mixed batch: h_1 is ~0 for some rows and ~1
    for others, so rows exit at different layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in model.halters:
            lin = mlp[-1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale / lin.weight.shape[1] ** 0.5)
            lin.bias.zero_()
        seen = []
        hook = model.halters[0][-1].register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
        model(*mixed_batch())
        hook.remove()
        lin = model.halters[0][-1]
        lin.bias -= float(seen[0].median()) + 1e-3  # half the rows above 0, half below ...
        lin.weight *= 40.0  # ... and far from it: h_1 ~ 0 or ~ 1
        lin.bias *= 40.0


@pytest.mark.parametrize("halting_input,shared", [("summary", False), ("both", False), ("confidence", False),
                                                   ("summary", True), ("both", True)])
def test_fast_path_equals_general_path_on_a_mixed_batch(halting_input, shared):
    model, _, _ = tiny_dact(halting_input=halting_input, shared_trunk=shared)
    saturate_halting(model)
    ids, am = mixed_batch()
    policies = [dact.DactPolicy(), dact.EntropyPolicy(1.0986), dact.PatiencePolicy(1), dact.FixedDepthPolicy(1),
                dact.FixedDepthPolicy(2)]
    for pol in policies:
        full = model.infer(ids, am, pol)  # traced, batched: halted rows leave the batch
        fast_batch = model.infer(ids, am, pol, trace=False)
        assert fast_batch.y is None and torch.equal(fast_batch.exit_layer, full.exit_layer)
        assert torch.allclose(fast_batch.probs, full.probs, atol=1e-6)
        for b in range(ids.shape[0]):
            L = int(am[b].sum())
            one = model.infer(ids[b:b + 1, :L], am[b:b + 1, :L], pol, trace=False)
            assert int(one.exit_layer[0]) == int(full.exit_layer[b]), (pol, b)
            assert torch.allclose(one.probs[0], full.probs[b], atol=1e-5), (pol, b)
    if halting_input != "confidence":  # the summaries differ per row: the saturated units give a real mix
        exits = model.infer(ids, am, dact.DactPolicy()).exit_layer
        assert set(exits.tolist()) == {1, 2}


def test_forward_with_confidence_halting_matches_accumulate_on_its_outputs():
    model, _, _ = tiny_dact(halting_input="both")
    saturate_halting(model, scale=3.0)
    ids, am = mixed_batch()
    out = model(ids, am, {"label": torch.zeros(8, dtype=torch.long)})
    a, p = dact.accumulate(out.extras["y"], out.extras["h"])
    assert torch.allclose(out.probs["label"], a[:, -1], atol=1e-6)
    assert torch.allclose(out.extras["p"], p, atol=1e-6)
    # changing layer 2's halting unit leaves h_1 as it was
    with torch.no_grad():
        model.halters[1][1].weight[:, -1] += 5.0  # layer 2's 'agree' input weight
    h2 = model(ids, am).extras["h"]
    assert torch.allclose(h2[:, 0], out.extras["h"][:, 0])


def easy_cache(n=240, seed=0):
    """Two layers, 2 classes: y_1 is confident and right for the first half, unsure and wrong for the rest; y_2 is
    always right (the deepest classifier's NLL is small, so the normalised λ needs a few units to act)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 2, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(t, 2).float()
    y1 = torch.where(torch.arange(n).unsqueeze(1) < n // 2, 0.97 * onehot + 0.015, 0.6 - 0.2 * onehot)
    y2 = 0.95 * onehot + 0.025
    return LayerCache(base=torch.randn(n, 2, 32, generator=g), y=torch.stack([y1, y2], 1), targets=t)


def test_fit_halting_trades_layers_for_lambda_and_leaves_the_model_bit_identical():
    model, _, _ = tiny_dact()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = easy_cache()
    model.num_classes = 2  # the synthetic cache has 2 classes (the halting units do not depend on K)
    points = fit_halting(model, cache, [0.0, 10.0, 300.0], epochs=60)
    assert [p.lam for p in points] == [0.0, 10.0, 300.0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing installed yet
    assert points[0].avg_exit_layer > 1.9 and points[0].accuracy == 1.0  # λ = 0: no reason to stop early
    assert points[1].avg_exit_layer == pytest.approx(1.5) and points[1].accuracy == 1.0  # the confident half
    assert points[2].avg_exit_layer == 1.0 and points[2].accuracy < 0.6  # everything stops at layer 1
    chosen = choose_point(points, tolerance=0.5)
    assert chosen.lam == 10.0
    install_halting(model, chosen)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("halters.") for k in changed)  # encoder and classifiers bit-identical


@pytest.mark.parametrize("halting_input", ["confidence", "both"])
def test_halting_units_trained_side_by_side_equal_one_after_another(halting_input):
    """The stacked (vmap) fit of every λ gives each λ the weights of its own sequential fit; a wrong stacking
    (shared optimiser state, the λ of another set, a summed gradient) would not."""
    from dact_lib.halting import train_halting_units

    model, _, _ = tiny_dact(halting_input=halting_input)
    model.num_classes = 2
    cache = easy_cache(n=96)
    lams = [0.0, 0.05, 2.0]
    one = train_halting_units(model, cache, lams, epochs=4, batch_size=32, batched=False)
    many = train_halting_units(model, cache, lams, epochs=4, batch_size=32, batched=True)
    assert len(many) == 3 and many[0].keys() == one[0].keys()
    for a, b in zip(one, many):
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    # the λ matter: the sets differ from each other
    assert not torch.allclose(many[0]["0.1.weight"], many[2]["0.1.weight"], atol=1e-3)


def test_choose_point_picks_the_fastest_within_tolerance():
    from dact_lib.halting import HaltingPoint

    pts = [HaltingPoint(0.0, 0.0, 6.0, 0.90), HaltingPoint(1.0, 0.1, 3.0, 0.897),
           HaltingPoint(2.0, 0.2, 2.0, 0.88), HaltingPoint(3.0, 0.3, 3.0, 0.899)]
    assert choose_point(pts, 0.5).lam == 3.0  # equal exits: the more accurate
    assert choose_point(pts, 2.5).lam == 2.0
    assert choose_point(pts, 0.0).lam == 0.0


def test_layer_cache_matches_the_models_forward():
    model, tok, cfg = tiny_dact(halting_input="both")
    ds = TextDataset(texts=["good film", "bad film here", "fine", "awful awful"],
                     targets={"label": np.array([0, 1, 2, 1])}, label_maps={"label": ["a", "b", "c"]})
    enc = encode(ds, tok, 32)
    cache = layer_cache(model, enc)
    out = model(*[torch.tensor(x) for x in _pad(enc)])
    assert torch.allclose(cache.y, out.extras["y"], atol=1e-6)


def _pad(enc):
    L = max(len(i) for i in enc.input_ids)
    ids = [list(i) + [0] * (L - len(i)) for i in enc.input_ids]
    am = [[1] * len(i) + [0] * (L - len(i)) for i in enc.input_ids]
    return ids, am


def test_default_dact_run_on_an_easy_set_exits_before_the_last_layer(tmp_path):
    from dact_lib.train import train

    rng = np.random.default_rng(0)
    words = {0: ["good", "great", "fine", "nice"], 1: ["bad", "awful", "poor", "sad"]}
    texts, labels = [], []
    for i in range(240):
        c = i % 2
        texts.append(" ".join(rng.choice(words[c], size=4)))
        labels.append(c)
    ds = TextDataset(texts=texts, targets={"label": np.array(labels)}, label_maps={"label": ["neg", "pos"]})
    cfg = default_config("dact", encoder="tiny")  # the defaults: fit_halting on, confidence-reading halting units
    cfg.train.epochs, cfg.train.early_stopping.enabled = 4, False
    cfg.train.encoder_lr, cfg.train.head_lr = 1e-3, 3e-3
    from dact_lib.data import split_dataset

    res = train(cfg, data=split_dataset(ds, 0.2, 0.2, 0), save=False)
    N = res.model.num_layers
    halting = res.report["halting"]
    assert halting["layer_accuracy"][0] > 0.95  # layer 1 already solves it
    assert halting["chosen"]["val_avg_exit_layer"] < N - 0.5
    assert res.test_metrics["test_avg_exit_layer"] < N - 0.5
    assert res.test_metrics["test_accuracy"] > 0.95
    assert len(halting["points"]) == len(cfg.model.halting_lambdas)
    refit = res.report["exit_refit"]  # the shallow classifiers were trained again before the halting fit
    assert refit["layers"] == list(range(1, N)) and refit["rows"] == len(split_dataset(ds, 0.2, 0.2, 0).train)
    assert len(halting["entropy_points"]) == len(entropy_thresholds(2))
    # the run's validation metrics describe the model with the fitted halting units (what is saved and served)
    assert res.best_metrics["val_avg_exit_layer"] == pytest.approx(halting["chosen"]["val_avg_exit_layer"], abs=0.05)


def test_pipeline_keeps_its_jointly_trained_halting_units():
    import inspect

    from dact_lib.tuning import dact_pipeline

    assert "cfg.model.fit_halting = False" in inspect.getsource(dact_pipeline.run_pipeline)


def test_exit_advice_names_the_setting_and_the_measured_numbers(tmp_path):
    import json

    from dact_lib.halting import exit_advice

    pts = [{"lambda": 0.0, "avg_exit_layer": 6.0, "accuracy": 0.90}, {"lambda": 1.0, "avg_exit_layer": 3.1,
                                                                     "accuracy": 0.888},
           {"lambda": 5.0, "avg_exit_layer": 1.2, "accuracy": 0.70}]
    ent = [{"threshold": 0.5, "avg_exit_layer": 2.9, "accuracy": 0.895}]
    rep = {"best": {"val_avg_exit_layer": 6.0}, "halting": {"points": pts, "chosen": pts[0], "rows": 700,
                                                            "tolerance_points": 0.5, "layer_accuracy": [0.7] * 6,
                                                            "entropy_points": ent}}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    msg = exit_advice(tmp_path)
    assert "6.00 of 6 layers" in msg and "λ = 1: 3.10 layers at 88.8% (-1.2 points)" in msg
    assert "halting_tolerance ≥ 1.3" in msg and "take λ = 1." in msg and "--halting-tolerance" in msg
    assert "entropy exit (S = 0.5 nats) measured 2.90 layers at 89.5%" in msg
    rep["halting"]["chosen"] = pts[1]
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert exit_advice(tmp_path) is None  # 3.1 of 6 layers: early enough
    (tmp_path / "report.json").write_text(json.dumps({"best": {"val_avg_exit_layer": 5.9}, "halting": None}))
    assert "fit_halting" in exit_advice(tmp_path, 6)


def test_retired_settings_load_when_off_and_are_refused_when_on():
    """Issue 25: halting_calibration and exit_refit_distill measured no better and were retired. A saved config
    with them off (every run of an older version) still loads; turned on, the message says why and to remove it."""
    from dact_lib.config import RunConfig

    old = default_config("dact").to_dict()
    old["model"].update(halting_calibration=False, exit_refit_distill=0.0)
    cfg = RunConfig.from_dict(old)
    assert not hasattr(cfg.model, "halting_calibration") and not hasattr(cfg.model, "exit_refit_distill")
    old["model"]["halting_calibration"] = True
    with pytest.raises(ConfigError, match=r"model.halting_calibration = True: this setting was retired .*"
                                          r"remove it from the config"):
        RunConfig.from_dict(old)
    old["model"].update(halting_calibration=False, exit_refit_distill=0.5)
    with pytest.raises(ConfigError, match="exit_refit_distill = 0.5: this setting was retired"):
        RunConfig.from_dict(old)


def test_fast_path_sees_weights_changed_after_its_first_call():
    model, _, _ = tiny_dact()
    ids, am = mixed_batch()
    one = lambda: model.infer(ids[:1], am[:1], dact.DactPolicy(), trace=False)  # noqa: E731
    first = one()
    model.to(torch.float64).to(torch.float32)  # new parameter storage: the cached numpy views are stale
    with torch.no_grad():
        for mlp in model.halters:
            mlp[-1].weight.zero_()
            mlp[-1].bias.fill_(-30.0)  # h_n = 0: the DACT rule halts at layer 1
    assert int(first.exit_layer[0]) == 2  # before: the untrained units go on to the last layer
    assert int(one().exit_layer[0]) == int(model.infer(ids[:1], am[:1], dact.DactPolicy()).exit_layer[0]) == 1


@pytest.mark.parametrize("hidden", [[64], [], [32, 16]])
def test_threshold_halting_units_make_the_dact_rule_exit_like_entropy(hidden):
    from dact_lib.config import MLPConfig
    from dact_lib.halting import _Halters, threshold_points, threshold_state

    model, _, _ = tiny_dact(halting=MLPConfig(hidden_dims=hidden, dropout=0.0))
    model.num_classes = 2
    cache = easy_cache()
    units = _Halters(model).eval()
    units.halters.load_state_dict(threshold_state(model, 0.5))
    with torch.no_grad():
        h, _, _ = units(cache)
    rule = dact.run_policy_offline(dact.DactPolicy(), cache.y, h)
    ent = dact.run_policy_offline(dact.EntropyPolicy(0.5 * math.log(2)), cache.y)
    assert torch.equal(rule.exit_layer, ent.exit_layer)  # confident half at layer 1, the rest at 2
    assert rule.exit_layer.float().mean() == pytest.approx(1.5)
    assert float((rule.probs.argmax(-1) == cache.targets).float().mean()) == 1.0
    pts = threshold_points(model, cache, thresholds=(0.5, 0.999))
    assert [p.threshold for p in pts] == [0.5, 0.999] and pts[0].avg_exit_layer == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="halting_thresholds"):
        RunConfig.from_dict({"kind": "dact", "model": {"halting_thresholds": "yes"}})
    with pytest.raises(DactLabError, match="confidence"):
        threshold_state(tiny_dact(halting_input="summary")[0], 0.5)



def _q_at_normalised_entropy(e):
    """q in (0.5, 1) with entropy([q, 1 - q]) / ln 2 == e (bisection)."""
    lo, hi = 0.5, 1.0 - 1e-12
    for _ in range(100):
        q = (lo + hi) / 2
        h = -(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2)
        lo, hi = (q, hi) if h > e else (lo, q)
    return (lo + hi) / 2


@pytest.mark.parametrize("hidden", [[64], []])
def test_threshold_units_are_a_step_so_rows_near_tau_exit_and_answer_as_entropy(hidden):
    # rows whose y_1 entropy lies just below / just above τ: the units must be 0 / 1, not in between — a soft h_1
    # keeps the rule from halting at layer 1 below τ, and mixes y_1 into the layer-2 answer above τ (the y_2 here
    # says the other class, so the mix shows). With the old slope (60) both happened: this test failed.
    from dact_lib.config import MLPConfig
    from dact_lib.halting import _Halters, threshold_state

    model, _, _ = tiny_dact(halting=MLPConfig(hidden_dims=hidden, dropout=0.0))
    model.num_classes = 2
    tau = 0.5
    ents = [0.47, 0.48, 0.49, 0.495, 0.505, 0.51, 0.52, 0.53]
    y1 = torch.tensor([[_q_at_normalised_entropy(e), 1 - _q_at_normalised_entropy(e)] for e in ents])
    y2 = torch.tensor([[0.3, 0.7]]).expand(len(ents), 2)
    cache = LayerCache(base=torch.zeros(len(ents), 2, 32), y=torch.stack([y1, y2], 1),
                       targets=torch.zeros(len(ents), dtype=torch.long))
    units = _Halters(model).eval()
    units.halters.load_state_dict(threshold_state(model, tau))
    with torch.no_grad():
        h, _, _ = units(cache)
    assert torch.equal(h[:, 0] < 1e-3, torch.tensor(ents) < tau) and bool((h[4:, 0] > 1 - 1e-3).all())
    rule = dact.run_policy_offline(dact.DactPolicy(), cache.y, h)
    ent = dact.run_policy_offline(dact.EntropyPolicy(tau * math.log(2)), cache.y)
    assert rule.exit_layer.tolist() == ent.exit_layer.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert torch.allclose(rule.probs, ent.probs, atol=1e-3)  # the exit layer's y_n, nothing of y_1 mixed in

# --- exit refit (exit_refit.py) ------------------------------------------------------------------------------------
def _separable_cache(model, n, seed):
    """(summaries [n,N,D], y_N [n,K], targets) where every layer's summary carries the class on its first three
    coordinates (scaled down, so the untrained classifiers start near chance)."""
    g = torch.Generator().manual_seed(seed)
    N, D, K = model.num_layers, model.adapter.hidden_size, model.num_classes
    t = torch.randint(0, K, (n,), generator=g)
    x = 0.3 * torch.randn(n, N, D, generator=g)
    x[:, :, :K] += 2.0 * torch.nn.functional.one_hot(t, K).float().unsqueeze(1)
    return x, torch.full((n, K), 1.0 / K), t


def test_refit_exits_trains_the_shallow_classifiers_and_leaves_the_rest_bit_identical():
    from dact_lib.exit_refit import refit_exits

    model, _, _ = tiny_dact()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    N = model.num_layers
    out = refit_exits(model, _separable_cache(model, 600, 0), _separable_cache(model, 200, 1), epochs=15, lr=3e-3)
    assert out["layers"] == list(range(1, N))
    assert min(out["val_accuracy_after"]) > 0.95 > max(out["val_accuracy_before"])
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {k for k in after if k.startswith("classifiers.") and int(k.split(".")[1]) < N - 1}
    # the model's own classifiers now give the refitted answers (eval mode, no dropout)
    v_summ, _, v_t = _separable_cache(model, 200, 1)
    with torch.no_grad():
        acc = float((model.classify(1, v_summ[:, 0])[0].argmax(-1) == v_t).float().mean())
    assert acc == pytest.approx(out["val_accuracy_after"][0])


def test_refit_exits_keeps_the_epoch_best_on_validation():
    from dact_lib.exit_refit import refit_exits

    model, _, _ = tiny_dact()
    train_c = _separable_cache(model, 300, 0)
    noisy = (train_c[0], train_c[1], torch.where(torch.arange(300) % 3 == 0, (train_c[2] + 1) % 3, train_c[2]))
    out = refit_exits(model, noisy, _separable_cache(model, 100, 1), epochs=6, lr=1e-2)
    hist = out["val_history"]
    assert len(hist) == 6
    best = max([float(np.mean(out["val_accuracy_before"]))] + hist)
    assert float(np.mean(out["val_accuracy_after"])) == pytest.approx(best)
    assert out["best_epoch"] == (hist.index(best) + 1 if best in hist and best > np.mean(out["val_accuracy_before"])
                                 else 0)


def test_refit_exits_skips_shared_classifiers():
    from dact_lib.exit_refit import refit_exits

    model, _, _ = tiny_dact(share_weights=True)
    out = refit_exits(model, _separable_cache(model, 50, 0), _separable_cache(model, 20, 1), epochs=2)
    assert "skipped" in out


def test_summary_cache_matches_layer_cache_and_samples_rows():
    from dact_lib.exit_refit import summary_cache

    model, tok, _ = tiny_dact()
    ds = TextDataset(texts=["good film", "bad film here", "fine", "awful awful"],
                     targets={"label": np.array([0, 1, 2, 1])}, label_maps={"label": ["a", "b", "c"]})
    enc = encode(ds, tok, 32)
    summ, y_deep, t = summary_cache(model, enc)
    cache = layer_cache(model, enc)
    assert torch.allclose(summ, cache.base, atol=1e-6)  # halting input "confidence": base = the summary c_n
    assert torch.allclose(y_deep, cache.y[:, -1], atol=1e-6) and t.tolist() == [0, 1, 2, 1]
    s2, _, t2 = summary_cache(model, enc, rows=np.array([1, 3]))
    assert torch.allclose(s2, summ[[1, 3]], atol=1e-6) and t2.tolist() == [1, 1]


def test_exit_refit_config_checks():
    assert default_config("dact").model.exit_refit_epochs > 0
    with pytest.raises(ConfigError, match="exit_refit_epochs"):
        RunConfig.from_dict({"kind": "dact", "model": {"exit_refit_epochs": -1}})
    with pytest.raises(ConfigError, match="exit_refit_lr"):
        RunConfig.from_dict({"kind": "dact", "model": {"exit_refit_lr": 2.0}})
    with pytest.raises(ConfigError, match="exit_refit_max_rows"):
        RunConfig.from_dict({"kind": "dact", "model": {"exit_refit_max_rows": 5}})


# --- temperature-calibrated exits (exit_refit.fit_temperatures / apply_temperatures) ------------------------------
def _one_level_layer(p, right, n=200):
    """n rows of 2 classes, every y = [p, 1 - p] on the predicted class, ``right`` of them correct."""
    t = torch.zeros(n, dtype=torch.long)
    t[int(round(right * n)):] = 1  # predicted class 0 everywhere: the first right·n rows are correct
    return torch.tensor([[p, 1 - p]]).expand(n, 2), t


def test_fit_temperatures_matches_the_hand_computed_optimum_per_layer():
    from dact_lib.exit_refit import fit_temperatures

    # one confidence level p with accuracy r: the NLL-optimal scaled probability is r, so
    # p^(1/T) / (p^(1/T) + (1-p)^(1/T)) = r  =>  T = ln(p / (1 - p)) / ln(r / (1 - r))
    y1, t = _one_level_layer(0.99, 0.8)  # over-confident: T = ln 99 / ln 4 = 3.315
    y2, _ = _one_level_layer(0.6, 0.8)  # under-confident: T = ln 1.5 / ln 4 = 0.2925
    y = torch.stack([y1, y2], 1)
    temps = fit_temperatures(y, t)
    assert temps[0] == pytest.approx(math.log(99) / math.log(4), rel=0.015)
    assert temps[1] == pytest.approx(math.log(1.5) / math.log(4), rel=0.015)
    shared = fit_temperatures(y, t, shared=True)  # one T for both layers, between the two
    assert shared[0] == shared[1] and temps[1] < shared[0] < temps[0]


def test_apply_temperatures_folds_into_the_classifiers_on_every_path():
    from dact_lib.exit_refit import apply_temperatures

    model, _, _ = tiny_dact()
    ids, am = mixed_batch()
    before = model.infer(ids, am, dact.FixedDepthPolicy(model.num_layers))
    fast_before = model.infer(ids[:1, :14], am[:1, :14], dact.EntropyPolicy(0.0), trace=False)  # warm the fast cache
    temps = [0.5, 2.0, 1.0, 3.0, 0.25, 1.5][:model.num_layers]
    apply_temperatures(model, temps)
    after = model.infer(ids, am, dact.FixedDepthPolicy(model.num_layers))
    t = torch.tensor(temps, dtype=torch.float64)
    expect = (before.y.double().log() / t.view(1, -1, 1)).softmax(-1)
    assert torch.allclose(after.y.double(), expect, atol=1e-5)  # y_n = softmax(logits_n / T_n), every layer
    assert torch.equal(after.y.argmax(-1), before.y.argmax(-1))  # no layer's answer changes
    fast = model.infer(ids[:1, :14], am[:1, :14], dact.EntropyPolicy(0.0), trace=False)  # batch-1 fast path
    assert torch.allclose(fast.probs.double(), expect[0, -1:], atol=1e-5)  # answers with the calibrated exit
    assert not torch.allclose(fast.probs, fast_before.probs, atol=1e-4)
    with pytest.raises(ValueError, match="temperatures"):
        apply_temperatures(model, [1.0])
    shared, _, _ = tiny_dact(share_weights=True)
    w = shared.classifiers[0][-1].weight.clone()
    apply_temperatures(shared, [2.0] * shared.num_layers)  # one classifier: its one temperature
    assert torch.allclose(shared.classifiers[0][-1].weight, w / 2.0)


def test_exit_temperature_option_in_training_reports_and_feeds_the_halting_fit(tmp_path):
    from dact_lib.data import split_dataset
    from dact_lib.train import train

    rng = np.random.default_rng(1)
    words = {0: ["good", "great", "fine", "nice"], 1: ["bad", "awful", "poor", "sad"]}
    labels = [i % 2 for i in range(120)]
    ds = TextDataset(texts=[" ".join(rng.choice(words[c], size=4)) for c in labels],
                     targets={"label": np.array(labels)}, label_maps={"label": ["neg", "pos"]})
    cfg = default_config("dact", encoder="tiny")
    assert cfg.model.exit_temperature is False  # an option, off by default
    cfg.model.exit_temperature, cfg.model.exit_refit_epochs = True, 0
    cfg.train.epochs, cfg.train.early_stopping.enabled = 1, False
    res = train(cfg, data=split_dataset(ds, 0.25, 0.0, 0), save=False, evaluate_test=False)
    rep = res.report["exit_refit"]["temperature"]
    N = res.model.num_layers
    assert len(rep["temperatures"]) == N and all(0.05 <= t <= 20 for t in rep["temperatures"])
    assert all(a <= b + 1e-9 for a, b in zip(rep["val_nll_after"], rep["val_nll_before"]))  # T = 1 is on the grid
    assert rep["rows"] == 30
    # the halting fit ran on the calibrated exits: its NLL reference (the deepest exit's validation NLL, which the
    # temperature changes) is the model's as saved, and the last layer's NLL after calibration
    val = split_dataset(ds, 0.25, 0.0, 0).val
    cache = layer_cache(res.model, encode(val, res.tokenizer, cfg.data.max_seq_len))
    assert res.report["halting"]["nll_ref"] == pytest.approx(nll_ref_of(cache), rel=1e-4)
    assert nll_ref_of(cache) == pytest.approx(rep["val_nll_after"][-1], rel=1e-4)
    assert abs(rep["val_nll_after"][-1] - rep["val_nll_before"][-1]) > 1e-4  # (so the check above can tell)
    with pytest.raises(ConfigError, match="exit_temperature"):
        RunConfig.from_dict({"kind": "dact", "model": {"exit_temperature": 1}})
    with pytest.raises(ConfigError, match="turn model.fit_halting on"):
        RunConfig.from_dict({"kind": "dact", "model": {"exit_temperature": True, "fit_halting": False}})
    from dact_lib.tuning.dact_pipeline import PipelineConfig, run_pipeline

    with pytest.raises(ConfigError, match="not used by the DACT pipeline"):  # stage 3 fits on its own exits
        run_pipeline(cfg, pipeline=PipelineConfig(name="p"), home=tmp_path)


def test_fold_indices_are_stratified_disjoint_and_cover_every_row():
    from dact_lib.halting import fold_indices

    t = torch.tensor([0] * 7 + [1] * 5 + [2] * 2)
    parts = fold_indices(t, 2, seed=3)
    assert sorted(torch.cat(parts).tolist()) == list(range(14))  # every row once
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    for c, n in ((0, 7), (1, 5), (2, 2)):
        counts = [int((t[p] == c).sum()) for p in parts]
        assert sum(counts) == n and max(counts) - min(counts) <= 1  # each class split evenly
    assert [p.tolist() for p in fold_indices(t, 2, seed=3)] == [p.tolist() for p in parts]  # seeded


def test_cross_fit_measures_every_point_on_rows_its_units_were_not_fitted_on():
    """The pooled out-of-fold numbers are exactly the per-fold fits run on the held-out fold; the weights are the
    fit on every row; the in-sample numbers are kept as seen_*."""
    from dact_lib.halting import cross_fit_halting, fold_indices, point_metrics

    model, _, _ = tiny_dact()
    model.num_classes = 2
    cache = easy_cache(n=120, seed=1)
    lams = [0.0, 10.0]
    points, crossed = cross_fit_halting(model, cache, lams, epochs=5, seed=2, nll=True)
    assert crossed and [p.lam for p in points] == lams
    full = fit_halting(model, cache, lams, epochs=5, seed=2)
    parts = fold_indices(cache.targets, 2, seed=2)
    exp_exit, exp_acc, exp_nll = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    for k in range(2):
        held, rest = parts[k], parts[1 - k]
        for i, p in enumerate(fit_halting(model, cache.subset(rest), lams, eval_data=cache.subset(held), epochs=5,
                                          seed=2)):
            exp_exit[i] += p.avg_exit_layer * len(held) / len(cache)
            exp_acc[i] += p.accuracy * len(held) / len(cache)
            exp_nll[i] += point_metrics(model, cache.subset(held), p.state)["nll"] * len(held) / len(cache)
    for i, p in enumerate(points):
        assert p.avg_exit_layer == pytest.approx(exp_exit[i]) and p.accuracy == pytest.approx(exp_acc[i])
        assert p.nll == pytest.approx(exp_nll[i])
        assert (p.seen_avg_exit_layer, p.seen_accuracy) == (full[i].avg_exit_layer, full[i].accuracy)
        assert all(torch.equal(p.state[k], full[i].state[k]) for k in p.state)  # the weights: every row's fit
    assert "seen_val_accuracy" in points[0].record().to_dict() and "val_nll" in points[0].record().to_dict()
    # too few rows for folds: the in-sample numbers, and the caller is told
    small, crossed = cross_fit_halting(model, cache.subset(torch.arange(20)), lams, epochs=2)
    assert not crossed and small[0].seen_accuracy is None


def test_interleaved_latencies_stop_at_the_deadline_with_equal_items(monkeypatch):
    import time as time_mod

    from dact_lib import evaluate

    clock = [0.0]
    monkeypatch.setattr(evaluate.time, "monotonic", lambda: clock[0])

    def caller(item):
        clock[0] += 1.0  # every call takes a second of the fake clock

    lat = evaluate.interleaved_latencies({"a": caller, "b": caller}, list(range(50)), deadline=20.0)
    assert len(lat["a"]) == len(lat["b"]) == 9  # 2 warm-up calls, then 2 s an item: item 9 would start at 20 s
    lat = evaluate.interleaved_latencies({"a": caller}, list(range(50)), deadline=0.0)
    assert len(lat["a"]) == evaluate.MIN_TIMED_ITEMS  # past the deadline at once: the minimum
    assert len(evaluate.interleaved_latencies({"a": caller}, list(range(8)))["a"]) == 8
    _ = time_mod


def test_the_phases_after_the_last_step_report_their_own_counts(tmp_path):
    """Issue 28: the exit refit and the halting fit ran 19 minutes behind "step 184/184"; each now reports its
    counts (rows cached, refit epochs, each halting fit's epochs), ending at its total."""
    from dact_lib.callbacks import Callback
    from dact_lib.data import split_dataset
    from dact_lib.train import train

    rng = np.random.default_rng(2)
    words = {0: ["good", "great", "fine", "nice"], 1: ["bad", "awful", "poor", "sad"]}
    labels = [i % 2 for i in range(200)]
    ds = TextDataset(texts=[" ".join(rng.choice(words[c], size=4)) for c in labels],
                     targets={"label": np.array(labels)}, label_maps={"label": ["neg", "pos"]})
    cfg = default_config("dact", encoder="tiny")
    cfg.model.exit_refit_epochs, cfg.model.halting_epochs = 3, 2
    cfg.train.epochs, cfg.train.early_stopping.enabled = 1, False
    seen = []

    class Phases(Callback):
        def on_event(self, state, kind, payload):
            if kind == "phase" and "done" in payload:
                seen.append((payload["phase"], payload["done"], payload["total"]))

    train(cfg, data=split_dataset(ds, 0.25, 0.0, 0), save=False, evaluate_test=False, callbacks=[Phases()])
    last = {}
    for name, done, total in seen:
        assert 0 < done <= total
        last[name] = (done, total)
    assert last["refitting the exit classifiers (epoch)"] == (3, 3)
    assert last["caching the layer summaries (train rows)"] == (150, 150)
    fits = sorted(n for n in last if n.startswith("fitting the halting units"))
    assert fits == [f"fitting the halting units, fit {k} of 3 (epoch)" for k in (1, 2, 3)]
    assert all(last[n] == (2, 2) for n in fits)
