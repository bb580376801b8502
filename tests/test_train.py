"""The one training loop: optimizer groups, schedule, early stopping, OOM handling, cancellation, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from dact_lib.callbacks import Callback, CancelToken
from dact_lib.config import EarlyStoppingConfig, default_config
from dact_lib.data import load_demo_dataset
from dact_lib.errors import Cancelled, DactLabError
from dact_lib.models import build_model
from dact_lib.train import (BatchSizeManager, EarlyStopping, apply_freezing, make_optimizer, param_groups, train,
                            warmup_linear)
from dact_lib.tracker import Tracker


def tiny_cfg(kind="backbone", epochs=2, **train_kw):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.epochs = epochs
    cfg.train.batch_size = 16
    cfg.train.log_every_steps = 2
    cfg.train.device = "cpu"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


# --- optimisation pieces ---------------------------------------------------------------------------------

def test_param_groups_split_lr_and_decay():
    cfg = tiny_cfg(weight_decay=0.05, encoder_lr=1e-5, head_lr=1e-3)
    cfg.train.freeze_embeddings = False
    model, _ = build_model(cfg, load_demo_dataset().label_maps)
    groups = {(g["group"], g["decay"]): g for g in param_groups(model, cfg.train)}
    assert groups[("encoder", True)]["lr"] == 1e-5 and groups[("head", True)]["lr"] == 1e-3
    assert groups[("encoder", False)]["weight_decay"] == 0.0 and groups[("head", False)]["weight_decay"] == 0.0
    assert groups[("encoder", True)]["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[id(p)] for p in groups[("encoder", False)]["params"]]
    assert no_decay and all(n.endswith("bias") or "LayerNorm" in n for n in no_decay)
    decay = [names[id(p)] for p in groups[("encoder", True)]["params"]]
    assert not any(n.endswith("bias") or "LayerNorm" in n for n in decay)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable


def test_warmup_then_linear_decay():
    f = warmup_linear(total_steps=10, warmup_ratio=0.2)  # 2 warmup steps
    assert [round(f(s), 4) for s in range(11)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]


def test_freezing_and_gradual_unfreeze():
    cfg = tiny_cfg(freeze_layers=2, gradual_unfreeze=True)
    model, _ = build_model(cfg, load_demo_dataset().label_maps)
    from dact_lib.encoders import layer_adapter

    ad = layer_adapter(model.encoder)
    assert apply_freezing(model, cfg.train, epoch=0) == 2
    assert not any(p.requires_grad for p in ad.embedding_module().parameters())
    assert not any(p.requires_grad for layer in ad.layers() for p in layer.parameters())
    assert apply_freezing(model, cfg.train, epoch=1) == 1  # the top frozen layer is released first
    assert not any(p.requires_grad for p in ad.layers()[0].parameters())
    assert all(p.requires_grad for p in ad.layers()[1].parameters())
    assert apply_freezing(model, cfg.train, epoch=5) == 0


def test_gradual_unfreeze_in_the_loop_keeps_the_optimizer_and_the_schedule():
    cfg = tiny_cfg(epochs=3, freeze_layers=2, gradual_unfreeze=True, warmup_ratio=0.0)
    cfg.train.early_stopping.enabled = False
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    from dact_lib.encoders import layer_adapter

    layers = layer_adapter(model.encoder).layers()
    before = [[p.detach().clone() for p in layer.parameters()] for layer in layers[:2]]
    seen = {}

    class Probe(Callback):
        def on_start(self, state):
            seen["optimizer"] = state.optimizer
            seen["group_params"] = {id(p) for g in state.optimizer.param_groups for p in g["params"]}

        def on_epoch_end(self, state, logs):  # the live weights (train() restores the best epoch at the end)
            seen["last"] = [[p.detach().clone() for p in layer.parameters()] for layer in layers[:2]]

        def on_event(self, state, kind, payload):
            if kind == "unfreeze":
                opt = state.optimizer
                factor = state.lr_schedule(state.step)
                seen.setdefault("unfreeze", []).append(
                    (payload["frozen_layers"], opt is seen["optimizer"],
                     [(g["lr"], g["initial_lr"] * factor) for g in opt.param_groups]))

    train(cfg, save=False, evaluate_test=False, model=model, tokenizer=tok, callbacks=[Probe()])
    # the layers to be released are in the optimizer from the start
    assert all(id(p) in seen["group_params"] for layer in layers[:2] for p in layer.parameters())
    assert [u[0] for u in seen["unfreeze"]] == [1, 0]
    for _, same, lrs in seen["unfreeze"]:
        assert same  # no new optimizer: AdamW moments of the layers already training are kept
        assert all(lr == pytest.approx(want) for lr, want in lrs)  # the decayed lr, not the peak again
    # layer 1 (released after epoch 1) and layer 0 (after epoch 2) both trained; neither did while frozen
    changed = [any(not torch.equal(a, b) for a, b in zip(old, new)) for old, new in zip(before, seen["last"])]
    assert changed == [True, True]


def test_gradual_unfreeze_lr_does_not_jump_back_to_the_peak():
    cfg = tiny_cfg(epochs=3, freeze_layers=1, gradual_unfreeze=True, warmup_ratio=0.0)
    cfg.train.early_stopping.enabled = False
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    lrs = []

    class Probe(Callback):
        def on_event(self, state, kind, payload):
            if kind == "unfreeze":
                lrs.append([g["lr"] for g in state.optimizer.param_groups if g["group"] == "encoder"])

    train(cfg, save=False, evaluate_test=False, model=model, tokenizer=tok, callbacks=[Probe()])
    assert lrs and all(lr < cfg.train.encoder_lr * 0.9 for lr in lrs[0])  # 1/3 of the steps done: ~2/3 of peak


def test_train_stats_are_counts_over_the_samples_since_the_last_log():
    from dact_lib.train import train_stats

    stats = {"correct/label": torch.tensor(12), "exit_sum": torch.tensor(50)}
    assert train_stats(stats, 20, per_task=False) == {"train_accuracy": 0.6, "train_avg_exit_layer": 2.5}
    two = {"correct/topic": torch.tensor(5), "correct/sentiment": torch.tensor(8)}
    assert train_stats(two, 10, per_task=True) == {"train_accuracy/topic": 0.5, "train_accuracy/sentiment": 0.8}
    assert train_stats({}, 0, per_task=False) == {}


def test_time_limit_stops_after_the_step_that_crosses_it_and_keeps_the_checkpoint(home):
    tracker = Tracker(home)
    cfg = tiny_cfg(epochs=50, time_limit_min=1e-9)  # crossed by the first step
    cfg.train.early_stopping.enabled = False
    res = train(cfg, tracker=tracker, home=home)
    run = tracker.get_run(res.run_id)
    assert run["status"] == "finished" and "time limit" in res.stop_reason
    m = tracker.get_metrics(res.run_id)
    assert m["step"].max() == 1 and len(m[m.name == "val_loss"]) == 1  # one step, then one evaluation
    assert (res.run_dir / "model.safetensors").exists() and res.best_metrics["val_loss"] > 0
    assert [e["payload"]["step"] for e in tracker.get_events(res.run_id, kinds=["time_limit"])] == [1]
    with pytest.raises(DactLabError, match="time_limit_min"):
        tiny_cfg(time_limit_min=-1.0)


def test_metric_direction():
    from dact_lib.train import lower_is_better

    for name in ("val_loss", "val_loss/topic", "val_nll", "val_ponder", "val_avg_exit_layer", "val_error"):
        assert lower_is_better(name), name
    for name in ("val_accuracy", "val_macro_f1", "val_accuracy/sentiment", "val_macro_f1/topic"):
        assert not lower_is_better(name), name
    es = EarlyStopping(EarlyStoppingConfig(metric="val_nll", patience=1, min_epochs=1, regression=10.0))
    assert es.update(0.5)[0] and es.update(0.4)[0] and not es.update(0.45)[0]  # lower nll is the better one


# --- early stopping -------------------------------------------------------------------------------------

def run_stopper(values, **kw):
    es = EarlyStopping(EarlyStoppingConfig(**kw))
    for i, v in enumerate(values):
        _, reason = es.update(v)
        if reason:
            return i, reason
    return None, None


def test_early_stopping_patience():
    i, reason = run_stopper([1.0, 0.9, 0.91, 0.92, 0.905], patience=3, regression=10, trend_window=10)
    assert i == 4 and "patience" in reason


def test_early_stopping_min_delta_counts_tiny_gains_as_no_improvement():
    i, _ = run_stopper([1.0, 0.9999, 0.9998, 0.9997], patience=3, min_delta=0.01, regression=10, trend_window=10)
    assert i == 3
    i, _ = run_stopper([1.0, 0.9999, 0.9998, 0.9997], patience=3, min_delta=0.0, regression=10, trend_window=10)
    assert i is None


def test_early_stopping_regression_20_percent():
    i, reason = run_stopper([1.0, 0.5, 0.55, 0.61], patience=10, regression=0.2, trend_window=10)
    assert i == 3 and "regressed" in reason  # 0.61 is 22% worse than 0.5; 0.55 (10%) is not enough


def test_early_stopping_negative_trend_and_maximised_metric():
    i, reason = run_stopper([0.5, 0.8, 0.79, 0.78, 0.77], metric="val_accuracy", patience=10, regression=0.9,
                            trend_window=3)
    assert i == 4 and "worse 3 evaluations in a row" in reason


def test_early_stopping_min_epochs_and_smoothing():
    i, _ = run_stopper([1.0, 2.0, 3.0], patience=1, min_epochs=3, regression=10, trend_window=10)
    assert i == 2  # would have stopped at index 1 without min_epochs
    es = EarlyStopping(EarlyStoppingConfig(smoothing=2, patience=5))
    for v in (1.0, 0.0, 1.0):
        es.update(v)
    assert es.smoothed == [1.0, 0.5, 0.5]


def test_batch_size_manager_bounds():
    m = BatchSizeManager(32, min_size=8, max_size=64)
    assert [m.shrink(), m.shrink()] == [16, 8]
    with pytest.raises(DactLabError, match="Out of memory"):
        m.shrink()
    assert BatchSizeManager(128, 8, 64).micro == 64


# --- the loop end to end on the tiny encoder ---------------------------------------------------------------

@torch.no_grad()
def accuracy_by_hand(loaded, ds) -> float:
    """The test accuracy of a saved run recomputed from its reloaded model: argmax of each task's answer against the
    labels, row by row (the mean over tasks for a multi-task model), without dact_lib.evaluate."""
    enc = tokenize_rows(loaded, ds)
    out = loaded.model(enc["input_ids"], enc["attention_mask"])
    accs = [float((out.probs[t].argmax(-1) == torch.as_tensor(ds.targets[t])).double().mean()) for t in out.probs]
    return sum(accs) / len(accs)


def tokenize_rows(loaded, ds):
    return loaded.tokenizer(list(ds.texts), truncation=True, max_length=loaded.config.data.max_seq_len,
                            padding=True, return_tensors="pt")


@pytest.mark.parametrize("kind", ["backbone", "dact", "multitask"])
def test_each_kind_trains_and_records(home, kind):
    from dact_lib.models import load_model
    from dact_lib.train import load_split

    tracker = Tracker(home)
    cfg = tiny_cfg(kind, epochs=2)
    if kind == "dact":
        # every halting unit starts at h_n = sigmoid(-20 + small) ~ 1e-8 and the fit after training is off, so at
        # n = 1 (d = 1, a_1 = y_1, p_1 = h_1) the rule best·(1 - p_1) > runner-up + p_1 halts every row: exit 1
        cfg.model.halting_bias_init = -20.0
        cfg.model.fit_halting = False
    res = train(cfg.validate(), tracker=tracker, home=home)
    run = tracker.get_run(res.run_id)
    assert run["status"] == "finished" and run["kind"] == kind
    m = tracker.get_metrics(res.run_id)
    names = set(m["name"])
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "samples_per_s"} <= names
    acc_names = ({"train_accuracy/class_label", "train_accuracy/sentiment_label"} if kind == "multitask"
                 else {"train_accuracy"})
    assert acc_names <= names
    acc = m[m.name.isin(acc_names)]["value"]
    assert ((acc >= 0) & (acc <= 1)).all()
    # the head trains at its own rate, both on the same schedule (the tiny backbone freezes both of its layers)
    assert ("lr_head" in names) == (kind != "backbone")
    if kind != "backbone":
        lr, lr_head = (m[m.name == n].set_index("step")["value"] for n in ("lr", "lr_head"))
        lr, lr_head = lr[lr > 0], lr_head[lr > 0]  # the schedule ends at 0
        assert len(lr) and (lr_head / lr).round(6).eq(round(cfg.train.head_lr / cfg.train.encoder_lr, 6)).all()
    assert ("train_avg_exit_layer" in names) == ("val_avg_exit_layer" in names) == (kind == "dact")
    if kind == "dact":
        # exactly layer 1 (1-based), for every logged training window, every evaluation and the test split
        tr_ex = m[m.name == "train_avg_exit_layer"]["value"]
        assert len(tr_ex) == len(m[m.name == "train_loss"]) and (tr_ex == 1.0).all()
        ex = m[m.name == "val_avg_exit_layer"]["value"]
        # one evaluation per epoch, and one more of the model as saved after the refit of the exits
        assert cfg.model.exit_refit_epochs > 0 and res.report["exit_refit"]
        assert len(ex) == cfg.train.epochs + 1 and (ex == 1.0).all()
        assert res.test_metrics["test_avg_exit_layer"] == 1.0
        assert res.report["exit_histogram"] == {1: 12}
        assert res.test_metrics["test_ponder"] == pytest.approx(0.0, abs=1e-6)  # rho = p_1 + p_2 ~ 0
    if kind == "multitask":
        assert {"val_accuracy/class_label", "val_accuracy/sentiment_label"} <= names
    rd = res.run_dir
    assert (rd / "model.safetensors").exists() and (rd / "config.json").exists()
    assert json.loads((rd / "label_maps.json").read_text()) == res.label_maps
    assert (rd / "encoder.safetensors").exists() == (kind == "backbone")
    # the recorded test accuracy is the saved model's, recomputed by hand on the run's own test split
    split, _ = load_split(cfg)
    loaded = load_model(res.run_id, home, device="cpu")
    assert res.test_metrics["test_accuracy"] == pytest.approx(accuracy_by_hand(loaded, split.test), abs=1e-9)
    assert run["summary"]["test"]["test_accuracy"] == res.test_metrics["test_accuracy"]
    kinds = {a["kind"] for a in tracker.get_artifacts(res.run_id)}
    assert {"model", "config", "label_map"} <= kinds
    assert ("encoder" in kinds) == (kind == "backbone")


def test_deterministic_under_seed(home):
    a = train(tiny_cfg(epochs=1), home=home, save=False)
    b = train(tiny_cfg(epochs=1), home=home, save=False)
    assert a.history[-1]["val_loss"] == pytest.approx(b.history[-1]["val_loss"], abs=1e-6)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_embeddings_stay_frozen(home):
    cfg = tiny_cfg(epochs=1, freeze_layers=0)
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    before = model.encoder.embeddings.word_embeddings.weight.clone()
    layer0 = model.encoder.encoder.layer[0].attention.self.query.weight.clone()
    train(cfg, model=model, tokenizer=tok, save=False)
    assert torch.equal(before, model.encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(layer0, model.encoder.encoder.layer[0].attention.self.query.weight)


def test_backbone_default_freezes_the_lowest_two_layers_and_a_config_can_undo_it(home):
    from dact_lib.config import RunConfig

    assert default_config("backbone").train.freeze_layers == 2
    assert default_config("dact").train.freeze_layers == 0 and default_config("multitask").train.freeze_layers == 0
    assert RunConfig.from_dict({"kind": "backbone", "train": {"freeze_layers": 0}}).train.freeze_layers == 0
    cfg = tiny_cfg(epochs=1, freeze_layers=1)  # the tiny encoder has 2 layers: freeze 1, train 1
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    layers = model.encoder.encoder.layer
    q0, q1 = layers[0].attention.self.query.weight.clone(), layers[1].attention.self.query.weight.clone()
    train(cfg, model=model, tokenizer=tok, save=False)
    assert torch.equal(q0, layers[0].attention.self.query.weight)
    assert not torch.equal(q1, layers[1].attention.self.query.weight)


class CancelAfter(Callback):
    def __init__(self, token, steps):
        self.token, self.steps = token, steps

    def on_step(self, state, logs):
        if state.step >= self.steps:
            self.token.cancel("test cancel")


def test_cancellation_stops_within_a_step_and_is_recorded(home):
    tracker = Tracker(home)
    token = CancelToken()
    with pytest.raises(Cancelled, match="test cancel"):
        train(tiny_cfg(epochs=5), tracker=tracker, home=home, cancel=token, callbacks=[CancelAfter(token, 3)])
    run = tracker.list_runs()[0]
    assert run["status"] == "cancelled"
    steps = tracker.get_metrics(run["id"], names=["train_loss"])["step"]
    assert steps.max() <= 4


class Scramble(Callback):
    """After the first evaluation, wreck the head so every later epoch is worse than epoch 1."""

    def on_epoch_end(self, state, logs):
        if state.epoch == 0:
            with torch.no_grad():
                for p in state.model.head.parameters():
                    p.mul_(0).add_(torch.randn_like(p) * 50)
            for g in state.optimizer.param_groups:
                g["initial_lr"] = 0.0


def test_best_checkpoint_is_restored_at_the_end(home):
    from dact_lib.data import encode
    from dact_lib.evaluate import evaluate_encoded
    from dact_lib.train import load_split

    cfg = tiny_cfg(epochs=3)
    cfg.train.early_stopping.enabled = False
    res = train(cfg, home=home, tracker=Tracker(home), callbacks=[Scramble()])
    losses = [h["val_loss"] for h in res.history]
    assert res.best_epoch == 1 and losses[1] > losses[0]
    split, _ = load_split(cfg)
    again = evaluate_encoded(res.model, encode(split.val, res.tokenizer, 32), 64)
    assert again.loss == pytest.approx(losses[0], rel=1e-5)


class FakeOOM(Callback):
    """Make the model raise an out-of-memory error for any micro-batch larger than 8 rows."""

    def on_start(self, state):
        model = state.model
        orig = model.forward

        def forward(ids, am, targets=None):
            if model.training and ids.shape[0] > 8:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return orig(ids, am, targets)

        model.forward = forward


def test_oom_halves_micro_batch_and_training_goes_on(home):
    tracker = Tracker(home)
    res = train(tiny_cfg(epochs=1, batch_size=32), tracker=tracker, home=home, callbacks=[FakeOOM()])
    assert res.status == "finished"
    events = tracker.get_events(res.run_id, kinds=["oom_retry"])
    assert [e["payload"]["micro_batch"] for e in events] == [16, 8]


def test_oom_micro_batches_give_the_same_gradient():
    cfg = tiny_cfg()
    cfg.model.head.dropout = 0.0
    cfg.train.encoder_dropout = 0.0
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    from dact_lib.callbacks import CallbackList, LoopState
    from dact_lib.data import encode, iter_batches
    from dact_lib.train import train_step

    batch = next(iter_batches(encode(load_demo_dataset(), tok, 32), 16))
    grads = []
    for micro in (16, 4):
        m = BatchSizeManager(16, 1, 64)
        m.micro = micro
        opt = make_optimizer(model, cfg.train)
        for g in opt.param_groups:
            g["lr"] = 0.0
        cfg.train.max_grad_norm = 0.0
        train_step(model, opt, batch, torch.device("cpu"), cfg.train, m, CallbackList(), LoopState())
        grads.append(model.head[1].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_early_stopping_metric_is_named(home):
    cfg = tiny_cfg(epochs=1)
    cfg.train.early_stopping.metric = "val_bleu"
    with pytest.raises(DactLabError, match="val_bleu"):
        train(cfg, home=home, save=False)


def test_multitask_logs_per_task_training_loss_and_kind_defaults_apply_from_files(home):
    from dact_lib.config import RunConfig

    cfg = RunConfig.from_dict({"kind": "multitask", "encoder": "tiny", "train": {"epochs": 1}})
    # the multi-task kind default (patience 2, TrainConfig's is 3) applies; the measured rates are TrainConfig's
    assert (cfg.train.encoder_lr, cfg.train.head_lr, cfg.train.early_stopping.patience) == (5e-5, 1e-3, 2)
    cfg = RunConfig.from_dict({"kind": "multitask", "train": {"head_lr": 3e-4, "early_stopping": {"patience": 5}}})
    assert (cfg.train.encoder_lr, cfg.train.head_lr, cfg.train.early_stopping.patience) == (5e-5, 3e-4, 5)
    tracker = Tracker(home)
    res = train(tiny_cfg("multitask", epochs=1), tracker=tracker, home=home)
    names = set(tracker.get_metrics(res.run_id)["name"])
    assert {"train_loss/class_label", "train_loss/sentiment_label"} <= names
    m = tracker.get_metrics(res.run_id, names=["val_loss"])
    assert len(m) == 1  # one validation per epoch, recorded once


def test_untracked_weights_when_save_is_false(home):
    tracker = Tracker(home)
    res = train(tiny_cfg(epochs=1), tracker=tracker, home=home, save=False)
    assert res.run_dir is None
    assert not (home / "runs" / str(res.run_id) / "model.safetensors").exists()
    assert tracker.get_run(res.run_id)["status"] == "finished"


def test_train_stops_early_when_the_rule_says_so(home):
    """The loop acts on the early-stopping rule: with min_delta larger than any possible gain the run stops after
    1 + patience evaluations, records why and keeps the first epoch's checkpoint."""
    cfg = tiny_cfg("backbone", epochs=6)
    es = cfg.train.early_stopping
    es.enabled, es.patience, es.min_delta, es.regression, es.trend_window = True, 2, 1e6, 1e6, 50
    tr = Tracker(home)
    res = train(cfg, tracker=tr, home=home)
    assert len(res.history) == 3 and res.history[-1]["epoch"] == 3  # epochs 4-6 never ran
    assert res.stop_reason and "patience 2" in res.stop_reason
    stops = tr.get_events(res.run_id, kinds=["early_stop"])
    assert len(stops) == 1 and stops[0]["payload"]["epoch"] == 3


def test_without_saving_the_best_state_is_a_copy_and_is_restored():
    """save=False keeps the best checkpoint in memory: it must be a copy of the weights at that evaluation (not
    references to the live parameters, which training goes on changing), and it is what train() returns."""
    import copy as _copy

    from dact_lib.callbacks import Callback

    class Snap(Callback):
        def __init__(self):
            self.best, self.last = None, None

        def on_event(self, state, kind, payload):
            if kind == "checkpoint":
                self.best = _copy.deepcopy(state.model.state_dict())

        def on_epoch_end(self, state, logs):
            self.last = _copy.deepcopy(state.model.state_dict())

    cfg = tiny_cfg("backbone", epochs=4)
    cfg.train.early_stopping.enabled = False
    cfg.train.early_stopping.metric = "val_accuracy"
    snap = Snap()
    res = train(cfg, save=False, callbacks=[snap])
    got = res.model.state_dict()
    assert any(not torch.equal(snap.last[k], snap.best[k]) for k in got)  # training went on after the best
    assert all(torch.equal(got[k], snap.best[k]) for k in got)


def test_precision_auto_resolves_by_hardware_and_is_recorded(home, monkeypatch):
    from dact_lib import evaluate

    cpu = torch.device("cpu")
    monkeypatch.setattr(evaluate, "native_bf16", lambda device: True)
    assert evaluate.resolve_precision("auto", cpu) == "bf16" and evaluate.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(evaluate, "native_bf16", lambda device: False)
    assert evaluate.resolve_precision("auto", cpu) == "fp32" and evaluate.resolve_precision("bf16", cpu) == "bf16"
    tr = Tracker(home)
    res = train(tiny_cfg("backbone", epochs=1, precision="auto"), tracker=tr, home=home)
    run = tr.get_run(res.run_id)
    assert run["summary"]["precision"] == "fp32"
    assert tr.get_events(res.run_id, kinds=["start"])[0]["payload"]["precision"] == "fp32"


# --- validations per epoch -------------------------------------------------------------------------------

def test_evals_per_epoch_resolves_auto_by_epoch_length():
    from dact_lib.config import AUTO_EVAL_STEPS, evals_per_epoch

    tc = default_config("backbone").train
    assert tc.evals_per_epoch == "auto"
    assert evals_per_epoch(tc, 40) == 1 and evals_per_epoch(tc, AUTO_EVAL_STEPS) == 1  # short epochs: once
    assert evals_per_epoch(tc, AUTO_EVAL_STEPS + 1) == 2 and evals_per_epoch(tc, 3 * AUTO_EVAL_STEPS) == 3
    assert evals_per_epoch(tc, 10 ** 6) == 10  # at most 10 a epoch
    tc.evals_per_epoch = 4
    assert evals_per_epoch(tc, 40) == 4 and evals_per_epoch(tc, 3) == 3  # never more than the epoch's steps
    tc.eval_every_steps = 7
    assert evals_per_epoch(tc, 40) == 1  # eval_every_steps decides instead
    for bad in (0, 101, "often", 2.5, True):
        with pytest.raises(DactLabError, match=r"train.evals_per_epoch = .* is invalid: expected"):
            tiny_cfg(evals_per_epoch=bad)


def test_evals_per_epoch_validates_mid_epoch_and_counts_patience_in_epochs(home):
    tracker = Tracker(home)
    cfg = tiny_cfg(epochs=2, evals_per_epoch=3)
    res = train(cfg, tracker=tracker, home=home)
    start = tracker.get_events(res.run_id, kinds=["start"])[0]["payload"]
    spe = start["steps_per_epoch"]
    assert start["evals_per_epoch"] == 3 and spe >= 3
    steps = sorted(tracker.get_metrics(res.run_id).query("name == 'val_loss'")["step"])
    per_epoch = [round(spe / 3), round(2 * spe / 3), spe]
    assert steps == per_epoch + [spe + s for s in per_epoch]  # evenly spaced, the last at each epoch's end
    # patience, trend window and min_epochs stay counted in epochs: ×3 evaluations
    es = EarlyStopping(EarlyStoppingConfig(patience=2, trend_window=3, min_epochs=1, regression=10.0), per_epoch=3)
    assert (es.cfg.patience, es.cfg.trend_window, es.cfg.min_epochs) == (6, 9, 3)
    stops = [es.update(v)[1] for v in [1.0] + [2.0] * 6]
    assert stops[:6] == [None] * 6 and "patience 6" in stops[6]  # 5 bad evaluations do not stop it, 6 do
