"""Class-sharded (model-parallel, Partial-FC style) SparseCircleLoss and CurricularFaceLoss.

The class proxies W (D x C) are split by classes over the ranks of a process group: rank r
owns the contiguous columns [start_r, end_r) and no rank ever holds all of W. Each loss
here gives its formula (``_partials``, ``_per_sample``) and its defaults (its
single-device twin's); the step they share (gathered batch, partial logsumexps combined
over ranks, sampling, inspection) is the template in
:mod:`pml_extras.distributed.sharded_base`, whose names are importable from here too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..functional.circle import circle_target_logit
from ..functional.curricular import curricular_target, update_t
from ..losses import CurricularFaceLoss, SparseCircleLoss
from ..ops.class_lse import target_cosine
from . import _comm

# The template and its helpers live in sharded_base; importable from here as before.
from .sharded_base import _MASK64, _mix_seed, _ShardedClassLoss, shard_ranges  # noqa: F401

__all__ = ["ShardedCurricularFaceLoss", "ShardedSparseCircleLoss", "shard_ranges"]


class ShardedSparseCircleLoss(_ShardedClassLoss):
    """Class-level Circle loss with W sharded by classes over the ranks (model parallel).

    The same loss as :class:`pml_extras.losses.SparseCircleLoss` (Sun et al., CVPR 2020,
    class-level form, one positive proxy per sample),

        l_i = softplus( logsumexp_{j != y_i} gamma*[s_ij + m]_+*(s_ij - m)
                        - gamma*[1 + m - s_iy]_+*(s_iy - (1 - m)) ),

    computed over the *global* batch of a process group while each rank holds only its
    shard W[:, class_start:class_end] (Partial-FC style model parallelism, An et al. 2021).
    Rank r owns the contiguous classes of :func:`shard_ranges` (uneven shards allowed).
    Without ``torch.distributed`` (or with one rank) it is the single-GPU loss.

    Use it like any PML loss, *outside* DistributedDataParallel: every rank calls it on
    its local batch, and its W shard goes to the optimizer but not to DDP (W differs per
    rank; DDP would average unrelated tensors, or refuse uneven shapes)::

        model = DDP(backbone)                                     # embeddings only
        loss_fn = ShardedSparseCircleLoss(C, D).to(device)        # after init_process_group
        opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
        loss = loss_fn(model(x), y)                               # local x, y
        loss.backward(); opt.step()

    To clip gradients, use :func:`pml_extras.distributed.clip_grad_norm_` (``model.parameters(),
    max_norm, sharded=loss_fn.parameters()``): ``torch.nn.utils.clip_grad_norm_`` on one rank
    would measure the model plus only its own shard.

    Gradient contract (N ranks, L_s the loss returned on rank s, which is the reducer
    applied to rank s's own samples, plus its share of the weight regularizer; and
    L = (1/N) * sum_s L_s the objective DDP optimises):

    * rank r's embeddings receive  N * dL/dx_r = d(sum_s L_s)/dx_r,  so that after DDP's
      averaging of the model gradients the model gets exactly dL/dtheta;
    * rank r's shard receives exactly  dL/dW_r  (its gradient is scaled by 1/N inside the
      loss, and it must not be averaged by DDP);
    * with equal local batch sizes and the default MeanReducer, L is the single-process
      mean loss over the concatenated global batch with the concatenated W, so both are
      the single-process gradients (the embedding one times N before DDP's averaging).
      With unequal local batches each sample weighs 1/(N * B_s), as in any DDP training.

    The returned value is L_r (this rank's samples); all-reduce it for the global mean.

    Negative-class sampling (``sample_rate`` < 1, training mode only): each rank keeps
    every class of its shard that is a label somewhere in the global batch, plus random
    others, ceil(sample_rate * shard size) columns in all (or more, if there are more
    positives). The draw uses a generator seeded from (``seed``, the ``sample_step``
    buffer, rank): reproducible, and resumed by the state_dict. Unused columns get an
    exactly zero gradient (note that momentum/Adam still move them with old statistics);
    the weight regularizer only sees the used columns. ``last_sampled_classes`` holds
    the global ids used at the last step.

    Args:
        num_classes: C (>= number of ranks). embedding_size: D. m, gamma: as in
            :class:`~pml_extras.losses.SparseCircleLoss`, with the same defaults: "auto"
            resolves for the global (C, D) exactly as the single-device loss does (the
            paper's m=0.25, gamma=256 at face-recognition sizes, e.g. C=1M, D=512; the
            low-dimensional rule below D = 4*ln(C*(C-1))). Pass m=0.25, gamma=256 for the
            paper's values in every dimension.
        sample_rate: fraction of each shard used per step, in (0, 1]. seed: sampling seed.
        shard_sizes: optional classes per rank (default: as even as possible).
        process_group: the group to shard over (default: the world).
        chunk_size, impl: as in the single-GPU loss ("auto", "torch", "triton", or
            "hybrid": each rank's shard through library matmuls plus fused Triton
            epilogues; "auto" picks it where the cost model predicts it faster for the
            shard's shapes).
        init_seed: base seed of the shard initialisation (default: one draw from the global
            generator); rank r initialises its shard from mix(init_seed, r).
        weight_init_func: as in PML; the default is the single-device loss's (PML's
            ``normal_`` unless low-dimensional for the global (C, D), where it is the
            low-dimensional rule's init applied to each shard).
        weight_regularizer, weight_reg_weight, reducer, distance (CosineSimilarity only),
        embedding_regularizer: as in PML.

    State: ``state_dict()`` is per rank: ``W`` (D, C_r), ``class_range`` [start, end) (checked
    on load) and ``sample_step``; save one file per rank, and re-shard them offline for
    another world size with :func:`pml_extras.distributed.reshard_checkpoints` (never all of
    W in memory). :meth:`gather_weight` builds the full (D, C) W on every rank and
    :meth:`load_full_weight` takes a rank's slice of one (exports at sizes where W fits one
    device); :meth:`predict` gives the top-k nearest-proxy classes, streaming over the
    shard in chunks.

    Bad inputs on any rank raise on every rank (no hang): an out-of-range label is a
    ValueError naming the label and ``num_classes``.
    """

    single_device_loss = SparseCircleLoss
    scale_name = SparseCircleLoss.scale_name

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        m: Union[float, str] = "auto",
        gamma: Union[float, str] = "auto",
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_sizes: Optional[Sequence[int]] = None,
        process_group=None,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        init_seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(
            num_classes,
            embedding_size,
            {"m": m, "gamma": gamma},
            sample_rate=sample_rate,
            seed=seed,
            shard_sizes=shard_sizes,
            process_group=process_group,
            chunk_size=chunk_size,
            impl=impl,
            init_seed=init_seed,
            **kwargs,
        )

    def _partials(self, x_all, w_used, target):
        return self._class_lse(x_all, w_used, target, "circle", self.m)

    def _per_sample(self, lse, cos_y):
        return F.softplus(lse - circle_target_logit(cos_y, self.m, self.gamma))


class ShardedCurricularFaceLoss(_ShardedClassLoss):
    """CurricularFace with W sharded by classes over the ranks (model parallel).

    The same loss as :class:`pml_extras.losses.CurricularFaceLoss` (Huang et al., CVPR
    2020), over the global batch of a process group, each rank holding one class shard of
    W; see :class:`ShardedSparseCircleLoss` for the sharding, sampling, state and the
    gradient contract, which are identical.

    ``t`` is updated (training mode only, no gradient) from the mean target cosine of the
    *global* batch: the target cosines are summed over ranks (each class lives on exactly
    one rank, the others contribute 0), so every rank computes the same t, bit for bit,
    and the hard-negative threshold cos(theta_y + m) of every row is the global one.
    ``t`` is in every rank's state_dict (identical values).

    Args:
        num_classes, embedding_size, margin, scale, momentum (0.01): as in
            :class:`~pml_extras.losses.CurricularFaceLoss`, with the same defaults: "auto"
            resolves for the global (C, D) as the single-device loss does (the paper's
            margin 0.5 and scale 64 at face-recognition sizes). sample_rate, seed,
            shard_sizes, process_group, chunk_size, impl, init_seed, weight_init_func and
            PML's kwargs: as in :class:`ShardedSparseCircleLoss`.
    """

    single_device_loss = CurricularFaceLoss
    scale_name = CurricularFaceLoss.scale_name

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Union[float, str] = "auto",
        scale: Union[float, str] = "auto",
        momentum: float = 0.01,
        sample_rate: float = 1.0,
        seed: int = 0,
        shard_sizes: Optional[Sequence[int]] = None,
        process_group=None,
        chunk_size: Optional[int] = None,
        impl: str = "auto",
        init_seed: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(
            num_classes,
            embedding_size,
            {"margin": margin, "scale": scale, "momentum": momentum},
            sample_rate=sample_rate,
            seed=seed,
            shard_sizes=shard_sizes,
            process_group=process_group,
            chunk_size=chunk_size,
            impl=impl,
            init_seed=init_seed,
            **kwargs,
        )
        self.register_buffer("t", torch.zeros(1))

    def _partials(self, x_all, w_used, target):
        # Global target cosines (each class is owned by one rank; the others add 0).
        cos_det = _comm.all_reduce_sum(target_cosine(x_all, w_used, target), self.process_group)
        if self.training:
            self.t.copy_(update_t(self.t, cos_det, self.momentum))
        _, threshold = curricular_target(cos_det, self.margin)
        # t: a copy, so that a later in-place update cannot reach a pending backward.
        return self._class_lse(
            x_all, w_used, target, "curricular", self.t.detach().clone(), row_param=threshold
        )

    def _per_sample(self, lse, cos_y):
        target_logit, _ = curricular_target(cos_y, self.margin)
        return F.softplus(lse - self.scale * target_logit)
