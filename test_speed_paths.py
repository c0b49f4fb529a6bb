"""The faster code paths give the same numbers and never touch certification: certification in
full float32 (evaluate turns TF32 off), TF32 (--tf32) switched on again by each training epoch, fused
Adam, torch.compile of the whole Objective (THOROUGH_TESTS=1)."""
import os

import pytest
import torch

import ibp_short_warmup as ibp
from oracles import TOL
from run_helpers import flat

F32 = dict(rtol=TOL[torch.float32]['rtol'], atol=TOL[torch.float32]['atol'])


def tf32_flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def backend_flags():
    """setup_device sets process-wide backend flags: put them back after the test."""
    saved = tf32_flags(), torch.backends.cudnn.benchmark
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32), \
        torch.backends.cudnn.benchmark = saved


def test_evaluate_certifies_in_full_fp32(tiny_trained, monkeypatch, backend_flags):
    model, data = tiny_trained
    seen = []

    def recording(fn, result=lambda r: r):
        def wrapper(*args, **kw):
            seen.append((fn.__name__, tf32_flags()))
            return result(fn(*args, **kw))
        return wrapper

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training
    monkeypatch.setattr(ibp, 'ibp_margins', recording(ibp.ibp_margins))
    monkeypatch.setattr(ibp, 'pgd_margin', recording(ibp.pgd_margin))
    ibp.evaluate(model, data, 3e-3, batch_size=64, pgd_steps=2)
    assert [name for name, _ in seen] == ['ibp_margins', 'pgd_margin'] * 2
    assert all(flags == (False, False) for _, flags in seen), seen
    assert tf32_flags() == (False, False)  # left off: only a training epoch turns it on again


@pytest.mark.parametrize('tf32', [True, False])
def test_each_training_epoch_sets_tf32_from_its_flag(tf32, backend_flags, monkeypatch):
    """After an evaluation turned TF32 off, the next epoch trains with --tf32 / --no-tf32."""
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 8, 8),
                                 train_size=16, batch_size=16, device='cpu', tf32=tf32,
                                 out_dir='unused'))
    dev, info = ibp.setup_device(cfg), ibp.dataset_info(cfg)
    model, opt, objective = ibp.prepare(cfg, dev, info)
    seen, step = [], ibp.train_step

    def recording(*args):
        seen.append(tf32_flags())
        return step(*args)

    monkeypatch.setattr(ibp, 'train_step', recording)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    data = ibp.synthetic_images(16, info['shape'], info['classes'], 1)
    ibp.train_epoch(1, opt, objective, data, info, cfg, dev, 0, 1, False)
    assert seen == [(tf32, tf32)]


def test_prepare_uses_fused_adam_on_the_cpu(backend_flags):
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 8, 8),
                                 device='cpu'))
    opt = ibp.prepare(cfg, ibp.setup_device(cfg), ibp.dataset_info(cfg))[1]
    assert opt.defaults['fused'] is True


def small_synthetic(**kw):
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16),
                                 out_dir='unused', **kw))
    return cfg, ibp.dataset_info(cfg)


@pytest.mark.skipif(not os.environ.get('THOROUGH_TESTS'),
                    reason='torch.compile with a cold inductor cache takes ~40 s on the 2-core '
                           'CPU: set THOROUGH_TESTS=1 (.ci/run does)')
def test_compiled_objective_gives_the_eager_step():
    """--compile compiles the whole Objective: the robust loss, both regularizers (tau = 1, so both
    are > 0 and in the gradient) and their gradients equal the eager ones."""
    (cc, info), (ce, _) = small_synthetic(compile=True, tau=1.0), small_synthetic(tau=1.0)
    dev = torch.device('cpu')
    m_c, opt_c, o_c = ibp.prepare(cc, dev, info)
    m_e, opt_e, o_e = ibp.prepare(ce, dev, info)
    assert isinstance(o_c, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(o_c._orig_mod, ibp.Objective) and isinstance(o_e, ibp.Objective)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x = x.float() / 255
    s_c = ibp.train_step(o_c, opt_c, x, y, 2 / 255, 0.3, cc)
    s_e = ibp.train_step(o_e, opt_e, x, y, 2 / 255, 0.3, ce)
    assert s_e['l_tightness'] > 0 and s_e['l_relu'] > 0
    for k in ('loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err', 'relu_per_layer'):
        torch.testing.assert_close(s_c[k], s_e[k], **F32)
    g_c, g_e = flat(p.grad for p in m_c.parameters()), flat(p.grad for p in m_e.parameters())
    torch.testing.assert_close(g_c, g_e, rtol=F32['rtol'],
                               atol=F32['atol'] * g_e.abs().max().item())
