"""Input checks shared by every implementation of the linear cross-entropy gradient.

Shape and dtype checks run everywhere, the fake (meta) implementation included, so that a bad call
fails at trace time under torch.compile too. The label-range check reads label values, so it runs
only in the real implementations (it costs one device synchronisation on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(features: Tensor, weight: Tensor, bias: Tensor) -> torch.dtype:
    """Dtype all accumulation happens in: float64 if any input is float64, else float32.

    Half-precision inputs are upcast: softmax of bf16 logits keeps about 3 significant digits, which
    is not enough for a gradient that is later compared by cosine similarity.
    """
    if torch.float64 in (features.dtype, weight.dtype, bias.dtype):
        return torch.float64
    return torch.float32


def check_shapes(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, block_rows: int) -> None:
    """Raise ValueError naming the offending argument if shapes, dtypes or devices do not fit."""
    if features.dim() != 2:
        raise ValueError(f"linear_ce_grad: features must be 2-D [N, D], got shape {tuple(features.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"linear_ce_grad: weight must be 2-D [C, D], got shape {tuple(weight.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"linear_ce_grad: labels must be 1-D [N], got shape {tuple(labels.shape)}")
    if bias.dim() != 1:
        raise ValueError(f"linear_ce_grad: bias must be 1-D [C], got shape {tuple(bias.shape)}")
    n, d = features.shape
    c, d_weight = weight.shape
    if n == 0:
        raise ValueError("linear_ce_grad: features has no rows; the mean gradient of an empty batch is undefined")
    if c == 0:
        raise ValueError("linear_ce_grad: weight has no classes (shape [0, D])")
    if labels.shape[0] != n:
        raise ValueError(f"linear_ce_grad: labels has {labels.shape[0]} entries but features has {n} rows; "
                         "pass one label per feature row")
    if d_weight != d:
        raise ValueError(f"linear_ce_grad: weight is [{c}, {d_weight}] but features have dimension {d}; "
                         "weight must be [C, D]")
    if bias.shape[0] != c:
        raise ValueError(f"linear_ce_grad: bias has {bias.shape[0]} entries but weight has {c} classes")
    for name, tensor in (("features", features), ("weight", weight), ("bias", bias)):
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"linear_ce_grad: {name} must be float16, bfloat16, float32 or float64, "
                             f"got {tensor.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"linear_ce_grad: labels must be an integer tensor (int64), got {labels.dtype}")
    devices = {t.device for t in (features, labels, weight, bias)}
    if len(devices) != 1:
        raise ValueError("linear_ce_grad: features, labels, weight and bias must be on one device, got "
                         + ", ".join(sorted(str(dev) for dev in devices)))
    if block_rows < 0:
        raise ValueError(f"linear_ce_grad: block_rows must be >= 0 (0 = automatic), got {block_rows}")


def check_inputs(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, block_rows: int) -> None:
    """check_shapes, plus every label in [0, C)."""
    check_shapes(features, labels, weight, bias, block_rows)
    num_classes = weight.shape[0]
    low, high = torch.aminmax(labels)
    low, high = int(low), int(high)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"linear_ce_grad: label {bad} is out of range for {num_classes} classes; "
                         f"labels must lie in [0, {num_classes - 1}]")
