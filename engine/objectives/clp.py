"""Closed-form linear-probe distillation (CLP-DD, arXiv 2605.07194): the inner probe is solved exactly.

Inner problem: ridge regression of one-hot targets Y_s on the synthetic features Z_s,

    W* = argmin_W ||Z_s W - Y_s||^2 + lambda ||W||^2 = Z_s^T (Z_s Z_s^T + lambda I)^-1 Y_s      (sample space)
                                                    = (Z_s^T Z_s + lambda I)^-1 Z_s^T Y_s      (feature space)

Both forms are the same matrix (push-through identity); we solve whichever system is smaller, so
M = n_syn * augs synthetic features never cost more than a (D+1) x (D+1) solve, and vice versa.
Outer loss: cross-entropy of softmax(Z_r W* / tau) against the real labels, on real features that are
constants (from the store), so the gradient reaches the synthetic images only through W*.

Choices, documented because the paper gives no code and no lambda / tau:
- Bias: an appended constant feature column with value c = sqrt(trace(Z_s Z_s^T) / M), the RMS norm of
  the synthetic features. The bias is then ridge-penalized like any weight, on the same
  scale as the features; with c = 1 it would be almost free on backbones with large feature norms and
  heavily penalized on small ones.
- Scale-free ridge: lambda = ridge * trace(K) / M, the kernel's mean diagonal (K = the augmented
  kernel Z_s Z_s^T + c^2). Multiplying every feature by s multiplies K and lambda by s^2 and leaves
  Z_r W* unchanged, so one default `ridge` works across backbones whose feature norms differ by 100x.
  Because lambda follows the synthetic kernel, shrinking only the synthetic features scales the logits
  up (W* ~ 1/s): the optimizer can trade feature norm for a lower temperature. In image space the
  backbone bounds that; feature-space experiments should fix the norms (see the sweep below).
- Temperature tau divides logits that are ridge-regression outputs of one-hot targets (values ~[0, 1]),
  so tau < 1 is needed for a non-flat softmax. Defaults chosen by a sweep (see DEFAULT_RIDGE below).
- Numerics: the system matrix A = K + lambda I (or Z^T Z + lambda I) is symmetric positive definite with
  smallest eigenvalue >= lambda, so Cholesky (cholesky_ex + cholesky_solve) is used; if fp32 round-off
  still makes the factorization fail (huge feature scale, near-zero ridge), a diagonal jitter growing
  10x per retry (from 1e-6 of the mean diagonal) is added; as a last resort torch.linalg.solve (LU).
  The solve runs in float32 unless the inputs are float64 (tests compare with a float64 reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.objectives.base import ObjectiveError, ObjectiveSpec
from featurestore.options import option

# Chosen by measurement. Sweep: Fashion-MNIST store, efficientnet-lite0 at 112 px, 200 train / 200 val
# images per class; ipc=1 synthetic FEATURES (initialised from random real ones) optimized directly with
# this loss against the whole stored train split (Adam, 200 steps), then scored with the evaluation probe
# (engine.evaluate: Adam lr 1e-3*bs/256, cosine, 1000 epochs) on the val features. Reference points:
# random real 49.3-49.9, centroid 58.9, full-data probe 83.3 (top-1 %). With each synthetic feature's
# norm held at its initial value (backbone outputs cannot shrink freely; otherwise shrinking them acts
# as a lower temperature), top-1 for ridge x temperature (1 init; "x2" = mean of 2 inits):
#   ridge 0.03: tau 0.29 68.3, 0.15 69.7 x2, 0.097 65.4, 0.029 53.6
#   ridge 0.1:  tau 0.91 69.9, 0.27 69.9 x2, 0.15 70.7 x2, 0.091 72.4, 0.027 59.5
#   ridge 0.3:  tau 0.77 71.9, 0.3 72.3 x2, 0.15 72.9 x2, 0.10 72.6 x2, 0.05 70.7 x2, 0.023 61.7
#   ridge 1:    tau 0.5 69.2, 0.15 70.0 x2, 0.08 70.9 x2, 0.05 71.2, 0.015 63.9
#   ridge 10:   tau 0.027 69.4, 0.009 69.7, 0.0027 59.8
# (free-norm features: ridge 0.3 / tau 0.15 -> 78.9; the best free-norm cell 79.0 at ridge 0.1 / tau 0.27.)
# A plateau at ridge 0.1-1 with tau ~0.1-0.3; too sharp a temperature over-fits the closed-form probe
# (the outer CE falls to ~0.3 while the trained probe's accuracy drops) and is the main thing to avoid.
DEFAULT_RIDGE = 0.3
DEFAULT_TEMPERATURE = 0.15



@dataclass(frozen=True)
class CLPConfig:
    """Options of `--method clp`."""

    ridge: float = option(DEFAULT_RIDGE, "clp: ridge, relative to the synthetic kernel's mean diagonal.")
    temperature: float = option(DEFAULT_TEMPERATURE, "clp: softmax temperature of the closed-form probe.")

    def validate(self) -> None:
        if not (math.isfinite(self.ridge) and 0 < self.ridge <= MAX_RIDGE):
            raise ObjectiveError(f"--ridge must be in (0, {MAX_RIDGE:g}] (it is relative to the kernel's mean "
                                 f"diagonal), got {self.ridge}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ObjectiveError(f"--temperature must be > 0, got {self.temperature}")


# The ridge is relative to the kernel's mean diagonal: far above this the closed-form head is ~0, its
# gradients underflow and the loss turns NaN — a value no --lr can fix, so it is refused up front.
MAX_RIDGE = 1e6
_JITTER_START = 1e-6
_JITTER_RETRIES = 6


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive-definite A; Cholesky with jitter fallback, then LU."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    scale = a.diagonal().mean().detach().clamp_min(torch.finfo(a.dtype).tiny)
    jitter = 0.0
    for attempt in range(_JITTER_RETRIES + 1):
        a_try = a if attempt == 0 else a + (jitter * scale) * eye
        chol, info = torch.linalg.cholesky_ex(a_try)
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
        jitter = _JITTER_START if attempt == 0 else jitter * 10
    return torch.linalg.solve(a + (jitter * scale) * eye, b)


class CLPObjective:
    """CLP-DD outer loss: CE of the closed-form ridge probe of the synthetic features, on real features."""

    name = "clp"

    def __init__(self, num_classes: int, ridge: float = DEFAULT_RIDGE, temperature: float = DEFAULT_TEMPERATURE,
                 bias: bool = True) -> None:
        CLPConfig(ridge=ridge, temperature=temperature).validate()
        if num_classes < 2:
            raise ObjectiveError(f"CLP needs at least 2 classes, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ridge = float(ridge)
        self.temperature = float(temperature)
        self.bias = bool(bias)

    def config(self) -> dict:
        return {"name": self.name, "ridge": self.ridge, "ridge_scaling": "relative to trace(K)/M",
                "temperature": self.temperature, "bias": self.bias,
                "bias_feature": "constant column = RMS norm of the synthetic features" if self.bias else None}

    def _bias_value(self, syn: torch.Tensor) -> torch.Tensor:
        # Not detached: c and lambda are part of the loss's definition, so its gradient is the exact one.
        return syn.pow(2).sum(dim=1).mean().sqrt().clamp_min(torch.finfo(syn.dtype).tiny)

    def _augment(self, syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Synthetic features with the constant bias column appended (and its value c), or as given."""
        if not self.bias:
            return syn, None
        c = self._bias_value(syn)
        return torch.cat([syn, c.expand(syn.shape[0], 1)], dim=1), c

    def solve(self, syn_features: torch.Tensor, syn_labels: torch.Tensor) -> torch.Tensor:
        """The closed-form probe W* [D(+1), C] (last row is the bias weight when bias=True)."""
        z, _ = self._augment(syn_features)
        return self._solve_augmented(z, syn_labels)

    def _solve_augmented(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        m, d = z.shape
        y = F.one_hot(labels, self.num_classes).to(z.dtype)
        # trace(Z Z^T) = trace(Z^T Z) = ||Z||_F^2: the same lambda for both forms.
        lam = self.ridge * z.pow(2).sum() / m
        if m <= d:
            kernel = z @ z.T
            alpha = _spd_solve(kernel + lam * torch.eye(m, dtype=z.dtype, device=z.device), y)
            return z.T @ alpha
        gram = z.T @ z
        return _spd_solve(gram + lam * torch.eye(d, dtype=z.dtype, device=z.device), z.T @ y)

    def logits(self, syn_features: torch.Tensor, syn_labels: torch.Tensor, real_features: torch.Tensor) -> torch.Tensor:
        """Z_r W* / tau for the real features [B, C]."""
        real_features = real_features.to(device=syn_features.device, dtype=syn_features.dtype)
        z_s, c = self._augment(syn_features)
        w = self._solve_augmented(z_s, syn_labels.to(syn_features.device))
        # [Z_r, c] W* without materializing the augmented real matrix (B x D can be the whole split):
        # the backward pass then never forms a B x D gradient for the constant real features.
        logits = real_features @ w[:real_features.shape[1]]
        if c is not None:
            logits = logits + c * w[-1]
        return logits / self.temperature

    def loss(self, syn_features: torch.Tensor, syn_labels: torch.Tensor, real_features: torch.Tensor,
             real_labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean CE of the closed-form probe on the real features. Deterministic: `generator` is unused."""
        # The solve needs fp32 at least: leave any autocast region, upcast bf16/fp16 features.
        with torch.autocast(device_type=syn_features.device.type, enabled=False):
            if syn_features.dtype not in (torch.float32, torch.float64):
                syn_features = syn_features.float()
            logits = self.logits(syn_features, syn_labels, real_features)
            return F.cross_entropy(logits, real_labels.to(logits.device))


SPEC = ObjectiveSpec(name="clp", description="closed-form linear-probe distillation, CLP-DD", config=CLPConfig,
                     build=lambda num_classes, cfg: CLPObjective(num_classes, ridge=cfg.ridge,
                                                                 temperature=cfg.temperature))
