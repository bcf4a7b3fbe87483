"""engine.distill.run.adam: the image parameters' Adam is torch's fused one on a CPU, the same update as
torch's default (foreach) one and state_dict-compatible both ways; a step frees the gradient."""

from __future__ import annotations

import copy

import torch

from engine.distill.run import adam, stepping_run
from engine.objectives import get_objective
from engine.parameterizations import PixelImages
from engine.distill.seeds import make_generators
from featurestore.distributed import init_process_group_from_env


def _grads(seed: int, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def test_fused_adam_matches_torchs_default_and_loads_its_state_both_ways():
    start = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    fused, default = adam([ours], 1e-2), torch.optim.Adam([theirs], lr=1e-2)
    assert fused.param_groups[0]["fused"] and not default.param_groups[0]["fused"]
    for step in range(3):
        ours.grad, theirs.grad = _grads(step, ours), _grads(step, theirs)
        fused.step()
        default.step()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    # A checkpoint of either optimizer resumes in the other and continues the same trajectory.
    swapped_ours, swapped_theirs = ours.detach().clone().requires_grad_(True), theirs.detach().clone().requires_grad_(True)
    into_fused, into_default = adam([swapped_theirs], 1e-2), torch.optim.Adam([swapped_ours], lr=1e-2)
    # (copies: load_state_dict keeps the given tensors, as a checkpoint read from its file would be)
    into_fused.load_state_dict(copy.deepcopy(default.state_dict()))
    into_default.load_state_dict(copy.deepcopy(fused.state_dict()))
    for opt, p in ((fused, ours), (default, theirs), (into_fused, swapped_theirs), (into_default, swapped_ours)):
        p.grad = _grads(7, p)
        opt.step()
    for p in (theirs, swapped_theirs, swapped_ours):
        torch.testing.assert_close(p, ours, atol=1e-6, rtol=1e-5)
    assert float(into_fused.state[swapped_theirs]["step"]) == 4.0


def test_optimizer_step_frees_the_gradient():
    """Nothing set-sized but the parameters and Adam's moments outlives a step (checkpoints, the set-fit
    check and the quick probe run between steps)."""
    synthetic = PixelImages(2, 1, 8, init="noise")
    run = stepping_run(init_process_group_from_env("cpu"), [], get_objective("lgm", 2), synthetic,
                       make_generators(0), lr=1e-2)
    before = synthetic.logits.detach().clone()
    synthetic.logits.grad = torch.ones_like(synthetic.logits)
    run.optimizer_step(0)
    assert synthetic.logits.grad is None
    assert not torch.equal(synthetic.logits.detach(), before)
    assert sorted(run.optimizer.state[synthetic.logits]) == ["exp_avg", "exp_avg_sq", "step"]
