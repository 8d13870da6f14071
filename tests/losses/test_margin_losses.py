"""ArcFaceLoss and CosFaceLoss: blockwise drop-ins for PML's dense ones (their numbers).

* against the float64 references of tests/helpers/reference.py (per-class loop for small cases,
  dense cross-entropy for the larger ones), loss and gradients, over dtypes, odd shapes and
  chunk sizes with labels on chunk boundaries, and against PML's modules in float32;
* finite losses and gradients at cos = +-1 exactly, scale 64, in fp16/bf16 (PML's
  ArcFace has infinite/NaN gradients there);
* the Triton kernels under the interpreter, in a child process.

Inside PML (miners, reducers, regularizers, state_dict) and bad input:
test_margin_losses_in_pml.py; the proxy-loss base class: test_proxy_loss_base.py.
"""

from __future__ import annotations

import math
import os

_CHILD = "PML_EXTRAS_TRITON_INTERPRET_CHILD"  # set by test_class_lse_triton.py
if os.environ.get(_CHILD) == "1":
    # Read when triton.jit decorates the kernels, so before anything imports them.
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import reference as ref  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from margin_cases import (  # noqa: E402
    F64,
    INTERPRET,
    KINDS,
    PAPER_MARGIN,
    assert_close,
    boundary_labels,
    functional,
    functional_margin,
    make_loss,
    per_sample,
    value_and_grads,
)
from proxy_cases import facing_away, make_data, placement_patterns, rows_on_proxies  # noqa: E402

from pml_extras.functional import arcface_loss  # noqa: E402
from pml_extras.ops.tolerances import REFERENCE  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------
# The functional losses against the per-class float64 reference
# ----------------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(KINDS),
    B=st.integers(1, 7),
    D=st.integers(2, 6),
    C=st.integers(1, 9),
    margin=st.sampled_from([0.5, 0.35]) | st.floats(-0.4, 1.2),
    scale=st.sampled_from([64.0, 30.0]) | st.floats(1.0, 64.0),
    chunk=st.sampled_from([None, 1, 2, 5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_functional_matches_reference(kind, B, D, C, margin, scale, chunk, seed):
    x, W, y = make_data(B, D, C, seed)
    fn = functional(kind)
    val, (gx, gW) = value_and_grads(
        lambda x_, W_: fn(x_, W_, y, margin, scale, chunk_size=chunk, impl="torch"), x, W
    )
    val_r, (gx_r, gW_r) = value_and_grads(
        lambda x_, W_: ref.margin_softmax_losses(x_, W_, y, kind, margin, scale), x, W
    )
    assert val.dtype == F64
    assert_close(val, val_r, rtol=1e-9, atol=1e-9 * max(1.0, float(val_r.abs().max())))
    gscale = max(1.0, float(gx_r.abs().max()), float(gW_r.abs().max()))
    assert_close(gx, gx_r, rtol=1e-7, atol=1e-7 * gscale, what="d/dx")
    assert_close(gW, gW_r, rtol=1e-7, atol=1e-7 * gscale, what="d/dW")


def test_dense_reference_matches_loop_reference():
    """The two references (used for small and large shapes) agree with each other."""
    x, W, y = make_data(9, 5, 13, seed=3)
    x[:3] = -F.normalize(W[:, y[:3]].t(), dim=1) + 0.05 * x[:3]  # ArcFace fallback rows
    for kind, margin in (("arcface", 0.5), ("cosface", 0.35)):
        loop = ref.margin_softmax_losses(x, W, y, kind, margin, 64.0)
        dense = ref.margin_softmax_losses_dense(x, W, y, kind, margin, 64.0)
        assert_close(dense, loop, rtol=1e-12, what=kind)


@pytest.mark.parametrize("margin", [0.5, 0.3, 1.0])
def test_arcface_fallback_past_pi_minus_m(margin):
    """Targets with theta_y > pi - m take c_y - m*sin(m) (PML's monotonic fallback), the
    others cos(theta_y + m); ours, the reference and PML agree on both branches."""
    x, W, y = make_data(8, 5, 6, seed=11)
    x, cos_y = facing_away(x, W, y, rows=4, noise=0.05)
    assert (cos_y[:4] < math.cos(math.pi - margin)).all()
    assert (cos_y[4:] > math.cos(math.pi - margin)).all()
    ours = arcface_loss(x, W, y, margin, 64.0, impl="torch")
    assert_close(ours, ref.margin_softmax_losses(x, W, y, "arcface", margin, 64.0), rtol=1e-10)
    pml_fn = make_loss("arcface", W, pml=True, margin=math.degrees(margin))
    assert_close(ours, per_sample(pml_fn, x, y), rtol=1e-10, what="vs PML")
    # Both branches really occur, and the fallback gives a different value than
    # cos(theta + m) would (which turns back up past pi).
    cos_m = torch.cos(torch.acos(cos_y) + margin)
    assert ((cos_y[:4] - margin * math.sin(margin)) < cos_m[:4]).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [None, 2])
def test_gradcheck(kind, chunk):
    x, W, y = make_data(4, 3, 5, seed=21)
    x[0] = -W[:, y[0]] + 0.1  # an ArcFace fallback row
    fn = functional(kind)
    assert torch.autograd.gradcheck(
        lambda x_, W_: fn(x_, W_, y, 0.5, 8.0, chunk_size=chunk, impl="torch"),
        (x.requires_grad_(True), W.requires_grad_(True)),
    )


# ----------------------------------------------------------------------------------------
# dtypes x odd shapes x chunk sizes, against the dense reference and PML
# ----------------------------------------------------------------------------------------

SHAPES = [(41, 16, 401), (7, 8, 1271)]  # (B, D, C)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (loss, gradient) relative tolerances against float64 math on the same rounded inputs.
# The losses are computed in float32 (float64) whatever the input dtype, so only the
# gradients, returned in the input dtype, carry its rounding.
TOL = REFERENCE["margin"]  # pml_extras/ops/tolerances.py, the one table


def module_losses_and_grads(kind, x, W, y, **kwargs):
    loss_fn = make_loss(kind, W, **kwargs)
    xa = x.clone().requires_grad_(True)
    losses = per_sample(loss_fn, xa, y)
    losses.sum().backward()
    return losses.detach(), xa.grad, loss_fn.W.grad


def reference_losses_and_grads(kind, x, W, y, margin, scale=64.0):
    xr, Wr = x.to(F64).requires_grad_(True), W.to(F64).requires_grad_(True)
    losses = ref.margin_softmax_losses_dense(xr, Wr, y, kind, margin, scale)
    losses.sum().backward()
    return losses.detach(), xr.grad, Wr.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_against_reference(dtype, shape, kind):
    B, D, C = shape
    x, W, y = make_data(B, D, C, seed=B + C, dtype=dtype)
    y = boundary_labels(y, C, 37)
    losses, gx, gW = module_losses_and_grads(kind, x, W, y, chunk_size=37)
    assert losses.dtype == (F64 if dtype == F64 else torch.float32)
    assert gx.dtype == dtype and gW.dtype == dtype  # W is not cast to another dtype
    margin = functional_margin(kind, PAPER_MARGIN[kind])
    r_losses, r_gx, r_gW = reference_losses_and_grads(kind, x, W, y, margin)
    ltol, gtol = TOL[dtype]
    assert_close(losses, r_losses, rtol=ltol, what="loss")
    assert_close(gx, r_gx, rtol=gtol, what="d/dx")
    assert_close(gW, r_gW, rtol=gtol, what="d/dW")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 37, 4096], ids=["chunk1", "chunk37", "chunk_ge_C"])
def test_chunks_against_pml_fp32(chunk, shape, kind):
    """Per-sample losses, the reduced loss and its gradients equal PML's with the same W
    (float32), for every chunking, with labels on chunk boundaries."""
    B, D, C = shape
    x, W, y = make_data(B, D, C, seed=7 * B, dtype=torch.float32)
    y = boundary_labels(y, C, chunk)
    ours, pml = make_loss(kind, W, chunk_size=chunk), make_loss(kind, W, pml=True)
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    assert_close(per_sample(ours, xo, y), per_sample(pml, xp, y), rtol=2e-5, what="per sample")
    lo, lp = ours(xo, y), pml(xp, y)
    assert_close(lo, lp, rtol=2e-6, what="reduced")
    lo.backward()
    lp.backward()
    assert_close(xo.grad, xp.grad, rtol=1e-4, what="d/dx")
    assert_close(ours.W.grad, pml.W.grad, rtol=1e-4, what="d/dW")


# ----------------------------------------------------------------------------------------
# cos = +-1 exactly, scale 64, half precision
# ----------------------------------------------------------------------------------------


@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    params_fp32=st.booleans(),
    B=st.integers(1, 6),
    C=st.integers(1, 6),
    D=st.integers(1, 6),
    basis=st.booleans(),
    # Not much below 0.05: the normalisation's gradient grows like 1/|x| (s/|x| in all),
    # beyond fp16's range for |x| ~ 1e-3 even where the exact gradient is finite.
    magnitude=st.sampled_from([0.05, 1.0, 30.0]),
    pattern=placement_patterns,
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_at_cos_plus_minus_one(
    kind, dtype, params_fp32, B, C, D, basis, magnitude, pattern, seed
):
    """Embeddings equal to +-(a multiple of) a proxy, their own or another one. With basis
    vectors as proxies the cosines are exactly +-1 in every dtype."""
    g = torch.Generator().manual_seed(seed)
    if basis:
        W = torch.eye(D)[:, torch.randint(0, D, (C,), generator=g)] * 3.0
    else:
        W = torch.randn(D, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    other = torch.randint(0, C, (B,), generator=g)
    x = rows_on_proxies(W, y, other, pattern, magnitude).to(dtype).requires_grad_(True)
    loss_fn = make_loss(kind, W.to(torch.float32 if params_fp32 else dtype), scale=64.0)
    losses = per_sample(loss_fn, x, y)
    losses.mean().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    # Cross-entropy of logits in [-s(1 + m), s]: 0 <= loss <= s(2 + m) + log C (+ rounding).
    assert float(losses.detach().min()) >= 0.0
    assert float(losses.detach().max()) <= 64.0 * 2.6 + math.log(C) + 1e-3


def unit_cosine_case():
    """x = +-e_k with the proxy e_k (rows 0-3 and 5 at cos = +-1 exactly; row 4 off it)."""
    D = 4
    W = torch.eye(D)[:, [0, 1, 2, 3, 0]] * 2.0
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    x = torch.stack([W[:, 0], -W[:, 1], W[:, 2], -W[:, 3], W[:, 0] + 0.5 * W[:, 1], W[:, 0]])
    return W, x, y


def pml_target_cosines(x, W, y):
    """The target cosines PML's ArcFace feeds to ``acos(clamp(cos, -1, 1))``."""
    pml_fn = make_loss("arcface", W, pml=True)
    with torch.no_grad():
        return pml_fn.get_cosine(x)[torch.arange(len(y)), y]


def clamp_passes_gradient_at_its_bounds() -> bool:
    """torch <= 2.14 passes the incoming gradient through clamp where the input equals a
    bound; a clamp that passes zero there (torch 2.15, as issue 18 reports) multiplies
    acos's infinite derivative by zero before it reaches the inputs."""
    v = torch.tensor([-1.0, 1.0], requires_grad=True)
    torch.clamp(v, -1, 1).sum().backward()
    return bool((v.grad != 0).all())


def test_pml_arcface_gradient_is_not_finite_at_unit_cosines():
    """Why our ArcFace exists: PML's computes acos(clamp(cos, -1, 1)), and acos has an
    infinite derivative at +-1. PML's gradient is then NaN/inf exactly when torch's clamp
    passes the gradient at its bounds (the behaviour this comparison needs, checked
    first); where it does not, PML's gradient is finite by accident of clamp, not by design,
    and there is nothing to compare."""
    W, x, y = unit_cosine_case()
    hit = pml_target_cosines(x, W, y)[[0, 1, 2, 3, 5]]
    assert (hit.abs() == 1).all(), hit  # the inputs really hit acos's singular points
    if not clamp_passes_gradient_at_its_bounds():
        pytest.skip(
            f"torch {torch.__version__}: clamp passes no gradient at its bounds, so PML's "
            "ArcFace gradient at cos = +-1 is finite (zero through clamp) here"
        )
    pml_fn = make_loss("arcface", W, pml=True)
    xp = x.clone().requires_grad_(True)
    pml_fn(xp, y).backward()
    assert not torch.isfinite(xp.grad).all() or not torch.isfinite(pml_fn.W.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_exact_unit_cosines_where_pml_arcface_is_not_finite(dtype):
    """x = +-e_k with the proxy e_k: the target cosines are exactly +-1, where acos has an
    infinite derivative (PML's ArcFace gradient is NaN there on torch <= 2.14, see
    test_pml_arcface_gradient_is_not_finite_at_unit_cosines); ours is finite and matches the
    reference's one-sided values."""
    W, x, y = unit_cosine_case()
    hit = pml_target_cosines(x, W, y)[[0, 1, 2, 3, 5]]
    assert (hit.abs() == 1).all(), hit  # the inputs really hit the singular point
    loss_fn = make_loss("arcface", W.to(dtype), scale=64.0)
    xa = x.to(dtype).requires_grad_(True)
    losses = per_sample(loss_fn, xa, y)
    losses.sum().backward()
    assert torch.isfinite(xa.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    # The loss values are well defined there: compare with the reference.
    expected = ref.margin_softmax_losses(x, W, y, "arcface", math.radians(28.6), 64.0)
    assert_close(losses, expected, rtol=1e-5, what="loss at cos = +-1")


# ----------------------------------------------------------------------------------------
# The Triton kernels (scaled kind) through the modules, under the interpreter
# ----------------------------------------------------------------------------------------


# Run by tests/ops/test_class_lse_triton.py::test_interpreter_suite, in the one
# TRITON_INTERPRET=1 child process that also runs the kernels' own interpreter tests.
@pytest.mark.skipif(not INTERPRET, reason="runs in a TRITON_INTERPRET=1 child process")
class TestInterpreted:
    # Both losses share the kernels' "scaled" transform; one dtype each keeps this cheap.
    @pytest.mark.parametrize(
        "kind,dtype", [("arcface", torch.float32), ("cosface", torch.bfloat16)], ids=str
    )
    def test_triton_matches_torch(self, kind, dtype, monkeypatch):
        from pml_extras.ops import class_lse_triton as clt

        calls = []
        real_forward = clt.forward

        def spy(*args, **kwargs):
            calls.append(args[4])  # the transform kind
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(clt, "forward", spy)
        B, D, C, block_c = 5, 16, 41, 8
        x, W, y = make_data(B, D, C, seed=5, dtype=dtype)
        y = boundary_labels(y, C, block_c)
        out = {}
        for impl in ("torch", "triton"):
            with clt.block_config(block_m=4, block_c=block_c, block_d=8):
                out[impl] = module_losses_and_grads(kind, x, W, y, impl=impl)
            assert calls == ([] if impl == "torch" else ["scaled"]), calls
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, a, b in zip(("loss", "d/dx", "d/dW"), out["triton"], out["torch"]):
            assert torch.isfinite(a).all()
            assert_close(a, b, rtol=tol, what=name)
