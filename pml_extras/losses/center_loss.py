from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer

from .._validation import check_embeddings, check_labels, check_no_ref
from ..functional.center import center_loss, center_update
from . import _common

UPDATE_RULES = ("gradient", "paper")


class CenterLoss(BaseMetricLossFunction):
    """Center loss: pull each embedding towards a learned center of its class.

    Wen, Zhang, Li and Qiao, "A Discriminative Feature Learning Approach for Deep Face
    Recognition", ECCV 2016. Per sample, l_i = d(x_i, c_{y_i}), with d the squared
    Euclidean distance by default; the MeanReducer gives L_C = mean_i l_i (the paper's
    1/2 is absorbed into the weight lambda). It is meant to be *combined* with a softmax
    or margin loss, which keeps the classes apart while this term makes them compact:

        # PML's MultipleLosses, with a classification loss that owns its own W:
        loss_fn = pytorch_metric_learning.losses.MultipleLosses(
            [ArcFaceLoss(C, D), CenterLoss(C, D)], weights=[1.0, 0.003])

        # PML's TrainWithClassifier (softmax on a classifier head + center loss):
        loss_funcs = {"metric_loss": CenterLoss(C, D),
                      "classifier_loss": torch.nn.CrossEntropyLoss()}
        loss_weights = {"metric_loss": 0.003, "classifier_loss": 1.0}
        optimizers["metric_loss_optimizer"] = torch.optim.SGD(
            loss_funcs["metric_loss"].parameters(), lr=0.5)   # gradient mode only

    Args:
        num_classes: C. embedding_size: D. ``centers`` has shape (C, D).
        update_rule: "gradient" (``centers`` is a Parameter; give it to an optimizer,
            e.g. SGD with lr 0.5 as in the paper's experiments) or "paper" (``centers``
            is a buffer updated by the paper's rule in training mode, after the loss is
            computed: delta c_j = sum_{y_i=j}(c_j - x_i)/(1 + n_j), c_j -= alpha*delta c_j).
        alpha: the paper's center learning rate (0.5), used by update_rule="paper".
        distance: an LpDistance; default LpDistance(normalize_embeddings=False, p=2,
            power=2), the squared Euclidean distance. Any other distance is an error.
        reducer, embedding_regularizer: as in PML.

    ``get_logits`` returns minus the distance to every center, so its argmax is the
    nearest-center prediction the seeds evaluate with. Miners' ``indices_tuple`` become
    per-sample weights, as in PML's classification losses.

    Example:
        >>> center = CenterLoss(num_classes=10, embedding_size=2)
        >>> loss = center(torch.randn(16, 2), torch.randint(0, 10, (16,)))
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        update_rule: str = "gradient",
        alpha: float = 0.5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        _common.check_center_loss_args(self, num_classes, embedding_size)
        if update_rule not in UPDATE_RULES:
            raise ValueError(
                f"{name}: update_rule must be one of {UPDATE_RULES}, got {update_rule!r}"
            )
        if update_rule == "paper" and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}: alpha must lie in [0, 1], got {alpha}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.update_rule, self.alpha = update_rule, float(alpha)
        centers = torch.randn(num_classes, embedding_size)
        if update_rule == "gradient":
            self.centers = torch.nn.Parameter(centers)
        else:
            self.register_buffer("centers", centers)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        name = type(self).__name__
        check_no_ref(
            embeddings, labels, ref_emb, ref_labels, name, "its references are its centers"
        )
        check_embeddings(embeddings, self.embedding_size, name)
        labels = check_labels(labels, self.num_classes, embeddings.shape[0], name)
        if embeddings.shape[0] == 0:
            return {"loss": self.zero_loss()}
        losses = center_loss(embeddings, self.centers, labels, **_common.lp_settings(self.distance))
        if self.update_rule == "paper" and self.training:
            self.centers.copy_(center_update(self.centers, embeddings, labels, self.alpha))
        weights = _common.miner_weights(indices_tuple, labels, losses.dtype)
        return {"loss": _common.element_loss(losses * weights)}

    def get_logits(self, embeddings):
        """(B, C) minus the distance to every center; argmax = nearest center."""
        return _common.nearest_center_logits(self, embeddings)

    def get_default_distance(self):
        return LpDistance(normalize_embeddings=False, p=2, power=2)

    def get_default_reducer(self):
        return MeanReducer()
