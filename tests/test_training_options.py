"""Issue 26, item 7: the training options — gradient accumulation (``train.grad_accum_steps``), fp16 with a gradient
scaler on CUDA (``train.precision = "fp16"``, refused on a CPU) and class weighting for single-task runs
(``model.class_weighting``). The CUDA path is exercised by ``bench/gpu_check.py`` (tests/test_gpu_check.py)."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dact_lib import dact
from dact_lib.callbacks import CallbackList, LoopState
from dact_lib.config import default_config
from dact_lib.data import encode, iter_batches, load_demo_dataset, read_csv
from dact_lib.errors import ConfigError
from dact_lib.evaluate import autocast_for, check_precision, grad_scaler_for, resolve_precision
from dact_lib.models import build_model
from dact_lib.tracker import Tracker
from dact_lib.train import BatchSizeManager, load_split, make_optimizer, train, train_step


def tiny_cfg(kind="backbone", **train_kw):
    cfg = default_config(kind, encoder="tiny")
    cfg.data.max_rows = 120
    cfg.data.max_seq_len = 32
    cfg.train.epochs = 1
    cfg.train.batch_size = 16
    cfg.train.device = "cpu"
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg.validate()


# --- gradient accumulation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["backbone", "dact"])
def test_grad_accum_4_gives_the_step_of_the_whole_batch(kind):
    """One step with batch 16 and grad_accum_steps 4 (four micro-batches of 4) = one step with batch 16 without
    accumulation: the same gradients and the same weights after the step, up to float rounding (dropout off)."""
    cfg = tiny_cfg(kind, encoder_dropout=0.0, freeze_embeddings=False)
    head = cfg.model.classifier if kind == "dact" else cfg.model.head
    head.dropout = 0.0
    torch.manual_seed(0)
    model, tok = build_model(cfg, load_demo_dataset().label_maps)
    batch = next(iter_batches(encode(load_demo_dataset(), tok, 32), 16, shuffle=True, seed=1))
    results = []
    for accum in (1, 4):
        m = copy.deepcopy(model)
        tc = copy.deepcopy(cfg.train)
        tc.grad_accum_steps = accum
        memory = BatchSizeManager(tc.batch_size, tc.min_batch_size, tc.max_batch_size, tc.grad_accum_steps)
        assert memory.micro == 16 // accum
        opt = make_optimizer(m, tc)
        loss, _ = train_step(m, opt, batch, torch.device("cpu"), tc, memory, CallbackList(), LoopState())
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results.append((float(loss), grads, {n: p.detach().clone() for n, p in m.named_parameters()}))
    (loss1, g1, w1), (loss4, g4, w4) = results
    assert loss1 == pytest.approx(loss4, rel=1e-5)
    assert g1.keys() == g4.keys() and len(g1) > 10
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-6, rtol=1e-4), n
    changed = 0
    for n in w1:
        assert torch.allclose(w1[n], w4[n], atol=1e-6), n
        changed += not torch.equal(w1[n], dict(model.named_parameters())[n])
    assert changed > 10  # the step did move the weights


def test_grad_accum_is_validated_and_trains_in_the_loop(home):
    for bad in (0, 17):
        with pytest.raises(ConfigError, match="train.grad_accum_steps"):
            tiny_cfg(grad_accum_steps=bad)
    seen = {}
    from dact_lib.callbacks import Callback

    class Spy(Callback):
        def on_step(self, state, logs):
            seen["micro"] = state.micro_batch

    res = train(tiny_cfg(grad_accum_steps=4, max_steps=2), home=home, save=False, callbacks=[Spy()])
    assert res.status == "finished" and seen["micro"] == 4


# --- fp16 ------------------------------------------------------------------------------------------------------

def test_fp16_is_refused_on_a_cpu_and_evaluates_in_fp32_there(home):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="fp16 training needs a CUDA GPU"):
        tiny_cfg(precision="fp16")  # device "cpu": refused when the config is validated
    with pytest.raises(ConfigError, match="fp16 training needs a CUDA GPU"):
        check_precision("fp16", cpu)
    check_precision("fp16", torch.device("cuda"))  # no device needed to say yes
    assert resolve_precision("fp16", cpu) == "fp32" and resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert isinstance(autocast_for(cpu, "fp16"), nullcontext) and grad_scaler_for(cpu, "fp16") is None
    assert grad_scaler_for(cpu, "bf16") is None
    if not torch.cuda.is_available():  # device "auto" on this machine: the CPU, refused before any run is recorded
        cfg = default_config("backbone", encoder="tiny")
        cfg.data.max_rows = 120
        cfg.train.precision = "fp16"
        tracker = Tracker(home)
        with pytest.raises(ConfigError, match="'fp16' is invalid on cpu"):
            train(cfg.validate(), tracker=tracker, home=home)
        assert tracker.list_runs() == []
        from dact_lib.cli import main

        assert main(["train", "--kind", "backbone", "--encoder", "tiny", "--precision", "fp16", "--max-rows", "60",
                     "--home", str(home)]) == 3  # a refused input


# --- class weighting -------------------------------------------------------------------------------------------

def imbalanced(n_a=72, n_b=24, n_c=12):
    rows = [(f"alpha sentence {i}", "a") for i in range(n_a)] + [(f"beta sentence {i}", "b") for i in range(n_b)] \
        + [(f"gamma sentence {i}", "c") for i in range(n_c)]
    return read_csv(pd.DataFrame(rows, columns=["text", "label"]))


@pytest.mark.parametrize("kind", ["backbone", "dact"])
def test_balanced_class_weights_are_n_over_k_count_on_the_training_split(home, kind):
    cfg = tiny_cfg(kind, max_steps=1)
    cfg.data.max_rows = None
    cfg.model.class_weighting = "balanced"
    if kind == "dact":
        cfg.model.fit_halting, cfg.model.exit_refit_epochs = False, 0
    data = imbalanced()
    res = train(cfg.validate(), data=data, home=home, save=False)
    split, _ = load_split(cfg, None, data)
    counts = np.bincount(split.train.targets["label"], minlength=3)
    assert counts.tolist() == [58, 18, 10]  # the stratified train part of 72 / 24 / 12 (80%)
    expected = counts.sum() / (3 * counts)
    assert torch.allclose(res.model.class_weight, torch.tensor(expected, dtype=torch.float32))
    assert res.model.class_weighted and "class_weight" not in res.model.state_dict()  # not saved with the model
    # the loss is the class-weighted mean (backbone: cross-entropy; DACT: the NLL of a_N and of every exit)
    enc = encode(split.train, res.tokenizer, 32)
    b = next(iter_batches(enc, 32))
    model = res.model.eval()
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"], b["targets"])
        t = b["targets"]["label"]
        w = model.class_weight
        if kind == "backbone":
            logits = torch.log(out.probs["label"])
            assert float(out.loss) == pytest.approx(float(F.cross_entropy(logits, t, weight=w)), rel=1e-4)
        else:
            a_N = out.probs["label"]  # the answer of the forward pass is a_N (no export policy set)
            nll = F.nll_loss(torch.log(a_N.clamp(min=1e-8)), t, weight=w)
            assert float(out.task_losses["label"]) == pytest.approx(float(nll), rel=1e-4)
            y = out.extras["y"]
            by_hand = -(torch.log(y.clamp(min=1e-8)).gather(2, t.view(-1, 1, 1).expand(-1, y.shape[1], 1))
                        .squeeze(2) * w[t][:, None]).sum(0).div(w[t].sum()).mean()
            assert float(out.extras["layer_nll"]) == pytest.approx(float(by_hand), rel=1e-4)


def test_dact_loss_class_weight_of_ones_is_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(6, 3, 4, generator=g), -1)
    h = torch.sigmoid(torch.randn(6, 3, generator=g))
    a, p = dact.accumulate(y, h)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    plain = dact.dact_loss(a[:, -1], p, t, 0.1, y=y, layer_loss_weight=1.0)
    ones = dact.dact_loss(a[:, -1], p, t, 0.1, y=y, layer_loss_weight=1.0, class_weight=torch.ones(4))
    assert torch.allclose(plain.loss, ones.loss) and torch.allclose(plain.layer_nll, ones.layer_nll)


def test_class_weighting_is_validated_and_a_cli_flag(home):
    cfg = default_config("dact")
    cfg.model.class_weighting = "inverse"
    with pytest.raises(ConfigError, match="model.class_weighting"):
        cfg.validate()
    from dact_lib.cli import build_parser
    from dact_lib.cli_args import config_and_options

    args = build_parser().parse_args(["train", "--kind", "backbone", "--class-weighting", "balanced",
                                      "--grad-accum-steps", "2"])
    cfg, _ = config_and_options(args)
    assert cfg.model.class_weighting == "balanced" and cfg.train.grad_accum_steps == 2

