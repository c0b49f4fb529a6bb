"""The method's specification: Shi, Wang, Zhang, Yi, Hsieh, "Fast Certified Robust Training with
Short Warmup", NeurIPS 2021, as ibp_short_warmup.py implements it, claim by claim.

INDEX: each claim, and the test that proves it. T = this file; P = tests_property/ (Hypothesis
properties: random networks, boxes and schedules; profiles in tests_property/conftest.py).

The design card's three properties
  (a) Bounds are sound: points drawn at random inside the input interval (also its corners, and
      points found by gradient ascent) never leave the bounds of any layer, nor the margin bounds.
        P test_soundness.py::test_random_nets_bounds_enclose_every_layer (random networks)
        P test_soundness.py::test_model_families_bounds_enclose_every_layer (CNN-7, WRN, ResNeXt)
        P test_soundness.py::test_margin_lower_bounds_are_sound_and_exact_at_the_last_layer
  (b) The IBP initialization gives each layer a difference gain of about 1.
        P test_init_gain.py::test_difference_gain_of_a_layer_at_initialization (one layer)
        T test_difference_gain_through_cnn7_at_initialization (a whole CNN-7, Figure 1)
  (c) Each ReLU(.) term of Eq. (7) and Eq. (8) lies in [0, tau].
        P test_regularizers.py::test_each_regularizer_term_lies_in_0_tau (arbitrary boxes)
        P test_regularizers.py::test_each_term_on_real_bounds_lies_in_0_tau (model families)

The paper's claims, section by section, in the order of this file
  Sec. 2, Eq. (3): interval bound propagation
    worked by hand: a two-layer net with clipping and an unstable ReLU
        T test_two_layer_net_by_hand
    the interval ReLU at its kinks, and its gradient
        T test_interval_relu_at_the_kinks_by_hand
    residual sums, input normalization
        T test_residual_and_normalize_by_hand
    every layer's rule is the exact range of that layer
        P test_soundness.py::test_each_layer_rule_returns_the_exact_range
    a sub-box gets nested bounds; a point box is the forward pass
        P test_soundness.py::test_nested_boxes_give_nested_bounds
    eps = 0 gives the ordinary forward pass, for every model
        T test_eps_zero_bounds_equal_forward_pass
    the boxes the regularizers read: the input box and every ReLU input
        T test_pre_collects_normalized_input_and_every_relu_input
    the input box is the eps-ball clipped to [0, 1]
        P test_soundness.py::test_input_box_is_the_eps_ball_clipped_to_the_pixel_range
    a layer without a rule is an error
        T test_unknown_layer_raises
  Sec. 2: margins, with the specification matrix C folded into the last layer
    tighter than subtracting logit bounds, by hand (1.5 against 1.15)
        T test_two_layer_net_by_hand
    exact at the last layer, never looser than subtracting, sound
        P test_soundness.py::test_margin_lower_bounds_are_sound_and_exact_at_the_last_layer
    verified means every margin bound > 0, strictly
        T test_verified_is_strict
  Sec. 3.3.2: BN after every affine layer, with the clean batch's statistics
    in training: the clean batch's mean and variance, by hand
        T test_bn_train_mode_by_hand
    in evaluation: the running statistics, by hand
        T test_bn_eval_mode_by_hand
    equal to nn.BatchNorm itself: values, gradients through the statistics (not detached),
    running statistics, momentum None
        T test_bn_affine_matches_nn_batchnorm
    conv and BN folded into one convolution
        T test_conv_bn_fold_equals_conv_then_bn
    the statistics carry gradients (gradcheck)
        P test_soundness.py::test_bn_statistics_carry_gradients
    running statistics as PyTorch updates them
        P test_soundness.py::test_bn_running_statistics_updated_as_pytorch_does
  Sec. 4.1: the three models
    parameter counts and ReLU layers on CIFAR-10
        T test_cifar_parameter_counts_and_relu_layers
    the TinyImageNet variants
        T test_tinyimagenet_fc_input_sizes
  Sec. 3.3.1, Eq. (5) and (6): the IBP initialization
    sigma = sqrt(2 pi) / n_i with fan-ins by hand; classifier, biases and BN untouched
        T test_ibp_init_sigma_and_what_it_leaves
    residual calibration: the layers fed by ReLU(add) halved
        T test_ibp_init_residual_calibration
        P test_init_gain.py::test_ibp_init_of_the_model_families (every family)
    the gain is about 1: see (b)
  Sec. 3.3.3, Eq. (7) and (8): the warmup regularizers
    exact values by hand (strict active/inactive, statistics pooled over batch and layer; a
    one-sided layer costs tau + tau, an all-unstable one nothing)
        T test_regularizers_exact_value_by_hand
        T test_regularizer_beta_term_by_hand
        T test_interval_relu_at_the_kinks_by_hand
    zero when every ratio is within tau, and only then
        T test_regularizers_zero_when_ratios_within_tau
        P test_regularizers.py::test_regularizers_vanish_exactly_when_every_ratio_is_within_tau
        P test_regularizers.py::test_regularizers_are_exactly_zero_on_balanced_bounds
    equal to the formulas, on arbitrary and on real boxes
        P test_regularizers.py::test_regularizers_match_the_paper_formulas
        P test_regularizers.py::test_regularizers_on_real_bounds_match_the_oracle
    each term in [0, tau]: see (c); L_tightness = 1 for a point input box
        P test_regularizers.py::test_tightness_is_1_when_the_input_box_is_a_point
  Eq. (9) and (10): the objective
    robust loss + lambda (switched-on regularizers); cross-entropy at eps = 0; by hand
        T test_objective_eq10_by_hand
    the 1e-6 floor only at eps = 0; any eps > 0 bounds the loss itself
        T test_eps_floor_only_where_the_scheduled_eps_is_zero
    the Objective module that DDP and --compile wrap
        T test_objective_is_batch_loss_as_a_module
    its gradient equals finite differences of the whole loss
        T test_whole_objective_gradient_matches_finite_differences
  Sec. 3.4 and 4.1: the schedules and each dataset's defaults
    eps per batch: worked values, continuity of value and slope
        T test_eps_schedule_worked_values
        P test_schedules.py::test_eps_schedule_shape
    lambda = lambda_0 (1 - eps / eps_target)
        T test_lambda_worked_values
        P test_schedules.py::test_lambda_follows_eps_from_lambda0_to_0
    LR milestones, and each dataset's defaults
        T test_lr_milestones_and_dataset_defaults
        P test_schedules.py::test_lr_steps_down_by_lr_decay_right_after_each_milestone

Plumbing lives in its own files: test_cli.py (flags, one-line errors), test_training_runs.py (the
smoke run, the ETA, divergence), test_checkpoints.py (resume, --eval-checkpoint, safe
loading), test_distributed.py (torchrun, DDP), test_datasets.py (augmentation, dataset folders),
test_evaluation.py (standard / PGD / verified error), test_speed_paths.py (fp32 certification, TF32,
fused Adam, torch.compile), test_tools.py (init_gains, the diagnosis, the benchmark),
test_readme.py, test_plots.py.

Every expected value comes from an oracle that is not the code under test: numbers worked by hand
(the arithmetic is in the comments), plain PyTorch forward passes and nn.BatchNorm itself, interval
arithmetic in the paper's lower/upper form, finite differences of the whole training objective.
The tolerance table and the oracles are shared with the properties: tests_property/oracles.py.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp
from ibp_short_warmup import (Config, Normalize, Residual, build_model, cnn7, dataset_info, eps_at,
                              fan_in, ibp_forward, ibp_init_, ibp_margins, input_box, lam_at, lr_at,
                              resnext, resolve, robust_loss, verified, warmup_regularizers,
                              wide_resnet)
from oracles import (FD, GAIN_TOL, KINK_MARGIN, PARAM_COUNT_TOL, TOL, abs_mean_tol, fan_in_of,
                     interval_radii, mean_tol, regularizer_oracle, std_tol)

D = torch.float64
F32 = torch.float32


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
# Interval bound propagation (Eq. 3) and margins with C folded (Sec. 2)
# ----------------------------------------------------------------------------------------------
def test_two_layer_net_by_hand():
    """Linear(2,2) - ReLU - Linear(2,2), eps 0.1, one input coordinate clipped at 1, one unstable
    ReLU: the input box, the ReLU's input box, the logit box, the folded margins, Eq. (9)."""
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
    # Residual(Linear(1,1) w -2 b 1, Identity) on c = 1, r = 0.5: branch c -1 r 1, shortcut c 1
    # r 0.5; the sum: c 0, r 1.5 (lowers add, uppers add)
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


# Beyond these hand examples, soundness for random networks, the three model families and random
# boxes (sampled points, corners, gradient ascent) is a Hypothesis property: see (a) in the index,
# tests_property/test_soundness.py.
def test_unknown_layer_raises():
    with pytest.raises(TypeError):
        ibp_forward(nn.Sequential(nn.Tanh()), t([[0.0]]), t([[0.0]]), t([[0.0]]))


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
    """At eps = 0 the box is a point: radius 0 everywhere, the centre and the clean batch are the
    plain PyTorch forward pass (BN on batch statistics in training, running ones in evaluation),
    the margins are the logit differences and Eq. (9) is the cross-entropy; the running statistics
    move exactly as nn.BatchNorm moves them."""
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


def test_verified_is_strict():
    y = torch.tensor([0, 1, 2])
    lb = t([[0, 1e-9, 2], [0.0, 0, 3], [5, -1e-9, 0]])
    # sample 0: all j != y positive; sample 1: lb_0 = 0 is not > 0; sample 2: lb_1 < 0
    assert verified(lb, y).tolist() == [True, False, False]


# ----------------------------------------------------------------------------------------------
# BN with the clean batch's statistics (Sec. 3.3.2); the models (Sec. 4.1)
# ----------------------------------------------------------------------------------------------
def bn_net():
    """Linear(1,2) - BN1d(2, eps 0) - ReLU - Linear(2,2) for the hand-worked BN examples."""
    bn = nn.BatchNorm1d(2, eps=0.0).to(D)
    return nn.Sequential(linear([[1], [-2]], [0, 1]), bn, nn.ReLU(),
                         linear([[1, -1], [0, 2]], [0, 0.5]))


def test_bn_train_mode_by_hand():
    """In training, BN normalizes the box with the clean batch's mean and biased variance (not the
    box's), and moves the running statistics as nn.BatchNorm1d does."""
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


def test_bn_eval_mode_by_hand():
    """In evaluation, BN uses the running statistics, which stay."""
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
# IBP initialization (Sec. 3.3.1, Eq. 5 and 6)
# ----------------------------------------------------------------------------------------------
def test_ibp_init_sigma_and_what_it_leaves():
    """Every conv/linear weight but the classifier's ~ N(0, sigma^2), sigma = sqrt(2 pi) / n_i with
    the fan-in n_i by hand: 2048 for Linear(2048, .), 64 / 2 groups x 3 x 3 = 288 for the grouped
    conv; Eq. (6)'s n_i/2 E|W| is then 1. Biases, BN and the classifier keep their values."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(), nn.Conv2d(64, 96, 3, groups=2), nn.ReLU(),
                        nn.BatchNorm1d(4), nn.Linear(512, 10))
    before = copy.deepcopy(net)
    ibp_init_(net)
    for layer, n_i in [(net[0], 2048), (net[2], 288)]:
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
    """One block per stage: the first conv and the shortcut conv of blocks 2 and 3 see ReLU(branch
    + shortcut), about twice as wide: sigma / 2 (4 layers). The dense layer after the last block
    keeps the full sigma; the classifier keeps PyTorch's U(-1/sqrt(n), 1/sqrt(n))."""
    net, _ = small_model(family, 'full', 'cifar10', width=0.5, seed=0)
    mods = list(net)
    blocks = [m for m in mods if isinstance(m, Residual)]
    assert len(blocks) == 3
    halved = {id(blk.branch[0]) for blk in blocks[1:]} | {id(blk.shortcut[0]) for blk in blocks[1:]}
    affine = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    classifier = affine[-1]
    assert classifier is mods[-1] and len(halved) == 4
    for m in affine[:-1]:
        ratio = m.weight.std().item() * fan_in_of(m) / math.sqrt(2 * math.pi)
        expect = 0.5 if id(m) in halved else 1.0
        assert abs(ratio / expect - 1) < std_tol(m.weight.numel()), (m, ratio, expect)
    ratio = classifier.weight.std().item() * math.sqrt(3 * classifier.in_features)  # 1/sqrt(3n)
    assert abs(ratio - 1) < std_tol(classifier.weight.numel(), kurtosis=1.8)


@pytest.mark.parametrize('init', ['default', 'ibp'])
def test_difference_gain_through_cnn7_at_initialization(init):
    """Figure 1 and Eq. (6) on a whole CNN-7 (no BN, width 1/4, CIFAR-10's shape, eps 8/255): the
    mean box half-width E(Delta_i) at every ReLU input, by lower/upper interval arithmetic
    (oracles.interval_radii, not the code's centre-radius form). After ibp_init_ each gain
    E(Delta_i)/E(Delta_{i-1}) is about 1, but the first layer's, which sees the input box itself
    (no ReLU halves it): about 2. With PyTorch's default init every gain is > 1: the bounds explode
    with depth."""
    torch.manual_seed(0)
    cfg = Config(dataset='cifar10', bn='none', width=0.25, ibp_init=init == 'ibp')
    model = build_model(cfg, dataset_info(cfg)).to(D)
    radii = interval_radii(model, torch.rand(64, 3, 32, 32, dtype=D), 8 / 255)
    gains = [b / a for a, b in zip(radii, radii[1:])]
    assert len(gains) == 6  # five convs and the hidden dense layer
    if init == 'ibp':
        assert gains[0] == pytest.approx(2, rel=GAIN_TOL)
        assert gains[1:] == pytest.approx([1] * 5, rel=GAIN_TOL), gains
    else:
        assert all(g > 1 + GAIN_TOL for g in gains), gains


# ----------------------------------------------------------------------------------------------
# Warmup regularizers (Sec. 3.3.3, Eq. 7 and 8) on hand-made boxes
# ----------------------------------------------------------------------------------------------
def test_regularizers_zero_when_ratios_within_tau():
    pre = [(t([[0.5, 0.5]]), t([[1.0, 1.0]])),  # E(Delta_0) = 1
           # layer 1: E(Delta_1) = 0.5 -> Delta_0 / Delta_1 = 2 >= tau
           # active (c - r > 0): 1, 2 -> sum 3; inactive (c + r < 0): -1, -2 -> -sum 3: alpha = 1
           # mean c = 0, dev = 1, 1, 4, 4: active 5, inactive 5: beta = 1
           (t([[1, -1], [2, -2]]), t([[0.5, 0.5], [0.5, 0.5]])),
           # layer 2: E(Delta_2) = 2 -> ratio 1/2 = tau -> ReLU(0) = 0. The bounds touch zero: l = 0
           # for the first neuron, u = 0 for the second: both unstable (strict), so the relu term is
           # skipped (counted as active/inactive it would be alpha = 3 -> ReLU(0.5 - 1/3) > 0)
           (t([[3.0, -1.0]]), t([[3.0, 1.0]]))]
    lt, lr, states = warmup_regularizers(pre, 0.5)
    assert lt.item() == 0 and lr.item() == 0
    close(states.to(D), [[0.5, 0.5, 0], [0, 0, 1]])


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
           # layer 2: E(Delta_2) = 0.05: tightness ReLU(0.5 - 2) = 0; all active: no inactive
           #   neuron, so alpha = p / 0 = infinity and min(alpha, 1/alpha) = 0, likewise beta:
           #   Eq. (8) gives ReLU(0.5 - 0) + ReLU(0.5 - 0) = 1
           (t([[2, 1]]), t([[0.05, 0.05]])),
           # layer 3: E(Delta_3) = 0.4: tightness ReLU(0.5 - 0.25) = 0.25; all inactive (dead):
           #   alpha = 0 / q = 0, beta = 0: again 0.5 + 0.5 = 1
           (t([[-2, -1]]), t([[0.4, 0.4]]))]
    lt, lr, states = warmup_regularizers(pre, tau)
    m = 3
    close(lt, (0.3 + 0 + 0.25) / (tau * m))  # 0.55 / 1.5
    close(lr, (0.25 + 1 + 1) / (tau * m))  # 2.25 / 1.5
    # A layer with no stable neuron at all (alpha = 0/0, undefined) adds nothing: layer 1 alone
    # and layer 1 beside an all-unstable layer (c = 0, r = 1) give the same sum over m = 1 and 2.
    close(warmup_regularizers(pre[:2], tau)[1], 0.25 / (tau * 1))
    lr2 = warmup_regularizers(pre[:2] + [(t([[0.0, 0.0]]), t([[1.0, 1.0]]))], tau)[1]
    close(lr2, 0.25 / (tau * 2))
    # ReLU states: layer 1 active 2/4, inactive 1/4, unstable 1/4; layer 2 all active; layer 3 all
    # inactive
    close(states.to(D), [[0.5, 0.25, 0.25], [1, 0, 0], [0, 1, 0]])


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
# The objective (Eq. 9 and 10): by hand, as a module, against finite differences
# ----------------------------------------------------------------------------------------------
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
def test_objective_eq10_by_hand(tight, relu):
    """Eq. (10) with lambda = 0.3: the robust loss of Eq. (9) plus lambda times the regularizers
    that are switched on (Table 4's ablations); both regularizers and the ReLU states logged either
    way; lambda = 0 (after the warmup) leaves the robust loss; eps = 0 makes the data loss the clean
    cross-entropy, the regularizers still seeing a vanishing box."""
    model, x, y = hand_objective_case()
    cfg = Config(tau=0.5, reg_tightness=tight, reg_relu=relu)
    loss, stats = ibp.batch_loss(model, x, y, 0.1, 0.3, cfg)
    close(loss, HAND_ROBUST + 0.3 * (tight * HAND_TIGHT + relu * HAND_RELU))
    # the statistics for the log, in float32: logged whether or not they are in the objective
    close(stats['loss'], HAND_ROBUST, F32)
    close(stats['l_tightness'], HAND_TIGHT, F32)
    close(stats['l_relu'], HAND_RELU, F32)
    close(stats['relu_per_layer'], [[0.25, 0.25, 0.5]], F32)  # active h0 of image 1, inactive h1 of image 2
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


def robust_at(eps):
    """Eq. (9) of the hand example at a small eps, from its boxes. Image 1 (0.95, 0.25), y = 0:
    h0 = x0 - x1 in 0.7 +- 2 eps, h1 = 2 x0 + x1 - 2 in 0.15 +- 3 eps, both active; W' = C W =
    (2, 1), b' = 0.5: lb = 2 (0.7 - 2 eps) + 0.15 - 3 eps + 0.5 = 2.05 - 7 eps. Image 2 (0.1, 0.1),
    y = 1: h0 in [-2 eps, 2 eps], h1 inactive; W' = (-2, -1), b' = -0.5: lb = -0.5 - 4 eps."""
    return (math.log1p(math.exp(-(2.05 - 7 * eps))) + math.log1p(math.exp(0.5 + 4 * eps))) / 2


@pytest.mark.parametrize('eps', [1e-8, 5e-7])
def test_eps_floor_only_where_the_scheduled_eps_is_zero(eps):
    """The first batches of the smoothed ramp have 0 < eps < 1e-6: the bounds and the robust loss
    use that eps itself. The 1e-6 floor exists only for eps = 0, where the data loss is the clean
    cross-entropy and only the regularizers read the box (Sec. 3.4)."""
    model, x, y = hand_objective_case()
    cfg = Config(tau=0.5, reg_tightness=True, reg_relu=True)
    close(ibp.batch_loss(model, x, y, eps, 0.0, cfg)[0], robust_at(eps))
    assert abs(robust_at(ibp.EPS_FLOOR) - robust_at(eps)) > 1e3 * TOL[D]['atol']  # tells apart
    close(ibp.batch_loss(model, x, y, 0.0, 0.0, cfg)[0], HAND_CE)  # eps = 0: cross-entropy


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
    assert {'loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err', 'relu_per_layer'} <= set(stats)
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


FD_INFO = dict(shape=(1, 4, 4), classes=3, mean=(0.5,), std=(0.25,))


@pytest.mark.parametrize('family,eps', [('cnn7', 0.05), ('cnn7', 0.0), ('resnext', 0.05)])
def test_whole_objective_gradient_matches_finite_differences(family, eps):
    """The gradient of the training objective Eq. (10), robust_loss(lb) + lambda (L_tightness +
    L_relu) at eps > 0 and cross-entropy + lambda (...) at eps = 0, with respect to every parameter,
    equals central finite differences of the whole loss (torch.autograd.gradcheck, float64). Tiny
    CNN-7 and ResNeXt in train mode: BN with the clean batch's statistics, whose gradient is thus
    covered (momentum 0 keeps the running statistics fixed across the evaluations). The batch is
    drawn so that no ReLU bound, clean ReLU input or ratio of Eq. (7)/(8) lies near a kink."""
    cfg = Config(model=family, width=1 / 64, ibp_init=True, tau=1.0, reg_tightness=True,
                 reg_relu=True)
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

    # ResNeXt: gradcheck's fast mode (a random projection of the Jacobian, 2 evaluations per
    # parameter tensor instead of 2 per weight: 1 s instead of 10); CNN-7 element by element
    assert torch.autograd.gradcheck(loss, params, fast_mode=family == 'resnext', **FD)


# ----------------------------------------------------------------------------------------------
# Schedules: eps per batch and lambda (Sec. 3.4), the LR per epoch, each dataset's defaults
# ----------------------------------------------------------------------------------------------
def test_eps_schedule_worked_values():
    E, L = 0.3, 10  # start 2, length 4: init = 10, final = 50, mid = 10 + 40/4 = 20
    f = lambda s: eps_at(s, L, E, 2, 4)
    assert all(f(s) == 0 for s in range(0, 11))  # the whole first epoch and step init itself
    assert f(15) == approx(E / 13 * 0.5 ** 4)  # a (b - init)^4 with (5 / 10)^4
    assert f(20) == approx(E / 13)  # the polynomial part ends at eps_target / 13
    assert f(35) == approx(E / 13 + 12 * E / 13 * 15 / 30)  # linear: 7/13 E
    assert f(50) == E and f(51) == E and f(1000) == E
    h = FD['eps']  # continuity of value and slope at init, mid and final (steps may be fractional)
    for s in (10, 20, 50):
        assert abs(f(s - h) - f(s + h)) <= 2 * h * E  # eps rises by less than E per step
    slope = lambda s: (f(s + h) - f(s - h)) / (2 * h)
    line = 12 * E / 13 / 30  # the polynomial's slope 4 a t^3 at mid is the line's
    assert slope(20 - 1e-3) == pytest.approx(line, rel=FD['rtol'])
    assert slope(20 + 1e-3) == pytest.approx(line, rel=FD['rtol'])
    # MNIST: start 1 -> the ramp starts at step 0; 8 steps an epoch, length 2: final 16, mid 4
    assert eps_at(0, 8, 0.4, 1, 2) == 0
    assert eps_at(4, 8, 0.4, 1, 2) == approx(0.4 / 13)
    assert eps_at(16, 8, 0.4, 1, 2) == 0.4


def test_lambda_worked_values():
    # lambda_0 = 0.5, eps_target 0.2: eps 0 -> 0.5; eps 0.05 -> 0.5 (1 - 1/4) = 0.375; eps 0.2 -> 0
    assert lam_at(0.0, 0.2, 0.5) == 0.5
    assert lam_at(0.05, 0.2, 0.5) == approx(0.375)
    assert lam_at(0.2, 0.2, 0.5) == 0.0


def test_lr_milestones_and_dataset_defaults():
    cfg = resolve(Config(dataset='cifar10', out_dir='unused'))
    assert (cfg.epochs, cfg.eps_start, cfg.eps_length, cfg.lr_milestones) == \
        (160, 2, 80, (120, 140))
    assert cfg.eps == 8 / 255 and cfg.batch_size == 128 and cfg.lam0 == 0.5 and cfg.tau == 0.5
    # 5e-4 up to epoch 120; x 0.2 = 1e-4 from 121 to 140; x 0.2 again = 2e-5 from 141
    assert all(lr_at(e, cfg) == 5e-4 for e in (1, 60, 120))
    assert lr_at(121, cfg) == approx(1e-4) and lr_at(140, cfg) == approx(1e-4)
    assert lr_at(141, cfg) == approx(2e-5) and lr_at(160, cfg) == approx(2e-5)
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
