"""CurricularFace.

Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
Recognition", CVPR 2020, as the authors' code computes it. With c_j = cos(theta_j):

    target   f(c_y) = cos(theta_y + m)           if c_y > cos(pi - m)
                      c_y - m * sin(pi - m)      otherwise (keeps f monotonic)
    negative g(c_j) = c_j * (t + c_j)            if c_j > cos(theta_y + m)  (hard)
                      c_j                        otherwise
    loss            = cross_entropy(s * [f(c_y), g(c_j) ...], y)
                    = softplus( logsumexp_{j != y} s*g(c_j) - s*f(c_y) )

t is an exponential moving average of the batch-mean target cosine, updated (without
gradient) before it is used: t <- momentum * mean_i c_{y_i} + (1 - momentum) * t.
The paper and the authors use margin m=0.5, scale s=64, momentum 0.01.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.class_lse import class_logsumexp, target_cosine


def curricular_target(cos_y: Tensor, margin: float) -> Tuple[Tensor, Tensor]:
    """Return (f(c_y), cos(theta_y + m)) for target cosines ``cos_y``.

    sqrt is taken of a clamped 1 - c^2 so that c = +-1 has a finite gradient.
    """
    sin_y = torch.sqrt(torch.clamp_min(1.0 - cos_y * cos_y, 1e-12))
    cos_y_m = cos_y * math.cos(margin) - sin_y * math.sin(margin)
    threshold = math.cos(math.pi - margin)
    fallback = cos_y - margin * math.sin(math.pi - margin)
    return torch.where(cos_y > threshold, cos_y_m, fallback), cos_y_m


def update_t(t: Tensor, cos_y: Tensor, momentum: float) -> Tensor:
    """One EMA step of CurricularFace's t from this batch's target cosines (no gradient)."""
    with torch.no_grad():
        if cos_y.numel() == 0:
            return t.clone()
        return momentum * cos_y.mean().to(t.dtype) + (1.0 - momentum) * t


def curricular_face_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    t: float | Tensor,
    margin: float = 0.5,
    scale: float = 64.0,
    *,
    target_cos: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Per-sample CurricularFace loss with a given (already updated) ``t``.

    Args:
        embeddings: (B, D) embeddings (normalised here).
        weight: (D, C) class proxies.
        labels: (B,) int64 labels in [0, C).
        t: the curriculum parameter for this batch (see :func:`update_t`).
        margin, scale: additive angular margin m (0.5) and logit scale s (64).
        target_cos: optional (B,) detached target cosines already computed with
            :func:`pml_extras.ops.class_lse.target_cosine` (saves a second gather).
        chunk_size, impl: as in :func:`pml_extras.functional.arcface_loss` (matmul
            operands: autocast dtype, else bf16/fp16 embeddings' dtype, else float32).

    Returns:
        (B,) per-sample cross-entropy losses, float32 (float64 for float64 inputs).
    """
    # Raw embeddings: class_logsumexp normalises them outside the matmul (float32 norms,
    # radial gradient removed in float32), so the matmul operands can follow the operand
    # policy (autocast / bf16 / fp16 on tensor cores) without the fp16 radial overflow.
    # The hard-negative threshold comes from the target cosines, before the class pass.
    if target_cos is None:
        target_cos = target_cosine(embeddings, weight, labels)
    _, threshold = curricular_target(target_cos, margin)
    lse_n, cos_y = class_logsumexp(
        embeddings,
        weight,
        labels,
        "curricular",
        scale,
        t,
        row_param=threshold,
        chunk_size=chunk_size,
        impl=impl,
    )
    target_logit, _ = curricular_target(cos_y, margin)
    return F.softplus(lse_n - scale * target_logit)
