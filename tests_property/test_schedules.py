"""Schedules (paper Sec. 3.4 and 4.1): eps per batch, lambda from eps, the LR per epoch.

Oracles: the schedules as the paper and the authors' release describe them. eps is 0 up to batch
init = (start - 1) L, a (b - init)^4 up to
a quarter of the ramp, then linear, eps_target from final = (start + length - 1) L on;
lambda = lambda_0 (1 - eps / eps_target); the LR is multiplied by lr_decay after each milestone
(checked step by step, not by a copy of the formula).
"""
import math

import torch
from hypothesis import given, strategies as st

import ibp_short_warmup as M
import prop_support as P

REL = P.TOL[torch.float64]['rtol']  # the schedules are Python floats (float64)

ramps = st.tuples(st.integers(1, 40), st.integers(1, 4), st.integers(1, 25),
                  st.floats(1e-4, 1.0))  # steps per epoch L, start, length, eps_target


@given(ramp=ramps)
def test_eps_schedule_shape(ramp):
    """Over every batch of the run: within [0, eps_target], non-decreasing, 0 for b <= init,
    eps_target for b >= final; a (b - init)^4 strictly inside the first quarter of the ramp (the
    value doubles the distance -> 16x), linear on the rest (equal increments), and eps_target / 13
    at the quarter point when the ramp length in batches is a multiple of 4."""
    spe, start, length, target = ramp
    init, final = (start - 1) * spe, (start + length - 1) * spe
    eps = [M.eps_at(b, spe, target, start, length) for b in range(final + 2 * spe + 1)]
    assert all(0 <= e <= target for e in eps), 'eps outside [0, eps_target]'
    assert all(a <= b for a, b in zip(eps, eps[1:])), 'eps decreases'
    assert all(e == 0 for e in eps[:init + 1]), 'eps > 0 before the ramp'
    assert all(e == target for e in eps[final:]), 'eps != eps_target after the ramp'
    quarter = init + (final - init) / 4
    poly = [b for b in range(init + 1, final) if 2 * b - init < quarter]
    for b in poly:
        assert math.isclose(eps[2 * b - init], 16 * eps[b], rel_tol=REL), \
            f'not quartic at batch {b}'
    lin = [b for b in range(math.ceil(quarter), final - 1)]
    for b in lin:
        assert math.isclose(eps[b + 2] - eps[b + 1], eps[b + 1] - eps[b], rel_tol=REL,
                            abs_tol=REL * target), \
            f'not linear at batch {b}'
    if (final - init) % 4 == 0 and final > init:
        assert math.isclose(eps[int(quarter)], target / 13, rel_tol=REL), \
            'the polynomial part does not end at eps_target/13'


@given(ramp=ramps, lam0=st.floats(0, 2))
def test_lambda_follows_eps_from_lambda0_to_0(ramp, lam0):
    """lambda = lambda_0 (1 - eps/eps_target) lies in [0, lambda_0] over the whole schedule, is
    lambda_0 at eps = 0, 0 at eps_target, non-increasing in the batch, and linear in eps."""
    spe, start, length, target = ramp
    final = (start + length - 1) * spe
    lams = [M.lam_at(M.eps_at(b, spe, target, start, length), target, lam0)
            for b in range(final + spe + 1)]
    assert all(0 <= v <= lam0 for v in lams), 'lambda outside [0, lambda_0]'
    assert all(a >= b for a, b in zip(lams, lams[1:])), 'lambda increases'
    assert M.lam_at(0.0, target, lam0) == lam0 and M.lam_at(target, target, lam0) == 0
    assert math.isclose(M.lam_at(target / 4, target, lam0), 0.75 * lam0, rel_tol=REL)


@given(lr=st.floats(1e-6, 1.0), decay=st.floats(0.01, 1.0), epochs=st.integers(1, 200),
       marks=st.lists(st.integers(1, 200), max_size=4, unique=True))
def test_lr_steps_down_by_lr_decay_right_after_each_milestone(lr, decay, epochs, marks):
    """lr_at starts at lr in epoch 1 and changes only from an epoch m to the epoch m + 1 after a
    milestone m, by exactly the factor lr_decay: between milestones it is constant. (The worked
    values of the paper's schedule are in test_ibp.py.)"""
    cfg = M.Config(lr=lr, lr_decay=decay, lr_milestones=tuple(sorted(marks)))
    assert M.lr_at(1, cfg) == lr
    for e in range(1, epochs):
        before, after = M.lr_at(e, cfg), M.lr_at(e + 1, cfg)
        factor = decay if e in marks else 1.0
        assert math.isclose(after, before * factor, rel_tol=REL), f'epoch {e} -> {e + 1}'
