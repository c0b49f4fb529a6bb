"""The rounding-sound IBP pass (sound_margins) encloses exact IBP: at every layer and at the
margins, its float64 bounds contain the bounds of Eq. (3) evaluated in rational arithmetic
(oracles.exact_margins) from the same stored float32 parameters, on tiny random networks (dense;
convolutional with groups, stride, padding, dilation; BN in eval mode with random running
statistics; a Residual block; a Normalize layer), random uint8 images and eps, including weights
far from 1, subnormal eps and images that make every product underflow. (Not test_rounding.py:
that name is the top-level example tests', and pytest cannot import two modules of one name.)
"""
import copy
import math
from fractions import Fraction

import torch
import torch.nn as nn
from hypothesis import example, given, strategies as st

import ibp_short_warmup as M
import prop_support as P
from oracles import exact_forward, exact_margins

# The sound bounds may be looser than the exact ones by at most LOOSENESS times the magnitude of
# the value (magnitudes(): what the network computes with |parameters|): rounding slack is about
# depth * 3 n u of it, never a gross over-widening.
LOOSENESS = 1e-12
EPS = [0.0, 2.0 ** -1074, 1e-310, 1e-12, 1e-3, 0.05, 0.3, 1.5]
TINY_EPS = [0.0, 2.0 ** -1074, 1e-300, 1e-15, 1e-12]  # a box that is nearly a point


@st.composite
def tiny_nets(draw):
    """A dense net, or a conv net (optionally Normalize first, BN after the conv, a Residual
    block), each with an optional hidden Linear [BN1d] ReLU and a classifier; float32 parameters
    drawn at random (BN with random affine and running statistics, eval mode), the weights of each
    layer scaled by a power of two (exact in float32)."""
    seed = draw(st.integers(0, 2 ** 32 - 1), label='seed')
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(['dense', 'conv', 'residual']), label='kind')
    layers = []
    if kind == 'dense':
        shape = (draw(st.integers(1, 4)), 1, 1)
        layers.append(nn.Flatten())
    else:
        shape = (draw(st.integers(1, 2)), 4, 4)
        if draw(st.booleans(), label='normalize'):
            layers.append(M.Normalize(torch.rand(shape[0], generator=g).tolist(),
                                      (torch.rand(shape[0], generator=g) * 0.9 + 0.1).tolist()))
        conv = P._conv(draw, shape[0], shape[1:])  # groups, kernel, stride, padding, dilation
        layers += [conv] + ([nn.BatchNorm2d(conv.out_channels)] if draw(st.booleans()) else [])
        layers.append(nn.ReLU())
        c = conv.out_channels
        if kind == 'residual':
            branch = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 1))
            short = draw(st.sampled_from([nn.Identity(), nn.Sequential(nn.Conv2d(c, c, 1))]))
            layers += [M.Residual(branch, short), nn.ReLU()]
        layers.append(nn.Flatten())
    feat = P._out_shape(layers, shape)[0]
    if draw(st.booleans(), label='hidden layer'):
        h = draw(st.integers(1, 4))
        layers += [nn.Linear(feat, h)] + ([nn.BatchNorm1d(h)] if draw(st.booleans()) else [])
        layers.append(nn.ReLU())
        feat = h
    layers.append(nn.Linear(feat, draw(st.integers(2, 3), label='classes')))
    model = P.randomize_(nn.Sequential(*layers), g).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.0 ** draw(st.sampled_from([0, 0, 0, -30, 30]), label='w scale'))
                if m.bias is not None and draw(st.integers(0, 3)) == 0:
                    m.bias.zero_()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and draw(st.booleans()):
                m.running_var.mul_(draw(st.sampled_from([0.0, 1e-6, 1e6])))  # tiny and huge too
    return P.Net(model, shape, model[-1].out_features, seed, kind)


def draw_batch(data, net):
    """Random images (or all 0, or all 255) and eps; or, in the 'cancelling' case, one constant
    image, a tiny eps, and every bias, BN shift and classifier bias set to cancel the value it is
    added to (cancel_biases_): then each layer's output is ~1e-7 of the terms it sums, so that
    rounding errors are many ulps of the bounds and an under-estimated error bound shows."""
    g = torch.Generator().manual_seed(net.seed + 1)
    if data.draw(st.integers(0, 2), label='cancelling') == 0:
        x8 = torch.randint(0, 256, (1,), generator=g, dtype=torch.uint8).expand(1, *net.shape)
        cancel_biases_(net.model, x8.double() / 255)
        y = torch.randint(0, net.classes, (1,), generator=g)
        return x8.contiguous(), y, data.draw(st.sampled_from(TINY_EPS), label='eps')
    n = data.draw(st.integers(1, 2), label='batch size')
    pixels = data.draw(st.sampled_from(['random', 'zero', 'saturated']), label='pixels')
    x8 = torch.randint(0, 256, (n, *net.shape), generator=g, dtype=torch.uint8)
    x8 = {'random': x8, 'zero': x8 * 0, 'saturated': x8 * 0 + 255}[pixels]
    y = torch.randint(0, net.classes, (n,), generator=g)
    eps = data.draw(st.one_of(st.sampled_from(EPS), st.floats(0, 1)), label='eps')
    return x8, y, eps


def cancel_biases_(model, x):
    """In execution order, set each Conv/Linear bias and BN shift to minus the float32 rounding of
    the value it is added to at the clean input x (its mean over positions), so that the sum
    cancels to float32 precision."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, P.BN)) and m.bias is not None:
            copy64, seen = copy.deepcopy(model).double(), []
            hook = copy64.get_submodule(name).register_forward_hook(lambda *a: seen.append(a[2]))
            with torch.no_grad():
                copy64(x)
                hook.remove()
                out = seen[0] - copy64.get_submodule(name).bias.view(-1, *[1] * (seen[0].dim() - 2))
                m.bias.copy_(-out.mean([0] + list(range(2, out.dim()))))


def magnitudes(model, shape):
    """Bounds of |value| for every box of sound_margins (a list in the same order) and for the
    logits: the network with |W|, |b|, |gamma|, |beta|, -|mean|, |std| on the input 1 (float64;
    >= 0, so the ReLUs pass all), e.g. |w (t - mean) + beta| <= |w| (|t| + |mean|) + |beta|."""
    out = []
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        for m in model.modules():
            for name in ('weight', 'bias', 'std'):
                if getattr(m, name, None) is not None:
                    getattr(m, name).abs_()
            for name in ('running_mean', 'mean'):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    getattr(m, name).abs_().neg_()

        def walk(m, t):
            if isinstance(m, nn.Sequential):
                for layer in m:
                    t = walk(layer, t)
                    out.append(t)
                return t
            if isinstance(m, M.Residual):
                return walk(m.branch, t) + walk(m.shortcut, t)
            return m(t)
        return out, model[-1](walk(model[:-1], torch.ones(1, *shape, dtype=torch.float64)))[0]


def check_lower(a, exact, what, mag):
    """a <= exact (a comparison of rationals), and not much looser."""
    assert not math.isnan(a) and a < math.inf, f'{what}: lower bound {a!r}'
    assert a == -math.inf or Fraction(a) <= exact, f'{what}: lower {a!r} > exact {exact}'
    assert a > -math.inf and exact - Fraction(a) <= LOOSENESS * mag + 1e-300, \
        f'{what}: lower {a!r} looser than {LOOSENESS} * {mag:.3g} (exact {float(exact)!r})'


def underflow_net():
    """Every product underflows: the box [0, 2^-1040] (subnormal), weights 0.9 * 2^-35: each
    product is below half the smallest subnormal and rounds to 0, but the 16 of them sum to -7.2
    subnormals in the exact margin, more than the outward rounding alone would cover."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[-1].weight.copy_(torch.tensor([[0.0] * 16, [0.9 * 2.0 ** -35] * 16]))
        model[-1].bias.zero_()
    return P.Net(model, (16, 1, 1), 2, 0, 'underflow')


def input_rounding_net():
    """The pixel 33, whose x = 33/255 rounds up in float64, and eps = fl(x) - 2^-10: x - eps is
    2^-10 minus that rounding, so that the box's lower end must be rounded down from x before eps
    is subtracted (one ulp of 2^-10 after the subtraction is too little)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    return P.Net(model, (1, 1, 1), 2, 0, 'input rounding')


EXAMPLE_INPUTS = {  # x8, y, eps of the explicit examples
    'underflow': (torch.zeros(1, 16, 1, 1, dtype=torch.uint8), torch.tensor([0]), 2.0 ** -1040),
    'input rounding': (torch.full((1, 1, 1, 1), 33, dtype=torch.uint8), torch.tensor([0]),
                       33 / 255 - 2.0 ** -10),
}


@given(net=tiny_nets(), data=st.data())
@example(net=underflow_net(), data=None)
@example(net=input_rounding_net(), data=None)
def test_sound_pass_encloses_exact_ibp(net, data):
    if data is None:  # an explicit example
        x8, y, eps = EXAMPLE_INPUTS[net.what]
    else:
        x8, y, eps = draw_batch(data, net)
    boxes = []
    with torch.no_grad():
        lb = M.sound_margins(net.model, x8, y, eps, boxes)
    mags, logits_mag = magnitudes(net.model, net.shape)
    for n in range(len(y)):
        exact_boxes, margins = exact_margins(net.model, x8[n], int(y[n]), eps)
        assert len(boxes) == len(exact_boxes) == len(mags), 'a box per module of every Sequential'
        for k, ((lo, up), (elo, eup), mag) in enumerate(zip(boxes, exact_boxes, mags)):
            for i, (a, b, ea, eb, m) in enumerate(zip(lo[n].flatten().tolist(),
                                                      up[n].flatten().tolist(), elo, eup,
                                                      mag.flatten().tolist())):
                check_lower(a, ea, f'sample {n} layer {k} [{i}]', m)
                check_lower(-b, -eb, f'sample {n} layer {k} [{i}] (upper, negated)', m)
        for j, m in enumerate(margins):
            if m is not None:  # only the margin's lower bound is computed
                check_lower(lb[n, j].item(), m, f'sample {n} margin {j}',
                            (logits_mag[int(y[n])] + logits_mag[j]).item())
        # the decision, the point of it all: sound-verified implies exactly verified
        if M.verified(lb[n:n + 1], y[n:n + 1]).item():
            assert all(m > 0 for m in margins if m is not None)


# ---- The induction step alone: each layer's rule encloses Eq. (3) of its float input box -----
# Through a whole network every box has the slack of the layers before it, which hides a small
# under-estimate; a point box (lo = hi) or a box a few ulps wide has none, so that here a
# dropped gamma_n (dot products of up to 64 terms) or an unenclosed BN scale shows.
@st.composite
def single_layers(draw):
    """One layer with random float32 parameters (weights scaled by a power of two), the shape of
    one input, the seed, and no fixed box (the examples below have one)."""
    seed = draw(st.integers(0, 2 ** 32 - 1), label='seed')
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(['linear', 'conv', 'bn1d', 'bn2d', 'normalize', 'residual',
                                 'relu']), label='kind')
    c = draw(st.integers(1, 4), label='channels')
    if kind == 'linear':
        shape = (draw(st.integers(1, 64), label='n'),)
        layer = nn.Linear(shape[0], draw(st.integers(1, 3)))
    elif kind == 'conv':
        shape, layer = (c, 4, 4), P._conv(draw, c, (4, 4))
    elif kind == 'bn1d':
        shape, layer = (c,), nn.BatchNorm1d(c)
    elif kind == 'normalize':
        shape = (c, 2, 2)
        layer = M.Normalize(torch.rand(c, generator=g).tolist(),
                            (torch.rand(c, generator=g) * 0.9 + 0.1).tolist())
    elif kind == 'residual':
        shape, layer = (c, 4, 4), M.Residual(nn.Sequential(nn.Conv2d(c, c, 3, 1, 1)), nn.Identity())
    else:
        shape, layer = (c, 2, 2), nn.BatchNorm2d(c) if kind == 'bn2d' else nn.ReLU()
    P.randomize_(nn.Sequential(layer), g).eval()
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(2.0 ** draw(st.sampled_from([0, 0, -30, 30]), label='w scale'))
                if draw(st.integers(0, 3), label='zero bias') == 0:
                    m.bias.zero_()
            if isinstance(m, P.BN) and draw(st.booleans()):
                m.running_var.mul_(draw(st.sampled_from([0.0, 1e-6, 1e6])))
    return layer, shape, seed, None


def draw_box(data, shape, g):
    """A float64 box: a point, a few ulps wide, wide, or centred on 0 (then an affine layer's
    radius is all |W| r: a long sum of positive terms); values of a drawn magnitude."""
    n = data.draw(st.integers(1, 2), label='batch size')
    scale = 2.0 ** data.draw(st.sampled_from([0, 0, -20, 20, -1030]), label='box scale')
    lo = torch.randn((n, *shape), generator=g, dtype=torch.float64) * scale
    width = data.draw(st.sampled_from(['point', 'ulps', 'wide', 'centred']), label='box width')
    if width == 'point':
        return lo, lo.clone()
    if width == 'centred':
        return -lo.abs(), lo.abs()
    if width == 'ulps':
        return lo, lo + lo.abs() * 2.0 ** -50 * torch.rand(lo.shape, generator=g, dtype=lo.dtype)
    return lo, lo + scale * torch.rand(lo.shape, generator=g, dtype=lo.dtype)


def bn_example():
    """BN1d on a point box where, were w = gamma / sqrt(var + eps) rounded to nearest instead of
    enclosed, the rounding would not be covered by the outward rounding of the steps around it
    (found by a search: about 1 case in 20,000 random ones)."""
    bn = nn.BatchNorm1d(1).eval()
    with torch.no_grad():
        bn.weight.fill_(1.244478702545166)
        bn.bias.fill_(-3.68215274810791)  # -(w t) in float32: the output cancels
        bn.running_mean.zero_()
        bn.running_var.fill_(0.34197789430618286)
    t = torch.tensor([[1.7302931688449026]], dtype=torch.float64)
    return bn, (1,), 0, (t, t.clone())


def residual_example():
    """A Residual block whose branch is the constant 1e-20 and whose shortcut is the point 1: the
    exact sum 1 + 1e-20 rounds to 1, below it, so the sum must be rounded outward."""
    conv = nn.Conv2d(1, 1, 3, 1, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1e-20)
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    return M.Residual(nn.Sequential(conv), nn.Identity()), (1, 4, 4), 0, (x, x.clone())


@given(case=single_layers(), data=st.data())
@example(case=bn_example(), data=None)
@example(case=residual_example(), data=None)
def test_each_layer_rule_encloses_its_exact_image(case, data):
    layer, shape, seed, box = case
    if box is not None:  # an explicit example
        lo, hi = box
    else:
        lo, hi = draw_box(data, shape, torch.Generator().manual_seed(seed + 1))
        if data.draw(st.booleans(), label='cancelling'):
            cancel_biases_(nn.Sequential(layer), lo)
    with torch.no_grad():
        out_lo, out_hi = M.sound_forward(layer, lo, hi, [])
    for n in range(len(lo)):
        elo, eup, _ = exact_forward(layer, [Fraction(v) for v in lo[n].flatten().tolist()],
                                    [Fraction(v) for v in hi[n].flatten().tolist()], shape, [])
        for i, (a, b, ea, eb) in enumerate(zip(out_lo[n].flatten().tolist(),
                                               out_hi[n].flatten().tolist(), elo, eup)):
            assert not (math.isnan(a) or math.isnan(b)), f'sample {n} [{i}]: nan'
            assert a == -math.inf or Fraction(a) <= ea, f'sample {n} [{i}]: lower {a!r} > {ea}'
            assert b == math.inf or eb <= Fraction(b), f'sample {n} [{i}]: upper {b!r} < {eb}'
