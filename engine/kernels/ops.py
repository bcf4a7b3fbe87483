"""torch.library registration: `probe_distill::linear_ce_grad` and its backward op.

The default kernel (CPU and any non-CUDA device) is the row-blocked torch implementation. On CUDA
the same blocked pipeline runs with the Triton row kernels; it falls back to the torch row functions
for float64 (the Triton kernels compute in fp32) or when Triton is not installed.
Autograd is registered with the exact backward (another blocked op), first order only.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from . import blocked
from .validation import check_inputs, check_shapes, compute_dtype

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(features: Tensor, weight: Tensor, bias: Tensor) -> bool:
    return _HAS_TRITON and compute_dtype(features, weight, bias) == torch.float32


@torch.library.custom_op("probe_distill::linear_ce_grad", mutates_args=())
def linear_ce_grad_op(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                      block_rows: int = 0) -> tuple[Tensor, Tensor]:
    """Mean CE gradient of a linear head, row-blocked torch (default kernel for every device but CUDA)."""
    check_inputs(features, labels, weight, bias, block_rows)
    return blocked.forward_blocked(features, labels, weight, bias, block_rows=block_rows,
                                   dtype=compute_dtype(features, weight, bias))


@linear_ce_grad_op.register_kernel("cuda")
def _linear_ce_grad_cuda(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                         block_rows: int = 0) -> tuple[Tensor, Tensor]:
    if not _use_triton(features, weight, bias):
        check_inputs(features, labels, weight, bias, block_rows)
        return blocked.forward_blocked(features, labels, weight, bias, block_rows=block_rows,
                                       dtype=compute_dtype(features, weight, bias))
    from .triton_linear_ce import linear_ce_grad_triton

    return linear_ce_grad_triton(features, labels, weight, bias, block_rows)


@linear_ce_grad_op.register_fake
def _linear_ce_grad_fake(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                         block_rows: int = 0) -> tuple[Tensor, Tensor]:
    check_shapes(features, labels, weight, bias, block_rows)
    dtype = compute_dtype(features, weight, bias)
    return weight.new_empty(weight.shape, dtype=dtype), bias.new_empty(bias.shape, dtype=dtype)


@torch.library.custom_op("probe_distill::linear_ce_grad_backward", mutates_args=())
def linear_ce_grad_backward_op(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                               grad_grad_weight: Tensor, grad_grad_bias: Tensor, block_rows: int,
                               features_grad: bool, params_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dZ, dW, db) in the inputs' dtypes; an empty tensor for each one not asked for."""
    check_inputs(features, labels, weight, bias, block_rows)
    result = blocked.backward_blocked(features, labels, weight, bias, grad_grad_weight, grad_grad_bias,
                                      block_rows=block_rows, dtype=compute_dtype(features, weight, bias),
                                      features_grad=features_grad, params_grad=params_grad)
    return _backward_outputs(result, features, weight, bias)


@linear_ce_grad_backward_op.register_kernel("cuda")
def _linear_ce_grad_backward_cuda(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                                  grad_grad_weight: Tensor, grad_grad_bias: Tensor, block_rows: int,
                                  features_grad: bool, params_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    if not _use_triton(features, weight, bias):
        check_inputs(features, labels, weight, bias, block_rows)
        result = blocked.backward_blocked(features, labels, weight, bias, grad_grad_weight, grad_grad_bias,
                                          block_rows=block_rows, dtype=compute_dtype(features, weight, bias),
                                          features_grad=features_grad, params_grad=params_grad)
    else:
        from .triton_linear_ce import linear_ce_grad_backward_triton

        result = linear_ce_grad_backward_triton(features, labels, weight, bias, grad_grad_weight, grad_grad_bias,
                                                block_rows, features_grad, params_grad)
    return _backward_outputs(result, features, weight, bias)


@linear_ce_grad_backward_op.register_fake
def _linear_ce_grad_backward_fake(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor,
                                  grad_grad_weight: Tensor, grad_grad_bias: Tensor, block_rows: int,
                                  features_grad: bool, params_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    check_shapes(features, labels, weight, bias, block_rows)
    return (features.new_empty(features.shape if features_grad else (0,)),
            weight.new_empty(weight.shape if params_grad else (0,)),
            bias.new_empty(bias.shape if params_grad else (0,)))


def _backward_outputs(result: tuple[Tensor | None, Tensor | None, Tensor | None], features: Tensor,
                      weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cast each gradient to its input's dtype; custom ops cannot return None, so use empty tensors."""
    outputs = []
    for grad, like in zip(result, (features, weight, bias)):
        outputs.append(like.new_empty((0,)) if grad is None else grad.to(like.dtype))
    return tuple(outputs)


def _setup_context(ctx, inputs, output) -> None:
    features, labels, weight, bias, block_rows = inputs
    ctx.save_for_backward(features, labels, weight, bias)
    ctx.block_rows = block_rows


def _backward(ctx, grad_grad_weight: Tensor | None, grad_grad_bias: Tensor | None):
    features, labels, weight, bias = ctx.saved_tensors
    features_grad = ctx.needs_input_grad[0]
    params_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    if not (features_grad or params_grad):
        return None, None, None, None, None
    dtype = compute_dtype(features, weight, bias)
    if grad_grad_weight is None:
        grad_grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if grad_grad_bias is None:
        grad_grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    grad_features, grad_weight, grad_bias = linear_ce_grad_backward_op(
        features, labels, weight, bias, grad_grad_weight, grad_grad_bias, ctx.block_rows, features_grad, params_grad)
    return (grad_features if features_grad else None, None,
            grad_weight if ctx.needs_input_grad[2] else None,
            grad_bias if ctx.needs_input_grad[3] else None, None)


linear_ce_grad_op.register_autograd(_backward, setup_context=_setup_context)
