"""Checkpoints: --resume continues a run bit for bit and refuses other hyperparameters; an existing
run is never overwritten; --eval-checkpoint certifies a saved model; every bad file (missing,
truncated, text, a pickle that would run code, another model's) is one line and exit 2, with the
code never run and the run folder byte for byte unchanged."""
import json
import os
import pickle
import shutil

import pytest
import torch

import ibp_short_warmup as ibp
from run_helpers import (TINY, RunsCode, cli, main_stderr, one_error_line,
                         stop_after_first_checkpoint, tree_digest)


def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch, capsys):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    assert ibp.main(TINY + ['--out-dir', a]) == 0
    assert stop_after_first_checkpoint(TINY + ['--out-dir', b], monkeypatch) == 130
    assert '--resume' in capsys.readouterr().err
    assert torch.load(os.path.join(b, 'last.pt'), weights_only=True)['epoch'] == 1
    assert not os.path.exists(os.path.join(b, 'metrics.json'))
    rc = ibp.main(TINY + ['--out-dir', b, '--resume'])
    err = capsys.readouterr().err
    assert rc == 0, err
    ma, mb = (json.load(open(os.path.join(d, 'metrics.json'))) for d in (a, b))
    for k in ('std_err', 'ver_err', 'pgd_err'):
        assert ma[k] == mb[k], k
    sa, sb = (torch.load(os.path.join(d, 'last.pt'), weights_only=True)['model'] for d in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la, lb = ([json.loads(line) for line in open(os.path.join(d, 'log.jsonl'))] for d in (a, b))
    assert [r['epoch'] for r in lb] == [1, 2, 3]
    assert [r['loss'] for r in la] == [r['loss'] for r in lb]


def test_resume_with_other_hyperparameters_is_refused(tmp_path, capsys):
    out = str(tmp_path / 'run')
    assert ibp.main(TINY + ['--epochs', '2', '--out-dir', out]) == 0
    capsys.readouterr()
    assert ibp.main(TINY + ['--epochs', '2', '--out-dir', out, '--resume', '--lr', '0.01']) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.split('other values of:')[1].strip() == 'lr'  # exactly the value that differs


# ----------------------------------------------------------------------------------------------
# Safe loading: weights_only, one-line errors, nothing written on a failed load
# ----------------------------------------------------------------------------------------------
RUN_FLAGS = ['--smoke', '--epochs', '2', '--eps-start', '1', '--eps-length', '1',
             '--lr-milestones', '2', '--train-size', '64', '--test-size', '32', '--width', '0.0625',
             '--synthetic-shape', '3', '8', '8', '--pgd-steps', '2', '--device', 'cpu']


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A finished 2-epoch run (last.pt, log.jsonl, metrics.json), copied by tests that alter it."""
    out = tmp_path_factory.mktemp('trust') / 'run'
    assert ibp.main(RUN_FLAGS + ['--out-dir', str(out)]) == 0
    return out


@pytest.fixture(scope='module')
def other_run(tmp_path_factory):
    """The same run with another --width: its last.pt belongs to another model."""
    out = tmp_path_factory.mktemp('trust') / 'other'
    assert ibp.main(RUN_FLAGS + ['--width', '0.125', '--out-dir', str(out)]) == 0
    return out


def write_bad_checkpoint(kind, path, real, marker, other=None):
    """Replace `path` by a bad checkpoint of `kind`, made from the real checkpoint `real`."""
    if os.path.exists(path):
        os.remove(path)
    if kind == 'truncated':
        data = open(real, 'rb').read()
        open(path, 'wb').write(data[:len(data) // 2])
    elif kind == 'text':
        open(path, 'w').write('this is a note, not a checkpoint\n')
    elif kind == 'tensor':  # a valid torch file, but not a checkpoint dict
        torch.save(torch.zeros(3), path)
    elif kind == 'code_zip':  # torch.save format, looks like a checkpoint
        torch.save(dict(model=RunsCode(marker), config={}, epoch=1), path)
    elif kind == 'code_pickle':  # a plain pickle (torch.load's legacy format)
        with open(path, 'wb') as f:
            pickle.dump(RunsCode(marker), f)
    elif kind == 'misfit':  # the run's own config, the state dict of a model twice as wide
        ck = torch.load(real, weights_only=True)
        wide = ibp.resolve(ibp.parse_args(RUN_FLAGS + ['--width', '0.125']))
        ck['model'] = ibp.build_model(wide, ibp.dataset_info(wide)).state_dict()
        torch.save(ck, path)
    elif kind == 'other_flags':
        shutil.copyfile(os.path.join(other, 'last.pt'), path)
    elif kind == 'no_optimizer':  # a model-only file where --resume needs the optimizer state
        ck = torch.load(real, weights_only=True)
        torch.save(dict(model=ck['model'], config=ck['config'], epoch=ck['epoch']), path)
    else:
        assert kind == 'missing', kind


@pytest.mark.parametrize('kind', ['code_zip', 'code_pickle'])
def test_read_checkpoint_would_run_the_payload_without_weights_only(kind, tmp_path, monkeypatch):
    """The code-running files below are live: read_checkpoint with its torch.load stripped of
    weights_only=True runs them (the marker appears), so the refusals that follow mean something."""
    marker, path = tmp_path / 'marker', tmp_path / f'{kind}.pt'
    write_bad_checkpoint(kind, path, None, marker)
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: real_load(*a, **{**kw,
                                                                         'weights_only': False}))
    try:  # the plain pickle then fails torch's magic-number check: after the code ran
        ibp.read_checkpoint(str(path), 'cpu')
    except ibp.UserError:
        assert kind == 'code_pickle'
    assert marker.exists()


def test_existing_run_is_protected(tiny_run, capsys):
    before = tree_digest(tiny_run)
    assert ibp.main(RUN_FLAGS + ['--out-dir', str(tiny_run)]) == 2
    assert 'already holds a run' in one_error_line(capsys.readouterr().err)
    assert tree_digest(tiny_run) == before


EVAL_BAD = ['missing', 'truncated', 'text', 'tensor', 'code_zip', 'code_pickle', 'misfit']


@pytest.mark.parametrize('kind', EVAL_BAD)
def test_eval_checkpoint_refuses_a_bad_file_with_one_line(kind, tiny_run, tmp_path, capsys,
                                                          monkeypatch):
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, tiny_run / 'last.pt', marker)
    monkeypatch.chdir(tmp_path)  # a stray default --out-dir would land here and show in the digest
    before = tree_digest(tmp_path)
    rc, err = main_stderr(['--eval-checkpoint', str(path), '--device', 'cpu', '--pgd-steps', '2'],
                          capsys)
    assert rc == 2
    one_error_line(err, names=path)
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize('flags', [['--eps', '-0.5'], ['--eps', '0'], ['--eps', 'inf'],
                                   ['--pgd-steps', '-1']])
def test_eval_checkpoint_checks_its_flags(flags, tiny_run, capsys):
    """--eval-checkpoint skips resolve: a negative eps would give negative radii and a false
    certificate, a negative PGD step count a traceback. Each is one line and exit 2 instead."""
    args = ['--eval-checkpoint', str(tiny_run / 'last.pt'), '--device', 'cpu', *flags]
    rc, err = main_stderr(args, capsys)
    assert rc == 2
    one_error_line(err, names=flags[0])


@pytest.mark.parametrize('kind', EVAL_BAD + ['other_flags', 'no_optimizer'])
def test_resume_refuses_a_bad_last_pt_with_one_line(kind, tiny_run, other_run, tmp_path, capsys,
                                                    monkeypatch):
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, tiny_run / 'last.pt', marker, other=other_run)
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    rc, err = main_stderr(RUN_FLAGS + ['--out-dir', str(run), '--resume'], capsys)
    assert rc == 2
    line = one_error_line(err, names=path)
    if kind == 'other_flags':
        assert 'width' in line  # the flag that differs
    if kind == 'no_optimizer':
        assert 'optimizer' in line
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize('mode,kind', [('eval', 'code_pickle'), ('resume', 'code_zip')])
def test_code_running_checkpoint_through_the_real_cli(mode, kind, tiny_run, tmp_path):
    """A real process: stderr holds nothing but the one error line (no warning, no traceback)."""
    run, marker = tmp_path / 'run', tmp_path / 'marker'
    shutil.copytree(tiny_run, run)
    path = run / 'last.pt'
    write_bad_checkpoint(kind, path, None, marker)
    before = tree_digest(tmp_path)
    args = (['--eval-checkpoint', str(path), '--device', 'cpu'] if mode == 'eval' else
            RUN_FLAGS + ['--out-dir', str(run), '--resume'])
    proc = cli(*args)
    assert proc.returncode == 2 and proc.stdout == '', proc.stdout
    one_error_line(proc.stderr, names=path)
    assert not marker.exists()
    assert tree_digest(tmp_path) == before


def test_eval_checkpoint_certifies_a_good_checkpoint(tiny_run):
    """A real process: the run's last.pt (which loads with weights_only=True) certified at its eps
    prints one JSON line with the errors of the run's metrics.json, and a PGD error."""
    assert torch.load(tiny_run / 'last.pt', weights_only=True)['epoch'] == 2
    proc = cli('--eval-checkpoint', str(tiny_run / 'last.pt'), '--device', 'cpu')
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = json.load(open(tiny_run / 'metrics.json'))
    assert res['epoch'] == 2 and res['eps'] == pytest.approx(4 / 255)
    for k in ('std_err', 'ver_err'):
        assert res[k] == metrics[k], k
    assert res['pgd_err'] is not None
