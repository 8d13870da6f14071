"""ArcFace and CosFace: cross-entropy over scaled cosines with a margin on the target class.

* ArcFace: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
  CVPR 2019 (additive angular margin, recommended m = 0.5 rad, s = 64).
* CosFace: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition",
  CVPR 2018 (additive cosine margin, recommended m = 0.35, s = 64).

With c_j = cos(theta_j) the cosine between the normalised embedding and class proxy j:

    ArcFace  f(c_y) = cos(theta_y + m)          if theta_y <= pi - m
                      c_y - m * sin(m)          otherwise (keeps f decreasing in theta,
                                                 as pytorch-metric-learning does)
    CosFace  f(c_y) = c_y - m
    loss            = cross_entropy(s * [f(c_y), c_j ...], y)
                    = softplus( logsumexp_{j != y} s*c_j - s*f(c_y) )

The logsumexp over the C - 1 non-target classes runs blockwise (``class_logsumexp`` with
the "scaled" transform), so the B x C logits are never materialised; the margin acts on
the (B,) target cosines only, with ordinary autograd.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_embeddings, check_labels
from ..ops.class_lse import class_logsumexp, target_cosine
from ._numerics import working_dtype

# sin(theta) = sqrt(1 - c^2) is clamped away from 0: at c = +-1 the clamp stops the
# gradient (instead of d sqrt(u)/du = inf at u = 0), and just inside it stays below ~5e5.
_SIN2_EPS = 1e-12


def arcface_target(cos_y: Tensor, margin_rad: float) -> Tensor:
    """ArcFace's target logit f(c_y) (before scaling), for target cosines ``cos_y``.

    cos(theta + m) = c*cos(m) - sin(theta)*sin(m), with sin(theta) = sqrt(1 - c^2) >= 0
    (no acos, whose derivative is infinite at c = +-1). Where theta > pi - m, the value
    c - m*sin(m) is used instead, as in PML's ``ArcFaceLoss``.
    """
    m = float(margin_rad)
    sin_y = torch.sqrt(torch.clamp_min(1.0 - cos_y * cos_y, _SIN2_EPS))
    cos_y_m = cos_y * math.cos(m) - sin_y * math.sin(m)
    if m <= 0.0:  # theta <= pi <= pi - m always holds
        return cos_y_m
    # theta <= pi - m  <=>  c >= cos(pi - m), since acos is decreasing on [-1, 1].
    in_range = cos_y >= math.cos(math.pi - m)
    return torch.where(in_range, cos_y_m, cos_y - m * math.sin(m))


def cosface_target(cos_y: Tensor, margin: float) -> Tensor:
    """CosFace's target logit f(c_y) = c_y - m (before scaling)."""
    return cos_y - float(margin)


def check_margin_args(margin: float, scale: float, owner: str, arc: bool) -> None:
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"{owner}: scale must be a finite number > 0, got {scale}")
    if arc and not -math.pi < float(margin) < math.pi:
        raise ValueError(
            f"{owner}: the angular margin must lie in (-pi, pi) radians, "
            f"got {margin} rad ({math.degrees(float(margin))} degrees)"
        )
    if not math.isfinite(float(margin)):
        raise ValueError(f"{owner}: margin must be finite, got {margin}")


def margin_softmax_losses(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    scale: float,
    target_fn: Callable[[Tensor], Tensor],
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """softplus(logsumexp_{j != y} s*c_j - s*target_fn(c_y)) per sample, without checks.

    The loss modules call this after validating the batch themselves.
    """
    # Raw embeddings: class_logsumexp normalises them outside the matmul (float32 norms,
    # radial gradient removed in float32), so the matmul operands can follow the operand
    # policy (autocast / bf16 / fp16 on tensor cores) without the fp16 radial overflow.
    lse_n, cos_y = class_logsumexp(
        embeddings, weight, labels, "scaled", scale, chunk_size=chunk_size, impl=impl
    )
    # With C == 1 there are no negatives: lse_n = -inf and the loss is exactly 0.
    return F.softplus(lse_n - scale * target_fn(cos_y))


def mean_target_angle(embeddings: Tensor, weight: Tensor, labels: Tensor) -> float:
    """Mean angle in degrees between the embeddings and their class proxies (no gradient):
    PML's ``avg_angle`` statistic of its margin losses. One gather of B proxies."""
    with torch.no_grad():
        dtype = working_dtype(embeddings, weight)
        x = F.normalize(embeddings.detach().to(dtype), dim=1)
        cos_y = target_cosine(x, weight, labels)
        # Clamped: a rounded cosine just past +-1 would give NaN.
        return math.degrees(float(torch.acos(cos_y.clamp(-1.0, 1.0)).mean()))


def _checked_margin_loss(
    owner, arc, embeddings, weight, labels, margin, scale, target_fn, chunk_size, impl
):
    """The functional ArcFace/CosFace: check the inputs, then the margin softmax."""
    if not torch.is_tensor(weight) or weight.ndim != 2:
        raise ValueError(f"{owner}: weight must be a (embedding_size, num_classes) tensor")
    check_embeddings(embeddings, weight.shape[0], owner)
    labels = check_labels(labels, weight.shape[1], embeddings.shape[0], owner)
    check_margin_args(margin, scale, owner, arc=arc)
    return margin_softmax_losses(
        embeddings, weight, labels, float(scale), target_fn, chunk_size=chunk_size, impl=impl
    )


def arcface_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin_rad: float = 0.5,
    scale: float = 64.0,
    *,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Per-sample ArcFace loss against class proxies, never building the B x C logits.

    Deng et al., CVPR 2019. ``softplus(logsumexp_{j != y} s*c_j - s*f(c_y))`` with
    f(c_y) = cos(theta_y + m), or c_y - m*sin(m) where theta_y > pi - m.

    Args:
        embeddings: (B, D) embeddings (normalised here).
        weight: (D, C) class proxies (normalised per column inside the kernel).
        labels: (B,) integer labels in [0, C).
        margin_rad: additive angular margin m in *radians* (paper: 0.5; PML's
            ``ArcFaceLoss`` takes degrees, 28.6).
        scale: logit scale s (paper: 64).
        chunk_size: classes per block of the blockwise logsumexp (default ~4M logits).
        impl: "auto" (Triton or hybrid on CUDA, else PyTorch), "torch", "triton", "hybrid".
            "auto" picks "hybrid" on CUDA where the cost model predicts it faster (it
            has not run on a GPU yet): library matmuls per class chunk plus fused Triton
            epilogues (:mod:`pml_extras.ops.class_lse_hybrid`), the PyTorch path's
            numbers up to rounding (16-bit operands round G / ||w||, not G and
            W / ||w||); it needs Triton (a CUDA tensor, or ``TRITON_INTERPRET=1`` on
            CPU) and float32/bf16/fp16 inputs (float64 raises TypeError). Matmul
            operands: the autocast dtype under ``torch.autocast``, else the embeddings'
            dtype if bf16/fp16, else float32
            (:func:`pml_extras.ops.class_lse.operand_dtype`); float32 accumulation.

    Returns:
        (B,) per-sample losses, float32 (float64 for float64 inputs).

    Example:
        >>> x, W = torch.randn(8, 16), torch.randn(16, 100)
        >>> arcface_loss(x, W, torch.randint(0, 100, (8,)), 0.5, 64.0).shape
        torch.Size([8])
    """
    target = lambda c: arcface_target(c, margin_rad)  # noqa: E731
    args = (embeddings, weight, labels, margin_rad, scale, target, chunk_size, impl)
    return _checked_margin_loss("arcface_loss", True, *args)


def cosface_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: float = 0.35,
    scale: float = 64.0,
    *,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Per-sample CosFace (large margin cosine) loss, never building the B x C logits.

    Wang et al., CVPR 2018. ``softplus(logsumexp_{j != y} s*c_j - s*(c_y - m))``.

    Args:
        embeddings: (B, D) embeddings (normalised here).
        weight: (D, C) class proxies (normalised per column inside the kernel).
        labels: (B,) integer labels in [0, C).
        margin: additive cosine margin m (paper: 0.35). scale: logit scale s (paper: 64).
        chunk_size, impl: as in :func:`arcface_loss`.

    Returns:
        (B,) per-sample losses, float32 (float64 for float64 inputs).

    Example:
        >>> x, W = torch.randn(8, 16), torch.randn(16, 100)
        >>> cosface_loss(x, W, torch.randint(0, 100, (8,)), 0.35, 64.0).shape
        torch.Size([8])
    """
    target = lambda c: cosface_target(c, margin)  # noqa: E731
    args = (embeddings, weight, labels, margin, scale, target, chunk_size, impl)
    return _checked_margin_loss("cosface_loss", False, *args)
