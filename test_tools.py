"""ibp_tools.py: init_gains (the difference gains of Eq. (6) per ReLU layer, Figure 1), the
--diagnose-init table, the --benchmark file. Oracles: weights set by hand so that each layer's
gain n/2 E|W| is a number chosen here, the layer feeding each ReLU listed by hand from the
architecture, interval arithmetic in the paper's lower/upper form (oracles.interval_radii), and the
expected gain of each initialization's distribution."""
import json
import math

import pytest
import torch
import torch.nn as nn

import ibp_short_warmup as ibp
import ibp_tools
from oracles import GAIN_EQ6_TOL, TOL, fan_in_of, interval_radii

REL = TOL[torch.float32]['rtol']  # init_gains runs in float32
EPS = 8 / 255


def with_hand_gains(model):
    """Every conv/linear weight but the classifier's set to +-2k/n (random signs; n its fan-in,
    the number of inputs of one output) for the k-th such layer in module order: Eq. (6)'s gain
    n/2 E|W| of that layer is k."""
    g = torch.Generator().manual_seed(0)
    affine = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    with torch.no_grad():
        for k, m in enumerate(affine, 1):
            signs = torch.randint(0, 2, m.weight.shape, generator=g) * 2 - 1
            m.weight.copy_(signs * (2 * k / fan_in_of(m)))
    return model


# Width 1/4 on CIFAR-10's 3 x 32 x 32, one row per ReLU: (fan-in, gain k of the feeding layer).
# CNN-7: convs 3->16, 16->16, 16->32 (stride 2), 32->32, 32->32, FC 32*16*16 -> 128: layers 1-6.
# Wide-ResNet (stem 4; blocks 32, 64, 128): stem 1; block b's branch convs 3b-1 and 3b (its
# shortcut 3b+1 feeds no ReLU: after the add the branch's last conv is reported); FC 11.
# ResNeXt (stem 16; blocks of cardinality 2, group widths 16, 32, 64): stem 1; block b's convs
# 4b-2, 4b-1 (grouped: fan-in gw/2 * 9) and 4b, its shortcut 4b+1 skipped; FC 14.
HAND_ROWS = {
    'cnn7': [(27, 1), (144, 2), (144, 3), (288, 4), (288, 5), (8192, 6)],
    'wide_resnet': [(27, 1), (36, 2), (288, 3), (288, 5), (576, 6), (576, 8), (1152, 9),
                    (8192, 11)],
    'resnext': [(27, 1), (16, 2), (72, 3), (16, 4), (32, 6), (144, 7), (32, 8), (64, 10), (288, 11),
                (64, 12), (8192, 14)]}


@pytest.mark.parametrize('family', list(HAND_ROWS))
def test_init_gains_rows_by_hand(family):
    """One row per ReLU: the fan-in and Eq. (6)'s gain of the affine layer feeding it (after a
    residual add, the branch's last layer), both worked out by hand; the measured gain and
    log E(Delta) as the oracle's interval arithmetic gives them (CNN-7 without BN)."""
    bn = 'none' if family == 'cnn7' else 'full'
    torch.manual_seed(0)
    cfg = ibp.Config(dataset='cifar10', model=family, bn=bn, width=0.25)
    model = with_hand_gains(ibp.build_model(cfg, ibp.dataset_info(cfg))).train()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    rows = ibp_tools.init_gains(model, x, y, EPS)
    assert [r['layer'] for r in rows] == list(range(1, len(HAND_ROWS[family]) + 1))
    assert [r['fan_in'] for r in rows] == [n for n, _ in HAND_ROWS[family]]
    assert [r['gain_eq6'] for r in rows] == pytest.approx([k for _, k in HAND_ROWS[family]],
                                                          rel=REL)
    if family == 'cnn7':
        radii = interval_radii(model.double(), x.double(), EPS)  # float64 oracle
        assert len(radii) == len(rows) + 1
        for i, r in enumerate(rows):
            assert r['gain_measured'] == pytest.approx(radii[i + 1] / radii[i], rel=REL)
            assert r['log_delta'] == pytest.approx(math.log(radii[i + 1]), abs=REL)


# E|W| of each init: default U(-1/sqrt(n), 1/sqrt(n)) -> 1/(2 sqrt(n)); kaiming N(0, 2/n) ->
# sqrt(2/n) sqrt(2/pi); IBP N(0, (sqrt(2 pi)/n)^2) -> 2/n; times n/2 (Eq. 6):
EXPECTED_GAIN = {'default': lambda n: math.sqrt(n) / 4,
                 'kaiming': lambda n: math.sqrt(n / math.pi), 'ibp': lambda n: 1.0}


@pytest.fixture
def backend_flags():
    """setup_device sets process-wide backend flags: put them back after the test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
     torch.backends.cudnn.benchmark) = saved


def test_diagnose_init_cli_prints_three_inits(capsys, backend_flags):
    """diagnose-init: a table per init (default, Kaiming, IBP) and BN variant, a row per ReLU
    with the fan-in and Eq. (6)'s gain, each gain the expected one of its init's distribution."""
    assert ibp_tools.main(['diagnose-init', '--dataset', 'synthetic', '--width', '0.25',
                           '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    tables = {}
    for block in out.split('\n\n')[1:]:
        title, header, *rows = block.strip().splitlines()
        assert header.split() == ['layer', 'fan-in', 'gain', 'Eq.6', 'measured', 'log', 'E(Delta)']
        tables[title] = [[float(v) for v in row.split()] for row in rows]
    assert list(tables) == [f'{i} init, BN {bn}:' for i in ('default', 'kaiming', 'ibp')
                            for bn in ('full', 'none')]
    for title, rows in tables.items():
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [int(r[1]) for r in rows] == [n for n, _ in HAND_ROWS['cnn7']]
        init = title.split()[0]
        for r in rows:
            assert r[2] == pytest.approx(EXPECTED_GAIN[init](r[1]), rel=GAIN_EQ6_TOL), \
                (title, r)


def test_benchmark_cli_writes_three_variants_and_ratios(tmp_path, capsys, backend_flags):
    """benchmark: benchmark.json with the three variants' step times and their ratios, the
    median over rounds of the per-round ratios. (No timing is asserted.)"""
    out = tmp_path / 'bench'
    assert ibp_tools.main(['benchmark', '--benchmark-steps', '3', '--dataset', 'synthetic',
                           '--width', '0.0625', '--batch-size', '8', '--device', 'cpu',
                           '--out-dir', str(out)]) == 0
    assert 'ratios (median over rounds):' in capsys.readouterr().out
    res = json.load(open(out / 'benchmark.json'))
    assert list(res['results']) == ['clean', 'vanilla_ibp', 'ours']
    for name, r in res['results'].items():
        assert r['min_ms'] <= r['ms_per_step'] <= r['max_ms'], name
        assert r['img_per_s'] == pytest.approx(8 / r['ms_per_step'] * 1000)
    rounds = res['round_ratios']
    assert set(rounds) == {'vanilla_ibp/clean', 'ours/clean'}
    assert all(len(v) == 3 for v in rounds.values())
    assert res['ratios'] == pytest.approx({k: sorted(v)[1] for k, v in rounds.items()})
