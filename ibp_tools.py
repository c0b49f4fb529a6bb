"""Tools beside ibp_short_warmup.py that are neither training nor certification.

    python ibp_tools.py benchmark --dataset cifar10 --batch-size 64   # ms per training step
    python ibp_tools.py diagnose-init --dataset mnist --out-dir D     # Figure 1 and Eq. (6)
    python ibp_tools.py ablation                                      # Table 4 on MNIST, CPU

`benchmark` times clean training, vanilla IBP and the paper's method on synthetic batches of a
dataset's shape and writes OUT_DIR/benchmark.json. `diagnose-init` prints the difference gain of
every layer at initialization under PyTorch's default init, Kaiming and the IBP init (Sec. 3.3.1),
and with --out-dir writes D/diagnosis.json for plot_runs.py. `ablation` trains the eight rows of
the paper's Table 4 (BN, IBP init, the two regularizers), --seeds seeds each, with one shared
configuration (STUDY_FLAGS) as child processes into --study-dir/ROW/sSEED, and writes
table.md and table.json there; run again, it skips finished runs and resumes interrupted ones.
Every other flag is a flag of ibp_short_warmup.py (the model, the dataset, --eps, --device, ...)
and, for `ablation`, overrides the study's configuration. The figures of a study:
    python ibp_tools.py diagnose-init STUDY FLAGS --out-dir runs/ablation_figures/init
    python plot_runs.py runs/ablation_figures/init runs/ablation/{no_bn_vanilla,full_bn_vanilla,
        all_ours}/s0 --labels init 'no BN, vanilla' 'full BN, vanilla' 'all (ours)'
        --out runs/ablation_figures
(table.md spells both out with the study's flags). This file imports the main file; only tests
import this one.
"""
import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp


def hms(seconds):
    return f'{int(seconds // 3600)}:{time.strftime("%M:%S", time.gmtime(seconds))}'


def median(values):
    return sorted(values)[len(values) // 2]


def benchmark(cfg, rounds=20):
    # ms per training step of (a) clean training, (b) vanilla IBP and (c) ours, on synthetic data
    # of the dataset's shape, after 3 warm-up rounds, the device synchronized. The steps take
    # turns, so a drift of the machine's speed hits all alike: ratios per round, then the median.
    dev, info = ibp.setup_device(cfg), ibp.dataset_info(cfg)
    x = torch.rand(cfg.batch_size, *info['shape'], device=dev)
    y = torch.randint(0, info['classes'], (cfg.batch_size,), device=dev)
    eps, steps = cfg.eps / 2, {}
    for name in ['clean', 'vanilla_ibp', 'ours']:
        ours = name == 'ours'
        c = dataclasses.replace(cfg, method='ours' if ours else 'vanilla', ibp_init=ours,
                                reg_tightness=ours, reg_relu=ours)
        model, opt, objective = ibp.prepare(c, dev, info)
        if name == 'clean':  # a plain step: forward, cross-entropy, backward, clipping, Adam
            forward = torch.compile(model.train()) if cfg.compile else model.train()

            def clean(forward=forward, model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(forward(x), y).backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
            steps[name] = clean
        else:
            lam = ibp.lam_at(eps, c.eps, c.lam0) if ours else 0.0
            steps[name] = functools.partial(ibp.train_step, objective, opt, x, y, eps, lam, c)
    times = {name: [] for name in steps}
    for i in range(3 + rounds):
        for name, step in steps.items():
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(1000 * (time.perf_counter() - t))
    per_round = {f'{k}/clean': [a / b for a, b in zip(times[k], times['clean'])]
                 for k in ('vanilla_ibp', 'ours')}
    results = {k: dict(ms_per_step=median(v), min_ms=min(v), max_ms=max(v),
                       img_per_s=cfg.batch_size / median(v) * 1000) for k, v in times.items()}
    out = dict(results=results, ratios={k: median(v) for k, v in per_round.items()},
               round_ratios=per_round, device=str(dev), model=cfg.model, width=cfg.width,
               batch_size=cfg.batch_size, shape=info['shape'], threads=torch.get_num_threads(),
               torch=torch.__version__, compile=cfg.compile)
    for k, r in results.items():
        print(f"{k:12s} {r['ms_per_step']:9.2f} ms/step (median of {rounds}; "
              f"range {r['min_ms']:.2f}-{r['max_ms']:.2f}) {r['img_per_s']:9.1f} img/s")
    print('ratios (median over rounds): ' + ', '.join(
        f'{k} {median(v):.2f} (range {min(v):.2f}-{max(v):.2f})' for k, v in per_round.items())
        + f' | {cfg.model} batch {cfg.batch_size} on {dev}')
    os.makedirs(cfg.out_dir, exist_ok=True)
    ibp.atomic_save(out, os.path.join(cfg.out_dir, 'benchmark.json'))
    return out


def init_gains(model, x, y, eps):
    # Per ReLU layer i: the fan-in n_i of the affine layer feeding it, Eq. (6)'s gain
    # n_i/2 E|W_i| from its weights, the measured E(Delta_i) / E(Delta_{i-1}) on the batch x,
    # and log E(Delta_i), the quantity of Figure 1.
    pre = []
    with torch.no_grad():
        ibp.ibp_margins(model, x, y, eps, pre)
    deltas = [r.mean().item() for _, r in pre]
    shortcuts = {id(m) for b in model.modules() if isinstance(b, ibp.Residual)
                 for m in b.shortcut.modules()}
    feeding, last = [], None
    for m in model.modules():  # the affine layer feeding each ReLU (a branch's last one)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in shortcuts:
            last = m
        if isinstance(m, nn.ReLU):
            feeding.append(last)
    rows = []
    for i, w in enumerate(feeding):
        n = ibp.fan_in(w)
        rows.append(dict(layer=i + 1, fan_in=n, gain_eq6=n / 2 * w.weight.abs().mean().item(),
                         gain_measured=deltas[i + 1] / deltas[i],
                         log_delta=math.log(deltas[i + 1])))
    return rows


def diagnose_init(cfg, out_dir=None):
    # Figure 1 and Eq. (6): the gains of every layer under PyTorch's default init, Kaiming and
    # the IBP init, with and without BN; into OUT_DIR/diagnosis.json when --out-dir is given.
    dev, info = ibp.setup_device(cfg), ibp.dataset_info(cfg)
    source = cfg.dataset
    try:
        small = dataclasses.replace(cfg, train_size=1, test_size=256)
        x, y = ibp.load_data(small, dev)[1]
    except ibp.UserError:  # no data here: a synthetic batch of that shape shows the gains too
        x, y = ibp.synthetic_images(256, info['shape'], info['classes'], 3)
        source = 'synthetic batch (dataset not available)'
    x, y = x.to(dev).float() / 255, y.to(dev)
    print(f'difference gain at initialization, {cfg.model} on {source}, eps {cfg.eps:.5f}; '
          'Delta = mean bound half-width\n(Eq. (6) assumes a ReLU before each layer: the first '
          'layer sees the input box itself, so its measured gain is about 2x)')
    report = {}
    for init in ['default', 'kaiming', 'ibp']:
        for bn in (['full', 'none'] if cfg.model == 'cnn7' else ['full']):
            variant = dataclasses.replace(cfg, bn=bn, ibp_init=init == 'ibp')
            model = ibp.prepare(variant, dev, info)[0]
            if init == 'kaiming':
                for m in [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]:
                    nn.init.kaiming_normal_(m.weight)
            rows = init_gains(model.train(), x, y, cfg.eps)
            report[f'{init}/bn_{bn}'] = rows
            print(f'\n{init} init, BN {bn}:\n layer   fan-in  gain Eq.6  measured  log E(Delta)')
            for r in rows:
                print(f" {r['layer']:5d} {r['fan_in']:8d} {r['gain_eq6']:10.3f} "
                      f"{r['gain_measured']:9.3f} {r['log_delta']:13.3f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        ibp.atomic_save(dict(model=cfg.model, dataset=cfg.dataset, source=source, eps=cfg.eps,
                             report=report), os.path.join(out_dir, 'diagnosis.json'))
    return report


# ---- ablation: the paper's Table 4 on a CPU budget --------------------------------------------
# The rows of Table 4: (slug, label, flags of ibp_short_warmup.py, the paper's CIFAR-10 verified
# error in % as (mean, std) for the 70-epoch (1+20+49) and the 160-epoch (1+80+79) schedules).
ROWS = [
    ('no_bn_vanilla', 'no BN, vanilla', ['--method', 'vanilla', '--bn', 'none'],
     (70.18, 0.18), (69.43, 0.28)),
    ('bn_conv_vanilla', 'BN after convs only, vanilla', ['--method', 'vanilla', '--bn', 'conv'],
     (71.12, 0.42), (69.21, 0.30)),
    ('full_bn_vanilla', 'full BN, vanilla', ['--method', 'vanilla'], (69.88, 0.10), (67.01, 0.29)),
    ('ibp_init', '+ IBP init', ['--method', 'vanilla', '--ibp-init'], (69.60, 0.35),
     (67.63, 0.34)),
    ('init_tightness', '+ init + L_tightness', ['--method', 'ours', '--no-reg-relu'],
     (68.96, 0.49), (66.74, 0.20)),
    ('init_relu', '+ init + L_relu', ['--method', 'ours', '--no-reg-tightness'], (69.38, 0.23),
     (66.46, 0.44)),
    ('regs_no_init', 'regularizers without IBP init', ['--method', 'ours', '--no-ibp-init'],
     (69.29, 0.28), (66.34, 0.38)),
    ('all_ours', 'all (ours)', ['--method', 'ours'], (68.81, 0.24), (65.58, 0.32)),
]
SLUGS = [r[0] for r in ROWS]
# The study's one configuration, for every row and seed; flags given to `ablation` override it.
# It scales the paper's MNIST setting (Sec. 4: CNN-7 with full BN, batch 256, Adam 5e-4 for 70
# epochs, the eps ramp from the first epoch over 2/7 of them, the LR decayed late) down to about
# 2 minutes per run on a loaded 2-core CPU: a CNN-7 of 1/8 width, 6,000 training images in
# batches of 64 for 3 epochs (a 2-epoch ramp, then 1 epoch at eps_target at a 5x lower LR), eps
# 0.3, the full test set and a 5-step PGD. Adam at 2e-3 (the --smoke preset's): at 5e-4 these
# 282 steps do not even fit the clean data.
STUDY_FLAGS = ['--dataset', 'mnist', '--width', '0.125', '--eps', '0.3', '--epochs', '3',
               '--eps-start', '1', '--eps-length', '2', '--lr-milestones', '2', '--lr', '2e-3',
               '--batch-size', '64', '--train-size', '6000', '--test-size', '0',
               '--pgd-steps', '5']
# Flags that the study itself sets per row and run; given to `ablation` they are an error.
STUDY_OWNED = {'method', 'bn', 'ibp_init', 'reg_tightness', 'reg_relu', 'seed', 'out_dir',
               'resume', 'eval_checkpoint', 'smoke'}
# Fields of a finished run's config that do not change its result: a rerun may differ in them.
NOT_RESULT = {'resume', 'device', 'data_dir', 'out_dir', 'compile', 'tf32'}
FIGURE_ROWS = ['no_bn_vanilla', 'full_bn_vanilla', 'all_ours']  # the study's figures: seed 0


def split_flags(argv):
    # ['--a', '1', '--b', ...] -> [(field name, [tokens of that flag])], in order. Flags must be
    # given in full (no abbreviations), so that overriding and the checks below see their names.
    booleans = {f.name for f in dataclasses.fields(ibp.Config) if f.type in (bool, ibp.Opt[bool])}
    fields = {f.name for f in dataclasses.fields(ibp.Config)}
    out = []
    for tok in argv:
        if not tok.startswith('--'):
            if not out:
                raise ibp.UserError(f'unexpected argument {tok!r} (flags of ibp_short_warmup.py '
                                    'follow the study flags)')
            out[-1][1].append(tok)
            continue
        name = tok[2:].split('=')[0].replace('-', '_')
        if name.startswith('no_') and name[3:] in booleans:
            name = name[3:]  # --no-x sets the same field as --x
        if name not in fields:
            raise ibp.UserError(f'unknown flag {tok.split("=")[0]} (give flags in full)')
        out.append((name, [tok]))
    return out


def merge_flags(base, override):
    # base's flags with override's replacing those of the same field, then override's others.
    new = dict(split_flags(override))
    merged = [(k, new.pop(k) if k in new else v) for k, v in split_flags(base)]
    return [tok for _, toks in merged + list(new.items()) for tok in toks]


def json_config(cfg):  # tuples as lists, like a config read back from a JSON file
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_state(run_dir, argv):
    # 'finished' (metrics.json), 'partial' (last.pt: --resume) or 'new'. A finished run must be of
    # this study's configuration, else its result would land in the wrong table.
    metrics = os.path.join(run_dir, 'metrics.json')
    if os.path.exists(metrics):
        saved = read_metrics(metrics)['config']
        now = json_config(ibp.resolve(ibp.parse_args(argv)))
        # A field that the run's version did not have yet is not a difference.
        diff = [k for k in now if k in saved and k not in NOT_RESULT and saved[k] != now[k]]
        if diff:
            raise ibp.UserError(f'{run_dir} holds a finished run with other values of: '
                                f'{", ".join(diff)}; pass another --study-dir')
        return 'finished'
    if os.path.exists(os.path.join(run_dir, 'last.pt')):
        return 'partial'
    return 'new'


def read_metrics(path):
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ibp.UserError(f'{path} is not readable ({ibp.first_line(e)})') from None
    keys = ('std_err', 'pgd_err', 'ver_err', 'wall_seconds', 'config')
    if not isinstance(m, dict) or any(k not in m for k in keys):
        raise ibp.UserError(f'{path} is not a metrics.json of ibp_short_warmup.py')
    return m


def mean_std(values):  # in %; the std over seeds (n - 1), None for one seed
    if not values:
        return None
    pct = [100 * v for v in values]
    return dict(mean=statistics.mean(pct), std=statistics.stdev(pct) if len(pct) > 1 else None)


def cell(stat):
    if stat is None:
        return '-'
    if stat['std'] is None:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def write_table(study, rows, seeds, base, command, invocations):
    # STUDY/table.json and STUDY/table.md from the runs' metrics.json files, rewritten after
    # every run: an interrupted study still shows what it has.
    table = []
    for slug, label, flags, paper70, paper160 in ROWS:
        if slug not in rows:
            continue
        runs = []
        for seed in seeds:
            path = os.path.join(study, slug, f's{seed}', 'metrics.json')
            if os.path.exists(path):
                m = read_metrics(path)
                runs.append(dict(seed=seed, dir=os.path.dirname(path), std_err=m['std_err'],
                                 pgd_err=m['pgd_err'], ver_err=m['ver_err'],
                                 wall_seconds=m['wall_seconds']))
        pgd = [r['pgd_err'] for r in runs if r['pgd_err'] is not None]
        walls = [r['wall_seconds'] for r in runs]
        table.append(dict(slug=slug, label=label, flags=' '.join(flags), seeds=len(runs),
                          std_err=mean_std([r['std_err'] for r in runs]),
                          pgd_err=mean_std(pgd) if len(pgd) == len(runs) else None,
                          ver_err=mean_std([r['ver_err'] for r in runs]),
                          wall_seconds=statistics.mean(walls) if walls else None,
                          paper_cifar10_verified_70=dict(mean=paper70[0], std=paper70[1]),
                          paper_cifar10_verified_160=dict(mean=paper160[0], std=paper160[1]),
                          runs=runs))
    total = sum(i['seconds'] for i in invocations)
    figures = study.rstrip('/') + '_figures'
    shown = [s for s in FIGURE_ROWS if s in rows]
    labels = ['init'] + [label for slug, label, *_ in ROWS if slug in shown]
    plot = ' '.join(['python plot_runs.py', shlex.quote(os.path.join(figures, 'init'))]
                    + [shlex.quote(os.path.join(study, s, f's{seeds[0]}')) for s in shown]
                    + ['--labels'] + [shlex.quote(x) for x in labels]
                    + ['--out', shlex.quote(figures)])
    diagnose = ' '.join(['python ibp_tools.py diagnose-init'] + [shlex.quote(a) for a in base]
                        + ['--out-dir', shlex.quote(os.path.join(figures, 'init'))])
    out = dict(command=command, run_flags=' '.join(shlex.quote(a) for a in base),
               seeds=seeds, rows=table, total_seconds=total, invocations=invocations,
               diagnose_command=diagnose, plot_command=plot)
    ibp.atomic_save(out, os.path.join(study, 'table.json'))
    lines = ['# Ablation (the paper\'s Table 4)', '', f'Command: `{command}`', '',
             f'Every run: `python ibp_short_warmup.py {out["run_flags"]} ROW FLAGS --seed S '
             '--out-dir STUDY/ROW/sS`', '',
             f'Seeds: {", ".join(map(str, seeds))}. Total time: {hms(total)} '
             f'({len(invocations)} invocation(s)). Errors in % on the test set at eps_target, '
             'mean ± standard deviation over seeds (n - 1); time: training and per-epoch '
             'evaluation, mean per run.', '',
             '| row | flags | seeds | standard | PGD | verified | time (s) '
             '| paper verified, CIFAR-10, 70 ep. | 160 ep. |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in table:
        wall = '-' if r['wall_seconds'] is None else f"{r['wall_seconds']:.0f}"
        lines.append(f"| {r['label']} | `{r['flags']}` | {r['seeds']} | {cell(r['std_err'])} | "
                     f"{cell(r['pgd_err'])} | {cell(r['ver_err'])} | {wall} | "
                     f"{cell(r['paper_cifar10_verified_70'])} | "
                     f"{cell(r['paper_cifar10_verified_160'])} |")
    lines += ['', 'The paper\'s numbers are CNN-7 on CIFAR-10 (5 repeats): for the direction of '
              'each change only; the absolute numbers are not comparable.', '',
              f'Figures (seed {seeds[0]}):', '', f'    {diagnose}', f'    {plot}', '']
    tmp = os.path.join(study, f'table.md.{os.getpid()}.tmp')
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines))
    os.replace(tmp, os.path.join(study, 'table.md'))
    return out


def result_line(m):
    pgd = '-' if m['pgd_err'] is None else f"{100 * m['pgd_err']:.2f}%"
    return (f"standard {100 * m['std_err']:.2f}% PGD {pgd} verified {100 * m['ver_err']:.2f}% "
            f"| {m['wall_seconds']:.0f} s")


def train_run(argv, log_path):
    # One run as a child process, its output appended to log_path. A Ctrl-C reaches the child
    # too (same process group); if only this process got it, the child is interrupted here. The
    # child saves whole epochs only, so the run resumes from its last finished epoch.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ibp_short_warmup.py')
    with open(log_path, 'a') as log:
        child = subprocess.Popen([sys.executable, script] + argv, stdout=log,
                                 stderr=subprocess.STDOUT)
        try:
            return child.wait()
        except KeyboardInterrupt:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                child.wait()
            raise


def ablation(study, rows, n_seeds, flags, command):
    owned = [toks[0] for k, toks in split_flags(flags) if k in STUDY_OWNED]
    if owned:
        raise ibp.UserError(f'{owned[0]} is set by the study itself (per row, seed and run '
                            'folder); pick rows with --rows, seeds with --seeds')
    base = merge_flags(STUDY_FLAGS, flags)
    seeds = list(range(n_seeds))
    # Seed by seed, every row: a study cut short still has comparable rows, and a drift of the
    # machine's speed is spread over all rows alike.
    plan = []
    for seed in seeds:
        for slug, label, row_flags, *_ in ROWS:
            if slug in rows:
                run_dir = os.path.join(study, slug, f's{seed}')
                argv = base + row_flags + ['--seed', str(seed), '--out-dir', run_dir]
                ibp.resolve(ibp.parse_args(argv))  # every bad value fails here, before any run
                plan.append((f'{slug} s{seed}', run_dir, argv, run_state(run_dir, argv)))
    os.makedirs(study, exist_ok=True)
    invocations = []
    try:  # the times of earlier invocations of this study, for its total
        with open(os.path.join(study, 'table.json')) as f:
            invocations = list(json.load(f)['invocations'])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    now = dict(started=time.strftime('%Y-%m-%d %H:%M:%S'), seconds=0.0, trained=0)
    invocations.append(now)
    t_start, took = time.time(), []
    todo = sum(p[3] != 'finished' for p in plan)
    print(f'ablation: {len(plan)} runs ({len(plan) - todo} finished) in {study}; the output of '
          'each run: ROW/sSEED.log there', flush=True)
    try:
        for i, (name, run_dir, argv, state) in enumerate(plan):
            where = f'[{i + 1}/{len(plan)}] {name}'
            if state == 'finished':
                m = read_metrics(os.path.join(run_dir, 'metrics.json'))
                print(f'{where}: skipped (finished): {result_line(m)}', flush=True)
                continue
            if state == 'new' and os.path.isdir(run_dir):
                shutil.rmtree(run_dir)  # killed in its first epoch: nothing in it to keep
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            t0 = time.time()
            code = train_run(argv + (['--resume'] if state == 'partial' else []),
                             run_dir + '.log')
            if code != 0:
                raise ibp.UserError(f'{where} failed (exit code {code}), see {run_dir}.log; '
                                    'the same command again retries it')
            took.append(time.time() - t0)
            now['trained'] += 1
            now['seconds'] = time.time() - t_start
            write_table(study, rows, seeds, base, command, invocations)
            m = read_metrics(os.path.join(run_dir, 'metrics.json'))
            left = statistics.mean(took) * (todo - len(took))
            how = 'resumed, finished' if state == 'partial' else 'finished'
            print(f'{where}: {how} in {took[-1]:.0f} s: {result_line(m)} | study left about '
                  f'{hms(left)}', flush=True)
    finally:  # after a failure or Ctrl-C too: the table of the finished runs, and the time
        now['seconds'] = time.time() - t_start
        out = write_table(study, rows, seeds, base, command, invocations)
    print(f"table: {os.path.join(study, 'table.md')} (and table.json); this invocation "
          f"{hms(now['seconds'])}, the whole study {hms(out['total_seconds'])}")
    return out

def main(argv=None):
    # `TOOL [TOOL FLAGS] FLAGS...`: FLAGS are flags of the main file, parsed and checked as there.
    argv = sys.argv[1:] if argv is None else argv
    p = ibp.Parser(prog='ibp_tools.py', allow_abbrev=False, description='Benchmark, init '
                   'diagnosis and the Table 4 ablation of ibp_short_warmup.py; every other flag '
                   'is one of its flags.')
    p.add_argument('tool', choices=['benchmark', 'diagnose-init', 'ablation'])
    p.add_argument('--benchmark-steps', type=int, default=20, help='timed rounds (benchmark)')
    p.add_argument('--study-dir', help='ablation: folder of the study (default: runs/ablation)')
    p.add_argument('--seeds', type=int, help='ablation: seeds 0..N-1 per row (default: 3)')
    p.add_argument('--rows', nargs='+', choices=SLUGS, help='ablation: these rows (default: all)')
    try:
        args, rest = p.parse_known_args(argv)
        if args.benchmark_steps < 1:
            raise ibp.UserError('--benchmark-steps must be >= 1')
        study_flags = [args.study_dir, args.seeds, args.rows]
        if args.tool != 'ablation' and any(v is not None for v in study_flags):
            raise ibp.UserError('--study-dir, --seeds and --rows are flags of ablation')
        if args.tool == 'ablation':
            seeds = 3 if args.seeds is None else args.seeds
            if seeds < 1:
                raise ibp.UserError(f'--seeds must be >= 1 (got {seeds})')
            command = ' '.join(['python ibp_tools.py'] + [shlex.quote(a) for a in argv])
            threads = os.environ.get('OMP_NUM_THREADS')
            if threads:  # it sets the speed of the runs, so it belongs to the command
                command = f'OMP_NUM_THREADS={shlex.quote(threads)} {command}'
            ablation(args.study_dir or os.path.join('runs', 'ablation'), args.rows or SLUGS,
                     seeds, rest, command)
            return 0
        cfg = ibp.parse_args(rest)
        out_dir = cfg.out_dir  # as given: diagnose-init writes its file only when asked to
        cfg = ibp.resolve(cfg)
        if args.tool == 'benchmark':
            benchmark(cfg, args.benchmark_steps)
        else:
            diagnose_init(cfg, out_dir)
        return 0
    except ibp.UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('\ninterrupted: run the same command again; finished runs are skipped, an '
              'interrupted one resumes from its last finished epoch', file=sys.stderr)
        return 130

if __name__ == '__main__':
    sys.exit(main())
