"""Population Based Training: quantiles, explore bounds, exploit (weights + optimizer state + new hyperparameters),
run_pbt end to end on the tiny encoder, replay, failure, cancellation and config validation."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from dact_lib.callbacks import Callback, CallbackList, CancelToken, LoopState
from dact_lib.config import default_config
from dact_lib.data import encode, iter_batches, load_demo_dataset
from dact_lib.errors import Cancelled, ConfigError, DactLabError
from dact_lib.models import build_model, load_model
from dact_lib.tracker import Tracker
from dact_lib.train import BatchSizeManager, load_split, make_optimizer, train_step, warmup_linear
from dact_lib.tuning.pbt import (EXPLORED, PBTConfig, PBTSpace, apply_hparams, dropout_targets, explore, exploit,
                                 member_config, replay_schedule, run_pbt, select_quantiles, take_snapshot)


def tiny_cfg(epochs=2):
    cfg = default_config("backbone", encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.epochs = epochs
    cfg.train.batch_size = 16
    cfg.train.log_every_steps = 2
    cfg.train.device = "cpu"
    return cfg.validate()


def tiny_pbt(**kw):
    base = dict(population=3, ready_every_epochs=None, ready_every_steps=2, metric="val_loss", quantile=0.34,
                seed=0, space=PBTSpace(batch_sizes=[16, 32]))
    base.update(kw)
    return PBTConfig(**base)


# --- quantiles ---------------------------------------------------------------------------------------------------

def test_quantiles_bottom_and_top_at_least_one():
    assert select_quantiles({0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5}, 0.2) == ([0], [4])
    assert select_quantiles({0: 0.3, 1: 0.1, 2: 0.4, 3: 0.2}, 0.2) == ([1], [2])  # 4 × 0.2 < 1 → still one
    scores = {i: i / 10 for i in range(10)}
    assert select_quantiles(scores, 0.2) == ([0, 1], [8, 9])
    assert select_quantiles({"a": 0.4, "b": 0.6}, 0.2) == (["a"], ["b"])
    assert select_quantiles({0: 0.5}, 0.2) == ([], [])
    assert select_quantiles({}, 0.2) == ([], [])


def test_quantiles_ties_and_nan():
    assert select_quantiles({0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, 0.2) == ([], [0, 1, 2, 3])  # nothing better to copy
    assert select_quantiles({0: 0.1, 1: 0.1, 2: 0.5, 3: 0.9}, 0.2) == ([0, 1], [3])  # ties at the boundary: both
    assert select_quantiles({0: 0.1, 1: 0.9, 2: 0.9, 3: 0.5}, 0.2) == ([0], [1, 2])
    assert select_quantiles({0: 0.5, 1: 0.9, 2: 0.9}, 0.5) == ([0], [1, 2])
    assert select_quantiles({0: 0.9, 1: 0.9}, 0.2) == ([], [0, 1])
    assert select_quantiles({0: float("nan"), 1: 0.2, 2: 0.3}, 0.2) == ([0], [2])  # NaN is the worst


# --- explore -----------------------------------------------------------------------------------------------------

def test_explore_never_leaves_the_space():
    space = PBTSpace()
    rng = random.Random(0)
    how = {"perturb": 0, "resample": 0}
    starts = [{k: space.bounds(k)[0] for k in EXPLORED}, {k: space.bounds(k)[1] for k in EXPLORED}]
    hp = starts[0]
    for i in range(2000):
        if i % 50 < 2:  # restart at a bound every 50 steps, else chain the perturbations
            hp = starts[i % 2]
        new, changes = explore(hp, space, rng, resample_prob=0.25, perturb_factors=(0.8, 1.2))
        assert space.contains(new), (hp, new)
        for name in EXPLORED:
            ch = changes[name]
            how[ch["how"]] += 1
            assert ch["old"] == hp[name] and ch["new"] == new[name]
            if ch["how"] == "perturb":
                assert ch["factor"] in (0.8, 1.2)
                raw = hp[name] * ch["factor"]
                assert new[name] == space.clip(name, raw)
                assert ch["clipped"] == (new[name] != raw)
                if not ch["clipped"]:
                    assert new[name] == raw  # exactly ×0.8 or ×1.2
        hp = new
    total = sum(how.values())
    assert 0.2 < how["resample"] / total < 0.3
    # the bounds themselves: the upper bound ×1.2 is clipped back, the lower bound ×0.8 too
    new, ch = explore(starts[1], space, random.Random(1), resample_prob=0.0, perturb_factors=(1.2,))
    assert new == {k: space.bounds(k)[1] for k in EXPLORED}
    assert all(c["clipped"] for k, c in ch.items() if space.bounds(k)[1] > 0)


# --- exploit on two small models, no threads -----------------------------------------------------------------------

def _model_and_optimizer(seed):
    cfg = tiny_cfg()
    cfg.train.seed = seed
    cfg.train.weight_decay = 0.01
    cfg.model.head.dropout = 0.2
    cfg.model.head.hidden_dims = [16]
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    return cfg, model, tok, make_optimizer(model, cfg.train)


def _step(cfg, model, opt, batch):
    model.train()
    train_step(model, opt, batch, torch.device("cpu"), cfg.train, BatchSizeManager(16, 1, 64), CallbackList(),
               LoopState())


def _opt_tensors(opt_state):
    return {(i, k): v for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def test_exploit_copies_weights_and_optimizer_state_then_applies_the_new_hparams():
    cfg, donor, tok, d_opt = _model_and_optimizer(seed=0)
    _, rec, _, r_opt = _model_and_optimizer(seed=1)
    batches = list(iter_batches(encode(load_demo_dataset(), tok, 32), 16))[:4]
    _step(cfg, donor, d_opt, batches[0])
    _step(cfg, donor, d_opt, batches[1])
    _step(cfg, rec, r_opt, batches[2])
    hp_donor = {"lr": 1e-3, "weight_decay": 0.01, "dropout": 0.2, "warmup_ratio": 0.1}
    snap = take_snapshot(donor, d_opt, hp_donor, member=0, step=2, score=0.5)
    frozen_weights = {k: v.clone() for k, v in snap.model_state.items()}
    frozen_opt = {k: v.clone() for k, v in _opt_tensors(snap.optimizer_state).items()}
    _step(cfg, donor, d_opt, batches[3])  # the donor trains on: its snapshot must not change
    assert not torch.equal(dict(donor.named_parameters())["head.1.weight"], frozen_weights["head.1.weight"])

    exploit(rec, r_opt, snap)
    for k, v in rec.state_dict().items():
        assert torch.equal(v, frozen_weights[k]), k
    rec_opt = _opt_tensors(r_opt.state_dict())
    assert any(k[1] == "exp_avg" for k in rec_opt) and rec_opt.keys() == frozen_opt.keys()
    for k, v in rec_opt.items():
        assert torch.equal(v, frozen_opt[k]), k

    new, _ = explore(hp_donor, PBTSpace(), random.Random(3), resample_prob=0.0)
    assert new["lr"] != hp_donor["lr"]
    ratio = cfg.train.encoder_lr / cfg.train.head_lr
    factor = apply_hparams(rec, r_opt, new, total_steps=10, step=3, encoder_lr_ratio=ratio)
    expected_factor = warmup_linear(10, new["warmup_ratio"])
    assert [factor(s) for s in range(11)] == [expected_factor(s) for s in range(11)]
    groups = {(g["group"], g["decay"]) for g in r_opt.param_groups}
    assert ("head", True) in groups and ("head", False) in groups and ("encoder", True) in groups
    for g in r_opt.param_groups:
        want = new["lr"] * (ratio if g["group"] == "encoder" else 1.0)
        assert g["initial_lr"] == pytest.approx(want, rel=1e-12)
        assert g["lr"] == pytest.approx(want * expected_factor(3), rel=1e-12)
        assert g["weight_decay"] == (new["weight_decay"] if g["decay"] else 0.0)
    head_drop = [m.p for m in rec.head.modules() if isinstance(m, nn.Dropout)]
    assert head_drop and all(p == new["dropout"] for p in head_drop)
    enc_drop = [m.p for m in rec.encoder.modules() if isinstance(m, nn.Dropout)]
    assert enc_drop and all(p == 0.1 for p in enc_drop)  # scope "head": the encoder keeps its own rate
    apply_hparams(rec, r_opt, new, total_steps=10, step=3, encoder_lr_ratio=ratio, dropout_scope="all")
    assert all(m.p == new["dropout"] for m in rec.modules() if isinstance(m, nn.Dropout))
    assert dropout_targets(rec, "all") == [rec]

    _step(cfg, rec, r_opt, batches[3])  # the recipient trains on its copy: the snapshot stays intact
    for k, v in _opt_tensors(snap.optimizer_state).items():
        assert torch.equal(v, frozen_opt[k]), k
    for k, v in snap.model_state.items():
        assert torch.equal(v, frozen_weights[k]), k


# --- run_pbt end to end ------------------------------------------------------------------------------------------

def test_run_pbt_end_to_end_and_replay(home):
    from dact_lib.evaluate import evaluate_encoded

    tracker = Tracker(home)
    cfg = tiny_cfg(epochs=2)
    threads_before = torch.get_num_threads()
    res = run_pbt(cfg, pbt=tiny_pbt(), home=home, tracker=tracker)
    assert torch.get_num_threads() == threads_before

    parent = tracker.get_run(res.parent_run_id)
    assert parent["kind"] == "pbt" and parent["status"] == "finished"
    children = tracker.list_runs(parent_id=res.parent_run_id)
    assert len(children) == 3 and {c["kind"] for c in children} == {"pbt-member"}
    assert {c["status"] for c in children} == {"finished"}
    assert all(c["dataset_id"] == parent["dataset_id"] is not None for c in children)
    assert [m["status"] for m in res.members] == ["finished"] * 3
    assert parent["summary"]["best_run_id"] == res.best_run_id == res.members[res.best_member]["run_id"]
    assert parent["summary"]["architecture"]["shared_by_population"] is True

    events = tracker.get_events(res.parent_run_id)
    kinds = [e["kind"] for e in events]
    assert "pbt_threads" in kinds and "pbt_schedule" in kinds
    assert events[kinds.index("pbt_threads")]["payload"]["torch_threads"] >= 1
    exploits = [e["payload"] for e in events if e["kind"] == "pbt_exploit"]
    explores = [e["payload"] for e in events if e["kind"] == "pbt_explore"]
    assert exploits and len(exploits) == len(explores)
    for x in exploits:
        assert x["recipient"] != x["donor"] and x["donor_score"] < x["score"]  # val_loss: the donor is better
        assert set(x["old"]) == set(x["new"]) == set(EXPLORED) and x["time"] > 0 and x["step"] > 0
    for x in explores:
        assert set(x["changes"]) == set(EXPLORED) and PBTSpace().contains(x["new"])
        # explore perturbs the DONOR's hyperparameters (just copied by exploit), not the recipient's own
        for k, ch in x["changes"].items():
            assert ch["old"] == pytest.approx(x["old"][k]) and ch["new"] == pytest.approx(x["new"][k])
            if ch["how"] == "perturb" and not ch["clipped"]:
                assert ch["new"] == pytest.approx(x["old"][k] * ch["factor"])
    assert any(x["old"] != x["recipient_old"] for x in explores)  # the two differ, so the check above can fail
    rec_run = exploits[0]["recipient_run_id"]
    assert {"pbt_exploit", "pbt_explore"} <= {e["kind"] for e in tracker.get_events(rec_run)}

    for m in res.members:
        hp = tracker.get_metrics(m["run_id"], names=[f"hp/{k}" for k in EXPLORED])
        assert set(hp["name"]) == {f"hp/{k}" for k in EXPLORED}
        assert 0 in set(hp["step"]) and len(set(hp["step"])) >= 3  # the start + the ready points
        last_lr = hp[hp.name == "hp/lr"]["value"].iloc[-1]
        assert last_lr == pytest.approx(m["final"]["lr"])

    # the winner's saved model is its best-scoring state
    assert res.best_score == min(m["best_score"] for m in res.members)
    loaded = load_model(res.best_run_id, home)
    split, _ = load_split(cfg)
    again = evaluate_encoded(loaded.model, encode(split.val, loaded.tokenizer, 32), 64)
    assert again.loss == pytest.approx(res.best_score, rel=1e-4)

    sched = res.schedule
    assert sched[0]["step"] == 0 and [e["step"] for e in sched] == sorted({e["step"] for e in sched})
    assert sched[-1]["lr"] == pytest.approx(res.members[res.best_member]["final"]["lr"])
    assert parent["summary"]["schedule"] == sched

    rep = replay_schedule(res.best_config, sched, home=home, tracker=tracker)
    assert rep.status == "finished" and (rep.run_dir / "model.safetensors").exists()
    applied = tracker.get_events(rep.run_id, kinds=["pbt_replay_change"])
    assert [e["payload"]["step"] for e in applied] == [e["step"] for e in sched[1:]]


class ReadBack(Callback):
    """Reads what the optimizer and the Dropout modules really hold, after the PBT / replay callbacks ran."""

    def __init__(self):
        self.seen: dict = {}

    def _read(self, state):
        opt, model = state.optimizer, state.model
        drop = sorted({float(m.p) for mod in dropout_targets(model, "head") for m in mod.modules()
                       if isinstance(m, nn.Dropout)})
        self.seen.setdefault(state.run_id, {})[state.step] = {
            "groups": [(g.get("group"), g.get("decay"), g["initial_lr"], g["weight_decay"]) for g in opt.param_groups],
            "dropout": drop}

    def on_eval(self, state, logs):
        self._read(state)

    def on_step(self, state, logs):
        self._read(state)


def _check_applied(read, hp, ratio):
    for group, decay, initial_lr, wd in read["groups"]:
        assert initial_lr == pytest.approx(hp["lr"] * (ratio if group == "encoder" else 1.0))
        assert wd == pytest.approx(hp["weight_decay"] if decay else 0.0)
    assert read["dropout"] == [pytest.approx(hp["dropout"])]


def test_exploit_and_replay_really_change_the_optimizer_and_dropout(home):
    """End to end: after every exploit/explore the recipient's optimizer param groups and head Dropouts hold the
    new values (read back from the objects, not from the callback's copy), and so does a replay at each change."""
    tracker = Tracker(home)
    cfg = tiny_cfg(epochs=2)
    probe = ReadBack()
    res = run_pbt(cfg, pbt=tiny_pbt(), home=home, tracker=tracker, callbacks=[probe])
    ratio = cfg.train.encoder_lr / cfg.train.head_lr
    explores = [e["payload"] for e in tracker.get_events(res.parent_run_id, kinds=["pbt_explore"])]
    assert explores
    for x in explores:
        _check_applied(probe.seen[x["recipient_run_id"]][x["step"]], x["new"], ratio)

    replay_probe = ReadBack()
    rep = replay_schedule(res.best_config, res.schedule, home=home, tracker=tracker, callbacks=[replay_probe])
    changes = tracker.get_events(rep.run_id, kinds=["pbt_replay_change"])
    assert len(changes) == len(res.schedule) - 1
    for e in changes:
        _check_applied(replay_probe.seen[rep.run_id][e["payload"]["step"]], e["payload"], ratio)


def test_time_limit_is_every_members_timeout(home):
    tracker = Tracker(home)
    cfg = tiny_cfg(epochs=20)
    cfg.train.time_limit_min = 1e-9
    res = run_pbt(cfg, pbt=tiny_pbt(), home=home, tracker=tracker)
    assert [m["status"] for m in res.members] == ["finished"] * 3
    for m in res.members:
        assert tracker.get_run(m["run_id"])["config"]["train"]["time_limit_min"] == 1e-9
        assert tracker.get_events(m["run_id"], kinds=["time_limit"])  # stopped by it, not by its 20 epochs
    assert tracker.get_run(res.parent_run_id)["status"] == "finished"


class FailIn(Callback):
    def __init__(self, members, at_step=2):
        self.members, self.at_step = members, at_step

    def on_step(self, state, logs):
        if state.extra.get("pbt_member") in self.members and state.step >= self.at_step:
            raise RuntimeError("boom in a member")


def test_a_failing_member_does_not_stop_the_others(home):
    tracker = Tracker(home)
    res = run_pbt(tiny_cfg(epochs=1), pbt=tiny_pbt(population=2), home=home, tracker=tracker,
                  callbacks=[FailIn({1})])
    assert [m["status"] for m in res.members] == ["finished", "failed"]
    assert res.best_member == 0 and "boom" in res.members[1]["error"]
    assert tracker.get_run(res.members[1]["run_id"])["status"] == "failed"
    assert tracker.get_run(res.parent_run_id)["status"] == "finished"
    assert tracker.get_events(res.parent_run_id, kinds=["pbt_member_failed"])

    with pytest.raises(DactLabError, match="no member finished"):
        run_pbt(tiny_cfg(epochs=1), pbt=tiny_pbt(population=2), home=home, tracker=tracker,
                callbacks=[FailIn({0, 1})])
    assert tracker.list_runs(kind="pbt")[0]["status"] == "failed"


class CancelAt(Callback):
    def __init__(self, token, step):
        self.token, self.step = token, step

    def on_step(self, state, logs):
        if state.step >= self.step:
            self.token.cancel("stop the population")


def test_cancellation_stops_every_member(home):
    tracker = Tracker(home)
    token = CancelToken()
    with pytest.raises(Cancelled, match="stop the population"):
        run_pbt(tiny_cfg(epochs=5), pbt=tiny_pbt(), home=home, tracker=tracker, cancel=token,
                callbacks=[CancelAt(token, 3)])
    parent = tracker.list_runs(kind="pbt")[0]
    assert parent["status"] == "cancelled"
    members = tracker.list_runs(parent_id=parent["id"])
    assert len(members) == 3 and {m["status"] for m in members} == {"cancelled"}
    for m in members:
        steps = tracker.get_metrics(m["id"], names=["train_loss"])["step"]
        assert steps.empty or steps.max() <= 8  # far from 5 epochs (>= 15 steps)


# --- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(population=1), r"pbt\.population = 1 .*expected 2 to 64 members"),
    (dict(quantile=0.7), r"pbt\.quantile = 0\.7 .*\(0, 0\.5\]"),
    (dict(metric="val_bleu"), r"pbt\.metric = 'val_bleu' .*val_accuracy"),
    (dict(ready_every_steps=5), r"pbt\.ready_every_epochs .*not both"),
    (dict(ready_every_epochs=None), r"pbt\.ready_every_steps .*ready_every_epochs"),
    (dict(resample_prob=1.5), r"pbt\.resample_prob = 1\.5"),
    (dict(perturb_factors=(0.8, -1.0)), r"pbt\.perturb_factors"),
    (dict(dropout_scope="encoder"), r"pbt\.dropout_scope = 'encoder' .*'head', 'all'"),
    (dict(space=PBTSpace(lr=[1e-3, 1e-5])), r"pbt\.space\.lr = \[0\.001, 1e-05\] .*low <= high"),
    (dict(space=PBTSpace(weight_decay=[0.0, 1e-2])), r"pbt\.space\.weight_decay .*positive"),
    (dict(space=PBTSpace(batch_sizes=[])), r"pbt\.space\.batch_sizes = \[\]"),
    (dict(space=PBTSpace(activations=["swish"])), r"pbt\.space\.activations = \['swish'\] .*relu"),
    (dict(space=PBTSpace(hidden_layers=[1, 2.5])), r"pbt\.space\.hidden_layers .*integers"),
])
def test_config_validation_names_field_value_and_allowed(change, match):
    with pytest.raises(ConfigError, match=match):
        PBTConfig(**change).validate()


def test_config_defaults_round_trip_and_member_config():
    pbt = PBTConfig().validate()
    assert pbt.population == 4 and pbt.quantile == 0.2 and pbt.perturb_factors == (0.8, 1.2)
    assert PBTConfig.from_dict(pbt.to_dict()) == pbt
    with pytest.raises(ConfigError, match="Unknown setting"):
        PBTConfig.from_dict({"populaton": 3})
    cfg = tiny_cfg(epochs=2)
    hp = {"lr": 2e-3, "weight_decay": 1e-4, "dropout": 0.3, "warmup_ratio": 0.1}
    mc = member_config(cfg, pbt, 1, hp, 32, {"hidden_layers": 3, "activation": "silu"}, train_size=96)
    assert mc.model.head.hidden_dims == [256, 256, 256] and mc.model.head.activation == "silu"
    assert mc.model.head.dropout == 0.3 and mc.train.batch_size == 32 and mc.train.seed == cfg.train.seed + 1
    assert mc.train.head_lr == 2e-3 and mc.train.encoder_lr == pytest.approx(2e-3 * 5e-5 / 1e-3)
    assert mc.train.eval_every_steps == 2  # half an epoch of ceil(96 / 32) = 3 steps
    assert mc.train.early_stopping.metric == "val_accuracy" and not mc.train.early_stopping.enabled
    assert cfg.model.head.hidden_dims == [256]  # the base config is untouched
    with pytest.raises(ConfigError, match="schedule"):
        replay_schedule(cfg, [{"step": 0, "lr": 1e-3}])


@pytest.mark.parametrize("kind", ["dact", "multitask"])
def test_run_pbt_other_kinds(home, kind):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows, cfg.data.max_seq_len, cfg.train.epochs, cfg.train.device = 120, 32, 1, "cpu"
    tracker = Tracker(home)
    res = run_pbt(cfg.validate(), pbt=tiny_pbt(population=2, metric="val_accuracy", quantile=0.5), home=home,
                  tracker=tracker)
    assert [m["status"] for m in res.members] == ["finished", "finished"]
    loaded = load_model(res.best_run_id, home)
    mlp = loaded.config.model.classifier if kind == "dact" else loaded.config.model.head
    arch = res.architecture
    assert len(mlp.hidden_dims) == arch["hidden_layers"] and mlp.activation == arch["activation"]
    heads = loaded.model.classifiers if kind == "dact" else loaded.model.heads
    assert dropout_targets(loaded.model) == [heads]


def test_gradual_unfreeze_is_refused(home):
    cfg = tiny_cfg()
    cfg.train.freeze_layers, cfg.train.gradual_unfreeze = 1, True
    with pytest.raises(ConfigError, match="train.gradual_unfreeze = True .*same trainable"):
        run_pbt(cfg, pbt=tiny_pbt(), home=home)


def test_a_population_too_small_to_exploit_is_refused_naming_the_rule():
    """The quantile rule keeps at least one member each side, so a population of 2 exploits (one copies the other,
    here the better one); 1 is refused with the rule and the smallest population."""
    from dact_lib.errors import ConfigError

    assert select_quantiles({"a": 0.4, "b": 0.6}, 0.2) == (["a"], ["b"])
    with pytest.raises(ConfigError, match=r"floor\(population × quantile\).*2 is the smallest population that exploits"):
        PBTConfig(population=1).validate()
    assert PBTConfig(population=2).validate().population == 2
