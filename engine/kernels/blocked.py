"""Row-blocked forward and backward of the linear cross-entropy gradient.

Only a [rows, C] block of logits is ever alive, never all N x C probabilities. The two GEMMs per
block (logits = Z_r W^T + b, then G += A_r^T Z_r) go to the BLAS (MKL/OpenBLAS on CPU, cuBLAS on
CUDA); the row-wise part between them (softmax minus one-hot, and its backward) is pluggable: the
torch functions below on CPU, the fused Triton kernels of `triton_linear_ce` on CUDA. This is the
structure of Liger-Kernel's fused linear cross-entropy; see `__init__` for why it is preferred here
over a fully fused (cut-cross-entropy style) kernel.

Math, with A = P - Y, P = softmax(Z W^T + b), Y = onehot(y):
    forward     G = A^T Z / N,  g_b = 1^T A / N
    backward    for upstream (dG, dg_b):
                M = (Z dG^T + 1 dg_b^T) / N                 [N, C]  (dLoss/dA)
                dLogits = P * (M - rowsum(P * M))           [N, C]  (softmax backward)
                dZ = A dG / N + dLogits W,  dW = dLogits^T Z,  db = colsum(dLogits)
Every row's contribution depends on that row alone, so each line is computed block by block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# Row functions. Forward: (logits [n, C], labels [n]) -> A = P - Y [n, C]. Backward: (logits, upstream
# M [n, C], labels) -> (A, dLogits). They may overwrite and return their input buffers (Triton does).
RowForward = Callable[[Tensor, Tensor], Tensor]
RowBackward = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]

# Elements of block work memory (the [rows, C] logits/probability blocks, plus the [rows, D] upcast
# of the features when they are not already in the compute dtype): CPU ~16 MB, CUDA ~64 MB. Large
# enough that each block's GEMMs run near the BLAS's full-size speed, small next to the N x C matrix
# of the naive expression once N reaches tens of thousands.
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
_MIN_BLOCK_ROWS = 64


def block_elements(device: torch.device) -> int:
    """Elements of one block's [rows, C] work buffer on `device`: a problem whose whole N x C matrix is no
    larger gains nothing from blocking."""
    return _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cpu"])


def resolve_block_rows(block_rows: int, n: int, c: int, d: int, device: torch.device,
                       upcast_features: bool = False) -> int:
    """Rows per block: `block_rows` if positive, else from the per-device budget, split evenly over N.

    The even split avoids a tiny ragged last block (N = 3 x budget + 1 would otherwise cost a fourth
    round of small, inefficient GEMMs).
    """
    if block_rows > 0:
        return min(block_rows, n)
    budget = block_elements(device)
    per_row = c + (d if upcast_features else 0)
    max_rows = max(_MIN_BLOCK_ROWS, budget // per_row)
    num_blocks = -(-n // max_rows)
    return -(-n // num_blocks)


def _subtract_onehot_(probs: Tensor, labels: Tensor) -> Tensor:
    minus_one = torch.full((probs.shape[0], 1), -1.0, dtype=probs.dtype, device=probs.device)
    return probs.scatter_add_(1, labels.unsqueeze(1), minus_one)


def softmax_minus_onehot(logits: Tensor, labels: Tensor) -> Tensor:
    """softmax(logits, dim=1) - onehot(labels), in a new [n, C] tensor (torch's softmax is max-subtracted)."""
    return _subtract_onehot_(torch.softmax(logits, dim=1), labels)


def softmax_backward(logits: Tensor, upstream: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(P - Y, P * (upstream - rowsum(P * upstream))) with P = softmax(logits).

    aten's _softmax_backward_data is the fused kernel autograd itself uses for softmax (one pass
    instead of four elementwise ops: about 5x faster on CPU at C = 10-1000).
    """
    probs = torch.softmax(logits, dim=1)
    grad_logits = torch._softmax_backward_data(upstream, probs, 1, probs.dtype)
    return _subtract_onehot_(probs, labels), grad_logits


def _prepare(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, block_rows: int,
             dtype: torch.dtype) -> tuple[int, int, int, int, Tensor, Tensor, Tensor]:
    """What forward and backward both start from: (N, D, C, rows per block, weight and bias in `dtype`,
    labels as int64)."""
    n, d = features.shape
    c = weight.shape[0]
    rows = resolve_block_rows(block_rows, n, c, d, features.device, upcast_features=features.dtype != dtype)
    return n, d, c, rows, weight.to(dtype), bias.to(dtype), labels.to(torch.int64)


def forward_blocked(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, *, block_rows: int,
                    dtype: torch.dtype, rows_fn: RowForward = softmax_minus_onehot) -> tuple[Tensor, Tensor]:
    """(A^T Z / N, 1^T A / N) in `dtype`, one block of rows at a time. Inputs are assumed validated."""
    n, d, c, rows, w, b, labels = _prepare(features, labels, weight, bias, block_rows, dtype)
    device = features.device
    grad_weight = torch.zeros(c, d, dtype=dtype, device=device)
    grad_bias = torch.zeros(c, dtype=dtype, device=device)
    logits_buffer = torch.empty(rows, c, dtype=dtype, device=device)
    # Column sums as a GEMV against ones: a BLAS call, ~10x faster than a dim-0 reduction on CPU.
    ones = torch.ones(rows, dtype=dtype, device=device)
    for start in range(0, n, rows):
        z = features[start:start + rows].to(dtype)
        logits = logits_buffer[:z.shape[0]]
        torch.addmm(b, z, w.t(), out=logits)
        a = rows_fn(logits, labels[start:start + rows])
        grad_weight.addmm_(a.t(), z)
        grad_bias.addmv_(a.t(), ones[:z.shape[0]])
    return grad_weight.div_(n), grad_bias.div_(n)


def backward_blocked(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, grad_grad_weight: Tensor,
                     grad_grad_bias: Tensor, *, block_rows: int, dtype: torch.dtype, features_grad: bool,
                     params_grad: bool, rows_fn: RowBackward = softmax_backward,
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dZ, dW, db) for upstream (dG, dg_b), in `dtype`; None for the ones not asked for."""
    n, d, c, rows, w, b, labels = _prepare(features, labels, weight, bias, block_rows, dtype)
    device = features.device
    dg = grad_grad_weight.to(dtype)
    dgb = grad_grad_bias.to(dtype)
    grad_features = torch.empty(n, d, dtype=dtype, device=device) if features_grad else None
    grad_weight = torch.zeros(c, d, dtype=dtype, device=device) if params_grad else None
    grad_bias = torch.zeros(c, dtype=dtype, device=device) if params_grad else None
    if grad_features is None and grad_weight is None:
        return None, None, None
    logits_buffer = torch.empty(rows, c, dtype=dtype, device=device)
    upstream_buffer = torch.empty(rows, c, dtype=dtype, device=device)
    ones = torch.ones(rows, dtype=dtype, device=device)
    for start in range(0, n, rows):
        z = features[start:start + rows].to(dtype)
        k = z.shape[0]
        logits = logits_buffer[:k]
        upstream = upstream_buffer[:k]
        torch.addmm(b, z, w.t(), out=logits)
        torch.addmm(dgb, z, dg.t(), beta=1.0 / n, alpha=1.0 / n, out=upstream)      # M
        a, grad_logits = rows_fn(logits, upstream, labels[start:start + k])
        if grad_features is not None:
            out = grad_features[start:start + k]
            torch.mm(grad_logits, w, out=out)
            out.addmm_(a, dg, alpha=1.0 / n)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), z)
            grad_bias.addmv_(grad_logits.t(), ones[:k])
    return grad_features, grad_weight, grad_bias
