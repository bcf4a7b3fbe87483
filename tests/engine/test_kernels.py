"""engine.kernels: the fused linear cross-entropy gradient (torch op, blocked CPU path, Triton kernels).

References are computed independently: torch autograd of F.cross_entropy for the forward, autograd of
the naive full-matrix expression for the backward, both in float64. The Triton kernels run on CPU
tensors in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engine.kernels import blocked, linear_ce_grad

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_inputs(n: int, c: int, d: int, *, dtype=torch.float32, scale: float = 1.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, c, (n,), generator=gen)
    weight = torch.randn(c, d, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return features, labels, weight, bias


def autograd_reference(features, labels, weight, bias):
    """(dCE/dW, dCE/db) by torch autograd of mean cross-entropy, float64."""
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True)
    loss = F.cross_entropy(features.detach().double() @ w.t() + b, labels)
    return torch.autograd.grad(loss, (w, b))


def naive_expression(features, labels, weight, bias):
    """The textbook full-matrix formula (materializes N x C), differentiable by autograd."""
    probs = torch.softmax(features @ weight.t() + bias, dim=1)
    a = probs - F.one_hot(labels, weight.shape[0]).to(probs.dtype)
    return a.t() @ features / features.shape[0], a.mean(dim=0)


def assert_relclose(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """max |actual - expected| <= rel * max |expected| (plus a floor for all-zero references)."""
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected.double()).abs().max().item()
    bound = rel * max(expected.abs().max().item(), 1e-6)
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


# ------------------------------------------------------------------------------------------ op, CPU

def test_op_is_registered_and_passes_opcheck():
    assert hasattr(torch.ops.probe_distill, "linear_ce_grad")
    assert hasattr(torch.ops.probe_distill, "linear_ce_grad_backward")
    features, labels, weight, bias = make_inputs(9, 4, 6, dtype=torch.float64)
    features.requires_grad_(True)
    torch.library.opcheck(torch.ops.probe_distill.linear_ce_grad.default, (features, labels, weight, bias, 4))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("n,c,d,block_rows", [(37, 13, 29, 0), (37, 13, 29, 5), (37, 13, 29, 1), (200, 7, 3, 64),
                                               (1, 1, 4, 0), (3, 50, 2, 2)])
def test_matches_autograd_of_cross_entropy(dtype, rel, n, c, d, block_rows):
    features, labels, weight, bias = make_inputs(n, c, d, dtype=dtype, seed=n + c + d)
    grad_weight, grad_bias = linear_ce_grad(features, labels, weight, bias, block_rows=block_rows)
    ref_weight, ref_bias = autograd_reference(features, labels, weight, bias)
    assert grad_weight.dtype == grad_bias.dtype == dtype
    assert_relclose(grad_weight, ref_weight, rel)
    assert_relclose(grad_bias, ref_bias, rel)
    if c == 1:  # softmax over one class is 1 = onehot: the gradient is exactly zero
        assert grad_weight.abs().max() == 0 and grad_bias.abs().max() == 0


@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_large_logits_are_stable(scale):
    features, labels, weight, bias = make_inputs(37, 13, 29, scale=scale, seed=3)
    grad_weight, grad_bias = linear_ce_grad(features, labels, weight, bias, block_rows=8)
    ref_weight, ref_bias = autograd_reference(features, labels, weight, bias)
    assert_relclose(grad_weight, ref_weight, 1e-5)
    assert_relclose(grad_bias, ref_bias, 1e-5)
    # Each row of P - Y sums to zero, so the bias gradient does too.
    assert abs(grad_bias.sum().item()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    features, labels, weight, bias = make_inputs(37, 13, 29, dtype=dtype, seed=5)
    grad_weight, grad_bias = linear_ce_grad(features, labels, weight, bias, block_rows=7)
    assert grad_weight.dtype == grad_bias.dtype == torch.float32
    # Reference on the same (already rounded) values: only fp32 accumulation error may remain.
    ref_weight, ref_bias = autograd_reference(features, labels, weight, bias)
    assert_relclose(grad_weight, ref_weight, 2e-6)
    assert_relclose(grad_bias, ref_bias, 2e-6)


def test_mixed_dtypes_and_int32_labels():
    features, labels, weight, bias = make_inputs(20, 6, 5, seed=6)
    grad_weight, grad_bias = linear_ce_grad(features.half(), labels.int(), weight, bias)
    ref_weight, ref_bias = autograd_reference(features.half(), labels, weight, bias)
    assert_relclose(grad_weight, ref_weight, 2e-6)
    assert_relclose(grad_bias, ref_bias, 2e-6)


# ------------------------------------------------------------------------------------------ autograd

@pytest.mark.parametrize("block_rows", [0, 6])
def test_backward_matches_autograd_of_naive_expression(block_rows):
    features, labels, weight, bias = make_inputs(37, 13, 29, dtype=torch.float64, seed=7)
    gen = torch.Generator().manual_seed(1)
    upstream_weight = torch.randn(13, 29, generator=gen, dtype=torch.float64)
    upstream_bias = torch.randn(13, generator=gen, dtype=torch.float64)

    def grads(fn):
        z, w, b = (t.clone().requires_grad_(True) for t in (features, weight, bias))
        gw, gb = fn(z, labels, w, b)
        ((gw * upstream_weight).sum() + (gb * upstream_bias).sum()).backward()
        return z.grad, w.grad, b.grad

    ours = grads(lambda *a: linear_ce_grad(*a, block_rows=block_rows))
    ref = grads(naive_expression)
    for got, want in zip(ours, ref):
        assert_relclose(got, want, 1e-12)


def test_gradient_matching_loss_through_features_float32():
    """The LGM use: 1 - cos([gW, gb]_real, [gW, gb]_syn(features)), differentiated w.r.t. synthetic features."""
    real = make_inputs(64, 10, 16, seed=8)
    syn_features, syn_labels, _, _ = make_inputs(20, 10, 16, seed=9)
    weight = torch.randn(10, 16, generator=torch.Generator().manual_seed(2)) * 0.01
    bias = torch.zeros(10)

    def loss_grad(fn):
        z = syn_features.clone().requires_grad_(True)
        real_gw, real_gb = fn(real[0], real[1], weight, bias)
        syn_gw, syn_gb = fn(z, syn_labels, weight, bias)
        loss = 1 - F.cosine_similarity(torch.cat([real_gw.flatten(), real_gb]),
                                       torch.cat([syn_gw.flatten(), syn_gb]), dim=0)
        (grad,) = torch.autograd.grad(loss, z)
        return loss.detach(), grad

    loss, grad = loss_grad(lambda *a: linear_ce_grad(*a, block_rows=7))
    ref_loss, ref_grad = loss_grad(naive_expression)
    assert abs(loss.item() - ref_loss.item()) < 1e-6
    assert_relclose(grad, ref_grad, 1e-4)


def test_only_requested_gradients_are_returned():
    features, labels, weight, bias = make_inputs(11, 4, 3, dtype=torch.float64)
    features.requires_grad_(True)
    weight.requires_grad_(False)
    gw, gb = linear_ce_grad(features, labels, weight, bias)
    gw.sum().backward()
    assert features.grad is not None and features.grad.shape == features.shape
    assert weight.grad is None and bias.grad is None


def test_gradcheck_float64():
    features, labels, weight, bias = make_inputs(7, 5, 4, dtype=torch.float64, seed=10)
    inputs = tuple(t.requires_grad_(True) for t in (features, weight, bias))
    assert torch.autograd.gradcheck(lambda z, w, b: linear_ce_grad(z, labels, w, b, block_rows=3), inputs)


# ------------------------------------------------------------------------------------------ memory

class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_never_materializes_all_probabilities():
    n, c, d, rows = 1000, 50, 8, 64
    features, labels, weight, bias = make_inputs(n, c, d)
    upstream_weight, upstream_bias = torch.randn(c, d), torch.randn(c)
    with _RecordShapes() as recorder:
        blocked.forward_blocked(features, labels, weight, bias, block_rows=rows, dtype=torch.float32)
        blocked.backward_blocked(features, labels, weight, bias, upstream_weight, upstream_bias, block_rows=rows,
                                 dtype=torch.float32, features_grad=True, params_grad=True)
    assert recorder.shapes, "dispatch mode recorded nothing"
    largest_per_class_block = max(s[0] for s in recorder.shapes if len(s) == 2 and s[1] == c)
    assert largest_per_class_block <= rows  # only [block, C] blocks, never [N, C]


def test_automatic_blocks_are_even_and_bounded():
    n, c, d = 9000, 1000, 4                         # CPU budget 2**22 elements -> 4194 rows at most
    rows = blocked.resolve_block_rows(0, n, c, d, torch.device("cpu"))
    assert rows == 3000                              # 3 even blocks, no ragged tail
    assert blocked.resolve_block_rows(0, 100, c, d, torch.device("cpu")) == 100
    features, labels, weight, bias = make_inputs(n, c, d)
    with _RecordShapes() as recorder:
        grad_weight, _ = blocked.forward_blocked(features, labels, weight, bias, block_rows=0, dtype=torch.float32)
    assert max(s[0] for s in recorder.shapes if len(s) == 2 and s[1] == c) == rows
    assert_relclose(grad_weight, autograd_reference(features, labels, weight, bias)[0], 2e-5)  # fp32 sum of 9000 rows


# ------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("mutate,message", [
    (lambda z, y, w, b: (z, y + 13, w, b), "label .* out of range for 13 classes"),
    (lambda z, y, w, b: (z, y - 100, w, b), "label -.* out of range"),
    (lambda z, y, w, b: (z, y[:-1], w, b), "labels has 36 entries but features has 37 rows"),
    (lambda z, y, w, b: (z[:, :-1], y, w, b), "weight is \\[13, 29\\] but features have dimension 28"),
    (lambda z, y, w, b: (z, y, w, b[:-1]), "bias has 12 entries but weight has 13 classes"),
    (lambda z, y, w, b: (z[None], y, w, b), "features must be 2-D"),
    (lambda z, y, w, b: (z, y.float(), w, b), "labels must be an integer tensor"),
    (lambda z, y, w, b: (z.long(), y, w, b), "features must be float16, bfloat16, float32 or float64"),
    (lambda z, y, w, b: (z[:0], y[:0], w, b), "features has no rows"),
])
def test_bad_inputs_raise_value_error(mutate, message):
    args = mutate(*make_inputs(37, 13, 29))
    with pytest.raises(ValueError, match=message):
        linear_ce_grad(*args)


def test_fake_tensor_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        features, labels, weight, bias = make_inputs(37, 13, 29, dtype=torch.bfloat16)
        grad_weight, grad_bias = linear_ce_grad(features, labels, weight, bias)
        assert grad_weight.shape == (13, 29) and grad_bias.shape == (13,) and grad_weight.dtype == torch.float32
        with pytest.raises(ValueError, match="bias has 12 entries"):
            linear_ce_grad(features, labels, weight, bias[:-1])


# ------------------------------------------------------------------------------------------ Triton (interpreter)

_INTERPRETER_SCRIPT = """
import sys, torch
from engine.kernels.triton_linear_ce import linear_ce_grad_backward_triton, linear_ce_grad_triton
cases = torch.load(sys.argv[1])
results = []
for case in cases:
    args = (case["features"], case["labels"], case["weight"], case["bias"])
    grad_weight, grad_bias = linear_ce_grad_triton(*args, case["block_rows"])
    grad_features, grad_weight_weight, grad_weight_bias = linear_ce_grad_backward_triton(
        *args, case["upstream_weight"], case["upstream_bias"], case["block_rows"])
    results.append(dict(grad_weight=grad_weight, grad_bias=grad_bias, grad_features=grad_features,
                        dweight=grad_weight_weight, dbias=grad_weight_bias))
torch.save(results, sys.argv[2])
"""

# (name, N, C, D, feature scale, input dtype, block_rows, relative tolerance). BLOCK_C caps at 2048, so
# C = 2100 spans two column tiles with a ragged last one; C = 13 is a single ragged 16-wide tile.
_INTERPRETER_CASES = [
    ("odd", 37, 13, 29, 1.0, torch.float32, 16, 2e-6),
    ("odd-one-block", 37, 13, 29, 1.0, torch.float32, 0, 2e-6),
    ("large-logits", 37, 13, 29, 100.0, torch.float32, 10, 5e-4),
    ("many-classes", 5, 2100, 3, 1.0, torch.float32, 0, 5e-6),
    ("one-class", 9, 1, 4, 1.0, torch.float32, 0, 0.0),
    ("bf16", 37, 13, 29, 1.0, torch.bfloat16, 8, 2e-6),
]


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    cases = []
    for i, (_, n, c, d, scale, dtype, rows, _) in enumerate(_INTERPRETER_CASES):
        features, labels, weight, bias = make_inputs(n, c, d, dtype=dtype, scale=scale, seed=100 + i)
        gen = torch.Generator().manual_seed(200 + i)
        cases.append(dict(features=features, labels=labels, weight=weight, bias=bias, block_rows=rows,
                          upstream_weight=torch.randn(c, d, generator=gen), upstream_bias=torch.randn(c, generator=gen)))
    torch.save(cases, work / "cases.pt")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, str(work / "cases.pt"), str(work / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cases, torch.load(work / "out.pt")


@pytest.mark.parametrize("index", range(len(_INTERPRETER_CASES)), ids=[c[0] for c in _INTERPRETER_CASES])
def test_triton_kernels_under_interpreter(interpreter_results, index):
    cases, results = interpreter_results
    case, result, rel = cases[index], results[index], _INTERPRETER_CASES[index][-1]
    args = (case["features"], case["labels"], case["weight"], case["bias"])
    ref_weight, ref_bias = autograd_reference(*args)
    z, w, b = (t.detach().double().requires_grad_(True) for t in (args[0], args[2], args[3]))
    gw, gb = naive_expression(z, case["labels"], w, b)
    ((gw * case["upstream_weight"].double()).sum() + (gb * case["upstream_bias"].double()).sum()).backward()

    assert result["grad_weight"].dtype == torch.float32
    if rel == 0.0:  # one class: the gradient and its derivatives are exactly zero
        for key in ("grad_weight", "grad_bias", "grad_features", "dweight", "dbias"):
            assert result[key].abs().max() == 0, key
        return
    assert_relclose(result["grad_weight"], ref_weight, rel)
    assert_relclose(result["grad_bias"], ref_bias, rel)
    assert_relclose(result["grad_features"], z.grad, 10 * rel)
    assert_relclose(result["dweight"], w.grad, 10 * rel)
    assert_relclose(result["dbias"], b.grad, 10 * rel)
