"""Pair-level CircleLoss: equality with PML's CircleLoss, numerics, degenerate batches."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances, miners, reducers, regularizers
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses.circle_loss import CircleLoss
from pml_extras.ops import pair_circle
from pml_extras.ops.pair_circle import (
    DENSE_PAIR_FRACTION,
    all_pairs_circle_loss,
    choose_mined_path,
    mined_pairs_circle_loss,
    pair_similarity,
    resolve_block_size,
    resolve_pair_chunk,
)

PAPER_SETTINGS = [(0.25, 256.0), (0.25, 128.0), (0.4, 80.0)]  # face, re-ID, fine-grained
# example counts and derandomisation come from the profile in conftest.py
HYPO = settings(deadline=None)


def per_element(out, batch_size):
    """Per-anchor losses from a DoNothingReducer output, as a flat (B,) tensor."""
    losses = out["loss"]["losses"]
    if not torch.is_tensor(losses):  # PML's zero_losses() shortcut
        return torch.zeros(batch_size, dtype=torch.float64)
    return losses.reshape(-1)


def grads(value, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(value, tensors, allow_unused=True, materialize_grads=True)


def assert_close(actual, expected, rel=1e-9):
    """Elementwise closeness with an absolute slack scaled to the tensor's magnitude."""
    actual, expected = actual.double(), expected.double()
    scale = 1.0 + expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def compare_with_pml(
    emb,
    labels,
    *,
    m=0.4,
    gamma=80.0,
    block_size=None,
    indices_tuple=None,
    ref_emb=None,
    ref_labels=None,
    rel=1e-9,
    pml_emb=None,
    pml_ref_emb=None,
    mined_path="auto",
):
    """Check per-element losses, reduced loss and their gradients against PML's CircleLoss.

    ``pml_emb`` / ``pml_ref_emb`` let PML run on a float32 copy of half-precision inputs;
    ``mined_path`` forces the dense or gather evaluation of mined pairs.
    """
    pml_emb = emb if pml_emb is None else pml_emb
    pml_ref_emb = ref_emb if pml_ref_emb is None else pml_ref_emb
    ours_in, pml_in = [emb, ref_emb], [pml_emb, pml_ref_emb]
    kw = dict(indices_tuple=indices_tuple, ref_labels=ref_labels)
    batch = emb.shape[0]

    ours = ours_loss(m, gamma, block_size, mined_path, reducer=reducers.DoNothingReducer())
    theirs = pml_losses.CircleLoss(m=m, gamma=gamma, reducer=reducers.DoNothingReducer())
    la = per_element(ours(emb, labels, ref_emb=ref_emb, **kw), batch)
    lb = per_element(theirs(pml_emb, labels, ref_emb=pml_ref_emb, **kw), batch)
    assert la.shape == (batch,)
    assert_close(la, lb, rel)
    if la.requires_grad and lb.requires_grad:
        # a weighted sum exercises every row's gradient, not just their total
        w = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
        ga = grads((la.double() * w).sum(), ours_in)
        gb = grads((lb.double() * w).sum(), pml_in)
        for a, b in zip(ga, gb):
            assert a.dtype == emb.dtype
            assert_close(a, b, rel)

    ra = ours_loss(m, gamma, block_size, mined_path)(emb, labels, ref_emb=ref_emb, **kw)
    rb = pml_losses.CircleLoss(m=m, gamma=gamma)(pml_emb, labels, ref_emb=pml_ref_emb, **kw)
    assert ra.ndim == 0
    assert_close(ra, rb, rel)
    if ra.requires_grad:
        for a, b in zip(grads(ra, ours_in), grads(rb, pml_in)):
            assert_close(a, b, rel)
    return la


def ours_loss(m, gamma, block_size, mined_path, **kwargs):
    fn = CircleLoss(m=m, gamma=gamma, block_size=block_size, **kwargs)
    fn._mined_path = mined_path
    return fn


def make_batch(batch, dim, num_classes, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return emb.requires_grad_(), labels


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
# Dense and gather evaluation of mined pairs: both equal to PML, whichever the heuristic picks

MINED_PATHS = ["dense", "gather"]


def random_subset_miner(density, seed, duplicates=True):
    """Keeps each of all the pairs with probability ``density``; re-mines some of them."""

    def mine(emb, labels, ref_emb=None, ref_labels=None):
        gen = torch.Generator().manual_seed(seed)
        picked = []
        for rows, cols in (
            lmu.get_all_pairs_indices(labels, ref_labels)[i : i + 2] for i in (0, 2)
        ):
            keep = torch.rand(len(rows), generator=gen) < density
            rows, cols = rows[keep], cols[keep]
            if duplicates and len(rows):
                again = torch.randint(0, len(rows), (len(rows) // 3,), generator=gen)
                rows, cols = torch.cat([rows, rows[again]]), torch.cat([cols, cols[again]])
            picked += [rows, cols]
        return tuple(picked)

    return mine


PATH_MINERS = {
    "multi_similarity": lambda: miners.MultiSimilarityMiner(epsilon=0.3),
    "triplet_margin": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
    "batch_easy_hard": lambda: miners.BatchEasyHardMiner(),
    "subset_0.05": lambda: random_subset_miner(0.05, seed=1),
    "subset_0.3": lambda: random_subset_miner(0.3, seed=2),
    "subset_1": lambda: random_subset_miner(1.0, seed=3),
}


@pytest.mark.parametrize("path", MINED_PATHS)
@pytest.mark.parametrize("miner_name", sorted(PATH_MINERS))
@pytest.mark.parametrize("with_ref", [False, True])
def test_mined_paths_match_pml(path, miner_name, with_ref):
    # 41 rows with (8, 5) blocks: ragged row and column blocks; 3 classes over 41 + 6 refs
    # leaves a singleton class in the refs, so some anchors have no positive.
    emb, labels = make_batch(41, 12, 4, seed=31)
    ref_emb = ref_labels = None
    if with_ref:
        ref_emb, ref_labels = make_batch(29, 12, 3, seed=32)
    indices = PATH_MINERS[miner_name]()(emb, labels, ref_emb, ref_labels)
    losses = compare_with_pml(
        emb,
        labels,
        m=0.25,
        gamma=128.0,
        block_size=(8, 5),
        indices_tuple=indices,
        ref_emb=ref_emb,
        ref_labels=ref_labels,
        mined_path=path,
    )
    assert (losses > 0).any()


@pytest.mark.parametrize("path", MINED_PATHS)
def test_mined_paths_rows_without_positive_or_negative(path):
    emb, labels = make_batch(9, 5, 1, seed=33)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4])  # 2 and 4 have no positive
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    no_neg = a2 != 0  # row 0 keeps its positives but loses every negative
    indices = (a1, p, a2[no_neg], n[no_neg])
    losses = compare_with_pml(emb, labels, indices_tuple=indices, block_size=4, mined_path=path)
    zero = torch.tensor([0, 5, 8])
    assert (losses[zero] == 0).all() and (losses[[1, 2, 3, 4, 6, 7]] > 0).all()
    fn = ours_loss(0.4, 80.0, 4, path, reducer=reducers.DoNothingReducer())
    (g,) = grads(fn(emb, labels, indices)["loss"]["losses"][zero].sum(), [emb])
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("path", MINED_PATHS)
def test_mined_paths_self_pairs_count_like_pml(path):
    # a miner may hand over (i, i); PML's masks keep it, so both paths must too
    emb, labels = make_batch(10, 6, 3, seed=34)
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    diag = torch.arange(10)
    indices = (torch.cat([a1, diag]), torch.cat([p, diag]), a2, n)
    with_self = compare_with_pml(emb, labels, indices_tuple=indices, block_size=3, mined_path=path)
    without = compare_with_pml(emb, labels, indices_tuple=(a1, p, a2, n), mined_path=path)
    assert not torch.allclose(with_self, without)


@pytest.mark.parametrize("path", [None, *MINED_PATHS])
def test_gradient_above_softplus_threshold_like_pml(path):
    # F.softplus (and so PML) is linear above 20 with derivative exactly 1; the blockwise
    # backward must do the same rather than use sigmoid, off by ~exp(-20) = 2e-9 relative.
    gen = torch.Generator().manual_seed(40)
    emb = torch.randn(12, 6, dtype=torch.float64, generator=gen).requires_grad_()
    labels = torch.arange(4).repeat_interleave(3)
    indices = None if path is None else lmu.get_all_pairs_indices(labels)
    losses = compare_with_pml(
        emb, labels, m=0.25, gamma=9.0, indices_tuple=indices, mined_path=path, rel=1e-12
    )
    assert ((losses > 20) & (losses < 25)).any() and (losses < 20).any()


def test_choose_mined_path_threshold():
    rows, cols = 37, 23
    edge = math.ceil(DENSE_PAIR_FRACTION * rows * cols)
    assert choose_mined_path(edge, rows, cols) == "dense"
    assert choose_mined_path(edge - 1, rows, cols) == "gather"
    assert choose_mined_path(0, 0, 5) == "dense"  # empty batch: either is fine


@pytest.mark.parametrize("density", [0.03, 0.05, 0.15, 0.5])
def test_auto_path_choice_does_not_change_numbers(density, monkeypatch):
    emb, labels = make_batch(33, 8, 3, seed=35)
    indices = random_subset_miner(density, seed=36, duplicates=False)(emb, labels)
    num_pairs = len(indices[0]) + len(indices[2])
    expected = choose_mined_path(num_pairs, 33, 33)
    assert expected == ("dense" if density > DENSE_PAIR_FRACTION else "gather")
    calls = []
    dense = pair_circle._dense_pair_masks
    monkeypatch.setattr(pair_circle, "_dense_pair_masks", lambda *a: calls.append(1) or dense(*a))
    out = {}
    for path in ["auto", *MINED_PATHS]:
        fn = ours_loss(0.25, 256.0, 7, path, reducer=reducers.DoNothingReducer())
        losses = fn(emb, labels, indices)["loss"]["losses"]
        out[path] = (losses, *grads(losses.sum(), [emb]))
        if path == "auto":
            assert len(calls) == (expected == "dense")
    for a, b in zip(out["auto"], out[expected]):
        assert torch.equal(a, b)
    for a, b in zip(out["dense"], out["gather"]):
        assert_close(a, b, 1e-10)


def test_single_pos_and_neg_pair_gives_pml_zero_loss():
    # PML returns a zero loss when every index list has length <= 1; kept for equality.
    emb, labels = make_batch(3, 4, 2, seed=6)
    indices = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    labels = torch.tensor([0, 0, 1])
    compare_with_pml(emb, labels, indices_tuple=indices)
    assert CircleLoss()(emb, labels, indices).item() == 0.0
    # the all-pairs equivalent: one anchor, one positive and one negative reference
    ref_emb = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    compare_with_pml(emb[:1], labels[:1], ref_emb=ref_emb, ref_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("path", ["auto", *MINED_PATHS])
def test_mined_pair_checks(path):
    emb, labels = make_batch(6, 3, 2, seed=7)
    both = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="either be positive or negative"):
        ours_loss(0.4, 80.0, None, path)(emb, labels, both)
    out_of_range = (
        torch.tensor([0, 1]),
        torch.tensor([1, 6]),
        torch.tensor([0]),
        torch.tensor([3]),
    )
    with pytest.raises(ValueError, match="out of range"):
        ours_loss(0.4, 80.0, None, path)(emb, labels, out_of_range)
    with pytest.raises(ValueError, match="path must be"):
        mined_pairs_circle_loss(emb, emb, *both, path="blockwise")


@pytest.mark.parametrize("path", MINED_PATHS)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("larger", ["pos", "neg"])
def test_pair_both_positive_and_negative_found_anywhere(where, larger, path):
    # the conflict check binary-searches the smaller pair set in the larger one: a shared
    # pair must be found at either end of the sorted keys, whichever set is larger
    x = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    many = torch.tensor([[i, j] for i in range(6) for j in range(6) if i != j])  # row-major
    shared = many[{"first": 0, "middle": 13, "last": len(many) - 1}[where]]
    few = torch.stack([shared, torch.tensor([0, 0])])
    pos, neg = (many, few) if larger == "pos" else (few, many)
    args = (pos[:, 0], pos[:, 1], neg[:, 0], neg[:, 1])
    with pytest.raises(ValueError, match="either be positive or negative"):
        mined_pairs_circle_loss(x, x, *args, path=path)
    assert torch.isfinite(mined_pairs_circle_loss(x, x, *args, check=False, path=path)).all()


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


# ---------------------------------------------------------------------------------------------
# Chunked pair similarity of the mined path: equal to the direct (P, D) gather


def direct_similarity(x, y, rows, cols):
    """The O(P * D) formula the chunked op replaces."""
    return (x[rows] * y[cols]).sum(dim=1)


def pair_case(num_pairs, same, seed, dtype=torch.float64, batch=9, num_refs=7, dim=5):
    """Random pairs with repeats and, when y is x, self-pairs (i, i) forced in."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(dtype)
    y = x if same else torch.randn(num_refs, dim, generator=gen, dtype=torch.float64).to(dtype)
    rows = torch.randint(0, batch, (num_pairs,), generator=gen)
    cols = torch.randint(0, y.shape[0], (num_pairs,), generator=gen)
    if num_pairs >= 6:
        rows[:3], cols[:3] = 1, y.shape[0] - 1  # one pair three times
        if same:
            cols[3:6] = rows[3:6]  # self-pairs
    return x, y, rows, cols


def check_against_direct(x, y, rows, cols, chunk, rel=1e-12):
    """Values and gradients (w.r.t. x and, if separate, y) against the direct gather."""
    same = y is x
    xs = x.detach().clone().requires_grad_()
    ys = xs if same else y.detach().clone().requires_grad_()
    xd = x.detach().double().requires_grad_()
    yd = xd if same else y.detach().double().requires_grad_()
    s = pair_similarity(xs, ys, rows, cols, chunk_size=chunk)
    ref = direct_similarity(xd, yd, rows, cols)
    assert s.shape == ref.shape and s.dtype == torch.promote_types(x.dtype, torch.float32)
    assert_close(s, ref, rel)
    # a non-uniform upstream gradient, so each pair's contribution is checked
    w = torch.linspace(-1.0, 2.0, len(rows), dtype=torch.float64)
    ours_in, ref_in = ([xs], [xd]) if same else ([xs, ys], [xd, yd])
    for a, b in zip(grads((s.double() * w).sum(), ours_in), grads((ref * w).sum(), ref_in)):
        assert a.dtype == x.dtype
        assert_close(a, b, rel)
    return s


@pytest.mark.parametrize("same", [False, True], ids=["x_y", "y_is_x"])
@pytest.mark.parametrize("chunk", [1, 7, 41, 100, None], ids=lambda c: f"chunk{c}")
def test_pair_similarity_matches_direct_gather(chunk, same):
    # P = 41 pairs: 7 does not divide it, 41 is exactly P, 100 exceeds it
    x, y, rows, cols = pair_case(41, same, seed=20)
    assert (rows[:3] == 1).all() and ((rows == cols).any() or not same)
    check_against_direct(x, y, rows, cols, chunk)


@HYPO
@given(
    st.integers(0, 30),
    st.integers(1, 35),
    st.booleans(),
    st.integers(0, 2**16),
    st.integers(1, 6),
)
def test_hypothesis_pair_similarity_any_chunk(num_pairs, chunk, same, seed, dim):
    x, y, rows, cols = pair_case(num_pairs, same, seed, batch=5, num_refs=4, dim=dim)
    check_against_direct(x, y, rows, cols, chunk)


def test_pair_similarity_only_one_side_requires_grad():
    x, y, rows, cols = pair_case(23, False, seed=21)
    y.requires_grad_()
    s = pair_similarity(x, y, rows, cols, chunk_size=4)
    (g,) = grads((s * torch.arange(23.0, dtype=torch.float64)).sum(), [y])
    yd = y.detach().requires_grad_()
    ref = direct_similarity(x, yd, rows, cols)
    (g_ref,) = grads((ref * torch.arange(23.0, dtype=torch.float64)).sum(), [yd])
    assert_close(g, g_ref)
    assert x.grad is None


def test_pair_similarity_gradcheck():
    x, y, rows, cols = pair_case(11, False, seed=22, batch=4, num_refs=3, dim=3)
    x.requires_grad_()
    y.requires_grad_()
    # chunks of 4 over 11 pairs with repeats: the scatter-add must sum across chunks
    assert torch.autograd.gradcheck(
        lambda a, b: pair_similarity(a, b, rows, cols, chunk_size=4), (x, y)
    )
    xs, _, rs, cs = pair_case(11, True, seed=23, batch=4, dim=3)
    xs.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: pair_similarity(a, a, rs, cs, chunk_size=3), (xs,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pair_similarity_no_pairs(dtype):
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    s = pair_similarity(x, x, empty, empty, chunk_size=2)
    assert s.shape == (0,) and s.dtype == torch.promote_types(dtype, torch.float32)
    s.sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, torch.zeros_like(x))


def half_accumulation_case(dtype, same):
    """Random pairs plus 2000 pairs on anchor 0, whose gradient then sums 2000 terms."""
    x, y, rows, cols = pair_case(300, same, seed=24, dtype=dtype, batch=6, num_refs=5, dim=16)
    rows = torch.cat([rows, torch.zeros(2000, dtype=torch.long)])
    cols = torch.cat([cols, torch.arange(2000) % y.shape[0]])
    return x, y, rows, cols


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("same", [False, True], ids=["x_y", "y_is_x"])
def test_pair_similarity_half_accumulates_in_float32(dtype, same):
    # Same half-precision values in float64: the dot products and the scatter-adds differ only
    # by float32 rounding, then the gradient is rounded once to the half dtype.
    x, y, rows, cols = half_accumulation_case(dtype, same)
    xs = x.clone().requires_grad_()
    ys = xs if same else y.clone().requires_grad_()
    s = pair_similarity(xs, ys, rows, cols, chunk_size=8)
    assert s.dtype == torch.float32
    xd = x.double().requires_grad_()
    yd = xd if same else y.double().requires_grad_()
    ref = direct_similarity(xd, yd, rows, cols)
    torch.testing.assert_close(s.double(), ref, rtol=1e-6, atol=1e-6)
    ours_in, ref_in = ([xs], [xd]) if same else ([xs, ys], [xd, yd])
    for a, b in zip(grads(s.sum(), ours_in), grads(ref.sum(), ref_in)):
        assert a.dtype == dtype
        # within one half-precision rounding of the exact gradient
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(a.double(), b, rtol=ulp, atol=ulp * b.abs().max().item())


def test_pair_similarity_half_is_not_accumulated_in_half():
    # guards the test above: chunk-by-chunk scatter-adds into a half-precision buffer (what
    # the op would do without its float32 buffer) miss that tolerance on the same data
    x, y, rows, cols = half_accumulation_case(torch.float16, same=False)
    terms = y[cols]
    half_acc = torch.zeros_like(x)
    for c0 in range(0, len(rows), 8):
        half_acc.index_add_(0, rows[c0 : c0 + 8], terms[c0 : c0 + 8])
    exact = torch.zeros(x.shape, dtype=torch.float64).index_add_(0, rows, terms.double())
    err = (half_acc.double() - exact).abs().max().item()
    assert err > 2 * torch.finfo(torch.float16).eps * exact.abs().max().item()


def test_pair_similarity_bad_input():
    x = torch.randn(4, 3)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        pair_similarity(x, x, idx, idx, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        resolve_pair_chunk(2.5, 10, 3)
    with pytest.raises(ValueError, match=r"col index 4 is out of range \[0, 4\)"):
        pair_similarity(x, x, idx, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="row index -1"):
        pair_similarity(x, x, torch.tensor([-1, 0]), idx)
    with pytest.raises(ValueError, match="equal lengths"):
        pair_similarity(x, x, idx, torch.tensor([0]))
    with pytest.raises(ValueError, match="x and y"):
        pair_similarity(x, torch.randn(4, 2), idx, idx)
    assert resolve_pair_chunk(None, 10, 3) == 10
    assert resolve_pair_chunk(None, 10**9, 128) * 128 <= 1 << 22


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_mined_loss_chunk_size_independent(chunk):
    emb, labels = make_batch(13, 6, 3, seed=26)
    ref_emb, ref_labels = make_batch(11, 6, 3, seed=27)
    indices = lmu.get_all_triplets_indices(labels, ref_labels)  # (a, p) pairs repeat
    pairs = lmu.convert_to_pairs(indices, labels, ref_labels)

    def loss(chunk_size):
        x = torch.nn.functional.normalize(emb, dim=1)
        y = torch.nn.functional.normalize(ref_emb, dim=1)
        return mined_pairs_circle_loss(x, y, *pairs, m=0.25, gamma=128.0, chunk_size=chunk_size)

    base, out = loss(None), loss(chunk)
    assert (base > 0).any()
    assert_close(out, base)
    w = torch.linspace(0.5, 1.5, 13, dtype=torch.float64)
    for a, b in zip(
        grads((out * w).sum(), [emb, ref_emb]), grads((base * w).sum(), [emb, ref_emb])
    ):
        assert_close(a, b)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any aten op returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("path", MINED_PATHS)
@pytest.mark.parametrize("same", [False, True], ids=["ref_emb", "self"])
def test_mined_loss_never_materialises_pairs_by_dim(same, path):
    # Deterministic stand-in for the memory benchmark: with every pair mined, no tensor of
    # the forward or backward may be as large as the (P, D) gathers of the direct formula;
    # the dense path's largest are its (B, N) boolean masks.
    batch, dim, chunk = 40, 32, 16
    emb, labels = make_batch(batch, dim, 5, seed=28)
    if same:
        ref_emb, ref_labels = emb, labels
        pairs = lmu.get_all_pairs_indices(labels)
    else:
        ref_emb, ref_labels = make_batch(batch, dim, 5, seed=29)
        pairs = lmu.get_all_pairs_indices(labels, ref_labels)
    num_pairs = sum(len(t) for t in pairs[::2])
    x = torch.nn.functional.normalize(emb, dim=1)
    y = x if same else torch.nn.functional.normalize(ref_emb, dim=1)
    mode = _LargestTensor()
    with mode:
        losses = mined_pairs_circle_loss(
            x, y, *pairs, chunk_size=chunk, block_size=(8, 16), path=path
        )
        losses.sum().backward()
    assert (losses > 0).any() and emb.grad.abs().sum() > 0
    bound = max(num_pairs, batch * batch, batch * dim, chunk * dim)
    assert num_pairs * dim > 4 * bound  # the bound separates O(P) from O(P * D)
    assert mode.largest <= bound


def test_deprecated_sparse_path_is_the_gather_path():
    """path="sparse" (the gather path's old name) still works, warns, and gives the
    gather path's numbers bit for bit; "sparse" now names only the class-level loss."""
    emb, labels = make_batch(17, 8, 3, seed=41)
    a1, p, a2, n = random_subset_miner(0.05, seed=42, duplicates=True)(emb, labels)
    x = torch.nn.functional.normalize(emb, dim=1)
    new = mined_pairs_circle_loss(x, x, a1, p, a2, n, m=0.25, gamma=64.0, path="gather")
    with pytest.warns(DeprecationWarning, match="path='gather'"):
        old = mined_pairs_circle_loss(x, x, a1, p, a2, n, m=0.25, gamma=64.0, path="sparse")
    assert torch.equal(old, new) and (new > 0).any()
    with pytest.raises(ValueError, match="'blockwise'"):
        mined_pairs_circle_loss(x, x, a1, p, a2, n, path="blockwise")
