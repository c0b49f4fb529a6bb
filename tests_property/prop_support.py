"""Strategies and independent oracles shared by the property tests.

Nothing here copies ibp_short_warmup: the oracle for a bound is a plain PyTorch forward pass of a
copy of the model (every BN in eval mode, the train-mode ones frozen to the clean batch's mean and
biased variance, computed here by hand), evaluated at points of the input box. The tolerance
table and the regularizer oracle live in oracles.py (shared with test_ibp.py).
"""
import copy
import dataclasses
import math
import typing

import torch
import torch.nn as nn
from hypothesis import strategies as st

import ibp_short_warmup as M
from oracles import FD, TOL, tol_of  # noqa: F401 (the property tests use them through P)

BN = (nn.BatchNorm1d, nn.BatchNorm2d)


# BN is applied as the folded affine map w t + (beta - mean w): when a channel of the clean batch is
# (nearly) constant, |mean w| dwarfs the result and float32 loses about eps32 |mean| / std of it
# (a float32 limit, not a logic error: float64 has the same cancellation at 1e-16). float32
# soundness checks set such batches aside. float64 ones keep them, unless a channel is exactly
# constant (std 0: one value per channel, a batch of 1 at 1 x 1 pixels): BN's slope is then
# gamma / sqrt(1e-5), about 316 gamma, and a chain of such layers multiplies that 1e-16 by 316
# each (4 in a row gave 3e-8, found by the thorough profile).
MAX_CV = {torch.float64: 1e12, torch.float32: 100.0}


def cancellation_ok(oracle, dtype):
    return oracle.worst_cv <= MAX_CV[dtype]


def net_scale(bounds):
    """Largest |centre| + radius over a list of boxes (c, r)."""
    return max((c.abs() + r).max().item() for c, r in bounds)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Net:
    model: nn.Sequential
    shape: typing.Tuple[int, ...]  # of one input, without the batch dimension
    classes: int
    seed: int
    what: str = ''


def randomize_(model, g, weights=True):
    """Redraw the parameters from the generator g (reproducible): weights of either sign (unless
    weights=False), BN with negative scales too, and random running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and weights:
                n = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 1.5 / math.sqrt(n))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, BN):
                k = m.num_features
                m.weight.copy_(torch.rand(k, generator=g) * 4 - 2)
                m.bias.copy_(torch.randn(k, generator=g))
                m.running_mean.copy_(torch.randn(k, generator=g))
                m.running_var.copy_(torch.rand(k, generator=g) * 2.8 + 0.2)
    return model


def set_bn_modes(model, draw, mode):
    """mode 'train' / 'eval' for every BN, or 'mixed': each BN its own drawn mode."""
    for m in model.modules():
        if isinstance(m, BN):
            m.train(mode == 'train' or (mode == 'mixed' and draw(st.booleans())))


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv(draw, cin, hw, odd_same=False, stride=None, cout=None):
    """A Conv2d with drawn groups, kernel, stride, padding, dilation that fits the spatial size
    hw."""
    if cout is None:
        groups = draw(st.sampled_from(_divisors(cin)))
        cout = groups * draw(st.integers(1, 3))
    else:
        groups = draw(st.sampled_from([d for d in _divisors(cin) if cout % d == 0]))
    s = draw(st.integers(1, 2)) if stride is None else stride
    if odd_same:  # the output size depends on the stride only, as in a residual branch
        k = draw(st.sampled_from([1, 3]))
        return nn.Conv2d(cin, cout, k, s, k // 2, groups=groups)
    k, d, p = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    if min(hw) + 2 * p < d * (k - 1) + 1:
        k, d = 1, 1
    return nn.Conv2d(cin, cout, k, s, p, dilation=d, groups=groups)


def _out_shape(layers, shape):
    with torch.no_grad():
        return tuple(nn.Sequential(*layers).eval()(torch.zeros(2, *shape)).shape[1:])


@st.composite
def small_nets(draw, allow_flat=True):
    """Random small networks from the file's own layers: Normalize, Conv2d (groups, stride,
    padding, dilation), BatchNorm2d/1d, ReLU, Residual blocks (conv or identity shortcut),
    Flatten, Linear; always ending with a classifier Linear. All parameters redrawn at random,
    float64, each BN in train or eval mode."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    g = torch.Generator().manual_seed(seed)
    flat = allow_flat and draw(st.integers(0, 4)) == 0
    layers = []
    if flat:
        in_shape = shape = (draw(st.integers(1, 6)),)
    else:
        in_shape = shape = (draw(st.integers(1, 3)), draw(st.integers(3, 7)),
                            draw(st.integers(3, 7)))
        if draw(st.booleans()):
            mean = torch.rand(shape[0], generator=g).tolist()
            std = (torch.rand(shape[0], generator=g) * 0.9 + 0.1).tolist()
            layers.append(M.Normalize(mean, std))
        for _ in range(draw(st.integers(0, 3))):
            cin, hw = shape[0], shape[1:]
            if draw(st.booleans()):  # plain conv [BN] [ReLU]
                block = [_conv(draw, cin, hw)]
                if draw(st.booleans()):
                    block.append(nn.BatchNorm2d(block[0].out_channels))
                if draw(st.integers(0, 3)) > 0:
                    block.append(nn.ReLU())
            else:  # Residual(conv [BN] ReLU conv [BN], conv/identity shortcut) [ReLU]
                s = draw(st.integers(1, 2))
                cout = cin if s == 1 and draw(st.booleans()) else draw(st.integers(1, 4))
                c1 = _conv(draw, cin, hw, odd_same=True, stride=s, cout=cout)
                c2 = _conv(draw, cout, hw, odd_same=True, stride=1, cout=cout)
                bn = draw(st.booleans())
                branch = [c1] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.ReLU(), c2] + \
                         ([nn.BatchNorm2d(cout)] if bn else [])
                if s == 1 and cout == cin and draw(st.booleans()):
                    short = nn.Identity()
                else:
                    short = nn.Sequential(nn.Conv2d(cin, cout, 1, s),
                                          *([nn.BatchNorm2d(cout)] if draw(st.booleans()) else []))
                block = [M.Residual(nn.Sequential(*branch), short)]
                if draw(st.integers(0, 3)) > 0:
                    block.append(nn.ReLU())
            layers += block
            shape = _out_shape(block, shape)
        layers.append(nn.Flatten())
        shape = (math.prod(shape),)
    feat = shape[0]
    for _ in range(draw(st.integers(1 if flat else 0, 2))):  # hidden Linear [BN1d] ReLU
        h = draw(st.integers(1, 6))
        bn = [nn.BatchNorm1d(h)] if draw(st.booleans()) else []
        layers += [nn.Linear(feat, h)] + bn + [nn.ReLU()]
        feat = h
    classes = draw(st.integers(2, 4))
    layers.append(nn.Linear(feat, classes))
    model = randomize_(nn.Sequential(*layers), g).double()
    set_bn_modes(model, draw, draw(st.sampled_from(['train', 'eval', 'mixed'])))
    return Net(model, in_shape, classes, seed, 'flat' if flat else 'image')


FAMILIES = ['cnn7/full', 'cnn7/conv', 'cnn7/none', 'wide_resnet', 'resnext']


@st.composite
def family_nets(draw, dtype=None, widths=(1 / 64, 1 / 32, 1 / 16), big_widths=(1 / 64,)):
    """The three real model families (every CNN-7 BN variant) from build_model, at reduced width on
    small inputs (C x H x W, H and W multiples of 4), rarely the 64x64 (TinyImageNet) variants;
    default or IBP init; BN parameters optionally randomized; BN in train or eval mode."""
    family = draw(st.sampled_from(FAMILIES))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    big = draw(st.integers(0, 7)) == 0
    if big:
        shape, width = (3, 64, 64), draw(st.sampled_from(big_widths))
    else:
        shape = (draw(st.sampled_from([1, 3])), draw(st.sampled_from([4, 8])),
                 draw(st.sampled_from([4, 8])))
        width = draw(st.sampled_from(widths))
    classes = draw(st.integers(2, 5))
    init = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    info = dict(shape=shape, classes=classes,
                mean=tuple(torch.rand(shape[0], generator=g).tolist()),
                std=tuple((torch.rand(shape[0], generator=g) * 0.4 + 0.1).tolist()))
    name, _, bn = family.partition('/')
    cfg = M.Config(model=name, bn=bn or 'full', width=width, ibp_init=init)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = M.build_model(cfg, info)
    params = draw(st.sampled_from(['as built', 'random BN', 'random']))
    if params != 'as built':
        randomize_(model, g, weights=params == 'random')
    dtype = draw(st.sampled_from([torch.float64, torch.float32])) if dtype is None else dtype
    model = model.to(dtype)
    model.train(draw(st.booleans()))
    what = f'{family} width {width} init {"ibp" if init else "default"} ({params}) {dtype}'
    return Net(model, shape, classes, seed, what)


# ----------------------------------------------------------------------------------------------
# The oracle: a plain forward pass with the clean batch's BN statistics frozen in
# ----------------------------------------------------------------------------------------------
def frozen_copy(model, x):
    """A deep copy of `model`, all in eval mode, in which every BN that is in train mode in `model`
    has running_mean / running_var set to the mean / biased variance of its input in the clean
    batch x. The copy is then a pointwise function, the one the bounds must enclose."""
    oracle = copy.deepcopy(model)
    hooks = []
    oracle.worst_cv = 0.0  # largest |mean| / std of a channel at a train-mode BN (cancellation_ok)

    def freeze(bn, inputs):
        t = inputs[0]
        dims = [0] + list(range(2, t.dim()))
        mean = t.mean(dims, keepdim=True)
        var = ((t - mean) ** 2).mean(dims)
        bn.running_mean.copy_(mean.flatten())
        bn.running_var.copy_(var)
        oracle.worst_cv = max(oracle.worst_cv, (mean.flatten().abs() / var.sqrt()).max().item())

    for m in oracle.modules():
        if isinstance(m, BN) and m.training:
            m.eval()
            hooks.append(m.register_forward_pre_hook(freeze))
    try:
        with torch.no_grad():
            oracle(x)
    finally:
        for h in hooks:
            h.remove()
    return oracle.eval()


def layer_values(model, points):
    """(values at the output of every Normalize and at the input of every ReLU, in call order;
    the model output), by forward hooks: the same layers, in the same order, as `pre`."""
    vals, hooks = [], []
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: vals.append(inp[0])))
        elif isinstance(m, M.Normalize):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: vals.append(out)))
    try:
        out = model(points)
    finally:
        for h in hooks:
            h.remove()
    return vals, out


def box_points(c, r, g, vertices=8, uniform=8):
    """(S, N, ...) points of the boxes [c - r, c + r]: the centre, random vertices, uniform
    points."""
    pts = [c]
    for _ in range(vertices):
        pts.append(c + r * (torch.randint(0, 2, c.shape, generator=g) * 2 - 1).to(c.dtype))
    for _ in range(uniform):
        u = torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1
        pts.append(c + r * u.to(c.dtype))
    return torch.stack(pts)


def attack_points(oracle, c, r, bounds, g, restarts=2, steps=5, margin_of=None):
    """Points found by sign-gradient ascent inside the box [c - r, c + r] on a random signed sum of
    every bounded value, each normalized by its bound's radius (pushes neurons to the ends of
    their intervals); with margin_of = y (the labels) the objective is instead a random positive
    combination of minus the margins z_y - z_j. Returns every iterate, (S, N, ...)."""
    lo, up = c - r, c + r
    found = []
    for _ in range(restarts):
        p = c + r * (torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1).to(c.dtype)
        signs = [(torch.randint(0, 2, bc.shape, generator=g) * 2 - 1).to(c.dtype)
                 for bc, _ in bounds]
        for it in range(steps + 1):
            found.append(p.detach())
            if it == steps:
                break
            p = p.detach().requires_grad_(True)
            vals, out = layer_values(oracle, p)
            if margin_of is None:
                obj = sum(((v - bc) / br.clamp_min(1e-12) * s).sum()
                          for v, (bc, br), s in zip(vals + [out], bounds, signs))
            else:
                y = margin_of
                w = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
                obj = -((out.gather(1, y[:, None]) - out) * w).sum()
            grad, = torch.autograd.grad(obj, p)
            p = torch.minimum(torch.maximum(p.detach() + 0.5 * r * grad.sign(), lo), up)
    return torch.stack(found)


def values_at(oracle, pts):
    """Layer values and outputs at points (S, N, ...), each reshaped to (S, N, ...)."""
    s, n = pts.shape[:2]
    with torch.no_grad():
        vals, out = layer_values(oracle, pts.flatten(0, 1))
    return [v.reshape(s, n, *v.shape[1:]) for v in vals], out.reshape(s, n, *out.shape[1:])


def excess(values, c, r):
    """How far the values (S, N, ...) leave the box [c - r, c + r] (N, ...), and the layer's
    scale."""
    lo, up = c - r, c + r
    return torch.maximum(lo - values, values - up).max().item(), (c.abs() + r).max().item()


def assert_inside(values, c, r, what, net=0.0):
    e, scale = excess(values, c, r)
    assert e <= tol_of(c.dtype, scale, net), \
        f'{what}: a point lies {e:.3g} outside its bounds (layer scale {scale:.3g}, ' \
        f'network scale {net:.3g})'


def assert_close(a, b, what, scale=None, net=0.0):
    scale = max(a.abs().max().item(), b.abs().max().item()) if scale is None else scale
    d = (a - b).abs().max().item()
    assert d <= tol_of(a.dtype, scale, net), \
        f'{what}: differs by {d:.3g} (scale {scale:.3g}, network scale {net:.3g})'
