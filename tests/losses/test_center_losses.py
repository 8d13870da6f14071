"""CenterLoss (Wen et al. 2016) and StandaloneCenterLoss against the naive references.

Covers: per-sample values and gradients, the paper's center update over several steps,
LpDistance settings, rejected distances, the two inter forms, sub-losses, mined negative
pairs, ref_emb, dtypes, gradcheck and finiteness at coincident points.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)
from sorted_add import record_only, take_cuda_branch

from pml_extras.functional import center_loss, center_update, standalone_center_loss
from pml_extras.losses import CenterLoss, StandaloneCenterLoss
from pml_extras.ops.tolerances import REFERENCE

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64

# (p, power, normalize_embeddings): the default squared Euclidean and other LpDistances.
LP_SETTINGS = [
    (2, 2, False),
    (1, 1, False),
    (2, 1, False),
    (1, 2, False),
    (2, 2, True),
    (1, 1, True),
]
lp_settings = st.sampled_from(LP_SETTINGS)


def make_data(B, D, C, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=F64).to(dtype)
    centers = torch.randn(C, D, generator=g, dtype=F64).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return x, centers, y


def distance(p, power, normalize):
    return LpDistance(p=p, power=power, normalize_embeddings=normalize)


def _with_centers(cls, centers, **kwargs):
    """A ``cls`` (C, D) loss in the centers' dtype, holding a copy of ``centers``."""
    C, D = centers.shape
    loss_fn = cls(C, D, **kwargs).to(centers.dtype)
    with torch.no_grad():
        loss_fn.centers.copy_(centers)
    return loss_fn


def make_center(centers, **kwargs):
    return _with_centers(CenterLoss, centers, **kwargs)


def make_standalone(centers, **kwargs):
    return _with_centers(StandaloneCenterLoss, centers, **kwargs)


def assert_close(a, b, rtol, atol, what=""):
    a, b = torch.as_tensor(a).detach().to(F64), torch.as_tensor(b).detach().to(F64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def grads_of(value, inputs):
    out = torch.autograd.grad(value, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, out)]


def weights_like(n, seed=0):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5


# ----------------------------------------------------------------------------------------
# CenterLoss
# ----------------------------------------------------------------------------------------


def test_default_distance_is_squared_euclidean():
    loss_fn = CenterLoss(5, 3)
    d = loss_fn.distance
    assert type(d) is LpDistance
    assert (d.p, d.power, d.normalize_embeddings) == (2, 2, False)
    x, centers, y = make_data(7, 3, 5, seed=0)
    loss_fn = make_center(centers)
    expected = sum(float(((x[i] - centers[y[i]]) ** 2).sum()) for i in range(7)) / 7
    assert abs(float(loss_fn(x, y).detach()) - expected) <= 1e-12 * expected


@given(
    B=st.integers(1, 10),
    D=st.integers(1, 8),
    C=st.integers(1, 6),
    lp=lp_settings,
    seed=st.integers(0, 2**31 - 1),
)
def test_center_loss_matches_reference(B, D, C, lp, seed):
    p, power, normalize = lp
    x, centers, y = make_data(B, D, C, seed)
    loss_fn = make_center(centers, distance=distance(p, power, normalize))
    xa = x.clone().requires_grad_(True)
    per = loss_fn.compute_loss(xa, y, None, xa, y)["loss"]["losses"]
    w = weights_like(B, seed)
    gx, gc = grads_of((per * w).sum(), [xa, loss_fn.centers])
    xr, cr = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    per_r = ref.center_losses(xr, cr, y, p, power, normalize)
    gx_r, gc_r = grads_of((per_r * w).sum(), [xr, cr])
    assert_close(per, per_r, rtol=1e-10, atol=1e-12, what="per-sample")
    assert_close(gx, gx_r, rtol=1e-8, atol=1e-10, what="d/dx")
    assert_close(gc, gc_r, rtol=1e-8, atol=1e-10, what="d/dcenters")
    # Reduced with the default MeanReducer: Wen et al.'s L_C = mean_i d(x_i, c_{y_i}).
    assert_close(loss_fn(x, y), per_r.mean(), rtol=1e-10, atol=1e-12, what="mean")


@pytest.mark.parametrize("alpha", [0.5, 0.1, 1.0])
def test_paper_update_rule_over_several_steps(alpha):
    B, D, C, steps = 9, 4, 6, 4
    _, centers0, _ = make_data(1, D, C, seed=1)
    loss_fn = make_center(centers0, update_rule="paper", alpha=alpha)
    assert "centers" in dict(loss_fn.named_buffers())
    assert len(list(loss_fn.parameters())) == 0  # no optimizer can touch them
    loss_fn.train()
    expected_centers = centers0.clone()
    for step in range(steps):
        x, _, y = make_data(B, D, C, seed=10 + step)
        y[0] = 0  # class 0 always present; the draw leaves some classes absent
        loss = loss_fn(x, y)
        # The loss uses the centers from *before* this step's update.
        expected_loss = ref.center_losses(x, expected_centers, y).mean()
        assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12, what=f"loss step {step}")
        expected_centers = ref.center_update_paper(expected_centers, x, y, alpha)
        assert_close(
            loss_fn.centers, expected_centers, rtol=1e-10, atol=1e-12, what=f"centers {step}"
        )
        absent = [j for j in range(C) if j not in set(y.tolist())]
        before = ref.center_update_paper(expected_centers, x[:0], y[:0], alpha)
        for j in absent:  # classes absent from the batch do not move
            assert torch.equal(before[j], expected_centers[j])
    # Evaluation mode: no update.
    loss_fn.eval()
    snapshot = loss_fn.centers.clone()
    x, _, y = make_data(B, D, C, seed=99)
    loss_fn(x, y)
    assert torch.equal(loss_fn.centers, snapshot)


def test_functional_center_update_matches_reference_and_does_not_mutate():
    x, centers, y = make_data(12, 3, 4, seed=5)
    x_copy, c_copy = x.clone(), centers.clone()
    new = center_update(centers, x, y, 0.5)
    assert torch.equal(x, x_copy) and torch.equal(centers, c_copy)
    assert_close(new, ref.center_update_paper(centers, x, y, 0.5), 1e-12, 1e-12, "update")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_functional_center_update_counts_and_sums_in_float32(dtype):
    """Half centers: a class with 300 rows of one batch (a count past bf16's 256) and
    small embeddings; the update, computed in float32 and returned in the centers' dtype,
    is the float64 reference rounded once (at most one ulp of the dtype away)."""
    g = torch.Generator().manual_seed(3)
    C, D = 3, 4
    y = torch.cat([torch.zeros(300, dtype=torch.long), torch.tensor([1, 1, 2])])
    x = torch.randn(y.numel(), D, generator=g) * 0.01 + 1.0
    centers = (torch.randn(C, D, generator=g) * 0.1).to(dtype)
    new = center_update(centers, x, y, 0.5)
    assert new.dtype == dtype
    want = ref.center_update_paper(centers, x, y, 0.5)
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((new.double() - want).abs() <= ulp).all(), (new.double() - want).abs().max()


def test_paper_update_uses_the_sorted_add_on_cuda(monkeypatch):
    """With the tensors counted as CUDA, CenterLoss's paper update sums each class's
    embeddings through add_rows_deterministic_ (one call per training forward, the batch's
    labels and rows) and still equals Wen et al.'s update in float64; on CPU the path
    never calls it, and evaluation mode no update at all."""
    B, D, C = 11, 3, 4
    x, centers0, y = make_data(B, D, C, seed=7)
    y[:4] = torch.tensor([2, 2, 2, 0])  # a class with several rows
    loss_fn = make_center(centers0, update_rule="paper", alpha=0.5)
    loss_fn.train()
    cpu_calls = record_only(monkeypatch, "add_rows_deterministic_")
    loss_fn(x, y)
    assert cpu_calls == []
    expected = ref.center_update_paper(centers0, x, y, 0.5)
    assert_close(loss_fn.centers, expected, 1e-12, 1e-12, "centers, CPU branch")
    calls = take_cuda_branch(monkeypatch, "add_rows_deterministic_")
    loss_fn(x, y)
    assert len(calls) == 1
    (call,) = calls
    assert call.out_shape == (C, D) and call.src_shape == (B, D) and call.dtype == F64
    assert torch.equal(call.index, y)
    expected = ref.center_update_paper(expected, x, y, 0.5)
    assert_close(loss_fn.centers, expected, 1e-12, 1e-12, "centers, CUDA branch")
    loss_fn.eval()
    loss_fn(x, y)
    assert len(calls) == 1


def test_gradient_update_rule_centers_learn_by_gradient():
    x, centers, y = make_data(8, 3, 4, seed=6)
    loss_fn = make_center(centers, update_rule="gradient")
    assert isinstance(loss_fn.centers, torch.nn.Parameter)
    before = loss_fn.centers.detach().clone()
    loss = loss_fn(x, y)
    assert torch.equal(loss_fn.centers, before)  # forward alone does not move them
    loss.backward()
    # d/dc_j mean_i ||x_i - c_{y_i}||^2 = 2/B * sum_{y_i=j} (c_j - x_i)
    expected = torch.zeros_like(centers)
    for i in range(8):
        expected[y[i]] += 2.0 / 8 * (centers[y[i]] - x[i])
    assert_close(loss_fn.centers.grad, expected, 1e-12, 1e-12, "center gradient")


@pytest.mark.parametrize("loss_cls", [CenterLoss, StandaloneCenterLoss])
@pytest.mark.parametrize(
    "dist",
    [CosineSimilarity(), DotProductSimilarity(), SNRDistance()],
    ids=["cosine", "dot", "snr"],
)
def test_unsupported_distances_raise_at_construction(loss_cls, dist):
    with pytest.raises(ValueError, match="LpDistance") as info:
        loss_cls(5, 3, distance=dist)
    assert type(dist).__name__ in str(info.value)


@pytest.mark.parametrize("loss_cls", [CenterLoss, StandaloneCenterLoss])
@pytest.mark.parametrize("lp", LP_SETTINGS)
def test_supported_lp_distances_construct_and_run(loss_cls, lp):
    x, _, y = make_data(6, 3, 4, seed=7)
    loss_fn = loss_cls(4, 3, distance=distance(*lp)).double()
    loss = loss_fn(x, y)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------------------
# StandaloneCenterLoss
# ----------------------------------------------------------------------------------------


def sub_losses(loss_fn, x, y, **kwargs):
    """(intra, inter) per-sample tensors as the module hands them to reducers."""
    original = loss_fn.reducer
    loss_fn.reducer = pml_reducers.DoNothingReducer()
    try:
        out = loss_fn(x, y, **kwargs)
    finally:
        loss_fn.reducer = original
    assert set(out) == {"intra_loss", "inter_loss"}
    for v in out.values():
        assert v["reduction_type"] == "element"
    return out["intra_loss"]["losses"], out["inter_loss"]["losses"]


@given(
    B=st.integers(1, 9),
    D=st.integers(1, 6),
    C=st.integers(1, 4),
    form=st.sampled_from(["log", "log1p"]),
    intra_w=st.sampled_from([1.0, 0.3]),
    inter_w=st.sampled_from([0.1, 1.0]),
    lp=lp_settings,
    seed=st.integers(0, 2**31 - 1),
)
def test_standalone_matches_reference(B, D, C, form, intra_w, inter_w, lp, seed):
    p, power, normalize = lp
    x, centers, y = make_data(B, D, C, seed)
    # Normalised 1-D embeddings are +-1: coincident points, where the reference's plain
    # log(0) is -inf (the finite clamp is tested in test_finite_at_coincident_points).
    assume(not (normalize and D == 1))
    loss_fn = make_standalone(
        centers,
        intra_weight=intra_w,
        inter_weight=inter_w,
        inter_form=form,
        distance=distance(p, power, normalize),
    )
    xa = x.clone().requires_grad_(True)
    intra, inter = sub_losses(loss_fn, xa, y)
    xr, cr = x.clone().requires_grad_(True), centers.clone().requires_grad_(True)
    intra_r, inter_r = ref.standalone_center_terms(
        xr, cr, y, form, p=p, power=power, normalize=normalize
    )
    assert_close(intra, intra_w * intra_r, 1e-10, 1e-12, "intra per sample")
    assert_close(inter, inter_w * inter_r, 1e-10, 1e-10, "inter per sample")
    w1, w2 = weights_like(B, seed), weights_like(B, seed + 1)
    g = grads_of((intra * w1).sum() + (inter * w2).sum(), [xa, loss_fn.centers])
    g_r = grads_of((intra_w * intra_r * w1).sum() + (inter_w * inter_r * w2).sum(), [xr, cr])
    for a, b, name in zip(g, g_r, ["d/dx", "d/dcenters"]):
        assert_close(a, b, 1e-8, 1e-9 * max(1.0, float(b.abs().max())), name)
    # Default reducer: intra_w * L_intra + inter_w * L_inter, both means over the batch.
    total = loss_fn(x, y)
    expected = intra_w * intra_r.mean() + inter_w * inter_r.mean()
    assert_close(total, expected, 1e-10, 1e-10, "total")


def test_all_same_label_has_zero_inter():
    x, centers, y = make_data(6, 3, 3, seed=8)
    y[:] = 2
    for form in ["log", "log1p"]:
        intra, inter = sub_losses(make_standalone(centers, inter_form=form), x, y)
        assert torch.equal(inter, torch.zeros_like(inter))
        assert (intra > 0).all()


def test_sub_losses_are_separately_reduced():
    x, centers, y = make_data(10, 4, 3, seed=9)
    reducer = pml_reducers.MultipleReducers(
        {"intra_loss": pml_reducers.SumReducer(), "inter_loss": pml_reducers.MeanReducer()}
    )
    loss_fn = make_standalone(centers, intra_weight=0.7, inter_weight=0.2, reducer=reducer)
    intra_r, inter_r = ref.standalone_center_terms(x, centers, y)
    expected = 0.7 * intra_r.sum() + 0.2 * inter_r.mean()
    assert_close(loss_fn(x, y), expected, 1e-10, 1e-10, "sum(intra) + mean(inter)")


@pytest.mark.parametrize("form", ["log", "log1p"])
@pytest.mark.parametrize("miner_name", ["pair_margin", "triplet", "hand_made"])
def test_inter_restricted_to_mined_negative_pairs(form, miner_name):
    x, centers, y = make_data(12, 3, 3, seed=10)
    if miner_name == "pair_margin":
        miner = pml_miners.PairMarginMiner(pos_margin=0.0, neg_margin=1.2)
        indices = miner(x, y)
        pairs = list(zip(indices[2].tolist(), indices[3].tolist()))
    elif miner_name == "triplet":
        miner = pml_miners.TripletMarginMiner(margin=0.5, type_of_triplets="all")
        indices = miner(x, y)
        pairs = list(zip(indices[0].tolist(), indices[2].tolist()))  # repeats: one per positive
    else:
        a = torch.tensor([0, 0, 3, 0, 5])
        n = torch.tensor([1, 1, 4, 1, 6])  # (0, 1) three times counts once
        keep = y[a] != y[n]
        empty = torch.zeros(0, dtype=torch.long)
        indices = (empty, empty, a[keep], n[keep])
        pairs = list(zip(a[keep].tolist(), n[keep].tolist()))
    all_negatives = sum(int(y[i] != y[j]) for i in range(12) for j in range(12))
    assert 0 < len(set(pairs)) < all_negatives  # the miner really restricted something
    loss_fn = make_standalone(centers, inter_form=form, inter_weight=1.0)
    xa = x.clone().requires_grad_(True)
    intra, inter = sub_losses(loss_fn, xa, y, indices_tuple=indices)
    xr = x.clone().requires_grad_(True)
    intra_r, inter_r = ref.standalone_center_terms(xr, centers, y, form, negative_pairs=pairs)
    assert_close(intra, intra_r, 1e-10, 1e-12, "intra (miner does not restrict it)")
    assert_close(inter, inter_r, 1e-10, 1e-10, "inter over mined pairs")
    g = grads_of(inter.sum(), [xa])[0]
    g_r = grads_of(inter_r.sum(), [xr])[0]
    assert_close(g, g_r, 1e-8, 1e-10, "d inter / dx")


@pytest.mark.parametrize("form", ["log", "log1p"])
def test_ref_emb_replaces_the_batch_in_the_inter_term(form):
    x, centers, y = make_data(5, 3, 4, seed=11)
    r, _, ry = make_data(7, 3, 4, seed=12)
    loss_fn = make_standalone(centers, inter_form=form, inter_weight=0.5)
    xa, ra = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    intra, inter = sub_losses(loss_fn, xa, y, ref_emb=ra, ref_labels=ry)
    xr, rr = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    intra_r, inter_r = ref.standalone_center_terms(xr, centers, y, form, ref_emb=rr, ref_labels=ry)
    assert_close(intra, intra_r, 1e-10, 1e-12, "intra")
    assert_close(inter, 0.5 * inter_r, 1e-10, 1e-10, "inter against ref_emb")
    g = grads_of(inter.sum(), [xa, ra])
    g_r = grads_of(0.5 * inter_r.sum(), [xr, rr])
    for a, b in zip(g, g_r):
        assert_close(a, b, 1e-8, 1e-10, "gradient with ref_emb")
    # And it differs from the batch-only loss.
    _, inter_self = sub_losses(loss_fn, x, y)
    assert not torch.allclose(inter_self, inter)


# ----------------------------------------------------------------------------------------
# dtypes, gradcheck, extremes
# ----------------------------------------------------------------------------------------

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The losses are computed in float32 (float64 for float64) from the rounded inputs; only
# the gradients are rounded back to the embedding dtype.
TOL = REFERENCE["center"]  # pml_extras/ops/tolerances.py, the one table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(4, 3, 2), (33, 16, 10)], ids=str)
@pytest.mark.parametrize("which", ["center", "standalone_log", "standalone_log1p"])
def test_dtypes_against_reference(dtype, shape, which):
    B, D, C = shape
    x, centers, y = make_data(B, D, C, seed=B + D)
    x, centers = x.to(dtype), centers.to(dtype)
    if which == "center":
        loss_fn = make_center(centers)
    else:
        loss_fn = make_standalone(centers, inter_form=which.split("_")[1])
    xa = x.clone().requires_grad_(True)
    loss = loss_fn(xa, y)
    loss.backward()
    assert torch.isfinite(loss)
    # float32 or wider for both (StandaloneCenterLoss's two sub-losses are no longer
    # summed in the embeddings' dtype by PML's MultipleReducers, issue 18).
    assert loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert xa.grad.dtype == dtype and loss_fn.centers.grad.dtype == dtype
    xr, cr = x.to(F64).requires_grad_(True), centers.to(F64).requires_grad_(True)
    if which == "center":
        expected = ref.center_losses(xr, cr, y).mean()
    else:
        intra_r, inter_r = ref.standalone_center_terms(xr, cr, y, which.split("_")[1])
        expected = intra_r.mean() + 0.1 * inter_r.mean()
    expected.backward()
    ltol, gtol = TOL[dtype]
    if loss.dtype == dtype:
        ltol = max(ltol, torch.finfo(dtype).eps)
    assert_close(loss, expected, ltol, ltol * float(expected.detach().abs()), "loss")
    assert_close(xa.grad, xr.grad, gtol, gtol * float(xr.grad.abs().max()), "d/dx")
    assert_close(loss_fn.centers.grad, cr.grad, gtol, gtol * float(cr.grad.abs().max()), "d/dc")


@pytest.mark.parametrize("lp", LP_SETTINGS)
def test_gradcheck_center_loss(lp):
    x, centers, y = make_data(5, 3, 3, seed=13)
    x.requires_grad_(True)
    centers.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, c_: center_loss(x_, c_, y, *lp).mean(), (x, centers))


@pytest.mark.parametrize("form", ["log", "log1p"])
@pytest.mark.parametrize("lp", [(2, 2, False), (1, 1, False), (1, 2, False), (2, 1, True)])
@pytest.mark.parametrize("mined", [False, True])
def test_gradcheck_standalone(form, lp, mined):
    x, centers, y = make_data(6, 3, 3, seed=14)
    x.requires_grad_(True)
    centers.requires_grad_(True)
    pairs = (torch.tensor([0, 1, 1, 4]), torch.tensor([2, 3, 5, 0])) if mined else None

    def f(x_, c_):
        intra, inter = standalone_center_loss(
            x_,
            c_,
            y,
            inter_form=form,
            negative_pairs=pairs,
            p=lp[0],
            power=lp[1],
            normalize_embeddings=lp[2],
        )
        return intra.mean() + 0.1 * inter.mean()

    assert torch.autograd.gradcheck(f, (x, centers))


@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    form=st.sampled_from(["log", "log1p"]),
    B=st.integers(2, 8),
    D=st.integers(1, 5),
    C=st.integers(1, 4),
    copies=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=6),
    at_center=st.booleans(),
    # Up to 10: beyond that squared distances overflow fp16 once PML's MultipleReducers
    # sums the two (fp32) sub-losses in the embeddings' dtype.
    magnitude=st.sampled_from([1e-3, 1.0, 10.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_finite_at_coincident_points(dtype, form, B, D, C, copies, at_center, magnitude, seed):
    x, centers, y = make_data(B, D, C, seed, dtype=torch.float32)
    x, centers = x * magnitude, centers * magnitude
    for src, dst in copies:  # exact duplicates, often with different labels
        x[dst % B] = x[src % B]
    if at_center:
        x[0] = centers[y[0]]
    x = x.to(dtype).requires_grad_(True)
    loss_fn = make_standalone(centers.to(dtype), inter_form=form)
    out = sub_losses(loss_fn, x, y)
    loss = loss_fn(x, y)
    loss.backward()
    assert all(torch.isfinite(t).all() for t in out)
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.centers.grad).all()
    x2 = x.detach().clone().requires_grad_(True)
    center = make_center(centers.to(dtype))
    center(x2, y).backward()
    assert torch.isfinite(x2.grad).all() and torch.isfinite(center.centers.grad).all()


@pytest.mark.parametrize("cls", [CenterLoss, StandaloneCenterLoss])
@pytest.mark.parametrize("p, power, normalize", LP_SETTINGS[:3])
def test_get_logits_are_minus_the_distance_to_every_center(cls, p, power, normalize):
    g = torch.Generator().manual_seed(7)
    loss_fn = cls(5, 3, distance=LpDistance(p=p, power=power, normalize_embeddings=normalize))
    loss_fn = loss_fn.double()
    x = torch.randn(6, 3, generator=g, dtype=F64)
    logits = loss_fn.get_logits(x)
    centers = loss_fn.centers.detach()
    expected = torch.tensor(
        [
            [-float(ref.lp_distance(x[i], centers[j], p, power, normalize)) for j in range(5)]
            for i in range(6)
        ],
        dtype=F64,
    )
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(logits.argmax(1), expected.argmax(1))  # nearest center
    with pytest.raises(ValueError, match=f"{cls.__name__}: embeddings have size 4"):
        loss_fn.get_logits(torch.randn(2, 4, dtype=F64))
