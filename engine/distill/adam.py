"""The optimizer of the image parameters: torch's Adam (`adam`), its checkpoints (`load_adam_state`), and
its update applied to some rows of the parameters at a time (`RowUpdate`), which lets a step update each
image as soon as its gradient is complete instead of holding the whole set's gradient
(engine.distill.backprop.PendingBackward.into_adam)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_update


def updates_image_by_image(backbones: int, distributed: bool, pixel_prior: bool) -> bool:
    """Whether a step applies Adam to each image as soon as its gradient is complete, so that no gradient of
    the whole set is held (`PendingBackward.into_adam`): one backbone in one process without the pixel
    prior. Several backbones' terms, several ranks' shares and the prior (a term of the whole set) must be
    summed into the gradient first."""
    return backbones == 1 and not distributed and not pixel_prior


def adam(parameters: list[Tensor], lr: float) -> torch.optim.Adam:
    """torch's Adam, fused where torch has the fused kernel (CPU, CUDA). Fused, the update reads and writes
    the parameters and both moments in place; torch's default (foreach) update allocates two more tensors
    of the parameters' size for the step (measured here: 287 MB transient for 144 MB of parameters, and 6x
    slower on a CPU), which at 1000+ images is the step's peak memory. The same update rule and state; a
    checkpoint of either resumes in the other through `load_adam_state`."""
    fused = parameters[0].device.type in ("cpu", "cuda")
    return torch.optim.Adam(parameters, lr=lr, fused=fused or None)


def load_adam_state(optimizer: torch.optim.Adam, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)` keeping this optimizer's implementation: torch takes each
    group's `fused` / `foreach` flags from the saved groups, so a checkpoint of the foreach update (before
    2026-12-07) would turn the fused update off for the rest of the run, and a CUDA checkpoint resumed
    elsewhere would ask for a fused kernel that device may lack. Set before the load, so that torch also
    moves `step` where the fused kernel wants it."""
    ours = [{key: group[key] for key in ("fused", "foreach")} for group in optimizer.param_groups]
    groups = [dict(saved, **flags) for saved, flags in zip(state["param_groups"], ours)]
    optimizer.load_state_dict({**state, "param_groups": groups})


class RowUpdate:
    """One Adam step of `optimizer` (one param group, every parameter row-indexed by image) applied to
    rows first..last-1 at a time: `rows(first, grads)` for every row exactly once, then `finish()`.

    The update is torch's own (`torch.optim.adam.adam`, the function `Adam.step` calls, with the group's
    settings and implementation) on views of those rows of the parameters and of Adam's moments, which
    are elementwise: the result is that of `optimizer.step()` with the whole gradient. Adam's step count
    is shared by every row: each call gets a copy of the count before the step, and `finish` advances the
    optimizer's count once. The state is created as torch creates it on a first step."""

    def __init__(self, optimizer: torch.optim.Adam) -> None:
        (group,) = optimizer.param_groups
        if group["amsgrad"]:  # never set by `adam`; its running maximum is not kept here
            raise ValueError("RowUpdate does not support amsgrad")
        self.group = group
        self.states = [self._state(optimizer, p) for p in group["params"]]
        self.counts = [state["step"].clone() for state in self.states]

    def _state(self, optimizer: torch.optim.Adam, p: Tensor) -> dict[str, Tensor]:
        state = optimizer.state[p]
        if not state:  # as torch.optim.Adam._init_group on a first step
            fused_or_capturable = bool(self.group["fused"] or self.group["capturable"])
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused_or_capturable else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def rows(self, first: int, grads: list[Tensor]) -> None:
        """Update rows first .. first + len(grads[i]) - 1 of every parameter with their complete gradient."""
        last = first + grads[0].shape[0]
        group = self.group
        adam_update([p.detach()[first:last] for p in group["params"]], grads,
                    [s["exp_avg"][first:last] for s in self.states], [s["exp_avg_sq"][first:last] for s in self.states],
                    [], [count.clone() for count in self.counts], foreach=group["foreach"],
                    capturable=group["capturable"], differentiable=False, fused=group["fused"],
                    decoupled_weight_decay=group.get("decoupled_weight_decay", False), amsgrad=group["amsgrad"],
                    beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    def finish(self) -> None:
        """Advance Adam's step count once, as `optimizer.step()` does."""
        for state in self.states:
            state["step"].add_(1)
