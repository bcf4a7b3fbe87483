"""LGM (Linear Gradient Matching, arXiv 2511.16674), as in the authors' code:
- a fresh random linear head per call: W ~ N(0, head_std^2) of shape [C, D] drawn on the CPU generator
  (so a seed gives the same heads on any device), b = 0; never trained;
- real gradient (constant): mean cross-entropy gradient of the head on the real features;
- synthetic gradient (with a graph): the same on the synthetic features;
- loss = 1 - cos(flatten[gW_real, gb_real], flatten[gW_syn, gb_syn]) (match="global", the authors'),
  or the mean over classes c of 1 - cos([gW_real[c], gb_real[c]], [gW_syn[c], gb_syn[c]])
  (match="per-class": every class's row counts equally, however small its gradient).
Both gradients come from `engine.kernels.linear_ce_grad` (fused, differentiable w.r.t. the features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.kernels import linear_ce_grad
from engine.objectives.base import ObjectiveError, ObjectiveSpec
from featurestore.options import option

MATCH_MODES = ("global", "per-class")
DEFAULT_HEAD_STD = 0.01
DEFAULT_MATCH = "global"
# Logits are head_std x |features| (features have norms of tens): far above this the softmax saturates to
# one-hot, both gradients vanish and the cosine is 0/0 — a NaN that no --lr can fix, so it is refused here.
MAX_HEAD_STD = 1e3


@dataclass(frozen=True)
class LGMConfig:
    """Options of `--method lgm`."""

    head_std: float = option(DEFAULT_HEAD_STD, "lgm: std of the random linear heads.")
    match: str = option(DEFAULT_MATCH, "lgm: global (one cosine, the authors') or per-class.")

    def validate(self) -> None:
        if not (math.isfinite(self.head_std) and 0 < self.head_std <= MAX_HEAD_STD):
            raise ObjectiveError(f"--head-std must be in (0, {MAX_HEAD_STD:g}] (the authors' {DEFAULT_HEAD_STD}), "
                                 f"got {self.head_std}")
        if self.match not in MATCH_MODES:
            raise ObjectiveError(f"--match must be one of {', '.join(MATCH_MODES)}, got {self.match!r}")


class LGMObjective:
    """Linear Gradient Matching loss (see the module docstring)."""

    name = "lgm"

    def __init__(self, num_classes: int, head_std: float = DEFAULT_HEAD_STD,
                 match: str = DEFAULT_MATCH) -> None:
        LGMConfig(head_std=head_std, match=match).validate()
        if num_classes < 2:
            raise ObjectiveError(f"LGM needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.head_std = float(head_std)
        self.match = match

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "head_std": self.head_std, "match": self.match, "head_bias": 0.0}

    def sample_head(self, dim: int, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        weight = torch.randn(self.num_classes, dim, generator=generator, dtype=torch.float32) * self.head_std
        return weight.to(device), torch.zeros(self.num_classes, dtype=torch.float32, device=device)

    def gradients(self, syn_features: Tensor, syn_labels: Tensor, real_features: Tensor, real_labels: Tensor,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(real, synthetic) head gradients as [C, D+1] matrices (weight columns then the bias column)."""
        device = syn_features.device
        weight, bias = self.sample_head(syn_features.shape[1], generator, device)
        with torch.no_grad():
            gw_real, gb_real = linear_ce_grad(real_features.to(device, torch.float32), real_labels.to(device),
                                              weight, bias)
        gw_syn, gb_syn = linear_ce_grad(syn_features.float(), syn_labels.to(device), weight, bias)
        real = torch.cat([gw_real, gb_real[:, None]], dim=1)
        syn = torch.cat([gw_syn, gb_syn[:, None]], dim=1)
        return real, syn

    def loss(self, syn_features: Tensor, syn_labels: Tensor, real_features: Tensor, real_labels: Tensor,
             generator: torch.Generator) -> Tensor:
        # The head and cosine run in fp32 whatever autocast region the caller is in.
        with torch.autocast(device_type=syn_features.device.type, enabled=False):
            real, syn = self.gradients(syn_features, syn_labels, real_features, real_labels, generator)
            if self.match == "global":
                return 1 - F.cosine_similarity(real.flatten(), syn.flatten(), dim=0)
            return (1 - F.cosine_similarity(real, syn, dim=1)).mean()


SPEC = ObjectiveSpec(name="lgm", description="linear gradient matching, the authors' LGM", config=LGMConfig,
                     build=lambda num_classes, cfg: LGMObjective(num_classes, head_std=cfg.head_std, match=cfg.match))
