from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .._validation import check_embeddings, check_labels
from ..functional._numerics import working_dtype
from ..functional.center import INTER_FORMS, standalone_center_loss
from . import _common


class StandaloneCenterLoss(BaseMetricLossFunction):
    """Center loss that needs no softmax: a center term plus a log inter-sample term.

    From the seed repository "standalone-center-loss" (which builds on Wen et al.,
    ECCV 2016). With m the batch size and d the squared Euclidean distance:

        intra = 1/m * sum_i d(x_i, c_{y_i})
        inter = -1/m * sum_i sum_j [y_i != y_j] * log(d(x_i, x_j))        inter_form="log"
        inter = -1/m * sum_i sum_j [y_i != y_j] * log(1 + d(x_i, x_j))    inter_form="log1p"
        total = intra_weight * intra + inter_weight * inter

    "log" is the README's formula and the default; d is clamped at 1e-12 so coinciding
    points give a large but finite term. "log1p" is what the seed's code computes, and
    so what produced its result table (e.g. Fashion-MNIST accuracy 0.922 at 128-D and
    0.921 at 2-D, with intra_weight=1.0, inter_weight=0.1, 100 epochs).

    The two parts are PML sub-losses ``intra_loss`` and ``inter_loss`` (per-sample,
    already weighted), so a reducer sees each one; with the default MeanReducer their
    sum is ``total``. With a pair miner's ``indices_tuple``, the inter term runs over
    the mined negative pairs only. ``ref_emb``/``ref_labels`` replace the batch as the
    other side of the inter pairs.

    Args:
        num_classes: C. embedding_size: D. ``centers`` (C, D) is a Parameter: give it
            to an optimizer.
        intra_weight: 1.0 in the seed. inter_weight: 0.1 in the seed.
        inter_form: "log" (README, default) or "log1p" (seed code).
        distance: an LpDistance (default squared Euclidean); others raise a ValueError.

    ``get_logits`` returns minus the distance to each center: argmax = nearest center.

    Example:
        >>> loss_fn = StandaloneCenterLoss(num_classes=10, embedding_size=2)
        >>> loss = loss_fn(torch.randn(16, 2), torch.randint(0, 10, (16,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        intra_weight: float = 1.0,
        inter_weight: float = 0.1,
        inter_form: str = "log",
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        _common.check_center_loss_args(self, num_classes, embedding_size)
        if inter_form not in INTER_FORMS:
            raise ValueError(f"{name}: inter_form must be one of {INTER_FORMS}, got {inter_form!r}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.intra_weight, self.inter_weight = float(intra_weight), float(inter_weight)
        self.inter_form = inter_form
        self.centers = torch.nn.Parameter(torch.randn(num_classes, embedding_size))
        self.add_to_recordable_attributes(
            list_of_names=["intra_weight", "inter_weight"], is_stat=False
        )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's forward, except that the reducer sees float32 (or wider) embeddings.

        With two sub-losses PML's MultipleReducers adds them up in a tensor of the
        embeddings' dtype, so fp16/bf16 embeddings (autocast) would round the float32
        terms to half and return a half loss; the other losses return float32.
        """
        self.reset_stats()
        c_f.check_shapes(embeddings, labels)
        if labels is not None:
            labels = c_f.to_device(labels, embeddings)
        ref_emb, ref_labels = c_f.set_ref_emb(embeddings, labels, ref_emb, ref_labels)
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        wide = embeddings.to(working_dtype(embeddings))  # the cast passes the gradient on
        return self.reducer(loss_dict, wide, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        name = type(self).__name__
        check_embeddings(embeddings, self.embedding_size, name)
        labels = check_labels(labels, self.num_classes, embeddings.shape[0], name)
        using_ref = ref_emb is not embeddings
        if using_ref:
            check_embeddings(ref_emb, self.embedding_size, f"{name} (ref_emb)")
            if ref_labels is None:
                raise ValueError(f"{name}: ref_labels are required with ref_emb")
            ref_labels = check_labels(ref_labels, self.num_classes, ref_emb.shape[0], name)
        if embeddings.shape[0] == 0:
            return self.zero_losses()
        negative_pairs = None
        if indices_tuple is not None:
            _, _, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
            negative_pairs = (a2, n)
        intra, inter = standalone_center_loss(
            embeddings,
            self.centers,
            labels,
            inter_form=self.inter_form,
            ref_emb=ref_emb if using_ref else None,
            ref_labels=ref_labels if using_ref else None,
            negative_pairs=negative_pairs,
            **_common.lp_settings(self.distance),
        )
        return {
            "intra_loss": _common.element_loss(self.intra_weight * intra),
            "inter_loss": _common.element_loss(self.inter_weight * inter),
        }

    def _sub_loss_names(self):
        return ["intra_loss", "inter_loss"]

    def get_logits(self, embeddings):
        """(B, C) minus the distance to every center; argmax = nearest center."""
        return _common.nearest_center_logits(self, embeddings)

    def get_default_distance(self):
        return LpDistance(normalize_embeddings=False, p=2, power=2)

    def get_default_reducer(self):
        return MeanReducer()
