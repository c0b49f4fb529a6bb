"""Tests of `ibp_tools.py ablation` (the paper's Table 4 study) end to end at a tiny budget.

Two rows, one seed, synthetic data: seconds per run. One study folder goes through a first
invocation (the command line, as a user runs it), a second one that must skip every finished run,
and a third one that must resume a run interrupted after its first epoch.
"""
import json
import os
import subprocess
import sys

import pytest

import ibp_short_warmup as ibp
import ibp_tools

REPO = os.path.dirname(os.path.abspath(__file__))
ROWS = ['full_bn_vanilla', 'all_ours']
TINY = ['--dataset', 'synthetic', '--train-size', '128', '--test-size', '64', '--width',
        '0.0625', '--epochs', '2', '--eps-start', '1', '--eps-length', '1', '--lr-milestones',
        '1', '--pgd-steps', '1', '--device', 'cpu']


def study_args(study):
    return ['ablation', '--study-dir', study, '--seeds', '1', '--rows', *ROWS, *TINY]


def run_files(study):
    # {path: (bytes, mtime)} of every file of every run: a skipped run leaves them all alone
    out = {}
    for row in ROWS:
        run_dir = os.path.join(study, row, 's0')
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name)
            with open(path, 'rb') as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def test_study_writes_skips_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # the children: one thread each on a shared CPU
    study = str(tmp_path / 'study')
    # 1. The command line: every run trains, and the table holds each run's metrics.json.
    p = subprocess.run([sys.executable, 'ibp_tools.py', *study_args(study)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sum(' finished in ' in line for line in p.stdout.splitlines()) == 2, p.stdout
    with open(os.path.join(study, 'table.json')) as f:
        table = json.load(f)
    assert [r['slug'] for r in table['rows']] == ROWS
    for row in table['rows']:
        with open(os.path.join(study, row['slug'], 's0', 'metrics.json')) as f:
            m = json.load(f)
        assert row['seeds'] == 1 and row['runs'][0]['seed'] == 0
        for k in ('std_err', 'pgd_err', 'ver_err'):
            assert row['runs'][0][k] == m[k]
            assert row[k]['mean'] == pytest.approx(100 * m[k]) and row[k]['std'] is None
        assert row['wall_seconds'] == pytest.approx(m['wall_seconds'])
        assert m['config']['method'] == ('ours' if row['slug'] == 'all_ours' else 'vanilla')
        assert m['config']['ibp_init'] == (row['slug'] == 'all_ours')
    with open(os.path.join(study, 'table.md')) as f:
        md = f.read()
    lines = [line for line in md.splitlines() if line.startswith('| ')][1:]  # below the header
    assert [line.split(' | ')[0] for line in lines] == ['| full BN, vanilla', '| all (ours)']
    for line, row in zip(lines, table['rows']):
        assert f"| {row['ver_err']['mean']:.2f} |" in line
    assert '| 67.01 ± 0.29 |' in lines[0] and '| 65.58 ± 0.32 |' in lines[1]  # Table 4
    assert table['command'] in md and 'python plot_runs.py' in md

    # 2. Again: nothing trains, no run file changes, and the output says so.
    before = run_files(study)
    capsys.readouterr()
    assert ibp_tools.main(study_args(study)) == 0
    out = capsys.readouterr().out
    assert out.count('skipped (finished)') == 2 and ' finished in ' not in out, out
    assert run_files(study) == before
    with open(os.path.join(study, 'table.json')) as f:
        again = json.load(f)
    assert again['rows'] == table['rows'] and len(again['invocations']) == 2

    # 3. An interrupted run: the same run's first epoch only (what last.pt holds after a kill
    # in epoch 2), then the study resumes it with --resume and finishes it.
    run_dir = os.path.join(study, 'all_ours', 's0')
    assert table['rows'][1]['runs'][0]['dir'] == run_dir
    for name in os.listdir(run_dir):
        os.remove(os.path.join(run_dir, name))
    args = ibp_tools.merge_flags(ibp_tools.STUDY_FLAGS, TINY) + ['--method', 'ours', '--seed',
                                                                 '0', '--out-dir', run_dir]
    assert ibp.main(args + ['--epochs', '1']) == 0
    os.remove(os.path.join(run_dir, 'metrics.json'))
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        epoch1 = f.read()
    capsys.readouterr()
    assert ibp_tools.main(study_args(study)) == 0
    out = capsys.readouterr().out
    assert out.count('skipped (finished)') == 1 and 'all_ours s0: resumed, finished' in out, out
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        log = f.read()
    assert log.startswith(epoch1) and [json.loads(s)['epoch'] for s in log.splitlines()] == [1, 2]
    with open(os.path.join(run_dir, 'metrics.json')) as f:
        m = json.load(f)
    assert m['final_epoch'] == 2
    with open(os.path.join(study, 'table.json')) as f:
        row = json.load(f)['rows'][1]
    assert row['slug'] == 'all_ours' and row['ver_err']['mean'] == pytest.approx(100 * m['ver_err'])

    # 4. The same folder with another configuration: refused, not mixed into the table.
    assert ibp_tools.main(study_args(study) + ['--eps', '0.1']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'other values of: eps' in err


@pytest.mark.parametrize('argv, words', [
    (['ablation', '--rows', 'nope'], 'invalid choice'),
    (['ablation', '--seeds', '0'], '--seeds must be >= 1'),
    (['ablation', '--method', 'vanilla'], '--method is set by the study'),
    (['ablation', '--no-ibp-init'], '--no-ibp-init is set by the study'),
    (['ablation', '--seed', '3'], '--seed is set by the study'),
    (['ablation', '--ep', '0.1'], 'unknown flag --ep'),
    (['ablation', '--eps', '-1'], '--eps must be'),
    (['ablation', 'stray'], 'unexpected argument'),
    (['benchmark', '--rows', 'all_ours'], 'flags of ablation'),
])
def test_bad_flags_one_line_exit_2(argv, words, capsys, tmp_path):
    assert ibp_tools.main(argv + ['--study-dir', str(tmp_path / 's')]
                          if argv[0] == 'ablation' else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and words in err, err
    assert not os.path.exists(tmp_path / 's')  # nothing was started
