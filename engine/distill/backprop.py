"""The synthetic side of a step: features of the augmented copies of the synthetic images through the
frozen backbone, and the back-propagation of a loss on those features into the image parameters.

Copy m of a step is augmentation m // n of image m % n (n synthetic images, `augs` copies each, M = n *
augs). Augmentation parameters are drawn per copy (`sample_params(1, ...)` M times, in copy order, from
the augmentation generator), so the random stream and therefore the result do not depend on how the
copies are split into passes or across ranks. With augmentation off every copy would be identical, so
one centre-cropped copy per image is used (the mean gradient over identical copies is the same).

Passes run over the copies in image-major order: position p is augmentation p % augs of image p // augs
(copy (p % augs) * n + p // augs), so a pass covers a contiguous run of images. The loss sees the
features in copy order.

Chunked back-propagation (`copies_per_pass` < M): the loss depends on the images only through the
[M, D] features. So the features are computed pass by pass WITHOUT a graph, the loss and dLoss/dFeatures
are computed on that small problem, and each pass is run again WITH a graph (replaying the same
augmentation parameters) and back-propagated with its slice of dLoss/dFeatures. The image gradients are
those of one pass with the whole graph; peak memory is bounded by one pass's graph instead of M
images'. The price is one extra no-graph forward per step. `resolve_copies_per_pass("auto", ...)` keeps
the single pass when the whole graph fits in the memory budget.

Each pass decodes only the images its copies come from (`SyntheticImages.images_from` on views of those
rows of the parameters, detached), so neither the decoded set, its graph nor its gradient is ever held
(at 1000 images of 112 px those were 3 of the 7.4 set-sized float32 tensors held at the backward's peak:
benchmarks/results/bench_distill_growth.md). Decoding a pass's images again in the backward pass costs
little beside the backbone. The back-propagation is returned ready to run (`PendingBackward`) and goes
one of two ways:
- `into_adam` (one process, one backbone, no --pixel-prior: the default): once a pass completes the
  copies of its images, Adam updates those images' rows with that gradient (`engine.distill.adam.
  RowUpdate`, torch's own update on views of the rows; elementwise, so the same as one update with the
  whole gradient). So besides the parameters and Adam's two moments nothing of the set's size is held,
  not even its gradient. The step's loss is known before any row moves (a non-finite loss updates
  nothing), and the loop holds Ctrl-C while it runs (a checkpoint never holds half an update).
- `into_grad` (several backbones, whose terms add up; several ranks, whose shares are summed; the pixel
  prior, a term of the whole set): the gradient is added into those rows of the parameters' `.grad`,
  and the optimizer steps once it is whole.

Several processes: each rank runs a contiguous share of the M copies (`featurestore.distributed.
contiguous_share`), an all-gather assembles the [M, D] features (small), every rank computes the same
loss and dLoss/dFeatures and back-propagates its own share; the parameter gradients are then summed over
ranks (`engine.distributed.reduce_step`). In a single process the share is all M copies and the
collectives are identities: one code path for any world size.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from engine.distill.adam import RowUpdate
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
              stop: int) -> tuple[Tensor, int, list[Tensor]]:
        """Features of the copies at image-major positions start..stop-1 (position p: copy (p % augs) * n +
        p // augs, of image p // augs; the module docstring), decoding only
        the images they come from: a contiguous range of rows. Returns (features, the first row, the
        parameter rows decoded from: detached views of the parameters, leaves that collect the gradient when
        grad is enabled). One batched gather of the decoded rows per copy and one batched sampling pass."""
        n, augs = synthetic.n, self.augs
        first, last = start // augs, (stop - 1) // augs + 1
        leaves = [p.detach()[first:last].requires_grad_(torch.is_grad_enabled()) for p in synthetic.parameters()]
        images = synthetic.images_from(leaves)
        positions = torch.arange(start, stop, device=self.device)
        copies = self._augment(images.index_select(0, positions // augs - first),
                               None if plan is None else [plan[(p % augs) * n + p // augs] for p in range(start, stop)])
        return self.backbone.embed(copies, grad=True), first, leaves

    def _augment(self, sources: Tensor, plan: list[AugmentParams] | None) -> Tensor:
        """Copy i of `sources` augmented with plan[i] (no plan: centre-cropped), at the backbone's size."""
        if plan is None:
            return center_crop(sources, self.backbone.image_size)
        return apply_each(sources, plan, self.backbone.image_size, self.augment_config)

    def loss(self, synthetic: SyntheticImages, plan: list[AugmentParams] | None, copies_per_pass: int,
             loss_fn: LossFn, rank: int = 0, world_size: int = 1) -> tuple[Tensor, PendingBackward]:
        """loss_fn(features of all M copies in copy order, their labels), and its back-propagation into the
        image parameters for this rank's share of the copies, ready to run (see the module docstring).
        Every rank must call this (it is collective when world_size > 1). Returns the detached loss."""
        n, augs = synthetic.n, self.augs
        m = n * augs
        shares = [contiguous_share(m, r, world_size) for r in range(world_size)]
        start, stop = shares[rank].start, shares[rank].stop
        passes = [(s, min(stop, s + copies_per_pass)) for s in range(start, stop, copies_per_pass)]
        graph = None
        if not passes:
            local = torch.zeros(0, self.backbone.dim, device=self.device)
        elif len(passes) == 1:  # the whole share in one pass: keep its graph for the backward
            local, first, leaves = self._pass(synthetic, plan, start, stop)
            graph = (local, first, leaves)
        else:
            with torch.no_grad():
                local = torch.cat([self._pass(synthetic, plan, s, e)[0] for s, e in passes])
        features = all_gather_rows(local.detach(), [len(share) for share in shares]).requires_grad_(True)
        copy = torch.arange(m, device=features.device)
        position_of_copy = (copy % n) * augs + copy // n
        loss = loss_fn(features.index_select(0, position_of_copy), synthetic.labels.repeat(augs))
        (grad_features,) = torch.autograd.grad(loss, features)
        return loss.detach(), PendingBackward(self, synthetic, plan, passes, grad_features, graph)

    def loss_and_backward(self, synthetic: SyntheticImages, plan: list[AugmentParams] | None,
                          copies_per_pass: int, loss_fn: LossFn, rank: int = 0, world_size: int = 1) -> Tensor:
        """`loss`, then its gradient accumulated into the `.grad` of `synthetic.parameters()`."""
        loss, backward = self.loss(synthetic, plan, copies_per_pass, loss_fn, rank, world_size)
        backward.into_grad()
        return loss

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


class PendingBackward:
    """A step's back-propagation of the loss into the image parameters, ready to run (`SyntheticSide.loss`):
    `into_grad()` adds the gradient into the parameters' `.grad`; `into_adam(update)` instead applies Adam
    to each image's rows as soon as its gradient is complete, so no gradient of the whole set is ever held
    (one process, one backbone, no --pixel-prior: engine.distill.loop.step)."""

    def __init__(self, side: SyntheticSide, synthetic: SyntheticImages, plan: list[AugmentParams] | None,
                 passes: list[tuple[int, int]], grad_features: Tensor,
                 graph: tuple[Tensor, int, list[Tensor]] | None) -> None:
        self.side, self.synthetic, self.plan, self.passes = side, synthetic, plan, passes
        self.grad_features = grad_features
        self.graph = graph  # the single pass's (features, first row, leaves), kept from the forward

    def _backward(self) -> Iterator[tuple[int, int, list[Tensor]]]:
        """Each pass back-propagated, in order: (where it stops, the first row it decoded, the gradient of
        each parameter over its rows from that one on)."""
        for start, stop in self.passes:
            graph, self.graph = self.graph, None  # a single pass's graph is kept from the forward
            features, first, leaves = graph or self.side._pass(self.synthetic, self.plan, start, stop)
            features.backward(self.grad_features[start:stop])
            yield stop, first, [leaf.grad for leaf in leaves]

    def into_grad(self) -> None:
        """Add this share's gradient into the parameters' `.grad` (allocated on first use)."""
        params = self.synthetic.parameters()
        for _, first, grads in self._backward():
            for param, grad in zip(params, grads):
                if grad.shape[0] == param.shape[0]:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
                    continue
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad[first:first + grad.shape[0]].add_(grad)

    def into_adam(self, update: RowUpdate) -> None:
        """Back-propagate pass by pass and apply `update` to the images whose copies are all done (every
        copy of the set: a single process). An image whose copies a pass boundary splits is carried: its
        gradient so far waits for the rest of its copies in the next pass."""
        augs = self.side.augs
        carried: list[Tensor] | None = None  # the gradient so far of the image the last pass ended inside
        for stop, first, grads in self._backward():
            if carried is not None:  # this pass starts with the rest of that image's copies (row `first`)
                for grad, earlier in zip(grads, carried):
                    grad[:1].add_(earlier)
            done = stop // augs - first  # this pass's rows whose last copy it holds
            carried = [grad[done:done + 1].clone() for grad in grads] if stop % augs else None
            if done:
                update.rows(first, [grad[:done] for grad in grads])
        assert carried is None, "the passes must cover every copy of every image"
        update.finish()


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
