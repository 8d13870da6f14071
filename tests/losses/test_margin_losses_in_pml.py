"""ArcFaceLoss and CosFaceLoss inside PML: miners, reducers, weight regularizers, get_logits,
state_dict loading, defaults (against PML's modules with the same W); degenerate and bad input."""

from __future__ import annotations

import pytest
import torch
from margin_cases import (
    B_,
    C_,
    D_,
    F64,
    KINDS,
    OURS,
    PAPER_MARGIN,
    PML,
    assert_close,
    clustered_batch,
    functional,
    make_loss,
)
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)

from pml_extras.functional import arcface_loss
from pml_extras.losses import ArcFaceLoss, CosFaceLoss

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------
# The modules inside PML: miners, reducers, regularizers, logits, state_dict
# ----------------------------------------------------------------------------------------


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
