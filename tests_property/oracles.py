"""The tolerance table and the oracles shared by the top-level tests and the property tests.

Nothing here copies ibp_short_warmup: the regularizer oracle is the paper's Eq. (7) and (8)
written out in plain Python floats, neuron by neuron; interval_radii is Eq. (3) in the paper's
lower/upper form; the exact IBP oracle is Eq. (3) in rational arithmetic (fractions.Fraction),
output by output; the tolerances say how far a value computed by the code may be from its
oracle, per dtype.
"""
import math
import types
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Tolerances, named once ------------------------------------------------------------------
# A value may differ from its oracle (or leave its bounds) by at most
# atol + rtol * (its scale, e.g. the largest |centre| + radius of its layer)
#      + rtol_net * (the same, largest over the whole network): rounding met upstream (radii of
# 1e9 behind a BN layer with a zero batch variance, whose c + r then cancels at a ReLU) reaches
# later, smaller layers. float64 is used for everything worked by hand or compared with a plain
# forward pass; float32 only where the code itself runs in float32 (training, certification).
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10, rtol_net=1e-13),
    torch.float32: dict(rtol=1e-4, atol=1e-5, rtol_net=1e-5),
}

# Finite differences of the whole training objective (torch.autograd.gradcheck, float64): the step
# and the tolerances of gradcheck's comparison. No bound of a ReLU input (nor a clean ReLU input,
# a ratio of Eq. (7)/(8) against tau or 1) may lie within KINK_MARGIN of its kink, so that a step
# never crosses one.
FD = dict(eps=1e-6, atol=1e-5, rtol=1e-3)
KINK_MARGIN = 100 * FD['eps']

# Weight statistics at initialization (Sec. 3.3.1): a statistic of k i.i.d. weights may be Z of
# its standard errors away from its expectation.
Z = 5.0
HALF_NORMAL_CV = math.sqrt(math.pi / 2 - 1)  # sd / mean of |N(0, s^2)|
GAIN_TOL = 0.15  # relative, a measured difference gain E(Delta_i)/E(Delta_{i-1}) (noise < 3%)
GAIN_EQ6_TOL = 0.05  # relative, Eq. (6)'s n/2 E|W| of >= 432 drawn weights vs its expectation
PARAM_COUNT_TOL = 0.01  # relative, a model's parameter count vs the one quoted to 3 digits


def tol_of(dtype, scale=0.0, net_scale=0.0):
    """The allowed difference for values of magnitude `scale` (a number or a tensor)."""
    t = TOL[dtype]
    return t['atol'] + t['rtol'] * scale + t['rtol_net'] * net_scale


def abs_mean_tol(k, cv=HALF_NORMAL_CV):
    """Relative deviation allowed for the mean |W| of k i.i.d. weights (cv = sd / mean of |W|)."""
    return Z * cv / math.sqrt(k)


def mean_tol(sigma, k):
    """Absolute deviation allowed for the mean of k i.i.d. zero-mean weights of sd sigma."""
    return Z * sigma / math.sqrt(k)


def std_tol(k, kurtosis=3.0):
    """Relative deviation allowed for the sample standard deviation of k i.i.d. weights (Z standard
    errors; kurtosis 3 for a normal distribution, 1.8 for a uniform one)."""
    return Z * math.sqrt((kurtosis - 1) / (4 * k))


# ---- Warmup regularizers, Eq. (7) and (8) ----------------------------------------------------
DIV_GUARD = 1e-12  # E(Delta_i) is taken as at least this (the paper leaves 0 / 0 undefined)


def regularizer_oracle(pre, tau):
    """Eq. (7) and (8) on the boxes pre = [(c_0, r_0), ..., (c_m, r_m)] (pre[0] the normalized input
    box, pre[i] the box at the input of ReLU layer i; each pooled over the batch and the layer),
    in Python floats. Returns a namespace with
      tightness, relu: L_tightness and L_relu;
      terms: per layer i, its ReLU(.) terms (tightness, alpha, beta), alpha and beta None where the
        layer's ReLU term is skipped;
      ratios: every ratio the constraints ask to be >= tau (E(Delta_0)/E(Delta_i),
        min(alpha, 1/alpha), min(beta, 1/beta));
      smallest: the smallest denominator of alpha and beta (to set degenerate ones aside);
      states: per layer the fractions of active (l > 0), inactive (u < 0) and unstable neurons
        (Figure 2)."""
    flat = [(c.detach().flatten().tolist(), r.detach().flatten().tolist()) for c, r in pre]
    d0 = sum(flat[0][1]) / len(flat[0][1])
    terms, ratios, smallest, states = [], [], math.inf, []
    for c, r in flat[1:]:
        di = sum(r) / len(r)
        ratio = d0 / max(di, DIV_GUARD)
        ratios.append(ratio)
        layer = [max(0.0, tau - ratio), None, None]
        act = [i for i in range(len(c)) if c[i] - r[i] > 0]
        inact = [i for i in range(len(c)) if c[i] + r[i] < 0]
        states.append([len(act) / len(c), len(inact) / len(c),
                       1 - (len(act) + len(inact)) / len(c)])
        # A one-sided layer (only active, or only inactive, stable neurons) has alpha = 0 or
        # infinity: min(alpha, 1/alpha) = 0 and each term is tau. Only a layer with neither kind
        # (alpha = 0/0, undefined) adds nothing.
        if act or inact:
            mu = sum(c) / len(c)
            pairs = [(sum(c[i] for i in act), -sum(c[i] for i in inact)),
                     (sum((c[i] - mu) ** 2 for i in act), sum((c[i] - mu) ** 2 for i in inact))]
            for k, (p, q) in enumerate(pairs):
                smallest = min(smallest, max(p, q))
                ratio = min(p / q, q / p) if p > 0 and q > 0 else 0.0  # min(alpha, 1/alpha)
                ratios.append(ratio)
                layer[1 + k] = max(0.0, tau - ratio)
        terms.append(layer)
    m = len(flat) - 1
    tight = sum(t for t, _, _ in terms) / (tau * m)
    relu = sum((a or 0.0) + (b or 0.0) for _, a, b in terms) / (tau * m)
    return types.SimpleNamespace(tightness=tight, relu=relu, terms=terms, ratios=ratios,
                                 smallest=smallest, states=states)


# ---- Fan-in: the n_i of Eq. (5) and (6) ------------------------------------------------------
def fan_in_of(layer):
    """The number of inputs of one output of a Linear or Conv2d, from the layer's attributes:
    in_features, or (in_channels / groups) x the kernel's area."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


# ---- Bounds by lower/upper interval arithmetic (Eq. 3 as the paper writes it) -----------------
def interval_radii(model, x, eps):
    """Mean box half-width after Normalize and at every ReLU input of a plain Sequential (Normalize,
    Conv2d, Linear, ReLU, Flatten; no BN), by Eq. (3) as the paper writes it: W+ and W- applied to
    the lower and upper bounds. The code under test uses the centre-radius form instead."""
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    means = []
    for m in model[:-1]:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            f = (lambda t, w, b: F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups)) \
                if isinstance(m, nn.Conv2d) else F.linear
            wp, wn = m.weight.clamp(min=0), m.weight.clamp(max=0)
            lo, up = f(lo, wp, m.bias) + f(up, wn, None), f(up, wp, m.bias) + f(lo, wn, None)
        elif isinstance(m, nn.ReLU):
            means.append(((up - lo) / 2).mean().item())
            lo, up = F.relu(lo), F.relu(up)
        elif isinstance(m, nn.Flatten):
            lo, up = lo.flatten(1), up.flatten(1)
        else:  # Normalize: (x - mean) / std with std > 0, monotone
            assert type(m).__name__ == 'Normalize', m
            lo, up = m(lo), m(up)
            means.append(((up - lo) / 2).mean().item())
    return means


# ---- Exact interval bound propagation, Eq. (3), in rational arithmetic -----------------------
# Every float is a rational, so fractions.Fraction evaluates IBP without rounding from the stored
# parameters. Eq. (3) is written out as lo' = W+ lo + W- up + b, up' = W+ up + W- lo + b, one output
# at a time. A box is a pair of flat lists (one sample, C order) and its shape. The one irrational
# step, BN's sqrt(var + eps), is enclosed by integer square roots to 2^-SQRT_BITS: the boxes are
# then the exact ones widened by about 2^-SQRT_BITS relative, far below a float64 ulp (2^-52).
SQRT_BITS = 100


def exact(t):
    """A tensor's values as a flat list of Fractions (float32 -> float64 -> Fraction: exact)."""
    return [Fraction(v) for v in t.detach().double().flatten().tolist()]


def sqrt_bounds(v):
    """Rationals lo <= sqrt(v) <= hi for a rational v >= 0: isqrt(n) = floor(sqrt(n))."""
    scale = 4 ** SQRT_BITS
    return (Fraction(math.isqrt(math.floor(v * scale)), 2 ** SQRT_BITS),
            Fraction(math.isqrt(math.ceil(v * scale)) + 1, 2 ** SQRT_BITS))


def exact_affine(lo, up, rows, bias):
    """Eq. (3) for an affine layer; rows[o] = {input index: weight} (the non-zero weights)."""
    out_lo, out_up = [], []
    for row, b in zip(rows, bias):
        low = high = b
        for i, w in row.items():
            low += w * (lo[i] if w > 0 else up[i])
            high += w * (up[i] if w > 0 else lo[i])
        out_lo.append(low)
        out_up.append(high)
    return out_lo, out_up


def conv_rows(conv, shape):
    """The rows of an nn.Conv2d (zero padding, stride, dilation, groups) on inputs of shape
    (C, H, W), written from its definition, and the output shape."""
    cin, h, w = shape
    cout, per_group, kh, kw = conv.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    weight = conv.weight.detach().double().tolist()
    rows = []
    for o in range(cout):
        first = o // (cout // conv.groups) * per_group  # first input channel of o's group
        for i in range(oh):
            for j in range(ow):
                row = {}
                for ci in range(per_group):
                    for a in range(kh):
                        for b in range(kw):
                            y, x = i * sh - ph + a * dh, j * sw - pw + b * dw
                            if 0 <= y < h and 0 <= x < w:  # a padded input contributes 0
                                row[((first + ci) * h + y) * w + x] = Fraction(weight[o][ci][a][b])
                rows.append(row)
    return rows, (cout, oh, ow)


def exact_forward(module, lo, up, shape, boxes):
    """Exact Eq. (3) through `module` (eval mode), appending the box after every module of every
    Sequential to `boxes` (the order of a depth-first walk). Returns (lo, up, shape)."""
    import ibp_short_warmup as M  # only for its two module classes, Normalize and Residual
    per_channel = math.prod(shape[1:])  # consecutive elements of one channel
    if isinstance(module, nn.Sequential):
        for layer in module:
            lo, up, shape = exact_forward(layer, lo, up, shape, boxes)
            boxes.append((lo, up))
        return lo, up, shape
    if isinstance(module, nn.Linear):
        rows = [{i: w for i, w in enumerate(exact(row))} for row in module.weight]
        bias = exact(module.bias) if module.bias is not None else [Fraction(0)] * len(rows)
        return (*exact_affine(lo, up, rows, bias), (len(rows),))
    if isinstance(module, nn.Conv2d):
        rows, out = conv_rows(module, shape)
        b = exact(module.bias) if module.bias is not None else [Fraction(0)] * out[0]
        return (*exact_affine(lo, up, rows, [b[k // (out[1] * out[2])] for k in range(len(rows))]),
                out)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        # t -> w (t - mean) + beta, w = gamma / sqrt(var + eps) in [w_lo, w_hi]: the corners
        gamma, beta, mean, var = (exact(p) for p in (module.weight, module.bias,
                                                     module.running_mean, module.running_var))
        out_lo, out_up = [], []
        for k in range(len(lo)):
            ch = k // per_channel
            s_lo, s_hi = sqrt_bounds(var[ch] + Fraction(module.eps))
            ws = (gamma[ch] / s_lo, gamma[ch] / s_hi)
            corners = [w * (t - mean[ch]) for w in ws for t in (lo[k], up[k])]
            out_lo.append(min(corners) + beta[ch])
            out_up.append(max(corners) + beta[ch])
        return out_lo, out_up, shape
    if isinstance(module, M.Normalize):
        mean, std = exact(module.mean), exact(module.std)
        pairs = [((lo[k] - mean[k // per_channel]) / std[k // per_channel],
                  (up[k] - mean[k // per_channel]) / std[k // per_channel]) for k in range(len(lo))]
        return [min(p) for p in pairs], [max(p) for p in pairs], shape
    if isinstance(module, nn.ReLU):
        return [max(v, 0) for v in lo], [max(v, 0) for v in up], shape
    if isinstance(module, M.Residual):  # Eq. (3) for a sum: lowers add, uppers add
        lb, ub, out = exact_forward(module.branch, lo, up, shape, boxes)
        ls, us, _ = exact_forward(module.shortcut, lo, up, shape, boxes)
        return [a + b for a, b in zip(lb, ls)], [a + b for a, b in zip(ub, us)], out
    if isinstance(module, nn.Flatten):
        return lo, up, (len(lo),)
    if isinstance(module, nn.Identity):
        return lo, up, shape
    raise TypeError(f'no exact rule for {type(module).__name__}')


def exact_margins(model, x8, y, eps):
    """Exact IBP of one sample (uint8 pixels x8, label y): the input box [max(0, x8/255 - eps),
    min(1, x8/255 + eps)] with eps the float64 value, the boxes of model[:-1] (as exact_forward),
    and the lower bounds of the margins z_y - z_j through the folded rows W_y - W_j (Eq. (3)),
    None at j = y."""
    e = Fraction(eps)
    pix = [Fraction(int(v), 255) for v in x8.flatten().tolist()]
    lo, up = [max(p - e, 0) for p in pix], [min(p + e, 1) for p in pix]
    boxes = []
    lo, up, _ = exact_forward(model[:-1], lo, up, tuple(x8.shape), boxes)
    weight = [exact(row) for row in model[-1].weight]
    bias = exact(model[-1].bias)
    margins = []
    for j in range(len(weight)):
        rows = [{i: a - b for i, (a, b) in enumerate(zip(weight[y], weight[j]))}]
        margins.append(None if j == y else exact_affine(lo, up, rows, [bias[y] - bias[j]])[0][0])
    return boxes, margins
