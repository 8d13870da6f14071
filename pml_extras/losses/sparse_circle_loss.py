"""Class-level Circle loss with integer labels and learnable class proxies."""

from __future__ import annotations

from typing import Optional, Union

from ..functional.circle import sparse_circle_loss
from . import _low_dim
from .base_proxy_loss import BaseProxyLoss


class SparseCircleLoss(BaseProxyLoss):
    """Class-level Circle loss with integer labels and learnable class proxies.

    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
    CVPR 2020. Each sample has one positive, its own class proxy, and every other proxy
    is a negative. With s_j the cosine to proxy j and y the label:

        L = softplus( logsumexp_{j != y} gamma*[s_j + m]_+*(s_j - m)
                      - gamma*[1 + m - s_y]_+*(s_y - (1 - m)) )

    The [.]_+ weights are detached. Equal to PML's pair-level ``CircleLoss`` with
    ``ref_emb`` = the normalised proxies and ``ref_labels`` = arange(num_classes).
    The logits are never materialised: a blockwise logsumexp runs over class chunks in
    float32 (Triton on CUDA), so it is stable at gamma=256 in fp16/bf16 and scales to
    millions of classes.

    Args:
        num_classes: C. embedding_size: D. The proxies ``W`` have shape (D, C).
        m: relaxation margin, or ``"auto"`` (the default): the paper's 0.25 unless the
            embedding is low-dimensional for C, D < 4*ln(C*(C-1)) (C=10: D <= 17), where
            it is min(max(0.25, c*), 1/2), c* the largest pairwise cosine of the best
            spread of C points on S^(D-1) (10 classes: 3-D 0.41; 2-D 0.5, c* = 0.81).
        gamma: scale, or ``"auto"`` (the default): the paper's 256 unless
            low-dimensional, where it is AdaCos's fixed scale sqrt(2)*ln(C-1) (C=10: 3.11).
            The paper's settings, exact in every dimension when given explicitly: face
            recognition m=0.25, gamma=256; person re-ID m=0.25, gamma=128; fine-grained
            retrieval m=0.4, gamma=80. See docs/low_dim.md.
        chunk_size: classes per block (default: about 4M logits per block).
        impl: "auto" (Triton or hybrid on CUDA, else PyTorch), "torch", "triton", "hybrid".
            "auto" picks "hybrid" on CUDA where the cost model predicts it faster (it
            has not run on a GPU yet): library matmuls per class chunk plus fused Triton
            epilogues (:mod:`pml_extras.ops.class_lse_hybrid`), the PyTorch path's
            numbers up to rounding (16-bit operands round G / ||w||, not G and
            W / ||w||); it needs Triton (a CUDA tensor, or ``TRITON_INTERPRET=1`` on
            CPU) and float32/bf16/fp16 inputs (float64 raises TypeError).
        weight_init_func: as in PML; the default is the rule's for Circle loss
            (``pml_extras.losses._low_dim.circle_proxy_init_``): spread proxies with
            ``normal_`` lengths when low-dimensional, else PML's ``normal_`` (same draws
            as PML). The init follows D and C even when the scale is given: for a
            paper's exact setup at low D also pass ``weight_init_func=torch.nn.init.normal_``.
        weight_regularizer, weight_reg_weight, reducer, distance (CosineSimilarity only),
        embedding_regularizer: as in PML.

    Shapes: embeddings (B, D), labels (B,) in [0, C). Per-sample losses go to the
    reducer (default MeanReducer); miners' ``indices_tuple`` become per-sample weights.

    Example:
        >>> loss_fn = SparseCircleLoss(num_classes=10, embedding_size=64)
        >>> loss = loss_fn(torch.randn(32, 64), torch.randint(0, 10, (32,)))
        >>> loss.backward()
    """

    scale_name = "gamma"
    # Spread proxies (normal_ lengths) when low-dimensional, else PML's normal_.
    default_weight_init = staticmethod(_low_dim.circle_proxy_init_)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: Union[float, str] = "auto",
        gamma: Union[float, str] = "auto",
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        **kwargs,
    ):
        hyper_parameters = {"m": m, "gamma": gamma}
        super().__init__(num_classes, embedding_size, hyper_parameters, chunk_size, impl, **kwargs)

    @classmethod
    def resolve_hyper_parameters(
        cls, num_classes, embedding_size, owner=None, m="auto", gamma="auto"
    ) -> dict:
        """m and gamma: numbers, or "auto": the paper's 0.25 and 256 unless
        low-dimensional (module ``_low_dim``); gamma > 0."""
        owner = owner or cls.__name__
        gamma = _low_dim.resolve_scale(gamma, 256.0, num_classes, embedding_size, owner, "gamma")
        m = _low_dim.resolve_circle_margin(m, 0.25, num_classes, embedding_size, owner)
        cls.check_values(owner, positive={"gamma": gamma})
        return {"m": float(m), "gamma": float(gamma)}

    def per_sample_losses(self, embeddings, labels):
        """softplus(lse_{j != y} gamma*a_n*(s_j - m) - gamma*a_p*(s_y - (1 - m)))."""
        return sparse_circle_loss(
            embeddings,
            self.W,
            labels,
            self.m,
            self.gamma,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )
