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
import dataclasses
import json
import math
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


# ---- Through the program: a float32 margin of +1e-3 that is -1e-3 in exact arithmetic ----------
# build_model's CNN-7 whose classifier computes one long float32 dot product with a large
# cancellation (exact value by math.fsum): float32 IBP verifies the sample, exact IBP does not.
# --eval-checkpoint and a run's final metrics.json must both count it unverified, ver_changed 1.
CPU = torch.device('cpu')


def rounding_flags(test_size, out):
    return ['--dataset', 'synthetic', '--synthetic-shape', '3', '8', '8', '--synthetic-classes',
            '2', '--width', '0.0625', '--train-size', '8', '--test-size', str(test_size),
            '--epochs', '1', '--eps-start', '1', '--eps-length', '1', '--lr-milestones', '1',
            '--pgd-steps', '0', '--device', 'cpu', '--out-dir', str(out)]


def cancelling_model(cfg, weights, feats, bias, favoured):
    """build_model's CNN-7 with every conv and FC weight and bias 0 and BN at unit statistics: from
    the first conv on the box is a point (radius |0| r = 0), and the FC BN's shift `feats` (> 0)
    reaches the classifier exactly (0 w + beta). The favoured class's logit is weights . feats +
    bias, the other one 0: the margin is one long float32 dot product with a large cancellation."""
    model = ibp.build_model(cfg, ibp.dataset_info(cfg))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.fill_(1)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1)
        fc_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][-1]
        fc_bn.bias.copy_(feats)
        model[-1].weight[favoured] = weights
        model[-1].bias[favoured] = bias
    return model.eval()


def exact_margin(weights, feats, bias):
    # a float32 x float32 product has 48 significant bits: exact in float64; fsum rounds once
    return math.fsum([w * f for w, f in zip(weights.tolist(), feats.tolist())] + [float(bias)])


def f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


@pytest.fixture(scope='module')
def rounding_case(tmp_path_factory):
    """A test set with exactly one sample of the favoured class, and two float32 biases: with `neg`
    the exact margin of that sample is < 0 but float32 IBP verifies it; with `pos` it is > 0 and
    float32 verifies it as well. Found by a deterministic search (asserted to succeed)."""
    out = tmp_path_factory.mktemp('rounding') / 'run'
    for n in range(2, 9):
        cfg = ibp.resolve(ibp.parse_args(rounding_flags(n, out)))
        data = ibp.load_data(dataclasses.replace(cfg, train_size=1), CPU)[1]
        counts = torch.bincount(data[1], minlength=2)
        if (counts == 1).any():
            break
    assert (counts == 1).any(), counts
    fav = int((counts == 1).nonzero()[0])
    i = int((data[1] == fav).nonzero()[0])
    k = [m for m in ibp.build_model(cfg, ibp.dataset_info(cfg)).modules()
         if isinstance(m, nn.BatchNorm1d)][-1].num_features
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        feats = 0.5 + torch.rand(k, generator=g)
        signs = torch.tensor([1.0, -1.0]).repeat(k // 2)
        weights = (5e3 + 1.5e4 * torch.rand(k, generator=g)) * signs
        partial = exact_margin(weights[:-1], feats[:-1], 0.0)
        weights[-1] = -partial / feats[-1].item()  # rounded to float32: a residual of ~1e-3
        s = exact_margin(weights, feats, 0.0)
        with torch.no_grad():
            lb = ibp.ibp_margins(cancelling_model(cfg, weights, feats, 0.0, fav),
                                 data[0].float() / 255, data[1], cfg.eps)[1]
        err = lb[i, 1 - fav].item() - s  # float32's rounding error of this margin
        if err < 2e-4:
            continue
        neg, pos = f32(-s - err / 2), f32(-s + err / 2)
        if not exact_margin(weights, feats, neg) < -1e-6 < 1e-6 < exact_margin(weights, feats, pos):
            continue
        # float32 alone verifies exactly the favoured sample with both biases (as evaluate runs it)
        if all(ibp.evaluate(cancelling_model(cfg, weights, feats, b, fav), data, cfg.eps)['ver_err']
               == pytest.approx(1 - 1 / n) for b in (neg, pos)):
            return dict(cfg=cfg, data=data, fav=fav, n=n, weights=weights, feats=feats, neg=neg,
                        pos=pos, flags=rounding_flags(n, out), out=out)
    pytest.fail('no margin found where float32 IBP verifies and the exact margin is negative')




def test_eval_checkpoint_counts_a_float32_false_verdict_unverified(rounding_case, tmp_path, capsys):
    rc = rounding_case
    model = cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav'])
    path = tmp_path / 'rounding.pt'
    torch.save(dict(model=model.state_dict(), config=dataclasses.asdict(rc['cfg']), epoch=1), path)
    capsys.readouterr()
    assert ibp.main(['--eval-checkpoint', str(path), '--pgd-steps', '0', '--device', 'cpu']) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res['ver_err'] == 1.0 and res['ver_changed'] == 1 and res['epoch'] == 1


def test_final_metrics_of_a_run_count_it_unverified(rounding_case, capsys):
    """A last.pt holding the cancelling model at the final epoch: --resume goes straight to the
    final evaluation, whose metrics.json must count the sample unverified, one changed verdict."""
    rc = rounding_case
    cfg = ibp.resolve(ibp.parse_args(rc['flags']))
    model, opt, _ = ibp.prepare(cfg, CPU, ibp.dataset_info(cfg))
    model.load_state_dict(
        cancelling_model(rc['cfg'], rc['weights'], rc['feats'], rc['neg'], rc['fav']).state_dict())
    os.makedirs(rc['out'], exist_ok=True)
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(),
                    config=dataclasses.asdict(cfg), epoch=cfg.epochs, best=float('inf'), wall=0.0),
               os.path.join(rc['out'], 'last.pt'))
    with open(os.path.join(rc['out'], 'log.jsonl'), 'w') as f:  # --resume checks the log too
        f.writelines(json.dumps(dict(epoch=e)) + '\n' for e in range(1, cfg.epochs + 1))
    capsys.readouterr()
    assert ibp.main(rc['flags'] + ['--resume']) == 0, capsys.readouterr().err
    metrics = json.load(open(os.path.join(rc['out'], 'metrics.json')))
    assert metrics['ver_err'] == 1.0 and metrics['ver_changed'] == 1
    assert metrics['test_size'] == rc['n']


