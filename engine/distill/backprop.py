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

Each pass decodes only the images its copies come from (`SyntheticImages.images_from` on those rows of
the parameters, detached), and its image-parameter gradient is added into those rows of the parameters'
`.grad`. So besides the parameters, their gradient and Adam's two moments, nothing of the size of the
whole synthetic set is held: not the decoded images, their graph or their gradient (at 1000 images of 112
px those were 3 of the 7.4 set-sized float32 tensors held at the backward's peak:
benchmarks/results/bench_distill_growth.md). The exception is `--pixel-prior` (off by default): rank 0
decodes the whole set once per step for that term. Decoding a pass's images again in the backward pass
costs little beside the backbone.

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
from engine.parameterizations import SyntheticImages
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

    def _pass(self, synthetic: SyntheticImages, plan: list[AugmentParams] | None, start: int,
              stop: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Features of copies start..stop-1, decoding only the images they come from; returns (features,
        those images' rows, the detached parameter rows they were decoded from: leaves that collect the
        gradient when grad is enabled). One batched gather of the decoded rows per copy (its backward is
        one index_add, linear in the copies) and one batched sampling pass."""
        n = synthetic.n
        sources = torch.arange(start, stop, device=self.device) % n
        rows, position = torch.unique(sources, sorted=True, return_inverse=True)
        whole = rows.numel() == n  # every image: the parameters themselves, not a copy of them
        leaves = [(p.detach() if whole else p.detach().index_select(0, rows)).requires_grad_(torch.is_grad_enabled())
                  for p in synthetic.parameters()]
        images = synthetic.images_from(leaves)
        copies = self._augment(images.index_select(0, position), None if plan is None else plan[start:stop])
        return self.backbone.embed(copies, grad=True), rows, leaves

    def _augment(self, sources: Tensor, plan: list[AugmentParams] | None) -> Tensor:
        """Copy i of `sources` augmented with plan[i] (no plan: centre-cropped), at the backbone's size."""
        if plan is None:
            return center_crop(sources, self.backbone.image_size)
        return apply_each(sources, plan, self.backbone.image_size, self.augment_config)

    @staticmethod
    def _accumulate(synthetic: SyntheticImages, rows: Tensor, leaves: list[Tensor]) -> None:
        """Add the leaves' gradient into those rows of the parameters' .grad (allocated on first use)."""
        for param, leaf in zip(synthetic.parameters(), leaves):
            if leaf.grad is None:
                continue
            if rows.numel() == param.shape[0]:
                param.grad = leaf.grad if param.grad is None else param.grad.add_(leaf.grad)
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            param.grad.index_add_(0, rows, leaf.grad)

    def loss_and_backward(self, synthetic: SyntheticImages, plan: list[AugmentParams] | None,
                          copies_per_pass: int, loss_fn: LossFn, rank: int = 0, world_size: int = 1) -> Tensor:
        """loss_fn(features of all M copies, their labels); its gradient accumulates into the `.grad` of
        `synthetic.parameters()` for this rank's share of the copies (see the module docstring). Every rank
        must call this (it is collective when world_size > 1). Returns the detached loss."""
        m = self.copies(synthetic.n)
        copy_labels = synthetic.labels.repeat(self.augs)
        shares = [contiguous_share(m, r, world_size) for r in range(world_size)]
        start, stop = shares[rank].start, shares[rank].stop
        passes = [(s, min(stop, s + copies_per_pass)) for s in range(start, stop, copies_per_pass)]
        keep_graph = len(passes) == 1
        if not passes:
            local = torch.zeros(0, self.backbone.dim, device=self.device)
        elif keep_graph:
            local, rows, leaves = self._pass(synthetic, plan, start, stop)
        else:
            with torch.no_grad():
                local = torch.cat([self._pass(synthetic, plan, s, e)[0] for s, e in passes])
        features = all_gather_rows(local.detach(), [len(share) for share in shares]).requires_grad_(True)
        loss = loss_fn(features, copy_labels)
        (grad_features,) = torch.autograd.grad(loss, features)
        if keep_graph:
            local.backward(grad_features[start:stop])
            self._accumulate(synthetic, rows, leaves)
            return loss.detach()
        for s, e in passes:
            pass_features, rows, leaves = self._pass(synthetic, plan, s, e)
            pass_features.backward(grad_features[s:e])
            self._accumulate(synthetic, rows, leaves)
        return loss.detach()

    def graph_bytes_per_copy(self, synthetic: SyntheticImages) -> int:
        """Bytes autograd saves for one augmented copy's forward (measured on a trial forward of two copies
        of the first image)."""
        saved = 0

        def pack(t: Tensor) -> Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.no_grad():
            first = synthetic.images_from([p.detach()[:1] for p in synthetic.parameters()])
        trial = first.expand(2, -1, -1, -1).clone().requires_grad_(True)
        plan = [sample_params(1, torch.Generator().manual_seed(0), self.augment_config) for _ in range(2)] \
            if self.augment else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.backbone.embed(self._augment(trial, plan), grad=True)
        return max(1, saved // 2)


def resolve_copies_per_pass(chunk: int | str, side: SyntheticSide, synthetic: SyntheticImages,
                            copies: int) -> tuple[int, dict[str, Any]]:
    """Copies per backbone pass with a graph; for 'auto', from the measured graph size and the free
    memory. `copies`: how many copies this process runs per step (a rank's share under torchrun)."""
    if chunk != "auto":
        return min(int(chunk), copies), {"chunk": "fixed"}
    per_copy = side.graph_bytes_per_copy(synthetic)
    budget = int(free_memory(side.device) * AUTO_MEMORY_FRACTION)
    if side.device.type == "cpu":
        budget = min(budget, CPU_GRAPH_BYTES)
    fits = max(1, budget // per_copy)
    info = {"chunk": "auto", "graph_bytes_per_copy": per_copy, "memory_budget_bytes": budget}
    return (copies if fits >= copies else int(fits)), info
