"""CurricularFace: an ArcFace margin plus an adaptive curriculum on hard negatives."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..functional.curricular import curricular_face_loss, update_t
from ..ops.class_lse import target_cosine
from . import _low_dim
from .base_proxy_loss import BaseProxyLoss


class CurricularFaceLoss(BaseProxyLoss):
    """CurricularFace: an ArcFace margin plus an adaptive curriculum on hard negatives.

    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020, as the authors' code computes it. With c_j = cos(theta_j):

        f(c_y) = cos(theta_y + m)  if c_y > cos(pi - m)  else  c_y - m*sin(pi - m)
        g(c_j) = c_j*(t + c_j)     if c_j > cos(theta_y + m)  else  c_j
        L      = cross_entropy(scale * [f(c_y), g(c_j)...], y)

    ``t`` (a buffer, saved in the state_dict) is an EMA of the batch-mean target cosine,
    ``t <- momentum*mean(c_y) + (1 - momentum)*t``, updated without gradient before it
    is used, and only in training mode. (The seed TF version swaps the two EMA factors,
    giving the new batch weight 0.99, and averages cos(theta_y + m) instead of c_y.)

    Args:
        num_classes: C. embedding_size: D. The proxies ``W`` have shape (D, C).
        margin: additive angular margin m in radians, or ``"auto"`` (the default): the
            paper's 0.5 unless low-dimensional, where it is min(0.5, theta*/2), theta*
            the smallest pairwise angle of the best spread of C proxies on S^(D-1)
            (C=10: 2-D pi/10 = 0.314, 3-D 0.5). ``margin=0.5`` is the paper's exactly.
        scale: logit scale s, or ``"auto"`` (the default): the paper's 64 unless the
            embedding is low-dimensional for C, D < 4*ln(C*(C-1)) (C=10: D <= 17), where
            it is AdaCos's fixed scale sqrt(2)*ln(C-1) (C=10: 3.11). ``scale=64`` gives the
            paper's setting exactly in every dimension. See docs/low_dim.md
            ("Low-dimensional embeddings") and ``pml_extras.losses._low_dim``.
        momentum: EMA factor of t (paper: 0.01).
        chunk_size, impl: as in :class:`SparseCircleLoss`.
        weight_init_func: as in PML; the default is the rule's
            (:func:`~pml_extras.losses.auto_proxy_init_`): spread proxies of length
            0.05 when low-dimensional, else PML's ``normal_`` (same draws as PML). The
            init follows D and C even when the scale is given: for a paper's exact
            setup at low D also pass ``weight_init_func=torch.nn.init.normal_``.
        weight_regularizer, weight_reg_weight, reducer, distance (CosineSimilarity only),
        embedding_regularizer: as in PML.

    Shapes: embeddings (B, D), labels (B,) in [0, C); per-sample losses to the reducer.

    Example:
        >>> loss_fn = CurricularFaceLoss(num_classes=1000, embedding_size=512)
        >>> loss = loss_fn(torch.randn(64, 512), torch.randint(0, 1000, (64,)))
    """

    # The rule's init: short spread proxies when low-dimensional, else PML's normal_.
    default_weight_init = staticmethod(_low_dim.auto_proxy_init_)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Union[float, str] = "auto",
        scale: Union[float, str] = "auto",
        momentum: float = 0.01,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        **kwargs,
    ):
        hyper_parameters = {"margin": margin, "scale": scale, "momentum": momentum}
        super().__init__(num_classes, embedding_size, hyper_parameters, chunk_size, impl, **kwargs)
        self.register_buffer("t", torch.zeros(1))

    @classmethod
    def resolve_hyper_parameters(
        cls, num_classes, embedding_size, owner=None, margin="auto", scale="auto", momentum=0.01
    ) -> dict:
        """margin (radians) and scale: numbers, or "auto": the paper's 0.5 and 64 unless
        low-dimensional (module ``_low_dim``); momentum in [0, 1]."""
        owner = owner or cls.__name__
        scale = _low_dim.resolve_scale(scale, 64.0, num_classes, embedding_size, owner)
        margin = _low_dim.resolve_angular_margin(margin, 0.5, num_classes, embedding_size, owner)
        cls.check_values(owner, positive={"scale": scale}, unit_interval={"momentum": momentum})
        return {"margin": float(margin), "scale": float(scale), "momentum": float(momentum)}

    def per_sample_losses(self, embeddings, labels):
        """Updates t (training mode only), then softplus(lse_{j != y} s*g(c_j) - s*f(c_y))."""
        # Raw embeddings: both normalise in float32 themselves (operand policy).
        cos_y = target_cosine(embeddings, self.W, labels)
        if self.training:
            self.t.copy_(update_t(self.t, cos_y, self.momentum))
        return curricular_face_loss(
            embeddings,
            self.W,
            labels,
            # A copy, so that a later in-place update cannot reach a pending backward.
            self.t.detach().clone(),
            self.margin,
            self.scale,
            target_cos=cos_y,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )
