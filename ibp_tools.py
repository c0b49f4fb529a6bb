"""Tools beside ibp_short_warmup.py that are neither training nor certification.

    python ibp_tools.py benchmark --dataset cifar10 --batch-size 64   # ms per training step
    python ibp_tools.py diagnose-init --dataset mnist --out-dir D     # Figure 1 and Eq. (6)

`benchmark` times clean training, vanilla IBP and the paper's method on synthetic batches of a
dataset's shape and writes OUT_DIR/benchmark.json. `diagnose-init` prints the difference gain of
every layer at initialization under PyTorch's default init, Kaiming and the IBP init (Sec. 3.3.1),
and with --out-dir writes D/diagnosis.json for plot_runs.py. Every other flag is a flag of
ibp_short_warmup.py (the model, the dataset, --eps, --device, ...). This file imports the main
file; nothing imports this one.
"""
import dataclasses
import functools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp


def median(values):
    return sorted(values)[len(values) // 2]


def benchmark(cfg, rounds=20):
    # ms per training step of (a) clean training, (b) vanilla IBP and (c) ours, on synthetic data
    # of the dataset's shape, after 3 warm-up rounds, the device synchronized. The steps take
    # turns, so a drift of the machine's speed hits all alike: ratios per round, then the median.
    dev, info = ibp.setup_device(cfg), ibp.dataset_info(cfg)
    x = ibp.to_input(torch.rand(cfg.batch_size, *info['shape'], device=dev), cfg)
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
        small = dataclasses.replace(cfg, train_size=1, test_size=256, val_size=0)
        x, y = ibp.load_data(small, dev)['test']
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


def main(argv=None):
    # `TOOL [--benchmark-steps N] FLAGS...`: FLAGS are parsed and checked as the main file's.
    p = ibp.Parser(prog='ibp_tools.py', allow_abbrev=False, description='Benchmark and init '
                   'diagnosis of ibp_short_warmup.py; every other flag is one of its flags.')
    p.add_argument('tool', choices=['benchmark', 'diagnose-init'])
    p.add_argument('--benchmark-steps', type=int, default=20, help='timed rounds (benchmark)')
    try:
        args, rest = p.parse_known_args(argv)
        if args.benchmark_steps < 1:
            raise ibp.UserError('--benchmark-steps must be >= 1')
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


if __name__ == '__main__':
    sys.exit(main())
