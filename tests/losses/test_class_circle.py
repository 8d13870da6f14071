"""Class-level Circle loss: SparseCircleLoss and functional.class_circle_loss.

* class vs pair: SparseCircleLoss == PML's pair-level CircleLoss against the normalised
  proxies (per sample and reduced, loss and gradients, float64);
* three forms agree: int targets, one-hot targets and the module;
* against the naive per-anchor reference in tests/helpers/reference.py, across dtypes;
* gradients (the [.]_+ weights are detached, so a finite-difference check is done with the
  weights frozen) and finiteness at cos = +-1, gamma = 256, in fp16/bf16/fp32.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from proxy_cases import fp16_rows_on_own_proxy, make_data, placement_patterns, rows_on_proxies
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from pml_extras.functional import class_circle_loss, sparse_circle_loss
from pml_extras.losses import SparseCircleLoss
from pml_extras.ops.tolerances import REFERENCE

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PAPER_SETTINGS = [(0.25, 256.0), (0.25, 128.0), (0.4, 80.0)]  # faces, re-ID, fine-grained

margins = st.sampled_from([0.25, 0.4]) | st.floats(0.05, 0.6)
gammas = st.sampled_from([256.0, 128.0, 80.0]) | st.floats(1.0, 256.0)


def make_loss(W, m, gamma, **kwargs):
    D, C = W.shape
    loss_fn = SparseCircleLoss(C, D, m=m, gamma=gamma, **kwargs).to(W.dtype)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def per_sample(loss_fn, x, y):
    return loss_fn.compute_loss(x, y, None, x, y)["loss"]["losses"]


def pml_circle(m, gamma, **kwargs):
    return pml_losses.CircleLoss(m=m, gamma=gamma, **kwargs)


def pml_per_sample(pml_fn, x, W, y):
    C = W.shape[1]
    proxies = F.normalize(W.t(), dim=1)
    out = pml_fn.compute_loss(x, y, None, proxies, torch.arange(C))["loss"]["losses"]
    if not torch.is_tensor(out):
        # GenericPairLoss returns zero_loss() when there is at most one positive and at
        # most one negative pair (B = 1, C <= 2): a PML shortcut, not the Circle loss.
        assert out == 0 and x.shape[0] == 1 and C <= 2
        return None
    return out.flatten()


def value_and_grads(fn, *inputs, weights=None):
    """fn(*inputs) -> tensor; returns (value, grads of sum(weights * value) wrt inputs)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    total = (out * weights).sum() if weights is not None else out.sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return out.detach(), grads


def assert_close(a, b, rtol, atol, what=""):
    a, b = a.detach().to(F64), b.detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------
# Class vs pair
# ----------------------------------------------------------------------------------------


def _check_against_pml_per_sample(B, D, C, m, gamma, seed, chunk_size=None):
    x, W, y = make_data(B, D, C, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(B, generator=g, dtype=F64) + 0.5  # distinct weights per sample
    pml_fn = pml_circle(m, gamma)

    # The module owns W, so differentiate through the functional core it calls and check
    # separately that the module's per-sample losses equal it.
    def ours_functional(x_, W_):
        return sparse_circle_loss(x_, W_, y, m, gamma, chunk_size=chunk_size, impl="torch")

    def theirs(x_, W_):
        out = pml_per_sample(pml_fn, x_, W_, y)
        # PML's degenerate-batch shortcut: use the naive reference there instead.
        return ref.class_circle_loss(x_, W_, y, m, gamma) if out is None else out

    val, (gx, gW) = value_and_grads(ours_functional, x, W, weights=w)
    val_p, (gx_p, gW_p) = value_and_grads(theirs, x, W, weights=w)
    scale = max(1.0, float(val_p.abs().max()))
    assert_close(val, val_p, rtol=1e-9, atol=1e-9 * scale, what="per-sample loss")
    gscale = max(1.0, float(gx_p.abs().max()), float(gW_p.abs().max()))
    assert_close(gx, gx_p, rtol=1e-7, atol=1e-9 * gscale, what="d/d embeddings")
    assert_close(gW, gW_p, rtol=1e-7, atol=1e-9 * gscale, what="d/d W")

    # The module (with its own Parameter W) gives the same per-sample losses and dW.
    loss_fn = make_loss(W, m, gamma, chunk_size=chunk_size)
    xm = x.clone().requires_grad_(True)
    mod = per_sample(loss_fn, xm, y)
    assert_close(mod, val_p, rtol=1e-9, atol=1e-9 * scale, what="module per-sample loss")
    (mod * w).sum().backward()
    assert_close(xm.grad, gx_p, rtol=1e-7, atol=1e-9 * gscale, what="module d/d embeddings")
    assert_close(loss_fn.W.grad, gW_p, rtol=1e-7, atol=1e-9 * gscale, what="module d/d W")


@given(
    B=st.integers(1, 12),
    D=st.integers(2, 12),
    C=st.integers(1, 16),
    m=margins,
    gamma=gammas,
    seed=st.integers(0, 2**31 - 1),
)
def test_class_vs_pair_per_sample(B, D, C, m, gamma, seed):
    _check_against_pml_per_sample(B, D, C, m, gamma, seed)


@pytest.mark.parametrize("B", [1, 41, 401])
@pytest.mark.parametrize("C", [1, 41, 401])
def test_class_vs_pair_odd_shapes(B, C):
    # chunk_size=7 divides neither 41 nor 401: several blocks and a ragged last block.
    _check_against_pml_per_sample(B, 24, C, 0.25, 256.0, seed=B * 1000 + C, chunk_size=7)


def _reducers():
    return [
        ("mean", lambda: pml_reducers.MeanReducer()),
        ("sum", lambda: pml_reducers.SumReducer()),
        ("avg_non_zero", lambda: pml_reducers.AvgNonZeroReducer()),
        ("per_anchor", lambda: pml_reducers.PerAnchorReducer()),
        ("threshold_low", None),
        ("threshold_high", None),
    ]


@pytest.mark.parametrize("name,make_reducer", _reducers(), ids=[r[0] for r in _reducers()])
@pytest.mark.parametrize("m,gamma", PAPER_SETTINGS)
def test_class_vs_pair_reduced(name, make_reducer, m, gamma):
    B, D, C = 24, 16, 11
    x, W, y = make_data(B, D, C, seed=7)
    if make_reducer is None:
        # A threshold halfway between two losses, so both sides are non-empty.
        per = pml_per_sample(pml_circle(m, gamma), x, W, y).detach().sort().values
        cut = float(per[B // 2 - 1] + per[B // 2]) / 2
        kw = {"low": cut} if name == "threshold_low" else {"high": cut}

        def make_reducer():
            return pml_reducers.ThresholdReducer(**kw)

    loss_fn = make_loss(W, m, gamma, reducer=make_reducer())
    pml_fn = pml_circle(m, gamma, reducer=make_reducer())
    xa = x.clone().requires_grad_(True)
    ours = loss_fn(xa, y)
    ours.backward()
    xb, Wb = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    theirs = pml_fn(xb, y, ref_emb=F.normalize(Wb.t(), dim=1), ref_labels=torch.arange(C))
    theirs.backward()
    assert ours.ndim == 0 and theirs.ndim == 0
    assert_close(ours, theirs, rtol=1e-10, atol=1e-10, what=f"{name} reduced loss")
    assert_close(xa.grad, xb.grad, rtol=1e-7, atol=1e-10, what=f"{name} d/d embeddings")
    assert_close(loss_fn.W.grad, Wb.grad, rtol=1e-7, atol=1e-10, what=f"{name} d/d W")
    if name == "mean":
        # And the plain definition: the mean of the per-sample reference losses.
        expected = ref.class_circle_loss(x, W, y, m, gamma).mean()
        assert_close(ours, expected, rtol=1e-10, atol=1e-10, what="mean vs reference")


# ----------------------------------------------------------------------------------------
# Three forms agree
# ----------------------------------------------------------------------------------------


@given(
    B=st.integers(1, 10),
    D=st.integers(2, 10),
    C=st.integers(1, 12),
    m=margins,
    gamma=gammas,
    onehot_dtype=st.sampled_from([torch.float64, torch.int64, torch.bool, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_three_forms_agree(B, D, C, m, gamma, onehot_dtype, seed):
    x, W, y = make_data(B, D, C, seed)
    onehot = F.one_hot(y, C).to(onehot_dtype)

    def sims(x_, W_):
        return F.normalize(x_, dim=1) @ F.normalize(W_, dim=0)

    forms = {
        "int targets": lambda x_, W_: class_circle_loss(sims(x_, W_), y, m=m, gamma=gamma),
        "one-hot targets": lambda x_, W_: class_circle_loss(sims(x_, W_), onehot, m=m, gamma=gamma),
        "SparseCircleLoss": lambda x_, W_: sparse_circle_loss(x_, W_, y, m, gamma, impl="torch"),
    }
    results = {k: value_and_grads(f, x, W) for k, f in forms.items()}
    module = per_sample(make_loss(W, m, gamma), x, y)
    base_val, (base_gx, base_gW) = results["int targets"]
    scale = max(1.0, float(base_val.abs().max()))
    gscale = max(1.0, float(base_gx.abs().max()), float(base_gW.abs().max()))
    for name, (val, (gx, gW)) in results.items():
        assert_close(val, base_val, rtol=1e-9, atol=1e-9 * scale, what=name)
        assert_close(gx, base_gx, rtol=1e-7, atol=1e-9 * gscale, what=f"{name} d/dx")
        assert_close(gW, base_gW, rtol=1e-7, atol=1e-9 * gscale, what=f"{name} d/dW")
    assert_close(module, base_val, rtol=1e-9, atol=1e-9 * scale, what="module")


@given(
    B=st.integers(1, 8),
    C=st.integers(1, 8),
    m=margins,
    gamma=gammas,
    seed=st.integers(0, 2**31 - 1),
)
def test_multi_hot_targets_match_reference(B, C, m, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, C, generator=g, dtype=F64) * 2 - 1
    positive = torch.rand(B, C, generator=g) < 0.4  # rows may have 0, 1 or many positives
    val, (gs,) = value_and_grads(lambda s_: class_circle_loss(s_, positive, m, gamma), s)
    val_r, (gs_r,) = value_and_grads(
        lambda s_: ref.circle_from_similarities(s_, positive, m, gamma), s
    )
    scale = max(1.0, float(val_r.abs().max()))
    assert_close(val, val_r, rtol=1e-9, atol=1e-9 * scale, what="multi-hot loss")
    assert_close(gs, gs_r, rtol=1e-7, atol=1e-9 * max(1.0, float(gs_r.abs().max())), what="ds")


# ----------------------------------------------------------------------------------------
# Against the naive reference, in float64 and per dtype
# ----------------------------------------------------------------------------------------


@given(
    B=st.integers(1, 8),
    D=st.integers(2, 8),
    C=st.integers(1, 9),
    m=margins,
    gamma=gammas,
    chunk=st.sampled_from([None, 1, 2, 3, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse_circle_matches_reference(B, D, C, m, gamma, chunk, seed):
    x, W, y = make_data(B, D, C, seed)
    val, (gx, gW) = value_and_grads(
        lambda x_, W_: sparse_circle_loss(x_, W_, y, m, gamma, chunk_size=chunk, impl="torch"),
        x,
        W,
    )
    val_r, (gx_r, gW_r) = value_and_grads(
        lambda x_, W_: ref.class_circle_loss(x_, W_, y, m, gamma), x, W
    )
    scale = max(1.0, float(val_r.abs().max()))
    gscale = max(1.0, float(gx_r.abs().max()), float(gW_r.abs().max()))
    assert_close(val, val_r, rtol=1e-9, atol=1e-9 * scale, what="loss")
    assert_close(gx, gx_r, rtol=1e-7, atol=1e-9 * gscale, what="d/dx")
    assert_close(gW, gW_r, rtol=1e-7, atol=1e-9 * gscale, what="d/dW")


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Relative tolerances for (loss, gradients), as multiples of the dtype's unit roundoff
# applied to gamma-scaled logits: inputs are rounded to the dtype, the reference then
# works in float64 on the rounded values, so only the kernel's arithmetic is measured.
TOL = REFERENCE["class_circle"]  # pml_extras/ops/tolerances.py, the one table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 4, 3), (11, 16, 29)], ids=str)
@pytest.mark.parametrize("params", ["same", "fp32"])
def test_dtypes_against_reference(dtype, shape, params):
    B, D, C = shape
    m, gamma = 0.4, 80.0
    x, W, y = make_data(B, D, C, seed=B + C)
    x = x.to(dtype)
    W = W.to(dtype if params == "same" else (F64 if dtype == F64 else torch.float32))
    loss_fn = make_loss(W, m, gamma, chunk_size=8)
    xa = x.clone().requires_grad_(True)
    losses = per_sample(loss_fn, xa, y)
    losses.sum().backward()
    assert losses.dtype == (F64 if F64 in (x.dtype, W.dtype) else torch.float32)
    assert xa.grad.dtype == dtype and loss_fn.W.grad.dtype == W.dtype
    # The operand policy: half embeddings make the matmul operands half, so W's values are
    # rounded to the embeddings' dtype where they are read (the reference gets those).
    W_op = W.to(dtype) if dtype in (torch.bfloat16, torch.float16) else W
    val_r, (gx_r, gW_r) = value_and_grads(
        lambda x_, W_: ref.class_circle_loss(x_, W_, y, m, gamma), x.to(F64), W_op.to(F64)
    )
    ltol, gtol = TOL[dtype]
    if params == "fp32":
        # After rounding the operands, products and sums run in fp32 (the embeddings are
        # normalised in fp32 too); the gradient matmuls round G to the operand dtype.
        ltol = TOL[torch.float32][0] if dtype != F64 else ltol
        gtol = max(TOL[torch.float32][1], 2 * torch.finfo(dtype).eps) if dtype != F64 else gtol
    scale = float(val_r.abs().max())
    assert_close(losses, val_r, rtol=ltol, atol=ltol * max(scale, gamma), what="loss")
    assert_close(xa.grad, gx_r, rtol=gtol, atol=gtol * float(gx_r.abs().max()), what="d/dx")
    assert_close(loss_fn.W.grad, gW_r, rtol=gtol, atol=gtol * float(gW_r.abs().max()), what="d/dW")


# ----------------------------------------------------------------------------------------
# Gradients and extremes
# ----------------------------------------------------------------------------------------


def _frozen_weight_reference(x, W, y, m, gamma, a_n, a_p):
    """The reference loss with the [.]_+ weights held at given values (no detach needed)."""
    s = F.normalize(x, dim=1) @ F.normalize(W, dim=0)
    pos = F.one_hot(y, W.shape[1]).bool()
    z_n = (gamma * a_n * (s - m)).masked_fill(pos, float("-inf"))
    z_p = -(gamma * a_p * (s - (1 - m)))[pos]
    return F.softplus(torch.logsumexp(z_n, dim=1) + z_p)


@pytest.mark.parametrize("m,gamma", [(0.25, 4.0), (0.4, 2.0)])
def test_gradients_are_the_detached_weight_gradients(m, gamma):
    """gradcheck, with the paper's detached weights frozen at the evaluation point.

    The [.]_+ weights are constants in the paper's gradient, so a plain finite-difference
    check of the loss must *fail*; the gradient must instead equal the exact derivative of
    the same loss with the weights frozen, which gradcheck verifies.
    """
    x, W, y = make_data(3, 4, 5, seed=3)
    x.requires_grad_(True)
    W.requires_grad_(True)
    s0 = (F.normalize(x, dim=1) @ F.normalize(W, dim=0)).detach()
    a_n, a_p = torch.clamp(s0 + m, min=0), torch.clamp(1 + m - s0, min=0)

    def frozen(x_, W_):
        return _frozen_weight_reference(x_, W_, y, m, gamma, a_n, a_p)

    assert torch.autograd.gradcheck(frozen, (x, W))
    g_lib = torch.autograd.grad(sparse_circle_loss(x, W, y, m, gamma, impl="torch").sum(), (x, W))
    g_frozen = torch.autograd.grad(frozen(x, W).sum(), (x, W))
    for a, b in zip(g_lib, g_frozen):
        assert_close(a, b, rtol=1e-9, atol=1e-12, what="frozen-weight gradient")
    # With the weights free to move, finite differences see d a / d s: not the same.
    assert not torch.autograd.gradcheck(
        lambda x_, W_: sparse_circle_loss(x_, W_, y, m, gamma, impl="torch"),
        (x, W),
        raise_exception=False,
    )


EXTREME_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@given(
    dtype=st.sampled_from(EXTREME_DTYPES),
    params_fp32=st.booleans(),
    C=st.integers(1, 6),
    D=st.integers(1, 6),
    B=st.integers(1, 6),
    gamma=st.sampled_from([256.0, 128.0, 80.0]),
    m=st.sampled_from([0.25, 0.4]),
    # Not much below 0.05: the normalisation's gradient grows like 1/|x| (gamma/|x| in
    # all), beyond fp16's range for |x| ~ 1e-3 even where the exact gradient is finite.
    magnitude=st.sampled_from([0.05, 1.0, 30.0]),
    pattern=placement_patterns,
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_at_cos_plus_minus_one(
    dtype, params_fp32, C, D, B, gamma, m, magnitude, pattern, seed
):
    """Embeddings equal to (or opposite to) their own or another proxy: cos = +-1 exactly."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    other = torch.randint(0, C, (B,), generator=g)
    x = rows_on_proxies(W, y, other, pattern, magnitude).to(dtype).requires_grad_(True)
    loss_fn = make_loss(W.to(torch.float32 if params_fp32 else dtype), m, gamma)
    losses = per_sample(loss_fn, x, y)
    loss = losses.mean()
    loss.backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(loss_fn.W.grad).all()
    # And within the loss's range: negatives at cos = 1 give at most gamma*(1 - m^2) each,
    # the positive at cos = -1 at most gamma*(2 + m)*(2 - m); softplus adds at most log 2.
    bound = math.log(max(C - 1, 1)) + gamma * (1 - m * m) + gamma * (4 - m * m) + 1.0
    assert float(losses.detach().max()) <= bound * 1.05


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fp16_embedding_on_its_proxy_has_finite_gradients(D, sign):
    """Regression: x = +-0.05 * w_y in fp16 gave NaN gradients while the unit vector was
    computed in fp16 (the gradient w.r.t. it overflowed before the projection)."""
    x, y, W16 = fp16_rows_on_own_proxy(D, sign)
    loss_fn = make_loss(W16, 0.25, 256.0)
    loss_fn.eval()
    loss_fn.compute_loss(x, y, None, x, y)["loss"]["losses"].sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()
