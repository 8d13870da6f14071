"""Small pieces shared by the loss modules: distance and argument checks, PML loss
entries, miner weights, cosine logits. The proxy losses reach them through
:class:`~pml_extras.losses.base_proxy_loss.BaseProxyLoss`."""

from __future__ import annotations

from typing import Optional

import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from .._validation import check_embeddings
from ..functional.center import pairwise_distances
from ..ops.dispatch import IMPLS


def require_cosine(distance, owner: str) -> None:
    if (
        type(distance) is not CosineSimilarity
        or not distance.normalize_embeddings
        or distance.power != 1
    ):
        raise ValueError(
            f"{owner} works on cosine similarities and needs distance=CosineSimilarity() "
            f"(normalize_embeddings=True, power=1); got {describe_distance(distance)}"
        )


def require_lp(distance, owner: str) -> None:
    if not isinstance(distance, LpDistance):
        raise ValueError(
            f"{owner} supports LpDistance only (default: squared Euclidean, "
            f"LpDistance(normalize_embeddings=False, p=2, power=2)); "
            f"got {describe_distance(distance)}"
        )


def describe_distance(distance) -> str:
    fields = ("normalize_embeddings", "p", "power", "is_inverted")
    args = ", ".join(f"{f}={getattr(distance, f)}" for f in fields if hasattr(distance, f))
    return f"{type(distance).__name__}({args})"


def element_loss(losses: Tensor) -> dict:
    return {
        "losses": losses,
        "indices": torch.arange(losses.shape[0], device=losses.device),
        "reduction_type": "element",
    }


def miner_weights(indices_tuple, labels: Tensor, dtype: torch.dtype) -> Tensor:
    """PML's convention for classification losses: weight = how often a sample was mined."""
    return lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)


def cosine_logits(embeddings: Tensor, weight: Tensor, scale: float) -> Tensor:
    """(B, C) scaled cosines; a cast *copy* of W is used, the parameter keeps its dtype."""
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    x = torch.nn.functional.normalize(embeddings.to(dtype), dim=1)
    w = torch.nn.functional.normalize(weight.to(dtype), dim=0)
    return scale * (x @ w)


def check_proxy_args(num_classes: int, embedding_size: int, owner: str) -> None:
    for name, value in (("num_classes", num_classes), ("embedding_size", embedding_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_center_loss_args(loss_fn, num_classes: int, embedding_size: int) -> None:
    """The constructor checks of the center losses: an LpDistance, positive C and D."""
    owner = type(loss_fn).__name__
    require_lp(loss_fn.distance, owner)
    check_proxy_args(num_classes, embedding_size, owner)


def nearest_center_logits(loss_fn, embeddings: Tensor) -> Tensor:
    """(B, C) minus the distance of each embedding to every center of ``loss_fn``."""
    check_embeddings(embeddings, loss_fn.embedding_size, type(loss_fn).__name__)
    return -pairwise_distances(embeddings, loss_fn.centers, **lp_settings(loss_fn.distance))


def lp_settings(distance) -> dict:
    return {
        "p": float(distance.p),
        "power": float(distance.power),
        "normalize_embeddings": bool(distance.normalize_embeddings),
    }


def check_impl(impl: str, chunk_size: Optional[int], owner: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{owner}: impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{owner}: chunk_size must be a positive int or None, got {chunk_size!r}")


def check_class_loss_args(
    loss_fn,
    num_classes: int,
    embedding_size: int,
    impl: str,
    chunk_size: Optional[int],
    *,
    positive: Optional[dict] = None,
    unit_interval: Optional[dict] = None,
) -> None:
    """The constructor checks shared by the class-proxy losses (single-GPU and sharded).

    Call after ``BaseMetricLossFunction.__init__`` (``loss_fn.distance`` must be cosine).
    ``positive`` maps hyper-parameter names to values that must be > 0 (gamma, scale);
    ``unit_interval`` maps names to values that must lie in [0, 1] (momentum). Every error
    is a ValueError naming the loss, the argument and the offending value.
    """
    owner = type(loss_fn).__name__
    require_cosine(loss_fn.distance, owner)
    check_proxy_args(num_classes, embedding_size, owner)
    check_impl(impl, chunk_size, owner)
    check_values(owner, positive=positive, unit_interval=unit_interval)


def check_values(
    owner: str, positive: Optional[dict] = None, unit_interval: Optional[dict] = None
) -> None:
    """``unit_interval`` values must lie in [0, 1], ``positive`` values must be > 0."""
    for name, value in (unit_interval or {}).items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}: {name} must lie in [0, 1], got {value}")
    for name, value in (positive or {}).items():
        # `not > 0` rather than `<= 0`: a NaN is rejected too.
        if not value > 0:
            raise ValueError(f"{owner}: {name} must be > 0, got {value}")
