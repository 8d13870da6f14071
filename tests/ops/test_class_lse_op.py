"""The blockwise class logsumexp op against a dense float64 autograd version.

Chunk sizes 1, a non-divisor of C and >= C; targets on chunk boundaries; target = -1 rows;
each transform kind; lse and cos_y values and both gradients.
"""

from __future__ import annotations

import os

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sorted_add import record_only, take_cuda_branch

from pml_extras.ops import class_lse
from pml_extras.ops.class_lse import class_logsumexp, default_chunk_size

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
KINDS = ["circle", "curricular", "scaled"]
PARAMS = {"circle": (256.0, 0.25), "curricular": (64.0, 0.3), "scaled": (30.0, 0.0)}


def make_inputs(B, D, C, seed, dtype=F64, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=1).to(dtype)
    W = torch.randn(D, C, generator=g, dtype=F64).to(w_dtype or dtype)
    row_param = torch.rand(B, generator=g, dtype=F64) - 0.5  # curricular thresholds
    return x, W, row_param


def run(fn, x, W, seed=0):
    """Values (lse, cos_y) and gradients of sum(a*lse_finite) + sum(b*cos_y) wrt (x, W)."""
    x = x.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(True)
    lse, cos_y = fn(x, W)
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(lse.shape, generator=g, dtype=F64).to(lse.dtype) + 0.5
    b = torch.randn(cos_y.shape, generator=g, dtype=F64).to(cos_y.dtype)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    gx, gW = torch.autograd.grad((a * finite_lse).sum() + (b * cos_y).sum(), (x, W))
    return lse.detach(), cos_y.detach(), gx, gW


def assert_close(a, b, rtol, atol, what=""):
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def compare(x, W, target, kind, chunk, row_param, p1=None, rtol=1e-10, grtol=1e-8, ref_op=None):
    """The op against the dense float64 reference on x and on W rounded to ``ref_op`` (the
    operand dtype; the op normalises the rounded vectors, so the reference does too)."""
    p0, default_p1 = PARAMS[kind]
    p1 = default_p1 if p1 is None else p1
    rp = row_param if kind == "curricular" else None

    def op(x_, W_):
        return class_logsumexp(
            x_, W_, target, kind, p0, p1, row_param=rp, chunk_size=chunk, impl="torch"
        )

    def dense(x_, W_):
        # The op normalises x itself (the reference's x is taken as given).
        x_hat = x_ / x_.norm(dim=1, keepdim=True).clamp_min(1e-6)
        return ref.dense_class_logsumexp(x_hat, W_, target, kind, p0, float(p1), row_param=rp)

    lse, cos_y, gx, gW = run(op, x, W)
    W_ref = W if ref_op is None else W.to(ref_op)
    lse_r, cos_r, gx_r, gW_r = run(dense, x.to(F64), W_ref.to(F64))
    acc = F64 if F64 in (x.dtype, W.dtype) else torch.float32
    assert lse.dtype == acc and cos_y.dtype == acc
    assert gx.dtype == x.dtype and gW.dtype == W.dtype
    # -inf exactly where every column was masked (C = 1 with a target), finite elsewhere.
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_r))
    fin = torch.isfinite(lse_r)
    scale = max(1.0, float(lse_r[fin].abs().max())) if fin.any() else 1.0
    assert_close(lse[fin], lse_r[fin], rtol, rtol * scale, "lse")
    assert_close(cos_y, cos_r, rtol, rtol, "cos_y")
    assert (cos_y[target < 0] == 0).all()
    gscale = max(1.0, float(gx_r.abs().max()), float(gW_r.abs().max()))
    assert_close(gx, gx_r, grtol, grtol * gscale, "d/dx")
    assert_close(gW, gW_r, grtol, grtol * gscale, "d/dW")


# C = 10: chunk 3 gives blocks [0-2] [3-5] [6-8] [9]; targets sit on both sides of every
# boundary, in the last one-column block, and some rows have no target at all.
BOUNDARY_TARGETS = torch.tensor([0, 2, 3, 5, 6, 8, 9, -1, 4, -1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64], ids=lambda c: f"chunk{c}")
def test_blockwise_equals_dense(kind, chunk):
    x, W, row_param = make_inputs(len(BOUNDARY_TARGETS), 6, 10, seed=chunk)
    compare(x, W, BOUNDARY_TARGETS, kind, chunk, row_param)


@pytest.mark.parametrize("kind", KINDS)
def test_target_column_grad_uses_the_sorted_add_on_cuda(monkeypatch, kind):
    """With the tensors counted as CUDA, the torch path adds the target column's gradient
    into d/dW through add_columns_deterministic_ (repeated labels: a fixed order there)
    and still equals the dense float64 reference; on CPU it never calls it."""
    target = torch.tensor([3, 3, 0, 3, -1, 7, 0, 3, 9, 7])  # repeats and a row without
    x, W, row_param = make_inputs(len(target), 6, 10, seed=12)
    cpu_calls = record_only(monkeypatch, "add_columns_deterministic_")
    compare(x, W, target, kind, 4, row_param)
    assert cpu_calls == []
    calls = take_cuda_branch(monkeypatch, "add_columns_deterministic_")
    compare(x, W, target, kind, 4, row_param)
    assert len(calls) == 1
    (call,) = calls
    assert call.out_shape == (6, 10) and call.src_shape == (6, len(target))
    assert torch.equal(call.index, target.clamp_min(0))  # no-target rows add zeros to 0


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_p1_equals_float_p1(kind):
    """CurricularFace passes t as a 0-d tensor; the result must not depend on that."""
    x, W, row_param = make_inputs(10, 6, 10, seed=3)
    compare(x, W, BOUNDARY_TARGETS, kind, 3, row_param, p1=torch.tensor(0.3, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [1, 2, None])
def test_single_class(kind, chunk):
    """C = 1: rows with the target have no negatives (lse = -inf, zero gradient)."""
    x, W, row_param = make_inputs(4, 3, 1, seed=4)
    compare(x, W, torch.tensor([0, -1, 0, -1]), kind, chunk, row_param)


@given(
    B=st.integers(1, 9),
    D=st.integers(1, 8),
    C=st.integers(1, 13),
    kind=st.sampled_from(KINDS),
    chunk=st.integers(1, 15) | st.none(),
    no_target=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_equals_dense_property(B, D, C, kind, chunk, no_target, seed):
    x, W, row_param = make_inputs(B, D, C, seed)
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (B,), generator=g)
    target[torch.rand(B, generator=g) < no_target] = -1
    compare(x, W, target, kind, chunk, row_param)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
    ids=str,
)
def test_low_precision_inputs(kind, x_dtype, w_dtype):
    """The operand policy: half embeddings make the matmul operands half (W rounded to
    them), products accumulate in float32. Compared with float64 on the same rounded
    operands, the logits agree to float32 accumulation; the gradient matmuls round G and
    w_hat to the operand dtype as well (~eps of it)."""
    x, W, row_param = make_inputs(10, 16, 10, seed=5, dtype=x_dtype, w_dtype=w_dtype)
    op = x_dtype if x_dtype in (torch.float16, torch.bfloat16) else torch.float32
    assert class_lse.operand_dtype(x, W) == op
    p0 = PARAMS[kind][0]
    grtol = 4 * torch.finfo(op).eps + 1e-5
    compare(x, W, BOUNDARY_TARGETS, kind, 3, row_param, rtol=2e-6 * p0, grtol=grtol, ref_op=op)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_are_normalised_inside(kind):
    """The op normalises x itself: rows of any length (here 1.01, 0.5 and 3 times a proxy
    direction, cos = +-1, and random ones) give the values of their unit rows, and the
    gradient of the unit row divided by the length (d/dx f(x/|x|))."""
    x, W, row_param = make_inputs(10, 6, 10, seed=9)
    w_hat = F.normalize(W, dim=0)
    x[:4] = w_hat[:, [0, 3, 6, 9]].t()  # own proxy for rows 0, 2; others for 1, 3
    x[4:6] = -w_hat[:, [6, 5]].t()
    lengths = torch.tensor([1.01, 0.5, 3.0, 1.01, 2.0, 0.7, 1.3, 0.9, 4.0, 0.25], dtype=F64)
    p0, p1 = PARAMS[kind]
    rp = row_param if kind == "curricular" else None

    def op(x_, W_):
        return class_logsumexp(
            x_, W_, BOUNDARY_TARGETS, kind, p0, p1, row_param=rp, chunk_size=3, impl="torch"
        )

    unit = run(op, x, W)
    scaled = run(op, x * lengths[:, None], W)
    assert_close(scaled[0], unit[0], 1e-12, 1e-12, "lse")
    assert_close(scaled[1], unit[1], 1e-12, 1e-12, "cos_y")
    assert_close(scaled[2], unit[2] / lengths[:, None], 1e-10, 1e-10, "d/dx")
    assert_close(scaled[3], unit[3], 1e-10, 1e-10, "d/dW")
    compare(x * lengths[:, None], W, BOUNDARY_TARGETS, kind, 3, row_param)


def test_operand_dtype_policy():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    x, W = torch.randn(3, 4), torch.randn(4, 5)
    assert class_lse.operand_dtype(x, W) == f32
    assert class_lse.operand_dtype(x.to(bf16), W) == bf16  # W's dtype does not promote
    assert class_lse.operand_dtype(x.to(f16), W.to(bf16)) == f16
    assert class_lse.operand_dtype(x, W.to(bf16)) == f32
    assert class_lse.operand_dtype(x.double(), W) == F64
    with torch.autocast("cpu", dtype=bf16):
        assert class_lse.operand_dtype(x, W) == bf16
        assert class_lse.operand_dtype(x.to(f16), W) == bf16  # autocast decides
        assert class_lse.operand_dtype(x.double(), W) == F64  # autocast leaves float64
    with torch.autocast("cpu", dtype=f16):
        assert class_lse.operand_dtype(x, W) == f16


@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_follows_the_operand_policy(kind):
    """bf16 embeddings with fp32 W multiply W rounded to bf16 (tile by tile); CPU autocast
    gives fp32 inputs the same bf16 operands; the outputs and gradients keep their
    dtypes, and the result is not the fp32 one."""
    x, W, row_param = make_inputs(10, 16, 10, seed=11, dtype=torch.float32)
    p0, p1 = PARAMS[kind]
    rp = row_param.float() if kind == "curricular" else None

    def op(x_, W_):
        return class_logsumexp(
            x_, W_, BOUNDARY_TARGETS, kind, p0, p1, row_param=rp, chunk_size=4, impl="torch"
        )

    xb = x.bfloat16()
    half = run(op, xb, W)
    rounded_w = run(op, xb, W.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run(op, xb.float(), W)
    full = run(op, xb.float(), W)
    for i, (a, b, c) in enumerate(zip(half, rounded_w, auto)):
        assert_close(a, b, 1e-6, 1e-6, "rounded W")
        tol = 8e-3 if i == 2 else 1e-6  # (half's d/dx comes back rounded to bf16)
        assert_close(c, a, tol, tol * float(a.abs().max()), "autocast")
    assert half[2].dtype == torch.bfloat16 and half[3].dtype == torch.float32
    assert auto[2].dtype == auto[3].dtype == torch.float32
    assert (half[0] - full[0]).abs().max() > 1e-4  # W's rounding shows at these scales


def test_weight_may_be_a_transposed_view():
    x, W, _ = make_inputs(10, 6, 10, seed=6)
    view = W.t().contiguous().t()  # same values, column-major strides
    assert not view.is_contiguous()
    a = class_logsumexp(x, W, BOUNDARY_TARGETS, "scaled", 10.0, chunk_size=3, impl="torch")
    b = class_logsumexp(x, view, BOUNDARY_TARGETS, "scaled", 10.0, chunk_size=3, impl="torch")
    for u, v in zip(a, b):
        assert_close(u, v, 1e-12, 1e-12, "strided weight")


@pytest.mark.parametrize("kind", ["scaled", "curricular"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_gradcheck(kind, chunk):
    """Exact derivatives for the kinds without detached parts (circle: see test above)."""
    x, W, row_param = make_inputs(5, 3, 7, seed=7)
    target = torch.tensor([0, 3, 6, -1, 2])
    p0, p1 = (4.0, 0.3) if kind == "curricular" else (4.0, 0.0)
    rp = row_param if kind == "curricular" else None

    def f(x_, W_):
        lse, cos_y = class_logsumexp(
            x_, W_, target, kind, p0, p1, row_param=rp, chunk_size=chunk, impl="torch"
        )
        return lse, cos_y

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), W.requires_grad_(True)))


def test_argument_errors():
    x, W, row_param = make_inputs(3, 4, 5, seed=8)
    target = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="kind"):
        class_logsumexp(x, W, target, "arcface", 1.0, impl="torch")
    with pytest.raises(ValueError, match="row_param"):
        class_logsumexp(x, W, target, "curricular", 1.0, 0.1, impl="torch")
    with pytest.raises(ValueError, match="chunk_size"):
        class_logsumexp(x, W, target, "scaled", 1.0, chunk_size=0, impl="torch")
    with pytest.raises(ValueError, match="impl"):
        class_logsumexp(x, W, target, "scaled", 1.0, impl="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="triton"):
            class_logsumexp(x, W, target, "scaled", 1.0, impl="triton")
    # "auto" on CPU runs the PyTorch path.
    lse, _ = class_logsumexp(x, W, target, "scaled", 1.0, impl="auto")
    assert torch.isfinite(lse).all()


@given(B=st.integers(0, 10**6), C=st.integers(1, 10**7))
def test_default_chunk_size_bounds(B, C):
    chunk = default_chunk_size(B, C)
    assert 1 <= chunk <= C
    assert chunk == C or chunk >= 256 or C < 256
    # A block of temporaries stays around 4M elements unless the 256-class floor applies.
    assert chunk <= 256 or max(B, 1) * chunk <= (1 << 22)


def test_reference_module_does_not_import_the_library():
    """tests/helpers/reference.py must stay independent of pml_extras."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.split(".")[0] == "pml_extras" for name in imported), imported
