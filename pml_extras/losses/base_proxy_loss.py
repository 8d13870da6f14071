"""The base class of the class-proxy losses (ArcFace, CosFace, CurricularFace, SparseCircle).

PML's own pattern, ``LargeMarginSoftmaxLoss`` -> ``ArcFaceLoss``: the base owns what every
loss with learnable class proxies ``W`` (D, C) does the same way, and each loss file gives
only its formula and its defaults.

The base owns:

* construction: PML's arguments (reducer, distance, regularizers, ``weight_init_func``),
  the checks shared by every proxy loss (cosine distance, ``num_classes``,
  ``embedding_size``, ``impl``, ``chunk_size``), the hyper-parameters as attributes
  recorded by PML's record-keeper, and the proxies ``W`` of shape (D, C) filled by
  ``weight_init_func`` (PML's layout, so a PML state_dict loads as is);
* the defaults machinery: a subclass's :meth:`resolve_hyper_parameters` turns its
  arguments (numbers or ``"auto"``) into floats for a given (C, D), with the checks that
  name the argument and its value. It is a classmethod, so the class-sharded losses of
  :mod:`pml_extras.distributed` resolve exactly the same values for the same (C, D);
* :meth:`compute_loss`: batch validation (shapes, dtypes, label range, no ``ref_emb``),
  a zero loss for an empty batch, miners' ``indices_tuple`` as per-sample weights (PML's
  convention for classification losses), and the weight regularizer on ``W``;
* :meth:`get_logits` (scaled cosines, no margin; argmax predicts),
  :meth:`get_default_distance` (``CosineSimilarity``) and :meth:`get_default_reducer`
  (``MeanReducer``).

A subclass gives:

* ``__init__`` with its own arguments and defaults, calling
  ``super().__init__(num_classes, embedding_size, {name: value, ...}, chunk_size=...,
  impl=..., **kwargs)``;
* :meth:`resolve_hyper_parameters` (its defaults, "auto" rules and value checks);
* its formula: :meth:`modify_cosine_of_target_classes` (the target logit f(c_y) of the
  default formula, the margin softmax of ArcFace/CosFace), or :meth:`per_sample_losses`
  ((B,) losses for a validated batch) for a loss of another form;
* ``scale_name``, the attribute holding its logit scale (``"scale"`` or ``"gamma"``);
* optionally ``default_weight_init`` (a ``weight_init_func``; None: PML's ``normal_``).

Example (a proxy-NCA-like loss in a few lines)::

    class MyLoss(BaseProxyLoss):
        def __init__(self, num_classes, embedding_size, scale=16.0, **kwargs):
            super().__init__(num_classes, embedding_size, {"scale": scale}, **kwargs)

        @classmethod
        def resolve_hyper_parameters(cls, num_classes, embedding_size, owner=None, scale=16.0):
            return {"scale": float(scale)}

        def per_sample_losses(self, embeddings, labels):
            return torch.nn.functional.cross_entropy(
                self.get_logits(embeddings), labels, reduction="none")
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.reducers import MeanReducer
from torch import Tensor

from .._validation import check_embeddings, check_labels, check_no_ref
from ..functional.margin import margin_softmax_losses, mean_target_angle
from . import _common


class BaseProxyLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """Base of the PML losses with learnable class proxies ``W`` (D, C); see the module
    docstring for what it owns and what a subclass gives.

    Args:
        num_classes: C. embedding_size: D. ``W`` has shape (D, C), as PML's.
        hyper_parameters: the subclass's arguments as given (numbers or ``"auto"``),
            resolved by :meth:`resolve_hyper_parameters` and set as attributes.
        chunk_size: classes per block of the blockwise logsumexp (default: ~4M logits).
        impl: "auto" (Triton or hybrid on CUDA, else PyTorch), "torch", "triton", "hybrid".
            "auto" picks "hybrid" on CUDA where the cost model predicts it faster (it
            has not run on a GPU yet): library matmuls per class chunk plus fused Triton
            epilogues (:mod:`pml_extras.ops.class_lse_hybrid`), the PyTorch path's
            numbers up to rounding (16-bit operands round G / ||w||, not G and
            W / ||w||); it needs Triton (a CUDA tensor, or ``TRITON_INTERPRET=1`` on
            CPU) and float32/bf16/fp16 inputs (float64 raises TypeError).
        **kwargs: PML's: weight_regularizer, weight_reg_weight, weight_init_func, reducer,
            distance (CosineSimilarity only), embedding_regularizer, collect_stats.
    """

    #: Attribute holding the logit scale that :meth:`get_logits` multiplies by.
    scale_name = "scale"
    #: Attributes PML's record-keeper logs (besides the resolved hyper-parameters).
    recorded_attributes = ()
    #: Statistics it logs when ``collect_stats`` is on ("avg_angle": the default formula's).
    recorded_stats = ()
    #: The ``weight_init_func`` used when none is given; None: PML's ``normal_``.
    default_weight_init: Optional[Callable[[Tensor], Tensor]] = None

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        hyper_parameters: Dict[str, object],
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        values = self.resolve_hyper_parameters(num_classes, embedding_size, **hyper_parameters)
        self.check_arguments(self, num_classes, embedding_size, impl, chunk_size)
        for name, value in values.items():
            setattr(self, name, value)
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.chunk_size, self.impl = chunk_size, impl
        self.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
        self.weight_init_func(self.W)
        self.add_to_recordable_attributes(
            list_of_names=[*self.recorded_attributes, *values], is_stat=False
        )
        if self.recorded_stats:
            self.add_to_recordable_attributes(list_of_names=list(self.recorded_stats), is_stat=True)

    # ------------------------------------------------------------ what a subclass gives
    @classmethod
    def resolve_hyper_parameters(
        cls, num_classes: int, embedding_size: int, owner: Optional[str] = None, **given
    ) -> Dict[str, float]:
        """The loss's hyper-parameters as floats for (C, D): defaults, "auto", checks.

        ``owner`` names the loss in errors (default: this class's name; the sharded twins
        pass theirs). Every error is a ValueError naming the argument and the value.
        """
        raise NotImplementedError

    def modify_cosine_of_target_classes(self, cosine_of_target_classes: Tensor) -> Tensor:
        """f(c_y), the target logit before scaling (PML's name): the identity here."""
        return cosine_of_target_classes

    def per_sample_losses(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(B,) losses of a validated, non-empty batch (labels int64 in [0, C)).

        The default formula is the margin softmax of ArcFace/CosFace (PML's
        ``LargeMarginSoftmaxLoss`` family), with s the logit scale and
        f = :meth:`modify_cosine_of_target_classes`:

            L = cross_entropy(s * [f(c_y), c_j for j != y], y)
              = softplus( logsumexp_{j != y} s*c_j - s*f(c_y) )

        computed blockwise over the classes (the B x C logits are never built). With
        ``collect_stats`` and "avg_angle" in ``recorded_stats`` it also records the mean
        target angle in degrees, as PML does. Losses of another form override this.
        """
        if self.collect_stats and "avg_angle" in self.recorded_stats:
            self.avg_angle = mean_target_angle(embeddings, self.W, labels)
        return margin_softmax_losses(
            embeddings,
            self.W,
            labels,
            getattr(self, self.scale_name),
            self.modify_cosine_of_target_classes,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )

    # ------------------------------------------------------------ shared machinery
    @staticmethod
    def check_arguments(
        loss_fn, num_classes, embedding_size, impl, chunk_size, **value_checks
    ) -> None:
        """The constructor checks of every class-proxy loss, single-device and sharded:
        cosine distance, positive int C and D, ``impl``, ``chunk_size``; ``value_checks``
        as ``positive={...}``, ``unit_interval={...}``. Call after PML's ``__init__``."""
        _common.check_class_loss_args(
            loss_fn, num_classes, embedding_size, impl, chunk_size, **value_checks
        )

    @staticmethod
    def check_values(
        owner: str,
        positive: Optional[Dict[str, float]] = None,
        unit_interval: Optional[Dict[str, float]] = None,
    ) -> None:
        """ValueErrors naming ``owner``, the argument and its value: ``positive`` values
        must be > 0 (a NaN fails too), ``unit_interval`` values must lie in [0, 1]."""
        _common.check_values(owner, positive=positive, unit_interval=unit_interval)

    @staticmethod
    def miner_weights(indices_tuple, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """PML's convention for classification losses: weight = how often a sample was mined."""
        return _common.miner_weights(indices_tuple, labels, dtype)

    @staticmethod
    def element_loss(losses: Tensor) -> dict:
        """PML's per-element loss entry for (B,) losses."""
        return _common.element_loss(losses)

    @staticmethod
    def cosine_logits(embeddings: Tensor, weight: Tensor, scale: float) -> Tensor:
        """(B, C) scale * cosines to the columns of ``weight``; a cast *copy* of ``weight``
        is used, the parameter keeps its dtype."""
        return _common.cosine_logits(embeddings, weight, scale)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        name = type(self).__name__
        check_no_ref(embeddings, labels, ref_emb, ref_labels, name, "its references are W")
        check_embeddings(embeddings, self.embedding_size, name)
        labels = check_labels(labels, self.num_classes, embeddings.shape[0], name)
        if embeddings.shape[0] == 0:
            loss_dict = {"loss": self.zero_loss()}
        else:
            losses = self.per_sample_losses(embeddings, labels)
            weights = self.miner_weights(indices_tuple, labels, losses.dtype)
            loss_dict = {"loss": self.element_loss(losses * weights)}
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_logits(self, embeddings):
        """(B, C) scale * cosine to each proxy (no margin), like PML's; argmax predicts."""
        check_embeddings(embeddings, self.embedding_size, type(self).__name__)
        return self.cosine_logits(embeddings, self.W, getattr(self, self.scale_name))

    def get_default_weight_init_func(self):
        if self.default_weight_init is not None:
            return self.default_weight_init
        return super().get_default_weight_init_func()

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_reducer(self):
        return MeanReducer()
