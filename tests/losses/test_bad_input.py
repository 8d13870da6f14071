"""Bad and degenerate input: clear ValueErrors, empty and one-class batches, mixed
precision, no in-place modification of inputs, buffers that move only in training."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
    SNRDistance,
)

from pml_extras.functional import class_circle_loss
from pml_extras.losses import CenterLoss, CurricularFaceLoss, SparseCircleLoss, StandaloneCenterLoss

pytestmark = pytest.mark.usefixtures("single_thread")

B, D, C = 8, 4, 5
LOSSES = {
    "SparseCircleLoss": lambda **kw: SparseCircleLoss(C, D, **kw),
    "CurricularFaceLoss": lambda **kw: CurricularFaceLoss(C, D, **kw),
    "CenterLoss": lambda **kw: CenterLoss(C, D, **kw),
    "CenterLoss(paper)": lambda **kw: CenterLoss(C, D, update_rule="paper", **kw),
    "StandaloneCenterLoss": lambda **kw: StandaloneCenterLoss(C, D, **kw),
}
NAMES = list(LOSSES)


def batch(seed=0, dtype=torch.float32, n=B):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(dtype), torch.arange(n) % C


def build(name, **kw):
    torch.manual_seed(0)
    return LOSSES[name](**kw)


# ----------------------------------------------------------------------------------------
# Clear ValueErrors
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-1, C, C + 7])
def test_label_out_of_range_names_label_and_num_classes(name, bad):
    x, y = batch()
    y[3] = bad
    with pytest.raises(ValueError) as info:
        build(name)(x, y)
    msg = str(info.value)
    assert f"label {bad}" in msg and f"num_classes={C}" in msg, msg


@pytest.mark.parametrize("bad", [-1, 3])
def test_functional_circle_label_out_of_range(bad):
    sims = torch.rand(4, 3)
    with pytest.raises(ValueError) as info:
        class_circle_loss(sims, torch.tensor([0, 1, bad, 2]))
    assert f"label {bad}" in str(info.value) and "num_classes=3" in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_embedding_size_mismatch(name):
    x, y = torch.randn(B, D + 1), torch.arange(B) % C
    with pytest.raises(ValueError, match=f"embedding_size={D}"):
        build(name)(x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(B, D, 1), (B,), (1, B, D)], ids=str)
def test_wrong_ndim(name, shape):
    x, y = torch.randn(*shape), torch.arange(B) % C
    with pytest.raises(ValueError):
        build(name)(x, y)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=str)
def test_non_integer_labels(name, dtype):
    x, y = batch()
    with pytest.raises(ValueError, match="integer"):
        build(name)(x, y.to(dtype))


def test_functional_circle_float_labels_and_shapes():
    sims = torch.rand(4, 3)
    with pytest.raises(ValueError, match="integer"):
        class_circle_loss(sims, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="do not match"):
        class_circle_loss(sims, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="do not match"):
        class_circle_loss(sims, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="similarities"):
        class_circle_loss(torch.rand(4), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("name", ["SparseCircleLoss", "CurricularFaceLoss", "CenterLoss"])
def test_ref_emb_is_rejected(name):
    x, y = batch()
    r, ry = batch(seed=1)
    with pytest.raises(ValueError, match="ref_emb"):
        build(name)(x, y, ref_emb=r, ref_labels=ry)


def _unnormalized_cosine():
    dist = CosineSimilarity()  # its constructor fixes normalize_embeddings=True
    dist.normalize_embeddings = False
    return dist


@pytest.mark.parametrize(
    "make_dist",
    [
        LpDistance,
        DotProductSimilarity,
        SNRDistance,
        lambda: CosineSimilarity(power=2),
        _unnormalized_cosine,
    ],
    ids=["lp", "dot", "snr", "cosine_power2", "cosine_unnormalized"],
)
@pytest.mark.parametrize("cls", [SparseCircleLoss, CurricularFaceLoss])
def test_non_cosine_distances_raise_at_construction(cls, make_dist):
    dist = make_dist()
    with pytest.raises(ValueError, match="CosineSimilarity") as info:
        cls(C, D, distance=dist)
    assert type(dist).__name__ in str(info.value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseCircleLoss(0, D),
        lambda: SparseCircleLoss(C, -1),
        lambda: SparseCircleLoss(C, D, gamma=0.0),
        lambda: SparseCircleLoss(C, D, impl="cuda"),
        lambda: SparseCircleLoss(C, D, chunk_size=0),
        lambda: CurricularFaceLoss(C, D, momentum=1.5),
        lambda: CurricularFaceLoss(C, D, scale=-1.0),
        lambda: CenterLoss(C, D, update_rule="sgd"),
        lambda: CenterLoss(C, D, update_rule="paper", alpha=2.0),
        lambda: StandaloneCenterLoss(C, D, inter_form="log2"),
        lambda: StandaloneCenterLoss(C, 2.5),
    ],
)
def test_bad_constructor_arguments(make):
    with pytest.raises(ValueError):
        make()


# ----------------------------------------------------------------------------------------
# Empty and degenerate batches
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch_is_a_zero_loss_that_backpropagates(name):
    loss_fn = build(name)
    loss_fn.train()
    state = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    trunk = torch.nn.Linear(3, D)
    emb = trunk(torch.zeros(0, 3))
    loss = loss_fn(emb, torch.zeros(0, dtype=torch.long))
    assert loss.ndim == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert trunk.weight.grad is not None and float(trunk.weight.grad.abs().sum()) == 0.0
    for k, v in loss_fn.state_dict().items():  # nothing to learn from: t, centers unchanged
        assert torch.equal(v, state[k]), k


def test_single_class_sparse_circle_has_zero_loss_and_finite_grads():
    loss_fn = SparseCircleLoss(1, D)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.zeros(B, dtype=torch.long)
    loss = loss_fn(x, y)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()
    assert float(x.grad.abs().sum()) == 0.0 and float(loss_fn.W.grad.abs().sum()) == 0.0


def test_single_class_curricular_face_has_zero_loss_and_finite_grads():
    loss_fn = CurricularFaceLoss(1, D)
    x = torch.randn(B, D, requires_grad=True)
    loss = loss_fn(x, torch.zeros(B, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss_fn.W.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_one_class(name):
    """All samples share one label: no negative pairs in the batch."""
    loss_fn = build(name)
    x = torch.randn(B, D, requires_grad=True)
    y = torch.full((B,), 2, dtype=torch.long)
    loss = loss_fn(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    if name == "StandaloneCenterLoss":
        # The inter term has no pair with different labels: it is exactly 0, and the
        # loss is the intra term alone.
        expected = ((x.detach() - loss_fn.centers.detach()[2]) ** 2).sum(1).mean()
        assert torch.allclose(loss.detach(), expected, rtol=1e-6)
    else:
        assert float(loss.detach()) > 0.0  # class-level losses still have the other proxies/centers


def test_miner_without_negative_pairs_gives_zero_inter():
    x, y = batch()
    empty = torch.zeros(0, dtype=torch.long)
    loss_fn = StandaloneCenterLoss(C, D, inter_weight=1.0)
    from pytorch_metric_learning import reducers

    loss_fn.reducer = reducers.DoNothingReducer()
    out = loss_fn(x, y, indices_tuple=(torch.tensor([0]), torch.tensor([5]), empty, empty))
    assert torch.equal(out["inter_loss"]["losses"], torch.zeros(B))


# ----------------------------------------------------------------------------------------
# Mixed precision, in-place safety, buffers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_embeddings_with_fp32_parameters(name, dtype):
    loss_fn = build(name)
    loss_fn.train()
    params = list(loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    x, y = batch(dtype=dtype)
    x.requires_grad_(True)
    for _ in range(2):
        loss = loss_fn(x, y)
        loss.backward()
        assert torch.isfinite(loss)
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        for p in params:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        if opt is not None:
            opt.step()
            opt.zero_grad()
    for k, v in loss_fn.state_dict().items():
        assert v.dtype == torch.float32, (k, v.dtype)
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_miner", [False, True])
def test_inputs_are_not_modified_in_place(name, with_miner):
    loss_fn = build(name)
    loss_fn.train()
    x, y = batch()
    x.requires_grad_(True)
    indices = pml_miners.MultiSimilarityMiner()(x, y) if with_miner else None
    snapshot = (
        x.detach().clone(),
        y.clone(),
        None if indices is None else [i.clone() for i in indices],
    )
    loss_fn(x, y, indices).backward()
    assert torch.equal(x.detach(), snapshot[0]) and torch.equal(y, snapshot[1])
    if indices is not None:
        assert all(torch.equal(a, b) for a, b in zip(indices, snapshot[2]))


def test_standalone_ref_emb_not_modified_in_place():
    x, y = batch()
    r, ry = batch(seed=3, n=6)
    r.requires_grad_(True)
    r0, ry0 = r.detach().clone(), ry.clone()
    StandaloneCenterLoss(C, D)(x, y, ref_emb=r, ref_labels=ry).backward()
    assert torch.equal(r.detach(), r0) and torch.equal(ry, ry0)
    assert r.grad is not None and torch.isfinite(r.grad).all()


@pytest.mark.parametrize(
    "name,buffer", [("CurricularFaceLoss", "t"), ("CenterLoss(paper)", "centers")]
)
def test_buffers_change_only_in_training_mode(name, buffer):
    loss_fn = build(name)
    x, y = batch()
    loss_fn.eval()
    before = getattr(loss_fn, buffer).clone()
    loss_fn(x, y)
    assert torch.equal(getattr(loss_fn, buffer), before), "changed in eval mode"
    with torch.no_grad():  # an eval loop under no_grad: still unchanged
        loss_fn(x, y)
    assert torch.equal(getattr(loss_fn, buffer), before)
    loss_fn.train()
    loss_fn(x, y)
    assert not torch.equal(getattr(loss_fn, buffer), before), "did not change in training"


@pytest.mark.parametrize("name", ["SparseCircleLoss", "CenterLoss", "StandaloneCenterLoss"])
def test_stateless_losses_do_not_change_state_in_forward(name):
    loss_fn = build(name)
    loss_fn.train()
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    x, y = batch()
    loss_fn(x, y)
    for k, v in loss_fn.state_dict().items():
        assert torch.equal(v, before[k]), k
