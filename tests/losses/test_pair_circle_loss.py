"""Pair-level CircleLoss: equality with PML's CircleLoss (all pairs, hypothesis), numerics,
degenerate batches, gradients, PML integration. Mined pairs: test_pair_circle_mined.py;
the chunked pair similarity: tests/ops/test_pair_gather.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pair_circle_cases import (
    HYPO,
    PAPER_SETTINGS,
    assert_close,
    compare_with_pml,
    grads,
    make_batch,
)
from pytorch_metric_learning import distances, miners, reducers, regularizers
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses.circle_loss import CircleLoss
from pml_extras.ops.pair_circle import (
    all_pairs_circle_loss,
    mined_pairs_circle_loss,
    resolve_block_size,
)

# ---------------------------------------------------------------------------------------------
# Equality with PML, all pairs


def _all_pairs_cases():
    cases = []
    for i, (batch, dim, block, with_ref) in enumerate(
        itertools.product([1, 7, 41], [3, 16], [1, 6, 64], [False, True])
    ):
        if batch == 41 and block == 1:
            block = (1, 64)  # 1x1 blocks over 41 x 44 pairs are slow and add no coverage
        cases.append((batch, dim, block, with_ref, PAPER_SETTINGS[i % 3]))
    return cases


@pytest.mark.parametrize("batch,dim,block,with_ref,mg", _all_pairs_cases())
def test_matches_pml_all_pairs(batch, dim, block, with_ref, mg):
    m, gamma = mg
    emb, labels = make_batch(batch, dim, 3 if batch < 10 else 5, seed=batch * 100 + dim)
    ref_emb = ref_labels = None
    if with_ref:
        ref_emb, ref_labels = make_batch(batch + 3, dim, 4, seed=batch + dim + 7)
    losses = compare_with_pml(
        emb, labels, m=m, gamma=gamma, block_size=block, ref_emb=ref_emb, ref_labels=ref_labels
    )
    if batch >= 7:
        assert (losses > 0).any()  # the comparison must not be vacuous


def test_ref_labels_identity_drops_diagonal_like_pml():
    emb, labels = make_batch(9, 4, 3, seed=1)
    ref_emb = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    # PML drops (i, i) when ref_labels is the labels object itself, or missing.
    compare_with_pml(emb, labels, ref_emb=ref_emb, ref_labels=labels, block_size=4)
    compare_with_pml(emb, labels, ref_emb=ref_emb, ref_labels=None, block_size=4)
    # an equal but distinct tensor keeps the diagonal, as in PML
    compare_with_pml(emb, labels, ref_emb=ref_emb, ref_labels=labels.clone(), block_size=4)


def test_ref_emb_without_ref_labels_of_other_size_raises():
    emb, labels = make_batch(5, 3, 2, seed=2)
    with pytest.raises(ValueError, match="ref_labels"):
        CircleLoss()(emb, labels, ref_emb=torch.randn(6, 3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Equality with PML, mined pairs


MINERS = {
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.5),
    "pair_margin": lambda: miners.PairMarginMiner(
        pos_margin=0.8, neg_margin=-0.1, distance=distances.CosineSimilarity()
    ),
    "triplet_margin": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
}


@pytest.mark.parametrize("miner_name", sorted(MINERS))
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("batch,mg", [(7, PAPER_SETTINGS[0]), (23, PAPER_SETTINGS[2])])
def test_matches_pml_with_miners(miner_name, with_ref, batch, mg):
    m, gamma = mg
    emb, labels = make_batch(batch, 16, 3, seed=batch + 11)
    ref_emb = ref_labels = None
    if with_ref:
        ref_emb, ref_labels = make_batch(batch + 5, 16, 3, seed=batch + 12)
    indices = MINERS[miner_name]()(emb, labels, ref_emb, ref_labels)
    assert len(indices) == (3 if miner_name == "triplet_margin" else 4)
    assert sum(len(t) for t in indices) > 4
    losses = compare_with_pml(
        emb, labels, m=m, gamma=gamma, indices_tuple=indices, ref_emb=ref_emb, ref_labels=ref_labels
    )
    assert (losses > 0).any()


@pytest.mark.parametrize("tuple_size", [3, 4])
def test_duplicate_mined_pairs_count_once(tuple_size):
    emb, labels = make_batch(12, 5, 3, seed=3)
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    if tuple_size == 3:
        indices = lmu.get_all_triplets_indices(labels)  # every (a, p) repeats per negative
    else:
        perm = torch.randperm(len(a1), generator=torch.Generator().manual_seed(0))
        indices = (torch.cat([a1, a1[perm]]), torch.cat([p, p[perm]]), a2, n.clone())
        indices = (indices[0], indices[1], torch.cat([a2, a2[:5]]), torch.cat([n, n[:5]]))
    dup = compare_with_pml(emb, labels, indices_tuple=indices)
    plain = CircleLoss(reducer=reducers.DoNothingReducer())(emb, labels)["loss"]["losses"]
    assert_close(dup, plain)


def test_mined_all_pairs_equals_blockwise_all_pairs():
    emb, labels = make_batch(17, 6, 4, seed=4)
    ref_emb, ref_labels = make_batch(13, 6, 4, seed=5)
    indices = lmu.get_all_pairs_indices(labels, ref_labels)
    kw = dict(ref_emb=ref_emb, ref_labels=ref_labels)
    fn = CircleLoss(m=0.25, gamma=128, block_size=5, reducer=reducers.DoNothingReducer())
    blockwise = fn(emb, labels, **kw)["loss"]["losses"]
    mined = fn(emb, labels, indices_tuple=indices, **kw)["loss"]["losses"]
    assert_close(mined, blockwise)
    for a, b in zip(grads(blockwise.sum(), [emb, ref_emb]), grads(mined.sum(), [emb, ref_emb])):
        assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Hypothesis: agreement with PML


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 5))
    num_classes = draw(st.integers(1, 4))
    labels = draw(st.lists(st.integers(0, num_classes - 1), min_size=batch, max_size=batch))
    values = st.floats(-3, 3, allow_nan=False, width=32)
    emb = draw(st.lists(values, min_size=batch * dim, max_size=batch * dim))
    with_ref = draw(st.booleans())
    ref = None
    if with_ref:
        n_ref = draw(st.integers(1, 9))
        ref_labels = draw(st.lists(st.integers(0, num_classes), min_size=n_ref, max_size=n_ref))
        ref_emb = draw(st.lists(values, min_size=n_ref * dim, max_size=n_ref * dim))
        ref = (
            torch.tensor(ref_emb, dtype=torch.float64).view(n_ref, dim),
            torch.tensor(ref_labels),
        )
    block = draw(
        st.one_of(st.none(), st.integers(1, 13), st.tuples(st.integers(1, 5), st.integers(1, 5)))
    )
    mg = draw(st.sampled_from(PAPER_SETTINGS + [(0.1, 1.0), (0.6, 10.0)]))
    emb = torch.tensor(emb, dtype=torch.float64).view(batch, dim)
    return emb, torch.tensor(labels), ref, block, mg


@HYPO
@given(batches())
def test_hypothesis_matches_pml(case):
    emb, labels, ref, block, (m, gamma) = case
    emb.requires_grad_()
    ref_emb, ref_labels = (None, None) if ref is None else ref
    if ref_emb is not None:
        ref_emb.requires_grad_()
    # Zero embeddings normalise to 0 in both implementations; nothing special to skip.
    compare_with_pml(
        emb,
        labels,
        m=m,
        gamma=gamma,
        block_size=block,
        ref_emb=ref_emb,
        ref_labels=ref_labels,
        rel=1e-8,
    )


@HYPO
@given(batches(), st.data())
def test_hypothesis_mined_subset_matches_pml(case, data):
    emb, labels, ref, _, (m, gamma) = case
    emb.requires_grad_()
    ref_emb, ref_labels = (None, None) if ref is None else ref
    if ref_emb is not None:
        ref_emb.requires_grad_()
    a1, p, a2, n = lmu.get_all_pairs_indices(labels, ref_labels)
    # a random sub-multiset of all pairs, duplicates allowed
    pick_p = (
        data.draw(st.lists(st.integers(0, max(len(a1) - 1, 0)), max_size=12)) if len(a1) else []
    )
    pick_n = (
        data.draw(st.lists(st.integers(0, max(len(a2) - 1, 0)), max_size=12)) if len(a2) else []
    )
    pick_p, pick_n = torch.tensor(pick_p, dtype=torch.long), torch.tensor(pick_n, dtype=torch.long)
    indices = (a1[pick_p], p[pick_p], a2[pick_n], n[pick_n])
    compare_with_pml(
        emb,
        labels,
        m=m,
        gamma=gamma,
        indices_tuple=indices,
        ref_emb=ref_emb,
        ref_labels=ref_labels,
        rel=1e-8,
    )


# ---------------------------------------------------------------------------------------------
# Numerics: extreme inputs, half precision, block-size independence


HALF_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def extreme_batches(draw):
    """Embeddings that are exact copies or negations of a few directions: cos = +-1."""
    num_dirs = draw(st.integers(1, 3))
    batch = draw(st.integers(2, 10))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(num_dirs, dim, generator=gen)
    which = torch.tensor(
        draw(st.lists(st.integers(0, num_dirs - 1), min_size=batch, max_size=batch))
    )
    signs = torch.tensor(
        draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=batch, max_size=batch))
    )
    scales = torch.tensor(
        draw(st.lists(st.sampled_from([1e-3, 1.0, 1e3]), min_size=batch, max_size=batch))
    )
    emb = dirs[which] * (signs * scales)[:, None]
    labels = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=batch, max_size=batch)))
    return emb, labels


@HYPO
@given(
    extreme_batches(), st.sampled_from(HALF_DTYPES), st.sampled_from([(0.25, 256.0), (0.4, 80.0)])
)
def test_extreme_inputs_are_finite(case, dtype, mg):
    emb, labels = case
    m, gamma = mg
    x = emb.to(dtype).requires_grad_()
    loss = CircleLoss(m=m, gamma=gamma, block_size=3)(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad.float()).all()
    # the mined path at the same inputs
    x.grad = None
    indices = lmu.get_all_pairs_indices(labels)
    loss_m = CircleLoss(m=m, gamma=gamma)(x, labels, indices)
    loss_m.backward()
    assert torch.isfinite(loss_m) and torch.isfinite(x.grad.float()).all()
    # and it still agrees with PML in float32
    ref = pml_losses.CircleLoss(m=m, gamma=gamma)(x.detach().float(), labels)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-4, atol=1e-3)


def test_gamma_256_large_logits_fp32():
    # antipodal positives and identical negatives: logits near +-1000, exp would overflow
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    loss = CircleLoss(m=0.25, gamma=256, block_size=1)(emb, labels)
    loss.backward()
    ref = pml_losses.CircleLoss(m=0.25, gamma=256)(emb.detach().double(), labels)
    assert loss.item() > 900
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("mined", [False, True])
@pytest.mark.parametrize("mg", [(0.25, 256.0), (0.4, 80.0)])
def test_well_separated_batch_small_loss_and_gradient(mined, mg):
    # s_p ~ 1 and s_n ~ -1: every loss is ~1e-5 or smaller, so an absolute tolerance scaled
    # to O(1) values would pass vacuously; compare relative to the tiny magnitudes instead.
    m, gamma = mg
    gen = torch.Generator().manual_seed(18)
    centres = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    noise = 0.01 * torch.randn(6, 3, generator=gen, dtype=torch.float64)
    emb = (centres[labels] + noise).requires_grad_()
    indices = lmu.get_all_pairs_indices(labels) if mined else None
    reducer = reducers.DoNothingReducer()
    ours = CircleLoss(m=m, gamma=gamma, block_size=4, reducer=reducer)(emb, labels, indices)
    theirs = pml_losses.CircleLoss(m=m, gamma=gamma, reducer=reducer)(emb, labels, indices)
    la, lb = ours["loss"]["losses"], theirs["loss"]["losses"].reshape(-1)
    assert 0 < lb.max() < 1e-3
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=0)
    (ga,) = grads(la.sum(), [emb])
    (gb,) = grads(lb.sum(), [emb])
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-9 * gb.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mined", [False, True])
def test_half_precision_close_to_pml_float32(dtype, mined):
    emb, labels = make_batch(33, 16, 4, seed=8, dtype=dtype)
    emb32 = emb.detach().float().requires_grad_()
    indices = miners.MultiSimilarityMiner()(emb32, labels) if mined else None
    ours = CircleLoss(m=0.25, gamma=128, block_size=10, reducer=reducers.DoNothingReducer())
    losses = ours(emb, labels, indices)["loss"]["losses"]
    assert losses.dtype == torch.float32  # accumulated in float32, not in the input dtype
    ref = pml_losses.CircleLoss(m=0.25, gamma=128, reducer=reducers.DoNothingReducer())
    ref_losses = ref(emb32, labels, indices)["loss"]["losses"].reshape(-1)
    # Same input values, so only float32 rounding separates the losses.
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-3)
    (g,) = torch.autograd.grad(losses.sum(), emb)
    (g_ref,) = torch.autograd.grad(ref_losses.sum(), emb32)
    assert g.dtype == dtype
    scale = g_ref.abs().max().item()
    torch.testing.assert_close(g.float(), g_ref, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("with_ref", [False, True])
def test_block_size_independence(with_ref):
    emb, labels = make_batch(29, 8, 4, seed=9, dtype=torch.float32)
    ref_emb = ref_labels = None
    if with_ref:
        ref_emb, ref_labels = make_batch(23, 8, 4, seed=10, dtype=torch.float32)
    inputs = [emb] + ([ref_emb] if with_ref else [])
    results = []
    for block in [4, 7, (1, 100), (100, 1), (5, 3), 29, 1000, None]:
        loss = CircleLoss(m=0.25, gamma=256, block_size=block)(
            emb, labels, ref_emb=ref_emb, ref_labels=ref_labels
        )
        results.append((loss, grads(loss, inputs)))
    base_loss, base_grads = results[-1]
    assert base_loss.item() > 0
    for loss, gs in results[:-1]:
        torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-5)
        for g, b in zip(gs, base_grads):
            torch.testing.assert_close(g, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_resolve_block_size():
    assert resolve_block_size(5, 100, 100) == (5, 5)
    assert resolve_block_size((2, 7), 100, 100) == (2, 7)
    rb, cb = resolve_block_size(None, 4096, 1_000_000)
    assert rb <= 4096 and rb * cb <= 1 << 22
    assert resolve_block_size(None, 3, 4) == (3, 4)
    with pytest.raises(ValueError):
        resolve_block_size(0, 3, 3)
    with pytest.raises(ValueError):
        CircleLoss(block_size=(4, 0))


# ---------------------------------------------------------------------------------------------
# Degenerate batches


@pytest.mark.parametrize("mined", [False, True])
@pytest.mark.parametrize(
    "labels",
    [
        torch.zeros(6, dtype=torch.long),  # one class: no negatives
        torch.arange(6),  # all distinct: no positives
        torch.tensor([0]),  # single sample
    ],
    ids=["one_class", "all_distinct", "single"],
)
def test_degenerate_batches_give_zero(labels, mined):
    emb = torch.randn(len(labels), 5, dtype=torch.float64, requires_grad=True)
    indices = lmu.get_all_pairs_indices(labels) if mined else None
    compare_with_pml(emb, labels, indices_tuple=indices)
    loss = CircleLoss()(emb, labels, indices)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mined", [False, True])
def test_empty_batch(dtype, mined):
    emb = torch.randn(0, 8, dtype=dtype, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    loss = CircleLoss()(emb, labels, (empty,) * 4 if mined else None)
    assert loss.ndim == 0 and loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and emb.grad.shape == (0, 8)


def test_rows_without_pos_or_neg_get_zero_and_no_gradient():
    emb, _ = make_batch(5, 3, 1, seed=11)
    labels = torch.tensor([0, 0, 1, 2, 2])
    ref_emb, _ = make_batch(4, 3, 1, seed=12)
    ref_labels = torch.tensor([0, 0, 0, 2])  # row 2 (label 1) has no positive
    fn = CircleLoss(block_size=2, reducer=reducers.DoNothingReducer())
    losses = fn(emb, labels, ref_emb=ref_emb, ref_labels=ref_labels)["loss"]["losses"]
    assert losses[2].item() == 0.0 and (losses[[0, 1, 3, 4]] > 0).all()
    (g,) = grads(losses.sum(), [emb])
    assert torch.equal(g[2], torch.zeros(3, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Gradients, inputs, API


def test_gradcheck_blockwise_and_mined():
    gen = torch.Generator().manual_seed(13)
    x = torch.nn.functional.normalize(torch.randn(5, 3, generator=gen, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(6, 3, generator=gen, dtype=torch.float64), dim=1)
    x.requires_grad_()
    y.requires_grad_()
    labels, ref_labels = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([0, 1, 1, 2, 0, 2])
    kw = dict(m=0.25, gamma=3.0, detach_weights=False)

    # detach_weights=False is the full derivative, so finite differences can check the
    # blockwise forward/backward machinery (blocks of 2 x 4 do not divide 5 x 6).
    def ref_pairs(a, b):
        return all_pairs_circle_loss(a, b, labels, ref_labels, block_size=(2, 4), **kw)

    def self_pairs(a):
        return all_pairs_circle_loss(
            a, a, labels, labels, block_size=(2, 3), self_compare=True, **kw
        )

    idx = [torch.tensor(v) for v in ([0, 0, 1, 2, 2], [0, 4, 1, 4, 4], [0, 1, 3, 3], [1, 0, 0, 5])]

    def mined(path, block_size=None):
        return lambda a, b: mined_pairs_circle_loss(
            a, b, *idx, path=path, block_size=block_size, **kw
        )

    assert torch.autograd.gradcheck(ref_pairs, (x, y))
    assert torch.autograd.gradcheck(self_pairs, (x,))
    assert torch.autograd.gradcheck(mined("gather"), (x, y))
    assert torch.autograd.gradcheck(mined("dense", (2, 4)), (x, y))
    assert torch.autograd.gradcheck(lambda a: mined("dense", 3)(a, a), (y,))


def test_detached_weights_differ_from_full_derivative():
    # guards the comparison above: with the default detach the gradient is a different one
    emb, labels = make_batch(8, 4, 3, seed=14)
    x = torch.nn.functional.normalize(emb.detach(), dim=1).requires_grad_()
    full = all_pairs_circle_loss(x, x, labels, labels, self_compare=True, detach_weights=False)
    det = all_pairs_circle_loss(x, x, labels, labels, self_compare=True)
    assert (det > 0).any()
    assert_close(full, det)
    (g_full,) = grads(full.sum(), [x])
    (g_det,) = grads(det.sum(), [x])
    assert not torch.allclose(g_full, g_det)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mined", [False, True])
def test_inputs_not_modified(mined, dtype):
    emb, labels = make_batch(10, 4, 3, seed=15, dtype=dtype)
    ref_emb, ref_labels = make_batch(7, 4, 3, seed=16, dtype=dtype)
    before = [t.detach().clone() for t in (emb, labels, ref_emb, ref_labels)]
    indices = lmu.get_all_pairs_indices(labels, ref_labels) if mined else None
    idx_before = [t.clone() for t in indices] if mined else None
    loss = CircleLoss(block_size=3)(emb, labels, indices, ref_emb, ref_labels)
    loss.backward()
    for t, b in zip((emb, labels, ref_emb, ref_labels), before):
        assert torch.equal(t.detach(), b)
    if mined:
        assert all(torch.equal(t, b) for t, b in zip(indices, idx_before))


def test_defaults_and_distance_validation():
    fn = CircleLoss()
    assert isinstance(fn.reducer, reducers.AvgNonZeroReducer)
    assert isinstance(fn.distance, distances.CosineSimilarity)
    assert (fn.m, fn.gamma) == (0.4, 80)
    assert fn.op == pytest.approx(1.4) and fn.delta_p == pytest.approx(0.6)
    with pytest.raises(ValueError, match="LpDistance"):
        CircleLoss(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="DotProductSimilarity"):
        CircleLoss(distance=distances.DotProductSimilarity())
    with pytest.raises(ValueError, match="power"):
        CircleLoss(distance=distances.CosineSimilarity(power=2))
    with pytest.raises(ValueError, match="labels and indices_tuple"):
        CircleLoss()(torch.randn(3, 2))


def test_embedding_regularizer_and_reducer_like_pml():
    emb, labels = make_batch(15, 6, 3, seed=17)
    kw = dict(m=0.25, gamma=128, embedding_regularizer=regularizers.LpRegularizer())
    ours = CircleLoss(reducer=reducers.MeanReducer(), **kw)(emb, labels)
    theirs = pml_losses.CircleLoss(reducer=reducers.MeanReducer(), **kw)(emb, labels)
    assert_close(ours, theirs)
    for a, b in zip(grads(ours, [emb]), grads(theirs, [emb])):
        assert_close(a, b)
