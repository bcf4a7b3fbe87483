"""CLP-DD objective: closed form vs a float64 explicit inverse, gradients, ill-conditioned inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.objectives.clp import CLPObjective
from featurestore.errors import UserError


def _reference_logits(syn: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, num_classes: int,
                      ridge: float, temperature: float, bias: bool) -> torch.Tensor:
    """Straight from the formula, float64, explicit inverse in sample space."""
    z = syn.double()
    r = real.double()
    if bias:
        c = z.pow(2).sum(1).mean().sqrt()
        z = torch.cat([z, c.expand(z.shape[0], 1)], 1)
        r = torch.cat([r, c.expand(r.shape[0], 1)], 1)
    k = z @ z.T
    lam = ridge * torch.trace(k) / z.shape[0]
    y = F.one_hot(labels, num_classes).double()
    w = z.T @ torch.linalg.inv(k + lam * torch.eye(z.shape[0], dtype=torch.float64)) @ y
    return r @ w / temperature


def _problem(m: int, d: int, c: int, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    syn = torch.randn(m, d, generator=g)
    syn_labels = torch.arange(m) % c
    real = torch.randn(b, d, generator=g)
    real_labels = torch.randint(0, c, (b,), generator=g)
    return syn, syn_labels, real, real_labels


def test_closed_form_matches_float64_inverse_both_forms():
    # m < d uses the sample-space kernel, m > d the feature-space Gram matrix: both must match.
    for m, d in [(12, 40), (50, 8)]:
        syn, yl, real, _ = _problem(m, d, 4, 30)
        for bias in (True, False):
            obj = CLPObjective(4, ridge=0.05, temperature=0.2, bias=bias)
            got = obj.logits(syn, yl, real)
            ref = _reference_logits(syn, yl, real, 4, 0.05, 0.2, bias)
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_solve_returns_primal_weights():
    syn, yl, _, _ = _problem(10, 6, 3, 1)
    obj = CLPObjective(3, ridge=0.1, bias=False)
    w = obj.solve(syn.double(), yl)
    lam = 0.1 * syn.double().pow(2).sum() / 10
    y = F.one_hot(yl, 3).double()
    ref = torch.linalg.inv(syn.double().T @ syn.double() + lam * torch.eye(6, dtype=torch.float64)) @ syn.double().T @ y
    torch.testing.assert_close(w, ref)


def test_gradcheck_float64():
    syn, yl, real, rl = _problem(6, 5, 3, 9)
    syn = syn.double().requires_grad_(True)
    obj = CLPObjective(3, ridge=0.1, temperature=0.3)
    assert torch.autograd.gradcheck(lambda s: obj.loss(s, yl, real.double(), rl), (syn,))


def test_fp32_gradient_matches_float64():
    syn, yl, real, rl = _problem(20, 64, 5, 50)
    obj = CLPObjective(5, ridge=1e-2, temperature=0.1)
    s32 = syn.clone().requires_grad_(True)
    obj.loss(s32, yl, real, rl).backward()
    s64 = syn.double().requires_grad_(True)
    obj.loss(s64, yl, real.double(), rl).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=2e-3, atol=1e-5)


def test_scale_free():
    syn, yl, real, rl = _problem(8, 16, 4, 20)
    obj = CLPObjective(4)
    base = obj.loss(syn, yl, real, rl)
    scaled = obj.loss(syn * 300.0, yl, real * 300.0, rl)
    torch.testing.assert_close(base, scaled, rtol=1e-4, atol=1e-5)


def test_ill_conditioned_stays_finite_and_close():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 32, generator=g)
    # Rank 3 with 30 rows (exact duplicates), features at scale 1e4: the kernel has 27 zero eigenvalues
    # and entries ~1e10, so fp32 only survives because lambda is relative and Cholesky falls back.
    syn = base.repeat(10, 1) * 1e4
    yl = torch.arange(30) % 3
    real = torch.randn(40, 32, generator=g) * 1e4
    rl = torch.randint(0, 3, (40,), generator=g)
    for ridge in (1e-2, 1e-7):
        obj = CLPObjective(3, ridge=ridge, temperature=0.1)
        s = syn.clone().requires_grad_(True)
        loss = obj.loss(s, yl, real, rl)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        s64 = syn.double().requires_grad_(True)
        loss64 = obj.loss(s64, yl, real.double(), rl)
        loss64.backward()
        if ridge == 1e-2:
            torch.testing.assert_close(loss.double(), loss64, rtol=1e-3, atol=1e-4)
            # Gradients are ~1e-5 at this scale: compare relative to their norm.
            err = (s.grad.double() - s64.grad).norm() / s64.grad.norm()
            assert err < 1e-2


def test_loss_decreases_under_gradient_descent():
    syn, yl, real, rl = _problem(6, 16, 3, 60)
    # Real labels follow a linear rule, so a good synthetic set exists.
    w_true = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    rl = (real @ w_true).argmax(1)
    obj = CLPObjective(3)
    s = syn.clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=0.05)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = obj.loss(s, yl, real, rl)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_config_and_validation():
    obj = CLPObjective(10, ridge=0.3, temperature=0.7, bias=False)
    cfg = obj.config()
    assert cfg["ridge"] == 0.3 and cfg["temperature"] == 0.7 and cfg["bias"] is False and cfg["name"] == "clp"
    for bad, flag in ((dict(ridge=0.0), "--ridge"), (dict(temperature=-1.0), "--temperature")):
        with pytest.raises(UserError, match=flag):
            CLPObjective(10, **bad)


def test_singular_system_falls_back_to_jitter():
    from engine.objectives.clp import _spd_solve

    v = torch.arange(1.0, 6.0).unsqueeze(1)
    a = v @ v.T  # rank 1: plain Cholesky fails
    assert int(torch.linalg.cholesky_ex(a)[1]) != 0
    b = torch.ones(5, 2)
    x = _spd_solve(a, b)
    assert torch.isfinite(x).all()
    # Along the range of A (v) a tiny jitter barely changes the solution: v^T A x ~= v^T b (fp32
    # cancellation against the ~1e5 null-space component limits this to ~1%).
    torch.testing.assert_close(v.T @ (a @ x), v.T @ b, rtol=5e-2, atol=1e-3)
