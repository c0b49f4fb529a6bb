"""Certificates that are proofs: a margin that is exactly zero, which plain float64 (and float32)
IBP rounds to a positive one and so verifies, is not verified by the rounding-sound pass
(sound_margins), and evaluate(recheck=True) counts it unverified with one overturned verdict.

The network: Normalize(mean 0, std s) -> Flatten -> Linear(1, 2) with rows (s, 0) and biases
(-1/2, 0), on the single pixel 255 (x = 1 exactly) at eps = 1/2: the box is [1/2, 1], and the
margin of class 0 over class 1 is s * (t / s) - 1/2 >= s * (1/2) / s - 1/2 = 0 exactly. Floats
compute it as s fl(3/4 / s) - s fl(1/4 / s) - 1/2 (the centre and radius of Eq. (3)): every step is
one product or one quotient, no sum of several terms, so the result does not depend on a summation
order; for some float32 s the two quotients round so that it is positive in float64 and float32.
"""
import os
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import ibp_short_warmup as ibp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tests_property'))
from oracles import exact_margins  # noqa: E402

torch.set_num_threads(1)
EPS = 0.5


def zero_margin_net(s, bias=-0.5):
    model = nn.Sequential(ibp.Normalize([0.0], [s]), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[-1].weight.copy_(torch.tensor([[s], [0.0]]))
        model[-1].bias.copy_(torch.tensor([bias, 0.0]))
    return model.eval()


X8 = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)  # the pixel 255: x = 1 exactly
Y = torch.tensor([0])


def float_margins(s, dtype):
    """Plain IBP (ibp_margins) in `dtype`, rounding to nearest, of the whole network in dtype."""
    with torch.no_grad():
        return ibp.ibp_margins(zero_margin_net(s).to(dtype), X8.to(dtype) / 255, Y, EPS)[1]


@pytest.fixture(scope='module')
def s():
    """The first float32 std s = fl32(1 + i / 97) whose margin rounds positive in float64 and in
    float32 (a deterministic search: every step is a single IEEE operation)."""
    for i in range(1, 400):
        s = torch.tensor(1 + i / 97, dtype=torch.float32).item()
        if all(float_margins(s, dt)[0, 1] > 0 for dt in (torch.float64, torch.float32)):
            return s
    pytest.fail('no std s found whose exactly-zero margin rounds positive in float64 and float32')


def test_plain_float64_verifies_an_exactly_zero_margin_but_the_sound_pass_does_not(s):
    model = zero_margin_net(s)
    _, exact = exact_margins(model, X8[0], 0, EPS)
    assert exact[1] == 0  # not verified in exact arithmetic: a verified margin must be > 0
    assert ibp.verified(float_margins(s, torch.float64), Y).item()  # round to nearest
    with torch.no_grad():
        lb = ibp.sound_margins(model, X8, Y, EPS)
    assert not ibp.verified(lb, Y).item()
    assert lb.dtype == torch.float64 and Fraction(lb[0, 1].item()) <= exact[1]
    assert lb[0, 1].item() > -1e-14  # sound, and yet only rounding-error wide


def test_evaluate_recheck_counts_it_unverified(s):
    """A batch of two: the zero margin (label 0), and a sample no pass verifies (label 1): only the
    float32-verified one is re-checked, and only its verdict is overturned."""
    model = zero_margin_net(s)
    data = (X8.repeat(2, 1, 1, 1), torch.tensor([0, 1]))
    plain = ibp.evaluate(model, data, EPS, recheck=False)
    assert plain['ver_err'] == 0.5 and plain['ver_changed'] == 0
    sound = ibp.evaluate(model, data, EPS, recheck=True)
    assert sound['ver_err'] == 1.0 and sound['ver_changed'] == 1
    assert isinstance(sound['ver_changed'], int) and sound['std_err'] == plain['std_err']
    attacked = ibp.evaluate(model, data, EPS, pgd_steps=2, recheck=True)  # no 'unsound' error
    assert attacked['ver_err'] == 1.0 and attacked['ver_changed'] == 1


def test_a_tiny_but_truly_positive_margin_stays_verified(s):
    """The sound pass is a re-certification with rounding-error slack, not a safety threshold."""
    model = zero_margin_net(s, bias=-0.5 + 2.0 ** -20)
    _, exact = exact_margins(model, X8[0], 0, EPS)
    assert exact[1] == Fraction(1, 2 ** 20)
    with torch.no_grad():
        lb = ibp.sound_margins(model, X8, Y, EPS)
    assert 0 < Fraction(lb[0, 1].item()) <= exact[1]
    res = ibp.evaluate(model, (X8, Y), EPS, recheck=True)
    assert res['ver_err'] == 0.0 and res['ver_changed'] == 0
