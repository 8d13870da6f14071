"""Old helper names of the loss modules, kept working behind a DeprecationWarning.

Before :class:`~pml_extras.losses.base_proxy_loss.BaseProxyLoss`, ``arcface_loss.py``
held the construction and loss-dict helpers that ``cosface_loss.py`` imported from it.
The base class does both now; these shims give the old functions their old behaviour.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .._validation import check_embeddings, check_labels, check_no_ref
from ..functional.margin import margin_softmax_losses, mean_target_angle
from . import _common
from .base_proxy_loss import BaseProxyLoss


def init_margin_loss(loss_fn, num_classes, embedding_size, scale, chunk_size, impl) -> None:
    """Deprecated: subclass :class:`BaseProxyLoss`, whose ``__init__`` does this.

    What ArcFaceLoss and CosFaceLoss did after ``super().__init__``: the proxy checks,
    the proxies ``W`` (D, C) from ``weight_init_func``, the scale and PML's recordable
    attributes."""
    BaseProxyLoss.check_arguments(loss_fn, num_classes, embedding_size, impl, chunk_size)
    loss_fn.num_classes, loss_fn.embedding_size = num_classes, embedding_size
    loss_fn.chunk_size, loss_fn.impl = chunk_size, impl
    loss_fn.W = torch.nn.Parameter(torch.empty(embedding_size, num_classes))
    loss_fn.weight_init_func(loss_fn.W)
    loss_fn.scale = float(scale)
    loss_fn.add_to_recordable_attributes(
        list_of_names=["num_classes", "margin", "scale"], is_stat=False
    )
    loss_fn.add_to_recordable_attributes(name="avg_angle", is_stat=True)


def margin_loss_dict(
    loss_fn, target_fn: Callable, embeddings, labels, indices_tuple, ref_emb, ref_labels
) -> dict:
    """Deprecated: :meth:`BaseProxyLoss.compute_loss` with a ``per_sample_losses``.

    The PML loss dict of a margin-softmax loss ``loss_fn`` (W, scale, chunk_size, impl)
    with target logit ``target_fn(c_y)``."""
    name = type(loss_fn).__name__
    check_no_ref(embeddings, labels, ref_emb, ref_labels, name, "its references are W")
    check_embeddings(embeddings, loss_fn.embedding_size, name)
    labels = check_labels(labels, loss_fn.num_classes, embeddings.shape[0], name)
    if embeddings.shape[0] == 0:
        loss_dict = {"loss": loss_fn.zero_loss()}
    else:
        if loss_fn.collect_stats:
            loss_fn.avg_angle = mean_target_angle(embeddings, loss_fn.W, labels)
        losses = margin_softmax_losses(
            embeddings,
            loss_fn.W,
            labels,
            loss_fn.scale,
            target_fn,
            chunk_size=loss_fn.chunk_size,
            impl=loss_fn.impl,
        )
        weights = _common.miner_weights(indices_tuple, labels, losses.dtype)
        loss_dict = {"loss": _common.element_loss(losses * weights)}
    loss_fn.add_weight_regularization_to_loss_dict(loss_dict, loss_fn.W.t())
    return loss_dict


MOVED = {
    "init_margin_loss": (init_margin_loss, "subclass pml_extras.losses.BaseProxyLoss"),
    "margin_loss_dict": (margin_loss_dict, "use BaseProxyLoss.compute_loss"),
}


def moved_name(module: str, name: str):
    """The old helper ``name`` of ``module``, with a DeprecationWarning; AttributeError
    for any other name (the body of the loss modules' ``__getattr__``)."""
    if name not in MOVED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    value, advice = MOVED[name]
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed; {advice}",
        DeprecationWarning,
        stacklevel=3,
    )
    return value
