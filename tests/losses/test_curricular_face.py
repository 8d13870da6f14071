"""CurricularFace: functional loss, the t EMA, the module, gradients and extremes.

The reference (tests/helpers/reference.py) follows the authors' code: target cos(theta + m) with the
cos(pi - m) fallback, hard negatives c_j > cos(theta_y + m) mapped to c_j * (t + c_j), scale
and cross-entropy; t <- momentum * mean(cos_y) + (1 - momentum) * t before use, in training.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from proxy_cases import (
    facing_away,
    fp16_rows_on_own_proxy,
    make_data,
    placement_patterns,
    rows_on_proxies,
)

from pml_extras.functional import curricular_face_loss, curricular_target, update_t
from pml_extras.losses import CurricularFaceLoss
from pml_extras.ops.tolerances import REFERENCE

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

margins = st.just(0.5) | st.floats(0.1, 0.8)
scales = st.just(64.0) | st.floats(1.0, 64.0)


def make_loss(W, **kwargs):
    D, C = W.shape
    # The reference uses the paper's scale; the default "auto" depends on C and D.
    kwargs.setdefault("scale", 64.0)
    loss_fn = CurricularFaceLoss(C, D, **kwargs).to(W.dtype)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def value_and_grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(123)
    weights = torch.rand(out.shape, generator=g, dtype=F64).to(out.dtype) + 0.5
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out.detach(), grads


def assert_close(a, b, rtol, atol, what=""):
    a, b = torch.as_tensor(a).detach().to(F64), torch.as_tensor(b).detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def compare_to_reference(x, W, y, t, margin, scale, chunk=None, rtol=1e-9, grtol=1e-7):
    val, (gx, gW) = value_and_grads(
        lambda x_, W_: curricular_face_loss(
            x_, W_, y, t, margin, scale, chunk_size=chunk, impl="torch"
        ),
        x,
        W,
    )
    val_r, (gx_r, gW_r) = value_and_grads(
        lambda x_, W_: ref.curricular_face_losses(x_, W_, y, t, margin, scale), x, W
    )
    scale_v = max(1.0, float(val_r.abs().max()))
    gscale = max(1.0, float(gx_r.abs().max()), float(gW_r.abs().max()))
    assert_close(val, val_r, rtol=rtol, atol=rtol * scale_v, what="loss")
    assert_close(gx, gx_r, rtol=grtol, atol=grtol * gscale, what="d/dx")
    assert_close(gW, gW_r, rtol=grtol, atol=grtol * gscale, what="d/dW")


# ----------------------------------------------------------------------------------------
# The functional loss against the reference
# ----------------------------------------------------------------------------------------


@given(
    B=st.integers(1, 8),
    D=st.integers(2, 8),
    C=st.integers(1, 9),
    t=st.floats(-0.5, 1.0),
    margin=margins,
    scale=scales,
    chunk=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_functional_matches_reference(B, D, C, t, margin, scale, chunk, seed):
    x, W, y = make_data(B, D, C, seed)
    compare_to_reference(x, W, y, t, margin, scale, chunk)


@pytest.mark.parametrize("margin", [0.5, 0.3])
def test_fallback_branch_when_theta_plus_m_exceeds_pi(margin):
    """Targets with c_y < cos(pi - m) take c_y - m*sin(pi - m), not cos(theta + m)."""
    x, W, y = make_data(6, 5, 4, seed=11)
    # Half the rows point almost exactly away from their own proxy.
    x, cos_y = facing_away(x, W, y, rows=3, noise=0.02)
    assert (cos_y[:3] < math.cos(math.pi - margin)).all()
    assert (cos_y[3:] > math.cos(math.pi - margin)).all()
    f, cos_theta_m = curricular_target(cos_y, margin)
    fallback = cos_y - margin * math.sin(math.pi - margin)
    assert_close(f[:3], fallback[:3], rtol=1e-12, atol=1e-12, what="fallback")
    expected_m = torch.cos(torch.acos(cos_y) + margin)
    assert_close(cos_theta_m, expected_m, rtol=1e-9, atol=1e-9, what="cos(theta+m)")
    assert_close(f[3:], expected_m[3:], rtol=1e-9, atol=1e-9, what="cos(theta+m) branch")
    # The fallback keeps the target logit monotonic: below the threshold it is smaller
    # than cos(theta + m) would be there (which turns back up after theta + m > pi).
    assert (f[:3] < cos_theta_m[:3]).all()
    compare_to_reference(x, W, y, 0.3, margin, 64.0)


def test_hard_negatives_use_t():
    """With hard negatives present, the loss depends on t exactly as c_j*(t + c_j) says."""
    x, W, y = make_data(10, 4, 12, seed=2)
    losses = [curricular_face_loss(x, W, y, t, impl="torch") for t in (0.0, 0.5, 1.0)]
    refs = [ref.curricular_face_losses(x, W, y, t) for t in (0.0, 0.5, 1.0)]
    for a, b in zip(losses, refs):
        assert_close(a, b, rtol=1e-9, atol=1e-9, what="loss at fixed t")
    # Larger t emphasises hard negatives, so no loss goes down and some go up.
    assert (losses[1] >= losses[0] - 1e-9).all() and (losses[2] >= losses[1] - 1e-9).all()
    assert (losses[2] > losses[0] + 1e-3).any()


# ----------------------------------------------------------------------------------------
# t: the EMA, updated before use, only in training mode
# ----------------------------------------------------------------------------------------


@given(
    t=st.floats(-1.0, 1.0),
    momentum=st.floats(0.0, 1.0),
    cos=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=10),
)
def test_update_t_is_the_ema(t, momentum, cos):
    new = update_t(torch.tensor([t], dtype=F64), torch.tensor(cos, dtype=F64), momentum)
    expected = momentum * (sum(cos) / len(cos)) + (1 - momentum) * t
    assert new.shape == (1,)
    assert abs(float(new) - expected) <= 1e-12


@pytest.mark.parametrize("momentum", [0.01, 0.3])
@pytest.mark.parametrize("margin,scale", [(0.5, 64.0), (0.35, 30.0)])
def test_training_sequence_matches_reference(momentum, margin, scale):
    """Several optimizer steps: t and every loss follow a reference with its own t and W."""
    B, D, C, lr, steps = 12, 6, 9, 0.5, 5
    _, W0, _ = make_data(1, D, C, seed=99)
    loss_fn = make_loss(W0, margin=margin, scale=scale, momentum=momentum)
    loss_fn.train()
    opt = torch.optim.SGD(loss_fn.parameters(), lr=lr)
    reference = ref.CurricularFaceReference(W0, margin, scale, momentum, t=0.0)
    assert float(loss_fn.t) == 0.0
    ts = []
    for step in range(steps):
        x, _, y = make_data(B, D, C, seed=step)
        # Pull the embeddings towards their proxies over time so t has something to track.
        x = x + step * 0.5 * F.normalize(W0[:, y].t(), dim=1)
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        expected = reference.loss(x, y, training=True)
        expected.backward()
        reference.sgd_step(lr)
        assert_close(
            loss_fn.t,
            torch.tensor([reference.t], dtype=F64),
            rtol=1e-10,
            atol=1e-12,
            what=f"t at step {step}",
        )
        assert_close(loss, expected, rtol=1e-9, atol=1e-9, what=f"loss at step {step}")
        assert_close(loss_fn.W, reference.W, rtol=1e-9, atol=1e-9, what=f"W at step {step}")
        ts.append(float(loss_fn.t))
    assert len(set(ts)) == steps  # t really moved at every step

    # Evaluation: t is used but not updated.
    loss_fn.eval()
    x, _, y = make_data(B, D, C, seed=100)
    t_before = loss_fn.t.clone()
    loss = loss_fn(x, y)
    assert torch.equal(loss_fn.t, t_before)
    t_ref_before = reference.t
    expected = reference.loss(x, y, training=False)
    assert reference.t == t_ref_before
    assert_close(loss, expected, rtol=1e-9, atol=1e-9, what="eval loss")


# ----------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (loss, gradient) relative tolerances; the reference runs in float64 on the rounded inputs.
TOL = REFERENCE["curricular"]  # pml_extras/ops/tolerances.py, the one table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 4, 3), (11, 16, 29)], ids=str)
def test_dtypes_against_reference(dtype, shape):
    B, D, C = shape
    x, W, y = make_data(B, D, C, seed=B * C)
    x, W = x.to(dtype), W.to(dtype)
    loss_fn = make_loss(W, chunk_size=8)
    loss_fn.eval()  # fixed t, so that the comparison is with a known t
    with torch.no_grad():
        loss_fn.t.fill_(0.25)
    xa = x.clone().requires_grad_(True)
    losses = loss_fn.compute_loss(xa, y, None, xa, y)["loss"]["losses"]
    losses.sum().backward()
    assert xa.grad.dtype == dtype and loss_fn.W.grad.dtype == dtype
    val_r, (gx_r, gW_r) = value_and_grads(
        lambda x_, W_: ref.curricular_face_losses(x_, W_, y, 0.25), x.to(F64), W.to(F64)
    )
    # value_and_grads weights the sum; redo the reference gradient with plain sum.
    xr, Wr = x.to(F64).requires_grad_(True), W.to(F64).requires_grad_(True)
    ref.curricular_face_losses(xr, Wr, y, 0.25).sum().backward()
    ltol, gtol = TOL[dtype]
    lscale = max(float(val_r.abs().max()), 64.0)
    assert_close(losses, val_r, rtol=ltol, atol=ltol * lscale, what="loss")
    assert_close(xa.grad, xr.grad, rtol=gtol, atol=gtol * float(xr.grad.abs().max()), what="dx")
    assert_close(
        loss_fn.W.grad, Wr.grad, rtol=gtol, atol=gtol * float(Wr.grad.abs().max()), what="dW"
    )


# ----------------------------------------------------------------------------------------
# Gradients and extremes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.4])
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(t, chunk):
    x, W, y = make_data(4, 3, 5, seed=21)
    x.requires_grad_(True)
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_, W_: curricular_face_loss(x_, W_, y, t, 0.5, 8.0, chunk_size=chunk, impl="torch"),
        (x, W),
    )


def test_gradcheck_module():
    """The module end to end (eval mode: in training, t moves with the batch, by design
    without gradient, so finite differences would see dt/dx)."""
    x, W, y = make_data(4, 3, 5, seed=22)
    loss_fn = make_loss(W, scale=8.0)
    loss_fn.eval()
    with torch.no_grad():
        loss_fn.t.fill_(0.3)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_: loss_fn(x_, y), (x,))
    assert torch.autograd.gradcheck(
        lambda W_: curricular_face_loss(x, W_, y, loss_fn.t, 0.5, 8.0, impl="torch"),
        (loss_fn.W.detach().clone().requires_grad_(True),),
    )


@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    params_fp32=st.booleans(),
    B=st.integers(1, 6),
    C=st.integers(1, 6),
    D=st.integers(1, 6),
    # Not much below 0.05: the normalisation's gradient grows like 1/|x| (gamma/|x| in
    # all), beyond fp16's range for |x| ~ 1e-3 even where the exact gradient is finite.
    magnitude=st.sampled_from([0.05, 1.0, 30.0]),
    pattern=placement_patterns,
    training=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_at_cos_plus_minus_one(
    dtype, params_fp32, B, C, D, magnitude, pattern, training, seed
):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    other = torch.randint(0, C, (B,), generator=g)
    x = rows_on_proxies(W, y, other, pattern, magnitude).to(dtype).requires_grad_(True)
    loss_fn = make_loss(W.to(torch.float32 if params_fp32 else dtype), scale=64.0)
    loss_fn.train(training)
    losses = loss_fn.compute_loss(x, y, None, x, y)["loss"]["losses"]
    losses.mean().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(loss_fn.W.grad).all()
    assert torch.isfinite(loss_fn.t).all() and abs(float(loss_fn.t)) <= 1.0
    # Cross-entropy of logits in [-2s, 2s]: 0 <= loss <= 4s + log C (plus rounding).
    assert float(losses.detach().min()) >= -1e-3
    assert float(losses.detach().max()) <= (4 * 64.0 + math.log(C) + 1.0)


@pytest.mark.parametrize("D", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fp16_embedding_on_its_proxy_has_finite_gradients(D, sign):
    """Regression: x = +-0.05 * w_y in fp16 gave NaN gradients while the unit vector was
    computed in fp16 (the gradient w.r.t. it overflowed before the projection)."""
    x, y, W16 = fp16_rows_on_own_proxy(D, sign)
    loss_fn = make_loss(W16, scale=64.0)
    loss_fn.eval()
    loss_fn.compute_loss(x, y, None, x, y)["loss"]["losses"].sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()
