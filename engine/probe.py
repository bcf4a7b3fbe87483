"""Linear probes on frozen features, trained the LGM authors' way: every row of the evaluation table
(`engine.evaluate`: distilled and baseline sets, the full-data upper bound) and `--eval-every`'s quick
probe share this one implementation.

As the authors' code (src/distillation/eval.py, src/models/linear_classifier.py): a head initialised with
weights N(0, 0.01^2) and zero bias (their LinearClassifier; NOT PyTorch's default uniform init, which
moves 1-image-per-class accuracies by several points: with N = 10 images the lr is 3.9e-5 and the head
never forgets its init), Adam with lr = 1e-3 * bs / 256 and bs = min(100, N), no weight decay, and a
cosine schedule stepped once per EPOCH (CosineAnnealingLR(T_max=epochs)). S seeds are trained side by
side as batched matrix products.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

BASE_LR = 1e-3  # at batch size 256 (lr = BASE_LR * bs / 256)
MAX_BATCH = 100  # image-set probes: bs = min(100, N)
HEAD_STD = 0.01  # the authors' head init: weights N(0, 0.01^2), bias 0


@dataclass(frozen=True)
class ProbeRecipe:
    """Linear-probe optimizer settings (defaults: the authors' recipe for a distilled set)."""

    epochs: int = 1000
    batch_size: int | None = None  # None -> min(MAX_BATCH, N)
    base_lr: float = BASE_LR  # lr = base_lr * batch_size / 256
    # "normal": the authors' head init; "uniform": PyTorch's nn.Linear default (weights and bias), which
    # this tool used before 2026-11-29 (kept to reproduce older tables and to measure the difference).
    init: str = "normal"

    def resolved(self, n: int) -> tuple[int, float]:
        bs = min(MAX_BATCH, n) if self.batch_size is None else min(self.batch_size, n)
        return bs, self.base_lr * bs / 256


# `engine distill --eval-every K`: an estimate of the probe accuracy during a run, cheap enough to repeat:
# one seed and 10 cached views instead of 5 seeds and 100, the protocol's recipe otherwise. (300 epochs
# until 2026-12-07 left the head near its init, reading 7.6-12.8 points below the fit's probe on
# Fashion-MNIST: benchmarks/results/diag_fit_curve.md as of e1eb29f, README "Quality". Training the head
# is a small part of the probe's time beside embedding the views.)
QUICK_RECIPE = ProbeRecipe()
QUICK_VIEWS = 10
QUICK_PROBE = f"1 seed, {QUICK_VIEWS} views, {QUICK_RECIPE.epochs} epochs"


@dataclass
class LinearProbes:
    """S linear heads trained side by side: weight [S, C, D], bias [S, C]."""

    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [S, N, C]."""
        return torch.einsum("nd,scd->snc", features, self.weight) + self.bias[:, None, :]

    def head(self, s: int = 0) -> torch.nn.Linear:
        lin = torch.nn.Linear(self.weight.shape[2], self.weight.shape[1]).to(self.weight.device)
        with torch.no_grad():
            lin.weight.copy_(self.weight[s])
            lin.bias.copy_(self.bias[s])
        return lin


# Below this many multiply-adds per step (S x B x D x C), CPU probe steps run single-threaded: each step
# is a handful of tiny ops, and OpenMP fork/join per op costs more than it saves (measured 4-6x slower
# with 2 threads for 5 seeds x bs 10 x D 1280, and for 5 seeds x bs 256 x D 1280 on a 2-core machine).
_SINGLE_THREAD_MACS = 50_000_000


@contextlib.contextmanager
def _cpu_threads(n_threads: int | None):
    if n_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_probes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, recipe: ProbeRecipe,
                 generators: Sequence[torch.Generator], progress: Any = None,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8) -> LinearProbes:
    """Train one fresh linear head per generator (seed), all at once, on shared labels [N].

    `features`: [N, D] (same for every seed, e.g. stored features), [V, N, D] cached views shared by all
    seeds, or [S, V, N, D] (views per seed). Per seed, the generator draws the head init (once: weights
    N(0, HEAD_STD^2), bias 0), then per epoch a permutation of the samples and, with V > 1, one cached
    view per sample. Mean
    cross-entropy; its gradient and Adam are written out (the exact torch.optim.Adam update, weight
    decay 0) so S seeds x 1000 epochs cost a few batched matrix products per step instead of S Python
    training loops; tests compare it with nn.Linear + torch.optim.Adam + autograd.
    """
    n_seeds = len(generators)
    if features.ndim == 2:
        features = features.unsqueeze(0)
    if features.ndim == 3:
        features = features.unsqueeze(0).expand(n_seeds, *features.shape)
    if features.shape[0] != n_seeds:
        raise ValueError(f"features carry {features.shape[0]} seeds, got {n_seeds} generators")
    _, n_views, n, dim = features.shape
    if n == 0:
        raise ValueError("cannot train a probe on 0 samples")
    device = features.device
    labels = labels.to(device)
    weight = torch.empty(n_seeds, num_classes, dim)
    bias = torch.zeros(n_seeds, num_classes)
    for s, gen in enumerate(generators):
        if recipe.init == "uniform":
            bound = 1.0 / math.sqrt(dim)
            weight[s].uniform_(-bound, bound, generator=gen)
            bias[s].uniform_(-bound, bound, generator=gen)
        else:
            weight[s].normal_(0.0, HEAD_STD, generator=gen)
    weight, bias = weight.to(device), bias.to(device)
    bs, lr = recipe.resolved(n)
    small = device.type == "cpu" and n_seeds * bs * dim * num_classes < _SINGLE_THREAD_MACS
    with _cpu_threads(1 if small else None):
        _adam_loop(features, labels, weight, bias, recipe, generators, bs, lr, adam_betas, adam_eps, progress)
    return LinearProbes(weight=weight, bias=bias)


def _adam_loop(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               recipe: ProbeRecipe, generators: Sequence[torch.Generator], bs: int, lr: float,
               adam_betas: tuple[float, float], adam_eps: float, progress: Any) -> None:
    """Mini-batch Adam on (weight [S, C, D], bias [S, C]) in place; see `train_probes`."""
    n_seeds, n_views, n, _ = features.shape
    device = features.device
    m_w, v_w = torch.zeros_like(weight), torch.zeros_like(weight)
    m_b, v_b = torch.zeros_like(bias), torch.zeros_like(bias)
    beta1, beta2 = adam_betas
    seed_index = torch.arange(n_seeds, device=device)[:, None]
    step = 0
    for epoch in range(recipe.epochs):
        lr_t = 0.5 * lr * (1.0 + math.cos(math.pi * epoch / recipe.epochs))  # cosine, stepped per epoch
        orders, views = [], []
        for gen in generators:
            orders.append(torch.randperm(n, generator=gen))
            views.append(torch.randint(0, n_views, (n,), generator=gen) if n_views > 1
                         else torch.zeros(n, dtype=torch.long))
        order = torch.stack(orders).to(device)  # [S, N]
        view = torch.stack(views).to(device)
        for start in range(0, n, bs):
            idx = order[:, start:start + bs]  # [S, B]
            x = features[seed_index, view.gather(1, idx), idx]  # [S, B, D]
            y = labels[idx]  # [S, B]
            logits = torch.baddbmm(bias[:, None, :], x, weight.transpose(1, 2))  # [S, B, C]
            resid = torch.softmax(logits, dim=2)
            resid.scatter_add_(2, y[..., None], torch.full_like(y[..., None], -1.0, dtype=resid.dtype))
            resid /= x.shape[1]  # mean over the batch
            grad_w = torch.bmm(resid.transpose(1, 2), x)
            grad_b = resid.sum(1)
            step += 1
            corr1 = 1 - beta1 ** step
            corr2_sqrt = math.sqrt(1 - beta2 ** step)
            for p, g, m, v in ((weight, grad_w, m_w, v_w), (bias, grad_b, m_b, v_b)):
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                p.addcdiv_(m, v.sqrt().div_(corr2_sqrt).add_(adam_eps), value=-lr_t / corr1)
        if progress is not None:
            progress.update(1)


@torch.no_grad()
def probes_accuracy(probes: LinearProbes, features: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 16384) -> list[tuple[float, float]]:
    """Per seed (top-1, top-k) accuracy in percent on features [N, D], k = min(5, C)."""
    n_seeds, num_classes, _ = probes.weight.shape
    k = min(5, num_classes)
    correct1 = torch.zeros(n_seeds, dtype=torch.long)
    correct5 = torch.zeros(n_seeds, dtype=torch.long)
    for start in range(0, features.shape[0], batch_size):
        logits = probes.logits(features[start:start + batch_size].to(probes.weight.device))  # [S, n, C]
        y = labels[start:start + batch_size].to(logits.device)
        topk = logits.topk(k, dim=2).indices
        correct1 += (topk[..., 0] == y).sum(1).cpu()
        correct5 += (topk == y[None, :, None]).any(dim=2).sum(1).cpu()
    n = features.shape[0]
    return [(100.0 * int(a) / n, 100.0 * int(b) / n) for a, b in zip(correct1, correct5)]
