"""Fast Certified Robust Training with Short Warmup: the whole method in one file.

Paper: Zhouxing Shi, Yihan Wang, Huan Zhang, Jinfeng Yi, Cho-Jui Hsieh. "Fast Certified Robust
Training with Short Warmup", NeurIPS 2021, https://arxiv.org/abs/2103.17268.

What this file reproduces: certified (L-infinity) robust training with interval bound propagation
(IBP, Eq. (3)), made fast by the paper's three contributions, each tagged `[paper]` below:
  1. the IBP initialization (Sec. 3.3.1): W_i ~ N(0, (sqrt(2 pi) / n_i)^2), difference gain 1;
  2. BatchNorm after every affine layer (Sec. 3.3.2), with the clean batch's statistics;
  3. two warmup regularizers, L_tightness, Eq. (7), and L_relu, Eq. (8), in the objective, Eq. (10).
Models: CNN-7, Wide-ResNet and ResNeXt with full BN, for MNIST, Fashion-MNIST, CIFAR-10 and
TinyImageNet (and a generated `synthetic` dataset). The method comes first, in the paper's order.

Commands (each dataset's defaults follow the paper and the authors' release; see `--help`):
    python ibp_short_warmup.py --smoke                        # CPU, synthetic data, seconds
    python ibp_short_warmup.py --dataset cifar10              # 160 epochs (1+80+79), eps 8/255
    python ibp_short_warmup.py --dataset mnist                # 70 epochs (0+20+50), eps 0.4
    python ibp_short_warmup.py --dataset tinyimagenet         # 80 epochs (1+20+59), eps 1/255
    python ibp_short_warmup.py --dataset cifar10 --method vanilla  # the vanilla IBP baseline
    python ibp_short_warmup.py --eval-checkpoint runs/X/last.pt    # certify a saved model

Expected results, IBP-verified error of CNN-7 (the paper's, on one RTX 2080 Ti; not yet
reproduced by us on a GPU): CIFAR-10 eps 8/255 65.58% after 160 epochs (64 s an epoch), 68.81%
after 70; MNIST eps 0.4 11.03%; TinyImageNet eps 1/255 82.36%. On a 2-core CPU (README.md):
`--smoke` reaches 0% in seconds; a narrow CNN-7 on 10,000 MNIST images, 8 epochs at eps 0.1,
about 10.5% in under two minutes (idle).

Outputs in --out-dir: log.jsonl (a record per epoch, also printed), last.pt (after every epoch;
`--resume` continues from it), metrics.json (the result). This file imports nothing of its
repository; ibp_tools.py (benchmark, init diagnosis) and plot_runs.py import it.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import socket
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

EPS_FLOOR = 1e-6  # eps of the bounds where the scheduled eps is exactly 0 (the regularizers' box)
DIV_GUARD = 1e-12  # keeps the ratios of Eq. (7) and Eq. (8) finite
ATTACK_TOL = 1e-4  # how far (relative to the logits) an attack must beat a verified margin


# ==== Interval bound propagation, Eq. (3) =====================================================
# A box [l, u] is carried as its centre c = (l + u)/2 and radius r = (u - l)/2. For an affine
# layer h = W z + b, Eq. (3)'s W+ l + W- u and W+ u + W- l are exactly c' -/+ r' with
# c' = W c + b and r' = |W| r: two products instead of four. The clean batch x travels alongside,
# because BN in training normalizes with the clean batch's statistics (Sec. 3.3.2).
def input_box(x, eps):
    # The L-inf ball of radius eps around x, clipped to the valid pixel range [0, 1].
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return (up + lo) / 2, (up - lo) / 2


def interval_relu(c, r):
    # Eq. (3) for the ReLU: it is monotone, so [l, u] maps to [relu(l), relu(u)].
    lo, up = F.relu(c - r), F.relu(c + r)  # Eq. (3)
    return (up + lo) / 2, (up - lo) / 2


def bn_affine(bn, h):
    # [paper] Sec. 3.3.2: BN is the per-channel affine map t -> w t + b, w = gamma / sqrt(var + e),
    # b = beta - mean w. In training, mean and variance are the clean batch h's, not the bounds',
    # and are not detached: gradients flow through them. In eval, the running statistics.
    if bn.training:
        dims = [0] + list(range(2, h.dim()))  # all but the channel dimension
        var, mean = torch.var_mean(h, dims, unbiased=False)
        with torch.no_grad():  # the running statistics, updated as nn.BatchNorm updates them
            n = h.numel() / h.shape[1]
            bn.num_batches_tracked += 1  # momentum None: nn.BatchNorm's cumulative average
            m = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked.item()
            bn.running_mean.lerp_(mean, m)
            bn.running_var.lerp_(var * n / max(n - 1, 1), m)  # unbiased, as nn.BatchNorm
    else:
        mean, var = bn.running_mean, bn.running_var
    w = bn.weight / torch.sqrt(var + bn.eps)
    return w, bn.bias - mean * w


def ibp_conv(conv, bn, x, c, r):
    # Eq. (3) for a convolution, and for the BN after it if there is one. The clean batch goes
    # first: its statistics define BN's map (w, b). BN(W * t + b_conv) = (w W) * t + (w b_conv + b)
    # is again a convolution, so the box gets the folded weights and skips a pass of its own.
    h, weight, bias = conv(x), conv.weight, conv.bias
    if bn is not None:
        w, b = bn_affine(bn, h)
        h = h * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)  # the clean batch: BN(h)
        weight = weight * w.view(-1, 1, 1, 1)
        bias = b if bias is None else w * bias + b
    args = conv.stride, conv.padding, conv.dilation, conv.groups
    return h, F.conv2d(c, weight, bias, *args), F.conv2d(r, weight.abs(), None, *args)  # Eq. (3)


# The two modules of the models (below) that need interval rules of their own:
class Normalize(nn.Module):
    # Per-channel (x - mean) / std inside the model, so that eps stays in pixel units.
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    # branch(x) + shortcut(x); the ReLU after the sum is the next module of the Sequential.
    def __init__(self, branch, shortcut):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


def ibp_forward(module, x, c, r, pre=None):
    # Propagate the clean batch x and the box (c, r) through `module`. With a list `pre`, append
    # the boxes the regularizers read: the normalized input box (layer 0) and the box at the input
    # of every ReLU (layers 1..m of Eq. (7) and Eq. (8)).
    if isinstance(module, nn.Sequential):
        layers, i = list(module), 0
        while i < len(layers):
            bn = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layers[i], nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                x, c, r = ibp_conv(layers[i], bn, x, c, r)  # conv -> BN as one convolution
                i += 2
            else:
                x, c, r = ibp_forward(layers[i], x, c, r, pre)
                i += 1
        return x, c, r
    if isinstance(module, nn.Conv2d):
        return ibp_conv(module, None, x, c, r)
    if isinstance(module, nn.Linear):
        # Eq. (3): c' = W c + b, r' = |W| r. The clean and the centre batch share W: one matmul.
        # (Not folded with the BN1d after it: the weight is far larger than the activations.)
        h, c = module(torch.cat([x, c])).split(len(x))
        return h, c, F.linear(r, module.weight.abs())
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        w, b = bn_affine(module, x)  # [paper] Sec. 3.3.2; per channel, dimension 1
        w, b = w.view(1, -1, *[1] * (x.dim() - 2)), b.view(1, -1, *[1] * (x.dim() - 2))
        return x * w + b, c * w + b, r * w.abs()  # Eq. (3) for an affine map
    if isinstance(module, nn.ReLU):
        if pre is not None:
            pre.append((c, r))
        return F.relu(x), *interval_relu(c, r)
    if isinstance(module, Residual):
        xb, cb, rb = ibp_forward(module.branch, x, c, r, pre)
        xs, cs, rs = ibp_forward(module.shortcut, x, c, r, pre)
        return xb + xs, cb + cs, rb + rs  # Eq. (3) for a sum: lowers add, uppers add
    if isinstance(module, Normalize):
        c, r = module(c), r / module.std  # an affine map with positive scales 1/std
        if pre is not None:
            pre.append((c, r))
        return module(x), c, r
    if isinstance(module, (nn.Flatten, nn.Identity)):
        return module(x), module(c), module(r)
    raise TypeError(f'no interval rule for {type(module).__name__}')


def ibp_margins(model, x, y, eps, pre=None):
    # Clean logits, and lower bounds lb[n, j] of the margins z_y - z_j over the eps-box (Sec. 3.1;
    # lb is 0 at j = y). The margin matrix C, rows e_y - e_j, is folded into the last linear layer
    # (W' = C W, b' = C b, per example) before Eq. (3): tighter than subtracting logit bounds.
    h, c, r = ibp_forward(model[:-1], x, *input_box(x, eps), pre)
    last = model[-1]
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # (N, K, d): rows W_y - W_j
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    lb = (torch.bmm(w, c.unsqueeze(2)) - torch.bmm(w.abs(), r.unsqueeze(2))).squeeze(2) + b
    return last(h), lb


def verified(lb, y):
    # A sample is verified when the margin to every other class has a positive lower bound.
    return ((lb > 0) | F.one_hot(y, lb.shape[1]).bool()).all(1)


# ==== Rounding-sound IBP for certification =====================================================
# Float64 boxes (lo, hi) enclosing the exact real boxes of Eq. (3), which is monotone in its box.
U, TINY, INF = 2.0 ** -53, 2.0 ** -1074, torch.tensor(math.inf, dtype=torch.float64)


def up(v):
    # One correctly rounded op is off by at most half an ulp: the next float up bounds the exact
    # result from above.
    return torch.nextafter(v, INF)


def hull(*corners):
    # [min, max] of corners that are each one correctly rounded op, widened to the neighbouring
    # floats: it encloses the exact [min, max].
    v = torch.stack(torch.broadcast_tensors(*corners))
    return torch.nextafter(v.amin(0), -INF), up(v.amax(0))


def sound_affine(lo, hi, lin, w, b, n, rel=0.0):
    # Eq. (3) for z -> lin(z, w) + b, n products per output in any order (FMA or not): |fl(a.b) -
    # a.b| <= gamma_n |a|.|b| + n TINY, gamma_n = n U / (1 - n U). Exact W, b: w, b times 1 +- rel.
    c = (lo + hi) / 2  # any float: the radius covers [lo, hi]
    r = up(torch.maximum(hi - c, c - lo))
    cc = lin(c, w) + b  # exact W c + b = cc +- ((rel + gamma_{n+1}) (|w||c| + |b|) + n TINY)
    a = lin(r, w.abs())  # exact |W| r <= (1 + rel) |w| r; |w| r <= a + gamma_n |w| r + n TINY
    t = lin(c.abs() + r, w.abs()) + b.abs()  # T = |w|(|c|+r) + |b| <= (t + n TINY) / (1 - g_{n+2})
    # Summed, radius + centre error <= a + (rel + 2 gamma_{n+1}) T + 2n TINY <= a + k t + 3n TINY
    k = 2 * rel + 3 * (n + 2) * U  # >= (rel + 2 gamma_{n+1}) / (1 - gamma_{n+2}) as n U < 1e-3
    slack = up(k * t)  # each of the three ops that build the radius is rounded up
    r = up(up(a + slack) + 3 * n * TINY)
    return hull(cc - r, cc + r)


def sound_forward(m, lo, hi, boxes):  # ibp_forward's layers; `boxes` gets each Sequential's boxes
    if isinstance(m, nn.Sequential):
        for layer in m:
            lo, hi = sound_forward(layer, lo, hi, boxes)
            boxes.append((lo, hi))
        return lo, hi
    if isinstance(m, (nn.Conv2d, nn.Linear)):  # float32 -> float64 is exact
        w, b = m.weight.double(), (m.weight.new_zeros(1) if m.bias is None else m.bias).double()
        lin = F.linear  # z, w -> W z: the layer's own product, without its bias
        if isinstance(m, nn.Conv2d):
            lin = functools.partial(F.conv2d, stride=m.stride, padding=m.padding,
                                    dilation=m.dilation, groups=m.groups)
        return sound_affine(lo, hi, lin, w, b.view(-1, *[1] * (lo.dim() - 2)), w[0].numel())
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, Normalize)):  # t -> w (t - mean) + beta
        if isinstance(m, Normalize):  # w = 1 / std, beta = 0
            mean, beta = m.mean.double(), 0.0
            w_lo, w_hi = hull(1 / m.std.double())
        else:  # Sec. 3.3.2 in eval mode: w = gamma / sqrt(var + eps), the running statistics
            g, beta, mean, var = (p.double().view(-1, *[1] * (lo.dim() - 2))
                                  for p in (m.weight, m.bias, m.running_mean, m.running_var))
            q_lo, q_hi = hull(*(torch.sqrt(s) for s in hull(var + m.eps)))  # sqrt(var + eps)
            w_lo, w_hi = hull(g / q_lo, g / q_hi)  # q > 0: w = gamma / q is monotone in q
        lo, hi = hull(lo - mean, hi - mean)
        lo, hi = hull(w_lo * lo, w_lo * hi, w_hi * lo, w_hi * hi)  # an interval times an interval
        return hull(lo + beta, hi + beta)
    if isinstance(m, Residual):  # Eq. (3) for a sum: lowers add, uppers add
        (lb, hb), (ls, hs) = (sound_forward(s, lo, hi, boxes) for s in (m.branch, m.shortcut))
        return hull(lb + ls, hb + hs)
    if isinstance(m, (nn.ReLU, nn.Flatten, nn.Identity)):
        return m(lo), m(hi)  # monotone and exact on floats
    raise TypeError(f'no interval rule for {type(m).__name__}')


def sound_margins(model, x8, y, eps, boxes=None):
    # Margin lower bounds (as ibp_margins) that hold in exact arithmetic, for the float64 eps. C is
    # folded in: each row W_y - W_j is rounded once, the exact one is it times 1 +- U.
    lo, hi = hull(x8.double() / 255)
    lo, hi = (t.clamp(0, 1) for t in hull(lo - eps, hi + eps))
    lo, hi = sound_forward(model[:-1], lo, hi, [] if boxes is None else boxes)
    w, b = (p.double()[y][:, None] - p.double()[None] for p in (model[-1].weight, model[-1].bias))
    per_sample = functools.partial(torch.einsum, 'nd,nkd->nk')  # z, w -> each sample's W z
    return sound_affine(lo, hi, per_sample, w, b, w.shape[2], U)[0]


# ==== Models with BN after every affine layer (Sec. 3.3.2, Sec. 4.1) ==========================
def scaled(channels, width, factor=1):
    return max(1, round(channels * width * factor))


def conv_bn(cin, cout, k=3, stride=1, groups=1, bn=True):
    # [paper] Sec. 3.3.2: a BN after every convolution
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)
    return [conv, nn.BatchNorm2d(cout)] if bn else [conv]


def head(features, hidden, classes, bn=True):
    # Flatten -> Linear -> BN1d -> ReLU -> classifier: [paper] Sec. 3.3.2, a BN after the hidden
    # layer too; the classifier is never followed by BN.
    bn1d = [nn.BatchNorm1d(hidden)] if bn else []
    return [nn.Flatten(), nn.Linear(features, hidden), *bn1d, nn.ReLU(), nn.Linear(hidden, classes)]


def cnn7(shape, classes, width=1.0, bn='full'):
    # 5 convs (64, 64, 128 stride 2, 128, 128) + FC 512 + classifier. bn: 'full', 'conv' or
    # 'none', the ablation of Table 4. On 64x64 inputs the 5th conv has stride 2 too.
    c1, c2 = scaled(64, width), scaled(128, width)
    s5 = 2 if shape[1] >= 64 else 1
    layers = []
    convs = [(shape[0], c1, 1), (c1, c1, 1), (c1, c2, 2), (c2, c2, 1), (c2, c2, s5)]
    for cin, cout, stride in convs:
        layers += conv_bn(cin, cout, 3, stride, bn=bn != 'none') + [nn.ReLU()]
    features = c2 * (shape[1] // (2 * s5)) * (shape[2] // (2 * s5))
    return layers + head(features, scaled(512, width), classes, bn=bn == 'full')


def wide_resnet(shape, classes, width=1.0):
    # Stem 16, then one BasicBlock per stage (128, 256, 512; x1.25 on 64x64 inputs), FC 512 head.
    f = 1.25 if shape[1] >= 64 else 1
    cin = scaled(16, width)
    layers = conv_bn(shape[0], cin) + [nn.ReLU()]
    for cout, stride in [(scaled(128, width, f), 1), (scaled(256, width, f), 2),
                         (scaled(512, width, f), 2)]:
        branch = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(), *conv_bn(cout, cout))
        shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        layers += [Residual(branch, shortcut), nn.ReLU()]
        cin = cout
    features = cin * (shape[1] // 4) * (shape[2] // 4)
    return layers + head(features, scaled(512, width), classes)


def resnext(shape, classes, width=1.0):
    # Stem, then ResNeXt blocks of cardinality 2 with bottleneck widths doubling per stage
    # (one block per stage; on 64x64 inputs two, narrower), FC 512 head.
    stem, bottleneck, blocks = (16, 8, 2) if shape[1] >= 64 else (64, 32, 1)
    cin = max(2, round(stem * width))
    layers = conv_bn(shape[0], cin) + [nn.ReLU()]
    for stage, stage_stride in enumerate([1, 2, 2]):
        gw = 2 * scaled(bottleneck, width, 2 ** stage)  # cardinality 2 x bottleneck width
        for k in range(blocks):
            stride = stage_stride if k == 0 else 1
            branch = nn.Sequential(*conv_bn(cin, gw, 1), nn.ReLU(),
                                   *conv_bn(gw, gw, 3, stride, groups=2), nn.ReLU(),
                                   *conv_bn(gw, 2 * gw, 1))
            shortcut = nn.Identity()
            if cin != 2 * gw or stride != 1:  # a projection where the shape changes
                shortcut = nn.Sequential(*conv_bn(cin, 2 * gw, 1, stride))
            layers += [Residual(branch, shortcut), nn.ReLU()]
            cin = 2 * gw
    features = cin * (shape[1] // 4) * (shape[2] // 4)
    return layers + head(features, scaled(512, width), classes)


def build_model(cfg, info):
    # nn.Sequential(Normalize, ..., classifier): the last module is always the classifier.
    shape, k = info['shape'], info['classes']
    if cfg.model == 'cnn7':
        body = cnn7(shape, k, cfg.width, cfg.bn)
    elif cfg.model == 'wide_resnet':
        body = wide_resnet(shape, k, cfg.width)
    else:
        body = resnext(shape, k, cfg.width)
    model = nn.Sequential(Normalize(info['mean'], info['std']), *body)
    return ibp_init_(model) if cfg.ibp_init else model


# ==== [paper] IBP initialization, Sec. 3.3.1 and Eq. (6) =======================================
def fan_in(layer):
    return layer.weight[0].numel()  # n_i: in_features, or (in_channels / groups) * k * k


def ibp_init_(model):
    # Eq. (5) and Eq. (6): the difference gain E(Delta_i) / E(Delta_{i-1}) is n_i/2 E|W_i|, and for
    # W_i ~ N(0, sigma_i^2), E|W_i| = sqrt(2/pi) sigma_i. So sigma_i = sqrt(2 pi) / n_i gives a
    # gain of exactly 1. Every conv/linear weight is redrawn but the classifier's; biases and BN
    # keep their defaults. Residual calibration (the paper's appendix A.3, as in the authors'
    # release): a layer whose input is ReLU(branch + shortcut) sees about twice the width, so its
    # weights are halved.
    halve, mods = set(), list(model)
    for prev, m in zip(mods, mods[2:]):  # mods: ..., Residual, ReLU, Residual, ...
        if isinstance(prev, Residual) and isinstance(m, Residual):  # m's input is ReLU(sum)
            halve.update(id(layer) for layer in (m.branch[0], *list(m.shortcut.children())[:1]))
    affine = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in affine[:-1]:
            sigma = math.sqrt(2 * math.pi) / fan_in(m)  # Eq. (6) = 1
            m.weight.normal_(0, sigma / 2 if id(m) in halve else sigma)
    return model


# ==== [paper] Warmup regularizers, Sec. 3.3.3, Eq. (7) and Eq. (8) ============================
def min_ratio(p, q):
    # min(p/q, q/p), i.e. min(alpha, 1/alpha) for alpha = p/q, and finite when p or q is 0.
    return torch.minimum(p, q) / torch.maximum(p, q).clamp_min(DIV_GUARD)


def warmup_regularizers(pre, tau):
    # L_tightness, Eq. (7), and L_relu, Eq. (8), from the boxes of one IBP pass (pre[0]: the input
    # box; pre[1:]: the m boxes at the ReLU inputs). Each statistic pools the batch and all the
    # neurons of a layer. Also returns, for the log, every layer's fractions of active, inactive
    # and unstable neurons (Figure 2). Each ReLU(.) term lies in [0, tau], so L_tightness lies in
    # [0, 1] and L_relu, with two terms per layer, in [0, 2].
    delta0 = pre[0][1].mean()  # E(Delta_0); radii are half of Eq. (4)'s gaps, ratios the same
    tight, relu, counts = [], [], []
    for c, r in pre[1:]:
        delta = r.mean()  # E(Delta_i)
        tight.append(F.relu(tau - delta0 / delta.clamp_min(DIV_GUARD)))  # Eq. (7)
        # Eq. (8)'s indicators I(l > 0) and I(u < 0) (strict), constants to the gradient. As
        # max(sign, 0): compiled CPU code stores a bool mask far slower than a float (README).
        active = torch.sign(c - r).clamp_min(0).detach()
        inactive = torch.sign(-c - r).clamp_min(0).detach()
        d2 = (c - c.mean()).square()  # (c - E(c))^2
        # alpha_i and beta_i: contributions of active vs inactive neurons to E(c) and Var(c)
        alpha = min_ratio((c * active).sum(), -(c * inactive).sum())
        beta = min_ratio((d2 * active).sum(), (d2 * inactive).sum())
        n_active, n_inactive = active.sum(), inactive.sum()
        # A one-sided layer (all stable neurons active, or all inactive) has alpha = 0 or infinity,
        # so min(alpha, 1/alpha) = 0 and each term is tau: min_ratio gives 0 there. Only a layer
        # with neither kind has alpha = 0/0, undefined: it adds nothing.
        either = (n_active > 0) | (n_inactive > 0)
        relu.append(torch.where(either, F.relu(tau - alpha) + F.relu(tau - beta), 0))  # Eq. (8)
        counts.append(torch.stack([n_active, n_inactive]) / c.numel())
    m = len(pre) - 1
    l_tightness = torch.stack(tight).sum() / (tau * m)  # Eq. (7)
    l_relu = torch.stack(relu).sum() / (tau * m)  # Eq. (8)
    states = torch.stack(counts).detach()
    return l_tightness, l_relu, torch.cat([states, 1 - states.sum(1, keepdim=True)], 1)


# ==== Objective, Eq. (9) and Eq. (10), and schedules, Sec. 3.4 ================================
def robust_loss(lb):
    # Eq. (9) with IBP: cross-entropy of the logits [0, -lb_j (j != y)] with target 0, i.e.
    # mean log(1 + sum_{j != y} exp(-lb_j)); lb is 0 at j = y, so it is logsumexp(-lb).
    return torch.logsumexp(-lb, 1).mean()


def batch_loss(model, x, y, eps, lam, cfg):
    # The objective of one batch, Eq. (10), and detached statistics for the log. At eps = 0 the
    # data loss is the ordinary cross-entropy and the bounds use EPS_FLOOR, so that the
    # regularizers see a non-empty box; at any eps > 0, however small, the scheduled eps itself
    # and a purely robust loss, Eq. (9). One IBP pass gives the margins of Eq. (9) and the boxes
    # of Eq. (7) and Eq. (8).
    pre = []
    logits, lb = ibp_margins(model, x, y, eps if eps > 0 else EPS_FLOOR, pre)
    l_rob = F.cross_entropy(logits, y) if eps == 0 else robust_loss(lb)  # Eq. (9)
    optimized = lam > 0 and (cfg.reg_tightness or cfg.reg_relu)
    if not optimized:  # only logged: no graph for them
        pre = [(c.detach(), r.detach()) for c, r in pre]
    l_tightness, l_relu, relu = warmup_regularizers(pre, cfg.tau)
    loss = l_rob
    if optimized:  # [paper] Eq. (10); the switches are Table 4's ablations
        loss = l_rob + lam * (cfg.reg_tightness * l_tightness + cfg.reg_relu * l_relu)
    with torch.no_grad():
        stats = dict(loss=l_rob, l_tightness=l_tightness, l_relu=l_relu,
                     train_err=(logits.argmax(1) != y).float().mean(),
                     train_ver_err=(~verified(lb, y)).float().mean(), relu=relu,
                     nonfinite=torch.stack([~torch.isfinite(loss), ~torch.isfinite(lb).all()]))
    return loss, {k: v.detach().float() for k, v in stats.items()}


class Objective(nn.Module):
    # batch_loss as a module: DistributedDataParallel syncs the gradients of the work done inside
    # its wrapped forward, and torch.compile takes the whole bound-and-loss computation at once.
    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x, y, eps, lam):
        return batch_loss(self.model, x, y, eps, lam, self.cfg)


def eps_at(step, steps_per_epoch, eps_target, start, length):
    # The smoothed per-batch eps ramp of the authors' release: 0 until epoch `start`, then
    # a (b - init)^4 over the ramp's first quarter, which ends at eps_target / 13 with the slope of
    # the linear part that follows it up to eps_target; then eps_target.
    init, final = (start - 1) * steps_per_epoch, (start + length - 1) * steps_per_epoch
    if step <= init:
        return 0.0
    if step >= final:
        return eps_target
    mid = init + int(0.25 * (final - init))
    t = mid - init
    mid_eps = eps_target * t / (4 * (final - mid) + t)  # continuous slope at mid
    if step < mid:
        return mid_eps * ((step - init) / t) ** 4
    return mid_eps + (eps_target - mid_eps) * (step - mid) / (final - mid)


def lam_at(eps, eps_target, lam0):
    # Sec. 3.4: lambda decays from lambda_0 to 0 as eps grows.
    # lambda = lambda_0 (1 - eps / eps_target)
    return lam0 * (1 - eps / eps_target)


def lr_at(epoch, cfg):
    # Step decay: every milestone that the (1-based) epoch has passed multiplies the LR by lr_decay.
    return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.lr_milestones)


# ==============================================================================================
# Plumbing: config and CLI, device and data, evaluation, checkpoints and logs, certifying a saved
# model, the training loop with its distributed parts, and main.
# ==============================================================================================
class UserError(Exception):
    """Bad input, a missing resource or a diverged run: one line on stderr, exit code 2."""


def first_line(e):
    return f'{type(e).__name__}: {str(e).splitlines()[0]}' if str(e).strip() else type(e).__name__


def flag(default, help, **kw):  # a Config field and its --flag's help text
    return field(default=default, metadata=dict(help=help, **kw))


Opt, Ints = typing.Optional, typing.Tuple[int, ...]
# Dataset defaults (the paper's Sec. 4.1 and the authors' release). `schedules` maps a number of
# epochs to (eps_start, eps_length, LR milestones).
DATASETS = dict(
    cifar10=dict(eps=8 / 255, epochs=160, schedules={160: (2, 80, (120, 140)),
                                                     70: (2, 20, (50, 60))},
                 batch_size=128, accum_steps=1, lam0=0.5, pad=2, classes=10, shape=(3, 32, 32),
                 mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    mnist=dict(eps=0.4, epochs=70, schedules={70: (1, 20, (50, 60))}, batch_size=256, accum_steps=1,
               lam0=0.5, pad=0, classes=10, shape=(1, 28, 28), mean=(0.0,), std=(1.0,)),
    tinyimagenet=dict(eps=1 / 255, epochs=80, schedules={80: (2, 20, (61, 71))}, batch_size=128,
                      accum_steps=2, lam0=0.2, pad=4, classes=200, shape=(3, 64, 64),
                      mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
    synthetic=dict(eps=8 / 255, epochs=10, schedules={10: (2, 4, (8, 9))}, batch_size=64,
                   accum_steps=1, lam0=0.5, pad=0))
# Not in the paper: Fashion-MNIST with MNIST's schedule and the customary eps 0.1.
DATASETS['fashionmnist'] = dict(DATASETS['mnist'], eps=0.1)
SMOKE = dict(dataset='synthetic', model='cnn7', width=0.125, epochs=6, eps_start=2, eps_length=3,
             lr_milestones=(5,), batch_size=64, train_size=1024, test_size=256, lr=2e-3,
             eps=4 / 255, synthetic_shape=(3, 32, 32), pgd_steps=10)


@dataclass
class Config:  # every field is a --flag; None: the dataset's or the method's default (resolve)
    dataset: str = flag('cifar10', 'dataset', choices=list(DATASETS))
    model: str = flag('cnn7', 'model family', choices=['cnn7', 'wide_resnet', 'resnext'])
    method: str = flag('ours', 'ours: IBP init + regularizers', choices=['ours', 'vanilla'])
    bn: str = flag('full', 'CNN-7 BN (Table 4)', choices=['full', 'conv', 'none'])
    ibp_init: Opt[bool] = flag(None, '[paper] IBP init, Sec. 3.3.1 (default: on for ours)')
    reg_tightness: Opt[bool] = flag(None, '[paper] L_tightness, Eq. (7) (default: on for ours)')
    reg_relu: Opt[bool] = flag(None, '[paper] L_relu, Eq. (8) (default: on for ours)')
    eps: Opt[float] = flag(None, 'eps_target: L-inf radius in pixels [0, 1], train and test')
    epochs: Opt[int] = flag(None, 'total epochs')
    eps_start: Opt[int] = flag(None, 'first epoch of the eps ramp (1-based; eps = 0 before it)')
    eps_length: Opt[int] = flag(None, 'length of the eps ramp in epochs')
    lr: float = flag(5e-4, 'Adam learning rate')
    lr_decay: float = flag(0.2, 'LR factor at each milestone')
    lr_milestones: Opt[Ints] = flag(None, 'epochs after which the LR decays')
    batch_size: Opt[int] = flag(None, 'global batch size')
    accum_steps: Opt[int] = flag(None, 'gradient accumulation chunks per batch (BN per chunk)')
    grad_clip: float = flag(10.0, 'gradient-norm clipping')
    tau: float = flag(0.5, '[paper] tau, the tolerance of both regularizers, 0 < tau <= 1')
    lam0: Opt[float] = flag(None, '[paper] lambda_0, the initial regularizer weight of Eq. (10)')
    width: float = flag(1.0, 'width multiplier of every model (e.g. 0.125: a CPU-sized CNN-7)')
    seed: int = flag(0, 'random seed (init, batch order, augmentation, attack)')
    device: str = flag('auto', "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    data_dir: Opt[str] = flag(None, 'where datasets are found or downloaded to (default: data)')
    out_dir: Opt[str] = flag(None, 'output folder (default: runs/DATASET_MODEL_METHOD_sSEED)')
    resume: bool = flag(False, 'continue the run in --out-dir from its last.pt')
    train_size: int = flag(0, 'a fixed random subset of this many training images (0: all)')
    test_size: int = flag(0, 'a fixed random subset of this many test images (0: all)')
    val_size: int = flag(0, 'hold out this many training images to pick best.pt')
    synthetic_shape: Ints = flag((3, 32, 32), 'C H W of the synthetic dataset')
    synthetic_classes: int = flag(10, 'classes of the synthetic dataset')
    eval_checkpoint: Opt[str] = flag(None, 'certify this checkpoint: standard, PGD, verified error')
    pgd_steps: int = flag(20, 'PGD steps of the final attack (0: no attack)')
    pgd_restarts: int = flag(1, 'PGD random restarts of the final attack')
    tf32: bool = flag(True, 'TF32 matmuls/convolutions in training on CUDA (never to certify)')
    channels_last: Opt[bool] = flag(None, 'channels-last memory format (default: on for CUDA)')
    compile: bool = flag(False, 'torch.compile the bounds and the loss (20-40 s to compile)')
    progress: Opt[bool] = flag(None, 'progress line with ETA (default: when stdout is a terminal)')
    dist_timeout: int = flag(600, 'torchrun: seconds a rank waits for the others, then fails')
    smoke: bool = flag(False, 'preset: synthetic data, narrow CNN-7, 6 epochs (CPU, seconds)')


def dataset_info(cfg):
    info = dict(DATASETS[cfg.dataset])
    if cfg.dataset == 'synthetic':
        c = cfg.synthetic_shape[0]
        info.update(classes=cfg.synthetic_classes, shape=tuple(cfg.synthetic_shape),
                    mean=(0.5,) * c, std=(0.25,) * c)
    return info


def resolve(cfg):
    # Fill every None default from the dataset table and the method, then validate: one place.
    info = dataset_info(cfg)
    for k in ('eps', 'epochs', 'batch_size', 'accum_steps', 'lam0'):
        if getattr(cfg, k) is None:
            setattr(cfg, k, info[k])
    schedule = info['schedules'].get(cfg.epochs, info['schedules'][info['epochs']])
    for k, v in zip(('eps_start', 'eps_length', 'lr_milestones'), schedule):
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    cfg.lr_milestones = tuple(cfg.lr_milestones)
    for k in ('ibp_init', 'reg_tightness', 'reg_relu'):  # the [paper] contributions: on for ours
        if getattr(cfg, k) is None:
            setattr(cfg, k, cfg.method == 'ours')
    if cfg.dataset == 'synthetic':
        cfg.train_size, cfg.test_size = cfg.train_size or 4096, cfg.test_size or 1024
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join('runs', f'{cfg.dataset}_{cfg.model}_{cfg.method}_s{cfg.seed}')
    cfg.data_dir = os.path.abspath(cfg.data_dir or 'data')  # --eval-checkpoint from elsewhere
    return check(cfg)


def check(cfg):
    # Every value, where it is parsed: one line naming the flag and exit 2, rather than a run that
    # can only diverge or a traceback deep inside it. Unresolved (None) values are skipped.
    for f in dataclasses.fields(Config):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f'--{f.name.replace("_", "-")} must be a finite number (got {v})')
    # --eval-checkpoint checks its flags unresolved (the checkpoint fills them in later), so a
    # count still None passes as 1; a 0 given on the command line does not.
    counts = {}
    for k in ('epochs', 'eps_start', 'eps_length', 'batch_size', 'accum_steps'):
        counts[k] = 1 if getattr(cfg, k) is None else getattr(cfg, k)
    epochs, start, length = counts['epochs'], counts['eps_start'], counts['eps_length']
    batch, accum, milestones = counts['batch_size'], counts['accum_steps'], cfg.lr_milestones or ()
    ramp_end, shape = start + length - 1, cfg.synthetic_shape
    for ok, msg in [
        (cfg.eps is None or 0 < cfg.eps <= 1, f'--eps must be in (0, 1], pixels (got {cfg.eps})'),
        (epochs >= 1, f'--epochs must be >= 1 (got {cfg.epochs})'),
        (min(start, length) >= 1, '--eps-start and --eps-length must be >= 1'),
        (ramp_end <= epochs, f'the eps ramp (epochs {cfg.eps_start}..{ramp_end}) is longer than '
         f'the run ({cfg.epochs} epochs): set --eps-start/--eps-length'),
        (all(1 <= m <= epochs for m in milestones), f'--lr-milestones must lie in 1..{epochs}, '
         f'the run (got {" ".join(map(str, milestones))})'),
        (batch >= 1 and accum >= 1 and batch % accum == 0,
         '--batch-size must be a positive multiple of --accum-steps'),
        (0 < cfg.tau <= 1, f'--tau must be in (0, 1] (got {cfg.tau})'),
        ((cfg.lam0 or 0) >= 0, f'--lam0 must be >= 0 (got {cfg.lam0})'),
        (cfg.lr > 0 and cfg.lr_decay > 0, '--lr and --lr-decay must be > 0'),
        (cfg.grad_clip > 0, f'--grad-clip must be > 0 (got {cfg.grad_clip})'),
        (0 < cfg.width <= 16, f'--width must be in (0, 16] (got {cfg.width})'),
        (min(cfg.train_size, cfg.test_size, cfg.val_size) >= 0,
         '--train-size, --test-size and --val-size must be >= 0'),
        (cfg.pgd_steps >= 0 and cfg.pgd_restarts >= 1,
         '--pgd-steps must be >= 0 and --pgd-restarts >= 1'),
        (cfg.dist_timeout >= 1, '--dist-timeout must be >= 1 second'),
        (cfg.out_dir != '', '--out-dir must not be empty'),
        (cfg.model == 'cnn7' or cfg.bn == 'full',
         '--bn conv/none is the CNN-7 ablation (Table 4); residual models have full BN'),
        (len(shape) == 3 and min(shape) >= 1 and shape[1] % 4 == 0 and shape[2] % 4 == 0,
         '--synthetic-shape must be C H W with H and W multiples of 4'),
        (cfg.synthetic_classes >= 2, '--synthetic-classes must be >= 2')]:
        if not ok:
            raise UserError(msg)
    return cfg


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage text
        raise UserError(message)


def parse_args(argv=None):
    # Only the flags given on the command line land in the namespace (SUPPRESS), so that --smoke
    # fills exactly the others and Config's defaults the rest.
    p = Parser(description='Fast certified robust training with short warmup (Shi et al. 2021).',
               argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        t = f.type
        if typing.get_origin(t) is typing.Union:  # Optional[T] -> T
            t = typing.get_args(t)[0]
        default = '' if f.default is None else f' (default: {f.default})'
        kw = dict(help=f.metadata['help'] + default, choices=f.metadata.get('choices'), type=t)
        if t is bool:  # --flag / --no-flag
            kw = dict(help=kw['help'], action=argparse.BooleanOptionalAction)
        elif typing.get_origin(t) is tuple:  # e.g. --lr-milestones 50 60
            kw.update(nargs='+', type=int)
        p.add_argument('--' + f.name.replace('_', '-'), **kw)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}
    return Config(**{**(SMOKE if given.get('smoke') else {}), **given})


# ---- Device and data: whole datasets as uint8 tensors on the training device -----------------
def setup_device(cfg):
    name = cfg.device
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':  # torchrun sets LOCAL_RANK: one GPU per process
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f'--device {cfg.device}: {first_line(e)}') from None
    if cfg.channels_last is None:  # cuDNN's preferred layout; on the CPU no faster when narrow
        cfg.channels_last = dev.type == 'cuda'
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # training only: never to certify
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = True
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    return dev


def synthetic_images(n, shape, classes, seed):
    # A deterministic learnable dataset: one smooth random prototype per class plus pixel noise.
    g = torch.Generator().manual_seed(1234)  # the same prototypes for train and test
    c, h, w = shape
    protos = F.interpolate(torch.rand(classes, c, 4, 4, generator=g), size=(h, w),
                           mode='bilinear', align_corners=False)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.15 * torch.randn(n, c, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@contextlib.contextmanager
def quiet():  # torchvision's download messages would break the one-line output
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        yield


def tinyimagenet_data(root):
    # The official tiny-imagenet-200 folder (train/WNID/images/*.JPEG, val/images/*.JPEG and
    # val/val_annotations.txt; labels in wnids.txt's line order), decoded once into a uint8 cache
    # beside it, which loads without unpickling code (weights_only).
    base = os.path.join(root, 'tiny-imagenet-200')
    cache = os.path.join(base, 'uint8_tensors.pt')
    if os.path.exists(cache):
        try:
            (x, y), (xv, yv) = torch.load(cache, weights_only=True)
            assert x.dtype == xv.dtype == torch.uint8 and len(x) == len(y) and len(xv) == len(yv)
            return (x, y), (xv, yv)
        except Exception:
            raise UserError(f'{cache} is not a cache of this script: delete it to rebuild it')
    if not os.path.isdir(base):
        with quiet():
            torchvision.datasets.utils.download_and_extract_archive(
                'http://cs231n.stanford.edu/tiny-imagenet-200.zip', root)
    load = torchvision.datasets.folder.pil_loader  # an RGB PIL image
    to_tensor = torchvision.transforms.functional.pil_to_tensor  # uint8, C H W
    try:
        with open(os.path.join(base, 'wnids.txt')) as f:
            label = {w: i for i, w in enumerate(f.read().split())}
        with open(os.path.join(base, 'val', 'val_annotations.txt')) as f:
            val = [line.split('\t')[:2] for line in f if line.strip()]
        files = [[(os.path.join(base, 'train', w, 'images', name), label[w]) for w in label
                  for name in sorted(os.listdir(os.path.join(base, 'train', w, 'images')))],
                 [(os.path.join(base, 'val', 'images', name), label[w]) for name, w in val]]
        data = [(torch.stack([to_tensor(load(p)) for p, _ in part]),
                 torch.tensor([y for _, y in part])) for part in files]
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f'{base} is not a complete tiny-imagenet-200 folder '
                        f'({first_line(e)})') from None
    atomic_save(data, cache)
    return data


def read_dataset(name, root, download=True):
    # ((x, y), (x, y)): the uint8 train and test images of a real dataset, and their labels;
    # torchvision's datasets are downloaded (and MD5-checked) if absent and `download`.
    socket.setdefaulttimeout(60)  # a download that hangs fails instead
    tvd = torchvision.datasets
    where = dict(tinyimagenet='tiny-imagenet-200/', cifar10='cifar-10-batches-py/',
                 mnist='MNIST/raw/', fashionmnist='FashionMNIST/raw/')[name]
    # A file that is there but does not load is corrupt; one that a download had to fetch was
    # missing. The two need different advice, so the message says which.
    tried = False
    try:
        if name == 'tinyimagenet':
            return tinyimagenet_data(root)
        cls = dict(mnist=tvd.MNIST, fashionmnist=tvd.FashionMNIST, cifar10=tvd.CIFAR10)[name]
        out = []
        for train in (True, False):
            try:
                with quiet():
                    ds = cls(root, train=train, download=False)
            except RuntimeError as e:  # torchvision's "Dataset not found" when files are absent
                if 'not found' not in str(e) or not download:
                    raise
                tried = True
                with quiet():
                    ds = cls(root, train=train, download=True)
            x = torch.as_tensor(ds.data)
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC
            out.append((x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
        return out
    except UserError:
        raise
    except Exception as e:
        folder = os.path.join(os.path.abspath(root), where)
        if tried or 'not found' in str(e) or not os.path.isdir(folder):
            how = 'and could not be downloaded' if download else '(not downloaded here)'
            raise UserError(f'{name} is not in {os.path.abspath(root)} {how} '
                            f'({type(e).__name__}); put {where} there or pass --data-dir') from None
        raise UserError(f'{name}: the files in {folder} are corrupt ({first_line(e)}): delete '
                        'them to download them again') from None


def load_data(cfg, device):
    # dict(train=(x, y), val=(x, y) or None, test=(x, y)): uint8 images and labels on `device`.
    if cfg.dataset == 'synthetic':
        shape, k = tuple(cfg.synthetic_shape), cfg.synthetic_classes
        train = synthetic_images(cfg.train_size + cfg.val_size, shape, k, 1)
        test = synthetic_images(cfg.test_size, shape, k, 2)
    else:
        train, test = read_dataset(cfg.dataset, cfg.data_dir, download=not cfg.eval_checkpoint)
    n_train, n_test = len(train[1]), len(test[1])
    if cfg.val_size + max(cfg.train_size, 1) > n_train:
        raise UserError(f'--val-size {cfg.val_size} and --train-size {cfg.train_size}: more than '
                        f'the {n_train} training images of {cfg.dataset}')
    if cfg.test_size > n_test:
        raise UserError(f'--test-size {cfg.test_size}: more than the {n_test} test images of '
                        f'{cfg.dataset}')
    g = torch.Generator().manual_seed(0)  # fixed subsets and split, the same for every seed
    perm = torch.randperm(len(train[1]), generator=g)
    val_idx, train_idx = perm[:cfg.val_size], perm[cfg.val_size:][:cfg.train_size or None]
    test_idx = torch.arange(len(test[1]))  # the whole test set, in its order
    if cfg.test_size:
        test_idx = torch.randperm(len(test[1]), generator=g)[:cfg.test_size]
    # Whole datasets live on the device as uint8 (CIFAR-10: 150 MB): no loader processes
    out = dict(train=(train, train_idx), val=(train, val_idx), test=(test, test_idx))
    for key, ((x, y), idx) in out.items():
        out[key] = (x[idx].to(device), y[idx].to(device)) if len(idx) else None
    return out


def augment(x, pad, gen):
    # Random horizontal flip and random crop with edge padding, for a whole batch on its device.
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5  # gen lives on x's device
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=gen, device=x.device)
    xp = F.pad(x, (pad,) * 4, mode='replicate')
    rows, cols = oy + torch.arange(h, device=x.device), ox + torch.arange(w, device=x.device)
    idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w)
    return xp.flatten(2).gather(2, idx.expand(n, c, h * w)).view(n, c, h, w)


def to_input(x, cfg):  # pixels in [0, 1], in the memory layout the convolutions prefer
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


# ---- Evaluation: standard, PGD and IBP-verified error, in full float32 (sound re-check) ------
@contextlib.contextmanager
def full_fp32():
    # Certification never uses TF32: its 10-bit mantissa would make the bounds unsound.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pgd_margin(model, x, y, eps, steps, restarts, gen):
    # The smallest margin z_y - max_{j != y} z_j that L-inf PGD finds inside the clipped box: an
    # upper bound of the true smallest margin, so it must never beat a verified lower bound.
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    best = None
    for _ in range(restarts):
        xa = lo + (up - lo) * torch.rand(x.shape, generator=gen).to(x.device)
        for i in range(steps + 1):
            xa.requires_grad_(True)
            z = model(xa)
            other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)
            margin = z.gather(1, y[:, None]).squeeze(1) - other
            best = margin.detach() if best is None else torch.minimum(best, margin.detach())
            if i == steps:
                break
            g, = torch.autograd.grad(margin.sum(), xa)
            xa = torch.minimum(torch.maximum(xa.detach() - 2.5 * eps / steps * g.sign(), lo), up)
    return best


def evaluate(model, data, eps, batch_size=256, pgd_steps=0, pgd_restarts=1, seed=0,
             recheck=False):
    # Standard, PGD and IBP-verified error of `data` in eval mode at `eps`. With recheck, a sample
    # float32 IBP verifies counts only if sound_margins verifies it too; ver_changed: overturned.
    model.eval()
    model64 = copy.deepcopy(model).cpu().double().requires_grad_(False) if recheck else None
    x_all, y_all = data
    sums, gen = torch.zeros(4, device=y_all.device), torch.Generator().manual_seed(seed)
    with full_fp32():
        for i in range(0, len(y_all), batch_size):
            x8, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            x = x8.float() / 255
            with torch.no_grad():
                logits, lb = ibp_margins(model, x, y, eps)
            ver, wrong = verified(lb, y), logits.argmax(1) != y
            changed = y.new_zeros(())
            if recheck and ver.any():  # only a verified sample can lose its verdict
                v = ver.nonzero().squeeze(1)
                ok = verified(sound_margins(model64, x8[v].cpu(), y[v].cpu(), eps), y[v].cpu())
                ok = ok.to(ver.device)
                ver[v] = ok  # verified only if the sound pass agrees
                changed = (~ok).sum()
            # A real attack inside the box: it may never beat a margin that IBP verified.
            attacked = wrong.clone()
            if pgd_steps and eps > 0:
                with torch.enable_grad():
                    margin = pgd_margin(model, x, y, eps, pgd_steps, pgd_restarts, gen)
                if (ver & (margin < -ATTACK_TOL * (1 + logits.abs().amax(1)))).any():
                    raise RuntimeError('PGD broke a sample counted as verified: unsound bounds')
                attacked |= margin <= 0
            sums += torch.stack([wrong.sum(), attacked.sum(), (~ver).sum(), changed]).float()
    std, pgd, ver, changed = (sums / len(y_all)).tolist()
    return dict(std_err=std, pgd_err=pgd if pgd_steps and eps > 0 else None, ver_err=ver,
                ver_changed=round(changed * len(y_all)))


# ---- Checkpoints and logs: atomic writes, so a crash or Ctrl-C never leaves a broken file -----
RUN_FILES = ('log.jsonl', 'last.pt', 'best.pt', 'metrics.json')  # a folder with one is a run's


# Each write below replaces a whole file; the log too is rewritten whole each epoch (a few hundred
# kB at most), so no file is ever appended to and half of a record can never reach the disk.
def atomic_save(obj, path):
    # A checkpoint (.pt), a JSON file or a list of log records (.jsonl), written to a temporary
    # file and renamed over `path`: atomic on POSIX, so the old file stays whole until the new one
    # is. A failed write (disk full, read-only, ...) leaves no temporary file and is one line.
    if path.endswith('.jsonl'):
        data = ''.join(json.dumps(r) + '\n' for r in obj).encode()
    elif path.endswith('.json'):
        data = json.dumps(obj, indent=2).encode()
    else:
        buf = io.BytesIO()  # torch.save reports a full disk cryptically; a plain write does not
        torch.save(obj, buf)
        data = buf.getvalue()
    tmp = f'{path}.{os.getpid()}.tmp'  # concurrent writers (torchrun ranks) never share it
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None
    finally:
        with contextlib.suppress(OSError):  # gone after the rename; else a half-written file
            os.remove(tmp)


def read_checkpoint(path, device):
    # A checkpoint holds tensors and plain values only, so it loads with weights_only=True:
    # unpickling a downloaded file can then run no code. Anything else is one clear line.
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file (a folder names none)')
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: one line only
            warnings.simplefilter('ignore')
            ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = f'is not a readable checkpoint ({first_line(e)})'
        if 'Weights only load failed' in str(e):
            why = 'holds Python objects, refused: unpickling them could run code'
        raise UserError(f'{path} {why}') from None
    if not isinstance(ck, dict) or not isinstance(ck.get('config'), dict) or 'model' not in ck:
        raise UserError(f'{path} is not a checkpoint of this script (no model and config)')
    unknown = set(ck['config']) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise UserError(f'{path} is from an incompatible version ({sorted(unknown)})')
    return ck


def load_state(path, module, state):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f'{path} does not fit this model ({first_line(e)})') from None


# The flags that may differ between a run and its --resume: none of them changes the training.
RUNTIME_FIELDS = {'resume', 'device', 'data_dir', 'out_dir', 'epochs', 'eval_checkpoint',
                  'compile', 'tf32', 'channels_last', 'pgd_steps', 'pgd_restarts', 'smoke',
                  'progress', 'dist_timeout'}


def read_log(path, epochs):
    # The records of epochs 1..epochs of log.jsonl. The log is saved just before last.pt, so it
    # may hold one record more (a kill between the two), which is dropped; a torn, foreign or
    # missing record is an error naming its line, never a silent drop.
    lines = open(path, 'rb').read().splitlines() if os.path.exists(path) else []
    records = []
    for n, line in enumerate(lines[:epochs + 1], 1):
        try:
            rec = json.loads(line)
        except ValueError:  # not JSON, or not even UTF-8
            rec = None
        if not isinstance(rec, dict) or rec.get('epoch') != n:
            raise UserError(f'--resume: {path}, line {n}: not the record of epoch {n}')
        records.append(rec)
    if len(records) < epochs or len(lines) > epochs + 1:
        raise UserError(f'--resume: {path} holds {len(lines)} records, but last.pt {epochs} '
                        'epochs')
    return records[:epochs]


def load_checkpoint(cfg, model, opt, dev):
    # A fresh run needs a folder without run files; --resume continues OUT_DIR/last.pt. Returns
    # (first epoch to run, the log's records so far, best validation error, wall seconds).
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    path = os.path.join(cfg.out_dir, 'last.pt')
    if not cfg.resume:
        if held:
            raise UserError(f'{cfg.out_dir} already holds a run ({", ".join(held)}): add --resume '
                            'to continue it, or choose another --out-dir')
        return 1, [], float('inf'), 0.0
    if not os.path.exists(path):
        raise UserError(f'--resume: no checkpoint at {path}: nothing was saved to continue')
    ck = read_checkpoint(path, dev)
    missing = {'optimizer', 'epoch', 'best', 'wall'} - set(ck)  # best.pt, say, cannot resume
    if missing:
        raise UserError(f'--resume: {path} is not a last.pt (no {", ".join(sorted(missing))})')
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the saved one
    saved = json.loads(json.dumps(ck['config']))
    diff = [k for k, v in saved.items() if k not in RUNTIME_FIELDS and v != now.get(k)]
    if diff:
        raise UserError(f'--resume: {path} is from a run with other values of: ' + ', '.join(diff))
    # The log must hold exactly the checkpoint's epochs: a resumed run continues both.
    records = read_log(os.path.join(cfg.out_dir, 'log.jsonl'), ck['epoch'])
    load_state(path, model, ck['model'])
    load_state(path, opt, ck['optimizer'])
    return ck['epoch'] + 1, records, ck['best'], ck['wall']


def eval_checkpoint(cfg):
    # --eval-checkpoint: certify a saved model at its eps_target (or --eps), with its own config
    # and data folder (unless --data-dir is given); nothing is downloaded or written.
    dev = setup_device(check(cfg))
    ck = read_checkpoint(cfg.eval_checkpoint, dev)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in ck['config'].items()}
    saved = dataclasses.replace(Config(**config), device=cfg.device,
                                data_dir=cfg.data_dir or config['data_dir'] or 'data',
                                test_size=cfg.test_size or config['test_size'],
                                eval_checkpoint=cfg.eval_checkpoint, channels_last=False,
                                compile=False)
    model = build_model(saved, dataset_info(saved)).to(dev)
    load_state(cfg.eval_checkpoint, model, ck['model'])
    data = load_data(dataclasses.replace(saved, train_size=1, val_size=0), dev)
    eps = cfg.eps if cfg.eps is not None else saved.eps
    res = evaluate(model, data['test'], eps, pgd_steps=cfg.pgd_steps,
                   pgd_restarts=cfg.pgd_restarts, seed=cfg.seed, recheck=True)
    print(json.dumps(dict(checkpoint=cfg.eval_checkpoint, epoch=ck.get('epoch'), eps=eps, **res)))
    return res


# ---- What a run prints: the epoch line, progress and ETA, divergence --------------------------
def format_record(r):  # the fixed-format epoch line
    return (f"ep {r['epoch']:3d} | eps {r['eps']:.5f} lam {r['lam']:.3f} lr {r['lr']:.1e} | "
            f"loss {r['loss']:.4f} Ltight {r['l_tightness']:.4f} Lrelu {r['l_relu']:.4f} | "
            f"relu act {r['active']:.2f} inact {r['inactive']:.2f} unst {r['unstable']:.2f} | "
            f"train err {r['train_err']:.4f} ver {r['train_ver_err']:.4f} | "
            f"test err {r['test_err']:.4f} ver {r['test_ver_err']:.4f} | "
            f"{r['img_per_s']:7.1f} img/s {r['seconds']:6.1f} s")


def hms(seconds):
    return f'{int(seconds // 3600)}:{time.strftime("%M:%S", time.gmtime(seconds))}'


PROGRESS_AFTER, PROGRESS_EVERY = 10, 5  # seconds: the progress line, in long epochs only
LONG_CPU_RUN = 3 * 3600  # seconds: a CPU run longer than this is worth a note


def progress(cfg, dev, epoch, i, steps, t0, clock):
    # After step i, the time left in the epoch and in the run (on a terminal), and once a note
    # when a CPU run would take hours. clock: when the line was last shown, whether the note was
    # given, the seconds of the last whole epoch (None in the first).
    now = time.time()
    if now - t0 < PROGRESS_AFTER or now - clock['shown'] < PROGRESS_EVERY:
        return
    per_step = (now - t0) / (i + 1)
    left = per_step * (steps - i - 1)
    left_run = left + (clock['epoch_s'] or per_step * steps) * (cfg.epochs - epoch)
    if dev.type == 'cpu' and left_run > LONG_CPU_RUN and not clock['warned']:
        print(f'note: this run takes about {hms(left_run + now - t0)} at this speed on the CPU; '
              'try --smoke, or less: --width 0.25 --train-size 10000', flush=True)
        clock['warned'] = True
    if cfg.progress:
        print(f'\r  ep {epoch} batch {i + 1}/{steps} | {cfg.batch_size / per_step:.1f} img/s | '
              f'epoch left {hms(left)} | run left {hms(left_run)}  ', end='', flush=True)
    clock['shown'] = now


def check_finite(flags, epoch, steps, cfg):
    # flags[step]: whether the step's loss, margin bounds or gradient norm were not finite. Stops
    # the run before the epoch is logged or saved.
    bad = flags.any(1).nonzero()
    if len(bad):
        step = bad[0, 0].item()
        what = ['loss', 'margin bound', 'gradient norm'][flags[step].nonzero()[0, 0].item()]
        eps = eps_at((epoch - 1) * steps + step, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
        kept = f'last.pt keeps epoch {epoch - 1}' if epoch > 1 else 'no epoch was saved'
        raise UserError(f'training diverged at epoch {epoch}, step {step + 1} (eps {eps:.5f}): '
                        f'non-finite {what}; {kept} (try a lower --lr)')


# ---- Distributed (torchrun): process group, reductions, and which rank writes -----------------
def setup_distributed(dev, cfg):
    # Under torchrun (WORLD_SIZE > 1): a process per device on torch.distributed. -> (rank, world)
    # A rank that waits longer than --dist-timeout for the others (one froze or died) fails.
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():  # NCCL between GPUs, Gloo between CPU processes
        timeout = datetime.timedelta(seconds=cfg.dist_timeout)
        torch.distributed.init_process_group('nccl' if dev.type == 'cuda' else 'gloo',
                                             timeout=timeout)
    return torch.distributed.get_rank(), world


def all_reduce(tensors, world):
    # The epoch's sums over all ranks (each rank trained on its shard of every batch).
    if world > 1:
        for v in tensors:
            torch.distributed.all_reduce(v)


# ---- Training loop, on one device or several ---------------------------------------------------
def prepare(cfg, dev, info, world=1):
    # The model, its Adam optimizer, and the Objective that training calls (DDP, compiled).
    torch.manual_seed(cfg.seed)
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = build_model(cfg, info).to(dev, memory_format=layout)
    # DDP and torch.compile wrap the Objective: the bounds, the regularizers and the loss.
    objective = Objective(model, cfg)
    if world > 1:  # gradients averaged over ranks; BN statistics per rank, as per chunk
        ids = [dev] if dev.type == 'cuda' else None
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
    fused = dev.type in ('cpu', 'cuda')  # Adam in one kernel per parameter, not about ten
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused)
    return model, opt, torch.compile(objective) if cfg.compile else objective


def train_step(objective, opt, x, y, eps, lam, cfg):
    # One optimizer step over a batch split into cfg.accum_steps chunks. Returns the chunks' mean
    # statistics and `nonfinite`, whether the loss, the margin bounds or the gradient norm were
    # not finite: checked once an epoch, as a sync here would stall the GPU every step.
    opt.zero_grad(set_to_none=True)
    chunks = list(zip(x.tensor_split(cfg.accum_steps), y.tensor_split(cfg.accum_steps)))
    total = {}
    for xc, yc in chunks:
        loss, stats = objective(xc, yc, eps, lam)
        (loss / len(chunks)).backward()
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v / len(chunks)
    norm = nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
    opt.step()
    total['nonfinite'] = torch.cat([total['nonfinite'], (~torch.isfinite(norm)).float()[None]])
    return total


def train_epoch(epoch, model, opt, objective, data, info, cfg, dev, rank, world, clock):
    # One epoch of Sec. 3.4's schedule: the epoch's LR, then per batch eps on the smoothed ramp,
    # lambda (nonzero only in the warmup: the regularizers' whole job) and the step.
    # -> (the last batch's eps and lambda, the epoch's mean statistics, the batches' flags)
    model.train()
    opt.param_groups[0]['lr'] = lr_at(epoch, cfg)  # Sec. 3.4: step decay per epoch
    x_train, y_train = data['train']
    n, bs, t0 = len(y_train), cfg.batch_size, time.time()
    tail = n % bs  # a last batch too small to give every rank and chunk a sample is dropped
    steps = n // bs if 0 < tail < world * cfg.accum_steps else math.ceil(n / bs)
    ramp_end = cfg.eps_start + cfg.eps_length - 1
    gen = torch.Generator(dev).manual_seed(cfg.seed * 100_003 + epoch)  # the epoch's seed
    perm = torch.randperm(n, generator=gen, device=dev)  # drawn on the device: no host sync
    sums, flags = {}, []
    for i in range(steps):
        eps = eps_at((epoch - 1) * steps + i, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
        lam = 0.0
        if (cfg.reg_tightness or cfg.reg_relu) and epoch <= ramp_end:  # [paper] Sec. 3.4
            lam = lam_at(eps, cfg.eps, cfg.lam0)
        idx = perm[i * bs:(i + 1) * bs]
        x = x_train[idx].float() / 255
        if info['pad']:  # the epoch's own generator: a resumed run repeats the augmentation
            x = augment(x, info['pad'], gen)
        x = to_input(x, cfg).tensor_split(world)[rank]  # torchrun: this rank's shard
        y = y_train[idx].tensor_split(world)[rank]
        stats = train_step(objective, opt, x, y, eps, lam, cfg)
        flags.append(stats.pop('nonfinite'))
        for k, v in stats.items():  # summed on the device: no host sync inside the epoch
            sums[k] = sums.get(k, 0) + v * len(y)
        if rank == 0:
            progress(cfg, dev, epoch, i, steps, t0, clock)
    flags = torch.stack(flags)
    all_reduce([flags, *sums.values()], world)  # torchrun: the sums over all ranks
    check_finite(flags.cpu() > 0, epoch, steps, cfg)  # before anything is saved
    if cfg.progress and clock['shown'] > t0:
        print('\r' + ' ' * 100 + '\r', end='')  # clear the progress line
    seen = min(n, steps * bs)
    sums = {k: (v / seen).tolist() for k, v in sums.items()}
    return eps, lam, dict(sums, img_per_s=seen / (time.time() - t0))


def epoch_record(epoch, eps, lam, stats, model, data, cfg, best):
    # Evaluate, and the epoch's log record; best.pt by validation, never by the test set.
    # -> (record, best validation verified error so far)
    test = evaluate(model, data['test'], eps)  # float32 at the current eps (the final: below)
    states = torch.tensor(stats['relu'], dtype=torch.float64).mean(0).tolist()
    rec = dict(epoch=epoch, eps=eps, lam=lam, lr=lr_at(epoch, cfg), loss=stats['loss'],
               l_tightness=stats['l_tightness'], l_relu=stats['l_relu'],
               train_err=stats['train_err'], train_ver_err=stats['train_ver_err'],
               **dict(zip(['active', 'inactive', 'unstable'], states)),
               relu_per_layer=stats['relu'], test_err=test['std_err'],
               test_ver_err=test['ver_err'], img_per_s=stats['img_per_s'])
    if data['val'] is not None:
        val = evaluate(model, data['val'], cfg.eps)
        rec.update(val_err=val['std_err'], val_ver_err=val['ver_err'])
        if epoch >= cfg.eps_start + cfg.eps_length - 1 and val['ver_err'] < best:
            best = val['ver_err']
            atomic_save(dict(model=model.state_dict(), config=dataclasses.asdict(cfg),
                             epoch=epoch), os.path.join(cfg.out_dir, 'best.pt'))
    return rec, best


def final_evaluation(model, data, cfg, dev, world, wall):
    # The result: PGD as a check on the bounds, and the rounding-sound re-check of the verdicts.
    final = evaluate(model, data['test'], cfg.eps, pgd_steps=cfg.pgd_steps,
                     pgd_restarts=cfg.pgd_restarts, seed=cfg.seed, recheck=True)
    metrics = dict(final_epoch=cfg.epochs, eps=cfg.eps, **final, test_size=len(data['test'][1]),
                   wall_seconds=wall, device=str(dev), world_size=world,
                   config=dataclasses.asdict(cfg))
    atomic_save(metrics, os.path.join(cfg.out_dir, 'metrics.json'))
    pgd = '' if final['pgd_err'] is None else f" PGD error {final['pgd_err']:.4f} |"
    print(f"final (epoch {cfg.epochs}, eps {cfg.eps:.5f}): standard error {final['std_err']:.4f}"
          f" |{pgd} verified error {final['ver_err']:.4f} | {wall:.1f} s | "
          f"{cfg.out_dir}/metrics.json")
    return metrics


def train(cfg):
    dev = setup_device(cfg)
    rank, world = setup_distributed(dev, cfg)
    if cfg.progress is None:
        cfg.progress = sys.stdout.isatty()
    info, data = dataset_info(cfg), load_data(cfg, dev)
    model, opt, objective = prepare(cfg, dev, info, world)
    start, records, best, wall = load_checkpoint(cfg, model, opt, dev)
    # The folder is made only now, after every check passed: a refused run writes nothing.
    if rank == 0:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:  # a file of that name, a read-only parent, ...
            raise UserError(f'--out-dir {cfg.out_dir}: cannot make this folder ({e.strerror})')
        for name in os.listdir(cfg.out_dir):  # temporary files of a killed run of this folder
            if name.endswith('.tmp') and any(name.startswith(f + '.') for f in RUN_FILES):
                os.remove(os.path.join(cfg.out_dir, name))
    clock = dict(shown=0.0, warned=False, epoch_s=None)  # for the progress line and the ETA
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        eps, lam, stats = train_epoch(epoch, model, opt, objective, data, info, cfg, dev, rank,
                                      world, clock)
        if rank > 0:  # torchrun: only rank 0 evaluates, prints, logs and saves
            continue
        rec, best = epoch_record(epoch, eps, lam, stats, model, data, cfg, best)
        clock['epoch_s'] = time.time() - t0
        rec['seconds'] = clock['epoch_s']
        wall += rec['seconds']
        print(format_record(rec), flush=True)
        if epoch == start and epoch < cfg.epochs:  # the ETA, after the first epoch
            left = clock['epoch_s'] * (cfg.epochs - epoch)
            end = time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + left))
            print(f'eta: the run ends around {end}, in about {hms(left)} (epochs left: '
                  f'{cfg.epochs - epoch})', flush=True)
        # Only whole epochs are logged and saved: after a crash, --resume repeats the epoch.
        records.append(rec)
        atomic_save(records, os.path.join(cfg.out_dir, 'log.jsonl'))
        atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                         config=dataclasses.asdict(cfg), epoch=epoch, best=best, wall=wall),
                    os.path.join(cfg.out_dir, 'last.pt'))
    metrics = final_evaluation(model, data, cfg, dev, world, wall) if rank == 0 else None
    if world > 1:  # the other ranks wait for rank 0: tearing Gloo down first can abort
        torch.distributed.barrier()
    return metrics


# ---- main -------------------------------------------------------------------------------------
def main(argv=None):
    cfg = None
    try:
        cfg = parse_args(argv)
        if cfg.eval_checkpoint:  # with the checkpoint's own config
            eval_checkpoint(cfg)
        else:
            train(resolve(cfg))
        return 0
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be made or written: the path and the cause
        print(f'error: {e.filename}: {e.strerror or e}', file=sys.stderr)
        return 2
    except RuntimeError as e:  # torchrun: another rank failed or stopped answering (Gloo, NCCL
        if not torch.distributed.is_initialized():  # say it in many ways): one line, the first
            raise
        print(f'error: torchrun: a rank stopped answering or failed ({first_line(e)}); '
              f'--dist-timeout is {cfg.dist_timeout} s', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        why = 'no epoch was finished, nothing was saved'
        if cfg is None or cfg.eval_checkpoint:
            why = 'nothing was written'
        elif os.path.exists(os.path.join(cfg.out_dir, 'last.pt')):
            why = 'last.pt holds the last finished epoch: run the same command with --resume'
        print(f'\ninterrupted: {why}', file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    code = main()
    if int(os.environ.get('RANK', 0)) > 0:  # torchrun's other ranks skip the interpreter's
        sys.stdout.flush(), sys.stderr.flush()  # teardown: its C++ destructors can abort after Gloo
        os._exit(code)
    sys.exit(code)
