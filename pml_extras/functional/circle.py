"""Class-level ("sparse") Circle loss.

Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020, eq. (4) with class-level labels: the positives of a sample are its class
proxies and the negatives are every other class proxy.

    a_p = [1 + m - s_p]_+          a_n = [s_n + m]_+          (detached weights)
    L   = softplus( logsumexp_n gamma*a_n*(s_n - m) + logsumexp_p -gamma*a_p*(s_p - (1 - m)) )

With one positive per sample (integer labels) the second logsumexp is a single term.
The TF2 reference implementation computed the negative logsumexp by removing the
positive from a logsumexp over all classes with ``log(1 - exp(.))``, which overflows;
here the positive column is simply masked out of the negative logsumexp.

Recommended settings from the paper: face recognition m=0.25, gamma=256; person
re-identification m=0.25, gamma=128; fine-grained image retrieval m=0.4, gamma=80.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.class_lse import class_logsumexp
from ._numerics import masked_logsumexp, working_dtype


def circle_target_logit(cos_y: Tensor, m: float, gamma: float) -> Tensor:
    """gamma * [1 + m - s_p]_+ * (s_p - (1 - m)), with the weight detached."""
    alpha_p = torch.clamp_min(1.0 + m - cos_y.detach(), 0.0)
    return gamma * alpha_p * (cos_y - (1.0 - m))


def class_circle_loss(
    similarities: Tensor, targets: Tensor, m: float = 0.25, gamma: float = 256.0
) -> Tensor:
    """Per-row class-level Circle loss from precomputed cosine similarities.

    For users who bring their own cosine head (the TF2 / Keras style).

    Args:
        similarities: (B, C) cosine similarities between embeddings and class proxies.
        targets: (B,) integer labels in [0, C), or (B, C) one-hot / multi-hot labels
            (a row may then have several positives; rows without positives or without
            negatives have zero loss).
        m: relaxation margin (0.25 for faces and re-ID, 0.4 for fine-grained retrieval).
        gamma: scale (256 faces, 128 re-ID, 80 fine-grained).

    Returns:
        (B,) per-row losses in float32 (float64 for float64 input).

    Example:
        >>> sims = torch.nn.functional.normalize(torch.randn(4, 8), dim=1) @ \\
        ...     torch.nn.functional.normalize(torch.randn(8, 10), dim=0)
        >>> class_circle_loss(sims, torch.tensor([0, 3, 3, 9]), m=0.25, gamma=256).shape
        torch.Size([4])
    """
    if similarities.ndim != 2:
        raise ValueError(
            "similarities must have shape (batch_size, num_classes), "
            f"got {tuple(similarities.shape)}"
        )
    batch, num_classes = similarities.shape
    if targets.ndim == 1:
        if targets.shape[0] != batch:
            raise ValueError(
                f"targets of shape {tuple(targets.shape)} do not match similarities of shape "
                f"{tuple(similarities.shape)}"
            )
        if targets.is_floating_point():
            raise ValueError(f"integer targets must have an integer dtype, got {targets.dtype}")
        if batch > 0:
            lo, hi = torch.stack([targets.min(), targets.max()]).tolist()
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"label {bad} is out of range for num_classes={num_classes} "
                    f"(labels must lie in [0, {num_classes}))"
                )
        cols = torch.arange(num_classes, device=similarities.device)
        positive = cols[None, :] == targets[:, None].long()
    elif targets.ndim == 2:
        if targets.shape != similarities.shape:
            raise ValueError(
                f"one-hot targets of shape {tuple(targets.shape)} do not match similarities "
                f"of shape {tuple(similarities.shape)}"
            )
        positive = targets > 0
    else:
        raise ValueError(f"targets must be (B,) or (B, C), got shape {tuple(targets.shape)}")

    s = similarities.to(working_dtype(similarities))
    alpha_n = torch.clamp_min(s.detach() + m, 0.0)
    logit_n = gamma * alpha_n * (s - m)
    logit_p = -circle_target_logit(s, m, gamma)
    lse_n = masked_logsumexp(logit_n, ~positive)
    lse_p = masked_logsumexp(logit_p, positive)
    return F.softplus(lse_n + lse_p)


def sparse_circle_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    m: float = 0.25,
    gamma: float = 256.0,
    *,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> Tensor:
    """Per-sample class-level Circle loss against class proxies, never building B x C.

    Args:
        embeddings: (B, D) embeddings (normalised here).
        weight: (D, C) class proxies (normalised per column inside the kernel).
        labels: (B,) int64 labels in [0, C).
        m, gamma: see :func:`class_circle_loss`.
        chunk_size: classes per block of the blockwise logsumexp.
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
    """
    # Raw embeddings: class_logsumexp normalises them outside the matmul (float32 norms,
    # radial gradient removed in float32), so the matmul operands can follow the operand
    # policy (autocast / bf16 / fp16 on tensor cores) without the fp16 radial overflow.
    lse_n, cos_y = class_logsumexp(
        embeddings, weight, labels, "circle", gamma, m, chunk_size=chunk_size, impl=impl
    )
    # With C == 1 there are no negatives: lse_n = -inf and the loss is exactly 0.
    return F.softplus(lse_n - circle_target_logit(cos_y, m, gamma))
