"""Soundness of interval bound propagation (paper Eq. 3, BN with clean-batch statistics as in
Sec. 3.3.2), against a plain forward pass.

The oracle is a deep copy of the model run by PyTorch itself, every BN in eval mode and the
train-mode ones frozen to the clean batch's mean and biased variance (prop_support.frozen_copy):
the bounds computed by ibp_forward must enclose its values at every ReLU input, after the input
normalization and at the output, for any point of the box.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

import ibp_short_warmup as M
import prop_support as P

NETS = st.one_of(P.small_nets(), P.family_nets())


def draw_box(data, shape, dtype, seed):
    """A clean batch x in [0, 1] and a box inside [0, 1]: the clipped eps-ball around x (centre
    and radius by input_box) or an arbitrary box (not centred on x) of a drawn width."""
    g = torch.Generator().manual_seed(seed)
    n = data.draw(st.integers(1, 3), label='batch size')
    x = torch.rand((n, *shape), generator=g, dtype=torch.float64).to(dtype)
    if data.draw(st.booleans(), label='eps ball around x'):
        eps = data.draw(st.floats(1e-4, 0.5), label='eps')
        c, r = M.input_box(x, eps)
    else:
        width = data.draw(st.sampled_from([1e-3, 0.1, 1.0]), label='box width')
        lo = torch.rand(x.shape, generator=g, dtype=torch.float64).to(dtype)
        up = lo + (1 - lo) * width * torch.rand(x.shape, generator=g, dtype=torch.float64).to(dtype)
        c, r = (up + lo) / 2, (up - lo) / 2
    return x, c, r, g


def check_enclosed(model, x, c, r, g, attack=True):
    """Runs ibp_forward and checks every bound against the oracle; returns (pre, output box)."""
    oracle = P.frozen_copy(model, x)
    assume(P.cancellation_ok(oracle, c.dtype))
    pre = []
    xo, co, ro = M.ibp_forward(model, x, c, r, pre)
    assert all(len(p) == 2 for p in pre), 'every entry of pre is a box (c, r)'
    bounds = [(bc.detach(), br.detach()) for bc, br in pre + [(co, ro)]]
    net = P.net_scale(bounds)
    with torch.no_grad():
        P.assert_close(xo.detach(), oracle(x),
                       'clean output vs plain forward with clean-batch BN statistics', net=net)
    for k, (bc, br) in enumerate(bounds):
        assert torch.isfinite(bc).all() and torch.isfinite(br).all(), f'bound {k} not finite'
        assert (br >= 0).all(), f'bound {k}: lower > upper (radius {br.min().item():.3g})'
    pts = P.box_points(c, r, g)
    if attack:
        pts = torch.cat([pts, P.attack_points(oracle, c, r, bounds, g)])
    vals, out = P.values_at(oracle, pts)
    assert len(vals) == len(pre), f'{len(pre)} pre entries for {len(vals)} Normalize/ReLU layers'
    for k, (v, (bc, br)) in enumerate(zip(vals + [out], bounds)):
        P.assert_inside(v, bc, br, 'output' if k == len(vals) else f'pre[{k}]', net)
    return bounds


@given(net=P.small_nets(), data=st.data())
def test_random_nets_bounds_enclose_every_layer(net, data):
    """Random points, random vertices and gradient-ascent points of a box never leave the bounds of
    any layer of a random network (BN in train, eval or mixed mode); lower <= upper."""
    x, c, r, g = draw_box(data, net.shape, torch.float64, net.seed)
    check_enclosed(net.model, x, c, r, g)


@settings(max_examples=max(4, settings().max_examples // 2))
@given(net=P.family_nets(), data=st.data())
def test_model_families_bounds_enclose_every_layer(net, data):
    """The same for CNN-7 (every BN variant), Wide-ResNet and ResNeXt at reduced width, in float64
    and float32, with the eps-ball inputs of training."""
    dtype = next(net.model.parameters()).dtype
    x, c, r, g = draw_box(data, net.shape, dtype, net.seed)
    check_enclosed(net.model, x, c, r, g, attack=data.draw(st.booleans(), label='attack'))


@given(net=NETS, data=st.data())
def test_nested_boxes_give_nested_bounds(net, data):
    """A sub-box of a box (same clean batch, so the same BN statistics) has bounds inside the box's
    bounds at every layer; a box of width 0 (a point) has radius 0 everywhere, centred on the
    oracle's value there."""
    dtype = next(net.model.parameters()).dtype
    x, c2, r2, g = draw_box(data, net.shape, dtype, net.seed)
    lo2, up2 = c2 - r2, c2 + r2
    point = data.draw(st.integers(0, 3), label='point box') == 0
    a = lo2 + (up2 - lo2) * torch.rand(x.shape, generator=g, dtype=torch.float64).to(dtype)
    u = torch.rand(x.shape, generator=g, dtype=torch.float64).to(dtype)
    b = a if point else lo2 + (up2 - lo2) * u
    lo1, up1 = torch.minimum(a, b), torch.maximum(a, b)
    c1, r1 = (up1 + lo1) / 2, (up1 - lo1) / 2
    oracle = P.frozen_copy(net.model, x)
    assume(P.cancellation_ok(oracle, dtype))
    with torch.no_grad():
        pre2, pre1 = [], []
        out2 = M.ibp_forward(net.model, x, c2, r2, pre2)[1:]
        out1 = M.ibp_forward(net.model, x, c1, r1, pre1)[1:]
        vals, out = P.layer_values(oracle, c1)
    net = P.net_scale(pre2 + [out2])
    for k, ((bc1, br1), (bc2, br2)) in enumerate(zip(pre1 + [out1], pre2 + [out2])):
        scale = (bc2.abs() + br2).max().item()
        t = P.tol_of(dtype, scale, net)
        assert ((bc1 - br1) >= (bc2 - br2) - t).all(), \
            f'layer {k}: lower bound of the sub-box below the box\'s'
        assert ((bc1 + br1) <= (bc2 + br2) + t).all(), \
            f'layer {k}: upper bound of the sub-box above the box\'s'
        if point:
            assert (br1 == 0).all(), f'layer {k}: a point box has radius {br1.max().item():.3g}'
            P.assert_close(bc1, (vals + [out])[k], f'layer {k}: point box centre vs oracle',
                           scale=scale, net=net)


@given(net=NETS, data=st.data())
def test_margin_lower_bounds_are_sound_and_exact_at_the_last_layer(net, data):
    """ibp_margins: lb <= z_y - z_j at sampled, vertex and attacked points of the eps-box; lb = 0 at
    j = y; lb equals the exact minimum of (W_y - W_j) h + b_y - b_j over the penultimate box (the
    margin matrix C folded into the last layer, Sec. 2); at least as tight as bounding logits and
    subtracting; a larger eps never raises lb; the clean logits are the oracle's."""
    model = net.model
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(net.seed)
    n = data.draw(st.integers(1, 3), label='batch size')
    x = torch.rand((n, *net.shape), generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, net.classes, (n,), generator=g)
    eps = data.draw(st.floats(1e-4, 0.4), label='eps')
    oracle = P.frozen_copy(model, x)
    assume(P.cancellation_ok(oracle, dtype))
    with torch.no_grad():
        logits, lb = M.ibp_margins(model, x, y, eps)
        assert (lb.gather(1, y[:, None]) == 0).all(), 'lb at j = y is not 0'
        c, r = M.input_box(x, eps)
        pre = []
        _, ch, rh = M.ibp_forward(model[:-1], x, c, r, pre)
        net = P.net_scale(pre + [(ch, rh)])
        P.assert_close(logits, oracle(x), 'clean logits', net=net)
        w, b = model[-1].weight, model[-1].bias
        d = w[y][:, None, :] - w[None]  # (N, K, d): rows W_y - W_j
        h_min = ch[:, None, :] - rh[:, None, :] * d.sign()  # the vertex that minimizes each margin
        exact = (d * h_min).sum(-1) + b[y][:, None] - b[None]
        scale = ((d.abs() * (ch.abs() + rh)[:, None, :]).sum(-1) + b.abs().max()).max().item()
        tol = P.tol_of(dtype, scale, net)
        P.assert_close(lb, exact, 'lb vs the exact last-layer margin bound', scale=scale, net=net)
        zc, zr = F.linear(ch, w, b), F.linear(rh, w.abs())
        naive = (zc - zr).gather(1, y[:, None]) - (zc + zr)
        assert (lb >= naive - tol).all(), 'lb looser than logit bounds subtracted'
        wider = eps * data.draw(st.floats(1, 3), label='eps factor')
        lb_wider = M.ibp_margins(model, x, y, wider)[1]
        assert (lb_wider <= lb + tol).all(), 'a larger eps raised a margin bound'
    pts = torch.cat([P.box_points(c, r, g), P.attack_points(oracle, c, r, [], g, margin_of=y)])
    _, out = P.values_at(oracle, pts)
    true = out.gather(2, y[None, :, None].expand(out.shape[0], -1, 1)) - out
    e = (lb[None] - true).max().item()
    assert e <= tol, f'lb exceeds a true margin by {e:.3g} (tolerance {tol:.3g})'


# ----------------------------------------------------------------------------------------------
# Each layer's rule alone: the box it returns is the exact range of the layer over the input box
# ----------------------------------------------------------------------------------------------
@st.composite
def single_layers(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(['linear', 'conv', 'bn1d', 'bn2d', 'relu', 'normalize', 'flatten',
                                 'identity']))
    image = (draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    if kind == 'linear':
        shape = (draw(st.integers(1, 8)),)
        layer = nn.Linear(shape[0], draw(st.integers(1, 6)))
    elif kind == 'conv':
        shape, layer = image, P._conv(draw, image[0], image[1:])
    elif kind == 'bn1d':
        shape = draw(st.sampled_from([(3,), (2, 4)]))
        layer = nn.BatchNorm1d(shape[0])
    elif kind == 'bn2d':
        shape, layer = image, nn.BatchNorm2d(image[0])
    elif kind == 'normalize':
        shape = image
        layer = M.Normalize(torch.rand(image[0], generator=g).tolist(),
                            (torch.rand(image[0], generator=g) + 0.1).tolist())
    else:
        shape = draw(st.sampled_from([(5,), image]))
        layer = {'relu': nn.ReLU, 'flatten': nn.Flatten, 'identity': nn.Identity}[kind]()
    P.randomize_(layer, g)
    layer = layer.double().train(draw(st.booleans()))
    return kind, layer, shape, seed


@given(case=single_layers())
def test_each_layer_rule_returns_the_exact_range(case):
    """For one Linear, Conv2d (groups/stride/padding/dilation), BN (train: clean-batch statistics;
    eval: running statistics), ReLU, Normalize, Flatten or Identity, the output box is exactly the
    range of the layer over the input box: f(c) +- |J| r for the affine ones (J the Jacobian of the
    oracle, by autograd), [relu(l), relu(u)] for the ReLU."""
    kind, layer, shape, seed = case
    g = torch.Generator().manual_seed(seed)
    n = 1 + seed % 3
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    c = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    r = torch.rand((n, *shape), generator=g, dtype=torch.float64)
    oracle = P.frozen_copy(layer, x)
    with torch.no_grad():
        _, co, ro = M.ibp_forward(layer, x, c, r)
    if kind == 'relu':
        lo, up = F.relu(c - r), F.relu(c + r)
    else:
        with torch.no_grad():
            fc = oracle(c)
        jac = torch.autograd.functional.jacobian(oracle, c).reshape(fc.numel(), c.numel())
        spread = (jac.abs() @ r.flatten()).reshape(fc.shape)
        lo, up = fc - spread, fc + spread
    assert co.shape == lo.shape and ro.shape == lo.shape, \
        f'shape {tuple(co.shape)} vs {tuple(lo.shape)}'
    scale = (lo.abs() + up.abs()).max().item()
    P.assert_close(co - ro, lo, f'{kind}: lower bound vs exact minimum', scale=scale)
    P.assert_close(co + ro, up, f'{kind}: upper bound vs exact maximum', scale=scale)


# ----------------------------------------------------------------------------------------------
# BN in training mode: statistics of the clean batch, running statistics as nn.BatchNorm's
# ----------------------------------------------------------------------------------------------
@given(net=NETS, data=st.data())
def test_bn_running_statistics_updated_as_pytorch_does(net, data):
    """After ibp_forward, every BN's running_mean, running_var and num_batches_tracked equal those
    of a copy run through PyTorch's own forward on the clean batch (train-mode BNs updated with the
    unbiased variance, eval-mode ones untouched)."""
    dtype = next(net.model.parameters()).dtype
    g = torch.Generator().manual_seed(net.seed)
    n = data.draw(st.integers(2, 3), label='batch size')
    x = torch.rand((n, *net.shape), generator=g, dtype=torch.float64).to(dtype)
    ref = copy.deepcopy(net.model)
    with torch.no_grad():
        ref(x)
        M.ibp_forward(net.model, x, *M.input_box(x, 0.01))
    for (name, a), b in zip(net.model.named_modules(), ref.modules()):
        if isinstance(a, P.BN):
            P.assert_close(a.running_mean, b.running_mean, f'{name}.running_mean')
            P.assert_close(a.running_var, b.running_var, f'{name}.running_var')
            assert a.num_batches_tracked.item() == b.num_batches_tracked.item(), \
                f'{name}.num_batches_tracked'


@settings(max_examples=max(4, settings().max_examples // 2))
@given(net=P.small_nets(), data=st.data())
def test_bn_statistics_carry_gradients(net, data):
    """The train-mode BN statistics are not detached (Sec. 3.3.2): the gradients of the clean output
    and of both bounds with respect to the clean batch x (which reaches the bounds only through the
    statistics) pass torch.autograd.gradcheck."""
    assume(any(isinstance(m, P.BN) and m.training for m in net.model.modules()))
    g = torch.Generator().manual_seed(net.seed)
    x = torch.rand((2, *net.shape), generator=g, dtype=torch.float64)
    c, r = M.input_box(x, data.draw(st.floats(1e-3, 0.2), label='eps'))
    x.requires_grad_(True)
    f = lambda t: torch.cat([o.flatten() for o in M.ibp_forward(net.model, t, c, r)])
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True, **P.FD)


@given(x=st.lists(st.floats(0, 1), min_size=1, max_size=20), eps=st.floats(0, 2))
def test_input_box_is_the_eps_ball_clipped_to_the_pixel_range(x, eps):
    """input_box(x, eps) is [max(x - eps, 0), min(x + eps, 1)] in centre-radius form."""
    t = torch.tensor(x, dtype=torch.float64)
    c, r = M.input_box(t, eps)
    lo = torch.tensor([max(v - eps, 0.0) for v in x], dtype=torch.float64)
    up = torch.tensor([min(v + eps, 1.0) for v in x], dtype=torch.float64)
    assert (r >= 0).all()
    P.assert_close(c - r, lo, 'lower end', scale=1.0)
    P.assert_close(c + r, up, 'upper end', scale=1.0)
