"""Distributed training on the CPU: one DDP step against the single-process step on the mean
gradient, and a one-process run continued by torchrun with 2 processes on Gloo (one log,
statistics of the global batch)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import ibp_short_warmup as ibp
from oracles import TOL
from run_helpers import REPO, SCRIPT, TINY, flat, stop_after_first_checkpoint

DIST_TIMEOUT = 240  # seconds for one 2-process job (a hung collective must fail the test)
F32 = dict(rtol=TOL[torch.float32]['rtol'], atol=TOL[torch.float32]['atol'])


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(*args):
    """The script under `torchrun --nproc_per_node 2` (the launcher module, so any venv works)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--master_port', str(free_port()), SCRIPT, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DIST_TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))


def epoch_lines(stdout):
    return [int(line.split()[1]) for line in stdout.splitlines() if line.startswith('ep ')]


def check_epoch_stats_cover_the_global_batch(records):
    # Each rank logs fractions of its shard times the shard size; after the all-reduce, divided by
    # the epoch's image count, the active/inactive/unstable fractions of a layer sum to exactly 1.
    # Without the all-reduce they would sum to 1/2, with every rank on the whole batch to 2.
    for r in records:
        for row in r['relu_per_layer']:
            assert sum(row) == pytest.approx(1, abs=F32['atol']), (r['epoch'], row)
        assert 0 <= r['train_err'] <= 1 and 0 <= r['train_ver_err'] <= 1


def ddp_config():
    return ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16),
                                  out_dir='unused'))


def ddp_worker(rank, port, out, x, y, eps, lam):
    """One rank of a 2-process job started by torch.multiprocessing.spawn (module level:
    picklable)."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2',
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dev = torch.device('cpu')
    cfg = ddp_config()
    got_rank, world = ibp.setup_distributed(dev, cfg)
    try:
        model, opt, objective = ibp.prepare(cfg, dev, ibp.dataset_info(cfg), world)
        init = flat(model.parameters())
        # the shard that train() gives this rank: tensor_split of the global batch
        stats = ibp.train_step(objective, opt, x.tensor_split(world)[got_rank],
                               y.tensor_split(world)[got_rank], eps, lam, cfg)
        params = flat(model.parameters())
        gathered = [torch.empty_like(params) for _ in range(world)]
        torch.distributed.all_gather(gathered, params)
        torch.save(dict(rank=got_rank, world=world, backend=torch.distributed.get_backend(),
                        ddp=isinstance(objective, nn.parallel.DistributedDataParallel),
                        wraps=type(getattr(objective, 'module', None)).__name__, init=init,
                        gathered=gathered, grads=flat(p.grad for p in model.parameters()),
                        loss=stats['loss']),
                   os.path.join(out, f'{rank}.pt'))
        torch.distributed.barrier()  # both ranks done before either tears Gloo down
    finally:
        torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown, as ibp_short_warmup's __main__ does for ranks > 0:
    # its C++ destructors aborted ("terminate called without an active exception") in a CI run.
    os._exit(0)


def test_ddp_step_equals_single_process_step_on_the_mean_gradient(tmp_path):
    import torch.multiprocessing as mp
    cfg = ddp_config()
    info = ibp.dataset_info(cfg)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 7)
    x = x.float() / 255
    eps, lam = 2 / 255, 0.3
    ctx = mp.spawn(ddp_worker, args=(free_port(), str(tmp_path), x, y, eps, lam), nprocs=2,
                   join=False)
    deadline = time.time() + DIST_TIMEOUT
    while not ctx.join(timeout=5):  # re-raises a worker's exception
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail('the 2-rank DDP step did not finish')
    res = [torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in range(2)]
    assert [(r['rank'], r['world'], r['backend'], r['ddp'], r['wraps']) for r in res] == \
        [(0, 2, 'gloo', True, 'Objective'), (1, 2, 'gloo', True, 'Objective')]
    final = res[0]['gathered'][0]
    for r in res:  # both ranks hold identical parameters after the step
        assert all(torch.equal(g, final) for g in r['gathered'])
    assert torch.equal(res[0]['init'], res[1]['init'])
    assert (final - res[0]['init']).abs().max() > cfg.lr / 2  # Adam's first step moves by ~lr
    assert res[0]['loss'] != res[1]['loss']  # the ranks saw different data

    # Oracle, one process: the same init, the loss of each shard with its own BN statistics, the
    # mean of the two gradients, gradient clipping: the gradient each rank holds.
    torch.manual_seed(cfg.seed)
    model = ibp.build_model(cfg, info)
    assert torch.equal(flat(model.parameters()), res[0]['init'])
    shards = [ibp.batch_loss(model, xs, ys, eps, lam, cfg)
              for xs, ys in zip(x.tensor_split(2), y.tensor_split(2))]
    (sum(loss for loss, _ in shards) / 2).backward()
    assert nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) > cfg.grad_clip  # clips
    for r, (_, stats) in zip(res, shards):  # the logged robust loss of each rank's shard
        torch.testing.assert_close(r['loss'], stats['loss'], **F32)
        torch.testing.assert_close(r['grads'], flat(p.grad for p in model.parameters()), **F32)
    # Then one plain PyTorch Adam step on the gradient the ranks hold. (Adam's first step is about
    # lr * g / |g| per weight: for a gradient near 0 it turns rounding of g into a difference of
    # order lr, so the step is taken from the ranks' own gradient, checked equal just above.)
    adam = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    grads = res[0]['grads']
    with torch.no_grad():
        for p in model.parameters():
            p.grad, grads = grads[:p.numel()].view_as(p).clone(), grads[p.numel():]
    adam.step()
    torch.testing.assert_close(final, flat(model.parameters()), **F32)


def test_torchrun_two_ranks_resume_a_one_process_run(tmp_path, monkeypatch, capsys):
    """A one-process run stopped after epoch 1, continued by `torchrun --nproc_per_node 2` on Gloo:
    only rank 0 prints (each epoch once, one final line), logs and saves (no second log, no
    temporary file); epoch 1's record is kept as it was; the epoch statistics cover the global
    batch; the wall clock continues from the checkpoint."""
    out = str(tmp_path / 'run')
    assert stop_after_first_checkpoint(TINY + ['--out-dir', out], monkeypatch) == 130
    capsys.readouterr()
    first = open(os.path.join(out, 'log.jsonl')).read()
    assert [json.loads(line)['epoch'] for line in first.splitlines()] == [1]
    proc = torchrun(*TINY, '--out-dir', out, '--resume')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr
    assert epoch_lines(proc.stdout) == [2, 3]
    assert sum(line.startswith('final') for line in proc.stdout.splitlines()) == 1
    assert sorted(os.listdir(out)) == ['last.pt', 'log.jsonl', 'metrics.json']
    log = open(os.path.join(out, 'log.jsonl')).read()
    assert log.startswith(first)
    recs = [json.loads(line) for line in log.splitlines()]
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    check_epoch_stats_cover_the_global_batch(recs[1:])
    metrics = json.load(open(os.path.join(out, 'metrics.json')))
    assert (metrics['world_size'], metrics['final_epoch'], metrics['test_size']) == (2, 3, 64)
    assert torch.load(os.path.join(out, 'last.pt'), weights_only=True)['epoch'] == 3
    # the sum of the three epochs' seconds, the first from the one-process run
    assert metrics['wall_seconds'] == pytest.approx(sum(r['seconds'] for r in recs), rel=1e-9)
