"""ArcFace (additive angular margin), a blockwise drop-in for PML's ``ArcFaceLoss``."""

from __future__ import annotations

import math
from typing import Optional, Union

from ..functional.margin import arcface_target, check_margin_args
from . import _low_dim
from .base_proxy_loss import BaseProxyLoss


class ArcFaceLoss(BaseProxyLoss):
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
            rule, AdaCos's sqrt(2)*ln(C-1) when D < 4*ln(C*(C-1)), else 64 (docs/low_dim.md,
            "Low-dimensional embeddings"; pair it with ``weight_init_func=auto_proxy_init_``).
        chunk_size: classes per block (default: about 4M logits per block).
        impl: "auto" (Triton or hybrid on CUDA, else PyTorch), "torch", "triton", "hybrid".
            "auto" picks "hybrid" on CUDA where the cost model predicts it faster (it
            has not run on a GPU yet): library matmuls per class chunk plus fused Triton
            epilogues (:mod:`pml_extras.ops.class_lse_hybrid`), the PyTorch path's
            numbers up to rounding (16-bit operands round G / ||w||, not G and
            W / ||w||); it needs Triton (a CUDA tensor, or ``TRITON_INTERPRET=1`` on
            CPU) and float32/bf16/fp16 inputs (float64 raises TypeError).
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

    recorded_attributes = ("num_classes",)
    recorded_stats = ("avg_angle",)

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
        hyper_parameters = {"margin": margin, "scale": scale}
        super().__init__(num_classes, embedding_size, hyper_parameters, chunk_size, impl, **kwargs)

    @classmethod
    def resolve_hyper_parameters(
        cls, num_classes, embedding_size, owner=None, margin=28.6, scale=64
    ) -> dict:
        """margin: degrees, or "auto" (the low-dimensional rule), stored in radians as
        PML does; scale: a number or "auto" (64, or AdaCos's when low-dimensional)."""
        owner = owner or cls.__name__
        if _low_dim.is_auto(margin, "margin", owner):
            margin = _low_dim.resolve_angular_margin(
                margin, math.radians(28.6), num_classes, embedding_size, owner
            )
        else:
            margin = math.radians(float(margin))
        scale = _low_dim.resolve_scale(scale, 64.0, num_classes, embedding_size, owner)
        check_margin_args(margin, scale, owner, arc=True)
        return {"margin": margin, "scale": float(scale)}

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        """f(c_y), PML's name for it: cos(theta + m), or c - m*sin(m) past pi - m."""
        return arcface_target(cosine_of_target_classes, self.margin)


def __getattr__(name):
    # Helpers this module held before BaseProxyLoss (deprecated aliases).
    from ._deprecated import moved_name

    return moved_name(__name__, name)
