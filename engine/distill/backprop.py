"""The synthetic side of a step: features of the augmented copies of the synthetic images through the
frozen backbone, and the back-propagation of a loss on those features into the image parameters.

Copy m of a step is augmentation m // n of image m % n (n synthetic images, `augs` copies each, M = n *
augs). Augmentation parameters are drawn per copy (`sample_params(1, ...)` M times, in copy order, from
the augmentation generator), so the random stream and therefore the result do not depend on how the
copies are split into passes or across ranks. With augmentation off every copy would be identical, so
one centre-cropped copy per image is used (the mean gradient over identical copies is the same).

Chunked back-propagation (`copies_per_pass` < M): the loss depends on the images only through the
[M, D] features. So the features are computed pass by pass WITHOUT a graph, the loss and dLoss/dFeatures
are computed on that small problem, and each pass is run again WITH a graph (replaying the same
augmentation parameters) and back-propagated with its slice of dLoss/dFeatures. The image gradients are
those of one pass with the whole graph; peak memory is bounded by one pass's graph instead of M
images'. The price is one extra no-graph forward per step. `resolve_copies_per_pass("auto", ...)` keeps
the single pass when the whole graph fits in the memory budget.

Several processes: each rank runs a contiguous share of the M copies (`featurestore.distributed.
contiguous_share`), an all-gather assembles the [M, D] features (small), every rank computes the same
loss and dLoss/dFeatures and back-propagates its own share; the parameter gradients are then summed over
ranks (`engine.distributed.reduce_step`). In a single process the share is all M copies and the
collectives are identities: one code path for any world size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from engine.distributed import all_gather_rows
from featurestore.augment import AugmentConfig, AugmentParams, apply_each, center_crop, sample_params
from featurestore.backbones import Backbone
from featurestore.distributed import contiguous_share
from featurestore.runtime import free_memory

# Fraction of free memory the kept graph (or one pass's graph) may use under "auto"; the rest is headroom
# for the backbone's weights, the backward pass' transient buffers and fragmentation.
AUTO_MEMORY_FRACTION = 0.5
# On a CPU a kept graph beyond ~1 GiB is slower than chunked back-propagation despite the extra
# no-graph forward (page faults and memory bandwidth dominate): benchmarks/results/bench_distill.md,
# efficientnet-lite0 112 px, M = 100: 3.8 s/step with the whole graph (2.3 GB) vs 2.3 s/step chunked.
CPU_GRAPH_BYTES = 1 << 30

LossFn = Callable[[Tensor, Tensor], Tensor]


class SyntheticSide:
    """Features of the augmented synthetic copies and the image gradients of a loss on them."""

    def __init__(self, backbone: Backbone, augs: int, augment: bool, augment_config: AugmentConfig) -> None:
        self.backbone = backbone
        self.augs = augs if augment else 1
        self.augment = augment
        self.augment_config = augment_config
        self.device = backbone.device

    def copies(self, n: int) -> int:
        return n * self.augs

    def draw(self, n: int, generator: torch.Generator) -> list[AugmentParams] | None:
        """Augmentation parameters of the M = n * augs copies, one draw per copy (None: no augmentation)."""
        if not self.augment:
            return None
        return [sample_params(1, generator, self.augment_config) for _ in range(n * self.augs)]

    def augmented(self, images: Tensor, plan: list[AugmentParams] | None, start: int, stop: int) -> Tensor:
        """Copies start..stop-1 of the step. One batched gather of the source images (its backward is one
        index_add, linear in the copies; indexing one image per copy would make a full-size gradient per
        copy, quadratic in the number of images) and one batched sampling pass."""
        n = images.shape[0]
        size = self.backbone.image_size
        if plan is None:
            return center_crop(images[start:stop], size)
        sources = images.index_select(0, torch.arange(start, stop, device=images.device) % n)
        return apply_each(sources, plan[start:stop], size, self.augment_config)

    def features(self, images: Tensor, plan: list[AugmentParams] | None, start: int, stop: int) -> Tensor:
        return self.backbone.embed(self.augmented(images, plan, start, stop), grad=True)

    def loss_and_backward(self, images_fn: Callable[[], Tensor], labels: Tensor, plan: list[AugmentParams] | None,
                          copies_per_pass: int, loss_fn: LossFn, rank: int = 0, world_size: int = 1) -> Tensor:
        """loss_fn(features of all M copies, their labels); its gradient accumulates into the parameters
        behind `images_fn()` for this rank's share of the copies (see the module docstring). Every rank
        must call this (it is collective when world_size > 1). Returns the detached loss."""
        images = images_fn()
        m = self.copies(images.shape[0])
        copy_labels = labels.repeat(self.augs)
        shares = [contiguous_share(m, r, world_size) for r in range(world_size)]
        start, stop = shares[rank].start, shares[rank].stop
        keep_graph = stop - start <= copies_per_pass
        if stop == start:
            local = torch.zeros(0, self.backbone.dim, device=self.device)
        elif keep_graph:
            local = self.features(images, plan, start, stop)
        else:
            with torch.no_grad():
                local = torch.cat([self.features(images, plan, s, min(stop, s + copies_per_pass))
                                   for s in range(start, stop, copies_per_pass)])
        features = all_gather_rows(local.detach(), [len(share) for share in shares]).requires_grad_(True)
        loss = loss_fn(features, copy_labels)
        (grad_features,) = torch.autograd.grad(loss, features)
        if stop == start:
            return loss.detach()
        if keep_graph:
            local.backward(grad_features[start:stop])
            return loss.detach()
        # Gradients w.r.t. the decoded images are accumulated pass by pass on a detached copy, then pushed
        # through the (cheap) decode graph once.
        image_leaf = images.detach().requires_grad_(True)
        for s in range(start, stop, copies_per_pass):
            e = min(stop, s + copies_per_pass)
            self.features(image_leaf, plan, s, e).backward(grad_features[s:e])
        images.backward(image_leaf.grad)
        return loss.detach()

    def graph_bytes_per_copy(self, images: Tensor) -> int:
        """Bytes autograd saves for one augmented copy's forward (measured on a trial forward of two copies)."""
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        trial = images[:1].detach().expand(2, -1, -1, -1).clone().requires_grad_(True)
        plan = [sample_params(1, torch.Generator().manual_seed(0), self.augment_config) for _ in range(2)] \
            if self.augment else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.features(trial, plan, 0, 2)
        return max(1, saved // 2)


def resolve_copies_per_pass(chunk: int | str, side: SyntheticSide, images: Tensor,
                            copies: int) -> tuple[int, dict[str, Any]]:
    """Copies per backbone pass with a graph; for 'auto', from the measured graph size and the free
    memory. `copies`: how many copies this process runs per step (a rank's share under torchrun)."""
    if chunk != "auto":
        return min(int(chunk), copies), {"chunk": "fixed"}
    per_copy = side.graph_bytes_per_copy(images)
    budget = int(free_memory(side.device) * AUTO_MEMORY_FRACTION)
    if side.device.type == "cpu":
        budget = min(budget, CPU_GRAPH_BYTES)
    fits = max(1, budget // per_copy)
    info = {"chunk": "auto", "graph_bytes_per_copy": per_copy, "memory_budget_bytes": budget}
    return (copies if fits >= copies else int(fits)), info
