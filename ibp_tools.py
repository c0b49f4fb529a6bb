"""Plumbing of ibp_short_warmup.py that is neither the method nor its training loop.

Reading files from outside (dataset folders, checkpoints) safely, the progress line, certifying a
saved checkpoint (--eval-checkpoint), the speed benchmark (--benchmark) and the init diagnosis
(--diagnose-init, the paper's Figure 1 and Eq. (6)). Everything runs through ibp_short_warmup.py:
    python ibp_short_warmup.py --eval-checkpoint runs/X/last.pt               # certify a model
    python ibp_short_warmup.py --benchmark --dataset cifar10 --batch-size 64  # ms per step
    python ibp_short_warmup.py --diagnose-init --dataset mnist --out-dir D    # Figure 1, Eq. (6)
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp


# ---- Dataset files: torchvision's formats and the tiny-imagenet-200 folder -------------------
def torchvision_data(name, root, train):
    import torchvision.datasets as tvd
    cls = dict(mnist=tvd.MNIST, fashionmnist=tvd.FashionMNIST, cifar10=tvd.CIFAR10)[name]
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        try:
            ds = cls(root, train=train, download=False)
        except Exception:  # absent: fetch it (torchvision checks the MD5)
            ds = cls(root, train=train, download=True)
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST N H W, CIFAR N H W C
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def tinyimagenet_data(root):
    # The official tiny-imagenet-200 folder: wnids.txt (its line order gives the labels),
    # train/WNID/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt. Decoded once into a
    # uint8 cache beside them.
    base = os.path.join(root, 'tiny-imagenet-200')
    cache = os.path.join(base, 'uint8_tensors.pt')
    if os.path.exists(cache):
        try:
            (x, y), (xv, yv) = torch.load(cache, weights_only=True)
            ok = x.dtype == xv.dtype == torch.uint8 and len(x) == len(y) and len(xv) == len(yv)
        except Exception:
            ok = False
        if not ok:
            raise ibp.UserError(f'{cache} is not a cache of this script: delete it to rebuild it')
        return (x, y), (xv, yv)
    if not os.path.isdir(base):
        from torchvision.datasets.utils import download_and_extract_archive
        with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), \
                contextlib.redirect_stderr(null):
            download_and_extract_archive('http://cs231n.stanford.edu/tiny-imagenet-200.zip', root)
    import numpy as np
    import PIL.Image
    try:
        with open(os.path.join(base, 'wnids.txt')) as f:
            label = {w: i for i, w in enumerate(f.read().split())}
        train = []
        for w in label:
            folder = os.path.join(base, 'train', w, 'images')
            train += [(os.path.join(folder, name), label[w]) for name in sorted(os.listdir(folder))]
        with open(os.path.join(base, 'val', 'val_annotations.txt')) as f:
            val = [line.split('\t')[:2] for line in f if line.strip()]
        val = [(os.path.join(base, 'val', 'images', name), label[w]) for name, w in val]
        data = []
        for part in (train, val):
            images = [np.asarray(PIL.Image.open(p).convert('RGB')) for p, _ in part]
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            data.append((x, torch.tensor([y for _, y in part])))
    except (OSError, KeyError, ValueError) as e:
        raise ibp.UserError(f'{base} is not a complete tiny-imagenet-200 folder '
                            f'({first_line(e)})') from None
    ibp.atomic_save(data, cache)
    return data


def read_dataset(name, root):
    # ((x, y), (x, y)): the uint8 train and test images of a real dataset, and their labels.
    import socket
    socket.setdefaulttimeout(60)
    try:
        if name == 'tinyimagenet':
            return tinyimagenet_data(root)
        return torchvision_data(name, root, True), torchvision_data(name, root, False)
    except ibp.UserError:
        raise
    except Exception as e:
        where = dict(tinyimagenet='tiny-imagenet-200/', cifar10='cifar-10-batches-py/',
                     mnist='MNIST/raw/', fashionmnist='FashionMNIST/raw/')[name]
        raise ibp.UserError(f'{name} is not in {os.path.abspath(root)} and could not be '
                            f'downloaded ({type(e).__name__}); put {where} there or pass '
                            '--data-dir') from None


# ---- Checkpoint files, resuming, and what is printed --------------------------------------
LONG_CPU_RUN = 3 * 3600  # seconds: a CPU run longer than this is worth a note


def format_record(r):  # the fixed-format epoch line
    return (f"ep {r['epoch']:3d} | eps {r['eps']:.5f} lam {r['lam']:.3f} lr {r['lr']:.1e} | "
            f"loss {r['loss']:.4f} Ltight {r['l_tightness']:.4f} Lrelu {r['l_relu']:.4f} | "
            f"relu act {r['active']:.2f} inact {r['inactive']:.2f} unst {r['unstable']:.2f} | "
            f"train err {r['train_err']:.4f} ver {r['train_ver_err']:.4f} | "
            f"test err {r['test_err']:.4f} ver {r['test_ver_err']:.4f} | "
            f"{r['img_per_s']:7.1f} img/s {r['seconds']:6.1f} s")


def hms(seconds):
    return f'{int(seconds // 3600)}:{time.strftime("%M:%S", time.gmtime(seconds))}'


PROGRESS_AFTER, PROGRESS_EVERY = 10, 5  # seconds: the progress line, in long epochs only
NONFINITE = ['loss', 'margin bound', 'gradient norm']  # the columns of train_step's `nonfinite`


def progress(cfg, dev, epoch, i, steps, t0, shown, epoch_s, warned):
    # After step i: the time left in the epoch and in the run at this speed, on a terminal, and
    # once a note when a CPU run would take hours. -> (when last shown, whether noted)
    now = time.time()
    seconds = now - t0
    if seconds < PROGRESS_AFTER or now - shown < PROGRESS_EVERY:
        return shown, warned
    left_epoch = seconds / (i + 1) * (steps - i - 1)
    left_run = left_epoch + (epoch_s or seconds / (i + 1) * steps) * (cfg.epochs - epoch)
    if dev.type == 'cpu' and left_run > LONG_CPU_RUN and not warned:
        print(f'note: this run takes about {hms(left_run + seconds)} at this speed on the CPU; '
              'try --smoke, or less: --width 0.25 --train-size 10000', flush=True)
    if cfg.progress:
        print(f'\r  ep {epoch} batch {i + 1}/{steps} | {(i + 1) * cfg.batch_size / seconds:.1f}'
              f' img/s | epoch left {hms(left_epoch)} | run left {hms(left_run)}  ', end='',
              flush=True)
    return now, warned or left_run > LONG_CPU_RUN


def print_eta(epochs_left, epoch_s):
    left = epoch_s * epochs_left
    end = time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + left))
    print(f'eta: the run ends around {end}, in about {hms(left)} (epochs left: {epochs_left})',
          flush=True)


def check_finite(flags, epoch, steps, cfg):
    # flags[step]: the step's `nonfinite`. Stops the run before the epoch is logged or saved.
    bad = flags.any(1).nonzero()
    if len(bad):
        step = bad[0, 0].item()
        what = NONFINITE[flags[step].nonzero()[0, 0].item()]
        eps = ibp.eps_at((epoch - 1) * steps + step, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
        kept = f'last.pt keeps epoch {epoch - 1}' if epoch > 1 else 'no epoch was saved'
        raise ibp.UserError(f'training diverged at epoch {epoch}, step {step + 1} (eps '
                            f'{eps:.5f}): non-finite {what}; {kept} (try a lower --lr)')


def first_line(e):
    return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'


def read_checkpoint(path, device):
    # A checkpoint holds tensors and plain values only, so it loads with weights_only=True:
    # unpickling a downloaded file can then run no code. Anything else is one clear line.
    if not os.path.isfile(path):
        raise ibp.UserError(f'{path}: no such checkpoint file')
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: one line only
            warnings.simplefilter('ignore')
            ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = f'is not a readable checkpoint ({first_line(e)})'
        if 'Weights only load failed' in str(e):
            why = 'holds Python objects, refused: unpickling them could run code'
        raise ibp.UserError(f'{path} {why}') from None
    if not isinstance(ck, dict) or not isinstance(ck.get('config'), dict) or 'model' not in ck:
        raise ibp.UserError(f'{path} is not a checkpoint of this script (no model and config)')
    unknown = set(ck['config']) - {f.name for f in dataclasses.fields(ibp.Config)}
    if unknown:
        raise ibp.UserError(f'{path} is from an incompatible version ({sorted(unknown)})')
    return ck


def load_state(path, module, state):
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ibp.UserError(f'{path} does not fit this model ({first_line(e)})') from None


RUNTIME_FIELDS = {'resume', 'device', 'data_dir', 'out_dir', 'epochs', 'eval_checkpoint',
                  'compile', 'tf32', 'channels_last', 'pgd_steps', 'pgd_restarts', 'smoke',
                  'benchmark', 'benchmark_steps', 'diagnose_init', 'progress'}


def truncate_log(path, start_epoch):
    # log.jsonl keeps exactly the epochs of the checkpoint (a torn last line, from a kill, is
    # dropped), rewritten atomically: an interrupted resume loses no line.
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    keep = [s + '\n' for s in lines if s.endswith('}') and json.loads(s)['epoch'] < start_epoch]
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.writelines(keep)
    os.replace(tmp, path)


def load_checkpoint(cfg, model, opt, dev):
    # Resume from OUT_DIR/last.pt: (first epoch to run, best validation error, wall seconds).
    # Only the runtime flags (RUNTIME_FIELDS) may differ from the run being continued.
    path = os.path.join(cfg.out_dir, 'last.pt')
    if not cfg.resume:
        if os.path.exists(path):
            raise ibp.UserError(f'{cfg.out_dir} already holds a run: pass --resume to continue '
                                'it, or another --out-dir')
        return 1, float('inf'), 0.0
    if not os.path.exists(path):
        raise ibp.UserError(f'--resume: no checkpoint at {path}')
    ck = read_checkpoint(path, dev)
    missing = {'optimizer', 'epoch', 'best', 'wall'} - set(ck)  # best.pt, say, cannot resume
    if missing:
        raise ibp.UserError(f'--resume: {path} is not a last.pt (no {", ".join(sorted(missing))})')
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the saved one
    saved = json.loads(json.dumps(ck['config']))
    diff = [k for k, v in saved.items() if k not in RUNTIME_FIELDS and v != now.get(k)]
    if diff:
        raise ibp.UserError(f'--resume: {path} is from a run with other values of: '
                            + ', '.join(diff))
    load_state(path, model, ck['model'])
    load_state(path, opt, ck['optimizer'])
    return ck['epoch'] + 1, ck['best'], ck['wall']


# ---- Certify a saved checkpoint, benchmark the step, diagnose the initialization ------------
def eval_checkpoint(cfg):
    # Certify a saved model at its eps_target (or --eps), with its own config. Its flags skip
    # resolve, so the ones used here are checked here.
    if (cfg.eps is not None and cfg.eps <= 0) or cfg.pgd_steps < 0 or cfg.pgd_restarts < 1 \
            or cfg.test_size < 0:
        raise ibp.UserError('--eps must be > 0, --pgd-steps and --test-size >= 0, '
                            '--pgd-restarts >= 1')
    dev = ibp.setup_device(cfg)
    ck = read_checkpoint(cfg.eval_checkpoint, dev)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in ck['config'].items()}
    saved = ibp.Config(**config)
    saved = dataclasses.replace(saved, device=cfg.device, data_dir=cfg.data_dir,
                                test_size=cfg.test_size or saved.test_size,
                                channels_last=False, compile=False)
    model = ibp.build_model(saved, ibp.dataset_info(saved)).to(dev)
    load_state(cfg.eval_checkpoint, model, ck['model'])
    data = ibp.load_data(dataclasses.replace(saved, train_size=1, val_size=0), dev)
    eps = cfg.eps if cfg.eps is not None else saved.eps
    res = ibp.evaluate(model, data['test'], eps, pgd_steps=cfg.pgd_steps,
                       pgd_restarts=cfg.pgd_restarts, seed=cfg.seed, recheck=True)
    print(json.dumps(dict(checkpoint=cfg.eval_checkpoint, epoch=ck.get('epoch'), eps=eps, **res)))
    return res


def median(values):
    return sorted(values)[len(values) // 2]


def benchmark(cfg):
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
    for i in range(3 + cfg.benchmark_steps):
        for name, step in steps.items():
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if dev.type == 'cuda':
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(1000 * (time.perf_counter() - t))
    rounds = {f'{k}/clean': [a / b for a, b in zip(times[k], times['clean'])]
              for k in ('vanilla_ibp', 'ours')}
    results = {k: dict(ms_per_step=median(v), min_ms=min(v), max_ms=max(v),
                       img_per_s=cfg.batch_size / median(v) * 1000) for k, v in times.items()}
    out = dict(results=results, ratios={k: median(v) for k, v in rounds.items()},
               round_ratios=rounds, device=str(dev), model=cfg.model, width=cfg.width,
               batch_size=cfg.batch_size, shape=info['shape'], threads=torch.get_num_threads(),
               torch=torch.__version__, compile=cfg.compile)
    for k, r in results.items():
        print(f"{k:12s} {r['ms_per_step']:9.2f} ms/step (median of {cfg.benchmark_steps}; "
              f"range {r['min_ms']:.2f}-{r['max_ms']:.2f}) {r['img_per_s']:9.1f} img/s")
    print('ratios (median over rounds): ' + ', '.join(
        f'{k} {median(v):.2f} (range {min(v):.2f}-{max(v):.2f})' for k, v in rounds.items())
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


def main(cfg, out_dir=None):
    # Called by ibp_short_warmup.main with a resolved Config; out_dir: the --out-dir given, if any.
    if cfg.benchmark:
        return benchmark(cfg)
    return diagnose_init(cfg, out_dir)
