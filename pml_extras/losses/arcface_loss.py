from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.reducers import MeanReducer

from .._validation import check_embeddings
from ..functional._numerics import working_dtype
from ..functional.margin import arcface_target, check_margin_args, margin_softmax_losses
from ..ops.class_lse import target_cosine
from . import _common, _low_dim


def init_margin_loss(loss_fn, num_classes, embedding_size, scale, chunk_size, impl) -> None:
    """What ArcFaceLoss and CosFaceLoss share after ``super().__init__``: the proxies and
    checks of every class loss, the scale, and PML's recordable attributes."""
    _common.init_class_proxies(loss_fn, num_classes, embedding_size, chunk_size, impl)
    loss_fn.scale = float(scale)
    loss_fn.add_to_recordable_attributes(
        list_of_names=["num_classes", "margin", "scale"], is_stat=False
    )
    loss_fn.add_to_recordable_attributes(name="avg_angle", is_stat=True)


def margin_loss_dict(
    loss_fn, target_fn: Callable, embeddings, labels, indices_tuple, ref_emb, ref_labels
) -> dict:
    def per_sample(labels):
        if loss_fn.collect_stats:
            # PML's statistic: mean target angle in degrees (one extra gather of B proxies).
            x = torch.nn.functional.normalize(
                embeddings.detach().to(working_dtype(embeddings, loss_fn.W)), dim=1
            )
            cos_y = target_cosine(x, loss_fn.W, labels)
            loss_fn.avg_angle = math.degrees(float(torch.acos(cos_y).mean()))
        return margin_softmax_losses(
            embeddings,
            loss_fn.W,
            labels,
            loss_fn.scale,
            target_fn,
            chunk_size=loss_fn.chunk_size,
            impl=loss_fn.impl,
        )

    return _common.class_proxy_loss_dict(
        loss_fn, embeddings, labels, indices_tuple, ref_emb, ref_labels, per_sample
    )


class ArcFaceLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """ArcFace (additive angular margin) loss; a blockwise drop-in for PML's ``ArcFaceLoss``.

    Deng, Guo, Xue and Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019. With c_j = cos(theta_j) the cosine between the normalised
    embedding and class proxy j, and y the label:

        f(c_y) = cos(theta_y + m)   if theta_y <= pi - m   else   c_y - m*sin(m)
        L      = cross_entropy(s * [f(c_y), c_j for j != y], y)
               = softplus( logsumexp_{j != y} s*c_j - s*f(c_y) )

    The fallback keeps the target logit decreasing in theta_y, as PML does. Per-sample
    values equal PML's ``ArcFaceLoss``, but the B x C logits are never materialised: the
    logsumexp runs blockwise over class chunks in float32 (Triton kernels on CUDA), and
    cos = +-1 has finite gradients (PML's acos gives inf/NaN there). Same arguments,
    defaults and ``W`` of shape (D, C) as PML's, so a PML state_dict loads as is; unlike
    PML, ``W`` keeps its dtype (no cast to the embeddings' dtype).

    Args:
        num_classes: C. embedding_size: D. The proxies ``W`` have shape (D, C).
        margin: the angular margin in *degrees*, like PML (paper: 0.5 rad = 28.6 degrees,
            the default), or ``"auto"``: the low-dimensional rule, min(28.6 degrees,
            theta*/2) with theta* the smallest pairwise angle of the best spread of C
            proxies on S^(D-1) when D < 4*ln(C*(C-1)) (C=10: 18 degrees in 2-D, 28.6 in
            3-D), else 28.6. Stored in radians as ``self.margin``, like PML.
        scale: logit scale s (paper: 64, the default), or ``"auto"``: the low-dimensional
            rule, AdaCos's sqrt(2)*ln(C-1) when D < 4*ln(C*(C-1)), else 64 (README section
            "Low-dimensional embeddings"; pair it with ``weight_init_func=auto_proxy_init_``).
        chunk_size: classes per block (default: about 4M logits per block).
        impl: "auto" (Triton on CUDA, else PyTorch), "torch" or "triton".
        weight_regularizer, weight_reg_weight, weight_init_func, reducer, distance
        (CosineSimilarity only), embedding_regularizer: as in PML (default init
        ``normal_``; :func:`~pml_extras.losses.auto_proxy_init_` is the rule's).

    Shapes: embeddings (B, D), labels (B,) in [0, C). Per-sample losses go to the
    reducer (default MeanReducer); miners' ``indices_tuple`` become per-sample weights.
    With ``collect_stats``, ``avg_angle`` is the mean target angle in degrees, as in PML.

    Example:
        >>> loss_fn = ArcFaceLoss(num_classes=1000, embedding_size=128)
        >>> loss = loss_fn(torch.randn(32, 128), torch.randint(0, 1000, (32,)))
        >>> loss.backward()
        >>> preds = loss_fn.get_logits(torch.randn(4, 128)).argmax(1)
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Union[float, str] = 28.6,
        scale: Union[float, str] = 64,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if _low_dim.is_auto(margin, "margin", "ArcFaceLoss"):
            self.margin = _low_dim.resolve_angular_margin(
                margin, math.radians(28.6), num_classes, embedding_size, "ArcFaceLoss"
            )
        else:
            self.margin = math.radians(float(margin))
        scale = _low_dim.resolve_scale(scale, 64.0, num_classes, embedding_size, "ArcFaceLoss")
        check_margin_args(self.margin, scale, type(self).__name__, arc=True)
        init_margin_loss(self, num_classes, embedding_size, scale, chunk_size, impl)

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        """f(c_y), PML's name for it: cos(theta + m), or c - m*sin(m) past pi - m."""
        return arcface_target(cosine_of_target_classes, self.margin)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return margin_loss_dict(
            self,
            self.modify_cosine_of_target_classes,
            embeddings,
            labels,
            indices_tuple,
            ref_emb,
            ref_labels,
        )

    def get_logits(self, embeddings):
        """(B, C) scale * cosine to each proxy (no margin), like PML's; argmax predicts."""
        check_embeddings(embeddings, self.embedding_size, type(self).__name__)
        return _common.cosine_logits(embeddings, self.W, self.scale)

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_reducer(self):
        return MeanReducer()
