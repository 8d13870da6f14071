"""The proxy-loss base class (issue 19): the old margin helper names still work, a new proxy
loss needs only its formula and defaults, no loss module imports another, and distributed/
uses only public or base-class names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from margin_cases import (
    C_,
    D_,
    F64,
    KINDS,
    OURS,
    assert_close,
    clustered_batch,
)
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning.distances import (
    CosineSimilarity,
)

pytestmark = pytest.mark.usefixtures("single_thread")


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
