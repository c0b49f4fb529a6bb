"""IBP initialization (paper Sec. 3.3.1, Eq. 6): the difference gain at initialization.

The oracle is the paper's analysis: a box centred at 0 with mean width E(Delta_{i-1}), through a
ReLU (so E(delta) = E(Delta)/2) and a layer with fan-in n, has mean width n/2 E|W| E(Delta_{i-1}):
1 for N(0, (sqrt(2 pi)/n)^2), sqrt(n)/4 for PyTorch's default U(+-1/sqrt(n)), sqrt(n/pi) for
Kaiming normal. The residual calibration is checked against the data flow of a forward pass.
"""
import math

import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import ibp_short_warmup as M
import prop_support as P
from oracles import GAIN_TOL, abs_mean_tol, fan_in_of, mean_tol, std_tol


@st.composite
def affine_layers(draw):
    """A Linear with fan-in 64..4096, or a Conv2d with various channels, groups, kernels, strides
    (padding 0, so every output sees a full receptive field); at least 2048 weights."""
    seed = draw(st.integers(0, 2 ** 32 - 1))
    if draw(st.booleans()):
        n = draw(st.integers(64, 4096))
        out = max(draw(st.integers(1, 32)), math.ceil(2048 / n))
        make, in_shape = (lambda: nn.Linear(n, out)), (n,)
    else:
        cin = draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
        groups = draw(st.sampled_from([d for d in (1, 2, 4) if cin % d == 0]))
        k, s = draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 2))
        n = cin // groups * k * k
        cout = groups * max(draw(st.integers(1, 8)), math.ceil(2048 / (n * groups)))
        hw = k + s * draw(st.integers(1, 3))  # >= 2 x 2 outputs: the strides skip no more than that
        make, in_shape = (lambda: nn.Conv2d(cin, cout, k, s, 0, groups=groups)), (cin, hw, hw)
    return make, in_shape, n, seed


def measured_gain(layer, in_shape, seed):
    """E(Delta_i) / E(Delta_{i-1}) through ReLU -> layer, by ibp_forward, for boxes centred at 0."""
    g = torch.Generator().manual_seed(seed)
    c = torch.zeros(16, *in_shape)
    scale = 10 ** float(torch.randint(-2, 3, (), generator=g))
    r = (torch.rand(c.shape, generator=g) * 0.4 + 0.8) * scale
    pre = []
    with torch.no_grad():
        _, _, r_out = M.ibp_forward(nn.Sequential(nn.ReLU(), layer), c, c, r, pre)
    assert len(pre) == 1
    return (r_out.mean() / pre[0][1].mean()).item()


@given(case=affine_layers())
def test_difference_gain_of_a_layer_at_initialization(case):
    """Measured gain ~1 after ibp_init_, ~sqrt(n)/4 with PyTorch's default init, ~sqrt(n/pi) with
    Kaiming normal, each within GAIN_TOL."""
    make, in_shape, n, seed = case
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layer = make()
        default = measured_gain(layer, in_shape, seed)
        out = layer.weight.shape[0]
        # (the classifier, last, is never redrawn)
        M.ibp_init_(nn.Sequential(layer, nn.Flatten(), nn.Linear(out, 2)))
        ibp = measured_gain(layer, in_shape, seed)
        nn.init.kaiming_normal_(layer.weight)
        kaiming = measured_gain(layer, in_shape, seed)
    assert abs(ibp - 1) <= GAIN_TOL, f'IBP init gain {ibp:.3f}, expected 1 (fan-in {n})'
    assert abs(default / (math.sqrt(n) / 4) - 1) <= GAIN_TOL, \
        f'default gain {default:.3f} vs sqrt(n)/4 = {math.sqrt(n) / 4:.3f}'
    assert abs(kaiming / math.sqrt(n / math.pi) - 1) <= GAIN_TOL, \
        f'Kaiming gain {kaiming:.3f} vs sqrt(n/pi)'


def fed_by_relu_of_add(model, shape):
    """ids of the conv/linear layers whose input tensor is ReLU(Residual output), found by following
    the tensors of one forward pass (the dense layer after Flatten sees a new tensor: excluded,
    as the residual calibration of the authors' release has it)."""
    res_out, relu_out, found, hooks = [], [], set(), []
    for m in model.modules():
        if isinstance(m, M.Residual):
            hooks.append(m.register_forward_hook(lambda mod, i, o: res_out.append(o)))
        elif isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o: relu_out.append(o) if any(i[0] is t for t in res_out) else None))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, i: found.add(id(mod)) if any(i[0] is t for t in relu_out) else None))
    try:
        with torch.no_grad():
            model.eval()(torch.rand(2, *shape))
    finally:
        for h in hooks:
            h.remove()
    return found


@settings(max_examples=max(6, settings().max_examples // 2))
@given(family=st.sampled_from(P.FAMILIES), big=st.booleans(), width=st.sampled_from([0.125, 0.25]),
       seed=st.integers(0, 2 ** 32 - 1))
def test_ibp_init_of_the_model_families(family, big, width, seed):
    """build_model with ibp_init: every conv/linear weight but the classifier's ~ N(0, sigma^2),
    sigma = sqrt(2 pi)/n_i (gain n_i/2 E|W| = 1), halved for layers whose input is ReLU(add)
    (gain 1/2); the classifier, the biases and BN keep PyTorch's defaults."""
    shape = (3, 64, 64) if big else (3, 8, 8)
    width = width / 2 if big else width
    info = dict(shape=shape, classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    name, _, bn = family.partition('/')
    cfgs = [M.Config(model=name, bn=bn or 'full', width=width, ibp_init=i) for i in (False, True)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = M.build_model(cfgs[0], info)
        torch.manual_seed(seed)
        model = M.build_model(cfgs[1], info)
    halved = fed_by_relu_of_add(model, shape)
    affine = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert affine[-1] is model[-1], 'the classifier is not the last affine layer'
    if name != 'cnn7':
        assert halved, 'a residual network without any layer fed by ReLU(add)'
    for i, m in enumerate(affine[:-1]):
        w, n = m.weight.detach().double(), fan_in_of(m)
        k = w.numel()
        expect = 0.5 if id(m) in halved else 1.0
        gain = n / 2 * w.abs().mean().item()
        assert abs(gain / expect - 1) <= abs_mean_tol(k), \
            f'layer {i} {m}: gain n/2 E|W| = {gain:.3f}, expected {expect} ({k} weights)'
        sigma = math.sqrt(2 * math.pi) / n * expect
        assert abs(w.std().item() / sigma - 1) <= std_tol(k), \
            f'layer {i}: std {w.std().item():.3g} vs {sigma:.3g}'
        assert abs(w.mean().item()) <= mean_tol(sigma, k), f'layer {i}: mean {w.mean().item():.3g}'
    for (name_a, a), b in zip(model.named_parameters(), ref.parameters()):
        redrawn = name_a.endswith('weight') and any(a is m.weight for m in affine[:-1])
        if not redrawn:
            assert torch.equal(a, b), f'{name_a} changed by ibp_init_'
