"""ArcFaceLoss and CosFaceLoss: blockwise drop-ins for PML's dense ones.

* against the float64 references of tests/helpers/reference.py (per-class loop for small cases,
  dense cross-entropy for the larger ones), loss and gradients, over dtypes, odd shapes and
  chunk sizes with labels on chunk boundaries;
* against PML's ``ArcFaceLoss`` / ``CosFaceLoss`` with the same W: per sample, reduced,
  gradients, miners, reducers, weight regularizers, get_logits and state_dict loading;
* finite losses and gradients at cos = +-1 exactly, scale 64, in fp16/bf16 (PML's
  ArcFace has infinite/NaN gradients there);
* degenerate and bad input; the Triton kernels under the interpreter, in a child process.
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
from proxy_cases import facing_away, make_data, placement_patterns, rows_on_proxies  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402
from pytorch_metric_learning.distances import (  # noqa: E402
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)

from pml_extras.functional import arcface_loss, cosface_loss  # noqa: E402
from pml_extras.losses import ArcFaceLoss, CosFaceLoss  # noqa: E402
from pml_extras.ops.tolerances import REFERENCE  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
KINDS = ("arcface", "cosface")
OURS = {"arcface": ArcFaceLoss, "cosface": CosFaceLoss}
PML = {"arcface": pml_losses.ArcFaceLoss, "cosface": pml_losses.CosFaceLoss}
# The module's margin argument (degrees for ArcFace, as in PML) and the functional's.
PAPER_MARGIN = {"arcface": 28.6, "cosface": 0.35}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def functional_margin(kind, margin):
    """The functional's margin (radians for ArcFace) from the module's."""
    return math.radians(margin) if kind == "arcface" else margin


def functional(kind):
    return arcface_loss if kind == "arcface" else cosface_loss


def make_loss(kind, W, pml=False, margin=None, **kwargs):
    D, C = W.shape
    cls = PML[kind] if pml else OURS[kind]
    margin = PAPER_MARGIN[kind] if margin is None else margin
    loss_fn = cls(C, D, margin=margin, **kwargs).to(W.dtype)
    with torch.no_grad():
        loss_fn.W.copy_(W)
    return loss_fn


def per_sample(loss_fn, x, y, indices_tuple=None):
    return loss_fn.compute_loss(x, y, indices_tuple, x, y)["loss"]["losses"]


def value_and_grads(fn, *inputs, seed=123):
    """fn(*inputs) -> (B,); value and gradients of a randomly weighted sum of it."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(out.shape, generator=g, dtype=F64) + 0.5).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out.detach(), grads


def assert_close(a, b, rtol, atol=None, what=""):
    a, b = torch.as_tensor(a).detach().to(F64), torch.as_tensor(b).detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if atol is None:  # relative to the largest entry of the expected tensor
        atol = rtol * max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def boundary_labels(y, C, chunk):
    """Put labels on the first/last class of a chunk and of the whole range."""
    y = y.clone()
    special = [0, chunk - 1, chunk, 2 * chunk - 1, C - 1]
    for i, lab in enumerate(special[: y.shape[0]]):
        y[i] = min(lab, C - 1)
    return y


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
# The modules inside PML: miners, reducers, regularizers, logits, state_dict
# ----------------------------------------------------------------------------------------

B_, D_, C_ = 24, 8, 5


def clustered_batch(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(B_) % C_
    centers = torch.randn(C_, D_, generator=g, dtype=F64)
    x = torch.randn(B_, D_, generator=g, dtype=F64) + 2.0 * centers[y]
    return x.to(dtype), y


def pair(kind, seed=1, **kwargs):
    """(ours, PML's) with the same W (float64)."""
    W = torch.randn(D_, C_, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return make_loss(kind, W, **kwargs), make_loss(kind, W, pml=True, **kwargs)


REDUCERS = {
    "mean": pml_reducers.MeanReducer,
    "sum": pml_reducers.SumReducer,
    "avg_non_zero": pml_reducers.AvgNonZeroReducer,
    "threshold": lambda: pml_reducers.ThresholdReducer(low=5.0),
    "class_weighted": lambda: pml_reducers.ClassWeightedReducer(
        torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=F64)
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("miner", [None, "multi_similarity", "triplet"])
def test_miners_and_reducers_match_pml(kind, reducer, miner):
    x, y = clustered_batch(seed=2)
    ours, pml = pair(kind, reducer=REDUCERS[reducer]())
    indices = None
    if miner == "multi_similarity":
        indices = pml_miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    elif miner == "triplet":
        indices = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="semihard")(x, y)
    if indices is not None:
        counts = torch.bincount(torch.cat(indices), minlength=B_)
        assert len(set(counts.tolist())) > 1, "the miner should weight samples unequally"
    xo, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lo, lp = ours(xo, y, indices), pml(xp, y, indices)
    assert float(lp.detach()) != 0.0
    assert_close(lo, lp, rtol=1e-10, what="loss")
    lo.backward()
    lp.backward()
    assert_close(xo.grad, xp.grad, rtol=1e-9, what="d/dx")
    assert_close(ours.W.grad, pml.W.grad, rtol=1e-9, what="d/dW")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("regularizer", ["lp", "regular_face"])
def test_weight_regularizer_matches_pml(kind, regularizer):
    make = {
        "lp": pml_regularizers.LpRegularizer,
        "regular_face": pml_regularizers.RegularFaceRegularizer,
    }[regularizer]
    x, y = clustered_batch(seed=3)
    ours, pml = pair(kind, weight_regularizer=make(), weight_reg_weight=0.7)
    plain, _ = pair(kind)
    lo, lp = ours(x, y), pml(x, y)
    assert_close(lo, lp, rtol=1e-10, what="loss with the weight regularizer")
    # The regularizer is really there.
    assert abs(float(lo.detach()) - float(plain(x, y).detach())) > 1e-3
    lo.backward()
    lp.backward()
    assert_close(ours.W.grad, pml.W.grad, rtol=1e-9, what="d/dW")
    ours.reducer = pml_reducers.DoNothingReducer()
    pml.reducer = pml_reducers.DoNothingReducer()
    parts_o, parts_p = ours(x, y), pml(x, y)
    assert set(parts_o) == set(parts_p) == {"loss", "weight_reg_loss"}
    assert_close(parts_o["weight_reg_loss"]["losses"], parts_p["weight_reg_loss"]["losses"], 1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_from_pml_loads_and_gives_the_same_loss(kind):
    torch.manual_seed(4)
    pml = PML[kind](C_, D_, margin=PAPER_MARGIN[kind], scale=30)
    with torch.no_grad():
        pml.W.mul_(1.7)  # something weight_init_func would not produce
    ours = OURS[kind](C_, D_, margin=PAPER_MARGIN[kind], scale=30)
    assert not torch.equal(ours.W, pml.W)
    ours.load_state_dict(pml.state_dict())  # strict: same keys and shapes
    assert set(ours.state_dict()) == set(pml.state_dict()) == {"W"}
    assert ours.W.shape == (D_, C_)
    x, y = clustered_batch(seed=5, dtype=torch.float32)
    assert_close(ours(x, y), pml(x, y), rtol=2e-6, what="loss")
    assert_close(ours.get_logits(x), pml.get_logits(x), rtol=1e-5, what="get_logits")
    # And back: PML loads ours.
    fresh = PML[kind](C_, D_)
    fresh.load_state_dict(ours.state_dict())
    assert torch.equal(fresh.W, ours.W)


@pytest.mark.parametrize("kind", KINDS)
def test_same_defaults_and_initialisation_as_pml(kind):
    torch.manual_seed(8)
    pml = PML[kind](C_, D_)
    torch.manual_seed(8)
    ours = OURS[kind](C_, D_)
    assert torch.equal(ours.W, pml.W)  # same shape, same weight_init_func, same draws
    assert ours.margin == pytest.approx(float(pml.margin), rel=1e-12)  # radians for ArcFace
    assert ours.scale == pml.scale == 64
    assert type(ours.distance) is CosineSimilarity and type(ours.reducer) is type(pml.reducer)
    assert ours.num_classes == pml.num_classes == C_


@pytest.mark.parametrize("kind", KINDS)
def test_collect_stats_avg_angle(kind):
    x, y = clustered_batch(seed=9)
    ours, pml = pair(kind, collect_stats=True)
    ours(x, y)
    pml(x, y)
    assert ours.avg_angle == pytest.approx(float(pml.avg_angle), rel=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_half_embeddings_leave_parameters_and_inputs_alone(kind):
    x, y = clustered_batch(seed=6, dtype=torch.float16)
    ours, _ = pair(kind)
    ours.float()
    x_before = x.clone()
    loss = ours(x.requires_grad_(True), y)
    loss.backward()
    assert ours.W.dtype == torch.float32 and ours.W.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float16 and torch.equal(x.detach(), x_before)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------
# Degenerate and bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch_is_a_zero_loss_that_backpropagates(kind):
    ours, _ = pair(kind)
    trunk = torch.nn.Linear(3, D_).double()
    emb = trunk(torch.zeros(0, 3, dtype=F64))
    loss = ours(emb, torch.zeros(0, dtype=torch.long))
    assert loss.ndim == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert float(trunk.weight.grad.abs().sum()) == 0.0
    out = functional(kind)(emb, ours.W, torch.zeros(0, dtype=torch.long), 0.5, 64.0)
    assert out.shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
def test_single_class_is_a_zero_loss_like_pml(kind):
    W = torch.randn(D_, 1, dtype=F64)
    ours, pml = make_loss(kind, W), make_loss(kind, W, pml=True)
    x = torch.randn(6, D_, dtype=F64, requires_grad=True)
    y = torch.zeros(6, dtype=torch.long)
    loss = ours(x, y)
    loss.backward()
    assert float(loss.detach()) == 0.0 == float(pml(x, y).detach())
    assert float(x.grad.abs().sum()) == 0.0 and float(ours.W.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_bad_batches_raise_clear_errors(kind):
    ours, _ = pair(kind)
    x, y = clustered_batch()
    with pytest.raises(ValueError, match=f"embedding_size={D_}"):
        ours(torch.randn(B_, D_ + 1, dtype=F64), y)
    for bad in (-1, C_, C_ + 3):
        yb = y.clone()
        yb[4] = bad
        with pytest.raises(ValueError, match=rf"label {bad} is out of range.*num_classes={C_}"):
            ours(x, yb)
        with pytest.raises(ValueError, match=rf"label {bad} is out of range"):
            functional(kind)(x, ours.W, yb, 0.5, 64.0)
    with pytest.raises(ValueError, match="integer"):
        ours(x, y.double())
    with pytest.raises(ValueError, match="ref_emb"):
        ours(x, y, ref_emb=x[:3], ref_labels=y[:3])
    with pytest.raises(ValueError, match="embedding_size"):
        ours.get_logits(torch.randn(3, D_ + 2, dtype=F64))
    with pytest.raises(ValueError, match="size 3 in dim 1"):
        functional(kind)(x[:, :3], ours.W, y, 0.5, 64.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "make_dist",
    [LpDistance, DotProductSimilarity, lambda: CosineSimilarity(power=2)],
    ids=["lp", "dot", "cosine_power2"],
)
def test_non_cosine_distance_is_rejected(kind, make_dist):
    dist = make_dist()
    with pytest.raises(ValueError, match="CosineSimilarity") as info:
        OURS[kind](C_, D_, distance=dist)
    assert type(dist).__name__ in str(info.value)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ArcFaceLoss(0, D_), "num_classes"),
        (lambda: CosFaceLoss(C_, 0), "embedding_size"),
        (lambda: ArcFaceLoss(C_, D_, scale=0), "scale"),
        (lambda: CosFaceLoss(C_, D_, scale=-64), "scale"),
        (lambda: ArcFaceLoss(C_, D_, margin=180.0), "margin"),
        (lambda: CosFaceLoss(C_, D_, margin=float("nan")), "margin"),
        (lambda: ArcFaceLoss(C_, D_, impl="cuda"), "impl"),
        (lambda: CosFaceLoss(C_, D_, chunk_size=0), "chunk_size"),
        (lambda: arcface_loss(torch.ones(2, 3), torch.ones(3, 4), torch.tensor([0, 1]), 4), "pi"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


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


# ----------------------------------------------------------------------------------------
# The base class and the old helper names
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["arcface_loss", "cosface_loss"])
@pytest.mark.parametrize("kind", KINDS)
def test_deprecated_margin_helpers_still_work(module, kind):
    import importlib

    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin

    mod = importlib.import_module(f"pml_extras.losses.{module}")
    with pytest.warns(DeprecationWarning, match=f"{module}.init_margin_loss is deprecated"):
        init_margin_loss = mod.init_margin_loss
    with pytest.warns(DeprecationWarning, match="margin_loss_dict is deprecated"):
        margin_loss_dict = mod.margin_loss_dict
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        mod.nonexistent  # noqa: B018
    current = OURS[kind]

    class OldStyle(WeightRegularizerMixin, BaseMetricLossFunction):
        # A loss written against the old helpers, as ArcFaceLoss/CosFaceLoss were.
        def __init__(self, num_classes, embedding_size, **kwargs):
            super().__init__(**kwargs)
            self.margin = current.resolve_hyper_parameters(num_classes, embedding_size)["margin"]
            init_margin_loss(self, num_classes, embedding_size, 64.0, None, "auto")

        def get_default_distance(self):
            return CosineSimilarity()

        def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
            target = current.modify_cosine_of_target_classes
            return margin_loss_dict(
                self,
                lambda c: target(self, c),
                embeddings,
                labels,
                indices_tuple,
                ref_emb,
                ref_labels,
            )

    torch.manual_seed(3)
    old = OldStyle(C_, D_, collect_stats=True)
    torch.manual_seed(3)
    new = current(C_, D_, collect_stats=True)
    assert torch.equal(old.W, new.W)
    x, y = clustered_batch(seed=2, dtype=torch.float32)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.5)
    assert torch.equal(old(x, y, miner(x, y)), new(x, y, miner(x, y)))
    assert old.avg_angle == new.avg_angle


def test_a_new_proxy_loss_needs_its_formula_and_defaults_only():
    from pml_extras.losses import BaseProxyLoss

    class NormSoftmaxLoss(BaseProxyLoss):
        def __init__(self, num_classes, embedding_size, scale=16.0, **kwargs):
            super().__init__(num_classes, embedding_size, {"scale": scale}, **kwargs)

        @classmethod
        def resolve_hyper_parameters(cls, num_classes, embedding_size, owner=None, scale=16.0):
            cls.check_values(owner or cls.__name__, positive={"scale": scale})
            return {"scale": float(scale)}

    class OwnFormula(NormSoftmaxLoss):
        def per_sample_losses(self, embeddings, labels):
            return F.cross_entropy(self.get_logits(embeddings), labels, reduction="none")

    # The base's default formula (margin softmax, identity target: a normalised softmax)
    # and an overriding one give the same loss.
    x, y = clustered_batch(seed=1, dtype=F64)
    torch.manual_seed(0)
    default = NormSoftmaxLoss(C_, D_).double()(x, y)
    torch.manual_seed(0)
    assert_close(default, OwnFormula(C_, D_).double()(x, y), 1e-12, what="default formula")
    torch.manual_seed(0)
    loss_fn = OwnFormula(C_, D_, weight_regularizer=pml_regularizers.LpRegularizer())
    loss_fn = loss_fn.double()
    # The base's PML machinery: validation, miner weights, regularizer, reducer.
    logits = 16.0 * F.normalize(x, dim=1) @ F.normalize(loss_fn.W.detach(), dim=0)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.5)
    mined = miner(x, y)
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    w = lmu.convert_to_weights(mined, y, dtype=F64)
    expected = (F.cross_entropy(logits, y, reduction="none") * w).mean()
    expected = expected + loss_fn.W.detach().t().norm(dim=1).mean()
    assert_close(loss_fn(x, y, mined), expected, 1e-12, what="base-class loss")
    with pytest.raises(ValueError, match="NormSoftmaxLoss: scale must be > 0, got -1"):
        NormSoftmaxLoss(C_, D_, scale=-1)
    with pytest.raises(ValueError, match=f"label {C_} is out of range"):
        loss_fn(x, torch.full_like(y, C_))
    with pytest.raises(ValueError, match="does not support ref_emb"):
        loss_fn(x, y, ref_emb=x[:2], ref_labels=y[:2])


def test_no_loss_module_imports_another():
    # Each loss file imports the base and lower layers, never a sibling loss module.
    import ast
    import pathlib

    import pml_extras.losses as L

    folder = pathlib.Path(L.__file__).parent
    modules = {p.stem for p in folder.glob("*_loss.py")} - {"base_proxy_loss"}
    for path in folder.glob("*_loss.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = {node.module} | {a.name for a in node.names if node.module is None}
                assert not names & modules, f"{path.name} imports {names & modules}"


def test_distributed_uses_public_or_base_class_names():
    # pml_extras.distributed reaches the loss layers through public names only.
    import ast
    import pathlib

    import pml_extras.distributed as dist_

    for path in pathlib.Path(dist_.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 2 and node.module):
                continue
            parts = node.module.split(".")
            if parts[0] not in ("losses", "functional"):
                continue
            private = [p for p in parts if p.startswith("_")]
            private += [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{path.name}: from ..{node.module} import {private}"
