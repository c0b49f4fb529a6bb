"""Deterministic example tests of ibp_short_warmup.py (GitHub issue #3).

Every expected value comes from an oracle that is not the code under test: numbers worked by hand
(the arithmetic is in the comments), plain PyTorch forward passes, a convolution unrolled into a
dense matrix, brute-force sampling of the input box, or a brute-force search over crops.
"""
import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp
from ibp_short_warmup import (Config, Normalize, Residual, augment, build_model, cnn7, dataset_info, eps_at,
                              fan_in, ibp_forward, ibp_init_, ibp_margins, input_box, lam_at, lr_at, main,
                              parse_args, resnext, resolve, robust_loss, verified,
                              warmup_regularizers, wide_resnet)

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, 'ibp_short_warmup.py')

# Tolerances, named once per dtype: float64 is used for everything computed by hand or compared with a
# plain forward pass; float32 only where the code itself runs in float32 (training outputs).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 cores shared with other jobs: one intra-op thread avoids oversubscription."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def close(actual, expected, dtype=D):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


def t(values):
    return torch.tensor(values, dtype=D)


def linear(weight, bias):
    layer = nn.Linear(len(weight[0]), len(weight)).to(D)
    with torch.no_grad():
        layer.weight.copy_(t(weight))
        layer.bias.copy_(t(bias))
    return layer


# ----------------------------------------------------------------------------------------------
# Hand-worked IBP examples
# ----------------------------------------------------------------------------------------------
def test_hand_two_layer_net_bounds_margins_and_clipping():
    """Linear(2,2) - ReLU - Linear(2,2), eps 0.1, one input coordinate clipped at 1, one unstable ReLU."""
    model = nn.Sequential(linear([[1, -1], [2, 1]], [0, -2]), nn.ReLU(), linear([[1, 2], [-1, 1]], [0.5, 0]))
    x = t([[0.95, 0.25], [0.95, 0.25]])
    y = torch.tensor([0, 1])
    # input box: x0 in [0.85, 1.0] (clipped at 1): c 0.925 r 0.075; x1 in [0.15, 0.35]: c 0.25 r 0.1
    c0, r0 = input_box(x, 0.1)
    close(c0, [[0.925, 0.25]] * 2)
    close(r0, [[0.075, 0.1]] * 2)
    # h0 = x0 - x1 in [0.85 - 0.35, 1.0 - 0.15] = [0.5, 0.85]            -> c 0.675, r 0.175 (active)
    # h1 = 2 x0 + x1 - 2 in [1.7 + 0.15 - 2, 2 + 0.35 - 2] = [-0.15, 0.35] -> c 0.1, r 0.25 (unstable)
    # ReLU: a0 in [0.5, 0.85], a1 in [0, 0.35]
    # z0 = a0 + 2 a1 + 0.5 in [1.0, 2.05];  z1 = -a0 + a1 in [-0.85, -0.15]
    pre = []
    h, c, r = ibp_forward(model, x, c0, r0, pre)
    assert len(pre) == 1
    close(pre[0][0], [[0.675, 0.1]] * 2)
    close(pre[0][1], [[0.175, 0.25]] * 2)
    close(c - r, [[1.0, -0.85]] * 2)
    close(c + r, [[2.05, -0.15]] * 2)
    # clean: h = [0.7, 0.15], both active: z0 = 0.7 + 0.3 + 0.5 = 1.5, z1 = -0.7 + 0.15 = -0.55
    close(h, [[1.5, -0.55]] * 2)
    # folded margins: y = 0: z0 - z1 = 2 a0 + a1 + 0.5 >= 1.0 + 0 + 0.5 = 1.5
    #                 y = 1: z1 - z0 = -2 a0 - a1 - 0.5 >= -1.7 - 0.35 - 0.5 = -2.55
    # (naive subtraction of logit bounds would give 1.0 - (-0.15) = 1.15 and -0.85 - 2.05 = -2.9)
    logits, lb = ibp_margins(model, x, y, 0.1)
    close(logits, [[1.5, -0.55]] * 2)
    close(lb, [[0.0, 1.5], [-2.55, 0.0]])
    assert verified(lb, y).tolist() == [True, False]
    # Eq. (9): mean of log(1 + exp(-1.5)) and log(1 + exp(2.55))
    close(robust_loss(lb), (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(2.55))) / 2)


def bn_net():
    """Linear(1,2) - BN1d(2, eps 0) - ReLU - Linear(2,2) for the hand-worked BN examples."""
    bn = nn.BatchNorm1d(2, eps=0.0).to(D)
    return nn.Sequential(linear([[1], [-2]], [0, 1]), bn, nn.ReLU(), linear([[1, -1], [0, 2]], [0, 0.5]))


def test_hand_bn_train_mode_uses_clean_batch_statistics():
    model = bn_net().train()
    x, y = t([[0.2], [0.8]]), torch.tensor([1, 0])
    # h0 = x: clean [0.2, 0.8], mean 0.5, biased var 0.09 (std 0.3) -> BN: (h0 - 0.5) / 0.3
    # h1 = 1 - 2x: clean [0.6, -0.6], mean 0, biased var 0.36 (std 0.6) -> BN: h1 / 0.6
    # box (eps 0.1): sample 1 x in [0.1, 0.3], sample 2 x in [0.7, 0.9]
    # sample 1: BN(h0) in [-4/3, -2/3] -> a0 = 0; h1 in [0.4, 0.8] -> BN [2/3, 4/3] = a1
    # sample 2: BN(h0) in [2/3, 4/3] = a0;  h1 in [-0.8, -0.4] -> [-4/3, -2/3] -> a1 = 0
    # margins (last layer W = [[1, -1], [0, 2]], b = [0, 0.5]):
    # sample 1, y = 1: z1 - z0 = -a0 + 3 a1 + 0.5 >= 3 * 2/3 + 0.5 = 2.5
    # sample 2, y = 0: z0 - z1 = a0 - 3 a1 - 0.5 >= 2/3 - 0.5 = 1/6
    # clean: sample 1 BN = [-1, 1] -> a = [0, 1] -> z = [-1, 2.5]; sample 2 a = [1, 0] -> z = [1, 0.5]
    pre = []
    logits, lb = ibp_margins(model, x, y, 0.1, pre)
    close(logits, [[-1, 2.5], [1, 0.5]])
    close(lb, [[2.5, 0], [0, 1 / 6]])
    close(pre[0][0], [[-1, 1], [1, -1]])
    close(pre[0][1], [[1 / 3, 1 / 3]] * 2)
    # running statistics as nn.BatchNorm1d: momentum 0.1, unbiased variance (n = 2)
    # mean 0.1 * [0.5, 0] = [0.05, 0];  var 0.9 * 1 + 0.1 * [0.09 * 2, 0.36 * 2] = [0.918, 0.972]
    bn = model[1]
    close(bn.running_mean, [0.05, 0])
    close(bn.running_var, [0.918, 0.972])
    assert bn.num_batches_tracked.item() == 1
    # logit box through the whole model (a second pass; statistics are those of the same batch)
    # sample 1: z0 = a0 - a1 in [-4/3, -2/3], z1 = 2 a1 + 0.5 in [11/6, 19/6]
    # sample 2: z0 in [2/3, 4/3], z1 = 0.5
    _, c, r = ibp_forward(model, x, *input_box(x, 0.1))
    close(c - r, [[-4 / 3, 11 / 6], [2 / 3, 0.5]])
    close(c + r, [[-2 / 3, 19 / 6], [4 / 3, 0.5]])


def test_hand_bn_eval_mode_uses_running_statistics():
    model = bn_net().eval()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(t([0.3, 0.2]))
        bn.running_var.copy_(t([0.04, 0.16]))  # std 0.2, 0.4
    x, y = t([[0.2], [0.8]]), torch.tensor([1, 0])
    # BN(h0) = (h0 - 0.3) / 0.2, BN(h1) = (h1 - 0.2) / 0.4
    # sample 1: h0 in [0.1, 0.3] -> [-1, 0] -> a0 = 0; h1 in [0.4, 0.8] -> [0.5, 1.5] = a1
    #           y = 1: -a0 + 3 a1 + 0.5 >= 1.5 + 0.5 = 2.0
    # sample 2: h0 in [0.7, 0.9] -> [2, 3] = a0; h1 in [-0.8, -0.4] -> [-2.5, -1.5] -> a1 = 0
    #           y = 0: a0 - 3 a1 - 0.5 >= 2 - 0.5 = 1.5
    # clean: x 0.2 -> BN [-0.5, 1] -> a [0, 1] -> z [-1, 2.5]; x 0.8 -> BN [2.5, -2] -> a [2.5, 0] -> z [2.5, 0.5]
    logits, lb = ibp_margins(model, x, y, 0.1)
    close(logits, [[-1, 2.5], [2.5, 0.5]])
    close(lb, [[2.0, 0], [0, 1.5]])
    close(bn.running_mean, [0.3, 0.2])  # untouched in eval mode
    close(bn.running_var, [0.04, 0.16])
    assert bn.num_batches_tracked.item() == 0


def test_bn_layer_train_mode_by_hand():
    bn = nn.BatchNorm1d(2, eps=0.0).to(D).train()
    with torch.no_grad():
        bn.weight.copy_(t([3, -2]))
        bn.bias.copy_(t([1, 0.5]))
    x = t([[2, 0], [6, 1], [2, 0], [6, 1]])
    # column 0: mean 4, biased var 4 -> w = 3 / 2 = 1.5, b = 1 - 4 * 1.5 = -5
    # column 1: mean 0.5, biased var 0.25 -> w = -2 / 0.5 = -4, b = 0.5 - 0.5 * (-4) = 2.5
    c, r = t([[4, 0.5], [6, 0]]), t([[0.2, 0.1], [0, 1]])
    xo, co, ro = ibp_forward(bn, x, c, r)
    close(co, [[4 * 1.5 - 5, 0.5 * -4 + 2.5], [6 * 1.5 - 5, 2.5]])  # [[1, 0.5], [4, 2.5]]
    close(ro, [[0.3, 0.4], [0, 4]])  # radius scales by |w| (w1 < 0)
    close(xo, [[-2, 2.5], [4, -1.5], [-2, 2.5], [4, -1.5]])
    # running statistics: momentum 0.1 from (0, 1), unbiased variance (n = 4): 4 * 4/3 and 0.25 * 4/3
    close(bn.running_mean, [0.4, 0.05])
    close(bn.running_var, [0.9 + 0.1 * 16 / 3, 0.9 + 0.1 * 1 / 3])
    assert bn.num_batches_tracked.item() == 1


def test_bn_train_statistics_are_not_detached():
    """SPEC 2: gradients flow through the clean-batch statistics into the bounds."""
    bn = nn.BatchNorm1d(2).to(D).train()
    x = t([[2, 0], [6, 1], [3, 0.5]]).requires_grad_(True)
    c, r = t([[4, 0.5]]), t([[0.2, 0.1]])  # the box does not depend on x
    _, co, ro = ibp_forward(bn, x, c, r)
    (co.sum() + ro.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 1e-3


def test_bn2d_per_channel_statistics_match_nn_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(D).train()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    ref = copy.deepcopy(bn)
    x = torch.randn(4, 3, 5, 5, dtype=D) * t([1, 2, 3]).view(1, 3, 1, 1) + 1
    r = torch.rand(4, 3, 5, 5, dtype=D)
    xo, co, ro = ibp_forward(bn, x, x, r)
    close(xo, ref(x))
    close(co, xo)
    close(ro, r * (ref.weight / torch.sqrt(x.var((0, 2, 3), unbiased=False) + ref.eps)).abs().view(1, 3, 1, 1))
    close(bn.running_var, ref.running_var)


def test_residual_and_normalize_by_hand():
    # Residual(Linear(1,1) w -2 b 1, Identity): c = 1, r = 0.5 -> branch c -1 r 1; shortcut c 1 r 0.5
    # sum: c 0, r 1.5 (lowers add, uppers add)
    res = Residual(linear([[-2]], [1]), nn.Identity())
    xo, c, r = ibp_forward(res, t([[1.0]]), t([[1.0]]), t([[0.5]]))
    close(xo, [[0.0]])
    close(c, [[0.0]])
    close(r, [[1.5]])
    # Normalize mean (0.5, 0.25), std (0.25, 0.5): c (x - m) / s, r / s; appended to pre as entry 0
    norm = Normalize((0.5, 0.25), (0.25, 0.5)).to(D)
    x = t([0.75, 0.5]).view(1, 2, 1, 1)
    pre = []
    xo, c, r = ibp_forward(norm, x, x, t([0.1, 0.1]).view(1, 2, 1, 1), pre)
    close(c.flatten(), [1.0, 0.5])
    close(r.flatten(), [0.4, 0.2])
    close(xo, c)
    assert len(pre) == 1 and pre[0][0] is c


def test_verified_is_strict():
    y = torch.tensor([0, 1, 2])
    lb = t([[0, 1e-9, 2], [0.0, 0, 3], [5, -1e-9, 0]])
    # sample 0: all j != y positive; sample 1: lb_0 = 0 is not > 0; sample 2: lb_1 < 0
    assert verified(lb, y).tolist() == [True, False, False]


def test_unknown_layer_raises():
    with pytest.raises(TypeError):
        ibp_forward(nn.Sequential(nn.Tanh()), t([[0.0]]), t([[0.0]]), t([[0.0]]))


# ----------------------------------------------------------------------------------------------
# Hand-written backward passes (GitHub issue 5): finite differences, autograd of the formulas
# ----------------------------------------------------------------------------------------------
def box_away_from_kinks(shape, seed, layout=torch.contiguous_format):
    """Random centres and radii with |c +- r| >= 0.05: finite differences then never cross a ReLU kink."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=g, dtype=D)
    r = torch.rand(shape, generator=g, dtype=D)
    for _ in range(20):
        near = ((c - r).abs() < 0.05) | ((c + r).abs() < 0.05)
        c = torch.where(near, c + 0.2, c)
    assert not near.any()
    return c.contiguous(memory_format=layout).requires_grad_(), r.contiguous(memory_format=layout).requires_grad_()


def interval_relu_formula(c, r):
    lo, up = F.relu(c - r), F.relu(c + r)
    return (up + lo) / 2, (up - lo) / 2


def relu_stats_formula(c, r):
    active, inactive = (c - r > 0).to(c.dtype), (c + r < 0).to(c.dtype)
    d2 = (c - c.mean()).square()
    return torch.stack([(c * active).sum(), -(c * inactive).sum(), (d2 * active).sum(), (d2 * inactive).sum(),
                        active.sum(), inactive.sum(), r.mean()])


@pytest.mark.parametrize('shape', [(5, 7), (3, 4, 5, 5)])
@pytest.mark.parametrize('sums', [True, False])
def test_interval_relu_backward_passes_gradcheck(shape, sums):
    c, r = box_away_from_kinks(shape, seed=len(shape))
    assert torch.autograd.gradcheck(lambda c, r: ibp.IntervalReLU.apply(c, r, sums)[:3 if sums else 2], (c, r))


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_interval_relu_and_its_sums_match_autograd_of_the_formulas(layout):
    """Values and gradients equal those of the plain formulas, also on channels-last tensors, with and
    without the sums, and with only some of the outputs used."""
    c, r = box_away_from_kinks((4, 3, 6, 6), seed=7, layout=layout)
    g = torch.Generator().manual_seed(8)
    g_c, g_r, g_s = (torch.randn(c.shape, generator=g, dtype=D), torch.randn(c.shape, generator=g, dtype=D),
                     torch.randn(7, generator=g, dtype=D))
    mine = lambda c, r: ibp.IntervalReLU.apply(c, r, True)
    oracle = lambda c, r: (*interval_relu_formula(c, r), relu_stats_formula(c, r))
    for used in [(0, 1, 2), (0, 1), (2,), (1, 2)]:
        results = []
        for f in (mine, oracle):
            c.grad = r.grad = None
            outs = f(c, r)
            torch.autograd.backward([outs[i] for i in used], [(g_c, g_r, g_s)[i] for i in used])
            results.append((*outs, c.grad, r.grad))
        for a, b in zip(*results):
            close(a, b)
    c.grad = r.grad = None  # without the sums (certification): the same box and gradients
    c_out, r_out, s = ibp.IntervalReLU.apply(c, r, False)
    assert s.numel() == 0
    torch.autograd.backward([c_out, r_out], [g_c, g_r])
    close(c_out, results[1][0])
    close(r_out, results[1][1])
    grads = torch.autograd.grad(interval_relu_formula(c, r), (c, r), (g_c, g_r))
    close(c.grad, grads[0])
    close(r.grad, grads[1])


def test_interval_relu_at_the_kinks_follows_relu_and_the_strict_masks():
    """Hand-worked: u = 0 and l = 0 exactly. ReLU's derivative at 0 is 0 (PyTorch's convention), and a
    neuron with l = 0 is neither active nor inactive, one with u = 0 not inactive (SPEC 3)."""
    c, r = t([1.0, -1.0, 2.0, -3.0]).requires_grad_(), t([1.0, 1.0, 1.0, 1.0]).requires_grad_()
    c_out, r_out, s = ibp.IntervalReLU.apply(c, r, True)  # u = 2, 0, 3, -2; l = 0, -2, 1, -4
    close(c_out, [1.0, 0.0, 2.0, 0.0])
    close(r_out, [1.0, 0.0, 1.0, 0.0])
    d2 = (c.detach() + 0.25) ** 2  # mean(c) = -0.25
    close(s, [2.0, 3.0, d2[2], d2[3], 1, 1, 1.0])
    (c_out.sum() + 10 * r_out.sum()).backward()
    close(c.grad, [5.5, 0.0, 1.0, 0.0])  # unstable: (1 + 10)/2; u = 0: nothing; active: passes
    close(r.grad, [5.5, 0.0, 10.0, 0.0])


@pytest.mark.parametrize('shape', [(6, 3), (4, 3, 5, 5)])
def test_train_batch_norm_matches_autograd_of_the_formula_and_nn_batchnorm(shape):
    """TrainBatchNorm returns BN(h) and its map (w, b) with the gradients of the plain formula
    w = gamma / sqrt(var + eps), b = beta - mean w, BN(h) = w h + b; its running statistics move as
    nn.BatchNorm's do."""
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(shape, generator=g, dtype=D) * 2 + 1).requires_grad_()
    gamma = (torch.rand(shape[1], generator=g, dtype=D) * 4 - 2).requires_grad_()
    beta = torch.randn(shape[1], generator=g, dtype=D).requires_grad_()
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).to(D).train()
    ref = copy.deepcopy(bn)
    grads_out = [torch.randn(shape, generator=g, dtype=D), torch.randn(shape[1], generator=g, dtype=D),
                 torch.randn(shape[1], generator=g, dtype=D)]
    dims, view = [0] + list(range(2, len(shape))), [1, -1] + [1] * (len(shape) - 2)

    def formula(h, gamma, beta):
        mean = h.mean(dims)
        w = gamma / torch.sqrt(h.var(dims, unbiased=False) + bn.eps)
        b = beta - mean * w
        return w.view(view) * h + b.view(view), w, b

    results = []
    for f in [lambda *a: ibp.TrainBatchNorm.apply(*a, bn.running_mean, bn.running_var, bn.momentum, bn.eps), formula]:
        for p in (h, gamma, beta):
            p.grad = None
        outs = f(h, gamma, beta)
        torch.autograd.backward(outs, grads_out)
        results.append((*outs, h.grad, gamma.grad, beta.grad))
    for mine, oracle in zip(*results):
        close(mine, oracle)
    ref(h.detach())
    close(bn.running_mean, ref.running_mean)
    close(bn.running_var, ref.running_var)
    assert torch.autograd.gradcheck(lambda *a: ibp.TrainBatchNorm.apply(*a, None, None, 0.1, 1e-5), (h, gamma, beta))


@pytest.mark.parametrize('train', [True, False])
def test_conv_bn_fold_equals_conv_then_bn(train):
    """Conv -> BN folded for the box gives what the conv rule followed by the BN rule gives, gradients
    included, and moves the running statistics once."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, groups=1), nn.BatchNorm2d(4)).to(D).train(train)
    with torch.no_grad():
        net[1].weight.uniform_(-2, 2)
        net[1].running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(net)
    x = torch.rand(5, 3, 8, 8, dtype=D)
    c, r = input_box(x, 0.05)
    outs = []
    for m, run in [(net, lambda: ibp_forward(net, x, c, r)),
                   (ref, lambda: ibp_forward(ref[1], *ibp_forward(ref[0], x, c, r)))]:
        xo, co, ro = run()
        (xo.square().sum() + co.sum() + (ro * co).sum()).backward()
        outs.append((xo, co, ro, *[p.grad for p in m.parameters()], m[1].running_mean, m[1].running_var))
    for mine, oracle in zip(*outs):
        close(mine, oracle)
    assert net[1].num_batches_tracked.item() == int(train)


def test_prepare_uses_fused_adam_on_the_cpu():
    cfg = resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 8, 8), device='cpu'))
    opt = ibp.prepare(cfg, ibp.setup_device(cfg), dataset_info(cfg))[1]
    assert opt.defaults['fused'] is True


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator settings')
def test_cpu_training_reuses_freed_memory_without_page_faults():
    """After setup_device on the CPU, freed 64 MB blocks are reused: once the heap has grown (a few
    rounds: each aligned request is a little larger than the block freed before it), allocating one
    again costs no page faults. glibc's default unmaps it and faults all 16384 pages in every time."""
    import resource
    ibp.setup_device(Config(device='cpu'))
    faults = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2 ** 24)  # 64 MB, touched and freed
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults[-3:]) < 1000, faults


# ----------------------------------------------------------------------------------------------
# Convolution against its unrolled dense matrix
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kw', [dict(kernel_size=3, stride=2, padding=1, groups=2),
                                dict(kernel_size=3, stride=1, padding=2, groups=1, dilation=2),
                                dict(kernel_size=1, stride=2, padding=0, groups=4)])
def test_conv_equals_unrolled_linear_layer(kw):
    torch.manual_seed(1)
    cin, cout, h, w = 4, 8, 7, 6
    conv = nn.Conv2d(cin, cout, **kw).to(D)
    n_in = cin * h * w
    basis = torch.eye(n_in, dtype=D).view(n_in, cin, h, w)  # one basis image per input pixel
    with torch.no_grad():
        cols = F.conv2d(basis, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out_shape = cols.shape[1:]
    dense = linear(cols.flatten(1).T.tolist(), conv.bias.detach().repeat_interleave(out_shape[1] * out_shape[2]).tolist())
    x = torch.rand(3, cin, h, w, dtype=D)
    r = torch.rand(3, cin, h, w, dtype=D)
    xo, co, ro = ibp_forward(conv, x, x, r)
    xl, cl, rl = ibp_forward(dense, x.flatten(1), x.flatten(1), r.flatten(1))
    close(xo.flatten(1), xl)
    close(co.flatten(1), cl)
    close(ro.flatten(1), rl)


# ----------------------------------------------------------------------------------------------
# eps = 0: the bounds collapse to the ordinary forward pass, for every model family
# ----------------------------------------------------------------------------------------------
FAMILIES = [('cnn7', 'full'), ('cnn7', 'conv'), ('cnn7', 'none'), ('wide_resnet', 'full'), ('resnext', 'full')]
CASES = [(m, bn, ds) for ds in ('mnist', 'cifar10') for m, bn in FAMILIES] + \
        [(m, 'full', 'tinyimagenet') for m in ('cnn7', 'wide_resnet', 'resnext')]


def small_model(model, bn, dataset, width=0.0625, seed=0):
    torch.manual_seed(seed)
    cfg = Config(dataset=dataset, model=model, bn=bn, width=width, ibp_init=True)
    info = dataset_info(cfg)
    net = build_model(cfg, info).to(D)
    with torch.no_grad():  # non-default BN affine parameters, so weight/bias mix-ups show
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net, info


@pytest.mark.parametrize('model,bn,dataset', CASES)
def test_eps_zero_bounds_equal_forward_pass(model, bn, dataset):
    net, info = small_model(model, bn, dataset)
    ref = copy.deepcopy(net)
    torch.manual_seed(1)
    x = torch.rand(4, *info['shape'], dtype=D)
    y = torch.tensor([0, 1, 2, 3])
    for mode in ('train', 'eval'):
        net.train(mode == 'train')
        ref.train(mode == 'train')
        z = ref(x)  # plain PyTorch forward (updates ref's running stats in train mode)
        xo, c, r = ibp_forward(net, x, *input_box(x, 0.0))
        assert torch.all(r == 0), 'eps = 0 must give a zero radius'
        close(c, z)
        close(xo, z)
        # ibp_margins: a second pass in train mode; bring ref's statistics along with another forward
        if mode == 'train':
            z = ref(x)
        logits, lb = ibp_margins(net, x, y, 0.0)
        close(logits, z)
        close(lb, z.gather(1, y[:, None]) - z)
        close(robust_loss(lb), F.cross_entropy(z, y))
        for (name, a), (_, b) in zip(net.named_buffers(), ref.named_buffers()):
            close(a.to(D), b.to(D))  # running statistics updated exactly as nn.BatchNorm does


# ----------------------------------------------------------------------------------------------
# Soundness by sampling, and folding the margin matrix into the last layer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('model,bn', FAMILIES)
def test_bounds_contain_sampled_outputs_and_folding_is_tighter(model, bn):
    net, info = small_model(model, bn, 'cifar10', seed=2)
    torch.manual_seed(3)
    x = torch.rand(4, *info['shape'], dtype=D)
    y = torch.tensor([0, 3, 5, 9])
    net.train()
    net(x)  # non-trivial running statistics
    net.eval()
    eps = 2 / 255
    with torch.no_grad():
        _, c, r = ibp_forward(net, x, *input_box(x, eps))
        _, lb = ibp_margins(net, x, y, eps)
        lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        for k in range(16):  # random points and random corners of the clipped box
            u = torch.rand(x.shape, dtype=D) if k % 2 else (torch.rand(x.shape) < 0.5).to(D)
            z = net(lo + (up - lo) * u)
            tol = TOL[D] * (1 + z.abs())
            assert torch.all(z >= c - r - tol) and torch.all(z <= c + r + tol)
            assert torch.all(lb <= z.gather(1, y[:, None]) - z + tol)
    # folding C into the last layer is never looser than subtracting logit bounds
    idx = torch.arange(len(y))
    naive = (c - r)[idx, y][:, None] - (c + r)
    naive[idx, y] = 0
    assert torch.all(lb >= naive - TOL[D])
    assert (lb - naive).max() > 1e-6, 'folding should be strictly tighter somewhere'
    assert torch.all(lb[idx, y] == 0)


# ----------------------------------------------------------------------------------------------
# Architectures: parameter counts, FC input sizes, ReLU layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('fn,params,relus', [(cnn7, 17.2e6, 6), (wide_resnet, 21.6e6, 8), (resnext, 17.6e6, 11)])
def test_cifar_parameter_counts_and_relu_layers(fn, params, relus):
    with torch.device('meta'):
        layers = fn((3, 32, 32), 10, 1.0)
    net = nn.Sequential(*layers)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - params) / params < 0.01, n
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == relus
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10  # the classifier is last


@pytest.mark.parametrize('fn,fc_in', [(cnn7, 32768), (wide_resnet, 163840), (resnext, 32768)])
def test_tinyimagenet_fc_input_sizes(fn, fc_in):
    with torch.device('meta'):
        layers = fn((3, 64, 64), 200, 1.0)
    fcs = [m for m in nn.Sequential(*layers).modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(fc_in, 512), (512, 200)]


@pytest.mark.parametrize('model,bn,dataset,relus', [('cnn7', 'full', 'cifar10', 6), ('wide_resnet', 'full', 'mnist', 8),
                                                    ('resnext', 'full', 'tinyimagenet', 20)])
def test_pre_collects_normalized_input_and_every_relu_input(model, bn, dataset, relus):
    # ResNeXt on 64x64 has two blocks per stage: stem 1 + 6 blocks x 3 ReLUs (2 in the branch, 1 after
    # the add) + head 1 = 20
    net, info = small_model(model, bn, dataset)
    x = torch.rand(2, *info['shape'], dtype=D)
    pre = []
    ibp_margins(net.eval(), x, torch.tensor([0, 1]), 0.01, pre)
    assert len(pre) == relus + 1
    std = torch.tensor(info["std"]).to(D).view(1, -1, 1, 1)  # the float32 buffer of Normalize
    close(pre[0][1], input_box(x, 0.01)[1] / std)  # entry 0: the normalized input box


# ----------------------------------------------------------------------------------------------
# eps / lambda / LR schedules
# ----------------------------------------------------------------------------------------------
def test_eps_schedule_worked_values():
    E, L = 0.3, 10  # start 2, length 4: init = 10, final = 50, mid = 10 + 40/4 = 20
    f = lambda s: eps_at(s, L, E, 2, 4)
    assert all(f(s) == 0 for s in range(0, 11))  # the whole first epoch and step init itself
    assert f(11) > 0
    assert f(15) == pytest.approx(E / 13 * 0.5 ** 4)  # a (b - init)^4 with (5 / 10)^4
    assert f(20) == pytest.approx(E / 13)  # the polynomial part ends at eps_target / 13
    assert f(35) == pytest.approx(E / 13 + 12 * E / 13 * 15 / 30)  # linear: 7/13 E
    assert f(50) == E and f(51) == E and f(1000) == E
    vals = [f(s) for s in range(0, 60)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    h = 1e-6  # continuity of value and slope at init, mid and final (steps may be fractional)
    for s in (10, 20, 50):
        assert f(s - h) == pytest.approx(f(s + h), abs=1e-7)  # slope ~0.01 per step
    slope = lambda s: (f(s + h) - f(s - h)) / (2 * h)
    assert slope(20 - 1e-3) == pytest.approx(12 * E / 13 / 30, rel=1e-3)  # poly slope 4 a t^3 = line slope
    assert slope(20 + 1e-3) == pytest.approx(12 * E / 13 / 30, rel=1e-3)


def test_eps_schedule_without_warm_epoch():
    # MNIST: start 1 -> the ramp starts at step 0; steps_per_epoch 8, length 2: final 16, mid 4
    assert eps_at(0, 8, 0.4, 1, 2) == 0
    assert eps_at(4, 8, 0.4, 1, 2) == pytest.approx(0.4 / 13)
    assert eps_at(16, 8, 0.4, 1, 2) == 0.4


def test_lambda_decays_from_lam0_to_zero():
    assert lam_at(0.0, 0.2, 0.5) == 0.5
    assert lam_at(0.05, 0.2, 0.5) == pytest.approx(0.375)
    assert lam_at(0.2, 0.2, 0.5) == 0.0


def test_lr_milestones_and_dataset_defaults():
    cfg = resolve(Config(dataset='cifar10', out_dir='unused'))
    assert (cfg.epochs, cfg.eps_start, cfg.eps_length, cfg.lr_milestones) == (160, 2, 80, (120, 140))
    assert cfg.eps == 8 / 255 and cfg.batch_size == 128 and cfg.lam0 == 0.5
    assert all(lr_at(e, cfg) == 5e-4 for e in (1, 60, 120))
    assert lr_at(121, cfg) == pytest.approx(1e-4) and lr_at(140, cfg) == pytest.approx(1e-4)
    assert lr_at(141, cfg) == pytest.approx(2e-5)
    short = resolve(Config(dataset='cifar10', epochs=70, out_dir='unused'))
    assert (short.eps_start, short.eps_length, short.lr_milestones) == (2, 20, (50, 60))
    tiny = resolve(Config(dataset='tinyimagenet', out_dir='unused'))
    assert (tiny.eps, tiny.accum_steps, tiny.lam0, tiny.lr_milestones) == (1 / 255, 2, 0.2, (61, 71))
    mnist = resolve(Config(dataset='mnist', out_dir='unused'))
    assert (mnist.eps, mnist.eps_start, mnist.eps_length, mnist.batch_size) == (0.4, 1, 20, 256)
    assert (mnist.ibp_init, mnist.reg_tightness, mnist.reg_relu) == (True, True, True)
    vanilla = resolve(Config(dataset='mnist', method='vanilla', out_dir='unused'))
    assert (vanilla.ibp_init, vanilla.reg_tightness, vanilla.reg_relu) == (False, False, False)


# ----------------------------------------------------------------------------------------------
# Warmup regularizers on hand-made boxes
# ----------------------------------------------------------------------------------------------
def test_regularizers_zero_when_ratios_within_tolerance():
    pre = [(t([[0.5, 0.5]]), t([[1.0, 1.0]])),  # E(Delta_0) = 1
           # layer 1: E(Delta_1) = 0.5 -> Delta_0 / Delta_1 = 2 >= tau
           # active (c - r > 0): 1, 2 -> sum 3; inactive (c + r < 0): -1, -2 -> -sum 3: alpha = 1
           # mean c = 0, dev = 1, 1, 4, 4: active 5, inactive 5: beta = 1
           (t([[1, -1], [2, -2]]), t([[0.5, 0.5], [0.5, 0.5]])),
           # layer 2: E(Delta_2) = 2 -> ratio 1/2 = tau -> ReLU(0) = 0. The bounds touch zero: l = 0 for
           # the first neuron, u = 0 for the second: both unstable (strict), so the relu term is skipped
           # (counted as active/inactive it would be alpha = 3 -> ReLU(0.5 - 1/3) > 0)
           (t([[3.0, -1.0]]), t([[3.0, 1.0]]))]
    lt, lr, _ = warmup_regularizers(pre, 0.5)
    assert lt.item() == 0 and lr.item() == 0
    close(warmup_regularizers(pre, 0.5)[2].to(D), [[0.5, 0.5, 0], [0, 0, 1]])


def test_regularizers_exact_value_by_hand():
    tau = 0.5
    pre = [(t([[0.3, 0.7]]), t([[0.1, 0.1]])),  # E(Delta_0) = 0.1
           # layer 1, pooled over batch and neurons: c = 3, 1, -1, 0, r = 0.5 each (E(Delta_1) = 0.5)
           #   tightness: ReLU(0.5 - 0.1/0.5) = 0.3
           #   active (c - r > 0): 3, 1 -> p = 4; inactive (c + r < 0): -1 -> q = 1 (0 is unstable)
           #   alpha = 4 -> min(4, 1/4) = 0.25 -> ReLU(0.5 - 0.25) = 0.25
           #   mean c = 0.75; dev = 2.25^2 = 5.0625, 0.25^2 = 0.0625, 1.75^2 = 3.0625, 0.75^2 = 0.5625
           #   beta = (5.0625 + 0.0625) / 3.0625 = 1.6735 -> min = 0.5976 > tau -> 0
           (t([[3, 1], [-1, 0]]), t([[0.5, 0.5], [0.5, 0.5]])),
           # layer 2: E(Delta_2) = 0.05: tightness ReLU(0.5 - 2) = 0; all active -> relu term skipped
           # (if counted it would add ReLU(0.5 - 0) + ReLU(0.5 - 0) = 1)
           (t([[2, 1]]), t([[0.05, 0.05]])),
           # layer 3: E(Delta_3) = 0.4: tightness ReLU(0.5 - 0.25) = 0.25; all inactive -> skipped
           (t([[-2, -1]]), t([[0.4, 0.4]]))]
    lt, lr, _ = warmup_regularizers(pre, tau)
    m = 3
    close(lt, (0.3 + 0 + 0.25) / (tau * m))  # 0.55 / 1.5
    close(lr, 0.25 / (tau * m))  # 0.25 / 1.5
    # ReLU states: layer 1 active 2/4, inactive 1/4, unstable 1/4; layer 2 all active; layer 3 all inactive
    close(warmup_regularizers(pre, 0.5)[2].to(D), [[0.5, 0.25, 0.25], [1, 0, 0], [0, 1, 0]])


def test_regularizer_beta_term_by_hand():
    tau = 0.5
    # c = 4, -1, -1, -2 with r = 0.5 (E(Delta_1) = 0.5 = E(Delta_0): tightness ReLU(0.5 - 1) = 0)
    # active: 4 -> p = 4; inactive: -1, -1, -2 -> q = 4: alpha = 1 -> 0
    # mean c = 0; dev 16, 1, 1, 4: active 16, inactive 6: beta = 16/6 -> min = 0.375 -> ReLU(0.5 - 0.375) = 0.125
    pre = [(t([[0.0]]), t([[0.5]])), (t([[4, -1, -1, -2]]), t([[0.5] * 4]))]
    lt, lr, _ = warmup_regularizers(pre, tau)
    close(lt, 0.0)
    close(lr, 0.125 / (tau * 1))


# ----------------------------------------------------------------------------------------------
# IBP initialization
# ----------------------------------------------------------------------------------------------
def test_ibp_init_sigma_and_classifier_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Conv2d(64, 96, 3, groups=2), nn.ReLU(),
                        nn.BatchNorm1d(4), nn.Linear(512, 10))
    before = copy.deepcopy(net)
    ibp_init_(net)
    for layer, n_i in [(net[0], 2048), (net[2], 32 * 9)]:
        assert fan_in(layer) == n_i
        sigma = math.sqrt(2 * math.pi) / n_i
        std = layer.weight.std().item()
        assert abs(std / sigma - 1) < 0.03, (std, sigma)
        assert abs(layer.weight.mean().item()) < 0.05 * sigma
        gain = n_i / 2 * layer.weight.abs().mean().item()  # Eq. (6): difference gain 1
        assert abs(gain - 1) < 0.03
    for a, b in zip(before.named_parameters(), net.named_parameters()):
        if a[0].startswith('5.') or a[0].endswith('bias') or a[0].startswith('4.'):
            assert torch.equal(a[1], b[1]), a[0]  # classifier, biases and BN keep their values
        else:
            assert not torch.equal(a[1], b[1]), a[0]


@pytest.mark.parametrize('family', ['wide_resnet', 'resnext'])
def test_ibp_init_residual_calibration(family):
    net, _ = small_model(family, 'full', 'cifar10', width=0.5, seed=0)
    mods = list(net)
    blocks = [m for m in mods if isinstance(m, Residual)]
    assert len(blocks) == 3
    halved = set()
    for blk in blocks[1:]:  # blocks 2 and 3 see ReLU(branch + shortcut) of the previous block
        halved.add(id(blk.branch[0]))
        halved.add(id(blk.shortcut[0]))
    affine = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    classifier = affine[-1]
    assert classifier is mods[-1]
    n_halved = 0
    for m in affine[:-1]:
        ratio = m.weight.std().item() * fan_in(m) / math.sqrt(2 * math.pi)
        expect = 0.5 if id(m) in halved else 1.0
        n_halved += id(m) in halved
        assert abs(ratio / expect - 1) < 0.15, (m, ratio, expect)
    assert n_halved == 4
    # the dense layer after the last block keeps the full sigma
    fc = [m for m in mods if isinstance(m, nn.Linear)][0]
    assert abs(fc.weight.std().item() * fc.in_features / math.sqrt(2 * math.pi) - 1) < 0.05
    # the classifier keeps PyTorch's default U(-1/sqrt(n), 1/sqrt(n)): std 1/sqrt(3 n)
    assert abs(classifier.weight.std().item() * math.sqrt(3 * classifier.in_features) - 1) < 0.15


# ----------------------------------------------------------------------------------------------
# The objective of one batch and augmentation
# ----------------------------------------------------------------------------------------------
def test_batch_loss_cross_entropy_at_eps_zero():
    net, info = small_model('cnn7', 'full', 'cifar10')
    net.train()
    x = torch.rand(6, *info['shape'], dtype=D)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    ref = copy.deepcopy(net)
    # eps = 0, lambda = 0: plain cross-entropy of the clean logits of a train-mode forward
    loss, stats = ibp.batch_loss(ibp.Margins(net), x, y, 0.0, 0.0, Config(reg_tightness=True, reg_relu=True))
    z = ref(x)
    close(loss, F.cross_entropy(z, y))
    close(stats['train_err'], (z.argmax(1) != y).float().mean(), torch.float32)  # logged in float32


def hand_bounds(eps_seen):
    """A stand-in for Margins with hand-made logits, margins and boxes (those of the hand example)."""
    def bounds(x, y, eps):
        eps_seen.append(eps)
        pre = [(t([[0.3, 0.7]]), t([[0.1, 0.1]])), (t([[3, 1], [-1, 0]]), t([[0.5, 0.5], [0.5, 0.5]])),
               (t([[2, 1]]), t([[0.05, 0.05]])), (t([[-2, -1]]), t([[0.4, 0.4]]))]
        return t([[2.0, 0.0], [0.0, 1.0]]), t([[0.0, 1.0], [-2.0, 0.0]]), pre
    return bounds


@pytest.mark.parametrize('tight,relu', [(True, True), (True, False), (False, True), (False, False)])
def test_batch_loss_objective_eq10(tight, relu):
    # hand example above: L_tightness = 0.55 / 1.5, L_relu = 0.25 / 1.5 (tau 0.5, m = 3)
    # robust loss: mean(log(1 + e^-1), log(1 + e^2)); objective Eq. (10) with lambda = 0.3
    cfg = Config(tau=0.5, reg_tightness=tight, reg_relu=relu)
    seen = []
    y = torch.tensor([0, 1])
    loss, stats = ibp.batch_loss(hand_bounds(seen), None, y, 0.02, 0.3, cfg)
    l_rob = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2
    close(loss, l_rob + 0.3 * (tight * 0.55 / 1.5 + relu * 0.25 / 1.5))
    close(stats['l_tightness'], 0.55 / 1.5)  # logged whether or not it is in the objective
    close(stats['train_ver_err'], 0.5, torch.float32)  # sample 2 has lb_0 = -2
    assert seen == [0.02]
    # lambda = 0 (after the warmup): the robust loss alone; eps = 0: CE of the logits, bounds at EPS_FLOOR
    close(ibp.batch_loss(hand_bounds(seen), None, y, 0.02, 0.0, cfg)[0], l_rob)
    close(ibp.batch_loss(hand_bounds(seen), None, y, 0.0, 0.0, cfg)[0],
          (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2)  # CE of [2, 0] -> 0 and [0, 1] -> 1
    assert seen[-1] == 1e-6


def test_augment_is_a_flip_and_edge_padded_crop():
    n, c, h, w, pad = 24, 2, 5, 4, 2
    x = torch.rand(n, c, h, w)
    out = augment(x, pad, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = set()
    for i in range(n):
        found = []
        for flip in (False, True):
            img = x[i].flip(2) if flip else x[i]
            for oy in range(2 * pad + 1):
                for ox in range(2 * pad + 1):  # replicate padding = clamped indices
                    rows = (torch.arange(h) + oy - pad).clamp(0, h - 1)
                    cols = (torch.arange(w) + ox - pad).clamp(0, w - 1)
                    if torch.equal(img[:, rows][:, :, cols], out[i]):
                        found.append((flip, oy, ox))
        assert found, f'image {i} is not a flip + crop of its input'
        seen.update(found)
    assert {f for f, _, _ in seen} == {False, True}  # both flips
    assert {oy for _, oy, _ in seen} == set(range(2 * pad + 1))  # every offset 0 .. 2 pad, both axes
    assert {ox for _, _, ox in seen} == set(range(2 * pad + 1))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
TINY = ['--smoke', '--epochs', '3', '--eps-start', '2', '--eps-length', '1', '--train-size', '128',
        '--test-size', '64', '--width', '0.0625', '--pgd-steps', '3']


def cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and 'Traceback' not in err, err
    return lines[0]


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('smoke') / 'run')
    return cli('--smoke', '--out-dir', out), out


def test_smoke_run(smoke):
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr
    assert 'Traceback' not in proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith('ep') for line in lines) == 6
    assert lines[-1].startswith('final')
    for name in ('metrics.json', 'log.jsonl', 'last.pt'):
        assert os.path.isfile(os.path.join(out, name))
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert metrics['final_epoch'] == 6 and metrics['test_size'] == 256
    assert metrics['ver_err'] < 0.9  # better than a constant classifier of 10 classes
    assert metrics['pgd_err'] is not None and metrics['std_err'] <= metrics['pgd_err'] <= metrics['ver_err']
    recs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['epoch'] for r in recs] == [1, 2, 3, 4, 5, 6]
    # 1024 / 64 = 16 steps per epoch, ramp epochs 2..4: init 16, final 64, mid 28; the logged eps is
    # the last batch's: epoch 2 step 31: E/13 + 12E/13 * 3/36 = 2E/13; epoch 3 step 47: 22E/39;
    # epoch 4 step 63: 38E/39; epochs 5, 6: E
    E = 4 / 255
    expect = [0, 2 * E / 13, 22 * E / 39, 38 * E / 39, E, E]
    assert [r['eps'] for r in recs] == pytest.approx(expect, rel=1e-9)
    assert recs[0]['lam'] == 0.5 and recs[3]['lam'] == pytest.approx(0.5 / 39)  # 0.5 (1 - 38/39)
    assert recs[4]['lam'] == 0 and recs[5]['lam'] == 0  # regularizers only during warmup
    assert [r['lr'] for r in recs] == pytest.approx([2e-3] * 5 + [4e-4])  # milestone 5
    ck = torch.load(os.path.join(out, 'last.pt'), weights_only=False)
    assert ck['epoch'] == 6


def test_eval_checkpoint_prints_json(smoke):
    proc, out = smoke
    assert proc.returncode == 0
    ev = cli('--eval-checkpoint', os.path.join(out, 'last.pt'), '--pgd-steps', '2')
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert res['epoch'] == 6 and res['eps'] == pytest.approx(4 / 255)
    assert res['std_err'] == metrics['std_err'] and res['ver_err'] == metrics['ver_err']
    assert res['pgd_err'] is not None


def test_existing_run_is_protected(smoke, capsys):
    proc, out = smoke
    assert proc.returncode == 0
    path = os.path.join(out, 'last.pt')
    before = open(path, 'rb').read()
    assert main(['--smoke', '--out-dir', out]) == 2
    assert 'already holds a run' in one_error_line(capsys.readouterr().err)
    assert open(path, 'rb').read() == before


def stop_after_first_checkpoint(args, monkeypatch):
    # Runs main(args) with a Ctrl-C arriving right after the first last.pt is written; returns its code.
    real_save = ibp.atomic_save

    def save_then_stop(obj, path):
        real_save(obj, path)
        if path.endswith('last.pt'):
            raise KeyboardInterrupt

    monkeypatch.setattr(ibp, 'atomic_save', save_then_stop)
    try:
        return main(args)
    finally:
        monkeypatch.setattr(ibp, 'atomic_save', real_save)


def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert main(TINY + ['--out-dir', a]) == 0
    assert stop_after_first_checkpoint(TINY + ['--out-dir', b], monkeypatch) == 130
    assert '--resume' in capsys.readouterr().err
    assert torch.load(os.path.join(b, 'last.pt'), weights_only=False)['epoch'] == 1
    assert not os.path.exists(os.path.join(b, 'metrics.json'))
    rc = main(TINY + ['--out-dir', b, '--resume'])
    err = capsys.readouterr().err
    assert rc == 0, err
    ma, mb = (json.load(open(os.path.join(d, 'metrics.json'))) for d in (a, b))
    for k in ('std_err', 'ver_err', 'pgd_err'):
        assert ma[k] == mb[k], k
    sa, sb = (torch.load(os.path.join(d, 'last.pt'), weights_only=False)['model'] for d in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la, lb = ([json.loads(line) for line in open(os.path.join(d, 'log.jsonl'))] for d in (a, b))
    assert [r['epoch'] for r in lb] == [1, 2, 3]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]


def test_resume_with_other_hyperparameters_is_refused(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert main(TINY + ['--epochs', '2', '--out-dir', out]) == 0
    capsys.readouterr()
    assert main(TINY + ['--epochs', '2', '--out-dir', out, '--resume', '--lr', '0.01']) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.split('other values of:')[1].strip() == 'lr'  # exactly the value that differs


def test_missing_dataset_offline_is_one_line(tmp_path):
    empty = tmp_path / 'data'
    empty.mkdir()
    proc = cli('--dataset', 'cifar10', '--data-dir', str(empty), '--out-dir', str(tmp_path / 'run'), '--epochs', '1',
               '--eps-start', '1', '--eps-length', '1', '--width', '0.0625', '--train-size', '64', '--test-size', '64',
               timeout=180)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert 'cifar10' in line and '--data-dir' in line
    assert not os.path.exists(tmp_path / 'run' / 'last.pt')


BAD = [(['--eps', '-0.1'], '--eps'),
       (['--epochs', '3', '--eps-start', '2', '--eps-length', '3'], 'longer than the run'),
       (['--model', 'vgg'], '--model'),
       (['--tau', '0'], '--tau'),
       (['--tau', '1.5'], '--tau'),
       (['--batch-size', '10', '--accum-steps', '3'], '--accum-steps'),
       (['--epochs', 'abc'], '--epochs'),
       (['--bn', 'none', '--model', 'resnext'], '--bn'),
       (['--synthetic-shape', '3', '30', '30'], '--synthetic-shape'),
       (['--resume'], '--resume')]


@pytest.mark.parametrize('args,word', BAD)
def test_bad_flags_exit_2_with_one_line(args, word, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['--dataset', 'synthetic', '--train-size', '64', '--test-size', '64', '--width', '0.0625',
                 '--out-dir', str(out), *args]) == 2
    captured = capsys.readouterr()
    assert word in one_error_line(captured.err)
    assert not os.path.exists(out / 'last.pt')


def test_bad_flag_through_the_real_cli(tmp_path):
    proc = cli('--dataset', 'synthetic', '--tau', '0', '--out-dir', str(tmp_path / 'run'))
    assert proc.returncode == 2 and proc.stdout == ''
    one_error_line(proc.stderr)


def test_smoke_preset_keeps_explicit_values():
    """parse_args: 'the preset fills only what the user did not set'."""
    assert parse_args(['--smoke']).dataset == 'synthetic'
    assert parse_args(['--smoke', '--width', '0.25']).width == 0.25
    # explicitly given values that happen to equal the Config default must be kept as well
    assert parse_args(['--smoke', '--width', '1.0']).width == 1.0
    assert parse_args(['--smoke', '--dataset', 'cifar10']).dataset == 'cifar10'


# ----------------------------------------------------------------------------------------------
# Distributed training (GitHub issue 7): torchrun / DDP on the CPU with the Gloo backend
# ----------------------------------------------------------------------------------------------
DIST_TIMEOUT = 240  # seconds for one 2-process job (a hung collective must fail the test, not stall it)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args):
    """The script under `torchrun --nproc_per_node 2` (the launcher module, so any venv works)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           SCRIPT, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DIST_TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def epoch_lines(stdout):
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith('ep ')]


def check_epoch_stats_cover_the_global_batch(records):
    # Each rank logs fractions of its shard times the shard size; after the all-reduce, divided by the
    # epoch's image count, the active/inactive/unstable fractions of a layer sum to exactly 1. Without
    # the all-reduce they would sum to 1/2, with every rank on the whole batch to 2.
    for r in records:
        for row in r['relu_per_layer']:
            assert sum(row) == pytest.approx(1, abs=TOL[torch.float32]), (r['epoch'], row)
        assert 0 <= r['train_err'] <= 1 and 0 <= r['train_ver_err'] <= 1


def test_torchrun_two_ranks_gloo(tmp_path):
    out = tmp_path / 'run'
    proc = torchrun(*TINY, '--out-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    assert epoch_lines(proc.stdout) == [1, 2, 3]  # only rank 0 prints: each epoch exactly once
    assert sum(line.startswith('final') for line in proc.stdout.splitlines()) == 1
    assert sorted(os.listdir(out)) == ['last.pt', 'log.jsonl', 'metrics.json']  # no second log, no temp file
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    check_epoch_stats_cover_the_global_batch(recs)
    metrics = json.load(open(out / 'metrics.json'))
    assert metrics['world_size'] == 2 and metrics['final_epoch'] == 3 and metrics['test_size'] == 64
    assert torch.load(out / 'last.pt', weights_only=False)['epoch'] == 3


def ddp_config():
    return resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16), channels_last=False,
                          out_dir='unused'))


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def ddp_worker(rank, port, out, x, y, eps, lam):
    """One rank of a 2-process job started by torch.multiprocessing.spawn (module level: picklable)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2', RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dev = torch.device('cpu')
    got_rank, world = ibp.setup_distributed(dev)
    try:
        cfg = ddp_config()
        model, opt, bounds = ibp.prepare(cfg, dev, dataset_info(cfg), world)
        init = flat(model.parameters())
        # the shard that train() gives this rank: tensor_split of the global batch
        stats = ibp.train_step(bounds, opt, x.tensor_split(world)[got_rank], y.tensor_split(world)[got_rank],
                               eps, lam, cfg)
        params = flat(model.parameters())
        gathered = [torch.empty_like(params) for _ in range(world)]
        torch.distributed.all_gather(gathered, params)
        torch.save(dict(rank=got_rank, world=world, backend=torch.distributed.get_backend(),
                        ddp=isinstance(bounds, nn.parallel.DistributedDataParallel), init=init, gathered=gathered,
                        grads=flat(p.grad for p in model.parameters()), loss=stats['loss']),
                   os.path.join(out, f'{rank}.pt'))
        torch.distributed.barrier()  # both ranks done before either tears Gloo down
    finally:
        torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown, as ibp_short_warmup's __main__ does for ranks > 0:
    # its C++ destructors aborted ("terminate called without an active exception") in a CI run.
    os._exit(0)


def test_ddp_step_equals_single_process_step_on_the_mean_gradient(tmp_path):
    import torch.multiprocessing as mp
    cfg = ddp_config()
    info = dataset_info(cfg)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 7)
    x = x.float() / 255
    eps, lam = 2 / 255, 0.3
    ctx = mp.spawn(ddp_worker, args=(free_port(), str(tmp_path), x, y, eps, lam), nprocs=2, join=False)
    deadline = time.time() + DIST_TIMEOUT
    while not ctx.join(timeout=5):  # re-raises a worker's exception
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('the 2-rank DDP step did not finish')
    res = [torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in range(2)]
    assert [(r['rank'], r['world'], r['backend'], r['ddp']) for r in res] == [(0, 2, 'gloo', True),
                                                                          (1, 2, 'gloo', True)]
    final = res[0]['gathered'][0]
    for r in res:  # both ranks hold identical parameters after the step
        assert all(torch.equal(g, final) for g in r['gathered'])
    assert torch.equal(res[0]['init'], res[1]['init'])
    assert (final - res[0]['init']).abs().max() > cfg.lr / 2  # Adam's first step moves by ~lr
    assert res[0]['loss'] != res[1]['loss']  # the ranks saw different data

    # Oracle, one process: the same init, the loss of each shard with its own BN statistics, the mean
    # of the two gradients, gradient clipping and one plain Adam step.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info)
    assert torch.equal(flat(model.parameters()), res[0]['init'])
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shards = [ibp.batch_loss(ibp.Margins(model), xs, ys, eps, lam, cfg)
              for xs, ys in zip(x.tensor_split(2), y.tensor_split(2))]
    (sum(objective for objective, _ in shards) / 2).backward()
    assert nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) > cfg.grad_clip  # clipping is active
    adam.step()
    tol = TOL[torch.float32]
    for r, (_, stats) in zip(res, shards):  # the logged robust loss of each rank's shard
        torch.testing.assert_close(r['loss'], stats['loss'], rtol=tol, atol=tol)
        torch.testing.assert_close(r['grads'], flat(p.grad for p in model.parameters()), rtol=tol, atol=tol)
    torch.testing.assert_close(final, flat(model.parameters()), rtol=tol, atol=tol)


def test_resume_a_one_process_run_with_two_ranks(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'run')
    assert stop_after_first_checkpoint(TINY + ['--out-dir', out], monkeypatch) == 130  # one process, after epoch 1
    capsys.readouterr()
    first = open(os.path.join(out, 'log.jsonl')).read()
    assert [json.loads(line)['epoch'] for line in first.splitlines()] == [1]
    proc = torchrun(*TINY, '--out-dir', out, '--resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert epoch_lines(proc.stdout) == [2, 3]
    log = open(os.path.join(out, 'log.jsonl')).read()
    assert log.startswith(first)  # epoch 1's record kept as it was
    recs = [json.loads(line) for line in log.splitlines()]
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    check_epoch_stats_cover_the_global_batch(recs[1:])
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert metrics['world_size'] == 2 and metrics['final_epoch'] == 3
    # the wall clock continues from the checkpoint: the sum of the three epochs' seconds
    assert metrics['wall_seconds'] == pytest.approx(sum(r['seconds'] for r in recs), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# Init diagnosis (GitHub issue 6): difference gains of Eq. (6), measured and predicted
# ----------------------------------------------------------------------------------------------
GAIN_EQ6_TOL = 0.05  # relative: Eq. (6)'s gain from the drawn weights vs its expectation (>= 432 weights a layer)
GAIN_MEASURED_TOL = 0.15  # relative: the measured ratio of mean half-widths vs the predicted gain
GAIN_EPS = 8 / 255


def interval_radii(model, x, eps):
    """Mean box half-width after Normalize and at every ReLU input, by lower/upper interval arithmetic
    (W+ and W- applied to the bounds), a form the code under test (centre-radius) does not use."""
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    means = []
    for m in model[:-1]:
        if isinstance(m, Normalize):  # std > 0: monotone
            lo, up = m(lo), m(up)
            means.append(((up - lo) / 2).mean().item())
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            f = (lambda t, w, b: F.conv2d(t, w, b, m.stride, m.padding)) if isinstance(m, nn.Conv2d) else F.linear
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            lo, up = f(lo, wp, m.bias) + f(up, wn, None), f(up, wp, m.bias) + f(lo, wn, None)
        elif isinstance(m, nn.ReLU):
            means.append(((up - lo) / 2).mean().item())
            lo, up = F.relu(lo), F.relu(up)
        else:
            assert isinstance(m, nn.Flatten), m
            lo, up = lo.flatten(1), up.flatten(1)
    return means


def init_model(init):
    torch.manual_seed(0)
    cfg = Config(dataset='cifar10', bn='none', width=0.25, ibp_init=init == 'ibp')
    model = build_model(cfg, dataset_info(cfg))
    if init == 'kaiming':
        for m in [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]:
            nn.init.kaiming_normal_(m.weight)
    return model


# CNN-7 at width 0.25 (channels 16, 16, 32, 32, 32; FC 512/4 = 128): fan-ins 3*9, 16*9, 16*9, 32*9, 32*9, 32*16*16
FAN_INS = [27, 144, 144, 288, 288, 8192]
# E|W| of each init: default U(-1/sqrt(n), 1/sqrt(n)) -> 1/(2 sqrt(n)); kaiming N(0, 2/n) -> sqrt(2/n) sqrt(2/pi);
# IBP N(0, (sqrt(2 pi)/n)^2) -> 2/n; times n/2 (Eq. 6):
EXPECTED_GAIN = {'default': lambda n: math.sqrt(n) / 4, 'kaiming': lambda n: math.sqrt(n / math.pi),
                 'ibp': lambda n: 1.0}


@pytest.mark.parametrize('init', ['default', 'kaiming', 'ibp'])
def test_init_gains_per_layer(init):
    model = init_model(init).train()
    x, y = ibp.synthetic_images(64, (3, 32, 32), 10, 3)
    x = x.float() / 255
    rows = ibp.init_gains(model, x, y, GAIN_EPS)
    assert [r['layer'] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r['fan_in'] for r in rows] == FAN_INS
    feeding = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    radii = interval_radii(copy.deepcopy(model).to(D), x.to(D), GAIN_EPS)  # float64 oracle
    assert len(radii) == 7
    for i, (r, layer, n) in enumerate(zip(rows, feeding, FAN_INS)):
        assert r['gain_eq6'] == pytest.approx(n / 2 * layer.weight.abs().mean().item(), rel=1e-5)
        assert r['gain_measured'] == pytest.approx(radii[i + 1] / radii[i], rel=1e-4)
        assert r['log_delta'] == pytest.approx(math.log(radii[i + 1]), abs=1e-4)
        # the drawn weights give the init's expected gain (Eq. 6)
        assert r['gain_eq6'] == pytest.approx(EXPECTED_GAIN[init](n), rel=GAIN_EQ6_TOL), (r['layer'], r['gain_eq6'])
    if init == 'ibp':
        # the first layer sees the input box (no ReLU halves it): about 2; the others about 1
        assert rows[0]['gain_measured'] == pytest.approx(2, rel=GAIN_MEASURED_TOL)
        for r in rows[1:]:
            assert r['gain_measured'] == pytest.approx(1, rel=GAIN_MEASURED_TOL), (r['layer'], r['gain_measured'])
    else:  # every gain > 1: the bounds explode with depth
        logs = [r['log_delta'] for r in rows]
        assert all(b > a for a, b in zip(logs, logs[1:])), logs


def test_init_gains_residual_rows_use_the_branch_last_layer():
    """init_gains documents the layer feeding the ReLU after a residual add as 'the branch's last one'.
    Wide-ResNet at width 1/4 (stem 4, stages 32, 64, 128, FC 128) has a 1x1 conv shortcut in every
    block, so the branch's last 3x3 conv (fan-in 9 C) and the shortcut (fan-in C_in) differ."""
    torch.manual_seed(0)
    cfg = Config(dataset='cifar10', model='wide_resnet', width=0.25, ibp_init=True)
    model = build_model(cfg, dataset_info(cfg))
    blocks = [m for m in model if isinstance(m, Residual)]
    expected = [model[1]] + [b.branch[i] for b in blocks for i in (0, 3)] + [model[11]]
    assert [fan_in(m) for m in expected] == [27, 36, 288, 288, 576, 576, 1152, 8192]
    x, y = ibp.synthetic_images(16, (3, 32, 32), 10, 3)
    rows = ibp.init_gains(model.train(), x.float() / 255, y, GAIN_EPS)
    assert [r['fan_in'] for r in rows] == [fan_in(m) for m in expected]
    for r, m in zip(rows, expected):
        assert r['gain_eq6'] == pytest.approx(fan_in(m) / 2 * m.weight.abs().mean().item(), rel=1e-5)


def test_diagnose_init_cli_prints_three_inits(capsys, backend_flags):
    assert main(['--diagnose-init', '--dataset', 'synthetic', '--width', '0.25', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    tables = {}
    for block in out.split('\n\n')[1:]:
        title, header, *rows = block.strip().splitlines()
        assert header.split() == ['layer', 'fan-in', 'gain', 'Eq.6', 'measured', 'log', 'E(Delta)']
        tables[title] = [[float(v) for v in row.split()] for row in rows]
    assert list(tables) == [f'{i} init, BN {bn}:' for i in ('default', 'kaiming', 'ibp') for bn in ('full', 'none')]
    for title, rows in tables.items():
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [int(r[1]) for r in rows] == FAN_INS
        init = title.split()[0]
        for r in rows:
            assert r[2] == pytest.approx(EXPECTED_GAIN[init](r[1]), rel=GAIN_EQ6_TOL), (title, r)


# ----------------------------------------------------------------------------------------------
# Attack ordering (GitHub issue 6): standard <= PGD <= verified error; PGD margins inside the bounds
# ----------------------------------------------------------------------------------------------
ATTACK_EPS = [1e-4, 4e-4, 3e-3]  # mostly verified / partly verified and attackable / nothing verified
PGD = dict(pgd_steps=10, pgd_restarts=2)


@pytest.fixture(scope='module')
def tiny_trained():
    """CNN-7 without BN (eval = train mode), width 1/16, 16x16 synthetic images, 20 clean Adam steps."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = resolve(Config(dataset='synthetic', bn='none', method='vanilla', width=0.0625, synthetic_shape=(3, 16, 16),
                         lr=5e-3, channels_last=False, out_dir='unused'))
    info = dataset_info(cfg)
    model, opt, bounds = ibp.prepare(cfg, torch.device('cpu'), info)
    x, y = ibp.synthetic_images(512, info['shape'], info['classes'], 1)
    for i in range(20):
        idx = torch.arange(i * 32, (i + 1) * 32) % 512
        ibp.train_step(bounds, opt, ibp.to_input(x[idx], cfg), y[idx], 0.0, 0.0, cfg)
    test = ibp.synthetic_images(128, info['shape'], info['classes'], 2)
    torch.set_num_threads(saved)
    return model.eval(), test


def margins_of(z, y):
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('inf'))
    return other.amin(1)


def test_evaluate_error_ordering(tiny_trained):
    model, (x, y) = tiny_trained
    with torch.no_grad():
        std_oracle = (model(x.float() / 255).argmax(1) != y).float().mean().item()  # plain forward pass
    for eps in ATTACK_EPS:
        res = ibp.evaluate(model, (x, y), eps, **PGD)
        assert res['std_err'] == std_oracle
        assert res['std_err'] <= res['pgd_err'] <= res['ver_err'], (eps, res)
        # batching does not change the deterministic errors (128 = 2 x 50 + 28)
        other = ibp.evaluate(model, (x, y), eps, batch_size=50)
        assert other['pgd_err'] is None
        assert (other['std_err'], other['ver_err']) == (res['std_err'], res['ver_err'])
    res = ibp.evaluate(model, (x, y), ATTACK_EPS[1], **PGD)
    assert res['std_err'] < res['pgd_err'] < res['ver_err'] < 1, res  # the three differ: the test can fail


class Recorder(nn.Module):
    """The model, recording every input it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def true_margin(z, y):
    return z.gather(1, y[:, None]).squeeze(1) - z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)


def test_pgd_margin_between_ibp_bound_and_clean_margin(tiny_trained):
    model, (x, y) = tiny_trained
    x = x.float() / 255
    with torch.no_grad():
        clean = true_margin(model(x), y)
    tol = TOL[torch.float32] * (1 + clean.abs())
    steps, restarts = PGD['pgd_steps'], PGD['pgd_restarts']
    for eps in ATTACK_EPS[1:]:
        with torch.no_grad():
            _, lb = ibp_margins(model, x, y, eps)
        worst = margins_of(lb, y)  # min over j != y of the certified lower bound of z_y - z_j
        rec = Recorder(model)
        found = ibp.pgd_margin(rec, x, y, eps, steps, restarts, torch.Generator().manual_seed(0))
        assert found.shape == y.shape
        # every point the attack tried lies in the clipped eps-box, and the result is the smallest
        # margin among them (recomputed by a plain forward pass)
        assert len(rec.seen) == restarts * (steps + 1)
        lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        for pt in rec.seen:
            assert torch.all(pt >= lo - TOL[torch.float32]) and torch.all(pt <= up + TOL[torch.float32])
        with torch.no_grad():
            tried = torch.stack([true_margin(model(pt), y) for pt in rec.seen]).amin(0)
        torch.testing.assert_close(found, tried, rtol=TOL[torch.float32], atol=TOL[torch.float32])
        assert torch.all(found <= clean + tol), eps  # the attack never does worse than the clean point
        assert torch.all(found >= worst - tol), eps  # and never beats a sound bound
        assert (found < clean - 1e-3).float().mean() > 0.5, eps  # it does attack


def test_evaluate_raises_when_bounds_are_unsound(tiny_trained, monkeypatch):
    model, data = tiny_trained
    real = ibp.ibp_margins

    def claims_everything_verified(*args, **kw):
        logits, lb = real(*args, **kw)
        return logits, lb + 100

    monkeypatch.setattr(ibp, 'ibp_margins', claims_everything_verified)
    assert ibp.evaluate(model, data, ATTACK_EPS[2])['ver_err'] == 0  # the patch is in effect; no attack, no check
    with pytest.raises(RuntimeError, match='unsound'):
        ibp.evaluate(model, data, ATTACK_EPS[2], **PGD)


# ----------------------------------------------------------------------------------------------
# GPU code paths exercised on the CPU (GitHub issue 5): TF32 flags, channels-last, compile, benchmark
# ----------------------------------------------------------------------------------------------
def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def backend_flags():
    """setup_device sets process-wide backend flags: put them back after the test."""
    saved = tf32_flags(), torch.backends.cudnn.benchmark
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32), torch.backends.cudnn.benchmark = saved


def test_evaluate_certifies_in_full_fp32(tiny_trained, monkeypatch, backend_flags):
    model, data = tiny_trained
    seen = []

    def recording(fn, result=lambda r: r):
        def wrapper(*args, **kw):
            seen.append((fn.__name__, tf32_flags()))
            return result(fn(*args, **kw))
        return wrapper

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training leaves them
    monkeypatch.setattr(ibp, 'ibp_margins', recording(ibp.ibp_margins))
    monkeypatch.setattr(ibp, 'pgd_margin', recording(ibp.pgd_margin))
    ibp.evaluate(model, data, ATTACK_EPS[2], batch_size=64, pgd_steps=2)
    assert [name for name, _ in seen] == ['ibp_margins', 'pgd_margin'] * 2
    assert all(flags == (False, False) for _, flags in seen), seen
    assert tf32_flags() == (True, True)  # restored afterwards
    # ... also when evaluate raises (unsound bounds)
    monkeypatch.setattr(ibp, 'ibp_margins', recording(ibp.ibp_margins, lambda r: (r[0], r[1] + 100)))
    with pytest.raises(RuntimeError):
        ibp.evaluate(model, data, ATTACK_EPS[2], pgd_steps=2)
    assert tf32_flags() == (True, True)


@pytest.mark.parametrize('tf32', [True, False])
def test_setup_device_sets_tf32_for_training(tf32, backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    cfg = Config(device='cpu', tf32=tf32)
    assert ibp.setup_device(cfg) == torch.device('cpu')
    assert tf32_flags() == (tf32, tf32)
    assert cfg.channels_last is False  # the default is channels-last on CUDA only
    assert ibp.setup_device(Config(device='cpu', channels_last=True)).type == 'cpu'  # an explicit value is kept


def small_synthetic(**kw):
    cfg = resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16), out_dir='unused', **kw))
    return cfg, dataset_info(cfg)


def test_channels_last_gives_the_same_bounds_and_step():
    (cl, info), (cf, _) = small_synthetic(channels_last=True), small_synthetic(channels_last=False)
    dev = torch.device('cpu')
    m_cl, opt_cl, b_cl = ibp.prepare(cl, dev, info)
    m_cf, opt_cf, b_cf = ibp.prepare(cf, dev, info)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x_cl, x_cf = ibp.to_input(x, cl), ibp.to_input(x, cf)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    assert x_cf.is_contiguous()
    conv = next(m for m in m_cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    tol = TOL[torch.float32]

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())

    eps = 2 / 255
    for mode in (True, False):  # BN on batch statistics, then on running statistics
        m_cl.train(mode)
        m_cf.train(mode)
        with torch.no_grad():
            (z1, lb1, pre1), (z2, lb2, pre2) = b_cl(x_cl, y, eps), b_cf(x_cf, y, eps)
        same(z1, z2)
        same(lb1, lb2)
        assert len(pre1) == len(pre2) == 7
        for (c1, r1, *_), (c2, r2, *_) in zip(pre1, pre2):
            same(c1, c2)
            same(r1, r2)
    m_cl.train()
    m_cf.train()
    s1 = ibp.train_step(b_cl, opt_cl, x_cl, y, eps, 0.3, cl)
    s2 = ibp.train_step(b_cf, opt_cf, x_cf, y, eps, 0.3, cf)
    assert torch.isfinite(s1['loss'])
    same(s1['loss'], s2['loss'])
    same(flat(p.grad for p in m_cl.parameters()), flat(p.grad for p in m_cf.parameters()))
    torch.manual_seed(cl.seed)
    init = flat(build_model(cl, info).parameters())
    assert (flat(m_cl.parameters()) - init).abs().max() > cl.lr / 2  # the step moved the weights


@pytest.mark.skipif(not os.environ.get('THOROUGH_TESTS'),
                    reason='torch.compile with a cold inductor cache takes ~40 s on the 2-core CPU: '
                           'set THOROUGH_TESTS=1 (.ci/run does)')
def test_compiled_bounds_give_the_eager_step():
    (cc, info), (ce, _) = small_synthetic(channels_last=False, compile=True), small_synthetic(channels_last=False)
    dev = torch.device('cpu')
    m_c, opt_c, b_c = ibp.prepare(cc, dev, info)
    m_e, opt_e, b_e = ibp.prepare(ce, dev, info)
    assert isinstance(b_c, torch._dynamo.eval_frame.OptimizedModule) and isinstance(b_c._orig_mod, ibp.Margins)
    assert isinstance(b_e, ibp.Margins)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x = ibp.to_input(x, cc)
    tol = TOL[torch.float32]
    s_c = ibp.train_step(b_c, opt_c, x, y, 2 / 255, 0.3, cc)
    s_e = ibp.train_step(b_e, opt_e, x, y, 2 / 255, 0.3, ce)
    for k in ('loss', 'l_tightness', 'l_relu'):
        torch.testing.assert_close(s_c[k], s_e[k], rtol=tol, atol=tol)
    g_c, g_e = flat(p.grad for p in m_c.parameters()), flat(p.grad for p in m_e.parameters())
    torch.testing.assert_close(g_c, g_e, rtol=tol, atol=tol * g_e.abs().max().item())


def test_benchmark_cli_writes_three_variants_and_ratios(tmp_path, capsys, backend_flags):
    # 5 timed steps (not 2): the median of 5 needs three outliers to flip a ratio on a shared machine
    out = tmp_path / 'bench'
    assert main(['--benchmark', '--dataset', 'synthetic', '--width', '0.0625', '--batch-size', '8',
                 '--benchmark-steps', '5', '--device', 'cpu', '--out-dir', str(out)]) == 0
    assert 'ratios (median over rounds):' in capsys.readouterr().out
    res = json.load(open(out / 'benchmark.json'))
    assert list(res['results']) == ['clean', 'vanilla_ibp', 'ours']
    for name, r in res['results'].items():
        assert 0 < r['min_ms'] <= r['ms_per_step'] <= r['max_ms'], name
        assert r['img_per_s'] == pytest.approx(8 / r['ms_per_step'] * 1000)
    # ratios: the median over rounds of the paired per-round ratios
    rounds = res['round_ratios']
    assert set(rounds) == {'vanilla_ibp/clean', 'ours/clean'} and all(len(v) == 5 for v in rounds.values())
    assert res['ratios'] == pytest.approx({k: sorted(v)[2] for k, v in rounds.items()})
    # an IBP step propagates the clean batch, the centre and the radius: strictly more work than a clean step
    assert all(v > 1 for v in res['ratios'].values()), res['ratios']


# ----------------------------------------------------------------------------------------------
# README: the paper-to-code table names functions that exist
# ----------------------------------------------------------------------------------------------
def test_readme_paper_to_code_table_names_existing_functions():
    import re
    readme = open(os.path.join(REPO, 'README.md')).read()
    table = readme[readme.index('Paper to code'):readme.index('## Output')]
    names = set(re.findall(r'`([a-z_0-9]+)`', table))
    assert len(names) >= 10, 'the table lost its function names'
    missing = [n for n in names if not callable(getattr(ibp, n, None))]
    assert not missing, f'README names functions that do not exist: {missing}'
    # and every [paper]-tagged contribution is reachable from the table
    for n in ('ibp_init_', 'warmup_regularizers', 'ibp_forward'):
        assert n in names
