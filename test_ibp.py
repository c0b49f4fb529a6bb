"""Deterministic example tests of ibp_short_warmup.py: Shi, Wang, Zhang, Yi, Hsieh, "Fast Certified
Robust Training with Short Warmup", NeurIPS 2021.

Every expected value comes from an oracle that is not the code under test: numbers worked by hand
(the arithmetic is in the comments), plain PyTorch forward passes and nn.BatchNorm itself, a
convolution unrolled into a dense matrix, brute-force sampling of the input box, a brute-force
search over crops, finite differences of the whole training objective. The tolerance table and
the regularizer oracle are shared with the property tests: tests_property/oracles.py.
"""
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp
import ibp_tools
from ibp_short_warmup import (Config, Normalize, Residual, augment, build_model, cnn7, dataset_info,
                              eps_at, fan_in, ibp_forward, ibp_init_, ibp_margins, input_box,
                              lam_at, lr_at, main, parse_args, resnext, resolve, robust_loss,
                              verified, warmup_regularizers, wide_resnet)

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(REPO, 'ibp_short_warmup.py')
sys.path.insert(0, os.path.join(REPO, 'tests_property'))  # the shared oracles and tolerances
from oracles import (FD, GAIN_EQ6_TOL, GAIN_TOL, KINK_MARGIN, PARAM_COUNT_TOL, TOL,  # noqa: E402
                     abs_mean_tol, mean_tol, regularizer_oracle, std_tol, tol_of)
from prop_support import frozen_copy  # noqa: E402

D = torch.float64
F32 = torch.float32


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 cores shared with other jobs: one intra-op thread avoids
    oversubscription."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def approx(expected):
    """pytest.approx with the float64 tolerances (Python floats are float64)."""
    return pytest.approx(expected, rel=TOL[D]['rtol'], abs=TOL[D]['atol'])


def close(actual, expected, dtype=D):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=TOL[dtype]['atol'], rtol=TOL[dtype]['rtol'])


def t(values):
    return torch.tensor(values, dtype=D)


def linear(weight, bias):
    layer = nn.Linear(len(weight[0]), len(weight)).to(D)
    with torch.no_grad():
        layer.weight.copy_(t(weight))
        layer.bias.copy_(t(bias))
    return layer


# ----------------------------------------------------------------------------------------------
# Interval bound propagation (Eq. 3): hand-worked boxes, the ReLU at its kinks, convolutions,
# eps = 0 for every model family
# ----------------------------------------------------------------------------------------------
def test_hand_two_layer_net_bounds_margins_and_clipping():
    """Linear(2,2) - ReLU - Linear(2,2), eps 0.1, one input coordinate clipped at 1, one unstable
    ReLU."""
    model = nn.Sequential(linear([[1, -1], [2, 1]], [0, -2]), nn.ReLU(),
                          linear([[1, 2], [-1, 1]], [0.5, 0]))
    x = t([[0.95, 0.25], [0.95, 0.25]])
    y = torch.tensor([0, 1])
    # input box: x0 in [0.85, 1.0] (clipped at 1): c 0.925 r 0.075; x1 in [0.15, 0.35]: c 0.25 r 0.1
    c0, r0 = input_box(x, 0.1)
    close(c0, [[0.925, 0.25]] * 2)
    close(r0, [[0.075, 0.1]] * 2)
    # h0 = x0 - x1 in [0.85 - 0.35, 1.0 - 0.15] = [0.5, 0.85]: c 0.675, r 0.175 (active)
    # h1 = 2 x0 + x1 - 2 in [1.7 + 0.15 - 2, 2 + 0.35 - 2] = [-0.15, 0.35]: c 0.1, r 0.25 (unstable)
    # ReLU: a0 in [0.5, 0.85], a1 in [0, 0.35]
    # z0 = a0 + 2 a1 + 0.5 in [1.0, 2.05];  z1 = -a0 + a1 in [-0.85, -0.15]
    pre = []
    h, c, r = ibp_forward(model, x, c0, r0, pre)
    assert len(pre) == 1 and len(pre[0]) == 2  # the box (c, r) at the input of the ReLU
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


def test_residual_and_normalize_by_hand():
    # Residual(Linear(1,1) w -2 b 1, Identity): c = 1, r = 0.5 -> branch c -1 r 1; shortcut c 1
    # r 0.5
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
    assert len(pre) == 1 and len(pre[0]) == 2
    close(pre[0][0], c)
    close(pre[0][1], r)


def test_interval_relu_at_the_kinks_by_hand():
    """Eq. (3) for the ReLU with u = 0 and l = 0 exactly: the box [relu(l), relu(u)], and its
    gradient through autograd, in which PyTorch's relu derivative at 0 is 0. The ReLU states
    (Figure 2) and the masks of Eq. (8) are strict: l = 0 is not active, u = 0 not inactive."""
    c, r = t([1.0, -1.0, 2.0, -3.0]).requires_grad_(), t([1.0, 1.0, 1.0, 1.0]).requires_grad_()
    c_out, r_out = ibp.interval_relu(c, r)  # u = c + r = 2, 0, 3, -2; l = c - r = 0, -2, 1, -4
    # [relu(l), relu(u)] = [0, 2], [0, 0], [1, 3], [0, 0] as centre and radius
    close(c_out, [1.0, 0.0, 2.0, 0.0])
    close(r_out, [1.0, 0.0, 1.0, 0.0])
    (c_out.sum() + 10 * r_out.sum()).backward()
    # c' = (relu(u) + relu(l)) / 2, r' = (relu(u) - relu(l)) / 2, so d(c' + 10 r')/dc =
    # 5.5 relu'(u) - 4.5 relu'(l) and d/dr = 5.5 relu'(u) + 4.5 relu'(l), with relu'(0) = 0:
    # l = 0: 5.5, 5.5; u = 0: 0, 0; active (relu' = 1 twice): 1, 10; inactive: 0, 0
    close(c.grad, [5.5, 0.0, 1.0, 0.0])
    close(r.grad, [5.5, 0.0, 10.0, 0.0])
    # The same layer as a pre entry behind an input box of mean radius 1/2, tau = 3/4:
    # active (l > 0): neuron 2 only; inactive (u < 0): neuron 3 only; 0 and 1 unstable
    pre = [(t([[0.0, 0.0]]), t([[0.5, 0.5]])), (c.detach()[None], r.detach()[None])]
    l_tight, l_relu, states = warmup_regularizers(pre, 0.75)
    close(states.to(D), [[0.25, 0.25, 0.5]])
    # E(Delta_1) = 1: ReLU(3/4 - 1/2) / (tau m) = 1/3
    close(l_tight, 1 / 3)
    # alpha = 2 / 3 (sum c A = 2, -sum c I = 3): ReLU(3/4 - 2/3) = 1/12; mean c = -1/4, so
    # beta = (2 + 1/4)^2 / (3 - 1/4)^2 = 81/121: ReLU(3/4 - 81/121). (Counting l = 0 as active would
    # give alpha = 1 and beta = (25/16 + 81/16) / (121/16) = 106/121 > 3/4: L_relu = 0.)
    close(l_relu, (1 / 12 + 3 / 4 - 81 / 121) / 0.75)


def test_unknown_layer_raises():
    with pytest.raises(TypeError):
        ibp_forward(nn.Sequential(nn.Tanh()), t([[0.0]]), t([[0.0]]), t([[0.0]]))


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
        cols = F.conv2d(basis, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                        conv.groups)
    out_shape = cols.shape[1:]
    bias = conv.bias.detach().repeat_interleave(out_shape[1] * out_shape[2])
    dense = linear(cols.flatten(1).T.tolist(), bias.tolist())
    x = torch.rand(3, cin, h, w, dtype=D)
    r = torch.rand(3, cin, h, w, dtype=D)
    xo, co, ro = ibp_forward(conv, x, x, r)
    xl, cl, rl = ibp_forward(dense, x.flatten(1), x.flatten(1), r.flatten(1))
    close(xo.flatten(1), xl)
    close(co.flatten(1), cl)
    close(ro.flatten(1), rl)


FAMILIES = [('cnn7', 'full'), ('cnn7', 'conv'), ('cnn7', 'none'), ('wide_resnet', 'full'),
            ('resnext', 'full')]
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
        # ibp_margins: a second pass in train mode; ref's statistics follow with another forward
        if mode == 'train':
            z = ref(x)
        logits, lb = ibp_margins(net, x, y, 0.0)
        close(logits, z)
        close(lb, z.gather(1, y[:, None]) - z)
        close(robust_loss(lb), F.cross_entropy(z, y))
        for (name, a), (_, b) in zip(net.named_buffers(), ref.named_buffers()):
            close(a.to(D), b.to(D))  # running statistics updated exactly as nn.BatchNorm does


@pytest.mark.parametrize('model,bn,dataset,relus', [('cnn7', 'full', 'cifar10', 6),
                                                    ('wide_resnet', 'full', 'mnist', 8),
                                                    ('resnext', 'full', 'tinyimagenet', 20)])
def test_pre_collects_normalized_input_and_every_relu_input(model, bn, dataset, relus):
    # ResNeXt on 64x64 has two blocks per stage: stem 1 + 6 blocks x 3 ReLUs (2 in the branch, 1
    # after the add) + head 1 = 20
    net, info = small_model(model, bn, dataset)
    x = torch.rand(2, *info['shape'], dtype=D)
    pre = []
    ibp_margins(net.eval(), x, torch.tensor([0, 1]), 0.01, pre)
    assert len(pre) == relus + 1 and all(len(p) == 2 for p in pre)  # boxes (c, r)
    std = torch.tensor(info["std"]).to(D).view(1, -1, 1, 1)  # the float32 buffer of Normalize
    close(pre[0][1], input_box(x, 0.01)[1] / std)  # entry 0: the normalized input box


# ----------------------------------------------------------------------------------------------
# Margins with C folded (Sec. 2): soundness by sampling, folding tighter than subtracting
# ----------------------------------------------------------------------------------------------
def test_verified_is_strict():
    y = torch.tensor([0, 1, 2])
    lb = t([[0, 1e-9, 2], [0.0, 0, 3], [5, -1e-9, 0]])
    # sample 0: all j != y positive; sample 1: lb_0 = 0 is not > 0; sample 2: lb_1 < 0
    assert verified(lb, y).tolist() == [True, False, False]


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
            tol = tol_of(D, z.abs())
            assert torch.all(z >= c - r - tol) and torch.all(z <= c + r + tol)
            assert torch.all(lb <= z.gather(1, y[:, None]) - z + tol)
    # folding C into the last layer is never looser than subtracting logit bounds
    idx = torch.arange(len(y))
    naive = (c - r)[idx, y][:, None] - (c + r)
    naive[idx, y] = 0
    assert torch.all(lb >= naive - tol_of(D))
    assert (lb - naive).max() > 1e-6, 'folding should be strictly tighter somewhere'
    assert torch.all(lb[idx, y] == 0)


# ----------------------------------------------------------------------------------------------
# Models with full BN (Sec. 3.3.2, Sec. 4.1): clean-batch statistics, nn.BatchNorm as the oracle,
# architectures
# ----------------------------------------------------------------------------------------------
def bn_net():
    """Linear(1,2) - BN1d(2, eps 0) - ReLU - Linear(2,2) for the hand-worked BN examples."""
    bn = nn.BatchNorm1d(2, eps=0.0).to(D)
    return nn.Sequential(linear([[1], [-2]], [0, 1]), bn, nn.ReLU(),
                         linear([[1, -1], [0, 2]], [0, 0.5]))


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
    # clean: sample 1 BN = [-1, 1] -> a = [0, 1] -> z = [-1, 2.5]; sample 2 a = [1, 0] -> z =
    # [1, 0.5]
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
    # clean: x 0.2 -> BN [-0.5, 1] -> a [0, 1] -> z [-1, 2.5];
    #        x 0.8 -> BN [2.5, -2] -> a [2.5, 0] -> z [2.5, 0.5]
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
    # running statistics: momentum 0.1 from (0, 1), unbiased variance (n = 4): 4 * 4/3, 0.25 * 4/3
    close(bn.running_mean, [0.4, 0.05])
    close(bn.running_var, [0.9 + 0.1 * 16 / 3, 0.9 + 0.1 * 1 / 3])
    assert bn.num_batches_tracked.item() == 1


def test_bn_train_statistics_are_not_detached():
    """Sec. 3.3.2: gradients flow through the clean-batch statistics into the bounds."""
    bn = nn.BatchNorm1d(2).to(D).train()
    x = t([[2, 0], [6, 1], [3, 0.5]]).requires_grad_(True)
    c, r = t([[4, 0.5]]), t([[0.2, 0.1]])  # the box does not depend on x
    _, co, ro = ibp_forward(bn, x, c, r)
    (co.sum() + ro.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 1e-3


def test_bn2d_per_channel_statistics_match_nn_batchnorm():
    """BN2d in training mode: the clean output is nn.BatchNorm2d's, and the box is the exact range
    of nn.BatchNorm2d in eval mode with the batch's mean and biased variance frozen in (its slope
    per channel, frozen(1) - frozen(0), scales the radius)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).to(D).train()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    ref = copy.deepcopy(bn)
    x = torch.randn(4, 3, 5, 5, dtype=D) * t([1, 2, 3]).view(1, 3, 1, 1) + 1
    r = torch.rand(4, 3, 5, 5, dtype=D)
    frozen = frozen_copy(bn, x)
    with torch.no_grad():
        slope = frozen(torch.ones(1, 3, 1, 1, dtype=D)) - frozen(torch.zeros(1, 3, 1, 1, dtype=D))
    xo, co, ro = ibp_forward(bn, x, x, r)
    close(xo, ref(x))
    close(co, xo)
    close(ro, r * slope.abs())
    assert (slope < 0).any() and (slope > 0).any()  # BN weights of both signs
    close(bn.running_mean, ref.running_mean)
    close(bn.running_var, ref.running_var)


@pytest.mark.parametrize('shape', [(6, 3), (4, 3, 5), (4, 3, 5, 5)])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_bn_affine_matches_nn_batchnorm(shape, momentum):
    """bn_affine(bn, h) = (w, b) with BN(h) = w h + b per channel (dimension 1): in training mode
    from the clean batch's statistics, with their gradient, moving running_mean, running_var and
    num_batches_tracked as nn.BatchNorm does (by the momentum, or the cumulative average when it is
    None); in eval mode from the running statistics, which stay. The oracle is nn.BatchNorm1d/2d."""
    g = torch.Generator().manual_seed(3)
    kind = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    bn = kind(shape[1], momentum=momentum).to(D).train()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(shape[1], generator=g, dtype=D) * 4 - 2)
        bn.bias.copy_(torch.randn(shape[1], generator=g, dtype=D))
    ref = copy.deepcopy(bn)
    view = [1, -1] + [1] * (len(shape) - 2)
    for step in (1, 2):  # two batches: the running statistics move twice
        h = (torch.randn(shape, generator=g, dtype=D) * 2 + 1).requires_grad_()
        h_ref = h.detach().clone().requires_grad_()
        w, b = ibp.bn_affine(bn, h)
        out, out_ref = w.view(view) * h + b.view(view), ref(h_ref)
        close(out, out_ref)
        grad_out = torch.randn(shape, generator=g, dtype=D)
        out.backward(grad_out)
        out_ref.backward(grad_out)
        close(h.grad, h_ref.grad)  # through the batch mean and variance
        assert h.grad.abs().max() > 1e-3
        for p, q in zip(bn.parameters(), ref.parameters()):
            close(p.grad, q.grad)
        close(bn.running_mean, ref.running_mean)
        close(bn.running_var, ref.running_var)
        assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == step
    bn.eval()
    ref.eval()
    h = torch.randn(shape, generator=g, dtype=D)
    running = bn.running_mean.clone(), bn.running_var.clone()
    w, b = ibp.bn_affine(bn, h)
    close(w.view(view) * h + b.view(view), ref(h))
    close(bn.running_mean, running[0])
    close(bn.running_var, running[1])
    assert bn.num_batches_tracked.item() == 2


@pytest.mark.parametrize('train', [True, False])
def test_conv_bn_fold_equals_conv_then_bn(train):
    """Conv -> BN folded for the box gives what the conv rule followed by the BN rule gives,
    gradients included, and moves the running statistics once; the clean output is nn's."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, groups=1), nn.BatchNorm2d(4)).to(D).train(train)
    with torch.no_grad():
        net[1].weight.uniform_(-2, 2)
        net[1].running_var.uniform_(0.5, 2)
    ref, plain = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.rand(5, 3, 8, 8, dtype=D)
    c, r = input_box(x, 0.05)
    outs = []
    for m, run in [(net, lambda: ibp_forward(net, x, c, r)),
                   (ref, lambda: ibp_forward(ref[1], *ibp_forward(ref[0], x, c, r)))]:
        xo, co, ro = run()
        (xo.square().sum() + co.sum() + (ro * co).sum()).backward()
        outs.append((xo, co, ro, *[p.grad for p in m.parameters()], m[1].running_mean,
                     m[1].running_var))
    for mine, oracle in zip(*outs):
        close(mine, oracle)
    close(outs[0][0], plain(x))
    close(net[1].running_var, plain[1].running_var)
    assert net[1].num_batches_tracked.item() == int(train)


@pytest.mark.parametrize('fn,params,relus', [(cnn7, 17.2e6, 6), (wide_resnet, 21.6e6, 8),
                                             (resnext, 17.6e6, 11)])
def test_cifar_parameter_counts_and_relu_layers(fn, params, relus):
    with torch.device('meta'):
        layers = fn((3, 32, 32), 10, 1.0)
    net = nn.Sequential(*layers)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - params) / params < PARAM_COUNT_TOL, n
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == relus
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == 10  # classifier last


@pytest.mark.parametrize('fn,fc_in', [(cnn7, 32768), (wide_resnet, 163840), (resnext, 32768)])
def test_tinyimagenet_fc_input_sizes(fn, fc_in):
    with torch.device('meta'):
        layers = fn((3, 64, 64), 200, 1.0)
    fcs = [m for m in nn.Sequential(*layers).modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(fc_in, 512), (512, 200)]


# ----------------------------------------------------------------------------------------------
# IBP initialization (Sec. 3.3.1, Eq. 6)
# ----------------------------------------------------------------------------------------------
def test_ibp_init_sigma_and_classifier_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Conv2d(64, 96, 3, groups=2), nn.ReLU(),
                        nn.BatchNorm1d(4), nn.Linear(512, 10))
    before = copy.deepcopy(net)
    ibp_init_(net)
    for layer, n_i in [(net[0], 2048), (net[2], 32 * 9)]:
        assert fan_in(layer) == n_i
        sigma, k = math.sqrt(2 * math.pi) / n_i, layer.weight.numel()
        std = layer.weight.std().item()
        assert abs(std / sigma - 1) < std_tol(k), (std, sigma)
        assert abs(layer.weight.mean().item()) < mean_tol(sigma, k)
        gain = n_i / 2 * layer.weight.abs().mean().item()  # Eq. (6): difference gain 1
        assert abs(gain - 1) < abs_mean_tol(k)
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
        assert abs(ratio / expect - 1) < std_tol(m.weight.numel()), (m, ratio, expect)
    assert n_halved == 4
    # the dense layer after the last block keeps the full sigma
    fc = [m for m in mods if isinstance(m, nn.Linear)][0]
    ratio = fc.weight.std().item() * fc.in_features / math.sqrt(2 * math.pi)
    assert abs(ratio - 1) < std_tol(fc.weight.numel())
    # the classifier keeps PyTorch's default U(-1/sqrt(n), 1/sqrt(n)): std 1/sqrt(3 n)
    ratio = classifier.weight.std().item() * math.sqrt(3 * classifier.in_features)
    assert abs(ratio - 1) < std_tol(classifier.weight.numel(), kurtosis=1.8)


# ----------------------------------------------------------------------------------------------
# Warmup regularizers (Eq. 7, 8) on hand-made boxes
# ----------------------------------------------------------------------------------------------
def test_regularizers_zero_when_ratios_within_tolerance():
    pre = [(t([[0.5, 0.5]]), t([[1.0, 1.0]])),  # E(Delta_0) = 1
           # layer 1: E(Delta_1) = 0.5 -> Delta_0 / Delta_1 = 2 >= tau
           # active (c - r > 0): 1, 2 -> sum 3; inactive (c + r < 0): -1, -2 -> -sum 3: alpha = 1
           # mean c = 0, dev = 1, 1, 4, 4: active 5, inactive 5: beta = 1
           (t([[1, -1], [2, -2]]), t([[0.5, 0.5], [0.5, 0.5]])),
           # layer 2: E(Delta_2) = 2 -> ratio 1/2 = tau -> ReLU(0) = 0. The bounds touch zero: l = 0
           # for the first neuron, u = 0 for the second: both unstable (strict), so the relu term is
           # skipped (counted as active/inactive it would be alpha = 3 -> ReLU(0.5 - 1/3) > 0)
           (t([[3.0, -1.0]]), t([[3.0, 1.0]]))]
    lt, lr, _ = warmup_regularizers(pre, 0.5)
    assert lt.item() == 0 and lr.item() == 0
    close(warmup_regularizers(pre, 0.5)[2].to(D), [[0.5, 0.5, 0], [0, 0, 1]])


def test_regularizers_exact_value_by_hand():
    tau = 0.5
    pre = [(t([[0.3, 0.7]]), t([[0.1, 0.1]])),  # E(Delta_0) = 0.1
           # layer 1, pooled over batch and neurons: c = 3, 1, -1, 0, r = 0.5 each (E(Delta_1) 0.5)
           #   tightness: ReLU(0.5 - 0.1/0.5) = 0.3
           #   active (c - r > 0): 3, 1 -> p = 4; inactive (c + r < 0): -1 -> q = 1 (0 is unstable)
           #   alpha = 4 -> min(4, 1/4) = 0.25 -> ReLU(0.5 - 0.25) = 0.25
           #   mean c = 0.75; dev 2.25^2 = 5.0625, 0.25^2 = 0.0625, 1.75^2 = 3.0625, 0.75^2 = 0.5625
           #   beta = (5.0625 + 0.0625) / 3.0625 = 1.6735 -> min = 0.5976 > tau -> 0
           (t([[3, 1], [-1, 0]]), t([[0.5, 0.5], [0.5, 0.5]])),
           # layer 2: E(Delta_2) = 0.05: tightness ReLU(0.5 - 2) = 0; all active: relu term skipped
           # (if counted it would add ReLU(0.5 - 0) + ReLU(0.5 - 0) = 1)
           (t([[2, 1]]), t([[0.05, 0.05]])),
           # layer 3: E(Delta_3) = 0.4: tightness ReLU(0.5 - 0.25) = 0.25; all inactive -> skipped
           (t([[-2, -1]]), t([[0.4, 0.4]]))]
    lt, lr, _ = warmup_regularizers(pre, tau)
    m = 3
    close(lt, (0.3 + 0 + 0.25) / (tau * m))  # 0.55 / 1.5
    close(lr, 0.25 / (tau * m))  # 0.25 / 1.5
    # ReLU states: layer 1 active 2/4, inactive 1/4, unstable 1/4; layer 2 all active; layer 3 all
    # inactive
    close(warmup_regularizers(pre, 0.5)[2].to(D), [[0.5, 0.25, 0.25], [1, 0, 0], [0, 1, 0]])


def test_regularizer_beta_term_by_hand():
    tau = 0.5
    # c = 4, -1, -1, -2 with r = 0.5 (E(Delta_1) = 0.5 = E(Delta_0): tightness ReLU(0.5 - 1) = 0)
    # active: 4 -> p = 4; inactive: -1, -1, -2 -> q = 4: alpha = 1 -> 0
    # mean c = 0; dev 16, 1, 1, 4: active 16, inactive 6: beta = 16/6 -> min = 0.375 ->
    # ReLU(0.5 - 0.375) = 0.125
    pre = [(t([[0.0]]), t([[0.5]])), (t([[4, -1, -1, -2]]), t([[0.5] * 4]))]
    lt, lr, _ = warmup_regularizers(pre, tau)
    close(lt, 0.0)
    close(lr, 0.125 / (tau * 1))


# ----------------------------------------------------------------------------------------------
# Objective (Eq. 9, 10): by hand, as a module, and against finite differences
# ----------------------------------------------------------------------------------------------
def test_batch_loss_cross_entropy_at_eps_zero():
    net, info = small_model('cnn7', 'full', 'cifar10')
    net.train()
    x = torch.rand(6, *info['shape'], dtype=D)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    ref = copy.deepcopy(net)
    # eps = 0, lambda = 0: plain cross-entropy of the clean logits of a train-mode forward
    loss, stats = ibp.batch_loss(net, x, y, 0.0, 0.0, Config(reg_tightness=True, reg_relu=True))
    z = ref(x)
    close(loss, F.cross_entropy(z, y))
    close(stats['train_err'], (z.argmax(1) != y).float().mean(), torch.float32)  # logged in float32


def hand_objective_case():
    """Normalize (mean 0, std 1) - Flatten - the two-layer net of the first hand example, on two
    images of 2 x 1 x 1 pixels: (0.95, 0.25) with label 0, (0.1, 0.1) with label 1."""
    model = nn.Sequential(Normalize((0.0, 0.0), (1.0, 1.0)), nn.Flatten(),
                          linear([[1, -1], [2, 1]], [0, -2]), nn.ReLU(),
                          linear([[1, 2], [-1, 1]], [0.5, 0])).to(D)
    return model, t([[0.95, 0.25], [0.1, 0.1]]).view(2, 2, 1, 1), torch.tensor([0, 1])


# The hand example at eps = 0.1, tau = 0.5 (image 1 as in the first hand example):
# input box: image 1 [0.85, 1] x [0.15, 0.35] (r 0.075, 0.1); image 2 [0, 0.2]^2, clipped at 0
# (r 0.1, 0.1): E(Delta_0) = 0.375 / 4 = 0.09375.
# ReLU inputs h0 = x0 - x1, h1 = 2 x0 + x1 - 2: image 1 h0 c 0.675 r 0.175 (active), h1 c 0.1
# r 0.25 (unstable); image 2 h0 in [-0.2, 0.2] (c 0, r 0.2, unstable), h1 in [-2, -1.4] (c -1.7,
# r 0.3, inactive): E(Delta_1) = 0.925 / 4 = 0.23125.
# Eq. (7): ratio 0.09375 / 0.23125 = 15/37: L_tightness = ReLU(1/2 - 15/37) / (1/2) = 7/37.
# Eq. (8): alpha = 0.675 / 1.7; mean c = -0.925 / 4 = -0.23125, beta = 0.90625^2 / 1.46875^2.
HAND_TIGHT = 7 / 37
HAND_RELU = (0.5 - 0.675 / 1.7 + 0.5 - 0.90625 ** 2 / 1.46875 ** 2) / 0.5
# Margins (W' = C W): image 1, y = 0: 2 a0 + a1 + 0.5 >= 1.5; image 2, y = 1: -2 a0 - a1 - 0.5
# with a0 in [0, 0.2], a1 = 0: >= -0.9. Eq. (9): mean of log(1 + e^-1.5) and log(1 + e^0.9).
HAND_ROBUST = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(0.9))) / 2
# eps = 0: clean logits [1.5, -0.55] (label 0) and, with a = relu(0, -1.7) = 0, [0.5, 0] (label 1)
HAND_CE = (math.log1p(math.exp(-2.05)) + math.log1p(math.exp(0.5))) / 2
# and the regularizers on a vanishing box of radius rho around the clean batch (batch_loss's floor
# at eps = 0): E(Delta_0) = rho, E(Delta_1) = mean(2, 3, 2, 3) rho: L_tightness = ReLU(1/2 - 0.4) /
# (1/2) = 0.2 for any small rho; active 0.7, 0.15, inactive -1.7, unstable 0 (h0 of image 2):
# alpha = 0.85 / 1.7 = 1/2 (no penalty), mean c = -0.2125,
# beta = (0.9125^2 + 0.3625^2) / 1.4875^2
HAND_TIGHT_0 = 0.2
HAND_RELU_0 = (0.5 - (0.9125 ** 2 + 0.3625 ** 2) / 1.4875 ** 2) / 0.5


@pytest.mark.parametrize('tight,relu', [(True, True), (True, False), (False, True), (False, False)])
def test_batch_loss_objective_eq10_by_hand(tight, relu):
    """Eq. (10) with lambda = 0.3: the robust loss of Eq. (9) plus lambda times the regularizers
    that are switched on; both regularizers and the ReLU states logged either way; lambda = 0
    (after the warmup) leaves the robust loss; eps = 0 makes the data loss the clean
    cross-entropy."""
    model, x, y = hand_objective_case()
    cfg = Config(tau=0.5, reg_tightness=tight, reg_relu=relu)
    loss, stats = ibp.batch_loss(model, x, y, 0.1, 0.3, cfg)
    close(loss, HAND_ROBUST + 0.3 * (tight * HAND_TIGHT + relu * HAND_RELU))
    # the statistics for the log, in float32: logged whether or not they are in the objective
    close(stats['loss'], HAND_ROBUST, F32)
    close(stats['l_tightness'], HAND_TIGHT, F32)
    close(stats['l_relu'], HAND_RELU, F32)
    close(stats['relu'], [[0.25, 0.25, 0.5]], F32)  # active h0 of image 1, inactive h1 of image 2
    # image 2 is misclassified (logits [0.5, 0]) and not verified (lb -0.9); image 1 is both
    close(stats['train_err'], 0.5, F32)
    close(stats['train_ver_err'], 0.5, F32)
    assert not any(v.requires_grad for v in stats.values())
    close(ibp.batch_loss(model, x, y, 0.1, 0.0, cfg)[0], HAND_ROBUST)
    close(ibp.batch_loss(model, x, y, 0.0, 0.0, cfg)[0], HAND_CE)
    loss, stats = ibp.batch_loss(model, x, y, 0.0, 0.3, cfg)
    close(loss, HAND_CE + 0.3 * (tight * HAND_TIGHT_0 + relu * HAND_RELU_0))
    close(stats['l_tightness'], HAND_TIGHT_0, F32)
    close(stats['l_relu'], HAND_RELU_0, F32)


def test_objective_is_batch_loss_as_a_module():
    """Objective(model, cfg) is the module that DDP wraps and --compile compiles: its parameters are
    the model's, and its forward(x, y, eps, lam) gives batch_loss(model, ...)."""
    net, info = small_model('cnn7', 'full', 'cifar10')
    net.train()
    ref = copy.deepcopy(net)
    cfg = Config(reg_tightness=True, reg_relu=True)
    objective = ibp.Objective(net, cfg)
    assert isinstance(objective, nn.Module)
    assert [id(p) for p in objective.parameters()] == [id(p) for p in net.parameters()]
    torch.manual_seed(1)
    x, y = torch.rand(4, *info['shape'], dtype=D), torch.tensor([0, 1, 2, 3])
    loss, stats = objective(x, y, 2 / 255, 0.3)
    loss_ref, stats_ref = ibp.batch_loss(ref, x, y, 2 / 255, 0.3, cfg)
    close(loss, loss_ref)
    assert {'loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err', 'relu'} <= set(stats)
    for k, v in stats_ref.items():
        close(stats[k].to(v.dtype), v, v.dtype)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def kink_distance(model, x, y, eps, tau):
    """How close the objective at (x, y, eps) comes to a point where it is not differentiable: the
    smallest |l| or |u| of a box at a ReLU input, |clean ReLU input| (by hooks on a plain forward),
    |ratio - tau| and |ratio - 1| over the ratios of Eq. (7) and (8) (the oracle's)."""
    pre, clean = [], []
    model = copy.deepcopy(model)
    with torch.no_grad():
        ibp_margins(model, x, y, max(eps, ibp.EPS_FLOOR), pre)
        hooks = [m.register_forward_hook(lambda mod, inp, out: clean.append(inp[0]))
                 for m in model.modules() if isinstance(m, nn.ReLU)]
        model(x)
        for h in hooks:
            h.remove()
    assert len(clean) == len(pre) - 1
    ends = [torch.cat([(c - r).flatten(), (c + r).flatten()]) for c, r in pre[1:]] + clean
    ratios = regularizer_oracle(pre, tau).ratios
    return min([e.abs().min().item() for e in ends] +
               [abs(v - tau) for v in ratios] + [abs(v - 1) for v in ratios])


FD_MODELS = {'cnn7': Config(model='cnn7', width=1 / 64, ibp_init=True),
             'resnext': Config(model='resnext', width=1 / 64, ibp_init=True)}
FD_INFO = dict(shape=(1, 4, 4), classes=3, mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize('eps', [0.05, 0.0])
@pytest.mark.parametrize('family', list(FD_MODELS))
def test_whole_objective_gradient_matches_finite_differences(family, eps):
    """The gradient of the training objective Eq. (10), robust_loss(lb) + lambda (L_tightness +
    L_relu) at eps > 0 and cross-entropy + lambda (...) at eps = 0, with respect to every parameter,
    equals central finite differences of the whole loss (torch.autograd.gradcheck, float64). Tiny
    CNN-7 and ResNeXt in train mode: BN with the clean batch's statistics, whose gradient is thus
    covered (momentum 0 keeps the running statistics fixed across the evaluations). The batch is
    drawn so that no ReLU bound, clean ReLU input or ratio of Eq. (7)/(8) lies near a kink."""
    cfg = dataclasses.replace(FD_MODELS[family], tau=1.0, reg_tightness=True, reg_relu=True)
    torch.manual_seed(0)
    model = build_model(cfg, FD_INFO).to(D).train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.momentum = 0.0
            with torch.no_grad():  # BN's default beta = 0 centres every layer: alpha = 1, a kink
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # the first batch away from every kink
        x = torch.rand(4, *FD_INFO['shape'], generator=g, dtype=D)
        y = torch.randint(0, FD_INFO['classes'], (4,), generator=g)
        if kink_distance(model, x, y, eps, cfg.tau) > KINK_MARGIN:
            break
    assert kink_distance(model, x, y, eps, cfg.tau) > KINK_MARGIN, 'no batch away from the kinks'
    lam = 0.5
    with torch.no_grad():
        _, stats = ibp.batch_loss(copy.deepcopy(model), x, y, eps, lam, cfg)
    assert stats['l_tightness'] > 0 and stats['l_relu'] > 0, 'both regularizers take part'
    objective = ibp.Objective(model, cfg)
    names = [n for n, _ in objective.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in objective.parameters())

    def loss(*values):
        return torch.func.functional_call(objective, dict(zip(names, values)), (x, y, eps, lam))[0]

    assert torch.autograd.gradcheck(loss, params, **FD)


# ----------------------------------------------------------------------------------------------
# Schedules: eps per batch, lambda (Sec. 3.4), the LR per epoch
# ----------------------------------------------------------------------------------------------
def test_eps_schedule_worked_values():
    E, L = 0.3, 10  # start 2, length 4: init = 10, final = 50, mid = 10 + 40/4 = 20
    f = lambda s: eps_at(s, L, E, 2, 4)
    assert all(f(s) == 0 for s in range(0, 11))  # the whole first epoch and step init itself
    assert f(11) > 0
    assert f(15) == approx(E / 13 * 0.5 ** 4)  # a (b - init)^4 with (5 / 10)^4
    assert f(20) == approx(E / 13)  # the polynomial part ends at eps_target / 13
    assert f(35) == approx(E / 13 + 12 * E / 13 * 15 / 30)  # linear: 7/13 E
    assert f(50) == E and f(51) == E and f(1000) == E
    vals = [f(s) for s in range(0, 60)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    h = FD['eps']  # continuity of value and slope at init, mid and final (steps may be fractional)
    for s in (10, 20, 50):
        assert abs(f(s - h) - f(s + h)) <= 2 * h * E  # eps rises by less than E per step
    slope = lambda s: (f(s + h) - f(s - h)) / (2 * h)
    line = 12 * E / 13 / 30  # the polynomial's slope 4 a t^3 at mid is the line's
    assert slope(20 - 1e-3) == pytest.approx(line, rel=FD['rtol'])
    assert slope(20 + 1e-3) == pytest.approx(line, rel=FD['rtol'])


def test_eps_schedule_without_warm_epoch():
    # MNIST: start 1 -> the ramp starts at step 0; steps_per_epoch 8, length 2: final 16, mid 4
    assert eps_at(0, 8, 0.4, 1, 2) == 0
    assert eps_at(4, 8, 0.4, 1, 2) == approx(0.4 / 13)
    assert eps_at(16, 8, 0.4, 1, 2) == 0.4


def test_lambda_decays_from_lam0_to_zero():
    assert lam_at(0.0, 0.2, 0.5) == 0.5
    assert lam_at(0.05, 0.2, 0.5) == approx(0.375)
    assert lam_at(0.2, 0.2, 0.5) == 0.0


def test_lr_milestones_and_dataset_defaults():
    cfg = resolve(Config(dataset='cifar10', out_dir='unused'))
    assert (cfg.epochs, cfg.eps_start, cfg.eps_length, cfg.lr_milestones) == \
        (160, 2, 80, (120, 140))
    assert cfg.eps == 8 / 255 and cfg.batch_size == 128 and cfg.lam0 == 0.5
    assert all(lr_at(e, cfg) == 5e-4 for e in (1, 60, 120))
    assert lr_at(121, cfg) == approx(1e-4) and lr_at(140, cfg) == approx(1e-4)
    assert lr_at(141, cfg) == approx(2e-5)
    short = resolve(Config(dataset='cifar10', epochs=70, out_dir='unused'))
    assert (short.eps_start, short.eps_length, short.lr_milestones) == (2, 20, (50, 60))
    tiny = resolve(Config(dataset='tinyimagenet', out_dir='unused'))
    assert (tiny.eps, tiny.accum_steps, tiny.lam0, tiny.lr_milestones) == \
        (1 / 255, 2, 0.2, (61, 71))
    mnist = resolve(Config(dataset='mnist', out_dir='unused'))
    assert (mnist.eps, mnist.eps_start, mnist.eps_length, mnist.batch_size) == (0.4, 1, 20, 256)
    assert (mnist.ibp_init, mnist.reg_tightness, mnist.reg_relu) == (True, True, True)
    vanilla = resolve(Config(dataset='mnist', method='vanilla', out_dir='unused'))
    assert (vanilla.ibp_init, vanilla.reg_tightness, vanilla.reg_relu) == (False, False, False)


# ----------------------------------------------------------------------------------------------
# Data augmentation: random flips and edge-padded crops
# ----------------------------------------------------------------------------------------------
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
    assert {oy for _, oy, _ in seen} == set(range(2 * pad + 1))  # every offset 0 .. 2 pad, both
    assert {ox for _, _, ox in seen} == set(range(2 * pad + 1))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
TINY = ['--smoke', '--epochs', '3', '--eps-start', '2', '--eps-length', '1', '--train-size', '128',
        '--test-size', '64', '--width', '0.0625', '--pgd-steps', '3']


def cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


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
    assert metrics['pgd_err'] is not None
    assert metrics['std_err'] <= metrics['pgd_err'] <= metrics['ver_err']
    recs = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['epoch'] for r in recs] == [1, 2, 3, 4, 5, 6]
    # 1024 / 64 = 16 steps per epoch, ramp epochs 2..4: init 16, final 64, mid 28; the logged eps is
    # the last batch's: epoch 2 step 31: E/13 + 12E/13 * 3/36 = 2E/13; epoch 3 step 47: 22E/39;
    # epoch 4 step 63: 38E/39; epochs 5, 6: E
    E = 4 / 255
    expect = [0, 2 * E / 13, 22 * E / 39, 38 * E / 39, E, E]
    assert [r['eps'] for r in recs] == approx(expect)
    assert recs[0]['lam'] == 0.5 and recs[3]['lam'] == approx(0.5 / 39)  # 0.5 (1 - 38/39)
    assert recs[4]['lam'] == 0 and recs[5]['lam'] == 0  # regularizers only during warmup
    assert [r['lr'] for r in recs] == approx([2e-3] * 5 + [4e-4])  # milestone 5
    ck = torch.load(os.path.join(out, 'last.pt'), weights_only=False)
    assert ck['epoch'] == 6


def test_missing_dataset_offline_is_one_line(tmp_path):
    empty = tmp_path / 'data'
    empty.mkdir()
    proc = cli('--dataset', 'cifar10', '--data-dir', str(empty), '--out-dir', str(tmp_path / 'run'),
               '--epochs', '1', '--eps-start', '1', '--eps-length', '1', '--width', '0.0625',
               '--train-size', '64', '--test-size', '64', timeout=180)
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
       (['--resume'], 'last.pt')]  # read_checkpoint names the missing file


@pytest.mark.parametrize('args,word', BAD)
def test_bad_flags_exit_2_with_one_line(args, word, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['--dataset', 'synthetic', '--train-size', '64', '--test-size', '64',
                 '--width', '0.0625', '--out-dir', str(out), *args]) == 2
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
# Training loop: the progress line and the ETA, on stdout only
# ----------------------------------------------------------------------------------------------
def log_records(folder):
    """log.jsonl without its timings, which differ between any two runs."""
    recs = [json.loads(line) for line in open(os.path.join(folder, 'log.jsonl'))]
    return [{k: v for k, v in r.items() if k not in ('img_per_s', 'seconds')} for r in recs]


def test_progress_line_and_eta_go_to_stdout_never_to_the_log(tmp_path, monkeypatch, capsys):
    """With the mode forced (--progress) and every step counting as 'a long epoch', each step of
    each epoch, the first included, prints a progress line with its batch count, img/s and the time
    left in the epoch and the run; the ETA line follows epoch 1 only; a CPU run predicted to take
    longer than LONG_CPU_RUN gets its note once. log.jsonl is the one of a run without any of it."""
    monkeypatch.setattr(ibp_tools, 'PROGRESS_AFTER', 0)
    monkeypatch.setattr(ibp_tools, 'PROGRESS_EVERY', 0)
    monkeypatch.setattr(ibp_tools, 'LONG_CPU_RUN', 0)
    shown, quiet = tmp_path / 'shown', tmp_path / 'quiet'
    assert main(TINY + ['--out-dir', str(shown), '--progress']) == 0
    out = capsys.readouterr().out
    for epoch in (1, 2, 3):  # 128 images, batch 64: 2 steps an epoch
        for step in (1, 2):
            assert f'\r  ep {epoch} batch {step}/2 | ' in out
    first = out[out.index('\r  ep 1 batch 1/2'):].split('\r')[1]
    assert 'img/s | epoch left 0:00:' in first and '| run left 0:00:' in first
    assert out.index('\r  ep 1 batch 1/2') < out.index('ep   1 |')  # within the first epoch
    lines = out.replace('\r', '\n').splitlines()
    assert sum(line.startswith('eta: the run ends around ') and line.endswith('(epochs left: 2)')
               for line in lines) == 1
    assert sum(line.startswith('note: this run takes about') for line in lines) == 1
    assert main(TINY + ['--out-dir', str(quiet), '--no-progress']) == 0
    plain = capsys.readouterr().out
    assert '\r' not in plain and '(epochs left: 2)' in plain
    assert log_records(shown) == log_records(quiet)
    assert '\r' not in open(shown / 'log.jsonl').read()


def test_progress_defaults_to_whether_stdout_is_a_terminal(tmp_path):
    """Through a pseudo-terminal the run resolves --progress to on, through a pipe to off (the
    resolved value is saved with the run's config)."""
    import pty
    for tty in (True, False):
        out = tmp_path / f'tty_{tty}'
        args = [sys.executable, SCRIPT, *TINY, '--epochs', '2', '--eps-start', '1',
                '--eps-length', '1', '--out-dir', str(out)]
        env = dict(os.environ, OMP_NUM_THREADS='1')
        if tty:
            leader, follower = pty.openpty()
            proc = subprocess.Popen(args, cwd=REPO, stdout=follower, stderr=subprocess.PIPE,
                                    env=env)
            os.close(follower)
            text = b''
            while True:  # drain the terminal, or the child blocks on a full buffer
                try:
                    chunk = os.read(leader, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                text += chunk
            proc.wait(timeout=300)
            os.close(leader)
            assert proc.returncode == 0, proc.stderr.read()
            assert b'(epochs left: 1)' in text
        else:
            assert subprocess.run(args, cwd=REPO, capture_output=True, env=env,
                                  timeout=300).returncode == 0
        config = json.load(open(out / 'metrics.json'))['config']
        assert config['progress'] is tty


# ----------------------------------------------------------------------------------------------
# Evaluation and PGD: standard <= PGD <= verified error; PGD margins inside the bounds
# ----------------------------------------------------------------------------------------------
# mostly verified / partly verified and attackable / nothing verified
ATTACK_EPS = [1e-4, 4e-4, 3e-3]
PGD = dict(pgd_steps=10, pgd_restarts=2)


@pytest.fixture(scope='module')
def tiny_trained():
    """CNN-7 without BN (eval = train mode), width 1/16, 16x16 synthetic images, 20 clean Adam
    steps."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = resolve(Config(dataset='synthetic', bn='none', method='vanilla', width=0.0625,
                         synthetic_shape=(3, 16, 16), lr=5e-3, channels_last=False,
                         out_dir='unused'))
    info = dataset_info(cfg)
    model, opt, objective = ibp.prepare(cfg, torch.device('cpu'), info)
    x, y = ibp.synthetic_images(512, info['shape'], info['classes'], 1)
    for i in range(20):
        idx = torch.arange(i * 32, (i + 1) * 32) % 512
        ibp.train_step(objective, opt, ibp.to_input(x[idx], cfg), y[idx], 0.0, 0.0, cfg)
    test = ibp.synthetic_images(128, info['shape'], info['classes'], 2)
    torch.set_num_threads(saved)
    return model.eval(), test


def margins_of(z, y):
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('inf'))
    return other.amin(1)


def test_evaluate_error_ordering(tiny_trained):
    model, (x, y) = tiny_trained
    with torch.no_grad():
        std_oracle = (model(x.float() / 255).argmax(1) != y).float().mean().item()  # plain forward
    for eps in ATTACK_EPS:
        res = ibp.evaluate(model, (x, y), eps, **PGD)
        assert res['std_err'] == std_oracle
        assert res['std_err'] <= res['pgd_err'] <= res['ver_err'], (eps, res)
        # batching does not change the deterministic errors (128 = 2 x 50 + 28)
        other = ibp.evaluate(model, (x, y), eps, batch_size=50)
        assert other['pgd_err'] is None
        assert (other['std_err'], other['ver_err']) == (res['std_err'], res['ver_err'])
    res = ibp.evaluate(model, (x, y), ATTACK_EPS[1], **PGD)
    assert res['std_err'] < res['pgd_err'] < res['ver_err'] < 1, res  # the three differ: can fail


class Recorder(nn.Module):
    """The model, recording every input it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def true_margin(z, y):
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)
    return z.gather(1, y[:, None]).squeeze(1) - other


def test_pgd_margin_between_ibp_bound_and_clean_margin(tiny_trained):
    model, (x, y) = tiny_trained
    x = x.float() / 255
    with torch.no_grad():
        clean = true_margin(model(x), y)
    tol = tol_of(F32, clean.abs())
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
            assert torch.all(pt >= lo - tol_of(F32)) and torch.all(pt <= up + tol_of(F32))
        with torch.no_grad():
            tried = torch.stack([true_margin(model(pt), y) for pt in rec.seen]).amin(0)
        torch.testing.assert_close(found, tried, rtol=TOL[F32]['rtol'], atol=TOL[F32]['atol'])
        assert torch.all(found <= clean + tol), eps  # the attack never does worse than the clean
        assert torch.all(found >= worst - tol), eps  # and never beats a sound bound
        assert (found < clean - 1e-3).float().mean() > 0.5, eps  # it does attack


def test_evaluate_raises_when_bounds_are_unsound(tiny_trained, monkeypatch):
    model, data = tiny_trained
    real = ibp.ibp_margins

    def claims_everything_verified(*args, **kw):
        logits, lb = real(*args, **kw)
        return logits, lb + 100

    monkeypatch.setattr(ibp, 'ibp_margins', claims_everything_verified)
    # the patch is in effect; no attack, no check
    assert ibp.evaluate(model, data, ATTACK_EPS[2])['ver_err'] == 0
    with pytest.raises(RuntimeError, match='unsound'):
        ibp.evaluate(model, data, ATTACK_EPS[2], **PGD)


# ----------------------------------------------------------------------------------------------
# Checkpoints: --eval-checkpoint, protection of a run, --resume
# ----------------------------------------------------------------------------------------------
def test_eval_checkpoint_prints_json(smoke):
    proc, out = smoke
    assert proc.returncode == 0
    ev = cli('--eval-checkpoint', os.path.join(out, 'last.pt'), '--pgd-steps', '2')
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert res['epoch'] == 6 and res['eps'] == approx(4 / 255)
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
    # Runs main(args) with a Ctrl-C arriving right after the first last.pt is written; returns its
    # exit code.
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


# ----------------------------------------------------------------------------------------------
# Distributed training: torchrun / DDP on the CPU with the Gloo backend
# ----------------------------------------------------------------------------------------------
DIST_TIMEOUT = 240  # seconds for one 2-process job (a hung collective must fail the test)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args):
    """The script under `torchrun --nproc_per_node 2` (the launcher module, so any venv works)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--master_port', str(free_port()), SCRIPT, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DIST_TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def epoch_lines(stdout):
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith('ep ')]


def check_epoch_stats_cover_the_global_batch(records):
    # Each rank logs fractions of its shard times the shard size; after the all-reduce, divided by
    # the epoch's image count, the active/inactive/unstable fractions of a layer sum to exactly 1.
    # Without the all-reduce they would sum to 1/2, with every rank on the whole batch to 2.
    for r in records:
        for row in r['relu_per_layer']:
            assert sum(row) == pytest.approx(1, abs=TOL[F32]['atol']), (r['epoch'], row)
        assert 0 <= r['train_err'] <= 1 and 0 <= r['train_ver_err'] <= 1


def test_torchrun_two_ranks_gloo(tmp_path):
    out = tmp_path / 'run'
    proc = torchrun(*TINY, '--out-dir', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    assert epoch_lines(proc.stdout) == [1, 2, 3]  # only rank 0 prints: each epoch exactly once
    assert sum(line.startswith('final') for line in proc.stdout.splitlines()) == 1
    # no second log, no temporary file
    assert sorted(os.listdir(out)) == ['last.pt', 'log.jsonl', 'metrics.json']
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    check_epoch_stats_cover_the_global_batch(recs)
    metrics = json.load(open(out / 'metrics.json'))
    assert metrics['world_size'] == 2 and metrics['final_epoch'] == 3 and metrics['test_size'] == 64
    assert torch.load(out / 'last.pt', weights_only=False)['epoch'] == 3


def ddp_config():
    return resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16),
                          channels_last=False, out_dir='unused'))


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def ddp_worker(rank, port, out, x, y, eps, lam):
    """One rank of a 2-process job started by torch.multiprocessing.spawn (module level:
    picklable)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2',
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dev = torch.device('cpu')
    got_rank, world = ibp.setup_distributed(dev)
    try:
        cfg = ddp_config()
        model, opt, objective = ibp.prepare(cfg, dev, dataset_info(cfg), world)
        init = flat(model.parameters())
        # the shard that train() gives this rank: tensor_split of the global batch
        stats = ibp.train_step(objective, opt, x.tensor_split(world)[got_rank],
                               y.tensor_split(world)[got_rank], eps, lam, cfg)
        params = flat(model.parameters())
        gathered = [torch.empty_like(params) for _ in range(world)]
        torch.distributed.all_gather(gathered, params)
        torch.save(dict(rank=got_rank, world=world, backend=torch.distributed.get_backend(),
                        ddp=isinstance(objective, nn.parallel.DistributedDataParallel),
                        wraps=type(getattr(objective, 'module', None)).__name__, init=init,
                        gathered=gathered, grads=flat(p.grad for p in model.parameters()),
                        loss=stats['loss']),
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
    ctx = mp.spawn(ddp_worker, args=(free_port(), str(tmp_path), x, y, eps, lam), nprocs=2,
                   join=False)
    deadline = time.time() + DIST_TIMEOUT
    while not ctx.join(timeout=5):  # re-raises a worker's exception
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('the 2-rank DDP step did not finish')
    res = [torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in range(2)]
    assert [(r['rank'], r['world'], r['backend'], r['ddp'], r['wraps']) for r in res] == \
        [(0, 2, 'gloo', True, 'Objective'), (1, 2, 'gloo', True, 'Objective')]
    final = res[0]['gathered'][0]
    for r in res:  # both ranks hold identical parameters after the step
        assert all(torch.equal(g, final) for g in r['gathered'])
    assert torch.equal(res[0]['init'], res[1]['init'])
    assert (final - res[0]['init']).abs().max() > cfg.lr / 2  # Adam's first step moves by ~lr
    assert res[0]['loss'] != res[1]['loss']  # the ranks saw different data

    # Oracle, one process: the same init, the loss of each shard with its own BN statistics, the
    # mean of the two gradients, gradient clipping and one plain Adam step.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info)
    assert torch.equal(flat(model.parameters()), res[0]['init'])
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shards = [ibp.batch_loss(model, xs, ys, eps, lam, cfg)
              for xs, ys in zip(x.tensor_split(2), y.tensor_split(2))]
    (sum(loss for loss, _ in shards) / 2).backward()
    assert nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) > cfg.grad_clip  # clips
    adam.step()
    tol = dict(rtol=TOL[F32]['rtol'], atol=TOL[F32]['atol'])
    for r, (_, stats) in zip(res, shards):  # the logged robust loss of each rank's shard
        torch.testing.assert_close(r['loss'], stats['loss'], **tol)
        torch.testing.assert_close(r['grads'], flat(p.grad for p in model.parameters()), **tol)
    torch.testing.assert_close(final, flat(model.parameters()), **tol)


def test_resume_a_one_process_run_with_two_ranks(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / 'run')
    # one process, stopped after epoch 1
    assert stop_after_first_checkpoint(TINY + ['--out-dir', out], monkeypatch) == 130
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
    assert metrics['wall_seconds'] == approx(sum(r['seconds'] for r in recs))


# ----------------------------------------------------------------------------------------------
# Compiled and GPU code paths on the CPU: TF32 flags, fused Adam, channels-last, torch.compile
# ----------------------------------------------------------------------------------------------
def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def backend_flags():
    """setup_device sets process-wide backend flags: put them back after the test."""
    saved = tf32_flags(), torch.backends.cudnn.benchmark
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32), \
        torch.backends.cudnn.benchmark = saved


def test_evaluate_certifies_in_full_fp32(tiny_trained, monkeypatch, backend_flags):
    model, data = tiny_trained
    seen = []

    def recording(fn, result=lambda r: r):
        def wrapper(*args, **kw):
            seen.append((fn.__name__, tf32_flags()))
            return result(fn(*args, **kw))
        return wrapper

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training
    monkeypatch.setattr(ibp, 'ibp_margins', recording(ibp.ibp_margins))
    monkeypatch.setattr(ibp, 'pgd_margin', recording(ibp.pgd_margin))
    ibp.evaluate(model, data, ATTACK_EPS[2], batch_size=64, pgd_steps=2)
    assert [name for name, _ in seen] == ['ibp_margins', 'pgd_margin'] * 2
    assert all(flags == (False, False) for _, flags in seen), seen
    assert tf32_flags() == (True, True)  # restored afterwards
    # ... also when evaluate raises (unsound bounds)
    unsound = recording(ibp.ibp_margins, lambda r: (r[0], r[1] + 100))
    monkeypatch.setattr(ibp, 'ibp_margins', unsound)
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
    # an explicit value is kept
    assert ibp.setup_device(Config(device='cpu', channels_last=True)).type == 'cpu'


def test_prepare_uses_fused_adam_on_the_cpu():
    cfg = resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 8, 8),
                         device='cpu'))
    opt = ibp.prepare(cfg, ibp.setup_device(cfg), dataset_info(cfg))[1]
    assert opt.defaults['fused'] is True


def small_synthetic(**kw):
    cfg = resolve(Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16),
                         out_dir='unused', **kw))
    return cfg, dataset_info(cfg)


def test_channels_last_gives_the_same_bounds_and_step():
    (cl, info), (cf, _) = small_synthetic(channels_last=True), small_synthetic(channels_last=False)
    dev = torch.device('cpu')
    m_cl, opt_cl, o_cl = ibp.prepare(cl, dev, info)
    m_cf, opt_cf, o_cf = ibp.prepare(cf, dev, info)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x_cl, x_cf = ibp.to_input(x, cl), ibp.to_input(x, cf)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    assert x_cf.is_contiguous()
    conv = next(m for m in m_cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=TOL[F32]['rtol'],
                                   atol=TOL[F32]['atol'] * b.abs().max().item())

    eps = 2 / 255
    for mode in (True, False):  # BN on batch statistics, then on running statistics
        m_cl.train(mode)
        m_cf.train(mode)
        pre1, pre2 = [], []
        with torch.no_grad():
            (z1, lb1), (z2, lb2) = ibp_margins(m_cl, x_cl, y, eps, pre1), \
                ibp_margins(m_cf, x_cf, y, eps, pre2)
        same(z1, z2)
        same(lb1, lb2)
        assert len(pre1) == len(pre2) == 7
        for (c1, r1), (c2, r2) in zip(pre1, pre2):
            same(c1, c2)
            same(r1, r2)
    m_cl.train()
    m_cf.train()
    s1 = ibp.train_step(o_cl, opt_cl, x_cl, y, eps, 0.3, cl)
    s2 = ibp.train_step(o_cf, opt_cf, x_cf, y, eps, 0.3, cf)
    assert torch.isfinite(s1['loss'])
    for k in ('loss', 'l_tightness', 'l_relu'):
        same(s1[k], s2[k])
    same(flat(p.grad for p in m_cl.parameters()), flat(p.grad for p in m_cf.parameters()))
    torch.manual_seed(cl.seed)
    init = flat(build_model(cl, info).parameters())
    assert (flat(m_cl.parameters()) - init).abs().max() > cl.lr / 2  # the step moved the weights


@pytest.mark.skipif(not os.environ.get('THOROUGH_TESTS'),
                    reason='torch.compile with a cold inductor cache takes ~40 s on the 2-core '
                           'CPU: set THOROUGH_TESTS=1 (.ci/run does)')
def test_compiled_objective_gives_the_eager_step():
    """--compile compiles the whole Objective: the robust loss, both regularizers (tau = 1, so both
    are > 0 and in the gradient) and their gradients equal the eager ones."""
    (cc, info), (ce, _) = small_synthetic(channels_last=False, compile=True, tau=1.0), \
        small_synthetic(channels_last=False, tau=1.0)
    dev = torch.device('cpu')
    m_c, opt_c, o_c = ibp.prepare(cc, dev, info)
    m_e, opt_e, o_e = ibp.prepare(ce, dev, info)
    assert isinstance(o_c, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(o_c._orig_mod, ibp.Objective) and isinstance(o_e, ibp.Objective)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x = ibp.to_input(x, cc)
    s_c = ibp.train_step(o_c, opt_c, x, y, 2 / 255, 0.3, cc)
    s_e = ibp.train_step(o_e, opt_e, x, y, 2 / 255, 0.3, ce)
    assert s_e['l_tightness'] > 0 and s_e['l_relu'] > 0
    for k in ('loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err', 'relu'):
        torch.testing.assert_close(s_c[k], s_e[k], rtol=TOL[F32]['rtol'], atol=TOL[F32]['atol'])
    g_c, g_e = flat(p.grad for p in m_c.parameters()), flat(p.grad for p in m_e.parameters())
    torch.testing.assert_close(g_c, g_e, rtol=TOL[F32]['rtol'],
                               atol=TOL[F32]['atol'] * g_e.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Benchmark and init diagnosis: difference gains of Eq. (6) measured and predicted (Figure 1)
# ----------------------------------------------------------------------------------------------
GAIN_EPS = 8 / 255


def interval_radii(model, x, eps):
    """Mean box half-width after Normalize and at every ReLU input, by lower/upper interval
    arithmetic (W+ and W- applied to the bounds, Eq. 3 as the paper writes it), a form the code
    under test (centre-radius) does not use."""
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    means = []
    for m in model[:-1]:
        if isinstance(m, Normalize):  # std > 0: monotone
            lo, up = m(lo), m(up)
            means.append(((up - lo) / 2).mean().item())
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            f = (lambda t, w, b: F.conv2d(t, w, b, m.stride, m.padding)) \
                if isinstance(m, nn.Conv2d) else F.linear
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


# CNN-7 at width 0.25 (channels 16, 16, 32, 32, 32; FC 512/4 = 128): fan-ins 3*9, 16*9, 16*9,
# 32*9, 32*9, 32*16*16
FAN_INS = [27, 144, 144, 288, 288, 8192]

# E|W| of each init: default U(-1/sqrt(n), 1/sqrt(n)) -> 1/(2 sqrt(n)); kaiming N(0, 2/n) ->
# sqrt(2/n) sqrt(2/pi); IBP N(0, (sqrt(2 pi)/n)^2) -> 2/n; times n/2 (Eq. 6):
EXPECTED_GAIN = {'default': lambda n: math.sqrt(n) / 4,
                 'kaiming': lambda n: math.sqrt(n / math.pi), 'ibp': lambda n: 1.0}


@pytest.mark.parametrize('init', ['default', 'kaiming', 'ibp'])
def test_init_gains_per_layer(init):
    model = init_model(init).train()
    x, y = ibp.synthetic_images(64, (3, 32, 32), 10, 3)
    x = x.float() / 255
    rows = ibp_tools.init_gains(model, x, y, GAIN_EPS)
    assert [r['layer'] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r['fan_in'] for r in rows] == FAN_INS
    feeding = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    radii = interval_radii(copy.deepcopy(model).to(D), x.to(D), GAIN_EPS)  # float64 oracle
    assert len(radii) == 7
    rel = TOL[F32]['rtol']  # the code runs in float32
    for i, (r, layer, n) in enumerate(zip(rows, feeding, FAN_INS)):
        assert r['gain_eq6'] == pytest.approx(n / 2 * layer.weight.abs().mean().item(), rel=rel)
        assert r['gain_measured'] == pytest.approx(radii[i + 1] / radii[i], rel=rel)
        assert r['log_delta'] == pytest.approx(math.log(radii[i + 1]), abs=rel)
        # the drawn weights give the init's expected gain (Eq. 6)
        assert r['gain_eq6'] == pytest.approx(EXPECTED_GAIN[init](n), rel=GAIN_EQ6_TOL), \
            (r['layer'], r['gain_eq6'])
    if init == 'ibp':
        # the first layer sees the input box (no ReLU halves it): about 2; the others about 1
        assert rows[0]['gain_measured'] == pytest.approx(2, rel=GAIN_TOL)
        for r in rows[1:]:
            assert r['gain_measured'] == pytest.approx(1, rel=GAIN_TOL), \
                (r['layer'], r['gain_measured'])
    else:  # every gain > 1: the bounds explode with depth
        logs = [r['log_delta'] for r in rows]
        assert all(b > a for a, b in zip(logs, logs[1:])), logs


def test_init_gains_residual_rows_use_the_branch_last_layer():
    """init_gains documents the layer feeding the ReLU after a residual add as 'the branch's last
    one'. Wide-ResNet at width 1/4 (stem 4, stages 32, 64, 128, FC 128) has a 1x1 conv shortcut
    in every block, so the branch's last 3x3 conv (fan-in 9 C) and the shortcut (fan-in C_in)
    differ."""
    torch.manual_seed(0)
    cfg = Config(dataset='cifar10', model='wide_resnet', width=0.25, ibp_init=True)
    model = build_model(cfg, dataset_info(cfg))
    blocks = [m for m in model if isinstance(m, Residual)]
    expected = [model[1]] + [b.branch[i] for b in blocks for i in (0, 3)] + [model[11]]
    assert [fan_in(m) for m in expected] == [27, 36, 288, 288, 576, 576, 1152, 8192]
    x, y = ibp.synthetic_images(16, (3, 32, 32), 10, 3)
    rows = ibp_tools.init_gains(model.train(), x.float() / 255, y, GAIN_EPS)
    assert [r['fan_in'] for r in rows] == [fan_in(m) for m in expected]
    for r, m in zip(rows, expected):
        assert r['gain_eq6'] == pytest.approx(fan_in(m) / 2 * m.weight.abs().mean().item(),
                                              rel=TOL[F32]['rtol'])


def test_diagnose_init_cli_prints_three_inits(capsys, backend_flags):
    assert main(['--diagnose-init', '--dataset', 'synthetic', '--width', '0.25',
                 '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    tables = {}
    for block in out.split('\n\n')[1:]:
        title, header, *rows = block.strip().splitlines()
        assert header.split() == ['layer', 'fan-in', 'gain', 'Eq.6', 'measured', 'log', 'E(Delta)']
        tables[title] = [[float(v) for v in row.split()] for row in rows]
    assert list(tables) == [f'{i} init, BN {bn}:' for i in ('default', 'kaiming', 'ibp')
                            for bn in ('full', 'none')]
    for title, rows in tables.items():
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [int(r[1]) for r in rows] == FAN_INS
        init = title.split()[0]
        for r in rows:
            assert r[2] == pytest.approx(EXPECTED_GAIN[init](r[1]), rel=GAIN_EQ6_TOL), \
                (title, r)


def test_benchmark_cli_writes_three_variants_and_ratios(tmp_path, capsys, backend_flags):
    # 5 timed steps (not 2): the median of 5 needs three outliers to flip a ratio on a shared
    # machine
    out = tmp_path / 'bench'
    assert main(['--benchmark', '--dataset', 'synthetic', '--width', '0.0625', '--batch-size', '8',
                 '--benchmark-steps', '5', '--device', 'cpu', '--out-dir', str(out)]) == 0
    assert 'ratios (median over rounds):' in capsys.readouterr().out
    res = json.load(open(out / 'benchmark.json'))
    assert list(res['results']) == ['clean', 'vanilla_ibp', 'ours']
    for name, r in res['results'].items():
        assert 0 < r['min_ms'] <= r['ms_per_step'] <= r['max_ms'], name
        assert r['img_per_s'] == approx(8 / r['ms_per_step'] * 1000)
    # ratios: the median over rounds of the paired per-round ratios
    rounds = res['round_ratios']
    assert set(rounds) == {'vanilla_ibp/clean', 'ours/clean'}
    assert all(len(v) == 5 for v in rounds.values())
    assert res['ratios'] == approx({k: sorted(v)[2] for k, v in rounds.items()})
    # an IBP step propagates the clean batch, the centre and the radius: strictly more work than a
    # clean step
    assert all(v > 1 for v in res['ratios'].values()), res['ratios']


# ----------------------------------------------------------------------------------------------
# README: the paper-to-code table names what exists
# ----------------------------------------------------------------------------------------------
def test_readme_paper_to_code_table_names_existing_functions():
    """Every name in backticks in README's paper-to-code table (functions and classes alike) is a
    function or class of ibp_short_warmup or ibp_tools; flags (--x) and file names are not names."""
    import re
    readme = open(os.path.join(REPO, 'README.md')).read()
    table = readme[readme.index('Paper to code'):readme.index('## Output')]
    names = set(re.findall(r'`([A-Za-z_][A-Za-z_0-9]*)`', table))
    assert len(names) >= 10, 'the table lost its function names'
    found = [n for n in names if callable(getattr(ibp, n, getattr(ibp_tools, n, None)))]
    missing = sorted(names - set(found))
    assert not missing, f'README names functions that do not exist: {missing}'
    # and every [paper]-tagged contribution is reachable from the table
    for n in ('ibp_init_', 'warmup_regularizers', 'ibp_forward'):
        assert n in names


# ----------------------------------------------------------------------------------------------
# Trust: rounding-sound certification, safe checkpoint loading, divergence, Docker, TinyImageNet
# ----------------------------------------------------------------------------------------------
# Oracles: exact sums (math.fsum of float32 products, which float64 holds exactly), hashes of every
# file of a run folder before and after, a pickle whose unsafe load provably runs code, solid-colour
# images whose colour names their class, and the CI script and interpreter running this file.
CPU = torch.device('cpu')


@pytest.fixture(autouse=True, scope='module')
def one_thread_for_the_module():
    """2 shared cores: one intra-op thread, also for the module-scoped runs below."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def single_error_line(err, names=None):
    """stderr is exactly one line 'error: ...' (no traceback) that contains `names`, if given."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in err, err
    if names is not None:
        assert str(names) in lines[0], lines[0]
    return lines[0]


HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def main_stderr(args, capsys):
    """ibp.main(args) in this process: (exit code, what a real process would show on stderr), i.e.
    the captured stderr plus every warning that Python's default filters would print."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        rc = ibp.main(args)
    shown = [f'{w.category.__name__}: {w.message}\n' for w in caught
             if not issubclass(w.category, HIDDEN)]
    return rc, capsys.readouterr().err + ''.join(shown)


def tree_digest(root):
    """{relative path: sha256} of every file and folder under root: any write shows up."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), root)] = 'folder'
        for f in files:
            path = os.path.join(folder, f)
            with open(path, 'rb') as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def real_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------------------------
# Certification: rounding. float32 certifies, float64 re-checks what float32 verifies
# ----------------------------------------------------------------------------------------------
def rounding_flags(test_size, out):
    return ['--dataset', 'synthetic', '--synthetic-shape', '3', '8', '8', '--synthetic-classes',
            '2', '--width', '0.0625', '--train-size', '8', '--test-size', str(test_size),
            '--epochs', '1', '--eps-start', '1', '--eps-length', '1', '--lr-milestones', '1',
            '--pgd-steps', '0', '--device', 'cpu', '--out-dir', str(out)]


def cancelling_model(cfg, weights, feats, bias, favoured):
    """build_model's CNN-7 with every conv and FC weight and bias 0 and BN at unit statistics: from
    the first conv on the box is a point (radius |0| r = 0), and the FC BN's shift `feats` (> 0)
    reaches the classifier exactly (0 w + beta). The favoured class's logit is weights . feats +
    bias, the other one 0: the margin is one long float32 dot product with a large cancellation."""
    model = ibp.build_model(cfg, ibp.dataset_info(cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.fill_(1)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1)
        fc_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][-1]
        fc_bn.bias.copy_(feats)
        model[-1].weight[favoured] = weights
        model[-1].bias[favoured] = bias
    return model.eval()


def exact_margin(weights, feats, bias):
    # a float32 x float32 product has 48 significant bits: exact in float64; fsum rounds once
    return math.fsum([w * f for w, f in zip(weights.tolist(), feats.tolist())] + [float(bias)])


def f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


@pytest.fixture(scope='module')
def rounding_case(tmp_path_factory):
    """A test set with exactly one sample of the favoured class, and two float32 biases: with `neg`
    the exact margin of that sample is < 0 but float32 IBP verifies it; with `pos` it is > 0 and
    float32 verifies it as well. Found by a deterministic search (asserted to succeed)."""
    out = tmp_path_factory.mktemp('rounding') / 'run'
    for n in range(2, 9):
        cfg = ibp.resolve(ibp.parse_args(rounding_flags(n, out)))
        data = ibp.load_data(dataclasses.replace(cfg, train_size=1, val_size=0), CPU)['test']
        counts = torch.bincount(data[1], minlength=2)
        if (counts == 1).any():
            break
    assert (counts == 1).any(), counts
    fav = int((counts == 1).nonzero()[0])
    i = int((data[1] == fav).nonzero()[0])
    k = [m for m in ibp.build_model(cfg, ibp.dataset_info(cfg)).modules()
         if isinstance(m, nn.BatchNorm1d)][-1].num_features
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        feats = 0.5 + torch.rand(k, generator=g)
        signs = torch.tensor([1.0, -1.0]).repeat(k // 2)
        weights = (5e3 + 1.5e4 * torch.rand(k, generator=g)) * signs
        partial = exact_margin(weights[:-1], feats[:-1], 0.0)
        weights[-1] = -partial / feats[-1].item()  # rounded to float32: a residual of ~1e-3
        s = exact_margin(weights, feats, 0.0)
        with torch.no_grad():
            lb = ibp.ibp_margins(cancelling_model(cfg, weights, feats, 0.0, fav),
                                 data[0].float() / 255, data[1], cfg.eps)[1]
        err = lb[i, 1 - fav].item() - s  # float32's rounding error of this margin
        if err < 2e-4:
            continue
        neg, pos = f32(-s - err / 2), f32(-s + err / 2)
        if not exact_margin(weights, feats, neg) < -1e-6 < 1e-6 < exact_margin(weights, feats, pos):
            continue
        # float32 alone verifies exactly the favoured sample with both biases (as evaluate runs it)
        if all(ibp.evaluate(cancelling_model(cfg, weights, feats, b, fav), data, cfg.eps)['ver_err']
               == pytest.approx(1 - 1 / n) for b in (neg, pos)):
            return dict(cfg=cfg, data=data, fav=fav, n=n, weights=weights, feats=feats, neg=neg,
                        pos=pos, flags=rounding_flags(n, out), out=out)
    pytest.fail('no margin found where float32 IBP verifies and the exact margin is negative')


def test_float32_verified_but_float64_negative_margin_is_unverified(rounding_case):
    rc = rounding_case
    model = cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav'])
    assert exact_margin(rc['weights'], rc['feats'], rc['neg']) < 0
    plain = ibp.evaluate(model, rc['data'], rc['cfg'].eps, recheck=False)
    assert plain['ver_err'] == pytest.approx(1 - 1 / rc['n']) and plain['ver_changed'] == 0
    sound = ibp.evaluate(model, rc['data'], rc['cfg'].eps, recheck=True)
    assert sound['ver_err'] == 1.0  # the favoured sample is not robust in exact arithmetic
    assert sound['ver_changed'] == 1 and isinstance(sound['ver_changed'], int)
    assert sound['std_err'] == plain['std_err']


def test_recheck_keeps_a_tiny_but_truly_positive_margin_verified(rounding_case):
    """The float64 check is a re-certification, not a safety threshold on the float32 margin."""
    rc = rounding_case
    model = cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['pos'], rc['fav'])
    assert 0 < exact_margin(rc['weights'], rc['feats'], rc['pos']) < 1e-2
    res = ibp.evaluate(model, rc['data'], rc['cfg'].eps, recheck=True)
    assert res['ver_err'] == pytest.approx(1 - 1 / rc['n']) and res['ver_changed'] == 0


def test_recheck_with_attack_judges_soundness_on_the_final_verdict(rounding_case):
    """The final evaluation attacks too: a sample float64 rejects must not raise 'unsound'."""
    rc = rounding_case
    model = cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav'])
    res = ibp.evaluate(model, rc['data'], rc['cfg'].eps, pgd_steps=2, recheck=True)
    assert res['ver_err'] == 1.0 and res['ver_changed'] == 1
    assert res['std_err'] <= res['pgd_err'] <= res['ver_err']


def test_eval_checkpoint_rechecks_in_float64(rounding_case, tmp_path, capsys):
    rc = rounding_case
    model = cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav'])
    path = tmp_path / 'rounding.pt'
    torch.save(dict(model=model.state_dict(), config=dataclasses.asdict(rc['cfg']), epoch=1), path)
    capsys.readouterr()
    assert ibp.main(['--eval-checkpoint', str(path), '--pgd-steps', '0', '--device', 'cpu']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['ver_err'] == 1.0 and res['ver_changed'] == 1 and res['epoch'] == 1


def test_final_metrics_of_a_run_recheck_in_float64(rounding_case, capsys):
    """A last.pt holding the cancelling model at the final epoch: --resume goes straight to the
    final evaluation, whose metrics.json must count the sample unverified, one changed verdict."""
    rc = rounding_case
    cfg = ibp.resolve(ibp.parse_args(rc['flags']))
    model, opt, _ = ibp.prepare(cfg, CPU, ibp.dataset_info(cfg))
    model.load_state_dict(
        cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav']).state_dict())
    os.makedirs(rc['out'], exist_ok=True)
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                    config=dataclasses.asdict(cfg), epoch=cfg.epochs, best=float('inf'), wall=0.0),
               os.path.join(rc['out'], 'last.pt'))
    capsys.readouterr()
    assert ibp.main(rc['flags'] + ['--resume']) == 0, capsys.readouterr().err
    metrics = json.load(open(os.path.join(rc['out'], 'metrics.json')))
    assert metrics['ver_err'] == 1.0 and metrics['ver_changed'] == 1
    assert metrics['test_size'] == rc['n']


# ----------------------------------------------------------------------------------------------
# Checkpoints: safe loading (weights_only), one-line errors, nothing written on a failed load
# ----------------------------------------------------------------------------------------------
RUN_FLAGS = ['--smoke', '--epochs', '2', '--eps-start', '1', '--eps-length', '1',
             '--lr-milestones', '2', '--train-size', '64', '--test-size', '32', '--width', '0.0625',
             '--synthetic-shape', '3', '8', '8', '--pgd-steps', '2', '--device', 'cpu']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A finished 2-epoch run (last.pt, log.jsonl, metrics.json), copied by tests that alter it."""
    out = tmp_path_factory.mktemp('trust') / 'run'
    assert ibp.main(RUN_FLAGS + ['--out-dir', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def other_run(tmp_path_factory):
    """The same run with another --width: its last.pt belongs to another model."""
    out = tmp_path_factory.mktemp('trust') / 'other'
    assert ibp.main(RUN_FLAGS + ['--width', '0.125', '--out-dir', str(out)]) == 0
    return out


class RunsCode:
    """Unpickling this calls open(marker, 'w'): a 'checkpoint' running code when loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def write_bad_checkpoint(kind, path, real, marker, other=None):
    """Replace `path` by a bad checkpoint of `kind`, made from the real checkpoint `real`."""
    if os.path.exists(path):
        os.remove(path)
    if kind == 'truncated':
        data = open(real, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    elif kind == 'text':
        open(path, 'w').write('this is a note, not a checkpoint\n')
    elif kind == 'tensor':  # a valid torch file, but not a checkpoint dict
        torch.save(torch.zeros(3), path)
    elif kind == 'code_zip':  # torch.save format, looks like a checkpoint
        torch.save(dict(model=RunsCode(marker), config={}, epoch=1), path)
    elif kind == 'code_pickle':  # a plain pickle (torch.load's legacy format)
        with open(path, 'wb') as f:
            pickle.dump(RunsCode(marker), f)
    elif kind == 'misfit':  # the run's own config, the state dict of a model twice as wide
        ck = torch.load(real, weights_only=True)
        wide = ibp.resolve(ibp.parse_args(RUN_FLAGS + ['--width', '0.125']))
        ck['model'] = ibp.build_model(wide, ibp.dataset_info(wide)).state_dict()
        torch.save(ck, path)
    elif kind == 'other_flags':
        shutil.copyfile(os.path.join(other, 'last.pt'), path)
    elif kind == 'no_optimizer':  # a model-only file (like best.pt) where --resume needs last.pt
        ck = torch.load(real, weights_only=True)
        torch.save(dict(model=ck['model'], config=ck['config'], epoch=ck['epoch']), path)
    else:
        assert kind == 'missing', kind


def test_the_code_running_pickles_do_run_code_when_loaded_unsafely(tmp_path):
    """The payloads below are live: without weights_only=True they create the marker."""
    for kind in ('code_zip', 'code_pickle'):
        marker, path = tmp_path / f'{kind}.marker', tmp_path / f'{kind}.pt'
        write_bad_checkpoint(kind, path, None, marker)
        assert not marker.exists()
        try:  # the plain pickle then fails torch's magic-number check: after the code ran
            torch.load(path, weights_only=False)
        except RuntimeError:
            assert kind == 'code_pickle'
        assert marker.exists(), kind


EVAL_BAD = ['missing', 'truncated', 'text', 'tensor', 'code_zip', 'code_pickle', 'misfit']


@pytest.mark.parametrize('kind', EVAL_BAD)
def test_eval_checkpoint_refuses_a_bad_file_with_one_line(kind, tiny_run, tmp_path, capsys,
                                                          monkeypatch):
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, tiny_run / 'last.pt', marker)
    monkeypatch.chdir(tmp_path)  # a stray default --out-dir would land here and show in the digest
    before = tree_digest(tmp_path)
    rc, err = main_stderr(['--eval-checkpoint', str(path), '--device', 'cpu', '--pgd-steps', '2'],
                          capsys)
    assert rc == 2
    single_error_line(err, names=path)
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize('flags', [['--eps', '-0.5'], ['--eps', '0'], ['--pgd-restarts', '0'],
                                   ['--pgd-steps', '-1']])
def test_eval_checkpoint_checks_its_flags(flags, tiny_run, capsys):
    """--eval-checkpoint skips resolve: a negative eps would give negative radii and a false
    certificate, no restart a traceback. Each is one line and exit 2 instead."""
    args = ['--eval-checkpoint', str(tiny_run / 'last.pt'), '--device', 'cpu', *flags]
    rc, err = main_stderr(args, capsys)
    assert rc == 2
    single_error_line(err, names=flags[0])


RESUME_BAD = EVAL_BAD + ['other_flags', 'no_optimizer']


@pytest.mark.parametrize('kind', RESUME_BAD)
def test_resume_refuses_a_bad_last_pt_with_one_line(kind, tiny_run, other_run, tmp_path, capsys,
                                                    monkeypatch):
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, tiny_run / 'last.pt', marker, other=other_run)
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    rc, err = main_stderr(RUN_FLAGS + ['--out-dir', str(run), '--resume'], capsys)
    assert rc == 2
    line = single_error_line(err, names=path)
    if kind == 'other_flags':
        assert 'width' in line  # the flag that differs
    if kind == 'no_optimizer':
        assert 'optimizer' in line
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize('mode,kind', [('eval', 'code_zip'), ('eval', 'code_pickle'),
                                       ('resume', 'code_zip')])
def test_code_running_checkpoint_through_the_real_cli(mode, kind, tiny_run, tmp_path):
    """A real process: stderr holds nothing but the one error line (no warning, no traceback)."""
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, None, marker)
    before = tree_digest(tmp_path)
    args = (['--eval-checkpoint', str(path), '--device', 'cpu'] if mode == 'eval' else
            RUN_FLAGS + ['--out-dir', str(run), '--resume'])
    proc = real_cli(*args)
    assert proc.returncode == 2 and proc.stdout == '', proc.stdout
    single_error_line(proc.stderr, names=path)
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


def test_good_checkpoints_load_safely_and_report_ver_changed(tiny_run, capsys):
    """The real last.pt loads with weights_only=True; --eval-checkpoint reproduces metrics.json."""
    ck = torch.load(tiny_run / 'last.pt', weights_only=True)
    assert ck['epoch'] == 2
    metrics = json.load(open(tiny_run / 'metrics.json'))
    assert isinstance(metrics['ver_changed'], int) and 0 <= metrics['ver_changed'] <= 32
    capsys.readouterr()
    assert ibp.main(['--eval-checkpoint', str(tiny_run / 'last.pt'), '--device', 'cpu']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ('std_err', 'ver_err', 'ver_changed'):
        assert res[k] == metrics[k], k


# ----------------------------------------------------------------------------------------------
# Training: divergence stops the run with one line and keeps the last good epoch
# ----------------------------------------------------------------------------------------------
# 64 images / batch 16 = 4 steps per epoch; the LR is 2e-3 in epoch 1 and 2e-3 * 1e20 after
# milestone 1: the first step of epoch 2 throws the weights to ~1e17 and the next step's bounds are
# non-finite (loss nan; a factor 1e8 only gave losses ~1e13, BN renormalizes them).
DIVERGE = ['--smoke', '--epochs', '3', '--eps-start', '1', '--eps-length', '1',
           '--lr-milestones', '1', '--lr-decay', '1e20', '--train-size', '64', '--batch-size', '16',
           '--test-size', '32', '--width', '0.0625', '--synthetic-shape', '3', '8', '8',
           '--pgd-steps', '2', '--device', 'cpu']


def check_diverged_line(line):
    assert 'diverged' in line and 'non-finite' in line, line
    assert re.search(r'\bepoch 2\b', line) and re.search(r'\bstep \d+', line), line
    eps = re.search(r'\beps ([0-9.]+(?:e[-+]?\d+)?)', line)
    assert eps and float(eps.group(1)) == pytest.approx(4 / 255, abs=5e-5), line  # after the ramp


def check_only_epoch_1_kept(out):
    ck = torch.load(out / 'last.pt', weights_only=True)
    assert ck['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert [json.loads(line)['epoch'] for line in open(out / 'log.jsonl')] == [1]
    assert not (out / 'metrics.json').exists()
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


def test_divergence_is_one_line_and_keeps_the_last_good_epoch(tmp_path, capsys):
    out = tmp_path / 'run'
    rc, err = main_stderr(DIVERGE + ['--out-dir', str(out)], capsys)
    assert rc == 2
    line = single_error_line(err)
    check_diverged_line(line)
    check_only_epoch_1_kept(out)
    # resumable: the same flags load epoch 1 and meet the same divergence, not a load error
    before = tree_digest(out)
    rc, err = main_stderr(DIVERGE + ['--out-dir', str(out), '--resume'], capsys)
    assert rc == 2 and single_error_line(err) == line
    check_only_epoch_1_kept(out)
    assert tree_digest(out) == before


# ----------------------------------------------------------------------------------------------
# Docker: the image runs what CI tests (checked statically: no Docker daemon or registry here)
# ----------------------------------------------------------------------------------------------
def dockerfile_instructions():
    """[(INSTRUCTION, arguments)] of ./Dockerfile: continuations joined, comments dropped."""
    out, cur = [], ''
    for raw in open(os.path.join(REPO, 'Dockerfile')).read().splitlines():
        s = raw.strip()
        if not s or s.startswith('#'):
            continue
        if s.endswith('\\'):
            cur += s[:-1] + ' '
            continue
        cur += s
        word, _, rest = cur.partition(' ')
        out.append((word.upper(), rest.strip()))
        cur = ''
    assert not cur, 'a continuation line ends the Dockerfile'
    return out


def base_image(instructions):
    args, image = {}, None
    for word, rest in instructions:
        if word == 'ARG':
            name, _, default = rest.partition('=')
            args[name.strip()] = default.strip().strip('"')
        elif word == 'FROM':
            image = rest.split()[0]
            image = re.sub(r'\$\{(\w+)\}|\$(\w+)', lambda m: args[m.group(1) or m.group(2)], image)
    return image


def docker_env(instructions):
    env = {}
    for word, rest in instructions:
        if word == 'ENV':
            tokens = shlex.split(rest)
            if '=' not in tokens[0]:  # legacy form: ENV KEY value
                env[tokens[0]] = ' '.join(tokens[1:])
            else:
                env.update(t.split('=', 1) for t in tokens)
    return env


def shell_commands(instructions):
    """Every simple command of every RUN, as a token list."""
    cmds = []
    for word, rest in instructions:
        if word == 'RUN':
            for part in re.split(r'&&|\|\||;', rest):
                if part.strip():
                    cmds.append(shlex.split(part))
    return cmds


def requirement_pins(name='requirements.txt'):
    pins = {}
    for line in open(os.path.join(REPO, name)):
        line = line.split('#')[0].strip()
        if line:
            m = re.fullmatch(r'([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)', line)
            assert m, f'{name}: {line!r} is not pinned with =='
            pins[m.group(1).lower()] = m.group(2)
    return pins


def ci_script():
    path = os.path.join(REPO, '.ci', 'run')
    lines = [l.split('#')[0].strip() for l in open(path)] if os.path.exists(path) else []
    return [l for l in lines if l]


QUIET = {'--no-cache-dir', '-q', '--quiet', '--disable-pip-version-check', '--no-input',
         '--root-user-action=ignore'}


def pip_requirement_files(commands):
    """The -r files of every 'pip install' among the commands; anything else installed fails."""
    files = []
    for cmd in commands:
        pip = 'install' in cmd and [t for t in cmd[:cmd.index('install')]
                                    if re.fullmatch(r'(.*/)?pip3?', t)]
        if pip:
            rest = [t for t in cmd[cmd.index('install') + 1:] if t not in QUIET]
            assert len(rest) % 2 == 0 and rest[::2] == ['-r'] * (len(rest) // 2), cmd
            files += rest[1::2]
    return files


def test_docker_base_is_the_python_that_runs_these_tests():
    image = base_image(dockerfile_instructions())
    m = re.fullmatch(r'python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?',
                     image)
    assert m, f'base image {image} is not a python:X.Y-slim tag'
    assert (int(m.group(1)), int(m.group(2))) == sys.version_info[:2]


def test_docker_installs_exactly_the_requirements_ci_installs():
    inst = dockerfile_instructions()
    files = pip_requirement_files(shell_commands(inst))
    ci = pip_requirement_files([shlex.split(l) for l in ci_script()]) or ['requirements.txt']
    assert 'requirements.txt' in files and sorted(files) == sorted(ci), (files, ci)
    runs = [args for word, args in inst if word in ('RUN', 'ADD')]
    assert not [r for r in runs if 'torch' in r], 'torch from somewhere else than requirements.txt'
    env = docker_env(inst)
    assert not [k for k in env if k.startswith('PIP_') and ('INDEX' in k or 'FIND_LINKS' in k)], env
    pins = requirement_pins()
    assert {'torch', 'torchvision', 'hypothesis', 'pytest'} <= set(pins), pins
    for extra in set(files) - {'requirements.txt'}:  # every pin once, torch only in the main file
        assert not set(requirement_pins(extra)) & (set(pins) | {'torch'}), extra


def test_the_tested_versions_are_the_pinned_ones():
    """CI (and the image) install requirements.txt: the suite runs against exactly those pins."""
    for name, version in requirement_pins().items():
        assert importlib.metadata.version(name).split('+')[0] == version, name


def test_docker_default_command_is_the_ci_test_command():
    inst = dockerfile_instructions()
    cmd = [json.loads(rest) for word, rest in inst if word == 'CMD']
    assert cmd and isinstance(cmd[-1], list) and 'pytest' in cmd[-1], cmd
    ci = ci_script()
    if ci:  # the same pytest line, and the environment CI exports for it
        assert shlex.split(ci[-1]) == cmd[-1], (ci[-1], cmd[-1])
        env = docker_env(inst)
        for line in ci:
            m = re.fullmatch(r'export (\w+)=(\S+)', line)
            if m and m.group(1) != 'PATH':
                assert env.get(m.group(1)) == m.group(2), m.group(1)
    if docker_env(inst).get('THOROUGH_TESTS'):  # the torch.compile test: inductor compiles C++
        apt = [c for c in shell_commands(inst) if 'apt-get' in c and 'install' in c]
        assert any({'g++', 'build-essential'} & set(c) for c in apt), 'no C++ compiler for inductor'


def glob_regex(pattern):
    # .dockerignore globs (Go filepath.Match plus '**'): '*' and '?' stay inside one name
    out, i = '', 0
    while i < len(pattern):
        if pattern.startswith('**/', i):
            out, i = out + '(?:.*/)?', i + 3
        elif pattern.startswith('**', i):
            out, i = out + '.*', i + 2
        elif pattern[i] == '*':
            out, i = out + '[^/]*', i + 1
        elif pattern[i] == '?':
            out, i = out + '[^/]', i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def docker_ignored(path, patterns):
    """Docker's rule: a pattern matching the path or one of its folders excludes it; the last
    matching line wins; '!' lines include again."""
    parts = path.split('/')
    prefixes = ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pat in patterns:
        keep = pat.startswith('!')
        rx = re.compile(glob_regex(pat.lstrip('!').strip('/')))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not keep
    return ignored


def test_docker_copies_the_context_less_dockerignore():
    inst = dockerfile_instructions()
    assert any(w == 'COPY' and rest.split()[0] == '.' for w, rest in inst), 'no COPY . (context)'
    patterns = [l.strip() for l in open(os.path.join(REPO, '.dockerignore'))
                if l.strip() and not l.startswith('#')]
    for junk in ['runs/x_s0/last.pt', 'data/cifar-10-batches-py/data_batch_1', '.venv/bin/python',
                 '.git/HEAD', '__pycache__/m.cpython-311.pyc', 'tests_property/__pycache__/m.pyc',
                 '.pytest_cache/v/cache/nodeids', '.hypothesis/examples/x', 'last.pt']:
        assert docker_ignored(junk, patterns), junk
    # what the suite needs is in the image: pytest.ini's testpaths and every file beside them
    ini = open(os.path.join(REPO, 'pytest.ini')).read()
    testpaths = re.search(r'^testpaths\s*=\s*(.+)$', ini, re.M).group(1).split()
    needed = ['Dockerfile', '.dockerignore', 'pytest.ini', 'README.md', 'ibp_short_warmup.py',
              os.path.basename(__file__)] + [f for f in os.listdir(REPO) if re.fullmatch(
                  r'requirements.*\.txt|.*\.py', f)] + (['.ci/run'] if ci_script() else [])
    for p in testpaths:
        assert os.path.exists(os.path.join(REPO, p)), p
        needed += [os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in
                   os.walk(os.path.join(REPO, p)) for f in fs if f.endswith('.py')] or [p]
    for p in needed:
        assert not docker_ignored(p, patterns), p


# ----------------------------------------------------------------------------------------------
# Data: the TinyImageNet folder (tiny-imagenet-200 layout), its labels and its uint8 cache
# ----------------------------------------------------------------------------------------------
WNIDS = ['n09256479', 'n01443537', 'n04067472']  # not sorted: the labels are this line order
COLOURS = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]  # each class one solid colour
VAL_CLASSES = [2, 0, 1, 1, 2, 0]  # the class of val_k.JPEG, by wnids.txt line


def write_tiny_imagenet(root, per_class=4):
    import PIL.Image
    base = root / 'tiny-imagenet-200'
    (base / 'val' / 'images').mkdir(parents=True)
    (base / 'test' / 'images').mkdir(parents=True)
    (base / 'wnids.txt').write_text(''.join(w + '\n' for w in WNIDS))
    (base / 'words.txt').write_text(''.join(f'{w}\tthing {i}\n' for i, w in enumerate(WNIDS)))
    for w, colour in zip(WNIDS, COLOURS):
        (base / 'train' / w / 'images').mkdir(parents=True)
        for k in range(per_class):
            PIL.Image.new('RGB', (64, 64), colour).save(
                base / 'train' / w / 'images' / f'{w}_{k}.JPEG')
        (base / 'train' / w / f'{w}_boxes.txt').write_text(
            ''.join(f'{w}_{k}.JPEG\t0\t0\t63\t63\n' for k in range(per_class)))
    for k, c in enumerate(VAL_CLASSES):
        PIL.Image.new('RGB', (64, 64), COLOURS[c]).save(base / 'val' / 'images' / f'val_{k}.JPEG')
    (base / 'val' / 'val_annotations.txt').write_text(
        ''.join(f'val_{k}.JPEG\t{WNIDS[c]}\t0\t0\t63\t63\n' for k, c in enumerate(VAL_CLASSES)))
    PIL.Image.new('RGB', (64, 64), (128, 128, 128)).save(base / 'test' / 'images' / 'test_0.JPEG')
    return base


def tiny_cfg(root, out):
    return ibp.resolve(ibp.Config(dataset='tinyimagenet', data_dir=str(root), device='cpu',
                                  out_dir=str(out)))


def colour_class(x):
    """The class whose colour is nearest to each image's mean colour (JPEG keeps a flat colour)."""
    mean = x.double().mean((2, 3))
    return ((mean[:, None] - torch.tensor(COLOURS, dtype=torch.float64)) ** 2).sum(2).argmin(1)


def tmp_files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith('.tmp')]


def test_tinyimagenet_labels_follow_wnids_and_the_cache_is_reused(tmp_path, monkeypatch):
    import PIL.Image
    base = write_tiny_imagenet(tmp_path)
    data = ibp.load_data(tiny_cfg(tmp_path, tmp_path / 'run'), CPU)
    (xtr, ytr), (xte, yte) = data['train'], data['test']
    assert xtr.dtype == torch.uint8 and xtr.shape == (12, 3, 64, 64) and xte.shape == (6, 3, 64, 64)
    assert data['val'] is None
    for x, y in ((xtr, ytr), (xte, yte)):
        assert torch.equal(y, colour_class(x))
        colours = torch.tensor(COLOURS, dtype=torch.int16)[y][:, :, None, None]
        assert (x.short() - colours).abs().max() <= 8
    assert torch.bincount(ytr).tolist() == [4, 4, 4] and torch.bincount(yte).tolist() == [2, 2, 2]
    cache = base / 'uint8_tensors.pt'
    assert cache.is_file() and not tmp_files(tmp_path)
    torch.load(cache, weights_only=True)  # the cache itself loads safely
    # reused: no JPEG left to decode, and PIL may not open anything
    for d, _, fs in os.walk(base):
        for f in fs:
            if f.endswith('.JPEG'):
                os.remove(os.path.join(d, f))

    def no_decoding(*args, **kwargs):
        raise AssertionError('decoded an image although the cache exists')

    monkeypatch.setattr(PIL.Image, 'open', no_decoding)
    again = ibp.load_data(tiny_cfg(tmp_path, tmp_path / 'run'), CPU)
    for split in ('train', 'test'):
        for a, b in zip(data[split], again[split]):
            assert torch.equal(a, b), split


def break_folder(kind, base, marker):
    if kind == 'no_annotations':
        os.remove(base / 'val' / 'val_annotations.txt')
    elif kind == 'no_wnids':
        os.remove(base / 'wnids.txt')
    elif kind == 'class_folder_missing':  # a 4th wnid listed, its train folder absent
        with open(base / 'wnids.txt', 'a') as f:
            f.write('n02099601\n')
    elif kind == 'truncated_jpeg':
        path = base / 'train' / WNIDS[1] / 'images' / f'{WNIDS[1]}_2.JPEG'
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == 'garbage_cache':
        (base / 'uint8_tensors.pt').write_bytes(b'\x00garbage, not a tensor file')
    elif kind == 'code_cache':
        torch.save(RunsCode(marker), base / 'uint8_tensors.pt')


TINY_FLAGS = ['--dataset', 'tinyimagenet', '--width', '0.03', '--epochs', '2', '--eps-start', '1',
              '--eps-length', '1', '--lr-milestones', '2', '--batch-size', '8', '--pgd-steps', '2',
              '--device', 'cpu']


@pytest.mark.parametrize('kind', ['no_annotations', 'no_wnids', 'class_folder_missing',
                                  'truncated_jpeg', 'garbage_cache', 'code_cache'])
def test_broken_tinyimagenet_folder_is_a_user_error(kind, tmp_path, capsys):
    root, marker = tmp_path / 'data', tmp_path / 'marker'
    base = write_tiny_imagenet(root)
    break_folder(kind, base, marker)
    before = tree_digest(root)
    with pytest.raises(ibp.UserError) as e:
        ibp.load_data(tiny_cfg(root, tmp_path / 'run'), CPU)
    assert '\n' not in str(e.value)
    out = tmp_path / 'run'
    rc, err = main_stderr(TINY_FLAGS + ['--data-dir', str(root), '--out-dir', str(out)], capsys)
    assert rc == 2
    single_error_line(err)
    assert not marker.exists() and not (out / 'last.pt').exists()
    assert tree_digest(root) == before  # no cache (or half a cache) written from a broken folder


def test_tinyimagenet_cli_run_trains_and_certifies(tmp_path, capsys):
    root, out = tmp_path / 'data', tmp_path / 'run'
    write_tiny_imagenet(root)
    capsys.readouterr()
    assert ibp.main(TINY_FLAGS + ['--data-dir', str(root), '--out-dir', str(out)]) == 0, \
        capsys.readouterr().err
    metrics = json.load(open(out / 'metrics.json'))
    assert metrics['final_epoch'] == 2 and metrics['test_size'] == 6
    assert 0 <= metrics['ver_err'] <= 1
    assert metrics['std_err'] <= metrics['pgd_err'] <= metrics['ver_err']
    assert [json.loads(line)['epoch'] for line in open(out / 'log.jsonl')] == [1, 2]
    assert (root / 'tiny-imagenet-200' / 'uint8_tensors.pt').is_file()
