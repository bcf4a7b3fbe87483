"""engine.objectives: the LGM loss against a hand-written reference, and objective lookup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.objectives import LGMObjective, get_objective
from featurestore.errors import UserError


def _reference_head_grads(features, labels, weight, bias, create_graph):
    """Gradient of mean cross-entropy w.r.t. (W, b) by plain autograd, float64."""
    w = weight.double().clone().requires_grad_(True)
    b = bias.double().clone().requires_grad_(True)
    loss = F.cross_entropy(features.double() @ w.T + b, labels)
    gw, gb = torch.autograd.grad(loss, (w, b), create_graph=create_graph)
    return torch.cat([gw, gb[:, None]], dim=1)


def _problem(seed=0, m=30, b=50, d=16, c=5):
    g = torch.Generator().manual_seed(seed)
    syn = torch.randn(m, d, generator=g) * 3
    syn_y = torch.arange(m) % c
    real = torch.randn(b, d, generator=g) * 3
    real_y = torch.randint(0, c, (b,), generator=g)
    return syn, syn_y, real, real_y


@pytest.mark.parametrize("match", ["global", "per-class"])
def test_lgm_loss_and_feature_gradient_match_reference(match):
    syn, syn_y, real, real_y = _problem()
    c, d = 5, syn.shape[1]
    obj = LGMObjective(c, head_std=0.5, match=match)  # a large std makes the softmax non-trivial
    feats = syn.clone().requires_grad_(True)
    loss = obj.loss(feats, syn_y, real, real_y, torch.Generator().manual_seed(7))
    loss.backward()

    head = torch.Generator().manual_seed(7)
    weight = torch.randn(c, d, generator=head) * 0.5
    bias = torch.zeros(c)
    ref_feats = syn.double().clone().requires_grad_(True)
    g_real = _reference_head_grads(real, real_y, weight, bias, create_graph=False)
    g_syn = _reference_head_grads(ref_feats, syn_y, weight, bias, create_graph=True)
    if match == "global":
        ref = 1 - F.cosine_similarity(g_real.flatten(), g_syn.flatten(), dim=0)
    else:
        ref = (1 - F.cosine_similarity(g_real, g_syn, dim=1)).mean()
    ref.backward()
    assert 0.05 < float(ref.detach()) < 2  # a non-degenerate problem
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats.grad.double(), ref_feats.grad, atol=1e-6, rtol=1e-4)


def test_lgm_head_is_drawn_from_the_generator():
    syn, syn_y, real, real_y = _problem(1)
    obj = LGMObjective(5)
    a = obj.loss(syn, syn_y, real, real_y, torch.Generator().manual_seed(3))
    b = obj.loss(syn, syn_y, real, real_y, torch.Generator().manual_seed(3))
    c = obj.loss(syn, syn_y, real, real_y, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Identical synthetic and real sets give identical gradients: loss 0.
    zero = obj.loss(real, real_y, real, real_y, torch.Generator().manual_seed(3))
    assert abs(float(zero)) < 1e-6


def test_get_objective():
    lgm = get_objective("lgm", 10, head_std=0.02, match="per-class")
    assert isinstance(lgm, LGMObjective) and lgm.config()["head_std"] == 0.02 and lgm.match == "per-class"
    clp = get_objective("clp", 10, ridge=None, temperature=0.1)
    assert clp.name == "clp" and clp.config()["temperature"] == 0.1
    with pytest.raises(UserError, match="unknown method 'mtt'"):
        get_objective("mtt", 10)
    with pytest.raises(UserError, match="does not take ridge"):
        get_objective("lgm", 10, ridge=1.0)


@pytest.mark.parametrize("method, option", [("lgm", "--head-std"), ("clp", "--ridge")])
def test_an_objective_option_that_can_only_give_nan_is_one_line_up_front(method, option, tmp_path):
    """Issue 20, defect 10: --head-std 1e308 / --ridge 1e308 ran into a NaN loss whose advice was a lower --lr
    (no rate fixes those); they are refused before anything runs, naming the option and its range."""
    from typer.testing import CliRunner

    from cli.engine import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--store", str(tmp_path / "no-store"), "--backbone", "test-cnn",
                                      "--out", str(out), "--method", method, option, "1e308", "--quiet"])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0] and "1e+308" in lines[0]
    assert not out.exists()
