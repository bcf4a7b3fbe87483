"""What every distillation objective is: a loss of (synthetic features, real features), the options
it takes, and how the registry builds it.

The distill loop depends on the synthetic images only through `syn_features`, which is what allows
chunked back-propagation (engine.distill.backprop): features of all augmented copies are computed
without a graph, the loss gradient w.r.t. them is taken on that small problem, then each chunk is run
again with a graph and back-propagated with its slice of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from featurestore.errors import UserError


class ObjectiveError(UserError):
    """Bad options for an objective, or a problem it cannot be applied to."""


class Objective(Protocol):
    name: str

    def loss(self, syn_features: Tensor,   # [M, D] float32, requires grad (M = n_syn * augs)
             syn_labels: Tensor,           # [M] int64
             real_features: Tensor,        # [B, D] float32 (constants: from the store, or end to end)
             real_labels: Tensor,          # [B] int64
             generator: torch.Generator) -> Tensor:  # scalar; the CPU generator seeds random heads etc.
        ...

    def config(self) -> dict[str, Any]:
        """Hyper-parameters, recorded in the run's config.json."""
        ...


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registry entry: `config` is a frozen dataclass of the objective's options (fields made with
    `featurestore.options.option`, a `validate()` method); the CLI derives `engine distill`'s options
    from it. `description`: a phrase, shown after the name in `--method`'s help.
    `build(num_classes, config) -> Objective`."""

    name: str
    description: str
    config: type
    build: Callable[[int, Any], Objective]
