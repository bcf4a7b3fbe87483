"""The engine's tensor collectives on the default process group (identities in a single process).

Launch-environment parsing, process groups and the generic collectives live in
`featurestore.distributed` (the lower layer). This module adds what a distillation step needs to split
the augmented copies across ranks: gather their features, and sum their gradients while agreeing on a
stop.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from featurestore.distributed import guarded_collective, is_distributed


def all_gather_rows(local: Tensor, counts: Sequence[int]) -> Tensor:
    """Concatenate every rank's `local` [counts[r], ...] along dim 0, in rank order (sizes may differ:
    each piece is padded to the largest for the collective, then trimmed)."""
    if not is_distributed():
        return local
    world = dist.get_world_size()
    if len(counts) != world or local.shape[0] != counts[dist.get_rank()]:
        raise ValueError(f"all_gather_rows: local rows {local.shape[0]} / counts {list(counts)} do not match "
                         f"rank {dist.get_rank()} of {world}")
    largest = max(counts)
    padded = local.new_zeros((largest, *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)]
    with guarded_collective():  # another rank that stops: one line, not torch's traceback
        dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def reduce_step(params: list[Tensor], stop: bool, nonfinite: bool) -> tuple[bool, bool]:
    """End of a step (collective under torchrun): combine the ranks' stop / non-finite flags; unless some
    rank asks to stop or saw a non-finite loss, sum the parameter gradients over ranks in place.
    Returns (any stop, any non-finite); in a single process, the flags as given."""
    if not is_distributed():
        return stop, nonfinite
    flags = torch.tensor([float(stop), float(nonfinite)], device=params[0].device)
    with guarded_collective():  # another rank that stops: one line, not torch's traceback
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        any_stop, any_nonfinite = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
    if any_stop or any_nonfinite:
        return any_stop, any_nonfinite
    for p in params:
        if p.grad is None:  # this rank had no copies this step
            p.grad = torch.zeros_like(p)
    with guarded_collective():
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    return False, False
