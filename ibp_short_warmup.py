"""Fast Certified Robust Training with Short Warmup: the whole method in one file.

Paper: Zhouxing Shi, Yihan Wang, Huan Zhang, Jinfeng Yi, Cho-Jui Hsieh. "Fast Certified Robust
Training with Short Warmup", NeurIPS 2021, https://arxiv.org/abs/2103.17268.

What this file reproduces: certified (L-infinity) robust training with interval bound propagation
(IBP, Eq. 3) made fast by the paper's three contributions, each tagged `[paper]` below:
  1. IBP initialization (Sec. 3.3.1): weights ~ N(0, (sqrt(2 pi) / n_i)^2), difference gain 1 (Eq. 6);
  2. BatchNorm after every affine layer (Sec. 3.3.2), with clean-batch statistics in the bounds;
  3. two warmup regularizers, L_tightness (Eq. 7) and L_relu (Eq. 8), in the objective Eq. (10).
Models: CNN-7, Wide-ResNet and ResNeXt with full BN for MNIST, Fashion-MNIST, CIFAR-10 and
TinyImageNet, plus a generated `synthetic` dataset for tests and quick runs.

Commands (defaults per dataset follow the paper and the authors' release; see `--help`):
    python ibp_short_warmup.py --smoke                          # CPU, synthetic data, ~9 s
    python ibp_short_warmup.py --dataset cifar10                # 160 epochs (1+80+79), eps 8/255
    python ibp_short_warmup.py --dataset cifar10 --epochs 70    # 70 epochs (1+20+49)
    python ibp_short_warmup.py --dataset mnist                  # 70 epochs (0+20+50), eps 0.4
    python ibp_short_warmup.py --dataset tinyimagenet           # 80 epochs (1+20+59), eps 1/255
    python ibp_short_warmup.py --dataset cifar10 --method vanilla     # the vanilla IBP baseline
    python ibp_short_warmup.py --eval-checkpoint runs/X/last.pt       # certify a saved model
    python ibp_short_warmup.py --benchmark --batch-size 64            # ms per step: clean, vanilla IBP, ours

Expected results (IBP-verified error, the paper's CNN-7 numbers; not yet reproduced by us on a GPU):
CIFAR-10 eps 8/255 160 epochs 65.58% (standard 51.72%), 70 epochs 68.81%; MNIST eps 0.4 11.03%
(standard 2.33%); TinyImageNet eps 1/255 82.36%. The paper's CIFAR-10 CNN-7 epoch takes 64 s on one
RTX 2080 Ti. Measured here on a 2-core Xeon CPU (no GPU): a CNN-7 step at batch 64 takes 0.28 s clean,
0.86 s ours (3.08x clean; 2.74x with --compile, vanilla IBP 2.97x/2.76x); `--smoke` 8.5 s; see README.md.

Outputs in --out-dir: one line per epoch on stdout, log.jsonl (the same records), last.pt (written
atomically after every epoch; `--resume` continues from it), metrics.json (final result).
"""
import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS_FLOOR = 1e-6  # eps used for the regularizers' bounds while the scheduled eps is 0 (SPEC 4)
DIV_GUARD = 1e-12  # keeps the ratios of Eq. (7) and (8) finite
ATTACK_TOL = 1e-4  # margin by which an attack must beat a verified sample before it is a bug


class UserError(Exception):
    """Bad input or a missing resource: reported as one line, exit code 2."""


# ---- Config ----------------------------------------------------------------------------------
def opt(default, help, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    dataset: str = opt('cifar10', 'dataset', choices=['cifar10', 'mnist', 'fashionmnist', 'tinyimagenet', 'synthetic'])
    model: str = opt('cnn7', 'model family, all with BN after every affine layer', choices=['cnn7', 'wide_resnet', 'resnext'])
    method: str = opt('ours', "'ours' = IBP init + both regularizers; 'vanilla' = default init, no regularizer", choices=['ours', 'vanilla'])
    bn: str = opt('full', 'CNN-7 BN placement (Table 4): after every layer, after convs only, none', choices=['full', 'conv', 'none'])
    ibp_init: typing.Optional[bool] = opt(None, '[paper] IBP initialization, Sec. 3.3.1 (default: on for ours)')
    reg_tightness: typing.Optional[bool] = opt(None, '[paper] L_tightness, Eq. (7) (default: on for ours)')
    reg_relu: typing.Optional[bool] = opt(None, '[paper] L_relu, Eq. (8) (default: on for ours)')
    eps: typing.Optional[float] = opt(None, 'eps_target, L-inf radius in pixel units [0,1], for training and test (default: per dataset)')
    epochs: typing.Optional[int] = opt(None, 'total epochs (default: per dataset)')
    eps_start: typing.Optional[int] = opt(None, 'first epoch of the eps ramp (1-based; eps = 0 before it) (default: per dataset)')
    eps_length: typing.Optional[int] = opt(None, 'length of the eps ramp in epochs (default: per dataset)')
    lr: float = opt(5e-4, 'Adam learning rate')
    lr_decay: float = opt(0.2, 'LR factor at each milestone')
    lr_milestones: typing.Optional[typing.Tuple[int, ...]] = opt(None, 'epochs after which the LR decays (default: per dataset)')
    batch_size: typing.Optional[int] = opt(None, 'global batch size (default: per dataset)')
    accum_steps: typing.Optional[int] = opt(None, 'gradient accumulation steps per batch; BN statistics per chunk (default: per dataset)')
    grad_clip: float = opt(10.0, 'gradient-norm clipping')
    tau: float = opt(0.5, '[paper] tau, tolerance of both regularizers, 0 < tau <= 1')
    lam0: typing.Optional[float] = opt(None, '[paper] lambda_0, initial regularizer weight, Eq. (10) (default: per dataset)')
    width: float = opt(1.0, 'channel/hidden-width multiplier of every model (e.g. 0.125 for a CPU-sized CNN-7)')
    seed: int = opt(0, 'random seed (model init, batch order, augmentation, attack)')
    device: str = opt('auto', "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    data_dir: str = opt('data', 'where datasets are found or downloaded to')
    out_dir: typing.Optional[str] = opt(None, 'output folder (default: runs/DATASET_MODEL_METHOD_sSEED)')
    resume: bool = opt(False, 'continue the run in --out-dir from its last.pt')
    train_size: int = opt(0, 'use a fixed random subset of this many training images (0 = all; synthetic: 4096)')
    test_size: int = opt(0, 'use a fixed random subset of this many test images (0 = all; synthetic: 1024)')
    val_size: int = opt(0, 'hold out this many training images as a validation split that picks best.pt')
    synthetic_shape: typing.Tuple[int, ...] = opt((3, 32, 32), 'C H W of the synthetic dataset')
    synthetic_classes: int = opt(10, 'classes of the synthetic dataset')
    eval_checkpoint: typing.Optional[str] = opt(None, 'evaluate this checkpoint (standard, PGD, verified error at eps_target) and exit')
    pgd_steps: int = opt(20, 'PGD steps of the final attack (0 = no attack)')
    pgd_restarts: int = opt(1, 'PGD random restarts of the final attack')
    tf32: bool = opt(True, 'allow TF32 matmuls/convolutions in training on CUDA (never in certification)')
    channels_last: typing.Optional[bool] = opt(None, 'channels-last memory format (default: on for CUDA)')
    compile: bool = opt(False, 'torch.compile the bound computation: fused element-wise passes, 20-40 s of compilation first')
    benchmark: bool = opt(False, 'time clean / vanilla IBP / ours training steps on synthetic data and exit')
    benchmark_steps: int = opt(20, 'timed steps per benchmark variant')
    diagnose_init: bool = opt(False, 'print the per-layer difference gains at initialization (Figure 1, Eq. 6) and exit')
    smoke: bool = opt(False, 'preset: synthetic data, narrow CNN-7, 6 epochs crossing all three eps phases (CPU, < 60 s)')


# Dataset-dependent defaults (SPEC 5). `schedules` maps epochs -> (eps_start, eps_length, milestones).
DATASETS = {
    'cifar10': dict(eps=8 / 255, epochs=160, schedules={160: (2, 80, (120, 140)), 70: (2, 20, (50, 60))},
                    batch_size=128, accum_steps=1, lam0=0.5, pad=2, classes=10, shape=(3, 32, 32),
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    'mnist': dict(eps=0.4, epochs=70, schedules={70: (1, 20, (50, 60))}, batch_size=256, accum_steps=1,
                  lam0=0.5, pad=0, classes=10, shape=(1, 28, 28), mean=(0.0,), std=(1.0,)),
    'tinyimagenet': dict(eps=1 / 255, epochs=80, schedules={80: (2, 20, (61, 71))}, batch_size=128, accum_steps=2,
                         lam0=0.2, pad=4, classes=200, shape=(3, 64, 64),
                         mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262)),
    'synthetic': dict(eps=8 / 255, epochs=10, schedules={10: (2, 4, (8, 9))}, batch_size=64, accum_steps=1,
                      lam0=0.5, pad=0, classes=None, shape=None, mean=None, std=None),
}
DATASETS['fashionmnist'] = dict(DATASETS['mnist'], eps=0.1)  # not in the paper: MNIST's schedule, the customary eps 0.1
SMOKE = dict(dataset='synthetic', model='cnn7', width=0.125, epochs=6, eps_start=2, eps_length=3, lr_milestones=(5,),
             batch_size=64, train_size=1024, test_size=256, lr=2e-3, eps=4 / 255, synthetic_shape=(3, 32, 32), pgd_steps=10)


def dataset_info(cfg):
    info = dict(DATASETS[cfg.dataset])
    if cfg.dataset == 'synthetic':
        c = cfg.synthetic_shape[0]
        info.update(classes=cfg.synthetic_classes, shape=tuple(cfg.synthetic_shape), mean=(0.5,) * c, std=(0.25,) * c)
    return info


def resolve(cfg):
    # Fill every None default from the dataset table and the method, then validate: one place.
    info = dataset_info(cfg)
    for k in ('eps', 'epochs', 'batch_size', 'accum_steps', 'lam0'):
        setattr(cfg, k, info[k] if getattr(cfg, k) is None else getattr(cfg, k))
    start, length, milestones = info['schedules'].get(cfg.epochs, info['schedules'][info['epochs']])
    cfg.eps_start = start if cfg.eps_start is None else cfg.eps_start
    cfg.eps_length = length if cfg.eps_length is None else cfg.eps_length
    cfg.lr_milestones = tuple(milestones if cfg.lr_milestones is None else cfg.lr_milestones)
    for k in ('ibp_init', 'reg_tightness', 'reg_relu'):  # [paper] contributions: on for ours
        setattr(cfg, k, cfg.method == 'ours' if getattr(cfg, k) is None else getattr(cfg, k))
    if cfg.dataset == 'synthetic':
        cfg.train_size, cfg.test_size = cfg.train_size or 4096, cfg.test_size or 1024
    if cfg.out_dir is None:
        cfg.out_dir = os.path.join('runs', f'{cfg.dataset}_{cfg.model}_{cfg.method}_s{cfg.seed}')
    checks = [
        (cfg.eps > 0, f'--eps must be > 0 (got {cfg.eps})'),
        (cfg.epochs >= 1, f'--epochs must be >= 1 (got {cfg.epochs})'),
        (cfg.eps_start >= 1 and cfg.eps_length >= 1, '--eps-start and --eps-length must be >= 1'),
        (cfg.eps_start + cfg.eps_length - 1 <= cfg.epochs,
         f'the eps ramp (epochs {cfg.eps_start}..{cfg.eps_start + cfg.eps_length - 1}) is longer than the run '
         f'({cfg.epochs} epochs): set --eps-start/--eps-length'),
        (cfg.batch_size >= 1 and cfg.accum_steps >= 1 and cfg.batch_size % cfg.accum_steps == 0,
         '--batch-size must be a positive multiple of --accum-steps'),
        (0 < cfg.tau <= 1, f'--tau must be in (0, 1] (got {cfg.tau})'),
        (cfg.lam0 >= 0 and cfg.lr > 0 and cfg.width > 0 and cfg.grad_clip > 0, '--lam0 must be >= 0; --lr, --width, --grad-clip > 0'),
        (min(cfg.train_size, cfg.test_size, cfg.val_size, cfg.pgd_steps) >= 0 and cfg.pgd_restarts >= 1,
         'sizes and --pgd-steps must be >= 0, --pgd-restarts >= 1'),
        (cfg.model == 'cnn7' or cfg.bn == 'full', '--bn conv/none is the CNN-7 ablation (Table 4); residual models have full BN'),
        (len(cfg.synthetic_shape) == 3 and min(cfg.synthetic_shape) >= 1 and cfg.synthetic_shape[1] % 4 == 0
         and cfg.synthetic_shape[2] % 4 == 0 and cfg.synthetic_classes >= 2,
         '--synthetic-shape must be C H W with H, W multiples of 4; --synthetic-classes >= 2'),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + traceback-like noise
        raise UserError(message)


def parse_args(argv=None):
    # Only the flags given on the command line land in the parsed namespace (SUPPRESS), so that
    # --smoke fills exactly the others and Config's defaults the rest.
    p = _Parser(description='Fast certified robust training with short warmup (Shi et al., NeurIPS 2021).',
                argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        t = [a for a in typing.get_args(f.type) if a is not type(None)][0] if typing.get_origin(f.type) is typing.Union else f.type
        kw = dict(help=f.metadata['help'] + ('' if f.default is None else f' (default: {f.default})'), choices=f.metadata.get('choices'))
        kw.update(dict(action=argparse.BooleanOptionalAction) if t is bool else
                  dict(nargs='+', type=int) if typing.get_origin(t) is tuple else dict(type=t))
        p.add_argument('--' + f.name.replace('_', '-'), **kw)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()}
    return Config(**{**(SMOKE if given.get('smoke') else {}), **given})


# ---- Data: whole datasets as uint8 tensors on the training device, augmented there in batches ----
def synthetic_images(n, shape, classes, seed):
    # A deterministic learnable dataset: one smooth random prototype per class plus pixel noise.
    g = torch.Generator().manual_seed(1234)  # the prototypes are the same for train and test
    c, h, w = shape
    protos = F.interpolate(torch.rand(classes, c, 4, 4, generator=g), size=(h, w), mode='bilinear', align_corners=False)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = protos[y] + 0.15 * torch.randn(n, c, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _torchvision(cls, root, train):
    with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        try:
            ds = cls(root, train=train, download=False)
        except Exception:  # absent: fetch it (torchvision checks the MD5)
            ds = cls(root, train=train, download=True)
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # MNIST: N H W; CIFAR: N H W C
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long)


def _tinyimagenet(root):
    # tiny-imagenet-200 layout: train/WNID/images/*.JPEG, val/images + val/val_annotations.txt.
    base = os.path.join(root, 'tiny-imagenet-200')
    cache = os.path.join(base, 'uint8_tensors.pt')
    if os.path.exists(cache):
        return torch.load(cache)
    if not os.path.isdir(base):
        from torchvision.datasets.utils import download_and_extract_archive
        with open(os.devnull, 'w') as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            download_and_extract_archive('http://cs231n.stanford.edu/tiny-imagenet-200.zip', root)
    import numpy as np
    import PIL.Image
    wnids = sorted(open(os.path.join(base, 'wnids.txt')).read().split())
    load = lambda path: torch.from_numpy(np.asarray(PIL.Image.open(path).convert('RGB'))).permute(2, 0, 1)
    train = [(os.path.join(base, 'train', w, 'images', f), i) for i, w in enumerate(wnids)
             for f in sorted(os.listdir(os.path.join(base, 'train', w, 'images')))]
    ann = [line.split('\t')[:2] for line in open(os.path.join(base, 'val', 'val_annotations.txt'))]
    val = [(os.path.join(base, 'val', 'images', f), wnids.index(w)) for f, w in ann]
    data = [(torch.stack([load(p) for p, _ in s]), torch.tensor([y for _, y in s])) for s in (train, val)]
    torch.save(data, cache)
    return data


def load_data(cfg, device):
    # Returns dict(train=(x, y), val=(x, y) or None, test=(x, y)) of uint8 images and labels on device.
    import socket
    socket.setdefaulttimeout(60)
    name, root = cfg.dataset, cfg.data_dir
    try:
        if name == 'synthetic':
            shape, k = tuple(cfg.synthetic_shape), cfg.synthetic_classes
            train, test = synthetic_images(cfg.train_size, shape, k, 1), synthetic_images(cfg.test_size, shape, k, 2)
        elif name == 'tinyimagenet':
            train, test = _tinyimagenet(root)
        else:
            import torchvision.datasets as tvd
            cls = {'mnist': tvd.MNIST, 'fashionmnist': tvd.FashionMNIST, 'cifar10': tvd.CIFAR10}[name]
            train, test = _torchvision(cls, root, True), _torchvision(cls, root, False)
    except Exception as e:
        where = {'tinyimagenet': 'tiny-imagenet-200/', 'cifar10': 'cifar-10-batches-py/', 'mnist': 'MNIST/raw/',
                 'fashionmnist': 'FashionMNIST/raw/'}[name]
        raise UserError(f'{name} is not in {os.path.abspath(root)} and could not be downloaded '
                        f'({type(e).__name__}); put {where} there or pass --data-dir DIR that holds it') from None
    g = torch.Generator().manual_seed(0)  # fixed subsets and split, the same for every seed
    perm = torch.randperm(len(train[1]), generator=g)
    val_idx, train_idx = perm[:cfg.val_size], perm[cfg.val_size:][:cfg.train_size or None]
    test_idx = torch.randperm(len(test[1]), generator=g)[:cfg.test_size] if cfg.test_size else torch.arange(len(test[1]))
    pick = lambda d, i: (d[0][i].to(device), d[1][i].to(device)) if len(i) else None
    return dict(train=pick(train, train_idx), val=pick(train, val_idx), test=pick(test, test_idx))


def augment(x, pad, gen):
    # Random horizontal flip and random crop with edge padding, for a whole batch on its device.
    n, c, h, w = x.shape
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    oy, ox = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=gen).to(x.device)
    xp = F.pad(x, (pad,) * 4, mode='replicate')
    rows, cols = oy + torch.arange(h, device=x.device), ox + torch.arange(w, device=x.device)
    idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return xp.flatten(2).gather(2, idx).view(n, c, h, w)


# ---- Interval arithmetic: IBP in centre-radius form, the clean batch carried alongside -------
class Normalize(nn.Module):
    # Per-channel (x - mean) / std inside the model, so that eps stays in pixel units.
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    # branch(x) + shortcut(x); the ReLU after the addition is the next module of the Sequential.
    def __init__(self, branch, shortcut):
        super().__init__()
        self.branch, self.shortcut = branch, shortcut

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class TrainBatchNorm(torch.autograd.Function):
    # BN of the clean batch h in training mode and the affine map t -> w t + b it applied (w = gamma /
    # sqrt(var + eps), b = beta - mean w), for the box. PyTorch's kernels do BN(h) and the running
    # statistics; the gradient reaching the statistics through (w, b) adds one per-channel affine
    # pass in h. (Forward + backward, 64x64x32x32 batch, 2-core CPU: 6.8 ms; autograd of the formula: 21.)
    @staticmethod
    def forward(ctx, h, gamma, beta, running_mean, running_var, momentum, eps):
        out, mean, invstd = torch.native_batch_norm(h, gamma, beta, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(h, gamma, mean, invstd)
        ctx.eps = eps
        return out, gamma * invstd, beta - mean * gamma * invstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_w, g_b):
        h, gamma, mean, invstd = ctx.saved_tensors
        g_h, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
            g_out, h, gamma, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        g_scale, n = g_w - mean * g_b, h.numel() / h.shape[1]  # dL/dw through w and through b = beta - mean w
        k1 = -g_scale * gamma * invstd ** 3 / n  # 2/n dL/dvar, from w = gamma (var + eps)^(-1/2)
        k0 = -gamma * invstd * g_b / n - k1 * mean  # 1/n dL/dmean, from b; and the mean inside var
        g_h.addcmul_(h, k1.view(channel_shape(h))).add_(k0.view(channel_shape(h)))
        return g_h, g_gamma + g_scale * invstd, g_beta + g_b, None, None, None, None


def channel_shape(t):  # the view of a per-channel vector that broadcasts against t
    return [1, -1] + [1] * (t.dim() - 2)


def batch_norm(bn, h):
    # BN(h) of the clean batch and the per-channel affine map (w, b) it applied: in training from the
    # clean batch's statistics, not detached, running statistics updated as nn.BatchNorm does; in
    # eval from the running statistics.   [SPEC 2, [paper] Sec. 3.3.2]
    if bn.training:
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1 / bn.num_batches_tracked.item()
        return TrainBatchNorm.apply(h, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps)
    # eval (certification): a fixed affine map, exact for every point of the box
    w = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    b = bn.bias - bn.running_mean * w
    return torch.addcmul(b.view(channel_shape(h)), h, w.view(channel_shape(h))), w, b


def conv_forward(conv, bn, x, c, r):
    # Conv, and the BN after it if any. BN's affine map is folded into the conv for the box, W' = w W,
    # b' = w b_conv + b: no elementwise BN pass over the box, whose activations are far larger than
    # the weights. The clean batch runs first: its statistics define w and b.
    x, weight, bias = conv(x), conv.weight, conv.bias
    if bn is not None:
        x, w, b = batch_norm(bn, x)
        weight, bias = weight * w.view(-1, 1, 1, 1), b if bias is None else torch.addcmul(b, w, bias)
    f = lambda t, weight, bias: F.conv2d(t, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return x, f(c, weight, bias), f(r, weight.abs(), None)  # Eq. (3): c' = W' c + b', r' = |W'| r


class IntervalReLU(torch.autograd.Function):
    # Eq. (3) for the ReLU: up = relu(c + r), lo = relu(c - r), returned as c' = (up + lo)/2,
    # r' = (up - lo)/2. With sums=True, also what Eq. (7) and (8) need from this pre-activation box,
    # pooled over the batch and the layer: s = [sum c A, -sum c I, sum d^2 A, sum d^2 I, n_A, n_I,
    # mean r], with A = [l > 0], I = [u < 0] (strict) and d = c - mean(c).   [paper] Sec. 3.3.3
    # One Function: both share their passes over the box, and the backward is a few fused multiply-adds
    # (64x64x32x32 box, forward + backward, 2-core CPU: 31 ms; autograd of the formulas: 77).
    @staticmethod
    def forward(ctx, c, r, sums):
        u, l = c + r, c - r
        active = torch.gt(l, 0, out=torch.empty_like(c)) if sums or any(ctx.needs_input_grad) else None  # float: bool 2-3x slower
        inactive = torch.lt(u, 0, out=torch.empty_like(c)) if sums else None
        up = u.relu_()
        c2 = torch.lerp(up, l.relu_(), 0.5)
        s = m = c.new_empty(0)  # no sums, and without gradients no mask either (certification)
        if sums:
            order = sorted(range(c.dim()), key=lambda i: -c.stride(i))  # memory order (channels-last too)
            flat = lambda t: t.permute(order).reshape(-1)
            fc, fa, fi, fd2 = flat(c), flat(active), flat(inactive), flat(torch.sub(c, m := c.mean()).square_())
            s = torch.stack([torch.dot(fc, fa), -torch.dot(fc, fi), torch.dot(fd2, fa), torch.dot(fd2, fi),
                             fa.sum(), fi.sum(), r.mean()])
        ctx.save_for_backward(up, active, inactive, c, s, m)
        ctx.set_materialize_grads(False)
        return c2, up - c2, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_c, g_r, g):
        up, active, inactive, c, s, m = ctx.saved_tensors
        g_c, g_r = [torch.zeros_like(up) if t is None else t for t in (g_c, g_r)]
        # Active neurons pass both gradients through; unstable ones (c' = r' = up/2) get
        # (g_c + g_r)/2 in both; inactive ones nothing. lerp with a 0/1 weight is exact.
        g_u = torch.ops.aten.threshold_backward(torch.lerp(g_c, g_r, 0.5), up, 0)
        g_cin, g_rin = torch.lerp(g_u, g_c, active), torch.lerp(g_u, g_r, active)
        if g is not None and g.numel():
            # d/dc of the sums: A (g0 + 2 g2 d) + I (-g1 + 2 g3 d), and through the mean in d every
            # element gets -2/n (g2 sum d A + g3 sum d I), with sum d A = sum c A - m n_A
            shift = 2 / c.numel() * (g[2] * (s[0] - m * s[4]) + g[3] * (-s[1] - m * s[5]))
            g_cin.addcmul_(torch.addcmul(g[0] - 2 * g[2] * m, c, 2 * g[2]), active)
            g_cin.addcmul_(torch.addcmul(-g[1] - 2 * g[3] * m, c, 2 * g[3]), inactive).sub_(shift)
            g_rin.add_(g[6] / c.numel())  # from mean r
        return g_cin, g_rin, None


def ibp_forward(module, x, c, r, pre=None):
    # Propagate the clean batch x and the box [c - r, c + r] through `module`.   [Eq. (3)]
    # The clean batch gives BN its statistics in training mode (SPEC 2). If `pre` is a list, the box
    # after the input normalization, then the box at the input of every ReLU with the regularizers'
    # sums over it, are appended to it: the layers i = 0..m of the regularizers.
    if isinstance(module, nn.Sequential):
        layers, folded = list(module), None
        for m, after in zip(layers, layers[1:] + [None]):
            if isinstance(m, nn.Conv2d):  # with the BN after it, if any
                folded = after if isinstance(after, nn.BatchNorm2d) else None
                x, c, r = conv_forward(m, folded, x, c, r)
            elif m is not folded:
                x, c, r = ibp_forward(m, x, c, r, pre)
        return x, c, r
    if isinstance(module, Residual):
        xb, cb, rb = ibp_forward(module.branch, x, c, r, pre)
        xs, cs, rs = ibp_forward(module.shortcut, x, c, r, pre)
        return xb + xs, cb + cs, rb + rs  # lowers add, uppers add
    if isinstance(module, nn.Linear):  # Eq. (3) in centre-radius form: c' = W c + b, r' = |W| r
        # (A Linear is not folded with a BN1d after it: its weight is far larger than its activations.)
        xc = module(torch.cat([x, c]))  # the clean and the centre batch share W: one matmul, one weight gradient
        return *xc.split(len(x)), F.linear(r, module.weight.abs())
    if isinstance(module, nn.Conv2d):
        return conv_forward(module, None, x, c, r)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        x, w, b = batch_norm(module, x)
        w, b = w.view(channel_shape(x)), b.view(channel_shape(x))
        return x, torch.addcmul(b, c, w), r * w.abs()  # addcmul: b + t * w in one pass
    if isinstance(module, nn.ReLU):
        c2, r2, s = IntervalReLU.apply(c, r, pre is not None)
        if pre is not None:
            pre.append((c, r, s))
        return F.relu(x), c2, r2
    if isinstance(module, Normalize):
        c, r = module(c), r / module.std
        if pre is not None:
            pre.append((c, r))
        return module(x), c, r
    if isinstance(module, (nn.Flatten, nn.Identity)):
        return module(x), module(c), module(r)
    raise TypeError(f'no interval rule for {type(module).__name__}')


def input_box(x, eps):
    # The L-inf ball clipped to the valid pixel range, as (centre, radius).   [SPEC 2]
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return (up + lo) / 2, (up - lo) / 2


def ibp_margins(model, x, y, eps, pre=None):
    # Clean logits and lower bounds lb[n, j] of z_y - z_j (0 at j = y) over the eps-box.
    # The margin matrix C (rows e_y - e_j) is folded into the last linear layer, W' = C W, b' = C b,
    # per example: tighter than bounding logits and subtracting them.
    h, c, r = ibp_forward(model[:-1], x, *input_box(x, eps), pre)
    last = model[-1]
    w = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # (N, K, d), zero row at j = y
    b = last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    lb = torch.bmm(w, c.unsqueeze(2)).squeeze(2) - torch.bmm(w.abs(), r.unsqueeze(2)).squeeze(2) + b
    return last(h), lb


class Margins(nn.Module):
    # ibp_margins as a module: DistributedDataParallel syncs gradients only for work done inside its
    # wrapped forward, and torch.compile takes a module as it is.
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, eps):
        pre = []
        return (*ibp_margins(self.model, x, y, eps, pre), pre)


def verified(lb, y):
    # A sample is verified when every margin z_y - z_j, j != y, has a positive lower bound.
    return ((lb > 0) | F.one_hot(y, lb.shape[1]).bool()).all(1)


# ---- Models: CNN-7, Wide-ResNet and ResNeXt, BN after every affine layer (SPEC 1) ------------
def conv_bn(cin, cout, k=3, stride=1, groups=1, bn=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)]
    return layers + [nn.BatchNorm2d(cout)] if bn else layers


def head(features, hidden, classes, bn=True):
    # Flatten -> Linear -> [BN1d] -> ReLU -> Linear (the classifier is never followed by BN).
    return [nn.Flatten(), nn.Linear(features, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + \
           [nn.ReLU(), nn.Linear(hidden, classes)]


def cnn7(shape, classes, width=1.0, bn='full'):
    # CNN-7: 5 convs (64, 64, 128/2, 128, 128) + FC 512 + classifier; the 64x64 variant strides conv 5.
    c1, c2, hid = max(1, round(64 * width)), max(1, round(128 * width)), max(1, round(512 * width))
    s5, layers = 2 if shape[1] >= 64 else 1, []
    for cin, cout, s in [(shape[0], c1, 1), (c1, c1, 1), (c1, c2, 2), (c2, c2, 1), (c2, c2, s5)]:
        layers += conv_bn(cin, cout, 3, s, bn=bn != 'none') + [nn.ReLU()]
    feat = c2 * (shape[1] // (2 * s5)) * (shape[2] // (2 * s5))
    return layers + head(feat, hid, classes, bn=bn == 'full')


def wide_resnet(shape, classes, width=1.0):
    # Stem 16 + one BasicBlock per stage (128, 256, 512; x1.25 on 64x64 inputs) + FC 512 head.
    w = lambda ch: max(1, round(ch * width * (1.25 if shape[1] >= 64 else 1)))
    layers, cin = conv_bn(shape[0], max(1, round(16 * width))) + [nn.ReLU()], max(1, round(16 * width))
    for cout, s in [(w(128), 1), (w(256), 2), (w(512), 2)]:
        branch = nn.Sequential(*conv_bn(cin, cout, 3, s), nn.ReLU(), *conv_bn(cout, cout))
        layers += [Residual(branch, nn.Sequential(*conv_bn(cin, cout, 1, s))), nn.ReLU()]
        cin = cout
    return layers + head(cin * (shape[1] // 4) * (shape[2] // 4), max(1, round(512 * width)), classes)


def resnext(shape, classes, width=1.0):
    # Stem + ResNeXt blocks of cardinality 2 (1 per stage; 2 per stage and narrower on 64x64).
    stem, bw, blocks = (16, 8, 2) if shape[1] >= 64 else (64, 32, 1)
    cin = max(2, round(stem * width))
    layers = conv_bn(shape[0], cin) + [nn.ReLU()]
    for stage, s in enumerate([1, 2, 2]):
        gw = 2 * max(1, round(bw * width * 2 ** stage))  # cardinality 2 x bottleneck width
        for k in range(blocks):
            stride = s if k == 0 else 1
            branch = nn.Sequential(*conv_bn(cin, gw, 1), nn.ReLU(), *conv_bn(gw, gw, 3, stride, groups=2), nn.ReLU(),
                                   *conv_bn(gw, 2 * gw, 1))
            same = cin == 2 * gw and stride == 1
            layers += [Residual(branch, nn.Identity() if same else nn.Sequential(*conv_bn(cin, 2 * gw, 1, stride))), nn.ReLU()]
            cin = 2 * gw
    return layers + head(cin * (shape[1] // 4) * (shape[2] // 4), max(1, round(512 * width)), classes)


def build_model(cfg, info):
    # nn.Sequential(Normalize, ..., classifier Linear): the last module is always the classifier.
    shape, k = info['shape'], info['classes']
    body = {'cnn7': lambda: cnn7(shape, k, cfg.width, cfg.bn), 'wide_resnet': lambda: wide_resnet(shape, k, cfg.width),
            'resnext': lambda: resnext(shape, k, cfg.width)}[cfg.model]()
    model = nn.Sequential(Normalize(info['mean'], info['std']), *body)
    return ibp_init_(model) if cfg.ibp_init else model


# ---- [paper] IBP initialization, Sec. 3.3.1 --------------------------------------------------
def fan_in(layer):
    return layer.weight[0].numel()  # in_features, or (in_channels / groups) * k * k


def ibp_init_(model):
    # W_i ~ N(0, sigma_i^2), sigma_i = sqrt(2 pi) / n_i, so the difference gain n_i/2 E|W_i| = 1.  [Eq. (6)]
    # Every conv/linear weight is redrawn except the classifier's; biases and BN keep their defaults.
    # Residual calibration (appendix A.3, as in the authors' release): a layer whose input is
    # ReLU(branch + shortcut) sees about twice the width, so its weights are halved.
    halve, mods = set(), list(model)
    for prev, m in zip(mods, mods[2:]):  # mods: ..., Residual, ReLU, Residual, ...
        if isinstance(prev, Residual) and isinstance(m, Residual):  # m's input is ReLU(add)
            halve.update(id(l) for l in (m.branch[0], *list(m.shortcut.children())[:1]))
    affine = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in affine[:-1]:
            sigma = math.sqrt(2 * math.pi) / fan_in(m)
            m.weight.normal_(0, sigma / (2 if id(m) in halve else 1))
    return model


# ---- [paper] Warmup regularizers, Sec. 3.3.3 -------------------------------------------------
def warmup_regularizers(pre, tau):
    # L_tightness (Eq. 7), L_relu (Eq. 8) and, for the log, the fractions of active (l > 0), inactive
    # (u < 0) and unstable neurons of every ReLU layer (Figure 2), from the boxes of ibp_forward.
    # pre[0] is the input box, pre[1:] the m pre-activation boxes (c, r, sums), sums taken by IntervalReLU
    # in the same pass (here, for a bare box (c, r)); they pool the whole batch and every neuron of a
    # layer. Each ReLU(.) term lies in [0, tau]: L_tightness lies in [0, 1], L_relu (2 per layer) in [0, 2].
    delta0 = pre[0][1].mean()  # E(Delta_0): mean half-width of the (normalized) input box
    s = torch.stack([p[2] if len(p) > 2 else IntervalReLU.apply(*p[:2], True)[2] for p in pre[1:]])  # a row per layer
    m = len(s)
    l_tight = F.relu(tau - delta0 / s[:, 6].clamp_min(DIV_GUARD)).sum() / (tau * m)  # Eq. (7)
    # alpha_i = p/q on the means of c, beta_i on its variances; min(alpha, 1/alpha) is written
    # min(p, q)/max(p, q) to stay finite
    p, q = s[:, [0, 2]], s[:, [1, 3]]
    terms = F.relu(tau - torch.minimum(p, q) / torch.maximum(p, q).clamp_min(DIV_GUARD)).sum(1)
    both = (s[:, 4] > 0) & (s[:, 5] > 0)  # a layer counts only with both active and inactive neurons
    l_relu = torch.where(both, terms, 0).sum() / (tau * m)  # Eq. (8)
    states = s[:, 4:6].detach() / s.new_tensor([p[0].numel() for p in pre[1:]])[:, None]
    return l_tight, l_relu, torch.cat([states, 1 - states.sum(1, keepdim=True)], 1)


# ---- Objective and schedules -----------------------------------------------------------------
def robust_loss(lb):
    # Eq. (9): cross-entropy of the logits [0, -lb_j (j != y)] with target 0, i.e.
    # mean log(1 + sum_{j != y} exp(-lb_j)); lb is 0 at j = y, so this is logsumexp(-lb).
    return torch.logsumexp(-lb, 1).mean()


def eps_at(step, steps_per_epoch, eps_target, start, length):
    # The smoothed per-batch eps schedule (SPEC 5): 0, then a*(b - init)^4 up to a quarter of the
    # ramp (where it reaches eps_target / 13 with the slope of the line that follows), then linear.
    init, final = (start - 1) * steps_per_epoch, (start + length - 1) * steps_per_epoch
    if step <= init or step >= final:  # before the ramp, or after it
        return 0.0 if step <= init else eps_target
    mid = init + int(0.25 * (final - init))
    t = mid - init
    mid_eps = eps_target * t / (4 * (final - mid) + t)  # a * t^4 with a = eps_target / (t^3 (4 (final - mid) + t))
    if step < mid:
        return mid_eps * ((step - init) / t) ** 4
    return mid_eps + (eps_target - mid_eps) * (step - mid) / (final - mid)


def lam_at(eps, eps_target, lam0):
    # lambda = lambda_0 (1 - eps / eps_target).   [Sec. 3.4]
    return lam0 * (1 - eps / eps_target)


def lr_at(epoch, cfg):
    # Step decay: epoch (1-based) after each milestone multiplies the LR by lr_decay.
    return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.lr_milestones)


def batch_loss(bounds, x, y, eps, lam, cfg):
    # The training objective of one batch, Eq. (10); also returns detached statistics for the log.
    # eps = 0: the data loss is the ordinary cross-entropy, and the bounds use eps = EPS_FLOOR so the
    # regularizers see a non-empty box. eps > 0: the loss is purely robust, Eq. (9).
    logits, lb, pre = bounds(x, y, max(eps, EPS_FLOOR))  # bounds: a Margins module
    l_rob = F.cross_entropy(logits, y) if eps == 0 else robust_loss(lb)
    optimized = lam > 0 and (cfg.reg_tightness or cfg.reg_relu)
    with torch.set_grad_enabled(optimized and torch.is_grad_enabled()):  # else only logged: no graph
        l_tight, l_relu, relu = warmup_regularizers(pre, cfg.tau)
    loss = l_rob + lam * (cfg.reg_tightness * l_tight + cfg.reg_relu * l_relu) if optimized else l_rob  # Eq. (10)
    with torch.no_grad():
        stats = dict(loss=l_rob, l_tightness=l_tight, l_relu=l_relu, train_err=(logits.argmax(1) != y).float().mean(),
                     train_ver_err=(~verified(lb, y)).float().mean(), relu=relu)
    return loss, {k: v.detach() for k, v in stats.items()}


def train_step(bounds, opt, x, y, eps, lam, cfg):
    # One optimizer step over a batch split into cfg.accum_steps chunks; returns summed stats.
    # Each chunk runs the clean, centre and radius passes (about 3x a clean step's arithmetic).
    opt.zero_grad(set_to_none=True)
    total = None
    for xc, yc in zip(x.chunk(cfg.accum_steps), y.chunk(cfg.accum_steps)):
        loss, stats = batch_loss(bounds, xc, yc, eps, lam, cfg)
        (loss / cfg.accum_steps).backward()
        total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
    nn.utils.clip_grad_norm_(bounds.parameters(), cfg.grad_clip)
    opt.step()
    return {k: v / cfg.accum_steps for k, v in total.items()}


# ---- Evaluation: standard, PGD and IBP-verified error, in full float32 -----------------------
@contextlib.contextmanager
def full_fp32():
    # Certification never uses TF32 (its 10-bit mantissa would make the bounds unsound).
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pgd_margin(model, x, y, eps, steps, restarts, gen):
    # Smallest margin z_y - max_{j != y} z_j found by L-inf PGD on the margin inside the clipped box.
    # An upper bound on the true smallest margin, so it must never beat a verified lower bound.
    lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    best = None
    for _ in range(restarts):
        xa = lo + (up - lo) * torch.rand(x.shape, generator=gen).to(x.device)
        for i in range(steps + 1):
            xa.requires_grad_(True)
            z = model(xa)
            other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)
            margin = z.gather(1, y[:, None]).squeeze(1) - other
            best = margin.detach() if best is None else torch.minimum(best, margin.detach())
            if i == steps:
                break
            g, = torch.autograd.grad(margin.sum(), xa)
            xa = torch.minimum(torch.maximum(xa.detach() - 2.5 * eps / steps * g.sign(), lo), up)
    return best


def evaluate(model, data, eps, batch_size=256, pgd_steps=0, pgd_restarts=1, seed=0):
    # Standard, (PGD-)attack and IBP-verified error of `data` in eval mode at `eps`.
    model.eval()
    x_all, y_all = data
    sums, gen = torch.zeros(3, device=y_all.device), torch.Generator().manual_seed(seed)
    with full_fp32():
        for i in range(0, len(y_all), batch_size):
            x, y = x_all[i:i + batch_size].float() / 255, y_all[i:i + batch_size]
            with torch.no_grad():
                logits, lb = ibp_margins(model, x, y, eps)
            ver, wrong = verified(lb, y), logits.argmax(1) != y
            attacked = wrong.clone()
            if pgd_steps and eps > 0:
                with torch.enable_grad():
                    margin = pgd_margin(model, x, y, eps, pgd_steps, pgd_restarts, gen)
                if (ver & (margin < -ATTACK_TOL)).any():
                    raise RuntimeError('PGD broke a sample counted as verified: the bounds are unsound')
                attacked |= margin <= 0
            sums += torch.stack([wrong.sum(), attacked.sum(), (~ver).sum()]).float()
    std, pgd, ver = (sums / len(y_all)).tolist()
    return dict(std_err=std, pgd_err=pgd if pgd_steps and eps > 0 else None, ver_err=ver)


# ---- Checkpoints and logging: atomic writes, so a crash or Ctrl-C never leaves a broken file ----
RUNTIME_FIELDS = {'resume', 'device', 'data_dir', 'out_dir', 'epochs', 'eval_checkpoint', 'compile', 'tf32',
                  'channels_last', 'pgd_steps', 'pgd_restarts', 'smoke', 'benchmark', 'benchmark_steps', 'diagnose_init'}


def atomic_save(obj, path):
    tmp = path + '.tmp'
    if path.endswith('.json'):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic on POSIX: the old file stays whole until the new one is


def format_record(r):  # the fixed-format epoch line
    return (f"ep {r['epoch']:3d} | eps {r['eps']:.5f} lam {r['lam']:.3f} lr {r['lr']:.1e} | loss {r['loss']:.4f} "
            f"Ltight {r['l_tightness']:.4f} Lrelu {r['l_relu']:.4f} | relu act {r['active']:.2f} inact {r['inactive']:.2f} "
            f"unst {r['unstable']:.2f} | train err {r['train_err']:.4f} ver {r['train_ver_err']:.4f} | "
            f"test err {r['test_err']:.4f} ver {r['test_ver_err']:.4f} | "
            f"{r['img_per_s']:7.1f} img/s {r['seconds']:6.1f} s")


# ---- Training loop ---------------------------------------------------------------------------
def setup_device(cfg):
    local = os.environ.get('LOCAL_RANK')  # set by torchrun: one GPU per process
    name = (f'cuda:{local or 0}' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device
    try:
        dev = torch.device(name)
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError) as e:
        raise UserError(f'--device {cfg.device} is not usable here ({str(e).splitlines()[0]})') from None
    # Channels-last suits cuDNN; on this 2-core CPU it was 4% faster at full width, slower narrow.
    cfg.channels_last = dev.type == 'cuda' if cfg.channels_last is None else cfg.channels_last
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32  # training only
    torch.backends.cudnn.benchmark = True
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    elif sys.platform.startswith('linux'):
        # PyTorch gives freed CPU tensors back to glibc, which unmaps blocks over 32 MB and trims the
        # heap: each step page-faulted its activations and FC gradients in again (a third of the IBP
        # step's time). All blocks from a never-trimmed heap: each step reuses the last one's memory.
        libc = ctypes.CDLL(None)  # the C library this process runs on
        if hasattr(libc, 'mallopt'):
            libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: no block from mmap
            libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD = SIZE_MAX: never trim
    return dev


def setup_distributed(dev):
    # Under torchrun (WORLD_SIZE > 1): one process per device on torch.distributed; returns (rank, world).
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def to_input(x, cfg):
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def prepare(cfg, dev, info, world=1):
    # The model, its Adam optimizer, and the Margins module that training calls (DDP/compiled if asked).
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info).to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    bounds = Margins(model)
    if world > 1:  # gradients averaged across ranks; BN statistics stay per rank, as with accumulation
        bounds = nn.parallel.DistributedDataParallel(bounds, device_ids=[dev] if dev.type == 'cuda' else None)
    fused = dev.type in ('cpu', 'cuda')  # Adam in one kernel per parameter instead of about ten passes
    return model, torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused), torch.compile(bounds) if cfg.compile else bounds


def load_checkpoint(cfg, model, opt, dev):
    # Resume state from OUT_DIR/last.pt: (first epoch to run, best validation error, wall seconds).
    # Only runtime flags (RUNTIME_FIELDS) may differ from the run being continued.
    path = os.path.join(cfg.out_dir, 'last.pt')
    if not cfg.resume:
        if os.path.exists(path):
            raise UserError(f'{cfg.out_dir} already holds a run: pass --resume to continue it, or another --out-dir')
        return 1, float('inf'), 0.0
    if not os.path.exists(path):
        raise UserError(f'--resume: no checkpoint at {path}')
    ck = torch.load(path, map_location=dev, weights_only=False)
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the saved config
    diff = [k for k, v in json.loads(json.dumps(ck['config'])).items() if k not in RUNTIME_FIELDS and v != now.get(k)]
    if diff:
        raise UserError(f'--resume: the run in {cfg.out_dir} was started with other values of: ' + ', '.join(diff))
    model.load_state_dict(ck['model'])
    opt.load_state_dict(ck['optimizer'])
    return ck['epoch'] + 1, ck['best'], ck['wall']


def train(cfg):
    dev = setup_device(cfg)
    rank, world = setup_distributed(dev)
    info, data = dataset_info(cfg), load_data(cfg, dev)
    model, opt, bounds = prepare(cfg, dev, info, world)
    start_epoch, best, wall = load_checkpoint(cfg, model, opt, dev)
    log_path = os.path.join(cfg.out_dir, 'log.jsonl')
    if rank == 0:  # only rank 0 prints, logs and saves
        os.makedirs(cfg.out_dir, exist_ok=True)
        # log.jsonl keeps exactly the epochs the checkpoint holds (a torn last line, from a kill, is dropped)
        lines = open(log_path).read().splitlines() if os.path.exists(log_path) else []
        with open(log_path, 'w') as f:
            f.writelines(l + '\n' for l in lines if l.endswith('}') and json.loads(l)['epoch'] < start_epoch)
    x_train, y_train = data['train']
    n, bs = len(y_train), cfg.batch_size
    steps = n // bs if 0 < n % bs < world else math.ceil(n / bs)  # every rank gets a non-empty shard
    ramp_end = cfg.eps_start + cfg.eps_length - 1
    use_reg = cfg.reg_tightness or cfg.reg_relu
    # Per epoch: the LR (step decay); per batch: eps on the smoothed schedule and lambda, which is
    # nonzero only during the warmup (eps = 0 epochs and the ramp), the regularizers' whole job.
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        model.train()
        lr = opt.param_groups[0]['lr'] = lr_at(epoch, cfg)  # one parameter group
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # an epoch's randomness is its own
        perm = torch.randperm(n, generator=gen).to(dev)
        sums = {}
        for i in range(steps):
            eps = eps_at((epoch - 1) * steps + i, steps, cfg.eps, cfg.eps_start, cfg.eps_length)
            lam = lam_at(eps, cfg.eps, cfg.lam0) if use_reg and epoch <= ramp_end else 0.0  # [paper] warmup only
            idx = perm[i * bs:(i + 1) * bs]
            x = x_train[idx].float() / 255
            x = to_input(augment(x, info['pad'], gen) if info['pad'] else x, cfg).tensor_split(world)[rank]
            y = y_train[idx].tensor_split(world)[rank]  # this rank's shard of the global batch
            stats = train_step(bounds, opt, x, y, eps, lam, cfg)
            for k, v in stats.items():  # summed on the device: no host round trip inside the epoch
                sums[k] = sums.get(k, 0) + v * len(y)
        if world > 1:
            for v in sums.values():
                torch.distributed.all_reduce(v)
        sums = {k: (v / min(n, steps * bs)).tolist() for k, v in sums.items()}
        train_s = time.time() - t0
        if rank > 0:
            continue
        test = evaluate(model, data['test'], eps)
        relu = list(zip(*sums['relu']))
        rec = dict(epoch=epoch, eps=eps, lam=lam, lr=lr, **{k: sums[k] for k in ('loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err')},
                   active=sum(relu[0]) / len(relu[0]), inactive=sum(relu[1]) / len(relu[1]), unstable=sum(relu[2]) / len(relu[2]),
                   relu_per_layer=sums['relu'], test_err=test['std_err'], test_ver_err=test['ver_err'], img_per_s=min(n, steps * bs) / train_s)
        if data['val'] is not None:  # selection on held-out training data, never on the test set
            val = evaluate(model, data['val'], cfg.eps)
            rec.update(val_err=val['std_err'], val_ver_err=val['ver_err'])
            if epoch >= ramp_end and val['ver_err'] < best:
                best = val['ver_err']
                atomic_save(dict(model=model.state_dict(), config=dataclasses.asdict(cfg), epoch=epoch), os.path.join(cfg.out_dir, 'best.pt'))
        rec['seconds'] = time.time() - t0
        wall += rec['seconds']
        print(format_record(rec), flush=True)
        with open(log_path, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=dataclasses.asdict(cfg),
                         epoch=epoch, best=best, wall=wall), os.path.join(cfg.out_dir, 'last.pt'))
    if rank > 0:  # wait for rank 0's final evaluation: tearing Gloo down on one rank first can abort
        torch.distributed.barrier()
        return None
    final = evaluate(model, data['test'], cfg.eps, pgd_steps=cfg.pgd_steps, pgd_restarts=cfg.pgd_restarts, seed=cfg.seed)
    metrics = dict(final_epoch=cfg.epochs, eps=cfg.eps, **final, test_size=len(data['test'][1]),
                   wall_seconds=wall, device=str(dev), world_size=world, config=dataclasses.asdict(cfg))
    atomic_save(metrics, os.path.join(cfg.out_dir, 'metrics.json'))
    pgd = '' if final['pgd_err'] is None else f" PGD error {final['pgd_err']:.4f} |"
    print(f"final (epoch {cfg.epochs}, eps {cfg.eps:.5f}): standard error {final['std_err']:.4f} |{pgd} "
          f"verified error {final['ver_err']:.4f} | {wall:.1f} s | {cfg.out_dir}/metrics.json")
    if world > 1:
        torch.distributed.barrier()
    return metrics


def eval_checkpoint(cfg):
    # Certify a saved model at its eps_target (or --eps), with its own config.
    if not os.path.exists(cfg.eval_checkpoint):
        raise UserError(f'--eval-checkpoint: no file {cfg.eval_checkpoint}')
    dev = setup_device(cfg)
    ck = torch.load(cfg.eval_checkpoint, map_location=dev, weights_only=False)
    saved = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck['config'].items()})
    saved = dataclasses.replace(saved, device=cfg.device, data_dir=cfg.data_dir, test_size=cfg.test_size or saved.test_size,
                                channels_last=False, compile=False)
    model = build_model(saved, dataset_info(saved)).to(dev)
    model.load_state_dict(ck['model'])
    data = load_data(dataclasses.replace(saved, train_size=1, val_size=0), dev)
    eps = cfg.eps if cfg.eps is not None else saved.eps
    res = evaluate(model, data['test'], eps, pgd_steps=cfg.pgd_steps, pgd_restarts=cfg.pgd_restarts, seed=cfg.seed)
    print(json.dumps(dict(checkpoint=cfg.eval_checkpoint, epoch=ck.get('epoch'), eps=eps, **res)))
    return res


# ---- Benchmark and init diagnosis ------------------------------------------------------------
def benchmark(cfg):
    # ms per training step of (a) clean, (b) vanilla IBP and (c) ours, on synthetic data of the
    # dataset's shape, after 3 warm-up rounds, with the device synchronized. The steps take turns, so
    # a drift of the machine's speed hits all alike: ratios are per round, then the median.
    dev, info = setup_device(cfg), dataset_info(cfg)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    x = to_input(torch.rand(cfg.batch_size, *info['shape'], device=dev), cfg)
    y = torch.randint(0, info['classes'], (cfg.batch_size,), device=dev)
    eps, steps = cfg.eps / 2, {}
    for name, ours in [('clean', False), ('vanilla_ibp', False), ('ours', True)]:
        c = dataclasses.replace(cfg, method='ours' if ours else 'vanilla', ibp_init=ours, reg_tightness=ours, reg_relu=ours)
        model, opt, bounds = prepare(c, dev, info)
        forward = torch.compile(model.train()) if cfg.compile else model.train()  # compiled like the bounds, if asked
        # (a) is a plain training step: forward, cross-entropy, backward, clipping, Adam.
        def clean(forward=forward, model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        steps[name] = clean if name == 'clean' else functools.partial(
            train_step, bounds, opt, x, y, eps, lam_at(eps, c.eps, c.lam0) if ours else 0.0, c)
    times = {name: [] for name in steps}
    for i in range(3 + cfg.benchmark_steps):
        for name, step in steps.items():
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[name] += [1000 * (time.perf_counter() - t)] if i >= 3 else []
    median = lambda v: sorted(v)[len(v) // 2]
    rounds = {f'{k}/clean': [a / b for a, b in zip(times[k], times['clean'])] for k in ('vanilla_ibp', 'ours')}
    out = dict(results={k: dict(ms_per_step=median(v), min_ms=min(v), max_ms=max(v), img_per_s=cfg.batch_size / median(v) * 1000)
                        for k, v in times.items()}, ratios={k: median(v) for k, v in rounds.items()}, round_ratios=rounds,
               device=str(dev), model=cfg.model, width=cfg.width, batch_size=cfg.batch_size, shape=info['shape'],
               threads=torch.get_num_threads(), torch=torch.__version__)
    for k, r in out['results'].items():
        print(f"{k:12s} {r['ms_per_step']:9.2f} ms/step (median of {cfg.benchmark_steps}; range {r['min_ms']:.2f}-{r['max_ms']:.2f}) "
              f"{r['img_per_s']:9.1f} img/s")
    print('ratios (median over rounds): ' + ', '.join(f'{k} {median(v):.2f} (range {min(v):.2f}-{max(v):.2f})' for k, v in rounds.items())
          + f' | {cfg.model} batch {cfg.batch_size} on {dev}')
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        atomic_save(out, os.path.join(cfg.out_dir, 'benchmark.json'))
    return out


def init_gains(model, x, y, eps):
    # Per ReLU layer i: fan-in n_i of the affine layer feeding it, Eq. (6)'s gain n_i/2 E|W_i| from
    # the weights, the measured E(Delta_i)/E(Delta_{i-1}) and log E(Delta_i) on the batch x (Figure 1).
    pre = []
    with torch.no_grad():
        ibp_margins(model, x, y, eps, pre)
    deltas = [p[1].mean().item() for p in pre]
    shortcuts = {id(m) for b in model.modules() if isinstance(b, Residual) for m in b.shortcut.modules()}
    feeding, last = [], None
    for m in model.modules():  # the affine layer that feeds each ReLU (the branch's last one for a block)
        last = m if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in shortcuts else last
        if isinstance(m, nn.ReLU):
            feeding.append(last)
    return [dict(layer=i + 1, fan_in=fan_in(w), gain_eq6=fan_in(w) / 2 * w.weight.abs().mean().item(),
                 gain_measured=deltas[i + 1] / deltas[i], log_delta=math.log(deltas[i + 1]))
            for i, w in enumerate(feeding)]


def diagnose_init(cfg):
    dev, info = setup_device(cfg), dataset_info(cfg)
    try:
        (x, y), source = load_data(dataclasses.replace(cfg, train_size=1, test_size=256, val_size=0), dev)['test'], cfg.dataset
    except UserError:  # no data here: a synthetic batch of the same shape still shows the gains
        (x, y), source = synthetic_images(256, info['shape'], info['classes'], 3), 'synthetic batch (dataset not available)'
    x, y = x.to(dev).float() / 255, y.to(dev)
    print(f'difference gain at initialization, {cfg.model} on {source}, eps {cfg.eps:.5f}; Delta = mean bound half-width\n'
          f'(Eq. 6 assumes a ReLU before each layer: the first layer sees the input box directly, so its measured gain is ~2x)')
    report = {}
    for init in ['default', 'kaiming', 'ibp']:
        for bn in (['full', 'none'] if cfg.model == 'cnn7' else ['full']):
            c = dataclasses.replace(cfg, bn=bn, ibp_init=init == 'ibp')
            model = prepare(c, dev, info)[0]
            if init == 'kaiming':
                for m in [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]:
                    nn.init.kaiming_normal_(m.weight)
            rows = init_gains(model.train(), x, y, cfg.eps)
            report[f'{init}/bn_{bn}'] = rows
            print(f'\n{init} init, BN {bn}:\n layer   fan-in  gain Eq.6  measured  log E(Delta)')
            for r in rows:
                print(f" {r['layer']:5d} {r['fan_in']:8d} {r['gain_eq6']:10.3f} {r['gain_measured']:9.3f} {r['log_delta']:13.3f}")
    return report


# ---- main ------------------------------------------------------------------------------------
def main(argv=None):
    try:
        cfg = parse_args(argv)
        if cfg.eval_checkpoint:
            eval_checkpoint(cfg)
        else:
            cfg = resolve(cfg)
            (benchmark if cfg.benchmark else diagnose_init if cfg.diagnose_init else train)(cfg)
        return 0
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: last.pt holds the last finished epoch; run the same command with --resume', file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    code = main()
    if int(os.environ.get('RANK', 0)) > 0:  # torchrun's other ranks skip the interpreter's teardown: its C++
        sys.stdout.flush(), sys.stderr.flush()  # destructors aborted about 1 exit in 8 after Gloo training here
        os._exit(code)
    sys.exit(code)
