"""Tests of dact_lib.dact — every expected number below is worked out by hand in the comments.

Notation of the spec, ../shared/docs/dact_spec.md (outside the repo: shared with every developer and CI):
p_0 = 1, a_0 = 0;  a_n = p_{n-1} y_n + (1 - p_{n-1}) a_{n-1};  p_n = h_n p_{n-1};  rho = sum_n p_n;
halt at n iff best (1 - p_n)^d > runner_up + p_n d with d = N - n.
The tests named test_mistake_* each fail on one of the spec's six mistakes.
"""
from __future__ import annotations

import math

import pytest
import torch

from dact_lib.dact import (
    DactPolicy,
    EntropyPolicy,
    ExitResult,
    FixedDepthPolicy,
    PatiencePolicy,
    accumulate,
    accumulate_step,
    average_exit_layer,
    dact_loss,
    entropy,
    make_policy,
    ponder_cost,
    run_policy_offline,
    should_halt,
)
from dact_lib.errors import ConfigError

T = torch.tensor


def close(x, expected, tol=1e-6):
    return torch.allclose(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64),
                          atol=tol, rtol=0)


# --- the 1-sample, 3-layer, 2-class example used throughout -----------------------------------------------------
# y_1 = [0.8, 0.2], y_2 = [0.6, 0.4], y_3 = [0.3, 0.7];  h = [0.5, 0.4, 0.9]
# n=1: a_1 = 1*y_1 + 0           = [0.8, 0.2]                          p_1 = 0.5*1   = 0.5
# n=2: a_2 = 0.5*y_2 + 0.5*a_1   = [0.3+0.4, 0.2+0.1] = [0.7, 0.3]     p_2 = 0.4*0.5 = 0.2
# n=3: a_3 = 0.2*y_3 + 0.8*a_2   = [0.06+0.56, 0.14+0.24] = [0.62, 0.38]  p_3 = 0.9*0.2 = 0.18
# rho = 0.5 + 0.2 + 0.18 = 0.88   (whereas sum h = 1.8)
def example():
    y = T([[[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]])
    h = T([[0.5, 0.4, 0.9]])
    return y, h


def test_accumulate_step_by_hand():
    # a_prev = [0.8, 0.2], p_prev = 0.5, y = [0.6, 0.4], h = 0.4  ->  a = [0.7, 0.3], p = 0.2
    a, p = accumulate_step(T([[0.8, 0.2]]), T([0.5]), T([[0.6, 0.4]]), T([0.4]))
    assert close(a, [[0.7, 0.3]]) and close(p, [0.2])


def test_accumulate_by_hand():
    y, h = example()
    a, p = accumulate(y, h)
    assert a.shape == (1, 3, 2) and p.shape == (1, 3)
    assert close(a[0], [[0.8, 0.2], [0.7, 0.3], [0.62, 0.38]])
    assert close(p[0], [0.5, 0.2, 0.18])
    assert close(a[0, -1].sum(), 1.0)  # a_N is a convex mix of probability vectors


def test_accumulate_is_a_convex_mix_on_random_batch():
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(4, 5, 3, generator=g), dim=-1)
    h = torch.sigmoid(torch.randn(4, 5, generator=g))
    a, p = accumulate(y, h)
    assert close(a.sum(-1), torch.ones(4, 5))
    assert bool((a >= 0).all()) and bool((p > 0).all()) and bool((p[:, 1:] <= p[:, :-1]).all())


def test_gradients_flow_to_y_and_h():
    # a_3 = p_2 y_3 + (1 - p_2) a_2,  a_2 = h_1 y_2 + (1 - h_1) y_1,  p_2 = h_1 h_2
    # d a_3[0]/d h_1 = h_2 (y_3 - a_2)[0] + (1 - p_2)(y_2 - y_1)[0] = 0.4*(0.3-0.7) + 0.8*(0.6-0.8) = -0.32
    # d a_3[0]/d h_2 = h_1 (y_3 - a_2)[0] = 0.5*(-0.4) = -0.2;   d a_3/d h_3 = 0 (h_3 only enters p_3)
    # d a_3[0]/d y_n[0] = weights of the mix: y_1: (1-p_2)(1-h_1) = 0.4, y_2: (1-p_2) h_1 = 0.4, y_3: p_2 = 0.2
    y, h = example()
    y.requires_grad_(True)
    h.requires_grad_(True)
    a, p = accumulate(y, h)
    a[0, -1, 0].backward()
    assert close(h.grad[0], [-0.32, -0.2, 0.0])
    assert close(y.grad[0, :, 0], [0.4, 0.4, 0.2])
    assert close(y.grad[0, :, 1], [0.0, 0.0, 0.0])

    # through the ponder cost: rho = h_1 + h_1 h_2 + h_1 h_2 h_3
    # d rho/d h = [1 + h_2 + h_2 h_3, h_1 + h_1 h_3, h_1 h_2] = [1 + 0.4 + 0.36, 0.5 + 0.45, 0.2] = [1.76, 0.95, 0.2]
    h2 = example()[1].requires_grad_(True)
    _, p2 = accumulate(example()[0], h2)
    ponder_cost(p2).sum().backward()
    assert close(h2.grad[0], [1.76, 0.95, 0.2])


def test_ponder_cost():
    p = T([[0.5, 0.2, 0.18], [0.5, 0.25, 0.05]])
    assert close(ponder_cost(p), [0.88, 0.8])
    assert close(ponder_cost(p, start_at_one=True), [1.88, 1.8])


def test_dact_loss_by_hand():
    # sample 0: a_N = [0.62, 0.38], target 1: -ln 0.38 = 0.9675840;  rho = 0.88
    # sample 1: a_N = [0.75, 0.25], target 0: -ln 0.75 = 0.2876821;  rho = 0.5 + 0.25 + 0.05 = 0.8
    # nll = (0.9675840 + 0.2876821)/2 = 0.6276331;  mean rho = 0.84;  loss = 0.6276331 + 0.1*0.84 = 0.7116331
    a_N = T([[0.62, 0.38], [0.75, 0.25]])
    p = T([[0.5, 0.2, 0.18], [0.5, 0.25, 0.05]])
    targets = T([1, 0])
    out = dact_loss(a_N, p, targets, ponder_lambda=0.1)
    assert close(out.nll, 0.6276331) and close(out.ponder, 0.84) and close(out.loss, 0.7116331)
    assert out.loss.dim() == 0 and out.nll.dim() == 0 and out.ponder.dim() == 0
    # start_at_one: rho + 1 -> mean 1.84, loss = 0.6276331 + 0.184 = 0.8116331
    out1 = dact_loss(a_N, p, targets, ponder_lambda=0.1, start_at_one=True)
    assert close(out1.nll, 0.6276331) and close(out1.ponder, 1.84) and close(out1.loss, 0.8116331)


def test_dact_loss_layer_term_by_hand():
    # same a_N, p, targets as above, plus per-layer y [B=2, N=3, K=2]:
    # sample 0 (target 1): y_1[1] = 0.4, y_2[1] = 0.5, y_3[1] = 0.2 -> -ln: 0.9162907, 0.6931472, 1.6094379
    # sample 1 (target 0): y_1[0] = 0.9, y_2[0] = 0.6, y_3[0] = 0.8 -> -ln: 0.1053605, 0.5108256, 0.2231436
    # layer_nll = mean of the six = 4.0582055 / 6 = 0.6763676
    # loss = 0.6276331 + 0.1*0.84 + 0.5*0.6763676 = 1.0498169
    a_N = T([[0.62, 0.38], [0.75, 0.25]])
    p = T([[0.5, 0.2, 0.18], [0.5, 0.25, 0.05]])
    y = T([[[0.6, 0.4], [0.5, 0.5], [0.8, 0.2]], [[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]]])
    targets = T([1, 0])
    out = dact_loss(a_N, p, targets, ponder_lambda=0.1, y=y, layer_loss_weight=0.5)
    assert close(out.nll, 0.6276331) and close(out.ponder, 0.84)
    assert close(out.layer_nll, 0.6763676) and close(out.loss, 1.0498169)
    # weight 0 is exactly the spec's loss, whether or not y is given
    plain = dact_loss(a_N, p, targets, ponder_lambda=0.1, y=y)
    assert plain.layer_nll is None and close(plain.loss, 0.7116331)
    # the layer term reaches every classifier: with weight 1 and p = 0 after layer 1 (a_N = y_1), y_2 and y_3 still
    # get gradient, which the spec's loss alone would not give them
    y_leaf = y.clone().requires_grad_(True)
    h0 = torch.zeros(2, 3)
    a, pp = accumulate(y_leaf, h0)
    dact_loss(a[:, -1], pp, targets, 0.0).loss.backward()
    assert y_leaf.grad[:, 1:].abs().sum() == 0
    y_leaf.grad = None
    a, pp = accumulate(y_leaf, h0)
    dact_loss(a[:, -1], pp, targets, 0.0, y=y_leaf, layer_loss_weight=1.0).loss.backward()
    assert (y_leaf.grad[:, 1:].abs().sum(-1) > 0).all()


def test_dact_loss_layer_term_errors():
    a_N, p, targets = T([[0.62, 0.38]]), T([[0.5, 0.2]]), T([1])
    with pytest.raises(ValueError, match="needs the per-layer probabilities"):
        dact_loss(a_N, p, targets, 0.1, layer_loss_weight=1.0)
    with pytest.raises(ValueError, match="y must have shape"):
        dact_loss(a_N, p, targets, 0.1, y=T([[[0.5, 0.5]]]), layer_loss_weight=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        dact_loss(a_N, p, targets, 0.1, y=T([[[0.5, 0.5], [0.4, 0.6]]]), layer_loss_weight=-1.0)


def test_dact_loss_clamps_zero_probability():
    # the target class has probability 0: -ln(1e-8) = 18.4206807, finite
    out = dact_loss(T([[1.0, 0.0]]), T([[0.5]]), T([1]), ponder_lambda=0.0)
    assert close(out.nll, 18.4206807, tol=1e-4) and math.isfinite(out.loss.item())


def test_start_at_one_does_not_change_gradients():
    grads = []
    for start_at_one in (False, True):
        y, h = example()
        y = torch.cat([y, y.flip(-1)])
        h = torch.cat([h, h * 0.5])
        y.requires_grad_(True)
        h.requires_grad_(True)
        a, p = accumulate(y, h)
        out = dact_loss(a[:, -1], p, T([1, 0]), ponder_lambda=0.5, start_at_one=start_at_one)
        out.loss.backward()
        grads.append((y.grad.clone(), h.grad.clone(), out.ponder.item()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0
    assert grads[1][2] == pytest.approx(grads[0][2] + 1.0)


def test_should_halt_both_sides_of_the_boundary():
    # a = [0.6, 0.4], d = 1:  p = 0.10 -> 0.6*0.90 = 0.54 > 0.4 + 0.10 = 0.50  -> halt
    #                          p = 0.15 -> 0.6*0.85 = 0.51 > 0.4 + 0.15 = 0.55  -> go on
    a = T([[0.6, 0.4], [0.6, 0.4]])
    assert should_halt(a, T([0.10, 0.15]), 1).tolist() == [True, False]
    # d = 2, a = [0.9, 0.1]: p = 0.05 -> 0.9*0.9025 = 0.81225 > 0.1 + 0.1 = 0.2 -> halt
    #                        p = 0.5  -> 0.9*0.25   = 0.225   > 0.1 + 1.0 = 1.1 -> go on
    a = T([[0.9, 0.1], [0.9, 0.1]])
    assert should_halt(a, T([0.05, 0.5]), 2).tolist() == [True, False]
    # 3 classes, top-2 = 0.5, 0.3: d = 1, p = 0.1 -> 0.45 > 0.4 halt; p = 0.2 -> 0.4 > 0.5 no
    a = T([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]])
    assert should_halt(a, T([0.1, 0.2]), 1).tolist() == [True, False]
    # per-row remaining: the same row halts with d = 1 and goes on with d = 2
    #   a = [0.6, 0.4], p = 0.1: d=2 -> 0.6*0.81 = 0.486 > 0.4 + 0.2 = 0.6 -> no
    assert should_halt(T([[0.6, 0.4], [0.6, 0.4]]), T([0.1, 0.1]), T([1, 2])).tolist() == [True, False]


def test_should_halt_last_layer_and_single_class():
    # d = 0 always halts, even on an exact tie (0.5 > 0.5 is false for the formula)
    assert should_halt(T([[0.5, 0.5]]), T([0.9]), 0).tolist() == [True]
    assert should_halt(T([[0.5, 0.5]]), T([0.9]), 1).tolist() == [False]
    # K = 1: runner_up = 0.  d=1, p=0.4: 1*0.6 > 0.4 halt;  p=0.5: 0.5 > 0.5 no
    assert should_halt(T([[1.0], [1.0]]), T([0.4, 0.5]), 1).tolist() == [True, False]


# --- the six mistakes ---------------------------------------------------------------------------------------------
def test_mistake_1_remaining_depth_is_N_minus_n():
    # N = 3; y_1 = y_2 = y_3 = [0.9, 0.1]; h = [0.5, 0.6, 0.5]
    # n=1: a_1 = [0.9, 0.1], p_1 = 0.5, d = 2: 0.9*0.25 = 0.225 > 0.1 + 1.0  -> no (same d either way)
    # n=2: a_2 = 0.5*y_2 + 0.5*a_1 = [0.9, 0.1], p_2 = 0.3
    #      right d = N - n = 1: 0.9*0.7 = 0.63 > 0.1 + 0.3 = 0.4  -> halt at 2
    #      wrong d = N - 1 = 2: 0.9*0.49 = 0.441 > 0.1 + 0.6 = 0.7 -> no, would exit at 3
    y = T([[[0.9, 0.1]] * 3])
    h = T([[0.5, 0.6, 0.5]])
    res = run_policy_offline(DactPolicy(), y, h)
    assert res.exit_layer.tolist() == [2]
    assert close(res.probs, [[0.9, 0.1]])
    # the two d's really disagree on this input
    assert should_halt(T([[0.9, 0.1]]), T([0.3]), 1).tolist() == [True]
    assert should_halt(T([[0.9, 0.1]]), T([0.3]), 2).tolist() == [False]


def test_mistake_2_runner_up_side_is_p_times_d_not_p_power_d():
    # a = [0.8, 0.2], p = 0.2, d = 2: left = 0.8*0.8^2 = 0.512
    #   right  p*d  : 0.2 + 0.4  = 0.6   -> 0.512 > 0.6  false: go on
    #   wrong  p**d : 0.2 + 0.04 = 0.24  -> 0.512 > 0.24 true: "everything exits at layer 1"
    assert should_halt(T([[0.8, 0.2]]), T([0.2]), 2).tolist() == [False]
    # in the loop: N = 3, y_1 = y_2 = [0.8, 0.2], h = [0.2, 0.5, 0.5]
    # n=1: a_1 = [0.8, 0.2], p_1 = 0.2, d=2 -> no (above; the wrong version exits here)
    # n=2: a_2 = 0.2*y_2 + 0.8*a_1 = [0.8, 0.2], p_2 = 0.1, d=1: 0.8*0.9 = 0.72 > 0.2 + 0.1 -> halt at 2
    y = T([[[0.8, 0.2], [0.8, 0.2], [0.1, 0.9]]])
    h = T([[0.2, 0.5, 0.5]])
    assert run_policy_offline(DactPolicy(), y, h).exit_layer.tolist() == [2]


def test_mistake_3_ponder_is_sum_of_p_not_h():
    # example(): p = [0.5, 0.2, 0.18] -> rho = 0.88;  sum h = 0.5 + 0.4 + 0.9 = 1.8 (the mistake)
    y, h = example()
    a, p = accumulate(y, h)
    rho = ponder_cost(p)
    assert close(rho, [0.88])
    assert not close(rho, h.sum(1), tol=1e-3)
    out = dact_loss(a[:, -1], p, T([0]), ponder_lambda=1.0)
    assert close(out.ponder, 0.88)


def test_mistake_4_nll_of_log_a_not_cross_entropy():
    # a_N = [0.75, 0.25], target 0: right  -ln 0.75 = 0.2876821
    #   wrong cross_entropy(a_N) = -log softmax([0.75, 0.25])[0] = ln(1 + e^-0.5) = 0.4740770
    out = dact_loss(T([[0.75, 0.25]]), T([[0.1, 0.01]]), T([0]), ponder_lambda=0.0)
    assert close(out.nll, 0.2876821)
    assert close(out.loss, 0.2876821)
    assert not close(out.nll, 0.4740770, tol=1e-3)


def _confident_and_unsure():
    # N = 3. Sample 0 (confident): y_n = [0.99, 0.01], h_n = 0.01
    #   n=1: a_1 = [0.99, 0.01], p_1 = 0.01, d=2: 0.99*0.99^2 = 0.970299 > 0.01 + 0.02 = 0.03 -> halt at 1
    # Sample 1 (unsure): y_n = [0.5, 0.5], h_n = 0.9 -> a_n = [0.5, 0.5], a tie never halts before d = 0 -> N = 3
    y = T([[[0.99, 0.01]] * 3, [[0.5, 0.5]] * 3])
    h = T([[0.01] * 3, [0.9] * 3])
    return y, h


def test_mistake_5_halting_is_per_sample_not_batch_all():
    y, h = _confident_and_unsure()
    res = run_policy_offline(DactPolicy(), y, h)
    assert res.exit_layer.tolist() == [1, 3]  # batch all() would give [3, 3]; any() would give [1, 1]
    assert close(res.probs, [[0.99, 0.01], [0.5, 0.5]])
    assert average_exit_layer(res.exit_layer) == pytest.approx(2.0)
    # online step returns a per-row decision
    pol = DactPolicy()
    state = pol.init_state(2, 3, 2, None, torch.float32)
    halt, answer = pol.step(state, torch.arange(2), 1, y[:, 0], h[:, 0])
    assert halt.tolist() == [True, False]


def test_mistake_6_exit_layers_are_one_based():
    y, h = _confident_and_unsure()
    res = run_policy_offline(DactPolicy(), y, h)
    assert res.exit_layer[0].item() == 1  # halted after the first layer: ran 1 layer (not 0)
    assert res.exit_layer[1].item() == 3  # ran all N = 3 layers (not 2)
    assert res.exit_layer.dtype == torch.long
    assert run_policy_offline(FixedDepthPolicy(1), y).exit_layer.tolist() == [1, 1]
    assert run_policy_offline(EntropyPolicy(0.0), y).exit_layer.tolist() == [3, 3]


# --- other policies -----------------------------------------------------------------------------------------------
def _from_argmax(seqs):
    """y with argmax following seqs; confidence 0.5 + 0.05 n at layer n so every layer's y is distinct."""
    rows = []
    for seq in seqs:
        layers = []
        for n, c in enumerate(seq, start=1):
            top = 0.5 + 0.05 * n
            layers.append([top, 1 - top] if c == 0 else [1 - top, top])
        rows.append(layers)
    return T(rows)


def test_patience_policy_by_hand():
    # argmax sequences, N = 5.  counter: +1 when argmax y_n == argmax y_{n-1}, else 0; exit when counter == t
    # A [0,1,1,1,0]: counters n2..n5 = 0,1,2,-   t=2 -> exit 4;  t=1 -> exit 3
    # B [0,0,1,1,1]: counters        = 1,0,1,2   t=2 -> exit 5;  t=1 -> exit 2
    # C [1,1,1,1,1]: counters        = 1,2,...   t=2 -> exit 3;  t=1 -> exit 2
    y = _from_argmax([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    res = run_policy_offline(PatiencePolicy(2), y)
    assert res.exit_layer.tolist() == [4, 5, 3]
    assert torch.equal(res.probs, torch.stack([y[0, 3], y[1, 4], y[2, 2]]))
    assert run_policy_offline(PatiencePolicy(1), y).exit_layer.tolist() == [3, 2, 2]
    # patience longer than the model: everything runs to N
    assert run_policy_offline(PatiencePolicy(10), y).exit_layer.tolist() == [5, 5, 5]


def test_entropy_function():
    # H([0.5,0.5]) = ln 2 = 0.6931472;  H([0.9,0.1]) = 0.9*0.1053605 + 0.1*2.3025851 = 0.3250830
    # H([1,0]) = 0 (0 log 0 = 0, no NaN);  H(uniform over 4) = ln 4 = 1.3862944
    e = entropy(T([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]))
    assert close(e, [0.6931472, 0.3250830, 0.0])
    assert close(entropy(T([0.25] * 4)), 1.3862944)
    assert not torch.isnan(e).any()


def test_entropy_policy_by_hand():
    # A: entropies 0.693, 0.325, 0.0;  B: 0.693 every layer  (N = 3)
    y = T([[[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], [[0.5, 0.5]] * 3])
    res = run_policy_offline(EntropyPolicy(0.5), y)  # A: 0.325 < 0.5 at n=2; B never -> N
    assert res.exit_layer.tolist() == [2, 3]
    assert close(res.probs, [[0.9, 0.1], [0.5, 0.5]])
    assert run_policy_offline(EntropyPolicy(0.3), y).exit_layer.tolist() == [3, 3]  # A: 0.0 < 0.3 only at n=3
    assert run_policy_offline(EntropyPolicy(0.7), y).exit_layer.tolist() == [1, 1]  # 0.693 < 0.7


def test_fixed_depth_policy():
    y = _from_argmax([[0, 1, 1], [1, 0, 0]])
    res = run_policy_offline(FixedDepthPolicy(2), y)
    assert res.exit_layer.tolist() == [2, 2]
    assert torch.equal(res.probs, y[:, 1])
    assert run_policy_offline(FixedDepthPolicy(3), y).exit_layer.tolist() == [3, 3]
    with pytest.raises(ConfigError, match="exceeds"):
        run_policy_offline(FixedDepthPolicy(4), y)


@pytest.mark.parametrize(
    "policy", [DactPolicy(), PatiencePolicy(100), EntropyPolicy(0.0), FixedDepthPolicy(3)], ids=lambda p: p.name
)
def test_every_row_halts_at_the_last_layer(policy):
    # exact ties, never confident: nothing halts early, and at n == N every row halts
    y = T([[[0.5, 0.5]] * 3] * 2)
    h = T([[0.99] * 3] * 2)
    state = policy.init_state(2, 3, 2, None, torch.float32)
    rows = torch.arange(2)
    for n in (1, 2):
        halt, _ = policy.step(state, rows, n, y[:, n - 1], h[:, n - 1])
        assert halt.tolist() == [False, False]
    halt, _ = policy.step(state, rows, 3, y[:, 2], h[:, 2])
    assert halt.tolist() == [True, True]
    assert run_policy_offline(policy, y, h).exit_layer.tolist() == [3, 3]


def _random_outputs(seed, bsz=12, n_layers=5, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.softmax(3 * torch.randn(bsz, n_layers, k, generator=g), dim=-1)
    h = torch.sigmoid(torch.randn(bsz, n_layers, generator=g) - 1.5)
    return y, h


@pytest.mark.parametrize(
    "policy", [DactPolicy(), PatiencePolicy(2), EntropyPolicy(0.4), FixedDepthPolicy(2)], ids=lambda p: p.name
)
def test_online_with_dropped_rows_equals_offline(policy):
    y, h = _random_outputs(1)
    bsz, n_layers, k = y.shape
    offline = run_policy_offline(policy, y, h)

    # online, as the model does it: each layer is computed only for the rows still running, in a permuted order
    state = policy.init_state(bsz, n_layers, k, None, y.dtype)
    exit_layer = torch.full((bsz,), -1, dtype=torch.long)
    probs = torch.full((bsz, k), float("nan"))
    rows = torch.randperm(bsz, generator=torch.Generator().manual_seed(7))
    for n in range(1, n_layers + 1):
        y_n = y[rows, n - 1].clone()  # "the model's layer n" on the shrunken batch
        halt, answer = policy.step(state, rows, n, y_n, h[rows, n - 1].clone())
        exit_layer[rows[halt]] = n
        probs[rows[halt]] = answer[halt]
        rows = rows[~halt]
    assert rows.numel() == 0
    assert torch.equal(exit_layer, offline.exit_layer)
    assert torch.allclose(probs, offline.probs, atol=1e-6)

    # and each sample alone (batch size 1) gives the same result: no state leaks between rows
    for i in range(bsz):
        single = run_policy_offline(policy, y[i : i + 1], h[i : i + 1])
        assert single.exit_layer.item() == offline.exit_layer[i].item()
        assert torch.allclose(single.probs[0], offline.probs[i], atol=1e-6)


def test_dact_policy_matches_full_accumulation_reference():
    # reference without row dropping: accumulate everything, exit at the first n where the rule holds
    y, h = _random_outputs(2, bsz=16)
    n_layers = y.shape[1]
    a, p = accumulate(y, h)
    expected = []
    for i in range(y.shape[0]):
        for n in range(1, n_layers + 1):
            if should_halt(a[i : i + 1, n - 1], p[i : i + 1, n - 1], n_layers - n).item():
                expected.append(n)
                break
    res = run_policy_offline(DactPolicy(), y, h)
    assert res.exit_layer.tolist() == expected
    assert len(set(expected)) > 1  # the data really exercises different exit layers
    idx = torch.arange(y.shape[0])
    assert torch.allclose(res.probs, a[idx, res.exit_layer - 1], atol=1e-6)


def test_dact_policy_needs_h():
    y, _ = _confident_and_unsure()
    with pytest.raises(ValueError, match="halting"):
        run_policy_offline(DactPolicy(), y)


def test_make_policy():
    assert isinstance(make_policy("dact"), DactPolicy)
    assert make_policy("patience", 3).patience == 3
    assert make_policy("Patience", 2.0).patience == 2
    assert make_policy("entropy", 0.25).threshold == 0.25
    assert make_policy("fixed", 4).k == 4
    assert [make_policy(n, v).name for n, v in [("dact", None), ("patience", 1), ("entropy", 0), ("fixed", 1)]] == [
        "dact", "patience", "entropy", "fixed"]


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("pabee", 2, "unknown exit policy"),
        ("", None, "unknown exit policy"),
        ("dact", 0.5, "takes no value"),
        ("patience", 0, ">= 1"),
        ("patience", -1, ">= 1"),
        ("patience", 2.5, "integer"),
        ("patience", None, "patience t"),
        ("patience", True, "patience t"),
        ("entropy", -0.1, ">= 0"),
        ("entropy", float("nan"), ">= 0"),
        ("entropy", float("inf"), ">= 0"),
        ("entropy", None, "threshold"),
        ("entropy", "0.5", "threshold"),
        ("fixed", 0, "1..N"),
        ("fixed", None, "depth k"),
        ("fixed", 1.5, "integer"),
    ],
)
def test_make_policy_errors(name, value, match):
    with pytest.raises(ConfigError, match=match):
        make_policy(name, value)
    assert issubclass(ConfigError, ValueError)


def test_average_exit_layer_and_result_type():
    assert average_exit_layer(T([1, 2, 3, 6])) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        average_exit_layer(T([], dtype=torch.long))
    y, h = _confident_and_unsure()
    assert isinstance(run_policy_offline(DactPolicy(), y, h), ExitResult)


def test_the_scalar_forms_equal_the_tensor_forms():
    """Issue 25 (one rule): the batch-1 fast path uses dact.py's scalar forms; each equals its tensor form on random
    inputs (float64), so the rule lives once."""
    from dact_lib import dact

    gen = torch.Generator().manual_seed(5)
    for k in (1, 2, 5):
        for _ in range(50):
            y = torch.rand(1, k, generator=gen, dtype=torch.float64).softmax(-1)
            a_prev = torch.rand(1, k, generator=gen, dtype=torch.float64).softmax(-1) * (torch.rand(1).item() > 0.2)
            p_prev, h = torch.rand(1, generator=gen, dtype=torch.float64), torch.rand(1, generator=gen,
                                                                                    dtype=torch.float64)
            a_t, p_t = dact.accumulate_step(a_prev, p_prev, y, h)
            a_s, p_s = dact.accumulate_step_scalar(a_prev[0].tolist(), float(p_prev), y[0].tolist(), float(h))
            assert a_s == pytest.approx(a_t[0].tolist(), abs=1e-12) and p_s == pytest.approx(float(p_t), abs=1e-12)
            for d in (0, 1, 3):
                assert dact.should_halt_scalar(a_s, p_s, d) == bool(dact.should_halt(a_t, p_t, d)[0])
            assert dact.entropy_scalar(y[0].tolist()) == pytest.approx(float(dact.entropy(y)[0]), abs=1e-12)
            assert dact.confidence_features_scalar(y[0].tolist(), a_prev[0].tolist()) == pytest.approx(
                dact.confidence_features(y, a_prev)[0].tolist(), abs=1e-12)
