"""Evaluation: standard <= PGD <= verified error; PGD's margins lie between the IBP lower bound and
the clean margin, at points inside the box; bounds made unsound are caught by the attack."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ibp_short_warmup as ibp
from oracles import TOL, tol_of

F32 = torch.float32
# mostly verified / partly verified and attackable / nothing verified
ATTACK_EPS = [1e-4, 4e-4, 3e-3]
PGD = dict(pgd_steps=10)


def test_evaluate_error_ordering(tiny_trained):
    model, (x, y) = tiny_trained
    with torch.no_grad():
        std_oracle = (model(x.float() / 255).argmax(1) != y).float().mean().item()  # plain forward
    for eps in ATTACK_EPS:
        res = ibp.evaluate(model, (x, y), eps, **PGD)
        assert res['std_err'] == std_oracle
        assert res['std_err'] <= res['pgd_err'] <= res['ver_err'], (eps, res)
        # batching does not change the deterministic errors (128 = 2 x 50 + 28)
        other = ibp.evaluate(model, (x, y), eps, batch_size=50)
        assert other['pgd_err'] is None
        assert (other['std_err'], other['ver_err']) == (res['std_err'], res['ver_err'])
    res = ibp.evaluate(model, (x, y), ATTACK_EPS[1], **PGD)
    assert res['std_err'] < res['pgd_err'] < res['ver_err'] < 1, res  # the three differ: can fail


class Recorder(nn.Module):
    """The model, recording every input it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


def true_margin(z, y):
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float('-inf')).amax(1)
    return z.gather(1, y[:, None]).squeeze(1) - other


def test_pgd_margin_between_ibp_bound_and_clean_margin(tiny_trained):
    model, (x, y) = tiny_trained
    x = x.float() / 255
    with torch.no_grad():
        clean = true_margin(model(x), y)
    tol = tol_of(F32, clean.abs())
    steps = PGD['pgd_steps']
    for eps in ATTACK_EPS[1:]:
        with torch.no_grad():
            _, lb = ibp.ibp_margins(model, x, y, eps)
        # min over j != y of the certified lower bound of z_y - z_j
        worst = lb.masked_fill(F.one_hot(y, lb.shape[1]).bool(), float('inf')).amin(1)
        rec = Recorder(model)
        found = ibp.pgd_margin(rec, x, y, eps, steps, torch.Generator().manual_seed(0))
        assert found.shape == y.shape
        # every point the attack tried lies in the clipped eps-box, and the result is the smallest
        # margin among them (recomputed by a plain forward pass)
        assert len(rec.seen) == steps + 1
        lo, up = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        for pt in rec.seen:
            assert torch.all(pt >= lo - tol_of(F32)) and torch.all(pt <= up + tol_of(F32))
        with torch.no_grad():
            tried = torch.stack([true_margin(model(pt), y) for pt in rec.seen]).amin(0)
        torch.testing.assert_close(found, tried, rtol=TOL[F32]['rtol'], atol=TOL[F32]['atol'])
        assert torch.all(found <= clean + tol), eps  # the attack never does worse than the clean
        assert torch.all(found >= worst - tol), eps  # and never beats a sound bound
        assert (found < clean - 1e-3).float().mean() > 0.5, eps  # it does attack


def test_evaluate_raises_when_bounds_are_unsound(tiny_trained, monkeypatch):
    model, data = tiny_trained
    real = ibp.ibp_margins

    def claims_everything_verified(*args, **kw):
        logits, lb = real(*args, **kw)
        return logits, lb + 100

    monkeypatch.setattr(ibp, 'ibp_margins', claims_everything_verified)
    # the patch is in effect; no attack, no check
    assert ibp.evaluate(model, data, ATTACK_EPS[2])['ver_err'] == 0
    with pytest.raises(RuntimeError, match='unsound'):
        ibp.evaluate(model, data, ATTACK_EPS[2], **PGD)
