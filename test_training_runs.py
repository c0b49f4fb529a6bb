"""Whole training runs: the --smoke run's log (eps, lambda and LR per epoch as the schedules give
them), the ETA (stdout only, never the log), and a diverging run (one line, the last good epoch
kept)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import ibp_short_warmup as ibp
from run_helpers import REPO, SCRIPT, TINY, main_stderr, one_error_line, tree_digest


def records(folder, drop=()):
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in open(os.path.join(folder, 'log.jsonl'))]


def test_smoke_run(smoke):
    """`--smoke`: 6 epochs of 1024 synthetic images, eps 4/255 ramped over epochs 2-4, a LR
    milestone after epoch 5; it learns, certifies, and logs the schedules' values."""
    proc, out = smoke
    assert proc.returncode == 0, proc.stderr
    assert 'Traceback' not in proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith('ep') for line in lines) == 6
    assert lines[-1].startswith('final')
    for name in ('metrics.json', 'log.jsonl', 'last.pt'):
        assert os.path.isfile(os.path.join(out, name))
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert metrics['final_epoch'] == 6 and metrics['test_size'] == 256
    assert metrics['ver_err'] < 0.9  # better than a constant classifier of 10 classes
    assert metrics['pgd_err'] is not None
    assert metrics['std_err'] <= metrics['pgd_err'] <= metrics['ver_err']
    recs = records(out)
    assert [r['epoch'] for r in recs] == [1, 2, 3, 4, 5, 6]
    # 1024 / 64 = 16 steps per epoch, ramp epochs 2..4: init 16, final 64, mid 28; the logged eps is
    # the last batch's: epoch 2 step 31: E/13 + 12E/13 * 3/36 = 2E/13; epoch 3 step 47: 22E/39;
    # epoch 4 step 63: 38E/39; epochs 5, 6: E
    E = 4 / 255
    expect = [0, 2 * E / 13, 22 * E / 39, 38 * E / 39, E, E]
    assert [r['eps'] for r in recs] == pytest.approx(expect, rel=1e-9)
    assert recs[0]['lam'] == 0.5 and recs[3]['lam'] == pytest.approx(0.5 / 39)  # 0.5 (1 - 38/39)
    assert recs[4]['lam'] == 0 and recs[5]['lam'] == 0  # regularizers only during warmup
    assert [r['lr'] for r in recs] == pytest.approx([2e-3] * 5 + [4e-4])  # milestone 5
    assert torch.load(os.path.join(out, 'last.pt'), weights_only=True)['epoch'] == 6


ETA = re.compile(r'eta: training ends around \d{4}-\d\d-\d\d \d\d:\d\d, in about (\d+):(\d\d):(\d\d) '
                 r'\(without evaluation\)$')


def test_eta_is_printed_once_to_stdout_and_never_to_the_log(tmp_path, capsys):
    """A run prints the end of its training once, within its first epoch (here, a short epoch: after
    its last step), on stdout only; a resumed run estimates again in its own first epoch. The
    estimate of this tiny run (3 epochs of 2 steps) is well under a minute."""
    out = tmp_path / 'run'
    args = TINY + ['--out-dir', str(out), '--eps-start', '1', '--eps-length', '1']
    assert ibp.main(args + ['--epochs', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    found = [i for i, line in enumerate(lines) if line.startswith('eta:')]
    assert len(found) == 1 and ETA.match(lines[found[0]]), lines
    assert lines[found[0] + 1].startswith('ep   1 |')  # within the first epoch
    h, m, sec = map(int, ETA.match(lines[found[0]]).groups())
    assert h == 0 and m == 0 and sec < 60
    assert 'eta' not in open(out / 'log.jsonl').read()
    assert ibp.main(args + ['--epochs', '4', '--resume']) == 0  # epochs 3 and 4: estimates again
    lines = capsys.readouterr().out.splitlines()
    assert [i for i, line in enumerate(lines) if line.startswith('eta:')] == [0], lines
    assert ibp.main(args + ['--epochs', '5', '--resume']) == 0  # the last epoch: nothing left
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith('eta:')]


# 64 images / batch 16 = 4 steps per epoch; the LR is 2e-3 in epoch 1 and 2e-3 * 1e20 after
# milestone 1: the first step of epoch 2 throws the weights to ~1e17 and the next step's bounds are
# non-finite (loss nan; a factor 1e8 only gave losses ~1e13, BN renormalizes them).
DIVERGE = ['--smoke', '--epochs', '3', '--eps-start', '1', '--eps-length', '1',
           '--lr-milestones', '1', '--lr-decay', '1e20', '--train-size', '64', '--batch-size', '16',
           '--test-size', '32', '--width', '0.0625', '--synthetic-shape', '3', '8', '8',
           '--pgd-steps', '2', '--device', 'cpu']


def check_diverged_line(line):
    assert 'diverged' in line and 'non-finite' in line, line
    assert re.search(r'\bepoch 2\b', line) and re.search(r'\bstep \d+', line), line
    eps = re.search(r'\beps ([0-9.]+(?:e[-+]?\d+)?)', line)
    assert eps and float(eps.group(1)) == pytest.approx(4 / 255, abs=5e-5), line  # after the ramp


def check_only_epoch_1_kept(out):
    ck = torch.load(out / 'last.pt', weights_only=True)
    assert ck['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())
    assert [r['epoch'] for r in records(out)] == [1]
    assert not (out / 'metrics.json').exists()
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


def test_divergence_is_one_line_and_keeps_the_last_good_epoch(tmp_path, capsys):
    out = tmp_path / 'run'
    rc, err = main_stderr(DIVERGE + ['--out-dir', str(out)], capsys)
    assert rc == 2
    line = one_error_line(err)
    check_diverged_line(line)
    check_only_epoch_1_kept(out)
    # resumable: the same flags load epoch 1 and meet the same divergence, not a load error
    before = tree_digest(out)
    rc, err = main_stderr(DIVERGE + ['--out-dir', str(out), '--resume'], capsys)
    assert rc == 2 and one_error_line(err) == line
    check_only_epoch_1_kept(out)
    assert tree_digest(out) == before
