"""engine.distill.adam: the image parameters' Adam is torch's fused one on a CPU, the same update as
torch's default (foreach) one; a checkpoint of either resumes in the other keeping the fused update; a
step frees the gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.distill.adam import RowUpdate, adam, load_adam_state
from engine.distill.run import stepping_run
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
    load_adam_state(into_fused, copy.deepcopy(default.state_dict()))
    load_adam_state(into_default, copy.deepcopy(fused.state_dict()))
    # Each keeps its own implementation (torch's load_state_dict alone takes the saved one's flags).
    assert into_fused.param_groups[0]["fused"] and not into_default.param_groups[0]["fused"]
    plain = adam([swapped_theirs.detach().clone().requires_grad_(True)], 1e-2)
    plain.load_state_dict(copy.deepcopy(default.state_dict()))
    assert not plain.param_groups[0]["fused"]  # what load_adam_state is for
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


def test_resuming_a_checkpoint_of_the_foreach_update_keeps_the_fused_one(tmp_path):
    """A checkpoint written before 2026-12-07 holds `fused: None` in its groups: the resumed run must still
    use (and later save) the fused update, with Adam's moments and step as saved."""
    from engine.distill.prepare import restored_start

    synthetic = PixelImages(2, 1, 8, init="noise")
    old = torch.optim.Adam(synthetic.parameters(), lr=1e-2)
    synthetic.logits.grad = torch.ones_like(synthetic.logits)
    old.step()
    generators = make_generators(0)
    checkpoint = {"synthetic": synthetic.state_dict(), "optimizer": copy.deepcopy(old.state_dict()),
                  "generators": {name: gen.get_state() for name, gen in generators.items()}, "step": 1,
                  "metrics": [], "lr_history": [{"from_step": 0, "lr": 1e-2}]}
    resumed = PixelImages(2, 1, 8, init="zero")
    start = restored_start(checkpoint, resumed, make_generators(1), 1e-2, tmp_path, main=True)
    group = start.optimizer.param_groups[0]
    assert group["fused"] and start.optimizer.state_dict()["param_groups"][0]["fused"]
    state = start.optimizer.state[resumed.logits]
    assert float(state["step"]) == 1.0
    torch.testing.assert_close(state["exp_avg"], old.state[synthetic.logits]["exp_avg"], atol=0, rtol=0)


def test_row_update_refuses_amsgrad_whose_maximum_it_does_not_keep():
    param = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        RowUpdate(torch.optim.Adam([param], amsgrad=True))
    RowUpdate(adam([param], 0.1))  # the engine's optimizer is accepted
