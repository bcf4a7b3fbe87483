"""Fused real-gradient kernel: the mean cross-entropy gradient of a linear head.

    grad_weight = (softmax(Z W^T + b) - onehot(y))^T Z / N      [C, D]
    grad_bias   = mean over rows of (softmax(Z W^T + b) - onehot(y))   [C]

computed in row blocks, so at most a [block, C] block of logits exists at once, never all N x C
probabilities. Registered as the torch op `probe_distill::linear_ce_grad` (CPU: blocked torch; CUDA:
the same blocks with fused Triton row kernels) and differentiable: gradients flow to `features`
(the synthetic side of gradient matching needs them) and to `weight`/`bias` if they require grad.

Design (why not a fully fused kernel): per block, logits = Z_r W^T + b and G += A_r^T Z_r are two
large GEMMs left to cuBLAS/MKL; only the row-wise softmax-minus-onehot (and its backward) between
them is a Triton kernel, which streams C in tiles with an online max/sum. This is Liger-Kernel's
fused-linear-cross-entropy structure. A fully fused design where each program owns a (C-tile,
D-tile) block of G must recompute the logits of every row for every D-tile, i.e. D / BLOCK_D times
the GEMM work (6-12x at D = 384-768), and cut-cross-entropy's way around that (atomics into G) pays
off when C >> D (LLM vocabularies), not for classification heads (C ~ 10-1000, D ~ 384-1024), where
the [block, C] buffer is a few MB and the BLAS runs near peak. The result is deterministic (no atomics).

Accumulation is in float32 for fp16/bf16/fp32 inputs and float64 for float64 inputs (gradcheck);
the outputs have that dtype.

Dispatch by size (`linear_ce_grad`): when the whole N x C logits matrix is no larger than one row block
(a few MB), blocking buys nothing and the op's fixed costs (two custom ops, the blocked loop) made it
slower than the plain expression (0.52x at N=4096, C=10 on 2 CPU cores); there the plain torch expression
runs, differentiated by autograd. Larger problems take the blocked op. `block_rows` > 0 forces the op.
"""

from __future__ import annotations

from torch import Tensor

import torch
from torch._subclasses.fake_tensor import is_fake

from .blocked import block_elements
from .ops import linear_ce_grad_backward_op, linear_ce_grad_op
from .validation import check_inputs, compute_dtype

__all__ = ["linear_ce_grad", "plain_linear_ce_grad", "linear_ce_grad_op", "linear_ce_grad_backward_op",
           "compute_dtype"]


def linear_ce_grad(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, *,
                   block_rows: int = 0) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy gradient of the linear head (weight [C, D], bias [C]) on features [N, D].

    labels: [N] integer class indices in [0, C). Returns (grad_weight [C, D], grad_bias [C]) in
    float32 (float64 if an input is float64). block_rows: rows per block, 0 = sized automatically.
    Raises ValueError for mismatched shapes, non-float inputs or labels out of range.
    """
    small = features.shape[0] * weight.shape[0] <= block_elements(features.device)
    # Under torch.compile / fake tensors the op (with its registered fake kernel) traces the call.
    if block_rows == 0 and small and not is_fake(labels):
        return plain_linear_ce_grad(features, labels, weight, bias)
    return linear_ce_grad_op(features, labels, weight, bias, block_rows)


def plain_linear_ce_grad(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """The same gradient as the plain torch expression over the whole N x C matrix (autograd backward).

    One-hot is subtracted by a scatter of -1 (no N x C one-hot matrix is built: at N=4096, C=1000 that
    int64 matrix and its cast cost more than the GEMMs), in place when no graph is being recorded; the
    column sum is a GEMV against ones, as in the blocked op."""
    check_inputs(features, labels, weight, bias, 0)
    dtype = compute_dtype(features, weight, bias)
    z = features.to(dtype)
    probs = torch.softmax(torch.addmm(bias.to(dtype), z, weight.to(dtype).t()), dim=1)
    records_graph = torch.is_grad_enabled() and any(t.requires_grad for t in (features, weight, bias))
    index = labels.long().unsqueeze(1)
    minus_one = torch.full_like(index, -1, dtype=dtype)
    residual = probs.scatter_add(1, index, minus_one) if records_graph else probs.scatter_add_(1, index, minus_one)
    n = features.shape[0]
    ones = torch.ones(n, dtype=dtype, device=z.device)
    return (residual.t() @ z).div_(n), torch.mv(residual.t(), ones).div_(n)
