"""Plot the paper's Figures 1-4 and the training curves from the files training runs write.

Shi et al., "Fast Certified Robust Training with Short Warmup" (NeurIPS 2021) shows
  Figure 1  log E(Delta_i), the mean bound width at layer i, at initialization: it grows with depth
            under the default init (bounds explode) and stays flat under the IBP init (Eq. 6);
  Figure 2  the fractions of active, inactive and unstable ReLU neurons per epoch;
  Figures 3, 4  L_tightness and L_relu per epoch (runs with lambda = 0, the vanilla baselines,
            log both without optimizing them).
curves.png adds test standard and verified error per epoch beside eps and lambda, with the final
PGD and verified error of metrics.json marked. One run, or several overlaid (one colour each):
    python ibp_short_warmup.py --diagnose-init --out-dir runs/init           # diagnosis.json
    python ibp_short_warmup.py --dataset cifar10 --out-dir runs/ours         # log.jsonl, ...
    python plot_runs.py runs/init runs/ours runs/vanilla --labels init ours vanilla --out plots
It reads only RUN_DIR/log.jsonl (one record per finished epoch), RUN_DIR/metrics.json (the final
result; an interrupted run has none) and RUN_DIR/diagnosis.json (from --diagnose-init), and writes
PNGs into --out. matplotlib is needed only here: pip install -r requirements-plot.txt
"""
import argparse
import json
import os
import sys

LOG_KEYS = ('epoch', 'eps', 'lam', 'l_tightness', 'l_relu', 'active', 'inactive', 'unstable',
            'relu_per_layer', 'test_err', 'test_ver_err')
STATES = ('active', 'inactive', 'unstable')  # the order of the entries of relu_per_layer
INITS = ('default', 'kaiming', 'ibp')
DASHES = ('-', '--', ':', '-.')  # Figure 1 with several diagnoses: one line style per run
SIZES = (9, 6.5, 4)  # Figure 1's marker size per init: lines that coincide (under BN) stay seen


class PlotError(Exception):
    """A bad input file: main prints it as one line and exits 2."""


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PlotError(f'{path}: not a readable JSON file ({e})')


def read_log(path):
    """(epoch records, whether a torn last line was skipped)."""
    # A run appends one line per epoch, so a kill can cut only the last line: skip it with a
    # note (the run itself drops it on --resume). A bad line anywhere else is a broken file.
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f'{path}: not readable ({e})')
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                return records, True
            raise PlotError(f'{path}, line {i + 1}: not JSON')
        missing = [k for k in LOG_KEYS if k not in rec] if isinstance(rec, dict) else LOG_KEYS
        if missing:
            raise PlotError(f'{path}, line {i + 1}: not an epoch record (no {", ".join(missing)})')
        records.append(rec)
    return records, False


def load_run(run_dir, label):
    """{label, log: [epoch records], metrics: dict or None, diagnosis: dict or None}."""
    def path(name):
        return os.path.join(run_dir, name)
    if not os.path.isdir(run_dir):
        raise PlotError(f'{run_dir}: no such folder')
    log, torn = read_log(path('log.jsonl')) if os.path.exists(path('log.jsonl')) else ([], False)
    metrics = read_json(path('metrics.json')) if os.path.exists(path('metrics.json')) else None
    diag = read_json(path('diagnosis.json')) if os.path.exists(path('diagnosis.json')) else None
    if not log and diag is None:
        raise PlotError(f'{run_dir}: no log.jsonl with a finished epoch and no diagnosis.json')
    if torn:
        print(f"note: {path('log.jsonl')}: skipped its torn last line", file=sys.stderr)
    if diag is not None:
        report = diag.get('report') if isinstance(diag, dict) else None
        rows = [r for v in report.values() for r in v] if isinstance(report, dict) else [None]
        if not all(isinstance(r, dict) and 'layer' in r and 'log_delta' in r for r in rows):
            raise PlotError(f'{path("diagnosis.json")}: no report of rows with layer, log_delta')
    return dict(label=label, log=log, metrics=metrics, diagnosis=diag)


def series(run, key):
    """(epochs, values) of one log.jsonl field: what the per-epoch figures draw."""
    return [r['epoch'] for r in run['log']], [r[key] for r in run['log']]


def side_legend(fig, *axes, **kwargs):
    # One legend for all panels, right of them: inside a panel it would hide curves.
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc='outside right upper', fontsize='small', **kwargs)


def style_keys(ax, styles):
    # Runs are told apart by colour; empty grey lines add what each line style means.
    for label, style in styles:
        ax.plot([], [], color='grey', label=label, **style)


def fig_init_bounds(plt, runs):
    diag_runs = [r for r in runs if r['diagnosis'] is not None]
    reports = [r['diagnosis']['report'] for r in diag_runs]
    bns = ['bn_full'] + (['bn_none'] if any('ibp/bn_none' in rep for rep in reports) else [])
    fig, axes = plt.subplots(1, len(bns), figsize=(8, 3.6), sharey=True, squeeze=False,
                             layout='constrained')
    for ax, bn in zip(axes[0], bns):
        for j, (run, report) in enumerate(zip(diag_runs, reports)):
            for k, init in enumerate(INITS):
                rows = report.get(f'{init}/{bn}', [])
                name = init if len(diag_runs) == 1 else f"{run['label']}: {init}"
                ax.plot([r['layer'] for r in rows], [r['log_delta'] for r in rows], marker='o',
                        markersize=SIZES[k], color=f'C{k}', linestyle=DASHES[j % len(DASHES)],
                        label=name)
        ax.set(title=f"{bn.replace('bn_', 'BN ')}", xlabel='ReLU layer i')
    side_legend(fig, axes[0][0], title='init')
    axes[0][0].set_ylabel('log E(Delta_i)  (mean bound width)')
    d = diag_runs[0]['diagnosis']  # several diagnoses: their legends name the runs instead
    what = f" ({d.get('model')} on {d.get('dataset')}, eps {d.get('eps', 0):.4g})"
    what = what if len(diag_runs) == 1 else ''
    fig.suptitle(f'Fig. 1: certified bounds at initialization{what}', fontsize='medium')
    return fig


def relu_panels(plt, title):
    # Figure 2's three panels: active (lower bound > 0), inactive (upper < 0), unstable
    fig, axes = plt.subplots(1, 3, figsize=(8, 3), sharey=True, layout='constrained')
    for ax, state in zip(axes, STATES):
        ax.set(title=state, xlabel='epoch')
    axes[0].set_ylabel('fraction of ReLU neurons')
    fig.suptitle(title, fontsize='medium')
    return fig, axes


def fig_relu_states(plt, runs):
    fig, axes = relu_panels(plt, 'Fig. 2: ReLU states under the IBP bounds (mean over layers)')
    for i, run in enumerate(runs):
        for ax, state in zip(axes, STATES):
            ax.plot(*series(run, state), color=f'C{i}', label=run['label'])
    side_legend(fig, axes[0])
    return fig


def fig_relu_per_layer(plt, run):
    fig, axes = relu_panels(plt, f"Fig. 2 per layer: ReLU states of {run['label']}")
    layers = len(run['log'][0]['relu_per_layer'])
    for k in range(layers):
        for s, ax in enumerate(axes):
            values = [r['relu_per_layer'][k][s] for r in run['log']]
            ax.plot(series(run, 'epoch')[0], values, label=str(k + 1),
                    color=plt.cm.viridis(k / max(layers - 1, 1)))  # dark: first layer
    side_legend(fig, axes[0], title='layer', ncol=1 + layers // 12)
    return fig


def fig_regularizer(plt, runs, key, title):
    fig, ax = plt.subplots(figsize=(8, 3.6), layout='constrained')
    for i, run in enumerate(runs):
        # Vanilla runs log the regularizer without optimizing it, as in the paper's figure.
        logged = ' (lambda 0: not optimized)' if max(series(run, 'lam')[1]) == 0 else ''
        ax.plot(*series(run, key), color=f'C{i}', label=run['label'] + logged)
    ax.set(title=title, xlabel='epoch', ylabel=key.replace('l_', 'L_'))
    ax.legend(fontsize='small')
    return fig


def fig_curves(plt, runs):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, layout='constrained')
    right = bottom.twinx()  # lambda (up to lam0) and eps (up to the target) on their own scales
    for i, run in enumerate(runs):
        c, m = f'C{i}', run['metrics']
        top.plot(*series(run, 'test_err'), color=c, label=run['label'])
        top.plot(*series(run, 'test_ver_err'), color=c, linestyle='--')
        if m is not None and m.get('pgd_err') is not None:
            top.plot([m['final_epoch']], [m['pgd_err']], color=c, marker='x', markersize=9)
        if m is not None and m.get('ver_err') is not None:
            top.plot([m['final_epoch']], [m['ver_err']], color=c, marker='*', markersize=11)
        bottom.plot(*series(run, 'eps'), color=c)
        right.plot(*series(run, 'lam'), color=c, linestyle=':')
    style_keys(top, [('standard', {}), ('verified', dict(linestyle='--')),
                     ('final PGD', dict(marker='x', linestyle='')),
                     ('final verified', dict(marker='*', linestyle=''))])
    style_keys(bottom, [('eps (left)', {}), ('lambda (right)', dict(linestyle=':'))])
    top.set(title='Training curves: test error (final values from metrics.json marked)',
            ylabel='test error')
    bottom.set(title='Warmup schedule: eps ramp and regularizer weight lambda', xlabel='epoch',
               ylabel='eps')
    right.set_ylabel('lambda')
    side_legend(fig, top, bottom)
    return fig


def draw_all(plt, runs, out):
    """Write every figure the runs have data for into out; returns the paths."""
    logged = [r for r in runs if r['log']]
    figures = []
    if any(r['diagnosis'] is not None for r in runs):
        figures.append(('fig1_init_bounds.png', fig_init_bounds(plt, runs)))
    if logged:
        figures += [('fig2_relu_states.png', fig_relu_states(plt, logged)),
                    ('fig2_relu_states_per_layer.png', fig_relu_per_layer(plt, logged[0])),
                    ('fig3_tightness.png', fig_regularizer(
                        plt, logged, 'l_tightness', 'Fig. 3: L_tightness (Eq. 7) per epoch')),
                    ('fig4_relu_balance.png', fig_regularizer(
                        plt, logged, 'l_relu', 'Fig. 4: L_relu (Eq. 8) per epoch')),
                    ('curves.png', fig_curves(plt, logged))]
    paths = []
    try:
        os.makedirs(out, exist_ok=True)
        for name, fig in figures:
            for ax in fig.axes:  # every x axis counts epochs or layers
                ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            paths.append(os.path.join(out, name))
            fig.savefig(paths[-1], dpi=100)
    except OSError as e:
        raise PlotError(f'cannot write {out}: {e}')
    finally:
        for name, fig in figures:
            plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description='Plot Figures 1-4 and training curves of runs.')
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR', help='--out-dir of a run')
    p.add_argument('--labels', nargs='+', help='legend names, one per RUN_DIR (default: folder)')
    p.add_argument('--out', default='plots', help='folder for the PNGs (default: plots)')
    args = p.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    try:
        if len(labels) != len(args.run_dirs):
            raise PlotError(f'{len(labels)} labels for {len(args.run_dirs)} run folders')
        runs = [load_run(d, label) for d, label in zip(args.run_dirs, labels)]
        try:
            import matplotlib
        except ImportError:
            print('plot_runs.py needs matplotlib: pip install -r requirements-plot.txt',
                  file=sys.stderr)
            return 2
        matplotlib.use('Agg')  # files only: works without a display
        import matplotlib.pyplot as plt
        paths = draw_all(plt, runs, args.out)
    except PlotError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print('\n'.join(paths))
    return 0


if __name__ == '__main__':
    sys.exit(main())
