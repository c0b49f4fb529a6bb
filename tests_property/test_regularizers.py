"""Warmup regularizers (paper Sec. 3.3.3, Eq. 7 and 8) on arbitrary bounds and on real ones.

The oracle is the paper's formulas written out in plain Python floats (float64), layer by layer:
oracles.regularizer_oracle, shared with the top-level tests.
"""
import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import ibp_short_warmup as M
import prop_support as P
from oracles import regularizer_oracle

SHAPES = [(), (3,), (2, 2), (2, 1, 3)]  # per-example shapes of a layer (plus the batch dimension)
taus = st.floats(0.01, 1.0)


def check_each_term(pre, tau):
    """Each ReLU(.) term of Eq. (7) and Eq. (8) lies in [0, tau].

    The code's terms, layer by layer: warmup_regularizers on [pre[0], pre[i]] alone (m = 1) is
    ReLU(tau - E(Delta_0)/E(Delta_i)) / tau and (alpha term + beta term) / tau, so tau times its
    values are layer i's tightness term and the sum of its two ReLU terms. The tightness term is
    checked in [0, tau] as the code computes it; the alpha and beta terms, which the code only
    returns summed, are the oracle's, each checked in [0, tau] and their sum against the code's.
    Also: L_tightness and L_relu of all m layers are 1/(tau m) times the sums of these terms."""
    oracle = regularizer_oracle(pre, tau)
    lt, lr, _ = M.warmup_regularizers(pre, tau)
    tol = P.tol_of(lt.dtype, tau)
    tight_sum, pair_sum = 0.0, 0.0
    for i, (layer, (t_o, a_o, b_o)) in enumerate(zip(pre[1:], oracle.terms), 1):
        one_t, one_r, _ = M.warmup_regularizers([pre[0], layer], tau)
        tight, pair = tau * one_t.item(), tau * one_r.item()
        assert math.isfinite(tight) and math.isfinite(pair), f'layer {i}: {tight}, {pair}'
        assert -tol <= tight <= tau + tol, f'layer {i}: tightness term {tight} outside [0, {tau}]'
        assert -tol <= pair <= 2 * tau + tol, f'layer {i}: alpha + beta terms {pair} > 2 tau'
        for name, v in (('tightness', t_o), ('alpha', a_o), ('beta', b_o)):
            assert v is None or 0 <= v <= tau, f'layer {i}: oracle {name} term {v}'
        if oracle.smallest > 1e-9:  # no degenerate ratio: the code's pair is the oracle's
            assert abs(pair - (a_o or 0.0) - (b_o or 0.0)) <= tol, \
                f'layer {i}: alpha + beta terms {pair} vs the oracle\'s {a_o} + {b_o}'
        tight_sum, pair_sum = tight_sum + tight, pair_sum + pair
    m = len(pre) - 1
    P.assert_close(lt, torch.tensor(tight_sum / (tau * m), dtype=lt.dtype), 'L_tightness',
                   scale=1.0)
    P.assert_close(lr, torch.tensor(pair_sum / (tau * m), dtype=lr.dtype), 'L_relu', scale=2.0)


@st.composite
def pre_lists(draw, dtype=torch.float64, max_layers=4):
    """pre = [(c_0, r_0), ..., (c_m, r_m)]: random shapes, signs and scales (1e-3 .. 1e3), radii
    >= 0 with exact zeros, so that layers have active, inactive and unstable neurons in any mix."""
    n = draw(st.integers(1, 3))
    m = draw(st.integers(1, max_layers))
    pre = []
    for _ in range(m + 1):
        shape = (n,) + draw(st.sampled_from(SHAPES))
        size = math.prod(shape)
        scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
        num = st.floats(-1, 1, allow_subnormal=False).map(lambda v: 0.0 if abs(v) < 1e-6 else v)
        c = draw(st.lists(num, min_size=size, max_size=size))
        r = draw(st.lists(num.map(abs), min_size=size, max_size=size))
        rscale = draw(st.sampled_from([1e-3, 0.3, 1.0]))
        pre.append((torch.tensor(c, dtype=dtype).view(shape) * scale,
                    torch.tensor(r, dtype=dtype).view(shape) * scale * rscale))
    return pre


def assert_matches_oracle(pre, tau):
    """warmup_regularizers against the oracle: the ReLU-state fractions always, L_tightness and
    L_relu where no ratio is degenerate."""
    oracle = regularizer_oracle(pre, tau)
    lt, lr, st_ = M.warmup_regularizers(pre, tau)
    P.assert_close(st_, torch.tensor(oracle.states, dtype=st_.dtype),
                   'active/inactive/unstable fractions', scale=1.0)
    assume(oracle.smallest > 1e-9)
    P.assert_close(lt, torch.tensor(oracle.tightness, dtype=torch.float64), 'L_tightness',
                   scale=1.0)
    P.assert_close(lr, torch.tensor(oracle.relu, dtype=torch.float64), 'L_relu', scale=1.0)


@given(pre=pre_lists(), tau=taus)
def test_regularizers_match_the_paper_formulas(pre, tau):
    """L_tightness and L_relu equal Eq. (7) and (8) computed by the oracle (non-degenerate ratios);
    the ReLU-state fractions of every layer are the oracle's counts."""
    assert_matches_oracle(pre, tau)


@given(pre=st.one_of(pre_lists(torch.float32), pre_lists(torch.float64)), tau=taus)
def test_each_regularizer_term_lies_in_0_tau(pre, tau):
    """For any bounds and tau in (0, 1]: every ReLU(.) term of Eq. (7) and Eq. (8) lies in [0, tau]
    (check_each_term), so after the factor 1/(tau m) L_tightness (m terms) lies in [0, 1] and
    L_relu (2m terms: alpha and beta) in [0, 2]; no nan or inf, and finite gradients for every
    centre and radius."""
    check_each_term(pre, tau)
    pre = [(c.clone().requires_grad_(True), r.clone().requires_grad_(True)) for c, r in pre]
    lt, lr, _ = M.warmup_regularizers(pre, tau)
    (lt + lr).backward()
    for i, (c, r) in enumerate(pre):
        for t in (c, r):
            assert t.grad is None or torch.isfinite(t.grad).all(), \
                f'non-finite gradient at pre[{i}]'


@given(pre=pre_lists(), data=st.data())
def test_regularizers_vanish_exactly_when_every_ratio_is_within_tau(pre, data):
    """With tau just below every constrained ratio (tau <= E(Delta_0)/E(Delta_i), tau <= alpha,
    beta <= 1/tau) both regularizers are exactly 0; with tau just above the smallest one, one is
    > 0."""
    oracle = regularizer_oracle(pre, 1.0)
    ratios, low = oracle.ratios, min(oracle.ratios)
    assume(oracle.smallest > 1e-9 and 1e-2 < low)
    tau = min(1.0, low) * (1 - 1e-3)
    lt, lr, _ = M.warmup_regularizers(pre, tau)
    assert lt.item() == 0.0 and lr.item() == 0.0, (lt.item(), lr.item(), tau, ratios)
    if low < 0.99:
        lt, lr, _ = M.warmup_regularizers(pre, low * (1 + 1e-3))
        assert lt.item() > 0 or lr.item() > 0, 'a violated constraint not penalized'


@given(n=st.integers(1, 3), m=st.integers(1, 4), data=st.data())
def test_regularizers_are_exactly_zero_on_balanced_bounds(n, m, data):
    """Constructed bounds that satisfy every constraint for the drawn tau in (0, 1], tau = 1
    included: each layer has active neurons a_k > r_k, inactive neurons -a_k (so alpha = beta = 1,
    computed exactly: dyadic values), unstable pairs +-u with r > |u|; the input box is wide
    enough that E(Delta_0)/E(Delta_i) > tau. A one-sided layer (no active, or no inactive neuron)
    has alpha = 0 or infinity, so Eq. (8) charges it tau + tau: L_relu = 2 k / m for k of them."""
    tau = data.draw(st.one_of(st.just(1.0), taus), label='tau')
    dyadic = st.integers(1, 64).map(lambda k: k / 8)
    kinds = st.sampled_from(['balanced', 'balanced', 'no inactive', 'no active'])
    pre, balanced, one_sided = [], [], 0
    for _ in range(m):
        a = torch.tensor(data.draw(st.lists(dyadic, min_size=1, max_size=4), label='active'))
        u = torch.tensor(data.draw(st.lists(dyadic, max_size=3), label='unstable'))
        kind = data.draw(kinds, label='layer')
        if kind == 'balanced':
            c, r = torch.cat([a, -a, u, -u]), torch.cat([a / 2, a / 2, 2 * u, 2 * u])
        else:
            c, r = (1 if kind == 'no inactive' else -1) * a, a / 2
            one_sided += 1
        c, r = c.repeat(n, 1), r.repeat(n, 1)
        if (c - r > 0).any() and (c + r < 0).any():
            balanced.append((c, r))
        pre.append((c, r))
    widest = max(r.mean().item() for _, r in pre)
    shrink = data.draw(st.sampled_from([0.25, 0.5, 0.75]), label='E(Delta_i) / (E(Delta_0) / tau)')
    pre.insert(0, (torch.zeros(n, 5), torch.full((n, 5), widest * tau / shrink)))
    lt, lr, _ = M.warmup_regularizers(pre, tau)
    assert lt.item() == 0.0 and lr.item() == pytest.approx(2 * one_sided / m, rel=1e-6)
    if balanced:  # the inactive neurons of one layer made stronger: alpha = tau / 4 < tau
        c, r = balanced[0]
        c[c + r < 0] *= 4 / tau
        assert M.warmup_regularizers(pre, tau)[1].item() > 2 * one_sided / m + 1e-6, \
            'an unbalanced layer not penalized'


@given(pre=pre_lists(), tau=taus)
def test_tightness_is_1_when_the_input_box_is_a_point(pre, tau):
    """E(Delta_0) = 0 and every layer wider than 0: each ReLU term is tau, so L_tightness = 1."""
    pre = [(pre[0][0], torch.zeros_like(pre[0][1]))] + [(c, r + 1) for c, r in pre[1:]]
    lt, _, _ = M.warmup_regularizers(pre, tau)
    P.assert_close(lt, torch.tensor(1.0, dtype=lt.dtype), 'L_tightness', scale=1.0)


def real_bounds(net, eps, seed, dtype):
    """The pre list that ibp_margins collects from a model family on a random batch of 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *net.shape, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, net.classes, (3,), generator=g)
    pre = []
    M.ibp_margins(net.model, x, y, eps, pre)
    n_relu = sum(isinstance(m, torch.nn.ReLU) for m in net.model.modules())
    assert len(pre) == n_relu + 1, 'pre holds the input box and one box per ReLU'
    assert all(len(p) == 2 for p in pre), 'every entry of pre is a box (c, r)'
    return pre


@given(net=P.family_nets(dtype=torch.float32), eps=st.floats(1e-6, 0.3), tau=taus,
       seed=st.integers(0, 2 ** 16))
def test_each_term_on_real_bounds_lies_in_0_tau(net, eps, tau, seed):
    """On the boxes of a model family (float32, as in training): every ReLU(.) term in [0, tau]
    (check_each_term), and finite gradients for every parameter."""
    pre = real_bounds(net, eps, seed, torch.float32)
    with torch.no_grad():
        check_each_term([(c.detach(), r.detach()) for c, r in pre], tau)
    lt, lr, _ = M.warmup_regularizers(pre, tau)
    (lt + lr).backward()
    for name, p in net.model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f'non-finite gradient of {name}'


@given(net=P.family_nets(dtype=torch.float64), eps=st.floats(1e-6, 0.3), tau=taus,
       seed=st.integers(0, 2 ** 16))
def test_regularizers_on_real_bounds_match_the_oracle(net, eps, tau, seed):
    """On the boxes that ibp_margins collects from a model family (float64, BN in train or eval
    mode), warmup_regularizers equals the oracle computed from those same boxes."""
    with torch.no_grad():
        pre = real_bounds(net, eps, seed, torch.float64)
    assert_matches_oracle(pre, tau)
