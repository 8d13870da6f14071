"""Straightforward dense baselines for the speed benchmark (``benchmarks/speed.py``, its
providers in ``benchmarks/speed_bench/providers.py``).

These build the full B x C logits, the way the losses are usually written, so that the
blockwise losses of ``pml_extras`` have an honest reference to be compared with:

* :class:`NaiveClassCircleLoss`: class-level Circle loss (Sun et al., CVPR 2020) with
  integer labels: one B x C cosine matrix, the target column gathered, the negatives
  masked by a scatter of -inf, one logsumexp.
* :class:`NaiveCurricularFace`: CurricularFace (Huang et al., CVPR 2020) written after the
  authors' ``head.py``: normalise W, full B x C cosine, clamp, gather the target,
  cos(theta + m) with the threshold fallback, hard-example mask, t update, masked
  assignment, scatter of the target logit, scale, cross-entropy.

Both take raw embeddings (normalised inside), labels (B,) int64, and hold ``W`` (D, C)
like the PML classification losses, and return the mean loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_fp32(t: Tensor) -> Tensor:
    """The logits in float32 (float64 stays): gamma=256 / s=64 overflow half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class NaiveClassCircleLoss(torch.nn.Module):
    """Dense class-level Circle loss: builds the B x C cosines and logits."""

    def __init__(self, num_classes: int, embedding_size: int, m: float = 0.25, gamma=256.0):
        super().__init__()
        self.m, self.gamma = float(m), float(gamma)
        self.W = torch.nn.Parameter(torch.randn(embedding_size, num_classes))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        m, gamma = self.m, self.gamma
        x = F.normalize(embeddings, dim=1)
        w = F.normalize(self.W, dim=0)
        s = _at_least_fp32(x @ w)  # (B, C)
        s_p = s.gather(1, labels[:, None]).squeeze(1)
        alpha_p = torch.clamp_min(1.0 + m - s_p.detach(), 0.0)
        logit_p = -gamma * alpha_p * (s_p - (1.0 - m))
        alpha_n = torch.clamp_min(s.detach() + m, 0.0)
        logit_n = gamma * alpha_n * (s - m)
        logit_n = logit_n.scatter(1, labels[:, None], float("-inf"))
        losses = F.softplus(torch.logsumexp(logit_n, dim=1) + logit_p)
        return losses.mean()


class NaiveCurricularFace(torch.nn.Module):
    """CurricularFace as in the authors' code (dense B x C), returning the mean CE loss."""

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.5,
        scale: float = 64.0,
        momentum: float = 0.01,
    ):
        super().__init__()
        self.m, self.s, self.momentum = float(margin), float(scale), float(momentum)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin
        self.W = torch.nn.Parameter(torch.randn(embedding_size, num_classes))
        self.register_buffer("t", torch.zeros(1))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        x = F.normalize(embeddings, dim=1)
        kernel = F.normalize(self.W, dim=0)
        cos_theta = _at_least_fp32(x @ kernel).clamp(-1, 1)  # (B, C)
        rows = torch.arange(x.shape[0], device=x.device)
        target_logit = cos_theta[rows, labels].view(-1, 1)
        # The authors take sqrt(1 - c^2) unclamped; the clamp only avoids NaN at c = +-1.
        sin_theta = torch.sqrt(torch.clamp_min(1.0 - target_logit * target_logit, 1e-12))
        cos_theta_m = target_logit * self.cos_m - sin_theta * self.sin_m
        mask = cos_theta > cos_theta_m
        final_target_logit = torch.where(
            target_logit > self.threshold, cos_theta_m, target_logit - self.mm
        )
        hard_example = cos_theta[mask]
        with torch.no_grad():
            self.t = target_logit.mean() * self.momentum + (1 - self.momentum) * self.t
        cos_theta[mask] = hard_example * (self.t + hard_example)
        cos_theta.scatter_(1, labels.view(-1, 1), final_target_logit)
        output = cos_theta * self.s
        return F.cross_entropy(output, labels)
