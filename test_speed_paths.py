"""The faster code paths give the same numbers and never touch certification: certification in
full float32 (TF32 off, restored after), TF32 for training only, fused Adam, channels-last memory,
torch.compile of the whole Objective (THOROUGH_TESTS=1)."""
import os

import pytest
import torch
import torch.nn as nn

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
    assert tf32_flags() == (True, True)  # restored afterwards
    # ... also when evaluate raises (unsound bounds)
    unsound = recording(ibp.ibp_margins, lambda r: (r[0], r[1] + 100))
    monkeypatch.setattr(ibp, 'ibp_margins', unsound)
    with pytest.raises(RuntimeError):
        ibp.evaluate(model, data, 3e-3, pgd_steps=2)
    assert tf32_flags() == (True, True)


@pytest.mark.parametrize('tf32', [True, False])
def test_setup_device_sets_tf32_for_training(tf32, backend_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    cfg = ibp.Config(device='cpu', tf32=tf32)
    assert ibp.setup_device(cfg) == torch.device('cpu')
    assert tf32_flags() == (tf32, tf32)
    assert cfg.channels_last is False  # the default is channels-last on CUDA only
    # an explicit value is kept
    assert ibp.setup_device(ibp.Config(device='cpu', channels_last=True)).type == 'cpu'


def test_prepare_uses_fused_adam_on_the_cpu(backend_flags):
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 8, 8),
                                 device='cpu'))
    opt = ibp.prepare(cfg, ibp.setup_device(cfg), ibp.dataset_info(cfg))[1]
    assert opt.defaults['fused'] is True


def small_synthetic(**kw):
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', width=0.0625, synthetic_shape=(3, 16, 16),
                                 out_dir='unused', **kw))
    return cfg, ibp.dataset_info(cfg)


def test_channels_last_gives_the_same_bounds_and_step():
    (cl, info), (cf, _) = small_synthetic(channels_last=True), small_synthetic(channels_last=False)
    dev = torch.device('cpu')
    m_cl, opt_cl, o_cl = ibp.prepare(cl, dev, info)
    m_cf, opt_cf, o_cf = ibp.prepare(cf, dev, info)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x_cl, x_cf = ibp.to_input(x, cl), ibp.to_input(x, cf)
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()
    assert x_cf.is_contiguous()
    conv = next(m for m in m_cl.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=F32['rtol'], atol=F32['atol'] * b.abs().max().item())

    eps = 2 / 255
    for mode in (True, False):  # BN on batch statistics, then on running statistics
        m_cl.train(mode)
        m_cf.train(mode)
        pre1, pre2 = [], []
        with torch.no_grad():
            (z1, lb1), (z2, lb2) = ibp.ibp_margins(m_cl, x_cl, y, eps, pre1), \
                ibp.ibp_margins(m_cf, x_cf, y, eps, pre2)
        same(z1, z2)
        same(lb1, lb2)
        assert len(pre1) == len(pre2) == 7
        for (c1, r1), (c2, r2) in zip(pre1, pre2):
            same(c1, c2)
            same(r1, r2)
    m_cl.train()
    m_cf.train()
    s1 = ibp.train_step(o_cl, opt_cl, x_cl, y, eps, 0.3, cl)
    s2 = ibp.train_step(o_cf, opt_cf, x_cf, y, eps, 0.3, cf)
    assert torch.isfinite(s1['loss'])
    for k in ('loss', 'l_tightness', 'l_relu'):
        same(s1[k], s2[k])
    same(flat(p.grad for p in m_cl.parameters()), flat(p.grad for p in m_cf.parameters()))
    torch.manual_seed(cl.seed)
    init = flat(ibp.build_model(cl, info).parameters())
    assert (flat(m_cl.parameters()) - init).abs().max() > cl.lr / 2  # the step moved the weights


@pytest.mark.skipif(not os.environ.get('THOROUGH_TESTS'),
                    reason='torch.compile with a cold inductor cache takes ~40 s on the 2-core '
                           'CPU: set THOROUGH_TESTS=1 (.ci/run does)')
def test_compiled_objective_gives_the_eager_step():
    """--compile compiles the whole Objective: the robust loss, both regularizers (tau = 1, so both
    are > 0 and in the gradient) and their gradients equal the eager ones."""
    (cc, info), (ce, _) = small_synthetic(channels_last=False, compile=True, tau=1.0), \
        small_synthetic(channels_last=False, tau=1.0)
    dev = torch.device('cpu')
    m_c, opt_c, o_c = ibp.prepare(cc, dev, info)
    m_e, opt_e, o_e = ibp.prepare(ce, dev, info)
    assert isinstance(o_c, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(o_c._orig_mod, ibp.Objective) and isinstance(o_e, ibp.Objective)
    x, y = ibp.synthetic_images(16, info['shape'], info['classes'], 4)
    x = ibp.to_input(x, cc)
    s_c = ibp.train_step(o_c, opt_c, x, y, 2 / 255, 0.3, cc)
    s_e = ibp.train_step(o_e, opt_e, x, y, 2 / 255, 0.3, ce)
    assert s_e['l_tightness'] > 0 and s_e['l_relu'] > 0
    for k in ('loss', 'l_tightness', 'l_relu', 'train_err', 'train_ver_err', 'relu'):
        torch.testing.assert_close(s_c[k], s_e[k], **F32)
    g_c, g_e = flat(p.grad for p in m_c.parameters()), flat(p.grad for p in m_e.parameters())
    torch.testing.assert_close(g_c, g_e, rtol=F32['rtol'],
                               atol=F32['atol'] * g_e.abs().max().item())
