"""Pair-level CircleLoss on mined pairs: the dense and the gather evaluation, both equal to
PML's CircleLoss whichever the heuristic picks."""

from __future__ import annotations

import math

import pytest
import torch
from pair_circle_cases import (
    MINED_PATHS,
    assert_close,
    compare_with_pml,
    grads,
    make_batch,
    ours_loss,
    random_subset_miner,
)
from pytorch_metric_learning import miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses.circle_loss import CircleLoss
from pml_extras.ops import pair_circle
from pml_extras.ops.pair_circle import (
    DENSE_PAIR_FRACTION,
    choose_mined_path,
    mined_pairs_circle_loss,
)

# ---------------------------------------------------------------------------------------------
# Dense and gather evaluation of mined pairs: both equal to PML, whichever the heuristic picks

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
