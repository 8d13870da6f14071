"""Shared by the class-kernel tests (tests/ops/test_class_lse_triton*.py): the cases, the
dense float32 oracle, the tolerance check, and the skip markers. Import it after the
test module has set TRITON_INTERPRET (in the interpreter child)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from pml_extras.ops import class_lse
from pml_extras.ops.tolerances import CLASS_KERNEL

try:
    import triton

    from pml_extras.ops import _triton_common as tc
    from pml_extras.ops import class_lse_triton as clt
    from pml_extras.ops._triton_common import fp32_matmul_precision
except ImportError:  # pragma: no cover - triton is a test dependency on Linux
    triton = clt = tc = fp32_matmul_precision = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()

needs_triton = pytest.mark.skipif(clt is None, reason="triton is not installed")
interpreted = pytest.mark.skipif(
    not INTERPRET or clt is None,
    reason="interpreter tests run in a TRITON_INTERPRET=1 child process (test_interpreter_suite)",
)

PARAMS = {  # (p0, p1) per kind; curricular's p1 (t) is a 0-d tensor, as the module passes it
    "circle": (64.0, 0.25),
    "curricular": (16.0, torch.tensor(0.3)),
    "scaled": (30.0, 0.0),
}
KINDS = tuple(PARAMS)
# name -> (B, D, C, block config overrides)
SHAPES = {
    "tiny": (1, 3, 1, dict(block_m=4, block_c=4)),  # B = 1, C = 1 < BLOCK_C
    # 2 row blocks, 3 class splits, 2 D steps of the logits
    "splits": (5, 16, 41, dict(block_m=4, block_c=8, block_d=8)),
    # D = 16 split into 2 groups of 8 (each recomputing the logits)
    "dgroups": (9, 16, 19, dict(block_m=8, block_c=8, d_group=8, d_group_fp32=8, block_d=8)),
    "padded": (17, 3, 7, dict(block_m=4, block_c=4, n_splits=2)),  # D, C padded in tiles
}


def make_case(B, D, C, dtype, kind, block_c, seed=0):
    """Inputs with labels on tile boundaries, target -1 rows and |raw cosine| > 1 entries."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, C, generator=g) * (0.2 + 2 * torch.rand(C, generator=g))
    x = F.normalize(torch.randn(B, D, generator=g), dim=1)
    special = [0, block_c - 1, block_c, C - 1, -1]
    target = torch.randint(0, C, (B,), generator=g)
    for i in range(min(B, len(special))):
        target[i] = special[i] if special[i] < C else C - 1
    if B >= 3:
        target[2::5] = -1
    # Rows not of unit length (the op normalises them): row 0 is 1.1 times a non-target
    # proxy j, so its cosine to j is 1 up to rounding (point 7: no gradient mask may flip
    # there between implementations); row 1 is -(1.1 w_j + 0.3 v), v orthogonal to w_j.
    w_hat = F.normalize(W, dim=0)
    for i, sign, off in ((0, 1.0, 0.0), (min(1, B - 1), -1.0, 0.3)):
        j = (int(target[i]) + 1) % C if C > 1 else 0
        if C == 1 and int(target[i]) == 0:
            continue
        v = torch.randn(D, generator=g)
        v = F.normalize(v - w_hat[:, j] * (v @ w_hat[:, j]), dim=0) if D > 1 else 0 * v
        x[i] = sign * (1.1 * w_hat[:, j] + off * v)
    row_param = torch.rand(B, generator=g) - 0.5
    grad_lse = torch.randn(B, generator=g)
    grad_cos = torch.randn(B, generator=g)
    x, W = x.to(dtype), W.to(dtype)
    return x, W, target, row_param, grad_lse, grad_cos


def _operand(x):
    """The operand policy's dtype without autocast (bf16/fp16 embeddings: theirs)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _clamp_value(c):
    """clamp(c, -1, 1) in value, identity in gradient (the op's straight-through clamp)."""
    return c + (c.clamp(-1.0, 1.0) - c).detach()


def dense_oracle(x, W, target, row_param, kind, p0, p1, grad_lse, grad_cos):
    """float32 dense autograd on the operand values (x and W rounded to the operand dtype,
    both normalised, cosines clamped in value): (lse, cos_y, grad_x, grad_w)."""
    op = _operand(x)
    x = x.detach().to(op).float().requires_grad_()
    W = W.detach().to(op).float().requires_grad_()
    p1 = float(p1)
    x_hat = x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    w_hat = W / W.norm(dim=0).clamp_min(1e-6)
    c = _clamp_value(x_hat @ w_hat)
    if kind == "circle":
        z = p0 * (c.detach() + p1).clamp_min(0.0) * (c - p1)
    elif kind == "curricular":
        z = p0 * torch.where(c.detach() > row_param[:, None], c * (p1 + c), c)
    else:
        z = p0 * c
    masked = torch.arange(W.shape[1], device=W.device)[None, :] == target[:, None]
    empty = masked.all(1)
    z = z.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(torch.where(empty[:, None], torch.zeros_like(z), z), dim=1)
    has = target >= 0
    cos_y = _clamp_value((x_hat * w_hat[:, target.clamp_min(0)].t()).sum(1))
    cos_y = torch.where(has, cos_y, torch.zeros_like(cos_y))
    loss = (torch.where(empty, torch.zeros_like(lse), lse) * grad_lse).sum()
    loss = loss + (cos_y * grad_cos).sum()
    grad_x, grad_w = torch.autograd.grad(loss, (x, W))
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    return lse.detach(), cos_y.detach(), grad_x, grad_w


def rel_err(a, b):
    """max |a - b| / max |b|, with matching infinities allowed."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), (a, b)
    assert not torch.isnan(a).any()
    a, b = a[~inf_a], b[~inf_b]
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


# Tolerances (relative to the largest entry). fp32: IEEE dots in both implementations.
# bf16: both implementations multiply the same bf16 operands with float32 sums, so the
# logits agree to float32; the gradient matmuls round their second operand (G, the
# softmax weights) to bf16 at different points (2^-9 each).
TOL = CLASS_KERNEL


def check_all(
    x,
    W,
    target,
    row_param,
    kind,
    grad_lse,
    grad_cos,
    dtype,
    state_path=True,
    plain=False,
    compare_torch=True,
):
    """Forward and backward through ``clt`` against the PyTorch path and the dense oracle
    (TOL[dtype]). ``compare_torch`` False holds the gradients to the oracle only (see
    ``CLASS_KERNEL`` in pml_extras/ops/tolerances.py: in bf16 the two paths' gradients are
    each up to 1.1e-2 from it at some seeds); lse and cos_y are always held to both."""
    p0, p1 = PARAMS[kind]
    lse, cos_y, state = clt.forward(x, W, target, row_param, kind, p0, p1, need_state=True)
    if plain:  # the forward without u (NEED_U=False) gives the same outputs
        out = clt.forward(x, W, target, row_param, kind, p0, p1)
        assert len(out) == 2 and torch.equal(out[1], cos_y)
        assert rel_err(out[0], lse) <= 1e-6
    assert lse.dtype == cos_y.dtype == torch.float32
    grad_x, grad_w = clt.backward(
        x,
        W,
        target,
        row_param,
        kind,
        p0,
        p1,
        lse,
        grad_lse,
        grad_cos,
        state=state if state_path else None,
    )
    assert grad_x.dtype == x.dtype and grad_w.dtype == W.dtype
    assert grad_x.shape == x.shape and grad_w.shape == W.shape

    chunk = 3
    r_lse, r_cos = class_lse._forward_torch(x, W, target, row_param, kind, p0, p1, chunk)
    r_gx, r_gw = class_lse._backward_torch(
        x, W, target, row_param, kind, p0, p1, chunk, r_lse, grad_lse, grad_cos
    )
    o_lse, o_cos, o_gx, o_gw = dense_oracle(
        x, W, target, row_param, kind, p0, p1, grad_lse, grad_cos
    )
    tol = TOL[dtype]
    # lse and cos_y: the same operand values and float32 sums on both sides (any dtype).
    for name, ours, torch_ref, oracle in (
        ("lse", lse, r_lse, o_lse),
        ("cos_y", cos_y, r_cos, o_cos),
    ):
        e_torch, e_oracle = rel_err(ours, torch_ref), rel_err(ours, oracle)
        assert e_torch <= tol["lse"], f"{name} vs _forward/_backward_torch: {e_torch:.2e}"
        assert e_oracle <= tol["lse"], f"{name} vs dense oracle: {e_oracle:.2e}"
    for name, ours, torch_ref, oracle in (
        ("grad_x", grad_x, r_gx, o_gx),
        ("grad_w", grad_w, r_gw, o_gw),
    ):
        e_oracle = rel_err(ours, oracle)
        assert e_oracle <= tol["oracle"], f"{name} vs dense oracle: {e_oracle:.2e}"
        if compare_torch:
            e_torch = rel_err(ours, torch_ref)
            assert e_torch <= tol["torch"], f"{name} vs _forward/_backward_torch: {e_torch:.2e}"
