"""Triton kernels for the row-wise part of the linear cross-entropy gradient.

Imported only on demand (CUDA dispatch, or tests): CPU-only installs need no Triton. To run these
kernels on CPU tensors, set TRITON_INTERPRET=1 in the environment BEFORE this module (or triton) is
imported: `triton.jit` picks the interpreter at decoration time.

Each program owns a tile of BLOCK_N rows and streams the C logits of those rows in BLOCK_C column
tiles, so any C works (C need not be a multiple of the tile, nor fit in one). The softmax uses an
online max/sum (one pass for the row maximum and normaliser together, as in flash-attention), so
logits of any magnitude give finite results. All arithmetic is fp32: the block buffers the host
functions hand over are fp32 (inputs of any floating dtype are upcast by `blocked`). No tl.dot is
used; the GEMMs around these kernels are cuBLAS calls made by `blocked`, which honour torch's
global fp32 matmul precision (IEEE fp32 by default; TF32 only if the user enabled it through
torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import blocked
from .validation import check_inputs

# Elements of one [BLOCK_N, BLOCK_C] tile held per program.
_TILE_ELEMENTS = 4096
_MAX_BLOCK_C = 2048


@triton.jit
def _row_max_and_sum(row_ptrs, row_valid, num_classes, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online softmax statistics of BLOCK_N rows: per-row max m and sum_c exp(x_c - m)."""
    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, num_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_valid[:, None] & (cols[None, :] < num_classes)
        x = tl.load(row_ptrs[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        # Rows past N are fully masked: keep their max finite so no inf - inf = NaN is formed.
        new_max = tl.where(row_valid, new_max, 0.0)
        running_sum = running_sum * tl.exp(running_max - new_max) \
            + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        running_max = new_max
    return running_max, running_sum


@triton.jit
def _softmax_minus_onehot_kernel(logits_ptr, labels_ptr, num_rows, num_classes, row_stride,
                                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """logits[r, :] <- softmax(logits[r, :]) - onehot(labels[r]), in place."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_rows
    row_ptrs = logits_ptr + rows * row_stride
    labels = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
    row_max, row_sum = _row_max_and_sum(row_ptrs, row_valid, num_classes, BLOCK_N, BLOCK_C)
    inv_sum = 1.0 / tl.where(row_valid, row_sum, 1.0)  # no 1/0 for rows past N
    for start in range(0, num_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_valid[:, None] & (cols[None, :] < num_classes)
        ptrs = row_ptrs[:, None] + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - row_max[:, None]) * inv_sum[:, None]
        a = p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        tl.store(ptrs, a, mask=mask)


@triton.jit
def _softmax_backward_kernel(logits_ptr, upstream_ptr, labels_ptr, num_rows, num_classes, logits_row_stride,
                             upstream_row_stride, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """logits <- P - Y and upstream <- P * (upstream - rowsum(P * upstream)), in place, P = softmax(logits)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < num_rows
    logit_row_ptrs = logits_ptr + rows * logits_row_stride
    upstream_row_ptrs = upstream_ptr + rows * upstream_row_stride
    labels = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
    row_max, row_sum = _row_max_and_sum(logit_row_ptrs, row_valid, num_classes, BLOCK_N, BLOCK_C)
    inv_sum = 1.0 / tl.where(row_valid, row_sum, 1.0)  # no 1/0 for rows past N
    # Pass 2: rowsum(P * M).
    row_dot = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, num_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_valid[:, None] & (cols[None, :] < num_classes)
        x = tl.load(logit_row_ptrs[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.load(upstream_row_ptrs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - row_max[:, None]) * inv_sum[:, None]
        row_dot += tl.sum(p * m, axis=1)
    # Pass 3: write A = P - Y and dLogits.
    for start in range(0, num_classes, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_valid[:, None] & (cols[None, :] < num_classes)
        logit_ptrs = logit_row_ptrs[:, None] + cols[None, :]
        upstream_ptrs = upstream_row_ptrs[:, None] + cols[None, :]
        x = tl.load(logit_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.load(upstream_ptrs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - row_max[:, None]) * inv_sum[:, None]
        tl.store(upstream_ptrs, p * (m - row_dot[:, None]), mask=mask)
        tl.store(logit_ptrs, p - tl.where(cols[None, :] == labels[:, None], 1.0, 0.0), mask=mask)


def _launch_config(num_rows: int, num_classes: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps): ~_TILE_ELEMENTS per program; many rows per program when C is small."""
    block_c = min(triton.next_power_of_2(num_classes), _MAX_BLOCK_C)
    block_n = max(1, min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(num_rows)))
    num_warps = 4 if block_n * block_c <= 2048 else 8
    return block_n, block_c, num_warps


def _check_row_buffers(labels: Tensor, *buffers: Tensor) -> None:
    for buffer in buffers:
        if buffer.dtype != torch.float32 or buffer.dim() != 2 or buffer.stride(1) != 1:
            raise ValueError("triton row kernels need fp32 [rows, C] buffers with unit column stride")
        if buffer.shape != buffers[0].shape:
            raise ValueError("triton row kernels: logits and upstream buffers differ in shape")
    if labels.shape != (buffers[0].shape[0],) or not labels.is_contiguous():
        raise ValueError("triton row kernels need contiguous labels with one entry per row")


def softmax_minus_onehot_rows_(logits: Tensor, labels: Tensor) -> Tensor:
    """Triton version of `blocked.softmax_minus_onehot`, in place on an fp32 buffer; returns it."""
    _check_row_buffers(labels, logits)
    num_rows, num_classes = logits.shape
    block_n, block_c, num_warps = _launch_config(num_rows, num_classes)
    grid = (triton.cdiv(num_rows, block_n),)
    _softmax_minus_onehot_kernel[grid](logits, labels, num_rows, num_classes, logits.stride(0),
                                       BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return logits


def softmax_backward_rows_(logits: Tensor, upstream: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Triton version of `blocked.softmax_backward`, in place on fp32 buffers: returns (logits, upstream)."""
    _check_row_buffers(labels, logits, upstream)
    num_rows, num_classes = logits.shape
    block_n, block_c, num_warps = _launch_config(num_rows, num_classes)
    grid = (triton.cdiv(num_rows, block_n),)
    _softmax_backward_kernel[grid](logits, upstream, labels, num_rows, num_classes, logits.stride(0),
                                   upstream.stride(0), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return logits, upstream


def linear_ce_grad_triton(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                          block_rows: int = 0) -> tuple[Tensor, Tensor]:
    """Forward with the Triton row kernel, fp32 result. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    check_inputs(features, labels, weight, bias, block_rows)
    return blocked.forward_blocked(features, labels.to(torch.int64).contiguous(), weight, bias,
                                   block_rows=block_rows, dtype=torch.float32, rows_fn=softmax_minus_onehot_rows_)


def linear_ce_grad_backward_triton(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                                   grad_grad_weight: Tensor, grad_grad_bias: Tensor, block_rows: int = 0,
                                   features_grad: bool = True, params_grad: bool = True,
                                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward (dZ, dW, db) with the Triton row kernel, fp32 results; None for those not asked for."""
    check_inputs(features, labels, weight, bias, block_rows)
    return blocked.backward_blocked(features, labels.to(torch.int64).contiguous(), weight, bias,
                                    grad_grad_weight, grad_grad_bias, block_rows=block_rows, dtype=torch.float32,
                                    features_grad=features_grad, params_grad=params_grad,
                                    rows_fn=softmax_backward_rows_)
