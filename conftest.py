"""Shared by the top-level test files: one intra-op thread (2 CPU cores, shared), the import path
of the oracles (tests_property/oracles.py), and the two fixtures that train, each built once per
session: a --smoke run of the real command line, and a tiny trained model."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(REPO, 'tests_property'))  # oracles.py, beside the properties
torch.set_num_threads(1)  # tiny networks: one thread is as fast, and the machine is shared

from run_helpers import cli  # noqa: E402


@pytest.fixture(scope='session')
def smoke(tmp_path_factory):
    """`python ibp_short_warmup.py --smoke` in a real process: (the finished process, its folder).
    Tests read the folder; none may change it."""
    out = str(tmp_path_factory.mktemp('smoke') / 'run')
    return cli('--smoke', '--out-dir', out), out


@pytest.fixture(scope='session')
def tiny_trained():
    """(model, (x, y)): CNN-7 without BN (so eval = train mode), width 1/16, on 16x16 synthetic
    images, after 20 clean Adam steps; and 128 test images (uint8)."""
    # Imported here, not at the top: ../shared/gpu/check.sh finds the tools script as the first
    # file (alphabetically) whose top level imports ibp_short_warmup, and conftest.py sorts first.
    import ibp_short_warmup as ibp
    cfg = ibp.resolve(ibp.Config(dataset='synthetic', bn='none', method='vanilla', width=0.0625,
                                 synthetic_shape=(3, 16, 16), lr=5e-3,
                                 out_dir='unused'))
    info = ibp.dataset_info(cfg)
    model, opt, objective = ibp.prepare(cfg, torch.device('cpu'), info)
    x, y = ibp.synthetic_images(512, info['shape'], info['classes'], 1)
    for i in range(20):
        idx = torch.arange(i * 32, (i + 1) * 32) % 512
        ibp.train_step(objective, opt, x[idx].float() / 255, y[idx], 0.0, 0.0, cfg)
    return model.eval(), ibp.synthetic_images(128, info['shape'], info['classes'], 2)
