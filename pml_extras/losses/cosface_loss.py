"""CosFace (large margin cosine), a blockwise drop-in for PML's ``CosFaceLoss``."""

from __future__ import annotations

from typing import Optional, Union

from ..functional.margin import check_margin_args, cosface_target
from . import _low_dim
from .base_proxy_loss import BaseProxyLoss


class CosFaceLoss(BaseProxyLoss):
    """CosFace (large margin cosine) loss; a blockwise drop-in for PML's ``CosFaceLoss``.

    Wang, Wang, Zhou, Ji, Gong, Zhou, Li and Liu, "CosFace: Large Margin Cosine Loss for
    Deep Face Recognition", CVPR 2018. With c_j = cos(theta_j) the cosine between the
    normalised embedding and class proxy j, and y the label:

        L = cross_entropy(s * [c_y - m, c_j for j != y], y)
          = softplus( logsumexp_{j != y} s*c_j - s*(c_y - m) )

    Per-sample values equal PML's ``CosFaceLoss``, but the B x C logits are never
    materialised: the logsumexp runs blockwise over class chunks in float32 (Triton
    kernels on CUDA). Same arguments, defaults and ``W`` of shape (D, C) as PML's, so a
    PML state_dict loads as is; unlike PML, ``W`` keeps its dtype.

    Args:
        num_classes: C. embedding_size: D. The proxies ``W`` have shape (D, C).
        margin: additive cosine margin m (paper: 0.35, the default; the paper finds
            0.25-0.45 works well).
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
        >>> loss_fn = CosFaceLoss(num_classes=1000, embedding_size=128)
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
        margin: float = 0.35,
        scale: Union[float, str] = 64,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        **kwargs,
    ):
        hyper_parameters = {"margin": margin, "scale": scale}
        super().__init__(num_classes, embedding_size, hyper_parameters, chunk_size, impl, **kwargs)

    @classmethod
    def resolve_hyper_parameters(
        cls, num_classes, embedding_size, owner=None, margin=0.35, scale=64
    ) -> dict:
        """margin: a number (no "auto": a cosine margin has no low-dimensional rule);
        scale: a number or "auto" (64, or AdaCos's when low-dimensional)."""
        owner = owner or cls.__name__
        margin = float(margin)
        scale = _low_dim.resolve_scale(scale, 64.0, num_classes, embedding_size, owner)
        check_margin_args(margin, scale, owner, arc=False)
        return {"margin": margin, "scale": float(scale)}

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        """f(c_y) = c_y - m, PML's name for it."""
        return cosface_target(cosine_of_target_classes, self.margin)


def __getattr__(name):
    # Helpers this module held before BaseProxyLoss (deprecated aliases).
    from ._deprecated import moved_name

    return moved_name(__name__, name)
