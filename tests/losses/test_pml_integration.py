"""The four losses inside pytorch-metric-learning: miners, reducers, regularizers,
MultipleLosses, DistributedLossWrapper, trainers, state_dict and torch.compile."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning import trainers as pml_trainers
from pytorch_metric_learning.utils import distributed as pml_dist
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_extras.losses import CenterLoss, CurricularFaceLoss, SparseCircleLoss, StandaloneCenterLoss

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
B, D, C = 24, 8, 5


def batch(seed=0, dtype=F64, B=B):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(B) % C  # every class present, several samples per class
    x = torch.randn(B, D, generator=g, dtype=F64) + 2.0 * torch.randn(C, D, generator=g)[y].to(F64)
    return x.to(dtype), y


def build(name, dtype=F64, **kwargs):
    """A loss with deterministic parameters; CurricularFace in eval mode (t fixed at 0.2)."""
    torch.manual_seed(1)
    if name == "sparse_circle":
        loss_fn = SparseCircleLoss(C, D, m=0.25, gamma=32.0, **kwargs)
    elif name == "curricular":
        loss_fn = CurricularFaceLoss(C, D, scale=16.0, **kwargs)
        loss_fn.t.fill_(0.2)
        loss_fn.eval()
    elif name == "center":
        loss_fn = CenterLoss(C, D, **kwargs)
    elif name == "standalone":
        loss_fn = StandaloneCenterLoss(C, D, **kwargs)
    else:
        raise ValueError(name)
    return loss_fn.to(dtype)


CLASS_LOSSES = ["sparse_circle", "curricular", "center"]
ALL_LOSSES = CLASS_LOSSES + ["standalone"]


def per_sample(loss_fn, x, y, indices_tuple=None):
    return loss_fn.compute_loss(x, y, indices_tuple, x, y)["loss"]["losses"]


def assert_close(a, b, rtol=1e-10, atol=1e-10, what=""):
    a, b = torch.as_tensor(a).detach().to(F64), torch.as_tensor(b).detach().to(F64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------
# Miners -> per-sample weights
# ----------------------------------------------------------------------------------------

MINERS = {
    "multi_similarity": lambda: pml_miners.MultiSimilarityMiner(epsilon=0.1),
    "triplet_margin": lambda: pml_miners.TripletMarginMiner(
        margin=0.5, type_of_triplets="semihard"
    ),
    "pair_margin": lambda: pml_miners.PairMarginMiner(pos_margin=0.3, neg_margin=0.9),
}


@pytest.mark.parametrize("loss_name", CLASS_LOSSES)
@pytest.mark.parametrize("miner_name", list(MINERS))
def test_miner_tuples_become_sample_weights(loss_name, miner_name):
    x, y = batch()
    loss_fn = build(loss_name)
    indices = MINERS[miner_name]()(x, y)
    assert sum(len(i) for i in indices) > 0
    weights = lmu.convert_to_weights(indices, y, dtype=F64)
    # Independently: weight = (times the sample occurs in the tuple) / (max such count).
    counts = torch.bincount(torch.cat(indices), minlength=B).to(F64)
    assert_close(weights, counts / counts.max(), what="convert_to_weights")
    assert len(set(weights.tolist())) > 1, "the miner should weight samples unequally"
    unweighted = per_sample(loss_fn, x, y)
    assert_close(per_sample(loss_fn, x, y, indices), unweighted * weights, what="per sample")
    assert_close(loss_fn(x, y, indices), (unweighted * weights).mean(), what="reduced")


# ----------------------------------------------------------------------------------------
# Reducers
# ----------------------------------------------------------------------------------------

CLASS_WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 0.1, 3.0], dtype=F64)


def expected_reduction(name, p, y, cut):
    if name in ("mean", "per_anchor"):
        return p.mean()
    if name == "sum":
        return p.sum()
    if name == "avg_non_zero":
        return p.sum() / (p > 0).sum()
    if name == "threshold":
        return p[p > cut].mean()
    if name == "class_weighted":
        return (p * CLASS_WEIGHTS[y]).mean()
    raise ValueError(name)


def make_reducer(name, cut):
    return {
        "mean": lambda: pml_reducers.MeanReducer(),
        "sum": lambda: pml_reducers.SumReducer(),
        "avg_non_zero": lambda: pml_reducers.AvgNonZeroReducer(),
        "threshold": lambda: pml_reducers.ThresholdReducer(low=cut),
        "per_anchor": lambda: pml_reducers.PerAnchorReducer(),
        "class_weighted": lambda: pml_reducers.ClassWeightedReducer(CLASS_WEIGHTS),
    }[name]()


REDUCERS = ["mean", "sum", "avg_non_zero", "threshold", "per_anchor", "class_weighted"]


@pytest.mark.parametrize("loss_name", CLASS_LOSSES)
@pytest.mark.parametrize("reducer_name", REDUCERS)
def test_reducers(loss_name, reducer_name):
    x, y = batch(seed=2)
    # Mined triplets cover only some samples: the others get weight 0, so that
    # AvgNonZeroReducer differs from the mean. (y = arange % 5: 0~5~10, 1~6, 2~7.)
    indices = tuple(
        torch.tensor(v) for v in ([0, 1, 2, 0, 12], [5, 6, 7, 10, 17], [3, 4, 3, 8, 13])
    )
    assert all(y[indices[0]] == y[indices[1]]) and all(y[indices[0]] != y[indices[2]])
    p = per_sample(build(loss_name), x, y, indices).detach()
    assert (p == 0).any() and (p > 0).any()
    cut = float(p[p > 0].median())
    loss_fn = build(loss_name, reducer=make_reducer(reducer_name, cut))
    xa = x.clone().requires_grad_(True)
    out = loss_fn(xa, y, indices)
    xr = x.clone().requires_grad_(True)
    expected = expected_reduction(
        reducer_name, per_sample(build(loss_name), xr, y, indices), y, cut
    )
    assert_close(out, expected, what=reducer_name)
    out.backward()
    expected.backward()
    assert_close(xa.grad, xr.grad, 1e-9, 1e-10, what=f"{reducer_name} gradient")


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_do_nothing_reducer_exposes_the_sub_losses(loss_name):
    x, y = batch(seed=3)
    out = build(loss_name, reducer=pml_reducers.DoNothingReducer())(x, y)
    expected_names = {"intra_loss", "inter_loss"} if loss_name == "standalone" else {"loss"}
    assert set(out) == expected_names
    for info in out.values():
        assert info["reduction_type"] == "element"
        assert info["losses"].shape == (B,)
        assert torch.equal(info["indices"], torch.arange(B))


def test_multiple_reducers_for_standalone_sub_losses():
    x, y = batch(seed=4)
    parts = build(
        "standalone", intra_weight=1.0, inter_weight=0.1, reducer=pml_reducers.DoNothingReducer()
    )(x, y)
    intra, inter = parts["intra_loss"]["losses"], parts["inter_loss"]["losses"]
    reducer = pml_reducers.MultipleReducers(
        {"intra_loss": pml_reducers.SumReducer(), "inter_loss": pml_reducers.MeanReducer()}
    )
    loss_fn = build("standalone", intra_weight=1.0, inter_weight=0.1, reducer=reducer)
    assert_close(loss_fn(x, y), intra.sum() + inter.mean(), what="sum + mean")
    # A single reducer is copied to each sub-loss by PML: here SumReducer for both.
    loss_fn = build("standalone", reducer=pml_reducers.SumReducer())
    assert isinstance(loss_fn.reducer, pml_reducers.MultipleReducers)
    assert_close(loss_fn(x, y), intra.sum() + inter.sum(), what="sum + sum")
    # ThresholdReducer sees each sub-loss separately: inter is negative, so low=0 drops it.
    loss_fn = build("standalone", reducer=pml_reducers.ThresholdReducer(low=0.0))
    assert (inter < 0).all()
    assert_close(loss_fn(x, y), intra.mean(), what="threshold per sub-loss")


# ----------------------------------------------------------------------------------------
# Regularizers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_embedding_regularizer_is_a_sub_loss(loss_name):
    x, y = batch(seed=5)
    plain = build(loss_name)(x, y)
    reg = build(
        loss_name,
        embedding_regularizer=pml_regularizers.LpRegularizer(),
        embedding_reg_weight=0.3,
    )
    assert "embedding_reg_loss" in reg.sub_loss_names()
    expected_reg = 0.3 * torch.linalg.vector_norm(x, dim=1).mean()
    assert_close(reg(x, y), plain + expected_reg, what="loss + 0.3 * mean ||x||")
    reg.reducer = pml_reducers.DoNothingReducer()
    parts = reg(x, y)
    assert_close(parts["embedding_reg_loss"]["losses"], expected_reg, what="sub-loss")


def _regular_face(W_t):
    """RegularFace: mean over classes of the largest cosine to another class."""
    w = F.normalize(W_t, dim=1)
    cos = w @ w.t()
    rows = []
    for i in range(w.shape[0]):
        rows.append(max(cos[i, j] for j in range(w.shape[0]) if j != i))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("loss_name", ["sparse_circle", "curricular"])
@pytest.mark.parametrize("regularizer", ["lp", "regular_face"])
def test_weight_regularizer_is_a_sub_loss(loss_name, regularizer):
    x, y = batch(seed=6)
    plain_fn = build(loss_name)
    plain = plain_fn(x, y)
    plain.backward()
    make = {
        "lp": pml_regularizers.LpRegularizer,
        "regular_face": pml_regularizers.RegularFaceRegularizer,
    }[regularizer]
    reg_fn = build(loss_name, weight_regularizer=make(), weight_reg_weight=0.7)
    assert "weight_reg_loss" in reg_fn.sub_loss_names()
    W_t = reg_fn.W.detach().t()
    if regularizer == "lp":
        expected_reg = 0.7 * torch.linalg.vector_norm(W_t, dim=1).mean()
    else:
        expected_reg = 0.7 * _regular_face(W_t)
    total = reg_fn(x, y)
    assert_close(total, plain + expected_reg, what="loss + weight regularizer")
    total.backward()
    assert not torch.allclose(reg_fn.W.grad, plain_fn.W.grad)  # the regularizer reaches W
    reg_fn.reducer = pml_reducers.DoNothingReducer()
    assert_close(reg_fn(x, y)["weight_reg_loss"]["losses"], expected_reg, what="sub-loss")


# ----------------------------------------------------------------------------------------
# MultipleLosses and DistributedLossWrapper
# ----------------------------------------------------------------------------------------


def test_multiple_losses_arcface_plus_center():
    x, y = batch(seed=7)
    torch.manual_seed(3)
    arc = pml_losses.ArcFaceLoss(C, D).double()
    center = build("center")
    combo = pml_losses.MultipleLosses([arc, center], weights=[1.0, 0.003])
    xa = x.clone().requires_grad_(True)
    total = combo(xa, y)
    assert_close(total, arc(x, y) + 0.003 * center(x, y), what="1 * arcface + 0.003 * center")
    total.backward()
    assert arc.W.grad is not None and arc.W.grad.abs().sum() > 0
    assert center.centers.grad is not None and center.centers.grad.abs().sum() > 0


def test_multiple_losses_of_our_own():
    x, y = batch(seed=8)
    circle, standalone = build("sparse_circle"), build("standalone")
    combo = pml_losses.MultipleLosses([circle, standalone], weights=[0.5, 2.0])
    assert_close(combo(x, y), 0.5 * circle(x, y) + 2.0 * standalone(x, y), what="combo")


@pytest.mark.parametrize("loss_name", ALL_LOSSES)
def test_distributed_wrapper_passes_through_in_one_process(loss_name):
    assert not pml_dist.is_distributed()
    x, y = batch(seed=9)
    loss_fn = build(loss_name)
    wrapped = pml_dist.DistributedLossWrapper(build(loss_name))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = wrapped(xa, y)
    expected = loss_fn(xb, y)
    assert_close(out, expected, what="wrapped")
    out.backward()
    expected.backward()
    assert_close(xa.grad, xb.grad, what="wrapped gradient")


# ----------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------


class PairDataset(torch.utils.data.Dataset):
    """Items are (data, label), as PML's trainers expect."""

    def __init__(self, n=96, dim=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % C
        means = 3.0 * torch.randn(C, dim, generator=g)
        self.data = means[self.labels] + torch.randn(n, dim, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.data[i], self.labels[i]


def _train(trainer_cls, loss_funcs, models, loss_weights, epochs=6, lr=0.05):
    optimizers = {
        f"{k}_optimizer": torch.optim.Adam(v.parameters(), lr=lr) for k, v in models.items()
    }
    if list(loss_funcs["metric_loss"].parameters()):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(
            loss_funcs["metric_loss"].parameters(), lr=lr
        )
    history = []
    trainer = trainer_cls(
        models=models,
        optimizers=optimizers,
        batch_size=32,
        loss_funcs=loss_funcs,
        dataset=PairDataset(),
        data_device=torch.device("cpu"),
        loss_weights=loss_weights,
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: history.append(float(t.losses["total_loss"].detach())),
    )
    trainer.train(num_epochs=epochs)
    return history


# PML's trainer formats the (grad-requiring) loss tensor for tqdm itself.
_TQDM_WARNING = "ignore:Converting a tensor with requires_grad=True:UserWarning"


@pytest.mark.filterwarnings(_TQDM_WARNING)
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("sparse_circle", dict(m=0.25, gamma=32.0)),
        ("curricular", dict(scale=16.0)),
        ("standalone", dict()),
        ("center_paper", dict(update_rule="paper")),
    ],
)
def test_metric_loss_only_trainer(name, kwargs):
    torch.manual_seed(0)
    cls = {
        "sparse_circle": SparseCircleLoss,
        "curricular": CurricularFaceLoss,
        "standalone": StandaloneCenterLoss,
        "center_paper": CenterLoss,
    }[name]
    loss_fn = cls(C, 4, **kwargs)
    state_before = copy.deepcopy(loss_fn.state_dict())
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    history = _train(pml_trainers.MetricLossOnly, {"metric_loss": loss_fn}, {"trunk": trunk}, None)
    assert len(history) == 6 * 3 and all(map(lambda v: v == v, history))
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3, history
    # Every piece of the loss's state was trained: W / centers by the loss optimizer (or
    # the paper's rule), t by its EMA in training mode.
    for key, before in state_before.items():
        assert not torch.equal(loss_fn.state_dict()[key], before), f"{key} did not change"


@pytest.mark.filterwarnings(_TQDM_WARNING)
def test_train_with_classifier_and_center_loss():
    torch.manual_seed(0)
    center = CenterLoss(C, 4)
    before = center.centers.detach().clone()
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    classifier = torch.nn.Linear(4, C)
    history = _train(
        pml_trainers.TrainWithClassifier,
        {"metric_loss": center, "classifier_loss": torch.nn.CrossEntropyLoss()},
        {"trunk": trunk, "classifier": classifier},
        {"metric_loss": 0.01, "classifier_loss": 1.0},
    )
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3, history
    assert not torch.equal(center.centers.detach(), before)


# ----------------------------------------------------------------------------------------
# state_dict round trip
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,keys",
    [
        (SparseCircleLoss, {}, {"W"}),
        (CurricularFaceLoss, {}, {"W", "t"}),
        (CenterLoss, {"update_rule": "gradient"}, {"centers"}),
        (CenterLoss, {"update_rule": "paper"}, {"centers"}),
        (StandaloneCenterLoss, {}, {"centers"}),
    ],
)
def test_state_dict_round_trip(cls, kwargs, keys):
    torch.manual_seed(10)
    trained = cls(C, D, **kwargs)
    trained.train()
    params = list(trained.parameters())
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for step in range(3):  # move W / centers / t away from their initial values
        x, y = batch(seed=20 + step, dtype=torch.float32)
        loss = trained(x.requires_grad_(True), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
    state = trained.state_dict()
    assert set(state) == keys
    torch.manual_seed(11)
    fresh = cls(C, D, **kwargs)
    assert any(not torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
    fresh.load_state_dict(state)
    for k in keys:
        assert torch.equal(fresh.state_dict()[k], state[k]), k
    trained.eval()
    fresh.eval()
    x, y = batch(seed=30, dtype=torch.float32)
    assert torch.equal(fresh(x, y), trained(x, y))


# ----------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(6, D)
        self.circle = SparseCircleLoss(C, D, gamma=32.0)
        self.curricular = CurricularFaceLoss(C, D, scale=16.0)

    def forward(self, x, y):
        emb = self.trunk(x)
        return self.circle(emb, y) + self.curricular(emb, y)


def test_torch_compile_eager_backend():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="eager")
    data = PairDataset(n=20)
    for step in range(2):  # two training steps: t is updated inside, W gets gradients
        x, y = data.data[step * 10 : step * 10 + 10], data.labels[step * 10 : step * 10 + 10]
        out_e = eager(x, y)
        out_c = compiled(x, y)
        assert_close(out_c, out_e, 1e-5, 1e-5, what=f"compiled loss step {step}")
        out_e.backward()
        out_c.backward()
        assert_close(compiled_model.curricular.t, eager.curricular.t, 1e-6, 1e-7, what="t")
        for (name, p_e), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close(p_c.grad, p_e.grad, 1e-4, 1e-5, what=f"grad {name}")
    assert float(eager.curricular.t) != 0.0
