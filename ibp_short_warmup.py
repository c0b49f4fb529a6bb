"""Fast Certified Robust Training with Short Warmup: the whole method in one file.

Paper: Zhouxing Shi, Yihan Wang, Huan Zhang, Jinfeng Yi, Cho-Jui Hsieh. "Fast Certified Robust
Training with Short Warmup", NeurIPS 2021, https://arxiv.org/abs/2103.17268.

It reproduces certified (L-inf) robust training with interval bound propagation (IBP, Eq. (3)),
made fast by the paper's three contributions, each tagged `[paper]` below: 1. the IBP init (Sec.
3.3.1), W_i ~ N(0, (sqrt(2 pi) / n_i)^2), difference gain 1; 2. BatchNorm after every affine layer
(Sec. 3.3.2), with the clean batch's statistics; 3. two warmup regularizers, L_tightness, Eq. (7),
and L_relu, Eq. (8), in the objective, Eq. (10). Models: CNN-7, Wide-ResNet and ResNeXt with full
BN, on MNIST, Fashion-MNIST, CIFAR-10, TinyImageNet or generated data. The method comes first.

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
about 10.5% in under two minutes (idle). Outputs in --out-dir: log.jsonl (a record per epoch),
last.pt (after every epoch, for `--resume`) and metrics.json (the result).
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
import sys
import time
import typing
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

EPS_FLOOR = 1e-6  # eps of the bounds where the scheduled eps is exactly 0 (the regularizers' box)
DIV_GUARD = 1e-12  # keeps the ratios of Eq. (7) and Eq. (8) finite
ATTACK_TOL = 1e-4  # how far (relative to the logits) an attack must beat a verified margin

# ==== Interval bound propagation, Eq. (3) =====================================================
# A box [l, u] is carried as its centre c and radius r: for an affine layer, Eq. (3)'s bounds are
# c' -/+ r' with c' = W c + b, r' = |W| r (two products, not four). The clean batch x travels
# alongside: BN in training normalizes with the clean batch's statistics (Sec. 3.3.2).
def input_box(x, eps):  # the L-inf ball of radius eps around x, clipped to the pixel range [0, 1]
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return (hi + lo) / 2, (hi - lo) / 2

def interval_relu(c, r):  # the ReLU is monotone: [l, u] maps to [relu(l), relu(u)]
    lo, hi = F.relu(c - r), F.relu(c + r)  # Eq. (3)
    return (hi + lo) / 2, (hi - lo) / 2

def bn_affine(bn, h):
    # [paper] Sec. 3.3.2: BN is the affine map t -> w t + b, w = gamma / sqrt(var + e), b = beta -
    # mean w, with the clean batch h's statistics (not detached) in training, else the running ones.
    if bn.training:
        var, mean = torch.var_mean(h, [0] + list(range(2, h.dim())), unbiased=False)  # per channel
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
    # Eq. (3) for a convolution and the BN after it (if any): BN(W * t + b_conv) = (w W) * t +
    # (w b_conv + b) is again a convolution, so the box skips a BN pass of its own.
    h, weight, bias = conv(x), conv.weight, conv.bias
    if bn is not None:
        w, b = bn_affine(bn, h)
        h = h * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)  # the clean batch: BN(h)
        weight = weight * w.view(-1, 1, 1, 1)
        bias = b if bias is None else w * bias + b
    args = conv.stride, conv.padding, conv.dilation, conv.groups
    return h, F.conv2d(c, weight, bias, *args), F.conv2d(r, weight.abs(), None, *args)  # Eq. (3)

class Normalize(nn.Module):  # per-channel (x - mean) / std inside the model: eps stays in pixels
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std

class Residual(nn.Module):  # branch(x) + shortcut(x); the ReLU after it is the next module
    def __init__(self, branch, shortcut):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)

def ibp_forward(module, x, c, r, pre=None):
    # The clean batch x and the box (c, r) through `module`. `pre` collects the boxes Eq. (7) and
    # Eq. (8) read: the normalized input box (layer 0) and the box at every ReLU's input (1..m).
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
    if isinstance(module, nn.Linear):  # the clean and the centre batch share W: one matmul
        h, c = module(torch.cat([x, c])).split(len(x))
        return h, c, F.linear(r, module.weight.abs())  # Eq. (3)
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
    # Clean logits, and lower bounds lb[n, j] of the margins z_y - z_j over the eps-box (Sec. 3.1).
    # C (rows e_y - e_j) is folded into the last layer before Eq. (3): tighter than logit bounds.
    h, c, r = ibp_forward(model[:-1], x, *input_box(x, eps), pre)
    last = model[-1]
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # (N, K, d): rows W_y - W_j
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    lb = (torch.bmm(w, c.unsqueeze(2)) - torch.bmm(w.abs(), r.unsqueeze(2))).squeeze(2) + b
    return last(h), lb

def verified(lb, y):  # every margin to another class has a positive lower bound
    return ((lb > 0) | F.one_hot(y, lb.shape[1]).bool()).all(1)

# ==== Rounding-sound IBP for certification =====================================================
# Float64 boxes (lo, hi) enclosing the exact real boxes of Eq. (3), which is monotone in its box.
U, TINY, INF = 2.0 ** -53, 2.0 ** -1074, torch.tensor(math.inf, dtype=torch.float64)

def up(v):  # one correctly rounded op is off by at most half an ulp: the next float up bounds it
    return torch.nextafter(v, INF)

def hull(*corners):  # [min, max] of corners, each one rounded op, widened to the next floats
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
            mean, w, beta = m.mean.double(), 1 / m.std.double(), torch.zeros_like(m.mean.double())
        else:  # Sec. 3.3.2 in eval mode: w = gamma / sqrt(var + eps), the running statistics
            g, beta, mean, var = (p.double().view(-1, *[1] * (lo.dim() - 2))
                                  for p in (m.weight, m.bias, m.running_mean, m.running_var))
            w = g / torch.sqrt(var + m.eps)  # three rounded ops: the exact w is w (1 +- 3U)
        lo, hi = sound_affine(lo, hi, torch.mul, torch.ones_like(mean), -mean, 1)  # t - mean
        return sound_affine(lo, hi, torch.mul, w, beta, 1, 4 * U)
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

def conv_bn(cin, cout, k=3, stride=1, groups=1, bn=True):  # [paper] Sec. 3.3.2: BN after a conv
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)
    return [conv, nn.BatchNorm2d(cout)] if bn else [conv]

def head(features, hidden, classes, bn=True):  # [paper] BN after the hidden layer, not the last
    bn1d = [nn.BatchNorm1d(hidden)] if bn else []
    return [nn.Flatten(), nn.Linear(features, hidden), *bn1d, nn.ReLU(), nn.Linear(hidden, classes)]

def cnn7(shape, classes, width=1.0, bn='full'):
    # 5 convs (64, 64, 128 stride 2, 128, 128; 64x64: 5th stride 2), FC 512; bn: Table 4's ablation
    c1, c2 = scaled(64, width), scaled(128, width)
    s5 = 2 if shape[1] >= 64 else 1
    layers = []
    for cin, cout, stride in [(shape[0], c1, 1), (c1, c1, 1), (c1, c2, 2), (c2, c2, 1),
                              (c2, c2, s5)]:
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
    return layers + head(cin * (shape[1] // 4) * (shape[2] // 4), scaled(512, width), classes)

def resnext(shape, classes, width=1.0):
    # Stem, then cardinality-2 blocks, bottleneck doubling per stage (64x64: 2 narrower), FC 512.
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
    return layers + head(cin * (shape[1] // 4) * (shape[2] // 4), scaled(512, width), classes)

def build_model(cfg, info):  # nn.Sequential(Normalize, ..., classifier)
    args = info['shape'], info['classes'], cfg.width
    residual = dict(wide_resnet=wide_resnet, resnext=resnext)
    body = cnn7(*args, cfg.bn) if cfg.model == 'cnn7' else residual[cfg.model](*args)
    model = nn.Sequential(Normalize(info['mean'], info['std']), *body)
    return ibp_init_(model) if cfg.ibp_init else model  # ibp_init_: the next section, Eq. (6)

# ==== [paper] IBP initialization, Sec. 3.3.1 and Eq. (6) =======================================
def fan_in(layer):  # n_i: in_features, or (in_channels / groups) * k * k
    return layer.weight[0].numel()

def ibp_init_(model):
    # Eq. (5), Eq. (6): the gain E(Delta_i) / E(Delta_{i-1}) is n_i/2 E|W_i| = n_i sigma_i /
    # sqrt(2 pi) for W_i ~ N(0, sigma_i^2): sigma_i = sqrt(2 pi) / n_i gives 1. All weights but the
    # classifier's are redrawn. Appendix A.3 (as the release): a layer fed ReLU(branch + shortcut)
    # sees about twice the width, so its weights are halved.
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
def min_ratio(p, q):  # min(p/q, q/p), i.e. min(alpha, 1/alpha), finite when p or q is 0
    return torch.minimum(p, q) / torch.maximum(p, q).clamp_min(DIV_GUARD)

def warmup_regularizers(pre, tau):
    # L_tightness, Eq. (7), and L_relu, Eq. (8), from one IBP pass's boxes (pre[0]: the input box,
    # pre[1:]: the m ReLU inputs), pooled over the batch and a layer. Each ReLU(.) term is in
    # [0, tau]. Also every layer's fractions of active, inactive and unstable neurons (Figure 2).
    delta0 = pre[0][1].mean()  # E(Delta_0); radii are half of Eq. (4)'s gaps, ratios the same
    tight, relu, counts = [], [], []
    for c, r in pre[1:]:
        tight.append(F.relu(tau - delta0 / r.mean().clamp_min(DIV_GUARD)))  # Eq. (7)
        # Eq. (8)'s I(l > 0), I(u < 0) as max(sign, 0): a float mask compiles faster than a bool
        active = torch.sign(c - r).clamp_min(0).detach()
        inactive = torch.sign(-c - r).clamp_min(0).detach()
        d2 = (c - c.mean()).square()
        alpha = min_ratio((c * active).sum(), -(c * inactive).sum())
        beta = min_ratio((d2 * active).sum(), (d2 * inactive).sum())
        n_active, n_inactive = active.sum(), inactive.sum()
        # One-sided (alpha = 0 or inf): each term is tau. Neither kind (alpha = 0/0): undefined, 0.
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
    # Eq. (9) with IBP: cross-entropy of the logits -lb (lb_y = 0) with target y: logsumexp(-lb).
    return torch.logsumexp(-lb, 1).mean()

def batch_loss(model, x, y, eps, lam, cfg):
    # Eq. (10) for a batch, and statistics for the log. At eps = 0 the data loss is the plain
    # cross-entropy and the bounds use EPS_FLOOR, so that the regularizers see a non-empty box.
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
                     train_ver_err=(~verified(lb, y)).float().mean(), relu_per_layer=relu,
                     nonfinite=torch.stack([~torch.isfinite(loss), ~torch.isfinite(lb).all()]))
    return loss, {k: v.detach().float() for k, v in stats.items()}

class Objective(nn.Module):  # batch_loss as a module, for DDP and torch.compile to wrap whole
    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x, y, eps, lam):
        return batch_loss(self.model, x, y, eps, lam, self.cfg)

def eps_at(step, steps_per_epoch, eps_target, start, length):
    # The release's smoothed per-batch ramp: 0 until epoch `start`, a (b - init)^4 over the ramp's
    # first quarter up to eps_target / 13, then linear (same slope there) up to eps_target.
    init, final = (start - 1) * steps_per_epoch, (start + length - 1) * steps_per_epoch
    if step <= init:
        return 0.0
    if step >= final:
        return eps_target
    t = int(0.25 * (final - init))  # the polynomial part: the ramp's first quarter
    mid = init + t
    mid_eps = eps_target * t / (4 * (final - mid) + t)  # continuous slope at mid
    if step < mid:
        return mid_eps * ((step - init) / t) ** 4
    return mid_eps + (eps_target - mid_eps) * (step - mid) / (final - mid)

def lam_at(eps, eps_target, lam0):  # Sec. 3.4: lambda = lambda_0 (1 - eps / eps_target)
    return lam0 * (1 - eps / eps_target)

def lr_at(epoch, cfg):  # step decay: every milestone the (1-based) epoch has passed: x lr_decay
    return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.lr_milestones)

# ==== Plumbing: config and CLI, data, evaluation, checkpoints, training loop, torchrun, main ====
class UserError(Exception):
    """Bad input, a missing resource or a diverged run: one line on stderr, exit code 2."""

def first_line(e):
    return f'{type(e).__name__}: {str(e).splitlines()[0]}' if str(e).strip() else type(e).__name__

def flag(default, help, low=None, high=math.inf, **kw):  # (low, high] for a float, >= low: int
    return dataclasses.field(default=default, metadata=dict(help=help, low=low, high=high, **kw))

Opt, Ints = typing.Optional, typing.Tuple[int, ...]
# Defaults of Sec. 4.1 and the release; schedules: epochs -> (eps_start, eps_length, milestones)
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
DATASETS['fashionmnist'] = dict(DATASETS['mnist'], eps=0.1)  # not in the paper: eps 0.1 is usual
SMOKE = dict(dataset='synthetic', model='cnn7', width=0.125, epochs=6, eps_start=2, eps_length=3,
             lr_milestones=(5,), batch_size=64, train_size=1024, test_size=256, lr=2e-3,
             eps=4 / 255, synthetic_shape=(3, 32, 32), pgd_steps=10)

@dataclasses.dataclass
class Config:  # every field is a --flag; None: the dataset's or the method's default (resolve)
    dataset: str = flag('cifar10', 'dataset', choices=list(DATASETS))
    model: str = flag('cnn7', 'model family', choices=['cnn7', 'wide_resnet', 'resnext'])
    method: str = flag('ours', 'ours: IBP init + regularizers', choices=['ours', 'vanilla'])
    bn: str = flag('full', 'CNN-7 BN (Table 4)', choices=['full', 'conv', 'none'])
    ibp_init: Opt[bool] = flag(None, '[paper] IBP init, Sec. 3.3.1 (default: on for ours)')
    reg_tightness: Opt[bool] = flag(None, '[paper] L_tightness, Eq. (7) (default: on for ours)')
    reg_relu: Opt[bool] = flag(None, '[paper] L_relu, Eq. (8) (default: on for ours)')
    eps: Opt[float] = flag(None, 'eps_target: L-inf radius in pixels, train and test', 0, 1)
    epochs: Opt[int] = flag(None, 'total epochs', 1)
    eps_start: Opt[int] = flag(None, 'first epoch of the eps ramp (eps = 0 before it)', 1)
    eps_length: Opt[int] = flag(None, 'length of the eps ramp in epochs', 1)
    lr: float = flag(5e-4, 'Adam learning rate', 0)
    lr_decay: float = flag(0.2, 'LR factor at each milestone', 0)
    lr_milestones: Opt[Ints] = flag(None, 'epochs after which the LR decays')
    batch_size: Opt[int] = flag(None, 'global batch size', 1)
    accum_steps: Opt[int] = flag(None, 'gradient accumulation chunks (BN per chunk)', 1)
    grad_clip: float = flag(10.0, 'gradient-norm clipping', 0)
    tau: float = flag(0.5, '[paper] tau, the tolerance of both regularizers', 0, 1)
    lam0: Opt[float] = flag(None, '[paper] lambda_0 >= 0, the first weight of Eq. (10)')
    width: float = flag(1.0, 'width multiplier of the model (0.125: a CPU-sized CNN-7)', 0, 16)
    seed: int = flag(0, 'random seed (init, batch order, augmentation, attack)')
    device: str = flag('auto', "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    data_dir: Opt[str] = flag(None, 'where datasets are found or downloaded to (default: data)')
    out_dir: Opt[str] = flag(None, 'output folder (default: runs/DATASET_MODEL_METHOD_sSEED)')
    resume: bool = flag(False, 'continue the run in --out-dir from its last.pt')
    train_size: int = flag(0, 'a fixed random subset of this many training images (0: all)', 0)
    test_size: int = flag(0, 'a fixed random subset of this many test images (0: all)', 0)
    synthetic_shape: Ints = flag((3, 32, 32), 'C H W of the synthetic dataset')
    synthetic_classes: int = flag(10, 'classes of the synthetic dataset', 2)
    eval_checkpoint: Opt[str] = flag(None, 'certify this checkpoint: standard, PGD, verified error')
    pgd_steps: int = flag(20, 'PGD steps of the final attack (0: no attack)', 0)
    tf32: bool = flag(True, 'TF32 matmuls/convolutions in training on CUDA (never to certify)')
    compile: bool = flag(False, 'torch.compile the bounds and the loss (20-40 s to compile)')
    dist_timeout: int = flag(600, 'torchrun: seconds a rank waits for the others', 1)
    smoke: bool = flag(False, 'preset: synthetic data, narrow CNN-7, 6 epochs (CPU, seconds)')

def dataset_info(cfg):
    info = dict(DATASETS[cfg.dataset])
    if cfg.dataset == 'synthetic':
        info.update(classes=cfg.synthetic_classes, shape=tuple(cfg.synthetic_shape),
                    mean=(0.5,) * cfg.synthetic_shape[0], std=(0.25,) * cfg.synthetic_shape[0])
    return info

def resolve(cfg):  # every None: the dataset's or the method's default ([paper] parts: ours)
    info = dataset_info(cfg)
    schedules, epochs = info['schedules'], cfg.epochs or info['epochs']
    schedule = schedules.get(epochs, schedules[info['epochs']])
    defaults = dict(zip(('eps_start', 'eps_length', 'lr_milestones'), schedule),
                    ibp_init=cfg.method == 'ours', reg_tightness=cfg.method == 'ours',
                    reg_relu=cfg.method == 'ours', **info)
    for k in ('eps', 'epochs', 'batch_size', 'accum_steps', 'lam0', 'eps_start', 'eps_length',
              'lr_milestones', 'ibp_init', 'reg_tightness', 'reg_relu'):
        if getattr(cfg, k) is None:
            setattr(cfg, k, defaults[k])
    cfg.lr_milestones = tuple(cfg.lr_milestones)
    if cfg.dataset == 'synthetic':
        cfg.train_size, cfg.test_size = cfg.train_size or 4096, cfg.test_size or 1024
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join('runs', f'{cfg.dataset}_{cfg.model}_{cfg.method}_s{cfg.seed}')
    cfg.data_dir = os.path.abspath(cfg.data_dir or 'data')  # --eval-checkpoint from elsewhere
    return check(cfg)

def check(cfg):  # every value, as parsed: one line naming its flag, not a diverging run
    for f in dataclasses.fields(Config):
        v, m, name = getattr(cfg, f.name), f.metadata, '--' + f.name.replace('_', '-')
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f'{name} must be a finite number (got {v})')
        if isinstance(v, float) and m['low'] is not None and not m['low'] < v <= m['high']:
            rule = f"in ({m['low']}, {m['high']}]" if m['high'] < math.inf else f"> {m['low']}"
            raise UserError(f'{name} must be {rule} (got {v})')
        if isinstance(v, int) and m['low'] is not None and not m['low'] <= v:
            raise UserError(f"{name} must be >= {m['low']} (got {v})")
    start, length, shape = cfg.eps_start or 1, cfg.eps_length or 1, cfg.synthetic_shape
    epochs, ramp_end, milestones = cfg.epochs or 1, start + length - 1, cfg.lr_milestones or ()
    for ok, msg in [
        (ramp_end <= epochs, f'the eps ramp (epochs {cfg.eps_start}..{ramp_end}) is longer than '
         f'the run ({cfg.epochs} epochs): set --eps-start/--eps-length'),
        (all(1 <= m <= epochs for m in milestones), f'--lr-milestones must lie in 1..{epochs}, '
         f'the run (got {" ".join(map(str, milestones))})'),
        ((cfg.batch_size or 1) % (cfg.accum_steps or 1) == 0,
         '--batch-size must be a multiple of --accum-steps'),
        ((cfg.lam0 or 0) >= 0, f'--lam0 must be >= 0 (got {cfg.lam0})'),
        (cfg.out_dir != '', '--out-dir must not be empty'),
        (cfg.model == 'cnn7' or cfg.bn == 'full',
         '--bn conv/none is the CNN-7 ablation (Table 4); residual models have full BN'),
        (len(shape) == 3 and min(shape) >= 1 and shape[1] % 4 == 0 and shape[2] % 4 == 0,
         '--synthetic-shape must be C H W with H and W multiples of 4')]:
        if not ok:
            raise UserError(msg)
    return cfg

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the usage text
        raise UserError(message)

def parse_args(argv=None):  # only given flags are set (SUPPRESS): --smoke fills the others
    p = Parser(description='Fast certified robust training with short warmup (Shi et al. 2021).',
               argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        t = f.type
        if typing.get_origin(t) is typing.Union:
            t = typing.get_args(t)[0]
        default = '' if f.default is None else f' (default: {f.default})'
        kw = dict(help=f.metadata['help'] + default, choices=f.metadata.get('choices'), type=t)
        if t is bool:
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
    torch.backends.cudnn.benchmark = True
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    return dev

def synthetic_images(n, shape, classes, seed):  # a smooth prototype per class, plus noise
    g = torch.Generator().manual_seed(1234)  # the same prototypes for train and test
    c, h, w = shape
    protos = F.interpolate(torch.rand(classes, c, 4, 4, generator=g), size=(h, w),
                           mode='bilinear', align_corners=False)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.15 * torch.randn(n, c, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

def tinyimagenet_data(root):
    # The official tiny-imagenet-200 folder (cs231n.stanford.edu/tiny-imagenet-200.zip): classes in
    # ImageFolder's (sorted) order, as in the authors' release; val/ labelled by its annotations.
    base = os.path.join(root, 'tiny-imagenet-200')
    train = torchvision.datasets.ImageFolder(os.path.join(base, 'train'))
    with open(os.path.join(base, 'val', 'val_annotations.txt')) as f:
        val = [(os.path.join(base, 'val', 'images', name), train.class_to_idx[wnid])
               for name, wnid, *_ in (line.split('\t') for line in f if line.strip())]
    decode = torchvision.transforms.PILToTensor()  # uint8, C H W
    return [(torch.stack([decode(train.loader(path)) for path, _ in part]),
             torch.tensor([y for _, y in part])) for part in (train.samples, val)]

def read_dataset(name, root, download=True):  # uint8 (train, test); torchvision downloads
    where = dict(tinyimagenet='tiny-imagenet-200/', cifar10='cifar-10-batches-py/',
                 mnist='MNIST/raw/', fashionmnist='FashionMNIST/raw/')[name]
    cls = dict(mnist=torchvision.datasets.MNIST, fashionmnist=torchvision.datasets.FashionMNIST,
               cifar10=torchvision.datasets.CIFAR10).get(name)
    out, fetched = [], False
    try:
        if name == 'tinyimagenet':
            return tinyimagenet_data(root)
        for train in (True, False):
            try:
                ds = cls(root, train=train, download=False)
            except RuntimeError as e:  # torchvision's "Dataset not found": files absent
                if 'not found' not in str(e) or not download:
                    raise
                fetched = True
                ds = cls(root, train=train, download=True)
            x = torch.as_tensor(ds.data)
            x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST NHW, CIFAR NHWC
            out.append((x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)))
        return out
    except Exception as e:  # files that are there but do not load are corrupt, others missing
        folder = os.path.join(os.path.abspath(root), where)
        if fetched or 'not found' in str(e) or not os.path.isdir(folder):
            how = 'and could not be downloaded' if download else '(not downloaded here)'
            raise UserError(f'{name} is not in {os.path.abspath(root)} {how} '
                            f'({type(e).__name__}); put {where} there or pass --data-dir') from None
        raise UserError(f'{name}: the files in {folder} are corrupt ({first_line(e)}): delete '
                        'them to download them again') from None

def load_data(cfg, device):  # (train, test) uint8, whole on `device`: no loader processes
    if cfg.dataset == 'synthetic':
        shape, k = tuple(cfg.synthetic_shape), cfg.synthetic_classes
        train = synthetic_images(cfg.train_size, shape, k, 1)
        test = synthetic_images(cfg.test_size, shape, k, 2)
    else:
        train, test = read_dataset(cfg.dataset, cfg.data_dir, download=not cfg.eval_checkpoint)
    for part, size, (_, y) in (('train', cfg.train_size, train), ('test', cfg.test_size, test)):
        if size > len(y):
            raise UserError(f'--{part}-size {size}: {cfg.dataset} has {len(y)} {part} images')
    g = torch.Generator().manual_seed(0)  # the same subsets for every seed
    train_idx = torch.randperm(len(train[1]), generator=g)[:cfg.train_size or None]
    test_idx = torch.arange(len(test[1]))
    if cfg.test_size:
        test_idx = torch.randperm(len(test[1]), generator=g)[:cfg.test_size]
    return [(x[i].to(device), y[i].to(device)) for (x, y), i in ((train, train_idx),
                                                                 (test, test_idx))]

def augment(x, pad, gen):  # a random flip and edge-padded crop per image, on x's device
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=gen, device=x.device) < 0.5  # gen lives on x's device
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=gen, device=x.device)
    xp = F.pad(x, (pad,) * 4, mode='replicate')
    rows, cols = oy + torch.arange(h, device=x.device), ox + torch.arange(w, device=x.device)
    idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w)
    return xp.flatten(2).gather(2, idx.expand(n, c, h * w)).view(n, c, h, w)

# ---- Evaluation: standard, PGD and IBP-verified error, in full float32 (sound re-check) ------
def pgd_margin(model, x, y, eps, steps, gen):  # the smallest margin z_y - max_j z_j PGD finds
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    xa, best = lo + (hi - lo) * torch.rand(x.shape, generator=gen).to(x.device), None
    for i in range(steps + 1):
        xa.requires_grad_(True)
        z = model(xa)
        other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)
        margin = z.gather(1, y[:, None]).squeeze(1) - other
        best = margin.detach() if best is None else torch.minimum(best, margin.detach())
        if i < steps:
            g, = torch.autograd.grad(margin.sum(), xa)
            xa = torch.minimum(torch.maximum(xa.detach() - 2.5 * eps / steps * g.sign(), lo), hi)
    return best

def evaluate(model, data, eps, pgd_steps=0, seed=0, recheck=False, batch_size=256):
    # Standard, PGD and IBP-verified error of `data` in eval mode at `eps`. With recheck, a sample
    # float32 IBP verifies counts only if sound_margins verifies it too; ver_changed: overturned.
    model.eval()
    torch.backends.cuda.matmul.allow_tf32 = False  # certification never uses TF32: its 10-bit
    torch.backends.cudnn.allow_tf32 = False  # mantissa would make the bounds unsound
    model64 = copy.deepcopy(model).cpu().double().requires_grad_(False) if recheck else None
    x_all, y_all = data
    sums, gen = torch.zeros(4, device=y_all.device), torch.Generator().manual_seed(seed)
    for i in range(0, len(y_all), batch_size):
        x8, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
        x = x8.float() / 255
        with torch.no_grad():
            logits, lb = ibp_margins(model, x, y, eps)
        ver, wrong, changed = verified(lb, y), logits.argmax(1) != y, y.new_zeros(())
        if recheck and ver.any():  # only a verified sample can lose its verdict
            v = ver.nonzero().squeeze(1)
            ok = verified(sound_margins(model64, x8[v].cpu(), y[v].cpu(), eps), y[v].cpu())
            ver[v], changed = ok.to(ver.device), (~ok).sum()
        attacked = wrong.clone()
        if pgd_steps and eps > 0:  # a real attack may never beat a margin IBP verified
            with torch.enable_grad():
                margin = pgd_margin(model, x, y, eps, pgd_steps, gen)
            if (ver & (margin < -ATTACK_TOL * (1 + logits.abs().amax(1)))).any():
                raise RuntimeError('PGD broke a sample counted as verified: unsound bounds')
            attacked |= margin <= 0
        sums += torch.stack([wrong.sum(), attacked.sum(), (~ver).sum(), changed]).float()
    std, pgd, ver, changed = (sums / len(y_all)).tolist()
    return dict(std_err=std, pgd_err=pgd if pgd_steps and eps > 0 else None, ver_err=ver,
                ver_changed=round(changed * len(y_all)))

# ---- Checkpoints and logs: atomic writes, so a crash or Ctrl-C never leaves a broken file -----
RUN_FILES = ('log.jsonl', 'last.pt', 'metrics.json')  # a folder with one of them is a run's
RUNTIME_FIELDS = {'resume', 'device', 'data_dir', 'out_dir', 'epochs', 'eval_checkpoint',
                  'compile', 'tf32', 'pgd_steps', 'smoke', 'dist_timeout'}  # may differ in --resume

def atomic_save(obj, path):
    # Written whole to a temporary file renamed over `path`: the old file stays whole till then.
    buf = io.BytesIO()  # torch.save reports a full disk cryptically; a plain write does not
    if path.endswith('.pt'):
        torch.save(obj, buf)
    else:
        buf.write((''.join(json.dumps(r) + '\n' for r in obj) if path.endswith('.jsonl')
                   else json.dumps(obj, indent=2)).encode())
    tmp = f'{path}.{os.getpid()}.tmp'  # concurrent writers (torchrun ranks) never share it
    try:
        with open(tmp, 'wb') as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except OSError as e:  # disk full, read-only, ...: one line, and no temporary file left
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)

def read_checkpoint(path, device, keys=('model', 'config')):
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such checkpoint file (a folder names none)')
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: one line only
            warnings.simplefilter('ignore')
            ck = torch.load(path, map_location=device, weights_only=True)  # unpickles no code
    except Exception as e:
        why = f'is not a readable checkpoint ({first_line(e)})'
        if 'Weights only load failed' in str(e):
            why = 'holds Python objects, refused: unpickling them could run code'
        raise UserError(f'{path} {why}') from None
    if not isinstance(ck, dict) or not isinstance(ck.get('config'), dict) or set(keys) - set(ck):
        raise UserError(f'{path} is not a checkpoint of this script with {", ".join(keys)}')
    if set(ck['config']) - {f.name for f in dataclasses.fields(Config)}:
        raise UserError(f'{path} is from an incompatible version (unknown config fields)')
    return ck

def load_state(path, module, state):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f'{path} does not fit this model ({first_line(e)})') from None

def read_log(path, epochs):
    # Epochs 1..epochs; one more (a kill between the log and last.pt) is dropped, a torn one is not.
    lines = open(path, 'rb').read().splitlines() if os.path.exists(path) else []
    if not epochs <= len(lines) <= epochs + 1:
        raise UserError(f'--resume: {path} holds {len(lines)} records, but last.pt {epochs} epochs')
    records = []
    for n, line in enumerate(lines, 1):
        with contextlib.suppress(ValueError):  # not JSON, or not even UTF-8
            records.append(json.loads(line))
        if len(records) < n or not isinstance(records[-1], dict) or records[-1].get('epoch') != n:
            raise UserError(f'--resume: {path}, line {n}: not the record of epoch {n}')
    return records[:epochs]

def open_run(cfg, model, opt, dev, rank):
    # A fresh run needs a folder without run files; --resume continues last.pt (same flags, its
    # log). Then rank 0 makes the folder. -> (first epoch, records so far, wall seconds so far)
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, f))]
    path, start, records, wall = os.path.join(cfg.out_dir, 'last.pt'), 1, [], 0.0
    if held and not cfg.resume:
        raise UserError(f'{cfg.out_dir} already holds a run ({", ".join(held)}): add --resume '
                        'to continue it, or choose another --out-dir')
    if cfg.resume:
        if not os.path.exists(path):
            raise UserError(f'--resume: no checkpoint at {path}: nothing was saved to continue')
        ck = read_checkpoint(path, dev, ('model', 'config', 'optimizer', 'epoch', 'wall'))
        now, saved = (json.loads(json.dumps(c)) for c in (dataclasses.asdict(cfg), ck['config']))
        diff = [k for k, v in saved.items() if k not in RUNTIME_FIELDS and v != now.get(k)]
        if diff:
            raise UserError(f'--resume: {path} has other values of: ' + ', '.join(diff))
        records = read_log(os.path.join(cfg.out_dir, 'log.jsonl'), ck['epoch'])
        load_state(path, model, ck['model'])
        load_state(path, opt, ck['optimizer'])
        start, wall = ck['epoch'] + 1, ck['wall']
    if rank == 0:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:  # a file of that name, a read-only parent, ...
            raise UserError(f'--out-dir {cfg.out_dir}: cannot make this folder ({e.strerror})')
        for name in os.listdir(cfg.out_dir):  # temporary files of a killed run
            if name.endswith('.tmp') and any(name.startswith(f + '.') for f in RUN_FILES):
                os.remove(os.path.join(cfg.out_dir, name))
    return start, records, wall

def eval_checkpoint(cfg):  # certify with the checkpoint's config and data; writes nothing
    dev = setup_device(check(cfg))
    ck = read_checkpoint(cfg.eval_checkpoint, dev)
    saved = Config(**ck['config'])  # its own flags, but for the device, data folder, test size
    saved = dataclasses.replace(saved, device=cfg.device, eval_checkpoint=cfg.eval_checkpoint,
                                data_dir=cfg.data_dir or saved.data_dir, train_size=1,
                                test_size=cfg.test_size or saved.test_size)
    model = build_model(saved, dataset_info(saved)).to(dev)
    load_state(cfg.eval_checkpoint, model, ck['model'])
    eps = cfg.eps if cfg.eps is not None else saved.eps
    res = evaluate(model, load_data(saved, dev)[1], eps, cfg.pgd_steps, cfg.seed, recheck=True)
    print(json.dumps(dict(checkpoint=cfg.eval_checkpoint, epoch=ck.get('epoch'), eps=eps, **res)))

# ---- Distributed (torchrun): the process group; the shard, the sums and rank 0 are in train ---
def setup_distributed(dev, cfg):  # torchrun: a process per device -> (rank, world size)
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and not torch.distributed.is_initialized():  # NCCL for GPUs, Gloo for CPUs
        torch.distributed.init_process_group('nccl' if dev.type == 'cuda' else 'gloo',
                                             timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return (torch.distributed.get_rank() if world > 1 else 0), world

# ---- Training loop, on one device or several ---------------------------------------------------
def prepare(cfg, dev, info, world=1):  # the model, Adam, and the Objective (DDP, compiled)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info).to(dev)
    objective = Objective(model, cfg)
    if world > 1:  # gradients averaged over ranks; BN statistics per rank, as per chunk
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[dev] if dev.type == 'cuda' else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=dev.type in ('cpu', 'cuda'))
    return model, opt, torch.compile(objective) if cfg.compile else objective

def train_step(objective, opt, x, y, eps, lam, cfg):
    # The chunks' mean statistics, `nonfinite` checked once an epoch: a sync stalls the GPU.
    opt.zero_grad(set_to_none=True)
    chunks, total = list(zip(x.tensor_split(cfg.accum_steps), y.tensor_split(cfg.accum_steps))), {}
    for xc, yc in chunks:
        loss, stats = objective(xc, yc, eps, lam)
        (loss / len(chunks)).backward()
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v / len(chunks)
    norm = nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
    opt.step()
    total['nonfinite'] = torch.cat([total['nonfinite'], (~torch.isfinite(norm)).float()[None]])
    return total

def check_finite(flags, epoch, steps, cfg):  # before the epoch is saved; flags: [step, what]
    if flags.any():
        step = flags.any(1).nonzero()[0, 0].item()
        what = ['loss', 'margin bound', 'gradient norm'][flags[step].nonzero()[0, 0].item()]
        eps = eps_at((epoch - 1) * steps + step, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
        kept = f'last.pt keeps epoch {epoch - 1}' if epoch > 1 else 'no epoch was saved'
        raise UserError(f'training diverged at epoch {epoch}, step {step + 1} (eps {eps:.5f}): '
                        f'non-finite {what}; {kept} (try a lower --lr)')

def train_epoch(epoch, opt, objective, data, info, cfg, dev, rank, world, eta):
    # Sec. 3.4's schedule: the epoch's LR, then per batch eps, lambda (in the warmup only) and the
    # step; with `eta`, the end is estimated once. -> (last eps, last lambda, mean statistics)
    opt.param_groups[0]['lr'] = lr_at(epoch, cfg)  # Sec. 3.4: step decay per epoch
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32  # evaluate turns TF32 off again
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    (x_train, y_train), bs, t0 = data, cfg.batch_size, time.time()
    n = len(y_train)  # a last batch too small to give every rank and chunk a sample is dropped
    steps = n // bs if 0 < n % bs < world * cfg.accum_steps else math.ceil(n / bs)
    gen = torch.Generator(dev).manual_seed(cfg.seed * 100_003 + epoch)  # the epoch's seed
    perm = torch.randperm(n, generator=gen, device=dev)  # drawn on the device: no host sync
    sums, flags = {}, []
    for i in range(steps):
        eps = eps_at((epoch - 1) * steps + i, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
        lam = 0.0
        if (cfg.reg_tightness or cfg.reg_relu) and epoch < cfg.eps_start + cfg.eps_length:
            lam = lam_at(eps, cfg.eps, cfg.lam0)  # [paper] Sec. 3.4, in the warmup only
        idx = perm[i * bs:(i + 1) * bs]
        x = x_train[idx].float() / 255
        if info['pad']:  # the epoch's own generator: a resumed run repeats the augmentation
            x = augment(x, info['pad'], gen)
        x, y = x.tensor_split(world)[rank], y_train[idx].tensor_split(world)[rank]  # torchrun
        stats = train_step(objective, opt, x, y, eps, lam, cfg)
        flags.append(stats.pop('nonfinite'))
        for k, v in stats.items():  # summed on the device: no host sync inside the epoch
            sums[k] = sums.get(k, 0) + v * len(y)
        if eta and (time.time() - t0 > 20 or (i == steps - 1 and epoch < cfg.epochs)):
            steps_left = steps * (cfg.epochs - epoch + 1) - i - 1
            left = datetime.timedelta(seconds=round((time.time() - t0) / (i + 1) * steps_left))
            print(f'eta: training ends around {datetime.datetime.now() + left:%Y-%m-%d %H:%M}, '
                  f'in about {left} (without evaluation)')
            eta = False
    flags = torch.stack(flags)
    for v in [flags, *sums.values()] if world > 1 else []:  # torchrun: the sums over all ranks
        torch.distributed.all_reduce(v)
    check_finite(flags.cpu() > 0, epoch, steps, cfg)  # before anything is saved
    seen = min(n, steps * bs)
    return eps, lam, dict({k: (v / seen).tolist() for k, v in sums.items()},
                          img_per_s=seen / (time.time() - t0))

def log_record(epoch, eps, lam, stats, test, cfg, seconds):
    states = torch.tensor(stats['relu_per_layer'], dtype=torch.float64).mean(0).tolist()
    r = dict(epoch=epoch, eps=eps, lam=lam, lr=lr_at(epoch, cfg), **stats, seconds=seconds,
             **dict(zip(['active', 'inactive', 'unstable'], states)), test_err=test['std_err'],
             test_ver_err=test['ver_err'])
    print(f"ep {r['epoch']:3d} | eps {r['eps']:.5f} lam {r['lam']:.3f} lr {r['lr']:.1e} | "
          f"loss {r['loss']:.4f} Ltight {r['l_tightness']:.4f} Lrelu {r['l_relu']:.4f} | "
          f"relu act {r['active']:.2f} inact {r['inactive']:.2f} unst {r['unstable']:.2f} | "
          f"train err {r['train_err']:.4f} ver {r['train_ver_err']:.4f} | "
          f"test err {r['test_err']:.4f} ver {r['test_ver_err']:.4f} | "
          f"{r['img_per_s']:7.1f} img/s {r['seconds']:6.1f} s", flush=True)
    return r

def final_evaluation(model, test, cfg, dev, world, wall):  # PGD and the sound re-check too
    final = evaluate(model, test, cfg.eps, cfg.pgd_steps, cfg.seed, recheck=True)
    atomic_save(dict(final_epoch=cfg.epochs, eps=cfg.eps, **final, test_size=len(test[1]),
                     wall_seconds=wall, device=str(dev), world_size=world,
                     config=dataclasses.asdict(cfg)), os.path.join(cfg.out_dir, 'metrics.json'))
    pgd = '' if final['pgd_err'] is None else f" PGD error {final['pgd_err']:.4f} |"
    print(f"final (epoch {cfg.epochs}, eps {cfg.eps:.5f}): standard error {final['std_err']:.4f} |"
          f"{pgd} verified error {final['ver_err']:.4f} | {cfg.out_dir}/metrics.json")

def train(cfg):
    dev = setup_device(cfg)
    rank, world = setup_distributed(dev, cfg)
    info, (train_data, test_data) = dataset_info(cfg), load_data(cfg, dev)
    model, opt, objective = prepare(cfg, dev, info, world)
    start, records, wall = open_run(cfg, model, opt, dev, rank)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.time()
        model.train()
        eps, lam, stats = train_epoch(epoch, opt, objective, train_data, info, cfg, dev, rank,
                                      world, eta=rank == 0 and epoch == start)
        if rank > 0:  # torchrun: only rank 0 evaluates, prints, logs and saves
            continue
        test = evaluate(model, test_data, eps)  # float32 at the epoch's eps (the final: below)
        records.append(log_record(epoch, eps, lam, stats, test, cfg, time.time() - t0))
        wall += records[-1]['seconds']
        # Only whole epochs are logged and saved: after a crash, --resume repeats the epoch.
        atomic_save(records, os.path.join(cfg.out_dir, 'log.jsonl'))
        atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                         config=dataclasses.asdict(cfg), epoch=epoch, wall=wall),
                    os.path.join(cfg.out_dir, 'last.pt'))
    if rank == 0:
        final_evaluation(model, test_data, cfg, dev, world, wall)
    if world > 1:  # the other ranks wait for rank 0: tearing Gloo down first can abort
        torch.distributed.barrier()

def main(argv=None):
    cfg = None
    try:
        cfg = parse_args(argv)
        if cfg.eval_checkpoint:
            eval_checkpoint(cfg)
        else:
            train(resolve(cfg))
        return 0
    except (UserError, OSError) as e:  # OSError: a folder that cannot be made or written
        print(f'error: {e if isinstance(e, UserError) else f"{e.filename}: {e.strerror or e}"}',
              file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: another rank failed or stopped answering
        if not torch.distributed.is_initialized():
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
    if int(os.environ.get('RANK', 0)) > 0:  # torchrun's other ranks: Gloo's teardown can abort
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skips the interpreter's teardown
    sys.exit(code)
