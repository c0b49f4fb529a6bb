"""Tests of plot_runs.py: the figures draw the values of hand-written run files.

The run files (log.jsonl, metrics.json, diagnosis.json, format in README.md) are written here from
known values, so nothing but the last test trains; that one plots the session's real --smoke run
(conftest.py) end to end.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import ibp_tools
import plot_runs

REPO = os.path.dirname(os.path.abspath(__file__))
ALL = ['fig2_relu_states.png', 'fig2_relu_states_per_layer.png', 'fig3_tightness.png',
       'fig4_relu_balance.png', 'curves.png']
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip('matplotlib', reason='pip install -r requirements-plot.txt')
    matplotlib.use('Agg')
    import matplotlib.pyplot as pyplot
    return pyplot


def state(epoch, layer):
    # [active, inactive, unstable] of a ReLU layer: distinct per epoch and layer, summing to 1
    active, inactive = 0.1 + 0.05 * layer + 0.01 * epoch, 0.3 - 0.02 * epoch
    return [active, inactive, 1 - active - inactive]


def record(epoch, epochs, lam0, layers=3):
    per_layer = [state(epoch, k) for k in range(layers)]
    means = [sum(s[i] for s in per_layer) / layers for i in range(3)]
    return dict(epoch=epoch, eps=0.01 * min(epoch, 3), lam=lam0 * max(0, 3 - epoch) / 3,
                lr=1e-3, loss=2.0 / epoch, l_tightness=1.0 / epoch, l_relu=0.1 * epoch,
                train_err=0.4, train_ver_err=0.8, active=means[0], inactive=means[1],
                unstable=means[2], relu_per_layer=per_layer, test_err=0.5 - 0.05 * epoch,
                test_ver_err=0.9 - 0.04 * epoch, img_per_s=100.0, seconds=1.0)


def diagnosis(bn_none=True):
    # log_delta grows by 1.5 per layer for the default init, 1.0 for kaiming, 0.1 for the IBP init
    slopes = dict(default=1.5, kaiming=1.0, ibp=0.1)
    rows = {init: [dict(layer=i, fan_in=9 * i, gain_eq6=1.0, gain_measured=1.0,
                        log_delta=slope * i - (init == 'ibp') * 2) for i in range(1, 6)]
            for init, slope in slopes.items()}
    report = {f'{init}/bn_full': rows[init] for init in slopes}
    if bn_none:
        report.update({f'{init}/bn_none': rows[init][::-1] for init in slopes})
    return dict(model='cnn7', dataset='mnist', source='mnist', eps=0.4, report=report)


def write_run(path, epochs=4, lam0=0.5, metrics=True, diag=None, extra_line=None):
    os.makedirs(path)
    lines = [json.dumps(record(e, epochs, lam0)) for e in range(1, epochs + 1)]
    with open(os.path.join(path, 'log.jsonl'), 'w') as f:
        f.write(''.join(line + '\n' for line in lines) + (extra_line or ''))
    if metrics:
        with open(os.path.join(path, 'metrics.json'), 'w') as f:
            json.dump(dict(final_epoch=epochs, eps=0.03, std_err=0.31, pgd_err=0.42, ver_err=0.55,
                           ver_changed=0, test_size=64, config=dict(lam0=lam0)), f)
    if diag is not None:
        with open(os.path.join(path, 'diagnosis.json'), 'w') as f:
            json.dump(diag, f)
    return str(path)


def check_pngs(out, names):
    assert sorted(os.listdir(out)) == sorted(names)
    sizes = []
    for name in names:
        with open(os.path.join(out, name), 'rb') as f:
            data = f.read()
        assert data[:8] == PNG_MAGIC, name
        assert int.from_bytes(data[16:20], 'big') == 800, name  # IHDR width: README width
        assert 5_000 < len(data) < 150_000, name
        sizes.append(len(data))
    assert sum(sizes) < 1_000_000


def ydata(line):
    return [float(v) for v in line.get_ydata()]


def test_one_run_writes_all_figures(tmp_path, plt, capsys):
    run = write_run(tmp_path / 'ours')
    assert plot_runs.main([run, '--out', str(tmp_path / 'plots')]) == 0
    check_pngs(tmp_path / 'plots', ALL)  # no diagnosis.json: no Figure 1
    assert capsys.readouterr().out.split() == [str(tmp_path / 'plots' / n) for n in ALL]


def test_several_runs_overlaid_with_labels(tmp_path, plt):
    dirs = [write_run(tmp_path / 'a', diag=diagnosis()), write_run(tmp_path / 'b', lam0=0),
            write_run(tmp_path / 'c', lam0=0, epochs=6)]
    out = tmp_path / 'plots'
    assert plot_runs.main(dirs + ['--labels', 'ours', 'vanilla', 'vanilla w/o BN',
                                  '--out', str(out)]) == 0
    check_pngs(out, ALL + ['fig1_init_bounds.png'])
    runs = [plot_runs.load_run(d, name) for d, name in zip(dirs, ['ours', 'vanilla', 'no BN'])]
    legend = plot_runs.fig_relu_states(plt, runs).legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ['ours', 'vanilla', 'no BN']


def test_figures_draw_the_logged_values(tmp_path, plt):
    run = plot_runs.load_run(write_run(tmp_path / 'r', epochs=4), 'r')
    epochs = [1, 2, 3, 4]
    recs = [record(e, 4, 0.5) for e in epochs]
    assert plot_runs.series(run, 'l_relu') == (epochs, [0.1 * e for e in epochs])
    fig = plot_runs.fig_relu_states(plt, [run])
    for s, name in enumerate(plot_runs.STATES):  # one panel per state, mean over the 3 layers
        line = fig.axes[s].lines[0]
        assert list(line.get_xdata()) == epochs
        assert ydata(line) == pytest.approx([sum(state(e, k)[s] for k in range(3)) / 3
                                             for e in epochs])
        assert fig.axes[s].get_title() == name
    fig = plot_runs.fig_relu_per_layer(plt, run)
    for k in range(3):
        assert ydata(fig.axes[2].lines[k]) == pytest.approx([state(e, k)[2] for e in epochs])
    fig = plot_runs.fig_regularizer(plt, [run], 'l_tightness', 'Fig. 3')
    assert ydata(fig.axes[0].lines[0]) == pytest.approx([1.0 / e for e in epochs])
    top, bottom, right = plot_runs.fig_curves(plt, [run]).axes
    test_err, ver_err, pgd_mark, ver_mark = top.lines[:4]
    assert ydata(test_err) == pytest.approx([r['test_err'] for r in recs])
    assert ydata(ver_err) == pytest.approx([r['test_ver_err'] for r in recs])
    assert (list(pgd_mark.get_xdata()), ydata(pgd_mark)) == ([4], [0.42])  # from metrics.json
    assert (list(ver_mark.get_xdata()), ydata(ver_mark)) == ([4], [0.55])
    assert ydata(bottom.lines[0]) == pytest.approx([0.01, 0.02, 0.03, 0.03])  # eps
    assert ydata(right.lines[0]) == pytest.approx([0.5 * 2 / 3, 0.5 / 3, 0, 0])  # lambda


def test_interrupted_run_without_metrics(tmp_path, plt):
    run = write_run(tmp_path / 'r', epochs=2, metrics=False)
    assert plot_runs.main([run, '--out', str(tmp_path / 'p')]) == 0
    check_pngs(tmp_path / 'p', ALL)
    top = plot_runs.fig_curves(plt, [plot_runs.load_run(run, 'r')]).axes[0]
    assert not [line for line in top.lines if line.get_marker() in ('x', '*') and
                len(line.get_xdata())]  # no final result to mark


def test_vanilla_run_logs_regularizers_with_lambda_zero(tmp_path, plt):
    runs = [plot_runs.load_run(write_run(tmp_path / name, lam0=lam0), name)
            for name, lam0 in [('ours', 0.5), ('vanilla', 0)]]
    fig = plot_runs.fig_regularizer(plt, runs, 'l_relu', 'Fig. 4')
    ours, vanilla = fig.axes[0].lines
    assert ydata(vanilla) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ['ours', 'vanilla (lambda 0: not optimized)']


@pytest.mark.parametrize('bn_none', [True, False])
def test_figure1_from_diagnosis(tmp_path, plt, bn_none):
    d = tmp_path / 'init'
    os.makedirs(d)
    with open(d / 'diagnosis.json', 'w') as f:
        json.dump(diagnosis(bn_none), f)
    assert plot_runs.main([str(d), '--out', str(tmp_path / 'p')]) == 0
    check_pngs(tmp_path / 'p', ['fig1_init_bounds.png'])  # no log.jsonl: Figure 1 only
    fig = plot_runs.fig_init_bounds(plt, [plot_runs.load_run(str(d), 'init')])
    assert [ax.get_title() for ax in fig.axes] == ['BN full', 'BN none'][:1 + bn_none]
    for ax, bn in zip(fig.axes, ['full', 'none']):
        rows, default = diagnosis()['report'][f'default/bn_{bn}'], ax.lines[0]
        assert list(default.get_xdata()) == [r['layer'] for r in rows]
        assert ydata(default) == pytest.approx([r['log_delta'] for r in rows])
    assert ydata(fig.axes[0].lines[2]) == pytest.approx([0.1 * i - 2 for i in range(1, 6)])


def test_missing_matplotlib_one_line_exit_2(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / 'r')
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # makes `import matplotlib` fail
    assert plot_runs.main([run, '--out', str(tmp_path / 'p')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'pip install -r requirements-plot.txt' in err
    assert not os.path.exists(tmp_path / 'p')


TORN = '{"epoch": 5, "eps": 0.03, "lam": 0'  # the last line of a run killed while writing it


@pytest.mark.parametrize('case', ['no folder', 'empty folder', 'only a torn line', 'corrupt line',
                                  'not a record', 'bad metrics', 'bad diagnosis', 'labels'])
def test_bad_inputs_one_line_exit_2(tmp_path, capsys, case):
    run = tmp_path / 'r'
    args = []
    if case == 'empty folder':
        os.makedirs(run)
    if case == 'only a torn line':
        os.makedirs(run)
        (run / 'log.jsonl').write_text(TORN)
    if case == 'corrupt line':  # a broken line before the last one is not a kill: an error
        write_run(run, extra_line=TORN + '\n' + json.dumps(record(6, 6, 0)) + '\n')
    if case == 'not a record':
        write_run(run, extra_line='[1, 2]\n')
    if case == 'bad metrics':
        write_run(run)
        (run / 'metrics.json').write_text('{"final_epoch": 4, ')
    if case == 'bad diagnosis':
        write_run(run, diag=dict(model='cnn7', report={'ibp/bn_full': [dict(layer=1)]}))
    if case == 'labels':
        write_run(run)
        args = ['--labels', 'a', 'b']
    assert plot_runs.main([str(run), '--out', str(tmp_path / 'p')] + args) == 2
    out, err = capsys.readouterr()
    assert out == '' and err.startswith('error: ') and err.count('\n') == 1, err
    assert not os.path.exists(tmp_path / 'p')


def test_torn_last_line_is_skipped(tmp_path, plt, capsys):
    run = write_run(tmp_path / 'r', epochs=3, metrics=False, extra_line=TORN)
    assert plot_runs.main([run, '--out', str(tmp_path / 'p')]) == 0
    assert 'torn last line' in capsys.readouterr().err
    assert plot_runs.series(plot_runs.load_run(run, 'r'), 'epoch')[1] == [1, 2, 3]


def test_command_line_error_has_no_traceback(tmp_path):
    run = write_run(tmp_path / 'r', extra_line='not json\n{}\n')
    res = subprocess.run([sys.executable, os.path.join(REPO, 'plot_runs.py'), run],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and res.stdout == ''
    assert res.stderr == f'error: {run}/log.jsonl, line 5: not JSON\n'


def test_end_to_end_smoke_run(smoke, tmp_path, plt):
    # A real (tiny) training run (the session's --smoke run, conftest.py) and an init diagnosis
    # written beside it, plotted: the log format is the script's own.
    assert smoke[0].returncode == 0, smoke[0].stderr
    run = str(tmp_path / 'smoke')
    shutil.copytree(smoke[1], run)
    assert ibp_tools.main(['diagnose-init', '--smoke', '--out-dir', run]) == 0
    assert os.path.exists(os.path.join(run, 'diagnosis.json')), \
        'diagnose-init --out-dir D wrote no D/diagnosis.json'
    res = subprocess.run([sys.executable, os.path.join(REPO, 'plot_runs.py'), run, '--out',
                          str(tmp_path / 'p')], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    check_pngs(tmp_path / 'p', ALL + ['fig1_init_bounds.png'])
    with open(os.path.join(run, 'log.jsonl')) as f:
        logged = [json.loads(line)['test_ver_err'] for line in f]
    top = plot_runs.fig_curves(plt, [plot_runs.load_run(run, 'smoke')]).axes[0]
    assert len(logged) == 6 and ydata(top.lines[1]) == pytest.approx(logged)
